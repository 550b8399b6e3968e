"""`launch` and `resume` → a :class:`Run`: the objects both the Python API (`colbertzero.launch`) and the CLI use.

A launch validates, creates the run dir, then runs prepare and the phase chain on Slurm (`submit.py`, submitit) or
on this machine (`local.py`). It refuses, submitting nothing, on: validation errors (for a new run nothing is written
either), Slurm refusing a job's resources (`sbatch --test-only`), a phase over its GPU-hour budget, jobs of the run
still queued, another launch/resume of the same run dir at the same moment (`RUN_DIR/launch.lock`).

`resume` also merges Slurm's accounting into the ledger (`ledger.merge_sacct`) and releases a job Slurm holds after a
requeue (Slurm 22.05 holds it ~120 s, BeginTime; the job cannot shorten that itself).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .. import ledger, preflight
from ..manifest import Manifest
from ..models import resolve_model_ref
from ..recipe import Recipe, load_recipe
from ..report import build_report, status_json
from ..runtime import Exit
from . import sbatch as sb
from . import slurm, submit
from .local import run_local
from .slurm import LaunchError

LOCK_WAIT_S = 60.0  # a submission takes seconds; longer means a local run holds the lock


class Run:
    """A run dir and the jobs working on it, as submitit's Job is to one job.

    ``returncode``: the chain's exit code once known here (a local run, or ``wait``); None while Slurm runs it.
    """

    def __init__(self, run_dir: str | os.PathLike, jobs: dict[str, str] | None = None,
                 returncode: int | None = None) -> None:
        self.manifest = Manifest(run_dir)
        self.run_dir = self.manifest.run_dir
        self.jobs: dict[str, str] = dict(jobs or {})
        self.returncode = returncode

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, jobs={self.jobs}, returncode={self.returncode})"

    def status(self) -> dict:
        """`colbertzero status --json`: phases, states, steps, checkpoints, GPU-hours, last evaluation."""
        return status_json(self.manifest.snapshot())

    def done(self) -> bool:
        return all(p["state"] == "done" for p in self.manifest.snapshot()["phases"].values())

    def wait(self, poll: float = 5.0) -> int:
        """Stay until the run's jobs have left the queue, printing each phase's progress; 0 when every phase is
        done."""
        if self.returncode is None:
            self.returncode = _wait_for(self.manifest, list(self.jobs.values()), poll)
        return self.returncode

    @property
    def exports(self) -> dict[str, str]:
        """{phase: path of its exported PyLate model} for the phases done so far."""
        return {n: str(self.run_dir / p["export"]["path"]) for n, p in self.manifest.snapshot()["phases"].items()
                if p.get("export")}

    def report(self, out_dir: str | None = None) -> Path:
        """Markdown + PNG report (``RUN_DIR/report/`` by default); returns report.md's path."""
        return build_report([str(self.run_dir)], out_dir)


# ================================================================================================ entry points
def launch(recipe: str | os.PathLike, run_dir: str | os.PathLike, overrides: list[str] | None = None,
           executor: str | None = None, budget: float | None = None, wait: bool = False) -> Run:
    """Validate RECIPE, create RUN_DIR, then submit prepare (if shards are missing) and every phase.

    ``executor``: "slurm" or "local" (default: Slurm when sbatch is here); a local run returns when the chain ends.
    """
    recipe = load_recipe(recipe, overrides or [])
    if budget is not None and budget <= 0:
        raise LaunchError(f"--budget {budget}: a GPU-hour budget is > 0")
    preflight.refuse_invalid(recipe, "nothing was submitted", budget)
    executor = _choose_executor(executor)
    if executor == "slurm":
        phases = list(recipe.phases)
        submit.preflight(recipe, phases, prepare=bool(_missing_shards(recipe, phases)))
    # Everything above refuses before the run dir exists: a refused launch writes nothing.
    m = Manifest.create(run_dir, recipe)
    if budget is not None:
        m.raise_budget(None, budget)
    return _submit(m, executor, wait)


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
    return _submit(m, executor or data.get("executor") or _choose_executor(None), wait)


# ================================================================================================ one submission
def _submit(m: Manifest, executor: str, wait: bool) -> Run:
    lock = FileLock(str(m.run_dir / "launch.lock"))
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise LaunchError(f"{m.run_dir}/launch.lock is held by another launch/resume of this run (a local run in "
                          "progress, or a submission that hangs); nothing submitted") from None
    try:
        run = _submit_locked(m, executor)
    finally:
        lock.release()
    if run.returncode is None:
        if wait:
            run.wait()
        else:
            print(f"follow it with: colbertzero status {m.run_dir}")
    return run


def _submit_locked(m: Manifest, executor: str) -> Run:
    alive = _alive_jobs(m)
    if alive:
        held = slurm.release_held(list(alive.values()))
        listed = ", ".join(f"{k}={job} {state}" for k, (job, state, _) in alive.items())
        print(f"{m.run_dir}: already in flight ({listed}); nothing submitted")
        if held:
            print(f"released job(s) {', '.join(held)} held after a requeue (Slurm's BeginTime); they start now")
        return Run(m.run_dir, {k: job for k, (job, _, _) in alive.items()})
    with m.update() as d:
        d["inflight"] = {}  # whatever was submitted before has left the queue
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
    missing = _missing_shards(recipe, phases)
    if executor == "slurm":
        submit.preflight(recipe, phases, prepare=bool(missing))

    with m.update() as d:
        d["executor"] = executor
        for n in phases:  # a phase that failed or was cut off starts again from its newest checkpoint
            if d["phases"][n]["state"] in ("failed", "running"):
                d["phases"][n]["state"] = "pending"
    _make_builtin_models(recipe, phases)
    if executor == "local":
        return Run(m.run_dir, returncode=run_local(m, recipe, phases, missing))
    return Run(m.run_dir, submit.submit_chain(m, recipe, phases, missing))


def _make_builtin_models(recipe: Recipe, phases: list[str]) -> None:
    """A `builtin:` init (tests, demos) is written on first use; make it here, once, rather than have every rank of
    the first job write the same folder at the same moment."""
    for n in phases:
        init = recipe.phase(n).init
        if isinstance(init, str) and init.startswith("builtin:"):
            resolve_model_ref(init)


def _missing_shards(recipe: Recipe, phases: list[str]) -> list[str]:
    """Phases with a source that has no shard index yet (`prepare` is idempotent: it redoes only what is missing)."""
    return [n for n in phases
            if any(not (Path(recipe.phase(n).data.shards_dir) / s.name / "index.json").exists()
                   for s in recipe.phase(n).data.sources)]


def _choose_executor(executor: str | None) -> str:
    if executor:
        return executor
    return "slurm" if slurm.available() else "local"


# ================================================================================================ queue and ledger
def _alive_jobs(m: Manifest) -> dict[str, tuple[str, str, str]]:
    """{step: (job id, state, reason)} for this run's jobs still pending or running, however they were submitted
    (found by job name, which carries the run's tag). Resubmitting then would run a phase twice."""
    data = m.read()
    if not (data.get("submissions") or data.get("sbatch_scripts") or data.get("executor") == "slurm"):
        return {}  # this run never went through Slurm
    if not slurm.available():
        raise LaunchError(f"{m.run_dir} was submitted to Slurm and there is no Slurm client here to ask whether its "
                          "jobs still run: resume it from the login node")
    recipe = m.recipe()
    steps = ("prepare", "prepare-index", *(f"derive-{d.name}" for d in recipe.derive), *recipe.phases)
    names = {sb.job_name(recipe, step, m.run_dir): step for step in steps}
    return {names[name]: v for name, v in slurm.queued_by_name(list(names)).items()}


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


def _wait_for(m: Manifest, job_ids: list[str], poll: float = 5.0) -> int:
    seen: dict[str, tuple] = {}
    while True:
        queued = slurm.queued(job_ids)
        for n, p in m.read()["phases"].items():
            now = (p["state"], p["step"], p["total_steps"])
            if seen.get(n) != now:
                seen[n] = now
                print(f"[colbertzero] {n}: {p['state']} (step {p['step']}/{p['total_steps'] or '?'})", flush=True)
        if not queued:
            break
        time.sleep(poll)
    reconcile(m)
    states = {n: p["state"] for n, p in m.read()["phases"].items()}
    if all(s == "done" for s in states.values()):
        return Exit.DONE
    over = [n for n, s in states.items() if s == "over-budget"]
    how = f"colbertzero resume {m.run_dir}" + "".join(f" --phase-budget {n}=HOURS" for n in over)
    print(f"colbertzero: the chain stopped ({', '.join(f'{n}: {s}' for n, s in states.items())}); see "
          f"`colbertzero status {m.run_dir}`, continue with `{how}`", file=sys.stderr)
    return Exit.FAILED
