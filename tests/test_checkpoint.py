"""Checkpoints: exact resume on 2 gloo ranks for ZeRO 0-3 (real DeepSpeed engines), the folder/manifest protocol,
and the choice of the checkpoint to resume from."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import MICRO_BATCH, PHASE, SPLIT, STAGES, STEPS, WORLD, recipe_dict, zero_runs  # noqa: E402

from colbertzero.layout import RunLayout, step_name  # noqa: E402
from colbertzero.manifest import Manifest  # noqa: E402
from colbertzero.recipe import recipe_from_dict  # noqa: E402
from colbertzero.train.checkpoint import (  # noqa: E402
    COMPLETE,
    DS_TAG,
    TRAINER_STATE,
    capture_rng_state,
    find_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
    weights_sha256,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_modernbert) -> Path:
    return zero_runs(tmp_path_factory.getbasetemp() / "zero-runs", tiny_modernbert)


def _results(runs: Path, mode: str) -> dict:
    return json.loads((runs / f"results-{mode}.json").read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_resume_is_bit_identical(runs, stage):
    train, resume = _results(runs, "train")[f"zero{stage}"], _results(runs, "resume")[f"zero{stage}"]
    for rank in range(WORLD):
        a, b1, b2 = train[rank]["A"], train[rank]["B1"], resume[rank]["B2"]
        assert len(a) == STEPS and len(b1) == SPLIT and len(b2) == STEPS - SPLIT
        assert b1 + b2 == a, f"ZeRO-{stage} rank {rank}: losses differ after resume"
    wa = torch.load(runs / f"weights-zero{stage}-A.pt", weights_only=True)
    wb = torch.load(runs / f"weights-zero{stage}-B.pt", weights_only=True)
    assert wa.keys() == wb.keys() and "temperature" in wa
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"ZeRO-{stage}: weights differ after resume: {differ[:5]}"
    # and training moved them (the comparison is not between two untouched models)
    init = torch.tensor([recipe_dict("x")["phases"][PHASE]["temperature"]])
    assert not torch.equal(wa["temperature"], init)


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_folder_and_manifest(runs, stage):
    run_b = runs / f"zero{stage}" / "B"
    phase = Manifest(run_b).phase(PHASE)
    root = RunLayout.of(run_b).phase(PHASE).checkpoints
    # keep_last=1: the step-2 checkpoint was registered, then dropped from the manifest and the disk
    assert [c["step"] for c in phase["checkpoints"]] == [SPLIT] and phase["step"] == SPLIT
    assert sorted(p.name for p in root.iterdir()) == [step_name(SPLIT)]  # the stale temp folder was cleaned at load
    ck = run_b / phase["checkpoints"][0]["path"]
    marker = json.loads((ck / COMPLETE).read_text())
    assert marker["step"] == SPLIT and marker["world_size"] == WORLD and marker["zero_stage"] == stage
    assert marker["sha256"] == phase["checkpoints"][0]["sha256"] == weights_sha256(ck)
    assert sorted(p.name for p in (ck / "rng").iterdir()) == [f"rank-{r:05d}.pt" for r in range(WORLD)]
    assert (ck / DS_TAG).is_dir() and (ck / "latest").read_text() == DS_TAG  # also a plain DeepSpeed checkpoint

    state = _results(runs, "resume")[f"zero{stage}"][0]["state"]
    assert state["step"] == SPLIT and state["zero_stage"] == stage and state["world_size"] == WORLD
    assert state["loader"] == {"next_step": SPLIT, "consumed": {"toy": SPLIT * MICRO_BATCH * WORLD}}
    assert state["note"] == f"zero{stage}" and state["temperature"] == 0.05
    assert Path(state["checkpoint"]) == ck
    assert json.loads((ck / TRAINER_STATE).read_text())["step"] == SPLIT


def test_no_checkpoint_loads_none(runs):
    for stage in STAGES:
        assert all(r["A_load_none"] for r in _results(runs, "train")[f"zero{stage}"])


# ---------------------------------------------------------------- single-process checks (no engine needed)
def _fake_checkpoint(m: Manifest, step: int, payload: bytes) -> Path:
    """A folder with the layout save_checkpoint writes (the DeepSpeed file's content does not matter here)."""
    ck = m.layout.phase(PHASE).checkpoint(step)
    (ck / DS_TAG).mkdir(parents=True)
    (ck / DS_TAG / "mp_rank_00_model_states.pt").write_bytes(payload)
    sha = weights_sha256(ck)
    (ck / COMPLETE).write_text(json.dumps({"step": step, "sha256": sha, "world_size": 2, "zero_stage": 2}))
    m.add_checkpoint(PHASE, ck, step, sha, keep_last=5)
    return ck


def test_find_latest_falls_back_past_missing_incomplete_or_corrupt(tmp_path, tiny_modernbert):
    m = Manifest.create(tmp_path / "run", recipe_from_dict(recipe_dict(tiny_modernbert)))
    assert find_latest_checkpoint(m, PHASE) is None
    c1 = _fake_checkpoint(m, 1, b"one")
    c2 = _fake_checkpoint(m, 2, b"two")
    c3 = _fake_checkpoint(m, 3, b"three")
    c4 = _fake_checkpoint(m, 4, b"four")
    assert find_latest_checkpoint(m, PHASE)["abspath"] == str(c4)
    (c4 / DS_TAG / "mp_rank_00_model_states.pt").write_bytes(b"bit rot")  # corrupt
    (c3 / COMPLETE).unlink()  # incomplete
    os.rename(c2, c2.with_name("moved"))  # gone
    skipped: list[dict] = []
    found = find_latest_checkpoint(m, PHASE, skipped=skipped)
    assert found["abspath"] == str(c1) and found["step"] == 1 and found["zero_stage"] == 2
    assert [(s["step"], s["reason"].split(" ")[0]) for s in skipped] == [(4, "its"), (3, "listed"), (2, "listed")]
    assert "do not match their recorded sha256" in skipped[0]["reason"]


def test_save_refuses_bad_state_before_touching_anything(tmp_path, tiny_modernbert):
    m = Manifest.create(tmp_path / "run", recipe_from_dict(recipe_dict(tiny_modernbert)))
    kw = dict(manifest=m, keep_last=1)
    with pytest.raises(ValueError, match="may not set"):
        save_checkpoint(None, m.run_dir, PHASE, 1, extra_state={"step": 7}, **kw)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(None, m.run_dir, PHASE, 1, loader_state={"x": object()}, **kw)
    with pytest.raises(ValueError, match="run dir"):
        save_checkpoint(None, tmp_path / "elsewhere", PHASE, 1, **kw)
    assert not m.layout.phase(PHASE).checkpoints.exists()


def test_rng_state_round_trip(tmp_path):
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # as load_latest_checkpoint reads it
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
