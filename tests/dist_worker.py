"""Real 2-rank DeepSpeed runs (gloo, CPU) shared by test_checkpoint.py and test_export.py.

Two launches of two processes each cover every ZeRO stage:
- ``train``: per stage, run A = STEPS uninterrupted steps (then, on EXPORT_STAGES, an export plus the trained
  module's own encodings for comparison); run B = SPLIT steps with checkpoints at SPLIT-1 and SPLIT (keep_last=1).
- ``resume`` (fresh processes): per stage, a fresh engine loads run B's latest checkpoint and runs the remaining steps.
Rank 0 writes losses, gathered weights and encodings under the work dir; the tests compare them.

The train loop is deliberately small but uses every piece of state a resume must restore: AdamW moments, a warm-up
LR schedule, gradient clipping, a learnable temperature of shape (1,), and random numbers from python, numpy and
torch inside the loss (each rank seeded differently), so a missed or cross-wired restore changes the numbers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

STAGES = (0, 1, 2, 3)
EXPORT_STAGES = (0, 2, 3)
STEPS, SPLIT = 6, 3
WORLD = 2
MICRO_BATCH = 2
PHASE = "p"
QUERIES = ["what is late interaction", "tiny models train fast on two cores"]
DOCUMENTS = ["ColBERT scores a document with the sum of MaxSim over query tokens.", "short one"]
ROOT = Path(__file__).resolve().parents[1]


def recipe_dict(model_path: str) -> dict:
    return {
        "name": "ckpt-test",
        "model": {"embedding_size": 32},
        "phases": {
            PHASE: {
                "kind": "unsupervised",
                "init": model_path,
                "data": {"sources": [{"name": "toy", "path": "/nonexistent/toy.jsonl"}], "shards_dir": "/nonexistent"},
                "lr": 1e-3,
                "global_batch_size": MICRO_BATCH * WORLD,
                "query_length": 8,
                "document_length": 24,
                "prompts": {
                    "enabled": True,
                    "query": "search_query: ",
                    "document": "search_document: ",
                    "extra_length": 7,
                },
                "temperature": 0.05,
                "learnable_temperature": True,
                "resources": {"nodes": 1, "gpus_per_node": 0, "cpu_tasks_per_node": WORLD},
            }
        },
    }


# ---------------------------------------------------------------- launching (pytest side)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, work: Path, model_path: str, timeout: float = 600) -> None:
    """Start WORLD worker processes the way torchrun would (env://) and wait for all of them."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    procs, logs = [], []
    for rank in range(WORLD):
        log = open(work / f"{mode}-rank{rank}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, mode, str(work), model_path],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
    finally:
        for log in logs:
            log.close()
    bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        tails = "\n".join(
            f"--- rank {r} (rc {rc}):\n" + (work / f"{mode}-rank{r}.log").read_text()[-4000:] for r, rc in bad
        )
        raise RuntimeError(f"{mode} launch failed:\n{tails}")


_DONE: dict[str, Path] = {}


def zero_runs(work: Path, model_path: str) -> Path:
    """Both launches, once per pytest session (both test files call this with the same folder)."""
    key = str(work)
    if key not in _DONE:
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        launch("train", work, model_path)
        t1 = time.monotonic()
        launch("resume", work, model_path)
        (work / "timing.json").write_text(json.dumps({"train_s": t1 - t0, "resume_s": time.monotonic() - t1}))
        _DONE[key] = work
    return _DONE[key]


# ---------------------------------------------------------------- the worker (each rank)
def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_engine(recipe, stage: int, rank: int):
    import deepspeed
    import torch
    from pylate.models import ColBERT

    ph = recipe.phase(PHASE)

    class Trained(torch.nn.Module):
        """The PyLate model plus a learnable temperature, as the phase runner trains it."""

        def __init__(self):
            super().__init__()
            self.model = ColBERT(
                ph.init,
                device="cpu",
                embedding_size=recipe.model.embedding_size,
                query_prefix=recipe.model.query_prefix,
                document_prefix=recipe.model.document_prefix,
                query_length=ph.effective_query_length,
                document_length=ph.effective_document_length,
                prompts={"query": ph.prompts.query, "document": ph.prompts.document},
            )
            self.temperature = torch.nn.Parameter(torch.tensor([ph.temperature]))

        def forward(self, q: dict, d: dict) -> torch.Tensor:
            import random

            import numpy as np

            qe = torch.nn.functional.normalize(self.model(q)["token_embeddings"], dim=-1)
            de = torch.nn.functional.normalize(self.model(d)["token_embeddings"], dim=-1)
            sim = torch.einsum("qid,pjd->qpij", qe, de)
            sim = sim.masked_fill(~d["attention_mask"].bool()[None, :, None, :], -1e4)
            scores = sim.max(-1).values.sum(-1) / self.temperature
            labels = torch.arange(len(scores))
            jitter = 1e-3 * (random.random() + float(np.random.rand()))  # python + numpy RNG reach the gradient
            return torch.nn.functional.cross_entropy(scores, labels) + jitter * self.temperature.sum()

    _seed(1234 + rank)  # ranks differ on purpose: each rank's RNG must come back to that rank
    module = Trained()
    opt = torch.optim.AdamW(module.parameters(), lr=ph.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def _batch(step: int, rank: int, vocab: int):
    """Fixed random token batches derived from the step (and rank); torch's global RNG drops document tokens."""
    import torch

    g = torch.Generator().manual_seed(10_000 * step + rank)
    q = torch.randint(1000, vocab - 10, (MICRO_BATCH, 15), generator=g)
    d = torch.randint(1000, vocab - 10, (MICRO_BATCH, 31), generator=g)
    dmask = (torch.rand(d.shape) > 0.2).long()  # global RNG, on purpose
    dmask[:, 0] = 1
    return {"input_ids": q, "attention_mask": torch.ones_like(q)}, {"input_ids": d, "attention_mask": dmask}


def _train(engine, start: int, stop: int, rank: int, on_step=None) -> list[float]:
    vocab = engine.module.model.tokenizer.vocab_size
    losses = []
    engine.train()
    for step in range(start, stop):
        q, d = _batch(step, rank, vocab)
        loss = engine(q, d)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1)
    return losses


def _encode(module) -> dict:
    import torch

    with torch.no_grad():
        q = module.encode(QUERIES, is_query=True, prompt_name="query", convert_to_tensor=True)
        d = module.encode(DOCUMENTS, is_query=False, prompt_name="document", convert_to_numpy=False)
    return {"queries": [t.clone() for t in q], "documents": [t.clone() for t in d]}


def worker(mode: str, work: Path, model_path: str) -> None:
    import gc

    import deepspeed
    import torch
    import torch.distributed as dist

    from colbertzero.files import temp_dir_beside
    from colbertzero.layout import RunLayout
    from colbertzero.manifest import Manifest
    from colbertzero.recipe import recipe_from_dict
    from colbertzero.train.checkpoint import load_latest_checkpoint, save_checkpoint
    from colbertzero.train.export import consolidated_state_dict, export_model

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    recipe = recipe_from_dict(recipe_dict(model_path))
    results: dict = {}
    for stage in STAGES:
        t0 = time.monotonic()
        run_a, run_b = work / f"zero{stage}" / "A", work / f"zero{stage}" / "B"
        if rank == 0:
            for rd in (run_a, run_b):
                Manifest.create(rd, recipe)
        dist.barrier()
        ma, mb = Manifest(run_a), Manifest(run_b)
        loader = {"next_step": SPLIT, "consumed": {"toy": SPLIT * MICRO_BATCH * WORLD}}
        r: dict = {}
        if mode == "train":
            engine = _build_engine(recipe, stage, rank)
            r["A"] = _train(engine, 0, STEPS, rank)
            sd = consolidated_state_dict(engine)
            if rank == 0:
                torch.save(sd, work / f"weights-zero{stage}-A.pt")
            if stage in EXPORT_STAGES:
                lineage = {
                    "init": model_path,
                    "init_sha256": "0" * 64,
                    "data_index": "/nonexistent/index.json",
                    "data_index_sha256": "1" * 64,
                    "config_hash": recipe.hash(),
                }
                out = export_model(
                    engine,
                    model_path,
                    run_a / "phases" / PHASE / "export",
                    recipe=recipe,
                    phase_name=PHASE,
                    manifest=ma,
                    lineage=lineage,
                    eval_results={
                        "toy-beir": {"ndcg@10": 0.5, "recall@100": 0.75, "queries": 50, "retrieval": "exact"}
                    },
                )
                enc = _encode(engine.module.model)  # collective forward under ZeRO-3
                if rank == 0:
                    torch.save({"out": str(out), **enc}, work / f"encode-zero{stage}.pt")
            # No checkpoint was ever saved in run A: nothing to resume.
            r["A_load_none"] = load_latest_checkpoint(engine, run_a, PHASE, ma) is None
            engine.destroy()
            del engine
            gc.collect()

            engine = _build_engine(recipe, stage, rank)

            def save(step):
                if step in (SPLIT - 1, SPLIT):
                    save_checkpoint(
                        engine,  # noqa: F821 - the engine rebuilt above
                        run_b,
                        PHASE,
                        step,
                        extra_state={"note": f"zero{stage}"},
                        loader_state=loader if step == SPLIT else {},
                        temperature=0.05,
                        manifest=mb,
                        keep_last=1,
                    )

            r["B1"] = _train(engine, 0, SPLIT, rank, on_step=save)
            if rank == 0:  # a writer killed mid-save leaves this behind: it must be ignored and cleaned
                stale = temp_dir_beside(RunLayout.of(run_b).phase(PHASE).checkpoint(4)) / "deepspeed"
                stale.mkdir(parents=True)
                (stale / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        else:
            engine = _build_engine(recipe, stage, rank)
            state = load_latest_checkpoint(engine, run_b, PHASE, mb)
            r["state"] = state
            r["B2"] = _train(engine, state["step"], STEPS, rank)
            sd = consolidated_state_dict(engine)
            if rank == 0:
                torch.save(sd, work / f"weights-zero{stage}-B.pt")
        engine.destroy()
        del engine
        gc.collect()
        r["seconds"] = time.monotonic() - t0
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, r)
        results[f"zero{stage}"] = gathered
    if rank == 0:
        (work / f"results-{mode}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()  # ZeRO-3 processes abort at exit unless the group is torn down after a barrier
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
