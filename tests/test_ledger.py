"""The GPU-hour ledger's rules (colbertzero/ledger.py), each tested once, directly, with figures worked by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from colbertzero import ledger
from colbertzero.manifest import Manifest, new_phase_record
from colbertzero.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _data(recipe_phases: dict, run_budget=None, raised_run=None) -> dict:
    return {"recipe": {"budget_gpu_hours": run_budget,
                       "phases": {n: {"budget_gpu_hours": b} for n, b in recipe_phases.items()}},
            "phases": {n: new_phase_record("unsupervised") for n in recipe_phases},
            "budget_gpu_hours": raised_run}


def test_attempt_gpu_hours_counts_gpus_or_cpu_tasks():
    assert ledger.attempt_gpu_hours({"nodes": 2, "gpus_per_node": 4, "tasks": 8, "elapsed_s": 1800}) == 4.0
    # CPU-only attempts count their tasks per node as GPUs: 1 node x 2 tasks x 1 h
    assert ledger.attempt_gpu_hours({"nodes": 1, "gpus_per_node": 0, "tasks": 2, "elapsed_s": 3600}) == 2.0
    assert ledger.attempt_gpu_hours({"nodes": 2, "gpus_per_node": 0, "tasks": 2, "elapsed_s": 3600}) == 2.0


def test_attempts_open_once_tick_and_close():
    rec = new_phase_record("unsupervised")
    a = ledger.open_attempt(rec, job_id="101", executor="slurm", nodes=2, gpus_per_node=4, tasks=8,
                            attempt_id="101-0")
    assert rec["state"] == "running" and a == "101-0"
    # a requeued job re-registering the same attempt is counted once
    ledger.open_attempt(rec, job_id="101", executor="slurm", nodes=2, gpus_per_node=4, tasks=8, attempt_id="101-0")
    assert len(rec["attempts"]) == 1
    ledger.tick_attempt(rec, a, elapsed_s=900, step=40, throughput={"seconds_per_step": 2.0})
    assert rec["attempts"][0]["gpu_hours"] == 2.0 and rec["attempts"][0]["exit_state"] == "running"
    assert rec["throughput"] == {"seconds_per_step": 2.0}
    ledger.tick_attempt(rec, a, elapsed_s=1800, step=90, end_state="completed")
    a0 = rec["attempts"][0]
    assert (a0["gpu_hours"], a0["step_end"], a0["exit_state"]) == (4.0, 90, "completed") and a0["end"]
    with pytest.raises(KeyError):
        ledger.tick_attempt(rec, "nope", elapsed_s=1, step=1)


def test_sums_exclude_the_current_attempt_on_request():
    data = _data({"u": None, "s": None})
    for name, secs in (("u", 3600), ("u", 1800), ("s", 900)):
        rec = data["phases"][name]
        aid = ledger.open_attempt(rec, job_id=None, executor="local", nodes=1, gpus_per_node=4, tasks=4)
        ledger.tick_attempt(rec, aid, elapsed_s=secs, step=1)
    assert ledger.phase_gpu_hours(data, "u") == 6.0  # 4 GPUs x (1 h + 0.5 h)
    assert ledger.run_gpu_hours(data) == 7.0  # + 4 x 0.25 h
    assert ledger.record_gpu_hours(data["phases"]["u"], except_attempt="local-1") == 4.0


def test_budgets_raised_win_and_unblock():
    data = _data({"u": 10.0, "s": None}, run_budget=20.0)
    assert ledger.phase_budget(data, "u") == 10.0 and ledger.phase_budget(data, "s") is None
    assert ledger.run_budget(data) == 20.0
    data["phases"]["u"]["state"] = "over-budget"
    ledger.raise_budget(data, "u", 12.5)
    assert ledger.phase_budget(data, "u") == 12.5 and data["phases"]["u"]["state"] == "pending"
    ledger.raise_budget(data, None, 30)
    assert ledger.run_budget(data) == 30.0
    with pytest.raises(ValueError):
        ledger.raise_budget(data, "s", 0)


def test_crosses_budget():
    # 1.9 GPU-h used before; 10 min in on 4 GPUs = 0.667 GPU-h; next step 60 s more = 0.0667: 2.633 <= 3 fits
    assert not ledger.crosses_budget(3.0, 1.9, 600, 60, 4)
    assert ledger.crosses_budget(2.6, 1.9, 600, 60, 4)
    assert not ledger.crosses_budget(None, 1e9, 1e9, 1e9, 4)


def test_budget_refusals_name_the_command_that_continues():
    data = _data({"u": 1.0, "s": 5.0}, run_budget=2.0)
    rec = data["phases"]["u"]
    aid = ledger.open_attempt(rec, job_id=None, executor="local", nodes=1, gpus_per_node=2, tasks=2)
    ledger.tick_attempt(rec, aid, elapsed_s=3600, step=3)  # 2 GPU-h: over the phase's 1 and the run's 2
    out = ledger.budget_refusals(data, ["u", "s"], "/runs/x")
    assert len(out) == 2
    assert "phase 'u' is over its GPU-hour budget (2 of 1 used)" in out[0]
    assert "colbertzero resume /runs/x --phase-budget u=HOURS" in out[0]
    assert "colbertzero resume /runs/x --budget HOURS" in out[1]
    assert ledger.budget_refusals(data, ["s"], "/runs/x") == [out[1]]


def test_merge_sacct_completes_the_ledger():
    data = _data({"u": None})
    rec = data["phases"]["u"]
    ledger.open_attempt(rec, job_id="7", executor="slurm", nodes=1, gpus_per_node=4, tasks=4, attempt_id="7-0",
                        start="2026-01-01T00:00:00+00:00")
    ledger.tick_attempt(rec, "7-0", elapsed_s=100, step=10, end_state="requeue")
    runs = {"u": [
        # the runner said requeue but Slurm cancelled: Slurm's state wins, and the allocation's time
        {"id": "7-0", "job": "7", "state": "CANCELLED", "start": "2026-01-01T00:00:00+00:00",
         "end": "2026-01-01T00:05:00+00:00", "elapsed_s": 300.0, "nodes": 1, "gpus": 4},
        # a run the runner never recorded (killed while starting)
        {"id": "7-1", "job": "7", "state": "NODE_FAIL", "start": "2026-01-01T01:00:00+00:00",
         "end": "2026-01-01T01:01:00+00:00", "elapsed_s": 60.0, "nodes": 2, "gpus": 8},
        {"id": "7-2", "job": "7", "state": "FAILED", "start": None, "end": None, "elapsed_s": 0.0, "nodes": 1,
         "gpus": 0},  # never started: nothing spent
    ]}
    ledger.merge_sacct(data, runs, {"u": 8})
    a0, a1 = rec["attempts"]
    assert (a0["exit_state"], a0["elapsed_s"], a0["gpu_hours"]) == ("cancelled", 300.0, 4 * 300 / 3600)
    assert (a1["id"], a1["exit_state"], a1["gpus_per_node"], a1["tasks"]) == ("7-1", "node_fail", 4, 8)
    assert a1["gpu_hours"] == pytest.approx(2 * 4 * 60 / 3600) and a1["step_start"] == 10


def test_close_lost_attempts_only_local_running_ones():
    data = _data({"u": None})
    rec = data["phases"]["u"]
    ledger.open_attempt(rec, job_id=None, executor="local", nodes=1, gpus_per_node=0, tasks=2, attempt_id="l")
    ledger.open_attempt(rec, job_id="9", executor="slurm", nodes=1, gpus_per_node=4, tasks=4, attempt_id="9-0")
    ledger.close_lost_attempts(data)
    assert [a["exit_state"] for a in rec["attempts"]] == ["lost", "running"]


def test_manifest_writes_go_through_the_ledger(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml")
    m = Manifest.create(tmp_path / "run", recipe)
    a = m.start_attempt("unsupervised", job_id="101", executor="slurm", nodes=2, gpus_per_node=4, tasks=8)
    m.tick_attempt("unsupervised", a, step=40, elapsed_s=1800, end_state="timeout")
    assert ledger.phase_gpu_hours(m.read(), "unsupervised") == 4.0
    m.set_state("supervised", "over-budget")
    m.raise_budget("supervised", 5.0)
    data = m.read()
    assert ledger.phase_budget(data, "supervised") == 5.0 and data["phases"]["supervised"]["state"] == "pending"
