"""The run directory and its manifest: the one record that chains phases, counts GPU-hours and proves what is complete.

``RUN_DIR/manifest.json``::

    {
      "format": "colbertzero-manifest/1",
      "created": iso time, "updated": iso time,
      "recipe": {...resolved recipe...}, "recipe_hash": sha256,
      "phases": {
        "<name>": {
          "kind": ..., "state": "pending|running|done|failed|over-budget",
          "step": last completed optimizer step, "total_steps": int | null,
          "attempts": [{"id", "job_id", "executor", "nodes", "gpus_per_node", "tasks", "start", "end",
                        "elapsed_s", "gpu_hours", "exit_state", "step_start", "step_end", "host"}],
          "checkpoints": [{"path" (relative to RUN_DIR), "step", "sha256", "time"}],
          "export": {"path", "step", "sha256", "time"} | null,
          "lineage": {"init", "init_sha256", "data_index", "data_index_sha256", "config_hash"},
          "eval": {...} | null, "failure": {"step", "source", "reason", "time"} | null,
          "throughput": {"samples_per_s", "seconds_per_step", "measured_at_step"} | null,
          "budget_gpu_hours": float | null   # raised on the command line: overrides the recipe's
        }
      }
    }

Every write is read-modify-write under an exclusive file lock (``manifest.json.lock``) and lands atomically
(temp file + fsync + rename + directory fsync): a writer killed mid-write leaves the previous manifest intact,
two writers never interleave. A manifest that is not ours (other format) or does not parse is refused, never
overwritten.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

FORMAT = "colbertzero-manifest/1"
STATES = ("pending", "running", "done", "failed", "over-budget")
MANIFEST = "manifest.json"


class ManifestError(RuntimeError):
    pass


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def parse_iso(s: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(s)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable; a filesystem that cannot open or sync directories is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder (created if missing), fsync, rename over the target, fsync the
    folder: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "*.pt")) -> str:
    """Hash of the weight files under a folder (names and contents), stable across copies."""
    root = Path(path)
    if root.is_file():
        return sha256_file(root)
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


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


class Manifest:
    """Locked, atomic access to ``RUN_DIR/manifest.json``.

    Read with :meth:`read`; change with ``with m.update() as data: ...`` (the lock is held for the whole
    read-modify-write, so concurrent processes — ranks, the launcher, `resume` — never lose each other's writes).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / MANIFEST
        self.lock = FileLock(str(self.path) + ".lock", timeout=120)

    # -- creation ------------------------------------------------------------
    @classmethod
    def create(cls, run_dir: str | os.PathLike, recipe) -> "Manifest":
        """Create a run dir for ``recipe``, or open the existing one if it holds the same recipe."""
        m = cls(run_dir)
        m.run_dir.mkdir(parents=True, exist_ok=True)
        with m.lock:
            if m.path.exists():
                data = m._load()
                if data["recipe_hash"] != recipe.hash():
                    raise ManifestError(
                        f"{m.path}: this run dir holds recipe {data['recipe']['name']!r} with another configuration "
                        f"(hash {data['recipe_hash'][:12]} ≠ {recipe.hash()[:12]}). Use a new --run-dir, or "
                        f"`colbertzero resume {m.run_dir}` to continue the run as it was."
                    )
                return m
            data = {
                "format": FORMAT,
                "created": now_iso(),
                "updated": now_iso(),
                "recipe": recipe.resolved(),
                "recipe_hash": recipe.hash(),
                "phases": {
                    name: new_phase_record(ph.kind, None) for name, ph in recipe.phases.items()
                },
                "budget_gpu_hours": None,
            }
            m._store(data)
            from .recipe import dump_recipe

            atomic_write_bytes(m.run_dir / "recipe.yaml", dump_recipe(recipe).encode())
        return m

    def exists(self) -> bool:
        return self.path.exists()

    # -- reading -------------------------------------------------------------
    def _load(self) -> dict:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            raise ManifestError(
                f"{self.path}: no manifest; this is not a colbertzero run dir (create one with `colbertzero launch`)"
            ) from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ManifestError(
                f"{self.path}: corrupt manifest ({e}); it is left untouched. Restore it from a backup "
                f"or start a new run dir."
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(
                f"{self.path}: not a colbertzero manifest (format {fmt!r}, expected {FORMAT!r}); refusing to touch it"
            )
        for key in ("recipe", "recipe_hash", "phases"):
            if key not in data:
                raise ManifestError(f"{self.path}: manifest lacks {key!r}; it is left untouched")
        return data

    def read(self) -> dict:
        with self.lock:
            return self._load()

    def recipe(self):
        from .recipe import recipe_from_dict

        return recipe_from_dict(copy.deepcopy(self.read()["recipe"]), str(self.path))

    # -- writing -------------------------------------------------------------
    def _store(self, data: dict) -> None:
        data["updated"] = now_iso()
        atomic_write_json(self.path, data)

    @contextlib.contextmanager
    def update(self) -> Iterator[dict]:
        with self.lock:
            data = self._load()
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

    # -- attempts / ledger ----------------------------------------------------
    def start_attempt(
        self,
        name: str,
        *,
        job_id: str | None,
        executor: str,
        nodes: int,
        gpus_per_node: int,
        tasks: int,
        step_start: int = 0,
        attempt_id: str | None = None,
        start: str | None = None,
    ) -> str:
        """Record a new attempt (one job run of a phase); returns its id. Idempotent for the same attempt_id."""

        def f(p):
            aid = attempt_id or f"{job_id or 'local'}-{len(p['attempts'])}"
            for a in p["attempts"]:
                if a["id"] == aid:
                    return aid
            p["attempts"].append(
                {
                    "id": aid,
                    "job_id": job_id,
                    "executor": executor,
                    "nodes": nodes,
                    "gpus_per_node": gpus_per_node,
                    "tasks": tasks,
                    "start": start or now_iso(),
                    "end": None,
                    "elapsed_s": 0.0,
                    "gpu_hours": 0.0,
                    "exit_state": "running",
                    "step_start": step_start,
                    "step_end": step_start,
                    "host": os.uname().nodename,
                }
            )
            p["state"] = "running"
            return aid

        return self.update_phase(name, f)

    def tick_attempt(self, name: str, attempt_id: str, *, step: int, elapsed_s: float, end_state: str | None = None):
        """Update an attempt's elapsed time (and close it with ``end_state``); GPU-hours follow from resources."""

        def f(p):
            for a in p["attempts"]:
                if a["id"] == attempt_id:
                    a["elapsed_s"] = float(elapsed_s)
                    a["gpu_hours"] = attempt_gpu_hours(a)
                    a["step_end"] = step
                    if end_state is not None:
                        a["exit_state"] = end_state
                        a["end"] = now_iso()
                    return a
            raise ManifestError(f"{self.path}: phase {name!r} has no attempt {attempt_id!r}")

        return self.update_phase(name, f)

    # -- checkpoints -----------------------------------------------------------
    def add_checkpoint(self, name: str, path: str | os.PathLike, step: int, sha256: str, keep_last: int) -> list[str]:
        """Register a COMPLETE checkpoint; returns the paths (relative) that fall out of keep_last, to delete."""
        rel = os.path.relpath(Path(path).resolve(), self.run_dir)

        def f(p):
            p["checkpoints"] = [c for c in p["checkpoints"] if c["path"] != rel]
            p["checkpoints"].append({"path": rel, "step": int(step), "sha256": sha256, "time": now_iso()})
            p["checkpoints"].sort(key=lambda c: c["step"])
            p["step"] = max(p.get("step", 0), int(step))
            dropped = p["checkpoints"][:-keep_last] if keep_last > 0 else []
            p["checkpoints"] = p["checkpoints"][-keep_last:] if keep_last > 0 else p["checkpoints"]
            return [c["path"] for c in dropped]

        return self.update_phase(name, f)

    def latest_checkpoint(self, name: str) -> dict | None:
        """Newest checkpoint the manifest proves complete and that still exists on disk."""
        cks = self.phase(name)["checkpoints"]
        for c in reversed(cks):
            if (self.run_dir / c["path"]).is_dir():
                return {**c, "abspath": str(self.run_dir / c["path"])}
        return None

    def export_path(self, name: str) -> str | None:
        e = self.phase(name).get("export")
        if not e:
            return None
        return str(self.run_dir / e["path"])

    # -- budget --------------------------------------------------------------
    def gpu_hours(self, name: str | None = None) -> float:
        data = self.read()
        phases = [data["phases"][name]] if name else list(data["phases"].values())
        return sum(a.get("gpu_hours", 0.0) for p in phases for a in p["attempts"])

    def budget(self, name: str) -> float | None:
        """The phase's GPU-hour budget: a raised one from the command line wins over the recipe's."""
        data = self.read()
        p = data["phases"][name]
        if p.get("budget_gpu_hours") is not None:
            return p["budget_gpu_hours"]
        return data["recipe"]["phases"][name].get("budget_gpu_hours")

    def run_budget(self) -> float | None:
        data = self.read()
        return data.get("budget_gpu_hours") or data["recipe"].get("budget_gpu_hours")

    def raise_budget(self, name: str | None, gpu_hours: float) -> None:
        with self.update() as data:
            if name is None:
                data["budget_gpu_hours"] = float(gpu_hours)
            else:
                data["phases"][name]["budget_gpu_hours"] = float(gpu_hours)
                if data["phases"][name]["state"] == "over-budget":
                    data["phases"][name]["state"] = "pending"


def attempt_gpu_hours(a: dict) -> float:
    """GPU-hours of one attempt = nodes × GPUs per node × elapsed hours (CPU-only attempts count tasks)."""
    per_node = a["gpus_per_node"] if a["gpus_per_node"] else max(1, a["tasks"] // max(1, a["nodes"]))
    return a["nodes"] * per_node * a["elapsed_s"] / 3600.0


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
            f"run {src!r} first (`colbertzero resume {manifest.run_dir}`)"
        )
    return str(manifest.run_dir / p["export"]["path"])
