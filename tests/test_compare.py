"""Paired comparisons (`evaluate/compare.py`) against what is known without it: counts by hand, a constant difference,
and the interval width the central limit theorem predicts; per-query metrics read back from a TREC run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from colbertzero.evaluate.compare import paired, paired_line
from colbertzero.evaluate.metrics import compute_metrics, per_query_metrics, read_trec_run, write_trec_run


def test_counts_and_a_constant_difference():
    before = {"a": 0.5, "b": 0.2, "c": 0.7, "d": 0.1}
    after = {"a": 0.6, "b": 0.2, "c": 0.4, "d": 0.3, "only-after": 1.0}  # a query one side lacks is not compared
    c = paired(before, after)
    assert (c["queries"], c["wins"], c["ties"], c["losses"]) == (4, 2, 1, 1)
    assert c["mean"] == pytest.approx((0.1 + 0 - 0.3 + 0.2) / 4)
    same = paired({"a": 0.1, "b": 0.2}, {"a": 0.15, "b": 0.25})  # every query +0.05: no spread to resample
    assert same["ci95"] == pytest.approx([0.05, 0.05]) and same["significant"]
    assert "+5.00 [+5.00, +5.00] 2/0/0" in paired_line(same)


def test_the_interval_has_the_width_the_normal_approximation_gives():
    rng = np.random.default_rng(7)
    n, sigma = 400, 0.2
    before = {str(i): float(v) for i, v in enumerate(rng.uniform(0, 1, n))}
    after = {q: v + 0.01 + float(rng.normal(0, sigma)) for q, v in before.items()}
    c = paired(before, after)
    d = np.array([after[q] - before[q] for q in before])
    width = 2 * 1.96 * d.std() / math.sqrt(n)
    assert c["ci95"][1] - c["ci95"][0] == pytest.approx(width, rel=0.15)
    assert c["ci95"][0] < c["mean"] < c["ci95"][1]
    assert not c["significant"] and "inside the noise" in paired_line(c)  # +0.01 in noise of 0.2/√400 = 0.01


def test_per_query_metrics_average_to_the_reported_figure_and_survive_a_trec_file(tmp_path):
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 2, "d4": 1}, "q3": {"d9": 1}}
    run = {"q1": {"d1": 0.9, "d2": 0.8}, "q2": {"d4": 0.7, "d3": 0.5, "d1": 0.1}}  # q3 not retrieved: counts as 0
    per = per_query_metrics(run, qrels, ("ndcg@10",))
    assert per["q1"]["ndcg@10"] == pytest.approx(1.0) and per["q3"]["ndcg@10"] == 0.0
    # q2: gains 1 at rank 1, 2 at rank 2 (linear, trec_eval); ideal 2 then 1
    dcg, ideal = 1 + 2 / math.log2(3), 2 + 1 / math.log2(3)
    assert per["q2"]["ndcg@10"] == pytest.approx(dcg / ideal, rel=1e-6)
    assert compute_metrics(run, qrels, ("ndcg@10",))["ndcg@10"] == pytest.approx(
        sum(v["ndcg@10"] for v in per.values()) / 3)
    back = read_trec_run(write_trec_run(run, tmp_path / "r.trec", tag="t"))
    assert per_query_metrics(back, qrels, ("ndcg@10",)) == per
    (tmp_path / "bad.trec").write_text("q1 Q0 d1 1\n")
    with pytest.raises(ValueError, match="bad.trec: line 1 has 4 fields"):
        read_trec_run(tmp_path / "bad.trec")
