"""Submitting a run's jobs to Slurm through submitit: the derive arrays (mine / score), the prepare array, its index
job, and the phase chain.

Each step starts only after the previous one succeeded (`afterok`; Slurm cancels the rest of the chain when one fails:
`kill-on-invalid-dep`). Jobs are named `cz-<recipe>-<step>-<run tag>` (`sbatch.job_name`), so `resume` finds a run's
jobs in the queue however they were submitted. Every option comes from `sbatch.phase_options` /
`sbatch.prepare_options`, as for the plain scripts and the `--test-only` preflight.
"""

from __future__ import annotations

import submitit

from .. import cluster, slurm
from ..data.prepare import index_recipe, prepare_recipe
from ..files import now_iso
from ..manifest import Manifest
from ..mining import derive_task, finished
from ..recipe import Recipe
from ..slurm import LaunchError
from . import sbatch
from .task import PhaseTask
from .work import array_options


def _derive_options(recipe: Recipe, i: int) -> dict:
    r = recipe.derive_request(i)
    return array_options(partition=r.partition, time=r.time_limit, cpus_per_task=r.cpus_per_task, gpus_per_task=r.gpus,
                         mem=r.mem)


def preflight(recipe: Recipe, phases: list[str], prepare: bool) -> None:
    """Slurm's own verdict on every job's options before anything is submitted."""
    if not slurm.available():
        raise LaunchError("--executor slurm: sbatch not found on this machine; run from a Slurm login node, or use "
                          "--executor local")
    for n in phases:
        slurm.test_only(f"phase {n!r} (phases.{n}.resources)",
                        sbatch.phase_options(recipe.phase(n).resources, f"phases.{n}.resources"))
    if prepare:
        slurm.test_only("the prepare job (prepare)", sbatch.prepare_options(recipe))
    for i, step in enumerate(recipe.derive):
        if not finished(step.kind, step.args, step.out):
            slurm.test_only(f"derive step {step.name!r} (derive[{i}])", _derive_options(recipe, i))
    for n in phases:  # the evaluation jobs a phase submits from inside its job, as they will ask
        if recipe.phase(n).eval_jobs_used:
            r = recipe.eval_request(n)
            slurm.test_only(f"phase {n!r}'s evaluation jobs ({r.where})",
                            {"ntasks": "1", **slurm.helper_options(r.partition, r.time_limit, r.cpus_per_task, r.gpus,
                                                                   r.mem)})


def _executor(m: Manifest, recipe: Recipe, step: str) -> submitit.SlurmExecutor:
    """Every job's task runs inside the profile's container (`python`: its prefix and interpreter)."""
    return submitit.SlurmExecutor(folder=str(m.layout.slurm(step)), max_num_timeout=0,
                                  python=sbatch.submitit_python(recipe))


def _params(name: str, opts: dict, dependency: str | None, setup: list[str], **extra) -> dict:
    """submitit parameters from sbatch options: submitit needs nodes and tasks to collect results; the rest passes
    through as-is (time exactly as written in the recipe)."""
    add = {"kill-on-invalid-dep": "yes", **{k: v for k, v in opts.items()
                                            if k not in ("nodes", "ntasks-per-node", "time")}}
    add["time"] = opts["time"]
    if dependency:
        add["dependency"] = dependency
    return dict(job_name=name, nodes=int(opts["nodes"]), ntasks_per_node=int(opts["ntasks-per-node"]),
                time=sbatch.time_minutes(opts["time"]), setup=list(setup), additional_parameters=add, **extra)


def submit_chain(m: Manifest, recipe: Recipe, phases: list[str], missing_shards: list[str]) -> dict[str, str]:
    """Submit prepare (when shards are missing) and the phases; {step: job id}. All or nothing: a failure cancels
    what was already submitted."""
    jobs: dict[str, str] = {}
    try:
        dependency = None
        for i, step in enumerate(recipe.derive):  # in order: a step may read what the one before wrote
            if not finished(step.kind, step.args, step.out):
                dependency = f"afterok:{_submit_derive(m, recipe, i, dependency, jobs)}"
        if missing_shards:
            dependency = f"afterok:{_submit_prepare(m, recipe, missing_shards, jobs, dependency)}"
        for n in phases:
            r = recipe.phase(n).resources
            ex = _executor(m, recipe, n)
            params = _params(sbatch.job_name(recipe, n, m.run_dir), sbatch.phase_options(r, f"phases.{n}.resources"),
                             dependency, sbatch.task_setup(recipe, r.setup), signal_delay_s=r.signal_seconds,
                             srun_args=sbatch.srun_args(recipe), teardown=sbatch.after_phase_lines(m.run_dir, n))
            params["additional_parameters"]["requeue"] = True
            ex.update_parameters(**params)
            jobs[n] = ex.submit(PhaseTask(str(m.run_dir), n)).job_id
            dependency = f"afterok:{jobs[n]}"
    except Exception as e:
        if jobs:  # half a chain would run phases out of order later: take it back
            slurm.cancel(list(jobs.values()))
        raise LaunchError(f"submission failed: {e}\n  "
                          + (f"the jobs already submitted ({', '.join(jobs.values())}) were cancelled; "
                             if jobs else "") + "nothing is queued") from None
    with m.update() as d:
        d.setdefault("submissions", []).append({"time": now_iso(), "executor": "slurm", "jobs": jobs})
        d["inflight"] = jobs
    print("submitted: " + ", ".join(f"{k}={v}" for k, v in jobs.items()))
    return jobs


def _submit_derive(m: Manifest, recipe: Recipe, i: int, dependency: str | None, jobs: dict) -> str:
    """Derive step ``i`` as an array, one task per query range; its last task merges the output."""
    step = recipe.derive[i]
    name = f"derive-{step.name}"
    ex = _executor(m, recipe, name)
    ex.update_parameters(**_params(sbatch.job_name(recipe, name, m.run_dir), _derive_options(recipe, i), dependency,
                                   cluster.setup_lines(recipe.cluster, recipe.prepare.setup),
                                   srun_args=cluster.srun_args(recipe.cluster)))
    with ex.batch():
        tasks = [ex.submit(derive_task, step.kind, step.args, step.out, step.shards, task=i)
                 for i in range(step.shards)]
    jobs[name] = tasks[0].job_id.split("_")[0]
    return jobs[name]


def _submit_prepare(m: Manifest, recipe: Recipe, phases: list[str], jobs: dict, dependency: str | None) -> str:
    """Tokenize the missing shards as an array job (each task its share), then one task writes the indexes."""
    pr = recipe.prepare
    opts = sbatch.prepare_options(recipe)
    setup = cluster.setup_lines(recipe.cluster, pr.setup)
    srun = cluster.srun_args(recipe.cluster)
    ex = _executor(m, recipe, "prepare")
    ex.update_parameters(**_params(sbatch.job_name(recipe, "prepare", m.run_dir), opts, dependency, setup,
                                   srun_args=srun))
    n = pr.array_tasks
    with ex.batch():
        shares = [ex.submit(prepare_recipe, recipe, phases, workers=pr.workers, shard_range=(i, n), progress=False)
                  for i in range(n)]
    jobs["prepare"] = shares[0].job_id.split("_")[0]
    ex.update_parameters(**_params(sbatch.job_name(recipe, "prepare-index", m.run_dir), opts,
                                   f"afterok:{jobs['prepare']}", setup, srun_args=srun))
    jobs["prepare-index"] = ex.submit(index_recipe, recipe, phases, progress=False).job_id
    return jobs["prepare-index"]
