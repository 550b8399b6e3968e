"""`colbertzero mine` and `colbertzero score`: what they write (the published layouts, read back by `datasets` and by
`prepare`), the rules they promise (positives never negatives, the teacher margin), sharding, resume after kill -9,
refusals, and the same work as a Slurm array on the local cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from colbertzero.cli import main
from colbertzero.data import GlobalBatchLoader, prepare_recipe
from colbertzero.demo.data import build_demo_data, read_jsonl
from colbertzero.mining import MineSpec, ScoreSpec, run_shards
from colbertzero.models import minilm_path
from colbertzero.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    return build_demo_data(tmp_path_factory.mktemp("mining") / "data")["pairs"]


@pytest.fixture(scope="module")
def minilm_colbert(tmp_path_factory) -> str:
    """A PyLate ColBERT on MiniLM (a fresh projection), saved as a phase export is."""
    from pylate.models import ColBERT

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("colbert") / "model"
    ColBERT(minilm_path(), device="cpu").save(str(path))
    return str(path)


def _rows(folder: Path, split: str = "train", config: str | None = None) -> list[dict]:
    """Read through the `datasets` loader and the README's config map, as a user of the Hub layout would."""
    # datasets' cache would answer for another folder of the same name and files: one cache per folder
    return datasets.load_dataset(str(folder), config, split=split, cache_dir=str(folder) + ".hf-cache").to_list()


def _minilm_cosine(query: str, docs: list[str]) -> list[float]:
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(minilm_path(), device="cpu")
    e = m.encode([query, *docs], normalize_embeddings=True)
    return [float(e[0] @ d) for d in e[1:]]


def test_mine_excludes_positives_and_respects_the_margin(pairs, tmp_path):
    src = pairs["topics"]
    plain, margin = tmp_path / "plain", tmp_path / "margin"
    args = [src, "--name", "topics", "--negatives", "6", "--skip-overlapping", "--shards", "2"]
    assert main(["mine", *args, "--out", str(plain)]) == 0
    assert main(["mine", *args, "--out", str(margin), "--teacher", "minilm", "--margin", "0.05"]) == 0

    positives: dict[str, set[str]] = {}
    for r in read_jsonl(src):
        positives.setdefault(r["query"], set()).add(r["document"])
    rows = _rows(plain, "topics")
    assert {tuple(sorted(r)) for r in rows} == {("dataset", "document", "negative", "query")}
    assert len(rows) == len(read_jsonl(src))  # every query once, in input order across both shards
    assert [r["query"] for r in rows] == [r["query"] for r in read_jsonl(src)]
    for r in rows:
        assert r["dataset"] == "topics" and len(r["negative"]) == 6 == len(set(r["negative"]))
        assert not positives[r["query"]] & set(r["negative"])
        assert not any(p.lower() in n.lower() or n.lower() in p.lower() or r["query"].lower() in n.lower()
                       for p in positives[r["query"]] for n in r["negative"])

    stats = json.loads((margin / "stats.json").read_text())
    assert stats["dropped_margin"] > 0 and stats["rows"] == len(rows)
    kept = _rows(margin, "topics")
    assert len(kept) == stats["rows"] - stats["rows_without_negatives"]
    assert sum(len(r["negative"]) for r in kept) == stats["negatives"]
    # the teacher, computed here on its own: every kept negative scores below positive − margin
    for r in kept[::40]:
        s = _minilm_cosine(r["query"], [r["document"], *r["negative"]])
        assert all(x < s[0] - 0.05 + 1e-5 for x in s[1:]), (r["query"], s)


def test_score_output_is_read_by_prepare_into_the_distillation_loader(pairs, minilm, tmp_path):
    mined = tmp_path / "mined"
    run_shards(MineSpec(input=pairs["docstrings"], name="docstrings", negatives=5), mined, show_progress=False)
    out = tmp_path / "scored"
    assert main(["score", str(mined), "--out", str(out), "--teacher", "bm25", "--docs-per-query", "4",
                 "--sample", "40", "--shards", "3"]) == 0
    train, queries, documents = (_rows(out, config=c) for c in ("train", "queries", "documents"))
    assert len(train) == len(queries) == 40 and len({r["query_id"] for r in train}) == 40
    doc_text = {d["document_id"]: d["text"] for d in documents}
    assert all(len(r["document_ids"]) == len(r["scores"]) == 4 and set(r["document_ids"]) <= set(doc_text)
               for r in train)
    # the first candidate is the positive of the mined row; the seeded sample is 40 distinct rows of the input
    mined_rows = pq.read_table(mined / "data").to_pylist()
    for r, q in zip(train, queries):
        row = mined_rows[int(r["query_id"][1:])]
        assert q["text"] == row["query"] and doc_text[r["document_ids"][0]] == row["document"]

    source = {"name": "scored", "path": str(out / "train" / "*.parquet"),
              "queries_path": str(out / "queries" / "*.parquet"),
              "documents_path": str(out / "documents" / "*.parquet")}
    phase = {"kind": "distillation", "init": minilm, "global_batch_size": 4, "query_length": 16,
             "document_length": 48, "data": {"shards_dir": str(tmp_path / "shards"), "sources": [source],
                                             "docs_per_query": 4},
             "resources": {"nodes": 1, "gpus_per_node": 0, "cpu_tasks_per_node": 1}, "lr": 1e-5}
    recipe = recipe_from_dict({"name": "scored", "phases": {"p": phase}})
    assert prepare_recipe(recipe, progress=False)["p"]["scored"]["rows"] == 40
    loader = GlobalBatchLoader(recipe, "p", 0, 1)
    batch = next(iter(loader))
    want = torch.tensor([train[int(i)]["scores"] for i in batch.row_ids], dtype=torch.float32)
    assert batch.n_docs == 4 and torch.equal(batch.scores.float(), want)
    # what the batch holds is the teacher's scores × the fitted scale the README and stats.json state
    stats = json.loads((out / "stats.json").read_text())
    assert stats["scale"] != 1 and f"teacher_scale: {stats['scale']}" in (out / "README.md").read_text()
    raw = torch.tensor([train[int(i)]["raw_scores"] for i in batch.row_ids], dtype=torch.float64)
    torch.testing.assert_close(batch.scores.double(), raw * stats["scale"], atol=6e-5, rtol=1e-6)


def test_an_interrupted_array_task_resumes_without_losing_or_repeating_a_query(pairs, tmp_path):
    mined = tmp_path / "mined"
    run_shards(MineSpec(input=pairs["topics"], name="topics", negatives=7), mined, show_progress=False)
    out = tmp_path / "scored"
    cmd = [sys.executable, "-m", "colbertzero", "score", str(mined), "--out", str(out), "--teacher", "minilm",
           "--docs-per-query", "4", "--sample", "90", "--shards", "3"]
    assert main(cmd[3:] + ["--array-task", "0"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd + ["--array-task", "1"], stderr=subprocess.PIPE, env=env)
    seen = b""
    # Its progress bar's first display: the shard has begun (read as bytes: a bar redraws with \r, and a line would
    # only end when the bar closes, at the end of the shard).
    while b"score [2/3]" not in seen:
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk or proc.poll() is None, f"task ended before scoring: {seen.decode(errors='replace')}"
        seen += chunk
    time.sleep(0.5)  # the teacher loads, then scores: the part is written only at the end of the shard
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    work = tmp_path / ".scored.work"
    assert not (work / "part-00001-of-00003.parquet").exists(), "the shard finished before it could be killed"
    assert (work / "part-00000-of-00003.parquet").is_file() and not out.exists()
    # a half-written part of a killed task is a temp name: never taken for a finished shard
    (work / ".part-00002-of-00003.parquet.999.tmp").write_bytes(b"PAR1 torn")

    spec = ScoreSpec(input=str(mined), teacher="minilm", docs_per_query=4, sample=90)
    r = run_shards(spec, out, 3, show_progress=False)
    assert r["merged"] and r["ran"] == [1, 2] and not work.exists()  # shard 0 is not run again
    ids = [x["query_id"] for x in _rows(out, config="train")]
    rows = sorted(int(i[1:]) for i in ids)
    assert len(ids) == len(set(ids)) == 90 and ids == [f"q{i}" for i in rows]  # each query once, in order
    # the same rows as one uninterrupted shard
    whole = run_shards(spec, tmp_path / "whole", 1, show_progress=False)["out"]
    a, b = _rows(Path(whole), config="train"), _rows(out, config="train")
    assert [(x["query_id"], x["document_ids"]) for x in a] == [(x["query_id"], x["document_ids"]) for x in b]
    # scores are rounded to 1e-4; batching may move one across a rounding boundary, never further
    np.testing.assert_allclose([x["scores"] for x in a], [x["scores"] for x in b], atol=1.5e-4)


def test_refusals_name_the_problem(pairs, tmp_path, capsys):
    cases = [
        (["mine", pairs["topics"], "--out", str(tmp_path / "a"), "--name", "t", "--margin", "0.1"],
         "--teacher and --margin go together"),
        (["mine", pairs["topics"], "--out", str(tmp_path / "a"), "--name", "../up"], "--name '../up'"),
        (["mine", pairs["topics"], "--out", str(tmp_path / "a"), "--name", "t", "--retriever",
          f"cross-encoder:{tmp_path}"], "cannot rank a corpus"),
        (["mine", pairs["topics"], "--out", str(tmp_path / "a"), "--name", "t", "--retriever", "dense:/none"],
         "/none is not a model folder"),
        (["mine", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "a"), "--name", "t"], "does not exist"),
        (["mine", pairs["topics"], "--out", str(tmp_path / "a"), "--name", "t", "--shards", "2", "--array-task",
          "2"], "--array-task 2: this work has shards 0..1"),
        (["score", pairs["topics"], "--out", str(tmp_path / "b"), "--teacher", "bm25", "--documents", "document",
          "--docs-per-query", "2"], "has 1 candidates, --docs-per-query is 2"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # other settings over unfinished work: refused, the work kept
    assert main(["mine", pairs["topics"], "--out", str(tmp_path / "c"), "--name", "t", "--shards", "2",
                 "--array-task", "0"]) == 0
    assert main(["mine", pairs["topics"], "--out", str(tmp_path / "c"), "--name", "t", "--shards", "2",
                 "--negatives", "3"]) == 2
    assert "changed: negatives" in capsys.readouterr().err
    assert (tmp_path / ".c.work" / "part-00000-of-00002.parquet").is_file()


def test_teachers_score_in_candidate_order(pairs, minilm_colbert, tmp_path):
    """Each kind's scores equal its library's own computation on the same (query, candidates)."""
    from pylate import models, rank
    from sentence_transformers import CrossEncoder

    rows = read_jsonl(pairs["docstrings"])[:6]
    cands = [[r["document"] for r in rows[i:] + rows[:i]][:4] for i in range(len(rows))]
    mined = tmp_path / "in.jsonl"
    mined.write_text("".join(json.dumps({"query": r["query"], "docs": c}) + "\n" for r, c in zip(rows, cands)))

    ce = tmp_path / "ce"
    CrossEncoder(minilm_path(), num_labels=1, device="cpu").save(str(ce))  # MiniLM weights, a fresh score head
    for teacher in (f"cross-encoder:{ce}", f"colbert:{minilm_colbert}", "minilm"):
        out = tmp_path / teacher.split(":")[0]
        run_shards(ScoreSpec(input=str(mined), teacher=teacher, documents="docs"), out, 2, show_progress=False)
        written = _rows(out, config="train")
        got = [r["raw_scores"] for r in written]  # the teacher's own; `scores` are these × the fitted scale
        scale = json.loads((out / "stats.json").read_text())["scale"]
        np.testing.assert_allclose([r["scores"] for r in written], scale * np.array(got), rtol=1e-5, atol=6e-5)
        if teacher.startswith("cross"):
            m = CrossEncoder(str(ce), device="cpu")
            want = [m.predict([(r["query"], d) for d in c]).tolist() for r, c in zip(rows, cands)]
        elif teacher.startswith("colbert"):
            m = models.ColBERT(minilm_colbert, device="cpu")
            q = m.encode([r["query"] for r in rows], is_query=True)
            d = [m.encode(c, is_query=False) for c in cands]
            ranked = rank.rerank(documents_ids=[list(range(len(c))) for c in cands], queries_embeddings=q,
                                 documents_embeddings=d)
            want = [[dict((x["id"], x["score"]) for x in hits)[j] for j in range(len(c))]
                    for hits, c in zip(ranked, cands)]
        else:
            want = [_minilm_cosine(r["query"], c) for r, c in zip(rows, cands)]
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4, err_msg=teacher)


def test_mine_and_score_as_slurm_arrays_equal_the_local_run(pairs, local_slurm, tmp_path):
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    base = ["--name", "topics", "--negatives", "4"]
    assert main(["mine", pairs["topics"], *base, "--out", str(local / "mined")]) == 0
    assert main(["mine", pairs["topics"], *base, "--out", str(cluster / "mined"), "--shards", "2",
                 "--executor", "slurm", "--partition", "debug", "--time", "5", "--cpus-per-task", "1"]) == 0
    _wait_for(cluster / "mined" / "colbertzero.json", cluster)
    score = ["--teacher", "bm25", "--docs-per-query", "5", "--sample", "30"]
    assert main(["score", str(local / "mined"), *score, "--out", str(local / "scored")]) == 0
    assert main(["score", str(cluster / "mined"), *score, "--out", str(cluster / "scored"), "--shards", "3",
                 "--executor", "slurm", "--partition", "debug", "--time", "5", "--cpus-per-task", "1"]) == 0
    _wait_for(cluster / "scored" / "colbertzero.json", cluster)
    assert _rows(local / "mined", "topics") == _rows(cluster / "mined", "topics")
    for config in ("train", "queries", "documents"):
        assert _rows(local / "scored", config=config) == _rows(cluster / "scored", config=config), config


def _wait_for(path: Path, root: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            logs = "\n".join(f"{p}: {p.read_text()[-2000:]}" for p in root.rglob("*.err"))
            pytest.fail(f"{path} not written within {timeout:.0f} s; task logs:\n{logs}")
        time.sleep(1)


def test_a_recipe_derives_its_data_before_prepare(pairs, tiny_modernbert, tmp_path, capfd):
    """`derive:` steps run before prepare (local executor), in order, and a second launch leaves them alone."""
    import yaml

    mined, scored = tmp_path / "mined", tmp_path / "scored"
    recipe = {
        "extends": str(ROOT / "recipes" / "tiny-cpu.yaml"), "name": "derived",
        "derive": [
            {"name": "negatives", "kind": "mine", "out": str(mined), "shards": 2,
             "args": {"input": pairs["topics"], "name": "topics", "negatives": 4}},
            {"name": "teacher", "kind": "score", "out": str(scored), "shards": 2,
             "args": {"input": str(mined), "teacher": "bm25", "docs_per_query": 4, "sample": 16}},
        ],
        "phases": {
            "unsupervised": None,
            "supervised": {"init": tiny_modernbert, "max_steps": 2, "eval": {"beir": []},
                           "data": {"shards_dir": str(tmp_path / "shards" / "sup"), "sources": [
                               {"name": "topics", "path": str(mined / "data" / "*.parquet"),
                                "columns": {"positive": "document", "negatives": "negative"}}]}},
            "distillation": {"max_steps": 2, "eval": {"beir": []},
                             "data": {"shards_dir": str(tmp_path / "shards" / "kd"), "docs_per_query": 4,
                                      "sources": [{"name": "teacher", "path": str(scored / "train" / "*.parquet"),
                                                   "queries_path": str(scored / "queries" / "*.parquet"),
                                                   "documents_path": str(scored / "documents" / "*.parquet")}]}},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 0, capfd.readouterr().err  # outputs a derive step writes: not missing
    bad = dict(recipe, derive=[dict(recipe["derive"][0], args={"input": pairs["topics"], "nmae": "x"})])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["validate", str(tmp_path / "bad.yaml")]) == 2
    err = capfd.readouterr().err
    assert "unknown setting(s) nmae" in err and "missing name" in err, err

    run = tmp_path / "run"
    assert main(["launch", str(path), "--run-dir", str(run), "--executor", "local", "--wait"]) == 0
    assert len(_rows(mined, "topics")) == len(read_jsonl(pairs["topics"]))
    assert len(_rows(scored, config="train")) == 16
    status = json.loads((run / "manifest.json").read_text())
    assert [p["state"] for p in status["phases"].values()] == ["done", "done"]
    before = (mined / "colbertzero.json").stat().st_mtime_ns, (scored / "colbertzero.json").stat().st_mtime_ns
    capfd.readouterr()
    assert main(["launch", str(path), "--run-dir", str(run), "--executor", "local", "--wait"]) == 0
    assert "derive" not in capfd.readouterr().err
    assert before == ((mined / "colbertzero.json").stat().st_mtime_ns, (scored / "colbertzero.json").stat().st_mtime_ns)
