"""Prepare at scale: a source in nomic-embed-unsupervised-data's layout, generated here, tokenized by `prepare`.

    python tools/bench/data_scale.py [--rows 20000000] [--small 2000000] [--workers 2] [--json] [--keep DIR]

The source is parquet shards `data/<split>-XXXXX-of-NNNNN.parquet` (query, document, dataset, shard; 1M rows a
file) built from real MS MARCO passages and queries (../shared/data), each row made distinct by its number. Printed:

- prepare wall time and rows/s with all workers, and rows/s per worker (inside the workers, process start excluded)
  per wall second and per CPU second (what one dedicated core gives, whatever else the machine runs);
- the limit: the same rows through the tokenizer's own batch ``__call__`` in one process (queries and documents at
  the phase's lengths, prompts on), on a sample — prepare per worker CPU second as a fraction of it (goal ≥ 0.8);
- peak RSS of the prepare process and of its largest worker, for the small and the large source (flat: the source is
  streamed, never loaded);
- the index time (every shard's sidecar merged into index.json);
- the projection: the paper's 238,998,494 unsupervised rows on one 72-core node at the measured per-worker rate.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PAPER_ROWS = 238_998_494
NODE_CORES = 72
PER_FILE = 1_000_000
Q_LEN, D_LEN = 32, 180


def generate(out: Path, rows: int, data: Path, per_file: int = PER_FILE) -> Path:
    """The unsupervised layout, ``rows`` rows in files of ``per_file``; returns the data folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def jsonl(p: Path) -> list[dict]:
        return [json.loads(x) for x in p.read_text().split("\n") if x.strip()]  # not splitlines: U+2028 in text

    passages = [d["text"] for d in jsonl(data / "beir/msmarco-5k/corpus.jsonl")]
    queries = [q["text"] for q in jsonl(data / "beir/msmarco-5k/queries.jsonl")]
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    n_files = -(-rows // per_file)
    for k in range(n_files):
        path = folder / f"synthetic-{k:05d}-of-{n_files:05d}.parquet"
        if path.is_file():
            continue
        lo, hi = k * per_file, min(rows, (k + 1) * per_file)
        qs = [f"{queries[i % len(queries)]} ({i})" for i in range(lo, hi)]
        ds = [f"{passages[i % len(passages)]} [{i}]" for i in range(lo, hi)]
        table = pa.table({"query": qs, "document": ds, "dataset": ["synthetic"] * len(qs),
                          "shard": pa.array([k] * len(qs), pa.int32())})
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp, row_group_size=50_000)
        os.replace(tmp, path)
    return folder


def recipe_dict(source: str, shards: Path, rows_per_shard: int) -> dict:
    from colbertzero.models import minilm_path

    return {"name": "scale", "phases": {"p": {
        "kind": "unsupervised", "init": minilm_path(), "lr": 1e-5, "global_batch_size": 128,
        "query_length": Q_LEN, "document_length": D_LEN,
        "resources": {"gpus_per_node": 0, "cpu_tasks_per_node": 1},
        "data": {"shards_dir": str(shards), "rows_per_shard": rows_per_shard,
                 "sources": [{"name": "synthetic", "path": source}]}}}}


def child_prepare(recipe_json: str, workers: int) -> None:
    """In a fresh process: prepare, then the index again on its own; prints figures and peak RSS as JSON."""
    from colbertzero.data import index_recipe, prepare_recipe
    from colbertzero.data import shards as S
    from colbertzero.recipe import recipe_from_dict

    recipe = recipe_from_dict(json.loads(recipe_json))
    t0 = time.perf_counter()
    s = prepare_recipe(recipe, workers=workers, progress=False)["p"]["synthetic"]
    wall = time.perf_counter() - t0
    S.index_path(Path(recipe.phase("p").data.shards_dir) / "synthetic").unlink()
    t1 = time.perf_counter()
    index_recipe(recipe, progress=False)
    index_s = time.perf_counter() - t1
    print("\n" + json.dumps({
        "rows": s["rows"], "wall_s": round(wall, 1), "worker_seconds": s["worker_seconds"],
        "worker_cpu_seconds": s["worker_cpu_seconds"],
        "index_s": round(index_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }))


def tokenizer_limit(folder: Path, sample: int) -> float:
    """Rows/s of the tokenizer's own batch __call__ on the first ``sample`` rows (one process)."""
    import pyarrow.dataset as pads
    from transformers import AutoTokenizer

    from colbertzero.models import minilm_path

    table = pads.dataset(str(folder), format="parquet").head(sample, columns=["query", "document"])
    qs = ["search_query: " + q for q in table.column("query").to_pylist()]
    ds = ["search_document: " + d for d in table.column("document").to_pylist()]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    t0 = time.perf_counter()
    for i in range(0, len(qs), 1000):
        tok(qs[i:i + 1000], truncation=True, max_length=Q_LEN + 7)
        tok(ds[i:i + 1000], truncation=True, max_length=D_LEN + 7)
    return len(qs) / (time.perf_counter() - t0)


def run_prepare(source: str, shards: Path, workers: int) -> dict:
    rj = json.dumps(recipe_dict(source, shards, rows_per_shard=250_000))
    out = subprocess.run([sys.executable, __file__, "--child", rj, str(workers)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"prepare failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--small", type=int, default=2_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sample", type=int, default=100_000, help="rows for the tokenizer limit")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--keep", default=None, help="work folder kept between runs (the generated source is reused)")
    ap.add_argument("--per-file", type=int, default=PER_FILE, help="rows per parquet file")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child_prepare(a.child[0], int(a.child[1]))
        return 0
    if a.small % a.per_file or a.rows % a.per_file:
        ap.error(f"--rows and --small are whole files of {a.per_file:,} rows (--per-file)")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="cz-bench-scale-"))
    res: dict = {"rows": a.rows, "small": a.small, "workers": a.workers, "model": "all-MiniLM-L6-v2",
                 "query_length": Q_LEN + 7, "document_length": D_LEN + 7}
    try:
        t0 = time.perf_counter()
        folder = generate(work / "source", a.rows, Path(a.data), a.per_file)
        res["generate_s"] = round(time.perf_counter() - t0, 1)
        res["limit_rows_per_s"] = round(tokenizer_limit(folder, a.sample), 1)
        files = sorted(folder.glob("*.parquet"))
        small = work / "small"
        small.mkdir(exist_ok=True)
        for f in files[: a.small // a.per_file]:
            if not (small / f.name).exists():
                (small / f.name).symlink_to(f)
        for name, source in (("small", str(small)), ("large", str(folder))):
            shards = work / f"shards-{name}"
            shutil.rmtree(shards, ignore_errors=True)
            r = run_prepare(source, shards, a.workers)
            r["rows_per_s"] = round(r["rows"] / r["wall_s"], 1)
            r["rows_per_s_per_worker"] = round(r["rows"] / r["worker_seconds"], 1)
            r["rows_per_cpu_s_per_worker"] = round(r["rows"] / r["worker_cpu_seconds"], 1)
            res[name] = r
            shutil.rmtree(shards, ignore_errors=True)
        per_worker = res["large"]["rows_per_cpu_s_per_worker"]
        res["per_worker_vs_limit"] = round(per_worker / res["limit_rows_per_s"], 3)
        res["rss_growth_large_vs_small_mb"] = round(res["large"]["peak_worker_rss_mb"]
                                                    - res["small"]["peak_worker_rss_mb"], 1)
        res["projection_239m_72_cores_h"] = round(PAPER_ROWS / (per_worker * NODE_CORES) / 3600, 2)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"prepare at scale: MiniLM tokenizer, q {Q_LEN + 7} / d {D_LEN + 7}, {a.workers} worker(s)")
    for name in ("small", "large"):
        r = res[name]
        print(f"  {r['rows']:>11,} rows: {r['wall_s']:>7.1f} s wall, {r['rows_per_s']:>9,.0f} rows/s, "
              f"{r['rows_per_s_per_worker']:>8,.0f} rows/s per worker ({r['rows_per_cpu_s_per_worker']:,.0f} per CPU "
              f"second), index {r['index_s']:.2f} s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB (parent), {r['peak_worker_rss_mb']:.0f} MB (largest worker)")
    print(f"  tokenizer limit {res['limit_rows_per_s']:,.0f} rows/s (one process): prepare per worker "
          f"{res['per_worker_vs_limit']:.2f}× of it")
    print(f"  peak worker RSS {res['small']['rows']:,} → {res['large']['rows']:,} rows: "
          f"{res['rss_growth_large_vs_small_mb']:+.0f} MB")
    print(f"  projection: {PAPER_ROWS:,} rows on one {NODE_CORES}-core node ≈ "
          f"{res['projection_239m_72_cores_h']:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
