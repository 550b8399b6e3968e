"""Baselines and teachers as retrievers: a dense encoder, BM25, a ColBERT export, or several fused as `score` fuses
them, scored exactly as `evaluate` scores a ColBERT (same loading, subsample, top-100, BEIR's identical-id rule,
pytrec_eval). The dense figure is the one a ColBERT trained from that encoder has to beat; a teacher's is what
distillation can at best pass on.

One model ranks the corpus itself (exact cosine or MaxSim search, BM25). Several: each that can rank a corpus gives
its top-100, every model scores the union, and `teachers.fuse` orders it — the reranking a fused teacher's
scores stand for (a cross-encoder scores that union, it never ranks a corpus)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..retrieval import Model, ModelSpec, ModelSpecError
from ..teachers import fuse
from .beir import load_beir, subsample_corpus
from .metrics import METRICS, compute_metrics, max_cutoff, without_identical_ids, write_trec_run


def evaluate_dense(model: str, datasets: list[str], *, batch_size: int = 64, max_corpus: int | None = None,
                   runs_dir: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> dict:
    """``{"model", "datasets": {name: {metric: value, "queries", "documents"}}, "average": {metric: value}}``;
    ``model`` as `mine` takes it (``minilm``, ``dense:PATH``)."""
    if ModelSpec.parse(model, "dense model").kind != "dense":
        raise ValueError(f"{model}: a dense encoder (minilm, dense:PATH)")
    return evaluate_teacher(model, datasets, batch_size=batch_size, max_corpus=max_corpus, runs_dir=runs_dir,
                            cache=cache)


def evaluate_teacher(teacher: str, datasets: list[str], *, fusion: str = "zsum", batch_size: int = 64,
                     max_corpus: int | None = None, runs_dir: str | os.PathLike | None = None,
                     cache: str | os.PathLike | None = None) -> dict:
    """As `evaluate_dense`, for ``teacher`` as `score --teacher` takes it (one model or several, comma-separated);
    ``runs_dir``: each dataset's run as ``<dataset>.trec``; ``cache``: a folder that keeps corpus encodings."""
    models = [Model(s, batch_size=batch_size) for s in ModelSpec.parse_list(teacher, "teacher")]
    retrievers = [m for m in models if m.spec.kind != "cross-encoder"]
    if not retrievers:
        raise ModelSpecError(f"teacher {teacher!r}: cross-encoders only rerank; add a model that ranks a corpus "
                             f"(bm25, minilm, …)")
    k = max_cutoff(METRICS)
    cache_dir = Path(cache) if cache is not None else None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for path in map(Path, datasets):
        corpus, queries, qrels = load_beir(path)
        corpus = subsample_corpus(corpus, qrels, max_corpus)
        ids, texts = list(corpus), list(corpus.values())
        qids = list(qrels)
        qtexts = [queries[q] for q in qids]
        if len(models) == 1:
            index, scores = models[0].retrieve(qtexts, texts, k, cache=cache_dir)
            run = {q: {ids[int(i)]: float(s) for i, s in zip(index[r], scores[r])} for r, q in enumerate(qids)}
        else:
            hits = []
            for m in retrievers:
                index, scores = m.retrieve(qtexts, texts, k, cache=cache_dir)
                # BM25 "retrieves" a document only when they share a term: its zero-score filler is arbitrary
                hits.append([[int(i) for i, s in zip(ix, sc) if m.spec.kind != "bm25" or s > 0]
                             for ix, sc in zip(index, scores)])
            cands = [sorted({i for h in hits for i in h[r]}) for r in range(len(qids))]
            docs = [[texts[i] for i in c] for c in cands]
            idf = texts if any(m.spec.kind == "bm25" for m in models) else None
            fused = fuse([m.score(qtexts, docs, idf_corpus=idf) for m in models], fusion)
            run = {q: dict(sorted(((ids[i], s) for i, s in zip(cands[r], fused[r])), key=lambda x: -x[1])[:k])
                   for r, q in enumerate(qids)}
        run = without_identical_ids(run)
        name = path.resolve().name
        if runs_dir is not None:
            write_trec_run(run, Path(runs_dir) / f"{name}.trec", tag=name)
        m = compute_metrics(run, qrels, METRICS, ignore_identical_ids=False)
        out[name] = {**{key: float(m[key]) for key in METRICS}, "queries": int(m["queries"]), "documents": len(corpus)}
    return {"model": ",".join(str(m.spec) for m in models), "kind": "teacher",
            "fusion": fusion if len(models) > 1 else None,
            "datasets": out, "average": {key: float(np.mean([r[key] for r in out.values()])) for key in METRICS}}
