"""Reports from run dirs: what trained, how fast, what it cost and how well it retrieves, beside the paper's numbers.

Reads only each run's manifest (ledger, checkpoints, eval) and its phases' ``logs/train.jsonl``; writes
``report.md``, ``report.json`` and PNG figures. A phase that has not run yet shows "—". Several run dirs side by
side compare pipelines or ablations: one row per run's final phase, then one row per phase.

Scale: evaluators report metrics as fractions (0.5543) while the paper and recipes' ``reference`` fields use
percentages (55.43); everything shown here is in percent (a metric set whose values are all ≤ 1 is multiplied by 100).
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .manifest import FORMAT as MANIFEST_FORMAT
from .manifest import MANIFEST, ManifestError, atomic_write_bytes, now_iso, parse_iso

DASH = "—"
REPORT_FORMAT = "colbertzero-report/1"
METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")
# Every figure this module may write; stale ones from an earlier report are removed when not produced again.
FIGURES = ("loss.png", "lr.png", "throughput.png", "gpu_hours.png", "ndcg10.png", "ndcg10_in_training.png")
# The starting model's evaluation (written by `colbertzero demo`); shown as an "init" row when of this recipe.
INIT_EVAL = "eval-init.json"


class ReportError(ManifestError):
    """A run dir or manifest that cannot be reported on; the message says which and why.

    A ManifestError, so the CLI's handler for a bad run dir prints it without a traceback."""


# ---------------------------------------------------------------- small helpers
def _num(x: Any) -> float | None:
    """A real number (NaN/inf kept: a diverged loss must show), or None for anything else."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _finite(xs: Iterable[Any]) -> list[float]:
    return [v for v in (_num(x) for x in xs) if v is not None and math.isfinite(v)]


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return DASH
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.{digits}f}"


def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _norm_dataset(name: str) -> str:
    # "SciFact", "scifact" and "/data/beir/scifact" are one dataset; "NanoSciFact" stays apart on purpose:
    # NanoBEIR scores are not comparable with the paper's full-BEIR numbers.
    return re.sub(r"[^a-z0-9]", "", Path(str(name)).name.lower())


def _is_metric(key: str) -> bool:
    # metrics are named name@cutoff; a dataset's entry also holds counts ("queries", "documents") and labels
    return "@" in str(key)


def _eval_scale(ev: dict) -> float:
    vals = [
        v
        for d in list((ev.get("datasets") or {}).values()) + [ev.get("average") or {}]
        if isinstance(d, dict)
        for v in _finite(x for key, x in d.items() if _is_metric(key))
    ]
    return 100.0 if vals and max(abs(v) for v in vals) <= 1.0 else 1.0


def _pct(v: Any) -> float | None:
    """A reference figure in percent (recipes write 55.43; a fraction 0.5543 is accepted too)."""
    v = _num(v)
    if v is None:
        return None
    return v * 100.0 if abs(v) <= 1.0 else v


def _phase_budget(data: dict, name: str) -> float | None:
    # Same rule as Manifest.budget: a budget raised on the command line wins over the recipe's.
    p = data["phases"][name]
    if p.get("budget_gpu_hours") is not None:
        return _num(p["budget_gpu_hours"])
    return _num(((data.get("recipe") or {}).get("phases") or {}).get(name, {}).get("budget_gpu_hours"))


def _run_budget(data: dict) -> float | None:
    # Same rule as Manifest.run_budget.
    return _num(data.get("budget_gpu_hours") or (data.get("recipe") or {}).get("budget_gpu_hours"))


def _phase_gpu_hours(p: dict) -> float:
    return sum(_num(a.get("gpu_hours")) or 0.0 for a in p.get("attempts") or [])


def _check_manifest_data(data: Any, where: str = "manifest") -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("phases"), dict):
        raise ReportError(f"{where}: not a colbertzero manifest (no 'phases' mapping)")
    if not data["phases"]:
        raise ReportError(f"{where}: the manifest lists no phases")
    if not all(isinstance(p, dict) for p in data["phases"].values()):
        raise ReportError(f"{where}: a phase record is not a mapping; the manifest is damaged")
    return data


# ---------------------------------------------------------------- evaluation results
@dataclass
class EvalView:
    """One phase's eval, metrics in percent: per dataset {metric: value}, the average, and per dataset what else
    the evaluator said (query and document counts, the retrieval backend) as it said it."""

    model: str | None
    datasets: dict[str, dict[str, float | None]]
    average: dict[str, float | None]
    details: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, ev: Any) -> "EvalView | None":
        if not isinstance(ev, dict) or not isinstance(ev.get("datasets"), dict):
            return None
        k = _eval_scale(ev)
        ds, details = {}, {}
        for name, m in ev["datasets"].items():
            m = m if isinstance(m, dict) else {}
            ds[str(name)] = {key: _num(v) * k for key, v in m.items() if _is_metric(key) and _num(v) is not None}
            details[str(name)] = {key: v for key, v in m.items() if not _is_metric(key)}
        avg_raw = ev.get("average") if isinstance(ev.get("average"), dict) else {}
        avg = {key: _num(v) * k for key, v in avg_raw.items() if _is_metric(key) and _num(v) is not None}
        for metric in METRICS:  # an eval without an "average" block still has one
            if metric not in avg:
                vals = _finite(d.get(metric) for d in ds.values())
                if vals and len(vals) == len(ds):
                    avg[metric] = statistics.fmean(vals)
        return cls(model=ev.get("model"), datasets=ds, average=avg, details=details)


def _reference(ref: Any) -> dict:
    ref = ref if isinstance(ref, dict) else {}
    return {
        "average": _pct(ref.get("beir_ndcg10")),
        "datasets": {str(k): _pct(v) for k, v in (ref.get("per_dataset") or {}).items() if _pct(v) is not None},
        "gpu_hours": _num(ref.get("gpu_hours")),
        "hardware": ref.get("hardware"),
        "note": ref.get("note"),
    }


def _merge_refs(first: dict, second: dict) -> dict:
    """Reference of the final model: the phase's own figures, completed by the run-wide ones."""
    out = dict(second)
    for k, v in first.items():
        if k == "datasets":
            out[k] = {**second.get("datasets", {}), **v}
        elif v is not None:
            out[k] = v
    return out


def _has_ref(ref: dict) -> bool:
    return ref.get("average") is not None or bool(ref.get("datasets"))


# ---------------------------------------------------------------- training logs
def read_train_log(path: str | Path) -> tuple[list[dict], int]:
    """Records of a ``train.jsonl`` by step (a resumed attempt re-logs steps: its later record wins) + bad lines.

    A writer killed mid-line leaves a truncated last line; it is counted, not fatal.
    """
    by_step: dict[int, dict] = {}
    bad = 0
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    with f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(r, dict) or _num(r.get("step")) is None:
                bad += 1
                continue
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)], bad


def _median(xs: Iterable[Any]) -> float | None:
    v = _finite(xs)
    return statistics.median(v) if v else None


def _training_summary(records: list[dict], bad: int) -> dict:
    if not records:
        return {"logged_steps": 0, "bad_lines": bad}
    losses = [_num(r.get("loss")) for r in records]
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    head, tail = finite[:5], finite[-5:]
    last = records[-1]
    t0, t1 = records[0].get("time"), last.get("time")
    wall = None
    try:
        if t0 and t1:
            wall = (parse_iso(t1) - parse_iso(t0)).total_seconds()
    except (TypeError, ValueError):
        pass
    return {
        "logged_steps": len(records),
        "first_step": int(records[0]["step"]),
        "last_step": int(last["step"]),
        "total_steps": last.get("total_steps"),
        # means of the first/last few logged losses: one logged step is too noisy to compare
        "loss_start": statistics.fmean(head) if head else None,
        "loss_end": statistics.fmean(tail) if tail else None,
        "non_finite_losses": sum(1 for x in losses if x is not None and not math.isfinite(x)),
        "lr_last": _num(last.get("lr")),
        "temperature_last": _num(last.get("temperature")),
        # medians: the first step (compilation, cache warm-up) and resume steps are outliers
        "samples_per_s": _median(r.get("samples_per_s") for r in records),
        "tokens_per_s": _median(r.get("tokens_per_s") for r in records),
        "mfu": _median(r.get("mfu") for r in records),
        "consumed": last.get("consumed") if isinstance(last.get("consumed"), dict) else {},
        "attempts_logged": list(dict.fromkeys(str(r.get("attempt")) for r in records if r.get("attempt") is not None)),
        "wall_s": wall,
        "bad_lines": bad,
    }


# ---------------------------------------------------------------- one run
@dataclass
class RunView:
    run_dir: Path
    label: str
    data: dict
    logs: dict[str, list[dict]] = field(default_factory=dict)
    bad_lines: dict[str, int] = field(default_factory=dict)
    eval_logs: dict[str, list[dict]] = field(default_factory=dict)  # in-training evals: step, ndcg@10 (%)
    init_eval: dict | None = None

    @property
    def phases(self) -> list[str]:
        return list(self.data["phases"])

    @property
    def recipe(self) -> dict:
        return self.data.get("recipe") or {}

    @property
    def recipe_name(self) -> str:
        return str(self.recipe.get("name") or self.run_dir.name)

    def phase_reference(self, name: str) -> dict:
        return _reference(((self.recipe.get("phases") or {}).get(name) or {}).get("reference"))

    def run_reference(self) -> dict:
        return _reference(self.recipe.get("reference"))

    def final_phase(self) -> str:
        return self.phases[-1]

    def reference_for(self, name: str) -> dict:
        """The paper's figures for the model out of phase ``name``; the last phase's model is the pipeline's."""
        ref = self.phase_reference(name)
        if name == self.final_phase():
            ref = _merge_refs(ref, self.run_reference())
        return ref

    def eval(self, name: str) -> EvalView | None:
        return EvalView.of(self.data["phases"][name].get("eval"))


def read_run_manifest(run_dir: str | Path) -> dict:
    """The manifest data of a run dir (for `status`), with a clear error for anything that is not a run dir."""
    return load_run(run_dir, logs=False).data


def load_run(run_dir: str | Path, logs: bool = True) -> RunView:
    p = Path(run_dir)
    if not p.exists():
        raise ReportError(f"{p}: no such run dir")
    if not p.is_dir():
        raise ReportError(f"{p}: not a directory (expected a colbertzero run dir holding {MANIFEST})")
    path = p / MANIFEST
    if not path.is_file():
        raise ReportError(f"{p}: no {MANIFEST}; not a colbertzero run dir (create one with `colbertzero launch`)")
    # Read without the manifest lock: writers replace the file atomically, so a reader never sees half of one, and
    # taking the lock needs write access (a colleague's run dir, a read-only copy of results).
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: corrupt manifest ({e}); it is left untouched") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ReportError(f"{path}: not a colbertzero manifest (format {fmt!r}, expected {MANIFEST_FORMAT!r})")
    _check_manifest_data(data, str(path))
    run = RunView(run_dir=p.resolve(), label=p.resolve().name, data=data)
    for name in run.phases if logs else ():
        run.logs[name], run.bad_lines[name] = read_train_log(p / "phases" / name / "logs" / "train.jsonl")
        evals, _ = read_train_log(p / "phases" / name / "logs" / "eval.jsonl")
        run.eval_logs[name] = [{"step": e["step"], "ndcg@10": (EvalView.of(e).average.get("ndcg@10") if
                                EvalView.of(e) else None), "attempt": e.get("attempt")} for e in evals]
    if logs and (p / INIT_EVAL).is_file():
        try:
            init = json.loads((p / INIT_EVAL).read_text())
        except (OSError, json.JSONDecodeError):
            init = None  # unreadable: no init row rather than no report
        if isinstance(init, dict) and init.get("recipe_hash") == data.get("recipe_hash"):
            run.init_eval = init
    return run


# ---------------------------------------------------------------- status (`colbertzero status`)
def _budget_cell(used: float, budget: float | None) -> str:
    return f"{used:.2f} / {_fmt(budget)}"


def status_json(manifest_data: dict) -> dict:
    """Machine-readable run status from manifest data (as ``Manifest.read()`` returns it)."""
    data = _check_manifest_data(manifest_data)
    phases = []
    for name, p in data["phases"].items():
        attempts = p.get("attempts") or []
        cks = p.get("checkpoints") or []
        ev = EvalView.of(p.get("eval"))
        steps = [int(c["step"]) for c in cks if _num(c.get("step")) is not None]
        phases.append(
            {
                "name": name,
                "kind": p.get("kind"),
                "state": p.get("state"),
                "step": p.get("step"),
                "total_steps": p.get("total_steps"),
                "checkpoints": len(cks),
                "newest_checkpoint_step": max(steps) if steps else None,
                "export": (p.get("export") or {}).get("path"),
                "gpu_hours": _phase_gpu_hours(p),
                "budget_gpu_hours": _phase_budget(data, name),
                "attempts": len(attempts),
                "last_attempt": attempts[-1] if attempts else None,
                "ndcg10": ev.average.get("ndcg@10") if ev else None,  # percent
                "eval_datasets": sorted(ev.datasets) if ev else [],
                "failure": p.get("failure"),
            }
        )
    return {
        "recipe": (data.get("recipe") or {}).get("name"),
        "recipe_hash": data.get("recipe_hash"),
        "created": data.get("created"),
        "updated": data.get("updated"),
        "gpu_hours": sum(ph["gpu_hours"] for ph in phases),
        "budget_gpu_hours": _run_budget(data),
        "phases": phases,
    }


def status_table(manifest_data: dict) -> str:
    """The run's status for a person: one line per phase, totals, then failures."""
    s = status_json(manifest_data)
    header = ["phase", "kind", "state", "steps", "checkpoints", "GPU-h used / budget", "attempts", "nDCG@10"]
    rows = []
    for ph in s["phases"]:
        total = ph["total_steps"]
        steps = f"{ph['step'] or 0}/{total if total is not None else DASH}"
        ck = DASH if not ph["checkpoints"] else f"{ph['checkpoints']} (newest {ph['newest_checkpoint_step']})"
        la = ph["last_attempt"]
        attempts = DASH if not ph["attempts"] else f"{ph['attempts']} (last: {(la or {}).get('exit_state') or '?'})"
        rows.append(
            [
                ph["name"],
                ph["kind"] or DASH,
                ph["state"] or DASH,
                steps,
                ck,
                _budget_cell(ph["gpu_hours"], ph["budget_gpu_hours"]),
                attempts,
                _fmt(ph["ndcg10"]),
            ]
        )
    total_attempts = sum(ph["attempts"] for ph in s["phases"])
    rows.append(["total", "", "", "", "", _budget_cell(s["gpu_hours"], s["budget_gpu_hours"]), str(total_attempts), ""])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()

    out = [
        f"run: {s['recipe'] or '?'}  (recipe {str(s['recipe_hash'] or '?')[:12]}, updated {s['updated'] or '?'})",
        line(header),
        line(["-" * w for w in widths]),
    ]
    out += [line(r) for r in rows[:-1]]
    out += [line(["-" * w for w in widths]), line(rows[-1])]
    for ph in s["phases"]:
        f = ph["failure"]
        if f:
            out.append(
                f"! {ph['name']}: {ph['state']} at step {f.get('step', '?')}"
                + (f" (source {f['source']})" if f.get("source") else "")
                + f": {f.get('reason', '?')}"
            )
        if ph["state"] == "over-budget":
            out.append(
                f"! {ph['name']}: over budget ({ph['gpu_hours']:.2f} of {_fmt(ph['budget_gpu_hours'])} GPU-h); "
                f"raise it to continue"
            )
    return "\n".join(out)


# ---------------------------------------------------------------- results table (the paper's shape)
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


def _results(runs: list[RunView]) -> list[dict]:
    rows = []
    if len(runs) > 1:  # the comparison first: each pipeline's final model
        rows += [_result_row(r, r.final_phase(), "final") for r in runs]
    for r in runs:
        rows += [_init_row(r)] if r.init_eval else []  # the starting model: what training added
        rows += [_result_row(r, ph, "phase") for ph in r.phases]
    return rows


def _dataset_columns(rows: list[dict]) -> list[str]:
    seen: dict[str, str] = {}
    for row in rows:
        for d in row["datasets"]:
            seen.setdefault(_norm_dataset(d), d)
    return list(seen.values())


def _ours_for(row: dict, col: str) -> float | None:
    for d, v in row["datasets"].items():
        if _norm_dataset(d) == _norm_dataset(col):
            return v
    return None


def _ref_for(row: dict, col: str) -> float | None:
    for d, v in row["reference"]["datasets"].items():
        if _norm_dataset(d) == _norm_dataset(col):
            return v
    return None


def _results_markdown(rows: list[dict], several: bool) -> str:
    cols = _dataset_columns(rows)
    header = (["Run"] if several else []) + ["Phase"] + cols + ["Average", "Paper avg", "Δ vs paper"]
    body = []
    for row in rows:
        cells = []
        for c in cols:
            ours, ref = _ours_for(row, c), _ref_for(row, c)
            cells.append(_fmt(ours) + (f" ({_fmt(ref)})" if ref is not None else ""))
        ref_avg = row["reference"]["average"]
        delta = row["average"] - ref_avg if row["average"] is not None and ref_avg is not None else None
        phase = row["phase"] + (" (final)" if row["final"] and row["block"] == "phase" else "")
        body.append(
            ([row["run"]] if several else [])
            + [phase]
            + cells
            + [_fmt(row["average"]), _fmt(ref_avg), (f"{delta:+.2f}" if delta is not None else DASH)]
        )
    return _md_table(header, body)


# ---------------------------------------------------------------- figures
def _figure(w: float, h: float):
    # The object API with no pyplot: no global backend switch or figure registry in the caller's process.
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _png(fig) -> bytes:
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


def _series_figure(runs: list[RunView], keys: list[tuple[str, str]], title: str, smooth: bool = False,
                   source: str = "logs"):
    """One column per phase, one row per metric key; one line per run. None when no run has any of it.
    ``source``: the RunView records to plot (``logs``: train.jsonl; ``eval_logs``: in-training evaluations)."""
    phases = _phase_union(runs)
    logs = {run.label: getattr(run, source) for run in runs}
    have = any(_finite(r.get(k) for r in logs[run.label].get(ph, [])) for run in runs for ph in phases
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
                recs = [r for r in logs[run.label].get(ph, []) if _num(r.get(key)) is not None]
                if not recs:
                    continue
                xs = [int(r["step"]) for r in recs]
                ys = [_num(r[key]) for r in recs]
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
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[k % 10], linewidth=1.6) for k in range(len(runs))]
        fig.legend(handles, [r.label for r in runs], loc="outside right upper", fontsize=8)
    fig.suptitle(title + ("  (dotted: resumed attempt)" if any(
        _resume_steps(logs[r.label].get(ph, [])) for r in runs for ph in phases) else ""))
    return fig


def _ledger(run: RunView) -> list[dict]:
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
        cum += _num(e["attempt"].get("gpu_hours")) or 0.0
        e["cumulative"] = cum
    return out


def _gpu_hours_figure(runs: list[RunView]):
    ledgers = [_ledger(r) for r in runs]
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
            ax.bar(x, _num(e["attempt"].get("gpu_hours")) or 0.0, color=pcolor[ph], alpha=0.75,
                   label=ph if ph not in seen else None)
            seen.add(ph)
        ax.step(xs, [e["cumulative"] for e in led], where="mid", color="black", linewidth=1.5, label="cumulative")
        ax.plot(xs, [e["cumulative"] for e in led], "o", color="black", markersize=3)
        # A phase's budget line sits at (GPU-hours spent before the phase) + (its budget): where the cumulative
        # curve would cross it is where that phase runs out.
        for ph in run.phases:
            b = _phase_budget(run.data, ph)
            idx = [k for k, e in enumerate(led) if e["phase"] == ph]
            if b is None or not idx:
                continue
            base = led[idx[0]]["cumulative"] - (_num(led[idx[0]]["attempt"].get("gpu_hours")) or 0.0)
            ax.hlines(base + b, xs[idx[0]] - 0.45, xs[idx[-1]] + 0.45, colors=pcolor[ph], linestyles="--",
                      label=f"{ph} budget")
        rb = _run_budget(run.data)
        if rb is not None:
            ax.axhline(rb, color="red", linestyle="--", linewidth=1.2, label="run budget")
        ax.set_xticks(xs, [f"{e['phase']}\n#{e['index'] + 1}" for e in led], fontsize=7)
        ax.set_ylabel("GPU-hours")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: budget lines sit up top
    return fig


def _ndcg_figure(rows: list[dict]):
    rows = [r for r in rows if r["datasets"]]
    if not rows:
        return None
    cols = _dataset_columns(rows) + ["average"]
    n = len(rows)
    width = 0.8 / n
    fig = _figure(max(6.0, 0.9 * len(cols) * max(1, n) ** 0.5 + 2), 4.0)
    ax = fig.subplots()
    ref_labelled = False
    for k, row in enumerate(rows):
        xs = [c + (k - (n - 1) / 2) * width for c in range(len(cols))]
        ours = [(_ours_for(row, c) if c != "average" else row["average"]) for c in cols]
        refs = [(_ref_for(row, c) if c != "average" else row["reference"]["average"]) for c in cols]
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


# ---------------------------------------------------------------- the report
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
        st = status_json(r.data)
        phases = {}
        for ph in st["phases"]:
            name = ph["name"]
            ev = r.eval(name)
            phases[name] = {
                **ph,
                "training": _training_summary(r.logs.get(name, []), r.bad_lines.get(name, 0)),
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
    md = [f"# colbertzero report", "", f"Generated {report['generated']}.", ""]

    md += ["## Runs", ""]
    md.append(
        _md_table(
            ["Run", "Recipe", "Phases", "States", "GPU-h used / budget", "Paper GPU-h", "Run dir"],
            [
                [
                    r.label,
                    r.recipe_name,
                    " → ".join(r.phases),
                    ", ".join(f"{n}: {p.get('state', DASH)}" for n, p in r.data["phases"].items()),
                    _budget_cell(sum(_phase_gpu_hours(p) for p in r.data["phases"].values()), _run_budget(r.data)),
                    _fmt(r.run_reference()["gpu_hours"]),
                    f"`{r.run_dir}`",
                ]
                for r in runs
            ],
        )
    )
    md.append("")
    for r in runs:
        md += [f"### Status: {r.label}", "", "```", status_table(r.data), "```", ""]

    md += ["## Results: nDCG@10", ""]
    md.append(
        "Ours in percent; the paper's figure for the same dataset, from the recipe's `reference` fields, in "
        "parentheses. `Paper avg` is the paper's BEIR average for that model"
        + "."
    )
    md.append("")
    if any(row["datasets"] or _has_ref(row["reference"]) for row in rows):
        if several:
            md += ["### Final models", "", _results_markdown([r for r in rows if r["block"] == "final"], True), ""]
            md += ["### Per phase", ""]
        md.append(_results_markdown([r for r in rows if r["block"] == "phase"], several))
        covered = sorted({row["n_datasets"] for row in rows if row["n_datasets"]})
        if covered and any(row["reference"]["average"] is not None for row in rows):
            md += [
                "",
                f"Our average covers the {'/'.join(map(str, covered))} dataset(s) evaluated; the paper's covers "
                f"its full BEIR set, so Δ compares like with like only when the dataset lists match.",
            ]
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
                + [_fmt(ev.average.get(m)) if ev else DASH for m in METRICS]
            )
    md.append(_md_table((["Run"] if several else []) + ["Phase", "Model", "Datasets", *METRICS], metric_rows))
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
                    + [_fmt(m.get(x)) for x in METRICS]
                    + [extra.get("queries", DASH), extra.get("documents", DASH)]
                )
    if detail:
        md += ["### Per dataset", ""]
        md.append(
            _md_table((["Run"] if several else []) + ["Phase", "Dataset", *METRICS, "Queries", "Documents"], detail)
        )
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
            loss = f"{_fmt(s['loss_start'], 4)} → {_fmt(s['loss_end'], 4)}"
            if s["non_finite_losses"]:
                loss += f" ({s['non_finite_losses']} non-finite)"
            train_rows.append(
                ([r.label] if several else [])
                + [
                    ph,
                    f"{s['last_step']}/{s['total_steps'] if s['total_steps'] is not None else DASH}",
                    loss,
                    f"{s['lr_last']:.3g}" if s["lr_last"] is not None else DASH,
                    _fmt(s["samples_per_s"], 1),
                    _fmt(s["tokens_per_s"], 0),
                    _fmt(s["mfu"] * 100 if s["mfu"] is not None else None, 1),
                    consumed or DASH,
                ]
            )
            if s["bad_lines"]:
                train_rows[-1][-1] += f" ({s['bad_lines']} unreadable log lines skipped)"
    md.append(
        _md_table(
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
        for e in _ledger(r):
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
                    _fmt((_num(a.get("elapsed_s")) or 0.0) / 3600.0),
                    _fmt(_num(a.get("gpu_hours"))),
                    _fmt(e["cumulative"]),
                    a.get("exit_state") or DASH,
                    f"{a.get('step_start', '?')} → {a.get('step_end', '?')}",
                ]
            )
    if ledger_rows:
        md.append(
            _md_table(
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
                + [ph, _budget_cell(_phase_gpu_hours(p), _phase_budget(r.data, ph)), _fmt(ref["gpu_hours"]),
                   ref["hardware"] or DASH]
            )
    md.append(
        _md_table(
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
    _labels_unique(runs)
    out = Path(out_dir) if out_dir is not None else runs[0].run_dir / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    rows = _results(runs)
    figs = {
        "loss.png": _series_figure(runs, [("loss", "loss")], "Training loss", smooth=True),
        "lr.png": _series_figure(runs, [("lr", "learning rate")], "Learning rate"),
        "throughput.png": _series_figure(
            runs, [("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s")], "Throughput"
        ),
        "gpu_hours.png": _gpu_hours_figure(runs),
        "ndcg10.png": _ndcg_figure([r for r in rows if r["block"] == "final"] if len(runs) > 1 else rows),
        "ndcg10_in_training.png": _series_figure(
            runs, [("ndcg@10", "nDCG@10 (%)")], "In-training evaluation (average of eval.in_training)",
            source="eval_logs"),
    }
    written = []
    for name in FIGURES:
        fig = figs.get(name)
        if fig is None:
            (out / name).unlink(missing_ok=True)  # an older report's figure would no longer match the data
            continue
        atomic_write_bytes(out / name, _png(fig))
        written.append(name)
    report = _report_json(runs, rows, written)
    atomic_write_bytes(
        out / "report.json", (json.dumps(_strict_json(report), indent=2, default=str, allow_nan=False) + "\n").encode()
    )
    atomic_write_bytes(out / "report.md", (_markdown(runs, rows, written, report) + "\n").encode())
    return out / "report.md"
