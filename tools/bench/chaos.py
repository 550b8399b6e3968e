"""Chaos trials: kill -9 a phase at random points, resume, and compare with an uninterrupted run bit for bit.

    python tools/bench/chaos.py [--trials N] [--stages 1,2,3] [--seed S] [--json] [--out DIR] [--no-disk-full]

The unsupervised phase of recipes/tiny-cpu.yaml (GradCache, 2 gloo ranks under torchrun, the tiny ModernBERT, a
checkpoint every 2 steps; the test data holds 8) for each ZeRO stage: one uninterrupted reference run, then per trial
a run that is SIGKILLed — all ranks and torchrun's agent, or one rank — at a point drawn at random:

- ``mid-step``: at a random moment after a random logged step;
- ``mid-checkpoint``: while a checkpoint is being written (its temporary folder exists);
- ``mid-manifest``: while the manifest is being replaced (its temp file, `files.writes_in_progress`, exists; the run
  dir is polled without pause; else two steps later, between writes).

Each trial is classified by what the kill left behind: inside a manifest write (its temp file), inside a checkpoint
write (its temp folder), between writes, or "finished first" (the phase ended before its kill point: not a kill, not
counted). It is then resumed (torchrun again) until it finishes. A killed trial is identical when every loss any
attempt logged and the exported weights equal the reference's exactly. Counted: manifests unreadable after a kill
(corrupt), complete checkpoints that could not be resumed from (lost). Then a full disk: the run dir on a tmpfs with
room for one checkpoint; the second save must fail the phase with the reason, and the first checkpoint must still
resume.
Last, manifest writes caught in the act (a phase's writes are too short for a random kill to land in one): a process
replaces the manifest in a loop (`Manifest.update_phase`, printing each counter once it returns) and is SIGKILLed
`--manifest-kills` times at random moments; after each kill the manifest must read and hold the last acknowledged
counter or the one after it (the kill fell between replace and print). Counted: kills inside a write (its temp file
left behind), torn manifests, acknowledged writes lost.
Goal: every killed trial identical, 0 lost, 0 corrupt.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "bench"))
from quality import stdout_to_stderr  # noqa: E402  (the one fd-level redirect of the benchmarks)

from colbertzero.files import temps_in, writes_in_progress  # noqa: E402
from colbertzero.layout import RunLayout  # noqa: E402

TINY = ROOT / "recipes" / "tiny-cpu.yaml"
PHASE = "unsupervised"
STEPS, SAVE_EVERY = 12, 2
MODES = ("mid-step", "mid-checkpoint", "mid-manifest")
LANDED = ("inside a manifest write", "inside a checkpoint write", "between writes", "finished first")
TIMEOUT = 600


def _overrides(shards: Path, stage: int) -> list[str]:
    return [f"phases.{PHASE}.init=builtin:tiny-modernbert", f"phases.{PHASE}.data.shards_dir={shards}",
            f"phases.{PHASE}.eval.beir=[]", f"phases.{PHASE}.max_steps={STEPS}",
            f"phases.{PHASE}.cadence.save_every={SAVE_EVERY}", f"phases.{PHASE}.cadence.keep_last=2",
            f"phases.{PHASE}.deepspeed.zero_stage={stage}"]


def _env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _start(run: Path, tag: str, logs: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "colbertzero", "train", str(run), "--phase", PHASE]
    with open((logs or run) / f"{tag}.log", "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _ranks(job: subprocess.Popen, n: int = 2) -> list[int]:
    """The pids of the phase's ranks under torchrun's agent, once all ``n`` have started (looked up before any kill
    point, so that a kill lands within microseconds of the moment it aims at)."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and job.poll() is None:
        found = []
        for p in psutil.Process(job.pid).children():  # the agent's own children: a rank's helpers are not ranks
            try:
                if {"colbertzero", "train"} <= set(p.cmdline()):
                    found.append(p.pid)
            except psutil.Error:
                continue
        if len(found) >= n:
            return found
        time.sleep(0.05)
    return []


def _kill(job: subprocess.Popen, ranks: list[int], one_rank: bool, rng: random.Random) -> str:
    """SIGKILL as a node failure would: the ranks first (the agent cannot react), then the agent; or one rank."""
    if one_rank and ranks:
        os.kill(rng.choice(ranks), signal.SIGKILL)
        try:  # the survivors find their peer gone at the next collective; the agent then stops the job
            job.wait(timeout=120)
        except subprocess.TimeoutExpired:
            return _kill(job, ranks, False, rng)
        return "one rank"
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.kill()
    psutil.wait_procs([p for p in map(_process, ranks) if p], timeout=60)
    job.wait()
    return "all ranks"


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _left_behind(run: Path) -> str:
    """What the kill interrupted, from what it left: a manifest write (its temp file), a checkpoint (its temp
    folder), or neither."""
    layout = RunLayout.of(run)
    if writes_in_progress(layout.manifest):
        return "inside a manifest write"
    if temps_in(layout.phase(PHASE).checkpoints):
        return "inside a checkpoint write"
    return "between writes"


def _records(run: Path) -> list[dict]:
    path = RunLayout.of(run).phase(PHASE).train_log
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    from colbertzero.manifest import Manifest

    export = Path(run) / Manifest(run).phase(PHASE)["export"]["path"]
    return {f"{f.parent.name}/{k}": v for f in sorted(export.rglob("*.safetensors")) for k, v in load_file(f).items()}


def _until_done(run: Path, first_tag: int = 1) -> int:
    """Resume with torchrun until the phase exits 0 (a kill leaves a checkpoint to resume from); attempts used."""
    for k in range(first_tag, first_tag + 5):
        job = _start(run, f"attempt{k}")
        if job.wait(timeout=TIMEOUT) == 0:
            return k
    raise RuntimeError(f"{run}: the phase did not finish in 5 attempts; see its attempt*.log")


def _new_run(out: Path, name: str, shards: Path, stage: int) -> Path:
    from colbertzero.manifest import Manifest
    from colbertzero.recipe import load_recipe

    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    Manifest.create(run, load_recipe(TINY, _overrides(shards, stage)))
    return run


def _wait_point(run: Path, job: subprocess.Popen, mode: str, rng: random.Random, steps: int) -> str:
    """Poll until the kill point of ``mode`` (or the job's end); what was seen. ``steps``: the phase's steps (the
    data may hold fewer than STEPS). A manifest write lasts about a millisecond: the manifest's folder is polled
    without pause, the log only every 20 ms."""
    layout = RunLayout.of(run)
    ckpts, manifest = layout.phase(PHASE).checkpoints, layout.manifest
    target = rng.randrange(1, steps - 2)
    deadline = time.time() + TIMEOUT
    step, next_read = 0, 0.0
    while time.time() < deadline and job.poll() is None:
        if time.monotonic() >= next_read:
            recs = _records(run)
            step = recs[-1]["step"] if recs else 0
            next_read = time.monotonic() + 0.02
        if mode == "mid-step" and step >= target:
            time.sleep(rng.uniform(0.0, 0.5))
            return f"after step {step}"
        if mode == "mid-checkpoint" and temps_in(ckpts):
            return f"checkpoint being written after step {step}"
        if mode == "mid-manifest" and step >= target and writes_in_progress(manifest):
            return f"manifest being replaced after step {step}"
        if mode == "mid-manifest" and step >= target + 2:  # never caught in the act: kill between writes
            return f"after step {step} (manifest write not caught)"
        if mode != "mid-manifest":
            time.sleep(0.001)
    return "job ended first"


def trial(out: Path, shards: Path, stage: int, ref: dict, rng: random.Random, k: int,
          modes: tuple[str, ...] = MODES) -> dict:
    from colbertzero.manifest import Manifest, ManifestError
    from colbertzero.train.checkpoint import find_latest_checkpoint

    run = _new_run(out, f"zero{stage}-trial{k}", shards, stage)
    mode, one = rng.choice(modes), rng.random() < 0.3
    job = _start(run, "attempt0")
    ranks = _ranks(job)
    seen = _wait_point(run, job, mode, rng, len(ref["losses"]))
    if job.poll() is None:
        killed = _kill(job, ranks, one, rng)
        landed = _left_behind(run)
    else:
        killed, landed = "not killed", "finished first"
    corrupt = 0
    try:
        Manifest(run).read()
    except (ManifestError, ValueError, OSError):
        corrupt = 1
    listed = [c["step"] for c in Manifest(run).phase(PHASE)["checkpoints"]] if not corrupt else []
    latest = find_latest_checkpoint(Manifest(run), PHASE) if not corrupt else None
    # a checkpoint the manifest lists as complete but that cannot be resumed from is lost
    lost = int(bool(listed) and (latest is None or latest["step"] != max(listed)))
    attempts = _until_done(run)
    losses = {r["step"]: r["loss"] for r in _records(run)}  # the newest attempt's value of every step
    every = [(r["step"], r["loss"]) for r in _records(run)]
    same_losses = all(ref["losses"][s] == v for s, v in every) and set(losses) == set(ref["losses"])
    w = _weights(run)
    same_weights = set(w) == set(ref["weights"]) and all((w[n] == ref["weights"][n]).all() for n in w)
    return {"stage": stage, "mode": mode, "kill": killed, "at": seen, "landed": landed, "attempts": attempts + 1,
            "identical": bool(same_losses and same_weights), "lost": lost, "corrupt": corrupt}


def disk_full(out: Path, shards: Path) -> dict:
    """The run dir on a tmpfs with room for about one checkpoint: the phase fails on the save that does not fit,
    naming the cause, and the checkpoint before it still resumes."""
    from colbertzero.manifest import Manifest
    from colbertzero.train.checkpoint import find_latest_checkpoint

    probe = _new_run(out, "disk-probe", shards, 2)
    if _start(probe, "attempt0").wait(timeout=TIMEOUT) != 0:
        raise RuntimeError(f"{probe}: the probe run failed")
    ck = RunLayout.of(probe).phase(PHASE).checkpoints
    one = max(sum(f.stat().st_size for f in c.rglob("*") if f.is_file()) for c in ck.iterdir() if c.is_dir())
    rest = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file() and ck not in f.parents)
    mnt = out / "tmpfs"
    mnt.mkdir(exist_ok=True)
    size = rest + int(one * 1.5) + (4 << 20)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return {"skipped": f"cannot mount a tmpfs here: {r.stderr.strip()}"}
    try:
        run = _new_run(mnt, "run", shards, 2)
        code = _start(run, "disk-full", logs=out).wait(timeout=TIMEOUT)  # the log off the full disk
        ph = Manifest(run).phase(PHASE)
        reason = (ph.get("failure") or {}).get("reason", "")
        latest = find_latest_checkpoint(Manifest(run), PHASE)
        log = (out / "disk-full.log").read_text(errors="replace")
        errors = [ln for ln in log.splitlines() if "Error" in ln or "error" in ln][-5:]
        return {"tmpfs_bytes": size, "checkpoint_bytes": one, "exit": code, "state": ph["state"], "log": errors,
                "reason": reason[:300], "says_no_space": "space left" in reason.lower() or "ENOSPC" in reason,
                "checkpoint_usable_step": latest["step"] if latest else None}
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


_WRITER = """
import sys
from colbertzero.manifest import Manifest
m, i = Manifest(sys.argv[1]), 0
start = m.read()["phases"][sys.argv[2]].get("chaos_counter", 0)
while True:
    i += 1
    m.update_phase(sys.argv[2], lambda p: p.update(chaos_counter=start + i))
    print(start + i, flush=True)
"""


def manifest_kills(out: Path, shards: Path, kills: int, rng: random.Random) -> dict:
    """SIGKILL a process that does nothing but replace the manifest, ``kills`` times; what each kill left."""
    from colbertzero.manifest import Manifest, ManifestError

    run = _new_run(out, "manifest-kills", shards, 1)
    caught = torn = lost = 0
    for _ in range(kills):
        job = subprocess.Popen([sys.executable, "-c", _WRITER, str(run), PHASE], cwd=ROOT, env=_env(),
                               stdout=subprocess.PIPE, text=True)
        first = job.stdout.readline()  # started writing
        time.sleep(rng.uniform(0.0, 0.3))
        job.kill()
        rest = job.communicate()[0]
        acked = [int(x) for x in (first + rest).split()]
        if not acked:
            raise SystemExit(f"chaos: the manifest writer on {run} never wrote (exit {job.returncode}); see above")
        left = writes_in_progress(run / "manifest.json")
        caught += bool(left)
        for p in left:  # what a kill leaves is never read; the next writer's temp file has another name
            p.unlink()
        try:
            counter = Manifest(run).read()["phases"][PHASE].get("chaos_counter", 0)
        except (ManifestError, ValueError):
            torn += 1
            continue
        lost += not (acked[-1] <= counter <= acked[-1] + 1)
    return {"kills": kills, "inside_a_write": caught, "torn": torn, "acknowledged_lost": lost}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10, help="trials per ZeRO stage")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--seed", type=int, default=None, help="the random kill points (default: a fresh seed, printed)")
    ap.add_argument("--out", default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--modes", default=",".join(MODES), help="kill points drawn from")
    ap.add_argument("--no-disk-full", action="store_true")
    ap.add_argument("--manifest-kills", type=int, default=100, help="kills of a process replacing the manifest")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    stages = [int(s) for s in a.stages.split(",")]
    modes = tuple(m for m in a.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes {a.modes}: a comma list of {', '.join(MODES)}")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="cz-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    with stdout_to_stderr(a.json):  # with --json, stdout carries the JSON object only
        summary = run(a, stages, modes, seed, rng, out)
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"chaos (seed {seed}): {summary['trials']} trials, {summary['killed']} killed "
              f"({summary['finished_first']} finished before their kill point), {summary['identical']} identical "
              f"resumes, {summary['checkpoints_lost']} checkpoints lost, {summary['manifest_corruptions']} manifest "
              f"corruptions; kills landed {summary['landed']}; per stage {summary['per_stage']}; modes "
              f"{summary['modes']}")
        if summary["disk_full"]:
            print(f"disk full: {summary['disk_full']}")
        print(f"manifest kills: {summary['manifest_kills']}")
    return 0 if passed(summary) else 1


def passed(summary: dict) -> bool:
    """The goal: at least one real kill, every killed trial identical, nothing lost or corrupt or torn, and a full
    disk refused with the checkpoint before it still usable."""
    full, kills = summary["disk_full"], summary["manifest_kills"]
    disk_ok = not full or full.get("skipped") or (full["state"] == "failed" and full["says_no_space"]
                                                  and full["checkpoint_usable_step"])
    return bool(summary["identical"] == summary["killed"] > 0 and not summary["checkpoints_lost"]
                and not summary["manifest_corruptions"] and not kills.get("torn")
                and not kills.get("acknowledged_lost") and disk_ok)


def run(a, stages: list[int], modes: tuple[str, ...], seed: int, rng: random.Random, out: Path) -> dict:
    from colbertzero.data import prepare_recipe
    from colbertzero.recipe import load_recipe

    t0 = time.time()
    shards = out / "shards"
    prepare_recipe(load_recipe(TINY, _overrides(shards, 2)), phases=[PHASE], progress=False)
    results, refs = [], {}
    try:
        for stage in stages:
            ref = _new_run(out, f"zero{stage}-reference", shards, stage)
            if _start(ref, "attempt0").wait(timeout=TIMEOUT) != 0:
                raise SystemExit(f"chaos: the reference run of ZeRO-{stage} failed; see {ref}/attempt0.log")
            refs[stage] = {"losses": {r["step"]: r["loss"] for r in _records(ref)}, "weights": _weights(ref)}
            for k in range(a.trials):
                res = trial(out, shards, stage, refs[stage], rng, k, modes)
                results.append(res)
                print(f"[chaos] ZeRO-{stage} trial {k}: {res['mode']}, killed {res['kill']} ({res['at']}; "
                      f"{res['landed']}), {res['attempts']} attempts, "
                      f"{'identical' if res['identical'] else 'DIFFERENT'}",
                      file=sys.stderr, flush=True)
        full = None if a.no_disk_full else disk_full(out, shards)
        storm = manifest_kills(out, shards, a.manifest_kills, rng) if a.manifest_kills else {}
    finally:
        if not a.out:
            shutil.rmtree(out, ignore_errors=True)
    return summarize(results, stages, seed, t0, full, storm)


def summarize(results: list[dict], stages: list[int], seed: int, t0: float, full: dict | None, storm: dict) -> dict:
    killed = [r for r in results if r["landed"] != "finished first"]  # a trial that finished first proves nothing
    return {
        "seed": seed, "stages": stages, "trials": len(results), "killed": len(killed),
        "finished_first": len(results) - len(killed),
        "identical": sum(r["identical"] for r in killed),
        "checkpoints_lost": sum(r.get("lost", 0) for r in results),
        "manifest_corruptions": sum(r.get("corrupt", 0) for r in results),
        "landed": {w: sum(r["landed"] == w for r in results) for w in LANDED},
        "per_stage": {s: {"killed": sum(r["stage"] == s for r in killed),
                          "identical": sum(r["identical"] for r in killed if r["stage"] == s)} for s in stages},
        "modes": {m: sum(r.get("mode") == m for r in results) for m in MODES},
        "disk_full": full, "manifest_kills": storm, "results": results, "wall_s": round(time.time() - t0, 1),
    }


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
