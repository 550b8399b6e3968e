"""Exact BEIR search at scale: `colbertzero beir`'s search stage over synthetic fp16 token embeddings.

    python tools/bench/beir_scale.py [--sizes 10000,100000,300000] [--queries 1000] [--queries-large 32] [--json]

Each corpus is written in the search stage's own layout (fp16 ``embeddings.f16``, offsets, ids; documents longest
first), token counts drawn like MS MARCO passages under a 300-token cap (mean ≈ 72: 56 words a passage × ~1.3
tokens a word), queries of 32 tokens, 128 dimensions; vectors share a common direction, as trained ColBERT spaces do,
so that MaxSim maxima are nearly all positive (``least_maximum`` reports the smallest: where one is negative a
zero-padded token of the search's tiles could win it — PyLate's value — which the comparison would then show).
For each size a fresh process runs the search (`retrieval.search.exact_search`, what a search item runs) and reports
its time and peak RSS; this process then computes the same top-100 by brute force, a different route (one matrix
product per block of tokens, per-document maxima with ``np.maximum.reduceat``), and compares.

Printed: the top-100 identical to brute force at every size; peak RSS at the largest corpus vs at 100k (goal ≤ 1.2×);
the search's useful FLOP rate (query tokens × document tokens × 2 × dim, padding not counted) as a ratio of this
machine's dense matmul rate on the same shapes, measured in the same process (goal ≥ 0.5×); and the projection for the
15 BEIR datasets on a GH200 from that FLOP model (FLOPs, bytes, GPU-hours at ``--gpu-tflops``).

1,000 queries against 300k documents is 184 TFLOP: half an hour of this 2-core machine. The first size runs
``--queries``; the larger ones run ``--queries-large`` of the same queries (memory does not depend on the query
count: the search holds one tile, the queries' embeddings and a running top-k).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DIM, Q_TOKENS, K = 128, 32, 100
MEAN_TOKENS, MAX_TOKENS, MIN_TOKENS = 72, 300, 8
# BEIR (Thakur et al., 2021, Table 1): documents, test queries (MS MARCO: dev), average document words; query
# lengths: PyLate's BEIR script (colbertzero.evaluate.sharded.PYLATE_BEIR_QUERY_LENGTH).
BEIR_15 = {
    "msmarco": (8_841_823, 6_980, 56.0), "trec-covid": (171_332, 50, 160.8), "nfcorpus": (3_633, 323, 232.3),
    "nq": (2_681_468, 3_452, 78.9), "hotpotqa": (5_233_329, 7_405, 46.3), "fiqa": (57_638, 648, 132.3),
    "arguana": (8_674, 1_406, 166.8), "webis-touche2020": (382_545, 49, 292.4),
    "cqadupstack": (457_199, 13_145, 129.1), "quora": (522_931, 10_000, 11.4),
    "dbpedia-entity": (4_635_922, 400, 49.7), "scidocs": (25_657, 1_000, 176.2), "fever": (5_416_568, 6_666, 84.8),
    "climate-fever": (5_416_593, 1_535, 84.8), "scifact": (5_183, 300, 213.6),
}
TOKENS_PER_WORD, MARKERS = 1.3, 6  # WordPiece/BPE tokens a word; [CLS] [D] prompt [SEP]
ENCODER_PARAMS = 149e6  # ModernBERT-base


def _vectors(rng: np.random.Generator, n: int, common: np.ndarray) -> np.ndarray:
    v = rng.standard_normal((n, DIM), dtype=np.float32) + common
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _common() -> np.ndarray:
    c = np.zeros(DIM, dtype=np.float32)
    c[0] = 3.0  # cos ≈ 0.9 on average between two vectors: every document has a positive best match
    return c


def make_corpus(folder: Path, n_docs: int, seed: int) -> dict:
    """Write ``n_docs`` documents in the search stage's layout; returns tokens and bytes."""
    from colbertzero.files import atomic_write_json

    rng = np.random.default_rng(seed)
    sigma = 0.6
    lengths = np.exp(rng.normal(math.log(MEAN_TOKENS) - sigma ** 2 / 2, sigma, n_docs))
    lengths = np.clip(np.round(lengths), MIN_TOKENS, MAX_TOKENS).astype(np.int64)
    lengths = np.sort(lengths)[::-1]  # longest first, as `encode` stores a shard
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    common = _common()
    with open(folder / "embeddings.f16", "wb") as f:
        for start in range(0, int(offsets[-1]), 1 << 19):
            f.write(_vectors(rng, min(1 << 19, int(offsets[-1]) - start), common).astype(np.float16).tobytes())
    np.save(folder / "offsets.npy", offsets)
    (folder / "ids.json").write_text(json.dumps([f"d{i}" for i in range(n_docs)]))
    atomic_write_json(folder / "meta.json", {"format": 1, "dtype": "float16", "tokens": int(offsets[-1]),
                                             "dim": DIM, "documents_count": n_docs})
    return {"documents": n_docs, "tokens": int(offsets[-1]), "bytes": int(offsets[-1]) * DIM * 2}


def make_queries(n: int, seed: int = 7) -> np.ndarray:
    return _vectors(np.random.default_rng(seed), n * Q_TOKENS, _common()).reshape(n, Q_TOKENS, DIM)


def child(folder: Path, n_queries: int, out: Path) -> None:
    """One search over the corpus in ``folder``, as a search item runs it; time and peak RSS to stdout."""
    import torch

    from colbertzero.retrieval.embeddings import DocumentEmbeddings
    from colbertzero.retrieval.search import exact_search

    docs = DocumentEmbeddings.load(folder)
    queries = make_queries(n_queries)
    # this machine's dense rate on the search's shapes: 16 queries' tokens against a tile of document tokens
    a = torch.from_numpy(queries[: min(n_queries, 16)].reshape(-1, DIM).copy())
    tile = int(np.searchsorted(docs.offsets, (1 << 24) // a.shape[0]))  # the documents of one 64 MB tile
    b = torch.from_numpy(docs.block(0, max(1, min(len(docs), tile)))).float().T.contiguous()
    a @ b
    t, reps = time.perf_counter(), 0
    while time.perf_counter() - t < 3:
        a @ b
        reps += 1
    dense = 2 * a.shape[0] * a.shape[1] * b.shape[1] * reps / (time.perf_counter() - t)
    t = time.perf_counter()
    scores, index = exact_search(list(queries), docs, K)
    seconds = time.perf_counter() - t
    flops = 2 * n_queries * Q_TOKENS * int(docs.offsets[-1]) * DIM
    np.savez(out, scores=scores, index=index)
    print(json.dumps({"seconds": seconds, "flops": flops, "dense_flops_s": dense,
                      "peak_rss_mb": _peak_rss_mb(),
                      "threads": torch.get_num_threads()}))


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (getrusage's ru_maxrss keeps the high-water mark of the parent it forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def brute_force(folder: Path, n_queries: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-K by a different route: per block of document tokens one matrix product of all query tokens, each
    document's maximum per query token by reduceat over its token segment; returns (scores, index, the least of the
    maxima: positive means no zero-padded token could have won one)."""
    offsets = np.load(folder / "offsets.npy")
    meta = json.loads((folder / "meta.json").read_text())
    emb = np.memmap(folder / "embeddings.f16", dtype=np.float16, mode="r", shape=(meta["tokens"], DIM))
    q = make_queries(n_queries).reshape(-1, DIM)
    n_docs = len(offsets) - 1
    best_s = np.full((n_queries, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((n_queries, 0), dtype=np.int64)
    least = np.inf
    step = max(1, (1 << 26) // (q.shape[0] * MEAN_TOKENS))  # documents a block: ~256 MB of similarities
    for start in range(0, n_docs, step):
        end = min(n_docs, start + step)
        lo, hi = offsets[start], offsets[end]
        sims = q @ np.asarray(emb[lo:hi], dtype=np.float32).T  # [query tokens, block tokens]
        maxima = np.maximum.reduceat(sims, offsets[start:end] - lo, axis=1)  # [query tokens, documents]
        least = min(least, float(maxima.min()))
        s = maxima.reshape(n_queries, Q_TOKENS, end - start).sum(axis=1)
        cat_s = np.concatenate([best_s, s], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, end), s.shape)], axis=1)
        keep = np.argsort(-cat_s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(cat_s, keep, 1), np.take_along_axis(cat_i, keep, 1)
    return best_s, best_i, least


def compare(ours_s, ours_i, ref_s, ref_i) -> dict:
    """Identical top-K sets per query; a difference only counts as a tie when the two scores at the cut agree."""
    differ = ties = 0
    for row in range(len(ours_i)):
        if set(ours_i[row]) != set(ref_i[row]):
            if abs(float(ours_s[row, -1]) - float(ref_s[row, -1])) < 1e-4:
                ties += 1
            else:
                differ += 1
    return {"queries_differing": differ, "boundary_ties": ties,
            "max_score_diff": float(np.abs(np.sort(ours_s, axis=1) - np.sort(ref_s, axis=1)).max())}


def projection(ratio: float, gpu_tflops: float, encode_tflops: float | None = None) -> dict:
    """The 15 datasets' search and encoding on one GH200: FLOPs from the shapes, search time at the measured ratio of
    the dense rate, encoding at ``encode_tflops`` (default: the dense rate), bytes of fp16 token embeddings."""
    from colbertzero.evaluate.sharded import PYLATE_BEIR_DOCUMENT_LENGTH, PYLATE_BEIR_QUERY_LENGTH

    rows, total = {}, {"search_pflop": 0.0, "encode_pflop": 0.0, "embeddings_gb": 0.0}
    for name, (docs, queries, words) in BEIR_15.items():
        per_doc = min(PYLATE_BEIR_DOCUMENT_LENGTH, words * TOKENS_PER_WORD + MARKERS)
        tokens = docs * per_doc
        q_len = PYLATE_BEIR_QUERY_LENGTH[name]  # queries are expanded to their length
        search = 2 * queries * q_len * tokens * DIM
        encode = 2 * ENCODER_PARAMS * (tokens + queries * q_len)
        rows[name] = {"documents": docs, "queries": queries, "doc_tokens": int(tokens),
                      "search_pflop": search / 1e15, "encode_pflop": encode / 1e15,
                      "embeddings_gb": tokens * DIM * 2 / 1e9}
        for key in total:
            total[key] += rows[name][key]
    search_h = total["search_pflop"] * 1e15 / (ratio * gpu_tflops * 1e12) / 3600
    encode_tflops = encode_tflops or gpu_tflops
    encode_h = total["encode_pflop"] * 1e15 / (encode_tflops * 1e12) / 3600
    return {"datasets": rows, **total, "gpu_tflops": gpu_tflops, "encode_tflops": encode_tflops, "search_ratio": ratio,
            "search_gpu_hours": search_h, "encode_gpu_hours": encode_h, "gpu_hours": search_h + encode_h}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,300000")
    ap.add_argument("--queries", type=int, default=1000, help="queries at the first size")
    ap.add_argument("--queries-large", type=int, default=32, help="queries at the larger sizes")
    ap.add_argument("--gpu-tflops", type=float, default=400.0, help="dense bf16 rate the projection assumes for a "
                    "GH200 (H100-class: ~990 peak; 400 is what large matmuls sustain with margin)")
    ap.add_argument("--encode-tflops", type=float, default=200.0, help="the encoder's forward rate the projection "
                    "assumes (ModernBERT-base, variable lengths: ~20 %% of an H100-class GPU's bf16 peak)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "QUERIES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]), Path(args.child[2]))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cz-beir-scale-"))
    results = []
    try:
        for i, n in enumerate(sizes):
            folder = work / f"corpus-{n}"
            t = time.perf_counter()
            corpus = make_corpus(folder, n, seed=n)
            made = time.perf_counter() - t
            nq = args.queries if i == 0 else args.queries_large
            out = work / f"top-{n}.npz"
            r = subprocess.run([sys.executable, __file__, "--child", str(folder), str(nq), str(out)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            run = json.loads(r.stdout.strip().splitlines()[-1])
            top = np.load(out)
            t = time.perf_counter()
            ref_s, ref_i, least = brute_force(folder, nq)
            brute = time.perf_counter() - t
            cmp = compare(top["scores"], top["index"], ref_s, ref_i)
            rate = run["flops"] / run["seconds"]
            results.append({**corpus, "queries": nq, "generate_s": round(made, 1), "search_s": round(run["seconds"], 2),
                            "search_tflop": run["flops"] / 1e12, "search_gflop_s": rate / 1e9,
                            "dense_gflop_s": run["dense_flops_s"] / 1e9, "ratio_vs_dense": rate / run["dense_flops_s"],
                            "peak_rss_mb": round(run["peak_rss_mb"], 1), "threads": run["threads"],
                            "brute_force_s": round(brute, 1), "least_maximum": least, **cmp,
                            "identical": cmp["queries_differing"] == 0 and cmp["boundary_ties"] == 0})
            shutil.rmtree(folder, ignore_errors=True)
            if not args.json:
                print(f"{n:>9,} docs  {nq:>5} queries  search {run['seconds']:8.1f} s  "
                      f"{rate / 1e9:6.1f} GFLOP/s ({rate / run['dense_flops_s']:.2f}x dense)  "
                      f"peak RSS {run['peak_rss_mb']:7.1f} MB  identical: {results[-1]['identical']}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    by = {r["documents"]: r for r in results}
    largest = max(by)
    rss_ratio = by[largest]["peak_rss_mb"] / by[100_000]["peak_rss_mb"] if 100_000 in by else None
    ratio = min(r["ratio_vs_dense"] for r in results)
    report = {
        "sizes": results,
        "goals": {"identical_top100": all(r["identical"] for r in results),
                  "rss_largest_vs_100k": rss_ratio, "rss_goal": 1.2,
                  "ratio_vs_dense_min": ratio, "ratio_goal": 0.5},
        "projection_gh200": projection(ratio, args.gpu_tflops, args.encode_tflops),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        g, p = report["goals"], report["projection_gh200"]
        print(f"top-100 identical to brute force at every size: {g['identical_top100']}")
        if rss_ratio is not None:
            print(f"peak RSS at {largest:,} vs 100,000 documents: {rss_ratio:.2f}x (goal <= 1.2)")
        print(f"search rate / dense matmul rate: {ratio:.2f} at worst (goal >= 0.5)")
        print(f"15 BEIR datasets on one GH200 (dense {args.gpu_tflops:g} TFLOP/s x {ratio:.2f} for search, encoding "
              f"at {args.encode_tflops:g} TFLOP/s): search {p['search_pflop']:.0f} "
              f"PFLOP, encoding {p['encode_pflop']:.0f} PFLOP, {p['embeddings_gb']:.0f} GB of fp16 embeddings; "
              f"{p['gpu_hours']:.1f} GPU-hours (search {p['search_gpu_hours']:.1f}, encoding "
              f"{p['encode_gpu_hours']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
