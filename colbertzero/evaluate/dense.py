"""The dense baseline: a sentence-transformers encoder scored exactly as `evaluate` scores a ColBERT (same loading,
subsample, top-100, BEIR's identical-id rule, pytrec_eval), with exact cosine search instead of MaxSim. The figure a
ColBERT trained from that encoder has to beat."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..retrieval import Model, ModelSpec
from .beir import load_beir, subsample_corpus
from .metrics import METRICS, compute_metrics, max_cutoff, without_identical_ids


def evaluate_dense(model: str, datasets: list[str], *, batch_size: int = 64, max_corpus: int | None = None) -> dict:
    """``{"model", "datasets": {name: {metric: value, "queries", "documents"}}, "average": {metric: value}}``;
    ``model`` as `mine` takes it (``minilm``, ``dense:PATH``)."""
    encoder = Model(ModelSpec.parse(model, "dense model"), batch_size=batch_size)
    if encoder.spec.kind != "dense":
        raise ValueError(f"{model}: a dense encoder (minilm, dense:PATH)")
    out = {}
    for path in map(Path, datasets):
        corpus, queries, qrels = load_beir(path)
        corpus = subsample_corpus(corpus, qrels, max_corpus)
        ids, texts = list(corpus), list(corpus.values())
        qids = list(qrels)
        index, scores = encoder.retrieve([queries[q] for q in qids], texts, max_cutoff(METRICS))
        run = {q: {ids[int(i)]: float(s) for i, s in zip(index[r], scores[r])} for r, q in enumerate(qids)}
        m = compute_metrics(without_identical_ids(run), qrels, METRICS, ignore_identical_ids=False)
        out[path.resolve().name] = {**{k: float(m[k]) for k in METRICS}, "queries": int(m["queries"]),
                                    "documents": len(corpus)}
    return {"model": str(encoder.spec), "datasets": out,
            "average": {k: float(np.mean([r[k] for r in out.values()])) for k in METRICS}}
