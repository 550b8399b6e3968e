"""tools/bench/chaos.py in the suite, run as a user runs it: one trial per ZeRO stage killed while a checkpoint is
being written (the riskiest point; ZeRO-3 under kill -9 at a random step is test_runner's), the full disk, and 30 kills
of a process replacing the manifest. The benchmark itself runs the full trial count with every kind of kill point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kills_mid_checkpoint_resume_identically_and_a_full_disk_fails_cleanly(tmp_path, shared_data):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "chaos.py"), "--trials", "1", "--stages",
                        "1,2", "--modes", "mid-checkpoint", "--seed", "11", "--manifest-kills", "30",
                        "--out", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=1500)
    assert r.stdout.strip(), r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert r.returncode == 0, json.dumps(out, indent=1)[-3000:]
    assert out["trials"] == out["identical"] == 2 and out["checkpoints_lost"] == out["manifest_corruptions"] == 0
    assert all(x["at"].startswith("checkpoint being written") for x in out["results"]), out["results"]
    full = out["disk_full"]
    assert full.get("skipped") or (full["state"] == "failed" and full["says_no_space"]
                                   and full["checkpoint_usable_step"] == 2), full
    kills = out["manifest_kills"]
    assert kills["kills"] == 30 and kills["torn"] == kills["acknowledged_lost"] == 0, kills
    # the writes were hit in the act, not only between them (~30 % of kills on an idle 2-core machine)
    assert kills["inside_a_write"] >= 1, kills
