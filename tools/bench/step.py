#!/usr/bin/env python3
"""Training-step benchmark on CPU: colbertzero's step beside PyLate's, and GradCache's memory. The GPU figures
(pairs/s/GPU, MFU, the ratio to PyLate at the paper's shapes) are tools/bench/gpu.py's, which uses this module's
workers.

    python tools/bench/step.py [--json] [--steps N] [--models minilm,tiny-modernbert] [--memory-sizes 128,...,2048]

1. Throughput (CPU). For each model (MiniLM, `colbertzero.models.minilm_path()`; the tiny ModernBERT) and each loss
   kind, optimizer steps/s of
     PyLate       SentenceTransformerTrainer + pylate.losses Contrastive / CachedContrastive(mini_batch_size=4) /
                  Distillation + ColBERTCollator (which tokenizes every step: that is how PyLate trains);
     colbertzero  GlobalBatchLoader on prepared shards + train.step.train_step on a DeepSpeed engine (ZeRO-1, one
                  process): the step `colbertzero train` runs;
   batch 16, query length 32, document length 128, no prompts, `--warmup` steps (allocator and caches settle over the
   first steps of a process) then `--steps` timed ones (by default 4 for MiniLM, ~3 s each, and 20 for the tiny
   ModernBERT, whose steps take ~0.15 s: fewer would time scheduler noise). Both take
   the same batches: PyLate's dataset is written in the order of colbertzero's loader and read sequentially, so step
   t holds the same rows on both sides; the first step's losses (same initial weights) are reported side by side as
   the check, equal where the model has no dropout (the tiny ModernBERT; MiniLM's dropout draws its own masks on
   each side). Other load on the machine shows in the per-round figures: compare rounds, or re-run when quiet.
   Rows from the FlagEmbedding examples in ../shared/data: (query, positive, one hard negative) for the contrastive
   losses, (query, 4 documents, teacher scores) for distillation. Every side and loss runs in a fresh process.
2. Memory (CPU). Peak RSS of a process taking one GradCache step (unsupervised pairs from BEIR msmarco-5k's qrels,
   tiny ModernBERT or `--memory-model minilm`, mini-batch 32, q 32 / d 128) at each global batch, one process per
   size. gradcache_memory_ratio = peak RSS at the largest size / at the smallest; memory_per_pair_kb sets what one
   more pair costs beside what GradCache must hold per pair (its cached embeddings and their gradients, fp32): the
   rest (encoder activations, the MaxSim intermediate) should not grow with the batch.
`--json` prints one JSON object: throughput per model and loss, `ratio_vs_pylate` per loss kind (the lower of the two
models), memory per size, `gradcache_memory_ratio`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
FLAG = DATA / "train" / "flagembedding-examples"
BEIR = DATA / "beir" / "msmarco-5k"

LOSSES = ("contrastive", "cached_contrastive", "distillation")
KIND = {"contrastive": "supervised", "cached_contrastive": "supervised", "distillation": "distillation"}
BATCH, Q_LEN, D_LEN, MINI, DOCS = 16, 32, 128, 4, 4
MEMORY_MINI = 32
TIMED_STEPS = {"minilm": 4, "tiny-modernbert": 20}  # per model when --steps is not given: seconds of timing each
PAPER_PAIRS_PER_GPU = 177.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data (parent process)
def _jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:  # an unchanged file keeps its prepared shards valid
        path.write_text(text)
        shutil.rmtree(path.parent / "shards", ignore_errors=True)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:  # line by line: str.splitlines would also split inside texts (U+2028 and the like)
        return [json.loads(line) for line in f if line.strip()]


def _flag_rows() -> list[dict]:
    rows = []
    for name in ("msmarco.jsonl", "nq.jsonl", "llara_toy_finetune_data.jsonl"):
        rows += _read_jsonl(FLAG / name)
    return rows


def triplet_rows() -> list[dict]:
    """(query, positive, one hard negative): one row per mined negative, shuffled so batches mix queries."""
    rows = [{"query": r["query"], "positive": r["pos"][0], "negatives": [n]} for r in _flag_rows() for n in r["neg"]]
    random.Random(0).shuffle(rows)
    return rows


def kd_rows() -> list[dict]:
    """(query, 4 documents, teacher scores): the positive with three consecutive negatives, highest score first."""
    rows = []
    for r in _flag_rows():
        scored = list(zip(r["pos"] + r["neg"], r["pos_scores"] + r["neg_scores"]))
        for j in range(1, len(scored) - DOCS + 2, DOCS - 1):
            group = sorted([scored[0]] + scored[j : j + DOCS - 1], key=lambda x: -x[1])
            rows.append({"query": r["query"], "documents": [d for d, _ in group], "scores": [s for _, s in group]})
    random.Random(0).shuffle(rows)
    return rows


def pair_rows(n: int | None = None) -> list[dict]:
    """(query, judged passage) from BEIR msmarco-5k's qrels; with `n`, cycled to n rows."""
    queries = {q["_id"]: q["text"] for q in _read_jsonl(BEIR / "queries.jsonl")}
    corpus = {d["_id"]: d["text"] for d in _read_jsonl(BEIR / "corpus.jsonl")}
    qrels = [line.split("\t") for line in (BEIR / "qrels" / "test.tsv").read_text().splitlines() if line.strip()]
    rows = [{"query": queries[q], "document": corpus[d]} for q, d, _ in qrels if q in queries and d in corpus]
    if n is not None:
        # More (query, passage) rows than are judged, for throughput only: each passage with each query in turn.
        qs, ds = list(queries.values()), list(corpus.values())
        rows += [{"query": qs[(i + i // len(ds)) % len(qs)], "document": ds[i % len(ds)]}
                 for i in range(max(0, n - len(rows)))]
    random.Random(0).shuffle(rows)
    return rows


def recipe(kind: str, path: Path, shards: Path, model: str, *, batch: int, q: int, d: int, steps: int,
           mini: int | None = None, prompts: bool = False, bf16: bool = False, zero: int = 1):
    from colbertzero.recipe import recipe_from_dict

    data = {"shards_dir": str(shards), "epochs": 1, "sources": [{"name": "bench", "path": str(path)}]}
    if kind == "supervised":
        data["max_negatives"] = 1
    if kind == "distillation":
        data["docs_per_query"] = DOCS
    phase = {"kind": kind, "init": model, "data": data, "lr": 1e-5, "global_batch_size": batch,
             "gradcache_mini_batch": mini, "query_length": q, "document_length": d, "max_steps": steps, "seed": 0,
             "prompts": {"enabled": prompts}, "bf16": bf16, "deepspeed": {"zero_stage": zero},
             "resources": {"nodes": 1, "gpus_per_node": 0, "cpu_tasks_per_node": 1}}
    return recipe_from_dict({"name": "bench", "phases": {"bench": phase}})


def prepared(kind: str, rows: list[dict], work: Path, model: str, name: str, **kw):
    """Shards of `rows` for `model`'s tokenizer (kept in `work` between runs) and the recipe reading them."""
    from colbertzero.data.prepare import prepare_recipe

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    path = _jsonl(folder / "rows.jsonl", rows)
    r = recipe(kind, path, folder / "shards", model, **kw)
    if not (folder / "shards" / "bench" / "index.json").exists():
        prepare_recipe(r, workers=1, progress=False)
    return r


def step_rows(r, rows: list[dict], steps: int) -> list[dict]:
    """The rows colbertzero's loader gives at steps 0 … steps-1, in order: PyLate's dataset."""
    from colbertzero.data.loader import GlobalBatchLoader

    loader = GlobalBatchLoader(r, "bench", 0, 1)
    return [rows[i] for t in range(steps) for i in loader.global_rows(t)[1]]


# ---------------------------------------------------------------- workers (fresh processes)
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def worker_pylate(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from pylate import losses, models, utils
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from torch.utils.data import BatchSampler, SequentialSampler
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.cpu, self.losses = [], [], []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    def sequential(dataset, batch_size, drop_last, **kw):  # the rows in the order written
        return BatchSampler(SequentialSampler(dataset), batch_size, drop_last)

    out = {}
    for loss_name in spec["losses"]:
        rows = _read_jsonl(Path(spec["rows"][loss_name]))
        if KIND[loss_name] == "supervised":
            rows = [{"query": r["query"], "positive": r["positive"], "negative": r["negatives"][0]} for r in rows]
        torch.manual_seed(0)  # the same new layers as colbertzero's side builds from the same seed
        model = models.ColBERT(spec["model"], device="cpu", embedding_size=128, query_length=Q_LEN,
                               document_length=D_LEN)
        loss = {"contrastive": lambda: losses.Contrastive(model),
                "cached_contrastive": lambda: losses.CachedContrastive(model, mini_batch_size=MINI),
                "distillation": lambda: losses.Distillation(model)}[loss_name]()
        clock = Clock()
        with tempfile.TemporaryDirectory() as tmp:
            args = SentenceTransformerTrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=BATCH,
                max_steps=spec["steps"] + spec["warmup"],
                learning_rate=1e-5,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                batch_sampler=sequential,
                seed=0,
                use_cpu=True,
                dataloader_drop_last=True,
                disable_tqdm=True,
            )
            trainer = SentenceTransformerTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(rows),
                loss=loss,
                data_collator=utils.ColBERTCollator(model.tokenize),
                callbacks=[clock],
            )
            trainer.train()
        w = spec["warmup"] - 1  # the timed steps end after the warm-up ones
        out[loss_name] = {
            "steps_per_s": spec["steps"] / (clock.ends[-1] - clock.ends[w]),
            "first_loss": clock.losses[0],
            "cpu_s_per_step": (clock.cpu[-1] - clock.cpu[w]) / spec["steps"],
        }
        log(f"pylate {Path(spec['model']).name} {loss_name}: {out[loss_name]['steps_per_s']:.3f} steps/s")
    return out


def _engine_for(r, init_path: str, rt):
    """What the phase runner builds: the PyLate model, its training module, the loader, the DeepSpeed engine."""
    import torch

    from colbertzero.data.loader import GlobalBatchLoader
    from colbertzero.models import colbert_for
    from colbertzero.train.engine import build_engine
    from colbertzero.train.metering import FlopCounter
    from colbertzero.train.module import ColBERTForTraining

    phase = r.phase("bench")
    torch.manual_seed(phase.seed)
    colbert = colbert_for(r, "bench", init_path, rt.device)
    module = ColBERTForTraining.for_phase(colbert, phase)
    flops = FlopCounter(colbert, phase, rt.world_size)
    loader = GlobalBatchLoader(r, "bench", rt.rank, rt.world_size)
    engine, _, _ = build_engine(module, phase, loader.total_steps, runtime=rt)
    return engine, loader, flops


def _timed_steps(engine, loader, phase, flops, steps: int, warmup: int = 1, scorer=None) -> dict:
    import torch

    from colbertzero.scoring import TORCH
    from colbertzero.train.step import train_step

    ends, cpu, first, total_flops, pairs, tokens = [], [], None, 0.0, 0, 0
    it = iter(loader)
    for i in range(steps + warmup):
        batch = next(it)
        res = train_step(engine, batch, phase, scorer or TORCH)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        first = res.loss if first is None else first
        if i >= warmup:
            total_flops += flops.total(flops.local(batch))
            pairs += res.n_queries
            tokens += res.n_tokens
    seconds = ends[-1] - ends[warmup - 1]
    return {
        "steps_per_s": steps / seconds,
        "seconds_per_step": seconds / steps,
        "first_loss": first,
        "cpu_s_per_step": (cpu[-1] - cpu[warmup - 1]) / steps,
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": tokens / seconds,
        "tflops": total_flops / seconds / 1e12,
    }


def worker_colbertzero(spec: dict) -> dict:
    from colbertzero.recipe import recipe_from_dict
    from colbertzero.train.dist import init_distributed

    rt = init_distributed(bf16=False)
    out = {}
    for loss_name in spec["losses"]:
        r = recipe_from_dict(spec["recipes"][loss_name])
        engine, loader, flops = _engine_for(r, spec["model"], rt)
        out[loss_name] = _timed_steps(engine, loader, r.phase("bench"), flops, spec["steps"], spec["warmup"])
        log(f"colbertzero {Path(spec['model']).name} {loss_name}: {out[loss_name]['steps_per_s']:.3f} steps/s")
        del engine
    return out


def worker_memory(spec: dict) -> dict:
    from colbertzero.recipe import recipe_from_dict
    from colbertzero.train.dist import init_distributed

    rt = init_distributed(bf16=False)
    r = recipe_from_dict(spec["recipe"])
    engine, loader, flops = _engine_for(r, spec["model"], rt)
    base = _rss_mb()
    t0 = time.perf_counter()
    from colbertzero.train.step import train_step

    train_step(engine, loader.batch(0), r.phase("bench"))
    return {"peak_rss_mb": _peak_rss_mb(), "rss_before_step_mb": base, "step_s": time.perf_counter() - t0}


def worker_gpu(spec: dict) -> dict:
    import torch

    from colbertzero import scoring
    from colbertzero.recipe import recipe_from_dict
    from colbertzero.train.dist import init_distributed
    from colbertzero.train.metering import peak_flops

    r = recipe_from_dict(spec["recipe"])
    phase = r.phase("bench")
    rt = init_distributed(bf16=phase.bf16, device="cuda:0" if spec["device"] == "cuda" else "cpu")
    engine, loader, flops = _engine_for(r, spec["model"], rt)
    scorer = scoring.select(phase.scores_backend, rt.device, r.model.embedding_size)  # as the phase runner does
    res = _timed_steps(engine, loader, phase, flops, spec["steps"], scorer=scorer)
    res["scores_backend"] = {"backend": scorer.name, "why": scorer.why}
    peak = peak_flops(rt.device, rt.dtype)
    res.update(
        device=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
        dtype=str(rt.dtype).replace("torch.", ""),
        peak_tflops=peak / 1e12 if peak else None,
        mfu=res["tflops"] * 1e12 / peak if peak else None,
        paper_pairs_per_s_per_gpu=PAPER_PAIRS_PER_GPU,
        vs_paper=res["pairs_per_s"] / PAPER_PAIRS_PER_GPU,
    )
    if rt.device.type == "cuda":
        res["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
    return res


def worker_pylate_gpu(spec: dict) -> dict:
    """PyLate's trainer with CachedContrastive on the same rows, in the order our loader took them."""
    import tempfile

    import torch
    from datasets import Dataset
    from pylate import losses, models, utils
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from torch.utils.data import BatchSampler, SequentialSampler
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    def sequential(dataset, batch_size, drop_last, **kw):
        return BatchSampler(SequentialSampler(dataset), batch_size, drop_last)

    rows = _read_jsonl(Path(spec["rows"]))
    q, d, _, mini, batch, _ = spec["shapes"]
    cuda = spec["device"] == "cuda"
    model = models.ColBERT(spec["model"], device="cuda" if cuda else "cpu", query_length=q + 7, document_length=d + 7)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=spec["steps"] + 1, learning_rate=1e-5,
            logging_steps=1, save_strategy="no", report_to="none", batch_sampler=sequential, bf16=cuda,
            use_cpu=not cuda, dataloader_drop_last=True, disable_tqdm=True)
        prompts = {"query": "search_query: ", "document": "search_document: "}
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows),
            loss=losses.CachedContrastive(model, mini_batch_size=mini, temperature=0.02),
            data_collator=utils.ColBERTCollator(model.tokenize, prompts=prompts), callbacks=[clock])
        trainer.train()
    seconds = clock.ends[-1] - clock.ends[0]  # the first step warms up
    out = {"pairs_per_s": spec["steps"] * batch / seconds, "seconds_per_step": seconds / spec["steps"]}
    if cuda:
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


WORKERS = {"pylate": worker_pylate, "colbertzero": worker_colbertzero, "memory": worker_memory, "gpu": worker_gpu,
           "pylate-gpu": worker_pylate_gpu}


def run_worker(kind: str, spec: dict, work: Path) -> dict:
    """`kind` in a fresh process (nothing shared: allocator, threads, DeepSpeed's global state, peak RSS)."""
    spec_path = work / f"spec-{kind}-{time.time_ns()}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")
    }
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", kind, "--spec", str(spec_path), "--out", str(out_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    result = json.loads(out_path.read_text())
    spec_path.unlink()
    out_path.unlink()
    return result


# ---------------------------------------------------------------- the three parts
def steps_for(model: str, given: int | None) -> int:
    return given if given is not None else TIMED_STEPS.get(model, 4)


def bench_throughput(models: list[str], given: int | None, rounds: int, work: Path, warmup: int = 2) -> dict:
    """Per model, `rounds` rounds of one PyLate process and one colbertzero process (the order alternating); a
    side's figure is its best round (wall clock: other load on the machine only ever slows a round down) and its
    least CPU time per step (all threads of the process: robust to other load, a second view)."""
    from colbertzero.models import resolve_model_ref

    data = {"supervised": triplet_rows(), "distillation": kd_rows()}
    out = {}
    for name in models:
        steps = steps_for(name, given)
        n = BATCH * (steps + warmup)
        for kind, kind_rows in data.items():
            if len(kind_rows) < n:
                raise SystemExit(
                    f"--steps {steps} + --warmup {warmup} need {n} {kind} rows; the benchmark data has "
                    f"{len(kind_rows)} (at most {len(kind_rows) // BATCH - warmup} timed steps)"
                )
        path = resolve_model_ref(f"builtin:{name}")
        recipes, rows = {}, {}
        for loss in LOSSES:
            kind = KIND[loss]
            r = prepared(
                kind,
                data[kind][:n],
                work,
                path,
                f"{name}-{kind}-{n}",
                batch=BATCH,
                q=Q_LEN,
                d=D_LEN,
                steps=steps + warmup,
                mini=MINI if loss == "cached_contrastive" else None,
            )
            recipes[loss] = r.resolved()
            ordered = step_rows(r, data[kind][:n], steps + warmup)
            rows[loss] = str(_jsonl(work / f"{name}-{loss}-pylate.jsonl", ordered))
        specs = {
            "pylate": {"model": path, "losses": list(LOSSES), "rows": rows, "steps": steps, "warmup": warmup},
            "colbertzero": {
                "model": path,
                "losses": list(LOSSES),
                "recipes": recipes,
                "steps": steps,
                "warmup": warmup,
            },
        }
        runs: dict[str, list[dict]] = {"pylate": [], "colbertzero": []}
        for k in range(rounds):
            for side in ("pylate", "colbertzero") if k % 2 == 0 else ("colbertzero", "pylate"):
                log(f"{name}: {side}, round {k + 1}/{rounds}, {steps} timed steps per loss")
                # One fresh process per loss: a loss never runs in a process that earlier ones grew or fragmented.
                runs[side].append(
                    {loss: run_worker(side, {**specs[side], "losses": [loss]}, work)[loss] for loss in LOSSES}
                )
        best = {
            side: {
                loss: {
                    "steps_per_s": max(r[loss]["steps_per_s"] for r in rs),
                    "cpu_s_per_step": min(r[loss]["cpu_s_per_step"] for r in rs),
                    "first_loss": rs[0][loss]["first_loss"],
                }
                for loss in LOSSES
            }
            for side, rs in runs.items()
        }
        py, us = best["pylate"], best["colbertzero"]
        out[name] = {
            loss: {
                "pylate_steps_per_s": py[loss]["steps_per_s"],
                "colbertzero_steps_per_s": us[loss]["steps_per_s"],
                "ratio": us[loss]["steps_per_s"] / py[loss]["steps_per_s"],
                "timed_steps": steps,
                "pylate_cpu_s_per_step": py[loss]["cpu_s_per_step"],
                "colbertzero_cpu_s_per_step": us[loss]["cpu_s_per_step"],
                "cpu_ratio": py[loss]["cpu_s_per_step"] / us[loss]["cpu_s_per_step"],
                "first_loss": {"pylate": py[loss]["first_loss"], "colbertzero": us[loss]["first_loss"]},
                "rounds": {side: [r[loss]["steps_per_s"] for r in rs] for side, rs in runs.items()},
            }
            for loss in LOSSES
        }
    return out


def bench_memory(sizes: list[int], work: Path, model: str = "tiny-modernbert") -> dict:
    from colbertzero.models import resolve_model_ref

    path = resolve_model_ref(f"builtin:{model}")
    rows = pair_rows()
    r0 = prepared(
        "unsupervised",
        rows,
        work,
        path,
        f"memory-pairs-{model}",
        batch=max(sizes),
        q=Q_LEN,
        d=D_LEN,
        steps=1,
        mini=MEMORY_MINI,
    )
    out = {}
    for b in sizes:
        spec = r0.resolved()
        spec["phases"]["bench"]["global_batch_size"] = b
        res = run_worker("memory", {"model": path, "recipe": spec}, work)
        out[str(b)] = res
        log(f"memory at global batch {b}: peak RSS {res['peak_rss_mb']:.0f} MB ({res['step_s']:.1f} s)")
    return out


# ---------------------------------------------------------------- report
def summary(result: dict) -> str:
    lines = []
    for model, per in result.get("throughput", {}).items():
        timed = next(iter(per.values()))["timed_steps"]
        lines.append(f"throughput, {model} (batch {BATCH}, q {Q_LEN} / d {D_LEN}, {timed} timed steps), steps/s:")
        lines.append(
            f"  {'loss':<20}{'PyLate':>9}{'ours':>9}{'ratio':>8}{'CPU-s ratio':>13}   first loss PyLate / ours"
        )
        for loss, x in per.items():
            fl = x["first_loss"]
            lines.append(
                f"  {loss:<20}{x['pylate_steps_per_s']:>9.3f}{x['colbertzero_steps_per_s']:>9.3f}"
                f"{x['ratio']:>7.2f}x{x['cpu_ratio']:>12.2f}x   {fl['pylate']:.6f} / {fl['colbertzero']:.6f}"
            )
    if "memory" in result:
        lines.append(
            f"GradCache memory ({result['memory_model']}, mini-batch {MEMORY_MINI}, q {Q_LEN} / d {D_LEN}), peak RSS:"
        )
        for b, x in result["memory"].items():
            lines.append(f"  global batch {b:>5}: {x['peak_rss_mb']:8.0f} MB   (one step {x['step_s']:.1f} s)")
        lines.append(f"  ratio largest / smallest: {result['gradcache_memory_ratio']:.2f}x")
        if "memory_per_pair_kb" in result:
            m = result["memory_per_pair_kb"]
            lines.append(
                f"  per extra pair: {m['measured']:.0f} KB (GradCache's own cache of embeddings and "
                f"gradients: {m['cached_embeddings_and_gradients']:.0f} KB)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--steps", type=int, default=None, help=f"timed steps per loss (default per model: {TIMED_STEPS}, 4 for others)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (throughput)")
    p.add_argument("--rounds", type=int, default=2, help="throughput: processes per side and model (best kept)")
    p.add_argument("--models", default="minilm,tiny-modernbert")
    p.add_argument("--parts", default="throughput,memory", help="comma list of throughput,memory")
    p.add_argument("--memory-sizes", default="128,512,2048")
    p.add_argument(
        "--memory-model",
        default="tiny-modernbert",
        choices=["tiny-modernbert", "minilm"],
        help="encoder of the memory part (minilm: a real one, ~10 min at 2048 on 2 cores)",
    )
    p.add_argument("--work", default=None, help="keep data, shards and models here (default: a temp dir)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](json.loads(Path(args.spec).read_text()))
        Path(args.out).write_text(json.dumps(result))
        return 0

    if not DATA.is_dir():
        print(f"the benchmark data is not at {DATA} (../shared/data from the project root)", file=sys.stderr)
        return 2
    parts = args.parts.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="colbertzero-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    result: dict = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    }
    if "throughput" in parts:
        result["throughput"] = bench_throughput(args.models.split(","), args.steps, args.rounds, work, args.warmup)
        result["ratio_vs_pylate"] = {
            loss: min(m[loss]["ratio"] for m in result["throughput"].values()) for loss in LOSSES
        }
    if "memory" in parts:
        sizes = sorted(int(s) for s in args.memory_sizes.split(","))
        result["memory_model"] = args.memory_model
        result["memory"] = bench_memory(sizes, work, args.memory_model)
        lo, hi = result["memory"][str(sizes[0])], result["memory"][str(sizes[-1])]
        result["gradcache_memory_ratio"] = hi["peak_rss_mb"] / lo["peak_rss_mb"]
        if len(sizes) > 1:
            # What one more pair costs, beside what GradCache must hold per pair: its cached query and document
            # embeddings and their gradients (fp32, dim 128).
            result["memory_per_pair_kb"] = {
                "measured": (hi["peak_rss_mb"] - lo["peak_rss_mb"]) * 1024 / (sizes[-1] - sizes[0]),
                "cached_embeddings_and_gradients": 2 * (Q_LEN + D_LEN) * 128 * 4 / 1024,
            }
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
