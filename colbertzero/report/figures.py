"""PNG figures of a report: loss, learning rate, throughput, GPU-hours against budgets, nDCG@10."""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .. import ledger
from ..files import parse_iso
from .results import dataset_columns, ours_for, ref_for
from .views import RunView, finite, num


def _figure(w: float, h: float):
    # The object API with no pyplot: no global backend switch or figure registry in the caller's process.
    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _grid(fig, n: int, rows: int = 1):
    cols = max(1, n)
    axes = fig.subplots(rows, cols, squeeze=False)
    return axes


def _ema(ys: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for y in ys:
        if y is None or not math.isfinite(y):
            out.append(float("nan"))
            continue
        acc = y if acc is None else alpha * y + (1 - alpha) * acc
        out.append(acc)
    return out


def _phase_union(runs: list[RunView]) -> list[str]:
    return list(dict.fromkeys(ph for r in runs for ph in r.phases))


def _resume_steps(records: list[dict]) -> list[int]:
    """Steps where the logging attempt changes: a requeue/resume point."""
    out, prev = [], None
    for r in records:
        a = r.get("attempt")
        if prev is not None and a is not None and a != prev:
            out.append(int(r["step"]))
        prev = a if a is not None else prev
    return out


def series_figure(runs: list[RunView], keys: list[tuple[str, str]], title: str, smooth: bool = False,
                   source: str = "logs"):
    """One column per phase, one row per metric key; one line per run. None when no run has any of it.
    ``source``: the RunView records to plot (``logs``: train.jsonl; ``eval_logs``: in-training evaluations)."""
    phases = _phase_union(runs)
    logs = {run.label: getattr(run, source) for run in runs}
    have = any(finite(r.get(k) for r in logs[run.label].get(ph, [])) for run in runs for ph in phases
               for k, _ in keys)
    if not have:
        return None
    fig = _figure(4.2 * len(phases) + 0.6, 2.9 * len(keys) + 0.4)
    axes = _grid(fig, len(phases), len(keys))
    colors = [f"C{i}" for i in range(10)]
    for j, ph in enumerate(phases):
        for i, (key, ylabel) in enumerate(keys):
            ax = axes[i][j]
            drawn = False
            for k, run in enumerate(runs):
                recs = [r for r in logs[run.label].get(ph, []) if num(r.get(key)) is not None]
                if not recs:
                    continue
                xs = [int(r["step"]) for r in recs]
                ys = [num(r[key]) for r in recs]
                color = colors[k % 10] if len(runs) > 1 else colors[j % 10]
                if smooth and len(xs) > 20:
                    ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
                    ax.plot(xs, _ema(ys), color=color, linewidth=1.6)
                else:
                    ax.plot(xs, ys, color=color, linewidth=1.4, marker="." if len(xs) < 30 else None)
                for s in _resume_steps(recs):
                    ax.axvline(s, color=color, linestyle=":", linewidth=1.0, alpha=0.8)
                drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "no logs yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
            if i == 0:
                ax.set_title(ph)
            if i == len(keys) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
    if len(runs) > 1:  # one legend for the figure: a run may be missing from the first phase's panel
        handles = [Line2D([], [], color=colors[k % 10], linewidth=1.6) for k in range(len(runs))]
        fig.legend(handles, [r.label for r in runs], loc="outside right upper", fontsize=8)
    fig.suptitle(title + ("  (dotted: resumed attempt)" if any(
        _resume_steps(logs[r.label].get(ph, [])) for r in runs for ph in phases) else ""))
    return fig


def attempt_rows(run: RunView) -> list[dict]:
    """All attempts of the run in time order, with the phase they belong to."""
    out = []
    for order, (ph, p) in enumerate(run.data["phases"].items()):
        for i, a in enumerate(p.get("attempts") or []):
            try:
                t = parse_iso(a["start"]).timestamp()
            except (KeyError, TypeError, ValueError):
                t = math.inf
            out.append({"phase": ph, "index": i, "attempt": a, "order": (t, order, i)})
    out.sort(key=lambda e: e["order"])
    cum = 0.0
    for e in out:
        cum += num(e["attempt"].get("gpu_hours")) or 0.0
        e["cumulative"] = cum
    return out


def gpu_hours_figure(runs: list[RunView]):
    ledgers = [attempt_rows(r) for r in runs]
    if not any(ledgers):
        return None
    fig = _figure(max(6.5, 6.5 * len(runs)), 3.8)
    axes = _grid(fig, len(runs))[0]
    for ax, run, led in zip(axes, runs, ledgers):
        ax.set_title(run.label if len(runs) > 1 else "GPU-hours per attempt, cumulative, against budgets")
        if not led:
            ax.text(0.5, 0.5, "no attempts yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
            continue
        pcolor = {ph: f"C{i % 10}" for i, ph in enumerate(run.phases)}
        xs = list(range(1, len(led) + 1))
        seen = set()
        for x, e in zip(xs, led):
            ph = e["phase"]
            ax.bar(x, num(e["attempt"].get("gpu_hours")) or 0.0, color=pcolor[ph], alpha=0.75,
                   label=ph if ph not in seen else None)
            seen.add(ph)
        ax.step(xs, [e["cumulative"] for e in led], where="mid", color="black", linewidth=1.5, label="cumulative")
        ax.plot(xs, [e["cumulative"] for e in led], "o", color="black", markersize=3)
        # A phase's budget line sits at (GPU-hours spent before the phase) + (its budget): where the cumulative
        # curve would cross it is where that phase runs out.
        for ph in run.phases:
            b = ledger.phase_budget(run.data, ph)
            idx = [k for k, e in enumerate(led) if e["phase"] == ph]
            if b is None or not idx:
                continue
            base = led[idx[0]]["cumulative"] - (num(led[idx[0]]["attempt"].get("gpu_hours")) or 0.0)
            ax.hlines(base + b, xs[idx[0]] - 0.45, xs[idx[-1]] + 0.45, colors=pcolor[ph], linestyles="--",
                      label=f"{ph} budget")
        rb = ledger.run_budget(run.data)
        if rb is not None:
            ax.axhline(rb, color="red", linestyle="--", linewidth=1.2, label="run budget")
        ax.set_xticks(xs, [f"{e['phase']}\n#{e['index'] + 1}" for e in led], fontsize=7)
        ax.set_ylabel("GPU-hours")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: budget lines sit up top
    return fig


def ndcg_figure(rows: list[dict]):
    rows = [r for r in rows if r["datasets"]]
    if not rows:
        return None
    cols = dataset_columns(rows) + ["average"]
    n = len(rows)
    width = 0.8 / n
    fig = _figure(max(6.0, 0.9 * len(cols) * max(1, n) ** 0.5 + 2), 4.0)
    ax = fig.subplots()
    ref_labelled = False
    for k, row in enumerate(rows):
        xs = [c + (k - (n - 1) / 2) * width for c in range(len(cols))]
        ours = [(ours_for(row, c) if c != "average" else row["average"]) for c in cols]
        refs = [(ref_for(row, c) if c != "average" else row["reference"]["average"]) for c in cols]
        label = f"{row['run']} / {row['phase']}" if len({r["run"] for r in rows}) > 1 else row["phase"]
        ax.bar(xs, [v if v is not None else 0.0 for v in ours], width=width * 0.95, label=label, color=f"C{k % 10}")
        rx = [x for x, v in zip(xs, refs) if v is not None]
        ry = [v for v in refs if v is not None]
        if rx:
            ax.plot(rx, ry, linestyle="none", marker="_", markersize=14, markeredgewidth=2.5, color="black",
                    label=None if ref_labelled else "paper")
            ref_labelled = True
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("nDCG@10 (%)")
    ax.set_title("nDCG@10 per dataset")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
