"""What a report reads from a run dir: the manifest (without its lock), the training and evaluation logs, and the
views the tables and figures are made from; shared formatting helpers.

Scale: evaluators report metrics as fractions (0.5543) while the paper and recipes' ``reference`` fields use
percentages (55.43); everything shown is in percent (a metric set whose values are all ≤ 1 is multiplied by 100).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..files import parse_iso
from ..layout import RunLayout
from ..manifest import Manifest, ManifestError

DASH = "—"
REPORT_FORMAT = "colbertzero-report/1"
METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")
# Every figure this module may write; stale ones from an earlier report are removed when not produced again.
FIGURES = ("loss.png", "lr.png", "throughput.png", "gpu_hours.png", "ndcg10.png", "ndcg10_in_training.png")


class ReportError(ManifestError):
    """A run dir or manifest that cannot be reported on; the message says which and why.

    A ManifestError, so the CLI's handler for a bad run dir prints it without a traceback."""


# ---------------------------------------------------------------- small helpers
def num(x: Any) -> float | None:
    """A real number (NaN/inf kept: a diverged loss must show), or None for anything else."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def finite(xs: Iterable[Any]) -> list[float]:
    return [v for v in (num(x) for x in xs) if v is not None and math.isfinite(v)]


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return DASH
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.{digits}f}"


def md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def norm_dataset(name: str) -> str:
    # "SciFact", "scifact" and "/data/beir/scifact" are one dataset; "NanoSciFact" stays apart on purpose:
    # NanoBEIR scores are not comparable with the paper's full-BEIR numbers.
    return re.sub(r"[^a-z0-9]", "", Path(str(name)).name.lower())


def is_metric(key: str) -> bool:
    # metrics are named name@cutoff; a dataset's entry also holds counts ("queries", "documents") and labels
    return "@" in str(key)


def _eval_scale(ev: dict) -> float:
    vals = [
        v
        for d in list((ev.get("datasets") or {}).values()) + [ev.get("average") or {}]
        if isinstance(d, dict)
        for v in finite(x for key, x in d.items() if is_metric(key))
    ]
    return 100.0 if vals and max(abs(v) for v in vals) <= 1.0 else 1.0


def pct(v: Any) -> float | None:
    """A reference figure in percent (recipes write 55.43; a fraction 0.5543 is accepted too)."""
    v = num(v)
    if v is None:
        return None
    return v * 100.0 if abs(v) <= 1.0 else v


def check_manifest_data(data: Any, where: str = "manifest") -> dict:
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
            ds[str(name)] = {key: num(v) * k for key, v in m.items() if is_metric(key) and num(v) is not None}
            details[str(name)] = {key: v for key, v in m.items() if not is_metric(key)}
        avg_raw = ev.get("average") if isinstance(ev.get("average"), dict) else {}
        avg = {key: num(v) * k for key, v in avg_raw.items() if is_metric(key) and num(v) is not None}
        for metric in METRICS:  # an eval without an "average" block still has one
            if metric not in avg:
                vals = finite(d.get(metric) for d in ds.values())
                if vals and len(vals) == len(ds):
                    avg[metric] = statistics.fmean(vals)
        return cls(model=ev.get("model"), datasets=ds, average=avg, details=details)


def reference_of(ref: Any) -> dict:
    ref = ref if isinstance(ref, dict) else {}
    return {
        "average": pct(ref.get("beir_ndcg10")),
        "datasets": {str(k): pct(v) for k, v in (ref.get("per_dataset") or {}).items() if pct(v) is not None},
        "gpu_hours": num(ref.get("gpu_hours")),
        "hardware": ref.get("hardware"),
        "note": ref.get("note"),
    }


def merge_refs(first: dict, second: dict) -> dict:
    """Reference of the final model: the phase's own figures, completed by the run-wide ones."""
    out = dict(second)
    for k, v in first.items():
        if k == "datasets":
            out[k] = {**second.get("datasets", {}), **v}
        elif v is not None:
            out[k] = v
    return out


def has_ref(ref: dict) -> bool:
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
            if not isinstance(r, dict) or num(r.get("step")) is None:
                bad += 1
                continue
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)], bad


def median(xs: Iterable[Any]) -> float | None:
    v = finite(xs)
    return statistics.median(v) if v else None


def training_summary(records: list[dict], bad: int) -> dict:
    if not records:
        return {"logged_steps": 0, "bad_lines": bad}
    losses = [num(r.get("loss")) for r in records]
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
        "lr_last": num(last.get("lr")),
        "temperature_last": num(last.get("temperature")),
        # medians: the first step (compilation, cache warm-up) and resume steps are outliers
        "samples_per_s": median(r.get("samples_per_s") for r in records),
        "tokens_per_s": median(r.get("tokens_per_s") for r in records),
        "mfu": median(r.get("mfu") for r in records),
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
    live: dict[str, tuple[str, str]] = field(default_factory=dict)  # open helper jobs, as Slurm sees them

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
        return reference_of(((self.recipe.get("phases") or {}).get(name) or {}).get("reference"))

    def run_reference(self) -> dict:
        return reference_of(self.recipe.get("reference"))

    def final_phase(self) -> str:
        return self.phases[-1]

    def reference_for(self, name: str) -> dict:
        """The paper's figures for the model out of phase ``name``; the last phase's model is the pipeline's."""
        ref = self.phase_reference(name)
        if name == self.final_phase():
            ref = merge_refs(ref, self.run_reference())
        return ref

    def eval(self, name: str) -> EvalView | None:
        return EvalView.of(self.data["phases"][name].get("eval"))


def read_run_manifest(run_dir: str | Path) -> dict:
    """The manifest data of a run dir (for `status`), with a clear error for anything that is not a run dir."""
    return load_run(run_dir, logs=False).data


def load_run(run_dir: str | Path, logs: bool = True) -> RunView:
    # Manifest.snapshot: no lock, so a colleague's run dir or a read-only copy of results reads too.
    p = Path(run_dir)
    try:
        data = Manifest(p).snapshot()
    except ManifestError as e:
        raise ReportError(str(e)) from None
    layout = RunLayout.of(p)
    run = RunView(run_dir=layout.root, label=layout.root.name, data=check_manifest_data(data, str(layout.manifest)))
    for name in run.phases if logs else ():
        run.logs[name], run.bad_lines[name] = read_train_log(layout.phase(name).train_log)
        evals, _ = read_train_log(layout.phase(name).eval_log)
        run.eval_logs[name] = [{"step": e["step"], "ndcg@10": (EvalView.of(e).average.get("ndcg@10") if
                                EvalView.of(e) else None), "attempt": e.get("attempt")} for e in evals]
    if logs and layout.eval_init.is_file():
        try:
            init = json.loads(layout.eval_init.read_text())
        except (OSError, json.JSONDecodeError):
            init = None  # unreadable: no init row rather than no report
        if isinstance(init, dict) and init.get("recipe_hash") == data.get("recipe_hash"):
            run.init_eval = init
    return run


def data_summary(run: RunView, phase: str) -> dict[str, dict]:
    """{source: {rows, dropped}} of a phase's prepared sources, from the shard indexes its lineage names (nothing
    `prepare` dropped goes unreported)."""
    out = {}
    for path in (run.data["phases"][phase].get("lineage") or {}).get("data_index") or []:
        try:
            index = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        out[str(index.get("source") or Path(path).parent.name)] = {"rows": index.get("rows"),
                                                                    "dropped": index.get("dropped") or {}}
    return out
