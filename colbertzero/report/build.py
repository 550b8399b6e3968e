"""The report of one or several run dirs: ``report.md``, ``report.json`` and the PNG figures, written atomically.

Several run dirs side by side compare pipelines or ablations: one row per run's final phase, then one row per phase.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .. import ledger
from ..files import atomic_write_bytes, now_iso
from ..layout import RunLayout
from .figures import attempt_rows, gpu_hours_figure, ndcg_figure, png, series_figure
from .results import missing_lines, results_markdown, results_rows
from .status import budget_cell, live_states, status_json, status_table
from .views import (
    DASH,
    FIGURES,
    METRICS,
    REPORT_FORMAT,
    ReportError,
    RunView,
    data_summary,
    fmt,
    has_ref,
    load_run,
    md_table,
    num,
    training_summary,
)


def _labels_unique(runs: list[RunView]) -> None:
    names = [r.label for r in runs]
    if len(set(names)) < len(names):  # two runs named alike in different folders: name them by parent too
        for r in runs:
            r.label = f"{r.run_dir.parent.name}/{r.run_dir.name}"


def _strict_json(x: Any) -> Any:
    """NaN/inf → null: report.json stays valid JSON for any reader (non-finite losses are counted separately)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    return x


def _report_json(runs: list[RunView], rows: list[dict], figures: list[str]) -> dict:
    out_runs = []
    for r in runs:
        st = status_json(r.data, r.live)
        phases = {}
        for ph in st["phases"]:
            name = ph["name"]
            ev = r.eval(name)
            phases[name] = {
                **ph,
                "training": training_summary(r.logs.get(name, []), r.bad_lines.get(name, 0)),
                "data": data_summary(r, name),
                "in_training_eval": r.eval_logs.get(name, []),
                "eval": (
                    {"model": ev.model, "datasets": ev.datasets, "average": ev.average, "details": ev.details}
                    if ev
                    else None
                ),
                "reference": r.reference_for(name),
            }
        out_runs.append(
            {
                "label": r.label,
                "run_dir": str(r.run_dir),
                "recipe": st["recipe"],
                "recipe_hash": st["recipe_hash"],
                "gpu_hours": st["gpu_hours"],
                "budget_gpu_hours": st["budget_gpu_hours"],
                "reference": r.run_reference(),
                "phases": phases,
                "helpers": st["helpers"],
            }
        )
    return {
        "format": REPORT_FORMAT,
        "generated": now_iso(),
        "scale": "percent",
        "runs": out_runs,
        "results": rows,
        "figures": figures,
    }


def _markdown(runs: list[RunView], rows: list[dict], figures: list[str], report: dict) -> str:
    several = len(runs) > 1
    md = ["# colbertzero report", "", f"Generated {report['generated']}.", ""]

    md += ["## Runs", ""]
    md.append(
        md_table(
            ["Run", "Recipe", "Phases", "States", "GPU-h used / budget", "Paper GPU-h", "Run dir"],
            [
                [
                    r.label,
                    r.recipe_name,
                    " → ".join(r.phases),
                    ", ".join(f"{n}: {p.get('state', DASH)}" for n, p in r.data["phases"].items()),
                    budget_cell(ledger.run_gpu_hours(r.data), ledger.run_budget(r.data)),
                    fmt(r.run_reference()["gpu_hours"]),
                    f"`{r.run_dir}`",
                ]
                for r in runs
            ],
        )
    )
    md.append("")
    for r in runs:
        md += [f"### Status: {r.label}", "", "```", status_table(r.data, r.live), "```", ""]

    md += ["## Results: nDCG@10", ""]
    md.append(
        "Ours in percent; the paper's figure for the same dataset, from the recipe's `reference` fields, in "
        "parentheses. `Paper avg` is the paper's BEIR average for that model"
        + "."
    )
    md.append("")
    if any(row["datasets"] or has_ref(row["reference"]) for row in rows):
        if several:
            md += ["### Final models", "", results_markdown([r for r in rows if r["block"] == "final"], True), ""]
            md += ["### Per phase", ""]
        md.append(results_markdown([r for r in rows if r["block"] == "phase"], several))
        md += ["", "Each cell: ours (the paper's, ours − the paper's). `Paper avg` is over the paper's full table; "
               "`Paper, same datasets` is its mean over the datasets this row ran, which `Δ` compares with."]
        missing = missing_lines([r for r in rows if r["block"] == "phase"])
        if missing:
            md += ["", *missing]
    else:
        md.append(f"{DASH} (no phase evaluated yet)")
    md.append("")
    if "ndcg10.png" in figures:
        md += ["![nDCG@10 per dataset](ndcg10.png)", ""]
    if "ndcg10_in_training.png" in figures:
        md += ["![nDCG@10 during training](ndcg10_in_training.png)", ""]

    md += ["### All metrics (average over datasets)", ""]
    metric_rows = []
    for r in runs:
        for ph in r.phases:
            ev = r.eval(ph)
            metric_rows.append(
                ([r.label] if several else [])
                + [ph, (ev.model if ev and ev.model else DASH), (str(len(ev.datasets)) if ev else DASH)]
                + [fmt(ev.average.get(m)) if ev else DASH for m in METRICS]
            )
    md.append(md_table((["Run"] if several else []) + ["Phase", "Model", "Datasets", *METRICS], metric_rows))
    md.append("")
    detail = []
    for r in runs:
        for ph in r.phases:
            ev = r.eval(ph)
            for d, m in (ev.datasets.items() if ev else []):
                extra = ev.details.get(d, {})
                detail.append(
                    ([r.label] if several else [])
                    + [ph, d]
                    + [fmt(m.get(x)) for x in METRICS]
                    + [extra.get("queries", DASH), extra.get("documents", DASH)]
                )
    if detail:
        md += ["### Per dataset", ""]
        md.append(
            md_table((["Run"] if several else []) + ["Phase", "Dataset", *METRICS, "Queries", "Documents"], detail)
        )
        md.append("")

    data_rows = [([r.label] if several else []) + [ph, src, f"{d['rows']:,}" if isinstance(d["rows"], int) else DASH,
                                                   str(d["dropped"].get("rows", 0)),
                                                   str(d["dropped"].get("negatives", 0))]
                 for r in runs for ph in r.phases for src, d in data_summary(r, ph).items()]
    if data_rows:
        md += ["## Data", "", "What `prepare` kept and dropped, per source (from the shard indexes the run used).", ""]
        md.append(md_table((["Run"] if several else []) + ["Phase", "Source", "Rows", "Rows dropped",
                                                           "Negatives dropped"], data_rows))
        md.append("")
    md += ["## Training", ""]
    train_rows = []
    for r in runs:
        for ph in r.phases:
            s = report["runs"][runs.index(r)]["phases"][ph]["training"]
            if not s["logged_steps"]:
                train_rows.append(([r.label] if several else []) + [ph] + [DASH] * 7)
                continue
            consumed = ", ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}" for k, v in s["consumed"].items())
            loss = f"{fmt(s['loss_start'], 4)} → {fmt(s['loss_end'], 4)}"
            if s["non_finite_losses"]:
                loss += f" ({s['non_finite_losses']} non-finite)"
            train_rows.append(
                ([r.label] if several else [])
                + [
                    ph,
                    f"{s['last_step']}/{s['total_steps'] if s['total_steps'] is not None else DASH}",
                    loss,
                    f"{s['lr_last']:.3g}" if s["lr_last"] is not None else DASH,
                    fmt(s["samples_per_s"], 1),
                    fmt(s["tokens_per_s"], 0),
                    fmt(s["mfu"] * 100 if s["mfu"] is not None else None, 1),
                    consumed or DASH,
                ]
            )
            if s["bad_lines"]:
                train_rows[-1][-1] += f" ({s['bad_lines']} unreadable log lines skipped)"
    md.append(
        md_table(
            (["Run"] if several else [])
            + ["Phase", "Step", "Loss (first 5 → last 5)", "LR (last)", "Samples/s", "Tokens/s", "MFU %",
               "Rows consumed"],
            train_rows,
        )
    )
    md.append("")
    md.append("Samples/s, tokens/s and MFU are medians over logged steps.")
    md.append("")
    for name, alt in (("loss.png", "Training loss"), ("lr.png", "Learning rate"), ("throughput.png", "Throughput")):
        if name in figures:
            md += [f"![{alt}]({name})", ""]

    md += ["## GPU-hours", ""]
    ledger_rows = []
    for r in runs:
        for e in attempt_rows(r):
            a = e["attempt"]
            ledger_rows.append(
                ([r.label] if several else [])
                + [
                    e["phase"],
                    a.get("id", DASH),
                    a.get("job_id") or DASH,
                    a.get("executor") or DASH,
                    f"{a.get('nodes', '?')}×{a.get('gpus_per_node', '?')}",
                    a.get("start") or DASH,
                    fmt((num(a.get("elapsed_s")) or 0.0) / 3600.0),
                    fmt(num(a.get("gpu_hours"))),
                    fmt(e["cumulative"]),
                    a.get("exit_state") or DASH,
                    f"{a.get('step_start', '?')} → {a.get('step_end', '?')}",
                ]
            )
    if ledger_rows:
        md.append(
            md_table(
                (["Run"] if several else [])
                + ["Phase", "Attempt", "Job", "Executor", "Nodes×GPUs", "Start", "Hours", "GPU-h", "Cumulative",
                   "Exit", "Steps"],
                ledger_rows,
            )
        )
    else:
        md.append(f"{DASH} (no attempts yet)")
    md.append("")
    budget_rows = []
    for r in runs:
        for ph, p in r.data["phases"].items():
            ref = r.phase_reference(ph)
            budget_rows.append(
                ([r.label] if several else [])
                + [ph, budget_cell(ledger.record_gpu_hours(p), ledger.phase_budget(r.data, ph)), fmt(ref["gpu_hours"]),
                   ref["hardware"] or DASH]
            )
    md.append(
        md_table(
            (["Run"] if several else []) + ["Phase", "GPU-h used / budget", "Paper GPU-h", "Paper hardware"],
            budget_rows,
        )
    )
    md.append("")
    if "gpu_hours.png" in figures:
        md += ["![GPU-hours against budgets](gpu_hours.png)", ""]
    notes = [(r.label, r.run_reference()["note"]) for r in runs if r.run_reference()["note"]]
    if notes:
        md += ["## Notes from the recipes", ""] + [f"- {lbl}: {n}" for lbl, n in notes] + [""]
    return "\n".join(md)


def build_report(run_dirs: list[str] | str, out_dir: str | None = None) -> Path:
    """Write ``report.md``, ``report.json`` and the figures for one or several run dirs; returns report.md's path.

    One run dir: the report goes to ``RUN_DIR/report/`` unless ``out_dir`` says otherwise. Several: ``out_dir`` is
    required (no run dir owns a comparison).
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    run_dirs = [str(d) for d in run_dirs]
    if not run_dirs:
        raise ReportError("no run dir given")
    resolved = [Path(d).resolve() for d in run_dirs]
    if len(set(resolved)) < len(resolved):
        raise ReportError(f"a run dir is given twice: {', '.join(run_dirs)}")
    if out_dir is None and len(run_dirs) > 1:
        raise ReportError("several run dirs: say where the comparison goes (out_dir / --out)")
    runs = [load_run(d) for d in run_dirs]
    for r in runs:
        r.live = live_states(r.data)
    _labels_unique(runs)
    out = Path(out_dir) if out_dir is not None else RunLayout(runs[0].run_dir).report
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    rows = results_rows(runs)
    figs = {
        "loss.png": series_figure(runs, [("loss", "loss")], "Training loss", smooth=True),
        "lr.png": series_figure(runs, [("lr", "learning rate")], "Learning rate"),
        "throughput.png": series_figure(
            runs, [("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s")], "Throughput"
        ),
        "gpu_hours.png": gpu_hours_figure(runs),
        "ndcg10.png": ndcg_figure([r for r in rows if r["block"] == "final"] if len(runs) > 1 else rows),
        "ndcg10_in_training.png": series_figure(
            runs, [("ndcg@10", "nDCG@10 (%)")], "In-training evaluation (average of eval.in_training)",
            source="eval_logs"),
    }
    written = []
    for name in FIGURES:
        fig = figs.get(name)
        if fig is None:
            (out / name).unlink(missing_ok=True)  # an older report's figure would no longer match the data
            continue
        atomic_write_bytes(out / name, png(fig))
        written.append(name)
    report = _report_json(runs, rows, written)
    atomic_write_bytes(
        out / "report.json", (json.dumps(_strict_json(report), indent=2, default=str, allow_nan=False) + "\n").encode()
    )
    atomic_write_bytes(out / "report.md", (_markdown(runs, rows, written, report) + "\n").encode())
    return out / "report.md"
