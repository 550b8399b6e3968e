"""The local executor (real processes, no mocks): the chain runs in a background process like a job; a signal stops
it as a time limit stops a Slurm job (the running phase checkpoints, nothing after it starts); a hung rank makes the
phase run again from its checkpoint; what the machine cannot give is refused.

A Ctrl-C reaches the launcher only (the chain and the ranks run in sessions of their own); it asks the chain to stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

import colbertzero
from colbertzero.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
CZ = [sys.executable, "-m", "colbertzero"]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "SLURM_CONF" and not k.startswith("SLURM_")}


def _recipe(tmp_path: Path, name: str, unsupervised: dict, supervised: dict | None = None) -> Path:
    """tiny-cpu-slurm (2 ranks, the tiny ModernBERT) on this machine; a short supervised phase after the first."""
    shards = tmp_path / "shards"
    doc = {"extends": str(ROOT / "recipes" / "tiny-cpu-slurm.yaml"), "name": name, "phases": {
        "unsupervised": {"eval": {"beir": []}, **unsupervised,
                         "data": {"shards_dir": str(shards / "unsupervised"), **unsupervised.get("data", {})}},
        "supervised": {"init": "builtin:tiny-modernbert", "max_steps": 2, "eval": {"beir": []}, **(supervised or {}),
                       "data": {"shards_dir": str(shards / "supervised")}},
        "distillation": None}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _phase(run: Path, name: str = "unsupervised") -> dict:
    return json.loads((run / "manifest.json").read_text())["phases"][name]


def _logged(run: Path) -> int:
    log = RunLayout.of(run).phase("unsupervised").train_log
    return len(log.read_text().splitlines()) if log.exists() else 0


def _until(cond, what: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def test_ctrl_c_stops_the_phase_at_a_checkpoint_and_starts_nothing_after_it(tmp_path, shared_data):
    recipe = _recipe(tmp_path, "lt-local", {"data": {"epochs": 10}, "cadence": {"save_every": 10}})
    run = tmp_path / "run"
    launcher = subprocess.Popen([*CZ, "launch", str(recipe), "--run-dir", str(run), "--executor", "local", "--wait"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    _until(lambda: _logged(run) >= 12, "12 logged steps", launcher)
    launcher.send_signal(signal.SIGINT)
    out = launcher.communicate(timeout=180)[0]
    assert launcher.returncode == 3, out
    assert "stopped at a checkpoint" in out and "colbertzero resume" in out
    p = _phase(run)
    [first] = p["attempts"]
    assert first["executor"] == "local" and first["exit_state"] == "requeue"
    assert p["checkpoints"][-1]["step"] == first["step_end"] >= 12
    assert _phase(run, "supervised")["attempts"] == []  # nothing after the stopped phase started

    resumed = subprocess.run([*CZ, "resume", str(run), "--wait"], capture_output=True, text=True, env=_env(),
                             cwd=ROOT, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    p = _phase(run)
    assert p["state"] == "done" and p["step"] == p["total_steps"] == 40
    second = p["attempts"][1]
    assert second["step_start"] == first["step_end"] and second["exit_state"] == "completed"
    assert all(a["tasks"] == 2 and a["gpu_hours"] > 0 for a in p["attempts"])
    assert _phase(run, "supervised")["state"] == "done"


def test_a_stop_while_a_phase_finishes_lets_it_finish_and_starts_no_other(tmp_path, shared_data):
    """SIGTERM while the first phase exports and evaluates (its steps all done): that phase ends done, the next one
    is never started, and the Python API's Run says so (the chain returns in the background, like a job)."""
    beir = str(shared_data / "beir" / "msmarco-5k")
    recipe = _recipe(tmp_path, "lt-local-end", {"max_steps": 4, "eval": {"beir": [beir], "max_corpus": 400}})
    run = colbertzero.launch(str(recipe), run_dir=str(tmp_path / "run"), executor="local")
    assert run.returncode is None and set(run.jobs) == {"chain"} and run.jobs["chain"].state() == "RUNNING"
    again = colbertzero.resume(str(tmp_path / "run"))  # the chain is alive: nothing new
    assert again.job_ids == run.job_ids
    _until(lambda: _phase(run.run_dir)["step"] == 4, "the first phase's last step")
    run.cancel()
    assert run.wait() == 3
    assert _phase(run.run_dir)["state"] == "done" and _phase(run.run_dir)["eval"]
    assert _phase(run.run_dir, "supervised")["attempts"] == []
    data = json.loads((run.run_dir / "manifest.json").read_text())
    assert len(data["submissions"]) == 1 and data["local_chain"]["exit_code"] == 3


def test_a_hung_rank_is_killed_and_the_phase_runs_again_from_its_checkpoint(tmp_path, shared_data):
    """Rank 0 frozen (SIGSTOP: a stuck process, a lost node); rank 1's watchdog finds no step for 8 s, records the
    hang and leaves; the chain kills the frozen rank and runs the phase again from its newest checkpoint."""
    recipe = _recipe(tmp_path, "lt-local-hang", {"data": {"epochs": 10}, "cadence": {"save_every": 5},
                                                 "watchdog": {"min_seconds": 8, "step_factor": 5}})
    run = tmp_path / "run"
    launcher = subprocess.Popen([*CZ, "launch", str(recipe), "--run-dir", str(run), "--executor", "local", "--wait"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    _until(lambda: _logged(run) >= 7, "7 logged steps (a checkpoint at 5)", launcher)
    chain = json.loads((run / "manifest.json").read_text())["local_chain"]["pid"]
    rank0 = next(p for p in psutil.Process(chain).children() if p.environ().get("RANK") == "0")
    rank0.suspend()
    out = launcher.communicate(timeout=400)[0]
    assert launcher.returncode == 0, out
    assert "hung" in out
    p = _phase(run)
    assert p["state"] == "done" and p["step"] == 40
    hung, last = p["attempts"]
    assert hung["exit_state"] == "hang" and last["exit_state"] == "completed", p["attempts"]
    assert 5 <= last["step_start"] <= hung["step_end"]  # from the newest checkpoint before the hang
    assert all(a["gpu_hours"] > 0 for a in p["attempts"])  # the ledger counts the hung attempt
    dumps = list(RunLayout.of(run).phase("unsupervised").hangs.glob("rank-00001-*.txt"))
    assert dumps and "no step finished for" in dumps[0].read_text()


def test_gpus_this_machine_does_not_have_are_refused(tmp_path, shared_data):
    recipe = _recipe(tmp_path, "lt-local-gpu", {})
    res = subprocess.run([*CZ, "launch", str(recipe), "--run-dir", str(tmp_path / "run"), "--executor", "local",
                          "phases.unsupervised.resources.gpus_per_node=1"], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "phases.unsupervised.resources asks for 2 node(s) × 1 GPU(s)" in res.stderr
    assert "gpus_per_node=0" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()
