"""Python handle on `tools/local-slurm`, the real two-node Slurm cluster on one machine (tests, CI, benchmarks).

Not part of the package: production code never calls it. Tests and benchmarks put tools/ on sys.path.

    env = local_slurm.start()        # {"SLURM_CONF": ".../etc/slurm.conf"}; installs and starts as needed
    subprocess.run(["sbatch", ...], env={**os.environ, **env})
    local_slurm.stop()

The tool owns the cluster (config, daemons, pid files); this module only runs it, so both stay one behaviour.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

TOOL = Path(__file__).resolve().parent / "local-slurm"
CANNOT_RUN_HERE = 3  # the tool's exit status when the machine cannot host the cluster (not root, no apt, ...)


class LocalSlurmError(RuntimeError):
    """The cluster failed to start or stop; the message carries the tool's explanation and log tails."""


class LocalSlurmUnavailable(LocalSlurmError):
    """This machine cannot host the cluster (not root, no apt-get, packages not installable)."""


def _run(command: str, state_dir: str | os.PathLike | None, timeout: float,
         port_base: int | None = None) -> subprocess.CompletedProcess:
    if not TOOL.is_file():
        raise LocalSlurmUnavailable(f"{TOOL} not found beside {__file__}")
    env = dict(os.environ)
    if state_dir is not None:
        env["LOCAL_SLURM_DIR"] = str(Path(state_dir).absolute())
    if port_base is not None:
        env["LOCAL_SLURM_PORT_BASE"] = str(port_base)
    try:
        return subprocess.run([str(TOOL), command], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise LocalSlurmError(f"`tools/local-slurm {command}` did not finish within {timeout:.0f}s:\n"
                              f"{e.stdout or ''}{e.stderr or ''}") from None


def env(state_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """The variables client commands need for this cluster (SLURM_CONF), parsed from `tools/local-slurm env`."""
    out = _run("env", state_dir, timeout=30).stdout
    pairs = (line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))
    return {key: value for key, value in pairs}


def start(state_dir: str | os.PathLike | None = None, timeout: float = 300,
          port_base: int | None = None) -> dict[str, str]:
    """Start the cluster (installing Slurm first if needed; a no-op when it is up) and return env().

    port_base: first of the 5 loopback ports it uses (default 17000), for a second cluster beside the first.
    Raises LocalSlurmUnavailable when the machine cannot host it, LocalSlurmError when it failed to come up.
    """
    res = _run("start", state_dir, timeout, port_base)
    if res.returncode == CANNOT_RUN_HERE:
        raise LocalSlurmUnavailable(res.stdout + res.stderr)
    if res.returncode != 0:
        raise LocalSlurmError(f"`tools/local-slurm start` failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
    return env(state_dir)


def stop(state_dir: str | os.PathLike | None = None, timeout: float = 120) -> None:
    """Cancel the cluster's jobs and stop its daemons (only those it started); a no-op when it is down."""
    res = _run("stop", state_dir, timeout)
    if res.returncode != 0:
        raise LocalSlurmError(f"`tools/local-slurm stop` failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")


def is_running(state_dir: str | os.PathLike | None = None) -> bool:
    """True when every daemon runs, both nodes are usable and sacct answers (`tools/local-slurm status` exits 0)."""
    return _run("status", state_dir, timeout=60).returncode == 0


@contextlib.contextmanager
def shared_cluster(state_dir: str | os.PathLike | None = None) -> Iterator[dict[str, str]]:
    """start() for a with-block that others may share (parallel pytest sessions, xdist workers); yields env().

    Each holder leaves a lease file (its pid) in the state directory. The last holder out stops the cluster, and
    only if a holder started it: a cluster that was up with no holder (started by hand) is left running.
    """
    leases = Path(env(state_dir)["SLURM_CONF"]).parents[1] / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    started_by_holder, mine = leases / "started-by-a-holder", leases / str(os.getpid())
    # Under the lease lock, so that a holder leaving (and stopping) cannot interleave with one arriving.
    with _locked(leases):
        was_up = is_running(state_dir)
        cluster_env = start(state_dir)
        if not was_up:
            started_by_holder.touch()
        elif not _other_holders(leases):
            started_by_holder.unlink(missing_ok=True)  # left by a holder that died; this one was started by hand
        mine.touch()
    try:
        yield cluster_env
    finally:
        with _locked(leases):
            mine.unlink(missing_ok=True)
            if started_by_holder.exists() and not _other_holders(leases):
                stop(state_dir)
                started_by_holder.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _other_holders(leases: Path) -> list[int]:
    holders = []
    for lease in leases.iterdir():
        if lease.name.isdigit() and int(lease.name) != os.getpid():
            try:
                os.kill(int(lease.name), 0)
                holders.append(int(lease.name))
            except ProcessLookupError:
                lease.unlink(missing_ok=True)  # its holder died without leaving
            except PermissionError:
                holders.append(int(lease.name))
    return holders
