"""The GPU-hour ledger: every rule about attempts, GPU-hours and budgets, as functions of manifest data.

The manifest (``manifest.py``) stores; this module decides. The runner ticks its attempt and asks whether the next
step would cross the budget, the launcher refuses over-budget phases and merges Slurm's accounting, preflight and
`plan` project against budgets, `status` and the report show them — all through these functions, so they never
disagree. ``data`` is the manifest's JSON (``Manifest.read()`` / ``Manifest.snapshot()``); ``record`` one phase's
entry in it (``data["phases"][name]``). Functions named as verbs change the record they are given (call them inside
``Manifest.update_phase``); the others only read.

Rules:
- One attempt is one run of a phase job (a requeue is a new attempt). GPU-hours = units × elapsed hours, the units
  being nodes × GPUs per node, or, CPU-only (``gpus_per_node`` 0), the tasks (`units_of`, `gpu_hours`).
- An attempt's elapsed time is at least the allocation's as Slurm accounts it (``merge_sacct``): the runner's own
  clock stops before export and evaluation, and a job killed while starting has no runner clock at all.
- A budget raised on the command line (``resume --phase-budget``/``--budget``) wins over the recipe's.
- A phase is over budget when its attempts used at least its budget, or when the runner stopped it there.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from .files import now_iso
from .runtime import resume_command

# ---------------------------------------------------------------------------------------------- attempts
# An attempt's exit_state when a rank's watchdog found the phase hung: it is run again like a requeue, and keeps that
# state whatever its ranks report after it (a stuck rank woken to be killed fails in its broken collective: an echo).
HANG = "hang"


def attempt(record: dict, attempt_id: str | None) -> dict | None:
    """The phase record's attempt of that id, or None."""
    return next((a for a in record.get("attempts") or [] if a["id"] == attempt_id), None) if attempt_id else None


def is_hung(record: dict, attempt_id: str | None) -> bool:
    a = attempt(record, attempt_id)
    return bool(a) and a.get("exit_state") == HANG


def units_of(nodes: int, gpus_per_node: int, tasks: int) -> int:
    """What an allocation is charged for: its GPUs (nodes × GPUs per node), or, CPU-only, its tasks."""
    return nodes * gpus_per_node if gpus_per_node else max(1, tasks)


def phase_units(resources) -> int:
    """The units a phase's `resources` hold (one rank per GPU, or per CPU task: `Resources.world_size`)."""
    return units_of(resources.nodes, resources.gpus_per_node, resources.world_size)


def gpu_hours(units: int, seconds: float) -> float:
    """GPU-hours of ``units`` held for ``seconds``: the one conversion."""
    return units * float(seconds) / 3600.0


def attempt_gpu_hours(a: dict) -> float:
    """GPU-hours of one attempt: its units (`units_of`) × its elapsed time."""
    return gpu_hours(units_of(a["nodes"], a["gpus_per_node"], a["tasks"]), a.get("elapsed_s") or 0.0)


def open_attempt(record: dict, *, job_id: str | None, executor: str, nodes: int, gpus_per_node: int, tasks: int,
                 step_start: int = 0, attempt_id: str | None = None, start: str | None = None,
                 scoring: dict | None = None, accelerator: dict | None = None) -> str:
    """Add an attempt (idempotent for the same id: a requeued job re-registering counts once); returns its id."""
    aid = attempt_id or f"{job_id or 'local'}-{len(record['attempts'])}"
    if any(a["id"] == aid for a in record["attempts"]):
        return aid
    record["attempts"].append({
        "id": aid, "job_id": job_id, "executor": executor, "nodes": nodes, "gpus_per_node": gpus_per_node,
        "tasks": tasks, "start": start or now_iso(), "end": None, "elapsed_s": 0.0, "gpu_hours": 0.0,
        "exit_state": "running", "step_start": step_start, "step_end": step_start, "host": os.uname().nodename,
        "scoring": scoring,  # the MaxSim backend this attempt's machine ran ({backend, why})
        "accelerator": accelerator,  # rank 0's torch build and GPUs (train/accelerator.py)
    })
    record["state"] = "running"
    return aid


def tick_attempt(record: dict, attempt_id: str, *, elapsed_s: float, step: int, end_state: str | None = None,
                 throughput: dict | None = None) -> dict:
    """An attempt's elapsed time, GPU-hours and last step (closed with ``end_state``), and the phase's latest
    measured throughput (what projections read)."""
    if throughput is not None:
        record["throughput"] = throughput
    for a in record["attempts"]:
        if a["id"] == attempt_id:
            a["elapsed_s"] = float(elapsed_s)
            a["gpu_hours"] = attempt_gpu_hours(a)
            a["step_end"] = step
            if end_state is not None and a["exit_state"] != HANG:
                a["exit_state"] = end_state
                a["end"] = now_iso()
            return a
    raise KeyError(f"no attempt {attempt_id!r}")


# ---------------------------------------------------------------------------------------------- sums and budgets
def record_gpu_hours(record: dict, *, except_attempt: str | None = None) -> float:
    return sum(float(a.get("gpu_hours") or 0.0) for a in record.get("attempts") or [] if a.get("id") != except_attempt)


def phase_gpu_hours(data: dict, name: str) -> float:
    return record_gpu_hours(data["phases"][name])


def run_gpu_hours(data: dict) -> float:
    return sum(record_gpu_hours(p) for p in data["phases"].values())


def _number(x: Any) -> float | None:
    return None if x is None or isinstance(x, bool) else float(x)


def phase_budget(data: dict, name: str) -> float | None:
    """The phase's GPU-hour budget: one raised on the command line wins over the recipe's."""
    raised = (data.get("phases") or {}).get(name, {}).get("budget_gpu_hours")
    if raised is not None:
        return _number(raised)
    return _number(((data.get("recipe") or {}).get("phases") or {}).get(name, {}).get("budget_gpu_hours"))


def run_budget(data: dict) -> float | None:
    """The run's GPU-hour budget: one raised on the command line wins over the recipe's."""
    if data.get("budget_gpu_hours") is not None:
        return _number(data["budget_gpu_hours"])
    return _number((data.get("recipe") or {}).get("budget_gpu_hours"))


def raise_budget(data: dict, name: str | None, gpu_hours: float) -> None:
    """Set the run's (``name`` None) or a phase's budget; a phase stopped over budget may then run again."""
    if gpu_hours <= 0:
        raise ValueError(f"a GPU-hour budget is > 0, got {gpu_hours}")
    if name is None:
        data["budget_gpu_hours"] = float(gpu_hours)
        return
    p = data["phases"][name]
    p["budget_gpu_hours"] = float(gpu_hours)
    if p["state"] == "over-budget":
        p["state"] = "pending"


def crosses_budget(budget: float | None, used_before: float, elapsed_s: float, next_step_s: float,
                   units: int) -> bool:
    """Would the next step take the phase past its budget? ``used_before``: GPU-hours of the phase's earlier
    attempts; ``units``: GPUs (or CPU tasks) this attempt holds."""
    if budget is None:
        return False
    return used_before + gpu_hours(units, elapsed_s + next_step_s) > budget


def budget_refusals(data: dict, phases: list[str], run_dir: str) -> list[str]:
    """Why these phases may not be submitted (each over its budget, or the run over its own), with the command that
    continues them."""
    out = []
    for n in phases:
        used, budget = phase_gpu_hours(data, n), phase_budget(data, n)
        if data["phases"][n]["state"] == "over-budget" or (budget is not None and used >= budget):
            of = f" of {budget:g}" if budget is not None else ""
            out.append(f"phase {n!r} is over its GPU-hour budget ({used:.3g}{of} used); continue it with a raised "
                       f"budget: {resume_command(run_dir, phase_budgets=[n])}")
    rb, used = run_budget(data), run_gpu_hours(data)
    if rb is not None and used >= rb:
        out.append(f"the run used {used:.3g} of its {rb:g} GPU-hours; continue it with a raised budget: "
                   f"{resume_command(run_dir, run_budget=True)}")
    return out


# ---------------------------------------------------------------------------------------------- Slurm's accounting
def _when(iso: str | None) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(iso) if iso else dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return dt.datetime.max.replace(tzinfo=dt.timezone.utc)


def merge_sacct(data: dict, runs: dict[str, list[dict]], tasks: dict[str, int]) -> None:
    """Merge Slurm's accounting into the attempts: ``runs[phase]`` holds one dict per ended run of the phase's
    jobs (``id`` = "<job>-<restart>", ``job``, ``state``, ``start``/``end`` (ISO, UTC), ``elapsed_s``, ``nodes``,
    ``gpus``); ``tasks[phase]`` the phase's world size.

    Attempts the runner could not close (cancelled, node failure) get Slurm's end state; runs that ended before the
    runner recorded them (killed while starting) are added; every attempt's elapsed time is at least the
    allocation's. GPU-hours spent are spent, whoever noticed."""
    for n, phase_runs in runs.items():
        attempts = data["phases"][n]["attempts"]
        by_id = {a["id"]: a for a in attempts}
        for run in phase_runs:
            a = by_id.get(run["id"])
            if a is None:
                if run["elapsed_s"] <= 0:
                    continue  # never started
                step = max((x.get("step_end") or 0 for x in attempts if _when(x.get("start")) <= _when(run["start"])),
                           default=0)
                nodes = max(1, run["nodes"])
                a = {"id": run["id"], "job_id": run["job"], "executor": "slurm", "nodes": nodes,
                     "gpus_per_node": run["gpus"] // nodes, "tasks": tasks[n], "start": run["start"],
                     "end": run["end"], "elapsed_s": 0.0, "gpu_hours": 0.0, "exit_state": run["state"].lower(),
                     "step_start": step, "step_end": step, "host": None,
                     "note": "ended before the runner recorded it (from sacct)"}
                attempts.append(a)
            elif a["exit_state"] == "running" or (  # the runner never closed it, or Slurm overruled it
                    a["exit_state"] == "requeue" and run["state"] not in ("REQUEUED", "PREEMPTED")):
                a["exit_state"] = run["state"].lower()
                a["end"] = a.get("end") or run["end"]
            a["elapsed_s"] = max(float(a.get("elapsed_s") or 0.0), float(run["elapsed_s"]))
            a["gpu_hours"] = attempt_gpu_hours(a)
        attempts.sort(key=lambda a: _when(a.get("start")))


def close_lost_attempts(data: dict) -> None:
    """Local attempts still 'running' while nobody runs them (the launcher was killed): closed as 'lost', with the
    time the runner last recorded."""
    for p in data["phases"].values():
        for a in p["attempts"]:
            if a.get("exit_state") == "running" and a.get("executor") == "local":
                a["exit_state"] = "lost"
