"""Worker for tests/test_train_core.py: one GradCache step in bf16 beside the same step in fp32, ZeRO 1-3, one process.

    python tests/bf16_worker.py MODEL_DIR OUT_JSON

bf16 runs on the CPU accelerator here exactly as on a GPU (DeepSpeed's bf16 config; the runtime computes in bf16).
Per stage: max over parameters of max|g_bf16 - g_fp32| / max|g_fp32|, the losses, the dtype the optimizer accumulates
gradients in and the dtype of its master weights.
"""

from __future__ import annotations

import copy
import json
import sys

import torch

from colbertzero.train import dist
from colbertzero.train.engine import build_engine
from colbertzero.train.module import ColBERTForTraining
from colbertzero.train.step import accumulate_gradients

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import train_core_worker as W  # noqa: E402 - the same data and phases as the fp32 tests


def accumulation_and_master_dtypes(optimizer) -> tuple[str, str]:
    name = type(optimizer).__name__
    if name == "BF16_Optimizer":  # ZeRO-1: flat fp32 gradients and weights per group
        return str(optimizer.fp32_groups_gradients_flat[0].dtype), str(optimizer.fp32_groups_flat_partition[0].dtype)
    if name == "DeepSpeedZeroOptimizer":
        return str(optimizer.gradient_accumulation_dtype), str(optimizer.single_partition_of_fp32_groups[0].dtype)
    return str(optimizer.gradient_accumulation_dtype), str(optimizer.fp32_partitioned_groups_flat[0].dtype)


def main(model_dir: str, out: str) -> None:
    rt = dist.init_distributed(bf16=False)
    from pylate import models

    torch.manual_seed(0)
    colbert = models.ColBERT(model_dir, device="cpu")
    results = []
    for stage in (1, 2, 3):
        # 8 queries: two accumulation groups of 4, each in GradCache chunks of 3 (3 + 1): 4 backwards to accumulate
        phase = W.make_phase("supervised", stage, 1, global_batch_size=8, gradient_accumulation=2,
                             gradcache_mini_batch=3, temperature=0.05, bf16=True)
        batch = W.local_batch(colbert, phase, 0, 1, 3)
        runs = {}
        for dtype in (torch.float32, torch.bfloat16):
            runtime = dist.Runtime(rt.rank, rt.world_size, rt.local_rank, rt.backend, rt.device, dtype)
            engine, _, _ = build_engine(ColBERTForTraining.for_phase(copy.deepcopy(colbert), phase), phase, 10,
                                        runtime=runtime)
            acc = accumulate_gradients(engine, batch, phase)
            runs[dtype] = (acc.loss, W.engine_grads(engine), engine)
        (l32, g32, _), (l16, g16, e16) = runs[torch.float32], runs[torch.bfloat16]
        accum, master = accumulation_and_master_dtypes(e16.optimizer)
        results.append({"stage": stage, "loss_fp32": l32, "loss_bf16": l16, "max_rel": W.max_rel(g16, g32),
                        "compute_dtype": str(next(e16.module.parameters()).dtype), "accumulation_dtype": accum,
                        "master_dtype": master, "optimizer": type(e16.optimizer).__name__})
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
