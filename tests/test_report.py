"""Reports and status from real run dirs built through the Manifest API (no training needed)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from colbertzero.manifest import Manifest
from colbertzero.recipe import recipe_from_dict
from colbertzero.report import ReportError, build_report, read_run_manifest, status_json, status_table

T0 = dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.timezone.utc)
PIPELINE = ("unsupervised", "supervised", "distillation")


def _phase(kind: str, init, tmp: Path, **extra) -> dict:
    return {
        "kind": kind,
        "init": init,
        "data": {"sources": [{"name": "msmarco", "path": str(tmp / f"{kind}.jsonl")}], "shards_dir": str(tmp / kind)},
        "lr": 1e-5,
        "global_batch_size": 16,
        "resources": {"nodes": 1, "gpus_per_node": 4},
        **extra,
    }


def make_recipe(tmp: Path, name: str, phases: tuple[str, ...]):
    specs = {}
    prev = None
    for ph in phases:
        init = {"from": prev} if prev else "answerdotai/ModernBERT-base"
        extra = {"budget_gpu_hours": 4.0}
        if ph == "unsupervised":
            extra["reference"] = {"beir_ndcg10": 48.1, "per_dataset": {"SciFact": 70.5}, "gpu_hours": 700.0}
        specs[ph] = _phase(ph, init, tmp, **extra)
        prev = ph
    ref = {"beir_ndcg10": 55.43 if len(phases) == 3 else 54.09, "per_dataset": {"SciFact": 76.2, "NFCorpus": 37.9},
           "note": "paper, table 1"}
    return recipe_from_dict({"name": name, "phases": specs, "budget_gpu_hours": 12.0, "reference": ref})


def write_log(run_dir: Path, phase: str, steps: int, resume_at: int | None, loss0: float) -> None:
    path = run_dir / "phases" / phase / "logs" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    attempt = "101-0"
    for s in range(10, steps + 1, 10):
        if resume_at is not None and s == resume_at:
            attempt = "102-1"
        lines.append(
            json.dumps(
                {
                    "time": (T0 + dt.timedelta(seconds=6 * s)).isoformat(),
                    "phase": phase,
                    "step": s,
                    "total_steps": steps,
                    "loss": loss0 * (0.98 ** (s / 10)) + 0.05 * np.sin(s),
                    "lr": 1e-5 * min(1.0, s / 50) * (1 - s / (steps + 10)),
                    "temperature": 0.02,
                    "grad_norm": 1.0,
                    "samples_per_s": 200.0 + (s % 30),
                    "tokens_per_s": 40000.0 + 10 * (s % 70),
                    "mfu": 0.31,
                    "source": "msmarco",
                    "consumed": {"msmarco": 16 * s},
                    "attempt": attempt,
                }
            )
        )
    # a writer killed mid-line leaves a truncated line behind
    path.write_text("\n".join(lines) + '\n{"time": "2026-01-05T09:0')


def make_run(tmp: Path, name: str, phases: tuple[str, ...] = PIPELINE, evaluated: int | None = None,
             logged: int | None = None) -> Path:
    """A run dir whose first `logged` phases trained (two attempts, the second a resume) and first `evaluated`
    phases were evaluated; later phases are pending."""
    run = tmp / name
    recipe = make_recipe(tmp, name, phases)
    m = Manifest.create(run, recipe)
    logged = len(phases) if logged is None else logged
    evaluated = logged if evaluated is None else evaluated
    for i, ph in enumerate(phases[:logged]):
        start = T0 + dt.timedelta(hours=3 * i)
        a1 = m.start_attempt(ph, job_id="101", executor="slurm", nodes=1, gpus_per_node=4, tasks=4,
                             attempt_id="101-0", start=start.isoformat())
        m.tick_attempt(ph, a1, step=100, elapsed_s=1800, end_state="timeout")
        for step in (50, 100, 150, 200):
            ck = run / "phases" / ph / "checkpoints" / f"step-{step:08d}"
            ck.mkdir(parents=True)
            m.add_checkpoint(ph, ck, step, "0" * 64, keep_last=2)
        a2 = m.start_attempt(ph, job_id="102", executor="slurm", nodes=1, gpus_per_node=4, tasks=4, step_start=100,
                             attempt_id="102-1", start=(start + dt.timedelta(hours=1)).isoformat())
        m.tick_attempt(ph, a2, step=200, elapsed_s=900, end_state="done")
        m.set_state(ph, "done", total_steps=200)
        write_log(run, ph, 200, resume_at=110, loss0=3.0 - i)
    for i, ph in enumerate(phases[:evaluated]):
        base = 0.40 + 0.05 * i
        ev = {
            "model": f"phases/{ph}/export",
            "prompts": True,
            # as colbertzero.evaluate writes it: fractions, plus counts and the backend per dataset
            "datasets": {
                "scifact": {"ndcg@10": base + 0.2, "mrr@10": base + 0.22, "recall@100": 0.9, "map@100": base + 0.1,
                            "queries": 300, "documents": 5183, "retrieval": "exact"},
                "nfcorpus": {"ndcg@10": base - 0.1, "mrr@10": base, "recall@100": 0.3, "map@100": base - 0.2,
                             "queries": 323, "documents": 3633, "retrieval": "exact"},
            },
            "average": {"ndcg@10": base + 0.05, "mrr@10": base + 0.11, "recall@100": 0.6, "map@100": base - 0.05},
        }
        m.update_phase(ph, lambda p, ev=ev: p.update(eval=ev))
    return run


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    rgb = mpimg.imread(path)[..., :3].astype(np.float64) * 255  # matplotlib reads a PNG as floats in [0, 1]
    h, w = rgb.shape[:2]
    assert w >= 300 and h >= 200, (w, h)
    px = rgb @ np.array([0.299, 0.587, 0.114])  # luminance, as a greyscale conversion weighs the channels
    assert px.var() > 50.0, f"{path.name} looks blank (pixel variance {px.var():.1f})"
    # not mostly one colour either: a drawn plot has ink well beyond its frame
    assert (px < 200).mean() > 0.01, path.name


def test_single_run_report(tmp_path):
    run = make_run(tmp_path, "full", evaluated=2)  # distillation trained but not evaluated yet
    md_path = build_report([str(run)])
    out = run / "report"
    assert md_path == out / "report.md"
    for name in ("loss.png", "lr.png", "throughput.png", "gpu_hours.png", "ndcg10.png"):
        assert_png(out / name)

    md = md_path.read_text()
    assert "## Results: nDCG@10" in md
    table = md.split("## Results: nDCG@10")[1].split("###")[0]
    header = next(line for line in table.splitlines() if line.startswith("| Phase"))
    assert "scifact" in header and "nfcorpus" in header and "Paper avg" in header and "Average" in header
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln}
    # unsupervised: ours 0.60 → 60.00 on SciFact, the phase's paper figure 70.5 beside it; its BEIR average 48.1
    # each cell: ours (paper's, Δ); no Δ of averages: the paper has no NFCorpus figure for this phase, so there is no
    # mean of its figures over the two datasets we ran (its 48.10 covers its whole table)
    assert "60.00 (70.50, -10.50)" in rows["unsupervised"]
    assert "| 45.00 | 48.10 | — | — |" in rows["unsupervised"]
    # supervised: evaluated, no reference of its own
    assert "65.00" in rows["supervised"] and "50.00" in rows["supervised"]
    # the final phase carries the pipeline's reference (55.43) but has no eval yet: dashes, no crash
    fin = rows["distillation (final)"]
    assert "— (76.20)" in fin and "— (37.90)" in fin and "55.43" in fin
    assert "![Training loss](loss.png)" in md and "(1 unreadable log lines skipped)" in md
    assert "| supervised | scifact | 65.00 | 67.00 | 90.00 | 55.00 | 300 | 5183 |" in md  # per-dataset table
    assert "| distillation | 200/200 |" in md  # training table

    rep = json.loads((out / "report.json").read_text())
    assert rep["format"] == "colbertzero-report/1" and rep["scale"] == "percent"
    r0 = rep["runs"][0]
    assert r0["gpu_hours"] == pytest.approx(3 * (2.0 + 1.0))
    sup = r0["phases"]["supervised"]
    assert sup["eval"]["average"]["ndcg@10"] == pytest.approx(50.0)
    assert sup["training"]["logged_steps"] == 20 and sup["training"]["bad_lines"] == 1
    assert sup["training"]["attempts_logged"] == ["101-0", "102-1"]
    assert r0["phases"]["distillation"]["eval"] is None
    assert {row["phase"] for row in rep["results"]} == set(PIPELINE)
    assert sorted(rep["figures"]) == sorted(["loss.png", "lr.png", "throughput.png", "gpu_hours.png", "ndcg10.png"])

    # a re-render over the old one: same files, replaced in place
    build_report([str(run)])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_init_row_and_in_training_curve(tmp_path):
    run = make_run(tmp_path, "curves", evaluated=1)
    logs = run / "phases" / "unsupervised" / "logs" / "eval.jsonl"
    lines = [json.dumps({"step": s, "attempt": "101-0", "average": {"ndcg@10": 0.2 + s / 1000},
                         "datasets": {"scifact": {"ndcg@10": 0.2 + s / 1000, "queries": 30, "documents": 200}}})
             for s in (50, 100, 150)]
    logs.write_text("\n".join(lines) + "\n{\"step\": 2")  # and a truncated line
    init = {"model": "base (init)", "recipe_hash": Manifest(run).read()["recipe_hash"],
            "datasets": {"scifact": {"ndcg@10": 0.125, "mrr@10": 0.1, "recall@100": 0.5, "map@100": 0.1}}}
    (run / "eval-init.json").write_text(json.dumps(init))
    out = build_report([str(run)]).parent
    assert_png(out / "ndcg10_in_training.png")
    md = (out / "report.md").read_text()
    table = md.split("## Results: nDCG@10")[1].split("###")[0]
    rows = [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[:3] == ["Phase", "init", "unsupervised"], rows
    assert "| init | 12.50 |" in table and "![nDCG@10 during training](ndcg10_in_training.png)" in md
    rep = json.loads((out / "report.json").read_text())
    assert [e["step"] for e in rep["runs"][0]["phases"]["unsupervised"]["in_training_eval"]] == [50, 100, 150]
    assert rep["runs"][0]["phases"]["unsupervised"]["in_training_eval"][-1]["ndcg@10"] == pytest.approx(35.0)
    assert rep["results"][0]["phase"] == "init" and "ndcg10_in_training.png" in rep["figures"]
    # an eval-init.json of another recipe is not this run's starting point: no row, and no figure without logs
    (run / "eval-init.json").write_text(json.dumps({**init, "recipe_hash": "other"}))
    logs.unlink()
    out = build_report([str(run)]).parent
    assert "| init |" not in (out / "report.md").read_text() and not (out / "ndcg10_in_training.png").exists()


def test_two_runs_side_by_side(tmp_path):
    full = make_run(tmp_path, "pipeline-a")
    kd = make_run(tmp_path, "pipeline-c", phases=("distillation",))
    with pytest.raises(ReportError, match="several run dirs"):
        build_report([str(full), str(kd)])
    out = tmp_path / "compare"
    md = build_report([str(full), str(kd)], out_dir=str(out)).read_text()
    for name in ("loss.png", "lr.png", "throughput.png", "gpu_hours.png", "ndcg10.png"):
        assert_png(out / name)
    final = md.split("### Final models")[1].split("### Per phase")[0]
    lines = [line for line in final.splitlines() if line.startswith("| pipeline")]
    assert len(lines) == 2
    # each run's final model beside its own paper figure: 55.43 for (a), 54.09 for (c)
    assert "pipeline-a | distillation" in lines[0] and "55.43" in lines[0] and "55.00" in lines[0]
    assert "pipeline-c | distillation" in lines[1] and "54.09" in lines[1] and "45.00" in lines[1]
    per_phase = md.split("### Per phase")[1].split("###")[0]
    assert per_phase.count("| pipeline-a |") == 3 and per_phase.count("| pipeline-c |") == 1
    rep = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in rep["runs"]] == ["pipeline-a", "pipeline-c"]
    assert [r["block"] for r in rep["results"]].count("final") == 2
    assert not (full / "report").exists()
    with pytest.raises(ReportError, match="twice"):
        build_report([str(full), str(full)], out_dir=str(out))


def test_status_table_and_json(tmp_path):
    run = make_run(tmp_path, "status", evaluated=1, logged=2)
    Manifest(run).update_phase(
        "supervised", lambda p: p.update(state="failed", failure={"step": 150, "source": "msmarco",
                                                                    "reason": "loss is NaN", "time": "x"})
    )
    data = Manifest(run).read()
    text = status_table(data)
    print(text)
    lines = text.splitlines()
    assert lines[0].startswith("run: status")
    row = {ln.split()[0]: ln for ln in lines[1:] if ln.split() and ln.split()[0] in PIPELINE + ("total",)}
    assert "done" in row["unsupervised"] and "200/200" in row["unsupervised"]
    assert "2 (newest 200)" in row["unsupervised"]  # keep_last=2 of 4 saved
    assert "3.00 / 4.00" in row["unsupervised"] and "2 (last: done)" in row["unsupervised"]
    assert row["unsupervised"].rstrip().endswith("45.00")
    assert "failed" in row["supervised"] and row["supervised"].rstrip().endswith("—")
    assert "pending" in row["distillation"] and "0/—" in row["distillation"]
    assert "0.00 / 4.00" in row["distillation"] and row["distillation"].count("—") >= 3
    assert "6.00 / 12.00" in row["total"]
    assert any(ln.startswith("! supervised: failed at step 150 (source msmarco): loss is NaN") for ln in lines)
    # columns line up: every phase row starts its "state" column at the same offset
    states = (("unsupervised", "done"), ("supervised", "failed"), ("distillation", "pending"))
    offs = {row[p].index(s) for p, s in states}
    assert len(offs) == 1

    js = status_json(data)
    json.dumps(js)  # plain JSON
    assert js["recipe"] == "status" and js["gpu_hours"] == pytest.approx(6.0) and js["budget_gpu_hours"] == 12.0
    ph = {p["name"]: p for p in js["phases"]}
    assert ph["unsupervised"]["ndcg10"] == pytest.approx(45.0)
    assert ph["unsupervised"]["checkpoints"] == 2 and ph["unsupervised"]["newest_checkpoint_step"] == 200
    assert ph["supervised"]["ndcg10"] is None and ph["supervised"]["failure"]["reason"] == "loss is NaN"
    assert ph["distillation"]["attempts"] == 0 and ph["distillation"]["last_attempt"] is None
    # a raised phase budget wins over the recipe's
    Manifest(run).raise_budget("distillation", 9.5)
    raised = {p["name"]: p for p in status_json(Manifest(run).read())["phases"]}
    assert raised["distillation"]["budget_gpu_hours"] == 9.5

    with pytest.raises(ReportError, match="not a colbertzero manifest"):
        status_table({"format": "something else"})
    # what `colbertzero status` reads: the same data, no lock taken
    assert read_run_manifest(run) == Manifest(run).read()
    with pytest.raises(ReportError, match="no such run dir"):
        read_run_manifest(tmp_path / "nope")


def test_fresh_run_renders_dashes(tmp_path):
    run = make_run(tmp_path, "fresh", logged=0, evaluated=0)
    md = build_report([str(run)]).read_text()
    assert "(no attempts yet)" in md
    assert not list((run / "report").glob("*.png"))
    table = md.split("## Results: nDCG@10")[1].split("###")[0]
    # nothing evaluated: the paper's datasets are the columns, its figures in parentheses beside our dashes
    assert "| distillation (final) | — (76.20) | — (37.90) | — | 55.43 | — | — |" in table
    assert "| unsupervised | — | — | — | — |" in md  # training table
    assert "— / 12.00" not in md and "0.00 / 12.00" in md


def test_bad_run_dirs(tmp_path):
    with pytest.raises(ReportError, match="no such run dir"):
        build_report([str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="not a colbertzero run dir"):
        build_report([str(empty)])
    assert not list(empty.iterdir())  # no lock file left in a folder that is not a run dir
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ReportError, match="corrupt manifest"):
        build_report([str(bad)])
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "someone-else/2"}))
    with pytest.raises(ReportError, match="not a colbertzero manifest"):
        build_report([str(other)])
    with pytest.raises(ReportError, match="no run dir"):
        build_report([])
