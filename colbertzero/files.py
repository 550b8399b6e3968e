"""Durable files: atomic writes, fsync, content hashes and time stamps — the one home of each of these rules.

Every file colbertzero writes that something later relies on (manifest, shard sidecars and indexes, checkpoint
markers, exports, reports) goes through :func:`atomic_write_bytes`: a reader sees the old file or the new one, never a
part, and a writer killed mid-write leaves the previous version. Time stamps are UTC with their offset everywhere.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def now_iso() -> str:
    """The current time, UTC, ISO 8601 with its offset, to the second."""
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


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and folder under ``root`` before the folder is renamed into place (torch.save and
    DeepSpeed do not fsync: a node crash right after the rename could otherwise leave truncated files)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def temp_beside(final: Path) -> Path:
    """A unique temporary file name beside ``final`` (same filesystem, so the rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder (created if missing), fsync, rename over the target, fsync the
    folder."""
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


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_tree(path: str | os.PathLike, patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> str:
    """Hash of the files matching ``patterns`` under a folder (relative names and contents), stable across copies;
    a file's own hash when ``path`` is a file."""
    root = Path(path)
    if root.is_file():
        return sha256_file(root)
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()
