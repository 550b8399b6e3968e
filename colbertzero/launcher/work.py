"""`mine` / `score` as a Slurm array through submitit: one task per query-range shard; whichever task finishes last
merges (colbertzero.mining.run_shards). A task that fails or is preempted leaves its shard missing and nothing
else: running the same command again resubmits only the missing shards."""

from __future__ import annotations

from pathlib import Path

import submitit

from .. import slurm
from ..mining import MineSpec, ScoreSpec, run_shards, work_for
from ..recipe.schema import no_control_characters, parse_time_limit
from ..slurm import LaunchError
from .sbatch import time_minutes


def array_options(*, partition: str | None, time: str, cpus_per_task: int, gpus_per_task: int,
                  mem: str | None) -> dict:
    """sbatch options of one array task; every string checked by the rule for what reaches a script."""
    for what, v in (("--partition", partition), ("--time", time), ("--mem", mem)):
        try:
            no_control_characters(v, what)
        except ValueError as e:
            raise LaunchError(str(e)) from None
    try:
        parse_time_limit(time)
    except ValueError as e:
        raise LaunchError(f"--time {time!r}: {e}") from None
    return {"nodes": 1, "ntasks-per-node": 1, **slurm.helper_options(partition, time, cpus_per_task, gpus_per_task,
                                                                       mem)}


def submit_array(spec: MineSpec | ScoreSpec, out: str, shards: int, opts: dict) -> dict:
    """Submit the missing shards; ``{"job", "tasks", "folder"}``. An output already complete submits nothing."""
    if not slurm.available():
        raise LaunchError("--executor slurm: sbatch not found on this machine; run from a Slurm login node, or use "
                          "--executor local")
    work = work_for(spec, out, shards)
    if work.finished():
        return {"job": None, "tasks": [], "folder": None}
    work.open()
    todo = work.missing()
    kind = "mine" if isinstance(spec, MineSpec) else "score"
    slurm.test_only(f"the {kind} array", opts)
    folder = Path(out).resolve().parent / f".{Path(out).name}.slurm"
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=0)
    ex.update_parameters(
        job_name=f"cz-{kind}-{Path(out).name}"[:120], nodes=1, ntasks_per_node=1, time=time_minutes(opts["time"]),
        additional_parameters={k: v for k, v in opts.items() if k not in ("nodes", "ntasks-per-node", "time")}
        | {"time": opts["time"]},
    )
    with ex.batch():
        jobs = [ex.submit(run_shards, spec, str(out), shards, task=i, show_progress=False) for i in todo]
    master = jobs[0].job_id.split("_")[0]
    return {"job": master, "tasks": todo, "folder": str(folder)}


def submitted_line(r: dict, out: str, shards: int) -> str:
    """What `mine`/`score --executor slurm` print (``submit_array``'s result)."""
    if r["job"] is None:
        return f"{out}: already complete from the same settings; nothing submitted"
    return (f"submitted array job {r['job']}: shard(s) {', '.join(map(str, r['tasks']))} of {shards}; the last to "
            f"finish writes {out} (logs in {r['folder']})")
