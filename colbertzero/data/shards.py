"""On-disk format of prepared data: Arrow shards, their sidecars and the per-source index; atomic writes; checks.

A prepared source is one folder, ``<phase.data.shards_dir>/<source.name>/``::

    index.json                  written last, atomically: the source is "prepared" iff this file exists
    shard-00000.arrow           Arrow IPC *stream* files (the format `datasets` memory-maps; no pickle)
    shard-00000.meta.json       sidecar of a finished shard: key, rows, bytes, sha256, statistics
    documents/shard-00000.arrow distillation only: each document tokenized once, rows referenced by position
    queries/shard-00000.arrow   distillation only: the same for queries
    _work/                      plan artefacts (id lists, deduplicated text tables); not read by the loader

Row shards by kind (token lists are ``large_list<uint16|int32>``: unpadded, PyLate's ids, no expansion):

- ``unsupervised`` / ``supervised``: ``query``, ``documents`` (``list<large_list>``: the positive first, then up to
  ``max_negatives`` hard negatives), ``max_doc_len`` (int32, the longest of the row's documents).
- ``distillation``: ``query_idx`` (int32, a row of ``queries/``), ``doc_idx`` and ``scores``
  (``fixed_size_list[docs_per_query]`` of int32 / float32, teacher order).
- tables (``documents/``, ``queries/``): ``input_ids``.

A shard counts as finished only when its file and its sidecar both exist and agree (the shard is written to a
temporary name, hashed, its sidecar written, then renamed), so a half-written shard is never taken for a finished one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa

from ..files import atomic_write_json, fsync_dir, sha256_file, temp_beside

FORMAT = "colbertzero-shards/1"
INDEX = "index.json"
WORK = "_work"
TABLES = ("queries", "documents")


class DataError(ValueError):
    """Bad input or prepared data that cannot be used; the message names the file, the row or setting, and the fix."""


# ---------------------------------------------------------------- files
def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); delete it and re-run `colbertzero prepare`") from None


# ---------------------------------------------------------------- shards
def meta_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".arrow") + ".meta.json")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.arrow"


def write_shard(path: Path, table: pa.Table, meta: dict) -> dict:
    """Write ``table`` as one record batch to ``path`` with its sidecar; returns the sidecar.

    Order matters for restarts: temp file → fsync → hash → sidecar → rename. A crash anywhere leaves either no shard
    or a shard whose sidecar is missing, and both read as "not finished".
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        batch = table.combine_chunks().to_batches()
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for b in batch:  # one batch: the loader then sees contiguous offsets/values per shard
                writer.write_batch(b)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        meta = dict(meta, file=path.name, rows=table.num_rows, bytes=tmp.stat().st_size, sha256=sha256_file(tmp))
        atomic_write_json(meta_path(path), meta)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def finished_meta(path: Path, key: str, full_hash: bool = False) -> dict | None:
    """The sidecar of a finished shard made with ``key``, else None (missing, other settings, altered)."""
    mp = meta_path(path)
    if not (path.is_file() and mp.is_file()):
        return None
    try:
        meta = json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("key") != key or meta.get("bytes") != path.stat().st_size:
        return None
    if full_hash and sha256_file(path) != meta.get("sha256"):
        return None
    return meta


def remove_shard(path: Path) -> None:
    path.unlink(missing_ok=True)
    meta_path(path).unlink(missing_ok=True)


def open_table(path: Path) -> pa.Table:
    """Memory-map an Arrow stream file: the table's buffers point into the page cache, nothing is copied."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow shard ({e}); re-run `colbertzero prepare`") from None


# ---------------------------------------------------------------- index
def source_dir(data, name: str) -> Path:
    """Where one source of a phase's data (``data``: the phase's ``data`` settings) keeps its shards and index: the one
    place this path is made."""
    return Path(data.shards_dir) / name


def index_path(folder: Path) -> Path:
    return Path(folder) / INDEX


def unprepared(recipe, phases: list[str]) -> list[str]:
    """Those of ``phases`` with a source that has no index yet (what `prepare` still has to do)."""
    return [n for n in phases
            if any(not index_path(source_dir(recipe.phase(n).data, s.name)).exists()
                   for s in recipe.phase(n).data.sources)]


def read_index(folder: Path, what: str) -> dict:
    path = index_path(folder)
    if not path.is_file():
        raise DataError(f"{what}: not prepared ({path} is missing); run `colbertzero prepare RECIPE` first")
    index = read_json(path)
    if index.get("format") != FORMAT:
        raise DataError(
            f"{path}: format {index.get('format')!r}, this colbertzero reads {FORMAT!r}; re-run `colbertzero prepare`"
        )
    return index


def shard_entries(index: dict) -> list[tuple[str, dict]]:
    """(relative path, entry) for every shard an index lists: row shards, then the tables' shards."""
    out = [(e["file"], e) for e in index["shards"]]
    for name, table in index.get("tables", {}).items():
        out += [(f"{name}/{e['file']}", e) for e in table["shards"]]
    return out


def verify_shards(folder: Path, index: dict, full: bool = False) -> dict[str, int]:
    """Check every shard against the index: size always; sha256 when ``full`` or when the mtime moved (a copy).

    Returns counts {"checked", "hashed"}. Raises DataError naming the shard on any difference.
    """
    folder = Path(folder)
    hashed = 0
    entries = shard_entries(index)
    for rel, e in entries:
        path = folder / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DataError(f"{path}: shard listed in {index_path(folder)} is missing; re-run "
                            "`colbertzero prepare`") from None
        if st.st_size != e["bytes"]:
            raise DataError(
                f"{path}: {st.st_size} bytes, the index says {e['bytes']}: the shard is truncated or altered; "
                "re-run `colbertzero prepare` (it rewrites only what is damaged)"
            )
        if full or st.st_mtime_ns != e.get("mtime_ns"):
            hashed += 1
            if sha256_file(path) != e["sha256"]:
                raise DataError(
                    f"{path}: sha256 differs from {index_path(folder)}: the shard was altered; "
                    "re-run `colbertzero prepare --verify` to rebuild it"
                )
    return {"checked": len(entries), "hashed": hashed}


def hash_share(folder: Path, index: dict, share: int, shares: int, done=None) -> list[str]:
    """sha256 of this share's shards (every ``shares``-th, from ``share``) against the index; the problems found,
    not raised: the ranks of a phase hash one share each and then agree (a rank that raised alone would leave the
    others waiting in a collective). ``done(bytes)`` after each shard (a progress bar)."""
    problems = []
    for k, (rel, e) in enumerate(shard_entries(index)):
        if k % shares != share:
            continue
        path = Path(folder) / rel
        try:
            if sha256_file(path) != e["sha256"]:
                problems.append(f"{path}: sha256 differs from {index_path(Path(folder))}: the shard was altered; "
                                "re-run `colbertzero prepare --verify` to rebuild it")
        except OSError as err:
            problems.append(f"{path}: unreadable ({err}); re-run `colbertzero prepare`")
        if done is not None:
            done(e["bytes"])
    return problems
