"""tools/bench/chaos.py in the suite, run as a user runs it: one trial per ZeRO stage killed while a checkpoint is
being written (the riskiest point; ZeRO-3 under kill -9 at a random step is test_runner's), the full disk, and 30 kills
of a process replacing the manifest. The benchmark itself runs the full trial count with every kind of kill point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from colbertzero import files
from colbertzero.manifest import Manifest
from colbertzero.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))


def test_kills_mid_checkpoint_resume_identically_and_a_full_disk_fails_cleanly(tmp_path, shared_data):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "chaos.py"), "--trials", "1", "--stages",
                        "1,2", "--modes", "mid-checkpoint", "--seed", "11", "--manifest-kills", "30",
                        "--out", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=1500)
    assert r.stdout.strip(), r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert r.returncode == 0, json.dumps(out, indent=1)[-3000:]
    assert out["trials"] == out["killed"] == out["identical"] == 2, out["results"]
    assert out["checkpoints_lost"] == out["manifest_corruptions"] == 0
    assert all(x["at"].startswith("checkpoint being written") for x in out["results"]), out["results"]
    # each kill is classified by what it left; a checkpoint is written for seconds, so the kill lands inside it
    assert [x["landed"] for x in out["results"]] == ["inside a checkpoint write"] * 2, out["results"]
    full = out["disk_full"]
    assert full.get("skipped") or (full["state"] == "failed" and full["says_no_space"]
                                   and full["checkpoint_usable_step"] == 2), full
    kills = out["manifest_kills"]
    assert kills["kills"] == 30 and kills["torn"] == kills["acknowledged_lost"] == 0, kills
    # the writes were hit in the act, not only between them (~30 % of kills on an idle 2-core machine)
    assert kills["inside_a_write"] >= 1, kills


def test_a_manifest_write_in_the_act_is_seen_and_a_kill_there_is_classified(tmp_path, monkeypatch):
    """What chaos waits for and classifies by is the temp file the manifest's real writer makes: a write held
    between its temp file and its rename is seen, and a kill there is told apart from one between writes."""
    import chaos

    run = tmp_path / "run"
    m = Manifest.create(run, load_recipe(ROOT / "recipes" / "tiny-cpu.yaml"))
    assert chaos._left_behind(run) == "between writes" and not files.writes_in_progress(run / "manifest.json")
    held, release = threading.Event(), threading.Event()
    real_replace = os.replace

    def slow_replace(src, dst):
        held.set()
        release.wait(30)
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", slow_replace)
    writer = threading.Thread(target=m.update_phase, args=("unsupervised", lambda p: p.update(step=5)))
    writer.start()
    try:
        assert held.wait(30)
        [temp] = files.writes_in_progress(run / "manifest.json")
        assert temp.parent == run and temp.name.startswith(".manifest.json.")
        assert chaos._left_behind(run) == "inside a manifest write"
    finally:
        release.set()
        writer.join(30)
    monkeypatch.undo()
    assert not files.writes_in_progress(run / "manifest.json") and Manifest(run).phase("unsupervised")["step"] == 5
    assert chaos._left_behind(run) == "between writes"


@pytest.mark.parametrize("results,killed,identical", [
    ([{"landed": "finished first", "identical": True, "stage": 1}], 0, 0),
    ([{"landed": "between writes", "identical": True, "stage": 1},
      {"landed": "finished first", "identical": True, "stage": 1}], 1, 1)])
def test_a_trial_that_finished_first_is_no_kill(results, killed, identical):
    import chaos

    s = chaos.summarize(results, [1], 0, 0.0, None, {})
    assert (s["killed"], s["identical"], s["finished_first"]) == (killed, identical, len(results) - killed)
    assert chaos.passed(s) == (killed > 0 and identical == killed)
