"""Metrics: one record per log step, fed to every sink (JSONL, TensorBoard, Weights & Biases offline); a resumed
attempt appends to the same W&B run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from colbertzero.train.metering import Metrics
from colbertzero.train.step import StepResult


def _metrics(run_dir: Path, report_to: list[str]) -> Metrics:
    return Metrics(phase_name="unsupervised", run_dir=run_dir, total=6, log_every=2, world_size=2, peak=None,
                   write=True, report_to=report_to, config={"lr": 1e-4})


def _attempt(m: Metrics, steps: range, attempt: str) -> list[dict]:
    out = []
    for step in steps:
        res = StepResult(loss=1.0 / step, grad_norm=0.5, temperature=0.05, lr=1e-4, n_queries=8, n_tokens=100)
        m.count(0.5, res.n_queries, res.n_tokens, 2e9)
        if m.should_log(step):
            out.append(m.log(step, res, source="a", consumed={"a": 8 * step}, attempt=attempt))
    m.close()
    return out


def test_cadence_and_record(tmp_path):
    m = _metrics(tmp_path, [])
    recs = _attempt(m, range(1, 7), "a0")
    assert [r["step"] for r in recs] == [2, 4, 6]
    # two steps of 0.5 s per log: 16 queries / 1 s, 200 tokens / 1 s, 4e9 FLOPs / 1 s
    assert (recs[0]["samples_per_s"], recs[0]["tokens_per_s"], recs[0]["tflops"]) == (16.0, 200.0, 0.004)
    assert recs[0]["mfu"] is None and recs[0]["seconds_per_step"] == 0.5
    lines = (tmp_path / "phases/unsupervised/logs/train.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == recs
    assert m.throughput() == {"samples_per_s": 16.0, "seconds_per_step": 0.5, "tflops": 0.004, "mfu": None,
                              "measured_at_step": 6}


def test_tensorboard_and_wandb_get_the_same_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _attempt(_metrics(tmp_path, ["tensorboard", "wandb"]), range(1, 5), "a0")
    _attempt(_metrics(tmp_path, ["tensorboard", "wandb"]), range(5, 7), "a1")  # the requeued attempt
    logs = tmp_path / "phases/unsupervised/logs"
    acc = EventAccumulator(str(logs / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert acc.Scalars("train/loss")[0].value == pytest.approx(0.5)
    runs = sorted((logs / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {p.name.rsplit("-", 1)[-1] for p in runs}
    assert len(ids) == 1  # both attempts log into one W&B run (same id, resume="allow")


def test_a_sink_that_is_not_installed_is_skipped_with_a_word(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's own way to make `import wandb` fail
    recs = _attempt(_metrics(tmp_path, ["wandb"]), range(1, 3), "a0")
    assert len(recs) == 1
    assert "report_to lists wandb, which is not installed here" in capsys.readouterr().err
