"""Worker for tests/test_fidelity.py: N optimizer steps from the same weights on the same batches, one side per process.

    python tests/fidelity_worker.py ours   MODEL_DIR WORK_DIR [STEPS]   # colbertzero: shards, loader, engine, step
    python tests/fidelity_worker.py pylate MODEL_DIR WORK_DIR   # PyLate 1.6.0's SentenceTransformerTrainer
    torchrun --nproc_per_node 2 tests/fidelity_worker.py ours-grads   MODEL_DIR WORK_DIR   # 2 gloo ranks, gathering
    torchrun --nproc_per_node 2 tests/fidelity_worker.py pylate-grads MODEL_DIR WORK_DIR

The `-grads` sides take no optimizer step: they write the first step's gradient before clipping (averaged over the
two ranks, as DDP and DeepSpeed average it) for the gathered contrastive losses — ours once per `loss_scale`
(GRAD_SCALES) into WORK_DIR/<loss>/ours-grads.pt, PyLate's Trainer (no clipping, `on_pre_optimizer_step`) into
pylate-grads.pt.

`ours` prepares shards of WORK_DIR/<loss>/rows.jsonl, trains N steps with the loss_scale that reproduces PyLate's
loss (`SCALE`), and writes WORK_DIR/<loss>/ordered.jsonl (the rows in the order its loader took them: PyLate reads them
sequentially) and ours.pt (final weights, per-step loss and pre-clip gradient norm). `pylate` writes pylate.pt.
Both: AdamW (torch's fused kernel, the Trainer's default), lr 1e-4 linear decay without warm-up, clipping at 1.0,
weight decay 0, no prompts, the tiny ModernBERT (no dropout: both sides compute the same forward).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

N_STEPS, BATCH, MINI, Q_LEN, D_LEN, N_DOCS, LR = 3, 8, 4, 16, 32, 4, 1e-4
LOSSES = ("cached_contrastive", "contrastive", "distillation")
KIND = {"cached_contrastive": "unsupervised", "contrastive": "supervised", "distillation": "distillation"}
SCALE = {"cached_contrastive": "global_batch", "contrastive": "world_size", "distillation": 1}
TEMPERATURE = 0.05
GRAD_LOSSES = ("cached_contrastive", "contrastive")
GRAD_SCALES = (1, "world_size", "global_batch")


def _read(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _phase(name: str, model: str, folder: Path, steps: int, loss_scale, world: int) -> dict:
    kind = KIND[name]
    data = {"shards_dir": str(folder / "shards"), "sources": [{"name": "rows", "path": str(folder / "rows.jsonl")}]}
    if kind == "supervised":
        data["max_negatives"] = 1
    if kind == "distillation":
        data["docs_per_query"] = N_DOCS
    return {"kind": kind, "init": model, "data": data, "lr": LR, "global_batch_size": BATCH, "max_steps": steps,
            "gradcache_mini_batch": MINI // world if name == "cached_contrastive" else None,
            "loss_scale": loss_scale, "gather_across_ranks": world > 1, "temperature": TEMPERATURE,
            "query_length": Q_LEN, "document_length": D_LEN, "seed": 0, "prompts": {"enabled": False},
            "bf16": False, "deepspeed": {"zero_stage": 0},
            "resources": {"nodes": 1, "gpus_per_node": 0, "cpu_tasks_per_node": world}}


def _write_ordered(loader, rows: list[dict], path: Path, steps: int) -> None:
    """The rows in the order the loader takes them (global batch by global batch, rank 0's share first): PyLate's
    sequential sampler reads them so, and under DDP hands batch 2t to rank 0 and 2t+1 to rank 1."""
    with open(path, "w") as f:
        for t in range(steps):
            for i in loader.global_rows(t)[1]:
                f.write(json.dumps(rows[i]) + "\n")


def ours_grads(model: str, work: Path) -> None:
    """2 ranks: the first step's reduced gradient (no optimizer step) under each loss_scale."""
    from colbertzero.data.loader import GlobalBatchLoader
    from colbertzero.data.prepare import prepare_recipe
    from colbertzero.models import colbert_for
    from colbertzero.recipe import recipe_from_dict
    from colbertzero.train import dist
    from colbertzero.train.engine import build_engine
    from colbertzero.train.module import ColBERTForTraining
    from colbertzero.train.step import accumulate_gradients

    rt = dist.init_distributed(bf16=False)
    for name in GRAD_LOSSES:
        folder = work / name
        grads = {}
        for scale in GRAD_SCALES:
            r = recipe_from_dict({"name": "fidelity", "phases": {
                "p": _phase(name, model, folder, 1, scale, rt.world_size)}})
            if rt.is_main and scale == GRAD_SCALES[0]:
                prepare_recipe(r, workers=1, progress=False)
                _write_ordered(GlobalBatchLoader(r, "p", 0, rt.world_size), _read(folder / "rows.jsonl"),
                               folder / "ordered.jsonl", 1)
            dist.barrier()
            torch.manual_seed(0)
            colbert = colbert_for(r, "p", model, "cpu")
            loader = GlobalBatchLoader(r, "p", rt.rank, rt.world_size)
            engine, _, _ = build_engine(ColBERTForTraining.for_phase(colbert, r.phase("p")), r.phase("p"), 1,
                                        runtime=rt)
            accumulate_gradients(engine, loader.batch(0), r.phase("p"))
            grads[str(scale)] = {k.removeprefix("colbert."): p.grad.detach().clone()
                                 for k, p in engine.module.named_parameters() if p.grad is not None}
        if rt.is_main:
            torch.save(grads, folder / "ours-grads.pt")
    dist.teardown()


def _contiguous_all_gather():
    """torch.distributed.nn.all_gather (torch 2.13), which PyLate's gathering calls, returns wrong gradients on gloo
    when the incoming gradient is not contiguous (MaxSim's is: see colbertzero.train.losses._GatherRows). Making each
    gathered tensor's gradient contiguous gives what the same code computes on NCCL, where PyLate's runs train."""
    import torch.distributed.nn as dnn

    class Contiguous(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad.contiguous()

    gather = dnn.all_gather
    dnn.all_gather = lambda tensor, *a, **kw: tuple(Contiguous.apply(t) for t in gather(tensor, *a, **kw))


def pylate_grads(model: str, work: Path) -> None:
    """2 ranks under DDP: PyLate's Trainer with gathering, no clipping; its gradient before the optimizer step."""
    import torch.distributed as tdist
    from datasets import Dataset
    from pylate import losses, models, utils
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from torch.utils.data import BatchSampler, SequentialSampler
    from transformers import TrainerCallback

    _contiguous_all_gather()

    class Grads(TrainerCallback):
        def __init__(self, model_):
            self.model_, self.grads = model_, None

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.grads = {k: p.grad.detach().clone() for k, p in self.model_.named_parameters() if p.grad is not None}

    def sequential(dataset, batch_size, drop_last, **kw):
        return BatchSampler(SequentialSampler(dataset), batch_size, drop_last)

    for name in GRAD_LOSSES:
        folder = work / name
        rows = _read(folder / "ordered.jsonl")
        if KIND[name] == "supervised":
            rows = [{"query": r["query"], "positive": r["positive"], "negative": r["negatives"][0]} for r in rows]
        torch.manual_seed(0)
        model_ = models.ColBERT(model, device="cpu", embedding_size=128, query_length=Q_LEN, document_length=D_LEN)
        loss = (losses.CachedContrastive(model_, mini_batch_size=MINI // 2, temperature=TEMPERATURE,
                                         gather_across_devices=True) if name == "cached_contrastive"
                else losses.Contrastive(model_, temperature=TEMPERATURE, gather_across_devices=True))
        record = Grads(model_)
        with tempfile.TemporaryDirectory() as tmp:
            args = SentenceTransformerTrainingArguments(
                output_dir=tmp, per_device_train_batch_size=BATCH // 2, max_steps=1, learning_rate=LR,
                max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", batch_sampler=sequential,
                seed=0, use_cpu=True, dataloader_drop_last=True, disable_tqdm=True)
            trainer = SentenceTransformerTrainer(model=model_, args=args, train_dataset=Dataset.from_list(rows),
                                                 loss=loss, data_collator=utils.ColBERTCollator(model_.tokenize),
                                                 callbacks=[record])
            trainer.train()
        if tdist.get_rank() == 0:
            torch.save(record.grads, folder / "pylate-grads.pt")


def ours(model: str, work: Path, steps: int = N_STEPS) -> None:
    from colbertzero.data.loader import GlobalBatchLoader
    from colbertzero.data.prepare import prepare_recipe
    from colbertzero.models import colbert_for
    from colbertzero.recipe import recipe_from_dict
    from colbertzero.train.dist import init_distributed, teardown
    from colbertzero.train.engine import build_engine
    from colbertzero.train.export import consolidated_state_dict
    from colbertzero.train.module import ColBERTForTraining
    from colbertzero.train.step import train_step

    rt = init_distributed(bf16=False)
    for name in LOSSES:
        folder = work / name
        r = recipe_from_dict({"name": "fidelity", "phases": {"p": _phase(name, model, folder, steps, SCALE[name], 1)}})
        prepare_recipe(r, workers=1, progress=False)
        torch.manual_seed(0)
        colbert = colbert_for(r, "p", model, "cpu")
        loader = GlobalBatchLoader(r, "p", 0, 1)
        _write_ordered(loader, _read(folder / "rows.jsonl"), folder / "ordered.jsonl", steps)
        engine, _, _ = build_engine(ColBERTForTraining.for_phase(colbert, r.phase("p")), r.phase("p"), steps,
                                    runtime=rt)
        losses, norms = [], []
        for _, batch in zip(range(steps), loader):
            res = train_step(engine, batch, r.phase("p"))
            losses.append(res.loss)
            norms.append(res.grad_norm)
        state = {k.removeprefix("colbert."): v for k, v in consolidated_state_dict(engine).items()}
        torch.save({"state": state, "losses": losses, "grad_norms": norms}, folder / "ours.pt")
    teardown()


def pylate(model: str, work: Path) -> None:
    from datasets import Dataset
    from pylate import losses, models, utils
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from torch.utils.data import BatchSampler, SequentialSampler
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.losses, self.norms = [], []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.norms.append(float(logs["grad_norm"]))

    def sequential(dataset, batch_size, drop_last, **kw):  # the rows in the order our loader took them
        return BatchSampler(SequentialSampler(dataset), batch_size, drop_last)

    for name in LOSSES:
        folder = work / name
        rows = _read(folder / "ordered.jsonl")
        if KIND[name] == "supervised":
            rows = [{"query": r["query"], "positive": r["positive"], "negative": r["negatives"][0]} for r in rows]
        torch.manual_seed(0)  # the same new layers as our side draws from the same seed
        model_ = models.ColBERT(model, device="cpu", embedding_size=128, query_length=Q_LEN, document_length=D_LEN)
        loss = {"cached_contrastive": lambda: losses.CachedContrastive(model_, mini_batch_size=MINI,
                                                                       temperature=TEMPERATURE),
                "contrastive": lambda: losses.Contrastive(model_, temperature=TEMPERATURE),
                "distillation": lambda: losses.Distillation(model_)}[name]()
        record = Record()
        with tempfile.TemporaryDirectory() as tmp:
            args = SentenceTransformerTrainingArguments(
                output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=N_STEPS, learning_rate=LR,
                logging_steps=1, save_strategy="no", report_to="none", batch_sampler=sequential, seed=0,
                use_cpu=True, dataloader_drop_last=True, disable_tqdm=True)
            trainer = SentenceTransformerTrainer(model=model_, args=args, train_dataset=Dataset.from_list(rows),
                                                 loss=loss, data_collator=utils.ColBERTCollator(model_.tokenize),
                                                 callbacks=[record])
            trainer.train()
        state = {k: v.detach().clone() for k, v in model_.state_dict().items()}
        torch.save({"state": state, "losses": record.losses, "grad_norms": record.norms}, folder / "pylate.pt")


if __name__ == "__main__":
    side, model_dir, work_dir = sys.argv[1:4]
    if side == "ours":
        ours(model_dir, Path(work_dir), int(sys.argv[4]) if len(sys.argv) > 4 else N_STEPS)
    elif side == "ours-grads":
        ours_grads(model_dir, Path(work_dir))
    elif side == "pylate-grads":
        pylate_grads(model_dir, Path(work_dir))
    else:
        pylate(model_dir, Path(work_dir))
