"""Helper work as Slurm arrays through submitit. `mine` / `score`: one task per query-range shard; whichever task
finishes last merges (colbertzero.mining.run_shards). `beir`: an encode array, a search array, a merge job. A task
that fails or is preempted leaves its shard missing and nothing else: running the same command again resubmits only
the missing shards."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import submitit

from .. import cluster, slurm
from ..evaluate.sharded import STAGES, Evaluation
from ..files import now_iso
from ..manifest import Manifest
from ..mining import MineSpec, ScoreSpec, run_shards, work_for
from ..recipe.schema import Cluster, no_control_characters, parse_time_limit
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


def array_spec(items: list[int]) -> str:
    """Slurm's --array value for these task ids: runs collapsed (``0-4,7,9-11``)."""
    parts, i = [], 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)


def submit_beir(out: str, opts: dict, profile: Cluster | None = None) -> dict:
    """The missing items of the evaluation planned in ``out`` (`colbertzero beir`) as three chained jobs: an encode
    array, a search array after it, a merge job after that. Each task runs `colbertzero beir --stage S` (its item: the
    array task id) through srun, inside the cluster profile's container when it has one. ``afterok`` with
    kill-on-invalid-dep: a failed item makes Slurm drop the jobs after it instead of leaving them pending; running the
    command again submits what is still missing. Returns ``{"jobs": {stage: {"job", "items"}}, "folder", "out"}``."""
    if not slurm.available():
        raise LaunchError("--executor slurm: sbatch not found on this machine; run from a Slurm login node, or use "
                          "--executor local")
    ev = Evaluation(out)
    if not any(ev.missing(stage) for stage in STAGES):
        return {"jobs": {}, "folder": str(ev.out / "slurm"), "out": str(ev.out)}
    slurm.test_only("the beir jobs", opts)
    folder = ev.out / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, dict] = {}
    after = None
    for stage in STAGES:
        todo = ev.missing(stage)
        if not todo:
            continue
        args = ["-m", "colbertzero", "beir", "--out", str(ev.out), "--stage", stage]
        command = shlex.join(["srun", "--ntasks=1", *cluster.srun_args(profile), *cluster.task_argv(profile, args)])
        o = dict(opts)
        if stage != "merge":
            o["array"] = array_spec(todo)
        if after:
            o |= {"dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"}
        log = folder / (f"{stage}-%A_%a.log" if stage != "merge" else "merge-%j.log")
        try:
            after = slurm.submit_wrap(f"cz-beir-{stage}-{ev.out.name}"[:120], str(log), command, o, dict(os.environ))
        except RuntimeError as e:
            raise LaunchError(str(e)) from None
        jobs[stage] = {"job": after, "items": todo if stage != "merge" else []}
    return {"jobs": jobs, "folder": str(folder), "out": str(ev.out)}


def submitted_beir_line(r: dict) -> str:
    if not r["jobs"]:
        return f"{r['out']}: already evaluated with these settings; nothing submitted (results.json)"
    parts = [f"{stage} job {j['job']}" + (f" ({len(j['items'])} item(s))" if j["items"] else "")
             for stage, j in r["jobs"].items()]
    return f"submitted {', then '.join(parts)}; results in {r['out']}/results.json (logs in {r['folder']})"


def submit_phase_beir(m: Manifest, phase: str) -> dict | None:
    """After a phase's job ended done, on the host: submit the eval.beir arrays its rank 0 planned (`beir_eval`
    state "planned") with the phase's eval.job resources and the recipe's cluster profile. The outcome goes to the
    manifest's ``beir_eval`` (submitted with the job ids, or failed with the reason and the command to run by
    hand); an evaluation never fails the phase."""
    planned = m.phase(phase).get("beir_eval") or {}
    if planned.get("state") != "planned":
        return None
    recipe = m.recipe()
    r = recipe.eval_request(phase)
    opts = {"nodes": 1, "ntasks-per-node": 1, **slurm.helper_options(r.partition, r.time_limit, r.cpus_per_task,
                                                                       r.gpus, r.mem)}
    if os.environ.get("SLURM_JOB_ACCOUNT") and "account" not in opts:
        opts["account"] = os.environ["SLURM_JOB_ACCOUNT"]  # charged like the phase
    try:
        res = submit_beir(planned["out"], opts, recipe.cluster)
        fields = {"state": "submitted", "jobs": res["jobs"], "logs": res["folder"]}
        print(f"[colbertzero] phase {phase}: {submitted_beir_line(res)}", file=sys.stderr, flush=True)
    except LaunchError as e:
        hand = shlex.join([sys.executable, "-m", "colbertzero", "beir", "--out", planned["out"], "--stage", "encode"])
        fields = {"state": "failed", "reason": str(e)}
        print(f"[colbertzero] phase {phase}: the eval.beir jobs could not be submitted: {e}\n  run its stages by "
              f"hand (encode, search, merge), e.g. {hand}", file=sys.stderr, flush=True)
    m.update_phase(phase, lambda p: p.update(beir_eval={**planned, **fields, "time": now_iso()}))
    return fields
