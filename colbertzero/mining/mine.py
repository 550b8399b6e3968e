"""`colbertzero mine`: hard negatives for (query, positive) pairs, written in nomic-embed-supervised-data's layout.

For each query the retriever ranks the corpus (``--corpus``, else every positive of the input); the positives of that
query (every row with the same query text) are never negatives; with ``--skip-overlapping`` neither is a document
that contains a positive, is contained in one, or contains the query (a section holding the passage a pair was cut
from answers the query too). ``--skip-top K`` passes over the K best candidates (the usual guard against unlabelled
positives). With ``--teacher`` and ``--margin M`` a candidate the teacher scores above ``positive − M`` is dropped
as a likely false negative. The best ``--negatives`` that remain are kept; a row left with none is dropped. Every
drop is counted in ``OUT/colbertzero.json``.

Output: ``OUT/data/<name>-00000-of-00001.parquet`` with ``query``, ``document``, ``negative`` (list), ``dataset``,
and ``OUT/README.md`` whose front matter maps the split as the Hub's dataset cards do.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..recipe.schema import safe_name
from ..retrieval import Model, ModelSpec, ModelSpecError
from .inputs import input_fingerprint, read_corpus, read_pairs, resolve_input
from .work import Work, shard_range

STAT_KEYS = ("rows", "rows_without_negatives", "rows_short", "negatives", "dropped_positive", "dropped_overlapping",
             "dropped_margin")


@dataclass(frozen=True)
class MineSpec:
    input: str
    name: str
    retriever: str = "bm25"
    negatives: int = 8
    depth: int = 50
    skip_top: int = 0
    skip_overlapping: bool = False
    teacher: str | None = None
    margin: float | None = None
    corpus: str | None = None
    corpus_column: str = "text"
    query_column: str = "query"
    document_column: str = "document"
    max_length: int | None = None

    def __post_init__(self):  # a bad model, name or input is refused before any work starts
        if (self.teacher is None) != (self.margin is None):
            raise ModelSpecError("--teacher and --margin go together: the teacher scores, the margin drops negatives "
                                 "it scores above positive − margin")
        try:
            safe_name(self.name, "--name")
        except ValueError as e:
            raise ModelSpecError(str(e)) from None
        object.__setattr__(self, "depth", max(self.depth, self.negatives + self.skip_top))
        object.__setattr__(self, "input", resolve_input(self.input, "mine input"))
        if ModelSpec.parse(self.retriever, "--retriever").kind == "cross-encoder":
            raise ModelSpecError(f"--retriever {self.retriever}: a cross-encoder scores candidates, it cannot rank a "
                                 f"corpus; mine with bm25, minilm, dense:PATH or colbert:PATH, filter with --teacher")
        if self.corpus:
            object.__setattr__(self, "corpus", resolve_input(self.corpus, "mine corpus"))
        if self.teacher:
            ModelSpec.parse(self.teacher, "--teacher")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["command"] = "mine"
        d["input_fingerprint"] = input_fingerprint(self.input)
        if self.corpus:
            d["corpus_fingerprint"] = input_fingerprint(self.corpus)
        return d


def _overlaps(doc: str, positives: list[str], query: str) -> bool:
    low = doc.lower()
    return query.lower() in low or any(p.lower() in low or low in p.lower() for p in positives)


def mine_shard(spec: MineSpec, work: Work, shard: int, show_progress: bool = True) -> None:
    if work.part(shard).is_file():
        return
    queries, docs = read_pairs(spec.input, spec.query_column, [spec.document_column], f"mine input {spec.input}")
    corpus = (read_corpus(spec.corpus, spec.corpus_column, f"mine corpus {spec.corpus}") if spec.corpus
              else list(dict.fromkeys(d for ds in docs for d in ds)))
    positives: dict[str, list[str]] = {}
    for q, ds in zip(queries, docs):
        positives.setdefault(q, []).extend(d for d in ds if d not in positives.get(q, []))
    lo, hi = shard_range(len(queries), shard, work.shards)
    retriever = Model(ModelSpec.parse(spec.retriever, "--retriever"), max_length=spec.max_length)
    teacher = Model(ModelSpec.parse(spec.teacher, "--teacher"), max_length=spec.max_length) if spec.teacher else None
    stats = dict.fromkeys(STAT_KEYS, 0)
    out = {"query": [], "document": [], "negative": [], "dataset": []}
    step = 256
    with tqdm(total=hi - lo, desc=f"mine {spec.name} [{shard + 1}/{work.shards}]", unit="query",
              disable=not show_progress) as bar:
        for start in range(lo, hi, step):
            qs, pos = queries[start : min(hi, start + step)], docs[start : min(hi, start + step)]
            index, _ = retriever.retrieve(qs, corpus, spec.depth, cache=work.cache)
            cands = []
            for q, p, ranked in zip(qs, pos, index):
                known = set(positives[q])
                keep = []
                for i in ranked[spec.skip_top :]:
                    d = corpus[int(i)]
                    if d in known:
                        stats["dropped_positive"] += 1
                    elif spec.skip_overlapping and _overlaps(d, positives[q], q):
                        stats["dropped_overlapping"] += 1
                    elif d not in keep:
                        keep.append(d)
                cands.append(keep)
            if teacher is not None:
                scored = teacher.score(qs, [p[:1] + c for p, c in zip(pos, cands)])
                kept = []
                for s, c in zip(scored, cands):
                    ok = [d for d, x in zip(c, s[1:]) if x < s[0] - spec.margin]
                    stats["dropped_margin"] += len(c) - len(ok)
                    kept.append(ok)
                cands = kept
            for q, p, c in zip(qs, pos, cands):
                stats["rows"] += 1
                c = c[: spec.negatives]
                if not c:
                    stats["rows_without_negatives"] += 1
                    continue
                stats["rows_short"] += len(c) < spec.negatives
                stats["negatives"] += len(c)
                out["query"].append(q)
                out["document"].append(p[0])
                out["negative"].append(c)
                out["dataset"].append(spec.name)
            bar.update(len(qs))
    table = pa.table(out, schema=pa.schema([("query", pa.string()), ("document", pa.string()),
                                            ("negative", pa.list_(pa.string())), ("dataset", pa.string())]))
    work.write_part(shard, table.replace_schema_metadata({"colbertzero.stats": json.dumps(stats)}))


def part_stats(work: Work) -> dict:
    total: dict[str, int] = {}
    for i in range(work.shards):
        meta = pq.read_schema(work.part(i)).metadata or {}
        for k, v in json.loads(meta.get(b"colbertzero.stats", b"{}")).items():
            total[k] = total.get(k, 0) + v
    return total


def write_mined(spec: MineSpec, work: Work):
    stats = part_stats(work)

    def write(table: pa.Table, tmp: Path) -> None:
        (tmp / "data").mkdir()
        pq.write_table(table.replace_schema_metadata(None), tmp / "data" / f"{spec.name}-00000-of-00001.parquet")
        (tmp / "README.md").write_text(
            "---\nconfigs:\n- config_name: default\n  data_files:\n"
            f"  - split: {spec.name}\n    path: data/{spec.name}-*\n---\n"
            f"Hard negatives mined by `colbertzero mine` ({spec.retriever}"
            + (f", teacher {spec.teacher} margin {spec.margin}" if spec.teacher else "")
            + f"): {stats.get('rows', 0) - stats.get('rows_without_negatives', 0)} rows.\n"
            "Layout of nomic-ai/nomic-embed-supervised-data: query, document, negative (list), dataset.\n")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    return work.merge(write), stats
