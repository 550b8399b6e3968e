"""Launching colbertzero on Slurm: submitit executors, Slurm environment -> torch.distributed, chaining, requeue.

`slurm_env` turns a Slurm task (or torchrun worker, or plain process) into rank/world/rendezvous settings;
`local_slurm` starts and stops the real two-node test cluster of `tools/local-slurm`.
"""

from .chain import PhaseTask, launch, resume  # noqa: E402,F401
