"""The phase runner: `colbertzero train RUN_DIR --phase P`, one process per GPU (or CPU task).

The three phases share this loop; the kind only changes the batch shape (the loader) and the loss (`losses.py`).

Exit codes tell the launcher what happened:
    0  EXIT_DONE         phase finished, exported (and evaluated)
    1  EXIT_FAILED       crash or non-finite loss (the phase is marked failed with step and source)
    3  EXIT_REQUEUE      stopped at a checkpoint on SIGUSR1/SIGTERM (time limit, preemption): requeue me
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

from ..manifest import Manifest, now_iso, resolve_init, sha256_file, sha256_tree
from ..models import resolve_model_ref

EXIT_DONE, EXIT_FAILED, EXIT_REQUEUE, EXIT_OVER_BUDGET = 0, 1, 3, 4


class StopFlag:
    """Set by SIGUSR1 / SIGTERM (Slurm's warning before the time limit, preemption); read once per step."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signal = signum


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
    return {
        "job_id": job,
        "executor": "slurm",
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "tasks": world,
        "attempt_id": f"{job}-{restarts}",
    }


def _build_model(init_path: str, recipe, phase, device):
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


def _all_max(value: float, device) -> float:
    """Max over ranks: every rank takes the same stop decision at the same step."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def _flops_per_step(n_params: int, res, phase, gradcache: bool) -> float:
    """Model FLOPs of one step: 6·N·tokens for forward+backward, +2·N·tokens for GradCache's extra no-grad forward,
    plus MaxSim (2·Lq·Ld·dim per query-document pair, scored forward and backward)."""
    tokens = res.n_tokens
    enc = (8.0 if gradcache else 6.0) * n_params * tokens
    return enc


def run_phase(run_dir: str, phase_name: str) -> int:
    from .. import preflight
    from ..data.loader import GlobalBatchLoader
    from .checkpoint import load_latest_checkpoint, save_checkpoint
    from .dist import init_distributed, teardown
    from .engine import build_engine
    from .export import export_model
    from .gradcache import train_step
    from .module import ColBERTForTraining

    manifest = Manifest(run_dir)
    recipe = manifest.recipe()
    phase = recipe.phase(phase_name)
    stop = StopFlag()
    stop.install()
    rt = init_distributed(bf16=phase.bf16)
    main = rt.is_main
    info = _job_info(phase)
    t_start = time.time()
    attempt_id = info.pop("attempt_id")
    step = 0
    source = None
    try:
        torch.manual_seed(phase.seed)
        init_ref = resolve_init(manifest, recipe, phase_name)
        init_path = resolve_model_ref(init_ref)
        colbert = _build_model(init_path, recipe, phase, rt.device)
        module = ColBERTForTraining.for_phase(colbert, phase)
        loader = GlobalBatchLoader(recipe, phase_name, rt.rank, rt.world_size)
        total = loader.total_steps
        if total <= 0:
            raise RuntimeError(
                f"phase {phase_name!r}: the prepared data gives 0 optimizer steps at global batch "
                f"{phase.global_batch_size}; lower the batch or add data"
            )
        engine, _, _ = build_engine(module, phase, total, runtime=rt)
        state = load_latest_checkpoint(engine, run_dir, phase_name, manifest)
        if state is not None:
            step = int(state["step"])
            loader.load_state_dict(state["loader"])
        if main:
            manifest.start_attempt(phase_name, attempt_id=attempt_id, step_start=step, **info)
            _lineage(manifest, recipe, phase_name, init_ref, init_path, loader)
            manifest.update_phase(phase_name, lambda p: p.update(total_steps=total, failure=None))
        code = _loop(engine, loader, manifest, recipe, phase_name, step, total, stop, rt, attempt_id, t_start)
        step = code[1]
        source = code[2]
        code = code[0]
        if code == EXIT_DONE:
            _finish(engine, manifest, recipe, phase_name, init_path, step, rt)
        return code
    except Exception as e:  # recorded for the launcher and the user, then re-raised for the traceback
        if main:
            manifest.set_state(phase_name, "failed", failure={
                "step": step, "source": source, "reason": f"{type(e).__name__}: {e}", "time": now_iso(),
                "traceback": traceback.format_exc(limit=8)})
            _close_attempt(manifest, phase_name, attempt_id, step, t_start, "failed")
        raise
    finally:
        teardown()


def _lineage(manifest, recipe, phase_name, init_ref, init_path, loader) -> None:
    ph = recipe.phase(phase_name)
    idx = [Path(ph.data.shards_dir) / s.name / "index.json" for s in ph.data.sources]
    lineage = {
        "init": init_ref,
        "init_sha256": sha256_tree(init_path) if os.path.isdir(init_path) else None,
        "data_index": [str(p) for p in idx],
        "data_index_sha256": [sha256_file(p) if p.exists() else None for p in idx],
        "config_hash": recipe.hash(),
    }
    manifest.update_phase(phase_name, lambda p: p.update(lineage=lineage))


def _close_attempt(manifest, phase_name, attempt_id, step, t_start, state) -> None:
    try:
        manifest.tick_attempt(phase_name, attempt_id, step=step, elapsed_s=_elapsed(t_start), end_state=state)
    except Exception:  # never mask the original failure
        pass


def _elapsed(t_start: float) -> float:
    """Seconds this attempt has run: Slurm's clock for the job when inside one, else this process's."""
    if os.environ.get("SLURM_JOB_ID"):
        try:
            from ..launch.slurm_env import job_elapsed_seconds

            s = job_elapsed_seconds()
            if s is not None:
                return float(s)
        except Exception:
            pass
    return time.time() - t_start


def _loop(engine, loader, manifest, recipe, phase_name, step, total, stop, rt, attempt_id, t_start):
    from tqdm import tqdm

    from .checkpoint import save_checkpoint
    from .gradcache import train_step

    phase = recipe.phase(phase_name)
    main = rt.is_main
    log_dir = manifest.run_dir / "phases" / phase_name / "logs"
    if main:
        log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "train.jsonl"
    n_params = sum(p.numel() for p in engine.module.parameters()) or 1
    budget = manifest.budget(phase_name)
    used_before = manifest.gpu_hours(phase_name) - (
        sum(a["gpu_hours"] for a in manifest.phase(phase_name)["attempts"] if a["id"] == attempt_id))
    gpus = max(1, rt.world_size)
    bar = tqdm(total=total, initial=step, desc=phase_name, disable=not main, dynamic_ncols=True)
    window_t, window_samples, window_tokens = time.time(), 0, 0
    step_times: list[float] = []
    source = None

    def save(at_step):
        temp = engine_temperature
        save_checkpoint(engine, manifest.run_dir, phase_name, at_step, loader_state=loader.state_dict(),
                        temperature=temp, manifest=manifest, keep_last=phase.cadence.keep_last)
        if main:
            manifest.tick_attempt(phase_name, attempt_id, step=at_step, elapsed_s=_elapsed(t_start))

    engine_temperature = phase.temperature
    it = iter(loader)
    while step < total:
        t0 = time.time()
        batch = next(it)
        source = batch.source
        res = train_step(engine, batch, phase)
        step += 1
        dt = time.time() - t0
        step_times.append(dt)
        engine_temperature = res.temperature
        window_samples += res.n_queries
        window_tokens += res.n_tokens
        bad = 0.0 if math.isfinite(res.loss) else 1.0
        if _all_max(bad, rt.device) > 0:
            if main:
                manifest.set_state(phase_name, "failed", failure={
                    "step": step, "source": source, "reason": f"non-finite loss {res.loss}", "time": now_iso()})
                _close_attempt(manifest, phase_name, attempt_id, step - 1, t_start, "nan")
            print(f"[colbertzero] phase {phase_name}: non-finite loss at step {step} (source {source}); "
                  f"stopped, the last good checkpoint is kept", file=sys.stderr)
            return EXIT_FAILED, step, source
        if main:
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.4f}", src=source)
        if main and (step % phase.cadence.log_every == 0 or step == total):
            el = time.time() - window_t
            rec = {
                "time": now_iso(), "phase": phase_name, "step": step, "total_steps": total,
                "loss": res.loss, "lr": res.lr, "temperature": res.temperature, "grad_norm": res.grad_norm,
                "samples_per_s": window_samples / el if el > 0 else None,
                "tokens_per_s": window_tokens / el if el > 0 else None,
                "mfu": None, "source": source, "consumed": loader.consumed() if hasattr(loader, "consumed") else None,
                "attempt": attempt_id, "seconds_per_step": sum(step_times) / len(step_times),
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            window_t, window_samples, window_tokens = time.time(), 0, 0
            manifest.update_phase(phase_name, lambda p: p.update(throughput={
                "samples_per_s": rec["samples_per_s"], "seconds_per_step": rec["seconds_per_step"],
                "measured_at_step": step}))
        # One collective per step decides for every rank: a signal, or the budget about to be crossed.
        sps = sum(step_times[-20:]) / len(step_times[-20:])
        projected = used_before + (_elapsed(t_start) + sps) * gpus / 3600.0
        over = 1.0 if (budget is not None and projected > budget and step < total) else 0.0
        sig = 1.0 if stop.signal is not None else 0.0
        flags = _all_max(sig * 2 + over, rt.device)
        if flags >= 2 or flags == 1:
            save(step)
            if main:
                st = "over-budget" if flags == 1 else "interrupted"
                _close_attempt(manifest, phase_name, attempt_id, step, t_start,
                               "over-budget" if flags == 1 else "requeue")
                if flags == 1:
                    manifest.set_state(phase_name, "over-budget")
                print(f"[colbertzero] phase {phase_name}: {st} at step {step}/{total}; checkpoint saved", file=sys.stderr)
            return (EXIT_OVER_BUDGET if flags == 1 else EXIT_REQUEUE), step, source
        if step % phase.cadence.save_every == 0 and step < total:
            save(step)
    bar.close()
    save(step)
    if main:
        _close_attempt(manifest, phase_name, attempt_id, step, t_start, "completed")
    return EXIT_DONE, step, source


def _finish(engine, manifest, recipe, phase_name, init_path, step, rt) -> None:
    from .export import export_model, update_model_card

    phase = recipe.phase(phase_name)
    out = manifest.run_dir / "phases" / phase_name / "export"
    lineage = manifest.phase(phase_name).get("lineage", {})
    export_model(engine, init_path, out, recipe=recipe, phase_name=phase_name, manifest=manifest,
                 lineage=lineage, step=step)
    if rt.is_main:
        results = None
        if phase.eval.beir:
            from ..evaluate import evaluate

            results = evaluate(str(out), phase.eval.beir, batch_size=phase.eval.batch_size,
                               max_corpus=phase.eval.max_corpus, device=str(rt.device))
            update_model_card(out, {k: v for k, v in results["datasets"].items()})
            (manifest.run_dir / "phases" / phase_name / "eval.json").write_text(json.dumps(results, indent=2))
        manifest.set_state(phase_name, "done", eval=results)
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
