"""What submitit runs in every task of a phase job (one task per GPU): the phase runner, nothing else.

The runner's signal handlers replace submitit's (submitit would checkpoint and requeue from rank 0 alone, inside its
handler): every rank stops at the same step and checkpoints together, and the runner returns `Exit.REQUEUE`. The task
leaves with the runner's exit code; the requeue policy (`requeue.py`) then runs in the batch script on the host, after
`srun` (the job's teardown lines, `sbatch.after_phase_lines`), exactly as in the plain sbatch scripts: inside a
container Slurm's commands are usually missing, and a requeue asked for from there would end the chain instead. A rank
whose watchdog finds the phase hung records it and leaves with the requeue code; the policy reads the record.
"""

from __future__ import annotations

from ..runtime import Exit, HeldSignals


class PhaseTask:
    def __init__(self, run_dir: str, phase: str):
        self.run_dir = str(run_dir)
        self.phase = phase

    def __call__(self) -> str:
        held = HeldSignals()  # before torch is imported: a warning that comes while the task starts is not lost
        try:
            # Imported here, inside the job: the login node that pickles this task needs no torch.
            from ..train.runner import run_phase

            code = run_phase(self.run_dir, self.phase)
        finally:
            held.close()
        if code == Exit.DONE:
            return "done"
        # srun's exit code is what the policy on the host reads (a raised error would make every code 1).
        raise SystemExit(code)
