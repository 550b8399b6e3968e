"""The loss by phase kind, computed on token embeddings (so GradCache can feed it cached ones).

    LOSSES = {"unsupervised": CONTRASTIVE, "supervised": CONTRASTIVE, "distillation": DISTILLATION}

Each entry is a `Loss`: `loss(q, q_mask, d, d_mask, n_docs=, temperature=, teacher_scores=, gather=, denominator=)`
returns this rank's loss, a SUM over this rank's queries divided by `denominator` (the rank's queries in the whole
optimizer step). DeepSpeed averages gradients over ranks, which turns that into the gradient of the global mean: do
not multiply by the world size. Documents are row-major per query (`Batch` contract): query i owns rows
`i*n_docs … i*n_docs+n_docs-1`, its positive first.

contrastive (unsupervised: n_docs = 1; supervised: positive then hard negatives)
    MaxSim (`pylate.scores.colbert_scores`) of this rank's queries against every document of the global batch
    (all ranks' documents when gathering, this rank's otherwise), cross-entropy of `scores / temperature` with the
    query's own positive as label. The value equals `pylate.losses.Contrastive` on the same batch in one process (its
    column layout, positive of query i at column i*n_docs, is the row order above). Written on embeddings rather than
    by calling `Contrastive`, whose forward runs the model itself and so cannot take cached embeddings.
    Gradient scale relative to PyLate 1.6.0 (W ranks, B queries per rank; ours is the gradient of the global mean):
    `Contrastive` with `gather_across_devices` under DDP gives W x ours (it multiplies its loss by W and reports W x
    the global mean); `CachedContrastive` gives B x ours on one process, W x B x ours gathered. On gloo, PyLate's
    gathered gradient is moreover wrong (torch's autograd all_gather, see `_GatherRows`).

distillation
    `pylate.losses.Distillation` with its defaults: student MaxSim scores over the query's n_docs documents
    (`colbert_kd_scores`), min-max normalised per query, KL(softmax(teacher) || softmax(student)) summed over queries.
    Same value as PyLate's (batchmean = sum / B); no temperature, no gathering (each query only sees its own
    documents). Rewritten here for the same reason as above; the scoring and KL pieces are PyLate's and torch's.

Masks follow PyLate: queries are not masked when the model expands queries; documents drop padding and skiplist
tokens (`ColBERTForTraining.query_mask / document_mask`). Scoring runs over query chunks sized so the
[queries, documents, query tokens, document tokens] MaxSim intermediate stays within `SCORE_BUDGET` elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from pylate.scores import colbert_scores

from colbertzero.scoring import TORCH, Scorer

# Elements of the MaxSim intermediate scored at once (2^25 fp32 = 128 MiB): the [queries, documents, query tokens,
# document tokens] scores exist for one chunk of queries at a time, so the loss's transient memory stays bounded
# whatever the global batch (GradCache's cached embeddings are then what grows with it).
SCORE_BUDGET = 2**25


def score_chunk(n_documents: int, query_len: int, width: int) -> int:
    """Queries scored at once against `n_documents` documents so the MaxSim intermediate, `width` elements per
    (query, document, query token) (`Scorer.width`), fits `SCORE_BUDGET`."""
    return max(1, SCORE_BUDGET // max(1, n_documents * query_len * width))


# ----------------------------------------------------------------------------- documents across ranks
def pad_documents(d: torch.Tensor, d_mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad document embeddings with zeros and their mask with False to `length` tokens.

    Exact for MaxSim: a masked token scores 0, the same as PyLate's own padding tokens do."""
    extra = length - d.shape[1]
    if extra <= 0:
        return d, d_mask
    return F.pad(d, (0, 0, 0, extra)), F.pad(d_mask, (0, extra), value=False)


def common_document_length(doc_len: int, device: torch.device) -> int:
    """The longest document length over all ranks (all_gather needs one shape)."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return doc_len
    t = torch.tensor([doc_len], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


class _GatherRows(torch.autograd.Function):
    """all_gather along rows; backward sums every rank's gradient of the gathered rows (one all_reduce) and returns
    this rank's rows. Written by hand: torch.distributed.nn.all_gather (torch 2.13) returns wrong gradients on gloo
    when the incoming gradient is not contiguous (its backward scatters into buffers that keep the gradient's
    strides), which MaxSim's gradient is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = tdist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: never autograd's own buffer
        tdist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_documents(d: torch.Tensor, d_mask: torch.Tensor, differentiable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' documents in rank order; `d` must already have the common length.

    differentiable=True: the gradient of the gathered documents is summed over ranks back onto their owner (what
    the non-cached loss needs). GradCache gathers plain tensors and does that sum itself, once per step."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return d, d_mask
    if differentiable:
        d_all = _GatherRows.apply(d)
    else:
        parts = [torch.empty_like(d, memory_format=torch.contiguous_format) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, d.contiguous())
        d_all = torch.cat(parts)
    masks = [torch.empty_like(d_mask) for _ in range(tdist.get_world_size())]
    tdist.all_gather(masks, d_mask.contiguous())
    return d_all, torch.cat(masks)


# ----------------------------------------------------------------------------- contrastive
def contrastive_ce_sum(
    q: torch.Tensor,
    q_mask: torch.Tensor | None,
    d_all: torch.Tensor,
    d_mask_all: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor | float,
) -> torch.Tensor:
    """Σ over these queries of cross-entropy(MaxSim(q, every document) / temperature, label): the definition, by
    autograd through PyLate's scores. Training uses `contrastive_sum_and_grads`, checked against it."""
    scores = colbert_scores(q, d_all, queries_mask=q_mask, documents_mask=d_mask_all, backend="torch")
    return F.cross_entropy(scores / temperature, labels, reduction="sum")


def _contrastive_chunk(
    q: torch.Tensor,
    q_mask: torch.Tensor | None,
    d_all: torch.Tensor,
    d_mask_all: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    denominator: float,
    d_grad: torch.Tensor,
    scorer: Scorer = TORCH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`contrastive_ce_sum(...) / denominator` for one chunk of queries, with its gradients written by hand: returns
    (loss, dL/dq, dL/dtemperature) and adds dL/d(documents) into `d_grad` (shaped like `d_all`). `d_all` must be zero
    at its masked tokens (`contrastive_sum_and_grads` sees to it).

    Why not autograd: its MaxSim backward materialises the [queries, documents, query tokens, document tokens]
    gradient and then a full-size document gradient per query chunk. MaxSim's gradient only flows through each
    (query token, document) pair's best document token, so the argmax is kept and the gradients are gathered
    (queries) and scattered (documents) along it: no second intermediate, and a backward that costs a fraction of
    the forward. Forward values are PyLate's `colbert_scores` exactly: its masks multiply the scores, which gives the
    same zeros as scoring zeroed embeddings, without a pass over the largest tensor (the scores) per mask.
    Gradients are autograd's up to summation order (tests/test_train_core.py compares them with PyLate's loss)."""
    n_docs_all, doc_len, dim = d_all.shape
    if q_mask is not None:
        q = q * q_mask.unsqueeze(-1).to(q.dtype)
    scores, at = scorer.best_match(q, d_all)  # at: [queries, documents, query tokens]
    logits = scores / temperature
    loss = F.cross_entropy(logits, labels, reduction="sum") / denominator
    g_logits = torch.softmax(logits, dim=-1)
    g_logits[torch.arange(len(labels), device=q.device), labels] -= 1.0
    g_logits /= denominator
    t_grad = -(g_logits * logits).sum().reshape(1) / temperature  # logits = scores / T
    # Weight of each (query, document, query token) best match: dL/dscore, zero where the match is a masked
    # document token (PyLate multiplies the masks in, so such a maximum is a constant 0) or a masked query token.
    w = (g_logits / temperature).unsqueeze(-1) * torch.gather(
        d_mask_all.to(q.dtype).unsqueeze(0).expand(q.shape[0], -1, -1), 2, at)
    if q_mask is not None:
        w = w * q_mask.to(q.dtype).unsqueeze(1)
    rows = (torch.arange(n_docs_all, device=q.device).view(1, -1, 1) * doc_len + at).reshape(-1)
    picked = d_all.reshape(-1, dim).index_select(0, rows).view(*at.shape, dim)
    q_grad = torch.einsum("abs,absh->ash", w, picked)
    del picked
    d_grad.view(-1, dim).index_add_(0, rows, (w.unsqueeze(-1) * q.unsqueeze(1)).reshape(-1, dim))
    return loss, q_grad, t_grad


def contrastive_labels(n_queries: int, n_docs: int, first_query: int, device: torch.device) -> torch.Tensor:
    """Column of each query's positive: queries are numbered globally from `first_query` (rank x local batch when
    the documents are gathered)."""
    return (torch.arange(n_queries, device=device) + first_query) * n_docs


def contrastive_sum_and_grads(
    q: torch.Tensor,
    q_mask: torch.Tensor | None,
    d_all: torch.Tensor,
    d_mask_all: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    denominator: float,
    *,
    zero_masked_in_place: bool = False,
    scorer: Scorer = TORCH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`contrastive_ce_sum(...) / denominator` of all of `q` against `d_all`, scored in query chunks of
    `score_chunk` (one chunk's scores are the only intermediate alive), with its gradients written by hand
    (`_contrastive_chunk`): returns (loss, dL/dq, dL/d_all, dL/dtemperature), the loss in fp64.

    The masked document tokens are zeroed first: in place with `zero_masked_in_place` (a caller that owns `d_all`,
    such as GradCache's cache, saves a copy of every document), else in a copy."""
    keep = d_mask_all.unsqueeze(-1).to(d_all.dtype)
    d_all = d_all.mul_(keep) if zero_masked_in_place else d_all * keep
    del keep
    n = q.shape[0]
    step = score_chunk(d_all.shape[0], q.shape[1], scorer.width(d_all.shape[1], d_all.shape[2]))
    total = torch.zeros((), dtype=torch.float64, device=q.device)
    q_grad, d_grad = torch.empty_like(q), torch.zeros_like(d_all)
    t_grad = torch.zeros((1,), dtype=q.dtype, device=q.device)
    t = temperature.detach().to(q.dtype).reshape(1)
    for i in range(0, n, step):
        qm = None if q_mask is None else q_mask[i : i + step]
        loss, q_grad[i : i + step], tg = _contrastive_chunk(
            q[i : i + step], qm, d_all, d_mask_all, labels[i : i + step], t, denominator, d_grad, scorer)
        t_grad += tg
        total += loss.detach()
    return total, q_grad, d_grad, t_grad


class _ContrastiveHandGrad(torch.autograd.Function):
    """`contrastive_sum_and_grads` as an autograd node: the forward computes the gradients along with the loss and
    keeps them (the size of the embeddings) instead of autograd's MaxSim graph; the backward only scales them."""

    @staticmethod
    def forward(ctx, q, d_all, temperature, q_mask, d_mask_all, labels, denominator, scorer):
        loss, q_grad, d_grad, t_grad = contrastive_sum_and_grads(
            q.detach(), q_mask, d_all.detach(), d_mask_all, labels, temperature, denominator, scorer=scorer)
        ctx.save_for_backward(q_grad, d_grad, t_grad.to(temperature.dtype).reshape(temperature.shape))
        return loss.to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q_grad, d_grad, t_grad = ctx.saved_tensors
        return grad * q_grad, grad * d_grad, grad * t_grad, None, None, None, None, None


def contrastive_loss(
    q: torch.Tensor,
    q_mask: torch.Tensor | None,
    d: torch.Tensor,
    d_mask: torch.Tensor,
    *,
    n_docs: int,
    temperature: torch.Tensor | float,
    denominator: float,
    gather: bool,
    teacher_scores: torch.Tensor | None = None,
    scorer: Scorer = TORCH,
) -> torch.Tensor:
    """Differentiable (q, d, temperature); the MaxSim gradients are the hand-written ones of
    `contrastive_sum_and_grads`, equal to autograd's through `contrastive_ce_sum` up to summation order."""
    del teacher_scores
    if gather and tdist.is_initialized() and tdist.get_world_size() > 1:
        d, d_mask = pad_documents(d, d_mask, common_document_length(d.shape[1], d.device))
        d, d_mask = gather_documents(d, d_mask, differentiable=True)
        first = tdist.get_rank() * q.shape[0]
    else:
        first = 0
    labels = contrastive_labels(q.shape[0], n_docs, first, q.device)
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor([float(temperature)], dtype=q.dtype, device=q.device)
    return _ContrastiveHandGrad.apply(q, d, temperature, q_mask, d_mask, labels, denominator, scorer)


# ----------------------------------------------------------------------------- distillation
def distillation_kl_sum(
    q: torch.Tensor, q_mask: torch.Tensor | None, d: torch.Tensor, d_mask: torch.Tensor, teacher_scores: torch.Tensor,
    scorer: Scorer = TORCH,
) -> torch.Tensor:
    """Σ over queries of KL(softmax(teacher) || softmax(normalised student MaxSim)), as PyLate's Distillation."""
    b, n = teacher_scores.shape
    scores = scorer.kd_scores(q, q_mask, d.view(b, n, *d.shape[1:]), d_mask.view(b, n, d_mask.shape[1]))
    # PyLate's default normalize_scores=True, epsilon included.
    lo, hi = scores.min(dim=1, keepdim=True).values, scores.max(dim=1, keepdim=True).values
    scores = (scores - lo) / (hi - lo + 1e-8)
    return F.kl_div(
        F.log_softmax(scores, dim=-1),
        F.log_softmax(teacher_scores.to(scores.dtype), dim=-1),
        reduction="sum",
        log_target=True,
    )


def distillation_loss(
    q: torch.Tensor,
    q_mask: torch.Tensor | None,
    d: torch.Tensor,
    d_mask: torch.Tensor,
    *,
    n_docs: int,
    teacher_scores: torch.Tensor | None,
    denominator: float,
    temperature: torch.Tensor | float | None = None,
    gather: bool = False,
    scorer: Scorer = TORCH,
) -> torch.Tensor:
    del temperature, gather
    if teacher_scores is None:
        raise ValueError("distillation needs teacher scores in the batch (Batch.scores)")
    if teacher_scores.shape != (q.shape[0], n_docs):
        expected = (q.shape[0], n_docs)
        raise ValueError(f"teacher scores {tuple(teacher_scores.shape)}, expected (queries, n_docs) = {expected}")
    return distillation_kl_sum(q, q_mask, d, d_mask, teacher_scores, scorer) / denominator


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable[..., torch.Tensor]
    # Scores each query against other queries' documents: the loss does not split over queries, so bounding memory
    # at large batches needs GradCache. Per-query losses (distillation) are split into plain micro-batches instead.
    in_batch_negatives: bool
    uses_temperature: bool

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.fn(*args, **kwargs)


CONTRASTIVE = Loss("contrastive", contrastive_loss, in_batch_negatives=True, uses_temperature=True)
DISTILLATION = Loss("distillation", distillation_loss, in_batch_negatives=False, uses_temperature=False)

LOSSES: dict[str, Loss] = {"unsupervised": CONTRASTIVE, "supervised": CONTRASTIVE, "distillation": DISTILLATION}


def loss_for(kind: str) -> Loss:
    try:
        return LOSSES[kind]
    except KeyError:
        raise ValueError(f"no loss for phase kind {kind!r}; kinds: {', '.join(LOSSES)}") from None
