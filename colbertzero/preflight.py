"""Every check that needs no cluster (`validate`, and before `launch` and `sbatch`); the projection is `plan.py`'s.

A refusal is a list of :class:`Finding` with ``level="error"``; `validate`, `launch` and `sbatch` stop on any
(:func:`refuse_invalid`) and write nothing. Budgets and GPU-hours used are the ledger's (``ledger.py``).
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from tqdm import tqdm

from . import ledger, slurm
from .data import shards
from .mining import MineSpec, ScoreSpec
from .models import is_local_ref
from .plan import plan_phase, recipe_ledger_data
from .recipe import Phase, Recipe, RecipeError, format_time_limit, parse_time_limit


class Refused(RecipeError):
    """A recipe refused by preflight: the message lists every error (field path and what to do)."""


@dataclass
class Finding:
    level: str  # "error" | "warning"
    where: str  # field path, e.g. phases.supervised.global_batch_size
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


# ----------------------------------------------------------------- checks
def check(recipe: Recipe, manifest_data: dict | None = None, paths: bool = True) -> list[Finding]:
    out: list[Finding] = []
    names = list(recipe.phases)
    for name in names:
        out += _check_batch(name, recipe.phase(name))
        out += _check_cadence(recipe, name, manifest_data)
        if paths:
            out += _check_paths(name, recipe.phase(name), recipe)
        out += _check_eval(name, recipe.phase(name), paths)
    out += _check_alignment(recipe)
    out += _check_budget(recipe, manifest_data)
    out += _check_derive(recipe, paths)
    return out


def shard_hashes(recipe: Recipe, progress: bool = True) -> tuple[list[Finding], dict]:
    """sha256 of every prepared shard the recipe's phases read, against its index (`validate`; the phase start does
    the same on its ranks). Sources shared by phases are hashed once. Returns (findings, {shards, bytes})."""
    seen, todo, out = set(), [], []
    for name, ph in recipe.phases.items():
        for i, src in enumerate(ph.data.sources):
            folder = shards.source_dir(ph.data, src.name)
            if folder.resolve() in seen or not shards.index_path(folder).is_file():
                continue  # not prepared: _check_paths speaks of the raw data
            seen.add(folder.resolve())
            where = f"phases.{name}.data.sources[{i}]"
            try:
                todo.append((where, folder, shards.read_index(folder, where)))
            except shards.DataError as e:
                out.append(Finding("error", where, str(e)))
    entries = [e for _, _, ix in todo for _, e in shards.shard_entries(ix)]
    total = sum(e["bytes"] for e in entries)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing shards", disable=not progress or not total) as bar:
        for where, folder, ix in todo:
            out += [Finding("error", where, p) for p in shards.hash_share(folder, ix, 0, 1, done=bar.update)]
    return out, {"shards": len(entries), "bytes": total}


_MB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def _mem_mb(mem: str) -> float:
    """Slurm's memory form ('400G', '64000M', '64000': megabytes) in MB."""
    return float(mem.rstrip("KMGT")) * _MB.get(mem[-1], 1)


def _requests(recipe: Recipe, phases: list[str], prepare: bool
              ) -> list[tuple[str, str | None, int, int, str | None, str]]:
    """(where, partition, CPUs per task, tasks per node, mem per node, time limit) of every job the run submits."""
    out = []
    for n in phases:
        ph = recipe.phase(n)
        r = ph.resources
        out.append((f"phases.{n}.resources", r.partition, r.cpus_per_task, r.tasks_per_node, r.mem, r.time_limit))
        if ph.eval_jobs_used:
            e = recipe.eval_request(n)
            out.append((e.where, e.partition, e.cpus_per_task, 1, e.mem, e.time_limit))
    helpers = [recipe.prepare_request()] + [recipe.derive_request(i) for i in range(len(recipe.derive))]
    for h in helpers if prepare else []:
        out.append((h.where, h.partition, h.cpus_per_task, 1, h.mem, h.time_limit))
    return out


def cluster_refusals(recipe: Recipe, partitions: dict[str, slurm.Partition] | None,
                     phases: list[str] | None = None, prepare: bool = True) -> list[Finding]:
    """Jobs no node of their partition can hold (CPUs, memory) or longer than its time limit — they would pend
    forever — each named by its recipe field, with the largest value the partition allows: the phases' (``phases``,
    default all), their evaluation jobs', and with ``prepare`` the prepare and derive jobs'. Nothing when the cluster
    was not asked (``partitions`` None)."""
    if not partitions:
        return []
    default = next((p for p in partitions.values() if p.default), None)
    out, unknown = [], set()
    for where, name, cpus, tasks, mem, time_limit in _requests(recipe, phases or list(recipe.phases), prepare):
        part = partitions.get(name) if name else default
        if part is None:
            if name and name not in unknown:  # once, at the field that names it (prepare may inherit it)
                unknown.add(name)
                out.append(Finding("error", f"{where}.partition", f"{name!r} is not a partition of this cluster "
                                   f"(it has: {', '.join(sorted(partitions))})"))
            continue
        if cpus * tasks > part.cpus_per_node:
            per = f"{cpus} CPUs × {tasks} tasks" if tasks > 1 else f"{cpus} CPUs"
            out.append(Finding("error", f"{where}.cpus_per_task", f"{per} on one node, but the nodes of partition "
                               f"{part.name} have {part.cpus_per_node}: the largest value it allows is "
                               f"{part.cpus_per_node // tasks}"))
        if mem and part.mem_mb_per_node and _mem_mb(mem) > part.mem_mb_per_node:
            out.append(Finding("error", f"{where}.mem", f"{mem} per node, but the nodes of partition {part.name} have "
                               f"{part.mem_mb_per_node} MB: the largest value it allows is {part.mem_mb_per_node}M"))
        if part.max_time_s is not None and parse_time_limit(time_limit) > part.max_time_s:
            out.append(Finding("error", f"{where}.time_limit", f"{time_limit} is over partition {part.name}'s limit: "
                               f"the largest value it allows is {format_time_limit(part.max_time_s)}"))
    return out


def validate(recipe: Recipe, where: str, *, paths: bool = True, hashes: bool = True, progress: bool = False
             ) -> list[str]:
    """`colbertzero validate`: every check, the jobs against the cluster's partitions where Slurm answers, then
    (with ``paths`` and ``hashes``) the sha256 of every prepared shard. Raises :class:`Refused` listing the errors
    (and the warnings); else returns the lines to print."""
    partitions = slurm.partitions() if slurm.available() else None
    findings = check(recipe, paths=paths) + cluster_refusals(recipe, partitions)
    errs, warns = errors(findings), [f for f in findings if f.level != "error"]
    if errs:
        raise Refused(f"{where}: refused ({len(errs)} error(s)); nothing was written\n"
                      + "\n".join(f"  {f}" for f in errs + warns))
    lines = []
    if paths and hashes:
        bad, hashed = shard_hashes(recipe, progress=progress)
        if bad:
            raise Refused(f"{where}: refused: {len(bad)} prepared shard(s) do not match their index\n"
                          + "\n".join(f"  {f}" for f in bad))
        if hashed["shards"]:
            lines.append(f"shards: {hashed['shards']} hashed ({hashed['bytes'] / 1e9:.2f} GB), all match their "
                         "indexes")
    lines.append(f"cluster: every job fits its partition ({', '.join(sorted(partitions))})" if partitions else
                 "cluster: no Slurm answers here; jobs not checked against partitions (they are at `launch`)")
    return lines + [f"  {f}" for f in warns] + [f"{where}: ok ({len(recipe.phases)} phase(s): "
                                                 f"{', '.join(recipe.phases)})"]


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]


def refuse_invalid(recipe: Recipe, nothing: str, budget: float | None = None) -> None:
    """Every check that needs no cluster; prints the warnings and raises :class:`Refused` listing the errors.
    ``nothing`` says what was not done ("nothing was submitted"); ``budget`` is a run budget given on the command
    line."""
    findings = check(recipe, {"budget_gpu_hours": budget} if budget is not None else None)
    for f in findings:
        if f.level != "error":
            print(f"  {f}", file=sys.stderr)
    errs = errors(findings)
    if errs:
        where = recipe.source_path or recipe.name
        raise Refused(f"{where}: refused ({len(errs)} error(s)); {nothing}\n" + "\n".join(f"  {f}" for f in errs))


def path_refusals(recipe: Recipe, phases: list[str]) -> list[str]:
    """Raw data or init model gone since the launch (only what these phases still need)."""
    return [str(f) for n in phases for f in _check_paths(n, recipe.phase(n), recipe) if f.level == "error"]


def _check_batch(name: str, ph: Phase) -> list[Finding]:
    f: list[Finding] = []
    where = f"phases.{name}.global_batch_size"
    ws = ph.resources.world_size
    per = ws * ph.gradient_accumulation
    if ph.global_batch_size % per:
        f.append(
            Finding(
                "error",
                where,
                f"{ph.global_batch_size} is not divisible by the GPU count × gradient_accumulation "
                f"({ph.resources.nodes} nodes × {ph.resources.tasks_per_node} GPUs × {ph.gradient_accumulation} = "
                f"{per}); every rank must get the same number of queries",
            )
        )
        return f
    local = ph.global_batch_size // per
    mb = ph.gradcache_mini_batch
    if mb is not None:
        # Distillation caches nothing (its loss is a sum over queries): the chunk is an exact micro-batch.
        if mb > local:
            f.append(
                Finding(
                    "error",
                    f"phases.{name}.gradcache_mini_batch",
                    f"{mb} is larger than the per-GPU batch {local} (= {ph.global_batch_size} / {per})",
                )
            )
        elif ph.global_batch_size % (per * mb):
            f.append(
                Finding(
                    "error",
                    where,
                    f"{ph.global_batch_size} is not divisible by GPUs × gradcache_mini_batch "
                    f"({per} × {mb} = {per * mb}); each rank's batch must split into whole GradCache chunks",
                )
            )
    if ph.kind == "supervised" and ph.data.max_negatives == 0:
        f.append(Finding("warning", f"phases.{name}.data.max_negatives", "0: supervised phase without hard negatives"))
    if ph.bf16 and ph.deepspeed.zero_stage == 0 and ph.resources.gpus_per_node:
        f.append(Finding("error", f"phases.{name}.deepspeed.zero_stage",
                         "0 with bf16: gradients would accumulate in bf16 over the GradCache chunks; use zero_stage 1 "
                         "or more (fp32 accumulation), or bf16: false"))
    if ph.kind == "distillation" and ph.learnable_temperature:
        f.append(Finding("error", f"phases.{name}.learnable_temperature", "distillation has no temperature to learn"))
    if ph.scores_backend == "lik" and not ph.resources.gpus_per_node:
        f.append(Finding("error", f"phases.{name}.scores_backend",
                         "lik is a CUDA kernel and this phase runs without GPUs (resources.gpus_per_node: 0); use auto "
                         "or torch"))
    return f


def _check_cadence(recipe: Recipe, name: str, manifest_data: dict | None) -> list[Finding]:
    ph = recipe.phase(name)
    p = plan_phase(recipe, name, manifest_data)
    limit = parse_time_limit(ph.resources.time_limit)
    usable = limit - ph.resources.signal_seconds
    if usable <= 0:
        return [
            Finding(
                "error",
                f"phases.{name}.resources.signal_seconds",
                f"{ph.resources.signal_seconds}s warning is longer than the time limit {ph.resources.time_limit}",
            )
        ]
    if p.seconds_per_step is None:
        return [
            Finding(
                "warning",
                f"phases.{name}.cadence.save_every",
                "checkpoint cadence unchecked against the time limit: no measured or reference step time yet",
            )
        ]
    every_s = ph.cadence.save_every * p.seconds_per_step
    if every_s >= usable:
        return [
            Finding(
                "error",
                f"phases.{name}.cadence.save_every",
                f"{ph.cadence.save_every} steps × {p.seconds_per_step:.1f} s/step ({p.seconds_per_step_from}) = "
                f"{format_time_limit(int(every_s))} between checkpoints, not shorter than the usable time limit "
                f"{format_time_limit(usable)}: a job would end before its first checkpoint. Lower save_every.",
            )
        ]
    return []


def _prompt_sig(ph: Phase) -> dict:
    return {
        "prompts.enabled": ph.prompts.enabled,
        "prompts.query": ph.prompts.query if ph.prompts.enabled else None,
        "prompts.document": ph.prompts.document if ph.prompts.enabled else None,
        "prompts.extra_length": ph.prompts.extra_length if ph.prompts.enabled else None,
        "query_length": ph.query_length,
    }


def _check_alignment(recipe: Recipe) -> list[Finding]:
    out = []
    for name, ph in recipe.phases.items():
        src = ph.init_from
        if src is None:
            continue
        a, b = _prompt_sig(recipe.phase(src)), _prompt_sig(ph)
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            detail = "; ".join(f"{k}: {a[k]!r} in {src!r} vs {b[k]!r} in {name!r}" for k in diff)
            level = "warning" if recipe.allow_prompt_mismatch else "error"
            msg = (
                f"prompt/length setup differs from the phase it starts from ({detail}). A model fine-tuned with "
                f"another prompt setup than its pre-training loses ~0.8 nDCG@10 silently (ColBERT-Zero)."
            )
            if level == "error":
                msg += " Align them, or set allow_prompt_mismatch: true for an ablation."
            out.append(Finding(level, f"phases.{name}.prompts", msg))
    return out


def _derived(recipe: Recipe, path: str, before: int | None = None) -> bool:
    """The path lies in the output of a derive step (the first ``before`` steps): it exists once that step ran."""
    outs = [Path(s.out) for s in recipe.derive[:before]]
    p = Path(path.split("*")[0])
    return any(p == o or o in p.parents for o in outs)


def _check_derive(recipe: Recipe, paths: bool) -> list[Finding]:
    out = []  # the settings are the commands' own dataclasses: one list of names
    for i, step in enumerate(recipe.derive):
        where = f"derive[{i}] ({step.name})"
        cls = MineSpec if step.kind == "mine" else ScoreSpec
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(step.args) - set(known))
        if unknown:
            out.append(Finding("error", f"{where}.args", f"unknown setting(s) {', '.join(unknown)}; "
                                                          f"{step.kind} takes {', '.join(known)}"))
        required = [n for n, f in known.items() if f.default is MISSING and n not in step.args]
        if required:
            out.append(Finding("error", f"{where}.args", f"missing {', '.join(required)}"))
        for key in ("input", "corpus"):
            v = step.args.get(key)
            if paths and isinstance(v, str) and not _derived(recipe, v, i) and not (
                    glob.glob(v) if any(ch in v for ch in "*?[") else os.path.exists(v)):
                out.append(Finding("error", f"{where}.args.{key}", f"{v}: not found (and no earlier derive step "
                                                                     f"writes it)"))
    return out


def _check_paths(name: str, ph: Phase, recipe: Recipe | None = None) -> list[Finding]:
    out = []
    if isinstance(ph.init, str) and is_local_ref(ph.init) and not os.path.exists(os.path.expanduser(ph.init)):
        out.append(Finding("error", f"phases.{name}.init", f"{ph.init}: no such model folder"))
    missing = []
    for i, src in enumerate(ph.data.sources):
        idx = shards.index_path(shards.source_dir(ph.data, src.name))
        if idx.exists():
            continue
        for key in ("path", "queries_path", "documents_path"):
            p = getattr(src, key)
            if p and recipe is not None and _derived(recipe, p):
                continue  # a derive step writes it before prepare reads it
            if p and not (glob.glob(p) if any(ch in p for ch in "*?[") else os.path.exists(p)):
                missing.append(
                    Finding(
                        "error",
                        f"phases.{name}.data.sources[{i}].{key}",
                        f"{p}: not found, and source {src.name!r} has no prepared shards in {idx.parent}",
                    )
                )
    if len(missing) > 3:  # one line per phase rather than dozens: the cause is usually one missing root
        first = missing[0].message.split(":")[0]
        missing = [
            Finding(
                "error",
                f"phases.{name}.data.sources",
                f"{len(missing)} raw data paths not found and not prepared (first: {first}); "
                f"download the sources or point the recipe at them (COLBERTZERO_DATA), then `colbertzero prepare`",
            )
        ]
    return out + missing


def _check_eval(name: str, ph: Phase, paths: bool) -> list[Finding]:
    """Evaluation sets must exist before a job spends hours to reach them; a cadence without sets does nothing."""
    out = []
    if ph.cadence.eval_every and not ph.eval.in_training:
        out.append(Finding("warning", f"phases.{name}.cadence.eval_every",
                           "set, but eval.in_training lists no dataset: no in-training evaluation will run"))
    if ph.eval.in_training and not ph.cadence.eval_every:
        out.append(Finding("warning", f"phases.{name}.eval.in_training",
                           "listed, but cadence.eval_every is not set: these sets will not be evaluated"))
    if paths:
        for key in ("beir", "in_training"):
            for i, d in enumerate(getattr(ph.eval, key)):
                if not os.path.isdir(d):
                    out.append(Finding("error", f"phases.{name}.eval.{key}[{i}]",
                                       f"{d}: no such dataset folder (BEIR layout or NanoBEIR parquet); fix the path "
                                       f"or drop it with phases.{name}.eval.{key}=[]"))
    return out


def _check_budget(recipe: Recipe, manifest_data: dict | None) -> list[Finding]:
    out = []
    total = 0.0
    for name in recipe.phases:
        p = plan_phase(recipe, name, manifest_data)
        total += p.projected_gpu_hours
        if p.budget_gpu_hours is not None and p.projected_gpu_hours > p.budget_gpu_hours:
            out.append(
                Finding(
                    "error",
                    f"phases.{name}.budget_gpu_hours",
                    f"projected {p.projected_gpu_hours:.3g} GPU-hours ({p.projected_from}) exceed the budget "
                    f"{p.budget_gpu_hours:g}. Raise the budget (phases.{name}.budget_gpu_hours=…) or shrink the phase.",
                )
            )
    run_budget = ledger.run_budget(recipe_ledger_data(recipe, manifest_data))
    if run_budget is not None and total > run_budget:
        out.append(
            Finding(
                "error",
                "budget_gpu_hours",
                f"projected {total:.3g} GPU-hours for the run exceed its budget {run_budget:g}",
            )
        )
    return out
