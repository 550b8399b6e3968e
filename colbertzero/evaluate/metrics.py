"""Retrieval metrics with trec_eval semantics (what BEIR reports through pytrec_eval, and PyLate through ranx).

- Ranking: a query's documents sorted by score, highest first; equal scores are ordered by document id, highest
  first (trec_eval's rule), so a run scores the same whatever order its dict was built in.
- nDCG@k: graded gains (the judgement itself, linear as in trec_eval's ndcg_cut; negative judgements gain 0),
  discount log2(rank + 1); the ideal ranking is built from every judged document, retrieved or not.
- MRR@k, recall@k, MAP@k: binary, a document is relevant when its judgement is > 0. MAP@k divides by all relevant
  documents of the query (trec_eval's map_cut), not by min(k, relevant) as sentence-transformers does.
- Which queries count: every query with at least one judgement (any value, 0 included). One whose judgements are all
  0 scores 0 on every metric, as in trec_eval. Queries without judgements are skipped; a judged query missing from the
  run counts as an empty ranking (0), so dropping queries can never raise a score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")
_NAME = re.compile(r"(ndcg|mrr|recall|map)@([1-9][0-9]*)")


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


def query_metrics(ranking: list[str], judged: Mapping[str, int], metrics: Iterable[str] = METRICS) -> dict[str, float]:
    """Every metric for one query: ``ranking`` as returned by :func:`rank`, ``judged`` its qrels (doc id -> grade)."""
    n_relevant = sum(1 for g in judged.values() if g > 0)
    out: dict[str, float] = {}
    for name in metrics:
        kind, k = parse_metric(name)
        top = ranking[:k]
        if kind == "ndcg":
            dcg = sum(max(judged.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(top))
            ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
            idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
            out[name] = dcg / idcg if idcg > 0 else 0.0
        elif kind == "mrr":
            out[name] = next((1.0 / (i + 1) for i, d in enumerate(top) if judged.get(d, 0) > 0), 0.0)
        elif kind == "recall":
            hits = sum(1 for d in top if judged.get(d, 0) > 0)
            out[name] = hits / n_relevant if n_relevant else 0.0
        else:  # map
            hits, total = 0, 0.0
            for i, d in enumerate(top):
                if judged.get(d, 0) > 0:
                    hits += 1
                    total += hits / (i + 1)
            out[name] = total / n_relevant if n_relevant else 0.0
    return out


def compute_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    metrics: Iterable[str] = METRICS,
) -> dict[str, float | int]:
    """Mean of each metric over the judged queries, plus ``"queries"``: how many were averaged.

    ``run``: query id -> {doc id: score}; ``qrels``: query id -> {doc id: grade}. Run entries for queries without
    judgements are ignored. With no judged query at all every metric is 0.0 and ``queries`` is 0.
    """
    metrics = tuple(metrics)
    for name in metrics:
        parse_metric(name)
    totals = dict.fromkeys(metrics, 0.0)
    n = 0
    for qid, judged in qrels.items():
        if not judged:
            continue
        per_query = query_metrics(rank(run.get(qid, {})), judged, metrics)
        for name, value in per_query.items():
            totals[name] += value
        n += 1
    result: dict[str, float | int] = {name: (total / n if n else 0.0) for name, total in totals.items()}
    result["queries"] = n
    return result
