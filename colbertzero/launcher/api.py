"""`launch` and `resume` → a :class:`Run`: the objects both the Python API (`colbertzero.launch`) and the CLI use.

A launch validates, creates the run dir, then hands prepare and the phase chain to an executor (`executors.py`:
Slurm through submitit, or the local chain process) and returns the jobs it started. It refuses, submitting nothing,
on: validation errors (for a new run nothing is written either), the executor refusing (Slurm's `sbatch --test-only`,
GPUs this machine does not have), a phase over its GPU-hour budget, jobs of the run still queued or running, another
launch/resume of the same run dir at the same moment (`RUN_DIR/launch.lock`).

`resume` also merges Slurm's accounting into the ledger (`ledger.merge_sacct`) and releases a job Slurm holds after a
requeue (Slurm 22.05 holds it ~120 s, BeginTime; the job cannot shorten that itself).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .. import ledger, preflight, slurm
from ..data.shards import unprepared
from ..manifest import Manifest
from ..models import resolve_model_ref
from ..recipe import Recipe, load_recipe
from ..report import build_report, live_states, status_json
from ..runtime import Exit, resume_command
from ..slurm import LaunchError
from .executors import Executor, Job, SlurmExecutor, alive_jobs, executor_for, helper_jobs

LOCK_WAIT_S = 60.0  # a submission takes seconds; longer means another launch/resume hangs


class Run:
    """A run dir and the jobs working on it, as submitit's Job is to one job.

    ``jobs``: {step: Job} this call started or found running; ``returncode``: the chain's exit code once known here
    (``wait``), None while it runs.
    """

    def __init__(self, run_dir: str | os.PathLike, jobs: dict[str, Job] | None = None,
                 returncode: int | None = None) -> None:
        self.manifest = Manifest(run_dir)
        self.run_dir = self.manifest.run_dir
        self.jobs: dict[str, Job] = dict(jobs or {})
        self.returncode = returncode

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, jobs={self.job_ids}, returncode={self.returncode})"

    @property
    def job_ids(self) -> dict[str, str]:
        return {step: job.job_id for step, job in self.jobs.items()}

    def status(self) -> dict:
        """`colbertzero status --json`: phases, states, steps, checkpoints, GPU-hours, last evaluation."""
        data = self.manifest.snapshot()
        return status_json(data, live_states(data))

    def done(self) -> bool:
        return all(p["state"] == "done" for p in self.manifest.snapshot()["phases"].values())

    def wait(self, poll: float = 5.0) -> int:
        """Stay until the run's jobs have ended, showing their progress (a local chain's log as it grows); 0 when
        every phase is done. SIGINT/SIGTERM while waiting stop a local chain at a checkpoint (waiting on until it has
        stopped); Slurm jobs run on."""
        if self.returncode is None:
            here = [j for j in self.jobs.values() if j.runs_here]
            with _stop_forwarded(here):
                if here:
                    for job in here:
                        job.wait(follow=sys.stderr)
                else:
                    _follow(self.manifest, list(self.jobs.values()), poll)
            reconcile(self.manifest)
            codes = [j.exit_code() for j in self.jobs.values() if j.exit_code() is not None]
            self.returncode = codes[-1] if codes else _chain_code(self.manifest)
        return self.returncode

    def cancel(self) -> None:
        """Cancel the run's jobs and its helper jobs (a local chain stops at a checkpoint; Slurm jobs are
        scancelled; evaluation jobs in flight too)."""
        for job in {**self.jobs, **helper_jobs(self.manifest)}.values():
            job.cancel()

    @property
    def exports(self) -> dict[str, str]:
        """{phase: path of its exported PyLate model} for the phases done so far."""
        phases = self.manifest.snapshot()["phases"]
        return {n: str(self.manifest.layout.resolve(p["export"]["path"])) for n, p in phases.items() if p.get("export")}

    def report(self, out_dir: str | None = None) -> Path:
        """Markdown + PNG report (``RUN_DIR/report/`` by default); returns report.md's path."""
        return build_report([str(self.run_dir)], out_dir)


# ================================================================================================ entry points
def launch(recipe: str | os.PathLike, run_dir: str | os.PathLike, overrides: list[str] | None = None,
           executor: str | None = None, budget: float | None = None, wait: bool = False,
           cluster: str | None = None) -> Run:
    """Validate RECIPE, create RUN_DIR, then start prepare (if shards are missing) and every phase. ``cluster``: a
    cluster profile's name or path, in place of the recipe's (docs/cluster.md).

    ``executor``: "slurm" or "local" (default: Slurm when sbatch is here). Both return once the jobs are started;
    ``wait=True`` (or `Run.wait()`) stays until they end.
    """
    recipe = load_recipe(recipe, overrides or [], cluster=cluster)
    if budget is not None and budget <= 0:
        raise LaunchError(f"--budget {budget}: a GPU-hour budget is > 0")
    preflight.refuse_invalid(recipe, "nothing was submitted", budget)
    ex = executor_for(executor)
    phases = list(recipe.phases)
    ex.preflight(recipe, phases, prepare=bool(unprepared(recipe, phases)))
    # Everything above refuses before the run dir exists: a refused launch writes nothing.
    m = Manifest.create(run_dir, recipe)
    if budget is not None:
        m.raise_budget(None, budget)
    return _submit(m, ex, wait)


def resume(run_dir: str | os.PathLike, executor: str | None = None, budget: float | None = None,
           phase_budgets: list[str] | None = None, wait: bool = False) -> Run:
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
    return _submit(m, executor_for(executor or data.get("executor")), wait)


def cancel(run_dir: str | os.PathLike) -> list[str]:
    """Cancel every job of the run still queued or running — phases, the local chain, derive arrays, evaluation
    jobs — whichever executor started it; ``step=job id`` of each."""
    m = Manifest(run_dir)
    jobs = {**alive_jobs(m), **helper_jobs(m)}
    for job in jobs.values():
        job.cancel()
    return [f"{step}={job.job_id}" for step, job in jobs.items()]


# ================================================================================================ one submission
def _submit(m: Manifest, ex: Executor, wait: bool) -> Run:
    lock = FileLock(str(m.layout.launch_lock))
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise LaunchError(f"{m.layout.launch_lock} is held by another launch/resume of this run (a submission that "
                          "hangs); nothing submitted") from None
    try:
        run = _submit_locked(m, ex)
    finally:
        lock.release()
    if run.returncode is None:
        if wait:
            run.wait()
        else:
            print(f"follow it with: colbertzero status {m.run_dir}")
    return run


def _submit_locked(m: Manifest, ex: Executor) -> Run:
    alive = alive_jobs(m)
    if alive:
        held = SlurmExecutor.release_held({k: j for k, j in alive.items() if not j.runs_here})
        listed = ", ".join(f"{k}={job.job_id} {job.state()}" for k, job in alive.items())
        print(f"{m.run_dir}: already in flight ({listed}); nothing submitted")
        if held:
            print(f"released job(s) {', '.join(held)} held after a requeue (Slurm's BeginTime); they start now")
        return Run(m.run_dir, alive)
    with m.update() as d:
        d["inflight"] = {}  # whatever was submitted before has ended
    reconcile(m)
    recipe = m.recipe()
    data = m.read()
    phases = [n for n in recipe.phases if data["phases"][n]["state"] != "done"]
    if not phases:
        print(f"{m.run_dir}: every phase is done; nothing to submit")
        return Run(m.run_dir, returncode=Exit.DONE)
    refusals = ledger.budget_refusals(data, phases, str(m.run_dir)) + preflight.path_refusals(recipe, phases)
    if refusals:
        raise LaunchError(f"{m.run_dir}: refused; nothing was submitted\n" + "\n".join(f"  {r}" for r in refusals))
    missing = unprepared(recipe, phases)
    ex.preflight(recipe, phases, prepare=bool(missing))
    with m.update() as d:
        d["executor"] = ex.name
        for n in phases:  # a phase that failed or was cut off starts again from its newest checkpoint
            if d["phases"][n]["state"] in ("failed", "running"):
                d["phases"][n]["state"] = "pending"
    _make_builtin_models(recipe, phases)
    return Run(m.run_dir, ex.submit(m, recipe, phases, missing))


def _make_builtin_models(recipe: Recipe, phases: list[str]) -> None:
    """A `builtin:` init (tests, demos) is written on first use; make it here, once, rather than have every rank of
    the first job write the same folder at the same moment."""
    for n in phases:
        init = recipe.phase(n).init
        if isinstance(init, str) and init.startswith("builtin:"):
            resolve_model_ref(init)


@contextlib.contextmanager
def _stop_forwarded(jobs: list[Job]):
    """While waiting on jobs that run on this machine: SIGINT/SIGTERM cancel them (a checkpointed stop)."""
    if not jobs or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        print(f"[colbertzero] {signal.Signals(signum).name}: stopping the local chain at a checkpoint; nothing "
              "after the running phase starts", file=sys.stderr, flush=True)
        for job in jobs:
            job.cancel()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ================================================================================================ queue and ledger
def reconcile(m: Manifest) -> None:
    """The ledger against Slurm's accounting (`ledger.merge_sacct`), then local attempts nobody runs any more."""
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
    runs: dict[str, list[dict]] = {}
    if per_phase and slurm.available():
        runs = {n: [r for job in dict.fromkeys(jobs) for r in slurm.ended_runs(job)] for n, jobs in per_phase.items()}
    recipe = m.recipe()
    tasks = {n: recipe.phase(n).resources.world_size for n in runs}
    with m.update() as d:
        ledger.merge_sacct(d, runs, tasks)
        ledger.close_lost_attempts(d)


def _follow(m: Manifest, jobs: list[Job], poll: float = 5.0) -> None:
    """Print each phase's progress as the manifest records it, until every job has ended."""
    seen: dict[str, tuple] = {}
    while True:
        running = [j for j in jobs if not j.done()]
        for n, p in m.read()["phases"].items():
            now = (p["state"], p["step"], p["total_steps"])
            if seen.get(n) != now:
                seen[n] = now
                print(f"[colbertzero] {n}: {p['state']} (step {p['step']}/{p['total_steps'] or '?'})", flush=True)
        if not running:
            return
        time.sleep(poll)


def _chain_code(m: Manifest) -> int:
    """The chain's exit code from the manifest: 0 when every phase is done; else what to do, and 1."""
    states = {n: p["state"] for n, p in m.read()["phases"].items()}
    if all(s == "done" for s in states.values()):
        return Exit.DONE
    over = [n for n, s in states.items() if s == "over-budget"]
    print(f"colbertzero: the chain stopped ({', '.join(f'{n}: {s}' for n, s in states.items())}); see "
          f"`colbertzero status {m.run_dir}`, continue with `{resume_command(m.run_dir, phase_budgets=over)}`",
          file=sys.stderr)
    return Exit.FAILED
