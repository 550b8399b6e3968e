"""The requeue policy: `decide` (an exit code → what happens) and `apply` (what happens → the manifest and the
message), the one pair every executor calls; and the ledger's rule that a hung attempt stays hung."""

from __future__ import annotations

from pathlib import Path

import pytest

from colbertzero import ledger
from colbertzero.launcher.requeue import after_phase_in_job, apply, attempt_hung, decide
from colbertzero.manifest import Manifest
from colbertzero.recipe import load_recipe
from colbertzero.runtime import Exit

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("code,kw,action,exit_code", [
    (0, {}, "done", 0),
    (4, {}, "stop", 4),
    (1, {}, "fail", 1),
    (-9, {}, "fail", 1),  # killed by a signal: a failure, exit 1
    (3, {}, "requeue", 3),
    (3, {"stop_requested": True}, "stop", 3),  # a Ctrl-C of a local run is a stop, not a requeue
    (3, {"restarts": 2}, "stop", 3),  # max_requeues (2) reached
    (3, {"job_state": "COMPLETING"}, "stop", 3),  # Slurm is ending the job itself (scancel, time limit)
    (3, {"job_state": "RUNNING"}, "requeue", 3),
    (143, {"hung": True}, "requeue", 3),  # srun's code for a step it killed: the recorded hang decides
    (1, {"hung": True}, "requeue", 3),  # a stuck rank woken to be killed fails in its broken collective
    (0, {"hung": True}, "done", 0),  # finished after all
])
def test_decide(code, kw, action, exit_code):
    outcome = decide(code, **{"restarts": 0, "max_requeues": 2, **kw})
    assert (outcome.action, outcome.exit_code) == (action, exit_code), outcome
    assert outcome.mark_failed == ("restarts" in kw)


@pytest.fixture
def manifest(tmp_path) -> Manifest:
    return Manifest.create(tmp_path / "run", load_recipe(ROOT / "recipes" / "tiny-cpu.yaml"))


def test_apply_marks_failed_at_max_requeues_and_says_how_to_continue(manifest, capsys):
    code = apply(decide(3, restarts=2, max_requeues=2), manifest, "unsupervised")
    assert code == Exit.REQUEUE
    p = manifest.phase("unsupervised")
    assert p["state"] == "failed" and "max_requeues=2 reached" in p["failure"]["reason"]
    err = capsys.readouterr().err
    assert f"colbertzero resume {manifest.run_dir}" in err and "--phase-budget" not in err


def test_apply_over_budget_names_the_phase_budget(manifest, capsys):
    assert apply(decide(4, restarts=0, max_requeues=2), manifest, "supervised") == Exit.OVER_BUDGET
    assert f"colbertzero resume {manifest.run_dir} --phase-budget supervised=HOURS" in capsys.readouterr().err
    assert manifest.phase("supervised")["state"] == "pending"  # the runner records over-budget itself


def test_apply_requeues_through_the_executor_and_reports_a_refused_requeue(manifest, capsys):
    asked = []
    assert apply(decide(3, restarts=0, max_requeues=2), manifest, "unsupervised",
                 requeue=lambda: asked.append(1)) == Exit.REQUEUE
    assert asked == [1] and "run again (1 of at most 2)" in capsys.readouterr().err
    apply(decide(3, restarts=0, max_requeues=2), manifest, "unsupervised", requeue=lambda: "slurmctld said no")
    err = capsys.readouterr().err
    assert "the requeue failed: slurmctld said no" in err and "colbertzero resume" in err
    assert apply(decide(0, restarts=0, max_requeues=2), manifest, "unsupervised") == Exit.DONE
    assert capsys.readouterr().err == ""


def test_a_hung_attempt_stays_hung_whatever_its_ranks_report_after(manifest):
    manifest.start_attempt("unsupervised", job_id="7", executor="slurm", nodes=2, gpus_per_node=0, tasks=2,
                           attempt_id="7-0")
    manifest.tick_attempt("unsupervised", "7-0", elapsed_s=60, step=5, end_state=ledger.HANG)
    manifest.tick_attempt("unsupervised", "7-0", elapsed_s=70, step=5, end_state="failed")  # an echo
    [a] = manifest.phase("unsupervised")["attempts"]
    assert a["exit_state"] == "hang" and a["elapsed_s"] == 70 and a["gpu_hours"] == pytest.approx(2 * 70 / 3600)
    assert attempt_hung(manifest, "unsupervised", "7-0") and not attempt_hung(manifest, "unsupervised", "7-1")
    assert not attempt_hung(manifest, "unsupervised", None)


@pytest.mark.parametrize("recorded, code, action, exit_code", [
    ("completed", 143, "done", 0),
    ("over-budget", 143, "stop", 4),
    ("over-budget", 4, "stop", 4),
    ("failed", 1, "fail", 1),  # a failure is what srun says it is
    ("running", 143, "fail", 143),  # nothing closed: srun's code stands
])
def test_what_the_attempt_recorded_outranks_sruns_exit_code(manifest, monkeypatch, capsys, recorded, code, action,
                                                            exit_code):
    """Under --kill-on-bad-exit the first rank to leave with 3 or 4 has srun end the others while they shut down;
    srun then reports their SIGTERM (143). The batch script's policy reads how rank 0 closed the attempt instead."""
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    manifest.start_attempt("unsupervised", job_id="7", executor="slurm", nodes=2, gpus_per_node=0, tasks=2,
                           attempt_id="7-0")
    manifest.tick_attempt("unsupervised", "7-0", elapsed_s=60, step=5,
                          end_state=None if recorded == "running" else recorded)
    assert after_phase_in_job(str(manifest.run_dir), "unsupervised", code) == exit_code
    err = capsys.readouterr().err
    assert ("the attempt's record says exit" in err) == (recorded in ("completed", "over-budget") and code != exit_code)
    assert action != "stop" or "the chain stops here" in err
