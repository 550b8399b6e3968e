"""Launching colbertzero on Slurm or on this machine; the launcher never trains.

`api` (launch, resume, Run: the Python API and the CLI's), `submit` (submitit jobs: prepare array, index, phase
chain), `slurm` (every call to sbatch, squeue, sacct, scontrol), `task` (what each Slurm task runs), `requeue` (the
one requeue policy), `local` (the local executor), `sbatch` (a recipe's resources as sbatch options, plain scripts).
Dependencies point one way: api → submit/local → task/requeue → slurm/sbatch.
"""
