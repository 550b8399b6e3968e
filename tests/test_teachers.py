"""Teacher targets (`colbertzero/teachers.py`): sharpness, the fitted scale and fusion against answers worked out by
hand, and `score`'s refusals and warning."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colbertzero.cli import main
from colbertzero.mining import ScoreSpec
from colbertzero.retrieval import ModelSpecError
from colbertzero.teachers import SPAN_BOUNDS, fit_scale, fuse, near_uniform, sharpness


def test_sharpness_of_targets_whose_answer_is_known():
    # all equal: uniform, entropy 1; [ln 3, 0]: softmax (3/4, 1/4)
    s = sharpness([[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0]])
    assert s["queries"] == 2
    assert s["top1"] == pytest.approx((0.25 + 0.75) / 2, abs=1e-4)
    assert s["uniform"] == pytest.approx((0.25 + 0.5) / 2, abs=1e-4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert s["entropy"] == pytest.approx((1.0 + h) / 2, abs=1e-4)
    assert s["span"] == pytest.approx(math.log(3) / 2, abs=1e-4)  # median of 0 and ln 3
    # the scale multiplies the scores before the softmax: [ln 3, 0] × 2 → (9/10, 1/10)
    assert sharpness([[math.log(3), 0.0]], scale=2.0)["top1"] == pytest.approx(0.9, abs=1e-4)


def test_cosines_make_a_near_uniform_target_and_a_sharp_one_does_not():
    cosines = [[0.52, 0.52, 0.47, 0.45, 0.44, 0.43, 0.41, 0.40]]  # the example: one query's 8 candidates
    assert near_uniform(sharpness(cosines))
    assert not near_uniform(sharpness(cosines, scale=40.0))


def test_fitted_scale_is_the_maximum_likelihood_temperature():
    # Two candidates, the positive first. In 3 of 4 queries the teacher prefers it by 1, in 1 of 4 the other by 1.
    # Likelihood: (3/4)·log σ(a) + (1/4)·log σ(−a), maximal where σ(a) = 3/4: a = ln 3.
    rows = [[1.0, 0.0]] * 3 + [[0.0, 1.0]]
    scale, how = fit_scale(rows)
    assert scale == pytest.approx(math.log(3), rel=1e-5)
    assert how["rule"] == "labels" and "bound" not in how
    # the same with every score ×10: the temperature absorbs the units
    assert fit_scale([[10 * x for x in r] for r in rows])[0] == pytest.approx(math.log(3) / 10, rel=1e-5)


def test_a_teacher_always_right_gets_the_upper_bound_and_says_so():
    scale, how = fit_scale([[0.6, 0.5, 0.4]] * 5)  # span 0.2, positive always first: no finite optimum
    assert scale == pytest.approx(SPAN_BOUNDS[1] / 0.2, rel=1e-5) and how["bound"].startswith("upper")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=6), min_size=1, max_size=12))
def test_the_fitted_scale_stays_within_its_bounds(rows):
    scale, _ = fit_scale(rows)
    spans = [max(r) - min(r) for r in rows if max(r) > min(r)]
    if not spans:
        assert scale == 1.0
        return
    spans.sort()
    median = (spans[(len(spans) - 1) // 2] + spans[len(spans) // 2]) / 2
    assert SPAN_BOUNDS[0] * (1 - 1e-5) <= scale * median <= SPAN_BOUNDS[1] * (1 + 1e-5)


def test_fusion_of_two_teachers_equals_the_hand_computation():
    a = [[1.0, 2.0, 3.0]]      # z-scores: −√1.5, 0, √1.5  (population std √(2/3))
    b = [[10.0, 30.0, 20.0]]   # z-scores: −√1.5, √1.5, 0
    r = math.sqrt(1.5)
    assert fuse([a, b], "zsum")[0] == pytest.approx([-r, r / 2, r / 2])
    # ranks: a 3,2,1 ; b 3,1,2
    want = [2 / 63, 1 / 62 + 1 / 61, 1 / 61 + 1 / 62]
    assert fuse([a, b], "rrf")[0] == pytest.approx(want)
    # a teacher that scores every candidate alike adds nothing to zsum
    assert fuse([a, [[5.0, 5.0, 5.0]]], "zsum")[0] == pytest.approx([-r / 2, 0.0, r / 2])


def test_score_refuses_a_bad_scale_fusion_or_teacher_list(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"query": "q", "document": "a", "negative": ["b"]}) + "\n")
    for bad, says in ((["--scale", "0"], "--scale '0'"), (["--scale", "warm"], "--scale 'warm'"),
                      (["--scale", "span:x"], "span:X"),
                      (["--teacher", "minilm,"], "several separated by commas"),
                      (["--teacher", "minilm,bm24"], "'bm24'")):
        assert main(["score", str(src), "--out", str(tmp_path / "o"), *bad]) == 2
        assert says in capsys.readouterr().err
    with pytest.raises(ModelSpecError, match="--fusion"):
        ScoreSpec(input=str(src), fusion="max")
    # a teacher evaluated as a retriever needs one member that ranks a corpus: one message, not a traceback
    assert main(["evaluate", f"cross-encoder:{tmp_path}", "--teacher", "--beir", str(tmp_path)]) == 2
    assert "cross-encoders only rerank" in capsys.readouterr().err


def test_score_warns_when_the_written_target_is_near_uniform(tmp_path, capsys):
    rows = [{"query": f"open file {i}", "document": f"open file {i} with open", "negative": [f"file {i} closed",
             f"bird {i}", f"the {i}"]} for i in range(12)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", str(src), "--out", str(tmp_path / "raw"), "--teacher", "bm25", "--scale", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "warning: the written target is near uniform" in out and "--scale auto" in out
    stats = json.loads((tmp_path / "raw" / "stats.json").read_text())
    assert stats["scale"] == 0.01 and near_uniform(stats["target"]) and stats["scale_rule"]["rule"].startswith("fixed")
    assert main(["score", str(src), "--out", str(tmp_path / "auto"), "--teacher", "bm25"]) == 0
    assert "near uniform" not in capsys.readouterr().out
    stats = json.loads((tmp_path / "auto" / "stats.json").read_text())
    assert not near_uniform(stats["target"]) and stats["scale_rule"] == {**stats["scale_rule"], "rule": "span:1",
                                                                          "auto": True}
    # auto: the median query's written scores span 1 (the student's span), read back from the file itself
    written = pq.read_table(tmp_path / "auto" / "train").to_pylist()
    spans = sorted(max(r["scores"]) - min(r["scores"]) for r in written)
    assert (spans[5] + spans[6]) / 2 == pytest.approx(1.0, abs=2e-4)
    raw_spans = sorted(max(r["raw_scores"]) - min(r["raw_scores"]) for r in written)
    assert stats["scale"] == pytest.approx(2 / (raw_spans[5] + raw_spans[6]), rel=1e-4)


def test_prepare_warns_about_a_near_uniform_distillation_source(minilm, tmp_path, capsys):
    """Teacher scores that reach `prepare` as cosines (not through `score`) are flagged with the fix; the same rows
    at a reranker's scale are not."""
    from colbertzero.data import prepare_recipe
    from colbertzero.recipe import recipe_from_dict

    def source(name: str, spread: float) -> dict:
        rows = [{"query": f"how do I open file {i}", "pos": [f"open(path) opens file {i}"],
                 "neg": [f"file {i} is closed", f"a bird {i}", f"the number {i}"],
                 "pos_scores": [0.5 + 3 * spread], "neg_scores": [0.5 + 2 * spread, 0.5 + spread, 0.5]}
                for i in range(8)]
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"name": name, "path": str(path),
                "columns": {"query": "query", "documents": "pos,neg", "scores": "pos_scores,neg_scores"}}

    phase = {"kind": "distillation", "init": minilm, "global_batch_size": 4, "query_length": 16,
             "document_length": 32, "data": {"shards_dir": str(tmp_path / "shards"), "docs_per_query": 4,
                                             "sources": [source("cosines", 0.02), source("logits", 3.0)]},
             "resources": {"nodes": 1, "gpus_per_node": 0, "cpu_tasks_per_node": 1}, "lr": 1e-5}
    summary = prepare_recipe(recipe_from_dict({"name": "t", "phases": {"p": phase}}), progress=False)["p"]
    err = capsys.readouterr().err
    # cosines 0.56, 0.54, 0.52, 0.50: softmax top-1 = e^.06 / (e^.06 + e^.04 + e^.02 + 1)
    top1 = math.exp(0.06) / sum(math.exp(x) for x in (0.06, 0.04, 0.02, 0.0))
    assert summary["cosines"]["target"]["top1"] == pytest.approx(top1, abs=1e-4)
    assert summary["cosines"]["target"]["uniform"] == 0.25
    assert "source cosines: the teacher's scores make a near-uniform target" in err and "--scale auto" in err
    assert "warning" in summary["cosines"] and "warning" not in summary["logits"] and "logits" not in err


def test_bm25_in_a_fusion_scores_inputs_with_short_rows_dropped(tmp_path):
    """A row with too few candidates (dropped with --drop-short) is not part of BM25's statistics either."""
    rows = [{"query": f"open file {i}", "document": f"open file {i} with open", "negative": [f"file {i} closed",
             f"bird {i}"] if i else ["only one"]} for i in range(6)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", str(src), "--out", str(tmp_path / "o"), "--teacher", "minilm,bm25", "--docs-per-query",
                 "3", "--drop-short", "--fusion", "rrf"]) == 0
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["queries"] == 5 and stats["rows_short_dropped"] == 1 and stats["fused"]["fusion"] == "rrf"
    written = pq.read_table(tmp_path / "o" / "train").to_pylist()
    # rrf of two teachers over 3 candidates: raw scores lie between 2/(60+3) and 2/(60+1)
    assert all(2 / 63 - 1e-4 <= x <= 2 / 61 + 1e-4 for r in written for x in r["raw_scores"])
