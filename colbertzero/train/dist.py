"""torch.distributed for the trainer: start, describe, tear down.

`init_distributed(bf16=...)` reads the torch launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT; `colbertzero.launch.slurm_env` fills them from Slurm) and starts the process group: NCCL with one GPU per
rank when CUDA is present, gloo on CPU. Without those variables it is one process on a free local port. Backend,
device and dtype are decided here once and carried in `Runtime`, so the rest of the trainer has no CPU/GPU branches.

`teardown()` must run at the end of every training process: a barrier, then `destroy_process_group`. Processes that
used a ZeRO-3 engine abort at interpreter exit otherwise.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(bf16: bool = False, device: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> Runtime:
    """Start (or join the already started) process group and return this rank's `Runtime`. Idempotent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start ranks with torchrun, or through "
                "colbertzero.launch (it fills the torch variables from Slurm)"
            )
    else:
        # One process: DeepSpeed still wants a process group and, without all five variables, goes looking for MPI.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("LOCAL_RANK", "0")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])

    dev, dtype = select_device_dtype(bf16, local_rank, device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    # Let DeepSpeed wrap the group we made (rather than make its own); on CPU it builds its shared-memory
    # collective op here, once, instead of inside the first engine construction.
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    return Runtime(
        rank=tdist.get_rank(),
        world_size=tdist.get_world_size(),
        local_rank=local_rank,
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
