"""Training core (colbertzero.train: dist, module, losses, step, engine) on real processes and a real engine.

Two launches of tests/train_core_worker.py, each looping over ZeRO stages 0-3 (engine construction is cheap; a
process start is not): one process started with no torch launcher variables (the single-process default), and two
gloo ranks under torchrun. Each case takes one step on a tiny ModernBERT ColBERT and compares the loss and the gradient
(read at the accumulation boundary, before the step) with PyLate's own loss on the WHOLE global batch in one process.
The rest are quick in-process checks of configuration.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_core_worker.py"
RTOL = 1e-5  # fp32
STAGES = {0, 1, 2, 3}


def _launch(cmd: list[str], out: Path) -> dict:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # The first run on a machine JIT-builds DeepSpeed's CPU comm op (~1-2 min; cached in TORCH_EXTENSIONS_DIR).
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{log[-6000:]}"
    return {"results": json.loads(out.read_text()), "log": log}


@pytest.fixture(scope="module")
def one_process(tiny_modernbert, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("train-core-1") / "results.json"
    return _launch([sys.executable, str(WORKER), tiny_modernbert, str(out)], out)


@pytest.fixture(scope="module")
def two_ranks(tiny_modernbert, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("train-core-2") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return _launch(cmd + [str(WORKER), tiny_modernbert, str(out)], out)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _steps(run: dict) -> list[dict]:
    return [c for c in run["results"]["cases"] if c["case"] != "dropout"]


@pytest.mark.parametrize("launch", ["one_process", "two_ranks"])
def test_loss_equals_pylate_on_the_global_batch(launch, request):
    """Contrastive (in-batch and hard negatives) and Distillation: our global-mean loss = PyLate's loss value."""
    run = request.getfixturevalue(launch)
    assert run["results"]["world_size"] == (1 if launch == "one_process" else 2)
    for c in _steps(run):
        assert _rel(c["loss"], c["ref_loss"]) < 1e-6, c


@pytest.mark.parametrize("launch", ["one_process", "two_ranks"])
def test_gradients_equal_the_global_mean_gradient_on_every_zero_stage(launch, request):
    run = request.getfixturevalue(launch)
    steps = _steps(run)
    for c in steps:
        assert c["max_rel"] < RTOL, c
        # DeepSpeed's norm (what it clips on) is the norm of the global-mean gradient.
        assert _rel(c["grad_norm"], c["ref_grad_norm"]) < RTOL, c
    covered = {(c["case"], c["stage"]) for c in steps}
    for case in ("supervised-gradcache", "supervised-direct", "unsupervised-gradcache", "distillation"):
        assert {s for name, s in covered if name == case} == STAGES, case
    assert {s for name, s in covered if name == "supervised-gradcache-accumulation"} == {0, 3}
    assert {s for name, s in covered if name == "supervised-gradcache-offload"} == {2, 3}
    for case in ("unsupervised-gradcache-scale-global_batch", "supervised-direct-scale-world_size"):
        assert {s for name, s in covered if name == case} == {0, 2}, case


@pytest.mark.parametrize("launch", ["one_process", "two_ranks"])
def test_loss_scale_multiplies_the_gradient_not_the_loss(launch, request):
    """The scripts' gradient scales, analytically: global batch (10 queries) and world size (1 or 2) times the
    global-mean gradient (checked against the scaled reference above), while the reported loss stays the mean."""
    run = request.getfixturevalue(launch)
    world = run["results"]["world_size"]
    by = {(c["case"], c["stage"]): c for c in _steps(run)}
    for stage in (0, 2):
        cached, plain = by[("unsupervised-gradcache-scale-global_batch", stage)], by[("unsupervised-gradcache", stage)]
        assert _rel(cached["grad_norm"], 10 * plain["grad_norm"]) < RTOL and _rel(cached["loss"], plain["loss"]) < 1e-7
        gathered, mean = by[("supervised-direct-scale-world_size", stage)], by[("supervised-direct", stage)]
        assert _rel(gathered["grad_norm"], world * mean["grad_norm"]) < RTOL
        assert _rel(gathered["loss"], mean["loss"]) < 1e-7


@pytest.mark.parametrize("launch", ["one_process", "two_ranks"])
def test_gradcache_reforward_reproduces_dropout(launch, request):
    for c in [c for c in request.getfixturevalue(launch)["results"]["cases"] if c["case"] == "dropout"]:
        assert c["max_rel"] < RTOL, c
        assert c["other_seed_rel"] > 1e-2, c  # dropout really changes the gradient: the check above means something


def test_steps_follow_the_schedule_and_train_the_temperature(two_ranks):
    for c in _steps(two_ranks):
        # lr 1e-3, linear decay over 10 steps without warmup: DeepSpeed steps the scheduler once per engine.step()
        assert math.isclose(c["lr"], 1e-3) and math.isclose(c["second_lr"], 0.9e-3), c
        assert math.isfinite(c["second_loss"]), c
        if c["case"].startswith("supervised"):
            assert math.isclose(c["temperature"], 0.05, rel_tol=1e-6), c
            assert abs(c["second_temperature"] - 0.05) > 1e-4, c  # learnable: AdamW moved it
            assert c["second_loss"] < c["loss"], c
        elif c["case"].startswith("unsupervised-gradcache"):
            assert c["second_temperature"] == c["temperature"] == pytest.approx(0.02), c
        else:
            assert c["temperature"] is None and c["second_temperature"] is None, c


def test_zero3_ranks_exit_cleanly(two_ranks):
    """The worker ends with dist.teardown() after ZeRO-3 engines: exit status 0 (checked at launch), no abort."""
    log = two_ranks["log"].lower()
    for marker in ("abort", "terminate called", "core dumped", "sigabrt", "childfailederror"):
        assert marker not in log, marker


# ----------------------------------------------------------------------------- configuration, in process
def _phase(**kw):
    from colbertzero.recipe import Phase

    fields = dict(
        kind="supervised",
        init="unused",
        data={"sources": [{"name": "unused", "path": "/unused"}], "shards_dir": "/unused"},
        lr=1e-3,
        global_batch_size=16,
    )
    fields.update(kw)
    return Phase.model_validate(fields)


def _runtime(world: int = 2, device: str = "cpu", dtype=torch.float32):
    from colbertzero.train.dist import Runtime

    return Runtime(0, world, 0, "gloo", torch.device(device), dtype)


def test_deepspeed_config_from_phase():
    from colbertzero.train.engine import deepspeed_config

    cfg = deepspeed_config(
        _phase(deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True}, max_grad_norm=None),
        _runtime(world=4),
    )
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 0.0 and cfg["bf16"] == {"enabled": False}
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "optimizer" not in cfg and "scheduler" not in cfg  # torch AdamW and LambdaLR are passed in
    gpu = deepspeed_config(_phase(deepspeed={"zero_stage": 1}), _runtime(device="cuda", dtype=torch.bfloat16))
    assert gpu["bf16"] == {"enabled": True} and gpu["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        deepspeed_config(_phase(deepspeed={"zero_stage": 2, "offload_params": True}), _runtime())
    with pytest.raises(ValueError, match="does not split"):
        deepspeed_config(_phase(global_batch_size=15), _runtime())


def test_device_and_dtype_are_configuration():
    from colbertzero.train.dist import select_device_dtype

    assert select_device_dtype(bf16=True, device="cpu") == (torch.device("cpu"), torch.float32)
    assert select_device_dtype(bf16=True, device="cuda:1")[1] == torch.bfloat16
    assert select_device_dtype(bf16=False, device="cuda:0")[1] == torch.float32


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("linear", [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]),
    ],
)
def test_schedules_with_warmup(schedule, expected):
    from colbertzero.train.engine import build_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, _phase(schedule=schedule, warmup_ratio=0.2), total_steps=10)  # ceil(0.2*10) = 2
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


def test_no_weight_decay_on_norms_biases_and_temperature():
    from colbertzero.train.engine import build_optimizer

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(2, 2)
            self.norm = torch.nn.LayerNorm(2)
            self.temperature = torch.nn.Parameter(torch.tensor([0.05]))

    model = Tiny()
    opt = build_optimizer(model, _phase(weight_decay=0.01))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model.dense.weight)}


def test_loss_table():
    from colbertzero.recipe import PHASE_KINDS
    from colbertzero.train.losses import CONTRASTIVE, DISTILLATION, LOSSES, loss_for

    assert set(LOSSES) == set(PHASE_KINDS)
    assert loss_for("unsupervised") is loss_for("supervised") is CONTRASTIVE
    assert loss_for("distillation") is DISTILLATION
    with pytest.raises(ValueError, match="no loss for phase kind"):
        loss_for("mlm")


def test_padding_documents_leaves_maxsim_unchanged():
    """Cross-rank padding (zeros, mask False) gives the scores of the unpadded documents."""
    from pylate.scores import colbert_scores

    from colbertzero.train.losses import pad_documents

    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 5, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    dp, mp = pad_documents(d, mask, 11)
    assert dp.shape == (4, 11, 8) and not mp[:, 6:].any()
    torch.testing.assert_close(colbert_scores(q, dp, documents_mask=mp), colbert_scores(q, d, documents_mask=mask))


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks-of-2-queries"])
@pytest.mark.parametrize("query_mask", [False, True], ids=["expanded-queries", "masked-queries"])
def test_hand_written_cached_loss_gradients_equal_autograd(query_mask, chunked, monkeypatch):
    """The hand-written contrastive gradients (along MaxSim's argmax; the cached loss's, and the direct loss's
    through its autograd node) against autograd through PyLate's scores, with masked document tokens (some maxima
    fall on them: every real token of the pair scores below 0), masked query tokens (models without query
    expansion), a temperature, and queries scored in several chunks."""
    from colbertzero.train import losses
    from colbertzero.train.losses import contrastive_ce_sum, contrastive_sum_and_grads

    if chunked:
        # 2 queries x 10 documents x 7 query tokens x 16 (Scorer.width: the 16-wide picked token beats 9 tokens)
        monkeypatch.setattr(losses, "SCORE_BUDGET", 2 * 10 * 7 * 16)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 7, 16, generator=g, dtype=torch.float64), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(10, 9, 16, generator=g, dtype=torch.float64), dim=-1)
    d_mask = torch.rand(10, 9, generator=g) > 0.3
    d_mask[:, 0] = True
    q_mask = (torch.rand(5, 7, generator=g) > 0.3) if query_mask else None
    labels = torch.tensor([0, 2, 4, 6, 8])
    t = torch.tensor([0.05], dtype=torch.float64)
    real = torch.einsum("ash,bth->abst", q, d).masked_fill(~d_mask[None, :, None, :], -1).amax(-1)
    assert (real < 0).any()  # the case where PyLate's maximum is a masked token's 0

    ql, dl, tl = q.clone().requires_grad_(), d.clone().requires_grad_(), t.clone().requires_grad_()
    ref = contrastive_ce_sum(ql, q_mask, dl, d_mask, labels, tl) / 7
    ref.backward()
    d_in = d.clone()
    loss, q_grad, d_grad, t_grad = contrastive_sum_and_grads(q, q_mask, d_in, d_mask, labels, t, 7)
    assert torch.equal(d_in, d)  # a copy is masked, not the caller's documents
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(q_grad, ql.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_grad, dl.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_grad, tl.grad, rtol=1e-10, atol=1e-12)
    assert d_grad[~d_mask].abs().max() == 0  # masked document tokens never receive gradient
    again = contrastive_sum_and_grads(q, q_mask, d_in, d_mask, labels, t, 7, zero_masked_in_place=True)
    assert all(torch.equal(a, b) for a, b in zip(again, (loss, q_grad, d_grad, t_grad)))
    assert d_in[~d_mask].abs().max() == 0 and torch.equal(d_in[d_mask], d[d_mask])  # the owner's cache, zeroed

    # The same gradients through the non-cached loss (an autograd node around them), times an outer factor.
    from colbertzero.train.losses import contrastive_loss

    qn, dn, tn = q.clone().requires_grad_(), d.clone().requires_grad_(), t.clone().requires_grad_()
    direct = contrastive_loss(qn, q_mask, dn, d_mask, n_docs=2, temperature=tn, denominator=7, gather=False)
    (3 * direct).backward()
    torch.testing.assert_close(direct.detach(), ref.detach(), rtol=1e-12, atol=0)
    for got, want in ((qn.grad, ql.grad), (dn.grad, dl.grad), (tn.grad, tl.grad)):
        torch.testing.assert_close(got, 3 * want, rtol=1e-10, atol=1e-12)


def test_bf16_step_matches_fp32_and_accumulates_in_fp32(tiny_modernbert, tmp_path):
    """bf16 compute on the CPU accelerator (DeepSpeed's bf16 config, as on a GPU), ZeRO 1-3, one step of 2
    accumulation groups in GradCache chunks: gradients within bf16's tolerance of the fp32 step's, accumulated and
    kept (master weights) in fp32."""
    out = tmp_path / "bf16.json"
    run = _launch([sys.executable, str(ROOT / "tests" / "bf16_worker.py"), tiny_modernbert, str(out)], out)
    stages = run["results"]
    assert [c["stage"] for c in stages] == [1, 2, 3]
    for c in stages:
        assert c["compute_dtype"] == "torch.bfloat16", c
        assert (c["accumulation_dtype"], c["master_dtype"]) == ("torch.float32", "torch.float32"), c
        assert c["max_rel"] < 0.05, c  # bf16 keeps 8 bits of mantissa: ~2% after a forward, a loss and a backward
        assert _rel(c["loss_bf16"], c["loss_fp32"]) < 0.01, c


def test_bf16_on_zero_stage_0_is_refused():
    from colbertzero.train.engine import deepspeed_config

    with pytest.raises(ValueError, match="ZeRO stage 0 would accumulate"):
        deepspeed_config(_phase(deepspeed={"zero_stage": 0}), _runtime(device="cuda", dtype=torch.bfloat16))
    assert deepspeed_config(_phase(deepspeed={"zero_stage": 2}), _runtime(device="cuda", dtype=torch.bfloat16))[
        "data_types"] == {"grad_accum_dtype": "fp32"}
