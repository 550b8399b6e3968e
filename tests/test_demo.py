"""`colbertzero demo` end to end, as a user runs it: the real command in a subprocess, then what it promised.

It runs the README's demo command (MiniLM, ~9 minutes on 2 CPU cores), so CI proves the newcomer's first command on
every submission without running it twice. Needs no hub and not ../shared/data: the demo builds its data from
Python's own documentation.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("unsupervised", "supervised", "distillation")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cz(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("COLBERTZERO_EMBEDDINGS_CACHE", None)  # the demo keeps its embeddings under --out
    return subprocess.run([sys.executable, "-m", "colbertzero", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _printed_paths(stdout: str) -> dict[str, Path]:
    """The demo's closing lines: `  run dir : PATH`, `  model   : PATH   (…)`, …"""
    found = re.findall(r"^  (run dir|model|report|init)\s*: (\S+)", stdout, flags=re.M)
    return {k: Path(v) for k, v in found}


def _results_section(md: str) -> str:
    start = md.index("## Results: nDCG@10")
    end = md.find("\n## ", start + 1)
    return md[start: end if end != -1 else None]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    r = _cz("demo", "--out", str(out), timeout=1500)  # the README's command (MiniLM), its output in a temp folder
    return out, r, time.time() - t0


def test_demo_runs_the_pipeline(demo_run):
    out, r, _ = demo_run
    assert r.returncode == 0, f"demo failed (exit {r.returncode})\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    paths = _printed_paths(r.stdout)
    assert set(paths) == {"run dir", "model", "report", "init"}, r.stdout[-2000:]
    for what, p in paths.items():
        assert p.exists(), f"{what}: printed {p}, which does not exist"
        assert p.is_relative_to(out), f"{what}: {p} is outside --out {out}"
    run_dir = paths["run dir"]

    # the exported model is a PyLate folder
    assert (paths["model"] / "config_sentence_transformers.json").is_file()
    assert any(paths["model"].glob("*.safetensors"))

    # `colbertzero status RUN --json`: every phase done and evaluated
    st = _cz("status", str(run_dir), "--json", timeout=120)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert [p["name"] for p in status["phases"]] == list(PHASES)
    for p in status["phases"]:
        assert p["state"] == "done", p
        assert p["step"] == p["total_steps"] and p["total_steps"] > 0, p
        assert p["ndcg10"] is not None and 0 <= p["ndcg10"] <= 100, p

    # the starting model's evaluation, on the same data as the phases'
    init = json.loads(paths["init"].read_text())
    assert init["phase"] == "init" and init["recipe_hash"] == status["recipe_hash"]
    assert set(init["datasets"]) == {"pydocs"} and 0 <= init["datasets"]["pydocs"]["ndcg@10"] <= 1
    assert "init" in r.stdout and "pydocs" in r.stdout  # the printed init → phases table


def test_demo_report(demo_run):
    out, r, _ = demo_run
    assert r.returncode == 0, r.stderr[-3000:]
    report = _printed_paths(r.stdout)["report"]
    md = report.read_text()
    # a per-phase nDCG@10 table: one row per phase with a number in the eval set's column
    results = _results_section(md)
    assert re.search(r"^\| Phase \| pydocs \| Average \|", results, flags=re.M), results
    for phase in PHASES:
        assert re.search(rf"^\| {phase}( \(final\))? \| \d+\.\d\d \| \d+\.\d\d \|", results, flags=re.M), (
            phase,
            results,
        )
    # what prepare kept and dropped, per phase and source: the mined sources keep the fewest negatives of a source
    data = md[md.index("## Data"):md.index("## Training")]
    for source in ("docstrings", "topics"):
        assert re.search(rf"^\| supervised \| {source} \| [\d,]+ \| 0 \| \d+ \|", data, flags=re.M), data
    # every figure the report shows is a PNG beside it, the loss and nDCG@10 ones among them
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert {"loss.png", "ndcg10.png"} <= set(figures), figures
    for name in figures:
        with open(report.parent / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC, name


def test_demo_again_in_the_same_out_is_done(demo_run):
    out, r, _ = demo_run
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = _printed_paths(r.stdout)["run dir"]
    before = json.loads((run_dir / "manifest.json").read_text())
    again = _cz("demo", "--out", str(out))
    assert again.returncode == 0, f"{again.stdout[-3000:]}\n{again.stderr[-3000:]}"
    assert "every phase is done" in again.stdout, again.stdout[-2000:]
    after = json.loads((run_dir / "manifest.json").read_text())
    for phase in PHASES:  # nothing trained twice
        assert len(after["phases"][phase]["attempts"]) == len(before["phases"][phase]["attempts"]), phase
    assert _printed_paths(again.stdout) == _printed_paths(r.stdout)
