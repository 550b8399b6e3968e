"""colbertzero.evaluate (and its metrics): hand-checked metrics, BEIR and NanoBEIR loading, prompt handling,
the embedding cache, and parity with PyLate's own evaluator on real MS MARCO data with a real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from colbertzero.evaluate import (
    DatasetError,
    DatasetWarning,
    DocumentEmbeddings,
    encode_queries,
    evaluate,
    format_table,
    load_beir,
    subsample_corpus,
)
from colbertzero.evaluate.metrics import compute_metrics, query_metrics, rank

QUERY_PROMPT, DOC_PROMPT = "search_query: ", "search_document: "


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_match_hand_computed_values():
    qrels = {
        "q1": {"a": 2, "b": 1, "c": 0, "z": 1},  # graded; z is relevant but never retrieved
        "q2": {"x": 1},
        "q3": {"y": 0},  # judged, nothing relevant: scores 0 and still counts
    }
    run = {
        # a and d tie: trec_eval puts the higher id first, so the ranking is c, d, a, b
        "q1": {"a": 0.8, "b": 0.7, "c": 0.9, "d": 0.8},
        "q2": {"x": 0.1, "w": 0.5},
        "q3": {"y": 1.0},
        "q9": {"a": 1.0},  # no judgements: ignored
    }
    assert rank(run["q1"]) == ["c", "d", "a", "b"]

    l2 = math.log2
    q1 = {
        "ndcg@10": (2 / l2(4) + 1 / l2(5)) / (2 / l2(2) + 1 / l2(3) + 1 / l2(4)),
        "mrr@10": 1 / 3,
        "recall@100": 2 / 3,
        "map@100": (1 / 3 + 2 / 4) / 3,
    }
    q2 = {"ndcg@10": (1 / l2(3)) / 1.0, "mrr@10": 1 / 2, "recall@100": 1.0, "map@100": 1 / 2}
    assert query_metrics(rank(run["q1"]), qrels["q1"]) == pytest.approx(q1)
    assert query_metrics(rank(run["q2"]), qrels["q2"]) == pytest.approx(q2)
    assert query_metrics(rank(run["q3"]), qrels["q3"]) == {m: 0.0 for m in q1}

    got = compute_metrics(run, qrels)
    assert got["queries"] == 3
    for m in q1:
        assert got[m] == pytest.approx((q1[m] + q2[m] + 0.0) / 3)
    # cut-offs cut: the first relevant document of q1 sits at rank 3
    assert query_metrics(rank(run["q1"]), qrels["q1"], ["ndcg@2", "mrr@2", "recall@2", "map@2"]) == {
        "ndcg@2": 0.0, "mrr@2": 0.0, "recall@2": 0.0, "map@2": 0.0}


def test_metrics_count_a_judged_query_missing_from_the_run_as_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    got = compute_metrics({"q1": {"a": 1.0}}, qrels)
    assert got["queries"] == 2 and got["ndcg@10"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics({}, qrels, ["precision@10"])


# ------------------------------------------------------------------------------------------------ loading


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_beir(root: Path, corpus: dict, queries: dict, qrels: dict, header: bool = False, titles=None) -> Path:
    titles = titles or {}
    _write_jsonl(root / "corpus.jsonl", [{"_id": d, "title": titles.get(d, ""), "text": t} for d, t in corpus.items()])
    _write_jsonl(root / "queries.jsonl", [{"_id": q, "text": t} for q, t in queries.items()])
    lines = ["query-id\tcorpus-id\tscore"] if header else []
    lines += [f"{q}\t{d}\t{g}" for q, judged in qrels.items() for d, g in judged.items()]
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


TINY_CORPUS = {
    "d1": "The capital of France is Paris.",
    "d2": "Bananas are yellow fruits rich in potassium.",
    "d3": "Paris hosts the Louvre museum.",
    "d4": "Photosynthesis turns light into chemical energy in plants.",
    "d5": "The Eiffel Tower was finished in 1889.",
    "d6": "Potassium is an essential mineral.",
}
TINY_QUERIES = {"q1": "what is the capital of france", "q2": "which fruit is yellow", "q3": "how do plants make energy",
                "q4": "a query without judgements"}
TINY_QRELS = {"q1": {"d1": 2, "d3": 1}, "q2": {"d2": 1, "d6": 0}, "q3": {"d4": 1}}


@pytest.mark.parametrize("header", [False, True])
def test_load_beir_with_and_without_qrels_header(tmp_path, header):
    root = _write_beir(tmp_path / "tiny", TINY_CORPUS, TINY_QUERIES, TINY_QRELS, header=header,
                       titles={"d5": "Eiffel Tower"})
    corpus, queries, qrels = load_beir(root)
    assert qrels == TINY_QRELS
    assert corpus["d5"] == "Eiffel Tower The Eiffel Tower was finished in 1889."  # title + " " + text, as PyLate
    assert corpus["d1"] == TINY_CORPUS["d1"]  # empty title adds nothing
    assert queries == TINY_QUERIES


def test_load_beir_warns_on_unknown_ids_and_fails_clearly_on_bad_input(tmp_path):
    root = _write_beir(tmp_path / "tiny", TINY_CORPUS, TINY_QUERIES, {**TINY_QRELS, "q1": {"d1": 1, "ghost": 1},
                                                                       "q-missing": {"d1": 1}})
    with pytest.warns(DatasetWarning) as record:
        _, _, qrels = load_beir(root)
    messages = " ".join(str(w.message) for w in record)
    assert "ghost" in messages and "q-missing" in messages
    # BEIR keeps a judged document the corpus lacks: relevant, never retrieved
    assert qrels["q1"] == {"d1": 1, "ghost": 1} and "q-missing" not in qrels

    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td3\thigh\n")
    with pytest.raises(DatasetError, match=r"test\.tsv:2: score 'high'"):
        load_beir(root)
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n')
    with pytest.raises(DatasetError, match=r"corpus\.jsonl:2: not valid JSON"):
        load_beir(root)
    (root / "corpus.jsonl").write_text('{"_id": "d1", "body": "no text field"}\n')
    with pytest.raises(DatasetError, match=r"corpus\.jsonl:1: field 'text'"):
        load_beir(root)
    (root / "corpus.jsonl").unlink()
    with pytest.raises(DatasetError, match="no corpus table"):
        load_beir(root)
    with pytest.raises(DatasetError, match="no qrels for split 'dev'"):
        _write_beir(tmp_path / "other", TINY_CORPUS, TINY_QUERIES, TINY_QRELS)
        load_beir(tmp_path / "other", split="dev")


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_load_nanobeir_parquet_layout(tmp_path, layout):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = {
        "corpus": pa.table({"_id": list(TINY_CORPUS), "text": list(TINY_CORPUS.values())}),
        "queries": pa.table({"_id": list(TINY_QUERIES), "text": list(TINY_QUERIES.values())}),
        # NanoBEIR's qrels list the relevant pairs only, without a score column
        "qrels": pa.table({"query-id": ["q1", "q1", "q2", "q3"], "corpus-id": ["d1", "d3", "d2", "d4"]}),
    }
    root = tmp_path / "NanoTiny"
    for name, table in tables.items():
        # as published on the hub: <table>/train-00000-of-00001.parquet; or one <table>.parquet file
        target = root / name / "train-00000-of-00001.parquet" if layout == "nested" else root / f"{name}.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, target)
    corpus, queries, qrels = load_beir(root)
    assert corpus == TINY_CORPUS and queries == TINY_QUERIES
    assert qrels == {"q1": {"d1": 1, "d3": 1}, "q2": {"d2": 1}, "q3": {"d4": 1}}


def test_subsample_keeps_every_judged_document_and_is_deterministic():
    corpus = {f"d{i}": f"text {i}" for i in range(100)}
    qrels = {"q1": {"d3": 1, "d50": 0}, "q2": {"d99": 2}}
    a = subsample_corpus(corpus, qrels, 10)
    b = subsample_corpus(dict(reversed(list(corpus.items()))), qrels, 10)
    assert len(a) == 10 and set(a) == set(b) and {"d3", "d50", "d99"} <= set(a)
    assert subsample_corpus(corpus, qrels, 1000) == corpus
    with pytest.warns(DatasetWarning, match="judged"):
        assert set(subsample_corpus(corpus, qrels, 2)) == {"d3", "d50", "d99"}


# ------------------------------------------------------------------------------------------------ with a model


@pytest.fixture(scope="module")
def prompted(minilm, tmp_path_factory):
    """MiniLM as a saved PyLate model folder whose config holds query/document prompts, and that model loaded."""
    from pylate import models

    folder = tmp_path_factory.mktemp("model") / "minilm-colbert-prompts"
    models.ColBERT(minilm, device="cpu", prompts={"query": QUERY_PROMPT, "document": DOC_PROMPT}).save(str(folder))
    model = models.ColBERT(str(folder), device="cpu")  # reloaded: the prompts come from the saved config
    assert model.prompts == {"query": QUERY_PROMPT, "document": DOC_PROMPT}
    return str(folder), model


def _record_tokenized(monkeypatch, model) -> list[tuple[bool, list[str]]]:
    """Pass-through wrapper on model.tokenize that records the exact strings the model encodes."""
    seen: list[tuple[bool, list[str]]] = []
    original = model.tokenize

    def tokenize(texts, *args, **kwargs):
        seen.append((kwargs.get("is_query", True), list(texts)))
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(model, "tokenize", tokenize)
    return seen


def _cache_entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("*/*") if p.is_dir() and not p.name.startswith("."))


def test_prompts_come_from_the_model_config_and_can_be_switched_off(prompted, tmp_path, monkeypatch):
    path, model = prompted
    data = _write_beir(tmp_path / "tiny", TINY_CORPUS, TINY_QUERIES, TINY_QRELS)
    cache = tmp_path / "cache"

    seen = _record_tokenized(monkeypatch, model)
    on = evaluate(path, [str(data)], model=model, cache_dir=str(cache), show_progress=False)
    texts = {True: [t for q, batch in seen if q for t in batch],
             False: [t for q, batch in seen if not q for t in batch]}
    query_texts = [t for t in texts[True] if t != QUERY_PROMPT and t != DOC_PROMPT]  # PyLate also tokenizes the prompt
    assert sorted(query_texts) == sorted(QUERY_PROMPT + TINY_QUERIES[q] for q in TINY_QRELS)
    assert sorted(texts[False]) == sorted(DOC_PROMPT + t for t in TINY_CORPUS.values())
    assert on["prompts"] is True and (on["query_prompt"], on["document_prompt"]) == (QUERY_PROMPT, DOC_PROMPT)
    assert on["datasets"]["tiny"]["queries"] == 3 and on["datasets"]["tiny"]["documents"] == 6

    # the cached document embeddings are exactly what a manual encode with the document prompt gives
    (entry,) = _cache_entries(cache)
    docs = DocumentEmbeddings.load(entry)
    manual = model.encode([TINY_CORPUS[d] for d in docs.ids], is_query=False, prompt=DOC_PROMPT)
    for i, emb in enumerate(manual):
        np.testing.assert_allclose(docs.get(i), emb, atol=1e-5)
    q_texts = list(TINY_QUERIES.values())
    q_manual = model.encode(q_texts, is_query=True, prompt=QUERY_PROMPT)
    q_bare = model.encode(q_texts, is_query=True)  # the config's prompts are not applied without prompt_name
    for ours, want, bare in zip(encode_queries(model, q_texts), q_manual, q_bare):
        np.testing.assert_allclose(ours, want, atol=1e-5)
        assert not np.allclose(ours, bare, atol=1e-3)

    seen.clear()
    off = evaluate(path, [str(data)], model=model, cache_dir=str(cache), prompts=False, show_progress=False)
    assert not any(t.startswith((QUERY_PROMPT, DOC_PROMPT)) for _, batch in seen for t in batch)
    assert off["prompts"] is False and off["query_prompt"] is None
    entries = _cache_entries(cache)
    assert len(entries) == 2  # one per document prompt setting
    bare_docs = DocumentEmbeddings.load(next(e for e in entries if "-noprompt-" in e.name))
    assert bare_docs.ids == docs.ids
    assert bare_docs.offsets[-1] < docs.offsets[-1]  # the prompt's tokens are gone
    assert "OFF" in format_table(off) and QUERY_PROMPT in format_table(on)


MSMARCO_QUERIES = 10
MSMARCO_OTHERS = 300


@pytest.fixture(scope="module")
def msmarco_subset(shared_data, tmp_path_factory) -> Path:
    """The 10 msmarco-5k queries with the fewest judgements, all their judged passages plus 300 others (by id
    hash); relevance made binary so PyLate's evaluator (which treats every listed pair as relevant) sees the same."""
    corpus, queries, qrels = load_beir(shared_data / "beir" / "msmarco-5k")
    chosen = sorted(qrels, key=lambda q: (len(qrels[q]), q))[:MSMARCO_QUERIES]
    sub_qrels = {q: {d: int(g > 0) for d, g in qrels[q].items()} for q in chosen}
    judged = {d for q in chosen for d in qrels[q]}
    sub_corpus = subsample_corpus(corpus, sub_qrels, len(judged) + MSMARCO_OTHERS)
    assert all(len(j) <= 100 for j in sub_qrels.values())  # so MAP@100 has one definition on both sides
    return _write_beir(
        tmp_path_factory.mktemp("data") / "msmarco-sub", sub_corpus, {q: queries[q] for q in chosen}, sub_qrels
    )


def test_parity_with_pylate_evaluator_and_cache_hit(prompted, msmarco_subset, tmp_path, monkeypatch):
    from pylate.evaluation import PyLateInformationRetrievalEvaluator
    from pylate.scores import colbert_scores

    path, model = prompted
    cache = tmp_path / "cache"
    ours = evaluate(path, [str(msmarco_subset)], model=model, cache_dir=str(cache), show_progress=False)
    row = ours["datasets"]["msmarco-sub"]
    assert row["queries"] == MSMARCO_QUERIES and row["retrieval"] == "exact"

    corpus, queries, qrels = load_beir(msmarco_subset)
    reference = PyLateInformationRetrievalEvaluator(
        queries=queries,
        corpus=corpus,
        relevant_docs={q: {d for d, g in judged.items() if g > 0} for q, judged in qrels.items()},
        score_functions={"MaxSim": colbert_scores},
        query_prompt_name="query",
        corpus_prompt_name="document",
        mrr_at_k=[10],
        ndcg_at_k=[10],
        precision_recall_at_k=[100],
        map_at_k=[100],
        accuracy_at_k=[1],
        corpus_chunk_size=128,
        batch_size=32,
        write_csv=False,
    )(model)
    theirs = {
        m: next(v for key, v in reference.items() if key.endswith(f"MaxSim_{m}"))
        for m in ("ndcg@10", "mrr@10", "recall@100", "map@100")
    }
    print("parity ours:", {m: round(row[m], 6) for m in theirs}, "pylate:", {m: round(v, 6) for m, v in theirs.items()})
    for m, v in theirs.items():
        assert row[m] == pytest.approx(v, abs=1e-4), m

    # second call: documents come from the cache, nothing is re-encoded, same numbers
    encoded_documents = []
    original = model.encode

    def encode(*args, **kwargs):
        if not kwargs.get("is_query", True):
            encoded_documents.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode", encode)
    again = evaluate(path, [str(msmarco_subset)], model=model, cache_dir=str(cache), show_progress=False)
    assert encoded_documents == [] and again["datasets"] == ours["datasets"]
    assert len(_cache_entries(cache)) == 1


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        evaluate("unused", [str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="index must be"):
        evaluate("unused", [str(tmp_path)], index="faiss")
    (tmp_path / "a" / "same").mkdir(parents=True)
    (tmp_path / "b" / "same").mkdir(parents=True)
    with pytest.raises(ValueError, match="repeat"):
        evaluate("unused", [str(tmp_path / "a" / "same"), str(tmp_path / "b" / "same")])


def test_index_backend_needs_its_package():
    from importlib.util import find_spec

    from colbertzero.evaluate import EXACT_MAX_DOCS, choose_backend

    assert choose_backend("auto", 10) == "exact" and choose_backend("exact", 10**7) == "exact"
    if find_spec("voyager") is None:
        with pytest.raises(ImportError, match="pip install voyager"):
            choose_backend("voyager", 10)
    if find_spec("voyager") is None and find_spec("fast_plaid") is None:
        with pytest.raises(ImportError, match="index='exact'"):
            choose_backend("auto", EXACT_MAX_DOCS + 1)


@pytest.mark.parametrize("backend,package", [("voyager", "voyager"), ("plaid", "fast_plaid")])
def test_index_backends_find_what_exact_search_finds(prompted, tmp_path, backend, package):
    pytest.importorskip(package, reason=f"index={backend!r} needs the optional {package} package")
    path, model = prompted
    data = _write_beir(tmp_path / "tiny", TINY_CORPUS, TINY_QUERIES, TINY_QRELS)
    kwargs = dict(model=model, cache_dir=str(tmp_path / "cache"), show_progress=False)
    exact = evaluate(path, [str(data)], index="exact", **kwargs)["datasets"]["tiny"]
    indexed = evaluate(path, [str(data)], index=backend, **kwargs)["datasets"]["tiny"]
    assert indexed["retrieval"] == backend
    for m in ("ndcg@10", "mrr@10", "recall@100", "map@100"):  # six documents: any index sees them all
        assert indexed[m] == pytest.approx(exact[m], abs=1e-4)


# ------------------------------------------------------------------------------------------------ BEIR-exact figures
def _pytrec_from_files(run_file: Path, qrels_file: Path) -> dict[str, float]:
    """The figures BEIR's EvaluateRetrieval reports, computed straight from the files with pytrec_eval: its run
    (identical ids already dropped by the run's writer and checked below), its qrels, MRR@10 on the top 10."""
    import pytrec_eval

    run: dict[str, dict[str, float]] = {}
    for line in run_file.read_text().splitlines():
        q, _, d, _rank, score, _tag = line.split()
        run.setdefault(q, {})[d] = float(score)
    qrels: dict[str, dict[str, int]] = {}
    for line in qrels_file.read_text().splitlines():
        q, d, g = line.split("\t")
        if g.strip().isdigit():  # else BEIR's "query-id corpus-id score" header
            qrels.setdefault(q, {})[d] = int(g)
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "map_cut.100"}).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]) for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    mean = lambda key, table: sum(v[key] for v in table.values()) / len(table)  # noqa: E731
    return {"ndcg@10": mean("ndcg_cut_10", ev), "recall@100": mean("recall_100", ev),
            "map@100": mean("map_cut_100", ev), "mrr@10": mean("recip_rank", rr), "queries": len(ev)}


def test_figures_equal_pytrec_eval_on_the_saved_runs(prompted, msmarco_subset, tmp_path):
    path, model = prompted
    ours = evaluate(path, [str(msmarco_subset)], model=model, cache_dir=str(tmp_path / "cache"),
                    show_progress=False, runs_dir=tmp_path / "runs")
    row = ours["datasets"]["msmarco-sub"]
    run_file = tmp_path / "runs" / "msmarco-sub.trec"
    ref = _pytrec_from_files(run_file, msmarco_subset / "qrels" / "test.tsv")
    assert ref["queries"] == row["queries"] == MSMARCO_QUERIES
    for m in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
        assert row[m] == pytest.approx(ref[m], abs=1e-12), m
    assert len(run_file.read_text().splitlines()) == MSMARCO_QUERIES * 100  # every query's top 100, TREC format


def test_beir_conventions_identical_ids_and_unjudged_documents(prompted, tmp_path):
    """A query listed as a document of its own id (ArguAna, Quora) is not its own hit; a judged document missing from
    the corpus counts as relevant and never retrieved; unjudged documents count as not relevant."""
    path, model = prompted
    corpus = {**TINY_CORPUS, "q1": TINY_QUERIES["q1"]}  # the query itself, under its own id: the perfect match
    qrels = {"q1": {"d1": 1, "gone": 1}, "q2": {"d2": 1}, "q3": {"d4": 1}}
    root = _write_beir(tmp_path / "beirish", corpus, TINY_QUERIES, qrels, header=True)
    with pytest.warns(DatasetWarning, match="gone"):
        ours = evaluate(path, [str(root)], model=model, cache_dir=str(tmp_path / "cache"), show_progress=False,
                        runs_dir=tmp_path / "runs")
    row = ours["datasets"]["beirish"]
    run_lines = (tmp_path / "runs" / "beirish.trec").read_text().splitlines()
    assert not any(line.split()[0] == line.split()[2] for line in run_lines)  # q1 never retrieves q1
    ref = _pytrec_from_files(tmp_path / "runs" / "beirish.trec", root / "qrels" / "test.tsv")
    for m in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
        assert row[m] == pytest.approx(ref[m], abs=1e-12), m
    assert row["recall@100"] < 1.0  # "gone" can never be found: q1's recall is at most 1/2


def test_a_fused_teacher_ranks_the_union_of_its_members_top_100_by_their_standardised_scores(
        minilm, msmarco_subset, tmp_path, capsys):
    """`evaluate --teacher minilm,bm25`: each member's top-100 pooled (BM25's: documents sharing a term with the
    query), every member scores the pool, the mean of per-query z-scores orders it — recomputed here with
    sentence-transformers and bm25s directly."""
    import bm25s
    from sentence_transformers import SentenceTransformer

    from colbertzero.cli import main
    from colbertzero.evaluate.metrics import read_trec_run

    assert main(["evaluate", "minilm,bm25", "--teacher", "--beir", str(msmarco_subset), "--runs-dir",
                 str(tmp_path / "runs"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "teacher" and result["fusion"] == "zsum"
    run = read_trec_run(tmp_path / "runs" / "msmarco-sub.trec")

    corpus, queries, qrels = load_beir(msmarco_subset)
    ids, texts = list(corpus), list(corpus.values())
    st = SentenceTransformer(minilm, device="cpu")
    d = st.encode(texts, normalize_embeddings=True)
    index = bm25s.BM25(k1=0.9, b=0.4)
    index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    for q in qrels:
        dense = d @ st.encode([queries[q]], normalize_embeddings=True)[0]
        terms = bm25s.tokenize([queries[q]], stopwords="en", show_progress=False)
        inverse = {v: k for k, v in terms.vocab.items()}
        lexical = index.get_scores([inverse[t] for t in terms.ids[0]])
        matching = [i for i in np.argsort(-lexical, kind="stable")[:100] if lexical[i] > 0]  # a term in common
        pool = sorted({int(i) for i in np.argsort(-dense, kind="stable")[:100]} | {int(i) for i in matching})
        z = [(s[pool] - s[pool].mean()) / s[pool].std() for s in (dense, lexical)]
        fused = (z[0] + z[1]) / 2
        want = [ids[pool[i]] for i in np.argsort(-fused, kind="stable")[:10]]
        got = sorted(run[q], key=lambda doc: -run[q][doc])[:10]
        assert got == want, q
    assert result["datasets"]["msmarco-sub"]["ndcg@10"] == pytest.approx(
        compute_metrics(run, qrels, ("ndcg@10",))["ndcg@10"])
