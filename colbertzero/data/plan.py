"""The plan of a prepared source (its shard jobs, keyed by everything that decides their bytes) and its index.

A source's shards are jobs of one input range each; tables of texts that distillation rows refer to by id are
planned beside them. ``write_source_index`` checks that every job's shard is finished and writes ``index.json``
(shards.py) last, atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from colbertzero.data import shards, snapshot
from colbertzero.data.shards import DataError
from colbertzero.data.sources import (
    TABLE_ID_DEFAULTS,
    Input,
    Range,
    fingerprint,
    first_row,
    iter_rows,
    kd_row,
    resolve_columns,
    row_value,
    row_where,
    scan_input,
    schema_names,
)
from colbertzero.data.tokenize import PhaseTokenizer
from colbertzero.files import atomic_write_json, now_iso, temps_in


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
    negatives: str
    docs_per_query: int
    dtype: str
    tables: dict[str, TablePlan] = field(default_factory=dict)
    max_drop_fraction: float = 1.0

    def jobs(self) -> list["Job"]:
        out = [Job(self, "rows", k, r, self.folder / shards.shard_name(k)) for k, r in enumerate(self.input.ranges)]
        for t in self.tables.values():
            out += [Job(self, t.name, k, r, self.folder / t.name / shards.shard_name(k))
                    for k, r in enumerate(t.input.ranges)]
        return out


@dataclass
class Job:
    plan: SourcePlan
    target: str  # "rows" or a table name
    shard: int
    range: Range
    out: Path


def key_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _table_id_column(names: list[str], table: str, src, where: str) -> str:
    mapped = src.columns.get(f"{table}.id")
    cands = (mapped,) if mapped else TABLE_ID_DEFAULTS[table]
    for c in cands:
        if c in names:
            return c
    raise DataError(
        f"{where}: {table} table has no id column {' / '.join(cands)}; its columns are {names}; "
        f"set columns.{table}.id"
    )


def read_column(inp: Input, col: str, role: str) -> list:
    return [row_value(r, col, role, w) for rng in inp.ranges for r, w in iter_rows(inp, rng, [col])]


def _write_keys(path: Path, key: str, values: list[str], what: str, source_file: str) -> None:
    if shards.finished_meta(path, key) is not None:
        return
    arr = pa.array(values, type=pa.large_string())
    if pc.count_distinct(arr).as_py() != len(arr):
        vc = pc.value_counts(arr)
        dup = [v["values"] for v in vc.to_pylist() if v["counts"] > 1][:3]
        raise DataError(f"{source_file}: {what} ids are not unique, e.g. {dup}; each id must name one row")
    shards.write_shard(path, pa.table({"key": arr}), {"key": key})


def _plan_tables(plan: SourcePlan, src, rows_per_shard: int) -> None:
    """Distillation: make the id → table-row lookups, and the deduplicated text tables of inline rows."""
    work = plan.folder / shards.WORK
    cols = plan.columns
    inline = [t for t, p in (("queries", src.queries_path), ("documents", src.documents_path)) if not p]
    if inline:
        texts: dict[str, dict[str, None]] = {t: {} for t in inline}
        need = [f"{t}.text.arrow" for t in inline]
        if not all(shards.finished_meta(work / n, plan.key) for n in need):
            row_cols = sorted({c for cs in cols.values() for c in cs})
            for rng in plan.input.ranges:
                for row, where in iter_rows(plan.input, rng, row_cols if plan.input.format != "jsonl" else []):
                    q, docs, _ = kd_row(row, where, cols, plan.docs_per_query)
                    if "queries" in texts:
                        texts["queries"].setdefault(q)
                    if "documents" in texts:
                        texts["documents"].update(dict.fromkeys(docs))
            for t in inline:
                table = pa.table({"text": pa.array(list(texts[t]), pa.large_string())})
                shards.write_shard(work / f"{t}.text.arrow", table, {"key": plan.key})
        for t in inline:
            inp = scan_input(str(work / f"{t}.text.arrow"), "arrow", rows_per_shard, None, plan.where, None)
            plan.tables[t] = TablePlan(t, inp, "text", str(work / f"{t}.text.arrow"))
    for t, p in (("queries", src.queries_path), ("documents", src.documents_path)):
        if not p:
            continue
        tw = f"{plan.where} {t}_path"
        p = snapshot.resolve(p, (src.hub or {}).get(f"{t}_path"), work, tw)
        inp = scan_input(p, "auto", rows_per_shard, None, tw, work / f"{t}.scan.json")
        names = schema_names(Path(inp.path), inp.format, tw)
        if names is None:  # JSONL: the first row's keys
            names = list(first_row(inp)[0])
        id_col = _table_id_column(names, t, src, tw)
        text_col = src.columns.get(f"{t}.text", "text")
        if text_col not in names:
            raise DataError(f"{tw}: {inp.path} has no text column {text_col!r}; its columns are {names}; set "
                            f"columns.{t}.text")
        keys_file = work / f"{t}.ids.arrow"
        if shards.finished_meta(keys_file, plan.key) is None:
            ids = read_column(inp, id_col, f"{t}.id")
            for i, v in enumerate(ids):
                if isinstance(v, bool) or not isinstance(v, (str, int)):
                    raise DataError(f"{row_where(inp.path, i, None)}: id column {id_col!r} holds {type(v).__name__}, "
                                    f"expected text or integer")
            _write_keys(keys_file, plan.key, [str(v) for v in ids], t, inp.path)
        plan.tables[t] = TablePlan(t, inp, text_col, str(keys_file))


def plan_source(recipe, phase_name: str, i: int, tok: PhaseTokenizer, tok_key: str) -> SourcePlan:
    phase = recipe.phase(phase_name)
    data = phase.data
    src = data.sources[i]
    where = f"phases.{phase_name}.data.sources[{i}] ({src.name})"
    folder = shards.source_dir(data, src.name)
    cols = resolve_columns(phase.kind, src, where)
    work = folder / shards.WORK
    path = snapshot.resolve(src.path, (src.hub or {}).get("path"), work, where)
    inp = scan_input(path, src.format, data.rows_per_shard, src.max_rows, where, work / "rows.scan.json")
    names = schema_names(Path(inp.path), inp.format, where)
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
                row_value(first, c, role, w)
    settings = tok.settings.as_dict()
    shape = {
        "kind": phase.kind,
        "max_negatives": data.max_negatives if phase.kind == "supervised" else 0,
        "docs_per_query": data.docs_per_query if phase.kind == "distillation" else None,
    }
    tables_fp = {t: fingerprint(Path(p)) for t, p in (("queries", src.queries_path), ("documents", src.documents_path))
                 if p and phase.kind == "distillation"}
    key = key_hash({
        "format": shards.FORMAT, "tokenizer": tok_key, "settings": settings, "columns": cols, "shape": shape,
        "input": inp.fingerprint, "tables": tables_fp, "rows_per_shard": data.rows_per_shard, "max_rows": src.max_rows,
        "table_columns": {k: v for k, v in src.columns.items() if k.startswith(("queries.", "documents."))},
    })
    plan = SourcePlan(
        phase_name, src.name, phase.kind, where, folder, inp, cols, tok_key, tok.identity(), settings, key,
        shape["max_negatives"], data.negatives, data.docs_per_query, np.dtype(tok.dtype).name,
    )
    plan.max_drop_fraction = data.max_drop_fraction
    if phase.kind == "distillation":
        _plan_tables(plan, src, data.rows_per_shard)
    return plan



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
        m = shards.finished_meta(job.out, plan.key)
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
        "format": shards.FORMAT,
        "phase": plan.phase,
        "source": plan.name,
        "kind": plan.kind,
        "key": plan.key,
        "created": now_iso(),
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
        index["tokens"] = {"query": index["tables"]["queries"]["tokens"],
                           "document": index["tables"]["documents"]["tokens"]}
        counted = sum(m.get("target_queries", 0) for m in rows)  # shards of an older version lack it
        if counted and all("target_queries" in m for m in rows):
            index["target"] = {"top1": round(sum(m["target_top1_sum"] for m in rows) / counted, 4),
                               "uniform": round(1.0 / plan.docs_per_query, 4)}
        index["length_histogram"] = {"query": index["tables"]["queries"]["length_histogram"],
                                     "document": index["tables"]["documents"]["length_histogram"]}
    else:
        hist = np.asarray(_sum_hists([m["negatives_hist"] for m in rows]), dtype=np.int64)
        n_neg, dropped = _negatives_kept(plan, hist, rows)
        index.update(n_docs=1 + n_neg, n_negatives=n_neg, max_negatives=plan.max_negatives,
                     negatives=plan.negatives, negatives_histogram=hist.tolist(), dropped=dropped)
        index["tokens"] = {"query": sum(m["query_tokens"] for m in rows),
                           "document": sum(m["document_tokens"] for m in rows)}
        index["documents"] = sum(m["documents"] for m in rows)
        index["length_histogram"] = {"query": _sum_hists([m["query_hist"] for m in rows]),
                                     "document": _sum_hists([m["document_hist"] for m in rows])}
    index["shards"] = _shard_entries(plan.folder, rows)
    _remove_strays(plan)
    atomic_write_json(shards.index_path(plan.folder), index)
    return index


def _negatives_kept(plan: SourcePlan, hist: np.ndarray, metas: list[dict]) -> tuple[int, dict]:
    """How many hard negatives each row of a supervised source keeps, by the recipe's policy, and what that drops.
    ``hist[c]``: rows with c negatives (at most max_negatives: the rest were cut at prepare and counted there)."""
    present = np.flatnonzero(hist)
    fewest, most = (int(present[0]), int(present[-1])) if present.size else (0, 0)
    beyond_max = sum(m.get("negatives_beyond_max", 0) for m in metas)
    where = f"phase {plan.phase}, source {plan.name}"
    if plan.negatives == "fewest":
        n_neg = min(plan.max_negatives, fewest)
    else:
        n_neg = min(plan.max_negatives, most)
        short = [c for c in range(n_neg) if hist[c]]
        if short and plan.negatives == "refuse":
            first = next(w for m in metas for c in short if (w := m["first_row_with_negatives"].get(str(c))))
            raise DataError(
                f"{where}: {first}: {int(hist[:n_neg].sum())} row(s) have fewer than {n_neg} hard negatives "
                f"(min(max_negatives={plan.max_negatives}, most in a row={most})), the first here; set "
                "data.negatives: fewest (keep the fewest any row has) or pad (repeat a row's own negatives); "
                "nothing was marked prepared")
        if hist[0]:
            w0 = next(m["first_row_with_negatives"]["0"] for m in metas if "0" in m["first_row_with_negatives"])
            raise DataError(f"{where}: {w0}: a row without hard negatives cannot be padded; set data.negatives: "
                            "fewest, or drop the row; nothing was marked prepared")
    beyond_kept = int(sum(hist[c] * (c - n_neg) for c in range(n_neg + 1, len(hist))))
    within = int(sum(hist[c] * c for c in range(len(hist))))
    if within and beyond_kept / within > plan.max_drop_fraction:
        raise DataError(
            f"{where}: data.negatives {plan.negatives} keeps {n_neg} hard negative(s) a row and so drops "
            f"{beyond_kept:,} of the {within:,} its rows hold within max_negatives ({beyond_kept / within:.1%}), above "
            f"data.max_drop_fraction {plan.max_drop_fraction:g}; rows per negative count: "
            f"{ {int(c): int(hist[c]) for c in present} }. Set data.negatives: pad, drop the short rows from the "
            "input, or raise data.max_drop_fraction to accept it; nothing was marked prepared")
    return n_neg, {"negatives": int(beyond_max + beyond_kept), "negatives_beyond_max_negatives": int(beyond_max),
                   "negatives_beyond_kept": beyond_kept, "rows": 0}


def _remove_strays(plan: SourcePlan) -> None:
    """Shards beyond the plan (rows_per_shard or the input shrank) and temp files of killed runs."""
    folders = [(plan.folder, len(plan.input.ranges))]
    folders += [(plan.folder / t.name, len(t.input.ranges)) for t in plan.tables.values()]
    for sub, n in folders:
        if not sub.is_dir():
            continue
        for p in sub.glob("shard-*.arrow"):
            try:
                k = int(p.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            if k >= n:
                shards.remove_shard(p)
        for p in temps_in(sub):  # shards a killed task was writing
            p.unlink(missing_ok=True)
