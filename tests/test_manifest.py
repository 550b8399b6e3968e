"""Manifest: atomic and locked writes, unlocked snapshots, refusal of corrupt/foreign manifests, lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from colbertzero.manifest import Manifest, ManifestError, resolve_init
from colbertzero.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipe():
    return load_recipe(ROOT / "recipes" / "tiny-cpu.yaml")


def test_create_and_reopen(tmp_path, recipe):
    m = Manifest.create(tmp_path / "run", recipe)
    data = m.read()
    assert data["recipe_hash"] == recipe.hash()
    assert list(data["phases"]) == list(recipe.phases)
    assert all(p["state"] == "pending" for p in data["phases"].values())
    assert (tmp_path / "run" / "recipe.yaml").exists()
    Manifest.create(tmp_path / "run", recipe)  # same recipe: reopens
    other = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["phases.supervised.lr=1e-3"])
    with pytest.raises(ManifestError, match="another configuration"):
        Manifest.create(tmp_path / "run", other)


def test_corrupt_and_foreign_refused(tmp_path, recipe):
    m = Manifest.create(tmp_path / "run", recipe)
    m.path.write_text('{"format": "colbertzero-manifest/1", "recipe": ')
    before = m.path.read_bytes()
    with pytest.raises(ManifestError, match="corrupt manifest"):
        with m.update() as d:
            d["x"] = 1
    assert m.path.read_bytes() == before  # never overwritten
    m.path.write_text(json.dumps({"format": "something-else/2"}))
    with pytest.raises(ManifestError, match="not a colbertzero manifest"):
        m.read()


def test_checkpoints_keep_last_and_init_chain(tmp_path, recipe):
    m = Manifest.create(tmp_path / "run", recipe)
    ck = tmp_path / "run" / "phases" / "unsupervised" / "checkpoints"
    dropped_all = []
    for step in (4, 8, 12):
        (ck / f"step-{step:08d}").mkdir(parents=True)
        dropped_all += m.add_checkpoint("unsupervised", ck / f"step-{step:08d}", step, "abc", keep_last=2)
    assert dropped_all == ["phases/unsupervised/checkpoints/step-00000004"]
    assert [c["step"] for c in m.phase("unsupervised")["checkpoints"]] == [8, 12]
    with pytest.raises(ManifestError, match="no export yet"):
        resolve_init(m, recipe, "supervised")

    def done(p):
        p["state"] = "done"
        p["export"] = {"path": "phases/unsupervised/export", "step": 12, "sha256": "x", "time": "t"}

    m.update_phase("unsupervised", done)
    assert resolve_init(m, recipe, "supervised") == str(m.run_dir / "phases/unsupervised/export")


WRITER = textwrap.dedent(
    """
    import sys
    from colbertzero.manifest import Manifest
    m = Manifest(sys.argv[1])
    n = int(sys.argv[2])
    for i in range(n):
        with m.update() as d:
            d.setdefault("counter", 0)
            d["counter"] += 1
            d["padding"] = "x" * 200000   # make each write big enough to be caught mid-way
    """
)


def test_two_writers_never_interleave(tmp_path, recipe):
    m = Manifest.create(tmp_path / "run", recipe)
    script = tmp_path / "w.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(m.run_dir), "40"]) for _ in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert m.read()["counter"] == 80


def test_writer_killed_mid_write_leaves_previous_manifest(tmp_path, recipe):
    m = Manifest.create(tmp_path / "run", recipe)
    script = tmp_path / "w.py"
    script.write_text(WRITER)
    for delay in (0.0, 0.01, 0.05):
        p = subprocess.Popen([sys.executable, str(script), str(m.run_dir), "100000"])
        deadline = time.time() + 60
        while "counter" not in json.loads(m.path.read_text()) and time.time() < deadline:
            time.sleep(0.01)  # wait until the writer is busy writing
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        data = m.read()  # parses: the rename is atomic, a torn temp file is never the manifest
        assert data["format"] == "colbertzero-manifest/1"
    # the lock of a killed writer does not block the next one
    with m.update() as d:
        d["after"] = True
    assert m.read()["after"] is True


def test_snapshot_needs_no_lock_and_refuses_what_is_not_a_run_dir(tmp_path, recipe):
    m = Manifest.create(tmp_path / "run", recipe)
    m.lock.acquire()  # a writer holds the lock: a snapshot still reads
    try:
        assert Manifest(tmp_path / "run").snapshot()["recipe_hash"] == recipe.hash()
    finally:
        m.lock.release()
    with pytest.raises(ManifestError, match="no such run dir"):
        Manifest(tmp_path / "nowhere").snapshot()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ManifestError, match="not a directory"):
        Manifest(tmp_path / "file").snapshot()


READER = textwrap.dedent(
    """
    import json, sys, time
    from colbertzero.manifest import Manifest
    from colbertzero.report import status_json
    m = Manifest(sys.argv[1])
    seen, last, deadline = 0, -1, time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        data = m.snapshot()              # what `status` and `report` read: no lock
        status_json(data)
        counter = data.get("counter", 0)
        assert counter >= last, (counter, last)  # never an older manifest after a newer one
        last, seen = counter, seen + 1
    print(json.dumps({"reads": seen, "last": last}))
    """
)


def test_readers_never_see_a_torn_manifest_nor_block_the_writer(tmp_path, recipe):
    m = Manifest.create(tmp_path / "run", recipe)
    (tmp_path / "w.py").write_text(WRITER)
    (tmp_path / "r.py").write_text(READER)
    readers = [subprocess.Popen([sys.executable, str(tmp_path / "r.py"), str(m.run_dir), "8"],
                                stdout=subprocess.PIPE, text=True) for _ in range(3)]
    t0 = time.monotonic()
    writer = subprocess.Popen([sys.executable, str(tmp_path / "w.py"), str(m.run_dir), "60"])
    assert writer.wait(120) == 0
    write_s = time.monotonic() - t0
    outs = [json.loads(r.communicate(timeout=120)[0]) for r in readers]
    assert all(r.returncode == 0 for r in readers)  # every snapshot parsed, counters never went back
    assert all(o["reads"] > 10 for o in outs), outs
    assert m.read()["counter"] == 60 and write_s < 60  # 60 locked, fsynced writes beside the readers
    assert not any(p.name.endswith(".tmp") for p in m.run_dir.iterdir())
