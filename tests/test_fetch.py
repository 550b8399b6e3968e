"""`colbertzero fetch`: the paper's Hub datasets listed and placed where `prepare` reads them, through the real
huggingface_hub code on a Hugging Face cache laid out as the library writes it (offline: no hub here)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "recipes" / "colbert-zero.yaml"


def _cache_repo(cache: Path, repo: str, files: dict[str, bytes], revision: str) -> None:
    """huggingface_hub's cache layout: refs/main → a commit; snapshots/<commit>/<path> → symlinks into blobs/."""
    root = cache / f"datasets--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    (root / "blobs").mkdir(exist_ok=True)
    for path, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / revision / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def _parquet(table: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(table), buf)
    return buf.getvalue()


def _populated_cache(cache: Path) -> None:
    recipe = yaml.safe_load(PAPER.read_text())
    unsup = [s["hub"]["path"]["split"] for s in recipe["phases"]["unsupervised"]["data"]["sources"]]
    sup = [s["hub"]["path"]["split"] for s in recipe["phases"]["supervised"]["data"]["sources"]]
    pairs = _parquet({"query": ["q1", "q2"], "document": ["d1", "d2"], "dataset": ["x", "x"], "shard": [0, 0]})
    _cache_repo(cache, "nomic-ai/nomic-embed-unsupervised-data",
                {f"data/{s}-{k:05d}-of-00002.parquet": pairs for s in unsup for k in range(2)}, "a" * 40)
    triples = _parquet({"query": ["q"], "document": ["d"], "negative": [["n1", "n2"]], "dataset": ["x"]})
    _cache_repo(cache, "nomic-ai/nomic-embed-supervised-data",
                {f"data/{s}-00000-of-00001.parquet": triples for s in sup}, "b" * 40)
    _cache_repo(cache, "lightonai/ms-marco-en-bge-gemma", {
        "train/train-00000-of-00001.parquet": _parquet({"query_id": [1], "document_ids": [[1, 2]],
                                                        "scores": [[0.5, 0.1]]}),
        "queries/train-00000-of-00001.parquet": _parquet({"query_id": [1], "text": ["q"]}),
        "documents/train-00000-of-00001.parquet": _parquet({"document_id": [1, 2], "text": ["a", "b"]}),
    }, "c" * 40)


def _cz(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "colbertzero", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def _env(tmp: Path, cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "COLBERTZERO_DATA": str(tmp / "data")}


def test_dry_run_lists_every_file_of_every_source_from_the_cache(tmp_path):
    cache = tmp_path / "hf"
    _populated_cache(cache)
    res = _cz("fetch", PAPER, "--dry-run", "--json", env=_env(tmp_path, cache))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert len(report) == 29 + 10 + 3  # every source path of the three phases
    u = report["phases.unsupervised.data.sources[2].path"]  # paq
    assert [f["path"] for f in u["files"]] == ["data/paq-00000-of-00002.parquet", "data/paq-00001-of-00002.parquet"]
    assert u["revision"] == "a" * 40 and u["listed_from"] == "cache"
    kd = report["phases.distillation.data.sources[0].documents_path"]
    assert [f["path"] for f in kd["files"]] == ["documents/train-00000-of-00001.parquet"]
    assert not (tmp_path / "data").exists()  # a dry run writes nothing


def test_without_hub_or_cache_one_line_and_nothing_written(tmp_path):
    res = _cz("fetch", PAPER, "--dry-run", env=_env(tmp_path, tmp_path / "empty-cache"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot be listed: the Hub does not answer here" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_fetched_files_are_where_prepare_reads_them(tmp_path, minilm):
    cache = tmp_path / "hf"
    _populated_cache(cache)
    env = _env(tmp_path, cache)
    res = _cz("fetch", PAPER, "--phase", "unsupervised", env=env)
    assert res.returncode == 0, res.stderr
    repo_dir = tmp_path / "data" / "hub" / "nomic-ai" / "nomic-embed-unsupervised-data"
    record = json.loads((repo_dir / "fetch.json").read_text())
    assert record["revision"] == "a" * 40 and len(record["files"]) == 2
    # prepare, on the paper recipe as shipped (a small model and one source by override), reads the fetched layout
    res = _cz("prepare", PAPER, "--phase", "unsupervised", f"phases.unsupervised.init={minilm}",
              "phases.unsupervised.data.sources=[" + json.dumps({
                  "name": "paq", "path": str(repo_dir / "data" / "paq-*.parquet")}) + "]",
              "phases.unsupervised.data.shards_dir=" + str(tmp_path / "shards"), "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["unsupervised"]["paq"]["rows"] == 4  # 2 files of 2 rows, one source


def test_fetched_revisions_are_the_lineage_of_a_phase(tmp_path, monkeypatch):
    from colbertzero.data.hub import fetched_revisions
    from colbertzero.recipe import load_recipe

    cache = tmp_path / "hf"
    _populated_cache(cache)
    res = _cz("fetch", PAPER, "--phase", "distillation", env=_env(tmp_path, cache))
    assert res.returncode == 0, res.stderr
    monkeypatch.setenv("COLBERTZERO_DATA", str(tmp_path / "data"))
    recipe = load_recipe(PAPER)
    assert fetched_revisions(recipe, "distillation") == {
        f"msmarco_bge_gemma.{field}": "lightonai/ms-marco-en-bge-gemma@" + "c" * 40
        for field in ("path", "queries_path", "documents_path")}
    assert fetched_revisions(recipe, "supervised") == {}  # not fetched: nothing claimed
