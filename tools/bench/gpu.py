#!/usr/bin/env python3
"""The GPU check, prepared for a short loan: the three phases' steps at the paper's shapes, PyLate beside them.

    bash tools/bench/gpu.sh                              # on the GPU machine: install, then this, JSON into $OUT
    python tools/bench/gpu.py [--out DIR] [--batch N]    # the same, once installed
    python tools/bench/gpu.py --device cpu --tiny        # toy shapes on CPU: the script's own check, by hand

The model is ModernBERT-base's architecture with random weights and a byte-level BPE tokenizer of its kind
(`builtin:modernbert-base`: the hub is out of reach; speed depends on the shapes, not the weights). bf16 on GPU.

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
distillation scores and their autograd gradients, relative differences and each side's time.
One JSON object to `--out`/gpu.json (and stdout with --json).
"""

from __future__ import annotations

import argparse
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

import step as S  # noqa: E402 - the step benchmark's data, preparation and worker plumbing

PAPER_PAIRS_PER_GPU = S.PAPER_PAIRS_PER_GPU
SHAPES = {  # kind: (query length, document length, documents per query, GradCache chunk, batch, accumulation)
    "unsupervised": (32, 180, 1, 512, None, 1),
    "supervised": (32, 512, 11, 16, 64, 1),
    "distillation": (32, 512, 32, 4, 8, 2),
}
TINY = {"unsupervised": (8, 16, 1, 4, 8, 1), "supervised": (8, 16, 3, 2, 4, 1), "distillation": (8, 16, 4, 2, 4, 2)}


def rows_for(kind: str, n_docs: int, count: int) -> list[dict]:
    """Real text (BEIR msmarco-5k): pairs; a query with its judged passage and n_docs-1 others; n_docs scored."""
    pairs = S.pair_rows(count)
    if kind == "unsupervised":
        return pairs
    docs = [r["document"] for r in pairs]
    rng = random.Random(0)
    out = []
    for i, r in enumerate(pairs[:count]):
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


def prepare(kind: str, shapes: tuple, work: Path, model: str, steps: int, device: str):
    from colbertzero.data.prepare import prepare_recipe

    folder = work / f"{kind}-{shapes[4]}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows_for(kind, shapes[2], shapes[4] * (steps + 1))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=4096, help="unsupervised global batch on the one GPU")
    p.add_argument("--steps", type=int, default=2, help="timed steps per kind (one more warms up)")
    p.add_argument("--tiny", action="store_true", help="toy shapes (checks the script on CPU)")
    p.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu.json")
    p.add_argument("--work", default=None, help="data, shards and the model (default: OUT/work)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu bench: no CUDA device here; run it on the GPU machine (or --device cpu --tiny)", file=sys.stderr)
        return 2
    from colbertzero.models import make_modernbert_base

    out_dir = Path(args.out)
    work = Path(args.work) if args.work else out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = make_modernbert_base(work / "modernbert-base")
    shapes = dict(TINY if args.tiny else SHAPES)
    if not args.tiny:
        shapes["unsupervised"] = shapes["unsupervised"][:4] + (args.batch, 1)
    result: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                    "model": "ModernBERT-base architecture, random weights, BPE tokenizer", "steps": args.steps,
                    "paper_pairs_per_s_per_gpu": PAPER_PAIRS_PER_GPU, "kinds": {}}
    result["scoring_check"] = scoring_check(args.device)
    S.log(f"scoring check: {json.dumps(result['scoring_check'])}")
    for kind, sh in shapes.items():
        r, rows = prepare(kind, sh, work, model, args.steps, args.device)
        res = S.run_worker("gpu", {"model": model, "recipe": r.resolved(), "device": args.device,
                                   "steps": args.steps}, work)
        res.update(query_length=sh[0] + 7, document_length=sh[1] + 7, documents_per_query=sh[2], batch=sh[4],
                   gradcache_mini_batch=sh[3], gradient_accumulation=sh[5])
        result["kinds"][kind] = res
        S.log(f"{kind}: {res['pairs_per_s']:.1f} pairs/s, {res['tflops']:.2f} TFLOP/s, MFU {res['mfu']}")
        if kind == "unsupervised":
            ordered = work / f"{kind}-{sh[4]}" / "ordered.jsonl"
            ordered.write_text("".join(json.dumps(x) + "\n" for x in S.step_rows(r, rows, args.steps + 1)))
            theirs = S.run_worker("pylate-gpu", {"model": model, "rows": str(ordered), "shapes": list(sh),
                                                 "device": args.device, "steps": args.steps}, work)
            result["pylate_unsupervised"] = theirs
            result["ratio_vs_pylate"] = res["pairs_per_s"] / theirs["pairs_per_s"]
            result["ratio_vs_paper"] = res["pairs_per_s"] / PAPER_PAIRS_PER_GPU
    result["wall_s"] = round(time.time() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for kind, res in result["kinds"].items():
            mfu = f"{res['mfu']:.1%}" if res.get("mfu") is not None else "n/a"
            print(f"{kind:<13} {res['pairs_per_s']:>9.1f} pairs/s  {res['tokens_per_s']:>10.0f} tok/s  "
                  f"{res['tflops']:>7.2f} TFLOP/s  MFU {mfu}")
        print(f"unsupervised vs PyLate {result['ratio_vs_pylate']:.2f}x, vs the paper's ~{PAPER_PAIRS_PER_GPU:.0f} "
              f"pairs/s/GPU {result['ratio_vs_paper']:.2f}x; {out_dir / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
