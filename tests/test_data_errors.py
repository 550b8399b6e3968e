"""Bad input → a DataError naming the file, the row and the field; nothing marked prepared. Damaged shards, foreign
indexes and changed settings are refused when the loader opens them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from colbertzero.data import DataError, GlobalBatchLoader, prepare_recipe
from colbertzero.recipe import recipe_from_dict

FLAG = "train/flagembedding-examples"


def recipe(kind: str, init: str, shards: Path, source: dict, **extra) -> "Recipe":  # noqa: F821
    data = {"shards_dir": str(shards), "sources": [{"name": "src", **source}], **extra.pop("data", {})}
    phase = {"kind": kind, "init": init, "lr": 1e-5, "global_batch_size": 2, "query_length": 16,
             "document_length": 32, "data": data, **extra}
    return recipe_from_dict({"name": "bad", "phases": {"p": phase}})


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            f.write(b"\n")
    return path


def flag_rows(shared_data, name="msmarco") -> list[dict]:
    return [json.loads(x) for x in (shared_data / FLAG / f"{name}.jsonl").read_text().split("\n") if x.strip()]


def expect_refused(r, match: str):
    with pytest.raises(DataError, match=match) as e:
        prepare_recipe(r, progress=False)
    folder = Path(r.phase("p").data.shards_dir) / "src"
    assert not (folder / "index.json").exists(), "a refused source must not be marked prepared"
    return str(e.value)


# ---------------------------------------------------------------- columns
def test_missing_mapped_column(shared_data, tmp_path, minilm):
    path = shared_data / FLAG / "msmarco.jsonl"
    r = recipe(
        "unsupervised", minilm, tmp_path, {"path": str(path), "columns": {"query": "question", "document": "pos"}}
    )
    msg = expect_refused(r, r"no column 'question' for role 'query'")
    assert str(path) in msg and "row 0 (line 1)" in msg and "columns" in msg


def test_misnamed_default_column(shared_data, tmp_path, minilm):
    r = recipe("supervised", minilm, tmp_path, {"path": str(shared_data / FLAG / "msmarco.jsonl")})
    expect_refused(r, r"no column 'positive' for role 'positive'.*'neg', 'neg_scores', 'pos'")


def test_parquet_missing_column_and_unknown_role(tmp_path, minilm):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"q": ["a b"], "p": ["c d"]}), path)
    expect_refused(
        recipe("unsupervised", minilm, tmp_path / "s", {"path": str(path)}),
        rf"{path} has no column 'query' for role 'query'; its columns are \['q', 'p'\]",
    )
    expect_refused(
        recipe("unsupervised", minilm, tmp_path / "s", {"path": str(path), "columns": {"passage": "p"}}),
        r"unknown role 'passage' for a unsupervised source; roles: query, document",
    )


# ---------------------------------------------------------------- text values
BAD_TEXT = [
    ({"query": ""}, r"row 3 \(line 4\): column 'query' \(query\) is empty text"),
    ({"query": "  \t "}, r"row 3 \(line 4\): column 'query' \(query\) is empty text"),
    ({"query": 42}, r"row 3 \(line 4\): column 'query' \(query\) holds int, expected text"),
    ({"document": None}, r"row 3 \(line 4\): column 'document' \(document\) holds null, expected text"),
    ({"document": []}, r"row 3 \(line 4\): column 'document' \(document\) is an empty list"),
]


@pytest.mark.parametrize("change,match", BAD_TEXT, ids=["empty", "blank", "int", "null", "empty-list"])
def test_bad_text_names_file_and_row(shared_data, tmp_path, minilm, change, match):
    rows = [{"query": r["query"], "document": r["pos"]} for r in flag_rows(shared_data)]
    rows[3].update(change)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    msg = expect_refused(recipe("unsupervised", minilm, tmp_path / "s", {"path": str(path)}), match)
    assert str(path) in msg and "phase p, source src" in msg


def test_invalid_utf8_and_json(shared_data, tmp_path, minilm):
    rows = [{"query": r["query"], "document": r["pos"][0]} for r in flag_rows(shared_data)]
    raw = json.dumps(rows[2], ensure_ascii=False).encode()
    lines = rows[:2] + [b"", raw.replace(b"the", b"th\xff\xfe", 1)] + rows[3:]  # a blank line before: line 4
    path = write_jsonl(tmp_path / "utf8.jsonl", lines)
    expect_refused(
        recipe("unsupervised", minilm, tmp_path / "s", {"path": str(path)}),
        r"utf8.jsonl: row 2 \(line 4\): invalid UTF-8",
    )
    path = write_jsonl(tmp_path / "json.jsonl", rows[:5] + [b'{"query": "a", "document": '] + rows[5:])
    expect_refused(
        recipe("unsupervised", minilm, tmp_path / "s", {"path": str(path)}),
        r"json.jsonl: row 5 \(line 6\): not valid JSON",
    )


# ---------------------------------------------------------------- distillation rows
@pytest.fixture()
def kd_tables(shared_data):
    beir = shared_data / "beir/msmarco-5k"
    qids = [json.loads(x)["_id"] for x in (beir / "queries.jsonl").read_text().split("\n")[:4] if x.strip()]
    dids = [json.loads(x)["_id"] for x in (beir / "corpus.jsonl").read_text().split("\n")[:40] if x.strip()]
    rows = [
        {"qid": q, "dids": dids[i * 8 : (i + 1) * 8], "s": [float(8 - k) for k in range(8)]} for i, q in enumerate(qids)
    ]
    src = {
        "queries_path": str(beir / "queries.jsonl"),
        "documents_path": str(beir / "corpus.jsonl"),
        "columns": {"query_id": "qid", "document_ids": "dids", "scores": "s"},
    }
    return rows, src


KD_BAD = [
    (
        lambda r: r[1]["dids"].__setitem__(2, "no-such-doc"),
        r"row 1 \(line 2\): document id 'no-such-doc' is not in "
        r".*corpus.jsonl",
    ),
    (
        lambda r: r[2].__setitem__("qid", "no-such-query"),
        r"row 2 \(line 3\): query id 'no-such-query' is not in "
        r".*queries.jsonl",
    ),
    (lambda r: r[0]["s"].pop(), r"row 0 \(line 1\): 8 document_ids but 7 scores; they must pair up"),
    (
        lambda r: r[3]["s"].__setitem__(5, float("nan")),
        r"row 3 \(line 4\): column 's' \(scores\[5\]\) is nan; teacher "
        r"scores must be finite",
    ),
    (lambda r: r[3]["s"].__setitem__(0, float("inf")), r"row 3 \(line 4\): column 's' \(scores\[0\]\) is inf"),
    (lambda r: (r[1]["dids"].pop(), r[1]["s"].pop()), r"row 1 \(line 2\): 7 scored documents, docs_per_query is 8"),
]


@pytest.mark.parametrize(
    "spoil,match", KD_BAD, ids=["unknown-doc", "unknown-query", "lengths", "nan", "inf", "too-few"]
)
def test_bad_distillation_rows(kd_tables, tmp_path, minilm, spoil, match):
    rows, src = kd_tables
    path = write_jsonl(tmp_path / "good.jsonl", rows)
    r = recipe("distillation", minilm, tmp_path / "s", {"path": str(path), **src}, data={"docs_per_query": 8})
    prepare_recipe(r, progress=False)  # the clean rows prepare
    assert GlobalBatchLoader(r, "p").batch(0).scores.shape == (2, 8)
    spoil(rows)
    write_jsonl(tmp_path / "bad.jsonl", rows)
    r = recipe(
        "distillation",
        minilm,
        tmp_path / "s2",
        {"path": str(tmp_path / "bad.jsonl"), **src},
        data={"docs_per_query": 8},
    )
    expect_refused(r, match)


# ---------------------------------------------------------------- negatives
def test_uneven_negatives_fewest_by_default_refused_or_padded_on_request(shared_data, tmp_path, minilm):
    rows = flag_rows(shared_data)
    for r in rows:
        r["neg"] = r["neg"][:3]
    rows[5]["neg"] = rows[5]["neg"][:1]
    rows[6]["neg"] = rows[6]["neg"][:2]
    rows[6]["neg"] = rows[6]["neg"] + rows[7]["neg"][:3]  # 5 negatives: 2 beyond max_negatives=3
    path = write_jsonl(tmp_path / "few.jsonl", rows)
    src = {"path": str(path), "columns": {"positive": "pos", "negatives": "neg"}}
    n_rows = len(rows)
    # the paper's script: per source, the fewest any row has (here 1); that drops most negatives here, which is
    # refused by default (data.max_drop_fraction 0.05) with the counts and the ways out
    expect_refused(
        recipe("supervised", minilm, tmp_path / "f", src, data={"max_negatives": 3}),
        rf"source src: data.negatives fewest keeps 1 hard negative\(s\) a row and so drops {(n_rows - 1) * 2} of the "
        rf"{1 + 3 * (n_rows - 1)} its rows hold within max_negatives .*above data.max_drop_fraction 0.05.*"
        r"raise data.max_drop_fraction to accept it",
    )
    # accepted: every dropped negative counted in the index
    s = prepare_recipe(recipe("supervised", minilm, tmp_path / "f", src,
                              data={"max_negatives": 3, "max_drop_fraction": 1.0}), progress=False)["p"]["src"]
    assert s["n_docs"] == 2
    assert s["dropped"] == {"negatives": 2 + (n_rows - 1) * 2, "negatives_beyond_max_negatives": 2,
                            "negatives_beyond_kept": (n_rows - 1) * 2, "rows": 0}
    for r in rows:
        r["neg"] = r["neg"][:3]
    rows[5]["neg"] = rows[5]["neg"][:1]
    path = write_jsonl(tmp_path / "few.jsonl", rows)
    expect_refused(
        recipe("supervised", minilm, tmp_path / "s", src, data={"max_negatives": 5, "negatives": "refuse"}),
        r"few.jsonl: row 5 \(line 6\): 1 row\(s\) have fewer than 3 hard negatives \(min\(max_negatives=5, "
        r"most in a row=3\)",
    )
    r = recipe(
        "supervised",
        minilm,
        tmp_path / "s",
        src,
        data={"max_negatives": 5, "negatives": "pad"},
        global_batch_size=10,
    )
    s = prepare_recipe(r, progress=False)["p"]["src"]
    assert s["n_docs"] == 4 and s["written"] == 0  # only the index step re-ran: the shards were fine
    b = GlobalBatchLoader(r, "p").batch(0)
    docs = b.documents["input_ids"].view(10, 4, -1)
    i = b.row_ids.tolist().index(5)
    assert torch.equal(docs[i, 1], docs[i, 2]) and torch.equal(docs[i, 1], docs[i, 3])  # its one negative, repeated
    j = b.row_ids.tolist().index(4)
    assert not torch.equal(docs[j, 1], docs[j, 2])


def test_prepared_source_whose_input_turns_bad_is_unmarked(shared_data, tmp_path, minilm):
    rows = [{"query": r["query"], "document": r["pos"][0]} for r in flag_rows(shared_data)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    r = recipe("unsupervised", minilm, tmp_path / "s", {"path": str(path)})
    prepare_recipe(r, progress=False)
    assert (tmp_path / "s/src/index.json").exists()
    rows[7]["query"] = ""
    write_jsonl(path, rows)
    expect_refused(r, r"row 7 \(line 8\)")


# ---------------------------------------------------------------- loader checks
def run_cli(args: list[str]) -> tuple[int, str, str]:
    # Without the local Slurm cluster a session-scoped fixture may have exported: these are the data's refusals, and
    # validate would add the cluster's own (this CPU recipe's resources against its partitions).
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    p = subprocess.run([sys.executable, "-m", "colbertzero", *args], capture_output=True, text=True,
                       env={**env, "HF_HUB_OFFLINE": "1"})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture()
def prepared(shared_data, tmp_path, minilm):
    rows = [
        {"query": r["query"], "document": r["pos"][0]}
        for n in ("msmarco", "nq", "nli")
        for r in flag_rows(shared_data, n)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    r = recipe("unsupervised", minilm, tmp_path / "s", {"path": str(path)}, data={"rows_per_shard": 10})
    prepare_recipe(r, progress=False)
    return r, tmp_path / "s/src"


def test_not_prepared(tmp_path, minilm, shared_data):
    r = recipe("unsupervised", minilm, tmp_path / "none", {"path": str(shared_data / FLAG / "nli.jsonl")})
    with pytest.raises(DataError, match=r"source src: not prepared .*index.json is missing.*colbertzero prepare"):
        GlobalBatchLoader(r, "p")


def test_truncated_shard(prepared):
    r, folder = prepared
    shard = folder / "shard-00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(
        DataError,
        match=r"shard-00001.arrow: \d+ bytes, the index says \d+: the shard is truncated or "
        r"altered",
    ):
        GlobalBatchLoader(r, "p")
    # prepare notices and rewrites only that shard
    s = prepare_recipe(r, progress=False)["p"]["src"]  # its size check sees it, no --verify needed
    assert (s["written"], s["skipped"]) == (1, 2)
    GlobalBatchLoader(r, "p")


def test_altered_shard(prepared):
    r, folder = prepared
    shard = folder / "shard-00002.arrow"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the full hash can tell
    loader = GlobalBatchLoader(r, "p")  # the fast check passes
    # validate hashes every prepared shard: refused, naming the shard
    recipe_file = folder.parent.parent / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(r.resolved()))
    cpu = "phases.p.resources.gpus_per_node=0"
    code, out, err = run_cli(["validate", str(recipe_file), cpu])
    assert code == 2 and "refused: 1 prepared shard(s) do not match" in err and "shard-00002.arrow: sha256" in err
    assert run_cli(["validate", str(recipe_file), cpu, "--no-hashes"])[0] == 0
    # what each training rank hashes before the first step (its share of the shards): only shard 2's owner sees it
    assert [len(loader.verify_share(k, 2)) for k in range(2)] == [1, 0]
    assert "shard-00002.arrow: sha256 differs" in loader.verify_share(0, 2)[0]
    with pytest.raises(DataError, match=r"shard-00002.arrow: sha256 differs"):
        GlobalBatchLoader(r, "p", verify_hashes=True)
    os.utime(shard)  # a copy without preserved times: the moved mtime triggers the full hash by itself
    with pytest.raises(DataError, match=r"shard-00002.arrow: sha256 differs"):
        GlobalBatchLoader(r, "p")
    # prepare --verify says what it found and rebuilt
    v = prepare_recipe(r, verify=True, progress=False)["p"]["src"]["verify"]
    assert v["altered_rebuilt"] == [str(shard)] and v["hashed"] >= 3
    assert GlobalBatchLoader(r, "p").verify_share(0, 1) == []
    code, out, err = run_cli(["validate", str(recipe_file), cpu])
    assert code == 0 and "shards: 3 hashed" in out and "all match their indexes" in out, err


def test_settings_differ(prepared, minilm):
    r, folder = prepared
    data = r.phase("p").data.model_dump()
    other = recipe(
        "unsupervised",
        minilm,
        Path(data["shards_dir"]),
        data["sources"][0],
        data={"rows_per_shard": 10},
        query_length=20,
        prompts={"query": "query: "},
    )
    with pytest.raises(
        DataError,
        match=r"other settings — query_length: shards 23, recipe 27; query_prompt: shards "
        r"'search_query: ', recipe 'query: '",
    ):
        GlobalBatchLoader(other, "p")


def test_index_from_another_tokenizer(prepared, tiny_modernbert, tmp_path):
    from transformers import AutoTokenizer

    r, folder = prepared
    same = recipe_from_dict({**r.resolved(), "phases": {"p": {**r.resolved()["phases"]["p"], "init": tiny_modernbert}}})
    GlobalBatchLoader(same, "p")  # the tiny ModernBERT ships the very MiniLM tokenizer: same ids, accepted
    model = tmp_path / "other-model"
    shutil.copytree(tiny_modernbert, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["[extra]"])
    tok.save_pretrained(model)
    other = recipe_from_dict({**r.resolved(), "phases": {"p": {**r.resolved()["phases"]["p"], "init": str(model)}}})
    with pytest.raises(
        DataError,
        match=r"was tokenized with another tokenizer .* than the phase's "
        r".*other-model.*vocab_size: 30524 vs 30525",
    ):
        GlobalBatchLoader(other, "p")
