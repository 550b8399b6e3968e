"""Worker for tests/test_train_core.py: one training step per case and ZeRO stage on a real DeepSpeed engine,
measured against PyLate's own loss on the whole global batch in plain torch (no DeepSpeed, no gathering).

    python tests/train_core_worker.py MODEL_DIR OUT_JSON                              # one process
    torchrun --standalone --nproc_per_node 2 tests/train_core_worker.py MODEL_DIR OUT_JSON

Every rank runs every case (engine construction and gradient reads are collective); rank 0 writes OUT_JSON:
{"world_size", "cases": [{"case", "stage", "loss", "ref_loss", "max_rel", "grad_norm", "ref_grad_norm", ...}]}.
max_rel = max over parameters of max|grad - ref| / max|ref|, gradients read before engine.step().
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

from colbertzero.recipe import Phase
from colbertzero.train import dist, losses
from colbertzero.train.engine import build_engine
from colbertzero.train.module import ColBERTForTraining
from colbertzero.train.step import accumulate_gradients, optimizer_step, train_step

# Ten queries, each with its positive then two hard negatives. The second half has longer documents, so on two
# ranks the local document lengths differ and the cross-rank padding is exercised.
DATA = [
    ("what do cats eat", ["Cats are carnivores and eat meat.", "Cows eat grass.", "Cat toys are colourful."]),
    ("how tall is mount everest", ["Everest is 8,849 metres high.", "K2 is in Pakistan.", "Mountains erode slowly."]),
    ("who wrote hamlet", ["Hamlet was written by Shakespeare.", "Milton wrote Paradise Lost.", "Hamlets are small."]),
    ("boiling point of water", ["Water boils at 100 degrees Celsius.", "Ice melts at zero.", "Kettles are electric."]),
    ("capital of france", ["Paris is the capital of France.", "Berlin is in Germany.", "France makes cheese."]),
    (
        "speed of light in vacuum",
        [
            "Light travels at about 299,792 kilometres per second in a vacuum, the universal speed limit of physics.",
            "Sound travels at roughly 343 metres per second in dry air at twenty degrees Celsius, far slower.",
            "Vacuum cleaners were invented in the nineteenth century and became common household appliances later.",
        ],
    ),
    (
        "largest planet in the solar system",
        [
            "Jupiter is the largest planet of the solar system, more than twice as massive as all the others combined.",
            "Mercury is the smallest planet and the closest to the Sun, with almost no atmosphere to speak of.",
            "The solar system formed about 4.6 billion years ago from a collapsing cloud of gas and dust.",
        ],
    ),
    (
        "who painted the mona lisa",
        [
            "The Mona Lisa was painted by Leonardo da Vinci in the early sixteenth century in Florence, Italy.",
            "Michelangelo painted the ceiling of the Sistine Chapel between 1508 and 1512 for Pope Julius II.",
            "The Louvre in Paris is the most visited art museum in the world, with millions of visitors a year.",
        ],
    ),
    (
        "how many bones in the human body",
        [
            "An adult human skeleton usually has 206 bones, while a newborn has around 270 that later fuse together.",
            "Sharks have skeletons made of cartilage rather than bone, which makes them lighter and more flexible.",
            "Bone broth is a soup made by simmering animal bones and connective tissue for many hours.",
        ],
    ),
    (
        "when did the first moon landing happen",
        [
            "Apollo 11 landed on the Moon on 20 July 1969, and Neil Armstrong became the first person to walk there.",
            "Sputnik 1, launched by the Soviet Union in 1957, was the first artificial satellite to orbit the Earth.",
            "The Moon's gravity causes the tides of the oceans, which rise and fall twice in a lunar day.",
        ],
    ),
]
TEACHER = torch.tensor(
    [[9.0, 3.0, 1.0], [8.0, 5.0, 0.5], [7.5, 2.0, 2.5], [9.5, 6.0, 1.0], [8.5, 1.0, 4.0],
     [9.0, 4.0, 3.0], [7.0, 6.5, 2.0], [8.0, 2.0, 1.5], [9.0, 5.5, 0.0], [6.5, 3.5, 3.0]]
)  # fmt: skip


def make_phase(kind: str, stage: int, world: int, **kw) -> Phase:
    fields = dict(
        kind=kind,
        init="unused",
        data={"sources": [{"name": "unused", "path": "/unused"}], "shards_dir": "/unused"},
        lr=1e-3,
        global_batch_size=len(DATA),
        deepspeed={"zero_stage": stage},
        resources={"gpus_per_node": 0, "cpu_tasks_per_node": world},
        bf16=False,
    )
    fields.update(kw)
    return Phase.model_validate(fields)


def features(colbert, texts: list[str], is_query: bool) -> dict[str, torch.Tensor]:
    tok = colbert.tokenize(texts, is_query=is_query)
    return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}


def rank_rows(phase: Phase, rank: int, world: int) -> list[int]:
    """Indices into DATA of this rank's queries: the first global_batch_size rows, split evenly in rank order."""
    per_rank = phase.global_batch_size // world
    return list(range(rank * per_rank, (rank + 1) * per_rank))


def local_batch(colbert, phase: Phase, rank: int, world: int, n_docs: int) -> SimpleNamespace:
    """This rank's share, tokenized on its own (so padded to its own longest document), as the loader would."""
    rows = rank_rows(phase, rank, world)
    return SimpleNamespace(
        queries=features(colbert, [DATA[i][0] for i in rows], True),
        documents=features(colbert, [d for i in rows for d in DATA[i][1][:n_docs]], False),
        n_docs=n_docs,
        scores=TEACHER[rows, :n_docs].clone() if phase.kind == "distillation" else None,
    )


class PerRankForward(torch.nn.Module):
    """The reference model: embeds the global batch one rank's rows at a time, documents cut or padded to the length
    that rank padded them to, so it sees exactly the tensors each rank saw (ModernBERT's outputs move by ~1e-7 with
    the padding length, which a small temperature magnifies past the tolerance). Outputs are brought back to the
    features' length; only padding is cut or added, and padding tokens are masked out of the scores."""

    def __init__(self, colbert, doc_lengths: list[int]) -> None:
        super().__init__()
        self.colbert, self.doc_lengths = colbert, doc_lengths
        self.skiplist, self.do_query_expansion = colbert.skiplist, colbert.do_query_expansion

    def forward(self, features):
        world = len(self.doc_lengths)
        rows, length = features["input_ids"].shape[0] // world, features["input_ids"].shape[1]
        is_doc = bool((features["input_ids"][:, 1] == self.colbert.document_prefix_id).all())
        pad_id = self.colbert.tokenizer.pad_token_id
        outs = []
        for r in range(world):
            keep = self.doc_lengths[r] if is_doc else length
            part = {
                k: _fit(v[r * rows : (r + 1) * rows], keep, pad_id if k == "input_ids" else 0)
                for k, v in features.items()
            }
            outs.append(_fit(self.colbert(part)["token_embeddings"], length, 0.0))
        return {"token_embeddings": torch.cat(outs)}


def _fit(t: torch.Tensor, length: int, fill) -> torch.Tensor:
    """Cut or pad (with `fill`) dimension 1 to `length`; what is cut or added is padding."""
    if t.shape[1] >= length:
        return t[:, :length]
    pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
    return torch.nn.functional.pad(t, pad, value=fill)


def reference(colbert, phase: Phase, n_docs: int, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    """PyLate's loss on the WHOLE global batch in one process, and its gradient. With gradient accumulation, group k
    (rows k*g … of every rank) is its own batch and the step's loss is the mean over groups."""
    from pylate import losses as pylate_losses

    model = copy.deepcopy(colbert)
    model.train()
    temperature = torch.tensor([phase.temperature], requires_grad=phase.learnable_temperature)
    doc_lengths = [local_batch(model, phase, r, world, n_docs).documents["input_ids"].shape[1] for r in range(world)]
    groups, per_rank = phase.gradient_accumulation, [rank_rows(phase, r, world) for r in range(world)]
    g = len(per_rank[0]) // groups
    total = 0.0
    for k in range(groups):
        rows = [i for r in range(world) for i in per_rank[r][k * g : (k + 1) * g]]
        queries = model.tokenize([DATA[i][0] for i in rows], is_query=True)
        docs = model.tokenize([d for i in rows for d in DATA[i][1][:n_docs]], is_query=False)
        per_rank_model = PerRankForward(model, doc_lengths)
        if phase.kind == "distillation":
            loss = pylate_losses.Distillation(per_rank_model)([queries, docs], labels=TEACHER[rows, :n_docs])
        else:
            # PyLate takes (anchor, positive, negative...) features: slot j is every query's j-th document.
            slots = [{key: v[j::n_docs] for key, v in docs.items()} for j in range(n_docs)]
            loss = pylate_losses.Contrastive(per_rank_model, temperature=temperature * 1)([queries, *slots])
        total = total + loss / groups
    total.backward()
    grads = {f"colbert.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    if phase.learnable_temperature:
        grads["temperature"] = temperature.grad
    return total.item(), grads


def engine_grads(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    # Collective under ZeRO (assembles partitions): every rank reads every parameter in the same order.
    return {n: safe_get_full_grad(p).detach().float().clone() for n, p in engine.module.named_parameters()}


def max_rel(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert set(grads) == set(ref), (sorted(set(grads) ^ set(ref)))
    return max(float((grads[n].view_as(r) - r).abs().max() / r.abs().max()) for n, r in ref.items())


def run_case(name: str, colbert, runtime, phase: Phase, n_docs: int) -> dict:
    """One step, gradients read at the accumulation boundary, then a second step through train_step."""
    ref_loss, ref = reference(colbert, phase, n_docs, runtime.world_size)
    # loss_scale: the optimizer sees the global-mean gradient times the scripts' factor (world size, global batch)
    scale = phase.gradient_scale(runtime.world_size)
    ref = {k: v * scale for k, v in ref.items()}
    t0 = time.perf_counter()
    model = ColBERTForTraining.for_phase(copy.deepcopy(colbert), phase)
    engine, _, _ = build_engine(model, phase, total_steps=10, runtime=runtime)
    batch = local_batch(colbert, phase, runtime.rank, runtime.world_size, n_docs)
    acc = accumulate_gradients(engine, batch, phase)
    grads = engine_grads(engine)
    grad_norm, lr = optimizer_step(engine)
    second = train_step(engine, batch, phase)
    return dict(
        case=name,
        stage=phase.deepspeed.zero_stage,
        loss=acc.loss,
        ref_loss=ref_loss,
        max_rel=max_rel(grads, ref),
        grad_norm=grad_norm,
        ref_grad_norm=float(torch.linalg.vector_norm(torch.stack([g.norm() for g in ref.values()]))),
        temperature=acc.temperature,
        lr=lr,
        n_queries=acc.n_queries,
        second_loss=second.loss,
        second_lr=second.lr,
        second_temperature=second.temperature,
        seconds=time.perf_counter() - t0,
    )


def dropout_case(colbert, runtime, stage: int) -> dict:
    """Dropout > 0: GradCache's re-forward must see the masks of its first forward. Reference: the same chunks
    forwarded in the same order from the same seed with grad (so the same masks), the loss on their concatenation."""
    world = runtime.world_size
    phase = make_phase("supervised", stage, world, temperature=0.05, gradcache_mini_batch=4, gather_across_ranks=False)
    noisy = copy.deepcopy(colbert)
    for m in noisy.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    batch = local_batch(colbert, phase, runtime.rank, world, 3)

    def reference_grads(seed):
        model = ColBERTForTraining.for_phase(copy.deepcopy(noisy), phase).train()
        torch.manual_seed(seed)
        n, m, q_emb, d_emb = batch.queries["input_ids"].shape[0], 4, [], []
        for i in range(0, n, m):
            q_emb.append(model({k: v[i : i + m] for k, v in batch.queries.items()})["embeddings"])
            d_emb.append(model({k: v[i * 3 : (i + m) * 3] for k, v in batch.documents.items()})["embeddings"])
        loss = losses.contrastive_loss(
            torch.cat(q_emb), None, torch.cat(d_emb), model.document_mask(batch.documents),
            n_docs=3, temperature=0.05, denominator=n, gather=False,
        )  # fmt: skip
        loss.backward()
        # The engine averages gradients over ranks and each rank's reference is its own loss: average them too.
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= world
        return grads

    ref, other_seed = reference_grads(1234), reference_grads(99)
    engine, _, _ = build_engine(ColBERTForTraining.for_phase(copy.deepcopy(noisy), phase), phase, 10, runtime=runtime)
    torch.manual_seed(1234)
    accumulate_gradients(engine, batch, phase)
    grads = engine_grads(engine)
    optimizer_step(engine)
    return dict(case="dropout", stage=stage, max_rel=max_rel(grads, ref), other_seed_rel=max_rel(other_seed, ref))


def cases(stage: int, world: int) -> list[tuple[str, Phase, int]]:
    """(name, phase, n_docs). Local batch: 10 queries on 1 rank, 5 on 2 (rank 1's documents are longer)."""
    supervised = dict(temperature=0.05, learnable_temperature=True)
    out = [
        # hard negatives + learnable temperature, chunks of 4: the last chunk is smaller (10 = 4+4+2, 5 = 4+1)
        ("supervised-gradcache", make_phase("supervised", stage, world, gradcache_mini_batch=4, **supervised), 3),
        ("supervised-direct", make_phase("supervised", stage, world, **supervised), 3),
        # in-batch negatives only, fixed temperature, chunks of 3; scored one query at a time (SCORE_BUDGET = 1)
        ("unsupervised-gradcache",
         make_phase("unsupervised", stage, world, temperature=0.02, gradcache_mini_batch=3), 1),  # fmt: skip
        # a per-query loss: chunks of 2 are plain micro-batches
        ("distillation", make_phase("distillation", stage, world, gradcache_mini_batch=2), 3),
    ]
    if stage in (0, 3):
        # two accumulation groups per step, each its own contrastive batch (8 queries: 2 groups of 4 or of 2 per rank)
        phase = make_phase("supervised", stage, world, global_batch_size=8, gradient_accumulation=2,
                           gradcache_mini_batch=3, **supervised)  # fmt: skip
        out.append(("supervised-gradcache-accumulation", phase, 3))
    if stage in (0, 2):
        # the scripts' gradient scales: CachedContrastive's (global batch) and gathered Contrastive's (world size)
        out.append(("unsupervised-gradcache-scale-global_batch", make_phase(
            "unsupervised", stage, world, temperature=0.02, gradcache_mini_batch=3, loss_scale="global_batch"), 1))
        out.append(("supervised-direct-scale-world_size",
                    make_phase("supervised", stage, world, loss_scale="world_size", **supervised), 3))
    if stage in (2, 3):
        offload = {"zero_stage": stage, "offload_optimizer": True, "offload_params": stage == 3}
        phase = make_phase("supervised", stage, world, gradcache_mini_batch=4, deepspeed=offload, **supervised)
        out.append(("supervised-gradcache-offload", phase, 3))
    return out


def main(model_dir: str, out: str, stages: list[int]) -> None:
    runtime = dist.init_distributed(bf16=False)
    from pylate import models

    torch.manual_seed(0)  # PyLate initialises its projection and the [Q]/[D] embeddings at random: same on all ranks
    colbert = models.ColBERT(model_dir, device="cpu")
    results = []
    for stage in stages:
        for name, phase, n_docs in cases(stage, runtime.world_size):
            losses.SCORE_BUDGET = 1 if name.startswith("unsupervised") else 2**28
            results.append(run_case(name, colbert, runtime, phase, n_docs))
        losses.SCORE_BUDGET = 2**28
        if stage in (0, 3):
            results.append(dropout_case(colbert, runtime, stage))
    if runtime.is_main:
        with open(out, "w") as f:
            json.dump({"world_size": runtime.world_size, "cases": results}, f, indent=1)
    dist.teardown()


if __name__ == "__main__":
    stages = [int(s) for s in os.environ.get("TRAIN_CORE_STAGES", "0,1,2,3").split(",")]
    main(sys.argv[1], sys.argv[2], stages)
