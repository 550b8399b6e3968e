"""What this rank computes on, checked against what the phase asks for before the process group starts.

Without the check, a phase with ``resources.gpus_per_node > 0`` started by a CPU-only torch (a CPU wheel, a
container whose torch is not the site's CUDA build, a job that got no GPU) trains on gloo and CPU without a word:
`dist.select_device_dtype` falls back. The facts go into every attempt's manifest record; `status` shows them.

The network NCCL chose between nodes is only written in NCCL's own init log ("NCCL INFO Using network IB"), so a
GPU phase asks NCCL for that log in a file per process (unless the user set NCCL_DEBUG themselves) and rank 0 reads
its own: a multi-node phase on "Socket" runs its gathers over TCP, the fabric's plugin or settings missing.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import torch

from ..recipe import Cluster

CPU_HINT = "for a CPU run set resources.gpus_per_node=0 (and cpu_tasks_per_node)"


class AcceleratorError(RuntimeError):
    """The phase asks for GPUs this process cannot use: refused before anything starts."""


def facts() -> dict:
    """torch's build and what it sees on this node: recorded per attempt."""
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    out = {
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # None for a CPU build
        "gpus": count,
        "gpu_names": sorted({torch.cuda.get_device_name(i) for i in range(count)}),
        "bf16": bool(available and torch.cuda.is_bf16_supported()),
        "nccl": None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if available and hasattr(torch.cuda, "nccl"):
        v = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return out


def placement(rank: int) -> dict:
    """Where this rank sits: its host, the CPUs it may run on (what srun's binding left it) and torch's threads."""
    return {"rank": rank, "host": socket.gethostname(), "cpus": sorted(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads()}


def fit_threads(environ: dict | None = None) -> int:
    """torch's intra-op threads = the CPUs this rank is bound to, at most OMP_NUM_THREADS when set: a rank never
    runs more threads than its own cores (torch's default counts the node's cores, and a rank pinned to 72 of 288
    would oversubscribe them 4×). Returns the count."""
    environ = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0))
    try:
        asked = int(environ.get("OMP_NUM_THREADS", "") or 0)
    except ValueError:
        asked = 0
    threads = max(1, min(cores, asked) if asked > 0 else cores)
    torch.set_num_threads(threads)
    return threads


def placement_problems(ranks: list[dict], cpus_per_task: int) -> list[str]:
    """Ranks holding fewer CPUs than ``cpus_per_task`` (srun bound them to fewer cores than the job has: one core a
    rank is Slurm >= 22.05 without SRUN_CPUS_PER_TASK), or sharing CPUs with another rank of the same node."""
    out = []
    for r in ranks:
        if len(r["cpus"]) < cpus_per_task:
            out.append(f"rank {r['rank']} on {r['host']} runs on {len(r['cpus'])} CPU(s) {r['cpus']} of the "
                       f"{cpus_per_task} cpus_per_task it was given")
    seen: dict[tuple[str, int], int] = {}
    for r in ranks:
        for c in r["cpus"]:
            other = seen.setdefault((r["host"], c), r["rank"])
            if other != r["rank"]:
                out.append(f"ranks {other} and {r['rank']} on {r['host']} share CPU {c}")
                break
    return out


def check(f: dict, *, phase: str, gpus_per_node: int, bf16: bool) -> None:
    """Refuse (AcceleratorError) a GPU phase this process cannot run on its GPUs; CPU phases pass as they are."""
    if gpus_per_node <= 0:
        return
    where = f"phases.{phase}.resources.gpus_per_node={gpus_per_node}, but on {f['host']}"
    if not f["cuda"]:
        raise AcceleratorError(
            f"{where} torch {f['torch']} is a CPU-only build: install torch built for the node's CUDA (on GH200, the "
            f"site's container's torch with a --system-site-packages venv: docs/cluster.md), or {CPU_HINT}")
    if f["gpus"] < gpus_per_node:
        cvd = f["cuda_visible_devices"]
        raise AcceleratorError(
            f"{where} torch {f['torch']} (CUDA {f['cuda']}) sees {f['gpus']} GPU(s)"
            + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else "")
            + ": ask Slurm for the GPUs (--gpus-per-node), give the container GPU access (--nv, pyxis/EDF do it), or "
            + CPU_HINT)
    if bf16 and not f["bf16"]:
        raise AcceleratorError(f"{where} {', '.join(f['gpu_names'])} has no bfloat16 support: set "
                               f"phases.{phase}.bf16=false (fp32), or run on GPUs with bf16 (Ampere or newer)")



# NCCL's init line naming its network transport: "Socket", "IB", "AWS Libfabric" (aws-ofi-nccl), "Libfabric", …
_USING_NETWORK = re.compile(r"\bNCCL INFO Using network (.+?)\s*$", re.M)
SOCKET = "Socket"


def nccl_log_env(folder: Path, environ: dict | None = None) -> dict[str, str]:
    """The variables that make NCCL write its init log to ``folder/HOST.PID.log``; none where the user chose NCCL's
    logging already (NCCL_DEBUG_FILE, or NCCL_DEBUG at INFO or TRACE). A quieter NCCL_DEBUG (VERSION, WARN: what a
    site's module sets) is raised to INFO for the init and network lines only, into that file."""
    environ = os.environ if environ is None else environ
    if "NCCL_DEBUG_FILE" in environ or environ.get("NCCL_DEBUG", "").upper() in ("INFO", "TRACE"):
        return {}
    return {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET",
            "NCCL_DEBUG_FILE": str(folder / "%h.%p.log")}  # NCCL expands %h (host) and %p (pid)


def nccl_log_of_this_process(folder: Path) -> Path:
    return folder / f"{socket.gethostname()}.{os.getpid()}.log"


def nccl_network(log_text: str) -> str | None:
    """The network NCCL's init log says it uses (the last one named), or None."""
    found = _USING_NETWORK.findall(log_text)
    return found[-1] if found else None


def record_network(f: dict, folder: Path, nodes: int, profile: Cluster | None = None) -> dict:
    """``f`` with ``nccl_network`` read from this process's NCCL log; warns on stderr when a multi-node phase's
    NCCL fell back to TCP sockets. A cluster ``profile`` with `require_network`: a multi-node phase on any other
    network raises AcceleratorError naming the profile's NCCL/libfabric settings to check."""
    required = profile.require_network if profile else []
    path = nccl_log_of_this_process(folder)
    try:
        net = nccl_network(path.read_text(errors="replace"))
    except OSError:
        net = None
    out = {**f, "nccl_network": net, "nodes": nodes}
    if required and nodes > 1 and net is None:
        print(f"[colbertzero] NCCL's network could not be read (no 'Using network' line in {path}: NCCL_DEBUG or "
              f"NCCL_DEBUG_FILE set elsewhere?); cluster {profile.name!r} requires {' or '.join(required)}, unchecked",
              file=sys.stderr)
    elif required and nodes > 1 and net not in required:
        fabric = " or ".join(repr(n) for n in required)
        nccl = " ".join(f"{k}={v!r}" for k, v in profile.environment.items() if k.startswith(("NCCL_", "FI_")))
        raise AcceleratorError(
            f"NCCL between the {nodes} nodes uses {net!r} (its log: {path}); cluster "
            f"{profile.name!r} requires {fabric}: its plugin (aws-ofi-nccl for Slingshot) is not loaded in the task's "
            f"environment or its settings did not reach the task. The profile exports: {nccl or 'nothing'}; check "
            f"that the container or module provides the plugin (docs/cluster.md, 'The fabric')")
    if net == SOCKET and nodes > 1:
        print(f"[colbertzero] NCCL uses TCP sockets between the {nodes} nodes (its log: {path}): the fabric's NCCL "
              "plugin or settings are missing, and every gather crosses the network over TCP. See docs/cluster.md, "
              "'The fabric'.", file=sys.stderr)
    return out
