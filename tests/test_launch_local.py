"""`colbertzero launch --executor local`: the same chain without Slurm, stopped with Ctrl-C and resumed (real
processes, no mocks). A Ctrl-C reaches the launcher only (the ranks run in their own session); it asks the ranks to
stop at a checkpoint, and `resume` continues from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_local_chain_stops_on_ctrl_c_and_resumes(tmp_path, shared_data):
    recipe = tmp_path / "local.yaml"
    recipe.write_text(yaml.safe_dump({
        "extends": str(ROOT / "recipes" / "tiny-cpu-slurm.yaml"), "name": "lt-local",
        "phases": {"unsupervised": {"data": {"epochs": 10, "shards_dir": str(tmp_path / "shards")},
                                    "cadence": {"save_every": 10}, "eval": {"beir": []}},
                   "supervised": None, "distillation": None}}))
    run = tmp_path / "run"
    log = run / "phases" / "unsupervised" / "logs" / "train.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    cmd = [sys.executable, "-m", "colbertzero"]
    launcher = subprocess.Popen([*cmd, "launch", str(recipe), "--run-dir", str(run), "--executor", "local"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 12):
        assert launcher.poll() is None, launcher.stdout.read()
        assert time.monotonic() < deadline, "no 12 steps within 300 s"
        time.sleep(0.2)
    launcher.send_signal(signal.SIGINT)
    out = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 3, out
    assert "stopped at a checkpoint" in out and "colbertzero resume" in out
    p = json.loads((run / "manifest.json").read_text())["phases"]["unsupervised"]
    [first] = p["attempts"]
    assert first["executor"] == "local" and first["exit_state"] == "requeue"
    assert p["checkpoints"][-1]["step"] == first["step_end"] >= 12

    resumed = subprocess.run([*cmd, "resume", str(run)], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    p = json.loads((run / "manifest.json").read_text())["phases"]["unsupervised"]
    assert p["state"] == "done" and p["step"] == p["total_steps"] == 40
    second = p["attempts"][1]
    assert second["step_start"] == first["step_end"] and second["exit_state"] == "completed"
    assert all(a["tasks"] == 2 and a["gpu_hours"] > 0 for a in p["attempts"])
