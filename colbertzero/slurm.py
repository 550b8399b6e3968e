"""Asking Slurm: every call colbertzero makes to sbatch, squeue, sacct, scontrol and scancel — the launcher's, the
trainer's (the job clock, the nodes of a step, a detached evaluation job) and the status's — with one error rule.

A client that is missing or does not answer is a :class:`LaunchError` saying what to do (or, where a caller must go on
without an answer, an empty one). Phase and prepare jobs are submitted through submitit (`launcher/submit.py`); only a
command that outlives its job (`submit_wrap`) is submitted here. Nothing here imports torch.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from dataclasses import dataclass

from .recipe import parse_time_limit

# States after which a job does not run again. PREEMPTED is not one: a requeueing cluster runs the job again.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# sacct states of a run still going on; every other state is a run that is over (REQUEUED and PREEMPTED included).
GOING = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED",
         "SPECIAL_EXIT", "STAGE_OUT", "SIGNALING"}


# Reasons a pending job gives that no waiting clears: what it asks for exceeds what its partition, account or QoS can
# ever give (a request larger than any node, a time over the partition's limit, a partition or account it may not use).
NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
                "InvalidQOS", "AccountNotAllowed", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxMemoryPerJob",
                "QOSMaxNodePerJobLimit", "QOSMaxWallDurationPerJobLimit", "QOSMinGRES"}


class LaunchError(RuntimeError):
    """A refused launch/resume; the message says why and what to do. Nothing was submitted."""


def as_args(opts: dict[str, str | bool]) -> list[str]:
    """sbatch options (long names without dashes) in command-line form: ["--nodes=2", "--exclusive", ...]."""
    return [f"--{k}" if v is True else f"--{k}={v}" for k, v in opts.items()]


def helper_options(partition: str | None, time: str, cpus_per_task: int, gpus: int, mem: str | None
                   ) -> dict[str, str]:
    """sbatch options of a one-task helper job (an evaluation, a derive array task): the one translation."""
    opts = {"time": time, "cpus-per-task": str(cpus_per_task)}
    for key, value in (("partition", partition), ("mem", mem), ("gres", f"gpu:{gpus}" if gpus else None)):
        if value:
            opts[key] = value
    return opts


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
    args = as_args(opts)
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


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)}: Slurm's state of each job, queued or ended ("ENDED" when it left the queue without
    an accounting record); empty when Slurm does not answer (a caller that must go on without it)."""
    if not job_ids or not available():
        return {}
    try:
        queued_now = queued(job_ids)
    except LaunchError:
        return {}
    out = {jid: (state, reason) for jid, (_, state, reason) in queued_now.items()}
    for jid in job_ids:
        if jid not in out:
            try:
                runs = ended_runs(jid)
            except LaunchError:
                runs = []
            out[jid] = (runs[-1]["state"] if runs else "ENDED", "")
    return out


@dataclass(frozen=True)
class Partition:
    """What one partition can give a job: its largest node's CPUs and memory, its time limit (None: none)."""

    name: str
    default: bool
    cpus_per_node: int
    mem_mb_per_node: int | None
    max_time_s: int | None


def partitions() -> dict[str, Partition] | None:
    """The cluster's partitions as `sinfo` reports them; None when Slurm does not answer (nothing to check against)."""
    res = _quiet(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%l"])
    if res is None or res.returncode != 0:
        return None
    out: dict[str, Partition] = {}
    for line in res.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4 or not fields[1].rstrip("+").isdigit():
            continue
        name, cpus, mem, limit = fields
        default, name = name.endswith("*"), name.rstrip("*")
        try:
            max_time = None if limit.lower() in ("infinite", "unlimited", "n/a") else parse_time_limit(limit)
        except ValueError:
            max_time = None
        mem_mb = int(mem.rstrip("+")) if mem.rstrip("+").isdigit() else None
        prev = out.get(name)
        out[name] = Partition(name, default or bool(prev and prev.default),
                              max(int(cpus.rstrip("+")), prev.cpus_per_node if prev else 0),
                              max(mem_mb or 0, (prev.mem_mb_per_node or 0) if prev else 0) or None, max_time)
    return out or None


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


# ---------------------------------------------------------------------------------------------------- from a job
def _quiet(args: list[str], timeout: float = 15) -> subprocess.CompletedProcess | None:
    """A call whose failure the caller survives (a job asking about itself): None when the client is missing or
    does not answer."""
    if not shutil.which(args[0]):
        return None
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def job_elapsed_seconds(job_id: str) -> int | None:
    """How long a job has been running, from squeue, else sacct; None when unknown. Slurm 22.05 exports no
    SLURM_JOB_START_TIME, so the controller is asked: call it once per decision, not per step."""
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%M"], ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "Elapsed"]):
        res = _quiet(cmd)
        lines = res.stdout.split() if res is not None and res.returncode == 0 else []
        if lines:
            try:
                return parse_time_limit(lines[0])
            except ValueError:
                continue
    return None


def hostnames(nodelist: str) -> list[str] | None:
    """`scontrol show hostnames`: the hosts of a nodelist; None when it does not answer."""
    res = _quiet(["scontrol", "show", "hostnames", nodelist], timeout=10)
    return res.stdout.split() if res is not None and res.returncode == 0 and res.stdout.split() else None


def node_addr(node: str) -> str | None:
    """A node's NodeAddr as slurmctld knows it; None when unknown."""
    res = _quiet(["scontrol", "show", "node", node, "-o"], timeout=10)
    m = re.search(r"\bNodeAddr=(\S+)", res.stdout) if res is not None and res.returncode == 0 else None
    return m.group(1) if m else None


def submit_wrap(name: str, log: str, command: str, opts: dict[str, str], env: dict[str, str]) -> str:
    """A one-task job running ``command`` (a shell line: quote it with shlex.join) with sbatch's options ``opts``;
    returns its id. Raises RuntimeError with Slurm's reason when sbatch refuses."""
    r = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", "--ntasks=1", f"--output={log}",
                        *as_args(opts), "--wrap", command], capture_output=True, text=True, timeout=60, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"sbatch refused the job {name}: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip().split(";")[0]
