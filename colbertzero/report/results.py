"""The results table in the paper's shape: one row per model (init, each phase; with several runs, each run's final
model first), nDCG@10 per dataset beside the paper's figure."""

from __future__ import annotations

from .views import DASH, EvalView, RunView, fmt, md_table, norm_dataset


def _result_row(run: RunView, phase: str, block: str) -> dict:
    ev = run.eval(phase)
    ref = run.reference_for(phase)
    return {
        "block": block,  # "final": a run's final model in a comparison; "phase": one row per phase
        "run": run.label,
        "recipe": run.recipe_name,
        "phase": phase,
        "final": phase == run.final_phase(),
        "model": ev.model if ev else None,
        "datasets": {d: m.get("ndcg@10") for d, m in ev.datasets.items()} if ev else {},
        "average": ev.average.get("ndcg@10") if ev else None,
        "n_datasets": len(ev.datasets) if ev else 0,
        "reference": {"average": ref["average"], "datasets": ref["datasets"]},
    }


def _init_row(run: RunView) -> dict:
    ev = EvalView.of(run.init_eval)
    return {
        "block": "phase", "run": run.label, "recipe": run.recipe_name, "phase": "init", "final": False,
        "model": ev.model if ev else None,
        "datasets": {d: m.get("ndcg@10") for d, m in ev.datasets.items()} if ev else {},
        "average": ev.average.get("ndcg@10") if ev else None,
        "n_datasets": len(ev.datasets) if ev else 0,
        "reference": {"average": None, "datasets": {}},
    }


def results_rows(runs: list[RunView]) -> list[dict]:
    rows = []
    if len(runs) > 1:  # the comparison first: each pipeline's final model
        rows += [_result_row(r, r.final_phase(), "final") for r in runs]
    for r in runs:
        rows += [_init_row(r)] if r.init_eval else []  # the starting model: what training added
        rows += [_result_row(r, ph, "phase") for ph in r.phases]
    return rows


def dataset_columns(rows: list[dict]) -> list[str]:
    seen: dict[str, str] = {}
    for row in rows:
        for d in row["datasets"]:
            seen.setdefault(norm_dataset(d), d)
    return list(seen.values())


def ours_for(row: dict, col: str) -> float | None:
    for d, v in row["datasets"].items():
        if norm_dataset(d) == norm_dataset(col):
            return v
    return None


def ref_for(row: dict, col: str) -> float | None:
    for d, v in row["reference"]["datasets"].items():
        if norm_dataset(d) == norm_dataset(col):
            return v
    return None


def results_markdown(rows: list[dict], several: bool) -> str:
    cols = dataset_columns(rows)
    header = (["Run"] if several else []) + ["Phase"] + cols + ["Average", "Paper avg", "Δ vs paper"]
    body = []
    for row in rows:
        cells = []
        for c in cols:
            ours, ref = ours_for(row, c), ref_for(row, c)
            cells.append(fmt(ours) + (f" ({fmt(ref)})" if ref is not None else ""))
        ref_avg = row["reference"]["average"]
        delta = row["average"] - ref_avg if row["average"] is not None and ref_avg is not None else None
        phase = row["phase"] + (" (final)" if row["final"] and row["block"] == "phase" else "")
        body.append(
            ([row["run"]] if several else [])
            + [phase]
            + cells
            + [fmt(row["average"]), fmt(ref_avg), (f"{delta:+.2f}" if delta is not None else DASH)]
        )
    return md_table(header, body)
