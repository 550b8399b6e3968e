"""Data as the Hub publishes it, read by the real pyarrow / datasets code: a split's parquet shards as one source,
list columns stored as text, a damaged shard named in the refusal."""

from __future__ import annotations

import json
import os
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


# ---------------------------------------------------------------- Hub snapshot folders, through their config map
def _front_matter(configs: dict[str, dict[str, str]]) -> str:
    """README.md front matter as the Hub's dataset cards write it: configs → data_files per split."""
    out = "---\nconfigs:\n"
    for name, splits in configs.items():
        out += f"- config_name: {name}\n  data_files:\n"
        out += "".join(f"  - split: {s}\n    path: {p}\n" for s, p in splits.items())
    return out + "---\n# a dataset card\n"


def _kd_snapshot(root: Path, flag_examples: list[dict]) -> list[dict]:
    """lightonai/ms-marco-en-bge-gemma's layout: configs train / queries / documents, each <config>/train-*.parquet,
    ids as integers, scores stored as text (as some of its files do)."""
    docs: dict[str, int] = {}
    rows = []
    for qid, r in enumerate(flag_examples[:12]):
        texts = r["pos"] + r["neg"][:5]
        ids = [docs.setdefault(t, len(docs)) for t in texts]
        rows.append({"query_id": qid, "document_ids": ids, "scores": str(r["pos_scores"] + r["neg_scores"][:5]),
                     "query": r["query"], "texts": texts})
    tables = {
        "train": pa.table({"query_id": [r["query_id"] for r in rows], "document_ids": [r["document_ids"] for r in rows],
                           "scores": [r["scores"] for r in rows]}),
        "queries": pa.table({"query_id": [r["query_id"] for r in rows], "text": [r["query"] for r in rows]}),
        "documents": pa.table({"document_id": list(docs.values()), "text": list(docs)}),
    }
    for name, t in tables.items():
        (root / name).mkdir(parents=True)
        pq.write_table(t, root / name / "train-00000-of-00001.parquet")
    (root / "README.md").write_text(_front_matter({c: {"train": f"{c}/train-*"} for c in tables}))
    return rows


def test_hub_snapshot_folders_are_read_through_their_config_map(minilm, flag_examples, tmp_path):
    rows = [{"query": r["query"], "document": r["pos"][0]} for r in flag_examples]
    snap = tmp_path / "unsup"
    _unsupervised_snapshot(snap, rows, "msmarco", shards=3)
    _unsupervised_snapshot(snap, rows[:5], "nq", shards=1)
    (snap / "README.md").write_text(_front_matter({"default": {"msmarco": "data/msmarco-*", "nq": "data/nq-*"}}))
    hub = {"path": {"repo": "nomic-ai/nomic-embed-unsupervised-data", "split": "nq"}}
    r = _recipe(minilm, "unsupervised", {"name": "nq", "path": str(snap), "hub": hub}, tmp_path / "s1")
    assert prepare_recipe(r, progress=False)["p"]["nq"]["rows"] == 5  # the one split the config map names

    # a split the snapshot lacks, a config it lacks, no split named among several: refused, naming what there is
    for hub_path, message in (({"split": "paq"}, r"has no split 'paq'; its splits are \['msmarco', 'nq'\]"),
                              ({"config": "other", "split": "nq"}, r"config 'other'"),
                              ({}, r"has splits \['msmarco', 'nq'\]; name one")):
        bad = _recipe(minilm, "unsupervised", {"name": "x", "path": str(snap),
                                               "hub": {"path": {"repo": "r/x", **hub_path}}}, tmp_path / "s2")
        with pytest.raises(DataError, match=message):
            prepare_recipe(bad, progress=False)
        assert not (tmp_path / "s2" / "x" / "index.json").exists()

    # the distillation layout: three configs of one snapshot, ids resolved, scores stored as text parsed
    kd = tmp_path / "kd"
    kd_rows = _kd_snapshot(kd, flag_examples)
    repo = "lightonai/ms-marco-en-bge-gemma"
    src = {"name": "gemma", "path": str(kd), "queries_path": str(kd), "documents_path": str(kd),
           "hub": {f: {"repo": repo, "config": c, "split": "train"}
                   for f, c in (("path", "train"), ("queries_path", "queries"), ("documents_path", "documents"))}}
    r = _recipe(minilm, "distillation", src, tmp_path / "s3", docs_per_query=6)
    assert prepare_recipe(r, progress=False)["p"]["gemma"]["rows"] == 12
    b = next(iter(GlobalBatchLoader(r, "p", 0, 1)))
    want = torch.tensor([json.loads(kd_rows[int(i)]["scores"]) for i in b.row_ids], dtype=torch.float32)
    assert torch.equal(b.scores.float(), want)
    # tokens as PyLate's ColBERTCollator makes them from the same texts
    import pylate

    ph = r.phase("p")
    model = pylate.models.ColBERT(minilm, device="cpu", query_length=ph.effective_query_length,
                                  document_length=ph.effective_document_length)
    collator = pylate.utils.ColBERTCollator(tokenize_fn=model.tokenize, prompts={
        "query": ph.prompts.query, "documents": ph.prompts.document})
    ref = collator([{"query": kd_rows[int(i)]["query"], "documents": kd_rows[int(i)]["texts"]} for i in b.row_ids])
    n = ref["query_input_ids"].shape[1]
    assert torch.equal(b.queries["input_ids"][:, :n], ref["query_input_ids"])
    d = ref["documents_input_ids"]
    ours = b.documents["input_ids"]
    width = min(ours.shape[1], d.shape[1])
    mask = b.documents["attention_mask"].bool()
    assert torch.equal(ours[:, :width][mask[:, :width]], d.view(-1, d.shape[-1])[:, :width][mask[:, :width]])

    # the same snapshot as huggingface_hub's cache keeps it (symlinks into blobs/): the same rows
    cache = tmp_path / "hf" / "datasets--lightonai--ms-marco-en-bge-gemma"
    snap_dir = cache / "snapshots" / ("c" * 40)
    (cache / "blobs").mkdir(parents=True)
    for f in sorted(kd.rglob("*")):
        if f.is_file():
            blob = cache / "blobs" / f"{f.parent.name}-{f.name}"
            blob.write_bytes(f.read_bytes())
            link = snap_dir / f.relative_to(kd)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    src_cache = dict(src, path=str(snap_dir), queries_path=str(snap_dir), documents_path=str(snap_dir))
    r2 = _recipe(minilm, "distillation", src_cache, tmp_path / "s4", docs_per_query=6)
    assert prepare_recipe(r2, progress=False)["p"]["gemma"]["rows"] == 12
    b2 = next(iter(GlobalBatchLoader(r2, "p", 0, 1)))
    assert torch.equal(b2.scores, b.scores) and torch.equal(b2.documents["input_ids"], b.documents["input_ids"])
