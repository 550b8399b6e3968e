"""The phase runner: `colbertzero train RUN_DIR --phase P`, one process per GPU (or CPU task).

Started by srun, torchrun, the submitit task or the local executor (`runtime` reads where the process sits). The
three phases share this loop; the kind only changes the batch shape (the loader) and the loss (`losses.py`).

The loop calls components that own their cadence: `Checkpointer.should_save`, `Metrics.should_log`,
`Evaluator.should_eval`. After each step ONE collective (`StepDecisions.agree`) gives every rank the same decisions
(a non-finite loss or a stop signal on any rank, the GPU-hour budget on rank 0) and sums the step's model FLOPs. The
exit code (`runtime.Exit`) tells the launcher what happened: done, failed, stopped at a checkpoint to be requeued
(stop signal), or stopped at a checkpoint over budget.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from tqdm import tqdm

from .. import ledger, scoring
from ..data.hub import fetched_revisions
from ..data.loader import GlobalBatchLoader
from ..data.shards import DataError, index_path, source_dir
from ..evaluate.sharded import evaluate_phase
from ..files import now_iso, sha256_file, sha256_tree
from ..manifest import Manifest, resolve_init
from ..models import colbert_for, resolve_model_ref
from ..runtime import AttemptClock, Exit, StopFlag, job_identity
from . import accelerator, dist
from .checkpoint import Checkpointer
from .engine import build_engine
from .evaluation import Evaluator
from .export import export_model, update_model_card
from .metering import FlopCounter, Metrics, peak_flops
from .module import ColBERTForTraining
from .step import train_step
from .watchdog import Watchdog

# Seconds between ledger/throughput writes to the manifest between checkpoints (a write is locked and fsynced).
MANIFEST_TICK_S = 30.0


@dataclass(frozen=True)
class StepDecisions:
    """What every rank agrees on after a step, from one all-reduce: any rank's non-finite loss or stop signal, rank
    0's budget decision, and the step's model FLOPs over all ranks."""

    non_finite: bool
    stop: bool
    over_budget: bool
    flops: float

    @classmethod
    def agree(cls, *, non_finite: bool, stop: bool, over_budget: bool, counter: FlopCounter, batch,
              device: torch.device) -> "StepDecisions":
        flags = torch.tensor([float(non_finite), float(stop), float(over_budget)], dtype=torch.float64)
        summed = torch.cat([flags, counter.local(batch)]).to(device)
        if tdist.is_initialized():
            tdist.all_reduce(summed)
        summed = summed.cpu()
        return cls(bool(summed[0] > 0), bool(summed[1] > 0), bool(summed[2] > 0), counter.total(summed[3:]))


def run_phase(run_dir: str, phase_name: str) -> int:
    """One attempt at the phase on this rank; the exit code (`runtime.Exit`). A rank whose watchdog finds the phase
    hung records it and leaves with `Exit.REQUEUE` from the watchdog's thread; the requeue policy, after srun, reads
    the record."""
    stop = StopFlag().install()
    manifest = Manifest(run_dir)
    recipe = manifest.recipe()
    phase = recipe.phase(phase_name)
    record = manifest.phase(phase_name)
    if record["state"] == "done" and record.get("export"):
        print(f"[colbertzero] phase {phase_name}: already done (export at step {record['export']['step']})",
              file=sys.stderr)
        return Exit.DONE
    hardware = accelerator.facts()
    try:
        accelerator.check(hardware, phase=phase_name, gpus_per_node=phase.resources.gpus_per_node, bf16=phase.bf16)
    except accelerator.AcceleratorError as e:
        _refuse(manifest, phase_name, str(e), hardware)
        raise
    accelerator.fit_threads()  # torch's threads = this rank's cores (its placement record shows both)
    nccl_logs = manifest.layout.phase(phase_name).nccl_logs
    if hardware["gpus"] and phase.resources.gpus_per_node:
        nccl_logs.mkdir(parents=True, exist_ok=True)
        os.environ.update(accelerator.nccl_log_env(nccl_logs))  # read before NCCL's first communicator
    clean = False
    rt = dist.init_distributed(bf16=phase.bf16, timeout=timedelta(seconds=phase.watchdog.collective_timeout_s))
    try:
        code = PhaseRun(manifest, recipe, phase_name, rt, stop, hardware).start()
        clean = True
        return code
    finally:
        # After an error on this rank alone the others may never reach a barrier: leave without one.
        dist.teardown(barrier=clean)


def _refuse(manifest: Manifest, phase_name: str, reason: str, hardware: dict) -> None:
    """Mark the phase failed before any attempt starts (no process group yet: every rank refusing writes the same
    reason; the first one stays)."""
    failure = {"source": None, "reason": reason, "rank": int(os.environ.get("RANK", "0") or 0),
               "attempt": None, "time": now_iso(), "accelerator": hardware}

    def mark(p):
        if (p.get("failure") or {}).get("reason") != reason:
            p["state"], p["failure"] = "failed", {"step": p.get("step") or 0, **failure}

    manifest.update_phase(phase_name, mark)


class PhaseRun:
    """One attempt at one phase on this rank."""

    def __init__(self, manifest: Manifest, recipe, phase_name: str, rt, stop: StopFlag,
                 hardware: dict | None = None) -> None:
        self.manifest, self.recipe, self.phase_name, self.rt, self.stop = manifest, recipe, phase_name, rt, stop
        self.hardware = hardware
        self.phase = recipe.phase(phase_name)
        self.main = rt.is_main
        self.clock = AttemptClock(query_slurm=self.main)
        gpus = int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0) if torch.cuda.is_available() else 0
        info = job_identity(tasks=rt.world_size, gpus_per_node=gpus)
        self.attempt_id = dist.broadcast_from_rank0(info.pop("attempt_id"))  # local ranks would each make one
        self.job_info = info
        self._where_ranks_run(info)
        self.units = ledger.units_of(info["nodes"], info["gpus_per_node"], info["tasks"])  # what the ledger charges
        self.step = 0
        self.source: str | None = None
        self.attempt_open = False
        self.last_tick = -math.inf
        self.train_seconds, self.train_steps = 0.0, 0  # this attempt's, for the budget's next-step estimate

    def _where_ranks_run(self, info: dict) -> None:
        """Rank 0's hardware record gains NCCL's network and every rank's host and CPUs; under Slurm a rank bound to
        fewer cores than it was given, or sharing them, is reported (the local executor's ranks share by design)."""
        if self.rt.backend == "nccl" and self.main:  # NCCL's communicator exists now: its log names the network
            try:
                self.hardware = accelerator.record_network(
                    self.hardware or {}, self.manifest.layout.phase(self.phase_name).nccl_logs, info["nodes"],
                    self.recipe.cluster)
            except accelerator.AcceleratorError as e:
                _refuse(self.manifest, self.phase_name, str(e), self.hardware or {})
                raise
        ranks = dist.all_gather_objects(accelerator.placement(self.rt.rank))
        if not self.main:
            return
        self.hardware = {**(self.hardware or {}), "ranks": ranks}
        if info["executor"] != "slurm":
            return
        for problem in accelerator.placement_problems(ranks, self.phase.resources.cpus_per_task):
            print(f"[colbertzero] phase {self.phase_name}: {problem}: training and loader threads crowd onto them. "
                  "See docs/cluster.md, 'One rank per Grace CPU'.", file=sys.stderr)

    # ------------------------------------------------------------------ setup and outcome
    def start(self) -> int:
        try:
            return self._run()
        except Exception as e:
            self._record_failure(f"{type(e).__name__}: {e}", traceback.format_exc(limit=8), "failed")
            raise

    def _run(self) -> int:
        phase, rt = self.phase, self.rt
        torch.manual_seed(phase.seed)  # every rank builds the same new layers ([Q]/[D] rows, projection)
        init_ref = resolve_init(self.manifest, self.recipe, self.phase_name)
        self.init_path = resolve_model_ref(init_ref)
        colbert = colbert_for(self.recipe, self.phase_name, self.init_path, rt.device)
        module = ColBERTForTraining.for_phase(colbert, phase)
        self.flops = FlopCounter(colbert, phase, rt.world_size)  # before ZeRO-3 partitions the parameters
        self.scorer = scoring.select(phase.scores_backend, rt.device, self.recipe.model.embedding_size)
        self.loader = GlobalBatchLoader(self.recipe, self.phase_name, rt.rank, rt.world_size)
        # every shard's sha256 before training reads it: each rank hashes its share, then all agree
        problems = [p for ps in dist.all_gather_objects(self.loader.verify_share(rt.rank, rt.world_size)) for p in ps]
        if problems:
            raise DataError(f"{len(problems)} shard(s) do not match their index: " + "; ".join(problems[:3]))
        self.total = self.loader.total_steps
        self.engine, _, _ = build_engine(module, phase, self.total, runtime=rt)
        self.checkpointer = Checkpointer(self.engine, self.manifest, self.phase_name, phase.cadence)
        self.metrics = Metrics(phase_name=self.phase_name, run_dir=self.manifest.run_dir, total=self.total,
                               log_every=phase.cadence.log_every, world_size=rt.world_size,
                               peak=peak_flops(rt.device, rt.dtype), write=self.main,
                               report_to=self.recipe.report_to, max_grad_norm=phase.max_grad_norm,
                               config=self.recipe.resolved()["phases"][self.phase_name])
        self.evaluator = Evaluator(manifest=self.manifest, recipe=self.recipe, phase_name=self.phase_name,
                                   init_path=self.init_path, device=str(rt.device), metrics=self.metrics)
        w = phase.watchdog
        self.layout = self.manifest.layout.phase(self.phase_name)
        self.watchdog = Watchdog(folder=self.layout.hangs, rank=rt.rank,
                                 attempt=self.attempt_id, step_factor=w.step_factor, min_seconds=w.min_seconds,
                                 on_fire=self._hung)
        state = self.checkpointer.load()
        if state is not None:
            self.step = int(state["step"])
            self.loader.load_state_dict(state["loader"])
        if self.main:
            print(f"[colbertzero] phase {self.phase_name}: MaxSim scores by {self.scorer.name} ({self.scorer.why})",
                  file=sys.stderr)
            self.manifest.start_attempt(self.phase_name, attempt_id=self.attempt_id, step_start=self.step,
                                        scoring={"backend": self.scorer.name, "why": self.scorer.why},
                                        accelerator=self.hardware, **self.job_info)
            self.attempt_open = True
            self._lineage(init_ref)
            self.manifest.update_phase(self.phase_name, lambda p: p.update(total_steps=self.total, failure=None))
            data = self.manifest.read()
            self.budget = ledger.phase_budget(data, self.phase_name)
            self.used_before = ledger.record_gpu_hours(data["phases"][self.phase_name], except_attempt=self.attempt_id)
        self.watchdog.start()
        try:
            code = self._loop()
        finally:
            self.watchdog.stop()
            self.metrics.close()
        if code == Exit.DONE:
            self._finish()
            if self.main:  # closed after export and evaluation: their time is the allocation's too
                self._tick(end_state="completed")
        return code

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> int:
        first_step, temperature = self.step, None
        batches = iter(self.loader)
        bar = tqdm(total=self.total, initial=self.step, desc=self.phase_name, disable=not self.main,
                   dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        with bar:
            while self.step < self.total:
                t0 = time.perf_counter()
                batch = next(batches)
                self.source = batch.source
                res = train_step(self.engine, batch, self.phase, self.scorer)
                self.step += 1
                agreed = StepDecisions.agree(
                    non_finite=not math.isfinite(res.loss) or not math.isfinite(res.grad_norm or 0.0),
                    stop=self.stop.signal is not None, over_budget=self._next_step_over_budget(t0),
                    counter=self.flops, batch=batch, device=self.rt.device)
                self._count(time.perf_counter() - t0, res, agreed)
                if agreed.non_finite:
                    return self._non_finite(res)
                temperature = res.temperature if res.temperature is not None else temperature
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}", src=self.source, refresh=False)
                if self.main and self.metrics.should_log(self.step):
                    self.metrics.log(self.step, res, source=self.source, consumed=self.loader.consumed(),
                                     attempt=self.attempt_id)
                    self._tick(throttled=True)
                if agreed.stop or agreed.over_budget:
                    return self._stop_at_checkpoint(temperature, over_budget=not agreed.stop)
                if self.checkpointer.should_save(self.step, self.total):
                    self._save(temperature)
                if self.evaluator.should_eval(self.step, self.total):
                    with self.watchdog.paused():
                        self.evaluator.run(self.engine, self.step, self.attempt_id)
        if self.step > first_step:  # else the checkpoint of the last step exists: an earlier attempt saved it
            self._save(temperature)
        return Exit.DONE

    def _count(self, seconds: float, res, agreed: StepDecisions) -> None:
        self.watchdog.beat(seconds)
        self.train_seconds += seconds
        self.train_steps += 1
        self.metrics.count(seconds, res.n_queries, res.n_tokens, agreed.flops)

    def _next_step_over_budget(self, t0: float) -> bool:
        """Rank 0: would the next step cross the phase's budget (at this attempt's mean step time so far)?"""
        if not self.main or self.step >= self.total:
            return False
        per_step = (self.train_seconds + time.perf_counter() - t0) / (self.train_steps + 1)
        return ledger.crosses_budget(self.budget, self.used_before, self.clock.elapsed(), per_step,
                                     units=self.units)

    def _save(self, temperature) -> None:
        with self.watchdog.paused():
            self.checkpointer.save(self.step, loader_state=self.loader.state_dict(), temperature=temperature)
        if self.main:
            self._tick()

    # ------------------------------------------------------------------ the ledger and the record
    def _tick(self, end_state: str | None = None, throttled: bool = False) -> None:
        """The attempt's ledger entry and the latest throughput, in one manifest write (rank 0). ``throttled``: at
        most every MANIFEST_TICK_S."""
        if throttled and time.monotonic() - self.last_tick < MANIFEST_TICK_S:
            return
        self.last_tick = time.monotonic()
        elapsed, throughput = self.clock.elapsed(), self.metrics.throughput()
        self.manifest.update_phase(self.phase_name, lambda p: ledger.tick_attempt(
            p, self.attempt_id, elapsed_s=elapsed, step=self.step, end_state=end_state, throughput=throughput))

    def _lineage(self, init_ref: str) -> None:
        idx = [index_path(source_dir(self.phase.data, s.name)) for s in self.phase.data.sources]
        lineage = {
            "init": init_ref,
            "init_sha256": sha256_tree(self.init_path) if os.path.isdir(self.init_path) else None,
            "data_index": [str(p) for p in idx],
            "data_index_sha256": [sha256_file(p) if p.exists() else None for p in idx],
            # where the raw data came from: the Hub revision `colbertzero fetch` recorded, per source path
            "data_revisions": fetched_revisions(self.recipe, self.phase_name),
            "config_hash": self.recipe.hash(),
        }
        self.manifest.update_phase(self.phase_name, lambda p: p.update(lineage=lineage))

    def _hung(self) -> int:
        """From the watchdog's thread: close this attempt in the ledger as hung (whichever rank saw it: rank 0 may be
        the stuck one); the process then leaves with the requeue code."""
        try:
            elapsed = self.clock.elapsed()
            self.manifest.update_phase(self.phase_name, lambda p: ledger.tick_attempt(
                p, self.attempt_id, elapsed_s=elapsed, step=self.step, end_state=ledger.HANG))
        except Exception as e:  # the attempt may not be registered yet (a hang before the first step)
            print(f"[colbertzero] rank {self.rt.rank}: the hang could not be recorded: {e}", file=sys.stderr)
        return Exit.REQUEUE

    def _record_failure(self, reason: str, trace: str | None, exit_state: str) -> None:
        """Mark the phase failed. Any rank may write: the first failure of this attempt is the cause (a rank that
        raised), later ones are its echoes (the others' collectives breaking), so they do not overwrite it."""
        failure = {"step": self.step, "source": self.source, "reason": reason, "rank": self.rt.rank,
                   "attempt": self.attempt_id, "time": now_iso()}
        if trace:
            failure["traceback"] = trace

        def mark(p):
            if (p.get("failure") or {}).get("attempt") != self.attempt_id and not ledger.is_hung(p, self.attempt_id):
                p["state"] = "failed"
                p["failure"] = failure

        try:
            self.manifest.update_phase(self.phase_name, mark)
            if self.main and self.attempt_open:
                self._tick(end_state=exit_state)
        except Exception:  # never mask the original failure
            pass

    def _non_finite(self, res) -> int:
        """Stop without saving: the newest checkpoint is the last good one. The weights already took this step's
        update, so nothing after it may be written."""
        what = f"loss {res.loss}" if not math.isfinite(res.loss) else f"gradient norm {res.grad_norm} (loss {res.loss})"
        if self.main:
            self._record_failure(f"non-finite {what}", None, "nan")
            print(f"[colbertzero] phase {self.phase_name}: non-finite {what} at step {self.step} (source "
                  f"{self.source}); stopped, the last good checkpoint is kept", file=sys.stderr)
        return Exit.FAILED

    def _evaluate_export(self, out) -> dict | None:
        """eval.beir on the export. In a Slurm job with eval.where: job it is only planned here: the job's host side
        submits its arrays after srun (after-phase), so the nodes go to the next phase at once."""
        defer = self.phase.eval.where == "job" and bool(os.environ.get("SLURM_JOB_ID"))
        results = evaluate_phase(self.manifest, self.phase_name, out, device=str(self.rt.device), defer=defer)
        if results is not None:
            update_model_card(out, dict(results["datasets"]))
        return results

    def _stop_at_checkpoint(self, temperature, over_budget: bool) -> int:
        self._save(temperature)
        if self.main:
            self._tick(end_state="over-budget" if over_budget else "requeue")
            if over_budget:
                self.manifest.set_state(self.phase_name, "over-budget")
            why = "over its GPU-hour budget" if over_budget else "interrupted by a signal"
            print(f"[colbertzero] phase {self.phase_name}: {why} at step {self.step}/{self.total}; checkpoint saved",
                  file=sys.stderr)
        return Exit.OVER_BUDGET if over_budget else Exit.REQUEUE

    def _finish(self) -> None:
        phase, rt = self.phase, self.rt
        out = self.layout.export
        lineage = self.manifest.phase(self.phase_name).get("lineage", {})
        export_model(self.engine, self.init_path, out, recipe=self.recipe, phase_name=self.phase_name,
                     manifest=self.manifest, lineage=lineage, step=self.step)
        if rt.is_main:
            results = self._evaluate_export(out) if phase.eval.beir else None
            self.evaluator.finish(stopped=lambda: self.stop.signal is not None)  # no evaluation job outlives it
            self.manifest.set_state(self.phase_name, "done", eval=results)
        dist.barrier()
