"""The local executor's chain process (`colbertzero local-chain RUN_DIR`, started by `executors.LocalExecutor`): derive
and prepare what is missing, then each phase not done yet as `world_size` processes of `colbertzero train`
(torch.distributed on 127.0.0.1), run again as the requeue policy says (`requeue.decide` and `requeue.apply`, as
inside a Slurm job).

SIGTERM or SIGINT stops the chain the way a time limit stops a Slurm job: the running phase's ranks get SIGTERM (they
checkpoint and exit 3) and nothing after them starts; during derive and prepare (both resume where they stopped) it
stops at once. When a rank leaves (a crash, or its watchdog found the phase hung) the others get the watchdog's own
limit to leave by themselves; those still there are hung (stopped, stuck in a collective) and are killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time

from ..data.prepare import prepare_recipe
from ..data.shards import unprepared
from ..evaluate.sharded import run_planned
from ..files import now_iso
from ..manifest import Manifest
from ..mining import derive_task, finished
from ..recipe import Recipe
from ..runtime import Exit, free_port, resume_command
from . import requeue

# After one rank left, the others get at most this long (less when the phase's watchdog limit is shorter).
RANK_GRACE_S = 30.0
LEFT = (Exit.DONE, Exit.REQUEUE, Exit.OVER_BUDGET)  # a rank's own way out; anything else is a crash


class StopRequested(Exception):
    """A stop signal while no rank runs: the chain ends before starting anything else."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: stop at a checkpoint
    except OSError:
        pass


class _Stop:
    """SIGINT/SIGTERM: forwarded to the running ranks as SIGTERM; during derive and prepare (``interruptible``) the
    chain ends at once; otherwise it starts nothing after what runs."""

    def __init__(self) -> None:
        self.requested = False
        self.interruptible = False
        self.ranks: list[subprocess.Popen] = []
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        for p in self.ranks:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        if self.interruptible:
            raise StopRequested(f"{signal.Signals(signum).name} during derive/prepare")

    @contextlib.contextmanager
    def interruptible_work(self):
        if self.requested:
            raise StopRequested("stop asked for")
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False


def run_chain(run_dir: str, lock_fd: int | None = None) -> int:
    """The chain; its exit code (the last phase's outcome: 0 when every phase is done)."""
    m = Manifest(run_dir)
    if lock_fd is None:  # started by hand rather than by LocalExecutor.submit: take the lock here
        lock_fd = os.open(m.layout.chain_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the launcher's lock, inherited: already ours
    except BlockingIOError:
        print(f"[colbertzero] {run_dir}: another local chain is running", file=sys.stderr)
        return Exit.REFUSED
    with m.update() as d:
        d["local_chain"] = {"pid": os.getpid(), "started": now_iso(), "exit_code": None, "ended": None}
    stop = _Stop()
    code = Exit.FAILED
    try:
        code = _chain(m, m.recipe(), stop)
    except StopRequested as e:
        print(f"[colbertzero] {e}: the chain stops before starting anything else; continue with "
              f"`{resume_command(m.run_dir)}`", file=sys.stderr)
        code = Exit.REQUEUE
    finally:
        with m.update() as d:
            d["local_chain"].update(exit_code=code, ended=now_iso())
    return code


def _chain(m: Manifest, recipe: Recipe, stop: _Stop) -> int:
    data = m.read()
    phases = [n for n in recipe.phases if data["phases"][n]["state"] != "done"]
    with stop.interruptible_work():  # both resume where they stopped
        for step in recipe.derive:
            if not finished(step.kind, step.args, step.out):
                print(f"[colbertzero] derive {step.name}: colbertzero {step.kind} → {step.out}", file=sys.stderr)
                derive_task(step.kind, step.args, step.out, step.shards, None)
        missing = unprepared(recipe, phases)
        if missing:
            prepare_recipe(recipe, phases=missing, workers=min(recipe.prepare.workers, os.cpu_count() or 1))
    for n in phases:
        if stop.requested:
            raise StopRequested(f"stop asked for before phase {n!r}")
        ph = recipe.phase(n)
        grace = min(RANK_GRACE_S, ph.watchdog.min_seconds)
        tries = 0
        while True:
            attempt = f"local-{time.strftime('%Y%m%dT%H%M%S')}-{tries}"
            code = _attempt(m, n, ph.resources.world_size, attempt, stop, grace)
            outcome = requeue.decide(code, restarts=tries, max_requeues=ph.resources.max_requeues,
                                     stop_requested=stop.requested, hung=requeue.attempt_hung(m, n, attempt))
            code = requeue.apply(outcome, m, n)  # the local executor runs a requeued phase again itself
            if outcome.action == "done":
                run_planned(m, n)  # eval.beir a phase inside a Slurm allocation left for after it
                break
            if outcome.action != "requeue":
                return code
            tries += 1
    return Exit.DONE


def _attempt(m: Manifest, phase: str, world: int, attempt_id: str, stop: _Stop, grace: float) -> int:
    """Run one attempt's ranks until every one has left (or was killed as hung); the attempt's exit code."""
    port = free_port()
    stop.ranks = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   COLBERTZERO_ATTEMPT_ID=attempt_id)
        # Own session: a Ctrl-C in a terminal reaches the chain only, which turns it into a checkpointed stop.
        stop.ranks.append(subprocess.Popen([sys.executable, "-m", "colbertzero", "train", str(m.run_dir), "--phase",
                                            phase], env=env, start_new_session=True, preexec_fn=_die_with_parent))
    codes: dict[int, int] = {}  # ranks that left by themselves
    first_left = None
    while len(codes) < world:
        for i, p in enumerate(stop.ranks):
            if i not in codes and p.poll() is not None:
                codes[i] = p.returncode
        if codes and first_left is None:
            first_left = time.monotonic()
        if first_left is not None and len(codes) < world and time.monotonic() - first_left > grace:
            hung = [i for i, p in enumerate(stop.ranks) if i not in codes]
            print(f"[colbertzero] phase {phase}: rank(s) {hung} still there {grace:g} s after rank(s) "
                  f"{sorted(codes)} left: hung, killed", file=sys.stderr, flush=True)
            for i in hung:
                stop.ranks[i].kill()
                stop.ranks[i].wait()
            break
        time.sleep(0.2)
    crashes = [c for c in codes.values() if c not in LEFT]
    if crashes:
        return crashes[0] if crashes[0] > 0 else Exit.FAILED
    return max(codes.values())
