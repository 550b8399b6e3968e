"""Reading what `mine` and `score` start from, through the same readers (and messages) as `prepare`: one JSONL or
parquet file, a folder or glob of parquet shards, or a `save_to_disk` folder."""

from __future__ import annotations

from pathlib import Path

from ..data.sources import (
    DataError,
    as_text,
    fingerprint,
    is_glob,
    iter_rows,
    row_texts,
    row_value,
    scan_input,
)

_ROWS_PER_RANGE = 1 << 16


def _rows(path: str, columns: list[str], where: str):
    inp = scan_input(path, "auto", _ROWS_PER_RANGE, None, where, None)
    for rng in inp.ranges:
        yield from iter_rows(inp, rng, columns)


def resolve_input(path: str, where: str) -> str:
    """A path as given, or, for a folder written by `mine` (or any folder of the Hub's ``data/*.parquet`` layout),
    its ``data/*.parquet`` shards."""
    p = Path(path)
    if not (p.exists() or is_glob(path)):
        raise DataError(f"{where}: {path} does not exist")
    if p.is_dir() and not list(p.glob("*.parquet")) and list(p.glob("data/*.parquet")):
        return str(p / "data" / "*.parquet")
    return path


def input_fingerprint(path: str) -> dict:
    return fingerprint(Path(path))


def read_pairs(path: str, query: str, documents: list[str], where: str) -> tuple[list[str], list[list[str]]]:
    """(queries, documents of each row): ``documents`` names one or more columns, each a text or a list of texts."""
    queries, docs = [], []
    for row, at in _rows(path, [query, *documents], where):
        queries.append(as_text(row_value(row, query, "query", at), query, "query", at))
        texts = row_texts(row, documents, "documents", at)
        if not texts:
            raise DataError(f"{at}: column {'+'.join(documents)!r} holds no document; every row needs one")
        docs.append(texts)
    return queries, docs


def read_corpus(path: str, column: str, where: str) -> list[str]:
    """The texts of a corpus file (a BEIR ``corpus.jsonl`` reads with ``column="text"``), in file order, each once."""
    out = []
    for row, at in _rows(path, [column], where):
        out.append(as_text(row_value(row, column, "text", at), column, "text", at))
    return list(dict.fromkeys(out))
