"""Loading BEIR and NanoBEIR dataset folders: corpus, queries, qrels, with a clear error for anything malformed.

Layouts, each table looked up in this order:
- corpus:  ``corpus.jsonl`` / ``corpus.jsonl.gz`` (BEIR), ``corpus.parquet``, ``corpus/*.parquet`` (NanoBEIR as
  published: ``corpus/train-00000-of-00001.parquet``). Fields ``_id``, ``text``, optional ``title``.
- queries: the same with ``queries``; fields ``_id``, ``text``.
- qrels:   ``qrels/<split>.tsv`` (``query-id  corpus-id  score``, header line optional, TREC's 4-column form
  accepted), ``qrels/*.parquet`` (files named ``<split>-*`` preferred, else all of them), ``qrels.parquet``.

A document's text is ``f"{title} {text}".strip()``, PyLate's BEIR convention. Duplicate ids keep their first
occurrence (warned). Qrels naming a query the dataset does not have are dropped, and a query none of whose judged
documents is in the corpus is dropped; a judged document absent from the corpus stays, relevant and never retrieved,
as BEIR scores it (each with a :class:`DatasetWarning`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the file, line/row and field."""


class DatasetWarning(UserWarning):
    """Data that was usable but not clean (unknown ids in qrels, duplicate ids, ...)."""



def load_beir(
    path: str | os.PathLike, split: str = "test"
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """``(corpus, queries, qrels)`` of a BEIR or NanoBEIR folder: ``{doc_id: text}``, ``{query_id: text}``,
    ``{query_id: {doc_id: grade}}``. See the module docstring for layouts and the handling of unclean data."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (expected a BEIR or NanoBEIR folder)")
    corpus = _load_texts(root, "corpus", with_title=True)
    queries = _load_texts(root, "queries", with_title=False)
    qrels, qrels_source = _load_qrels(root, split)
    return corpus, queries, _clean_qrels(qrels, corpus, queries, qrels_source)


def _find_table(root: Path, table: str) -> tuple[str, list[Path]]:
    for name in (f"{table}.jsonl", f"{table}.jsonl.gz"):
        if (root / name).is_file():
            return "jsonl", [root / name]
    if (root / f"{table}.parquet").is_file():
        return "parquet", [root / f"{table}.parquet"]
    files = sorted((root / table).glob("*.parquet")) if (root / table).is_dir() else []
    if files:
        return "parquet", files
    raise DatasetError(
        f"{root}: no {table} table: expected {table}.jsonl (BEIR) or {table}/*.parquet / {table}.parquet "
        f"(NanoBEIR); download the dataset into this folder or fix the path"
    )


def _load_texts(root: Path, table: str, *, with_title: bool) -> dict[str, str]:
    fmt, files = _find_table(root, table)
    records = _iter_jsonl(files[0]) if fmt == "jsonl" else _iter_parquet_rows(files)
    out: dict[str, str] = {}
    duplicates = 0
    for where, row in records:
        doc_id = row.get("_id")
        if doc_id is None or (isinstance(doc_id, str) and not doc_id):
            raise DatasetError(f"{where}: missing field '_id' (every {table} record needs an id)")
        text = row.get("text")
        if not isinstance(text, str):
            raise DatasetError(f"{where}: field 'text' is missing or not a string (got {type(text).__name__})")
        if with_title:
            title = row.get("title") or ""
            if not isinstance(title, str):
                raise DatasetError(f"{where}: field 'title' is not a string (got {type(title).__name__})")
            text = f"{title} {text}".strip()
        doc_id = str(doc_id)
        if doc_id in out:
            duplicates += 1
            continue
        out[doc_id] = text
    if duplicates:
        warnings.warn(f"{files[0]}: {duplicates} duplicate '_id' values; kept the first of each", DatasetWarning, 2)
    if not out:
        raise DatasetError(f"{files[0]}: the {table} table is empty")
    return out


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(
                        f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line must hold one JSON object "
                        f"- fix or remove that line"
                    ) from None
                if not isinstance(row, dict):
                    raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e}); re-encode the file as UTF-8") from None


def _read_parquet(path: Path):
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged or non-parquet file
        raise DatasetError(f"{path}: cannot read as parquet ({e}); re-download the file") from None


def _iter_parquet_rows(files: list[Path]) -> Iterator[tuple[str, dict]]:
    for path in files:
        table = _read_parquet(path)
        columns = {name: table.column(name).to_pylist() for name in ("_id", "text", "title")
                   if name in table.schema.names}
        for required in ("_id", "text"):
            if required not in columns:
                raise DatasetError(f"{path}: no column '{required}' (columns: {table.schema.names})")
        for i in range(table.num_rows):
            yield f"{path} row {i}", {name: values[i] for name, values in columns.items()}


def _grade(value: Any) -> int:
    """Relevance judgement as an int; "2", 2, "2.0" and 2.0 are fine, anything else raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _load_qrels(root: Path, split: str) -> tuple[dict[str, dict[str, int]], Path]:
    qdir = root / "qrels"
    tsv = qdir / f"{split}.tsv"
    if tsv.is_file():
        return _read_qrels_tsv(tsv), tsv
    files = sorted(qdir.glob("*.parquet")) if qdir.is_dir() else []
    files = [f for f in files if f.name.startswith(split)] or files
    if not files and (root / "qrels.parquet").is_file():
        files = [root / "qrels.parquet"]
    if files:
        return _read_qrels_parquet(files), files[0]
    present = sorted(p.name for p in qdir.iterdir()) if qdir.is_dir() else []
    raise DatasetError(
        f"{root}: no qrels for split '{split}': expected qrels/{split}.tsv (BEIR) or qrels/*.parquet (NanoBEIR)"
        + (f"; qrels/ holds {present}" if present else "")
    )


def _read_qrels_tsv(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    first = True
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            if len(parts) == 4:  # TREC qrels: query-id, iteration, doc-id, relevance
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise DatasetError(
                    f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}"
                )
            qid, did, score = (p.strip() for p in parts)
            try:
                grade = _grade(score)
            except ValueError:
                if first:  # BEIR files start with a "query-id corpus-id score" header; others have none
                    first = False
                    continue
                raise DatasetError(f"{path}:{lineno}: score {score!r} is not an integer relevance grade") from None
            first = False
            qrels.setdefault(qid, {})[did] = grade
    return qrels


def _column(table, path: Path, names: tuple[str, ...], required: bool = True):
    for name in names:
        if name in table.schema.names:
            return table.column(name).to_pylist()
    if required:
        raise DatasetError(f"{path}: no column {names[0]!r} (columns: {table.schema.names})")
    return None


def _read_qrels_parquet(files: list[Path]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for path in files:
        table = _read_parquet(path)
        qids = _column(table, path, ("query-id", "query_id", "qid"))
        dids = _column(table, path, ("corpus-id", "corpus_id", "doc_id", "docid"))
        scores = _column(table, path, ("score",), required=False) or [1] * table.num_rows
        for i, (qid, did, score) in enumerate(zip(qids, dids, scores)):
            try:
                grade = _grade(score)
            except (TypeError, ValueError):
                raise DatasetError(f"{path} row {i}: score {score!r} is not an integer relevance grade") from None
            qrels.setdefault(str(qid), {})[str(did)] = grade
    return qrels


def _clean_qrels(qrels, corpus, queries, source: Path) -> dict[str, dict[str, int]]:
    unknown_queries = [q for q in qrels if q not in queries]
    unknown_docs = sorted({d for q, judged in qrels.items() if q in queries for d in judged if d not in corpus})
    if unknown_queries:
        warnings.warn(
            f"{source}: {len(unknown_queries)} query ids have no query text (e.g. {unknown_queries[:3]}); "
            f"their judgements are ignored",
            DatasetWarning,
            3,
        )
    if unknown_docs:
        warnings.warn(
            f"{source}: {len(unknown_docs)} judged document ids are not in the corpus (e.g. {unknown_docs[:3]}); "
            f"they count as relevant and never retrieved, as BEIR counts them - check that corpus and qrels come "
            f"from the same dataset",
            DatasetWarning,
            3,
        )
    cleaned = {}
    for qid, judged in qrels.items():
        if qid not in queries:
            continue
        if any(d in corpus for d in judged):
            cleaned[qid] = dict(judged)
    if not cleaned:
        raise DatasetError(f"{source}: no judgement refers to a known query and document; nothing to evaluate")
    return cleaned


def subsample_corpus(corpus: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]], max_corpus: int | None):
    """At most ``max_corpus`` documents (more only when the judged ones alone exceed it): every judged document,
    then others in sha256(id) order, so the same ids are picked whatever the file order or machine."""
    if max_corpus is None or len(corpus) <= max_corpus:
        return dict(corpus)
    if max_corpus <= 0:
        raise ValueError(f"max_corpus must be positive, got {max_corpus}")
    judged = {d for docs in qrels.values() for d in docs if d in corpus}
    if len(judged) >= max_corpus:
        warnings.warn(
            f"max_corpus={max_corpus} is below the {len(judged)} judged documents; keeping all judged ones",
            DatasetWarning,
            2,
        )
        keep = judged
    else:
        others = sorted((d for d in corpus if d not in judged), key=lambda d: hashlib.sha256(d.encode()).digest())
        keep = judged | set(others[: max_corpus - len(judged)])
    return {d: t for d, t in corpus.items() if d in keep}
