"""Launcher benchmark on the local Slurm cluster (tools/local-slurm): launch-to-first-step overhead, and the work a
preemption costs.

    python tools/bench/launch.py [--json] [--repeat 3] [--keep DIR]

Starts the cluster when it is down (and stops it again afterwards), prepares the tiny recipe's shards once (outside
every measure), then, with the first phase of recipes/tiny-cpu-slurm.yaml (2 nodes x 1 CPU task, tiny ModernBERT):

1. launch to first step (`--repeat` times; the goal is <= 30 s without model compute): from running
   `colbertzero launch` until the first training step is logged, minus that step's own compute. Split into
   submit (the command itself: validation, `sbatch --test-only`, submission), queue (submitted -> job start, from
   sacct, 1 s resolution) and start-up (job start -> first step: Python and imports, rendezvous, model, engine).
2. work lost to a preemption (the goal is <= one checkpoint interval): a 160-step phase with a checkpoint every 20
   steps is preempted by Slurm itself, a job in the `urgent` partition wanting both nodes (the victim gets USR2 at
   once, SIGTERM 15 s later, and is requeued), 10 steps after its last periodic checkpoint. Lost work = finished
   steps the next attempt computes again, plus the step that was running at the signal; beside it what a kill would
   have lost with periodic checkpoints alone, the signal-to-requeue time and the restart's start-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from colbertzero.layout import RunLayout  # noqa: E402

BASE = ROOT / "recipes" / "tiny-cpu-slurm.yaml"
GOAL_OVERHEAD_S = 30.0


def _recipe(folder: Path, name: str, shards: Path, **unsupervised) -> Path:
    import yaml

    phase = {"eval": {"beir": []}, "data": {"shards_dir": str(shards)}, **unsupervised}
    doc = {"extends": str(BASE), "name": name, "phases": {"unsupervised": phase, "supervised": None,
                                                         "distillation": None}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _cz(*args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "colbertzero", *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"colbertzero {' '.join(map(str, args))} failed:\n{res.stdout}{res.stderr}")
    return res


def _out(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60).stdout.strip()


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _job(run: Path) -> str:
    return _manifest(run)["submissions"][-1]["jobs"]["unsupervised"]


def _records(run: Path) -> list[dict]:
    log = RunLayout.of(run).phase("unsupervised").train_log
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def _until(cond, what: str, timeout: float = 600, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)
    return value


def _queue_empty() -> bool:
    return not _out("squeue", "-h", "-o", "%i")


def _sacct_time(job: str, field: str) -> float | None:
    """Submit/Start of the job's latest run (epoch seconds), from Slurm's accounting."""
    lines = [x for x in _out("sacct", "-D", "-X", "-P", "-n", "-j", job, "-o", field).splitlines() if x]
    try:
        return dt.datetime.fromisoformat(lines[-1]).timestamp()
    except (IndexError, ValueError):
        return None


def launch_to_first_step(work: Path, shards: Path, i: int) -> dict:
    recipe = _recipe(work, f"bench-first-step-{i}", shards, max_steps=4)
    run = work / f"first-step-{i}"
    t0 = time.time()
    _cz("launch", recipe, "--run-dir", run)
    t_submitted = time.time()
    _until(lambda: _records(run), "the first logged step")
    t_first = time.time()
    job = _job(run)
    step_s = float(_records(run)[0]["seconds_per_step"])
    _until(_queue_empty, "the job to end", poll=0.5)
    start = _until(lambda: _sacct_time(job, "Start"), "sacct's start time", poll=0.5)
    queue_s = max(0.0, start - t_submitted)
    return {"job": job, "submit_s": t_submitted - t0, "queue_s": queue_s,
            "startup_s": t_first - t_submitted - queue_s - step_s, "first_step_compute_s": step_s,
            "overhead_s": t_first - t0 - step_s}


def preemption(work: Path, shards: Path) -> dict:
    every = 20
    recipe = _recipe(work, "bench-preempt", shards, data={"shards_dir": str(shards), "epochs": 40},
                     cadence={"save_every": every, "keep_last": 3, "log_every": 1})
    run = work / "preempt"
    _cz("launch", recipe, "--run-dir", run)
    job = _job(run)
    _until(lambda: (r := _records(run)) and r[-1]["step"] >= every + every // 2, f"step {every + every // 2}")
    at_signal = _records(run)[-1]["step"]
    t_signal = time.time()
    # Wants every CPU of both nodes: Slurm preempts the phase job (PreemptMode=REQUEUE, GraceTime 15 s).
    urgent = _out("sbatch", "--parsable", "-p", "urgent", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1")
    _until(lambda: _out("squeue", "-h", "-j", job, "-o", "%T") == "PENDING", "the phase job to be requeued",
           poll=0.1)
    t_requeued = time.time()
    _until(lambda: not _out("squeue", "-h", "-j", urgent, "-o", "%i"), "the urgent job", poll=0.5)
    t_resume = time.time()
    _cz("resume", run)  # releases the requeued job (Slurm holds it ~120 s)
    n_before = len(_records(run))
    _until(lambda: len(_records(run)) > n_before, "the first step after the restart", timeout=600)
    t_first_again = time.time()
    _out("scancel", job)
    _until(_queue_empty, "the job to end", poll=0.5)
    attempts = _manifest(run)["phases"]["unsupervised"]["attempts"]
    first, second = attempts[0], attempts[1]
    records = _records(run)
    done_before = max(r["step"] for r in records if r["attempt"] == first["id"])
    step_s = statistics.median(r["seconds_per_step"] for r in records if r["seconds_per_step"])
    lost_steps = max(0, done_before - second["step_start"])
    return {
        "job": job, "checkpoint_every_steps": every, "seconds_per_step": step_s,
        "checkpoint_interval_s": every * step_s, "step_at_preemptor_submit": at_signal,
        "stopped_at_step": first["step_end"],
        "first_exit": first["exit_state"], "resumed_from_step": second["step_start"], "lost_steps": lost_steps,
        # finished steps recomputed, plus at most the step that was running when the signal came
        "lost_s_at_most": (lost_steps + 1) * step_s,
        "lost_steps_with_periodic_checkpoints_only": at_signal - (at_signal // every) * every,
        "signal_to_requeued_s": t_requeued - t_signal,
        "restart_to_first_step_s": t_first_again - t_resume,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--repeat", type=int, default=3, help="launch-to-first-step runs (default 3)")
    p.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    args = p.parse_args(argv)

    from colbertzero.data.prepare import prepare_recipe
    sys.path.insert(0, str(ROOT / "tools"))
    import local_slurm  # tools/local_slurm.py: the local test cluster, not part of the package

    from colbertzero.models import resolve_model_ref
    from colbertzero.recipe import load_recipe

    work = Path(args.keep or tempfile.mkdtemp(prefix="colbertzero-bench-launch-", dir="/tmp")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        with local_slurm.shared_cluster() as env:
            os.environ.update(env)
            if not _queue_empty():
                raise RuntimeError("the local cluster has jobs queued; the benchmark needs it to itself")
            say("preparing the tiny shards and model (not measured)")
            resolve_model_ref("builtin:tiny-modernbert")
            prepare_recipe(load_recipe(_recipe(work, "bench-prepare", shards)), workers=1, progress=False)
            firsts = []
            for i in range(args.repeat):
                say(f"launch to first step, run {i + 1}/{args.repeat}")
                firsts.append(launch_to_first_step(work, shards, i))
            say("preemption")
            pre = preemption(work, shards)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(r[k] for r in firsts)
           for k in ("submit_s", "queue_s", "startup_s", "first_step_compute_s", "overhead_s")}
    result = {"launch_to_first_step": {"runs": firsts, "median": med, "goal_s": GOAL_OVERHEAD_S,
                                       "meets_goal": med["overhead_s"] <= GOAL_OVERHEAD_S},
              "preemption": {**pre, "meets_goal": pre["lost_s_at_most"] <= pre["checkpoint_interval_s"]},
              "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"launch to first step (median of {len(firsts)}; 2 nodes x 1 task, tiny ModernBERT):")
    print(f"  overhead {med['overhead_s']:.1f} s (goal <= {GOAL_OVERHEAD_S:.0f} s): submit {med['submit_s']:.1f} s, "
          f"queue {med['queue_s']:.1f} s, start-up {med['startup_s']:.1f} s; first step's compute "
          f"{med['first_step_compute_s']:.2f} s (excluded)")
    print("  runs: " + ", ".join(f"{r['overhead_s']:.1f} s" for r in firsts))
    print("preemption by Slurm (urgent partition), checkpoint every "
          f"{pre['checkpoint_every_steps']} steps = {pre['checkpoint_interval_s']:.1f} s:")
    print(f"  urgent job submitted at step {pre['step_at_preemptor_submit']}, stopped and saved at step "
          f"{pre['stopped_at_step']}"
          f" ({pre['first_exit']}), resumed from step {pre['resumed_from_step']}")
    print(f"  lost: {pre['lost_steps']} finished step(s) + at most the step in progress = "
          f"<= {pre['lost_s_at_most']:.2f} s (goal <= {pre['checkpoint_interval_s']:.1f} s); periodic checkpoints "
          f"alone would have lost {pre['lost_steps_with_periodic_checkpoints_only']} steps")
    print(f"  signal -> requeued {pre['signal_to_requeued_s']:.1f} s; restart -> first step "
          f"{pre['restart_to_first_step_s']:.1f} s")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
