"""Two systems on the same queries: wins / ties / losses and a paired bootstrap 95 % interval of the mean difference
(Efron & Tibshirani; scipy's `bootstrap` over the per-query differences), so that a difference inside the noise of
a small set (43 judged queries on msmarco-5k) is never read as a gain."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.stats import bootstrap

RESAMPLES = 10_000
TIE = 1e-9  # per-query metric values closer than this are a tie


def paired(before: Mapping[str, float], after: Mapping[str, float], *, seed: int = 0) -> dict:
    """``after − before`` over the queries both hold: ``queries``, ``mean`` (difference of the means), ``wins`` /
    ``ties`` / ``losses`` (queries where ``after`` is higher / equal / lower), ``ci95`` (the percentile interval of
    the resampled mean difference, seeded) and ``significant`` (the interval excludes 0)."""
    common = sorted(set(before) & set(after))
    d = np.asarray([after[q] - before[q] for q in common], dtype=np.float64)
    out = {"queries": len(common), "mean": float(d.mean()) if len(d) else 0.0,
           "wins": int((d > TIE).sum()), "ties": int((np.abs(d) <= TIE).sum()), "losses": int((d < -TIE).sum())}
    if len(d) < 2 or np.all(np.abs(d - d[0]) <= TIE):  # nothing to resample: the interval is the point
        out["ci95"] = [out["mean"], out["mean"]]
    else:
        r = bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=RESAMPLES, method="percentile",
                      random_state=np.random.default_rng(seed))
        out["ci95"] = [float(r.confidence_interval.low), float(r.confidence_interval.high)]
    out["significant"] = bool(out["ci95"][0] > 0 or out["ci95"][1] < 0)
    return out


def paired_line(c: dict, scale: float = 100.0) -> str:
    """``+1.23 [−0.40, +2.90] 20/15/8 w/t/l`` (scaled: nDCG in points)."""
    lo, hi = (scale * x for x in c["ci95"])
    mark = "" if c["significant"] else " (inside the noise)"
    return f"{scale * c['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] {c['wins']}/{c['ties']}/{c['losses']} w/t/l{mark}"
