"""In-training evaluation: the current weights scored on a phase's small `eval.in_training` sets every
`cadence.eval_every` steps.

Every rank gathers the weights (collective under ZeRO-3); then, as `eval.where` says:

- ``job`` (the default): rank 0 saves them as a PyLate model under `phases/<phase>/evals/step-<N>/` and starts
  `colbertzero eval-job` off the training ranks (`runtime.detach`: its own Slurm job with `eval.job`'s resources,
  or a background process locally). Training goes on at once; the job writes its result when it has one.
- ``inline``: rank 0 scores a CPU copy while the others wait for its outcome, which is broadcast: an evaluation that
  fails fails every rank at once instead of leaving them at a barrier.

The RNG is restored afterwards, so a run with evaluations trains exactly like one without. Results, from either
mode, go to `phases/<phase>/logs/eval.jsonl`, TensorBoard and the manifest's `in_training_eval` (docs/CONTRACTS.md);
a job's state (submitted, running, done, failed, cancelled, abandoned) to the manifest's `eval_jobs`.

No evaluation job outlives its phase or waits forever (`settle_jobs`): one pending for a reason that never clears
(a request larger than the partition's nodes, …) is cancelled and failed with Slurm's reason as soon as it is seen;
one that ended without writing a result is failed; a resumed attempt's evaluation of a step replaces the earlier
job; at the end of the phase rank 0 waits `eval.job.wait_s` for the jobs still queued or running, then cancels them
and records them as abandoned.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable

from .. import cluster
from ..evaluate import evaluate
from ..files import folder_replacing, now_iso
from ..runtime import cancel_detached, detach, detached_state
from ..slurm import NEVER_STARTS, helper_options
from . import dist
from .checkpoint import capture_rng_state, restore_rng_state
from .export import gather_colbert


class EvalError(RuntimeError):
    pass


def record_eval(manifest, phase_name: str, step: int, attempt: str, res: dict, seconds: float, where: str,
                sinks=()) -> dict:
    """The one record of an in-training evaluation: eval.jsonl, the sinks (TensorBoard), the manifest."""
    datasets = {n: {k: v for k, v in r.items() if k != "retrieval"} for n, r in res["datasets"].items()}
    rec = {"time": now_iso(), "phase": phase_name, "step": step, "attempt": attempt, "where": where,
           "seconds": round(seconds, 3), "average": res["average"], "datasets": datasets}
    log = manifest.layout.phase(phase_name).eval_log
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # one short line, one write: appends from two processes stay whole
        f.write(json.dumps(rec) + "\n")
    ndcg = {n: r["ndcg@10"] for n, r in res["datasets"].items()}
    scalars = {f"eval/{name}/ndcg@10": v for name, v in ndcg.items()}
    scalars["eval/average/ndcg@10"] = res["average"]["ndcg@10"]
    for sink in sinks:
        sink.scalars(scalars, step)

    def add(p):  # a resumed attempt re-evaluates steps after its checkpoint: keep the newest per step
        p["in_training_eval"] = [x for x in p.get("in_training_eval") or [] if x["step"] != step]
        p["in_training_eval"].append({"step": step, "ndcg@10": ndcg, "where": where})
        p["in_training_eval"].sort(key=lambda x: x["step"])

    manifest.update_phase(phase_name, add)
    print(f"[colbertzero] phase {phase_name}: step {step} nDCG@10 "
          + ", ".join(f"{n} {100 * v:.2f}" for n, v in ndcg.items()) + f" ({where})", file=sys.stderr)
    return rec


def _set_job(manifest, phase_name: str, step: int, **fields) -> None:
    def put(p):
        jobs = p.setdefault("eval_jobs", {})
        jobs[str(step)] = {**jobs.get(str(step), {}), **fields, "time": now_iso()}

    manifest.update_phase(phase_name, put)


_STILL_THERE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "UNKNOWN")


def settle_jobs(manifest, phase_name: str, *, wait_s: float | None, poll: float = 5.0,
                stopped: Callable[[], bool] | None = None) -> dict[str, str]:
    """Look at the phase's open evaluation jobs: cancel and fail one pending for a reason that never clears, fail one
    that ended without a result. With ``wait_s`` (the end of the phase) wait up to that long — or until ``stopped()``
    (the job's stop signal: its time limit is near) — for the others, then cancel them and record them as abandoned;
    with None only look. Returns {step: how it was closed}."""
    deadline = time.monotonic() + (wait_s or 0)
    closed: dict[str, str] = {}
    while True:
        still = {}
        for step, rec in manifest.open_eval_jobs(phase_name).items():
            handle = rec.get("handle", "")
            state, reason = detached_state(handle)
            log = manifest.layout.phase(phase_name).eval_dir(int(step)) / "job.log"
            if state == "PENDING" and reason in NEVER_STARTS:
                cancel_detached(handle)
                why = (f"pending ({reason}): Slurm can never start it; cancelled. Fix phases.{phase_name}.eval.job "
                       "(`colbertzero validate` compares it with the partition)")
                if manifest.close_eval_job(phase_name, step, "failed", why):
                    closed[step] = "failed"
            elif state not in _STILL_THERE:
                if manifest.close_eval_job(phase_name, step, "failed", f"ended ({state}) without a result; see {log}"):
                    closed[step] = "failed"
            else:
                still[step] = (handle, state)
        if not still or wait_s is None:
            return closed
        signalled = stopped is not None and stopped()
        if signalled or time.monotonic() >= deadline:
            for step, (handle, state) in still.items():
                cancel_detached(handle)
                why = (f"still {state.lower()} when the phase's job was told to stop; cancelled" if signalled else
                       f"still {state.lower()} {wait_s:g} s after the phase ended (eval.job.wait_s); cancelled")
                if manifest.close_eval_job(phase_name, step, "abandoned", why):
                    closed[step] = "abandoned"
            return closed
        time.sleep(poll)


class Evaluator:
    def __init__(self, *, manifest, recipe, phase_name: str, init_path: str, device: str, metrics) -> None:
        self.manifest, self.recipe, self.phase_name = manifest, recipe, phase_name
        self.phase = recipe.phase(phase_name)
        self.init_path, self.device, self.metrics = init_path, device, metrics

    def should_eval(self, step: int, total: int) -> bool:
        c, e = self.phase.cadence, self.phase.eval
        return bool(c.eval_every and e.in_training and step % c.eval_every == 0 and step < total)

    def run(self, engine, step: int, attempt: str) -> None:
        """Every rank calls it (the weights are gathered collectively)."""
        model = gather_colbert(engine, self.init_path, self.recipe, self.phase_name)
        what = f"in-training evaluation of phase {self.phase_name} at step {step}"
        if self.phase.eval.where == "inline":
            dist.rank0_outcome(lambda: self._score(model, step, attempt), what, EvalError)
        elif model is not None:
            self._dispatch(model, step, attempt)

    def _score(self, model, step: int, attempt: str) -> None:
        rng = capture_rng_state()
        t0 = time.perf_counter()
        e = self.phase.eval
        try:
            # Not a saved folder: the evaluator keeps these throw-away embeddings in a temp dir, not its cache.
            res = evaluate(f"{self.phase_name}@step{step}", e.in_training, model=model, batch_size=e.batch_size,
                           max_corpus=e.max_corpus, device=self.device, show_progress=False)
        finally:
            restore_rng_state(rng)
        record_eval(self.manifest, self.phase_name, step, attempt, res, time.perf_counter() - t0, "inline",
                    self.metrics.sinks)

    def finish(self, stopped: Callable[[], bool] | None = None) -> dict[str, str]:
        """Rank 0, at the end of the phase: settle its evaluation jobs (wait up to `eval.job.wait_s`, or until
        ``stopped()``)."""
        closed = settle_jobs(self.manifest, self.phase_name, wait_s=self.phase.eval.job.wait_s, stopped=stopped)
        for step, how in closed.items():
            print(f"[colbertzero] phase {self.phase_name}: the evaluation job of step {step} {how}; see `colbertzero "
                  f"status {self.manifest.run_dir}`", file=sys.stderr)
        return closed

    def _dispatch(self, model, step: int, attempt: str) -> None:
        """Rank 0: save the weights, start the job; a job that cannot start is recorded, training goes on."""
        settle_jobs(self.manifest, self.phase_name, wait_s=None)  # what can never start is reported now, not later
        earlier = self.manifest.open_eval_jobs(self.phase_name).get(str(step))
        if earlier:  # a resumed attempt evaluates this step again: one job per step
            cancel_detached(earlier.get("handle", ""))
            self.manifest.close_eval_job(self.phase_name, str(step), "cancelled", f"replaced by attempt {attempt}'s")
        folder = self.manifest.layout.phase(self.phase_name).eval_dir(step)
        with folder_replacing(folder) as tmp:  # a resumed attempt's re-evaluation of the same step replaces it
            model.save(str(tmp / "model"))
        r = self.recipe.eval_request(self.phase_name)
        sbatch = helper_options(r.partition, r.time_limit, r.cpus_per_task, r.gpus, r.mem)
        args = ["-m", "colbertzero", "eval-job", str(self.manifest.run_dir), "--phase", self.phase_name, "--step",
                str(step), "--attempt", attempt]
        profile = self.recipe.cluster
        job_argv = (["srun", *cluster.srun_args(profile), *cluster.task_argv(profile, args)]
                    if cluster.in_container(profile) else None)  # the job starts outside the container
        try:
            handle = detach([sys.executable, *args], folder / "job.log", name=f"cz-eval-{self.phase_name}-{step}",
                            sbatch=sbatch, job_argv=job_argv)
        except (OSError, RuntimeError, ValueError) as e:
            _set_job(self.manifest, self.phase_name, step, state="not started", reason=str(e))
            print(f"[colbertzero] phase {self.phase_name}: the evaluation of step {step} could not start: {e}; "
                  f"run `colbertzero eval-job {self.manifest.run_dir} --phase {self.phase_name} --step {step}`",
                  file=sys.stderr)
            return
        _set_job(self.manifest, self.phase_name, step, state="submitted", handle=handle, attempt=attempt,
                 submitted=now_iso())


def run_eval_job(manifest, phase_name: str, step: int, attempt: str = "") -> dict:
    """`colbertzero eval-job`: score the export an Evaluator saved for ``step``, record it, remove the export."""
    import torch

    from .metering import eval_sinks

    phase = manifest.recipe().phase(phase_name)
    folder = manifest.layout.phase(phase_name).eval_dir(step)
    if not (folder / "model").is_dir():
        raise EvalError(f"{folder / 'model'}: no saved weights for step {step} of phase {phase_name}")
    _set_job(manifest, phase_name, step, state="running")
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        res = evaluate(str(folder / "model"), phase.eval.in_training, batch_size=phase.eval.batch_size,
                       max_corpus=phase.eval.max_corpus, device=device, cache_dir=str(folder / "cache"),
                       show_progress=False)
        sinks = eval_sinks(manifest.recipe().report_to, manifest.layout.phase(phase_name))
        try:
            rec = record_eval(manifest, phase_name, step, attempt, res, time.perf_counter() - t0, "job", sinks)
        finally:
            for s in sinks:
                s.close()
    except Exception as e:
        _set_job(manifest, phase_name, step, state="failed", reason=f"{type(e).__name__}: {e}")
        raise
    _set_job(manifest, phase_name, step, state="done", seconds=rec["seconds"])
    shutil.rmtree(folder / "model", ignore_errors=True)
    shutil.rmtree(folder / "cache", ignore_errors=True)
    return rec
