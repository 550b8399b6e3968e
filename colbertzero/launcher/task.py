"""What submitit runs in every task of a phase job (one task per GPU): the phase runner, then the requeue policy.

The runner's signal handlers replace submitit's (submitit would checkpoint and requeue from rank 0 alone, inside its
handler): every rank stops at the same step and checkpoints together, and the runner returns `Exit.REQUEUE`; the
policy (`requeue.py`) then decides, and rank 0 asks Slurm to requeue the job. A rank whose watchdog finds the phase
hung cannot return (its main thread is stuck): the runner calls the same policy from the watchdog, and that rank asks
for the requeue.
"""

from __future__ import annotations

from ..runtime import Exit, HeldSignals, detect, resume_command
from .requeue import after_phase_in_job


class PhaseTask:
    def __init__(self, run_dir: str, phase: str):
        self.run_dir = str(run_dir)
        self.phase = phase

    def __call__(self) -> str:
        held = HeldSignals()  # before torch is imported: a warning that comes while the task starts is not lost
        try:
            # Imported here, inside the job: the login node that pickles this task needs no torch.
            from ..train.runner import run_phase

            code = run_phase(self.run_dir, self.phase, on_hang=self._hung)
        finally:
            held.close()
        code = after_phase_in_job(self.run_dir, self.phase, code, acts=detect().is_main)
        if code == Exit.DONE:
            return "done"
        # A failed job: Slurm never starts the phases that depend on it (afterok) and cancels them.
        raise RuntimeError(f"phase {self.phase!r} ended with exit {code}; see `colbertzero status {self.run_dir}`, "
                           f"continue with `{resume_command(self.run_dir)}`")

    def _hung(self, code: int) -> int:
        return after_phase_in_job(self.run_dir, self.phase, code, acts=True)
