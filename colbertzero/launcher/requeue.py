"""The requeue policy: what happens after a phase's processes exit — the one owner of that rule.

`decide` turns a phase's exit code into an outcome; `apply` turns the outcome into actions (the phase marked failed,
the requeue asked for, the message with the command that continues the run). Every executor calls both: a Slurm phase
job — submitit's (its teardown lines) and the plain sbatch scripts alike — runs `colbertzero after-phase` in its
batch script on the host after srun (`after_phase_in_job` below: no second copy of the rule in bash, and no Slurm
command needed inside a container), and the local executor (`local.py`) runs the phase again itself.

- exit 0: the phase is done;
- exit 3 (stopped at a checkpoint on a stop signal, or a rank found the phase hung): run again from that checkpoint,
  unless the phase was stopped `max_requeues` times already (it is then marked failed, and `resume` continues it),
  the stop was asked for (Ctrl-C of a local run), or Slurm is ending the job itself (`scancel`, the time limit, a
  preemption it requeues on its own: a cancel must not turn into a requeue);
- exit 4 (stopped at a checkpoint over its GPU-hour budget): stop; `resume --phase-budget` continues it;
- anything else: the phase failed — except when the attempt recorded a hang: a rank that leaves a hung phase exits 3,
  but what the executor reports for the job (srun kills the stuck ranks) may be another code.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .. import ledger, slurm
from ..files import now_iso
from ..manifest import Manifest
from ..runtime import Exit, restart_count, resume_command

# Slurm ends the batch script of a requeued job (SIGTERM, then SIGKILL); a script that returned instead would report
# a result for a job that is going to run again. This long, at most, it waits to be ended.
REQUEUE_WAIT_S = 300


@dataclass(frozen=True)
class Outcome:
    action: str  # "done" | "requeue" | "stop" | "fail"
    exit_code: int
    reason: str
    mark_failed: bool = False  # the phase record becomes failed (max_requeues reached)


def decide(code: int, *, restarts: int, max_requeues: int, stop_requested: bool = False,
           job_state: str | None = None, hung: bool = False) -> Outcome:
    """``restarts``: times the phase was run again already; ``job_state``: the Slurm job's state (None outside
    Slurm); ``hung``: the attempt recorded a hang (its exit code is then a requeue, whatever the executor saw)."""
    if hung and code not in (Exit.DONE, Exit.OVER_BUDGET):
        code = Exit.REQUEUE
    if code == Exit.DONE:
        return Outcome("done", Exit.DONE, "the phase is done")
    if code == Exit.OVER_BUDGET:
        return Outcome("stop", Exit.OVER_BUDGET, "stopped at a checkpoint over its GPU-hour budget")
    if code != Exit.REQUEUE:
        return Outcome("fail", code if code > 0 else Exit.FAILED, f"failed (exit {code})")
    what = "hung; left to be run again from its newest checkpoint" if hung else "stopped at a checkpoint"
    if stop_requested:
        return Outcome("stop", Exit.REQUEUE, f"{what}, and a stop was asked for")
    if restarts >= max_requeues:
        return Outcome("stop", Exit.REQUEUE, f"{what} {restarts + 1} time(s); max_requeues={max_requeues} reached",
                       mark_failed=True)
    if job_state is not None and job_state != "RUNNING":
        return Outcome("stop", Exit.REQUEUE, f"{what}; the job is {job_state or 'gone'}, so Slurm is ending it: not "
                       "requeued")
    return Outcome("requeue", Exit.REQUEUE, f"{what}; run again ({restarts + 1} of at most {max_requeues})")


# What the ranks recorded outranks srun's exit code: under --kill-on-bad-exit the first rank to leave with 3 (or 4)
# makes srun end the others while they still shut down, and their SIGTERM (143) becomes srun's code.
_RECORDED = {"completed": Exit.DONE, "requeue": Exit.REQUEUE, "over-budget": Exit.OVER_BUDGET}


def recorded_exit(m: Manifest, phase: str, attempt_id: str | None) -> int | None:
    """The exit code of the way rank 0 closed this attempt in the ledger (done, stopped at a checkpoint, over
    budget), or None."""
    a = ledger.attempt(m.phase(phase), attempt_id)
    return _RECORDED.get(a.get("exit_state")) if a else None


def attempt_hung(m: Manifest, phase: str, attempt_id: str | None) -> bool:
    """Did this attempt record a hang (a rank's watchdog fired)?"""
    return bool(attempt_id) and ledger.is_hung(m.phase(phase), attempt_id)


def apply(outcome: Outcome, m: Manifest, phase: str, *, requeue: Callable[[], str | None] | None = None) -> int:
    """Carry out a decision; returns the exit code of the job or chain. ``requeue`` asks the executor to run the
    phase again (Slurm: `scontrol requeue`; None when the caller runs it again itself, as the local executor does)
    and returns None, or why it could not."""
    if outcome.mark_failed:
        m.update_phase(phase, lambda p: p.update(state="failed", failure={
            "step": p["step"], "source": None, "reason": outcome.reason, "time": now_iso()}))
    hint = resume_command(m.run_dir, phase_budgets=[phase] if outcome.exit_code == Exit.OVER_BUDGET else [])
    if outcome.action == "requeue":
        problem = requeue() if requeue is not None else None
        if problem:
            print(f"[colbertzero] phase {phase}: {outcome.reason}, but the requeue failed: {problem}. Continue with: "
                  f"{hint}", file=sys.stderr, flush=True)
        else:
            print(f"[colbertzero] phase {phase}: {outcome.reason}", file=sys.stderr, flush=True)
        return Exit.REQUEUE
    if outcome.action != "done":
        print(f"[colbertzero] phase {phase}: {outcome.reason}; the chain stops here. See `colbertzero status "
              f"{m.run_dir}`; continue with `{hint}`", file=sys.stderr, flush=True)
    return outcome.exit_code


def after_phase_in_job(run_dir: str, phase: str, code: int) -> int:
    """Apply the policy in a Slurm job's batch script, on the host, after the phase's srun ended with ``code`` (or a
    rank found the phase hung): mark, requeue and report; returns the job's exit code. On a requeue it waits for
    Slurm to end it."""
    m = Manifest(run_dir)
    limit = m.recipe().phase(phase).resources.max_requeues
    job = os.environ.get("SLURM_JOB_ID")
    attempt = f"{job}-{restart_count()}" if job else None
    recorded = recorded_exit(m, phase, attempt)
    if recorded is not None and recorded != code:
        print(f"[colbertzero] phase {phase}: srun ended with exit {code}; the attempt's record says exit {recorded} "
              "(a rank ended by srun while shutting down), which applies", file=sys.stderr, flush=True)
        code = recorded
    hung = attempt_hung(m, phase, attempt)
    requeuing = code == Exit.REQUEUE or hung
    state = slurm.job_state(job) if (job and requeuing) else ("RUNNING" if job else "")
    outcome = decide(code, restarts=restart_count(), max_requeues=limit, job_state=state, hung=hung)
    refused: list[str] = []

    def ask() -> str | None:
        problem = _requeue(job)
        refused.extend([problem] if problem else [])
        return problem

    code = apply(outcome, m, phase, requeue=ask)
    if outcome.action == "done" and code == Exit.DONE:
        # Imported here: the evaluation package loads torch, which the policy (on every job's host) does not need.
        from .work import submit_phase_beir

        submit_phase_beir(m, phase)  # its eval.beir arrays, planned by rank 0, from the host
    if outcome.action != "requeue" or refused:
        return code
    # Slurm ends the batch script as it requeues the job; leave at once on its SIGTERM rather than wait for SIGKILL.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    time.sleep(REQUEUE_WAIT_S)
    print(f"[colbertzero] job {job} stopped at a checkpoint but Slurm did not end this task within "
          f"{REQUEUE_WAIT_S} s", file=sys.stderr, flush=True)
    return Exit.REQUEUE


def _requeue(job: str | None) -> str | None:
    if not job:
        return "not inside a Slurm job"
    r = slurm.requeue(job)
    if r.returncode != 0 and slurm.job_state(job) == "RUNNING":  # refused while the job still runs: say why
        return f"`scontrol requeue {job}`: {r.stderr.strip()}"
    return None
