"""`colbertzero launch / resume / sbatch` on the real two-node Slurm cluster of tools/local-slurm (no mocks).

The Slurm scenarios are submitted at the start (module fixture `runs`) and each is driven by its own thread, so their
jobs overlap on the two nodes; the tests then wait for their scenario and check what happened:

  chain      `launch` of the three-phase tiny recipe with no shards yet: prepare array + index job, then the three
             phases, each on 2 nodes x 1 task (gloo), chained with afterok
  interrupt  one phase, 2 nodes: a 2-minute time limit with the warning 100 s before it stops it at a checkpoint and
             it requeues itself; its second attempt is then preempted (USR2, what Slurm sends a preempted job) and
             requeues again; `resume` releases the held job; the third attempt finishes. Its export must equal the
             chain's first phase (the same training) bit for bit.
  budget     one phase, 1 task: a budget the phase crosses stops it at a checkpoint (over-budget); `resume` refuses,
             then continues with the budget raised; a `scancel` mid-phase is not requeued, and two concurrent
             `resume` submit once, from the newest checkpoint
  byhand     the `colbertzero sbatch` scripts submitted by hand with --dependency=afterok
  evaljob    one phase evaluating at step 4 in an evaluation job of its own (1 CPU of each node left for it): the
             result lands in the manifest and `status`, and no job of the run is left in the queue at the end
  hang       one phase, 2 nodes, launched through submitit; its rank 0 is frozen (SIGSTOP) mid-phase: rank 1's
             watchdog records the hang and requeues the job, which runs again from the newest checkpoint
  hang-byhand  the same under the plain sbatch scripts (srun reports the killed step's code; `after-phase` reads the
             hang from the ledger)

Slurm checks time limits every 30 s, so the warning comes 20 to 50 s into the job: late enough that every task has
started Python and holds its handlers (a signal before that kills the task, as it would any program), early enough
that the interrupted phase (480 steps, about a minute of training) is still running.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "recipes" / "tiny-cpu-slurm.yaml"
WAIT_S = 600  # for one scenario; the jobs of all of them share two nodes (and two cores in CI)
NO_EVAL = {"eval": {"beir": []}}
# The first phase of the chain and the interrupted one train exactly this: 480 steps, a checkpoint every 20.
UNSUPERVISED = {"data": {"epochs": 120}, "cadence": {"save_every": 20, "keep_last": 2}, **NO_EVAL}
MSMARCO = ROOT.parent / "shared" / "data" / "beir" / "msmarco-5k"
NO_SLURM = ROOT / "tests" / "no_slurm_task.sh"


# ----------------------------------------------------------------------------------------------------- helpers
def cz(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "colbertzero", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def run_cmd(*args: str, check: bool = True) -> str:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {res.stderr}")
    return res.stdout.strip()


def write_recipe(folder: Path, name: str, shards: Path, phases: dict, **top) -> Path:
    """A recipe extending tiny-cpu-slurm.yaml; `phases` maps each base phase to overrides (None drops it); ``top``:
    run-wide fields (cluster)."""
    doc: dict = {"extends": str(BASE), "name": name, **top, "phases": {}}
    for phase in ("unsupervised", "supervised", "distillation"):
        over = phases.get(phase, NO_EVAL)
        # One CPU a rank: two 2-node jobs share the cluster, so one scenario's waits (Slurm's 30-second signal
        # checks, start-up) overlap another's steps.
        doc["phases"][phase] = None if over is None else {
            **over, "data": {**over.get("data", {}), "shards_dir": str(shards / phase)},
            "resources": {"cpus_per_task": 1, **over.get("resources", {})}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def record(run: Path, phase: str = "unsupervised") -> dict:
    return manifest(run)["phases"][phase]


def job_of(run: Path, step: str = "unsupervised") -> str:
    return manifest(run)["submissions"][-1]["jobs"][step]


def logged_step(run: Path, phase: str = "unsupervised") -> int:
    log = run / "phases" / phase / "logs" / "train.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def queued(job: str) -> tuple[str, str] | None:
    """(state, reason) while the job is queued or running, None once it has left."""
    out = run_cmd("squeue", "-h", "-j", job, "-o", "%T|%r", check=False)
    return tuple(out.split("|", 1)) if out and out.split("|")[0] not in ENDED else None


def _sacct_lines(job: str, fields: str) -> list[tuple[str, str]]:
    out = run_cmd("sacct", "-D", "-X", "-P", "-n", "-j", job, "-o", f"JobID,{fields}")
    return [tuple(line.split("|", 1)) for line in out.splitlines()]


def sacct_runs(job: str, fields: str = "State", timeout: float = 60) -> list[str]:
    """One line per run of the job (a requeued job has one per start), main job lines only, once accounting has
    caught up: slurmctld sends records to slurmdbd asynchronously, so sacct can still say PENDING or RUNNING after
    the job has left the queue. Waits (never on a job still queued) until the last run's state is a final one."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [rest for jid, rest in _sacct_lines(job, fields) if jid == job]
        final = bool(runs) and runs[-1].split("|")[0].split(" ")[0] in ENDED
        if final or queued(job) is not None or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def sacct_tasks(job: str, timeout: float = 60) -> list[str]:
    """'JOBID|STATE' per line of the job (one per task of an array job: 'JOBID_TASK|STATE'), once every line's
    state is final (see sacct_runs)."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = [f"{jid}|{state}" for jid, state in _sacct_lines(job, "State")]
        if (tasks and all(t.split("|")[1].split(" ")[0] in ENDED for t in tasks)) or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def wait(cond, what: str, timeout: float = WAIT_S, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def until_ended(run: Path, timeout: float = WAIT_S) -> None:
    jobs = list(manifest(run)["submissions"][-1]["jobs"].values())
    wait(lambda: not any(queued(j) for j in jobs), f"the jobs {jobs} of {run.name} to end", timeout, poll=1)


def weights(run: Path, phase: str = "unsupervised") -> dict:
    from safetensors.torch import load_file

    export = run / "phases" / phase / "export"
    files = sorted(export.rglob("*.safetensors"))
    assert files, f"no exported weights in {export}"
    return {(str(f.relative_to(export)), k): v for f in files for k, v in load_file(f).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not (wa[k].dtype == wb[k].dtype and bool((wa[k] == wb[k]).all()))]
    assert not differ, f"{len(differ)} tensors differ between {a.name} and {b.name}, e.g. {differ[:3]}"


def logs(run: Path) -> str:
    """Tails of the job logs, for assertion messages."""
    return "\n".join(f"--- {p.relative_to(run)}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                     for p in sorted((run / "slurm").rglob("*.err")) + sorted((run / "slurm").glob("*.out")))


class Scenario(threading.Thread):
    """Drives one run from the test process while the others proceed; `outcome()` re-raises what went wrong."""

    def __init__(self, name: str, fn, run: Path):
        super().__init__(name=name, daemon=True)
        self.fn, self.run_dir, self.result, self.error = fn, run, None, None

    def run(self) -> None:
        try:
            self.result = self.fn(self.run_dir)
        except BaseException:  # noqa: BLE001 - reported by outcome() in the test
            self.error = traceback.format_exc()

    def outcome(self) -> dict:
        self.join(WAIT_S)
        assert not self.is_alive(), f"scenario {self.name} still running"
        assert self.error is None, f"scenario {self.name} failed:\n{self.error}\n{logs(self.run_dir)}"
        return self.result


# ---------------------------------------------------------------------------------------------------- scenarios
def _launch(recipe: Path, run: Path, *extra: str) -> None:
    res = cz("launch", recipe, "--run-dir", run, *extra)
    assert res.returncode == 0, res.stdout + res.stderr


def drive_chain(run: Path) -> dict:
    until_ended(run)
    return manifest(run)


def held_or_gone(job: str) -> bool:
    """Requeued (Slurm holds a requeued job ~120 s: BeginTime), or no longer queued at all."""
    return queued(job) == ("PENDING", "BeginTime") or not queued(job)


def drive_interrupt(recipe: Path):
    def go(run: Path) -> dict:
        _launch(recipe, run)
        job = job_of(run)
        # Time limit: the warning comes at the first of Slurm's 30-second checks 20 s into the job; every rank
        # stops at the same step and checkpoints, rank 0 requeues.
        wait(lambda: held_or_gone(job), "the time-limit requeue")
        out = {"job": job, "after_time_limit": record(run)}
        if not queued(job):
            return out
        # The later attempts get more time (with a 1-minute limit they would be cut again), and start now.
        run_cmd("scontrol", "update", f"JobId={job}", "TimeLimit=10", "StartTime=now")
        wait(lambda: queued(job) == ("RUNNING", "None"), "the second attempt to start")
        first_stop = out["after_time_limit"]["step"]
        # Preemption: Slurm sends the victim its --signal first (preempt_send_user_signal), as submitit's
        # job._interrupt() does.
        out["at_signal"] = wait(lambda: (s := logged_step(run)) >= first_stop + 10 and s, "10 more steps")
        run_cmd("scancel", "--signal=USR2", job)
        wait(lambda: held_or_gone(job), "the preemption requeue")
        out["resume"] = cz("resume", run)  # releases the job Slurm holds after a requeue
        until_ended(run)
        return out
    return go


def drive_budget(recipe: Path):
    def go(run: Path) -> dict:
        _launch(recipe, run)
        until_ended(run)
        out = {"stopped": record(run), "refused": cz("resume", run)}
        out["submissions_after_refusal"] = len(manifest(run)["submissions"])
        out["raised"] = cz("resume", run, "--phase-budget", "unsupervised=1")
        job = job_of(run)
        start = out["stopped"]["step"]
        wait(lambda: logged_step(run) >= start + 10, "10 steps before scancel")
        run_cmd("scancel", job)
        wait(lambda: not queued(job), "the cancelled job to leave the queue")
        out["cancelled_job"] = job
        out["newest"] = max(c["step"] for c in record(run)["checkpoints"])
        both = [subprocess.Popen([sys.executable, "-m", "colbertzero", "resume", str(run)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, cwd=ROOT) for _ in range(2)]
        out["resumes"] = [(p.wait(timeout=180), p.stdout.read()) for p in both]
        until_ended(run)
        return out
    return go


def drive_byhand(recipe: Path):
    def go(run: Path) -> dict:
        res = cz("sbatch", recipe, "--run-dir", run)
        assert res.returncode == 0, res.stderr
        folder = run / "sbatch"
        jobs: dict[str, str] = {}
        prev = None
        for step in ("prepare", "prepare-index", "unsupervised", "supervised"):
            dep = [f"--dependency=afterok:{prev}"] if prev else []
            # as from a login shell: without the OMP_NUM_THREADS=1 these tests run under (the thread count is checked)
            prev = jobs[step] = run_cmd("sbatch", "--parsable", "--export=ALL,OMP_NUM_THREADS=", *dep,
                                        str(folder / f"{step}.sbatch")).split(";")[0]
        wait(lambda: not any(queued(j) for j in jobs.values()), "the hand-submitted chain to end", poll=1)
        return {"jobs": jobs, "scripts": res.stdout.split()}
    return go


def freeze_rank0(job: str) -> psutil.Process:
    """SIGSTOP the job's task with SLURM_PROCID 0 (a stuck process, as a lost node or a driver hang looks)."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == "0" and "python" in (p.info["cmdline"] or
                                                                                              [""])[0]:
            p.suspend()
            return p
    raise AssertionError(f"no rank 0 process of job {job} found")


def drive_hang(recipe: Path, by_hand: bool):
    def go(run: Path) -> dict:
        if by_hand:
            res = cz("sbatch", recipe, "--run-dir", run)
            assert res.returncode == 0, res.stderr
            job = run_cmd("sbatch", "--parsable", str(run / "sbatch" / "unsupervised.sbatch")).split(";")[0]
        else:
            _launch(recipe, run)
            job = job_of(run)
        out = {"job": job, "frozen_at": wait(lambda: (s := logged_step(run)) >= 12 and s, "12 steps")}
        freeze_rank0(job)
        wait(lambda: held_or_gone(job), "the requeue after the hang")
        out["after_hang"] = record(run)
        out["resume"] = cz("resume", run)  # releases the job Slurm holds after a requeue
        wait(lambda: not queued(job), "the requeued job to end", poll=1)
        return out
    return go


def drive_evaljob(recipe: Path):
    def go(run: Path) -> dict:
        _launch(recipe, run)
        until_ended(run)
        return {"status": json.loads(cz("status", run, "--json").stdout),
                "left": run_cmd("squeue", "-h", "-o", "%j", "-n", "cz-eval-unsupervised-4")}
    return go


def drive_python(recipe: Path):
    """The Python API a login-node script or notebook uses: the same objects as the CLI."""
    def go(run: Path) -> dict:
        import colbertzero

        handle = colbertzero.launch(str(recipe), run_dir=str(run), executor="slurm")
        out = {"jobs": dict(handle.jobs), "returncode_at_submit": handle.returncode}
        out["wait"] = handle.wait(poll=1)
        out["status"], out["exports"], out["report"] = handle.status(), handle.exports, handle.report()
        out["resumed"] = colbertzero.resume(str(run))  # every phase is done: nothing to submit
        return out
    return go


@pytest.fixture(scope="module")
def runs(local_slurm, tmp_path_factory):
    """Launch the chain (it prepares the shards everyone uses), then every other scenario once the shards exist."""
    from colbertzero.models import resolve_model_ref

    resolve_model_ref("builtin:tiny-modernbert")  # made once here, not by the first jobs' ranks at the same time
    root = tmp_path_factory.mktemp("launch")
    shards = root / "shards"
    one = {"supervised": None, "distillation": None}
    # The training step in a "container" without Slurm's commands (tests/no_slurm_task.sh): a profile file, and
    # the same written inline in a recipe. The requeue decision has to happen on the host for these to requeue.
    profile = root / "no-slurm-in-task.yaml"
    profile.write_text(yaml.safe_dump({"description": "tasks in a wrapper that hides Slurm's commands", "container": {
        "runtime": "command", "command": [str(NO_SLURM), str(root / "in-container-interrupt.log")]}}))
    inline = {name: {"name": "no-slurm-in-task", "container": {
        "runtime": "command", "command": [str(NO_SLURM), str(root / f"in-container-{name}.log")]}}
        for name in ("byhand", "hang")}
    recipes = {
        "chain": write_recipe(root, "lt-chain", shards, {"unsupervised": UNSUPERVISED}),
        # Two cores a rank: the time-limit warning comes 20-50 s into the job, and a rank that has not started
        # Python's handlers by then dies of it; bound to one core (n1's and n2's core 0 are the same physical core
        # here) and with a cold file cache, start-up took longer than that in CI.
        "interrupt": write_recipe(root, "lt-interrupt", shards, {**one, "unsupervised": {
            **UNSUPERVISED, "resources": {"time_limit": "00:02:00", "signal_seconds": 100, "cpus_per_task": 2}}},
            cluster=str(profile)),
        # The paper-based projection (reference.gpu_hours) says the phase fits; the job's start-up alone crosses it.
        "budget": write_recipe(root, "lt-budget", shards, {**one, "unsupervised": {
            **NO_EVAL, "data": {"epochs": 15}, "cadence": {"save_every": 10}, "budget_gpu_hours": 0.002,
            "reference": {"gpu_hours": 0.001}, "resources": {"nodes": 1, "cpu_tasks_per_node": 1}}}),
        # two cores a rank: with task/affinity, srun gives them only where SRUN_CPUS_PER_TASK carries the count
        "byhand": write_recipe(root, "lt-byhand", shards, {"unsupervised": {**NO_EVAL, "max_steps": 2,
                                                                           "resources": {"cpus_per_task": 2}},
                                                           "supervised": {**NO_EVAL, "max_steps": 2},
                                                           "distillation": None}, cluster=inline["byhand"]),
        "python": write_recipe(root, "lt-python", shards, {**one, "unsupervised": {
            **NO_EVAL, "max_steps": 2, "resources": {"cpus_per_task": 2}}}),
        "evaljob": write_recipe(root, "lt-evaljob", shards, {**one, "unsupervised": {
            **NO_EVAL, "max_steps": 8, "cadence": {"eval_every": 4},
            "eval": {"beir": [], "in_training": [str(MSMARCO)], "max_corpus": 300,
                     # short enough for backfill to start it beside the running phase, as on a busy cluster
                     "job": {"cpus_per_task": 1, "time_limit": "00:05:00"}},
            # two ranks on one node, a core each: srun binds them apart (task/affinity)
            "resources": {"nodes": 1, "cpu_tasks_per_node": 2, "cpus_per_task": 1}}}),
        **{name: write_recipe(root, f"lt-{name}", shards, {**one, "unsupervised": {
            **NO_EVAL, "data": {"epochs": 20}, "cadence": {"save_every": 10},
            "watchdog": {"min_seconds": 8, "step_factor": 5}}},
            **({"cluster": inline["hang"]} if name == "hang" else {})) for name in ("hang", "hang-byhand")},
    }
    dirs = {name: root / f"run-{name}" for name in recipes}
    _launch(recipes["chain"], dirs["chain"])
    index_job = job_of(dirs["chain"], "prepare-index")
    wait(lambda: (s := sacct_runs(index_job)) and s[-1] not in ("PENDING", "RUNNING") and s[-1], "the prepare jobs")
    assert sacct_runs(index_job) == ["COMPLETED"], logs(dirs["chain"])
    drivers = {"chain": drive_chain, "interrupt": drive_interrupt(recipes["interrupt"]),
               "budget": drive_budget(recipes["budget"]), "byhand": drive_byhand(recipes["byhand"]),
               "python": drive_python(recipes["python"]), "evaljob": drive_evaljob(recipes["evaljob"]),
               "hang": drive_hang(recipes["hang"], by_hand=False),
               "hang-byhand": drive_hang(recipes["hang-byhand"], by_hand=True)}
    scenarios = {name: Scenario(name, fn, dirs[name]) for name, fn in drivers.items()}
    for s in scenarios.values():
        s.start()
    yield {"scenarios": scenarios, "dirs": dirs, "root": root}
    for s in scenarios.values():
        s.join(1)
    # Whatever a failed (or deselected) scenario left queued must not run into the next tests: the run's jobs are
    # the ones whose name ends with its tag, however they were submitted.
    from colbertzero.launcher.sbatch import run_tag

    tags = {run_tag(run) for run in dirs.values()}
    leftover = [line.split()[0] for line in run_cmd("squeue", "-h", "-o", "%i %j").splitlines()
                if line.split()[-1].rsplit("-", 1)[-1] in tags]
    if leftover:
        run_cmd("scancel", *leftover, check=False)


# -------------------------------------------------------------------------------------------------------- tests
def test_chain_runs_three_phases_on_two_nodes(runs):
    run = runs["dirs"]["chain"]
    data = runs["scenarios"]["chain"].outcome()
    jobs = data["submissions"][0]["jobs"]
    assert list(jobs) == ["prepare", "prepare-index", "unsupervised", "supervised", "distillation"]
    # prepare ran as a 2-task array job (tiny-cpu-slurm: prepare.array_tasks=2)
    array = sacct_tasks(jobs["prepare"])
    assert sorted(array) == [f"{jobs['prepare']}_0|COMPLETED", f"{jobs['prepare']}_1|COMPLETED"]
    previous_export = None
    for phase in ("unsupervised", "supervised", "distillation"):
        p = data["phases"][phase]
        assert p["state"] == "done" and p["step"] == p["total_steps"] > 0, (phase, p, logs(run))
        [a] = p["attempts"]
        assert (a["job_id"], a["executor"], a["nodes"], a["tasks"], a["exit_state"]) == (
            jobs[phase], "slurm", 2, 2, "completed")
        assert a["elapsed_s"] > 0 and a["gpu_hours"] == pytest.approx(2 * a["elapsed_s"] / 3600)
        assert a["accelerator"]["host"] in ("n1", "n2") and a["accelerator"]["gpus"] == 0  # what rank 0 ran on
        # each rank bound by srun to the one core of its cpus_per_task
        placed = sorted((r["host"], len(r["cpus"])) for r in a["accelerator"]["ranks"])
        assert placed == [("n1", 1), ("n2", 1)], a["accelerator"]["ranks"]
        assert sacct_runs(jobs[phase], "State,NNodes,NodeList") == ["COMPLETED|2|n[1-2]"]
        lineage = p["lineage"]
        assert lineage["config_hash"] == data["recipe_hash"]
        assert all(lineage["data_index_sha256"]) and len(lineage["data_index"]) == len(
            data["recipe"]["phases"][phase]["data"]["sources"])
        if previous_export:  # the chain: each phase starts from the previous phase's export
            assert lineage["init"] == previous_export
        previous_export = str(run / p["export"]["path"])
    status = json.loads(cz("status", run, "--json").stdout)
    assert [(ph["state"], ph["gpu_hours"] > 0) for ph in status["phases"]] == [("done", True)] * 3


def test_time_limit_stops_at_checkpoint_and_requeues(runs):
    run = runs["dirs"]["interrupt"]
    out = runs["scenarios"]["interrupt"].outcome()
    job, first = out["job"], out["after_time_limit"]
    assert "resume" in out, f"the phase ended before Slurm's time-limit warning: {first['attempts']}"
    [a] = first["attempts"]
    assert (a["id"], a["exit_state"]) == (f"{job}-0", "requeue"), a
    assert first["state"] == "running" and 0 < first["step"] < first["total_steps"]
    assert first["checkpoints"][-1]["step"] == first["step"] == a["step_end"]  # stopped at a checkpoint
    second = record(run)["attempts"][1]
    assert (second["id"], second["step_start"]) == (f"{job}-1", a["step_end"])


def test_preemption_requeues_without_losing_steps(runs):
    run = runs["dirs"]["interrupt"]
    out = runs["scenarios"]["interrupt"].outcome()
    job = out["job"]
    p = record(run)
    assert p["state"] == "done", logs(run)
    assert [(a["id"], a["exit_state"]) for a in p["attempts"]] == [
        (f"{job}-0", "requeue"), (f"{job}-1", "requeue"), (f"{job}-2", "completed")]
    _, preempted, last = p["attempts"]
    # It stopped at the first step boundary after the signal, saved there, and the next attempt began there: no
    # finished step was lost, only the one in progress when the signal came.
    assert out["at_signal"] <= preempted["step_end"] <= out["at_signal"] + 2
    assert last["step_start"] == preempted["step_end"]
    assert "released job" in out["resume"].stdout, out["resume"].stdout + out["resume"].stderr
    # The ledger has every attempt Slurm ran, each with its GPU-hours.
    assert sacct_runs(job) == ["REQUEUED", "REQUEUED", "COMPLETED"]
    assert all(a["gpu_hours"] > 0 and a["elapsed_s"] > 0 for a in p["attempts"])
    # Every rank of the three runs trained inside the wrapper, where no Slurm command exists: the two requeues were
    # asked for from the batch script on the host.
    assert_ran_without_slurm(runs["root"] / "in-container-interrupt.log", {job}, runs=3, ranks=2)


def assert_ran_without_slurm(log: Path, jobs: set[str], runs: int, ranks: int, others: int = 0) -> None:
    """Every line of the wrapper's log (one per task it started) says scontrol was not there; ``jobs``' tasks are
    ``runs`` × ``ranks`` of them, ``others`` lines are other jobs' (a prepare array's tasks have ids of their own)."""
    lines = log.read_text().splitlines()
    assert all(line.endswith("scontrol=none") for line in lines), lines
    phase = [line for line in lines if line.split("job=")[1].split()[0] in jobs]
    assert len(phase) == runs * ranks and len(lines) - len(phase) == others, lines
    assert {line.split("job=")[1].split()[0] for line in phase} == jobs, lines


def test_interrupted_run_matches_uninterrupted_weights(runs):
    runs["scenarios"]["interrupt"].outcome()
    runs["scenarios"]["chain"].outcome()
    assert_same_weights(runs["dirs"]["interrupt"], runs["dirs"]["chain"])


def test_budget_stop_refuses_resume_until_raised(runs):
    run = runs["dirs"]["budget"]
    out = runs["scenarios"]["budget"].outcome()
    stopped = out["stopped"]
    assert stopped["state"] == "over-budget", logs(run)
    [a] = stopped["attempts"]
    assert a["exit_state"] == "over-budget" and 0 < stopped["step"] < stopped["total_steps"]
    assert stopped["checkpoints"][-1]["step"] == stopped["step"]  # stopped at a checkpoint
    assert sacct_runs(a["job_id"]) == ["FAILED"]  # a failed job: nothing after it would start
    refused = out["refused"]
    assert refused.returncode == 2 and "over its GPU-hour budget" in refused.stderr, refused.stderr
    assert "--phase-budget unsupervised=" in refused.stderr
    assert out["submissions_after_refusal"] == 1  # the refusal submitted nothing
    assert out["raised"].returncode == 0, out["raised"].stderr
    p = record(run)
    assert p["state"] == "done" and p["budget_gpu_hours"] == 1.0
    assert p["attempts"][1]["step_start"] == stopped["step"]


def test_resume_after_scancel_submits_once_from_newest_checkpoint(runs):
    run = runs["dirs"]["budget"]
    out = runs["scenarios"]["budget"].outcome()
    assert sacct_runs(out["cancelled_job"])[0].startswith("CANCELLED")  # a cancel stays a cancel, not a requeue
    codes = [code for code, _ in out["resumes"]]
    texts = [text for _, text in out["resumes"]]
    assert codes == [0, 0], texts
    assert sum("submitted:" in t for t in texts) == 1 and sum("already in flight" in t for t in texts) == 1, texts
    data = manifest(run)
    assert len(data["submissions"]) == 3  # launch, resume with the raised budget, one of the two resumes
    p = data["phases"]["unsupervised"]
    assert p["state"] == "done", logs(run)
    assert [a["exit_state"] for a in p["attempts"]] == ["over-budget", "cancelled", "completed"]
    cancelled, last = p["attempts"][1:]
    assert cancelled["job_id"] == out["cancelled_job"]  # its end state comes from Slurm's accounting
    assert last["step_start"] == out["newest"] == cancelled["step_end"] > 0
    assert last["job_id"] == data["submissions"][2]["jobs"]["unsupervised"]


def test_sbatch_scripts_submitted_by_hand_run_the_chain(runs):
    run = runs["dirs"]["byhand"]
    out = runs["scenarios"]["byhand"].outcome()
    for step, job in out["jobs"].items():
        states = [line.split("|")[1] for line in sacct_tasks(job)]  # the prepare step is an array job
        assert states and set(states) == {"COMPLETED"}, (step, states, logs(run))
    data = manifest(run)
    assert [data["phases"][p]["state"] for p in ("unsupervised", "supervised")] == ["done", "done"]
    export = run / data["phases"]["unsupervised"]["export"]["path"]
    assert data["phases"]["supervised"]["lineage"]["init"] == str(export)
    a = data["phases"]["unsupervised"]["attempts"][0]
    assert (a["job_id"], a["nodes"], a["tasks"]) == (out["jobs"]["unsupervised"], 2, 2)
    # the plain sbatch script's srun: each rank on the 2 cores of its cpus_per_task (1 without SRUN_CPUS_PER_TASK)
    assert sorted(len(r["cpus"]) for r in a["accelerator"]["ranks"]) == [2, 2], a["accelerator"]["ranks"]
    assert sorted(r["threads"] for r in a["accelerator"]["ranks"]) == [2, 2]  # torch's threads follow the cores
    # both phases' ranks in the wrapper without Slurm's commands (the profile's container, inline in the recipe),
    # and the prepare array's two tasks and its index job (one srun task each, in the same container)
    assert_ran_without_slurm(runs["root"] / "in-container-byhand.log",
                             {out["jobs"]["unsupervised"], out["jobs"]["supervised"]}, runs=1, ranks=4, others=3)


def test_an_evaluation_job_lands_its_result_in_status_and_leaves_nothing_in_the_queue(runs):
    run = runs["dirs"]["evaljob"]
    out = runs["scenarios"]["evaljob"].outcome()
    p = record(run)
    assert p["state"] == "done", logs(run)
    job = p["eval_jobs"]["4"]
    assert job["state"] == "done" and job["handle"].startswith("job:"), job
    assert [e["step"] for e in p["in_training_eval"]] == [4] and p["in_training_eval"][0]["where"] == "job"
    [helper] = out["status"]["helpers"]
    assert (helper["kind"], helper["phase"], helper["step"], helper["state"]) == ("eval", "unsupervised", 4, "done")
    assert out["left"] == ""  # the phase waited for it; nothing of the run is queued after the run
    # two ranks on one node with cpus_per_task=1: each on a core of its own
    [a] = p["attempts"]
    placed = sorted((r["host"], r["cpus"]) for r in a["accelerator"]["ranks"])
    assert len({h for h, _ in placed}) == 1 and [len(c) for _, c in placed] == [1, 1], placed
    assert placed[0][1] != placed[1][1], placed


def test_validate_refuses_a_helper_job_larger_than_the_nodes(local_slurm, tmp_path):
    recipe = write_recipe(tmp_path, "lt-refuse-helper", tmp_path / "shards", {
        "unsupervised": {**NO_EVAL, "cadence": {"eval_every": 4},
                         "eval": {"beir": [], "in_training": [str(MSMARCO)], "job": {"cpus_per_task": 8}}},
        "supervised": None, "distillation": None})
    res = cz("validate", recipe)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "phases.unsupervised.eval.job.cpus_per_task: 8 CPUs on one node, but the nodes of partition debug have " \
           "2: the largest value it allows is 2" in res.stderr, res.stderr
    res = cz("launch", recipe, "--run-dir", tmp_path / "run")
    assert res.returncode == 2 and "phases.unsupervised.eval.job.cpus_per_task" in res.stderr
    _nothing_submitted("lt-refuse-helper", tmp_path / "run")
    ok = cz("validate", recipe, "phases.unsupervised.eval.job.cpus_per_task=2")
    assert ok.returncode == 0 and "cluster: every job fits its partition" in ok.stdout, ok.stdout + ok.stderr


def test_helper_jobs_that_can_never_start_or_outlive_the_phase_are_cancelled_and_reported(local_slurm, tmp_path):
    """Evaluation jobs in the states the phase's end settles: one pending for a reason that cannot clear (a time
    over the partition's limit), one whose process ended without writing a result, one still running when the
    wait is over; `colbertzero cancel` stops an open one."""
    from colbertzero.manifest import Manifest
    from colbertzero.recipe import load_recipe
    from colbertzero.train.evaluation import settle_jobs

    recipe = write_recipe(tmp_path, "lt-helpers", tmp_path / "shards", {"supervised": None, "distillation": None})
    m = Manifest.create(tmp_path / "run", load_recipe(recipe))
    stuck = run_cmd("sbatch", "--parsable", "-p", "urgent", "-t", "2:00:00", "-o", "/dev/null", "--wrap", "sleep 60")
    wait(lambda: queued(stuck) == ("PENDING", "PartitionTimeLimit"), "the job to pend for PartitionTimeLimit")
    sleepers = [subprocess.Popen(["sleep", "300"], start_new_session=True) for _ in range(3)]
    gone = subprocess.Popen(["true"])
    gone.wait()
    jobs = {"4": f"job:{stuck}", "8": f"pid:{gone.pid}", "12": f"pid:{sleepers[0].pid}", "16": f"pid:{sleepers[1].pid}"}
    m.update_phase("unsupervised", lambda p: p.update(eval_jobs={
        s: {"state": "submitted", "handle": h, "time": "t"} for s, h in jobs.items()}))
    status = json.loads(cz("status", m.run_dir, "--json").stdout)
    seen = {h["step"]: (h["state"], h["reason"]) for h in status["helpers"]}
    assert seen[4] == ("pending", "PartitionTimeLimit") and seen[12] == ("submitted", None), seen  # Slurm's word
    closed = settle_jobs(m, "unsupervised", wait_s=1, poll=0.2)
    assert closed == {"4": "failed", "8": "failed", "12": "abandoned", "16": "abandoned"}, closed
    recs = m.phase("unsupervised")["eval_jobs"]
    assert "PartitionTimeLimit" in recs["4"]["reason"] and "can never start" in recs["4"]["reason"]
    assert "without a result" in recs["8"]["reason"] and "eval.job.wait_s" in recs["12"]["reason"]
    wait(lambda: queued(stuck) is None, "the stuck job to be cancelled")
    assert [p.wait(30) for p in sleepers[:2]] == [-15, -15]  # their process groups were ended
    # `colbertzero cancel` stops an open one too
    m.update_phase("unsupervised", lambda p: p["eval_jobs"].update(
        {"20": {"state": "running", "handle": f"pid:{sleepers[2].pid}", "time": "t"}}))
    res = cz("cancel", m.run_dir)
    assert res.returncode == 0 and f"eval-unsupervised-20=pid:{sleepers[2].pid}" in res.stdout, res.stdout + res.stderr
    assert sleepers[2].wait(30) == -15 and m.phase("unsupervised")["eval_jobs"]["20"]["state"] == "cancelled"
    # The phase's job told to stop (its time limit is near) ends the wait at once, whatever eval.job.wait_s says.
    late = subprocess.Popen(["sleep", "300"], start_new_session=True)
    m.update_phase("unsupervised", lambda p: p["eval_jobs"].update(
        {"24": {"state": "running", "handle": f"pid:{late.pid}", "time": "t"}}))
    t0 = time.monotonic()
    assert settle_jobs(m, "unsupervised", wait_s=600, poll=0.2, stopped=lambda: True) == {"24": "abandoned"}
    assert time.monotonic() - t0 < 30 and late.wait(30) == -15
    assert "told to stop" in m.phase("unsupervised")["eval_jobs"]["24"]["reason"]
    status = json.loads(cz("status", m.run_dir, "--json").stdout)
    assert sorted((h["step"], h["state"]) for h in status["helpers"]) == [
        (4, "failed"), (8, "failed"), (12, "abandoned"), (16, "abandoned"), (20, "cancelled"), (24, "abandoned")]


@pytest.mark.parametrize("name", ["hang", "hang-byhand"])
def test_a_hung_rank_requeues_the_job_and_the_phase_completes_from_its_checkpoint(runs, name):
    """Under submitit and under the plain scripts alike: rank 0 frozen, rank 1's watchdog dumps its stacks, records
    the attempt as hung and the job is requeued (not failed); the second run starts from the newest checkpoint, and
    the ledger counts both runs."""
    run = runs["dirs"][name]
    out = runs["scenarios"][name].outcome()
    job = out["job"]
    first = out["after_hang"]["attempts"][0]
    assert (first["id"], first["exit_state"]) == (f"{job}-0", "hang"), out["after_hang"]["attempts"]
    assert out["resume"].returncode == 0, out["resume"].stdout + out["resume"].stderr
    p = record(run)
    assert p["state"] == "done" and p["step"] == p["total_steps"], logs(run)
    hung, *_, last = p["attempts"]
    assert last["id"] == f"{job}-1" and last["exit_state"] == "completed", p["attempts"]
    assert 10 <= last["step_start"] <= hung["step_end"]  # the newest checkpoint before the hang
    assert sacct_runs(job) == ["REQUEUED", "COMPLETED"]
    assert all(a["gpu_hours"] > 0 for a in p["attempts"])
    dumps = list((run / "phases" / "unsupervised" / "hangs").glob(f"rank-00001-{job}-0.txt"))
    assert dumps and "no step finished for" in dumps[0].read_text()
    if name == "hang":  # its ranks ran in the wrapper without Slurm's commands: the requeue came from the host
        assert_ran_without_slurm(runs["root"] / "in-container-hang.log", {job}, runs=2, ranks=2)


# --------------------------------------------------------------------------------------------------- refusals
def _nothing_submitted(name: str, run: Path) -> None:
    assert not run.exists(), f"a refused launch created {run}"
    queue = run_cmd("squeue", "-h", "-o", "%j")
    accounted = run_cmd("sacct", "-X", "-P", "-n", "-S", "now-1hour", "-o", "JobName")
    assert f"cz-{name}-" not in queue + accounted


def test_refuses_unknown_partition_naming_the_field_and_the_clusters_partitions(local_slurm, tmp_path):
    recipe = write_recipe(tmp_path, "lt-refuse-partition", tmp_path / "shards", {
        "unsupervised": {**NO_EVAL, "resources": {"partition": "nosuch"}}, "supervised": None, "distillation": None})
    res = cz("launch", recipe, "--run-dir", tmp_path / "run")
    assert res.returncode == 2
    assert "error: phases.unsupervised.resources.partition: 'nosuch' is not a partition of this cluster (it has: " \
        "debug, long, urgent)" in res.stderr
    assert res.stderr.count("nosuch") == 1, res.stderr  # not again for the prepare job that inherits it
    # What sinfo cannot tell, Slurm's own `sbatch --test-only` does, in its words.
    res = cz("launch", recipe, "--run-dir", tmp_path / "run", "phases.unsupervised.resources.partition=debug",
             "phases.unsupervised.resources.constraint=nosuchfeature")
    assert res.returncode == 2
    assert "Slurm refuses phase 'unsupervised' (phases.unsupervised.resources)" in res.stderr
    assert "Invalid feature specification" in res.stderr and "nothing was submitted" in res.stderr
    _nothing_submitted("lt-refuse-partition", tmp_path / "run")


def test_refuses_missing_shards_and_data(local_slurm, tmp_path):
    recipe = write_recipe(tmp_path, "lt-refuse-data", tmp_path / "no-shards", {"supervised": None,
                                                                               "distillation": None})
    doc = yaml.safe_load(recipe.read_text())
    doc["phases"]["unsupervised"]["data"]["sources"] = [
        {"name": "gone", "path": str(tmp_path / "gone.jsonl"), "columns": {"query": "query", "document": "pos"}}]
    recipe.write_text(yaml.safe_dump(doc))
    res = cz("launch", recipe, "--run-dir", tmp_path / "run")
    assert res.returncode == 2
    assert "phases.unsupervised.data.sources[0].path" in res.stderr and "gone.jsonl: not found" in res.stderr
    _nothing_submitted("lt-refuse-data", tmp_path / "run")


def test_refuses_invalid_recipe_and_bad_extra_sbatch(local_slurm, tmp_path):
    recipe = write_recipe(tmp_path, "lt-refuse-invalid", tmp_path / "shards", {"supervised": None,
                                                                                    "distillation": None})
    res = cz("launch", recipe, "--run-dir", tmp_path / "run", "phases.unsupervised.global_batch_size=7")
    assert res.returncode == 2 and "phases.unsupervised.global_batch_size: 7 is not divisible" in res.stderr
    res = cz("launch", recipe, "--run-dir", tmp_path / "run", "phases.unsupervised.resources.extra_sbatch=[-C gpu]")
    assert res.returncode == 2 and "phases.unsupervised.resources.extra_sbatch[0]" in res.stderr
    res = cz("launch", recipe, "--run-dir", tmp_path / "run",
             "phases.unsupervised.resources.extra_sbatch=[--partition=long]")
    assert res.returncode == 2 and "use the recipe field phases.unsupervised.resources.partition" in res.stderr
    res = cz("sbatch", recipe, "--run-dir", tmp_path / "run", "phases.unsupervised.global_batch_size=7")
    assert res.returncode == 2 and "nothing was written" in res.stderr
    _nothing_submitted("lt-refuse-invalid", tmp_path / "run")


def test_sbatch_scripts_quote_every_recipe_value(tmp_path):
    """No cluster needed: the scripts are text; bash must parse them and see each value as one word."""
    odd = tmp_path / "run dir; $(touch pwned)"
    recipe = write_recipe(tmp_path, "lt-quote", tmp_path / "shards", {
        "unsupervised": {**NO_EVAL, "global_batch_size": 16, "budget_gpu_hours": 2, "resources": {
            "account": "proj a", "extra_sbatch": ["--comment=it's $HOME"], "gpus_per_node": 4, "cpus_per_task": 72}},
        "supervised": None, "distillation": None})
    res = cz("sbatch", recipe, "--run-dir", odd)
    assert res.returncode == 0, res.stderr
    script = (odd / "sbatch" / "unsupervised.sbatch").read_text()
    assert "#SBATCH --account='proj a'" in script and "#SBATCH --comment='it'\"'\"'s $HOME'" in script
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --signal=USR2@" in script and "--cpu-bind=cores" in script
    assert f"train {shlex.quote(str(odd))} --phase unsupervised" in script
    for path in (odd / "sbatch").iterdir():
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
    assert not (tmp_path / "pwned").exists()


def test_python_api_launches_waits_and_reports(runs):
    from pylate.models import ColBERT

    out = runs["scenarios"]["python"].outcome()
    assert out["returncode_at_submit"] is None and set(out["jobs"]) == {"unsupervised"}, out["jobs"]
    assert out["wait"] == 0
    assert [(p["name"], p["state"], p["step"]) for p in out["status"]["phases"]] == [("unsupervised", "done", 2)]
    assert ColBERT(out["exports"]["unsupervised"], device="cpu").query_prefix == "[Q] "
    assert out["report"].is_file() and "unsupervised" in out["report"].read_text()
    assert out["resumed"].returncode == 0 and out["resumed"].jobs == {}
    # submitit's srun: each rank on the 2 cores of its cpus_per_task (1 without SRUN_CPUS_PER_TASK)
    ranks = out["status"]["phases"][0]["accelerator"]["ranks"]
    assert sorted(len(r["cpus"]) for r in ranks) == [2, 2], ranks


def test_preemption_by_the_urgent_partition_requeues_and_the_ledger_counts_both_attempts(runs):
    """Slurm's own preemption, last (an urgent job wanting both nodes preempts every job on them, so it waits for the
    scenarios): the victim gets its signal, checkpoints, is requeued by Slurm, and resumes from that checkpoint."""
    for s in runs["scenarios"].values():
        s.join(WAIT_S)
    root = runs["root"]
    recipe = write_recipe(root, "lt-preempt", root / "shards", {"supervised": None, "distillation": None,
                                                                "unsupervised": UNSUPERVISED})
    run = root / "run-preempt"
    _launch(recipe, run)
    job = job_of(run)
    at = wait(lambda: (s := logged_step(run)) >= 25 and s, "25 steps (a checkpoint at 20)")
    urgent = run_cmd("sbatch", "--parsable", "-p", "urgent", "-N2", "--exclusive", "-o", "/dev/null",
                     "--wrap", "sleep 1")
    wait(lambda: (queued(job) or ("",))[0] == "PENDING" or not queued(job), "the preempted job to be requeued")
    wait(lambda: queued(urgent) is None, "the urgent job to run and end")
    resumed = cz("resume", run)  # releases the job Slurm holds after a requeue
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    until_ended(run)
    p = record(run)
    assert p["state"] == "done", logs(run)
    first, second = p["attempts"][:2]
    assert first["exit_state"] == "requeue" and first["step_end"] >= at  # it stopped after the preemptor came
    assert second["step_start"] == first["step_end"] and p["attempts"][-1]["exit_state"] == "completed"
    assert p["checkpoints"] and all(a["gpu_hours"] > 0 and a["elapsed_s"] > 0 for a in p["attempts"])
    runs_of_job = sacct_runs(job)
    assert len(runs_of_job) == len(p["attempts"]) >= 2 and runs_of_job[-1] == "COMPLETED", runs_of_job
    assert sacct_runs(urgent) == ["COMPLETED"]
