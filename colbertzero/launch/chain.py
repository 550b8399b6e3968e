"""`launch` and `resume`: validate, then submit prepare and the phase chain, on Slurm (submitit) or locally.

The launcher never trains: a phase job runs `colbertzero.train.runner.run_phase` in every task and reports through
the run dir's manifest. What the launcher adds is the chain (Slurm `afterok` dependencies), the requeue after a
checkpointed stop, and the refusals (validation, budget, a run already in flight) that submit nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

from filelock import FileLock, Timeout

from .. import preflight
from ..manifest import Manifest, ManifestError, now_iso
from ..recipe import Recipe, load_recipe, parse_time_limit

EXIT_REFUSED = 2


class LaunchError(RuntimeError):
    """A refused launch; nothing was submitted."""


# ------------------------------------------------------------------ task run inside each Slurm task
class PhaseTask:
    """What submitit runs in every task of a phase job (one task per GPU).

    Slurm's warning signal (submitit asks for USR2 before the time limit; preemption the same) reaches every task;
    the runner's own handler replaces submitit's, so all ranks stop at the same step and checkpoint together. Rank 0
    then requeues the job itself (`scontrol requeue`), up to the recipe's `max_requeues`; the requeued attempt
    resumes from the newest complete checkpoint.
    """

    def __init__(self, run_dir: str, phase: str):
        self.run_dir = str(run_dir)
        self.phase = phase

    def __call__(self) -> str:
        from ..train.runner import EXIT_DONE, EXIT_OVER_BUDGET, EXIT_REQUEUE, run_phase
        from .slurm_env import set_torch_env

        dist = set_torch_env()
        code = run_phase(self.run_dir, self.phase)
        if code == EXIT_DONE:
            return "done"
        if code == EXIT_REQUEUE:
            return _requeue_or_fail(self.run_dir, self.phase, dist.is_main)
        if code == EXIT_OVER_BUDGET:
            # A failed job: Slurm never starts the phases that depend on it (afterok), and kills them.
            raise RuntimeError(f"phase {self.phase!r} stopped over its GPU-hour budget; raise it with `colbertzero "
                               f"resume {self.run_dir} --phase-budget {self.phase}=HOURS`")
        raise RuntimeError(f"phase {self.phase!r} failed (exit {code}); see `colbertzero status {self.run_dir}`")


def _requeue_or_fail(run_dir: str, phase: str, is_main: bool) -> str:
    m = Manifest(run_dir)
    max_requeues = m.recipe().phase(phase).resources.max_requeues
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    job = os.environ.get("SLURM_JOB_ID")
    if restarts >= max_requeues:
        if is_main:
            m.set_state(phase, "failed", failure={"step": m.phase(phase)["step"], "source": None,
                                                  "reason": f"requeue limit reached ({max_requeues})",
                                                  "time": now_iso()})
        raise RuntimeError(f"phase {phase!r}: stopped {restarts + 1} times; max_requeues={max_requeues} reached. "
                           f"`colbertzero resume {run_dir}` continues from the newest checkpoint.")
    if is_main and job:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    # Slurm ends every task of the requeued job; wait for that rather than report a result.
    time.sleep(600)
    raise RuntimeError("requeue did not end this task")


# ------------------------------------------------------------------ helpers
def _have_slurm() -> bool:
    return shutil.which("sbatch") is not None


def _pending_phases(recipe: Recipe, data: dict) -> list[str]:
    return [n for n in recipe.phases if data["phases"][n]["state"] != "done"]


def _missing_shards(recipe: Recipe, phases: list[str]) -> list[str]:
    out = []
    for n in phases:
        ph = recipe.phase(n)
        if any(not (Path(ph.data.shards_dir) / s.name / "index.json").exists() for s in ph.data.sources):
            out.append(n)
    return out


def _budget_refusals(m: Manifest, phases: list[str]) -> list[str]:
    out = []
    for n in phases:
        p = m.phase(n)
        budget = m.budget(n)
        used = m.gpu_hours(n)
        if p["state"] == "over-budget" or (budget is not None and used >= budget):
            out.append(f"phase {n!r} is over its budget ({used:.3g} of {budget} GPU-hours used); "
                       f"raise it: `colbertzero resume {m.run_dir} --phase-budget {n}=HOURS`")
    rb = m.run_budget()
    if rb is not None and m.gpu_hours() >= rb:
        out.append(f"the run used {m.gpu_hours():.3g} of its {rb} GPU-hours; raise it with --budget")
    return out


def _lock(run_dir: Path) -> FileLock:
    return FileLock(str(run_dir / "launch.lock"), timeout=0)


# ------------------------------------------------------------------ entry points
def launch(recipe_path: str, run_dir: str, overrides: list[str] | None = None, executor: str | None = None,
           budget: float | None = None, wait: bool = False) -> int:
    recipe = load_recipe(recipe_path, overrides or [])
    if budget is not None:
        recipe = recipe.model_copy(update={"budget_gpu_hours": budget})
    findings = preflight.check(recipe)
    errs = preflight.errors(findings)
    if errs:
        print(f"colbertzero launch: {recipe_path}: refused ({len(errs)} error(s)); nothing was submitted",
              file=sys.stderr)
        for f in errs:
            print(f"  {f}", file=sys.stderr)
        return EXIT_REFUSED
    executor = executor or ("slurm" if _have_slurm() else "local")
    if executor == "slurm":
        _slurm_preflight(recipe, list(recipe.phases))  # before the run dir exists: a refusal writes nothing
    m = Manifest.create(run_dir, recipe)
    return _submit(m, executor, wait)


def resume(run_dir: str, executor: str | None = None, budget: float | None = None,
           phase_budgets: list[str] | None = None, wait: bool = False) -> int:
    m = Manifest(run_dir)
    m.read()  # refuses a missing / corrupt / foreign manifest
    for spec in phase_budgets or []:
        name, _, hours = spec.partition("=")
        if not hours:
            raise LaunchError(f"--phase-budget {spec!r}: expected PHASE=HOURS")
        m.phase(name)
        m.raise_budget(name, float(hours))
    if budget is not None:
        m.raise_budget(None, budget)
    executor = executor or m.read().get("executor") or ("slurm" if _have_slurm() else "local")
    return _submit(m, executor, wait)


def _submit(m: Manifest, executor: str, wait: bool) -> int:
    try:
        lock = _lock(m.run_dir)
        lock.acquire()
    except Timeout:
        print(f"colbertzero: another launch/resume of {m.run_dir} is submitting right now; nothing submitted",
              file=sys.stderr)
        return EXIT_REFUSED
    try:
        recipe = m.recipe()
        data = m.read()
        phases = _pending_phases(recipe, data)
        if not phases:
            print(f"{m.run_dir}: every phase is done; nothing to submit")
            return 0
        inflight = _inflight(m, executor)
        if inflight:
            print(f"{m.run_dir}: already in flight ({', '.join(inflight)}); nothing submitted")
            return 0
        refusals = _budget_refusals(m, phases)
        if refusals:
            print(f"colbertzero: {m.run_dir}: refused; nothing was submitted", file=sys.stderr)
            for r in refusals:
                print(f"  {r}", file=sys.stderr)
            return EXIT_REFUSED
        for n in phases:  # a phase that failed or was interrupted starts again from its newest checkpoint
            if data["phases"][n]["state"] in ("failed", "running"):
                m.set_state(n, "pending")
        with m.update() as d:
            d["executor"] = executor
        if executor == "local":
            return _run_local(m, recipe, phases)
        return _submit_slurm(m, recipe, phases, wait)
    finally:
        lock.release()


# ------------------------------------------------------------------ local executor
def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_local(m: Manifest, recipe: Recipe, phases: list[str]) -> int:
    """The same chain on this machine: prepare, then each phase as `world_size` processes of `colbertzero train`."""
    from ..train.runner import EXIT_DONE, EXIT_REQUEUE

    missing = _missing_shards(recipe, phases)
    if missing:
        from ..data.prepare import prepare_recipe

        prepare_recipe(recipe, phases=missing, workers=recipe.prepare.workers)
    for n in phases:
        ph = recipe.phase(n)
        world = ph.resources.world_size
        tries = 0
        while True:
            port = _free_port()
            procs = []
            for rank in range(world):
                env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                           LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           COLBERTZERO_ATTEMPT_ID=f"local-{int(time.time())}-{tries}")
                procs.append(subprocess.Popen([sys.executable, "-m", "colbertzero", "train", str(m.run_dir),
                                               "--phase", n], env=env))
            codes = [p.wait() for p in procs]
            code = max(codes, key=lambda c: (c != 0, c))
            if code == EXIT_DONE:
                break
            if code == EXIT_REQUEUE and tries < ph.resources.max_requeues:
                tries += 1
                print(f"[colbertzero] phase {n}: stopped at a checkpoint; restarting ({tries}/"
                      f"{ph.resources.max_requeues})", file=sys.stderr)
                continue
            print(f"[colbertzero] phase {n}: exit {code}; the chain stops here. `colbertzero status {m.run_dir}`",
                  file=sys.stderr)
            return code if code > 0 else 1
    return 0


# ------------------------------------------------------------------ Slurm executor (submitit)
def _slurm_preflight(recipe: Recipe, phases: list[str]) -> None:
    """`sbatch --test-only` with every phase's resources: a bad partition/account/QoS is refused before anything
    is submitted, with sbatch's own message."""
    if not _have_slurm():
        raise LaunchError("--executor slurm: sbatch not found on this machine (use --executor local, or run from a "
                          "login node)")
    for n in phases:
        args = _sbatch_args(recipe, n)
        r = subprocess.run(["sbatch", "--test-only", *args, "--wrap", "true"], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise LaunchError(f"phase {n!r}: Slurm refuses its resources ({' '.join(args)}): "
                              f"{r.stderr.strip() or r.stdout.strip()}; nothing was submitted")


def _sbatch_args(recipe: Recipe, n: str) -> list[str]:
    r = recipe.phase(n).resources
    a = [f"--nodes={r.nodes}", f"--ntasks-per-node={r.tasks_per_node}", f"--cpus-per-task={r.cpus_per_task}",
         f"--time={r.time_limit}"]
    if r.gpus_per_node:
        a.append(f"--gpus-per-node={r.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint", "mem"):
        v = getattr(r, key)
        if v:
            a.append(f"--{key}={v}")
    return a


def _executor(m: Manifest, folder: str, name: str):
    import submitit

    return submitit.AutoExecutor(folder=str(m.run_dir / "slurm" / folder), cluster="slurm"), name


def _phase_params(recipe: Recipe, n: str, dependency: str | None) -> dict:
    r = recipe.phase(n).resources
    add: dict = {"kill-on-invalid-dep": "yes", "requeue": True}
    if dependency:
        add["dependency"] = dependency
    for extra in r.extra_sbatch:
        k, _, v = extra.lstrip("-").partition("=")
        add[k] = v if v else True
    p = dict(
        name=f"cz-{recipe.name}-{n}",
        nodes=r.nodes,
        tasks_per_node=r.tasks_per_node,
        cpus_per_task=r.cpus_per_task,
        timeout_min=max(1, parse_time_limit(r.time_limit) // 60),
        slurm_signal_delay_s=r.signal_seconds,
        slurm_additional_parameters=add,
        slurm_setup=list(r.setup),
    )
    if r.gpus_per_node:
        p["gpus_per_node"] = r.gpus_per_node
    if r.partition:
        p["slurm_partition"] = r.partition
    if r.mem:
        p["slurm_mem"] = r.mem
    for key in ("account", "qos", "constraint"):
        if getattr(r, key):
            p[f"slurm_{key}"] = getattr(r, key)
    return p


def _submit_slurm(m: Manifest, recipe: Recipe, phases: list[str], wait: bool) -> int:
    _slurm_preflight(recipe, phases)
    jobs: dict[str, str] = {}
    dep = None
    missing = _missing_shards(recipe, phases)
    if missing:
        dep = _submit_prepare(m, recipe, missing, jobs)
    for n in phases:
        ex, name = _executor(m, n, n)
        ex.update_parameters(**_phase_params(recipe, n, dep))
        job = ex.submit(PhaseTask(str(m.run_dir), n))
        jobs[n] = job.job_id
        dep = f"afterok:{job.job_id}"
    with m.update() as d:
        d.setdefault("submissions", []).append({"time": now_iso(), "executor": "slurm", "jobs": jobs})
        d["inflight"] = jobs
    print(f"submitted: {', '.join(f'{k}={v}' for k, v in jobs.items())}")
    if wait:
        return wait_for(m, list(jobs.values()))
    return 0


def _submit_prepare(m: Manifest, recipe: Recipe, phases: list[str], jobs: dict) -> str:
    """Tokenize the missing shards as a Slurm array (each task a share), then one small task writes the indexes."""
    import submitit

    from ..data.prepare import index_recipe, prepare_recipe

    pr = recipe.prepare
    first = recipe.phase(phases[0]).resources
    ex = submitit.AutoExecutor(folder=str(m.run_dir / "slurm" / "prepare"), cluster="slurm")
    params = dict(name=f"cz-{recipe.name}-prepare", nodes=1, tasks_per_node=1, cpus_per_task=pr.cpus_per_task,
                  timeout_min=max(1, parse_time_limit(pr.time_limit) // 60), slurm_setup=list(pr.setup),
                  slurm_additional_parameters={"kill-on-invalid-dep": "yes"})
    part = pr.partition or first.partition
    if part:
        params["slurm_partition"] = part
    for key in ("account", "qos", "mem"):
        v = getattr(pr, key) or (getattr(first, key) if key != "mem" else None)
        if v:
            params["slurm_" + key] = v
    ex.update_parameters(**params)
    n = pr.array_tasks
    with ex.batch():
        arr = [ex.submit(prepare_recipe, recipe, phases, pr.workers, False, (i, n)) for i in range(n)]
    jobs["prepare"] = arr[0].job_id.split("_")[0]
    ex.update_parameters(slurm_additional_parameters={"kill-on-invalid-dep": "yes",
                                                      "dependency": f"afterok:{jobs['prepare']}"})
    final = ex.submit(index_recipe, recipe, phases, False)  # one index per source, once every share is written
    jobs["prepare-index"] = final.job_id
    return f"afterok:{final.job_id}"


def _inflight(m: Manifest, executor: str) -> list[str]:
    """Jobs of an earlier submission still pending or running in Slurm: resubmitting would run a phase twice."""
    if executor != "slurm":
        return []
    jobs = m.read().get("inflight") or {}
    if not jobs:
        return []
    r = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(jobs.values())], capture_output=True,
                       text=True, timeout=60)
    alive = {line.split()[0].split("_")[0]: line.split()[1] for line in r.stdout.splitlines() if line.strip()}
    return [f"{k}={v} {alive[v]}" for k, v in jobs.items() if v in alive]


def wait_for(m: Manifest, job_ids: list[str], poll: float = 5.0) -> int:
    """Block until the submitted jobs have left the queue; exit 0 when every phase is done."""
    while True:
        r = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True,
                           timeout=60)
        if not r.stdout.strip():
            break
        time.sleep(poll)
    data = m.read()
    states = {n: p["state"] for n, p in data["phases"].items()}
    return 0 if all(s == "done" for s in states.values()) else 1
