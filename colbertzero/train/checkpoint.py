"""Checkpoints of a phase and exact resume.

One checkpoint is one folder, ``RUN_DIR/phases/<phase>/checkpoints/step-XXXXXXXX/``::

    deepspeed/                 # DeepSpeed's own engine.save_checkpoint (tag "deepspeed"): module, optimizer, scheduler,
                               # ZeRO partitions (one file per rank where ZeRO shards them)
    latest, zero_to_fp32.py    # written by DeepSpeed: the folder is also a plain DeepSpeed checkpoint
    rng/rank-00000.pt          # each rank's RNG states: python, numpy, torch CPU, CUDA (current device) when present
    trainer_state.json         # step, data-loader state, temperature, whatever the runner adds
    COMPLETE                   # written last: step, sha256 of DeepSpeed's state files, world size, ZeRO stage

Protocol (every rank calls :func:`save_checkpoint`; the run dir is on a filesystem all nodes share):
rank 0 clears stale temporary folders and creates ``.step-XXXXXXXX.<random>.tmp/`` (`files.temp_dir_beside`), whose
name it hands every rank; all ranks write into it (each its own files) and fsync them; after a barrier rank 0 writes
``COMPLETE`` and puts the folder in place as ``step-XXXXXXXX/`` (`files.replace_dir`), then
registers it in the manifest and deletes what falls out of ``keep_last``. A ``step-*`` folder therefore always is
complete, and the manifest lists only complete checkpoints. Rank 0 broadcasts its outcome so that every rank either
returns the path or raises the same error (no rank is left waiting at a barrier).

:func:`load_latest_checkpoint` restores the newest checkpoint that the manifest lists and that exists, holds its
``COMPLETE`` marker and matches its recorded hash, into a freshly built engine; then this rank's RNG states. With the
same world size and ZeRO stage, the steps that follow are bit-identical to an uninterrupted run (tested on CPU for
ZeRO 0-3).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write_json, fsync_tree, now_iso, replace_dir, sha256_tree, temp_dir_beside, temps_in
from ..manifest import Manifest
from . import dist

log = logging.getLogger(__name__)

DS_TAG = "deepspeed"  # DeepSpeed's checkpoint tag: the sub-folder holding its files
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
TRAINER_STATE_FORMAT = "colbertzero-trainer-state/1"
# Keys the trainer state sets itself; extra_state may not override them.
_RESERVED = ("format", "phase", "step", "time", "world_size", "zero_stage", "loader", "loader_per_rank", "temperature")


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------- paths
def weights_sha256(ckpt: str | os.PathLike) -> str:
    """The hash the manifest records: all of DeepSpeed's state files in the checkpoint.

    Not the model-state files alone: under ZeRO-3 those hold only placeholders, the weights live in the per-rank
    fp32 partitions of the optimizer-state files (under ZeRO-1/2 those hold the fp32 master weights too)."""
    return sha256_tree(Path(ckpt) / DS_TAG, patterns=("*.pt",))


def clean_stale(ckpt_root: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders a killed writer left behind. Call only when no save is under way (rank 0)."""
    removed = sorted(temps_in(ckpt_root))
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    if removed:
        log.warning("removed %d stale partial checkpoint folder(s): %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


# ---------------------------------------------------------------- RNG
def capture_rng_state() -> dict:
    """This process's RNG states, as tensors and plain Python values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device only: a rank drives one device, and device counts may differ between jobs.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())
        else:
            log.warning("checkpoint holds a CUDA RNG state but this process has no CUDA device; not restored")


def _as_tuple(x: Any) -> Any:
    # random.setstate wants tuples all the way down; serialisation may hand lists back.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _rng_path(ckpt: Path, rank: int) -> Path:
    return ckpt / "rng" / f"rank-{rank:05d}.pt"


# ---------------------------------------------------------------- save
def save_checkpoint(
    engine,
    run_dir: str | os.PathLike,
    phase_name: str,
    step: int,
    *,
    extra_state: dict | None = None,
    loader_state: dict | None = None,
    temperature: float | None = None,
    manifest: Manifest,
    keep_last: int,
) -> Path:
    """Save a complete checkpoint of ``engine`` at optimizer step ``step``; every rank must call it.

    ``loader_state`` is the data loader's JSON-able state (when ranks hold different states, each rank's is kept),
    ``temperature`` the current loss temperature (recorded for humans: the parameter itself is in the engine state),
    ``extra_state`` anything else JSON-able the runner wants back from :func:`load_latest_checkpoint`.
    Returns the checkpoint folder on every rank, once it is complete and registered in the manifest.
    """
    rng = capture_rng_state()  # first, so the state is exactly what the next step will see
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    _check_run_dir(run_dir, manifest)
    extra_state = dict(extra_state or {})
    clash = sorted(set(extra_state) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra_state may not set {clash}: the trainer state writes those itself")
    rank, world = dist.rank(), dist.world()
    loader_json = _to_json(loader_state, "loader_state")
    _to_json(extra_state, "extra_state")

    final = manifest.layout.phase(phase_name).checkpoint(step)
    root = final.parent

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root)  # no other writer can be active: a phase runs as one job
        _check_space(root, engine, manifest, phase_name, step)
        return str(temp_dir_beside(final))

    tmp = Path(dist.rank0_outcome(prepare, f"preparing the checkpoint of step {step} in {root}", CheckpointError))

    # DeepSpeed writes its own files: rank 0 the module/scheduler states, every rank its ZeRO partition.
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=True)
    rng_file = _rng_path(tmp, rank)
    rng_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng, rng_file)
    loaders = dist.all_gather_objects(loader_json)
    if rank == 0:
        state = {
            "format": TRAINER_STATE_FORMAT,
            "phase": phase_name,
            "step": step,
            "time": now_iso(),
            "world_size": world,
            "zero_stage": _zero_stage(engine),
            "temperature": None if temperature is None else float(temperature),
            **extra_state,
        }
        if all(s == loaders[0] for s in loaders):
            state["loader"] = json.loads(loaders[0])
        else:
            state["loader_per_rank"] = [json.loads(s) for s in loaders]
        atomic_write_json(tmp / TRAINER_STATE, state)
    dist.barrier()  # everything is written; now flush it
    fsync_tree(tmp)
    dist.barrier()

    def commit():
        if not any((tmp / DS_TAG).glob("*model_states.pt")):
            raise CheckpointError(f"{tmp}: DeepSpeed wrote no model-state files")
        sha = weights_sha256(tmp)
        atomic_write_json(tmp / COMPLETE, {"step": step, "sha256": sha, "world_size": world,
                                           "zero_stage": _zero_stage(engine), "time": now_iso()})
        replace_dir(tmp, final)  # the same step saved again (resumed from an older checkpoint) replaces it
        dropped = manifest.add_checkpoint(phase_name, final, step, sha, keep_last)
        for rel in dropped:
            p = manifest.layout.resolve(rel).resolve()
            if p != final.resolve() and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        return str(final)

    return Path(dist.rank0_outcome(commit, f"committing checkpoint {final}", CheckpointError))


def _check_space(root: Path, engine, manifest: Manifest, phase_name: str, step: int) -> None:
    """Refuse, before a byte is written, a save the file system has no room for: a write that fails half-way is
    reported by torch as an iostream error on one rank while the others wait in a collective. The need is the
    newest checkpoint's size, or (the first save) 16 bytes a parameter: fp32 weights, master copy, Adam's two
    moments."""
    done = [c for c in manifest.phase(phase_name)["checkpoints"] if manifest.layout.resolve(c["path"]).is_dir()]
    if done:
        folder = manifest.layout.resolve(done[-1]["path"])
        need = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    else:
        need = 16 * sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    free = shutil.disk_usage(root).free
    if free < need * 1.05:
        last = f"step {done[-1]['step']}" if done else "none yet"
        raise CheckpointError(
            f"not enough space left on the device for the checkpoint of step {step}: {root} has {free / 2**20:,.0f} "
            f"MB free, a checkpoint takes ~{need / 2**20:,.0f} MB. Free space (or lower cadence.keep_last, or move "
            f"the run dir), then resume; the newest complete checkpoint ({last}) is untouched")


def _to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (plain dicts, lists, numbers, strings): {e}") from None


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


def _check_run_dir(run_dir, manifest: Manifest) -> None:
    if Path(run_dir).resolve() != manifest.run_dir:
        raise ValueError(f"run_dir {run_dir} is not the manifest's run dir {manifest.run_dir}")


# ---------------------------------------------------------------- load
def find_latest_checkpoint(manifest: Manifest, phase_name: str, *, verify_hash: bool = True,
                           skipped: list[dict] | None = None) -> dict | None:
    """The newest checkpoint the manifest lists whose folder exists, is marked complete and matches its hash. Each
    newer one passed over is appended to ``skipped`` ({path, step, reason}) when given."""

    def skip(c: dict, path: Path, reason: str) -> None:
        log.warning("checkpoint %s: %s; skipped", path, reason)
        if skipped is not None:
            skipped.append({"path": c["path"], "step": c["step"], "reason": reason})

    for c in reversed(manifest.phase(phase_name)["checkpoints"]):
        path = manifest.layout.resolve(c["path"])
        marker = path / COMPLETE
        if not marker.is_file():
            skip(c, path, "listed in the manifest but missing or incomplete")
            continue
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as e:
            skip(c, path, f"unreadable {COMPLETE} ({e})")
            continue
        if info.get("step") != c["step"] or info.get("sha256") != c["sha256"]:
            skip(c, path, f"its {COMPLETE} disagrees with the manifest")
            continue
        if verify_hash and weights_sha256(path) != c["sha256"]:
            skip(c, path, "its files do not match their recorded sha256 (altered or damaged)")
            continue
        return {**c, "abspath": str(path), "world_size": info.get("world_size"), "zero_stage": info.get("zero_stage")}
    return None


def load_latest_checkpoint(engine, run_dir: str | os.PathLike, phase_name: str, manifest: Manifest) -> dict | None:
    """Restore the newest complete checkpoint into ``engine`` (built fresh, not yet stepped) and this rank's RNG.

    Every rank must call it. Returns the trainer state (step, loader state, temperature, the runner's extra state,
    plus ``checkpoint``: the folder) or ``None`` when the manifest lists no usable checkpoint.
    """
    _check_run_dir(run_dir, manifest)

    def choose():
        clean_stale(manifest.layout.phase(phase_name).checkpoints)
        skipped: list[dict] = []
        chosen = find_latest_checkpoint(manifest, phase_name, skipped=skipped)
        if skipped:  # the run's record says which checkpoints were not resumed from, and why
            now = now_iso()
            manifest.update_phase(phase_name, lambda p: p.setdefault("skipped_checkpoints", []).extend(
                {**s, "time": now, "resumed_from": chosen["path"] if chosen else None} for s in skipped))
        return chosen

    # Rank 0 decides and tells the others: every rank loads the same checkpoint even if the manifest moves.
    chosen = dist.rank0_outcome(choose, f"finding the latest checkpoint of phase {phase_name!r}", CheckpointError)
    if chosen is None:
        return None
    path = Path(chosen["abspath"])
    rank, world = dist.rank(), dist.world()
    if chosen["world_size"] != world or chosen["zero_stage"] != _zero_stage(engine):
        # DeepSpeed refuses what it cannot re-partition; what it accepts resumes, but not bit-identically.
        log.warning("checkpoint %s was written by %s ranks at ZeRO-%s; resuming with %d ranks at ZeRO-%d",
                    path, chosen["world_size"], chosen["zero_stage"], world, _zero_stage(engine))

    # DeepSpeed reads every file with map_location=cpu and copies the values into the engine's own tensors, which
    # already live on its device: no Trainer-style map_location to get wrong (cpu:0 breaks CPU DDP there).
    load_path, _client = engine.load_checkpoint(
        str(path), tag=DS_TAG, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load its checkpoint (tag {DS_TAG!r})")

    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / TRAINER_STATE}: cannot read the trainer state ({e})") from None
    if state.get("format") != TRAINER_STATE_FORMAT:
        raise CheckpointError(f"{path / TRAINER_STATE}: format {state.get('format')!r}, expected "
                              f"{TRAINER_STATE_FORMAT!r}")
    per_rank = state.pop("loader_per_rank", None)
    if per_rank is not None:
        if len(per_rank) != world:
            raise CheckpointError(
                f"{path}: the data loader state was saved per rank for {len(per_rank)} ranks; this job has {world}"
            )
        state["loader"] = per_rank[rank]

    rng_file = _rng_path(path, rank)
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    else:
        log.warning("%s: no RNG state for rank %d (saved with %s ranks); RNG not restored", path, rank,
                    chosen["world_size"])
    dist.barrier()
    state["checkpoint"] = str(path)
    return state


class Checkpointer:
    """A phase run's checkpoints: when to save (every ``cadence.save_every`` steps; the runner also saves at the end
    and on a stop), and saving/loading against the run's manifest. Every rank holds one and calls it alike."""

    def __init__(self, engine, manifest: Manifest, phase_name: str, cadence) -> None:
        self.engine, self.manifest, self.phase_name, self.cadence = engine, manifest, phase_name, cadence

    def load(self) -> dict | None:
        return load_latest_checkpoint(self.engine, self.manifest.run_dir, self.phase_name, self.manifest)

    def should_save(self, step: int, total: int) -> bool:
        return step % self.cadence.save_every == 0 and step < total  # the last step is saved by the end of phase

    def save(self, step: int, *, loader_state: dict, temperature: float | None) -> Path:
        return save_checkpoint(self.engine, self.manifest.run_dir, self.phase_name, step, loader_state=loader_state,
                               temperature=temperature, manifest=self.manifest, keep_last=self.cadence.keep_last)
