"""The demo's supervised and distillation data, derived from its pairs exactly as a researcher would for a new domain:

    colbertzero mine data/train/pairs/docstrings.jsonl --name docstrings --out data/supervised/docstrings \
        --negatives 8 --skip-overlapping          (and the same for topics)
    colbertzero score 'data/supervised/*/data/*.parquet' --out data/distillation --teacher minilm \
        --docs-per-query 8 --sample 256 --max-length 128 --scale auto

BM25 negatives are drawn from the same source's training documents (the held-out answers are in none of them);
the teacher is all-MiniLM-L6-v2's cosine similarity, 128 tokens a text (half the cost of its 256 on 2 cores), scaled
so the median query's scores span 1, the student's span (docs/own-data.md, "Pick and check a teacher").
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..mining import MineSpec, ScoreSpec, run_shards

MINED_SOURCES = ("docstrings", "topics")  # "titles" names APIs: its documents repeat the docstrings'


def derive_demo_data(data: dict, out: str | Path, *, negatives: int = 8, distill_queries: int = 256,
                     docs_per_query: int = 8, teacher: str = "minilm", scale: str = "auto", log=print) -> dict:
    """Run `mine` per source and `score` on their output (each skipped when already done); returns
    ``{"supervised": {source: folder}, "distillation": folder, "stats": {...}}``."""
    out = Path(out)
    supervised, stats = {}, {}
    for src in MINED_SOURCES:
        spec = MineSpec(input=data["pairs"][src], name=src, negatives=negatives, skip_overlapping=True)
        dest = out / "supervised" / src
        log(f"colbertzero mine {shlex.quote(spec.input)} --name {src} --out {shlex.quote(str(dest))} "
            f"--negatives {negatives} --skip-overlapping")
        r = run_shards(spec, dest, show_progress=False)
        supervised[src], stats[f"mine/{src}"] = r["out"], r["stats"]
    pattern = str(out / "supervised" / "*" / "data" / "*.parquet")
    spec = ScoreSpec(input=pattern, teacher=teacher, docs_per_query=docs_per_query, sample=distill_queries,
                     max_length=128, scale=scale)
    dest = out / "distillation"
    log(f"colbertzero score {shlex.quote(pattern)} --out {shlex.quote(str(dest))} --teacher {shlex.quote(teacher)} "
        f"--docs-per-query {docs_per_query} --sample {distill_queries} --max-length 128 --scale {scale}")
    r = run_shards(spec, dest, show_progress=False)
    stats["score"] = r["stats"]
    return {"supervised": supervised, "distillation": r["out"], "stats": stats}


def recipe_sources(derived: dict) -> dict[str, list[dict]]:
    """The recipe's supervised and distillation sources for the derived data, in the published layouts."""
    sup = [{"name": src, "path": str(Path(folder) / "data" / "*.parquet"),
            "columns": {"positive": "document", "negatives": "negative"}}
           for src, folder in sorted(derived["supervised"].items())]
    d = Path(derived["distillation"])
    dist = [{"name": "pydocs", "path": str(d / "train" / "*.parquet"),
             "queries_path": str(d / "queries" / "*.parquet"), "documents_path": str(d / "documents" / "*.parquet")}]
    return {"supervised": sup, "distillation": dist}
