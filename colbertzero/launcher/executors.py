"""Executors in submitit's shape: ``executor.submit(...)`` returns jobs that have ``state()``, ``done()``, ``wait()``,
``result()``, ``exception()`` and ``cancel()``. `api.py` (launch, resume, Run) speaks to this interface only.

- `SlurmExecutor`: the run's derive arrays, prepare array and index job, and the phase chain, as submitit jobs
  (`submit.py`); jobs of a run still in the queue are found again by name (`resume`, another login node).
- `LocalExecutor`: one chain process on this machine (`colbertzero local-chain RUN_DIR`, `local.py`) that runs in
  the background like a job: derive, prepare, then each phase's ranks. It holds `local-chain.lock` for as long as it
  runs (how another process knows it is alive), writes `logs/local-chain.log`, and stops on SIGTERM the way a time
  limit stops a Slurm job: the running phase checkpoints, nothing after it starts. What the recipe asks for and this
  machine cannot give (GPUs) is refused before it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, TextIO

import submitit

from .. import slurm
from ..files import now_iso
from ..layout import RunLayout
from ..manifest import Manifest
from ..preflight import cluster_refusals
from ..recipe import Recipe
from ..runtime import Exit, cancel_detached, detached_state
from ..slurm import LaunchError
from . import sbatch, submit

# States after which a job does not run again: Slurm's (slurm.ENDED), and ENDED for a job that left the queue on a
# cluster without accounting (nothing says how it ended).
FINAL = slurm.ENDED | {"ENDED"}


class Job(ABC):
    """One submitted unit of a run: a Slurm job (an array counts as one) or the local chain."""

    step: str
    job_id: str
    runs_here = False  # a stop signal to whoever waits on it stops it too (a local chain); Slurm jobs run on

    def done(self) -> bool:
        return self.state() in FINAL

    def wait(self, poll: float = 5.0) -> None:
        while not self.done():
            time.sleep(poll)

    def exception(self) -> BaseException | None:
        try:
            self.result()
        except Exception as e:  # noqa: BLE001 - handed to the caller, as submitit's Job.exception does
            return e
        return None

    def exit_code(self) -> int | None:
        """The chain's exit code where the job knows it (local); None for Slurm jobs (the manifest tells)."""
        return None

    @abstractmethod
    def state(self) -> str: ...

    @abstractmethod
    def result(self) -> Any: ...

    @abstractmethod
    def cancel(self) -> None: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.step!r}, {self.job_id!r}, {self.state()})"


class SlurmJob(Job):
    """A Slurm job of a run, over submitit's job of the same id (its folder holds the task's result or error)."""

    def __init__(self, step: str, job_id: str, folder: Path):
        self.step, self.job_id = step, str(job_id)
        self._job = submitit.SlurmJob(folder=folder, job_id=self.job_id)

    def state(self) -> str:
        queued = slurm.queued([self.job_id])
        if queued:
            return next(iter(queued.values()))[1]
        runs = slurm.ended_runs(self.job_id)
        return runs[-1]["state"] if runs else "ENDED"

    def result(self) -> Any:
        """What the job's task returned; raises its error (a phase that did not finish, a failed prepare)."""
        return self._job.result()

    def cancel(self) -> None:
        slurm.cancel([self.job_id])


class LocalJob(Job):
    """The local chain process of a run: started here (``proc``) or found running by its lock."""

    runs_here = True

    def __init__(self, run_dir: Path, pid: int, proc: subprocess.Popen | None = None, log_offset: int | None = None):
        self.layout = RunLayout.of(run_dir)
        self.step, self.job_id, self.pid, self.proc = "chain", f"local:{pid}", pid, proc
        self.log_offset = log_offset  # where this chain's lines start in the log (None: from now on)

    def state(self) -> str:
        running = self.proc.poll() is None if self.proc is not None else chain_running(self.layout)
        if running:
            return "RUNNING"
        code = self.exit_code()
        return "COMPLETED" if code == Exit.DONE else "FAILED"

    def exit_code(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        if chain_running(self.layout):
            return None
        record = Manifest(self.layout.root).snapshot().get("local_chain") or {}
        return record.get("exit_code") if record.get("pid") == self.pid else Exit.FAILED

    def wait(self, poll: float = 1.0, follow: TextIO | None = None) -> None:
        """Until the chain ends; ``follow``: copy its log there as it grows."""
        with open(self.layout.chain_log, "rb") if follow else contextlib.nullcontext() as log:
            if log is not None:
                log.seek(*((0, os.SEEK_END) if self.log_offset is None else (self.log_offset, os.SEEK_SET)))
            while True:
                finished = self.done()
                if log is not None:
                    chunk = log.read()
                    if chunk:
                        follow.write(chunk.decode(errors="replace"))
                        follow.flush()
                if finished:
                    return
                time.sleep(poll)

    def result(self) -> int:
        code = self.exit_code()
        if code is None:
            raise RuntimeError(f"the local chain of {self.layout.root} is still running")
        if code != Exit.DONE:
            raise RuntimeError(f"the local chain of {self.layout.root} ended with exit {code}; see "
                               f"{self.layout.chain_log}")
        return code

    def cancel(self) -> None:
        """Stop the chain as a time limit would: its running phase checkpoints, nothing after it starts."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)


class DetachedJob(Job):
    """An in-training evaluation job a phase started (`runtime.detach`: a Slurm job, or a background process)."""

    def __init__(self, step: str, handle: str, m: Manifest, phase: str, eval_step: str):
        self.step, self.job_id = step, handle
        self._m, self._phase, self._eval_step = m, phase, eval_step

    def state(self) -> str:
        return detached_state(self.job_id)[0]

    def result(self) -> dict:
        """Its record in the manifest (state, reason, seconds)."""
        return (self._m.phase(self._phase).get("eval_jobs") or {}).get(self._eval_step) or {}

    def cancel(self) -> None:
        cancel_detached(self.job_id)
        self._m.close_eval_job(self._phase, self._eval_step, "cancelled", "colbertzero cancel")


class BeirJob(Job):
    """One of the jobs of a phase's eval.beir after it (encode array, search array, merge)."""

    def __init__(self, step: str, job_id: str, m: Manifest, phase: str):
        self.step, self.job_id, self._m, self._phase = step, job_id, m, phase

    def state(self) -> str:
        return detached_state(f"job:{self.job_id}")[0]

    def result(self) -> dict:
        return self._m.phase(self._phase).get("eval") or {}

    def cancel(self) -> None:
        cancel_detached(f"job:{self.job_id}")
        self._m.update_phase(self._phase, lambda p: p["beir_eval"].update(state="cancelled",
                                                                         reason="colbertzero cancel"))


def helper_jobs(m: Manifest) -> dict[str, Job]:
    """The run's evaluation jobs that may still write a result: in-training ones and a phase's eval.beir arrays
    (derive arrays are among `alive_jobs`)."""
    phases = m.read()["phases"]
    jobs: dict[str, Job] = {
        f"eval-{phase}-{step}": DetachedJob(f"eval-{phase}-{step}", rec["handle"], m, phase, step)
        for phase in phases for step, rec in m.open_eval_jobs(phase).items() if rec.get("handle")}
    for phase, p in phases.items():
        beir = p.get("beir_eval") or {}
        if beir.get("state") == "submitted":
            jobs.update({f"beir-{phase}-{stage}": BeirJob(f"beir-{phase}-{stage}", j["job"], m, phase)
                         for stage, j in (beir.get("jobs") or {}).items()})
    return jobs


def chain_running(layout: RunLayout) -> bool:
    """Is a local chain process holding this run's chain lock?"""
    try:
        fd = os.open(layout.chain_lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ================================================================================================ executors
class Executor(ABC):
    name: str

    @abstractmethod
    def preflight(self, recipe: Recipe, phases: list[str], prepare: bool) -> None:
        """Refuse (LaunchError), before anything is written, what this executor cannot run."""

    @abstractmethod
    def submit(self, m: Manifest, recipe: Recipe, phases: list[str], missing_shards: list[str]) -> dict[str, Job]:
        """Derive and prepare what is missing, then run ``phases`` in order; {step: job}."""

    @abstractmethod
    def alive(self, m: Manifest) -> dict[str, Job]:
        """This run's jobs of this executor that are still queued or running."""


class SlurmExecutor(Executor):
    name = "slurm"

    def preflight(self, recipe: Recipe, phases: list[str], prepare: bool) -> None:
        """Every job against the partitions (the field and the largest value it allows), then Slurm's own verdict."""
        refusals = cluster_refusals(recipe, slurm.partitions() if slurm.available() else None, phases, prepare)
        if refusals:
            raise LaunchError("the cluster cannot run these jobs; nothing was submitted\n"
                              + "\n".join(f"  {f}" for f in refusals))
        submit.preflight(recipe, phases, prepare)

    def submit(self, m: Manifest, recipe: Recipe, phases: list[str], missing_shards: list[str]) -> dict[str, Job]:
        ids = submit.submit_chain(m, recipe, phases, missing_shards)
        return {step: SlurmJob(step, job_id, m.layout.slurm(step)) for step, job_id in ids.items()}

    def alive(self, m: Manifest) -> dict[str, Job]:
        """Found by job name (it carries the run's tag), however they were submitted: resubmitting them would run a
        phase twice."""
        data = m.read()
        if not (data.get("submissions") and any(s.get("executor") == "slurm" for s in data["submissions"])
                or data.get("sbatch_scripts") or data.get("executor") == "slurm"):
            return {}  # this run never went through Slurm
        if not slurm.available():
            raise LaunchError(f"{m.run_dir} was submitted to Slurm and there is no Slurm client here to ask whether "
                              "its jobs still run: resume it from the login node")
        recipe = m.recipe()
        steps = ("prepare", "prepare-index", *(f"derive-{d.name}" for d in recipe.derive), *recipe.phases)
        names = {sbatch.job_name(recipe, step, m.run_dir): step for step in steps}
        return {names[name]: SlurmJob(names[name], job, m.layout.slurm(names[name]))
                for name, (job, _, _) in slurm.queued_by_name(list(names)).items()}

    @staticmethod
    def release_held(jobs: dict[str, Job]) -> list[str]:
        """Jobs Slurm holds after a requeue (Slurm 22.05: BeginTime, ~120 s) start now."""
        queued = slurm.queued([j.job_id for j in jobs.values()])
        return slurm.release_held(list(queued.values()))


class LocalExecutor(Executor):
    name = "local"

    def preflight(self, recipe: Recipe, phases: list[str], prepare: bool) -> None:
        gpus = visible_gpus()
        for n in phases:
            r = recipe.phase(n).resources
            if r.gpus_per_node and r.world_size > gpus:
                raise LaunchError(
                    f"phases.{n}.resources asks for {r.nodes} node(s) × {r.gpus_per_node} GPU(s); the local executor "
                    f"runs every rank on this machine, which has {gpus} GPU(s) torch can use. Run it on a GPU machine "
                    f"or through Slurm, or on CPU tasks here: phases.{n}.resources.gpus_per_node=0 "
                    f"(cpu_tasks_per_node sets the ranks); nothing was started")

    def submit(self, m: Manifest, recipe: Recipe, phases: list[str], missing_shards: list[str]) -> dict[str, Job]:
        layout = m.layout
        layout.chain_log.parent.mkdir(parents=True, exist_ok=True)
        # The launcher takes the chain lock and hands its descriptor to the chain (flock locks belong to the open
        # file, which the child inherits): no moment in which a second launch could see no chain and start one.
        fd = os.open(layout.chain_lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LaunchError(f"{m.run_dir}: a local chain is running already; nothing started") from None
        try:
            with open(layout.chain_log, "ab") as log:
                offset = log.tell()
                log.write(f"[colbertzero] {now_iso()}: the local chain of {', '.join(phases)}\n".encode())
                log.flush()
                proc = subprocess.Popen([sys.executable, "-m", "colbertzero", "local-chain", str(m.run_dir),
                                         "--lock-fd", str(fd)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(fd,),
                                        env=_local_env())
        finally:
            os.close(fd)
        job = LocalJob(m.run_dir, proc.pid, proc, offset)
        with m.update() as d:
            d.setdefault("submissions", []).append({"time": now_iso(), "executor": "local",
                                                    "jobs": {job.step: job.job_id}})
            d["inflight"] = {job.step: job.job_id}
        print(f"started the local chain (pid {proc.pid}); its log: {layout.chain_log}")
        return {job.step: job}

    def alive(self, m: Manifest) -> dict[str, Job]:
        if not chain_running(m.layout):
            return {}
        data = m.read()
        # the launcher records the chain's id under the launch lock, before the chain itself writes anything
        started = (data.get("inflight") or {}).get("chain", "")
        pid = int(started.split(":")[1]) if started.startswith("local:") else (data.get("local_chain") or {}).get("pid")
        return {"chain": LocalJob(m.run_dir, int(pid))} if pid else {}


def _local_env() -> dict[str, str]:
    """Slurm variables of an enclosing allocation would make the ranks think they are a Slurm job."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def visible_gpus() -> int:
    """GPUs torch can use on this machine (imported here only: a Slurm launch on the login node needs no torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


EXECUTORS = {"slurm": SlurmExecutor, "local": LocalExecutor}


def executor_for(name: str | None) -> Executor:
    """"slurm", "local", or None: Slurm when sbatch is on this machine, else local."""
    name = name or ("slurm" if slurm.available() else "local")
    if name not in EXECUTORS:
        raise LaunchError(f"--executor {name!r}: one of {', '.join(EXECUTORS)}")
    return EXECUTORS[name]()


def alive_jobs(m: Manifest) -> dict[str, Job]:
    """Every job of the run still queued or running, whichever executor started it."""
    return {**LocalExecutor().alive(m), **SlurmExecutor().alive(m)}
