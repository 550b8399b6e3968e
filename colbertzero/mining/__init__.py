"""Training data for a new domain: `mine` (hard negatives → the supervised layout) and `score` (teacher scores → the
distillation layout), split by query ranges into shards that run anywhere (this process, a local loop, a Slurm
array) and merge atomically when the last one is done. docs/own-data.md walks through them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock

from .mine import MineSpec, mine_shard, write_mined
from .score import ScoreSpec, score_shard, target_lines, write_scored
from .work import Work, WorkError

__all__ = ["MineSpec", "ScoreSpec", "WorkError", "derive_task", "finished", "run_line", "run_shards", "spec_from",
           "work_for"]


def work_for(spec: MineSpec | ScoreSpec, out: str | os.PathLike, shards: int) -> Work:
    return Work(out, spec.as_dict(), shards)


def run_shards(spec: MineSpec | ScoreSpec, out: str | os.PathLike, shards: int = 1, task: int | None = None,
               show_progress: bool = True) -> dict:
    """Run one shard (``task``) or every missing one, then merge if none is left.

    Returns ``{"out", "merged", "ran", "missing", "stats"}``; an output already written from the same spec is kept
    (nothing runs)."""
    if task is not None and not 0 <= task < shards:
        raise WorkError(f"--array-task {task}: this work has shards 0..{shards - 1}")
    work = work_for(spec, out, shards)
    if work.finished():
        return {"out": str(work.out), "merged": True, "ran": [], "missing": [], "stats": _stats(work.out)}
    work.open()
    todo = [task] if task is not None else work.missing()
    run = mine_shard if isinstance(spec, MineSpec) else score_shard
    for i in todo:
        run(spec, work, i, show_progress=show_progress)
    # The last task to finish merges; the lock keeps two tasks that finish together from merging twice.
    with FileLock(str(work.out.parent / f".{work.out.name}.lock"), timeout=3600):
        if not work.finished() and not work.missing():
            if isinstance(spec, MineSpec):
                write_mined(spec, work)
            else:
                write_scored(spec, work)
    merged = work.finished()
    return {"out": str(work.out), "merged": merged, "ran": todo, "missing": [] if merged else work.missing(),
            "stats": _stats(work.out) if merged else {}}


def spec_from(kind: str, args: dict) -> MineSpec | ScoreSpec:
    """A recipe's derive step as the command's settings (checked by preflight; built where the step runs, once the
    steps before it have written its input)."""
    return (MineSpec if kind == "mine" else ScoreSpec)(**args)


def derive_task(kind: str, args: dict, out: str, shards: int, task: int | None) -> dict:
    """What one array task of a derive step runs (or, with ``task=None``, the whole step here)."""
    return run_shards(spec_from(kind, args), out, shards, task=task, show_progress=task is None)


def finished(kind: str, args: dict, out: str) -> bool:
    """The step's output is complete and was written from these settings (its input must exist to tell)."""
    info = Path(out) / "colbertzero.json"
    if not info.is_file():
        return False
    try:
        return work_for(spec_from(kind, args), out, 1).finished()
    except (ValueError, OSError):
        return False


def _stats(out: Path) -> dict:
    path = Path(out) / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_line(r: dict, shards: int) -> str:
    """What `mine`/`score` print after a local run (``run_shards``' result)."""
    if r["merged"]:
        stats = r["stats"]
        flat = ", ".join(f"{k} {v}" for k, v in stats.items() if not isinstance(v, dict))
        return "\n".join([f"{r['out']}: {flat}", *(target_lines(stats) if "target" in stats else [])])
    more = " …" if len(r["missing"]) > 10 else ""
    return (f"shard(s) {', '.join(map(str, r['ran']))} done; {len(r['missing'])} of {shards} still to run "
            f"({', '.join(map(str, r['missing'][:10]))}{more})")
