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
import shutil
import tempfile
from collections.abc import Iterator
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


# Temporary files and folders are named `.<final name>.<random>.tmp` beside what they become (same filesystem, so the
# rename is atomic): hidden, recognisable as the temp of one target (`writes_in_progress`), never read as data.
TEMP_SUFFIX = ".tmp"


def _temp_prefix(final: Path) -> str:
    return f".{final.name}."


def temp_beside(final: Path) -> Path:
    """A new, empty temporary file beside ``final``."""
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=TEMP_SUFFIX, dir=final.parent)
    os.close(fd)
    return Path(name)


def temp_dir_beside(final: Path) -> Path:
    """A new, empty temporary folder beside ``final`` (its parent is created if missing)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=TEMP_SUFFIX, dir=final.parent))


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished folder ``tmp`` in place of ``final``, whole: a reader sees the old folder or the new one,
    never a mix (an old ``final`` is renamed aside, the new one renamed in, then the old one removed)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = temp_dir_beside(final)
        os.replace(final, old)  # over an empty folder: allowed
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def file_replacing(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside ``final`` for any writer (pyarrow, numpy) to fill; when the block ends it is
    flushed and renamed over ``final``. On an error it is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(final)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def folder_replacing(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``final`` to fill; when the block ends it replaces ``final`` whole (`replace_dir`).
    On an error it is removed and ``final`` is left as it was."""
    final = Path(final)
    tmp = temp_dir_beside(final)
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def writes_in_progress(final: str | os.PathLike) -> list[Path]:
    """The temporary files and folders of writes of ``final`` under way, or left by a writer that was killed."""
    final = Path(final)
    try:
        return [final.parent / e.name for e in os.scandir(final.parent)
                if e.name.startswith(_temp_prefix(final)) and e.name.endswith(TEMP_SUFFIX)]
    except FileNotFoundError:
        return []


def temps_in(folder: str | os.PathLike) -> list[Path]:
    """Every temporary file or folder directly in ``folder`` (what killed writers leave behind)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [folder / e.name for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(TEMP_SUFFIX)]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder (created if missing), fsync, rename over the target, fsync the
    folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
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
