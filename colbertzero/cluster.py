"""What a recipe's cluster profile (`cluster:`, docs/cluster.md) puts on a task's command line: the container, the
environment and srun's extra arguments — the one translation, used by the plain sbatch scripts, the submitit jobs and
the evaluation jobs a phase starts. Nothing here imports torch."""

from __future__ import annotations

import shlex
import sys

from .recipe.schema import Cluster, Container

# Every phase task, however submitted. One task per GPU, bound to its own block of cpus-per-task cores (on GH200
# nodes with cpus_per_task=72: the Grace CPU attached to GPU i, the one LOCAL_RANK i trains on); a rank that fails
# ends the job's other ranks at once instead of leaving them waiting in a collective until its timeout.
SRUN_ARGS = ("--kill-on-bad-exit=1", "--cpu-bind=cores")
# From Slurm 22.05 srun no longer takes --cpus-per-task from the allocation: without this each rank is bound to ONE
# core (measured on the local cluster with task/affinity), loader workers and threads included. torch would
# otherwise start one thread per core of the node in each task.
TASK_ENV = ('export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}"',
            'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"')


def phase_srun_args(cluster: Cluster | None) -> list[str]:
    """A phase task's srun arguments: colbertzero's own, then the profile's and its container's."""
    return [*SRUN_ARGS, *srun_args(cluster)]


def srun_args(cluster: Cluster | None) -> list[str]:
    """Arguments of every task's `srun` (after colbertzero's own): the profile's, then the container's."""
    if cluster is None:
        return []
    return [*cluster.srun_args, *_container_srun_args(cluster.container)]


def _container_srun_args(c: Container | None) -> list[str]:
    if c is None:
        return []
    if c.runtime == "pyxis":  # the pyxis plugin's options (NVIDIA/pyxis README)
        return ([f"--container-image={c.image}"] + ([f"--container-mounts={','.join(c.mounts)}"] if c.mounts else [])
                + ([f"--container-workdir={c.workdir}"] if c.workdir else []))
    if c.runtime == "cscs-edf":  # CSCS Container Engine: srun --environment=<EDF name or path>
        return [f"--environment={c.image}"]
    if c.runtime == "slurm-oci":  # Slurm's own OCI containers (oci.conf on the cluster): srun --container=<bundle>
        return [f"--container={c.image}"]
    return []  # apptainer and command wrap the command instead


def command_prefix(cluster: Cluster | None) -> list[str]:
    """What goes before the task's interpreter: `apptainer exec --nv …` or the profile's own wrapper."""
    c = cluster.container if cluster else None
    if c is None:
        return []
    if c.runtime == "apptainer":
        out = ["apptainer", "exec", "--nv"]
        for m in c.mounts:
            out += ["--bind", m]
        if c.workdir:
            out += ["--pwd", c.workdir]
        return [*out, str(c.image)]
    if c.runtime == "command":
        return list(c.command)
    return []


def task_python(cluster: Cluster | None) -> str | None:
    """The interpreter inside the container when the profile names one (None: the caller's own)."""
    return cluster.container.python if cluster and cluster.container else None


def task_argv(cluster: Cluster | None, args: list[str]) -> list[str]:
    """A task's command as a list: the container's prefix, its interpreter, then ``args`` (`-m colbertzero …`)."""
    return [*command_prefix(cluster), task_python(cluster) or sys.executable, *args]


def environment_lines(cluster: Cluster | None) -> list[str]:
    """`export NAME=value` lines (values shell-quoted) for the batch script, before srun: every task inherits them,
    inside the container too (pyxis, the CSCS engine and apptainer pass the environment through)."""
    if cluster is None:
        return []
    return [f"export {k}={shlex.quote(v)}" for k, v in cluster.environment.items()]


def setup_lines(cluster: Cluster | None, own: list[str]) -> list[str]:
    """A job's setup: the profile's lines (module load …), its environment, then the recipe's own ``own``."""
    if cluster is None:
        return list(own)
    return [*cluster.setup, *environment_lines(cluster), *own]


def in_container(cluster: Cluster | None) -> bool:
    return bool(cluster and cluster.container)
