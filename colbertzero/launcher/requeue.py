"""The requeue policy: what happens after a phase's processes exit — the one owner of that rule.

`decide` turns a phase's exit code into an outcome. Every executor applies it: the submitit task (`task.py`), the
plain sbatch scripts (they call `colbertzero after-phase`, which runs `after_phase_in_job` below: no second copy of
the rule in bash) and the local executor (`local.py`, which restarts the phase itself).

- exit 0: the phase is done;
- exit 3 (stopped at a checkpoint on a stop signal): run again from that checkpoint, unless the phase was stopped
  `max_requeues` times already (it is then marked failed, and `resume` continues it), the stop was asked for (Ctrl-C
  of a local run), or Slurm is ending the job itself (`scancel`, the time limit, a preemption it requeues on its
  own: a cancel must not turn into a requeue);
- exit 4 (stopped at a checkpoint over its GPU-hour budget): stop; `resume --phase-budget` continues it;
- anything else: the phase failed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from ..files import now_iso
from ..manifest import Manifest
from ..runtime import Exit, restart_count
from . import slurm

# Slurm ends every task of a requeued job (SIGTERM, then SIGKILL); a task that returned instead would report a result
# for a job that is going to run again. This long, at most, a task waits to be ended.
REQUEUE_WAIT_S = 300


@dataclass(frozen=True)
class Outcome:
    action: str  # "done" | "requeue" | "stop" | "fail"
    exit_code: int
    reason: str
    mark_failed: bool = False  # the phase record becomes failed (max_requeues reached)


def decide(code: int, *, restarts: int, max_requeues: int, stop_requested: bool = False,
           job_state: str | None = None) -> Outcome:
    """``restarts``: times the phase was run again already; ``job_state``: the Slurm job's state (None outside
    Slurm)."""
    if code == Exit.DONE:
        return Outcome("done", Exit.DONE, "the phase is done")
    if code == Exit.OVER_BUDGET:
        return Outcome("stop", Exit.OVER_BUDGET, "stopped at a checkpoint over its GPU-hour budget")
    if code != Exit.REQUEUE:
        return Outcome("fail", code if code > 0 else Exit.FAILED, f"failed (exit {code})")
    if stop_requested:
        return Outcome("stop", Exit.REQUEUE, "stopped at a checkpoint, as asked")
    if restarts >= max_requeues:
        return Outcome("stop", Exit.REQUEUE, f"stopped at a checkpoint {restarts + 1} time(s); "
                       f"max_requeues={max_requeues} reached", mark_failed=True)
    if job_state is not None and job_state != "RUNNING":
        return Outcome("stop", Exit.REQUEUE, f"stopped at a checkpoint; the job is {job_state or 'gone'}, so Slurm "
                       "is ending it: not requeued")
    return Outcome("requeue", Exit.REQUEUE, f"stopped at a checkpoint; run again ({restarts + 1} of at most "
                   f"{max_requeues})")


def continue_hint(run_dir: str, phase: str, outcome: Outcome) -> str:
    how = f"colbertzero resume {run_dir}"
    if outcome.exit_code == Exit.OVER_BUDGET:
        how += f" --phase-budget {phase}=HOURS"
    return how


def after_phase_in_job(run_dir: str, phase: str, code: int, *, is_main: bool) -> int:
    """Apply the policy inside a Slurm job after the phase's processes ended with ``code``; returns the job's exit
    code. A requeue is asked for by ``is_main`` alone (`scontrol requeue`); every task then waits to be ended."""
    m = Manifest(run_dir)
    limit = m.recipe().phase(phase).resources.max_requeues
    job = os.environ.get("SLURM_JOB_ID")
    state = slurm.job_state(job) if (job and code == Exit.REQUEUE and is_main) else ("RUNNING" if job else "")
    outcome = decide(code, restarts=restart_count(), max_requeues=limit, job_state=state)
    hint = continue_hint(run_dir, phase, outcome)
    if outcome.mark_failed and is_main:
        m.update_phase(phase, lambda p: p.update(state="failed", failure={
            "step": p["step"], "source": None, "reason": outcome.reason, "time": now_iso()}))
    if outcome.action != "requeue":
        if outcome.action != "done":
            print(f"[colbertzero] phase {phase}: {outcome.reason}. Continue with: {hint}", file=sys.stderr, flush=True)
        return outcome.exit_code
    if is_main:
        r = slurm.requeue(job)
        if r.returncode != 0 and slurm.job_state(job) == "RUNNING":
            print(f"[colbertzero] phase {phase}: `scontrol requeue {job}` failed: {r.stderr.strip()}. Continue "
                  f"with: {hint}", file=sys.stderr, flush=True)
            return Exit.REQUEUE
        print(f"[colbertzero] phase {phase}: requeued job {job} ({outcome.reason})", file=sys.stderr, flush=True)
    # On SIGTERM leave at once rather than wait for the SIGKILL.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    time.sleep(REQUEUE_WAIT_S)
    print(f"[colbertzero] job {job} stopped at a checkpoint but Slurm did not end this task within "
          f"{REQUEUE_WAIT_S} s", file=sys.stderr, flush=True)
    return Exit.REQUEUE
