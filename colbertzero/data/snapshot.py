"""A dataset folder as the Hub serves it (a snapshot, or what `mine` / `score` write): its files per config and split
come from the dataset's own config map (README.md front matter, else the `datasets` library's inference), read by
`datasets` itself, offline. The chosen split's files are linked into a folder of parquet shards under the source's
work folder, so the rest of prepare reads them as any folder of shards (in the config map's order)."""

from __future__ import annotations

import os
from pathlib import Path

from ..files import folder_replacing
from .shards import DataError


def is_snapshot(path: Path) -> bool:
    """A folder with a config map or with its data in subfolders — not one of parquet files at its top, not a
    `save_to_disk` folder."""
    if not path.is_dir() or any(path.glob("*.parquet")):
        return False
    if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return False
    return (path / "README.md").is_file() or any(path.glob("*/*.parquet"))


def split_files(path: Path, config: str | None, split: str | None, where: str) -> list[Path]:
    import datasets  # seconds to import; only snapshot folders need it

    try:
        builder = datasets.load_dataset_builder(str(path), name=config if config != "default" else None)
    except ValueError as e:  # datasets names the configs there are
        raise DataError(f"{where}: {path}: config {config!r}: {e}; set hub.<path field>.config") from None
    except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
        raise DataError(f"{where}: {path} holds no data files datasets can read ({e})") from None
    files = builder.config.data_files or {}
    if split is None:
        if len(files) != 1:
            raise DataError(f"{where}: {path} (config {builder.config.name!r}) has splits {sorted(files)}; name one "
                            f"as hub.<path field>.split")
        split = next(iter(files))
    if split not in files:
        raise DataError(f"{where}: {path} (config {builder.config.name!r}) has no split {split!r}; its splits are "
                        f"{sorted(files)}: fix hub.<path field>.split, or fetch that split (colbertzero fetch)")
    out = [Path(f) for f in files[split]]
    if not out or any(f.suffix != ".parquet" for f in out):
        raise DataError(f"{where}: split {split!r} of {path} is not parquet files ({[f.name for f in out][:3]}); "
                        "point path at the files themselves")
    return out


def resolve(path: str, hub, work: Path, where: str) -> str:
    """``path`` itself, or for a snapshot folder a folder of links to the files of its config/split (``hub``: the
    source's HubFiles for that path field, or None)."""
    p = Path(path)
    if not is_snapshot(p):
        return path
    config, split = (hub.config, hub.split) if hub is not None else (None, None)
    files = split_files(p, config, split, where)
    dest = work / f"snapshot-{config or 'default'}-{split or 'only'}"
    want = [(f"{i:05d}-{f.name}", str(f.resolve())) for i, f in enumerate(files)]
    if dest.is_dir() and sorted((x.name, os.readlink(x)) for x in dest.iterdir()) == want:
        return str(dest)
    with folder_replacing(dest) as tmp:
        for name, target in want:
            (tmp / name).symlink_to(target)
    return str(dest)
