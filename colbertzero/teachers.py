"""Teacher scores as distillation targets: how sharp the target a teacher's scores make is, the scale that puts
similarities and probabilities on the loss's scale, and the fusion of several teachers into one.

The distillation loss (PyLate's, `train/losses.py`) compares softmax(teacher scores) with softmax(the student's
MaxSim, min-max normalised per query): the student's scores always span exactly 1, the teacher's are used as given.
A cosine teacher spans ~0.1, so its softmax is nearly uniform and the student is taught to flatten its ranking; a
reranker's logits (the paper's teacher) span ~10 and need nothing. docs/own-data.md, "Pick and check a teacher".
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq

# A target whose mean top-1 probability is under this many times uniform's (1/candidates) teaches next to nothing.
NEAR_UNIFORM = 1.25
FUSIONS = ("zsum", "rrf")
RRF_K = 60  # reciprocal-rank fusion's constant (Cormack et al., 2009)
# The fitted scale's bounds, as a span of the median query's scores: below 1 the target is flatter than any the
# student can reach; above 30 it is a one-hot on the top candidate (every other candidate's probability < e⁻³⁰).
SPAN_BOUNDS = (1.0, 30.0)
# What --scale auto means: the scale at which the median query's teacher scores span 1, as the student's normalised
# scores do, so the target is one the student can match exactly (ranking and spacing). Measured against the raw
# scores, `labels`, span:3 and span:10 in tools/bench/quality.py (docs/performance.md): it distilled best.
AUTO = "span:1"


def _softmax_rows(scores: list[list[float]], scale: float) -> list[np.ndarray]:
    out = []
    for s in scores:
        x = scale * np.asarray(s, dtype=np.float64)
        e = np.exp(x - x.max())
        out.append(e / e.sum())
    return out


def sharpness(scores: list[list[float]], scale: float = 1.0) -> dict:
    """How peaked softmax(scale · scores) is, per query then averaged: ``top1`` (mean probability of the best
    candidate), ``uniform`` (mean 1/candidates: what top1 is for a target that says nothing), ``entropy`` (mean
    entropy over log(candidates): 1 is uniform, 0 one-hot), ``span`` (median of max − min of the scaled scores)."""
    rows = [s for s in scores if len(s) > 1]
    if not rows:
        return {"queries": 0, "top1": None, "uniform": None, "entropy": None, "span": None}
    probs = _softmax_rows(rows, scale)
    top1 = float(np.mean([p.max() for p in probs]))
    uniform = float(np.mean([1.0 / len(p) for p in probs]))
    entropy = float(np.mean([-(p * np.log(np.clip(p, 1e-300, None))).sum() / math.log(len(p)) for p in probs]))
    span = float(np.median([scale * (max(s) - min(s)) for s in rows]))
    return {"queries": len(rows), "top1": round(top1, 4), "uniform": round(uniform, 4), "entropy": round(entropy, 4),
            "span": round(span, 4)}


def near_uniform(stats: dict) -> bool:
    return stats.get("top1") is not None and stats["top1"] < NEAR_UNIFORM * stats["uniform"]


def span_scale(scores: list[list[float]], span: float) -> tuple[float, dict]:
    """The scale at which the median query's scores span ``span``: 1 is the student's own span (its MaxSim scores
    are min-max normalised), so its softmax can match the target exactly; larger is sharper."""
    spans = [max(s) - min(s) for s in scores if len(s) > 1 and max(s) > min(s)]
    if not spans:
        return 1.0, {"rule": f"span:{span:g}", "reason": "no query with two different scores: kept as given"}
    median = float(np.median(spans))
    return float(f"{span / median:.6g}"), {"rule": f"span:{span:g}", "median_raw_span": round(median, 6)}


def resolve_scale(rule: str, scores: list[list[float]]) -> tuple[float, dict]:
    """``rule``: ``labels`` (`fit_scale`), ``span:X`` (`span_scale`), ``auto`` (AUTO) or a positive number."""
    if rule == "auto":
        scale, how = resolve_scale(AUTO, scores)
        return scale, {**how, "auto": True}
    if rule == "labels":
        return fit_scale(scores)
    if rule.startswith("span:"):
        return span_scale(scores, float(rule[5:]))
    return float(rule), {"rule": "fixed"}


def check_scale(rule: str) -> str | None:
    """What is wrong with a ``--scale`` value, or None."""
    if rule in ("auto", "labels"):
        return None
    text = rule[5:] if rule.startswith("span:") else rule
    try:
        ok = math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        ok = False
    return None if ok else (f"--scale {rule!r}: auto, labels, span:X (X > 0) or a positive number (1 keeps the "
                            f"teacher's scores as they are)")


def fit_scale(scores: list[list[float]]) -> tuple[float, dict]:
    """The temperature scaling of a classifier's logits (Guo et al., 2017) applied to the teacher: the scale ``a``
    that maximises the mean log-probability softmax(a · scores) gives the labelled positive, which `score`'s input
    puts first (the supervised layout's ``document``, then its negatives). The log-likelihood is concave in ``a``;
    its derivative, mean(s₀ − E_a[s]), falls as ``a`` grows, so its one root is bracketed (scipy's brentq). Bounded
    so the median query's scores span between SPAN_BOUNDS (a teacher that always ranks the positive first has no
    finite optimum: it gets the upper bound). Returns (scale, how it was chosen)."""
    rows = [np.asarray(s, dtype=np.float64) for s in scores if len(s) > 1 and max(s) > min(s)]
    if not rows:
        return 1.0, {"rule": "labels", "reason": "no query with two different scores: kept as given"}
    median_span = float(np.median([r.max() - r.min() for r in rows]))
    lo, hi = SPAN_BOUNDS[0] / median_span, SPAN_BOUNDS[1] / median_span

    def slope(a: float) -> float:  # d/da of the mean log-likelihood of the first candidate
        total = 0.0
        for r in rows:
            e = np.exp(a * (r - r.max()))
            total += r[0] - float((e * r).sum() / e.sum())
        return total / len(rows)

    if slope(hi) >= 0:
        a, bound = hi, "upper"
    elif slope(lo) <= 0:
        a, bound = lo, "lower"
    else:
        a, bound = brentq(slope, lo, hi, xtol=1e-12, rtol=1e-10), None
    info = {"rule": "labels", "positive": "first candidate", "median_raw_span": round(median_span, 6)}
    if bound:
        info["bound"] = f"{bound} (the median query's scaled scores span {SPAN_BOUNDS[0 if bound == 'lower' else 1]})"
    return float(f"{a:.6g}"), info


def fuse(members: list[list[list[float]]], how: str) -> list[list[float]]:
    """One score per candidate from several teachers' (``members[t][query][candidate]``), per query:

    - ``zsum``: the mean over teachers of each teacher's standardised scores (minus the query's mean, over their
      standard deviation; a teacher that scores all of a query's candidates alike adds 0) — scales differ by kind
      (BM25 ~10, cosines ~0.1), their order within a query is what each knows;
    - ``rrf``: reciprocal-rank fusion, Σ over teachers of 1 / (RRF_K + rank), rank 1 the teacher's best (ties
      broken by candidate order)."""
    if how not in FUSIONS:
        raise ValueError(f"fusion {how!r}: one of {', '.join(FUSIONS)}")
    out = []
    for per_teacher in zip(*members):
        mats = [np.asarray(s, dtype=np.float64) for s in per_teacher]
        if how == "zsum":
            z = [(m - m.mean()) / m.std() if m.std() > 0 else np.zeros_like(m) for m in mats]
            fused = np.mean(z, axis=0)
        else:
            fused = np.zeros(len(mats[0]))
            for m in mats:
                order = sorted(range(len(m)), key=lambda i: (-m[i], i))
                for rank, i in enumerate(order, start=1):
                    fused[i] += 1.0 / (RRF_K + rank)
        out.append([float(x) for x in fused])
    return out
