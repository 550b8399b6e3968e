"""The run directory and its manifest: the one record that chains phases, counts GPU-hours and proves what is complete.

Schema: docs/CONTRACTS.md. Every write is read-modify-write under an exclusive file lock (``manifest.json.lock``)
and lands atomically (``files.atomic_write_json``): a writer killed mid-write leaves the previous manifest intact,
two writers never interleave. A manifest that is not ours (other format) or does not parse is refused, never
overwritten. What the numbers in it mean (GPU-hours, budgets, attempts) is ``ledger.py``'s.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from . import ledger
from .files import atomic_write_bytes, atomic_write_json, now_iso
from .layout import RunLayout
from .recipe import dump_recipe, no_control_characters, recipe_from_dict
from .runtime import resume_command

FORMAT = "colbertzero-manifest/1"
STATES = ("pending", "running", "done", "failed", "over-budget")
EVAL_JOB_OPEN = ("submitted", "running")  # an evaluation job that may still write its result
MANIFEST = "manifest.json"


class ManifestError(RuntimeError):
    pass


def new_phase_record(kind: str, budget: float | None = None) -> dict:
    return {
        "kind": kind,
        "state": "pending",
        "step": 0,
        "total_steps": None,
        "attempts": [],
        "checkpoints": [],
        "export": None,
        "lineage": {},
        "eval": None,
        "failure": None,
        "throughput": None,
        "budget_gpu_hours": budget,
    }


def load_manifest_file(path: Path) -> dict:
    """Parse and check a manifest file; anything that is not ours, or not whole, is refused and left untouched."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise ManifestError(
            f"{path}: no manifest; this is not a colbertzero run dir (create one with `colbertzero launch`)"
        ) from None
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a directory, not a manifest file") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{path}: corrupt manifest ({e}); it is left untouched. Restore it from a backup or start a new run dir."
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(
            f"{path}: not a colbertzero manifest (format {fmt!r}, expected {FORMAT!r}); refusing to touch it"
        )
    for key in ("recipe", "recipe_hash", "phases"):
        if key not in data:
            raise ManifestError(f"{path}: manifest lacks {key!r}; it is left untouched")
    if not isinstance(data["phases"], dict) or not all(isinstance(p, dict) for p in data["phases"].values()):
        raise ManifestError(f"{path}: the manifest's phases are damaged; it is left untouched")
    return data


class Manifest:
    """Locked, atomic access to ``RUN_DIR/manifest.json``.

    Read with :meth:`read` (locked) or :meth:`snapshot` (no lock: for `status`/`report` on read-only or other
    people's run dirs; writers replace the file atomically, so a snapshot is never half a file); change with
    ``with m.update() as data: ...`` (the lock is held for the whole read-modify-write, so concurrent processes —
    ranks, the launcher, `resume` — never lose each other's writes). Ledger rules live in ``ledger.py``.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.layout = RunLayout.of(run_dir)
        self.run_dir = self.layout.root
        self.path = self.layout.manifest
        self.lock = FileLock(str(self.path) + ".lock", timeout=120)

    # -- creation ------------------------------------------------------------
    @classmethod
    def create(cls, run_dir: str | os.PathLike, recipe) -> "Manifest":
        """Create a run dir for ``recipe``, or open the existing one if it holds the same recipe."""
        m = cls(run_dir)
        try:  # the run dir is written into job scripts and Slurm options: one line, always
            no_control_characters(str(m.run_dir), "--run-dir")
        except ValueError as e:
            raise ManifestError(f"{e}; choose another folder name") from None
        if m.run_dir.exists() and not m.run_dir.is_dir():
            raise ManifestError(f"{m.run_dir}: exists and is not a directory; give another --run-dir")
        m.run_dir.mkdir(parents=True, exist_ok=True)
        with m.lock:
            if m.path.exists():
                data = load_manifest_file(m.path)
                if data["recipe_hash"] != recipe.hash():
                    raise ManifestError(
                        f"{m.path}: this run dir holds recipe {data['recipe']['name']!r} with another configuration "
                        f"(hash {data['recipe_hash'][:12]} ≠ {recipe.hash()[:12]}). Use a new --run-dir, or "
                        f"`{resume_command(m.run_dir)}` to continue the run as it was."
                    )
                return m
            data = {
                "format": FORMAT,
                "created": now_iso(),
                "updated": now_iso(),
                "recipe": recipe.resolved(),
                "recipe_hash": recipe.hash(),
                "phases": {name: new_phase_record(ph.kind, None) for name, ph in recipe.phases.items()},
                "budget_gpu_hours": None,
            }
            m._store(data)
            atomic_write_bytes(m.layout.recipe_file, dump_recipe(recipe).encode())
        return m

    def exists(self) -> bool:
        return self.path.exists()

    # -- reading -------------------------------------------------------------
    def read(self) -> dict:
        with self.lock:
            return load_manifest_file(self.path)

    def snapshot(self) -> dict:
        """The manifest without taking the lock (which needs write access); never torn, possibly a write behind."""
        if not self.run_dir.exists():
            raise ManifestError(f"{self.run_dir}: no such run dir")
        if not self.run_dir.is_dir():
            raise ManifestError(f"{self.run_dir}: not a directory (expected a colbertzero run dir holding {MANIFEST})")
        return load_manifest_file(self.path)

    def recipe(self):
        return recipe_from_dict(copy.deepcopy(self.read()["recipe"]), str(self.path))

    # -- writing -------------------------------------------------------------
    def _store(self, data: dict) -> None:
        data["updated"] = now_iso()
        atomic_write_json(self.path, data)

    @contextlib.contextmanager
    def update(self) -> Iterator[dict]:
        with self.lock:
            data = load_manifest_file(self.path)
            yield data
            self._store(data)

    def phase(self, name: str) -> dict:
        data = self.read()
        if name not in data["phases"]:
            raise ManifestError(f"{self.path}: no phase {name!r}; phases: {', '.join(data['phases'])}")
        return data["phases"][name]

    def update_phase(self, name: str, fn: Callable[[dict], Any]) -> Any:
        with self.update() as data:
            if name not in data["phases"]:
                raise ManifestError(f"{self.path}: no phase {name!r}; phases: {', '.join(data['phases'])}")
            return fn(data["phases"][name])

    def set_state(self, name: str, state: str, **fields) -> None:
        if state not in STATES:
            raise ValueError(f"unknown phase state {state!r}; one of {STATES}")

        def f(p):
            p["state"] = state
            p.update(fields)

        self.update_phase(name, f)

    # -- the ledger's writes (rules in ledger.py) -----------------------------
    def start_attempt(self, name: str, **attempt) -> str:
        """Record a new attempt (one job run of a phase); returns its id. Idempotent for the same attempt_id."""
        return self.update_phase(name, lambda p: ledger.open_attempt(p, **attempt))

    def tick_attempt(self, name: str, attempt_id: str, **fields) -> dict:
        """Elapsed time, GPU-hours and step of an attempt (closed with ``end_state``); see ledger.tick_attempt."""

        def f(p):
            try:
                return ledger.tick_attempt(p, attempt_id, **fields)
            except KeyError:
                raise ManifestError(f"{self.path}: phase {name!r} has no attempt {attempt_id!r}") from None

        return self.update_phase(name, f)

    def raise_budget(self, name: str | None, gpu_hours: float) -> None:
        with self.update() as data:
            ledger.raise_budget(data, name, gpu_hours)

    # -- in-training evaluation jobs (train/evaluation.py starts and settles them) ---------------------------
    def open_eval_jobs(self, name: str) -> dict[str, dict]:
        """{step: record} of the phase's evaluation jobs that may still write a result."""
        return {s: r for s, r in (self.phase(name).get("eval_jobs") or {}).items() if r.get("state") in EVAL_JOB_OPEN}

    def close_eval_job(self, name: str, step: str, state: str, reason: str) -> bool:
        """Close a job record that is still open (True); one whose job wrote its result meanwhile keeps it."""
        def put(p):
            rec = (p.get("eval_jobs") or {}).get(str(step))
            if not rec or rec.get("state") not in EVAL_JOB_OPEN:
                return False
            rec.update(state=state, reason=reason, time=now_iso())
            return True

        return self.update_phase(name, put)

    # -- checkpoints and exports -------------------------------------------------
    def add_checkpoint(self, name: str, path: str | os.PathLike, step: int, sha256: str, keep_last: int) -> list[str]:
        """Register a COMPLETE checkpoint; returns the paths (relative) that fall out of keep_last, to delete."""
        rel = self.layout.relative(path)

        def f(p):
            p["checkpoints"] = [c for c in p["checkpoints"] if c["path"] != rel]
            p["checkpoints"].append({"path": rel, "step": int(step), "sha256": sha256, "time": now_iso()})
            p["checkpoints"].sort(key=lambda c: c["step"])
            p["step"] = max(p.get("step", 0), int(step))
            dropped = p["checkpoints"][:-keep_last] if keep_last > 0 else []
            p["checkpoints"] = p["checkpoints"][-keep_last:] if keep_last > 0 else p["checkpoints"]
            return [c["path"] for c in dropped]

        return self.update_phase(name, f)

    def export_path(self, name: str) -> str | None:
        e = self.phase(name).get("export")
        if not e:
            return None
        return str(self.layout.resolve(e["path"]))


def resolve_init(manifest: Manifest | None, recipe, phase_name: str) -> str:
    """The model path a phase starts from: its own init, or the export of the phase named by ``init.from``."""
    ph = recipe.phase(phase_name)
    src = ph.init_from
    if src is None:
        return ph.init
    if manifest is None:
        raise ManifestError(f"phase {phase_name!r} starts from phase {src!r}: that needs a run dir with its export")
    p = manifest.phase(src)
    if p["state"] != "done" or not p.get("export"):
        raise ManifestError(
            f"phase {phase_name!r} starts from phase {src!r}, which is {p['state']} with no export yet; "
            f"run {src!r} first (`{resume_command(manifest.run_dir)}`)"
        )
    return str(manifest.layout.resolve(p["export"]["path"]))
