"""The phase runner as a job runs it: `colbertzero train RUN_DIR --phase P` on 2 gloo ranks, on shards of
recipes/tiny-cpu.yaml prepared once for the session, with the tiny ModernBERT (every phase starts from it, so each
phase runs on its own in a run dir). No mocks: real processes, real signals, real DeepSpeed engines.

Launches (most of each one's ~20-40 s is importing the stack; the independent ones run side by side):
- reference: supervised (GradCache, hard negatives), ZeRO-3, uninterrupted, under torchrun.
- interrupted: the same recipe in another run dir. Attempt 1 is started the way srun starts tasks (Slurm variables
  only) and gets SIGUSR1 on one rank: both ranks checkpoint and exit 3. Attempt 2 (torchrun) is SIGKILLed at a random
  step. Attempt 3 finishes. Every step any attempt logged, and the exported weights, equal the reference's exactly.
  Both evaluate in training at steps 5 and 10 (eval.in_training): same scores, and TensorBoard gets the scalars.
- unsupervised at ZeRO-1 and distillation at ZeRO-2 (with evaluation) run to the end and export PyLate models.
- unsupervised at ZeRO-0 with lr 1e30: the non-finite loss is caught; the phase is marked failed with step and source.
Then the chain as tiny-cpu.yaml writes it (each phase from the previous one's export), GradCache on, under each
ZeRO stage: 12 more launches, ~2.5 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colbertzero.data.loader import GlobalBatchLoader
from colbertzero.data.prepare import prepare_recipe
from colbertzero.manifest import Manifest
from colbertzero.recipe import load_recipe
from colbertzero.runtime import Exit
from colbertzero.train.metering import FlopCounter, peak_flops

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-cpu.yaml"
PHASES = ("unsupervised", "supervised", "distillation")
WORLD = 2
TIMEOUT = 600
LOG_FIELDS = {"time", "phase", "step", "total_steps", "loss", "lr", "temperature", "grad_norm", "samples_per_s",
              "tokens_per_s", "mfu", "tflops", "source", "consumed", "attempt", "seconds_per_step", "clipped"}
# The resumed recipe: 12 steps, a checkpoint every 3, the two newest kept.
RESUME = ("phases.supervised.deepspeed.zero_stage=3", "phases.supervised.cadence.save_every=3",
          "phases.supervised.cadence.keep_last=2")


# ---------------------------------------------------------------- run dirs and launches
def _recipe(setup: dict, *overrides: str):
    """tiny-cpu with every phase starting from the tiny ModernBERT, reading the session's shards, no evaluation."""
    base = []
    for p in PHASES:
        base += [f"phases.{p}.init={setup['model']}", f"phases.{p}.data.shards_dir={setup['shards'] / p}",
                 f"phases.{p}.eval.beir=[]"]
    return load_recipe(TINY, base + list(overrides))


@pytest.fixture(scope="session")
def setup(tmp_path_factory, tiny_modernbert, shared_data) -> dict:
    s = {"model": tiny_modernbert, "shards": tmp_path_factory.mktemp("runner-shards"), "data": shared_data,
         "runs": tmp_path_factory.mktemp("runner-runs")}
    prepare_recipe(_recipe(s), progress=False)
    return s


def _in_training_eval(setup: dict) -> tuple[str, ...]:
    """Evaluate the supervised phase at steps 5 and 10 on a small set (the resumed recipe's runs)."""
    beir = setup["data"] / "beir" / "msmarco-5k"
    return ("phases.supervised.cadence.eval_every=5", f"phases.supervised.eval.in_training=[{beir}]",
            "phases.supervised.eval.max_corpus=200", "phases.supervised.eval.where=inline")


def _run_dir(setup: dict, name: str, *overrides: str) -> Path:
    run = setup["runs"] / name
    Manifest.create(run, _recipe(setup, *overrides))
    return run


def _env() -> dict:
    """The test's environment without launcher or Slurm variables (the suite may itself run inside a job)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _torchrun(run: Path, phase: str, tag: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "colbertzero", "train", str(run), "--phase", phase]
    with open(run / f"{tag}.log", "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _srun_style(run: Path, phase: str, tag: str) -> list[subprocess.Popen]:
    """Both ranks as srun starts them: no torch variables, only Slurm's. The job id decides the rendezvous port
    (runtime.master_port_for_job: 20000 + id mod 40000), so pick an id whose port is free here."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 20000 <= port < 60000:
            break
    procs = []
    for rank in range(WORLD):
        env = dict(_env(), SLURM_JOB_ID=str(port - 20000), SLURM_STEP_ID="0", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_NTASKS=str(WORLD), SLURM_STEP_NUM_TASKS=str(WORLD),
                   SLURM_STEP_TASKS_PER_NODE=str(WORLD), SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1",
                   SLURM_NNODES="1")
        with open(run / f"{tag}-rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "colbertzero", "train", str(run), "--phase", phase],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _kill_job(job: subprocess.Popen) -> None:
    """SIGKILL torchrun's ranks and agent, as a node failure would: the ranks first, so the agent cannot react. Each
    by its pid: torchrun starts the ranks in sessions of their own, out of reach of the agent's process group."""
    import psutil

    ranks = psutil.Process(job.pid).children(recursive=True)
    for p in ranks:
        p.kill()
    job.kill()
    psutil.wait_procs(ranks, timeout=60)


def _wait(proc: subprocess.Popen, run: Path, tag: str) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_job(proc)
        pytest.fail(f"{tag} did not finish in {TIMEOUT} s:\n{_tail(run, tag)}")


def _tail(run: Path, tag: str) -> str:
    return "\n".join(p.read_text()[-4000:] for p in sorted(run.glob(f"{tag}*.log")))


def _launch(run: Path, phase: str, tag: str) -> int:
    return _wait(_torchrun(run, phase, tag), run, tag)


def _records(run: Path, phase: str) -> list[dict]:
    path = run / "phases" / phase / "logs" / "train.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]  # complete lines only


def _until(run: Path, phase: str, ready, procs: list[subprocess.Popen], what: str) -> None:
    """Poll the run's log and manifest until `ready(records, manifest phase)`; fail if the job ends first."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if ready(_records(run, phase), Manifest(run).phase(phase)):
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"the job ended before {what}: exit {[p.poll() for p in procs]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _weights(export: Path) -> dict[str, torch.Tensor]:
    return {f"{f.parent.name}/{k}": v for f in sorted(export.rglob("*.safetensors")) for k, v in load_file(f).items()}


# ---------------------------------------------------------------- the launches
# Jobs that depend on nothing else: (phase, overrides). They run side by side with the interrupted one (its kills are
# timed by its own log, not by the clock): most of a launch is single-threaded start-up, so 2 cores stay busy.
JOBS = {
    "reference": ("supervised", RESUME),
    "unsupervised-zero1": ("unsupervised", ("phases.unsupervised.deepspeed.zero_stage=1",)),
    "distillation-zero2": ("distillation", ("phases.distillation.deepspeed.zero_stage=2",
                                            "phases.distillation.eval.max_corpus=200")),
    # lr 1e30 (after the first step's zero warm-up lr) blows the weights up: a real non-finite loss, not a patch.
    "nan": ("unsupervised", ("phases.unsupervised.deepspeed.zero_stage=0", "phases.unsupervised.lr=1e30",
                             "phases.unsupervised.cadence.save_every=1", "phases.unsupervised.cadence.keep_last=8")),
    # An in-training set that is a folder but no dataset (validate only checks that it exists): rank 0's evaluation
    # fails at step 2 and every rank must fail with it, not wait at a barrier.
    "bad-eval": ("unsupervised", ("phases.unsupervised.cadence.eval_every=2", "phases.unsupervised.eval.where=inline")),
    # Evaluation off the training ranks (eval.where: job, the default): a background process scores step 15's
    # weights while the phase keeps stepping.
    "eval-job": ("unsupervised", ("phases.unsupervised.data.epochs=12", "phases.unsupervised.cadence.eval_every=15",
                                  "phases.unsupervised.eval.max_corpus=200",
                                  "phases.unsupervised.cadence.save_every=30")),
}


@pytest.fixture(scope="module")
def jobs(setup):
    beir = f"phases.distillation.eval.beir=[{setup['data'] / 'beir' / 'msmarco-5k'}]"
    started = {}
    for name, (phase, overrides) in JOBS.items():
        extra = [beir] if phase == "distillation" else list(_in_training_eval(setup)) if name == "reference" else []
        if name == "eval-job":
            extra = [f"phases.unsupervised.eval.in_training=[{setup['data'] / 'beir' / 'msmarco-5k'}]"]
        if name == "bad-eval":
            (setup["runs"] / "not-a-dataset").mkdir(exist_ok=True)
            extra = [f"phases.unsupervised.eval.in_training=[{setup['runs'] / 'not-a-dataset'}]"]
        run = _run_dir(setup, name, *overrides, *extra)
        started[name] = (run, phase, _torchrun(run, phase, "train"))
    yield started
    for run, phase, proc in started.values():
        if proc.poll() is None:
            _kill_job(proc)


def _finished(jobs: dict, name: str) -> tuple[Path, int]:
    run, phase, proc = jobs[name]
    return run, _wait(proc, run, "train")


def _succeeded(jobs: dict, name: str) -> Path:
    """The run dir of a job of JOBS, which must have exited 0 (its log tail otherwise)."""
    run, code = _finished(jobs, name)
    assert code == 0, _tail(run, "train")
    return run


@pytest.fixture(scope="module")
def reference(jobs) -> Path:
    return _succeeded(jobs, "reference")


# ---------------------------------------------------------------- exact resume after a signal and a SIGKILL
@pytest.fixture(scope="module")
def interrupted(setup, jobs) -> dict:
    run = _run_dir(setup, "interrupted", *RESUME, *_in_training_eval(setup))
    rnd = random.Random()
    seed = rnd.randrange(1 << 30)
    rnd.seed(seed)
    out = {"run": run, "seed": seed}

    # Attempt 1, srun-style: SIGUSR1 to rank 1 alone once step k1 is logged.
    k1 = rnd.randint(1, 3)
    procs = _srun_style(run, "supervised", "usr1")
    _until(run, "supervised", lambda recs, ph: any(r["step"] >= k1 for r in recs), procs, f"step {k1}")
    procs[1].send_signal(signal.SIGUSR1)
    out["usr1_codes"] = [p.wait(timeout=TIMEOUT) for p in procs]
    out["after_usr1"] = Manifest(run).phase("supervised")

    # Attempt 2: SIGKILL once a checkpoint newer than attempt 1's exists and step k2 is logged.
    first_stop = out["after_usr1"]["checkpoints"][-1]["step"] if out["after_usr1"]["checkpoints"] else 0
    k2 = rnd.randint(max(first_stop, 6) + 1, 10)
    job = _torchrun(run, "supervised", "killed")
    _until(run, "supervised", lambda recs, ph: max(c["step"] for c in ph["checkpoints"]) > first_stop
           and recs[-1]["step"] >= k2, [job], f"step {k2} after a new checkpoint")
    _kill_job(job)
    out["killed_code"] = job.wait(timeout=60)
    out["after_kill"] = Manifest(run).phase("supervised")
    out["k"] = (k1, k2)

    out["final_code"] = _launch(run, "supervised", "final")
    return out


def test_sigusr1_checkpoints_and_exits_with_the_requeue_code(interrupted):
    run, ph = interrupted["run"], interrupted["after_usr1"]
    assert interrupted["usr1_codes"] == [Exit.REQUEUE] * WORLD, _tail(run, "usr1")
    logged = [r["step"] for r in _records(run, "supervised") if r["attempt"] == ph["attempts"][0]["id"]]
    # the checkpoint is at the step where the ranks stopped (the signal was seen after step k1 or the next)
    assert ph["checkpoints"][-1]["step"] == logged[-1] >= interrupted["k"][0]
    a = ph["attempts"][0]
    assert a["exit_state"] == "requeue" and a["executor"] == "slurm" and a["tasks"] == WORLD, a
    assert a["step_end"] == logged[-1] and ph["state"] == "running" and ph["failure"] is None
    assert "interrupted by a signal" in _tail(run, "usr1")


def test_resume_after_signal_and_sigkill_equals_the_uninterrupted_run(reference, interrupted):
    run = interrupted["run"]
    why = f"(random seed {interrupted['seed']}, steps {interrupted['k']})"
    assert interrupted["killed_code"] != 0 and interrupted["final_code"] == 0, _tail(run, "final")
    ref = {r["step"]: r for r in _records(reference, "supervised")}
    assert sorted(ref) == list(range(1, 13))
    got = _records(run, "supervised")
    attempts = Manifest(run).phase("supervised")["attempts"]
    assert len(attempts) == 3 and len({r["attempt"] for r in got}) == 3, why
    # Every step any attempt took (the killed one's last steps are taken twice) gives the reference's numbers.
    for r in got:
        want = ref[r["step"]]
        assert (r["loss"], r["lr"], r["grad_norm"], r["source"], r["consumed"]) == (
            want["loss"], want["lr"], want["grad_norm"], want["source"], want["consumed"]), (r, want, why)
    assert {r["step"] for r in got} == set(ref)
    # the third attempt resumed from the newest checkpoint the killed attempt had completed
    killed = interrupted["after_kill"]
    assert attempts[2]["step_start"] == killed["checkpoints"][-1]["step"] > attempts[1]["step_start"], why
    assert attempts[1]["exit_state"] == "running" and attempts[2]["exit_state"] == "completed"
    wa, wb = _weights(reference / "phases/supervised/export"), _weights(run / "phases/supervised/export")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), why


def _evals(run: Path) -> list[dict]:
    path = run / "phases" / "supervised" / "logs" / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_in_training_eval_runs_on_schedule_and_does_not_perturb_training(reference, interrupted):
    """Steps 5 and 10 are scored (not 12: the phase's own evaluation follows the export); the interrupted run,
    whose resumed attempts may score a step again, gives the same numbers at the same steps: same weights."""
    from colbertzero.evaluate import DatasetWarning, load_beir, subsample_corpus

    corpus, _, qrels = load_beir(Path(Manifest(reference).recipe().phase("supervised").eval.in_training[0]))
    with pytest.warns(DatasetWarning, match="keeping all judged"):  # msmarco-5k judges more than 200 documents
        n_docs = len(subsample_corpus(corpus, qrels, 200))
    ref = _evals(reference)
    assert [e["step"] for e in ref] == [5, 10]
    for e in ref:
        m = e["datasets"]["msmarco-5k"]
        assert 0.0 <= m["ndcg@10"] <= 1.0 and m["documents"] == n_docs and m["queries"] == len(qrels), e
        assert e["average"]["ndcg@10"] == m["ndcg@10"]
    ph = Manifest(reference).phase("supervised")
    assert [(e["step"], e["ndcg@10"]["msmarco-5k"]) for e in ph["in_training_eval"]] == [
        (e["step"], e["datasets"]["msmarco-5k"]["ndcg@10"]) for e in ref]
    want = {e["step"]: e["datasets"] for e in ref}
    got = _evals(interrupted["run"])
    assert {e["step"] for e in got} == {5, 10}
    assert all(e["datasets"] == want[e["step"]] for e in got), (got, want)
    assert [e["step"] for e in Manifest(interrupted["run"]).phase("supervised")["in_training_eval"]] == [5, 10]
    assert "step 5 nDCG@10 msmarco-5k" in (reference / "train.log").read_text()


def test_tensorboard_gets_the_logged_scalars(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "phases" / "supervised" / "logs" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops",
            "eval/average/ndcg@10", "eval/msmarco-5k/ndcg@10"} <= tags, tags
    assert "train/mfu" not in tags  # no honest peak on CPU: nothing rather than a made-up figure
    recs = _records(reference, "supervised")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in recs]
    assert [e.step for e in acc.Scalars("eval/average/ndcg@10")] == [5, 10]
    assert any(t.startswith("consumed/") for t in tags)


def test_reference_run_logs_exports_and_records(reference):
    from pylate.models import ColBERT

    recs = _records(reference, "supervised")
    for r in recs:
        assert LOG_FIELDS <= set(r), set(LOG_FIELDS) - set(r)
        assert r["mfu"] is None and r["tflops"] > 0  # CPU: no honest peak, achieved FLOP/s still logged
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"]
        assert sum(r["consumed"].values()) == r["step"] * 4  # global batch 4
    ph = Manifest(reference).phase("supervised")
    assert ph["state"] == "done" and ph["export"]["step"] == 12 and ph["total_steps"] == 12
    assert [c["step"] for c in ph["checkpoints"]] == [9, 12]  # keep_last 2
    assert ph["throughput"]["measured_at_step"] == 12 and ph["throughput"]["mfu"] is None
    assert ph["attempts"][0]["gpu_hours"] > 0 and ph["lineage"]["config_hash"]
    # scores_backend auto on a machine without CUDA: PyLate's torch path, and why, recorded per attempt
    assert ph["attempts"][0]["scoring"] == {"backend": "torch", "why": "no CUDA device"}
    model = ColBERT(str(reference / ph["export"]["path"]), device="cpu")
    emb = model.encode(["what do cats eat"], is_query=True, prompt_name="query", convert_to_tensor=True)[0]
    assert emb.shape == (31, 128) and torch.isfinite(emb).all()  # query length 24 + 7 prompt tokens, expanded


# ---------------------------------------------------------------- the other phases and stages
@pytest.fixture(scope="module")
def unsupervised_zero1(jobs) -> Path:
    return _succeeded(jobs, "unsupervised-zero1")


@pytest.fixture(scope="module")
def distillation_zero2(jobs) -> Path:
    return _succeeded(jobs, "distillation-zero2")


def test_unsupervised_gradcache_zero1_runs_to_export(unsupervised_zero1):
    from pylate.models import ColBERT

    ph = Manifest(unsupervised_zero1).phase("unsupervised")
    assert ph["state"] == "done" and ph["export"]["step"] == ph["total_steps"] == 8
    recs = _records(unsupervised_zero1, "unsupervised")
    assert [r["step"] for r in recs] == list(range(1, 9)) and all(r["temperature"] == pytest.approx(0.05) for r in recs)
    ColBERT(str(unsupervised_zero1 / ph["export"]["path"]), device="cpu")


def test_distillation_zero2_runs_exports_and_evaluates(distillation_zero2):
    ph = Manifest(distillation_zero2).phase("distillation")
    assert ph["state"] == "done" and ph["export"]["step"] == 8
    assert ph["eval"]["datasets"]["msmarco-5k"]["ndcg@10"] >= 0
    assert (distillation_zero2 / "phases/distillation/eval.json").is_file()
    assert "ndcg@10" in (distillation_zero2 / ph["export"]["path"] / "README.md").read_text().lower()
    recs = _records(distillation_zero2, "distillation")
    assert all(r["temperature"] is None for r in recs)  # PyLate's distillation loss has none


def test_evaluation_off_the_training_ranks_lands_while_the_phase_keeps_stepping(jobs):
    run = _succeeded(jobs, "eval-job")
    deadline = time.time() + TIMEOUT  # the evaluations may still be running after the phase ended
    while time.time() < deadline:
        ev = Manifest(run).phase("unsupervised").get("eval_jobs") or {}
        if ev and all(j["state"] in ("done", "failed") for j in ev.values()):
            break
        time.sleep(0.5)
    total = Manifest(run).phase("unsupervised")["total_steps"]
    assert sorted(int(k) for k in ev) == list(range(15, total, 15)) and total > 30, (ev, total)
    assert all(j["state"] == "done" and j["handle"].startswith("pid:") for j in ev.values()), ev
    recs = {r["step"]: r for r in map(json.loads, (run / "phases/unsupervised/logs/eval.jsonl").read_text()
                                      .splitlines())}
    first = recs[15]
    assert first["where"] == "job" and set(first["datasets"]) == {"msmarco-5k"}
    # between the job's submission and its result the phase logged later steps: training never waited for it
    started = _utc(ev["15"]["submitted"])
    during = [r["step"] for r in _records(run, "unsupervised") if started <= _utc(r["time"]) <= _utc(first["time"])]
    assert during and max(during) > 16, (during, first, ev["15"])
    ph = Manifest(run).phase("unsupervised")
    assert [(e["step"], e["where"]) for e in ph["in_training_eval"]] == [(s, "job") for s in sorted(recs)]
    # the saved weights are removed once scored; the job's log stays
    folder = run / "phases/unsupervised/evals/step-00000015"
    assert not (folder / "model").exists() and (folder / "job.log").is_file()
    # TensorBoard has the scalars from the job's own event file
    events = list((run / "phases/unsupervised/logs/tensorboard").glob("events.out.tfevents.*"))
    assert len(events) >= 2, events


def _utc(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_a_failing_in_training_eval_fails_every_rank_with_the_dataset_named(jobs):
    run, code = _finished(jobs, "bad-eval")  # _wait fails the test if a rank hangs
    assert code != 0
    ph = Manifest(run).phase("unsupervised")
    assert ph["state"] == "failed" and ph["failure"]["step"] == 2, ph["failure"]
    reason = ph["failure"]["reason"]
    assert "in-training evaluation of phase unsupervised at step 2" in reason and "not-a-dataset" in reason, reason


def test_non_finite_loss_stops_and_marks_the_phase_failed(jobs):
    run, code = _finished(jobs, "nan")
    assert code != 0
    ph = Manifest(run).phase("unsupervised")
    recs = _records(run, "unsupervised")
    last_good = recs[-1]["step"]
    assert all(r["loss"] == r["loss"] for r in recs) and last_good < 8
    f = ph["failure"]
    assert ph["state"] == "failed" and f["step"] == last_good + 1 and "non-finite" in f["reason"], f
    loader = GlobalBatchLoader(Manifest(run).recipe(), "unsupervised", 0, WORLD)
    assert f["source"] == loader.source_at(f["step"] - 1)
    # nothing saved after the last good step, which is the newest checkpoint; no export
    assert ph["checkpoints"][-1]["step"] == last_good and ph["export"] is None
    assert ph["attempts"][0]["exit_state"] == "nan"


# ---------------------------------------------------------------- accounting, in process
def test_flop_counter_counts_encoder_passes_attention_window_and_maxsim(tiny_modernbert):
    from types import SimpleNamespace

    from pylate.models import ColBERT

    colbert = ColBERT(tiny_modernbert, device="cpu", embedding_size=16, query_length=8)
    phase = lambda kind, gc: SimpleNamespace(kind=kind, gradcache_mini_batch=gc, gather_across_ranks=True,  # noqa: E731
                                             gradient_accumulation=1)
    # 2 queries x 2 documents, with real lengths 5, 3 (queries; expanded to 8) and 40, 2, 1, 4 (documents)
    q_mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5])
    d_mask = torch.zeros(4, 40, dtype=torch.long)
    for i, n in enumerate((40, 2, 1, 4)):
        d_mask[i, :n] = 1
    batch = SimpleNamespace(queries={"attention_mask": q_mask}, documents={"attention_mask": d_mask})
    cfg = colbert[0].auto_model.config
    n = sum(p.numel() for p in colbert.parameters()) - colbert[0].auto_model.embeddings.tok_embeddings.weight.numel()
    half = cfg.sliding_window  # 32: on the local layer, position i sees keys j with |i - j| <= 32
    assert cfg.layer_types == ["full_attention", "sliding_attention"] and half == 32

    def local_pairs(length: int) -> int:  # counted position by position
        return sum(1 for i in range(length) for j in range(length) if abs(i - j) <= half)

    assert local_pairs(40) == 40 * 40 - 2 * sum(range(1, 40 - half))  # the corners the window cuts off
    q = 2 * n * 16 + 4 * cfg.hidden_size * 2 * 8 * (5 + 3)  # expanded: 8 outputs per query, over real keys
    d = 2 * n * 47 + 4 * cfg.hidden_size * ((40**2 + 2**2 + 1 + 4**2) + (local_pairs(40) + 2**2 + 1 + 4**2))

    kd = FlopCounter(colbert, phase("distillation", 2), world_size=2)
    local = kd.local(batch)
    assert kd.total(local) == pytest.approx(3 * (q + d) + 3 * 2 * 16 * 8 * (42 + 5))  # own documents only
    gc = FlopCounter(colbert, phase("supervised", 1), world_size=2)
    summed = gc.local(batch) * 2  # two ranks with the same batch: every query scores all 8 documents
    assert gc.total(summed) == pytest.approx(2 * 4 * (q + d) + 3 * 2 * 16 * (2 * 16) * (2 * 47))
    assert peak_flops(torch.device("cpu"), torch.float32) is None


# ---------------------------------------------------------------- every phase of the chain, every stage
# Stage 2 is tiny-cpu's own: its chain runs as written in test_launch.py (two Slurm nodes) and in the demo.
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_every_phase_of_the_chain_under_every_zero_stage(setup, stage):
    """tiny-cpu (supervised from unsupervised's export, distillation from supervised's), GradCache on, at a stage."""
    overrides = []
    for p in PHASES:
        overrides += [f"phases.{p}.deepspeed.zero_stage={stage}"]
    run = setup["runs"] / f"chain-zero{stage}"
    r = _recipe(setup, *overrides, "phases.supervised.init={from: unsupervised}",
                "phases.distillation.init={from: supervised}")
    Manifest.create(run, r)
    for p in PHASES:
        assert _launch(run, p, p) == 0, _tail(run, p)
        ph = Manifest(run).phase(p)
        assert ph["state"] == "done" and ph["export"]["step"] == ph["total_steps"]


# ---------------------------------------------------------------- a hang is a failure, not a stall
def test_a_stuck_rank_makes_the_others_dump_stacks_and_leave_to_be_requeued(setup):
    """Rank 1 is frozen (SIGSTOP: it hangs, as a stuck process or a lost node would) after a few steps. Rank 0, waiting
    in the step's collective, sees no step finish within its watchdog limit, writes every thread's stack and exits
    with the requeue code, long before any collective timeout."""
    import psutil

    run = _run_dir(setup, "hang", "phases.unsupervised.max_steps=200", "phases.unsupervised.watchdog.min_seconds=8",
                   "phases.unsupervised.watchdog.step_factor=5")
    job = _torchrun(run, "unsupervised", "hang")
    _until(run, "unsupervised", lambda recs, _: len(recs) >= 3, [job], "three logged steps")
    ranks = sorted(psutil.Process(job.pid).children(recursive=True), key=lambda p: p.pid)
    frozen = next(p for p in ranks if "LOCAL_RANK" in p.environ() and p.environ()["LOCAL_RANK"] == "1")
    frozen.suspend()
    t0 = time.time()
    try:
        dumps = run / "phases" / "unsupervised" / "hangs"
        deadline = time.time() + 120
        while time.time() < deadline and not list(dumps.glob("rank-00000-*.txt")):
            time.sleep(0.5)
        waited = time.time() - t0
        text = next(dumps.glob("rank-00000-*.txt")).read_text()
    finally:
        frozen.kill()
        _kill_job(job)
    assert waited < 60, waited  # 8 s of limit, then the dump: not the 30-minute collective timeout
    assert "no step finished for" in text and "Thread" in text and "runner.py" in text, text[:2000]
    assert "rank 0: no step finished" in _tail(run, "hang")


# ---------------------------------------------------------------- shards altered after validate
def test_a_shard_altered_after_validate_stops_the_phase_before_its_first_step(setup, tmp_path):
    """`validate` passes; then one shard changes (same size, same mtime: only its sha256 can tell); the phase's ranks
    hash their shares before the first step and refuse, naming the shard, with nothing trained or saved."""
    import shutil

    import yaml

    shards = tmp_path / "shards"
    shutil.copytree(setup["shards"] / "unsupervised", shards)
    recipe = _recipe(setup, f"phases.unsupervised.data.shards_dir={shards}")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.resolved()))
    cz = [sys.executable, "-m", "colbertzero"]
    ok = subprocess.run([*cz, "validate", str(recipe_file)], capture_output=True, text=True, cwd=ROOT, env=_env(),
                        timeout=300)
    assert ok.returncode == 0 and "all match their indexes" in ok.stdout, ok.stdout + ok.stderr
    shard = sorted(shards.rglob("shard-*.arrow"))[-1]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    run = tmp_path / "run"
    Manifest.create(run, recipe)
    code = _launch(run, "unsupervised", "altered")
    ph = Manifest(run).phase("unsupervised")
    assert code != 0 and ph["state"] == "failed", _tail(run, "altered")
    assert f"{shard.name}: sha256 differs" in ph["failure"]["reason"] and ph["failure"]["step"] == 0, ph["failure"]
    assert _records(run, "unsupervised") == [] and ph["checkpoints"] == [] and ph["step"] == 0
