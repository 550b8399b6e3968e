"""The local executor: the same chain on this machine, no Slurm.

Prepare runs in-process, then each phase as `world_size` processes of `colbertzero train` (torch.distributed on
127.0.0.1), run again from its checkpoint as the requeue policy (`requeue.decide`) says. SIGINT/SIGTERM to the
launcher reach the ranks as SIGTERM (they checkpoint and exit 3) and the chain stops there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

from ..data.prepare import prepare_recipe
from ..manifest import Manifest
from ..mining import derive_task, finished
from ..recipe import Recipe
from ..runtime import Exit, free_port
from .requeue import continue_hint, decide

# After one rank crashed, the others may wait in a collective forever: they get this long to leave by themselves.
CRASH_GRACE_S = 30


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: stop at a checkpoint
    except OSError:
        pass


class _LocalStop:
    """SIGINT/SIGTERM to the local launcher: forwarded to the ranks as SIGTERM, and the chain stops there."""

    def __init__(self) -> None:
        self.requested = False
        self.procs: list[subprocess.Popen] = []
        main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
        self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}

    def _handler(self, signum, frame) -> None:
        self.requested = True
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def run_local(m: Manifest, recipe: Recipe, phases: list[str], missing_shards: list[str]) -> int:
    """Derive and prepare what is missing, then run the phases in order; the chain's exit code."""
    for step in recipe.derive:
        if not finished(step.kind, step.args, step.out):
            print(f"[colbertzero] derive {step.name}: colbertzero {step.kind} → {step.out}", file=sys.stderr)
            derive_task(step.kind, step.args, step.out, step.shards, None)
    if missing_shards:
        prepare_recipe(recipe, phases=missing_shards, workers=min(recipe.prepare.workers, os.cpu_count() or 1))
    stop = _LocalStop()
    try:
        for n in phases:
            r = recipe.phase(n).resources
            tries = 0
            while True:
                code = _attempt(m, n, r.world_size, f"local-{time.strftime('%Y%m%dT%H%M%S')}-{tries}", stop)
                outcome = decide(code, restarts=tries, max_requeues=r.max_requeues, stop_requested=stop.requested)
                if outcome.action == "done":
                    break
                if outcome.action == "requeue":
                    tries += 1
                    print(f"[colbertzero] phase {n}: {outcome.reason}", file=sys.stderr)
                    continue
                print(f"[colbertzero] phase {n}: {outcome.reason}; the chain stops here. See `colbertzero status "
                      f"{m.run_dir}`; continue with `{continue_hint(str(m.run_dir), n, outcome)}`", file=sys.stderr)
                return outcome.exit_code
    finally:
        stop.restore()
    return Exit.DONE


def _attempt(m: Manifest, phase: str, world: int, attempt_id: str, stop: _LocalStop) -> int:
    port = free_port()
    # Slurm variables of an enclosing allocation would make the runner think it is a Slurm job.
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    stop.procs = []
    for rank in range(world):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), COLBERTZERO_ATTEMPT_ID=attempt_id)
        # Own session: a Ctrl-C reaches the launcher only, which turns it into a checkpointed stop.
        stop.procs.append(subprocess.Popen([sys.executable, "-m", "colbertzero", "train", str(m.run_dir), "--phase",
                                            phase], env=env, start_new_session=True, preexec_fn=_die_with_parent))
    codes: dict[int, int] = {}
    deadline = None
    expected = (Exit.DONE, Exit.REQUEUE, Exit.OVER_BUDGET)
    while len(codes) < world:
        for i, p in enumerate(stop.procs):
            if i not in codes and p.poll() is not None:
                codes[i] = p.returncode
        if deadline is None and any(c not in expected for c in codes.values()):
            deadline = time.monotonic() + CRASH_GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            for i, p in enumerate(stop.procs):
                if i not in codes:
                    p.kill()
        time.sleep(0.2)
    for c in codes.values():
        if c not in expected:
            return c if c > 0 else Exit.FAILED
    return max(codes.values())
