"""The GPU-hour projection behind `plan` (and `validate`'s budget check): rows and steps of each phase from its
prepared shards (or the recipe's expected rows), its step time (measured in the run, from `tools/bench/gpu.sh`, or the
paper's GPU-hours spread over our steps), the projected GPU-hours against budgets (the ledger's rules), and the table
`colbertzero plan` prints."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from . import cluster, ledger
from .data import shards
from .data.schedule import batches_per_source
from .recipe import Phase, Recipe, RecipeError, parse_time_limit


@dataclass
class PhasePlan:
    name: str
    kind: str
    gpus: int
    total_steps: int | None
    rows: int | None
    rows_from: str  # "shard index" | "recipe expected_rows" | "unknown"
    seconds_per_step: float | None
    seconds_per_step_from: str  # "measured" | "paper reference" | "unknown"
    projected_gpu_hours: float
    projected_from: str
    budget_gpu_hours: float | None
    used_gpu_hours: float


# ----------------------------------------------------------------- data sizes
def source_rows(phase: Phase) -> list[int] | None:
    """Rows of each source from the prepared shard indexes, or None when any source is not prepared."""
    rows = []
    for src in phase.data.sources:
        idx = shards.index_path(shards.source_dir(phase.data, src.name))
        try:
            rows.append(int(json.loads(idx.read_text())["rows"]))
        except (OSError, ValueError, KeyError):
            return None
    return rows


def source_drops(phase: Phase) -> dict[str, dict]:
    """What `prepare` dropped from each prepared source (rows, negatives), from the shard indexes."""
    out = {}
    for src in phase.data.sources:
        try:
            index = json.loads(shards.index_path(shards.source_dir(phase.data, src.name)).read_text())
        except (OSError, ValueError):
            continue
        if index.get("dropped"):
            out[src.name] = index["dropped"]
    return out


def shard_rows(phase: Phase) -> int | None:
    """Rows over all sources from the prepared shard indexes, or None when any source is not prepared."""
    rows = source_rows(phase)
    return None if rows is None else sum(rows)


def phase_rows(phase: Phase) -> tuple[int | None, str]:
    rows = shard_rows(phase)
    if rows is not None:
        return rows, "shard index"
    if phase.data.expected_rows:
        return phase.data.expected_rows, "recipe expected_rows"
    return None, "unknown"


def total_steps(phase: Phase, rows: int | None) -> int | None:
    """The phase's optimizer steps: the loader's own count once the shards are prepared (each source drops its last
    partial batch), else an estimate from ``rows`` (expected_rows)."""
    per_source = source_rows(phase)
    if per_source is not None:
        steps = int(batches_per_source(phase.data, per_source, phase.global_batch_size).sum())
    elif rows is None:
        return phase.max_steps
    else:
        steps = math.floor(rows * phase.data.epochs / phase.global_batch_size)
    return min(steps, phase.max_steps) if phase.max_steps else steps


# ----------------------------------------------------------------- projection
def bench_seconds_per_step(bench: dict | None, phase: Phase, gpus: int) -> float | None:
    """A phase's step time from tools/bench/gpu.sh's JSON (pairs/s on one GPU for the phase's kind), scaled to the
    phase's GPUs as if throughput were linear in them (the communication of a multi-node step is not in it)."""
    res = ((bench or {}).get("kinds") or {}).get(phase.kind) or {}
    rate = res.get("pairs_per_s")
    if not rate or rate <= 0:
        return None
    return phase.global_batch_size / (float(rate) * gpus)


def read_gpu_bench(path: str) -> dict:
    """tools/bench/gpu.sh's gpu.json; a clear refusal for anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"--gpu-bench {path}: cannot read it as the JSON of tools/bench/gpu.sh ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("kinds"), dict):
        raise RecipeError(f"--gpu-bench {path}: no 'kinds' in it: not the JSON of tools/bench/gpu.sh")
    if data.get("device") in (None, "cpu") or "tiny" in str(data.get("model", "")):
        raise RecipeError(f"--gpu-bench {path}: measured on {data.get('device') or 'an unnamed device'}"
                          f"{' at tiny shapes' if 'tiny' in str(data.get('model', '')) else ''}: not a GPU's figures "
                          "at the paper's shapes; use the gpu.json of `bash tools/bench/gpu.sh` on a GPU")
    return data


def plan_phase(recipe: Recipe, name: str, manifest_data: dict | None = None, bench: dict | None = None) -> PhasePlan:
    ph = recipe.phase(name)
    rows, rows_from = phase_rows(ph)
    steps = total_steps(ph, rows)
    n = ledger.phase_units(ph.resources)
    data = recipe_ledger_data(recipe, manifest_data)
    mrec = data["phases"].get(name, {})
    used = ledger.record_gpu_hours(mrec)
    budget = ledger.phase_budget(data, name)
    sps, sps_from = None, "unknown"
    thr = mrec.get("throughput") or {}
    if thr.get("seconds_per_step"):
        sps, sps_from = float(thr["seconds_per_step"]), "measured"
    elif bench_seconds_per_step(bench, ph, n) is not None:
        sps = bench_seconds_per_step(bench, ph, n)
        sps_from = f"GPU bench on {bench.get('device') or 'a GPU'}"
    elif ph.reference.gpu_hours and steps:
        # The paper's GPU-hours spread over our step count on our GPU count: a first estimate before any run.
        sps, sps_from = ph.reference.gpu_hours / ledger.gpu_hours(n, steps), "paper reference"
    if sps is not None and steps:
        done = mrec.get("step", 0) or 0
        projected = used + ledger.gpu_hours(n, (steps - done) * sps)
        how = f"{steps - done} steps × {sps:.2f} s/step ({sps_from}) × {n} GPUs"
        if used:
            how += f" + {used:.2f} used"
    else:
        projected = used + ledger.gpu_hours(n, parse_time_limit(ph.resources.time_limit))
        how = f"one allocation: {n} GPUs × time limit {ph.resources.time_limit}"
    return PhasePlan(name, ph.kind, n, steps, rows, rows_from, sps, sps_from, projected, how, budget, used)


def recipe_ledger_data(recipe: Recipe, manifest_data: dict | None) -> dict:
    """Manifest data to ask the ledger with: the run's own, or (before a run exists) the recipe alone."""
    data = dict(manifest_data or {})
    data.setdefault("phases", {})
    data["recipe"] = recipe.resolved()
    return data


def plan(recipe: Recipe, manifest_data: dict | None = None, bench: dict | None = None) -> dict:
    phases = [plan_phase(recipe, n, manifest_data, bench) for n in recipe.phases]
    run_budget = ledger.run_budget(recipe_ledger_data(recipe, manifest_data))
    return {
        "recipe": recipe.name,
        "recipe_hash": recipe.hash(),
        "source": recipe.source_path,
        "reference": recipe.reference.model_dump(),
        "phases": {
            p.name: {**asdict(p), "hyperparameters": _hparams(recipe.phase(p.name)),
                     "dropped": source_drops(recipe.phase(p.name))} for p in phases
        },
        "projected_gpu_hours": sum(p.projected_gpu_hours for p in phases),
        "budget_gpu_hours": run_budget,
        "cluster": cluster_settings(recipe),
        "resolved": recipe.resolved(),
    }


def cluster_settings(recipe: Recipe) -> dict | None:
    """The cluster profile as resolved: every setting it touches with its value and where the value came from (the
    profile's file, or the recipe over it), and a phase task's command line as srun will run it."""
    c = recipe.cluster
    if c is None:
        return None
    prov = recipe.provenance
    settings = []
    for key in ("container", "environment", "setup", "srun_args", "require_network"):
        value = getattr(c, key)
        if value:
            settings.append({"field": f"cluster.{key}", "value": value.model_dump(exclude_defaults=True)
                             if hasattr(value, "model_dump") else value, "from": prov.get(f"cluster.{key}", c.file)})
    for name, ph in recipe.phases.items():
        for key in c.resources:
            field = f"phases.{name}.resources.{key}"
            settings.append({"field": field, "value": getattr(ph.resources, key), "from": prov.get(field, "recipe")})
    first = next(iter(recipe.phases))
    train = ["-m", "colbertzero", "train", "RUN_DIR", "--phase", first]
    task = ["srun", *cluster.phase_srun_args(c), *cluster.task_argv(c, train)]
    return {"name": c.name, "file": c.file, "description": c.description, "settings": settings,
            "task": shlex.join(task), "sources": c.sources}


def _hparams(ph: Phase) -> dict:
    r = ph.resources
    return {
        "init": ph.init if isinstance(ph.init, str) else {"from": ph.init_from},
        "lr": ph.lr,
        "schedule": ph.schedule,
        "warmup_ratio": ph.warmup_ratio,
        "warmup_steps": ph.warmup_steps,
        "weight_decay": ph.weight_decay,
        "max_grad_norm": ph.max_grad_norm,
        "loss_scale": ph.loss_scale,
        "gradient_scale": ph.gradient_scale(ph.resources.world_size),
        "seed": ph.seed,
        "global_batch_size": ph.global_batch_size,
        "gradient_accumulation": ph.gradient_accumulation,
        "micro_batch_per_rank": ph.micro_batch_per_rank,
        "temperature": ph.temperature,
        "learnable_temperature": ph.learnable_temperature,
        "gradcache_mini_batch": ph.gradcache_mini_batch,
        "gather_across_ranks": ph.gather_across_ranks,
        "max_negatives": ph.data.max_negatives,
        "docs_per_query": ph.data.docs_per_query,
        "query_length": ph.query_length,
        "document_length": ph.document_length,
        "effective_query_length": ph.effective_query_length,
        "effective_document_length": ph.effective_document_length,
        "prompts": ph.prompts.model_dump(),
        "epochs": ph.data.epochs,
        "sampling": ph.data.sampling,
        "sources": [s.name for s in ph.data.sources],
        "bf16": ph.bf16,
        "scores_backend": ph.scores_backend,
        "zero_stage": ph.deepspeed.zero_stage,
        "cadence": ph.cadence.model_dump(),
        "resources": {
            "nodes": r.nodes,
            "gpus_per_node": r.gpus_per_node,
            "world_size": r.world_size,
            "cpus_per_task": r.cpus_per_task,
            "mem": r.mem,
            "partition": r.partition,
            "account": r.account,
            "qos": r.qos,
            "constraint": r.constraint,
            "time_limit": r.time_limit,
            "extra_sbatch": r.extra_sbatch,
        },
        "reference": ph.reference.model_dump(),
    }


def plan_table(p: dict) -> str:
    """`colbertzero plan` for a person: the phases' hyper-parameters, resources and projections (``plan()``'s dict)."""
    ref = p["reference"]
    lines = [f"recipe {p['recipe']}  (hash {p['recipe_hash'][:12]})"]
    if ref.get("beir_ndcg10") is not None:
        lines.append(f"paper: {ref['beir_ndcg10']} nDCG@10 on BEIR, ~{ref.get('gpu_hours') or '?'} "
                     f"{ref.get('hardware') or 'GPU'}-hours")
    hdr = (f"{'phase':<14}{'kind':<14}{'lr':>9}{'batch':>7}{'temp':>6}{'gc':>5}{'q/d len':>10}{'prompts':>8}"
           f"{'GPUs':>6}{'steps':>8}{'proj GPU-h':>11}{'budget':>8}")
    lines += ["", hdr, "-" * len(hdr)]
    for name, ph in p["phases"].items():
        h = ph["hyperparameters"]
        lengths = f"{h['effective_query_length']}/{h['effective_document_length']}"
        steps = ph["total_steps"] if ph["total_steps"] is not None else "?"
        budget = ph["budget_gpu_hours"] if ph["budget_gpu_hours"] is not None else "-"
        lines.append(
            f"{name:<14}{ph['kind']:<14}{h['lr']:>9.1e}{h['global_batch_size']:>7}{h['temperature']:>6g}"
            f"{h['gradcache_mini_batch'] or '-':>5}{lengths:>10}{'on' if h['prompts']['enabled'] else 'off':>8}"
            f"{ph['gpus']:>6}{steps:>8}{ph['projected_gpu_hours']:>11.1f}{budget:>8}"
        )
    lines.append("")
    for name, ph in p["phases"].items():
        h = ph["hyperparameters"]
        r = h["resources"]
        init = h["init"] if isinstance(h["init"], str) else f"export of phase {h['init']['from']!r}"
        lines.append(f"{name}: init {init}; {len(h['sources'])} source(s), {h['sampling']}; {ph['rows'] or '?'} rows "
                     f"({ph['rows_from']})")
        lines.append(
            f"  {r['nodes']} node(s) × {r['gpus_per_node'] or 'CPU'} GPUs, {r['time_limit']}, partition "
            f"{r['partition'] or 'default'}"
            f", ZeRO-{h['zero_stage']}; projection: {ph['projected_from']}"
        )
    c = p.get("cluster")
    if c:
        lines.append(f"\ncluster {c['name']} ({c['file'] or 'written in the recipe'}): {c['description']}")
        for s in c["settings"]:
            value = s["value"]
            if isinstance(value, dict) and s["field"] == "cluster.environment":
                value = " ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"  {s['field']} = {value}  [{s['from']}]")
        lines.append(f"  a phase task: {c['task']}")
    b = p["budget_gpu_hours"]
    lines.append(f"\nprojected {p['projected_gpu_hours']:.1f} GPU-hours for the run; budget "
                 f"{b if b is not None else 'none'}")
    return "\n".join(lines)
