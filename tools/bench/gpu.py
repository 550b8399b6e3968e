#!/usr/bin/env python3
"""The GPU check, prepared for a short loan: the three phases' steps at the paper's shapes, PyLate beside them.

    bash tools/bench/gpu.sh                              # on the GPU machine (no network): .whl/ installed, then this
    python tools/bench/gpu.py [--out DIR] [--batch N]    # the same, once installed
    python tools/bench/gpu.py --device cpu --tiny        # a tiny model and toy shapes on CPU: the script's own check

Nothing outside the repository is read (the GPU machine has no network and no ../shared): the model is ModernBERT-base's
architecture with random weights and a byte-level BPE tokenizer of its kind trained on Python's own documentation
(`builtin:modernbert-base`; speed depends on the shapes, not the weights), and the text is Python's documentation cut
to the token lengths of the rows this benchmark used before (BEIR msmarco-5k's judged pairs, `LENGTHS`). bf16 on GPU.

- unsupervised: q 32+7 / d 180+7, GradCache mini-batch 512, global batch `--batch` (default 4096: the largest the
  8-minute budget allows timing; the paper's 16,384 per step would take minutes a step at its own speed) on one GPU,
  so every query is scored against the whole batch as on each of the paper's GPUs (less the communication); and
  PyLate's SentenceTransformerTrainer + CachedContrastive(mini_batch_size=512) on the same GPU and the same batches.
- supervised: q 39 / d 519, 10 hard negatives, batch 64 (the paper's global batch, here on one GPU), GradCache 16.
- distillation: q 39 / d 519, 32 documents per query, 4 queries × accumulation 2 (the card's per-device batch).

Per step kind: pairs/s/GPU, tokens/s, model TFLOP/s and MFU (`metering.FlopCounter`: GradCache's re-forward and MaxSim
counted), peak GPU memory; unsupervised: the ratio to PyLate and to the paper's derived ~177 pairs/s/GPU (408
GH200-hours for 239M pairs, ~90 % of the budget in that phase). Goals: ≥ 3× the paper, ≥ 35 % MFU, ≥ 1.2× PyLate.
The MaxSim backends (`colbertzero.scoring`): steps run with the phase's `scores_backend: auto` (the fused
late-interaction-kernels kernel when installed, named in the JSON), and `scoring_check` compares the fused kernel with
PyLate's torch path on embeddings at the phase shapes: the contrastive loss and its hand-written gradients, the
distillation scores and their autograd gradients, relative differences and each side's time. `search_check` runs
`colbertzero beir`'s search stage at MS MARCO's shapes (6,980 queries × 32 tokens against 100k synthetic fp16
documents read from disk): seconds, TFLOP/s, top-100 against a brute force, the 15 BEIR datasets' search at that rate.

One JSON object in `--out`/gpu.json, rewritten (whole: temp + rename) after every part — the environment, each step
kind, PyLate's baseline, the kernel check — so a run cut short still returns what it measured; a part that fails is
recorded with its error and the next one runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import beir_scale  # noqa: E402 - the BEIR search benchmark's synthetic corpus, brute force and projection
import step as S  # noqa: E402 - the step benchmark's preparation and worker plumbing
import wheelhouse  # noqa: E402 - what the GPU machine was given beyond its image (.whl/MANIFEST.json)

PAPER_PAIRS_PER_GPU = S.PAPER_PAIRS_PER_GPU
SHAPES = {  # kind: (query length, document length, documents per query, GradCache chunk, batch, accumulation)
    "unsupervised": (32, 180, 1, 512, None, 1),
    "supervised": (32, 512, 11, 16, 64, 1),
    "distillation": (32, 512, 32, 4, 8, 2),
}
TINY = {"unsupervised": (8, 16, 1, 4, 8, 1), "supervised": (8, 16, 3, 2, 4, 1), "distillation": (8, 16, 4, 2, 4, 2)}
TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "global_attn_every_n_layers": 2, "local_attention": 64}
# Token counts (the BPE tokenizer above, no special tokens) at every 5th percentile of the rows this benchmark took
# before it left ../shared: BEIR msmarco-5k's judged pairs cycled to 12,288 rows (`tools/bench/step.py`'s pair_rows);
# means 11.0 and 126.5. tests/test_gpu_bench.py re-measures them where ../shared is present.
LENGTHS = {
    "query": [4, 6, 7, 8, 8, 8, 9, 9, 9, 10, 11, 11, 12, 13, 13, 13, 14, 14, 16, 17, 20],
    "document": [21, 67, 76, 82, 87, 91, 95, 99, 103, 107, 111, 117, 124, 132, 144, 156, 169, 184, 200, 223, 378],
}


def length_quantiles(texts: list[str], tokenizer) -> list[int]:
    import numpy as np

    counts = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [int(round(v)) for v in np.percentile(counts, np.arange(0, 101, 5))]


def _draw(quantiles: list[int], rng: random.Random) -> int:
    """A length from the distribution the quantiles describe (linear between them)."""
    x = rng.random() * (len(quantiles) - 1)
    i = min(int(x), len(quantiles) - 2)
    return max(1, round(quantiles[i] + (x - i) * (quantiles[i + 1] - quantiles[i])))


@functools.lru_cache(maxsize=2)
def _token_stream(tokenizer) -> list[int]:
    """Python's documentation (the Language Reference and the standard library's docstrings) as one token stream."""
    from colbertzero.demo.pydocs import read_python_docs

    apis, reference = read_python_docs()
    texts = [f"{a.summary} {a.body}".strip() for a in apis] + [f"{h}. {t}" for h, t in reference]
    return [i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids]


def pair_rows(n: int, tokenizer, seed: int = 0) -> list[dict]:
    """n (query, document) rows cut from Python's documentation (every CPython has it), each of a token length drawn
    from `LENGTHS`: the shapes and padding of the msmarco-5k rows without their text."""
    stream = _token_stream(tokenizer)
    rng = random.Random(seed)
    rows, pos = [], 0

    def cut(length: int) -> str:
        nonlocal pos
        if pos + length > len(stream):
            pos = rng.randrange(0, 97)  # around again, shifted: the same text in other pieces
        piece = stream[pos : pos + length]
        pos += length
        return tokenizer.decode(piece).strip() or "."

    for _ in range(n):
        rows.append({"query": cut(_draw(LENGTHS["query"], rng)), "document": cut(_draw(LENGTHS["document"], rng))})
    return rows


def rows_for(kind: str, n_docs: int, count: int, tokenizer) -> list[dict]:
    """Pairs; or a query with its passage and n_docs-1 others (supervised: negatives; distillation: all scored)."""
    pairs = pair_rows(count, tokenizer)
    if kind == "unsupervised":
        return pairs
    docs = [r["document"] for r in pairs]
    rng = random.Random(0)
    out = []
    for i, r in enumerate(pairs):
        others = [docs[(i * 7 + k * 13 + 1) % len(docs)] for k in range(n_docs - 1)]
        if kind == "supervised":
            out.append({"query": r["query"], "positive": r["document"], "negatives": others})
        else:  # teacher scores: any numbers do for speed; the positive first
            scores = sorted((rng.uniform(0, 10) for _ in range(n_docs)), reverse=True)
            out.append({"query": r["query"], "documents": [r["document"], *others], "scores": scores})
    return out


def recipe_for(kind: str, shapes: tuple, path: Path, shards: Path, model: str, steps: int, device: str):
    from colbertzero.recipe import recipe_from_dict

    q, d, n_docs, mini, batch, accumulation = shapes
    data = {"shards_dir": str(shards), "epochs": 1, "sources": [{"name": "bench", "path": str(path)}]}
    if kind == "supervised":
        data["max_negatives"] = n_docs - 1
    if kind == "distillation":
        data["docs_per_query"] = n_docs
    phase = {"kind": kind, "init": model, "data": data, "lr": 1e-5, "global_batch_size": batch,
             "gradient_accumulation": accumulation, "gradcache_mini_batch": mini, "query_length": q,
             "document_length": d, "max_steps": steps, "seed": 0, "prompts": {"enabled": True},
             "bf16": device == "cuda", "deepspeed": {"zero_stage": 1},
             "resources": {"nodes": 1, "gpus_per_node": 1 if device == "cuda" else 0, "cpu_tasks_per_node": 1}}
    return recipe_from_dict({"name": "gpu-bench", "phases": {"bench": phase}})


def prepare(kind: str, shapes: tuple, work: Path, model: str, steps: int, device: str, tokenizer):
    from colbertzero.data.prepare import prepare_recipe

    folder = work / f"{kind}-{shapes[4]}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows_for(kind, shapes[2], shapes[4] * (steps + 1), tokenizer)
    path = S._jsonl(folder / "rows.jsonl", rows)
    r = recipe_for(kind, shapes, path, folder / "shards", model, steps + 1, device)
    if not (folder / "shards" / "bench" / "index.json").exists():
        prepare_recipe(r, workers=2, progress=False)
    return r, rows


def scoring_check(device: str, queries: int = 256, docs: int = 2048, dim: int = 128) -> dict:
    """The fused kernel against PyLate's torch path on the same bf16-rounded embeddings (what a bf16 encoder hands
    the loss): unsupervised-shaped contrastive (hand-written gradients) and distillation-shaped KD scores."""
    import torch

    from colbertzero import scoring
    from colbertzero.train.losses import contrastive_labels, contrastive_sum_and_grads

    lik = scoring.select("auto", device, dim)
    if lik.name != "lik":
        return {"skipped": lik.why}
    torch_ = scoring.TORCH
    g = torch.Generator(device=device).manual_seed(0)

    def emb(*shape):
        x = torch.nn.functional.normalize(torch.randn(*shape, dim, generator=g, device=device), dim=-1)
        return x.bfloat16().float()

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    q, d = emb(queries, 39), emb(docs, 187)
    q_mask, d_mask = None, torch.rand(docs, 187, generator=g, device=device) > 0.2
    labels = contrastive_labels(queries, docs // queries, 0, q.device)
    t = torch.tensor([0.02], device=device)
    out = {"backend": lik.why, "contrastive": {"queries": queries, "documents": docs}}
    results = {}
    for sc in (torch_, lik, lik):  # the kernel twice: its first call compiles and autotunes
        results[sc.name], seconds = timed(lambda: contrastive_sum_and_grads(q, q_mask, d, d_mask, labels, t,
                                                                            float(queries), scorer=sc))
        out["contrastive"][f"{sc.name}_s"] = round(seconds, 4)
    (l0, q0, d0, t0), (l1, q1, d1, t1) = results["torch"], results["lik"]
    out["contrastive"].update(loss_torch=float(l0), loss_lik=float(l1), loss_rel=rel(l1, l0), q_grad_rel=rel(q1, q0),
                              d_grad_rel=rel(d1, d0), temperature_grad_rel=rel(t1, t0))
    kq, kd = emb(32, 39), emb(32, 32, 519)
    kd_mask = torch.rand(32, 32, 519, generator=g, device=device) > 0.2
    grads = {}
    for sc in (torch_, lik):
        qq, dd = kq.clone().requires_grad_(), kd.clone().requires_grad_()
        scores = sc.kd_scores(qq, None, dd, kd_mask)
        (scores.square().sum()).backward()
        grads[sc.name] = (scores.detach(), qq.grad, dd.grad)
    (s0, gq0, gd0), (s1, gq1, gd1) = grads["torch"], grads["lik"]
    out["distillation"] = {"scores_rel": rel(s1, s0), "q_grad_rel": rel(gq1, gq0), "d_grad_rel": rel(gd1, gd0)}
    return out


def search_check(device: str, work: Path, docs: int, queries: int, checked: int = 4) -> dict:
    """`colbertzero beir`'s search stage at MS MARCO shapes (dev's 6,980 queries of 32 tokens against a shard of
    synthetic fp16 documents of MS MARCO lengths, read from disk as a search item reads them): its time and useful
    TFLOP/s, the first ``checked`` queries' top-100 against a brute force on the CPU, and the 15 BEIR datasets'
    search at that rate."""
    import torch

    from colbertzero.retrieval.embeddings import DocumentEmbeddings
    from colbertzero.retrieval.search import exact_search

    folder = work / f"beir-corpus-{docs}"
    if not (folder / "meta.json").is_file():
        beir_scale.make_corpus(folder, docs, seed=docs)
    corpus = DocumentEmbeddings.load(folder)
    q = beir_scale.make_queries(queries)
    exact_search(list(q[:8]), corpus, beir_scale.K, device=device)  # warm-up: the kernel compiles and tunes
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    scores, index = exact_search(list(q), corpus, beir_scale.K, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    flops = 2 * queries * beir_scale.Q_TOKENS * int(corpus.offsets[-1]) * beir_scale.DIM
    ref_s, ref_i, least = beir_scale.brute_force(folder, checked)
    same = beir_scale.compare(scores[:checked], index[:checked], ref_s, ref_i)
    rate = flops / seconds
    proj = beir_scale.projection(1.0, rate / 1e12)  # at the measured search rate itself
    return {"documents": docs, "doc_tokens": int(corpus.offsets[-1]), "queries": queries, "seconds": round(seconds, 3),
            "tflop": flops / 1e12, "tflops": rate / 1e12, "checked_queries": checked, **same, "least_maximum": least,
            "beir_15_search_pflop": proj["search_pflop"], "beir_15_search_gpu_hours": proj["search_gpu_hours"]}


def environment(device: str) -> dict:
    """What ran: the GPU, torch/CUDA/NCCL, the MaxSim backend, the packages and where each came from (the image or
    .whl/), any requirement of a carried wheel the image does not meet (installed --no-deps: recorded, not fatal)."""
    import platform

    import torch

    from colbertzero import scoring

    env = {"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": "cpu"}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
        env.update(device=torch.cuda.get_device_name(0), capability="%d.%d" % torch.cuda.get_device_capability(0),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl and str(nccl))
    env["scores_backend"] = scoring.select("auto", device, 128).why
    env["packages"] = wheelhouse.provenance(("transformers", "sentence-transformers", "tokenizers", "pylate",
                                             "deepspeed", "late-interaction-kernels", "triton", "pyarrow", "numpy"))
    env["unmet_requirements"] = wheelhouse.unmet()
    return env


class Results:
    """gpu.json, rewritten whole after every part (temp + rename): a run stopped at its time limit keeps the rest."""

    def __init__(self, out_dir: Path, data: dict):
        self.path, self.data, self.t0 = out_dir / "gpu.json", data, time.time()
        out_dir.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        self.data["wall_s"] = round(time.time() - self.t0, 1)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def part(self, key: str, fn, *path: str):
        """fn()'s result at data[path…][key], saved; a failure is recorded with its error, and the run goes on."""
        where = self.data
        for k in path:
            where = where.setdefault(k, {})
        t = time.time()
        try:
            where[key] = fn()
        except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others' figures
            where[key] = {"error": f"{type(e).__name__}: {str(e)[-3000:]}"}
            S.log(f"{key}: FAILED after {time.time() - t:.0f} s: {str(e)[-800:]}")
        self.save()
        return where[key]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=4096, help="unsupervised global batch on the one GPU")
    p.add_argument("--steps", type=int, default=2, help="timed steps per kind (one more warms up)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and toy shapes (checks the script on CPU)")
    p.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu.json")
    p.add_argument("--work", default=None, help="data, shards and the model (default: OUT/work)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu bench: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; run it on the "
              "GPU machine (or --device cpu --tiny)", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from colbertzero.models import make_modernbert_base

    out_dir = Path(args.out)
    work = Path(args.work) if args.work else out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    res = Results(out_dir, {"model": "ModernBERT-base architecture, random weights, BPE tokenizer"
                                     + (" (tiny shapes)" if args.tiny else ""),
                            "steps": args.steps, "paper_pairs_per_s_per_gpu": PAPER_PAIRS_PER_GPU, "kinds": {}})
    env = res.part("environment", lambda: environment(args.device))
    res.data["device"] = env.get("device")  # `colbertzero plan --gpu-bench` names the GPU from it
    print(f"[gpu] {env.get('device')} · torch {env.get('torch')} · CUDA {env.get('cuda')} · NCCL {env.get('nccl')} · "
          f"MaxSim: {env.get('scores_backend')}", flush=True)
    for name, where in (env.get("packages") or {}).items():
        print(f"[gpu]   {name} {where}", flush=True)
    if env.get("unmet_requirements"):
        print(f"[gpu] requirements the image does not meet: {'; '.join(env['unmet_requirements'])}", flush=True)
    if args.tiny:
        model = make_modernbert_base(work / "modernbert-tiny", **TINY_MODEL)
    else:
        model = make_modernbert_base(work / "modernbert-base")
    tokenizer = AutoTokenizer.from_pretrained(model)
    shapes = dict(TINY if args.tiny else SHAPES)
    if not args.tiny:
        shapes["unsupervised"] = shapes["unsupervised"][:4] + (args.batch, 1)

    def data_lengths():
        rows = pair_rows(2048, tokenizer)
        return {k: {"ours": length_quantiles([r[k] for r in rows], tokenizer)[1::2], "msmarco_5k": LENGTHS[k][1::2]}
                for k in ("query", "document")}

    res.part("token_lengths_every_10th_percentile", data_lengths)
    for kind, sh in shapes.items():
        r, rows = prepare(kind, sh, work, model, args.steps, args.device, tokenizer)

        def step(kind=kind, sh=sh, r=r):
            out = S.run_worker("gpu", {"model": model, "recipe": r.resolved(), "device": args.device,
                                       "steps": args.steps}, work)
            out.update(query_length=sh[0] + 7, document_length=sh[1] + 7, documents_per_query=sh[2], batch=sh[4],
                       gradcache_mini_batch=sh[3], gradient_accumulation=sh[5])
            S.log(f"{kind}: {out['pairs_per_s']:.1f} pairs/s, {out['tflops']:.2f} TFLOP/s, MFU {out['mfu']}")
            return out

        ours = res.part(kind, step, "kinds")
        if kind == "unsupervised":
            ordered = work / f"{kind}-{sh[4]}" / "ordered.jsonl"
            ordered.write_text("".join(json.dumps(x) + "\n" for x in S.step_rows(r, rows, args.steps + 1)))
            theirs = res.part("pylate_unsupervised", lambda sh=sh: S.run_worker(
                "pylate-gpu", {"model": model, "rows": str(ordered), "shapes": list(sh), "device": args.device,
                               "steps": args.steps}, work))
            if "pairs_per_s" in ours and "pairs_per_s" in theirs:
                res.data["ratio_vs_pylate"] = ours["pairs_per_s"] / theirs["pairs_per_s"]
            if "pairs_per_s" in ours:
                res.data["ratio_vs_paper"] = ours["pairs_per_s"] / PAPER_PAIRS_PER_GPU
            res.save()
    check = res.part("scoring_check", lambda: scoring_check(args.device))
    S.log(f"scoring check: {json.dumps(check)}")
    search = res.part("search_check", lambda: search_check(args.device, work, *((2000, 64) if args.tiny
                                                                                else (100_000, 6_980))))
    S.log(f"search check: {json.dumps(search)}")
    if args.json:
        print(json.dumps(res.data, indent=2))
    else:
        for kind, k in res.data["kinds"].items():
            if "error" in k:
                print(f"{kind:<13} failed: {k['error'][:200]}")
                continue
            mfu = f"{k['mfu']:.1%}" if k.get("mfu") is not None else "n/a"
            print(f"{kind:<13} {k['pairs_per_s']:>9.1f} pairs/s  {k['tokens_per_s']:>10.0f} tok/s  "
                  f"{k['tflops']:>7.2f} TFLOP/s  MFU {mfu}")
        if "ratio_vs_pylate" in res.data:
            print(f"unsupervised vs PyLate {res.data['ratio_vs_pylate']:.2f}x, vs the paper's "
                  f"~{PAPER_PAIRS_PER_GPU:.0f} pairs/s/GPU {res.data['ratio_vs_paper']:.2f}x")
        print(f"{res.path}")
    failed = [k for k, v in [*res.data["kinds"].items(), ("pylate_unsupervised", res.data.get("pylate_unsupervised")),
                             ("scoring_check", check), ("search_check", search), ("environment", env)]
              if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
