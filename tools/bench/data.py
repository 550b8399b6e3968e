"""Data-path benchmark: colbertzero's loader vs PyLate's per-step collator, prepare throughput, loader memory.

    python tools/bench/data.py [--json] [--batch 128] [--seconds 3] [--prepare-rows 20000]

Everything is measured side by side in one run, one process each (tokenizer threads off), on real text: the
MS MARCO passages of ../shared/data/beir/msmarco-5k paired with real queries (MS MARCO's and FlagEmbedding's),
MiniLM tokenizer, query 32 / document 180 (+7 for prompts, as the paper), prompts on.

- loader vs PyLate: pairs/s and tokens/s turning the same rows into model inputs (PyLate's ``ColBERTCollator`` with
  ``model.tokenize``, the way its training scripts do each step, vs ``GlobalBatchLoader`` on prepared shards);
- prepare: pairs/s with 1 and 2 worker processes (wall time, process start included);
- memory: RSS of a fresh process running the loader over a source and over a 10× larger synthetic one (the same
  shards repeated), after the same number of steps and after a full epoch of the large one. ``rss_anon`` is the
  process's own memory; ``rss`` adds the page-cache pages of the memory-mapped shards it touched (reclaimable).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

Q_LEN, D_LEN = 32, 180


def _rows(data: Path) -> list[dict]:
    def jsonl(p: Path) -> list[dict]:
        return [json.loads(x) for x in p.read_text().split("\n") if x.strip()]

    passages = [d["text"] for d in jsonl(data / "beir/msmarco-5k/corpus.jsonl")]
    queries = [q["text"] for q in jsonl(data / "beir/msmarco-5k/queries.jsonl")]
    for f in sorted((data / "train/flagembedding-examples").glob("*.jsonl")):
        queries += [r["query"] for r in jsonl(f)]
    return [{"query": queries[i % len(queries)], "document": p} for i, p in enumerate(passages)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe_dict(model: str, shards: Path, path: Path, batch: int, epochs: float = 1000.0, **data) -> dict:
    return {
        "name": "bench",
        "phases": {
            "p": {
                "kind": "unsupervised",
                "init": model,
                "lr": 1e-5,
                "global_batch_size": batch,
                "query_length": Q_LEN,
                "document_length": D_LEN,
                "resources": {"gpus_per_node": 0, "cpu_tasks_per_node": 1},
                "data": {
                    "shards_dir": str(shards),
                    "epochs": epochs,
                    "sources": [{"name": "msmarco", "path": str(path)}],
                    **data,
                },
            }
        },
    }


def _rss() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return {
        "rss_mb": round(out["VmRSS"], 1),
        "rss_anon_mb": round(out["RssAnon"], 1),
        "rss_file_mb": round(out["RssFile"], 1),
        "peak_rss_mb": round(out["VmHWM"], 1),
    }


def child_rss(recipe_json: str, steps: int) -> None:
    """Run in a fresh process: open the loader, take ``steps`` batches (0 = a full epoch), print RSS as JSON."""
    from colbertzero.data import GlobalBatchLoader
    from colbertzero.recipe import recipe_from_dict

    recipe = recipe_from_dict(json.loads(recipe_json))
    loader = GlobalBatchLoader(recipe, "p")
    opened = _rss()
    n = steps or loader.total_steps
    for _, _b in zip(range(n), loader):
        pass
    print(json.dumps({"opened": opened, "after": _rss(), "steps": n, "rows": loader.sources[0].rows}))


def _synthetic_copy(src: Path, dst: Path, times: int) -> None:
    """A source ``times`` larger made of the prepared shards repeated, with a valid index (it passes the checks)."""
    from colbertzero.data import shards as S
    from colbertzero.files import atomic_write_json

    index = S.read_index(src, "bench")
    dst.mkdir(parents=True)
    entries = []
    for t in range(times):
        for e in index["shards"]:
            name = S.shard_name(len(entries))
            shutil.copyfile(src / e["file"], dst / name)
            entries.append({**e, "file": name, "mtime_ns": (dst / name).stat().st_mtime_ns})
    atomic_write_json(S.index_path(dst), {**index, "rows": index["rows"] * times, "shards": entries})


def _load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--batch", type=int, default=128, help="pairs per step (one process)")
    ap.add_argument("--seconds", type=float, default=4.0, help="time given to each side of the comparison")
    ap.add_argument("--prepare-rows", type=int, default=40000)
    ap.add_argument("--child-rss", nargs=2, metavar=("RECIPE_JSON", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_rss:
        child_rss(a.child_rss[0], int(a.child_rss[1]))
        return 0
    logging.disable(logging.WARNING)

    import pylate.models
    import pylate.utils

    from colbertzero.data import GlobalBatchLoader, prepare_recipe
    from colbertzero.models import minilm_path
    from colbertzero.recipe import recipe_from_dict

    data = Path(a.data)
    if not (data / "beir/msmarco-5k/corpus.jsonl").is_file():
        print(f"bench data not found under {data} (expects ../shared/data)", file=sys.stderr)
        return 2
    model_path = minilm_path()
    rows = _rows(data)
    tmp = Path(tempfile.mkdtemp(prefix="cz-bench-data-"))
    res: dict = {
        "batch": a.batch,
        "rows": len(rows),
        "query_length": Q_LEN + 7,
        "document_length": D_LEN + 7,
        "model": "all-MiniLM-L6-v2",
        "load_avg_start": _load_avg(),
    }
    try:
        src = _write_jsonl(tmp / "pairs.jsonl", rows)
        recipe = recipe_from_dict(_recipe_dict(model_path, tmp / "shards", src, a.batch))
        ph = recipe.phase("p")

        # ---- prepare, 1 worker (the loader's shards), then 1 and 2 workers on a larger copy
        t0 = time.perf_counter()
        prepare_recipe(recipe, workers=1, progress=False)
        res["prepare_pairs_per_s_1_worker_small"] = round(len(rows) / (time.perf_counter() - t0), 1)
        big_rows = (rows * (a.prepare_rows // len(rows) + 1))[: a.prepare_rows]
        big = _write_jsonl(tmp / "pairs-big.jsonl", big_rows)
        for w in (1, 2):
            r = recipe_from_dict(
                _recipe_dict(model_path, tmp / f"prep{w}", big, a.batch, rows_per_shard=max(1, a.prepare_rows // 8))
            )
            t0 = time.perf_counter()
            out = prepare_recipe(r, workers=w, progress=False)["p"]["msmarco"]
            wall = time.perf_counter() - t0
            res[f"prepare_pairs_per_s_{w}w"] = round(a.prepare_rows / wall, 1)
            # inside the workers, process start excluded: what one process tokenizes per second
            res[f"prepare_pairs_per_s_per_process_{w}w"] = round(a.prepare_rows / out["worker_seconds"], 1)
            # per CPU-second: what a process does when it has a core to itself (this machine may be shared)
            res[f"prepare_pairs_per_cpu_s_{w}w"] = round(a.prepare_rows / out["worker_cpu_seconds"], 1)
        res["prepare_scaling_2_vs_1"] = round(res["prepare_pairs_per_s_2w"] / res["prepare_pairs_per_s_1w"], 2)
        res["prepare_rows"] = a.prepare_rows

        # ---- PyLate's collator vs the loader, in alternating rounds so machine load hits both alike
        model = pylate.models.ColBERT(
            model_path,
            device="cpu",
            query_length=ph.effective_query_length,
            document_length=ph.effective_document_length,
        )
        collator = pylate.utils.ColBERTCollator(
            tokenize_fn=model.tokenize, prompts={"query": ph.prompts.query, "positive": ph.prompts.document}
        )
        loader = GlobalBatchLoader(recipe, "p")
        batches = iter(loader)
        next(batches)  # warm the page cache, as any step after the first
        tot = {"pylate": [0, 0, 0, 0.0], "loader": [0, 0, 0, 0.0]}  # pairs, padded tokens, real tokens, seconds
        i = 0
        rounds = max(1, int(a.seconds / 0.25))
        for _ in range(rounds):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.25:
                ids = [rows[(i + k) % len(rows)] for k in range(a.batch)]
                i += a.batch
                out = collator([{"query": r["query"], "positive": r["document"]} for r in ids])
                c = tot["pylate"]
                c[0] += a.batch
                c[1] += out["query_input_ids"].numel() + out["positive_input_ids"].numel()
                c[2] += int(out["query_attention_mask"].sum() + out["positive_attention_mask"].sum())
            tot["pylate"][3] += time.perf_counter() - t0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.25:
                b = next(batches)
                c = tot["loader"]
                c[0] += b.queries["input_ids"].shape[0]
                c[1] += b.queries["input_ids"].numel() + b.documents["input_ids"].numel()
                c[2] += b.n_tokens
            tot["loader"][3] += time.perf_counter() - t0
        for name, (pairs, padded, real, dt) in tot.items():
            res[f"{name}_pairs_per_s"] = round(pairs / dt, 1)
            res[f"{name}_padded_tokens_per_s"] = round(padded / dt, 1)
            res[f"{name}_tokens_per_s"] = round(real / dt, 1)
        res["ratio_vs_pylate"] = round(res["loader_pairs_per_s"] / res["pylate_pairs_per_s"], 1)
        res["ratio_padded_tokens_vs_pylate"] = round(
            res["loader_padded_tokens_per_s"] / res["pylate_padded_tokens_per_s"], 1
        )
        # ---- integrity: the sha256 of every shard a phase's ranks check before the first step (one rank here,
        # all shards), against the loader's own time to serve those rows once
        t0 = time.perf_counter()
        assert loader.verify_share(0, 1) == []
        res["hash_all_shards_s"] = round(time.perf_counter() - t0, 3)
        res["loader_epoch_s"] = round(loader.sources[0].rows / res["loader_pairs_per_s"], 3)
        res["hash_cost_vs_loader_epoch"] = round(res["hash_all_shards_s"] / res["loader_epoch_s"], 4)

        # ---- memory: 1× vs 10× source, fresh processes
        _synthetic_copy(tmp / "shards/msmarco", tmp / "shards10/msmarco", 10)
        rss = {}
        steps = len(rows) // a.batch
        for name, shards, s in (("1x", "shards", steps), ("10x", "shards10", steps), ("10x_full_epoch", "shards10", 0)):
            rj = json.dumps(_recipe_dict(model_path, tmp / shards, src, a.batch, epochs=1.0))
            out = subprocess.run(
                [sys.executable, __file__, "--child-rss", rj, str(s)], capture_output=True, text=True, check=True
            )
            rss[name] = json.loads(out.stdout.strip().splitlines()[-1])
        res["rss"] = rss
        res["rss_anon_growth_10x_vs_1x_mb"] = round(
            rss["10x_full_epoch"]["after"]["rss_anon_mb"] - rss["1x"]["after"]["rss_anon_mb"], 1
        )
        res["shard_mb_1x"] = round(sum(p.stat().st_size for p in (tmp / "shards/msmarco").glob("*.arrow")) / 2**20, 1)
        res["load_avg_end"] = _load_avg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if a.json:
        print(json.dumps(res))
        return 0
    print(
        f"rows {res['rows']} real MS MARCO pairs, MiniLM, q {res['query_length']} / d {res['document_length']}, "
        f"prompts, batch {a.batch}, 1 process each (load avg {res['load_avg_start']} → {res['load_avg_end']})"
    )
    print(
        f"  PyLate collator    {res['pylate_pairs_per_s']:>12,.0f} pairs/s  "
        f"{res['pylate_padded_tokens_per_s']:>14,.0f} padded tok/s"
    )
    print(
        f"  colbertzero loader {res['loader_pairs_per_s']:>12,.0f} pairs/s  "
        f"{res['loader_padded_tokens_per_s']:>14,.0f} padded tok/s"
        f"  ({res['loader_tokens_per_s']:,.0f} real tok/s)"
    )
    print(
        f"  ratio              {res['ratio_vs_pylate']:>12}×  pairs/s, {res['ratio_padded_tokens_vs_pylate']}× "
        f"padded tokens/s"
    )
    print(
        f"  prepare            {res['prepare_pairs_per_s_1w']:>12,.0f} pairs/s 1 worker, "
        f"{res['prepare_pairs_per_s_2w']:,.0f} with 2 ({res['prepare_scaling_2_vs_1']}×; wall, process start "
        f"included; "
        f"{res['prepare_rows']} rows)"
    )
    print(
        f"  prepare per process{res['prepare_pairs_per_s_per_process_1w']:>12,.0f} pairs/s with 1 worker, "
        f"{res['prepare_pairs_per_s_per_process_2w']:,.0f} each with 2 (inside the workers; per CPU-second: "
        f"{res['prepare_pairs_per_cpu_s_1w']:,.0f} and {res['prepare_pairs_per_cpu_s_2w']:,.0f})"
    )
    print(f"  integrity: sha256 of every shard {res['hash_all_shards_s']:.3f} s = "
          f"{100 * res['hash_cost_vs_loader_epoch']:.2f}% of the loader's epoch ({res['loader_epoch_s']:.3f} s, one "
          "rank; each rank hashes 1/world of the shards)")
    for k, v in res["rss"].items():
        print(
            f"  RSS {k:<15} rows {v['rows']:>7}, {v['steps']:>4} steps: anon {v['after']['rss_anon_mb']:>6} MB, "
            f"total {v['after']['rss_mb']:>6} MB (opened: anon {v['opened']['rss_anon_mb']} MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
