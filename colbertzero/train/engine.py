"""The DeepSpeed engine for a phase.

    engine, optimizer, scheduler = build_engine(model, phase, total_steps, runtime=runtime)

- `model`: a `ColBERTForTraining`; `total_steps`: optimizer steps of the phase (the schedule's length).
- Optimizer: torch AdamW built here and handed to DeepSpeed (not a DeepSpeed-config optimizer: that JIT-builds
  FusedAdam, ~70 s on CPU), with torch's fused kernel (CPU and CUDA; the transformers Trainer's default too): on a
  2M-parameter flat partition it steps in 1.2 ms where the per-tensor loop takes 10.7 ms (2 CPU cores). Weight
  decay as the transformers Trainer applies it: not on biases, norms, or the temperature. With `offload_optimizer`
  it is still torch AdamW, run on the CPU copy (slower than DeepSpeedCPUAdam, which would need another JIT build;
  offloading is a memory fallback here).
- Scheduler: transformers' `get_scheduler` (linear / constant / cosine, each with warmup: `warmup_steps`, else
  ceil(warmup_ratio x total_steps)), a LambdaLR over the AdamW above. It is given to DeepSpeed, so `engine.step()`
  steps it (do not step it again) and DeepSpeed checkpoints carry it.
- Config: `train_micro_batch_size_per_gpu` = queries per rank per optimizer step and `gradient_accumulation_steps` = 1:
  accumulation (GradCache chunks, `phase.gradient_accumulation` groups) is driven by step.py with
  `set_gradient_accumulation_boundary`, because the number of backwards per step varies. ZeRO stage and offload from
  `phase.deepspeed`; bf16 when the runtime computes in bf16 (GPU + phase.bf16), fp32 otherwise, with fp32 master
  weights, optimizer state and gradient accumulation (ZeRO 1-3; bf16 on ZeRO-0 is refused); gradient clipping from
  `max_grad_norm` (None = no clipping).
"""

from __future__ import annotations

import math
from typing import Any

import deepspeed
import torch
from torch import nn
from transformers import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from colbertzero.recipe import Phase
from colbertzero.train.dist import Runtime, current_runtime

# Hugging Face's scheduler names; "constant" there ignores warmup.
_SCHEDULES = {"linear": "linear", "constant": "constant_with_warmup", "cosine": "cosine"}
# Parameters without weight decay: LayerNorm modules and these name patterns (the Trainer's rule, plus ours).
_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)", r"^temperature$"]


def warmup_steps(phase: Phase, total_steps: int) -> int:
    return phase.warmup_steps if phase.warmup_steps is not None else math.ceil(phase.warmup_ratio * total_steps)


def deepspeed_config(phase: Phase, runtime: Runtime) -> dict[str, Any]:
    if phase.global_batch_size % runtime.world_size:
        raise ValueError(f"global_batch_size {phase.global_batch_size} does not split over {runtime.world_size} ranks")
    zero: dict[str, Any] = {"stage": phase.deepspeed.zero_stage}
    pin = runtime.device.type == "cuda"
    if phase.deepspeed.offload_optimizer:
        if phase.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if phase.deepspeed.offload_params:
        if phase.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if phase.deepspeed.zero_stage == 3:
        # Lets engine.save_16bit_model write whole weights for export.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": phase.global_batch_size // runtime.world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": phase.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": runtime.bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW on the offloaded copy
        "steps_per_print": 2**62,  # the runner logs
        "wall_clock_breakdown": False,
    }
    if runtime.bf16:
        if phase.deepspeed.zero_stage == 0:
            raise ValueError("bf16 on ZeRO stage 0 would accumulate the GradCache backwards in bf16: use "
                             "deepspeed.zero_stage 1 or more (fp32 master weights and gradient accumulation)")
        # Every GradCache chunk and accumulation group adds into the gradient: fp32, not bf16 (ZeRO-1: DeepSpeed's
        # BF16 optimizer; ZeRO-2/3: the partitions' accumulation buffers).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def build_optimizer(model: nn.Module, phase: Phase) -> torch.optim.AdamW:
    decay = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": phase.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=phase.lr, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, phase: Phase, total_steps: int):
    return get_scheduler(
        _SCHEDULES[phase.schedule],
        optimizer,
        num_warmup_steps=warmup_steps(phase, total_steps),
        num_training_steps=total_steps,
    )


def build_engine(model: nn.Module, phase: Phase, total_steps: int, *, runtime: Runtime | None = None):
    """(engine, optimizer, scheduler); `optimizer` is the torch AdamW (DeepSpeed's wrapper is `engine.optimizer`)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    runtime = runtime or current_runtime(bf16=phase.bf16)
    optimizer = build_optimizer(model, phase)
    scheduler = build_scheduler(optimizer, phase, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(phase, runtime),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler
