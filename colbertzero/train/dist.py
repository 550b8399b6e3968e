"""torch.distributed for the trainer: start, describe, talk across ranks, tear down.

`init_distributed(bf16=...)` takes this process's place in the job from ``runtime.set_torch_env`` (torchrun's
variables, else Slurm's, else one process on a free local port) and starts the process group: NCCL with one GPU per
rank when CUDA is present, gloo on CPU. Backend, device and dtype are decided here once and carried in `Runtime`, so
the rest of the trainer has no CPU/GPU branches.

The object collectives below (`broadcast_from_rank0`, `all_gather_objects`, `rank0_outcome`) are how ranks agree on
a decision that only rank 0 can take (a checkpoint to load, a folder written, an evaluation's outcome): rank 0's
result or error reaches every rank, so no rank is left waiting at a barrier.

`teardown()` must run at the end of every training process: a barrier, then `destroy_process_group`. Processes that
used a ZeRO-3 engine abort at interpreter exit otherwise.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as tdist

from colbertzero.runtime import set_torch_env

log = logging.getLogger(__name__)

# DeepSpeed 0.19.8's ZeRO calls an API torch 2.13 deprecates, once per process: a notice for DeepSpeed, nothing a
# user of a training job can act on, printed by every rank of every phase.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)

# Long enough for a ZeRO-3 checkpoint consolidation or an export on rank 0 while the others wait in a collective.
DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Runtime:
    """Where and how this rank computes."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" | "gloo"
    device: torch.device
    dtype: torch.dtype  # model compute dtype: bfloat16 on GPU when the phase asks for it, else float32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16


def select_device_dtype(bf16: bool, local_rank: int = 0, device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """GPU `local_rank` when CUDA is there (or `device` when given), bf16 only on GPU: CPU always trains in fp32."""
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return dev, (torch.bfloat16 if bf16 and dev.type == "cuda" else torch.float32)


def init_distributed(bf16: bool = False, device: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> Runtime:
    """Start (or join the already started) process group and return this rank's `Runtime`. Idempotent."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start ranks with torchrun, "
                "srun, or `colbertzero launch`"
            )
    # One process too: DeepSpeed wants a process group and, without all five variables, goes looking for MPI.
    place = set_torch_env()
    dev, dtype = select_device_dtype(bf16, place.local_rank, device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=place.rank,
            world_size=place.world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    # Let DeepSpeed wrap the group we made (rather than make its own); on CPU it builds its shared-memory
    # collective op here, once, instead of inside the first engine construction.
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    return Runtime(
        rank=tdist.get_rank(),
        world_size=tdist.get_world_size(),
        local_rank=place.local_rank,
        backend=backend,
        device=dev,
        dtype=dtype,
    )


def current_runtime(bf16: bool = False) -> Runtime:
    """The `Runtime` of an already started process group (for callers that did not keep the one `init_distributed`
    returned)."""
    if not tdist.is_initialized():
        raise RuntimeError("torch.distributed is not started: call colbertzero.train.dist.init_distributed() first")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev, dtype = select_device_dtype(bf16, local_rank)
    return Runtime(tdist.get_rank(), tdist.get_world_size(), local_rank, tdist.get_backend(), dev, dtype)


def teardown(barrier: bool = True) -> None:
    """Barrier, then destroy the process group (ZeRO-3 processes abort at exit without it). Safe to call twice.

    barrier=False when leaving on an error raised on this rank alone: the other ranks may never reach the barrier."""
    if not tdist.is_initialized():
        return
    try:
        if barrier:
            tdist.barrier()
    finally:
        tdist.destroy_process_group()


# ---------------------------------------------------------------- talking across ranks
def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world() -> int:
    return tdist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        tdist.barrier()


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    tdist.all_gather_object(out, obj)
    return out


def rank0_outcome(fn: Callable[[], Any], what: str, error: type[Exception]) -> Any:
    """Run ``fn`` on rank 0 and give its value to every rank, or raise ``error`` on every rank when it failed:
    the other ranks raise instead of waiting forever at the next collective."""
    outcome: dict = {}
    if rank() == 0:
        try:
            outcome = {"value": fn()}
        except Exception as e:
            log.exception("%s failed", what)
            outcome = {"error": f"{what}: {type(e).__name__}: {e}"}
    outcome = broadcast_from_rank0(outcome)
    if outcome.get("error"):
        raise error(outcome["error"])
    return outcome.get("value")
