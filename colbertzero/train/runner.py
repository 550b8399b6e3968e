"""The phase runner: `colbertzero train RUN_DIR --phase P`, one process per GPU (or CPU task).

Started by srun, torchrun, the submitit task or the local executor; rank, world size and rendezvous come from the
torch.distributed variables, filled from Slurm's when srun started the process (`launch.slurm_env`). The three phases
share this loop; the kind only changes the batch shape (the loader) and the loss (`losses.py`).

Per step: one GradCache (or plain) optimizer step, then ONE collective that every rank takes the same decisions from
(a stop signal on any rank, the GPU-hour budget on rank 0, a non-finite loss) and that sums the step's model FLOPs.
Every `cadence.log_every` steps rank 0 appends a record to `phases/<phase>/logs/train.jsonl` (docs/CONTRACTS.md) and
to TensorBoard when it is installed; every `cadence.save_every` steps all ranks save a checkpoint (`checkpoint.py`).

Exit codes tell the launcher what happened:
    0  EXIT_DONE         phase finished, exported (and evaluated)
    1  EXIT_FAILED       crash or non-finite loss (the phase is marked failed with step and source)
    3  EXIT_REQUEUE      stopped at a checkpoint on SIGUSR1/SIGUSR2/SIGTERM (time limit, preemption): requeue me
    4  EXIT_OVER_BUDGET  stopped at a checkpoint: the next steps would cross the phase's GPU-hour budget
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as tdist

from ..manifest import Manifest, attempt_gpu_hours, now_iso, resolve_init, sha256_file, sha256_tree
from ..models import resolve_model_ref

EXIT_DONE, EXIT_FAILED, EXIT_REQUEUE, EXIT_OVER_BUDGET = 0, 1, 3, 4

# Slurm's warning before the time limit (--signal; submitit asks for USR2), preemption and scancel send one of these.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

# bf16 dense tensor-core peaks (FLOP/s, no sparsity) by device name, first match wins: more specific names first.
BF16_PEAK_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
# Seconds between ledger/throughput writes to the manifest between checkpoints (a write is locked and fsynced).
MANIFEST_TICK_S = 30.0


class StopFlag:
    """Set by any of STOP_SIGNALS; read once per step. The handler only records: the loop checkpoints and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signal = signum


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for the compute dtype, or None where no honest figure exists: a CPU (its peak
    depends on cores, clocks and vector units, none of which torch reports) or a GPU not in BF16_PEAK_FLOPS or not
    computing in bf16 (fp32 peaks hinge on TF32 settings)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


class FlopCounter:
    """Model FLOPs of one optimizer step: what the step must compute, not what the kernels happen to do.

    Encoder, per forward: 2·N per processed token (N = parameters outside embedding tables, which are lookups) plus
    attention, 4·hidden·(outputs × attended keys) per layer and sequence, keys capped at the sliding window on
    local-attention layers (ModernBERT). Processed tokens are the real ones, and every query position when queries
    are expanded ([MASK] positions are scored). Training costs 3 forwards (backward = 2), 4 with GradCache (its
    extra no-grad forward); distillation's micro-batches recompute nothing.
    MaxSim: 2·dim per (query token, document token) pair scored, ×3 for forward and backward. Contrastive scores
    every query of an accumulation group against every document of the group (gathered: over all ranks);
    distillation scores each query against its own documents. Real document tokens (skiplist tokens included).
    `local(batch)` is this rank's part as a vector; summed over ranks, `total(summed)` is the step's FLOPs.
    """

    def __init__(self, colbert, phase, world_size: int) -> None:
        from .losses import loss_for

        loss = loss_for(phase.kind)
        self.contrastive = loss.in_batch_negatives
        self.passes = 4 if (self.contrastive and phase.gradcache_mini_batch is not None) else 3
        self.gather = self.contrastive and phase.gather_across_ranks and world_size > 1
        self.groups = phase.gradient_accumulation
        self.expand = bool(colbert.do_query_expansion)
        size = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731 - ZeRO-3 partitions keep the full size
        embedded = {id(m.weight) for m in colbert.modules() if isinstance(m, torch.nn.Embedding)}
        self.n_params = sum(size(p) for p in colbert.parameters() if id(p) not in embedded)
        cfg = colbert[0].auto_model.config
        self.hidden = int(cfg.hidden_size)
        layers = int(cfg.num_hidden_layers)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * layers
        half = getattr(cfg, "sliding_window", None)
        self.windows = [None if t == "full_attention" or not half else 2 * int(half) + 1 for t in types]
        self.dim = int(colbert[-1].out_features)

    def _encoder(self, outputs: torch.Tensor, keys: torch.Tensor) -> float:
        """Forward FLOPs of sequences with `outputs` processed positions and `keys` attended tokens each."""
        o, k = outputs.double(), keys.double()
        attention = sum(float((o * (k if w is None else k.clamp(max=w))).sum()) for w in self.windows)
        return 2.0 * self.n_params * float(o.sum()) + 4.0 * self.hidden * attention

    def local(self, batch) -> torch.Tensor:
        q_mask, d_mask = batch.queries["attention_mask"], batch.documents["attention_mask"]
        q_keys, d_tok = q_mask.sum(1), d_mask.sum(1)
        q_out = torch.full_like(q_keys, q_mask.shape[1]) if self.expand else q_keys
        encoder = self.passes * (self._encoder(q_out, q_keys) + self._encoder(d_tok, d_tok))
        n = q_out.shape[0]
        per_query_docs = d_tok.view(n, -1).sum(1).double()  # row-major: query i owns n_docs consecutive documents
        q_groups = q_out.double().view(self.groups, -1).sum(1)
        d_groups = per_query_docs.view(self.groups, -1).sum(1)
        if not self.contrastive:
            maxsim = float((q_out.double() * per_query_docs).sum())
        elif self.gather:
            maxsim = 0.0  # needs every rank's tokens: see total()
        else:
            maxsim = float((q_groups * d_groups).sum())
        return torch.cat([torch.tensor([encoder, 3 * 2.0 * self.dim * maxsim], dtype=torch.float64), q_groups, d_groups])

    def total(self, summed: torch.Tensor) -> float:
        flops = float(summed[0] + summed[1])
        if self.gather:
            q, d = summed[2 : 2 + self.groups], summed[2 + self.groups :]
            flops += 3 * 2.0 * self.dim * float((q * d).sum())
        return flops


class AttemptClock:
    """Seconds this attempt has run. Inside Slurm the job's own clock counts (the time before this process started
    is allocated time too): asked once, at the attempt's start, on rank 0 only, then carried forward by the local
    monotonic clock. Asking squeue every step would load the controller and stall the step when it is slow."""

    def __init__(self, query_slurm: bool) -> None:
        offset = 0.0
        if query_slurm and os.environ.get("SLURM_JOB_ID"):
            from ..launch.slurm_env import job_elapsed_seconds

            try:
                offset = float(job_elapsed_seconds() or 0.0)
            except Exception:  # an unreachable controller must not stop training; the local clock still counts
                offset = 0.0
        self.t0 = time.monotonic() - offset

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _job_info(phase) -> dict:
    """Who is running this attempt: Slurm job (and requeue count) or a local run."""
    job = os.environ.get("SLURM_JOB_ID")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    r = phase.resources
    nodes = int(os.environ.get("SLURM_NNODES", r.nodes if job else 1))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus_per_node = int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0) if torch.cuda.is_available() else 0
    if job is None:
        aid = os.environ.get("COLBERTZERO_ATTEMPT_ID") or f"local-{os.getpid()}-{int(time.time())}"
        return {"job_id": None, "executor": "local", "nodes": 1, "gpus_per_node": gpus_per_node, "tasks": world,
                "attempt_id": aid}
    return {"job_id": job, "executor": "slurm", "nodes": nodes, "gpus_per_node": gpus_per_node, "tasks": world,
            "attempt_id": f"{job}-{restarts}"}


def build_model(init_path: str, recipe, phase, device):
    """The PyLate ColBERT a phase trains, from its resolved init, with the recipe's head, prefixes, lengths and
    prompts. Seed torch first: the new layers ([Q]/[D] rows, projection) are drawn here."""
    from pylate.models import ColBERT

    m = recipe.model
    prompts = {"query": phase.prompts.query, "document": phase.prompts.document} if phase.prompts.enabled else None
    return ColBERT(
        init_path,
        device=str(device),
        embedding_size=m.embedding_size,
        query_prefix=m.query_prefix,
        document_prefix=m.document_prefix,
        query_length=phase.effective_query_length,
        document_length=phase.effective_document_length,
        do_query_expansion=m.do_query_expansion,
        attend_to_expansion_tokens=m.attend_to_expansion_tokens,
        prompts=prompts,
    )


def _from_rank0(value):
    if not tdist.is_initialized():
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _tensorboard(log_dir: Path):
    """A SummaryWriter when the tensorboard package is installed (it is optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir / "tensorboard"))


def run_phase(run_dir: str, phase_name: str) -> int:
    from ..launch.slurm_env import set_torch_env
    from .dist import init_distributed, teardown

    set_torch_env()  # a task srun started directly has Slurm's variables only; fills just what is missing
    stop = StopFlag()
    stop.install()
    manifest = Manifest(run_dir)
    recipe = manifest.recipe()
    phase = recipe.phase(phase_name)
    record = manifest.phase(phase_name)
    if record["state"] == "done" and record.get("export"):
        print(f"[colbertzero] phase {phase_name}: already done (export at step {record['export']['step']})",
              file=sys.stderr)
        return EXIT_DONE
    clean = False
    rt = init_distributed(bf16=phase.bf16)
    try:
        run = PhaseRun(manifest, recipe, phase_name, rt, stop)
        code = run.start()
        clean = True
        return code
    finally:
        # After an error on this rank alone the others may never reach a barrier: leave without one.
        teardown(barrier=clean)


class PhaseRun:
    """One attempt at one phase on this rank."""

    def __init__(self, manifest: Manifest, recipe, phase_name: str, rt, stop: StopFlag) -> None:
        self.manifest, self.recipe, self.phase_name, self.rt, self.stop = manifest, recipe, phase_name, rt, stop
        self.phase = recipe.phase(phase_name)
        self.main = rt.is_main
        self.clock = AttemptClock(query_slurm=self.main)
        info = _job_info(self.phase)
        self.attempt_id = _from_rank0(info.pop("attempt_id"))  # ranks of a local run would each make their own
        self.job_info = info
        self.step = 0
        self.source: str | None = None
        self.attempt_open = False
        self.last_rec: dict | None = None  # the newest log record (rank 0)
        self.logs = manifest.run_dir / "phases" / phase_name / "logs"

    # ------------------------------------------------------------------ setup and outcome
    def start(self) -> int:
        try:
            return self._run()
        except Exception as e:
            self._record_failure(f"{type(e).__name__}: {e}", traceback.format_exc(limit=8), "failed")
            raise

    def _run(self) -> int:
        from ..data.loader import GlobalBatchLoader
        from .checkpoint import load_latest_checkpoint
        from .engine import build_engine
        from .module import ColBERTForTraining

        phase, rt = self.phase, self.rt
        torch.manual_seed(phase.seed)  # every rank builds the same new layers ([Q]/[D] rows, projection)
        init_ref = resolve_init(self.manifest, self.recipe, self.phase_name)
        self.init_path = resolve_model_ref(init_ref)
        colbert = build_model(self.init_path, self.recipe, phase, rt.device)
        module = ColBERTForTraining.for_phase(colbert, phase)
        self.flops = FlopCounter(colbert, phase, rt.world_size)  # before ZeRO-3 partitions the parameters
        self.loader = GlobalBatchLoader(self.recipe, self.phase_name, rt.rank, rt.world_size)
        self.total = self.loader.total_steps
        self.engine, _, _ = build_engine(module, phase, self.total, runtime=rt)
        state = load_latest_checkpoint(self.engine, self.manifest.run_dir, self.phase_name, self.manifest)
        if state is not None:
            self.step = int(state["step"])
            self.loader.load_state_dict(state["loader"])
        if self.main:
            self.manifest.start_attempt(self.phase_name, attempt_id=self.attempt_id, step_start=self.step,
                                        **self.job_info)
            self.attempt_open = True
            self._lineage(init_ref)
            self.manifest.update_phase(self.phase_name, lambda p: p.update(total_steps=self.total, failure=None))
            self.logs.mkdir(parents=True, exist_ok=True)
        code = self._loop()
        if code == EXIT_DONE:
            self._finish()
            if self.main:  # closed after export and evaluation: their time is the allocation's too
                self._tick(end_state="completed")
        return code

    def _lineage(self, init_ref: str) -> None:
        idx = [Path(self.phase.data.shards_dir) / s.name / "index.json" for s in self.phase.data.sources]
        lineage = {
            "init": init_ref,
            "init_sha256": sha256_tree(self.init_path) if os.path.isdir(self.init_path) else None,
            "data_index": [str(p) for p in idx],
            "data_index_sha256": [sha256_file(p) if p.exists() else None for p in idx],
            "config_hash": self.recipe.hash(),
        }
        self.manifest.update_phase(self.phase_name, lambda p: p.update(lineage=lineage))

    def _record_failure(self, reason: str, trace: str | None, exit_state: str) -> None:
        """Mark the phase failed. Any rank may write: the first failure of this attempt is the cause (a rank that
        raised), later ones are its echoes (the others' collectives breaking), so they do not overwrite it."""
        failure = {"step": self.step, "source": self.source, "reason": reason, "rank": self.rt.rank,
                   "attempt": self.attempt_id, "time": now_iso()}
        if trace:
            failure["traceback"] = trace

        def mark(p):
            if (p.get("failure") or {}).get("attempt") != self.attempt_id:
                p["state"] = "failed"
                p["failure"] = failure

        try:
            self.manifest.update_phase(self.phase_name, mark)
            if self.main and self.attempt_open:
                self._tick(end_state=exit_state)
        except Exception:  # never mask the original failure
            pass

    def _tick(self, end_state: str | None = None) -> None:
        """The attempt's ledger (elapsed time, GPU-hours, step; closed with `end_state`) and the latest throughput
        (what projections read), in one manifest write. Rank 0."""
        elapsed, rec = self.clock.elapsed(), self.last_rec

        def f(p):
            if rec is not None:
                p["throughput"] = {"samples_per_s": rec["samples_per_s"], "seconds_per_step": rec["seconds_per_step"],
                                   "tflops": rec["tflops"], "mfu": rec["mfu"], "measured_at_step": rec["step"]}
            for a in p["attempts"]:
                if a["id"] == self.attempt_id:
                    a.update(elapsed_s=float(elapsed), step_end=self.step)
                    a["gpu_hours"] = attempt_gpu_hours(a)
                    if end_state is not None:
                        a.update(exit_state=end_state, end=now_iso())

        self.manifest.update_phase(self.phase_name, f)

    # ------------------------------------------------------------------ the loop
    def _save(self, temperature) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(self.engine, self.manifest.run_dir, self.phase_name, self.step,
                        loader_state=self.loader.state_dict(), temperature=temperature, manifest=self.manifest,
                        keep_last=self.phase.cadence.keep_last)
        if self.main:
            self._tick()

    def _budget_left(self) -> tuple[float | None, float]:
        """(the phase's budget, GPU-hours its earlier attempts used)."""
        m = self.manifest
        earlier = sum(a["gpu_hours"] for a in m.phase(self.phase_name)["attempts"] if a["id"] != self.attempt_id)
        return m.budget(self.phase_name), earlier

    def _loop(self) -> int:
        from tqdm import tqdm

        from .gradcache import train_step

        phase, rt, main, total = self.phase, self.rt, self.main, self.total
        cadence = phase.cadence
        budget, used_before = self._budget_left() if main else (None, 0.0)
        units = max(1, rt.world_size)  # GPUs, or CPU tasks, as the ledger counts them
        peak = peak_flops(rt.device, rt.dtype)
        writer = _tensorboard(self.logs) if main else None
        bar = tqdm(total=total, initial=self.step, desc=self.phase_name, disable=not main, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        window = {"steps": 0, "seconds": 0.0, "samples": 0, "tokens": 0, "flops": 0.0}
        last_write = -math.inf
        temperature = None  # the loss's temperature as last used (recorded in checkpoints; none for distillation)
        first_step = self.step
        it = iter(self.loader)
        try:
            while self.step < total:
                t0 = time.perf_counter()
                batch = next(it)
                self.source = batch.source
                res = train_step(self.engine, batch, phase)
                self.step += 1
                bad = not math.isfinite(res.loss) or (res.grad_norm is not None and not math.isfinite(res.grad_norm))
                over = False
                if budget is not None and self.step < total:
                    per_step = (window["seconds"] + time.perf_counter() - t0) / (window["steps"] + 1)
                    over = used_before + (self.clock.elapsed() + per_step) * units / 3600.0 > budget
                # The one collective of the step: any rank's stop signal, rank 0's budget decision, FLOPs.
                flags = torch.tensor([float(bad), float(self.stop.signal is not None), float(over)],
                                     dtype=torch.float64)
                agreed = torch.cat([flags, self.flops.local(batch)]).to(rt.device)
                if tdist.is_initialized():
                    tdist.all_reduce(agreed)
                agreed = agreed.cpu()
                window["seconds"] += time.perf_counter() - t0  # training time only: saves and logging excluded
                window["steps"] += 1
                window["samples"] += res.n_queries
                window["tokens"] += res.n_tokens
                window["flops"] += self.flops.total(agreed[3:])

                if agreed[0] > 0:
                    return self._non_finite(res)
                if res.temperature is not None:
                    temperature = res.temperature
                if main:
                    bar.update(1)
                    bar.set_postfix(loss=f"{res.loss:.4f}", src=self.source, refresh=False)
                if main and (self.step % cadence.log_every == 0 or self.step == total):
                    self._log(res, window, peak, writer)
                    window = dict.fromkeys(window, 0)
                    if time.monotonic() - last_write >= MANIFEST_TICK_S:
                        last_write = time.monotonic()
                        self._tick()
                if agreed[1] > 0 or agreed[2] > 0:
                    return self._stop_at_checkpoint(temperature, over_budget=bool(agreed[1] == 0))
                if self.step % cadence.save_every == 0 and self.step < total:
                    self._save(temperature)
                if self.eval_due():
                    self._eval_in_training(writer)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if self.step > first_step:  # else the checkpoint of the last step exists: an earlier attempt saved it
            self._save(temperature)
        return EXIT_DONE

    def eval_due(self) -> bool:
        c, e = self.phase.cadence, self.phase.eval
        return bool(c.eval_every and e.in_training and self.step % c.eval_every == 0 and self.step < self.total)

    def _eval_in_training(self, writer) -> None:
        """Score the current weights on `eval.in_training` (small sets): every rank gathers the weights (collective
        under ZeRO-3), rank 0 evaluates a CPU copy on its device while the others wait for its outcome, which is
        broadcast: an evaluation that fails (a bad dataset) fails every rank at once instead of leaving them at a
        barrier. The RNG is restored afterwards, so a run with evaluations trains exactly like one without."""
        from .checkpoint import _on_rank0, _raise_everywhere, capture_rng_state, restore_rng_state
        from .export import gather_colbert

        model = gather_colbert(self.engine, self.init_path, self.recipe, self.phase_name)

        def score() -> None:
            from ..evaluate import evaluate

            rng = capture_rng_state()
            t0 = time.perf_counter()
            try:
                # Not a saved folder: the evaluator keeps these throw-away embeddings in a temp dir, not its cache.
                res = evaluate(f"{self.phase_name}@step{self.step}", self.phase.eval.in_training, model=model,
                               batch_size=self.phase.eval.batch_size, max_corpus=self.phase.eval.max_corpus,
                               device=str(self.rt.device), show_progress=False)
            finally:
                restore_rng_state(rng)
            rec = {"time": now_iso(), "phase": self.phase_name, "step": self.step, "attempt": self.attempt_id,
                   "seconds": round(time.perf_counter() - t0, 3), "average": res["average"],
                   "datasets": {n: {k: v for k, v in r.items() if k != "retrieval"} for n, r in res["datasets"].items()}}
            with open(self.logs / "eval.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if writer is not None:
                for name, r in res["datasets"].items():
                    writer.add_scalar(f"eval/{name}/ndcg@10", r["ndcg@10"], self.step)
                writer.add_scalar("eval/average/ndcg@10", res["average"]["ndcg@10"], self.step)
            short = {"step": self.step, "ndcg@10": {n: r["ndcg@10"] for n, r in res["datasets"].items()}}

            def add(p):  # a resumed attempt re-evaluates steps after its checkpoint: keep the newest per step
                p["in_training_eval"] = [e for e in p.get("in_training_eval") or [] if e["step"] != self.step]
                p["in_training_eval"].append(short)

            self.manifest.update_phase(self.phase_name, add)
            print(f"[colbertzero] phase {self.phase_name}: step {self.step} nDCG@10 "
                  + ", ".join(f"{n} {100 * r['ndcg@10']:.2f}" for n, r in res["datasets"].items()), file=sys.stderr)

        _raise_everywhere(_on_rank0(score, f"in-training evaluation of phase {self.phase_name} at step {self.step}"),
                          RuntimeError)

    def _log(self, res, window: dict, peak: float | None, writer) -> None:
        seconds = window["seconds"]
        rate = (lambda x: x / seconds) if seconds > 0 else (lambda x: None)
        flops_per_s = rate(window["flops"])
        rec = {
            "time": now_iso(), "phase": self.phase_name, "step": self.step, "total_steps": self.total,
            "loss": res.loss, "lr": res.lr, "temperature": res.temperature, "grad_norm": res.grad_norm,
            "samples_per_s": rate(window["samples"]), "tokens_per_s": rate(window["tokens"]),
            # MFU only against a known device peak (peak_flops); on CPU it is null and the achieved model TFLOP/s
            # (all ranks together) is still logged.
            "mfu": flops_per_s / (peak * self.rt.world_size) if flops_per_s is not None and peak else None,
            "tflops": flops_per_s / 1e12 if flops_per_s is not None else None,
            "source": self.source, "consumed": self.loader.consumed(), "attempt": self.attempt_id,
            "seconds_per_step": seconds / window["steps"] if window["steps"] else None,
        }
        with open(self.logs / "train.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if writer is not None:
            for key in ("loss", "lr", "temperature", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "tflops"):
                if rec[key] is not None:
                    writer.add_scalar(f"train/{key}", rec[key], self.step)
            for src, rows in rec["consumed"].items():
                writer.add_scalar(f"consumed/{src}", rows, self.step)
        self.last_rec = rec

    def _non_finite(self, res) -> int:
        """Stop without saving: the newest checkpoint is the last good one. The weights already took this step's
        update, so nothing after it may be written."""
        what = f"loss {res.loss}" if not math.isfinite(res.loss) else f"gradient norm {res.grad_norm} (loss {res.loss})"
        if self.main:
            self._record_failure(f"non-finite {what}", None, "nan")
            print(f"[colbertzero] phase {self.phase_name}: non-finite {what} at step {self.step} (source "
                  f"{self.source}); stopped, the last good checkpoint is kept", file=sys.stderr)
        return EXIT_FAILED

    def _stop_at_checkpoint(self, temperature, over_budget: bool) -> int:
        self._save(temperature)
        if self.main:
            self._tick(end_state="over-budget" if over_budget else "requeue")
            if over_budget:
                self.manifest.set_state(self.phase_name, "over-budget")
            why = "over its GPU-hour budget" if over_budget else "interrupted by a signal"
            print(f"[colbertzero] phase {self.phase_name}: {why} at step {self.step}/{self.total}; checkpoint saved",
                  file=sys.stderr)
        return EXIT_OVER_BUDGET if over_budget else EXIT_REQUEUE

    def _finish(self) -> None:
        from .export import export_model, update_model_card

        phase, rt = self.phase, self.rt
        out = self.manifest.run_dir / "phases" / self.phase_name / "export"
        lineage = self.manifest.phase(self.phase_name).get("lineage", {})
        export_model(self.engine, self.init_path, out, recipe=self.recipe, phase_name=self.phase_name,
                     manifest=self.manifest, lineage=lineage, step=self.step)
        if rt.is_main:
            results = None
            if phase.eval.beir:
                from ..evaluate import evaluate

                results = evaluate(str(out), phase.eval.beir, batch_size=phase.eval.batch_size,
                                   max_corpus=phase.eval.max_corpus, device=str(rt.device))
                update_model_card(out, dict(results["datasets"]))
                (out.parent / "eval.json").write_text(json.dumps(results, indent=2))
            self.manifest.set_state(self.phase_name, "done", eval=results)
        if tdist.is_initialized():
            tdist.barrier()
