"""Launching colbertzero on Slurm: submitit executors, Slurm environment -> torch.distributed, chaining, requeue.

`chain` validates, submits prepare and the phase chain (submitit, `afterok`) or runs it locally, requeues after a
checkpointed stop and resumes a run from its manifest; `sbatch` turns a recipe's resources into sbatch options and
writes plain sbatch scripts; `slurm_env` turns a Slurm task (or torchrun worker, or plain process) into
rank/world/rendezvous settings; `local_slurm` starts and stops the real two-node test cluster of `tools/local-slurm`.
"""

from .chain import LaunchError, PhaseTask, launch, resume  # noqa: E402,F401
