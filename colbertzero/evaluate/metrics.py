"""Retrieval metrics: pytrec_eval (the trec_eval bindings BEIR reports through) with BEIR's conventions.

- nDCG@k = trec_eval's ndcg_cut.k (graded, linear gains; the ideal ranking from every judged document, retrieved or
  not), recall@k = recall.k, MAP@k = map_cut.k (divided by all relevant documents of the query).
- MRR@k = trec_eval's recip_rank on the run cut to its first k documents, which is how BEIR computes it. The cut uses
  trec_eval's own order: score descending, ties by document id descending (`rank`).
- BEIR's `ignore_identical_ids` (its default): a retrieved document whose id equals the query's is dropped before
  scoring (ArguAna, Quora list each query as a document too).
- Which queries count: every query with a judgement (all-zero judgements score 0, as in trec_eval). pytrec_eval
  skips a judged query missing from the run; here it counts as 0, so dropping queries can never raise a score (runs
  of `evaluate` hold every judged query, so this never changes a figure there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytrec_eval

from ..files import atomic_write_bytes

METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")
_NAME = re.compile(r"(ndcg|mrr|recall|map)@([1-9][0-9]*)")
_TREC = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut"}


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; a clear error for anything else."""
    m = _NAME.fullmatch(name.strip().lower())
    if not m:
        raise ValueError(f"unknown metric {name!r}: use ndcg@K, mrr@K, recall@K or map@K (K a positive integer)")
    return m.group(1), int(m.group(2))


def max_cutoff(metrics: Iterable[str] = METRICS) -> int:
    """How many documents per query a run must hold for these metrics."""
    return max(parse_metric(m)[1] for m in metrics)


def rank(scores: Mapping[str, float]) -> list[str]:
    """Document ids in trec_eval order: score descending, ties by document id descending."""
    return [d for d, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def without_identical_ids(run: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """BEIR's ignore_identical_ids: drop each query's own id from its retrieved documents."""
    return {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}


def compute_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    metrics: Iterable[str] = METRICS,
    *,
    ignore_identical_ids: bool = True,
) -> dict[str, float | int]:
    """Mean of each metric over the judged queries, plus ``"queries"``: how many were averaged.

    ``run``: query id -> {doc id: score}; ``qrels``: query id -> {doc id: grade}. Run entries for queries without
    judgements are ignored. With no judged query at all every metric is 0.0 and ``queries`` is 0.
    """
    metrics = tuple(metrics)
    per_query = per_query_metrics(run, qrels, metrics, ignore_identical_ids=ignore_identical_ids)
    n = len(per_query)
    result: dict[str, float | int] = {m: (sum(v[m] for v in per_query.values()) / n if n else 0.0) for m in metrics}
    result["queries"] = n
    return result


def per_query_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    metrics: Iterable[str] = METRICS,
    *,
    ignore_identical_ids: bool = True,
) -> dict[str, dict[str, float]]:
    """Every judged query's metrics (a judged query the run misses scores 0): what `compute_metrics` averages."""
    metrics = tuple(metrics)
    parsed = {m: parse_metric(m) for m in metrics}
    judged = {q: {d: int(g) for d, g in j.items()} for q, j in qrels.items() if j}
    if ignore_identical_ids:
        run = without_identical_ids(run)
    run = {q: {d: float(s) for d, s in run.get(q, {}).items()} for q in judged}
    per_query = {q: dict.fromkeys(metrics, 0.0) for q in judged}
    full = {_TREC[kind] + f".{k}" for kind, k in parsed.values() if kind != "mrr"}
    if full:
        scored = pytrec_eval.RelevanceEvaluator(judged, full).evaluate(run)
        for q, values in scored.items():
            for m, (kind, k) in parsed.items():
                if kind != "mrr":
                    per_query[q][m] = values[f"{_TREC[kind]}_{k}"]
    for m, (kind, k) in parsed.items():
        if kind == "mrr":
            cut = {q: {d: docs[d] for d in rank(docs)[:k]} for q, docs in run.items()}
            for q, values in pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(cut).items():
                per_query[q][m] = values["recip_rank"]
    return per_query


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """A TREC run file (``qid Q0 docid rank score tag``) as query id -> {doc id: score}."""
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ValueError(f"{path}: line {n} has {len(parts)} fields; a TREC run line has 6 "
                                 f"(qid Q0 docid rank score tag)")
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
    return run


def query_metrics(ranking: list[str], judged: Mapping[str, int], metrics: Iterable[str] = METRICS) -> dict[str, float]:
    """Every metric for one query, ``ranking`` best first (as :func:`rank` orders a run)."""
    metrics = tuple(metrics)
    scores = {d: float(len(ranking) - i) for i, d in enumerate(ranking)}
    out = compute_metrics({"q": scores}, {"q": dict(judged)}, metrics, ignore_identical_ids=False)
    return {m: out[m] for m in metrics}


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: Path, tag: str) -> Path:
    """``qid Q0 docid rank score tag`` lines, each query's documents in trec_eval's order; written atomically."""
    lines = [f"{q} Q0 {d} {i + 1} {run[q][d]!r} {tag}" for q in run for i, d in enumerate(rank(run[q]))]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
