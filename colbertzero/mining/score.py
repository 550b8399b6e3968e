"""`colbertzero score`: a teacher scores each query's candidates, written in lightonai/ms-marco-en-bge-gemma's layout.

Input rows hold a query and its candidates (``--documents`` names the columns, in order; the supervised layout's
``document,negative`` by default, so `mine`'s output is read as it is). The first ``--docs-per-query`` candidates
are scored; ``--sample N`` scores a seeded sample of N rows instead of all.

``--teacher`` names one model or several, comma-separated, fused per query (``--fusion``); ``--scale`` multiplies
the (fused) scores before they are written: ``auto`` fits it to the labels (`teachers.fit_scale`), a number fixes it
(``1`` keeps the teacher's own scale). Each teacher's target sharpness, raw and scaled, goes to ``stats.json``.

Output (three configs, split ``train``, each ``<config>/train-00000-of-00001.parquet``)::

    train/      query_id, document_ids (list), scores (list: scaled), raw_scores (list: as the teacher gave them)
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
from ..retrieval import Model, ModelSpec, ModelSpecError
from ..teachers import FUSIONS, check_scale, fuse, near_uniform, resolve_scale, sharpness
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
    scale: str = "auto"  # a rule (auto, labels, span:X) or a number (1: as given): teachers.resolve_scale
    fusion: str = "zsum"  # how several teachers' scores become one (teachers.FUSIONS)

    def __post_init__(self):  # a bad model, scale or input is refused before any work starts
        object.__setattr__(self, "input", resolve_input(self.input, "score input"))
        self.teachers()
        object.__setattr__(self, "scale", str(self.scale).strip())
        problem = check_scale(self.scale)
        if problem:
            raise ModelSpecError(problem)
        if self.fusion not in FUSIONS:
            raise ModelSpecError(f"--fusion {self.fusion!r}: one of {', '.join(FUSIONS)}")

    def teachers(self) -> list[ModelSpec]:
        """``--teacher``'s models: one, or several comma-separated (fused)."""
        return ModelSpec.parse_list(self.teacher, "--teacher")

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
    teachers = [Model(t, max_length=spec.max_length) for t in spec.teachers()]
    idf = sorted({d for c in cands if c for d in c}) if any(t.spec.kind == "bm25" for t in teachers) else None
    out = {"row": [], "query": [], "documents": [], "scores": [], "member_scores": []}
    step = 64
    with tqdm(total=hi - lo, desc=f"score [{shard + 1}/{work.shards}]", unit="query",
              disable=not show_progress) as bar:
        for start in range(lo, hi, step):
            idx = rows[start : min(hi, start + step)]
            qs, cs = [queries[i] for i in idx], [cands[i] for i in idx]
            # 4 decimals: an encoder's last bits vary with how texts are batched (padding), and shards batch otherwise
            members = [_rounded(t.score(qs, cs, idf_corpus=idf)) for t in teachers]
            out["row"] += idx
            out["query"] += qs
            out["documents"] += cs
            out["scores"] += members[0] if len(members) == 1 else _rounded(fuse(members, spec.fusion))
            out["member_scores"] += [list(per_query) for per_query in zip(*members)]
            bar.update(len(idx))
    work.write_part(shard, pa.table(out, schema=pa.schema([
        ("row", pa.int64()), ("query", pa.string()), ("documents", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())), ("member_scores", pa.list_(pa.list_(pa.float64())))])))


def _rounded(scores: list[list[float]], places: int = 4) -> list[list[float]]:
    return [[round(float(x), places) for x in s] for s in scores]


def target_stats(spec: ScoreSpec, raw: list[list[float]], members: list[list[list[float]]]) -> dict:
    """The scale the written scores carry and how it was chosen, with the target's sharpness before and after it,
    per teacher and fused."""
    scale, how = resolve_scale(spec.scale, raw)
    names = [str(t) for t in spec.teachers()]
    out = {"scale": scale, "scale_rule": how,
           "teachers": {n: sharpness([m[i] for m in members]) for i, n in enumerate(names)}}
    if len(names) > 1:
        out["fused"] = {"fusion": spec.fusion, **sharpness(raw)}
    out["target"] = sharpness(raw, scale)
    return out


def target_lines(stats: dict) -> list[str]:
    """What `score` prints of the target's sharpness, and a warning with the fix when it is near uniform."""
    def line(name: str, s: dict) -> str:
        if s.get("top1") is None:
            return f"  {name}: no query with two candidates"
        return (f"  {name}: top-1 probability {s['top1']:.3f} (uniform {s['uniform']:.3f}), entropy "
                f"{s['entropy']:.2f} of uniform's, scores span {s['span']:.3g}")

    t = stats.get("target") or {}
    lines = ["teacher targets (softmax of the scores, as the distillation loss takes them):"]
    lines += [line(f"{n} (raw)", s) for n, s in (stats.get("teachers") or {}).items()]
    if "fused" in stats:
        lines.append(line(f"fused by {stats['fused']['fusion']} (raw)", stats["fused"]))
    lines.append(line(f"written (× {stats.get('scale')}, {stats.get('scale_rule', {}).get('rule')})", t))
    if near_uniform(t):
        lines.append("  warning: the written target is near uniform: it teaches the student to flatten its ranking. "
                     "Score again with --scale auto (or a larger --scale), or a sharper teacher")
    return lines


def write_scored(spec: ScoreSpec, work: Work) -> Path:
    queries, _, short = _read(spec)
    selected = set(selected_rows(len(queries), spec))
    dropped = sum(1 for i in short if i in selected)

    def write(table: pa.Table, tmp: Path) -> None:
        raw = table.column("scores").to_pylist()
        target = target_stats(spec, raw, table.column("member_scores").to_pylist())
        scores = _rounded([[target["scale"] * x for x in s] for s in raw])
        docs = table.column("documents").to_pylist()
        ids = [[document_id(d) for d in ds] for ds in docs]
        qids = [f"q{r}" for r in table.column("row").to_pylist()]
        distinct = dict(sorted({i: d for row_ids, ds in zip(ids, docs) for i, d in zip(row_ids, ds)}.items()))
        tables = {
            "train": pa.table({"query_id": qids, "document_ids": ids,
                               "scores": pa.array(scores, pa.list_(pa.float32())),
                               "raw_scores": pa.array(raw, pa.list_(pa.float32()))}),
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
            f"---\nconfigs:\n{front}teacher_scale: {target['scale']}\n---\nCandidates scored by `colbertzero "
            f"score` (teacher {spec.teacher}): {table.num_rows} queries, {len(distinct)} documents.\n"
            f"Layout of lightonai/ms-marco-en-bge-gemma: train (query_id, document_ids, scores), queries (query_id, "
            f"text), documents (document_id, text). `scores` are the teacher's scores × {target['scale']} "
            f"({target['scale_rule']['rule']}; `raw_scores` holds them as the teacher gave them).\n")
        (tmp / "stats.json").write_text(json.dumps({"queries": table.num_rows, "documents": len(distinct),
                                                    "rows_short_dropped": dropped, "mean_first_raw_score": mean_top,
                                                    **target}, indent=2) + "\n")

    return work.merge(write)
