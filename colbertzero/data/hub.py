"""`colbertzero fetch`: exactly the files each source needs from the Hugging Face Hub, where `prepare` will read them.

A source names its Hub coordinates per path field (`hub: {path: {repo, config, split, revision, files}}`); the
files are a glob inside the dataset repository (default: `data/<split>-*` for the `default` config, as the Hub lays
out a parquet dataset, else `<config>/<split>-*`), and the source's own path ends with that glob, so the folder it
names is where the files land: fetch and prepare agree on where files live without a second setting.

Listing asks the Hub (huggingface_hub's dry run: names and sizes); without a network it reads the local Hugging Face
cache (`scan_cache_dir`), and with neither it says so in one line. Downloading is huggingface_hub's
`snapshot_download` (resumable, parallel, a progress bar, sizes checked); `fetch.json` beside the files records the
revision (commit) and every file.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import scan_cache_dir, snapshot_download
from huggingface_hub.errors import HFValidationError

from ..files import atomic_write_json, now_iso
from .shards import DataError

PATH_FIELDS = ("path", "queries_path", "documents_path")


@dataclass
class Wanted:
    """One repository's files for one source path."""

    where: str  # phases.P.data.sources[i].path
    repo: str
    revision: str | None
    pattern: str
    local_dir: Path
    cache_snapshot: Path | None = None  # set when the files were found in the local Hugging Face cache


def pattern_of(hub) -> str:
    if hub.files:
        return hub.files
    if hub.split is None:
        raise DataError("a hub entry needs `split` (or `files`, a glob inside the repository)")
    return f"data/{hub.split}-*" if hub.config == "default" else f"{hub.config}/{hub.split}-*"


def wanted(recipe, phases: list[str] | None = None) -> list[Wanted]:
    out = []
    for name in phases or list(recipe.phases):
        for i, src in enumerate(recipe.phase(name).data.sources):
            for field, hub in (src.hub or {}).items():
                where = f"phases.{name}.data.sources[{i}].{field}"
                path = getattr(src, field)
                pattern = pattern_of(hub)
                root = _local_root(path, pattern, where)
                out.append(Wanted(where, hub.repo, hub.revision, pattern, root))
    return out


def _local_root(path: str | None, pattern: str, where: str) -> Path:
    """The folder the repository's files land in: the source path minus the pattern it ends with."""
    if not path:
        raise DataError(f"{where}: a hub entry for a path the source does not set")
    parts, want = Path(path).parts, Path(pattern).parts
    if len(parts) <= len(want) or not all(fnmatch.fnmatchcase(p, w) or p == w for p, w in
                                          zip(parts[-len(want):], want)):
        raise DataError(f"{where}: {path} must end with the hub files {pattern!r} (the repository's files keep their "
                        "own paths under one folder): e.g. <data root>/<repo>/" + pattern)
    return Path(*parts[: -len(want)])


def list_files(w: Wanted) -> tuple[list[tuple[str, int]], str | None, str]:
    """([(path in repo, bytes)], revision, "hub" | "cache") of one wanted set; with the cache, also where it is
    (``w.cache_snapshot``)."""
    try:
        infos = snapshot_download(w.repo, repo_type="dataset", revision=w.revision, allow_patterns=[w.pattern],
                                  dry_run=True)
        files = sorted((i.filename, int(i.file_size)) for i in infos)
        revision = next((getattr(i, "commit_hash", None) for i in infos if getattr(i, "commit_hash", None)), None)
        return files, revision or w.revision, "hub"
    except HFValidationError as e:
        raise DataError(f"{w.where}: {w.repo!r} is not a Hub dataset id ({e})") from None
    except Exception as online:  # no network, no such repo, offline mode: the local cache may still hold it
        cached = _from_cache(w)
        if cached is not None:
            return cached
        raise DataError(f"{w.where}: {w.repo} cannot be listed: the Hub does not answer here "
                        f"({type(online).__name__}) and the Hugging Face cache holds no copy; run `colbertzero fetch` "
                        "on a node with internet access (a login or transfer node)") from None


def _from_cache(w: Wanted) -> tuple[list[tuple[str, int]], str, str] | None:
    try:
        info = scan_cache_dir()
    except Exception:  # no cache folder at all
        return None
    for repo in info.repos:
        if repo.repo_id != w.repo or repo.repo_type != "dataset":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        for rev in revisions:
            if w.revision not in (None, rev.commit_hash) and w.revision not in rev.refs:
                continue
            files = sorted((str(f.file_path.relative_to(rev.snapshot_path)), int(f.size_on_disk)) for f in rev.files)
            files = [(p, n) for p, n in files if fnmatch.fnmatchcase(p, w.pattern)]
            if files:
                w.cache_snapshot = Path(rev.snapshot_path)
                return files, rev.commit_hash, "cache"
    return None


def fetch(recipe, phases: list[str] | None = None, *, dry_run: bool = False, workers: int = 8) -> dict:
    """List (and unless ``dry_run`` download) every source's Hub files; returns {where: listing}."""
    plan = wanted(recipe, phases)
    if not plan:
        raise DataError("no source of these phases names Hub coordinates (`hub:`); nothing to fetch")
    report = {}
    for w in plan:
        files, revision, origin = list_files(w)
        if not files:
            raise DataError(f"{w.where}: {w.repo} has no file matching {w.pattern!r} at revision {revision}; check "
                            "the split or config name")
        entry = {"repo": w.repo, "revision": revision, "pattern": w.pattern, "local_dir": str(w.local_dir),
                 "files": [{"path": p, "bytes": n} for p, n in files], "bytes": sum(n for _, n in files),
                 "listed_from": origin}
        report[w.where] = entry
        if dry_run:
            continue
        if origin == "cache":  # offline, from the local cache: link its files in place rather than copy them
            for p, _ in files:
                target = w.local_dir / p
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.symlink_to((w.cache_snapshot / p).resolve())
        else:
            snapshot_download(w.repo, repo_type="dataset", revision=revision, allow_patterns=[w.pattern],
                              local_dir=str(w.local_dir), max_workers=workers)
        missing = [p for p, n in files if not (w.local_dir / p).is_file() or (w.local_dir / p).stat().st_size != n]
        if missing:
            raise DataError(f"{w.where}: after the download {len(missing)} file(s) are missing or of the wrong size, "
                            f"e.g. {w.local_dir / missing[0]}; run `colbertzero fetch` again (it resumes)")
        record = w.local_dir / "fetch.json"
        atomic_write_json(record, {"time": now_iso(), **entry})
    return report


def fetched_revisions(recipe, phase_name: str) -> dict[str, str]:
    """{source path field: "repo@commit"} of the phase's sources that `fetch` placed (their fetch.json), for lineage."""
    out = {}
    for i, src in enumerate(recipe.phase(phase_name).data.sources):
        for field, hub in (src.hub or {}).items():
            try:
                root = _local_root(getattr(src, field), pattern_of(hub), f"{src.name}.{field}")
                record = json.loads((root / "fetch.json").read_text())
            except (DataError, OSError, ValueError):
                continue
            out[f"{src.name}.{field}"] = f"{record['repo']}@{record['revision']}"
    return out


def fetch_lines(report: dict, dry_run: bool) -> list[str]:
    """What `colbertzero fetch` prints: each source's listing, and the total."""
    lines, total = [], 0
    for where, e in report.items():
        total += e["bytes"]
        lines.append(f"{where}: {e['repo']}@{(e['revision'] or 'main')[:12]} {e['pattern']}: {len(e['files'])} "
                     f"file(s), {e['bytes'] / 2**30:.2f} GiB (listed from the {e['listed_from']}) -> {e['local_dir']}")
        lines += [f"    {f['path']}  {f['bytes']:,} B" for f in e["files"]] if dry_run else []
    return lines + [f"{'would fetch' if dry_run else 'fetched'} {total / 2**30:.2f} GiB in all"]
