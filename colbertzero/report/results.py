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


def table_columns(rows: list[dict]) -> list[str]:
    """The paper's datasets in its order (every column of its table, run or not), then any other we ran."""
    seen: dict[str, str] = {}
    for row in rows:
        for d in row["reference"]["datasets"]:
            seen.setdefault(norm_dataset(d), d)
    for c in dataset_columns(rows):  # named as our evaluation names it
        seen[norm_dataset(c)] = c
    return list(seen.values())


def _same_datasets_reference(row: dict, cols: list[str]) -> float | None:
    """The paper's mean over the datasets this row ran, when it has a figure for each: Δ compares like with like."""
    ran = [c for c in cols if ours_for(row, c) is not None]
    refs = [ref_for(row, c) for c in ran]
    return sum(refs) / len(refs) if ran and all(r is not None for r in refs) else None


def results_markdown(rows: list[dict], several: bool) -> str:
    cols = table_columns(rows)
    header = (["Run"] if several else []) + ["Phase"] + cols + ["Average", "Paper avg", "Paper, same datasets",
                                                                 "Δ (same datasets)"]
    body = []
    for row in rows:
        cells = []
        for c in cols:
            ours, ref = ours_for(row, c), ref_for(row, c)
            if ref is None:
                cells.append(fmt(ours))
            elif ours is None:
                cells.append(f"{DASH} ({fmt(ref)})")
            else:
                cells.append(f"{fmt(ours)} ({fmt(ref)}, {ours - ref:+.2f})")
        ref_avg = row["reference"]["average"]
        same = _same_datasets_reference(row, cols)
        delta = row["average"] - same if row["average"] is not None and same is not None else None
        phase = row["phase"] + (" (final)" if row["final"] and row["block"] == "phase" else "")
        body.append(
            ([row["run"]] if several else [])
            + [phase]
            + cells
            + [fmt(row["average"]), fmt(ref_avg), fmt(same), (f"{delta:+.2f}" if delta is not None else DASH)]
        )
    return md_table(header, body)


def missing_lines(rows: list[dict]) -> list[str]:
    """Per evaluated row, the paper's datasets it did not run (its average leaves them out)."""
    out = []
    for row in rows:
        if not row["datasets"] or not row["reference"]["datasets"]:
            continue
        missing = [d for d in row["reference"]["datasets"] if ours_for(row, d) is None]
        if missing:
            who = (f"{row['run']}: " if row["block"] == "final" else "") + row["phase"]
            out.append(f"- {who}: {len(missing)} of the paper's {len(row['reference']['datasets'])} datasets not "
                       f"evaluated ({', '.join(missing)}); its average covers the other "
                       f"{len(row['reference']['datasets']) - len(missing)}.")
    return out
