"""Asking Slurm: every call the launcher makes to sbatch, squeue, sacct and scontrol, with one error rule.

A client that is missing or does not answer is a :class:`LaunchError` saying what to do; nothing here submits jobs
(that is ``submit.py``, through submitit).
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess

from . import sbatch

# States after which a job does not run again. PREEMPTED is not one: a requeueing cluster runs the job again.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# sacct states of a run still going on; every other state is a run that is over (REQUEUED and PREEMPTED included).
GOING = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED",
         "SPECIAL_EXIT", "STAGE_OUT", "SIGNALING"}


class LaunchError(RuntimeError):
    """A refused launch/resume; the message says why and what to do. Nothing was submitted."""


def available() -> bool:
    """A Slurm client here (sbatch on PATH; it finds its configuration itself: SLURM_CONF, /etc/slurm, configless)."""
    return shutil.which("sbatch") is not None


def call(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a Slurm client; arguments are a list (never a shell line)."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LaunchError(f"{args[0]} not found: run this from a Slurm login node, or use --executor local") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`{' '.join(args[:3])} …` did not answer within {timeout:.0f}s (slurmctld down?); "
                          "nothing submitted") from None


def test_only(what: str, opts: dict) -> None:
    """`sbatch --test-only` with a job's options: a bad partition, account, QoS, constraint or extra option is
    refused with Slurm's own message before anything is submitted."""
    args = sbatch.as_args(opts)
    r = call(["sbatch", "--test-only", *args, "--wrap", "true"])
    if r.returncode != 0:
        why = (r.stderr.strip() or r.stdout.strip()).replace("\n", "; ")
        hint = (" (is SLURM_CONF set for this cluster? for tools/local-slurm: eval \"$(tools/local-slurm env)\")"
                if "contact" in why.lower() else "")
        raise LaunchError(f"Slurm refuses {what}: {why}{hint}\n  sbatch options: {' '.join(args)}\n"
                          "  nothing was submitted")


def queued(job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """{job id (array: its master id): (id as squeue prints it, state, reason)} of the jobs still queued or running."""
    if not job_ids:
        return {}
    r = call(["squeue", "-h", "-o", "%A|%i|%T|%r", "-j", ",".join(job_ids)])
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:  # every one of them has left the controller
            return {}
        raise LaunchError(f"cannot tell whether the run's jobs are still queued (squeue: {r.stderr.strip()}); "
                          "nothing submitted")
    out = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[2] not in ENDED:
            out.setdefault(parts[0], (parts[1], parts[2], parts[3]))
    return out


def queued_by_name(names: list[str]) -> dict[str, tuple[str, str, str]]:
    """{job name: (job id, state, reason)} of the named jobs still pending or running."""
    r = call(["squeue", "-h", "-o", "%A|%T|%r|%j", "-n", ",".join(names)])
    if r.returncode != 0:
        raise LaunchError(f"cannot tell whether the run's jobs are still queued (squeue: {r.stderr.strip()}); "
                          "nothing submitted")
    out = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4 and parts[3] in names and parts[1] not in ENDED:
            out.setdefault(parts[3], (parts[0], parts[1], parts[2]))
    return out


def release_held(jobs: list[tuple[str, str, str]]) -> list[str]:
    """Release jobs Slurm holds after a requeue (Slurm 22.05: BeginTime ~120 s later); returns their ids."""
    released = []
    for job, state, reason in jobs:
        if state == "PENDING" and reason == "BeginTime":
            if call(["scontrol", "update", f"JobId={job}", "StartTime=now"]).returncode == 0:
                released.append(job)
    return released


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        call(["scancel", *job_ids])


def job_state(job: str) -> str:
    """The job's state as squeue prints it, "" when it has left the queue or squeue does not answer."""
    try:
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def requeue(job: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)


def _utc(sacct_time: str) -> str | None:
    """sacct prints local time without a zone; the manifest keeps UTC with its offset (files.now_iso)."""
    try:
        return dt.datetime.fromisoformat(sacct_time).astimezone(dt.timezone.utc).isoformat(timespec="seconds")
    except ValueError:  # "Unknown", "None"
        return None


def _tres_gpus(tres: str) -> int:
    for item in (tres or "").split(","):
        key, _, value = item.partition("=")
        if key == "gres/gpu" and value.isdigit():
            return int(value)
    return 0


def ended_runs(job_id: str) -> list[dict]:
    """Every ended run of a job, oldest first (a requeued job has one per start: the n-th is SLURM_RESTART_COUNT n),
    in the form ``ledger.merge_sacct`` takes."""
    fields = ["JobID", "State", "Start", "End", "ElapsedRaw", "NNodes", "AllocTRES"]
    r = call(["sacct", "-D", "-X", "-P", "-n", "-j", job_id, "-o", ",".join(fields)])
    if r.returncode != 0:
        return []
    rows = [dict(zip(fields, line.split("|"))) for line in r.stdout.splitlines() if line.strip()]
    out = []
    for i, row in enumerate(x for x in rows if x["JobID"] == job_id):
        state = row["State"].split()[0] if row["State"] else ""
        if state and state not in GOING:
            out.append({"id": f"{job_id}-{i}", "job": job_id, "state": state, "start": _utc(row["Start"]),
                        "end": _utc(row["End"]), "elapsed_s": float(row["ElapsedRaw"] or 0),
                        "nodes": int(row["NNodes"] or 1), "gpus": _tres_gpus(row["AllocTRES"])})
    return out
