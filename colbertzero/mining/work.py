"""Work split by query ranges: shard i of n takes rows [i·rows/n, (i+1)·rows/n) of the input.

Beside the output ``OUT`` lives ``.OUT.work/``: ``spec.json`` (what is being computed, the input's fingerprint, the
shard count) and one ``part-IIIII-of-NNNNN.parquet`` per finished shard, written to a temp name and renamed, so a
killed task leaves either a whole part or none. A task whose part exists skips; `merge` reads the parts in order,
writes OUT whole into a temp folder, renames it into place and removes the work folder. Every query lands exactly
once: the ranges tile the input, and a part is never appended to.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import atomic_write_json, file_replacing, folder_replacing


class WorkError(ValueError):
    pass


def shard_range(rows: int, shard: int, shards: int) -> tuple[int, int]:
    return rows * shard // shards, rows * (shard + 1) // shards


class Work:
    def __init__(self, out: str | os.PathLike, spec: dict, shards: int):
        self.out = Path(out).resolve()
        self.folder = self.out.parent / f".{self.out.name}.work"
        self.spec, self.shards = json.loads(json.dumps(spec)), shards  # as spec.json will hold it

    def part(self, i: int) -> Path:
        return self.folder / f"part-{i:05d}-of-{self.shards:05d}.parquet"

    @property
    def cache(self) -> Path:
        """Shared by the shards (the corpus' embeddings): encoded once, read by the other tasks."""
        return self.folder / "cache"

    def open(self) -> Work:
        """Create the work folder, or check that the one there computes the same thing."""
        meta = {"spec": self.spec, "shards": self.shards}
        path = self.folder / "spec.json"
        if path.is_file():
            have = json.loads(path.read_text())
            if have != meta:
                changed = sorted(k for k in {**have.get("spec", {}), **self.spec}
                                 if have.get("spec", {}).get(k) != self.spec.get(k))
                if have.get("shards") != self.shards:
                    changed.append("shards")
                raise WorkError(f"{self.folder} holds unfinished work of other settings (changed: "
                                f"{', '.join(changed)}); finish it with the same command, or delete that folder to "
                                f"start over")
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, meta)
        return self

    def missing(self) -> list[int]:
        return [i for i in range(self.shards) if not self.part(i).is_file()]

    def write_part(self, i: int, table: pa.Table) -> None:
        with file_replacing(self.part(i)) as tmp:
            pq.write_table(table, tmp)

    def read_parts(self) -> pa.Table:
        missing = self.missing()
        if missing:
            raise WorkError(f"{self.folder}: shard(s) {', '.join(map(str, missing))} of {self.shards} not done yet; "
                            f"run them (--array-task I), then merge")
        return pa.concat_tables([pq.read_table(self.part(i)) for i in range(self.shards)])

    def merge(self, write: Callable[[pa.Table, Path], None]) -> Path:
        """``write(parts, tmp_folder)`` fills a temp folder that then replaces OUT whole."""
        table = self.read_parts()
        with folder_replacing(self.out) as tmp:
            write(table, tmp)
            atomic_write_json(tmp / "colbertzero.json", {"spec": self.spec, "shards": self.shards,
                                                         "rows": table.num_rows})
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.out

    def finished(self) -> bool:
        """OUT is there and was written from this very spec."""
        info = self.out / "colbertzero.json"
        try:
            return info.is_file() and json.loads(info.read_text()).get("spec") == self.spec
        except (OSError, ValueError):
            return False
