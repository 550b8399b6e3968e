"""``colbertzero prepare``: raw sources → pre-tokenized Arrow shards + an index per source (see ``shards.py``).

Public API::

    prepare_recipe(recipe, phases=None, workers=1, verify=False, shard_range=None, progress=True) -> dict
    index_recipe(recipe, phases=None, progress=True) -> dict

``prepare_recipe`` plans every source of the chosen phases (all by default), tokenizes the shards that are not
finished yet (``workers`` processes; finished shards are skipped, ``verify=True`` re-hashes them first and redoes
the damaged ones) and writes each source's ``index.json``. With ``shard_range=(i, n)`` — Slurm array task ``i`` of
``n`` — it only does its share of the shards (every task computes the same plan and takes shards ``i, i+n, …``) and
writes no index; run ``index_recipe`` once after all tasks (it refuses while a shard is missing). Both return a
summary ``{phase: {source: {...}}}``.

Inputs: JSONL, Parquet, or a ``datasets`` ``save_to_disk`` folder (``Source.format``, "auto" by extension).
``Source.columns`` maps roles to the file's columns (unmapped roles use the role name); a role that takes several
texts may name several columns with commas (``"pos,neg"``), concatenated in that order.

=============  =====================================================================================================
kind           roles
=============  =====================================================================================================
unsupervised   ``query``; ``document`` (alias ``positive``; a list takes its first element)
supervised     ``query``; ``positive`` (alias ``document``; a list takes its first element); ``negatives`` (list(s))
distillation   ``query`` (text) or, with ``queries_path``, ``query_id``; ``documents`` (list(s) of texts) or, with
               ``documents_path``, ``document_ids``; ``scores`` (list(s) of numbers, same order and length).
               Id tables: ``queries.id`` / ``documents.id`` (default the first of ``query_id``/``document_id``,
               ``_id``, ``id`` present) and ``queries.text`` / ``documents.text`` (default ``text``).
=============  =====================================================================================================

Supervised rows keep ``min(max_negatives, most negatives in any row)`` negatives; a row with fewer is refused unless
``pad_negatives`` (then its own negatives repeat, cyclically, at load time). Distillation rows keep their first
``docs_per_query`` documents (teacher order) and are refused with fewer. Inline distillation texts are deduplicated
(exact text, hashed by Arrow) into the documents/queries tables, which is how a document is tokenized once and
referenced by position, never copied per row; inline mode holds the source's texts in the planning process, so give
large corpora as id tables.

Bad input raises :class:`DataError` naming the file, the row (and JSONL line) and the column; the source then has
no ``index.json`` (nothing is marked prepared) while the shards already finished stay for the next run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from colbertzero.data import shards as S
from colbertzero.data.shards import DataError
from colbertzero.data.tokenize import PhaseTokenizer, load_phase_tokenizer, settings_for_phase

log = logging.getLogger(__name__)

TEXT_BATCH = 1024  # rows tokenized per call: large enough for the fast tokenizer, small enough for flat memory
SCAN_CHUNK = 1 << 24

# ---------------------------------------------------------------- roles
_ALIASES = {"unsupervised": {"positive": "document"}, "supervised": {"document": "positive"}}
_LIST_ROLES = {"negatives", "documents", "document_ids", "scores"}
_TABLE_ID_DEFAULTS = {"queries": ("query_id", "_id", "id"), "documents": ("document_id", "_id", "id")}


def _roles(kind: str, src) -> list[str]:
    if kind == "unsupervised":
        return ["query", "document"]
    if kind == "supervised":
        return ["query", "positive", "negatives"]
    return [
        "query_id" if src.queries_path else "query",
        "document_ids" if src.documents_path else "documents",
        "scores",
    ]


def _table_roles(src) -> list[str]:
    out = []
    for t, p in (("queries", src.queries_path), ("documents", src.documents_path)):
        if p:
            out += [f"{t}.id", f"{t}.text"]
    return out


def resolve_columns(kind: str, src, where: str) -> dict[str, list[str]]:
    """Role → file column(s) for the row file (table roles are resolved against the tables' own columns)."""
    roles = _roles(kind, src)
    valid = roles + _table_roles(src)
    out: dict[str, list[str]] = {}
    for role, col in src.columns.items():
        r = _ALIASES.get(kind, {}).get(role, role)
        if r not in valid:
            raise DataError(
                f"{where}.columns: unknown role {role!r} for a {kind} source; roles: {', '.join(valid)}"
                + (" (query_id/document_ids need queries_path/documents_path)" if role in ("query_id", "document_ids") else "")
            )
        cols = [c.strip() for c in str(col).split(",") if c.strip()]
        if not cols or (len(cols) > 1 and r not in _LIST_ROLES):
            raise DataError(f"{where}.columns.{role}: {col!r}: expected {'column names' if r in _LIST_ROLES else 'one column name'}")
        if r in roles:  # table roles are looked up in the tables, not in the row file
            out[r] = cols
    for r in roles:
        out.setdefault(r, [r])
    return out


# ---------------------------------------------------------------- inputs
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


def _format_of(path: Path, fmt: str, where: str) -> str:
    if fmt != "auto":
        return fmt
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


def _fingerprint(path: Path) -> dict:
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


def _open_datasets(path: Path, where: str):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{where}: {path} is not a `datasets` save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{where}: {path} holds a DatasetDict ({', '.join(ds)}); point path at one split's folder")
    return ds


def _schema_names(path: Path, fmt: str, where: str) -> list[str] | None:
    if fmt == "parquet":
        return pq.ParquetFile(path).schema_arrow.names
    if fmt == "datasets":
        return list(_open_datasets(path, where).column_names)
    if fmt == "arrow":
        return S.open_table(path).schema.names
    return None


def scan_input(path: str, fmt: str, rows_per_shard: int, max_rows: int | None, where: str, cache: Path | None) -> Input:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{where}: input {p} does not exist")
    fmt = _format_of(p, fmt, where)
    fp = _fingerprint(p)
    key = {"fingerprint": fp, "rows_per_shard": rows_per_shard, "max_rows": max_rows, "format": fmt}
    if cache is not None and cache.is_file():
        try:
            c = json.loads(cache.read_text())
            if c.get("key") == key:
                return Input(str(p), fmt, c["rows"], [Range(**r) for r in c["ranges"]], fp)
        except (OSError, ValueError, TypeError, KeyError):
            pass
    if fmt == "jsonl":
        rows, ranges = _scan_jsonl(p, rows_per_shard, max_rows)
    else:
        if fmt == "parquet":
            n = pq.ParquetFile(p).metadata.num_rows
        elif fmt == "datasets":
            n = len(_open_datasets(p, where))
        else:
            n = S.open_table(p).num_rows
        rows = min(n, max_rows) if max_rows else n
        ranges = [Range(s, min(rows_per_shard, rows - s)) for s in range(0, rows, rows_per_shard)]
    if rows == 0:
        raise DataError(f"{where}: {p} has no rows")
    if cache is not None:
        S.atomic_write_json(cache, {"key": key, "rows": rows, "ranges": [r.__dict__ for r in ranges]})
    return Input(str(p), fmt, rows, ranges, fp)


def first_row(inp: Input) -> tuple[dict, str]:
    """The first row, without reading the whole first shard."""
    if inp.format != "jsonl":
        return next(iter_rows(inp, Range(0, 1), _schema_names(Path(inp.path), inp.format, inp.path) or []))
    r = inp.ranges[0]  # starts at the first non-blank line
    with open(inp.path, "rb") as f:
        f.seek(r.byte_start)
        raw = f.readline()
    return next(iter_rows(inp, Range(0, 1, r.byte_start, r.byte_start + len(raw), r.line_start), []))


def _where(path: str, row: int, line: int | None) -> str:
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
            where = _where(inp.path, row, rng.line_start + i)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line ({raw[max(0, e.start - 10):e.start + 10]!r})") from None
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
            raise DataError(f"{inp.path}: expected {rng.rows} rows from row {rng.row_start}, found {n}: the file changed while preparing; run prepare again")
        return
    if inp.format == "parquet":
        pf = pq.ParquetFile(inp.path)
        md = pf.metadata
        bounds = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        groups = [g for g in range(md.num_row_groups) if bounds[g] < rng.row_start + rng.rows and bounds[g + 1] > rng.row_start]
        table = pf.read_row_groups(groups, columns=columns)
        table = table.slice(rng.row_start - int(bounds[groups[0]]), rng.rows)
    elif inp.format == "datasets":
        ds = _open_datasets(Path(inp.path), inp.path)
        table = ds.select_columns(columns).with_format("arrow")[rng.row_start:rng.row_start + rng.rows]
    else:
        table = S.open_table(Path(inp.path)).select(columns).slice(rng.row_start, rng.rows)
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
                    raise DataError(f"{_where(inp.path, rng.row_start + k, None)}: column {c!r}: invalid UTF-8 at byte {e.start}") from None
            raise
    for k in range(table.num_rows):
        yield {c: cols[c][k] for c in columns}, _where(inp.path, rng.row_start + k, None)


# ---------------------------------------------------------------- row values
def _get(row: dict, col: str, role: str, where: str):
    if col not in row:
        raise DataError(
            f"{where}: no column {col!r} for role {role!r}; the row has {sorted(row)}; "
            f"map the role in the source's `columns` (e.g. columns: {{{role}: <column>}})"
        )
    return row[col]


def _text(v, col: str, role: str, where: str, first_of_list: bool = False) -> str:
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


def _list(row: dict, cols: list[str], role: str, where: str) -> list:
    out: list = []
    for c in cols:
        v = _get(row, c, role, where)
        if isinstance(v, (list, tuple)):
            out.extend(v)
        elif v is None:
            raise DataError(f"{where}: column {c!r} ({role}) is null, expected a list")
        else:
            out.append(v)
    return out


def _texts(row: dict, cols: list[str], role: str, where: str) -> list[str]:
    return [_text(v, "+".join(cols), f"{role}[{i}]", where) for i, v in enumerate(_list(row, cols, role, where))]


def _ids(row: dict, cols: list[str], role: str, where: str) -> list[str]:
    out = []
    for i, v in enumerate(_list(row, cols, role, where)):
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise DataError(f"{where}: column {'+'.join(cols)!r} ({role}[{i}]) holds {type(v).__name__}, expected an id (text or integer)")
        out.append(str(v))
    return out


def _scores(row: dict, cols: list[str], where: str) -> list[float]:
    out = []
    for i, v in enumerate(_list(row, cols, "scores", where)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{where}: column {'+'.join(cols)!r} (scores[{i}]) holds {type(v).__name__}, expected a number")
        if not math.isfinite(v) or not math.isfinite(np.float32(v)):
            raise DataError(f"{where}: column {'+'.join(cols)!r} (scores[{i}]) is {v!r}; teacher scores must be finite")
        out.append(float(v))
    return out


def _kd_row(row: dict, where: str, cols: dict[str, list[str]], dpq: int) -> tuple[str, list[str], list[float]]:
    """(query key, document keys, scores) of a distillation row: ids in id mode, texts inline."""
    if "query_id" in cols:
        q = _ids(row, cols["query_id"], "query_id", where)
        if len(q) != 1:
            raise DataError(f"{where}: column {cols['query_id'][0]!r} (query_id) must hold one id, got {len(q)}")
        q = q[0]
    else:
        q = _text(_get(row, cols["query"][0], "query", where), cols["query"][0], "query", where)
    docs = _ids(row, cols["document_ids"], "document_ids", where) if "document_ids" in cols else _texts(row, cols["documents"], "documents", where)
    scores = _scores(row, cols["scores"], where)
    dname = "document_ids" if "document_ids" in cols else "documents"
    if len(docs) != len(scores):
        raise DataError(f"{where}: {len(docs)} {dname} but {len(scores)} scores; they must pair up one to one")
    if len(docs) < dpq:
        raise DataError(f"{where}: {len(docs)} scored documents, docs_per_query is {dpq}; lower docs_per_query or drop the row")
    return q, docs[:dpq], scores[:dpq]


# ---------------------------------------------------------------- plan
@dataclass
class TablePlan:
    name: str  # "queries" | "documents"
    input: Input
    text_col: str
    keys_file: str  # Arrow file with the keys (ids, or texts when inline) in table order


@dataclass
class SourcePlan:
    phase: str
    name: str
    kind: str
    where: str
    folder: Path
    input: Input
    columns: dict[str, list[str]]
    tok_key: str
    tokenizer: dict
    settings: dict
    key: str
    max_negatives: int
    pad_negatives: bool
    docs_per_query: int
    dtype: str
    tables: dict[str, TablePlan] = field(default_factory=dict)

    def jobs(self) -> list["Job"]:
        out = [Job(self, "rows", k, r, self.folder / S.shard_name(k)) for k, r in enumerate(self.input.ranges)]
        for t in self.tables.values():
            out += [Job(self, t.name, k, r, self.folder / t.name / S.shard_name(k)) for k, r in enumerate(t.input.ranges)]
        return out


@dataclass
class Job:
    plan: SourcePlan
    target: str  # "rows" or a table name
    shard: int
    range: Range
    out: Path


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _table_id_column(names: list[str], table: str, src, where: str) -> str:
    mapped = src.columns.get(f"{table}.id")
    cands = (mapped,) if mapped else _TABLE_ID_DEFAULTS[table]
    for c in cands:
        if c in names:
            return c
    raise DataError(
        f"{where}: {table} table has no id column {' / '.join(cands)}; its columns are {names}; "
        f"set columns.{table}.id"
    )


def _read_column(inp: Input, col: str, role: str) -> list:
    return [_get(r, col, role, w) for rng in inp.ranges for r, w in iter_rows(inp, rng, [col])]


def _write_keys(path: Path, key: str, values: list[str], what: str, source_file: str) -> None:
    if S.finished_meta(path, key) is not None:
        return
    arr = pa.array(values, type=pa.large_string())
    if pc.count_distinct(arr).as_py() != len(arr):
        vc = pc.value_counts(arr)
        dup = [v["values"] for v in vc.to_pylist() if v["counts"] > 1][:3]
        raise DataError(f"{source_file}: {what} ids are not unique, e.g. {dup}; each id must name one row")
    S.write_shard(path, pa.table({"key": arr}), {"key": key})


def _plan_tables(plan: SourcePlan, src, rows_per_shard: int) -> None:
    """Distillation: make the id → table-row lookups, and the deduplicated text tables of inline rows."""
    work = plan.folder / S.WORK
    cols = plan.columns
    inline = [t for t, p in (("queries", src.queries_path), ("documents", src.documents_path)) if not p]
    if inline:
        texts: dict[str, dict[str, None]] = {t: {} for t in inline}
        need = [f"{t}.text.arrow" for t in inline]
        if not all(S.finished_meta(work / n, plan.key) for n in need):
            row_cols = sorted({c for cs in cols.values() for c in cs})
            for rng in plan.input.ranges:
                for row, where in iter_rows(plan.input, rng, row_cols if plan.input.format != "jsonl" else []):
                    q, docs, _ = _kd_row(row, where, cols, plan.docs_per_query)
                    if "queries" in texts:
                        texts["queries"].setdefault(q)
                    if "documents" in texts:
                        texts["documents"].update(dict.fromkeys(docs))
            for t in inline:
                S.write_shard(work / f"{t}.text.arrow", pa.table({"text": pa.array(list(texts[t]), pa.large_string())}), {"key": plan.key})
        for t in inline:
            inp = scan_input(str(work / f"{t}.text.arrow"), "arrow", rows_per_shard, None, plan.where, None)
            plan.tables[t] = TablePlan(t, inp, "text", str(work / f"{t}.text.arrow"))
    for t, p in (("queries", src.queries_path), ("documents", src.documents_path)):
        if not p:
            continue
        tw = f"{plan.where} {t}_path"
        inp = scan_input(p, "auto", rows_per_shard, None, tw, work / f"{t}.scan.json")
        names = _schema_names(Path(inp.path), inp.format, tw)
        if names is None:  # JSONL: the first row's keys
            names = list(first_row(inp)[0])
        id_col = _table_id_column(names, t, src, tw)
        text_col = src.columns.get(f"{t}.text", "text")
        if text_col not in names:
            raise DataError(f"{tw}: {inp.path} has no text column {text_col!r}; its columns are {names}; set columns.{t}.text")
        keys_file = work / f"{t}.ids.arrow"
        if S.finished_meta(keys_file, plan.key) is None:
            ids = _read_column(inp, id_col, f"{t}.id")
            for i, v in enumerate(ids):
                if isinstance(v, bool) or not isinstance(v, (str, int)):
                    raise DataError(f"{_where(inp.path, i, None)}: id column {id_col!r} holds {type(v).__name__}, expected text or integer")
            _write_keys(keys_file, plan.key, [str(v) for v in ids], t, inp.path)
        plan.tables[t] = TablePlan(t, inp, text_col, str(keys_file))


def plan_source(recipe, phase_name: str, i: int, tok: PhaseTokenizer, tok_key: str) -> SourcePlan:
    phase = recipe.phase(phase_name)
    data = phase.data
    src = data.sources[i]
    where = f"phases.{phase_name}.data.sources[{i}] ({src.name})"
    folder = Path(data.shards_dir) / src.name
    cols = resolve_columns(phase.kind, src, where)
    inp = scan_input(src.path, src.format, data.rows_per_shard, src.max_rows, where, folder / S.WORK / "rows.scan.json")
    names = _schema_names(Path(inp.path), inp.format, where)
    if names is not None:  # JSONL is checked row by row by the workers (keys may differ per line)
        for role, cs in cols.items():
            for c in cs:
                if c not in names:
                    raise DataError(
                        f"{where}: {inp.path} has no column {c!r} for role {role!r}; its columns are {names}; "
                        f"map the role in `columns` (e.g. columns: {{{role}: <column>}})"
                    )
    else:
        first, w = first_row(inp)
        for role, cs in cols.items():
            for c in cs:
                _get(first, c, role, w)
    settings = tok.settings.as_dict()
    shape = {
        "kind": phase.kind,
        "max_negatives": data.max_negatives if phase.kind == "supervised" else 0,
        "docs_per_query": data.docs_per_query if phase.kind == "distillation" else None,
    }
    tables_fp = {t: _fingerprint(Path(p)) for t, p in (("queries", src.queries_path), ("documents", src.documents_path)) if p and phase.kind == "distillation"}
    key = _hash({
        "format": S.FORMAT, "tokenizer": tok_key, "settings": settings, "columns": cols, "shape": shape,
        "input": inp.fingerprint, "tables": tables_fp, "rows_per_shard": data.rows_per_shard, "max_rows": src.max_rows,
        "table_columns": {k: v for k, v in src.columns.items() if k.startswith(("queries.", "documents."))},
    })
    plan = SourcePlan(
        phase_name, src.name, phase.kind, where, folder, inp, cols, tok_key, tok.identity(), settings, key,
        shape["max_negatives"], data.pad_negatives, data.docs_per_query, np.dtype(tok.dtype).name,
    )
    if phase.kind == "distillation":
        _plan_tables(plan, src, data.rows_per_shard)
    return plan


# ---------------------------------------------------------------- workers
_TOKENIZERS: dict[str, PhaseTokenizer] = {}


def _init_worker(tokenizers: dict[str, PhaseTokenizer]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process; the pool is the parallelism
    logging.basicConfig(level=logging.WARNING)
    _TOKENIZERS.update(tokenizers)


class _Ragged:
    """Token lists accumulated chunk by chunk as numpy (Python int lists of a whole shard would not fit)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lens: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []

    def add(self, lists: list[list[int]]) -> np.ndarray:
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        self.lens.append(lens)
        self.vals.append(np.fromiter(itertools.chain.from_iterable(lists), dtype=self.dtype, count=int(lens.sum())))
        return lens

    def array(self) -> tuple[pa.Array, np.ndarray]:
        lens = np.concatenate(self.lens) if self.lens else np.zeros(0, np.int64)
        vals = np.concatenate(self.vals) if self.vals else np.zeros(0, self.dtype)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(vals)), lens


def _hist(lens: np.ndarray) -> list[int]:
    return np.bincount(lens.astype(np.int64)).tolist() if lens.size else []


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


def _row_columns(job: Job) -> list[str]:
    # JSONL rows come whole; columnar inputs read only the mapped columns
    if job.plan.input.format == "jsonl":
        return []
    return sorted({c for cs in job.plan.columns.values() for c in cs})


def _pairs_shard(job: Job, tok: PhaseTokenizer) -> tuple[pa.Table, dict]:
    plan, cols = job.plan, job.plan.columns
    pos_role = "document" if plan.kind == "unsupervised" else "positive"
    qr, dr = _Ragged(tok.dtype), _Ragged(tok.dtype)
    per_row: list[np.ndarray] = []
    max_len: list[np.ndarray] = []
    neg_hist = np.zeros(plan.max_negatives + 1, dtype=np.int64)
    first_short: dict[str, str] = {}
    for chunk in _chunks(iter_rows(plan.input, job.range, _row_columns(job)), TEXT_BATCH):
        queries, docs, counts = [], [], []
        for row, where in chunk:
            queries.append(_text(_get(row, cols["query"][0], "query", where), cols["query"][0], "query", where))
            pc_ = cols[pos_role][0]
            docs.append(_text(_get(row, pc_, pos_role, where), pc_, pos_role, where, first_of_list=True))
            n = 0
            if plan.kind == "supervised":
                negs = _texts(row, cols["negatives"], "negatives", where)[: plan.max_negatives]
                docs.extend(negs)
                n = len(negs)
                if n < plan.max_negatives:
                    first_short.setdefault(str(n), where)
            neg_hist[n] += 1
            counts.append(1 + n)
        qr.add(tok.encode_queries(queries))
        dl = dr.add(tok.encode_documents(docs))
        counts = np.asarray(counts, dtype=np.int64)
        per_row.append(counts)
        bounds = np.concatenate([[0], np.cumsum(counts)[:-1]])
        max_len.append(np.maximum.reduceat(dl, bounds))
    q_arr, q_lens = qr.array()
    d_arr, d_lens = dr.array()
    counts = np.concatenate(per_row)
    doc_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    table = pa.table({
        "query": q_arr,
        "documents": pa.ListArray.from_arrays(pa.array(doc_offsets), d_arr),
        "max_doc_len": pa.array(np.concatenate(max_len).astype(np.int32)),
    })
    stats = {
        "query_tokens": int(q_lens.sum()), "document_tokens": int(d_lens.sum()), "documents": int(d_lens.size),
        "query_hist": _hist(q_lens), "document_hist": _hist(d_lens),
        "negatives_hist": neg_hist.tolist(), "first_row_with_negatives": first_short,
    }
    return table, stats


def _lookup(keys: list[str], keys_file: str, what: str, wheres: list[str], table_src: str) -> np.ndarray:
    idx = pc.index_in(pa.array(keys, pa.large_string()), value_set=S.open_table(Path(keys_file)).column(0))
    if idx.null_count:
        k = int(np.flatnonzero(idx.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{wheres[k]}: {what} {keys[k]!r} is not in {table_src}; every id must name a row of that table")
    return idx.to_numpy().astype(np.int32)


def _kd_shard(job: Job, tok: PhaseTokenizer) -> tuple[pa.Table, dict]:
    plan, dpq = job.plan, job.plan.docs_per_query
    qkeys, dkeys, scores, qwhere, dwhere = [], [], [], [], []
    for row, where in iter_rows(plan.input, job.range, _row_columns(job)):
        q, docs, sc = _kd_row(row, where, plan.columns, dpq)
        qkeys.append(q)
        qwhere.append(where)
        dkeys.extend(docs)
        dwhere.extend([where] * dpq)
        scores.extend(sc)
    qt, dt = plan.tables["queries"], plan.tables["documents"]
    qname = "query id" if "query_id" in plan.columns else "query"
    dname = "document id" if "document_ids" in plan.columns else "document"
    q_idx = _lookup(qkeys, qt.keys_file, qname, qwhere, qt.input.path)
    d_idx = _lookup(dkeys, dt.keys_file, dname, dwhere, dt.input.path)
    table = pa.table({
        "query_idx": pa.array(q_idx),
        "doc_idx": pa.FixedSizeListArray.from_arrays(pa.array(d_idx), dpq),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(scores, dtype=np.float32)), dpq),
    })
    return table, {}


def _table_shard(job: Job, tok: PhaseTokenizer) -> tuple[pa.Table, dict]:
    t = job.plan.tables[job.target]
    enc = tok.encode_queries if t.name == "queries" else tok.encode_documents
    r = _Ragged(tok.dtype)
    cols = [] if t.input.format == "jsonl" else [t.text_col]
    for chunk in _chunks(iter_rows(t.input, job.range, cols), TEXT_BATCH):
        r.add(enc([_text(_get(row, t.text_col, f"{t.name}.text", w), t.text_col, f"{t.name}.text", w) for row, w in chunk]))
    arr, lens = r.array()
    return pa.table({"input_ids": arr}), {"tokens": int(lens.sum()), "hist": _hist(lens)}


def _run_job(job: Job) -> dict:
    tok = _TOKENIZERS[job.plan.tok_key]
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        if job.target == "rows":
            table, stats = (_kd_shard if job.plan.kind == "distillation" else _pairs_shard)(job, tok)
        else:
            table, stats = _table_shard(job, tok)
    except DataError as e:
        raise DataError(f"phase {job.plan.phase}, source {job.plan.name}: {e}; nothing was marked prepared") from None
    meta = {"key": job.plan.key, "row_start": job.range.row_start, **stats}
    timing = {"seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3)}
    return S.write_shard(job.out, table, {**meta, **timing})


# ---------------------------------------------------------------- index
def _sum_hists(hists: list[list[int]]) -> list[int]:
    n = max((len(h) for h in hists), default=0)
    out = np.zeros(n, dtype=np.int64)
    for h in hists:
        out[: len(h)] += h
    return out.tolist()


def _shard_entries(folder: Path, metas: list[dict]) -> list[dict]:
    return [
        {"file": m["file"], "rows": m["rows"], "bytes": m["bytes"], "sha256": m["sha256"],
         "mtime_ns": (folder / m["file"]).stat().st_mtime_ns}
        for m in metas
    ]


def _collect(plan: SourcePlan) -> dict[str, list[dict]]:
    missing, out = [], {}
    for job in plan.jobs():
        m = S.finished_meta(job.out, plan.key)
        if m is None:
            missing.append(str(job.out))
        out.setdefault(job.target, []).append(m)
    if missing:
        raise DataError(
            f"phase {plan.phase}, source {plan.name}: {len(missing)} shard(s) not finished, e.g. {missing[0]}; "
            "run the remaining prepare tasks (or prepare without a shard range) before indexing"
        )
    return out


def write_source_index(plan: SourcePlan) -> dict:
    metas = _collect(plan)
    rows = metas["rows"]
    index: dict[str, Any] = {
        "format": S.FORMAT,
        "phase": plan.phase,
        "source": plan.name,
        "kind": plan.kind,
        "key": plan.key,
        "created": S.now_iso(),
        "input": {"path": plan.input.path, "format": plan.input.format, "fingerprint": plan.input.fingerprint,
                  "columns": plan.columns},
        "rows": sum(m["rows"] for m in rows),
        "tokenizer": plan.tokenizer,
        "settings": plan.settings,
        "dtype": plan.dtype,
    }
    if plan.kind == "distillation":
        index.update(n_docs=plan.docs_per_query, docs_per_query=plan.docs_per_query, n_negatives=None)
        index["tables"] = {}
        for t in ("queries", "documents"):
            tm = metas[t]
            index["tables"][t] = {
                "rows": sum(m["rows"] for m in tm), "tokens": sum(m["tokens"] for m in tm),
                "length_histogram": _sum_hists([m["hist"] for m in tm]),
                "input": plan.tables[t].input.path,
                "shards": _shard_entries(plan.folder / t, tm),
            }
        index["tokens"] = {"query": index["tables"]["queries"]["tokens"], "document": index["tables"]["documents"]["tokens"]}
        index["length_histogram"] = {"query": index["tables"]["queries"]["length_histogram"],
                                     "document": index["tables"]["documents"]["length_histogram"]}
    else:
        hist = np.asarray(_sum_hists([m["negatives_hist"] for m in rows]), dtype=np.int64)
        most = int(np.flatnonzero(hist)[-1]) if hist.any() else 0
        n_neg = min(plan.max_negatives, most)
        short = [c for c in range(n_neg) if c < len(hist) and hist[c]]
        if short:
            firsts = [m["first_row_with_negatives"].get(str(c)) for m in rows for c in short]
            where = next(w for w in firsts if w)
            if not plan.pad_negatives:
                raise DataError(
                    f"phase {plan.phase}, source {plan.name}: {where}: {int(hist[:n_neg].sum())} row(s) have fewer than "
                    f"{n_neg} hard negatives (min(max_negatives={plan.max_negatives}, most in a row={most})), the first "
                    "here; set data.pad_negatives: true to repeat a row's own negatives, lower max_negatives, or drop "
                    "those rows; nothing was marked prepared"
                )
            if hist[0]:
                w0 = next(m["first_row_with_negatives"]["0"] for m in rows if "0" in m["first_row_with_negatives"])
                raise DataError(
                    f"phase {plan.phase}, source {plan.name}: {w0}: a row without hard negatives cannot be padded; "
                    "drop it; nothing was marked prepared"
                )
        index.update(n_docs=1 + n_neg, n_negatives=n_neg, max_negatives=plan.max_negatives,
                     pad_negatives=plan.pad_negatives, negatives_histogram=hist.tolist())
        index["tokens"] = {"query": sum(m["query_tokens"] for m in rows), "document": sum(m["document_tokens"] for m in rows)}
        index["documents"] = sum(m["documents"] for m in rows)
        index["length_histogram"] = {"query": _sum_hists([m["query_hist"] for m in rows]),
                                     "document": _sum_hists([m["document_hist"] for m in rows])}
    index["shards"] = _shard_entries(plan.folder, rows)
    _remove_strays(plan)
    S.atomic_write_json(S.index_path(plan.folder), index)
    return index


def _remove_strays(plan: SourcePlan) -> None:
    """Shards beyond the plan (rows_per_shard or the input shrank) and temp files of killed runs."""
    for sub, n in [(plan.folder, len(plan.input.ranges))] + [(plan.folder / t.name, len(t.input.ranges)) for t in plan.tables.values()]:
        if not sub.is_dir():
            continue
        for p in sub.glob("shard-*.arrow"):
            try:
                k = int(p.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            if k >= n:
                S.remove_shard(p)
        for p in sub.glob(".tmp-*"):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------- driver
def _plans(recipe, phases: list[str] | None) -> tuple[list[SourcePlan], dict[str, PhaseTokenizer]]:
    names = phases or list(recipe.phases)
    tokenizers: dict[str, PhaseTokenizer] = {}
    plans: list[SourcePlan] = []
    for p in names:
        phase = recipe.phase(p)
        tok = load_phase_tokenizer(recipe, p)
        tk = _hash({"tokenizer": tok.identity()["sha256"], "settings": settings_for_phase(recipe, p).as_dict()})
        tokenizers[tk] = tok
        for i, src in enumerate(phase.data.sources):
            try:
                plans.append(plan_source(recipe, p, i, tok, tk))
            except DataError as e:
                msg = str(e) if str(e).startswith("phases.") else f"phase {p}, source {src.name}: {e}"
                raise DataError(f"{msg}; nothing was marked prepared") from None
    by_folder: dict[Path, SourcePlan] = {}
    for pl in plans:
        other = by_folder.setdefault(pl.folder.resolve(), pl)
        if other is not pl and other.key != pl.key:
            raise DataError(
                f"phases {other.phase} and {pl.phase} both prepare {pl.folder} with different settings; "
                "give them different data.shards_dir"
            )
    uniq = list({pl.folder.resolve(): pl for pl in plans}.values())
    return uniq, tokenizers


def _summary(plan: SourcePlan, written: int, skipped: int, status: str, index: dict | None) -> dict:
    out = {"folder": str(plan.folder), "kind": plan.kind, "rows": plan.input.rows, "shards": len(plan.jobs()),
           "written": written, "skipped": skipped, "status": status}
    if index:
        out.update(tokens=index["tokens"], n_docs=index["n_docs"])
    return out


def prepare_recipe(recipe, phases: list[str] | None = None, workers: int = 1, verify: bool = False,
                   shard_range: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Prepare the phases' sources; see the module docstring. Returns ``{phase: {source: summary}}``."""
    if shard_range is not None:
        i, n = shard_range
        if not (0 <= i < n):
            raise ValueError(f"shard_range {shard_range}: expected (task_id, n_tasks) with 0 <= task_id < n_tasks")
    plans, tokenizers = _plans(recipe, phases)
    _TOKENIZERS.update(tokenizers)
    pending: list[Job] = []
    counts: dict[int, list[int]] = {}
    done: set[int] = set()
    for k, plan in enumerate(plans):
        ip = S.index_path(plan.folder)
        if ip.is_file():
            try:
                current = json.loads(ip.read_text()).get("key") == plan.key
            except (OSError, ValueError):
                current = False
            # an up-to-date index is trusted after a cheap size check of every shard (the loader's own check)
            if current and not verify and all(S.finished_meta(j.out, plan.key) for j in plan.jobs()):
                done.add(k)
                counts[k] = [0, len(plan.jobs())]
                continue
            ip.unlink(missing_ok=True)  # stale or being checked: not "prepared" until re-indexed
        jobs = plan.jobs()
        if shard_range is not None:
            jobs = jobs[shard_range[0]::shard_range[1]]
        counts[k] = [0, 0]
        for job in jobs:
            if S.finished_meta(job.out, plan.key, full_hash=verify) is not None:
                counts[k][1] += 1
            else:
                S.remove_shard(job.out)  # other settings, damaged, or half a shard: redo it
                pending.append(job)
    metas = _run(pending, tokenizers, workers, progress)
    position = {id(p): k for k, p in enumerate(plans)}
    busy: dict[int, list[float]] = {}
    for job, meta in zip(pending, metas):
        k = position[id(job.plan)]
        counts[k][0] += 1
        b = busy.setdefault(k, [0.0, 0.0])
        b[0] += meta["seconds"]
        b[1] += meta["cpu_seconds"]
    summary: dict[str, dict] = {}
    for k, plan in enumerate(plans):
        index = None
        if k in done:
            status, index = "up to date", S.read_json(S.index_path(plan.folder))
        elif shard_range is None:
            index, status = write_source_index(plan), "prepared"
        else:
            status = "shards done, index pending"
        summary.setdefault(plan.phase, {})[plan.name] = _summary(plan, *counts[k], status, index)
        wall, cpu = busy.get(k, (0.0, 0.0))
        summary[plan.phase][plan.name].update(worker_seconds=round(wall, 3), worker_cpu_seconds=round(cpu, 3))
    return summary


def index_recipe(recipe, phases: list[str] | None = None, progress: bool = True) -> dict:
    """The final step after Slurm array tasks: check that every shard is finished and write the indexes."""
    plans, tokenizers = _plans(recipe, phases)
    _TOKENIZERS.update(tokenizers)
    summary: dict[str, dict] = {}
    for plan in plans:
        index = write_source_index(plan)
        summary.setdefault(plan.phase, {})[plan.name] = _summary(plan, 0, len(plan.jobs()), "prepared", index)
    return summary


def _job_rows(job: Job) -> int:
    return job.range.rows


def _run(jobs: list[Job], tokenizers: dict[str, PhaseTokenizer], workers: int, progress: bool) -> list[dict]:
    """Run the jobs; their sidecars in job order."""
    if not jobs:
        return []
    from tqdm.auto import tqdm

    metas: dict[int, dict] = {}
    bar = tqdm(total=sum(map(_job_rows, jobs)), unit="rows", desc="prepare", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) == 1:
            for k, job in enumerate(jobs):
                metas[k] = _run_job(job)
                bar.update(_job_rows(job))
            return [metas[k] for k in range(len(jobs))]
        # fork: workers inherit the loaded tokenizer (spawn re-imports transformers and unpickles it, ~4 s each);
        # the parent has not encoded anything, so no tokenizer thread pool exists to be forked.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with cf.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                                    initargs=(tokenizers,)) as pool:
            futures = {pool.submit(_run_job, j): k for k, j in enumerate(jobs)}
            try:
                for fut in cf.as_completed(futures):
                    metas[futures[fut]] = fut.result()
                    bar.update(_job_rows(jobs[futures[fut]]))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
    return [metas[k] for k in range(len(jobs))]


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    from colbertzero.recipe import RecipeError, load_recipe

    ap = argparse.ArgumentParser(prog="colbertzero prepare", description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--phase", action="append", help="phase to prepare (repeatable; default: all)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, default=cpus, help=f"worker processes (default: the CPUs this process may use, {cpus})")
    ap.add_argument("--verify", action="store_true", help="re-hash finished shards and redo damaged ones")
    ap.add_argument("--shard-range", metavar="I/N", help="Slurm array task I of N: only its share, no index")
    ap.add_argument("--index-only", action="store_true", help="write the indexes after all array tasks finished")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        recipe = load_recipe(a.recipe, a.set)
        t0 = time.time()
        if a.index_only:
            out = index_recipe(recipe, a.phase)
        else:
            rng = None
            if a.shard_range:
                i, _, n = a.shard_range.partition("/")
                rng = (int(i), int(n))
            out = prepare_recipe(recipe, a.phase, a.workers, a.verify, rng)
    except (DataError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"seconds": round(time.time() - t0, 1), "phases": out}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
