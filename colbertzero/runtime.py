"""Where a process sits and how it ends: the one place both the launcher and the trainer read it from.

- Rank, world and rendezvous from the environment: variables torchrun (or the user) already set win; then the Slurm
  task that srun started; else one process. A Slurm batch script itself (no srun step) is one process, whatever
  --ntasks says: only srun starts tasks. MASTER_ADDR is the first node of the step, MASTER_PORT is derived from the
  job id, so every task computes the same pair without talking to the others (two concurrent steps of one job would
  collide on that port: give them MASTER_PORT explicitly).
- Exit codes of a phase process (``Exit``) and the stop signals it checkpoints on (``STOP_SIGNALS``).
- The job clock (how long the Slurm job has run) and who runs an attempt (``job_identity``).
- ``detach``: a command that outlives this process (its own Slurm job, or a background process).

Nothing here imports torch: the login node, the launcher and the sbatch scripts use it too.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from . import slurm


class Exit(enum.IntEnum):
    """Exit codes of `colbertzero` commands and phase processes; the launcher acts on them."""

    DONE = 0  # phase finished, exported (and evaluated); a command succeeded
    FAILED = 1  # crash or non-finite loss (the phase is marked failed with step and source)
    REFUSED = 2  # bad input or a refused command: nothing was written or submitted
    REQUEUE = 3  # stopped at a checkpoint on a stop signal (time limit, preemption): run me again
    OVER_BUDGET = 4  # stopped at a checkpoint: the next steps would cross the phase's GPU-hour budget


# Slurm's warning before the time limit (--signal; submitit asks for USR2), preemption and scancel send one of these.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def resume_command(run_dir: str | os.PathLike, *, phase_budgets: tuple[str, ...] | list[str] = (),
                   run_budget: bool = False) -> str:
    """The command that continues a run: what every message about a stopped, refused or failed run ends with."""
    how = f"colbertzero resume {shlex.quote(str(run_dir))}"
    how += "".join(f" --phase-budget {p}=HOURS" for p in phase_budgets)
    return how + (" --budget HOURS" if run_budget else "")


class StopFlag:
    """Set by any of STOP_SIGNALS; read once per step. The handler only records: the loop checkpoints and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.signal = signum


class HeldSignals:
    """Holds the stop signals that arrive before the trainer installs its StopFlag, and sends them again once it has.

    Without it such a signal would reach submitit's handler (rank 0 requeues at once, the other ranks ignore it) or,
    for a time-limit warning, end the job without a checkpoint.
    """

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.done = threading.Event()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._hold)
        threading.Thread(target=self._forward, name="colbertzero-held-signals", daemon=True).start()

    def _hold(self, signum, frame) -> None:
        self.pending.add(signum)

    def _forward(self) -> None:
        while not self.done.wait(0.2):
            replaced = [s for s in STOP_SIGNALS if signal.getsignal(s) != self._hold]
            for sig in replaced:
                if sig in self.pending:
                    self.pending.discard(sig)
                    os.kill(os.getpid(), sig)  # handled by the trainer's handler in the main thread
            if len(replaced) == len(STOP_SIGNALS) and not self.pending:
                return

    def close(self) -> None:
        self.done.set()


def free_port() -> int:
    """A TCP port free on this machine right now (single-process and local runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_LOW, PORT_HIGH = 20000, 60000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and how its ranks meet."""

    launcher: str  # "torchrun" (RANK/WORLD_SIZE were set), "slurm" (a task srun started) or "single"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    gpus_on_node: int
    job_id: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def torch_vars(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


# ------------------------------------------------------------------------------------------------------ hostlists
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(expr: str) -> list[str]:
    """Split at commas outside brackets: 'n[1-2,4],m1' -> ['n[1-2,4]', 'm1']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in hostlist {expr!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {expr!r}")
        elif ch == "," and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in hostlist {expr!r}")
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_brackets(spec: str, expr: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; zero padding follows the width of the range's first number."""
    out = []
    for item in spec.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in hostlist {expr!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in hostlist {expr!r}")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist in pure Python, in Slurm's order (duplicates kept, as `scontrol show hostnames`).

    'n[1-3,5],gpu-a[01-02]' -> n1 n2 n3 n5 gpu-a01 gpu-a02; several bracket groups in one name multiply out with
    the leftmost varying slowest: 'r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2. Text after a bracket ('a[1-2]-ib') is
    accepted and kept, although Slurm itself never writes such lists. Malformed lists raise ValueError.
    """
    hosts: list[str] = []
    for part in _split_top_level(expr):
        pieces = re.split(r"\[([^\]]*)\]", part)  # text, range, text, range, ..., text
        names = [pieces[0]]
        for spec, text in zip(pieces[1::2], pieces[2::2]):
            names = [n + s + text for n in names for s in _expand_brackets(spec, expr)]
        hosts += names
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a Slurm nodelist: `scontrol show hostnames` when it answers, else expand_hostlist."""
    return slurm.hostnames(nodelist) or expand_hostlist(nodelist)


def node_address(node: str) -> str:
    """An address for `node` that this process can reach.

    The name itself when it resolves here: each rank then resolves it with its own resolver (a master that put its
    own lookup, often 127.0.1.1 on Debian, into MASTER_ADDR would strand the other nodes). Otherwise the node's
    NodeAddr from slurmctld, which Slurm itself uses to reach the node (e.g. node names that only resolve inside
    the node, as under tools/local-slurm on the host side).
    """
    try:
        socket.getaddrinfo(node, None)
        return node
    except (socket.gaierror, UnicodeError):
        pass
    return slurm.node_addr(node) or node


# ------------------------------------------------------------------------------------------------------- detection
def master_port_for_job(job_id: str | int) -> int:
    """A port in [20000, 60000) that every task of the job computes alike, without talking to the others."""
    text = str(job_id).strip()
    n = int(text) if text.isdigit() else zlib.crc32(text.encode())
    return PORT_LOW + n % (PORT_HIGH - PORT_LOW)


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE '2(x3),1' -> tasks on node `node_id` (2 for nodes 0-2, 1 for node 3)."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"cannot parse tasks per node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else counts[-1]


def _gpus_on_node(env: Mapping[str, str]) -> int:
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    return len([d for d in visible.split(",") if d.strip()]) if visible else 0


def _first(env: Mapping[str, str], *names: str, default: str | None = None) -> str | None:
    for name in names:
        if env.get(name):
            return env[name]
    return default


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Derive this process's place in the job from the environment; changes nothing."""
    env = os.environ if environ is None else environ
    job_id = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
    gpus = _gpus_on_node(env)

    def port() -> int:
        if env.get("MASTER_PORT"):
            return int(env["MASTER_PORT"])
        return master_port_for_job(job_id) if job_id else free_port()

    if env.get("RANK") and env.get("WORLD_SIZE"):
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE") or 1)
        return DistEnv("torchrun", rank, int(env.get("LOCAL_RANK") or 0), world, local_world,
                       int(env.get("GROUP_RANK") or rank // local_world), max(1, -(-world // local_world)),
                       env.get("MASTER_ADDR") or "127.0.0.1", port(), gpus, job_id)

    # Only srun sets a step id; the batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS but is one process.
    if _first(env, "SLURM_STEP_ID", "SLURM_STEPID") is not None and env.get("SLURM_PROCID"):
        node_id = int(env.get("SLURM_NODEID") or 0)
        world = int(_first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS", default="1"))
        per_node = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
        local_world = _tasks_on_node(per_node, node_id) if per_node else 1
        nodelist = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        master = env.get("MASTER_ADDR") or (node_address(hostnames(nodelist)[0]) if nodelist else "127.0.0.1")
        return DistEnv("slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID") or 0), world, local_world,
                       node_id, int(_first(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES",
                                           default="1")),
                       master, port(), gpus, job_id)

    return DistEnv("single", 0, 0, 1, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", port(), gpus, job_id)


def set_torch_env(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """detect(), then set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT where missing."""
    env = os.environ if environ is None else environ
    dist = detect(env)
    for key, value in dist.torch_vars().items():
        env.setdefault(key, value)
    return dist


# ---------------------------------------------------------------------------------------------------- job clock
def job_elapsed_seconds(job_id: str | None = None) -> int | None:
    """How long the current (or given) job has been running; None outside Slurm or when Slurm does not say."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    return slurm.job_elapsed_seconds(job_id) if job_id else None


def job_identity(tasks: int, gpus_per_node: int) -> dict:
    """Who runs this attempt: the Slurm job (its id and requeue count make the attempt id) or a local run.

    ``tasks``: the world size; ``gpus_per_node``: GPUs per node the ledger counts (0 on CPU)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        aid = os.environ.get("COLBERTZERO_ATTEMPT_ID") or f"local-{os.getpid()}-{int(time.time())}"
        return {"job_id": None, "executor": "local", "nodes": 1, "gpus_per_node": gpus_per_node, "tasks": tasks,
                "attempt_id": aid}
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"job_id": job, "executor": "slurm", "nodes": int(os.environ.get("SLURM_NNODES") or 1),
            "gpus_per_node": gpus_per_node, "tasks": tasks, "attempt_id": f"{job}-{restarts}"}


def restart_count() -> int:
    """How many times Slurm has requeued this job (0 outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


class AttemptClock:
    """Seconds this attempt has run. Inside Slurm the job's own clock counts (the time before this process started
    is allocated time too): asked once, at the attempt's start, on rank 0 only, then carried forward by the local
    monotonic clock. Asking squeue every step would load the controller and stall the step when it is slow."""

    def __init__(self, query_slurm: bool) -> None:
        offset = 0.0
        if query_slurm and os.environ.get("SLURM_JOB_ID"):
            try:
                offset = float(job_elapsed_seconds() or 0.0)
            except Exception:  # an unreachable controller must not stop training; the local clock still counts
                offset = 0.0
        self.t0 = time.monotonic() - offset

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


# Variables of the process group a detached command must not inherit (it is no rank of this job).
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                   "TORCHELASTIC_RUN_ID")


def detach(argv: list[str], log: str | os.PathLike, *, name: str, sbatch: dict[str, str] | None = None,
           job_argv: list[str] | None = None) -> str:
    """Start a command that outlives this process and never holds it up: inside a Slurm job (``sbatch`` given and
    SLURM_JOB_ID set) its own one-task job, no dependency, running ``job_argv`` (default ``argv``: a container's srun
    and prefix go there); otherwise ``argv`` as a background process in its own session. Returns ``job:<id>`` or
    ``pid:<n>``. The command reaches Slurm's shell only through ``shlex.join``."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    if sbatch is not None and os.environ.get("SLURM_JOB_ID"):
        if slurm.available():
            opts = {k: str(v) for k, v in sbatch.items() if v not in (None, "")}
            account = os.environ.get("SLURM_JOB_ACCOUNT")
            if account and "account" not in opts:
                opts["account"] = account
            return "job:" + slurm.submit_wrap(name, str(log), shlex.join(job_argv or argv), opts, env)
        print(f"[colbertzero] {name}: no sbatch inside this task (a container without Slurm's commands): it runs as "
              "a background process on this node instead of its own job", file=sys.stderr, flush=True)
    with open(log, "ab") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    return f"pid:{p.pid}"


def detached_state(handle: str) -> tuple[str, str]:
    """(state, reason) of a command `detach` started: Slurm's state and pending reason for ``job:<id>``
    ("ENDED" once it left the queue without a record), RUNNING or ENDED for ``pid:<n>``; ("UNKNOWN", "") when nothing
    answers."""
    kind, _, ident = (handle or "").partition(":")
    if kind == "job":
        return slurm.job_states([ident]).get(ident, ("UNKNOWN", ""))
    if kind == "pid" and ident.isdigit():
        try:
            with open(f"/proc/{ident}/stat") as f:  # a zombie (ended, not yet reaped by its parent) has ended
                return ("ENDED", "") if f.read().rsplit(")", 1)[-1].split()[0] == "Z" else ("RUNNING", "")
        except OSError:
            return ("ENDED", "")
    return ("UNKNOWN", "")


def cancel_detached(handle: str) -> None:
    """Stop a command `detach` started: scancel its job, or end its process group (its own session)."""
    kind, _, ident = (handle or "").partition(":")
    if kind == "job":
        slurm.cancel([ident])
    elif kind == "pid" and ident.isdigit():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(ident), signal.SIGTERM)
