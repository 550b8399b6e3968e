"""One optimizer step of every phase kind on a DeepSpeed engine: GradCache for the contrastive loss, plain
micro-batches otherwise.

Why GradCache is written here rather than taken from PyLate's `CachedContrastive` or the GradCache package: both
drive the backward through a Trainer or DDP, never through a ZeRO-2/3 engine's partitioned gradients and
accumulation boundary; the three phases below run on `engine.backward` (exact on ZeRO 0-3, ../shared/FACTS.md).

API (what the phase runner calls)
    train_step(engine, batch, phase, scorer) -> StepResult       forward/backward of the whole step, then one
                                                                 engine.step()
    accumulate_gradients(engine, batch, phase, scorer) -> Accumulated   the same up to the accumulation boundary
                                                    (gradients reduced, not applied): for tests and gradient inspection
`scorer` is the MaxSim backend the runner selected once (`colbertzero.scoring`; PyLate's torch path by default).
    optimizer_step(engine) -> (grad_norm, lr)              engine.step() (clipping, AdamW, LR schedule)

`batch` is a `colbertzero.data.loader.Batch` (docs/CONTRACTS.md): `queries`, `documents` (row-major per query),
`n_docs`, `scores` (distillation). Every rank must hold the same number of queries. The engine's module is a
`ColBERTForTraining`. `StepResult.loss` is the global mean over all ranks' queries (what one process would compute on
the whole global batch); gradients are those of that global mean (see losses.py for the scale convention).

How a step runs. The rank's queries are split into `phase.gradient_accumulation` groups (each group is its own
contrastive problem, as gradient accumulation is elsewhere). Per group:
- contrastive + `gradcache_mini_batch`: GradCache. (1) no-grad forward of chunks of `gradcache_mini_batch` queries and
  their documents, saving the RNG state of each chunk; (2) the loss on the cached embeddings (documents padded to one
  length across ranks and gathered with their masks) and its gradient with respect to the embeddings and the
  temperature, written along MaxSim's argmax (no autograd graph); the gathered documents' gradient is summed over
  ranks with one all_reduce and each rank keeps its own rows; (3) per chunk, re-forward with grad under the saved RNG
  state (dropout reproduces the first pass) and backward of the surrogate Σ embeddings · cached gradient
  (+ temperature · its gradient once per group).
- contrastive without GradCache: one forward of the group and the loss with documents gathered differentiably.
- distillation: the loss is a sum over queries, so chunks of `gradcache_mini_batch` queries (if set) are exact plain
  micro-batches; nothing to cache.
Every backward is `engine.backward(x, scale_wrt_gas=False)` (the default divides by the configured accumulation count,
which is 1 here and means nothing: the number of backwards varies), preceded by
`engine.set_gradient_accumulation_boundary(this is the step's last backward)`; one `engine.step()` ends the step.
This is exact on ZeRO 0-3 (tests/test_train_core.py measures it against PyLate's loss on the whole global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as tdist
from pylate.losses.cached_contrastive import RandContext

from colbertzero.recipe import Phase
from colbertzero.scoring import TORCH, Scorer
from colbertzero.train.losses import (
    Loss,
    common_document_length,
    contrastive_labels,
    contrastive_sum_and_grads,
    gather_documents,
    loss_for,
    pad_documents,
)
from colbertzero.train.module import ColBERTForTraining

Features = dict[str, torch.Tensor]


class BatchLike(Protocol):
    queries: Features
    documents: Features
    n_docs: int
    scores: torch.Tensor | None


@dataclass(frozen=True)
class Accumulated:
    loss: float  # global mean over all ranks' queries
    temperature: float | None  # the temperature this step's loss used (None for distillation)
    n_queries: int  # over all ranks
    n_tokens: int  # real (attended) query + document tokens, over all ranks


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float | None  # global L2 norm before clipping (what DeepSpeed clips on)
    temperature: float | None
    lr: float  # the learning rate this step was taken with
    n_queries: int
    n_tokens: int


def train_step(engine, batch: BatchLike, phase: Phase, scorer: Scorer = TORCH) -> StepResult:
    acc = accumulate_gradients(engine, batch, phase, scorer)
    grad_norm, lr = optimizer_step(engine)
    return StepResult(acc.loss, grad_norm, acc.temperature, lr, acc.n_queries, acc.n_tokens)


def optimizer_step(engine) -> tuple[float | None, float]:
    lr = float(engine.get_lr()[0])
    # Without ZeRO and in fp32 DeepSpeed clips with torch's routine but keeps no norm: take it from the (already
    # averaged) gradients. ZeRO and the bf16 optimizer report theirs through get_global_grad_norm().
    norm = _dense_grad_norm(engine) if not (engine.zero_optimization() or engine.bfloat16_enabled()) else None
    engine.step()
    reported = engine.get_global_grad_norm()
    if reported is not None:
        norm = float(reported)
    return norm, lr


def accumulate_gradients(engine, batch: BatchLike, phase: Phase, scorer: Scorer = TORCH) -> Accumulated:
    loss_fn = loss_for(phase.kind)
    model: ColBERTForTraining = engine.module
    device = engine.device
    queries = {k: v.to(device, non_blocking=True) for k, v in batch.queries.items()}
    documents = {k: v.to(device, non_blocking=True) for k, v in batch.documents.items()}
    teacher = batch.scores.to(device, torch.float32) if batch.scores is not None else None
    n_docs, n = int(batch.n_docs), queries["input_ids"].shape[0]
    if documents["input_ids"].shape[0] != n * n_docs:
        raise ValueError(f"{documents['input_ids'].shape[0]} documents for {n} queries x n_docs={n_docs}")
    groups = phase.gradient_accumulation
    if n % groups:
        raise ValueError(f"{n} queries on this rank do not split into gradient_accumulation={groups} groups")

    engine.train()
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    # The loss each rank backpropagates is its share of the global mean, times the recipe's loss_scale (the scripts'
    # gradient scale); the loss reported is the global mean whatever the scale.
    scale = phase.gradient_scale(world)
    per_group = n // groups
    total = torch.zeros((), dtype=torch.float64, device=device)
    temperature = None
    for k in range(groups):
        q_feat = _rows(queries, slice(k * per_group, (k + 1) * per_group))
        d_feat = _rows(documents, slice(k * per_group * n_docs, (k + 1) * per_group * n_docs))
        common = dict(engine=engine, model=model, n_docs=n_docs, phase=phase, denominator=n / scale,
                      last_group=k == groups - 1, scorer=scorer)
        if loss_fn.in_batch_negatives and phase.gradcache_mini_batch is not None:
            loss, temperature = _gradcache_group(q_feat, d_feat, **common)
        else:
            group_teacher = None if teacher is None else teacher[k * per_group : (k + 1) * per_group]
            loss, temperature = _direct_group(q_feat, d_feat, group_teacher, loss_fn, **common)
        total += loss

    n_tokens = queries["attention_mask"].sum() + documents["attention_mask"].sum()
    stats = torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=device), n_tokens.double()])
    if tdist.is_initialized():
        tdist.all_reduce(stats)
    return Accumulated(
        loss=float(stats[0]) / world / scale,
        temperature=float(temperature) if loss_fn.uses_temperature else None,
        n_queries=int(stats[1]),
        n_tokens=int(stats[2]),
    )


# ----------------------------------------------------------------------------- paths
def _direct_group(queries, documents, teacher, loss_fn: Loss, *, engine, model, n_docs, phase, denominator, last_group,
                  scorer):
    """Forward + loss + backward with grad. Contrastive: the whole group at once (the loss couples all queries).
    Distillation: chunks of gradcache_mini_batch queries, exact because the loss is a sum over queries."""
    n = queries["input_ids"].shape[0]
    step = n if loss_fn.in_batch_negatives or phase.gradcache_mini_batch is None else phase.gradcache_mini_batch
    starts = range(0, n, step)
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for j, i in enumerate(starts):
        q_feat, d_feat = _rows(queries, slice(i, i + step)), _rows(documents, slice(i * n_docs, (i + step) * n_docs))
        engine.set_gradient_accumulation_boundary(last_group and j == len(starts) - 1)
        out_q, out_d = engine(q_feat), engine(d_feat)
        loss = loss_fn(
            out_q["embeddings"].float(),
            model.query_mask(q_feat),
            out_d["embeddings"].float(),
            model.document_mask(d_feat),
            n_docs=n_docs,
            temperature=out_q["temperature"],
            teacher_scores=None if teacher is None else teacher[i : i + step],
            gather=phase.gather_across_ranks,
            denominator=denominator,
            scorer=scorer,
        )
        engine.backward(loss, scale_wrt_gas=False)
        total += loss.detach()
    return total, out_q["temperature"].detach()


def _gradcache_group(queries, documents, *, engine, model, n_docs, phase, denominator, last_group, scorer):
    """GradCache for the contrastive loss (the one loss with in-batch negatives, so the one that needs it)."""
    n, m = queries["input_ids"].shape[0], phase.gradcache_mini_batch
    chunks = [
        (_rows(queries, slice(i, i + m)), _rows(documents, slice(i * n_docs, (i + m) * n_docs))) for i in range(0, n, m)
    ]

    # (1) embeddings without a graph; RandContext (PyLate's copy of GradCache's) keeps each chunk's RNG state. Each
    # chunk is copied into the cache as it comes (chunks share the batch's padded lengths): no list of chunk outputs
    # plus a concatenated copy, which would double the cache at its peak.
    rng, q_all, d_all = [], None, None
    with torch.no_grad():
        for j, (q_feat, d_feat) in enumerate(chunks):
            rng.append(RandContext(q_feat["input_ids"], d_feat["input_ids"]))
            out_q, out_d = engine(q_feat), engine(d_feat)
            q_out, d_out = out_q["embeddings"], out_d["embeddings"]
            if q_all is None:
                q_all = q_out.new_empty((n, *q_out.shape[1:]), dtype=torch.float32)
                d_all = d_out.new_empty((n * n_docs, *d_out.shape[1:]), dtype=torch.float32)
            q_all[j * m : j * m + q_out.shape[0]] = q_out
            d_all[j * m * n_docs : j * m * n_docs + d_out.shape[0]] = d_out
            del q_out, d_out
    temperature = out_q["temperature"]
    del out_q, out_d

    # (2) loss and its gradient with respect to the cached embeddings.
    loss, q_grad, d_grad, t_grad = _cached_contrastive(
        q_all,
        model.query_mask(queries),
        d_all,
        model.document_mask(documents),
        temperature,
        learnable=model.temperature is not None,
        n_docs=n_docs,
        gather=phase.gather_across_ranks,
        denominator=denominator,
        scorer=scorer,
    )
    del q_all, d_all

    # (3) re-forward with grad, chunk by chunk, and push the cached gradients through.
    for j, (q_feat, d_feat) in enumerate(chunks):
        last_chunk = j == len(chunks) - 1
        engine.set_gradient_accumulation_boundary(last_group and last_chunk)
        with rng[j]:
            out_q, out_d = engine(q_feat), engine(d_feat)
        q_out, d_out = out_q["embeddings"].float(), out_d["embeddings"].float()
        q_rows = slice(j * m, j * m + q_out.shape[0])
        d_rows = slice(j * m * n_docs, j * m * n_docs + d_out.shape[0])
        surrogate = torch.sum(q_out * q_grad[q_rows]) + torch.sum(d_out * d_grad[d_rows])
        if t_grad is not None and last_chunk:
            surrogate = surrogate + torch.sum(out_q["temperature"] * t_grad)
        engine.backward(surrogate, scale_wrt_gas=False)
    return loss, temperature


def _cached_contrastive(q, q_mask, d, d_mask, temperature, *, learnable, n_docs, gather, denominator, scorer):
    """Contrastive loss on cached embeddings → (loss, dL/dq, dL/d(this rank's documents), dL/dtemperature or None).

    Scored in query chunks (`score_chunk`), the gradients written by hand along MaxSim's argmax
    (`losses.contrastive_sum_and_grads`), so one chunk's scores are the only intermediate alive. The gathered
    documents' gradient is summed over ranks with one all_reduce (every rank's loss touches every rank's documents)
    and each rank keeps its own rows."""
    n, doc_len = q.shape[0], d.shape[1]
    distributed = gather and tdist.is_initialized() and tdist.get_world_size() > 1
    if distributed:
        d, d_mask = pad_documents(d, d_mask, common_document_length(doc_len, d.device))
        d, d_mask = gather_documents(d, d_mask, differentiable=False)
        rank = tdist.get_rank()
        first, own = rank * n, slice(rank * n * n_docs, (rank + 1) * n * n_docs)
    else:
        first, own = 0, slice(None)
    labels = contrastive_labels(n, n_docs, first, q.device)
    # `d` is this step's cache (or its gathered copy), read by nothing after the loss: its masked tokens are zeroed
    # in place rather than in a copy of every document.
    total, q_grad, d_grad, t_grad = contrastive_sum_and_grads(q, q_mask, d, d_mask, labels, temperature, denominator,
                                                              zero_masked_in_place=True, scorer=scorer)
    if distributed:
        tdist.all_reduce(d_grad)
    return total, q_grad, d_grad[own, :doc_len], t_grad if learnable else None


# ----------------------------------------------------------------------------- helpers
def _rows(features: Features, rows: slice) -> Features:
    return {k: v[rows] for k, v in features.items()}


def _dense_grad_norm(engine) -> float:
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
