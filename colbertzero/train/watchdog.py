"""A hang is a failure, not a stall: each rank watches its own steps and leaves when one takes far too long.

A thread on every rank notes each finished step. When none has finished for longer than the limit — `step_factor` ×
the running median step time, and at least `min_seconds` (the first steps warm up) — it writes every thread's Python
stack to `phases/<phase>/hangs/rank-<r>-<attempt>.txt`, calls `on_fire` (the runner records the hang in the ledger
and, under submitit, applies the requeue policy: the main thread, stuck, never returns to do it) and ends the process
with the exit code that returns (`Exit.REQUEUE` by default): the phase runs again from its newest checkpoint (a stuck
rank, a lost node, a collective that will never complete), where a silent stall would hold the GPUs until the time
limit. Checkpoints, exports and evaluations pause the watch.
torch.distributed's own collective timeout (`collective_timeout_s`) stays the backstop for a rank that cannot run
this thread at all.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from ..runtime import Exit

POLL_S = 1.0


class Watchdog:
    def __init__(self, *, folder: Path, rank: int, attempt: str, step_factor: float, min_seconds: float,
                 on_fire: Callable[[], int] | None = None) -> None:
        self.folder, self.rank, self.attempt, self.on_fire = Path(folder), rank, attempt, on_fire
        self.step_factor, self.min_seconds = step_factor, min_seconds
        self.durations: deque[float] = deque(maxlen=50)
        self.last = time.monotonic()
        self.pauses = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="colbertzero-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.last = time.monotonic()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def beat(self, step_seconds: float) -> None:
        """A step finished, having taken `step_seconds`."""
        self.durations.append(step_seconds)
        self.last = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        """Long work that is not a step (a checkpoint, an export, an evaluation) is not a hang."""
        self.pauses += 1
        try:
            yield
        finally:
            self.pauses -= 1
            self.last = time.monotonic()

    def limit(self) -> float:
        median = statistics.median(self.durations) if self.durations else 0.0
        return max(self.min_seconds, self.step_factor * median)

    def _watch(self) -> None:
        while not self.stopped.wait(POLL_S):
            waited = time.monotonic() - self.last
            if self.pauses == 0 and waited > self.limit():
                self._fire(waited)

    def _fire(self, waited: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank-{self.rank:05d}-{self.attempt}.txt"
        with open(path, "w") as f:
            f.write(f"rank {self.rank}: no step finished for {waited:.0f} s (limit {self.limit():.0f} s)\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        print(f"[colbertzero] rank {self.rank}: no step finished for {waited:.0f} s (limit {self.limit():.0f} s: "
              f"{self.step_factor:g} x the median step, at least {self.min_seconds:g} s); every thread's stack is in "
              f"{path}; leaving to be run again from the newest checkpoint", file=sys.stderr, flush=True)
        code = Exit.REQUEUE
        try:
            code = self.on_fire() if self.on_fire is not None else code
        finally:  # whatever happened there, this process leaves: its main thread is stuck
            sys.stderr.flush()
            os._exit(code)
