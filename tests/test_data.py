"""Data path: PyLate token parity, single-source global batches, exact resume, restartable/parallel prepare."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from colbertzero.data import DataError, GlobalBatchLoader, index_recipe, prepare_recipe
from colbertzero.data.tokenize import tokenizer_source
from colbertzero.files import temp_beside, temps_in
from colbertzero.recipe import recipe_from_dict

FLAG = "train/flagembedding-examples"


def make_recipe(phases: dict, **model) -> "Recipe":  # noqa: F821
    full = {}
    for name, ph in phases.items():
        full[name] = {"lr": 1e-5, "resources": {"gpus_per_node": 0, "cpu_tasks_per_node": 2}, **ph}
    return recipe_from_dict({"name": "test", "model": model, "phases": full})


def read_jsonl(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in Path(path).read_text().split("\n") if line.strip()
    ]  # not splitlines: U+2028 in text


@pytest.fixture(scope="session")
def corpus(shared_data) -> list[dict]:
    return read_jsonl(shared_data / "beir/msmarco-5k/corpus.jsonl")


@pytest.fixture(scope="session")
def qrel_pairs(shared_data, corpus, tmp_path_factory) -> Path:
    """Real (query, relevant passage) pairs from the MS MARCO cut: the first judged passage of each query."""
    texts = {d["_id"]: d["text"] for d in corpus}
    queries = {q["_id"]: q["text"] for q in read_jsonl(shared_data / "beir/msmarco-5k/queries.jsonl")}
    first: dict[str, str] = {}
    for line in (shared_data / "beir/msmarco-5k/qrels/test.tsv").read_text().split("\n"):
        if not line:
            continue
        q, d, _ = line.split("\t")
        if d in texts:
            first.setdefault(q, d)
    out = tmp_path_factory.mktemp("pairs") / "qrel-pairs.jsonl"
    out.write_text("".join(json.dumps({"query": queries[q], "document": texts[d]}) + "\n" for q, d in first.items()))
    return out


@pytest.fixture(scope="session")
def corpus_sources(corpus, tmp_path_factory) -> dict[str, Path]:
    """The 5,000 MS MARCO passages as (first words, passage) pairs in the three input formats, uneven sizes."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": " ".join(d["text"].split()[:8]), "p": d["text"], "extra": i} for i, d in enumerate(corpus)]
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2400]))
    pq.write_table(pa.Table.from_pylist(rows[2400:3900]), d / "b.parquet", row_group_size=300)
    datasets.Dataset.from_list(rows[3900:4500]).save_to_disk(str(d / "c"))
    return {"a": d / "a.jsonl", "b": d / "b.parquet", "c": d / "c"}


# ---------------------------------------------------------------- parity with PyLate's collator
def _widen(ids: torch.Tensor, mask: torch.Tensor, width: int, pad_id: int):
    assert ids.shape[1] <= width
    out = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype)
    m = torch.zeros((ids.shape[0], width), dtype=mask.dtype)
    out[:, : ids.shape[1]] = ids
    m[:, : ids.shape[1]] = mask
    return out, m


def _assert_same(ours: dict, theirs_ids: torch.Tensor, theirs_mask: torch.Tensor, pad_id: int, what: str):
    ids, mask = _widen(ours["input_ids"], ours["attention_mask"], theirs_ids.shape[1], pad_id)
    assert torch.equal(ids, theirs_ids), f"{what}: input_ids differ from PyLate's"
    assert torch.equal(mask, theirs_mask), f"{what}: attention_mask differs from PyLate's"


PARITY = [
    ("minilm", True, {}),
    ("minilm", False, {}),
    ("tiny_modernbert", True, {}),
    ("tiny_modernbert", False, {}),
    ("modernbert_base", True, {}),  # ModernBERT-base's architecture with a byte-level BPE tokenizer of its kind
    ("minilm", True, {"do_query_expansion": False}),
    ("minilm", False, {"attend_to_expansion_tokens": True}),
]


@pytest.mark.parametrize(
    "model_name,prompts,model_cfg",
    PARITY,
    ids=[f"{m}-{'prompts' if p else 'plain'}-{'-'.join(c) or 'default'}" for m, p, c in PARITY],
)
def test_token_parity_with_pylate(request, shared_data, qrel_pairs, tmp_path, model_name, prompts, model_cfg):
    import pylate.models
    import pylate.utils

    init = request.getfixturevalue(model_name)
    flag = shared_data / FLAG
    common = {"init": init, "prompts": {"enabled": prompts}, "query_length": 24, "document_length": 60}
    r = make_recipe(
        {
            "unsup": {
                **common,
                "kind": "unsupervised",
                "global_batch_size": 40,
                "data": {"shards_dir": str(tmp_path / "u"), "sources": [{"name": "pairs", "path": str(qrel_pairs)}]},
            },
            "sup": {
                **common,
                "kind": "supervised",
                "init": {"from": "unsup"},
                "global_batch_size": 10,
                "data": {
                    "shards_dir": str(tmp_path / "s"),
                    "max_negatives": 4,
                    "rows_per_shard": 3,
                    "sources": [
                        {
                            "name": "ms",
                            "path": str(flag / "msmarco.jsonl"),
                            "columns": {"positive": "pos", "negatives": "neg"},
                        }
                    ],
                },
            },
            "kd": {
                **common,
                "kind": "distillation",
                "init": {"from": "sup"},
                "global_batch_size": 11,
                "data": {
                    "shards_dir": str(tmp_path / "k"),
                    "docs_per_query": 6,
                    "sources": [
                        {
                            "name": "llara",
                            "path": str(flag / "llara_toy_finetune_data.jsonl"),
                            "columns": {"documents": "pos,neg", "scores": "pos_scores,neg_scores"},
                        }
                    ],
                },
            },
        },
        **model_cfg,
    )
    assert tokenizer_source(r, "kd") == init  # a chained phase tokenizes with the chain's first model
    prepare_recipe(r, progress=False)
    ph = r.phase("unsup")
    model = pylate.models.ColBERT(
        init,
        device="cpu",
        query_length=ph.effective_query_length,
        document_length=ph.effective_document_length,
        **model_cfg,
    )
    qp, dp = (ph.prompts.query, ph.prompts.document) if prompts else (None, None)
    names = {"query": qp, "positive": dp, "negatives": dp, "documents": dp}
    collator = pylate.utils.ColBERTCollator(
        tokenize_fn=model.tokenize, prompts={k: v for k, v in names.items() if v} or None
    )
    pad = model.tokenizer.pad_token_id

    # unsupervised: (query, document)
    raw = read_jsonl(qrel_pairs)
    b = GlobalBatchLoader(r, "unsup").batch(0)
    rows = [raw[i] for i in b.row_ids.tolist()]
    ref = collator([{"query": x["query"], "positive": x["document"]} for x in rows])
    _assert_same(b.queries, ref["query_input_ids"], ref["query_attention_mask"], pad, "queries")
    _assert_same(b.documents, ref["positive_input_ids"], ref["positive_attention_mask"], pad, "documents")
    assert b.queries["input_ids"].shape[1] <= ph.effective_query_length
    assert b.documents["input_ids"].shape[1] == int(b.documents["attention_mask"].sum(1).max())  # longest in batch

    # supervised: positive then 4 hard negatives
    raw = read_jsonl(flag / "msmarco.jsonl")
    b = GlobalBatchLoader(r, "sup").batch(0)
    assert b.n_docs == 5
    rows = [raw[i] for i in b.row_ids.tolist()]
    ref = collator([{"query": x["query"], "positive": x["pos"][0], "negatives": x["neg"][:4]} for x in rows])
    _assert_same(b.queries, ref["query_input_ids"], ref["query_attention_mask"], pad, "queries")
    docs = {k: v.view(len(rows), 5, -1) for k, v in b.documents.items()}
    _assert_same(
        {k: v[:, 0] for k, v in docs.items()},
        ref["positive_input_ids"],
        ref["positive_attention_mask"],
        pad,
        "positives",
    )
    _assert_same(
        {k: v[:, 1:].reshape(len(rows) * 4, -1) for k, v in docs.items()},
        ref["negatives_input_ids"],
        ref["negatives_attention_mask"],
        pad,
        "negatives",
    )

    # distillation: 6 scored documents per query, teacher order
    raw = read_jsonl(flag / "llara_toy_finetune_data.jsonl")
    b = GlobalBatchLoader(r, "kd").batch(0)
    rows = [raw[i] for i in b.row_ids.tolist()]
    ref = collator(
        [
            {
                "query": x["query"],
                "documents": (x["pos"] + x["neg"])[:6],
                "scores": (x["pos_scores"] + x["neg_scores"])[:6],
            }
            for x in rows
        ]
    )
    _assert_same(b.queries, ref["query_input_ids"], ref["query_attention_mask"], pad, "kd queries")
    _assert_same(b.documents, ref["documents_input_ids"], ref["documents_attention_mask"], pad, "kd documents")
    assert torch.equal(b.scores, ref["label"])


# ---------------------------------------------------------------- single source per step, ranks, epochs
def _corpus_recipe(corpus_sources, tmp_path, minilm, weights=(None, None, None), **data):
    srcs = [
        {"name": "a", "path": str(corpus_sources["a"]), "columns": {"query": "q", "document": "p"}},
        {"name": "b", "path": str(corpus_sources["b"]), "columns": {"query": "q", "positive": "p"}},
        {"name": "c", "path": str(corpus_sources["c"]), "columns": {"query": "q", "document": "p"}, "max_rows": 550},
    ]
    for s, w in zip(srcs, weights):
        if w is not None:
            s["weight"] = w
    gbs = data.pop("global_batch_size", 32)
    return make_recipe(
        {
            "p": {
                "kind": "unsupervised",
                "init": minilm,
                "global_batch_size": gbs,
                "query_length": 16,
                "document_length": 48,
                "prompts": {"enabled": False},
                "data": {"shards_dir": str(tmp_path / "shards"), "rows_per_shard": 500, "sources": srcs, **data},
            }
        }
    )


@pytest.fixture(scope="module")
def corpus_prepared(corpus_sources, tmp_path_factory, minilm):
    tmp = tmp_path_factory.mktemp("corpus-prep")
    r = _corpus_recipe(corpus_sources, tmp, minilm)
    summary = prepare_recipe(r, progress=False)
    return tmp, summary


def test_formats_and_index(corpus_prepared, corpus):
    import datasets

    tmp, summary = corpus_prepared
    s = summary["p"]
    assert {k: v["rows"] for k, v in s.items()} == {"a": 2400, "b": 1500, "c": 550}
    assert {k: v["shards"] for k, v in s.items()} == {"a": 5, "b": 3, "c": 2}
    index = json.loads((tmp / "shards/a/index.json").read_text())
    assert index["rows"] == 2400 and index["n_docs"] == 1 and index["dtype"] == "uint16"
    assert sum(index["length_histogram"]["document"]) == 2400
    assert index["tokens"]["document"] == sum(i * n for i, n in enumerate(index["length_histogram"]["document"]))
    assert max(i for i, n in enumerate(index["length_histogram"]["document"]) if n) <= 48
    assert all(len(e["sha256"]) == 64 for e in index["shards"])
    assert index["settings"]["query_prompt"] == "" and index["tokenizer"]["sha256"]
    # shards are `datasets`' on-disk format: it memory-maps them as they are
    ds = datasets.Dataset.from_file(str(tmp / "shards/b/shard-00001.arrow"))
    assert len(ds) == 500 and set(ds.column_names) == {"query", "documents", "max_doc_len"}


def test_single_source_global_batches_on_two_ranks(corpus_sources, corpus_prepared, minilm):
    tmp, _ = corpus_prepared
    r = _corpus_recipe(corpus_sources, tmp, minilm, epochs=2.0)
    G = 32
    ranks = [GlobalBatchLoader(r, "p", rank=k, world_size=2) for k in range(2)]
    whole = GlobalBatchLoader(r, "p", rank=0, world_size=1)
    sizes = {"a": 2400, "b": 1500, "c": 550}
    assert ranks[0].total_steps == sum(2 * (n // G) for n in sizes.values())
    seen: dict[tuple[str, int], set] = {}
    per_source = {k: 0 for k in sizes}
    switches = 0
    for step, (b0, b1, bw) in enumerate(zip(ranks[0], ranks[1], whole)):
        assert b0.step == b1.step == step and b0.source == b1.source == bw.source  # ONE source, same on every rank
        switches += step > 0 and bw.source != prev  # noqa: F821 - prev is set from step 1 on
        prev = bw.source  # noqa: F841
        per_source[b0.source] += 1
        rows = torch.cat([b0.row_ids, b1.row_ids])
        assert len(set(rows.tolist())) == G and len(b0.row_ids) == G // 2
        assert torch.equal(rows, bw.row_ids)  # the ranks split the very global batch a single process sees
        for k in ("input_ids", "attention_mask"):  # padded to the global batch's longest: same shapes on all ranks
            assert torch.equal(torch.cat([b0.queries[k], b1.queries[k]]), bw.queries[k])
            assert torch.equal(torch.cat([b0.documents[k], b1.documents[k]]), bw.documents[k])
        epoch = (per_source[b0.source] - 1) // (sizes[b0.source] // G)
        bucket = seen.setdefault((b0.source, epoch), set())
        assert not bucket & set(rows.tolist())  # no row twice within a source's epoch
        bucket |= set(rows.tolist())
    assert per_source == {k: 2 * (n // G) for k, n in sizes.items()}
    assert switches > 10  # sources interleave
    assert all(len(v) == (sizes[s] // G) * G for (s, _), v in seen.items())
    assert ranks[0].consumed() == {k: v * G for k, v in per_source.items()}


def test_sampling_by_weights(corpus_sources, corpus_prepared, minilm):
    tmp, _ = corpus_prepared
    r = _corpus_recipe(corpus_sources, tmp, minilm, sampling="weights", weights=(1.0, 1.0, 2.0))
    loader = GlobalBatchLoader(r, "p")
    counts = {k: 0 for k in "abc"}
    for step in range(loader.total_steps):
        counts[loader.source_at(step)] += 1
    total = 2400 // 32 + 1500 // 32 + 550 // 32  # same number of steps as proportional sampling
    assert loader.total_steps == total
    assert counts["c"] == total // 2 and abs(counts["a"] - counts["b"]) <= 1  # c: 17 batches a epoch, used 4×


@pytest.mark.parametrize("data", [{"epochs": 2.0}, {"epochs": 1.5, "sampling": "weights"}, {"max_steps": 7}])
def test_plan_counts_the_steps_the_loader_takes(corpus_sources, corpus_prepared, minilm, data):
    """Once the shards exist, `plan` (projection, budget check) counts exactly the loader's steps: each source
    drops its last partial batch, which a count over the pooled rows would not."""
    from colbertzero.plan import plan_phase

    tmp, _ = corpus_prepared
    data = dict(data)
    max_steps = data.pop("max_steps", None)
    weights = (1.0, 1.0, 2.0) if data.get("sampling") == "weights" else (None, None, None)
    r = _corpus_recipe(corpus_sources, tmp, minilm, weights=weights, **data)
    if max_steps:
        r = r.model_copy(update={"phases": {"p": r.phase("p").model_copy(update={"max_steps": max_steps})}})
    p = plan_phase(r, "p")
    assert p.rows_from == "shard index" and p.rows == 2400 + 1500 + 550
    assert p.total_steps == GlobalBatchLoader(r, "p").total_steps
    assert max_steps or p.total_steps < (p.rows * data["epochs"]) // 32  # the pooled count would be off


def _digest(b) -> str:
    parts = [
        b.source,
        b.queries["input_ids"],
        b.queries["attention_mask"],
        b.documents["input_ids"],
        b.documents["attention_mask"],
        b.scores,
        b.row_ids,
    ]
    return repr([p.tolist() if isinstance(p, torch.Tensor) else p for p in parts])


@pytest.mark.parametrize("bucketing", [False, True])
def test_exact_resume_at_random_steps(corpus_sources, corpus_prepared, minilm, bucketing):
    tmp, _ = corpus_prepared
    r = _corpus_recipe(corpus_sources, tmp, minilm, epochs=1.5, length_bucketing=bucketing, global_batch_size=16)
    full, states = [], []
    loader = GlobalBatchLoader(r, "p", rank=1, world_size=2)
    for b in loader:
        full.append(_digest(b))
        states.append(loader.state_dict())  # taken after training on step b.step
    assert len(full) == loader.total_steps
    rng = random.Random(7)
    for k in sorted(rng.sample(range(len(full) - 1), 4)) + [0]:
        fresh = GlobalBatchLoader(r, "p", rank=1, world_size=2)  # a restarted process
        fresh.load_state_dict(json.loads(json.dumps(states[k])))  # through a JSON checkpoint
        assert fresh.step == k + 1
        assert [_digest(b) for b in fresh] == full[k + 1 :]
    if bucketing:  # sorted windows: a batch's documents are of similar length
        b = GlobalBatchLoader(r, "p").batch(3)
        lens = b.documents["attention_mask"].sum(1).float()
        assert (lens.max() - lens.min()) < 20
    other = GlobalBatchLoader(r, "p", rank=1, world_size=2, seed=1)
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(states[3])


def test_resume_distillation(shared_data, tmp_path, minilm):
    r = make_recipe(
        {
            "kd": {
                "kind": "distillation",
                "init": minilm,
                "global_batch_size": 4,
                "query_length": 16,
                "document_length": 40,
                "data": {
                    "shards_dir": str(tmp_path),
                    "docs_per_query": 20,
                    "epochs": 3,
                    "length_bucketing": True,
                    "sources": [
                        {
                            "name": n,
                            "path": str(shared_data / FLAG / f"{n}.jsonl"),
                            "columns": {"documents": "pos,neg", "scores": "pos_scores,neg_scores"},
                        }
                        for n in ("msmarco", "nq")
                    ],
                },
            }
        }
    )
    prepare_recipe(r, progress=False)
    loader = GlobalBatchLoader(r, "kd", rank=0, world_size=2)
    full = [_digest(b) for b in loader]
    assert len(full) == 12
    again = GlobalBatchLoader(r, "kd", rank=0, world_size=2)
    again.load_state_dict({**loader.state_dict(), "step": 5})
    assert [_digest(b) for b in again] == full[5:]
    b = loader.batch(0)
    assert b.scores.shape == (2, 20) and b.documents["input_ids"].shape[0] == 40


# ---------------------------------------------------------------- prepare: restart, parallel, array tasks
def _shas(folder: Path) -> dict[str, str]:
    out = {}
    for ix in folder.rglob("index.json"):
        index = json.loads(ix.read_text())
        out.update({f"{index['source']}/{e['file']}": e["sha256"] for e in index["shards"]})
        for t, tab in index.get("tables", {}).items():
            out.update({f"{index['source']}/{t}/{e['file']}": e["sha256"] for e in tab["shards"]})
    return out


def _prep_recipe(shared_data, corpus_sources, out: Path, minilm):
    return make_recipe(
        {
            "u": {
                "kind": "unsupervised",
                "init": minilm,
                "global_batch_size": 8,
                "query_length": 16,
                "document_length": 48,
                "data": {
                    "shards_dir": str(out / "u"),
                    "rows_per_shard": 400,
                    "sources": [
                        {
                            "name": "a",
                            "path": str(corpus_sources["a"]),
                            "columns": {"query": "q", "document": "p"},
                            "max_rows": 1600,
                        }
                    ],
                },
            },
            "k": {
                "kind": "distillation",
                "init": {"from": "u"},
                "global_batch_size": 4,
                "query_length": 16,
                "document_length": 48,
                "data": {
                    "shards_dir": str(out / "k"),
                    "docs_per_query": 8,
                    "rows_per_shard": 4,
                    "sources": [
                        {
                            "name": "nq",
                            "path": str(shared_data / FLAG / "nq.jsonl"),
                            "columns": {"documents": "pos,neg", "scores": "pos_scores,neg_scores"},
                        }
                    ],
                },
            },
        }
    )


def test_prepare_restart_parallel_and_array(shared_data, corpus_sources, tmp_path, minilm):
    one = _prep_recipe(shared_data, corpus_sources, tmp_path / "one", minilm)
    s1 = prepare_recipe(one, workers=1, progress=False)
    ref = _shas(tmp_path / "one")
    assert sum(k.startswith("a/") for k in ref) == 4 and sum(k.startswith("nq/shard") for k in ref) == 3

    # restart after a kill: one shard gone, one shard without its sidecar (half written), a stray temp file
    folder = tmp_path / "one/u/a"
    (folder / "shard-00001.arrow").unlink()
    (folder / "shard-00002.meta.json").unlink()
    stray = temp_beside(folder / "shard-00003.arrow")  # what a killed writer leaves
    stray.write_bytes(b"partial")
    (folder / "index.json").unlink()
    s2 = prepare_recipe(one, workers=1, progress=False)
    assert (s2["u"]["a"]["written"], s2["u"]["a"]["skipped"]) == (2, 2)
    assert s2["k"]["nq"]["status"] == "up to date"
    assert _shas(tmp_path / "one") == ref  # deterministic shards
    assert not stray.exists() and not temps_in(folder)

    # two worker processes give the same bytes
    par = _prep_recipe(shared_data, corpus_sources, tmp_path / "par", minilm)
    s3 = prepare_recipe(par, workers=2, progress=False)
    assert s3["u"]["a"]["written"] == 4 and _shas(tmp_path / "par") == ref

    # Slurm array: 2 tasks do their shares, then the index step
    arr = _prep_recipe(shared_data, corpus_sources, tmp_path / "arr", minilm)
    t0 = prepare_recipe(arr, shard_range=(0, 2), progress=False)
    assert t0["u"]["a"]["status"] == "shards done, index pending" and not (tmp_path / "arr/u/a/index.json").exists()
    with pytest.raises(DataError, match="not finished"):
        index_recipe(arr)
    prepare_recipe(arr, shard_range=(1, 2), progress=False)
    index_recipe(arr)
    assert _shas(tmp_path / "arr") == ref
    assert s1["u"]["a"]["status"] == "prepared"
