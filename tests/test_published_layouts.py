"""Data as the Hub publishes it, read by the real pyarrow / datasets code: a split's parquet shards as one source,
list columns stored as text, a damaged shard named in the refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from colbertzero.data import DataError, GlobalBatchLoader, prepare_recipe
from colbertzero.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]


def _unsupervised_snapshot(root: Path, rows: list[dict], split: str, shards: int) -> Path:
    """nomic-embed-unsupervised-data's layout: data/<split>-XXXXX-of-NNNNN.parquet, columns query, document,
    dataset, shard (small row groups, so a source's shard ranges cross files and row groups)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * per:(k + 1) * per]
        table = pa.table({"query": [r["query"] for r in part], "document": [r["document"] for r in part],
                          "dataset": [split] * len(part), "shard": [k] * len(part)})
        pq.write_table(table, data / f"{split}-{k:05d}-of-{shards:05d}.parquet", row_group_size=3)
    return data


def _recipe(model: str, kind: str, source: dict, shards: Path, **data):
    phase = {"kind": kind, "init": model, "global_batch_size": 4, "query_length": 16, "document_length": 32,
             "data": {"shards_dir": str(shards), "rows_per_shard": 7, "sources": [source], **data},
             "resources": {"nodes": 1, "gpus_per_node": 0, "cpu_tasks_per_node": 1}, "lr": 1e-5}
    return recipe_from_dict({"name": "layouts", "phases": {"p": phase}})


@pytest.mark.parametrize("how", ["glob", "folder"])
def test_a_splits_parquet_shards_are_one_source(how, minilm, flag_examples, tmp_path):
    rows = [{"query": r["query"], "document": r["pos"][0]} for r in flag_examples]
    data = _unsupervised_snapshot(tmp_path / "hub", rows, "msmarco", shards=4)
    _unsupervised_snapshot(tmp_path / "hub", rows[:5], "other_split", shards=1)  # another split beside it
    path = str(data / "msmarco-*.parquet") if how == "glob" else str(tmp_path / "only")
    if how == "folder":
        (tmp_path / "only").mkdir()
        for f in data.glob("msmarco-*.parquet"):
            (tmp_path / "only" / f.name).symlink_to(f)
    r = _recipe(minilm, "unsupervised", {"name": "msmarco", "path": path}, tmp_path / "shards")
    summary = prepare_recipe(r, progress=False)
    assert summary["p"]["msmarco"]["rows"] == len(rows)  # every file, in order; the other split not included
    loader = GlobalBatchLoader(r, "p", 0, 1)
    seen = {i for t in range(loader.total_steps) for i in loader.global_rows(t)[1]}
    assert len(seen) == loader.total_steps * 4 and max(seen) < len(rows)
    # the tokens of a row that sits in the third file equal the tokenizer's own on that row's text
    batch = next(iter(loader))
    assert batch.queries["input_ids"].shape[0] == 4 and torch.all(batch.queries["attention_mask"][:, 0] == 1)


def test_list_columns_stored_as_text_are_parsed_safely(minilm, flag_examples, tmp_path):
    flag = flag_examples
    text_lists = [{"query": r["query"], "document": r["pos"][0],
                   "negative": json.dumps(r["neg"][:3]) if i % 2 else repr(r["neg"][:3])} for i, r in enumerate(flag)]
    path = tmp_path / "supervised.parquet"
    pq.write_table(pa.Table.from_pylist(text_lists), path)
    r = _recipe(minilm, "supervised", {"name": "s", "path": str(path), "columns": {"positive": "document",
                                                                                  "negatives": "negative"}},
                tmp_path / "shards", max_negatives=3)
    summary = prepare_recipe(r, progress=False)
    assert summary["p"]["s"]["n_docs"] == 4  # the positive and the 3 negatives parsed from JSON or Python text
    marker = tmp_path / "pwned"
    evil = [{"query": f"q{i}", "document": "d", "negative": f"[__import__('os').system('touch {marker}')]"}
            for i in range(8)]
    pq.write_table(pa.Table.from_pylist(evil), path)
    summary = prepare_recipe(r, progress=False)  # not a literal: kept as the text of one negative, never run
    assert summary["p"]["s"]["n_docs"] == 2 and not marker.exists()


def test_a_damaged_shard_is_named(minilm, flag_examples, tmp_path):
    rows = [{"query": r["query"], "document": r["pos"][0]} for r in flag_examples]
    data = _unsupervised_snapshot(tmp_path / "hub", rows, "msmarco", shards=3)
    broken = data / "msmarco-00001-of-00003.parquet"
    broken.write_bytes(broken.read_bytes()[:100])
    r = _recipe(minilm, "unsupervised", {"name": "m", "path": str(data / "msmarco-*.parquet")}, tmp_path / "shards")
    with pytest.raises(DataError, match="msmarco-00001-of-00003.parquet is not a readable parquet file"):
        prepare_recipe(r, progress=False)
    r = _recipe(minilm, "unsupervised", {"name": "m", "path": str(data / "nosuch-*.parquet")}, tmp_path / "shards")
    with pytest.raises(DataError, match="matches no file"):
        prepare_recipe(r, progress=False)
