"""Reading raw sources: which file columns play which role, how a file is split into shard ranges, and its rows.

Inputs: JSONL; Parquet — one file, a folder of ``*.parquet`` shards or a glob of them (``data/amazon_reviews-*.parquet``
as the Hub publishes a split), read as ONE source, streamed by row group through ``pyarrow.dataset``; or a
``datasets`` ``save_to_disk`` folder (``Source.format``, "auto" by name). List columns stored as strings (``"['a',
'b']"``) are parsed as JSON, else as Python literals (``ast.literal_eval``), never evaluated.
``Source.columns`` maps roles to the file's columns (unmapped roles use the role name); a role that takes several
texts may name several columns with commas (``"pos,neg"``), concatenated in that order. Bad input raises
:class:`DataError` naming the file, the row (and JSONL line) and the column.
"""

from __future__ import annotations

import ast
import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from colbertzero.data import shards
from colbertzero.data.shards import DataError
from colbertzero.files import atomic_write_json

SCAN_CHUNK = 1 << 24  # bytes of a JSONL file scanned at once

_ALIASES = {"unsupervised": {"positive": "document"}, "supervised": {"document": "positive"}}
_LIST_ROLES = {"negatives", "documents", "document_ids", "scores"}
TABLE_ID_DEFAULTS = {"queries": ("query_id", "_id", "id"), "documents": ("document_id", "_id", "id")}


def phase_roles(kind: str, src) -> list[str]:
    if kind == "unsupervised":
        return ["query", "document"]
    if kind == "supervised":
        return ["query", "positive", "negatives"]
    return [
        "query_id" if src.queries_path else "query",
        "document_ids" if src.documents_path else "documents",
        "scores",
    ]


def table_roles(src) -> list[str]:
    out = []
    for t, p in (("queries", src.queries_path), ("documents", src.documents_path)):
        if p:
            out += [f"{t}.id", f"{t}.text"]
    return out


def resolve_columns(kind: str, src, where: str) -> dict[str, list[str]]:
    """Role → file column(s) for the row file (table roles are resolved against the tables' own columns)."""
    roles = phase_roles(kind, src)
    valid = roles + table_roles(src)
    out: dict[str, list[str]] = {}
    for role, col in src.columns.items():
        r = _ALIASES.get(kind, {}).get(role, role)
        if r not in valid:
            raise DataError(
                f"{where}.columns: unknown role {role!r} for a {kind} source; roles: {', '.join(valid)}"
                + (" (query_id/document_ids need queries_path/documents_path)"
                   if role in ("query_id", "document_ids") else "")
            )
        cols = [c.strip() for c in str(col).split(",") if c.strip()]
        if not cols or (len(cols) > 1 and r not in _LIST_ROLES):
            raise DataError(f"{where}.columns.{role}: {col!r}: expected "
                            f"{'column names' if r in _LIST_ROLES else 'one column name'}")
        if r in roles:  # table roles are looked up in the tables, not in the row file
            out[r] = cols
    for r in roles:
        out.setdefault(r, [r])
    return out


@dataclass
class Range:
    row_start: int
    rows: int
    byte_start: int = 0  # JSONL only
    byte_end: int = 0
    line_start: int = 0


@dataclass
class Input:
    path: str
    format: str  # jsonl | parquet | datasets | arrow (our own work tables)
    rows: int
    ranges: list[Range]
    fingerprint: dict
    parts: list[tuple[str, int]] = field(default_factory=list)  # parquet: (file, rows) in order


def is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def parquet_files(path: Path) -> list[Path] | None:
    """The parquet files a source path names — one file, a folder of *.parquet shards, a glob — sorted (the Hub's
    `-00003-of-00159` names sort in order); None when the path is no parquet source."""
    text = str(path)
    if is_glob(text):
        return sorted(Path(f) for f in glob.glob(text))
    if path.is_dir():
        return sorted(path.glob("*.parquet")) or None
    if path.suffix.lower() in (".parquet", ".pq"):
        return [path]
    return None


def format_of(path: Path, fmt: str, where: str) -> str:
    if fmt != "auto":
        return fmt
    if is_glob(str(path)) or (path.is_dir() and parquet_files(path)):
        return "parquet"
    if path.is_dir():
        return "datasets"
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if suffixes.endswith((".parquet", ".pq")):
        return "parquet"
    if suffixes.endswith(".arrow"):
        return "arrow"
    raise DataError(f"{where}: cannot tell the format of {path} from its name; set format: jsonl|parquet|datasets")


def fingerprint(path: Path) -> dict:
    if is_glob(str(path)) or (path.is_dir() and parquet_files(path)):  # parquet shards: each one's size and mtime
        files = parquet_files(path) or []
        return {"path": str(path), "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    if path.is_dir():  # a datasets folder: every file's size and mtime
        files = sorted(p for p in path.rglob("*") if p.is_file())
        st = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return {"path": str(path), "files": st}
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _scan_jsonl(path: Path, rows_per_shard: int, max_rows: int | None) -> tuple[int, list[Range]]:
    """Row count and shard boundaries (byte offset and line number of every ``rows_per_shard``-th row), vectorised.

    A row is a line holding a non-blank byte; blank lines are skipped but still counted for line numbers.
    """
    starts: list[tuple[int, int]] = []  # (byte, line) of each shard's first row
    rows = line = 0
    line_start = 0  # byte offset of the line being read
    seen_text = False  # the open line has had a non-blank byte
    pos = 0
    cap = max_rows if max_rows is not None else math.inf
    end_byte = None
    with open(path, "rb") as f:
        while rows < cap:
            buf = f.read(SCAN_CHUNK)
            if not buf:
                break
            b = np.frombuffer(buf, dtype=np.uint8)
            text = (b != 32) & (b != 9) & (b != 10) & (b != 13)
            cs = np.concatenate([[0], np.cumsum(text, dtype=np.int64)])
            nl = np.flatnonzero(b == 10)
            if nl.size:
                seg = np.concatenate([[0], nl[:-1] + 1])
                has = (cs[nl] - cs[seg]) > 0
                has[0] |= seen_text
                lstart = np.concatenate([[line_start], pos + nl[:-1] + 1])
                idx = np.flatnonzero(has)
                gl = rows + np.arange(idx.size)
                keep = gl < cap
                idx, gl = idx[keep], gl[keep]
                for i in idx[gl % rows_per_shard == 0]:
                    starts.append((int(lstart[i]), line + int(i)))
                rows += idx.size
                if rows >= cap and idx.size:
                    end_byte = pos + int(nl[idx[-1]]) + 1
                    break
                line += nl.size
                line_start = pos + int(nl[-1]) + 1
                seen_text = bool(cs[-1] - cs[nl[-1] + 1] > 0)
            else:
                seen_text = seen_text or bool(cs[-1] > 0)
            pos += len(buf)
    if end_byte is None:
        end_byte = pos
        if seen_text and rows < cap:  # last line without a newline
            if rows % rows_per_shard == 0:
                starts.append((line_start, line))
            rows += 1
    ranges = []
    for k, (byte, ln) in enumerate(starts):
        nxt = starts[k + 1][0] if k + 1 < len(starts) else end_byte
        ranges.append(Range(k * rows_per_shard, min(rows_per_shard, rows - k * rows_per_shard), byte, nxt, ln))
    return rows, ranges


def open_datasets(path: Path, where: str):
    import datasets  # seconds to import; only save_to_disk folders need it

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{where}: {path} is not a `datasets` save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{where}: {path} holds a DatasetDict ({', '.join(ds)}); point path at one split's folder")
    return ds


def _parquet_parts(path: Path, where: str) -> list[tuple[str, int]]:
    """(file, rows) of every parquet file of the source, from the files' footers; a damaged file is named."""
    files = parquet_files(path) or []
    if not files:
        raise DataError(f"{where}: {path} matches no parquet file; download the source (colbertzero fetch) or fix "
                        "the path")
    parts = []
    for frag, f in zip(pads.dataset([str(f) for f in files], format="parquet").get_fragments(), files):
        try:
            parts.append((str(f), frag.metadata.num_rows))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{where}: {f} is not a readable parquet file ({e}); download it again") from None
    return parts


def schema_names(path: Path, fmt: str, where: str) -> list[str] | None:
    if fmt == "parquet":
        files = parquet_files(path) or [path]
        try:
            return pq.read_schema(files[0]).names
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{where}: {files[0]} is not a readable parquet file ({e}); download it again") from None
    if fmt == "datasets":
        return list(open_datasets(path, where).column_names)
    if fmt == "arrow":
        return shards.open_table(path).schema.names
    return None


def scan_input(path: str, fmt: str, rows_per_shard: int, max_rows: int | None, where: str, cache: Path | None) -> Input:
    p = Path(path)
    if not (p.exists() or (is_glob(path) and glob.glob(path))):
        raise DataError(f"{where}: input {p} does not exist" + (" (the pattern matches no file)" if is_glob(path)
                                                               else ""))
    fmt = format_of(p, fmt, where)
    fp = fingerprint(p)
    key = {"fingerprint": fp, "rows_per_shard": rows_per_shard, "max_rows": max_rows, "format": fmt}
    if cache is not None and cache.is_file():
        try:
            c = json.loads(cache.read_text())
            if c.get("key") == key:
                return Input(str(p), fmt, c["rows"], [Range(**r) for r in c["ranges"]], fp,
                             [tuple(x) for x in c.get("parts", [])])
        except (OSError, ValueError, TypeError, KeyError):
            pass
    parts: list[tuple[str, int]] = []
    if fmt == "jsonl":
        rows, ranges = _scan_jsonl(p, rows_per_shard, max_rows)
    else:
        if fmt == "parquet":
            parts = _parquet_parts(p, where)
            n = sum(r for _, r in parts)
        elif fmt == "datasets":
            n = len(open_datasets(p, where))
        else:
            n = shards.open_table(p).num_rows
        rows = min(n, max_rows) if max_rows else n
        ranges = [Range(s, min(rows_per_shard, rows - s)) for s in range(0, rows, rows_per_shard)]
    if rows == 0:
        raise DataError(f"{where}: {p} has no rows")
    if cache is not None:
        atomic_write_json(cache, {"key": key, "rows": rows, "ranges": [r.__dict__ for r in ranges], "parts": parts})
    return Input(str(p), fmt, rows, ranges, fp, parts)


def first_row(inp: Input) -> tuple[dict, str]:
    """The first row, without reading the whole first shard."""
    if inp.format != "jsonl":
        return next(iter_rows(inp, Range(0, 1), schema_names(Path(inp.path), inp.format, inp.path) or []))
    r = inp.ranges[0]  # starts at the first non-blank line
    with open(inp.path, "rb") as f:
        f.seek(r.byte_start)
        raw = f.readline()
    return next(iter_rows(inp, Range(0, 1, r.byte_start, r.byte_start + len(raw), r.line_start), []))


def row_where(path: str, row: int, line: int | None) -> str:
    return f"{path}: row {row}" + (f" (line {line + 1})" if line is not None else "")


def iter_rows(inp: Input, rng: Range, columns: list[str]) -> Iterator[tuple[dict, str]]:
    """(row, where) for the rows of one range; JSONL rows are decoded strictly (UTF-8, JSON object)."""
    if inp.format == "jsonl":
        with open(inp.path, "rb") as f:
            f.seek(rng.byte_start)
            data = f.read(rng.byte_end - rng.byte_start)
        row = rng.row_start
        n = 0
        for i, raw in enumerate(data.split(b"\n")):
            if n == rng.rows:
                break
            if not raw.strip():
                continue
            where = row_where(inp.path, row, rng.line_start + i)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line "
                                f"({raw[max(0, e.start - 10):e.start + 10]!r})") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield obj, where
            row += 1
            n += 1
        if n != rng.rows:
            raise DataError(f"{inp.path}: expected {rng.rows} rows from row {rng.row_start}, found {n}: the file "
                            f"changed while preparing; run prepare again")
        return
    if inp.format == "parquet":
        table = _read_parquet_range(inp, rng, columns)
    elif inp.format == "datasets":
        ds = open_datasets(Path(inp.path), inp.path)
        table = ds.select_columns(columns).with_format("arrow")[rng.row_start:rng.row_start + rng.rows]
    else:
        table = shards.open_table(Path(inp.path)).select(columns).slice(rng.row_start, rng.rows)
    cols = {}
    for c in columns:
        arr = table.column(c)
        try:
            cols[c] = arr.to_pylist()
        except UnicodeDecodeError:  # string data that is not UTF-8: find the row
            for k, v in enumerate(arr.cast(pa.large_binary()).to_pylist()):
                try:
                    v is None or v.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{row_where(inp.path, rng.row_start + k, None)}: column {c!r}: invalid UTF-8 at "
                                    f"byte {e.start}") from None
            raise
    for k in range(table.num_rows):
        yield {c: cols[c][k] for c in columns}, row_where(inp.path, rng.row_start + k, None)


def _read_parquet_range(inp: Input, rng: Range, columns: list[str]) -> pa.Table:
    """Rows [row_start, row_start + rows) of the source's parquet files, reading only the row groups that hold them."""
    parts = inp.parts or [(inp.path, inp.rows)]
    pieces, first = [], 0
    end = rng.row_start + rng.rows
    for path, n in parts:
        lo, hi = max(rng.row_start, first), min(end, first + n)
        if lo < hi:
            try:
                pf = pq.ParquetFile(path)
                md = pf.metadata
                bounds = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
                local = (lo - first, hi - first)
                groups = [g for g in range(md.num_row_groups) if bounds[g] < local[1] and bounds[g + 1] > local[0]]
                t = pf.read_row_groups(groups, columns=columns)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{path}: cannot read rows {lo}..{hi - 1} of this parquet file ({e}); download it "
                                "again") from None
            except (KeyError, ValueError) as e:  # a column the file lacks
                raise DataError(f"{path}: {e}; every file of a source needs the same columns") from None
            pieces.append(t.slice(local[0] - int(bounds[groups[0]]), hi - lo))
        first += n
        if first >= end:
            break
    return pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]


def row_value(row: dict, col: str, role: str, where: str):
    if col not in row:
        raise DataError(
            f"{where}: no column {col!r} for role {role!r}; the row has {sorted(row)}; "
            f"map the role in the source's `columns` (e.g. columns: {{{role}: <column>}})"
        )
    return row[col]


def as_text(v, col: str, role: str, where: str, first_of_list: bool = False) -> str:
    if first_of_list and isinstance(v, (list, tuple)):
        if not v:
            raise DataError(f"{where}: column {col!r} ({role}) is an empty list")
        v = v[0]
    if not isinstance(v, str):
        got = "null" if v is None else type(v).__name__
        raise DataError(f"{where}: column {col!r} ({role}) holds {got}, expected text")
    if not v.strip():
        raise DataError(f"{where}: column {col!r} ({role}) is empty text")
    return v


def parse_list_text(v: str):
    """A list stored as text (some published parquet files hold `"['a', 'b']"` or `"[1.0, 2.5]"`): JSON first, then
    a Python literal; never evaluated. None when the text is no list."""
    text = v.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return list(value) if isinstance(value, (list, tuple)) else None


def as_list(row: dict, cols: list[str], role: str, where: str) -> list:
    out: list = []
    for c in cols:
        v = row_value(row, c, role, where)
        if isinstance(v, str) and (parsed := parse_list_text(v)) is not None:
            v = parsed
        if isinstance(v, (list, tuple)):
            out.extend(v)
        elif v is None:
            raise DataError(f"{where}: column {c!r} ({role}) is null, expected a list")
        else:
            out.append(v)
    return out


def row_texts(row: dict, cols: list[str], role: str, where: str) -> list[str]:
    return [as_text(v, "+".join(cols), f"{role}[{i}]", where) for i, v in enumerate(as_list(row, cols, role, where))]


def row_ids(row: dict, cols: list[str], role: str, where: str) -> list[str]:
    out = []
    for i, v in enumerate(as_list(row, cols, role, where)):
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise DataError(f"{where}: column {'+'.join(cols)!r} ({role}[{i}]) holds {type(v).__name__}, expected an "
                            f"id (text or integer)")
        out.append(str(v))
    return out


def row_scores(row: dict, cols: list[str], where: str) -> list[float]:
    out = []
    for i, v in enumerate(as_list(row, cols, "scores", where)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{where}: column {'+'.join(cols)!r} (scores[{i}]) holds {type(v).__name__}, expected a "
                            f"number")
        if not math.isfinite(v) or not math.isfinite(np.float32(v)):
            raise DataError(f"{where}: column {'+'.join(cols)!r} (scores[{i}]) is {v!r}; teacher scores must be finite")
        out.append(float(v))
    return out


def kd_row(row: dict, where: str, cols: dict[str, list[str]], dpq: int) -> tuple[str, list[str], list[float]]:
    """(query key, document keys, scores) of a distillation row: ids in id mode, texts inline."""
    if "query_id" in cols:
        q = row_ids(row, cols["query_id"], "query_id", where)
        if len(q) != 1:
            raise DataError(f"{where}: column {cols['query_id'][0]!r} (query_id) must hold one id, got {len(q)}")
        q = q[0]
    else:
        q = as_text(row_value(row, cols["query"][0], "query", where), cols["query"][0], "query", where)
    if "document_ids" in cols:
        docs = row_ids(row, cols["document_ids"], "document_ids", where)
    else:
        docs = row_texts(row, cols["documents"], "documents", where)
    scores = row_scores(row, cols["scores"], where)
    dname = "document_ids" if "document_ids" in cols else "documents"
    if len(docs) != len(scores):
        raise DataError(f"{where}: {len(docs)} {dname} but {len(scores)} scores; they must pair up one to one")
    if len(docs) < dpq:
        raise DataError(f"{where}: {len(docs)} scored documents, docs_per_query is {dpq}; lower docs_per_query or "
                        f"drop the row")
    return q, docs[:dpq], scores[:dpq]
