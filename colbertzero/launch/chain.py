"""`launch` and `resume`: validate, then run prepare and the phase chain on Slurm (submitit) or on this machine.

The launcher never trains: each phase job runs `colbertzero.train.runner.run_phase` in every task (one per GPU) and
reports through the run dir's manifest. What the launcher adds:

- refusals that submit nothing: validation errors (and, for a new run, nothing is written either), Slurm refusing a
  phase's resources (`sbatch --test-only`, its message shown), a phase over its GPU-hour budget, jobs of the run still
  queued, another launch/resume of the same run dir at the same moment (`RUN_DIR/launch.lock`);
- the chain: when shards are missing, a prepare array job (each task a share of the shards) and an index job; then
  one job per phase, each starting only after the previous one succeeded (`afterok`; Slurm cancels the rest of the
  chain when one fails: `kill-on-invalid-dep`);
- the requeue: on the time-limit warning (submitit asks for `--signal=USR2@signal_seconds`) or a preemption every
  rank stops at the same step, checkpoints, and the runner returns 3; rank 0 then requeues the job
  (`scontrol requeue`), up to the recipe's `max_requeues` (SLURM_RESTART_COUNT). Slurm reruns the same submitit
  pickle and the runner resumes from the newest complete checkpoint;
- the ledger from Slurm's accounting: when `resume` or `--wait` looks at the run, `sacct` gives each attempt the
  allocation's elapsed time and, where the runner could not close it (cancelled, node failure, killed while
  starting), its end state.

Jobs are named `cz-<recipe>-<step>-<run tag>`, so `resume` finds a run's jobs in the queue however they were
submitted (`launch`, the `colbertzero sbatch` scripts, by hand).

Slurm 22.05 holds a requeued job ~120 s (BeginTime) before it may start again. The job cannot shorten that itself (it
has ended by then); `colbertzero resume` releases such a job (`scontrol update StartTime=now`).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

from filelock import FileLock, Timeout

from .. import preflight
from ..manifest import Manifest, attempt_gpu_hours, now_iso
from ..recipe import Recipe, load_recipe
from . import sbatch as sb

EXIT_REFUSED = 2
EXIT_DONE, EXIT_FAILED, EXIT_REQUEUE, EXIT_OVER_BUDGET = 0, 1, 3, 4  # the runner's exit codes
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)  # what the runner stops at a checkpoint on
LOCK_WAIT_S = 60.0  # a submission takes seconds; longer means a local run holds the lock
# States after which a job does not run again. PREEMPTED is not one: a requeueing cluster runs the job again.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# sacct states of a run still going on; every other state is a run that is over (REQUEUED and PREEMPTED included).
GOING = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED",
         "SPECIAL_EXIT", "STAGE_OUT", "SIGNALING"}


class LaunchError(RuntimeError):
    """A refused launch/resume; the message says why and what to do. Nothing was submitted."""


# ================================================================================================ entry points
def launch(recipe_path: str, run_dir: str, overrides: list[str] | None = None, executor: str | None = None,
           budget: float | None = None, wait: bool = False) -> int:
    """Validate RECIPE, create RUN_DIR, then submit prepare (if shards are missing) and every phase."""
    recipe = load_recipe(recipe_path, overrides or [])
    if budget is not None and budget <= 0:
        raise LaunchError(f"--budget {budget}: a GPU-hour budget is > 0")
    refuse_invalid(recipe, "nothing was submitted", budget)
    executor = _choose_executor(executor)
    if executor == "slurm":
        phases = list(recipe.phases)
        _slurm_preflight(recipe, phases, prepare=bool(_missing_shards(recipe, phases)))
    # Everything above refuses before the run dir exists: a refused launch writes nothing.
    m = Manifest.create(run_dir, recipe)
    if budget is not None:
        m.raise_budget(None, budget)
    return _submit(m, executor, wait)


def resume(run_dir: str, executor: str | None = None, budget: float | None = None,
           phase_budgets: list[str] | None = None, wait: bool = False) -> int:
    """Resubmit a run from where its manifest says it is: the current phase from its newest complete checkpoint,
    then the rest of the chain. Budgets given here raise (or set) the run's / a phase's GPU-hour budget first."""
    m = Manifest(run_dir)
    data = m.read()  # refuses a missing, corrupt or foreign manifest
    raised: list[tuple[str, float]] = []
    for spec in phase_budgets or []:
        name, _, hours = spec.partition("=")
        try:
            value = float(hours)
        except ValueError:
            value = 0.0
        if value <= 0:
            raise LaunchError(f"--phase-budget {spec!r}: expected PHASE=HOURS with HOURS > 0, e.g. unsupervised=12")
        if name not in data["phases"]:
            raise LaunchError(f"--phase-budget {spec!r}: the run has no phase {name!r} "
                              f"(phases: {', '.join(data['phases'])})")
        raised.append((name, value))
    if budget is not None and budget <= 0:
        raise LaunchError(f"--budget {budget}: a GPU-hour budget is > 0")
    for name, value in raised:
        m.raise_budget(name, value)
    if budget is not None:
        m.raise_budget(None, budget)
    if executor is None and data.get("sbatch_scripts") and not data.get("executor"):
        executor = "slurm"  # scripts written by `colbertzero sbatch`: the rest goes through Slurm too
    return _submit(m, executor or data.get("executor") or _choose_executor(None), wait)


def refuse_invalid(recipe: Recipe, nothing: str, budget: float | None = None) -> None:
    """Every check that needs no cluster (`colbertzero validate`); raises LaunchError listing the errors."""
    findings = preflight.check(recipe, {"budget_gpu_hours": budget} if budget is not None else None)
    errors = preflight.errors(findings)
    for f in findings:
        if f.level != "error":
            print(f"  {f}", file=sys.stderr)
    if errors:
        where = recipe.source_path or recipe.name
        raise LaunchError(f"{where}: refused ({len(errors)} error(s)); {nothing}\n"
                          + "\n".join(f"  {f}" for f in errors))


# ================================================================================================ one submission
def _submit(m: Manifest, executor: str, wait: bool) -> int:
    lock = FileLock(str(m.run_dir / "launch.lock"))
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        print(f"colbertzero: {m.run_dir}/launch.lock is held by another launch/resume of this run (a local run in "
              f"progress, or a submission that hangs); nothing submitted", file=sys.stderr)
        return EXIT_REFUSED
    try:
        jobs, alive = _submit_locked(m, executor)
    finally:
        lock.release()
    if jobs is None:  # a local run (already over) or nothing to do
        return alive
    if wait:
        return wait_for(m, list(jobs.values()))
    print(f"follow it with: colbertzero status {m.run_dir}")
    return 0


def _submit_locked(m: Manifest, executor: str) -> tuple[dict | None, int]:
    """Under launch.lock: (jobs submitted, 0), or (None, exit code) when nothing was submitted."""
    alive = _alive_jobs(m)
    if alive:
        held = _release_held(alive)
        listed = ", ".join(f"{k}={job} {state}" for k, (job, state, _) in alive.items())
        print(f"{m.run_dir}: already in flight ({listed}); nothing submitted")
        if held:
            print(f"released job(s) {', '.join(held)} held after a requeue (Slurm's BeginTime); they start now")
        return {k: job for k, (job, _, _) in alive.items()}, 0
    with m.update() as d:
        d["inflight"] = {}  # whatever was submitted before has left the queue
    _reconcile(m)
    recipe = m.recipe()
    data = m.read()
    phases = [n for n in recipe.phases if data["phases"][n]["state"] != "done"]
    if not phases:
        print(f"{m.run_dir}: every phase is done; nothing to submit")
        return None, 0
    refusals = _budget_refusals(m, phases) + _path_refusals(recipe, phases)
    if refusals:
        print(f"colbertzero: {m.run_dir}: refused; nothing was submitted", file=sys.stderr)
        for r in refusals:
            print(f"  {r}", file=sys.stderr)
        return None, EXIT_REFUSED
    if executor == "slurm":
        _slurm_preflight(recipe, phases, prepare=bool(_missing_shards(recipe, phases)))

    def reset(d):
        d["executor"] = executor
        for n in phases:  # a phase that failed or was cut off starts again from its newest checkpoint
            if d["phases"][n]["state"] in ("failed", "running"):
                d["phases"][n]["state"] = "pending"

    with m.update() as d:
        reset(d)
    _make_builtin_models(recipe, phases)
    if executor == "local":
        return None, _run_local(m, recipe, phases)
    return _submit_slurm(m, recipe, phases), 0


def _budget_refusals(m: Manifest, phases: list[str]) -> list[str]:
    out = []
    for n in phases:
        state, budget, used = m.phase(n)["state"], m.budget(n), m.gpu_hours(n)
        if state == "over-budget" or (budget is not None and used >= budget):
            of = f" of {budget:g}" if budget is not None else ""
            out.append(f"phase {n!r} is over its GPU-hour budget ({used:.3g}{of} used); continue it with a raised "
                       f"budget: colbertzero resume {m.run_dir} --phase-budget {n}=HOURS")
    run_budget = m.run_budget()
    if run_budget is not None and m.gpu_hours() >= run_budget:
        out.append(f"the run used {m.gpu_hours():.3g} of its {run_budget:g} GPU-hours; continue it with a raised "
                   f"budget: colbertzero resume {m.run_dir} --budget HOURS")
    return out


def _path_refusals(recipe: Recipe, phases: list[str]) -> list[str]:
    """Raw data or init model gone since the launch (only what the pending phases still need)."""
    return [str(f) for n in phases for f in preflight._check_paths(n, recipe.phase(n)) if f.level == "error"]


def _make_builtin_models(recipe: Recipe, phases: list[str]) -> None:
    """A `builtin:` init (tests, demos) is written on first use; make it here, once, rather than have every rank of
    the first job write the same folder at the same moment."""
    from ..models import resolve_model_ref

    for n in phases:
        init = recipe.phase(n).init
        if isinstance(init, str) and init.startswith("builtin:"):
            resolve_model_ref(init)


def _missing_shards(recipe: Recipe, phases: list[str]) -> list[str]:
    """Phases with a source that has no shard index yet (`prepare` is idempotent: it redoes only what is missing)."""
    return [n for n in phases
            if any(not (Path(recipe.phase(n).data.shards_dir) / s.name / "index.json").exists()
                   for s in recipe.phase(n).data.sources)]


# ================================================================================================ Slurm
def _choose_executor(executor: str | None) -> str:
    if executor:
        return executor
    return "slurm" if _have_slurm() else "local"


def _have_slurm() -> bool:
    from shutil import which

    if which("sbatch") is None:
        return False
    _use_local_cluster_config()
    return True


def _use_local_cluster_config() -> None:
    """sbatch finds its configuration itself (SLURM_CONF, /etc/slurm, configless). On a machine whose only cluster is
    tools/local-slurm, point the clients at that one."""
    if os.environ.get("SLURM_CONF") or Path("/etc/slurm/slurm.conf").exists():
        return
    from . import local_slurm

    try:
        conf = local_slurm.env().get("SLURM_CONF")
    except local_slurm.LocalSlurmError:
        return
    if conf and Path(conf).is_file():
        os.environ["SLURM_CONF"] = conf
        print(f"[colbertzero] using the local Slurm cluster of tools/local-slurm (SLURM_CONF={conf})",
              file=sys.stderr)


def _slurm(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LaunchError(f"{args[0]} not found: run this from a Slurm login node, or use --executor local") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`{' '.join(args[:3])} …` did not answer within {timeout:.0f}s (slurmctld down?); "
                          "nothing submitted") from None


def _slurm_preflight(recipe: Recipe, phases: list[str], prepare: bool) -> None:
    """`sbatch --test-only` with each job's resources: a bad partition, account, QoS, constraint or extra option is
    refused with Slurm's own message before anything is submitted."""
    if not _have_slurm():
        raise LaunchError("--executor slurm: sbatch not found on this machine; run from a Slurm login node, or use "
                          "--executor local")
    checks = [(f"phase {n!r} (phases.{n}.resources)", sb.phase_options(recipe.phase(n).resources,
                                                                         f"phases.{n}.resources")) for n in phases]
    if prepare:
        checks.append(("the prepare job (prepare)", sb.prepare_options(recipe)))
    for what, opts in checks:
        args = sb.as_args(opts)
        r = _slurm(["sbatch", "--test-only", *args, "--wrap", "true"])
        if r.returncode != 0:
            why = (r.stderr.strip() or r.stdout.strip()).replace("\n", "; ")
            hint = " (start the local cluster with `tools/local-slurm start`?)" if "contact" in why.lower() else ""
            raise LaunchError(f"Slurm refuses {what}: {why}{hint}\n  sbatch options: {' '.join(args)}\n"
                              "  nothing was submitted")


def _executor(m: Manifest, step: str):
    import submitit

    return submitit.SlurmExecutor(folder=str(m.run_dir / "slurm" / step), max_num_timeout=0)


def _params(name: str, opts: dict, dependency: str | None, setup: list[str], **extra) -> dict:
    """submitit parameters from sbatch options: submitit needs nodes and tasks to collect results; the rest passes
    through as-is (time exactly as written in the recipe)."""
    opts = dict(opts)
    add = {"kill-on-invalid-dep": "yes", **{k: v for k, v in opts.items()
                                            if k not in ("nodes", "ntasks-per-node", "time")}}
    add["time"] = opts["time"]
    if dependency:
        add["dependency"] = dependency
    return dict(job_name=name, nodes=int(opts["nodes"]), ntasks_per_node=int(opts["ntasks-per-node"]),
                time=sb.time_minutes(opts["time"]), setup=list(setup), additional_parameters=add, **extra)


def _submit_slurm(m: Manifest, recipe: Recipe, phases: list[str]) -> dict[str, str]:
    jobs: dict[str, str] = {}
    try:
        dependency = None
        missing = _missing_shards(recipe, phases)
        if missing:
            dependency = f"afterok:{_submit_prepare(m, recipe, missing, jobs)}"
        for n in phases:
            r = recipe.phase(n).resources
            ex = _executor(m, n)
            params = _params(sb.job_name(recipe, n, m.run_dir), sb.phase_options(r, f"phases.{n}.resources"),
                             dependency, [*sb.TASK_ENV, *r.setup], signal_delay_s=r.signal_seconds,
                             srun_args=list(sb.SRUN_ARGS))
            params["additional_parameters"]["requeue"] = True
            ex.update_parameters(**params)
            jobs[n] = ex.submit(PhaseTask(str(m.run_dir), n)).job_id
            dependency = f"afterok:{jobs[n]}"
    except Exception as e:
        if jobs:  # half a chain would run phases out of order later: take it back
            _slurm(["scancel", *jobs.values()])
        raise LaunchError(f"submission failed: {e}\n  "
                          + (f"the jobs already submitted ({', '.join(jobs.values())}) were cancelled; "
                             if jobs else "") + "nothing is queued") from None
    with m.update() as d:
        d.setdefault("submissions", []).append({"time": now_iso(), "executor": "slurm", "jobs": jobs})
        d["inflight"] = jobs
    print("submitted: " + ", ".join(f"{k}={v}" for k, v in jobs.items()))
    return jobs


def _submit_prepare(m: Manifest, recipe: Recipe, phases: list[str], jobs: dict) -> str:
    """Tokenize the missing shards as an array job (each task its share), then one task writes the indexes."""
    from ..data.prepare import index_recipe, prepare_recipe

    pr = recipe.prepare
    opts = sb.prepare_options(recipe)
    ex = _executor(m, "prepare")
    ex.update_parameters(**_params(sb.job_name(recipe, "prepare", m.run_dir), opts, None, pr.setup))
    n = pr.array_tasks
    with ex.batch():
        shares = [ex.submit(prepare_recipe, recipe, phases, pr.workers, False, (i, n), False) for i in range(n)]
    jobs["prepare"] = shares[0].job_id.split("_")[0]
    ex.update_parameters(**_params(sb.job_name(recipe, "prepare-index", m.run_dir), opts, f"afterok:{jobs['prepare']}",
                                   pr.setup))
    jobs["prepare-index"] = ex.submit(index_recipe, recipe, phases, False).job_id
    return jobs["prepare-index"]


def _squeue(job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """{job id (array: its master id): (id as squeue prints it, state, reason)} of the jobs still queued or running."""
    if not job_ids:
        return {}
    r = _slurm(["squeue", "-h", "-o", "%A|%i|%T|%r", "-j", ",".join(job_ids)])
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:  # every one of them has left the controller
            return {}
        raise LaunchError(f"cannot tell whether the run's jobs are still queued (squeue: {r.stderr.strip()}); "
                          "nothing submitted")
    out = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[2] not in ENDED:
            out.setdefault(parts[0], (parts[1], parts[2], parts[3]))
    return out


def _alive_jobs(m: Manifest) -> dict[str, tuple[str, str, str]]:
    """{step: (job id, state, reason)} for this run's jobs still pending or running, however they were submitted
    (found by job name, which carries the run's tag). Resubmitting then would run a phase twice."""
    data = m.read()
    if not (data.get("submissions") or data.get("sbatch_scripts") or data.get("executor") == "slurm"):
        return {}  # this run never went through Slurm
    if not _have_slurm():
        raise LaunchError(f"{m.run_dir} was submitted to Slurm and there is no Slurm client here to ask whether its "
                          "jobs still run: resume it from the login node")
    recipe = m.recipe()
    names = {sb.job_name(recipe, step, m.run_dir): step for step in ("prepare", "prepare-index", *recipe.phases)}
    r = _slurm(["squeue", "-h", "-o", "%A|%T|%r|%j", "-n", ",".join(names)])
    if r.returncode != 0:
        raise LaunchError(f"cannot tell whether the run's jobs are still queued (squeue: {r.stderr.strip()}); "
                          "nothing submitted")
    out = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4 and parts[3] in names and parts[1] not in ENDED:
            out.setdefault(names[parts[3]], (parts[0], parts[1], parts[2]))
    return out


def _release_held(alive: dict[str, tuple[str, str, str]]) -> list[str]:
    released = []
    for job, state, reason in alive.values():
        if state == "PENDING" and reason == "BeginTime":
            if _slurm(["scontrol", "update", f"JobId={job}", "StartTime=now"]).returncode == 0:
                released.append(job)
    return released


def _sacct_runs(job_id: str) -> list[dict]:
    """Every run of a job, oldest first (a requeued job has one per start): the n-th is SLURM_RESTART_COUNT n."""
    fields = ["JobID", "State", "Start", "End", "ElapsedRaw", "NNodes", "AllocTRES"]
    r = _slurm(["sacct", "-D", "-X", "-P", "-n", "-j", job_id, "-o", ",".join(fields)])
    if r.returncode != 0:
        return []
    runs = [dict(zip(fields, line.split("|"))) for line in r.stdout.splitlines() if line.strip()]
    return [x for x in runs if x["JobID"] == job_id]


def _reconcile(m: Manifest) -> None:
    """The ledger against Slurm's accounting (sacct, one record per run of a requeued job): attempts the runner
    could not close (cancelled, node failure) get Slurm's end state; runs that ended before the runner recorded them
    (killed while starting) are added; every attempt's elapsed time is at least the allocation's. GPU-hours spent
    are spent, whoever noticed."""
    data = m.read()
    per_phase: dict[str, list[str]] = {}
    for sub in data.get("submissions", []):  # what launch/resume submitted, and what the runner saw (jobs by hand)
        for step, job in sub.get("jobs", {}).items():
            if step in data["phases"]:
                per_phase.setdefault(step, []).append(job)
    for n, p in data["phases"].items():
        for a in p["attempts"]:
            if a.get("executor") == "slurm" and a.get("job_id"):
                per_phase.setdefault(n, []).append(str(a["job_id"]))
    per_phase = {n: list(dict.fromkeys(jobs)) for n, jobs in per_phase.items()}
    if not per_phase or not _have_slurm():
        _close_lost_attempts(m)
        return
    recipe = m.recipe()
    found: dict[str, list[dict]] = {n: [] for n in per_phase}
    for n, job_ids in per_phase.items():
        for job in job_ids:
            for i, run in enumerate(_sacct_runs(job)):
                state = run["State"].split()[0] if run["State"] else ""
                if state and state not in GOING:
                    found[n].append({**run, "id": f"{job}-{i}", "job": job, "state": state})

    def fix(d):
        for n, runs in found.items():
            attempts = d["phases"][n]["attempts"]
            by_id = {a["id"]: a for a in attempts}
            r = recipe.phase(n).resources
            for run in runs:
                elapsed = float(run["ElapsedRaw"] or 0)
                a = by_id.get(run["id"])
                if a is None:
                    if elapsed <= 0:
                        continue  # never started
                    start = _iso(run["Start"])
                    step = max((x.get("step_end") or 0 for x in attempts if _when(x.get("start")) <= _when(start)),
                               default=0)
                    gpus, nodes = _tres_gpus(run["AllocTRES"]), int(run["NNodes"] or r.nodes)
                    a = {"id": run["id"], "job_id": run["job"], "executor": "slurm", "nodes": nodes,
                         "gpus_per_node": gpus // max(1, nodes), "tasks": r.world_size, "start": start,
                         "end": _iso(run["End"]), "elapsed_s": 0.0, "gpu_hours": 0.0,
                         "exit_state": run["state"].lower(), "step_start": step, "step_end": step, "host": None,
                         "note": "ended before the runner recorded it (from sacct)"}
                    attempts.append(a)
                elif a["exit_state"] == "running" or (  # the runner never closed it, or Slurm overruled it
                        a["exit_state"] == "requeue" and run["state"] not in ("REQUEUED", "PREEMPTED")):
                    a["exit_state"] = run["state"].lower()
                    a["end"] = a.get("end") or _iso(run["End"])
                # The allocation lasted as long as Slurm says: the runner's clock stops before export and evaluation.
                a["elapsed_s"] = max(float(a.get("elapsed_s") or 0.0), elapsed)
                a["gpu_hours"] = attempt_gpu_hours(a)
            attempts.sort(key=lambda a: _when(a.get("start")))

    with m.update() as d:
        fix(d)
    _close_lost_attempts(m)


def _iso(sacct_time: str) -> str | None:
    """sacct prints local time without a zone; the manifest keeps UTC with its offset (as now_iso)."""
    try:
        return dt.datetime.fromisoformat(sacct_time).astimezone(dt.timezone.utc).isoformat(timespec="seconds")
    except ValueError:  # "Unknown", "None"
        return None


def _when(iso: str | None) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(iso) if iso else dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return dt.datetime.max.replace(tzinfo=dt.timezone.utc)


def _tres_gpus(tres: str) -> int:
    for item in (tres or "").split(","):
        key, _, value = item.partition("=")
        if key == "gres/gpu" and value.isdigit():
            return int(value)
    return 0


def _close_lost_attempts(m: Manifest) -> None:
    """Local attempts still 'running' while nobody runs them (the launcher was killed): closed as 'lost' with the
    time the runner last recorded."""
    with m.update() as d:
        for p in d["phases"].values():
            for a in p["attempts"]:
                if a.get("exit_state") == "running" and a.get("executor") == "local":
                    a["exit_state"] = "lost"


def wait_for(m: Manifest, job_ids: list[str], poll: float = 5.0) -> int:
    """Stay until the jobs have left the queue, printing each phase's progress; 0 when every phase is done."""
    seen: dict[str, tuple] = {}
    while True:
        queued = _squeue(job_ids)
        for n, p in m.read()["phases"].items():
            now = (p["state"], p["step"], p["total_steps"])
            if seen.get(n) != now:
                seen[n] = now
                print(f"[colbertzero] {n}: {p['state']} (step {p['step']}/{p['total_steps'] or '?'})", flush=True)
        if not queued:
            break
        time.sleep(poll)
    _reconcile(m)
    states = {n: p["state"] for n, p in m.read()["phases"].items()}
    if all(s == "done" for s in states.values()):
        return 0
    over = [n for n, s in states.items() if s == "over-budget"]
    how = f"colbertzero resume {m.run_dir}" + "".join(f" --phase-budget {n}=HOURS" for n in over)
    print(f"colbertzero: the chain stopped ({', '.join(f'{n}: {s}' for n, s in states.items())}); see "
          f"`colbertzero status {m.run_dir}`, continue with `{how}`", file=sys.stderr)
    return 1


# ================================================================================================ in each task
class PhaseTask:
    """What submitit runs in every task of a phase job (one task per GPU): the phase runner, then the requeue.

    The runner's signal handlers replace submitit's (submitit would checkpoint and requeue from rank 0 alone, inside
    its handler): every rank stops at the same step and checkpoints together, and the runner returns 3. Rank 0 then
    requeues the job (`scontrol requeue`) unless it already stopped `max_requeues` times (SLURM_RESTART_COUNT).
    """

    def __init__(self, run_dir: str, phase: str):
        self.run_dir = str(run_dir)
        self.phase = phase

    def __call__(self) -> str:
        held = _HeldSignals()  # before torch is imported: a warning that comes while the task starts is not lost
        try:
            from ..train.runner import run_phase

            code = run_phase(self.run_dir, self.phase)
        finally:
            held.close()
        if code == EXIT_DONE:
            return "done"
        if code == EXIT_REQUEUE:
            _requeue(self.run_dir, self.phase)
        if code == EXIT_OVER_BUDGET:
            # A failed job: Slurm never starts the phases that depend on it (afterok) and cancels them.
            raise RuntimeError(f"phase {self.phase!r} stopped at a checkpoint over its GPU-hour budget; continue "
                               f"with a raised budget: colbertzero resume {self.run_dir} --phase-budget "
                               f"{self.phase}=HOURS")
        raise RuntimeError(f"phase {self.phase!r} failed (exit {code}); see `colbertzero status {self.run_dir}`")


class _HeldSignals:
    """Holds the stop signals that arrive before the runner installs its handlers, and sends them again once it has.

    Without it such a signal would reach submitit's handler (rank 0 requeues at once, the other ranks ignore it) or,
    for a time-limit warning, end the job without a checkpoint.
    """

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.done = threading.Event()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._hold)
        threading.Thread(target=self._forward, name="colbertzero-held-signals", daemon=True).start()

    def _hold(self, signum, frame) -> None:
        self.pending.add(signum)

    def _forward(self) -> None:
        while not self.done.wait(0.2):
            replaced = [s for s in STOP_SIGNALS if signal.getsignal(s) != self._hold]
            for sig in replaced:
                if sig in self.pending:
                    self.pending.discard(sig)
                    os.kill(os.getpid(), sig)  # handled by the runner's handler in the main thread
            if len(replaced) == len(STOP_SIGNALS) and not self.pending:
                return

    def close(self) -> None:
        self.done.set()


def _requeue(run_dir: str, phase: str) -> None:
    """After a checkpointed stop: rank 0 requeues the job; every task then waits for Slurm to end it."""
    from .slurm_env import detect

    is_main = detect().is_main
    m = Manifest(run_dir)
    limit = m.recipe().phase(phase).resources.max_requeues
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    job = os.environ.get("SLURM_JOB_ID")
    if restarts >= limit or not job:
        reason = f"stopped at a checkpoint {restarts + 1} time(s); max_requeues={limit} reached"
        if is_main:
            m.update_phase(phase, lambda p: p.update(state="failed", failure={
                "step": p["step"], "source": None, "reason": reason, "time": now_iso()}))
        raise RuntimeError(f"phase {phase!r}: {reason}. `colbertzero resume {run_dir}` continues from the newest "
                           "checkpoint.")
    if is_main:
        state = _job_state(job)
        if state != "RUNNING":
            # Slurm is ending the job already: `scancel` (its SIGTERM stops the runner too, and a cancel must not
            # turn into a requeue), the time limit itself, or a preemption it requeues on its own.
            print(f"[colbertzero] phase {phase}: stopped at a checkpoint; job {job} is {state or 'gone'}, not "
                  f"requeued. `colbertzero resume {run_dir}` continues from the checkpoint.", file=sys.stderr,
                  flush=True)
        else:
            r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            if r.returncode != 0 and _job_state(job) == "RUNNING":
                raise RuntimeError(f"phase {phase!r} stopped at a checkpoint but `scontrol requeue {job}` failed: "
                                   f"{r.stderr.strip()}. `colbertzero resume {run_dir}` continues from the "
                                   "checkpoint.")
            print(f"[colbertzero] phase {phase}: requeued job {job} (restart {restarts + 1} of at most {limit})",
                  file=sys.stderr, flush=True)
    # Slurm ends every task of a requeued job (SIGTERM, then SIGKILL). A task that returned instead would report a
    # result for a job that is going to run again. On SIGTERM leave at once rather than wait for the SIGKILL.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    time.sleep(300)
    raise RuntimeError(f"job {job} stopped at a checkpoint but Slurm did not end this task within 300 s")


def _job_state(job: str) -> str:
    try:
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# ================================================================================================ local executor
def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: stop at a checkpoint
    except OSError:
        pass


class _LocalStop:
    """SIGINT/SIGTERM to the local launcher: forwarded to the ranks as SIGTERM (they checkpoint and exit 3), and the
    chain stops there instead of restarting the phase."""

    def __init__(self) -> None:
        self.requested = False
        self.procs: list[subprocess.Popen] = []
        main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
        self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}

    def _handler(self, signum, frame) -> None:
        self.requested = True
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _run_local(m: Manifest, recipe: Recipe, phases: list[str]) -> int:
    """The same chain on this machine: prepare in-process, then each phase as `world_size` processes of
    `colbertzero train` (torch.distributed on 127.0.0.1), restarted from its checkpoint after a stop signal."""
    missing = _missing_shards(recipe, phases)
    if missing:
        from ..data.prepare import prepare_recipe

        prepare_recipe(recipe, phases=missing, workers=min(recipe.prepare.workers, os.cpu_count() or 1))
    stop = _LocalStop()
    try:
        for n in phases:
            r = recipe.phase(n).resources
            tries = 0
            while True:
                code = _local_attempt(m, n, r.world_size, f"local-{time.strftime('%Y%m%dT%H%M%S')}-{tries}", stop)
                if code == EXIT_DONE:
                    break
                if code == EXIT_REQUEUE and not stop.requested and tries < r.max_requeues:
                    tries += 1
                    print(f"[colbertzero] phase {n}: stopped at a checkpoint; starting again ({tries}/"
                          f"{r.max_requeues})", file=sys.stderr)
                    continue
                what = {EXIT_REQUEUE: "stopped at a checkpoint", EXIT_OVER_BUDGET: "stopped over its GPU-hour budget"}
                print(f"[colbertzero] phase {n}: {what.get(code, f'failed (exit {code})')}; the chain stops here. "
                      f"See `colbertzero status {m.run_dir}`; continue with `colbertzero resume {m.run_dir}`"
                      + (f" --phase-budget {n}=HOURS" if code == EXIT_OVER_BUDGET else ""), file=sys.stderr)
                return code if code > 0 else EXIT_FAILED
    finally:
        stop.restore()
    return 0


def _local_attempt(m: Manifest, phase: str, world: int, attempt_id: str, stop: _LocalStop) -> int:
    port = _free_port()
    # Slurm variables of an enclosing allocation would make the runner think it is a Slurm job.
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    stop.procs = []
    for rank in range(world):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), COLBERTZERO_ATTEMPT_ID=attempt_id)
        # Own session: a Ctrl-C reaches the launcher only, which turns it into a checkpointed stop.
        stop.procs.append(subprocess.Popen([sys.executable, "-m", "colbertzero", "train", str(m.run_dir), "--phase",
                                            phase], env=env, start_new_session=True, preexec_fn=_die_with_parent))
    codes: dict[int, int] = {}
    deadline = None
    while len(codes) < world:
        for i, p in enumerate(stop.procs):
            if i not in codes and p.poll() is not None:
                codes[i] = p.returncode
        crashed = [c for c in codes.values() if c not in (EXIT_DONE, EXIT_REQUEUE, EXIT_OVER_BUDGET)]
        if crashed and deadline is None:
            deadline = time.monotonic() + 30  # the others may wait in a collective forever
        if deadline is not None and time.monotonic() > deadline:
            for i, p in enumerate(stop.procs):
                if i not in codes:
                    p.kill()
        time.sleep(0.2)
    values = list(codes.values())
    for c in values:
        if c not in (EXIT_DONE, EXIT_REQUEUE, EXIT_OVER_BUDGET):
            return c if c > 0 else EXIT_FAILED
    return max(values)
