"""The demo data set built from Python's own documentation: shapes, no train/eval leakage, determinism, idempotence."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from colbertzero.demo.data import SOURCES, build_demo_data, read_jsonl
from colbertzero.demo.pydocs import MAX_DOC_WORDS, DemoDataError, norm_query
from colbertzero.files import temps_in

DATA_FILES = [f"train/pairs/{s}.jsonl" for s in SOURCES] + [
    "beir/pydocs/corpus.jsonl",
    "beir/pydocs/queries.jsonl",
    "beir/pydocs/qrels/test.tsv",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    t = time.perf_counter()
    paths = build_demo_data(out)
    print(f"default build: {time.perf_counter() - t:.1f}s")
    return paths


def _qrels(path: str | Path) -> list[tuple[str, str, int]]:
    lines = Path(path).read_text().splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    return [(q, d, int(s)) for q, d, s in (ln.split("\t") for ln in lines[1:])]


def test_shapes(built):
    root = Path(built["root"])
    assert set(built["pairs"]) == set(SOURCES) == {"docstrings", "titles", "topics"}
    total = 0
    for src, path in built["pairs"].items():
        rows = read_jsonl(path)
        assert len(rows) >= 300, (src, len(rows))
        total += len(rows)
        assert all(set(r) == {"query", "document"} and r["query"].strip() and r["document"].strip() for r in rows)
        assert max(len(r["document"].split()) for r in rows) <= MAX_DOC_WORDS
        assert len({norm_query(r["query"]) for r in rows}) == len(rows), f"{src}: repeated query"
    assert total >= 2500

    info = json.loads(Path(built["info"]).read_text())
    assert info["params"] == {"seed": 0, "eval_queries": 200}
    lic = Path(built["license"]).read_text()
    assert "Python Software Foundation License Version 2" in lic and "Zero-Clause BSD" in lic
    assert "pydoc_data" in Path(built["readme"]).read_text()
    assert not temps_in(root.parent)


def test_eval_set_is_beir_and_consistent(built):
    beir = Path(built["beir"])
    corpus = read_jsonl(beir / "corpus.jsonl")
    queries = read_jsonl(beir / "queries.jsonl")
    assert all(set(d) == {"_id", "title", "text"} for d in corpus) and all(set(q) == {"_id", "text"} for q in queries)
    cids = [d["_id"] for d in corpus]
    qids = [q["_id"] for q in queries]
    assert len(set(cids)) == len(cids) >= 800 and len(set(qids)) == len(qids) == 200
    assert len({d["text"] for d in corpus}) == len(corpus)  # one answer per query: no duplicated documents
    qrels = _qrels(beir / "qrels" / "test.tsv")
    assert {q for q, _, _ in qrels} == set(qids) and len(qrels) == len(qids)
    assert all(d in set(cids) and s == 1 for _, d, s in qrels)
    assert len({norm_query(q["text"]) for q in queries}) == len(queries)


def test_no_leakage_between_train_and_eval(built):
    beir = Path(built["beir"])
    eval_queries = {norm_query(q["text"]) for q in read_jsonl(beir / "queries.jsonl")}
    corpus = {d["_id"]: d["text"] for d in read_jsonl(beir / "corpus.jsonl")}
    answers = {corpus[d] for _, d, _ in _qrels(beir / "qrels" / "test.tsv")}

    train_queries, train_docs = set(), set()
    for path in built["pairs"].values():
        for r in read_jsonl(path):
            train_queries.add(norm_query(r["query"]))
            train_docs.add(r["document"])
    assert not eval_queries & train_queries
    # the held-out answers are never trained on, not even as negatives or inside a longer document
    assert not answers & train_docs
    assert not any(a in d for a in answers for d in train_docs if len(d) > len(a))
    # the titles source names APIs: no held-out API is named there
    held = {d for _, d, _ in _qrels(beir / "qrels" / "test.tsv")}
    titles = " ".join(r["query"] for r in read_jsonl(built["pairs"]["titles"]))
    assert not [h for h in held if f" {h} " in f" {titles.replace('?', ' ')} "]


def test_deterministic_and_idempotent(built, tmp_path):
    # two independent builds (small distillation set, so the teacher runs briefly) are byte-identical
    a = build_demo_data(tmp_path / "a")
    b = build_demo_data(tmp_path / "b")
    files = sorted(p.relative_to(a["root"]) for p in Path(a["root"]).rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b["root"]) for p in Path(b["root"]).rglob("*") if p.is_file())
    for rel in files:
        assert (Path(a["root"]) / rel).read_bytes() == (Path(b["root"]) / rel).read_bytes(), rel
    for rel in DATA_FILES:
        assert (Path(a["root"]) / rel).read_bytes() == (Path(built["root"]) / rel).read_bytes(), rel

    # complete: the second call skips the build
    before = {rel: (Path(a["root"]) / rel).stat().st_mtime_ns for rel in files}
    t = time.perf_counter()
    again = build_demo_data(tmp_path / "a")
    assert time.perf_counter() - t < 5.0 and again == a
    assert before == {rel: (Path(a["root"]) / rel).stat().st_mtime_ns for rel in files}

    # other parameters replace the old build as a whole
    c = build_demo_data(tmp_path / "a", eval_queries=150)
    info = json.loads(Path(c["info"]).read_text())
    assert info["params"]["eval_queries"] == 150 and info["counts"]["eval/queries"] <= 150
    assert not temps_in(tmp_path)

    # a damaged build (a file lost) is not taken as complete
    Path(c["pairs"]["topics"]).unlink()
    c2 = build_demo_data(tmp_path / "a")
    assert Path(c2["pairs"]["topics"]).read_bytes() == Path(built["pairs"]["topics"]).read_bytes()


def test_refusals(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DemoDataError, match="refusing to overwrite"):
        build_demo_data(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(DemoDataError, match="eval_queries"):
        build_demo_data(tmp_path / "x", eval_queries=0)
    assert not (tmp_path / "x").exists()
