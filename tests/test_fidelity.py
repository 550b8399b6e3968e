"""The shipped recipes hold what produced the paper's numbers: each value of docs/fidelity.yaml (paper, released
model card, PyLate's scripts at a named commit), or a deliberate difference that says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from colbertzero.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
TABLE = yaml.safe_load((ROOT / "docs" / "fidelity.yaml").read_text())
ENTRIES = [(recipe, field, entry) for recipe, fields in TABLE["recipes"].items() for field, entry in fields.items()]


def _get(obj, dotted: str):
    for key in dotted.split("."):
        obj = obj[key]
    return obj


@pytest.mark.parametrize("recipe,field,entry", ENTRIES, ids=[f"{r}:{f}" for r, f, _ in ENTRIES])
def test_recipe_holds_the_published_value(recipe, field, entry):
    assert entry["source"] in TABLE["sources"], entry
    for other in entry.get("also", {}):
        assert other in TABLE["sources"], entry
    resolved = load_recipe(ROOT / "recipes" / recipe).resolved()
    want = entry["ours"] if "ours" in entry else entry["value"]
    if "ours" in entry:
        assert entry.get("why"), f"{recipe}:{field}: a deliberate difference says why"
    got = _get(resolved, field)
    number = (int, float)
    same = (got == pytest.approx(want) if isinstance(got, number) and isinstance(want, number)
            and not isinstance(got, bool) and not isinstance(want, bool) else got == want and type(got) is type(want))
    assert same, f"{recipe}: {field} = {got!r}, published {entry['value']!r} ({TABLE['sources'][entry['source']]})"


def test_plan_shows_the_scripts_update(tmp_path):
    out = subprocess.run([sys.executable, "-m", "colbertzero", "plan", "recipes/colbert-zero.yaml", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    phases = json.loads(out.stdout)["phases"]
    h = {n: p["hyperparameters"] for n, p in phases.items()}
    assert [h[n]["warmup_ratio"] for n in h] == [0.0, 0.0, 0.0]
    assert h["distillation"]["effective_document_length"] == 519
    # 16 GPUs: CachedContrastive's scale is the global batch, gathered Contrastive's the world size (4 GPUs)
    assert [(h[n]["loss_scale"], h[n]["gradient_scale"]) for n in h] == [
        ("global_batch", 16384.0), ("world_size", 4.0), (1, 1.0)]


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def n_steps(tiny_modernbert, flag_examples, tmp_path_factory):
    """Both sides' final weights after N steps: colbertzero's step on its DeepSpeed engine, PyLate's Trainer."""
    import fidelity_worker as W

    work = tmp_path_factory.mktemp("fidelity")
    flag = flag_examples
    rows = {
        "cached_contrastive": [{"query": r["query"], "document": r["pos"][0]} for r in flag],
        "contrastive": [{"query": r["query"], "positive": r["pos"][0], "negatives": [r["neg"][0]]} for r in flag],
        "distillation": [{"query": r["query"], "documents": (r["pos"] + r["neg"])[:W.N_DOCS],
                          "scores": (r["pos_scores"] + r["neg_scores"])[:W.N_DOCS]} for r in flag],
    }
    for name, rs in rows.items():
        (work / name).mkdir()
        (work / name / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    env = _worker_env()
    for side in ("ours", "pylate"):  # ours first: it writes the rows in its loader's order for PyLate
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fidelity_worker.py"), side, tiny_modernbert,
                               str(work)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        assert proc.returncode == 0, f"{side}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return {name: {side: torch.load(work / name / f"{side}.pt", weights_only=True) for side in ("ours", "pylate")}
            for name in rows}


@pytest.mark.parametrize("loss", ["cached_contrastive", "contrastive", "distillation"])
def test_n_steps_equal_pylates_trainer(n_steps, loss):
    """With the scripts' loss_scale, N AdamW steps with clipping at 1.0 land on PyLate's weights (fp32)."""
    ours, theirs = n_steps[loss]["ours"], n_steps[loss]["pylate"]
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5)
    # the pre-clip norm the clip acts on: equal, so both clip alike (CachedContrastive's is 8x the mean's)
    assert ours["grad_norms"] == pytest.approx(theirs["grad_norms"], rel=1e-4)
    assert set(ours["state"]) == set(theirs["state"])
    worst = max(float((ours["state"][k] - v).abs().max()) for k, v in theirs["state"].items())
    assert worst < 1e-5, worst  # lr 1e-4: an update differing in any element would show as ~1e-4


# ---------------------------------------------------------------- loss_scale on 2 ranks with gathering
WORLD = 2


@pytest.fixture(scope="module")
def two_rank_grads(tiny_modernbert, flag_examples, tmp_path_factory):
    """The first step's gradient before clipping on 2 gloo ranks with gathering: ours under each loss_scale (the
    DeepSpeed engine's reduced gradient), PyLate's Trainer (DDP's averaged gradient)."""
    import fidelity_worker as W

    work = tmp_path_factory.mktemp("fidelity-2")
    rows = {"cached_contrastive": [{"query": r["query"], "document": r["pos"][0]} for r in flag_examples],
            "contrastive": [{"query": r["query"], "positive": r["pos"][0], "negatives": [r["neg"][0]]}
                            for r in flag_examples]}
    for name, rs in rows.items():
        (work / name).mkdir()
        (work / name / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    env = _worker_env()
    for side in ("ours-grads", "pylate-grads"):  # ours first: it writes the rows in its loader's order
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(WORLD), str(ROOT / "tests" / "fidelity_worker.py"), side, tiny_modernbert,
                               str(work)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        assert proc.returncode == 0, f"{side}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return {name: {side: torch.load(work / name / f"{side}-grads.pt", weights_only=True)
                   for side in ("ours", "pylate")} for name in W.GRAD_LOSSES}


@pytest.mark.parametrize("scale", [1, "world_size", "global_batch"])
@pytest.mark.parametrize("loss", ["cached_contrastive", "contrastive"])
def test_gradients_before_clipping_relate_to_pylates_by_the_loss_scale(two_rank_grads, loss, scale):
    """PyLate's gathered gradients are W x (Contrastive) and W x B = the global batch x (CachedContrastive) the
    gradient of the global-mean loss (../shared/FACTS.md); loss_scale 1 | world_size | global_batch asks for 1, W or
    the global batch times it. So ours x PyLate's factor = PyLate's x ours, element by element, before any clipping
    (which would hide a constant factor)."""
    import fidelity_worker as W

    theirs_factor = {"contrastive": WORLD, "cached_contrastive": W.BATCH}[loss]
    ours_factor = {1: 1, "world_size": WORLD, "global_batch": W.BATCH}[scale]
    ours, theirs = two_rank_grads[loss]["ours"][str(scale)], two_rank_grads[loss]["pylate"]
    assert set(ours) == set(theirs)
    total = sum(float(g.norm()) ** 2 for g in theirs.values()) ** 0.5
    assert total > 1e-3  # a real gradient, not zeros
    for name, g in theirs.items():
        assert torch.allclose(ours[name] * theirs_factor, g * ours_factor, rtol=1e-4, atol=1e-6 * total), name
