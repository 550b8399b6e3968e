"""`colbertzero score`: a teacher scores each query's candidates, written in lightonai/ms-marco-en-bge-gemma's layout.

Input rows hold a query and its candidates (``--documents`` names the columns, in order; the supervised layout's
``document,negative`` by default, so `mine`'s output is read as it is). The first ``--docs-per-query`` candidates
are scored; ``--sample N`` scores a seeded sample of N rows instead of all.

Output (three configs, split ``train``, each ``<config>/train-00000-of-00001.parquet``)::

    train/      query_id, document_ids (list), scores (list)
    queries/    query_id, text
    documents/  document_id, text        (each distinct document once; its id is a hash of its text)

with ``README.md`` front matter mapping the configs as the Hub's card does, so `prepare` (``queries_path`` /
``documents_path``) and ``datasets.load_dataset(OUT, CONFIG)`` both read it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..data.sources import DataError
from ..retrieval import Model, ModelSpec
from .inputs import input_fingerprint, read_pairs, resolve_input
from .work import Work, shard_range

CONFIGS = ("train", "queries", "documents")


@dataclass(frozen=True)
class ScoreSpec:
    input: str
    teacher: str = "minilm"
    docs_per_query: int | None = None
    sample: int | None = None
    seed: int = 0
    query_column: str = "query"
    documents: str = "document,negative"
    max_length: int | None = None
    drop_short: bool = False  # rows with fewer than docs_per_query candidates: dropped (and counted), else refused

    def __post_init__(self):  # a bad model or input is refused before any work starts
        object.__setattr__(self, "input", resolve_input(self.input, "score input"))
        if self.teacher:
            ModelSpec.parse(self.teacher, "--teacher")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["command"] = "score"
        d["input_fingerprint"] = input_fingerprint(self.input)
        return d


def document_id(text: str) -> str:
    return "d" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def selected_rows(n: int, spec: ScoreSpec) -> list[int]:
    if spec.sample is None or spec.sample >= n:
        return list(range(n))
    return sorted(random.Random(spec.seed).sample(range(n), spec.sample))


def _read(spec: ScoreSpec):
    """(queries, candidates, the rows short of docs_per_query); a short row is None with drop_short, else refused."""
    cols = [c.strip() for c in spec.documents.split(",") if c.strip()]
    queries, cands = read_pairs(spec.input, spec.query_column, cols, f"score input {spec.input}")
    short = [i for i, c in enumerate(cands) if spec.docs_per_query and len(c) < spec.docs_per_query]
    if short and not spec.drop_short:
        raise DataError(f"score input {spec.input}: row {short[0]} has {len(cands[short[0]])} candidates, "
                        f"--docs-per-query is {spec.docs_per_query} ({len(short)} row(s) short); lower "
                        f"--docs-per-query, mine more negatives, or --drop-short (counted in stats.json)")
    if spec.docs_per_query:
        cands = [c[: spec.docs_per_query] if len(c) >= spec.docs_per_query else None for c in cands]
    return queries, cands, short


def score_shard(spec: ScoreSpec, work: Work, shard: int, show_progress: bool = True) -> None:
    if work.part(shard).is_file():
        return
    queries, cands, _ = _read(spec)
    rows = [i for i in selected_rows(len(queries), spec) if cands[i] is not None]
    lo, hi = shard_range(len(rows), shard, work.shards)
    teacher = Model(ModelSpec.parse(spec.teacher, "--teacher"), max_length=spec.max_length)
    idf = sorted({d for c in cands for d in c}) if teacher.spec.kind == "bm25" else None
    out = {"row": [], "query": [], "documents": [], "scores": []}
    step = 64
    with tqdm(total=hi - lo, desc=f"score [{shard + 1}/{work.shards}]", unit="query",
              disable=not show_progress) as bar:
        for start in range(lo, hi, step):
            idx = rows[start : min(hi, start + step)]
            qs, cs = [queries[i] for i in idx], [cands[i] for i in idx]
            scores = teacher.score(qs, cs, idf_corpus=idf)
            out["row"] += idx
            out["query"] += qs
            out["documents"] += cs
            # 4 decimals: an encoder's last bits vary with how texts are batched (padding), and shards batch otherwise
            out["scores"] += [[round(x, 4) for x in s] for s in scores]
            bar.update(len(idx))
    work.write_part(shard, pa.table(out, schema=pa.schema([
        ("row", pa.int64()), ("query", pa.string()), ("documents", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32()))])))


def write_scored(spec: ScoreSpec, work: Work) -> Path:
    queries, _, short = _read(spec)
    selected = set(selected_rows(len(queries), spec))
    dropped = sum(1 for i in short if i in selected)

    def write(table: pa.Table, tmp: Path) -> None:
        docs = table.column("documents").to_pylist()
        ids = [[document_id(d) for d in ds] for ds in docs]
        qids = [f"q{r}" for r in table.column("row").to_pylist()]
        distinct = dict(sorted({i: d for row_ids, ds in zip(ids, docs) for i, d in zip(row_ids, ds)}.items()))
        tables = {
            "train": pa.table({"query_id": qids, "document_ids": ids, "scores": table.column("scores")}),
            "queries": pa.table({"query_id": qids, "text": table.column("query")}),
            "documents": pa.table({"document_id": list(distinct), "text": list(distinct.values())}),
        }
        for name, t in tables.items():
            (tmp / name).mkdir()
            pq.write_table(t, tmp / name / "train-00000-of-00001.parquet")
        front = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n"
                        for c in CONFIGS)
        mean_top = pc.mean(pc.list_element(table.column("scores"), 0)).as_py() if table.num_rows else None
        (tmp / "README.md").write_text(
            f"---\nconfigs:\n{front}---\nCandidates scored by `colbertzero score` (teacher {spec.teacher}): "
            f"{table.num_rows} queries, {len(distinct)} documents.\nLayout of lightonai/ms-marco-en-bge-gemma: "
            "train (query_id, document_ids, scores), queries (query_id, text), documents (document_id, text).\n")
        (tmp / "stats.json").write_text(json.dumps({"queries": table.num_rows, "documents": len(distinct),
                                                    "rows_short_dropped": dropped, "mean_first_score": mean_top},
                                                   indent=2) + "\n")

    return work.merge(write)
