"""Export a trained phase as a PyLate model folder: ``pylate.models.ColBERT(out_dir)`` loads it offline.

Which weights: the fp32 master weights wherever DeepSpeed keeps them (``deepspeed.utils.safe_get_full_fp32_param``:
the optimizer's fp32 partitions under ZeRO-1/2/3 and under bf16 mixed precision), gathered in memory across ranks;
where there is no separate master copy (fp32 training at ZeRO-0, a plain module) the module's own parameters. So a
bf16 run on GPU exports fp32 weights, and a CPU fp32 run exports exactly the trained weights at every ZeRO stage.
Reading the module directly is not enough: under ZeRO-1/2 its parameters are views of one flat buffer (safetensors
refuses them) and under ZeRO-3 they are empty partitions; DeepSpeed's 16-bit consolidation would lose the fp32
master, and zero_to_fp32 needs a checkpoint on disk first.

The folder is written by PyLate's own ``ColBERT.save`` from a plain CPU model built from the phase's init (the
"template": same architecture and tokenizer, with the [Q]/[D] tokens) holding the gathered weights; the recipe sets
its prompts (names ``query`` / ``document``), prefixes, effective lengths and query expansion, so the saved
``config_sentence_transformers.json`` carries them. Rank 0 writes into a temp folder and renames it into place, then
sets the phase's ``export`` entry in the manifest. The ``README.md`` model card has the lineage and, once known, the
eval results as ``model-index`` metadata in PyLate's style.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
from pathlib import Path
from typing import Any

import deepspeed
import torch
import yaml
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import safe_get_full_fp32_param
from huggingface_hub import EvalResult, ModelCardData
from pylate.models import ColBERT
from torch import nn

from .. import ledger
from ..files import atomic_write_bytes, folder_replacing, fsync_tree, now_iso, sha256_tree, writes_in_progress
from ..manifest import Manifest
from ..models import colbert_for, settings_for
from . import dist
from .checkpoint import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

CARD_KEY = "colbertzero"  # the model card's metadata block holding the lineage (read back by update_model_card)
# PyLate's retrieval evaluators appear in model-index under this task (as on PyLate models' cards).
TASK_TYPE, TASK_NAME = "py-late-information-retrieval", "Py Late Information Retrieval"


class ExportError(RuntimeError):
    pass


# ---------------------------------------------------------------- gathering the weights
def _unwrap(engine_or_module) -> nn.Module:
    return engine_or_module.module if isinstance(engine_or_module, DeepSpeedEngine) else engine_or_module


def _full_param(p: nn.Parameter) -> torch.Tensor:
    """The whole parameter, fp32 master where DeepSpeed keeps one. Collective under ZeRO: every rank calls it."""
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        full = safe_get_full_fp32_param(p)  # None for a ZeRO-3 parameter that is not trained
        if full is not None:
            return full
    if hasattr(p, "ds_id"):
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone()
    return p.detach()


def consolidated_state_dict(engine_or_module, *, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
    """The full state dict of the trained module as contiguous CPU tensors (fp32 master weights where available).

    Every rank must call it (ZeRO gathers are collective); rank 0 gets the dict, other ranks ``None`` unless
    ``all_ranks``. Keys are the module's ``state_dict`` keys (parameters shared under two names appear under both).
    """
    module = _unwrap(engine_or_module)
    keep = all_ranks or dist.rank() == 0
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for key, t in module.state_dict(keep_vars=True).items():  # same order on every rank
        if isinstance(t, nn.Parameter):
            if id(t) not in done:
                done[id(t)] = _full_param(t).detach().to("cpu").clone(memory_format=torch.contiguous_format)
            v = done[id(t)]
        else:
            v = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        if keep:
            out[key] = v
    return out if keep else None


def _colbert_prefix(module: nn.Module) -> str:
    """Where the PyLate model sits in the trained module ("" when the module is the ColBERT itself)."""
    for name, m in module.named_modules():
        if isinstance(m, ColBERT):
            return f"{name}." if name else ""
    raise TypeError(f"{type(module).__name__} holds no pylate.models.ColBERT; nothing to export")


# ---------------------------------------------------------------- the PyLate folder
def trained_colbert(full: dict[str, torch.Tensor], prefix: str, model_template, recipe, phase_name: str):
    """A plain CPU ColBERT holding the consolidated weights ``full`` (keys under ``prefix``), configured as the
    recipe's phase says: what the export saves, and what in-training evaluation scores. Leaves the RNG untouched."""
    weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    rng = capture_rng_state()  # building the template may draw random numbers (new [Q]/[D] embedding rows)
    try:
        container = colbert_for(recipe, phase_name, model_template, "cpu")
    except ValueError as e:
        raise ExportError(f"cannot build the export from {model_template!r}: {e}") from None
    finally:
        restore_rng_state(rng)
    if all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point()):
        container.float()  # the init may be stored in 16 bits; keep the fp32 master weights exact
    try:
        container.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ExportError(f"the trained weights do not fit the model built from {model_template!r}: {e}") from None
    return container


def gather_colbert(engine_or_module, model_template, recipe, phase_name: str):
    """The current weights as a plain CPU ColBERT (see trained_colbert) on rank 0, None on the others; every rank
    must call it (the gather is collective)."""
    full = consolidated_state_dict(engine_or_module)
    if full is None:
        return None
    return trained_colbert(full, _colbert_prefix(_unwrap(engine_or_module)), model_template, recipe, phase_name)


def export_model(
    engine_or_module,
    model_template,
    out_dir: str | os.PathLike,
    *,
    recipe,
    phase_name: str,
    manifest: Manifest | None,
    lineage: dict,
    eval_results: dict | None = None,
    step: int | None = None,
) -> Path:
    """Write the trained model as a PyLate folder at ``out_dir``; every rank must call it (the gather is collective).

    ``model_template``: the model the phase started from — its path (what ``resolve_init`` gives), or a plain
    (not DeepSpeed-managed) ``ColBERT`` of the same architecture, which is copied, not changed.
    ``lineage``: the phase's lineage (``init``, ``init_sha256``, ``data_index``, ``data_index_sha256``,
    ``config_hash``; other keys are shown too). ``eval_results``: ``{dataset: {metric: value}}`` or ``None``.
    ``step``: the optimizer step exported (default: the engine's ``global_steps``).
    With a manifest, rank 0 records ``phases.<phase>.export``. Returns ``out_dir`` on every rank.
    """
    recipe.phase(phase_name)  # fail early on an unknown phase, on every rank
    if step is None:
        step = getattr(engine_or_module, "global_steps", None)
        if step is None:
            raise ValueError("step is required when exporting a plain module")
    step = int(step)
    if eval_results is not None:
        eval_results = _clean_eval_results(eval_results)
    module = _unwrap(engine_or_module)
    prefix = _colbert_prefix(module)
    zero_stage = (int(engine_or_module.zero_optimization_stage())
                  if hasattr(engine_or_module, "zero_optimization_stage") else 0)
    full = consolidated_state_dict(engine_or_module)
    out = Path(out_dir).resolve()

    def write():
        # Small tensors outside the PyLate model (the learnable temperature) are recorded in the card.
        others = {k: v.flatten().tolist() for k, v in full.items() if not k.startswith(prefix) and v.numel() <= 16}
        container = trained_colbert(full, prefix, model_template, recipe, phase_name)
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in container.parameters()})

        for stale in writes_in_progress(out):  # left by a killed exporter
            shutil.rmtree(stale, ignore_errors=True)
        with folder_replacing(out) as tmp:
            container.save(str(tmp), create_model_card=False, safe_serialization=True)
            rp = recipe.phase(phase_name)
            info = {
                "recipe": recipe.name,
                "recipe_hash": recipe.hash(),
                "phase": phase_name,
                "kind": rp.kind,
                "step": step,
                "lineage": dict(lineage),
                "gpu_hours_phase": None,
                "gpu_hours_run": None,
                "weights_dtype": ",".join(dtypes),
                "zero_stage": zero_stage,
                "world_size": dist.world(),
                "time": now_iso(),
                "settings": _card_settings(recipe, phase_name, container),
                "other_parameters": others,
            }
            if manifest is not None:
                data = manifest.read()
                info["total_steps"] = data["phases"][phase_name].get("total_steps")
                info["gpu_hours_phase"] = round(ledger.phase_gpu_hours(data, phase_name), 4)
                info["gpu_hours_run"] = round(ledger.run_gpu_hours(data), 4)
            atomic_write_bytes(tmp / "README.md", render_model_card(info, eval_results).encode())
            fsync_tree(tmp)
            sha = sha256_tree(tmp)
        if manifest is not None:
            entry = {"path": manifest.layout.relative(out), "step": step, "sha256": sha, "time": now_iso()}
            manifest.update_phase(phase_name, lambda p: p.__setitem__("export", entry))
        return str(out)

    result = dist.rank0_outcome(write, f"exporting phase {phase_name!r} to {out}", ExportError)
    dist.barrier()
    return Path(result)


def _card_settings(recipe, phase_name: str, container) -> dict:
    """The settings block of the card (how to use the model), from the same settings the model was built with."""
    s = settings_for(recipe, phase_name)
    prompts = {"query": s.query_prompt, "document": s.document_prompt} if s.query_prompt or s.document_prompt else {}
    return {"prompts": prompts, "query_prefix": s.query_prefix, "document_prefix": s.document_prefix,
            "query_length": s.query_length, "document_length": s.document_length,
            "do_query_expansion": s.do_query_expansion, "attend_to_expansion_tokens": s.attend_to_expansion_tokens,
            "skiplist_punctuation": s.skiplist_punctuation, "embedding_size": container[-1].out_features}


# ---------------------------------------------------------------- the model card
def _clean_eval_results(eval_results: dict) -> dict:
    """``{dataset: {metric: value}}`` made YAML/JSON-safe: metrics as floats, counts as ints, anything else as text."""
    if not isinstance(eval_results, dict) or not all(isinstance(v, dict) for v in eval_results.values()):
        raise ValueError("eval_results must be {dataset: {metric: value}}, e.g. {'scifact': {'ndcg@10': 0.71}}")

    def clean(v):
        if _metric(v) is not None:
            return _metric(v)
        return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else str(v)

    return {str(d): {str(k): clean(v) for k, v in ms.items()} for d, ms in eval_results.items()}


def _metric(v: Any) -> float | None:
    """A metric is a finite real that is not an integer: evaluate's scores are floats, its counts (queries,
    documents) ints, which stay in the card's eval block but are not reported as metrics."""
    if isinstance(v, numbers.Integral) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        return None
    return float(v)


def render_model_card(info: dict, eval_results: dict | None) -> str:
    """README.md: YAML metadata (PyLate's tags, the lineage block, model-index) and a short human-readable body."""
    name = f"{info['recipe']}-{info['phase']}"
    results = []
    for dataset, metrics in (eval_results or {}).items():
        for metric, value in metrics.items():
            if (x := _metric(value)) is None:
                continue  # counts and notes are not metrics
            metric_type = f"MaxSim_{metric}"
            results.append(EvalResult(
                task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=dataset, dataset_name=dataset,
                metric_type=metric_type, metric_value=x, metric_name=metric_type.replace("_", " ").title(),
            ))
    data = ModelCardData(
        model_name=name,
        library_name="PyLate",
        pipeline_tag="sentence-similarity",
        tags=["ColBERT", "PyLate", "sentence-transformers", "sentence-similarity", "feature-extraction", "colbertzero"],
        eval_results=results or None,
        **{CARD_KEY: {**info, "eval": eval_results}},
    )
    s, lin = info["settings"], info["lineage"]
    steps = f"{info['step']}" + (f" of {info['total_steps']}" if info.get("total_steps") else "")

    def code(v):  # paths and hashes
        return None if v is None else f"`{v}`"

    rows = [
        ("init", code(lin.get("init"))),
        ("init sha256", code(lin.get("init_sha256"))),
        ("data shard index", code(lin.get("data_index"))),
        ("data index sha256", code(lin.get("data_index_sha256"))),
        ("recipe", f"{info['recipe']} (hash `{info['recipe_hash']}`)"),
        ("phase", f"{info['phase']} ({info['kind']})"),
        ("config hash", code(lin.get("config_hash"))),
        ("optimizer steps", steps),
        ("GPU-hours (phase / run so far)", f"{info['gpu_hours_phase']} / {info['gpu_hours_run']}"),
        ("trained on", f"{info['world_size']} rank(s), ZeRO-{info['zero_stage']}; exported weights "
                       f"{info['weights_dtype']}"),
    ]
    known = {"init", "init_sha256", "data_index", "data_index_sha256", "config_hash"}
    rows += [(k, v) for k, v in lin.items() if k not in known]
    rows += [(k, v) for k, v in info.get("other_parameters", {}).items()]
    q_prompt = "prompt_name=\"query\", " if s["prompts"] else ""
    d_prompt = "prompt_name=\"document\", " if s["prompts"] else ""
    body = [
        f"# {name}",
        "",
        f"A ColBERT (multi-vector) retrieval model: phase `{info['phase']}` ({info['kind']}) of the colbertzero "
        f"recipe `{info['recipe']}`, in PyLate's format.",
        "",
        "```python",
        "from pylate import models",
        "",
        'model = models.ColBERT("path/to/this/folder")',
        f'queries = model.encode(["what is late interaction?"], is_query=True, {q_prompt}batch_size=32)',
        f'documents = model.encode(["ColBERT scores with MaxSim."], is_query=False, {d_prompt}batch_size=32)',
        "```",
        "",
        "## Lineage",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {'' if v is None else v} |" for k, v in rows],
        "",
        "## Settings",
        "",
        f"- prompts: {s['prompts'] or 'none'}",
        f"- prefixes: query `{s['query_prefix']}`, document `{s['document_prefix']}`",
        f"- lengths (prompt tokens included): query {s['query_length']}, document {s['document_length']}",
        f"- query expansion: {s['do_query_expansion']}, attend to expansion tokens: {s['attend_to_expansion_tokens']}",
        f"- embedding size: {s['embedding_size']}",
        "",
    ]
    if eval_results:
        metrics = list(dict.fromkeys(m for ms in eval_results.values() for m in ms if _metric(ms[m]) is not None))
        body += ["## Evaluation", "", "| dataset | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for dataset, ms in eval_results.items():
            cells = [f"{ms[m]:.4f}" if _metric(ms.get(m)) is not None else "" for m in metrics]
            body.append(f"| {dataset} | " + " | ".join(cells) + " |")
        body.append("")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def read_card_info(out_dir: str | os.PathLike) -> dict:
    """The lineage block of an exported model's card (what :func:`export_model` wrote)."""
    path = Path(out_dir) / "README.md"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ExportError(f"{path}: no model card; is {out_dir} a colbertzero export?") from None
    parts = text.split("---\n", 2)
    meta = yaml.safe_load(parts[1]) if text.startswith("---\n") and len(parts) == 3 else None
    if not isinstance(meta, dict) or CARD_KEY not in meta:
        raise ExportError(f"{path}: no {CARD_KEY!r} block in its metadata; not written by colbertzero")
    return meta[CARD_KEY]


def update_model_card(out_dir: str | os.PathLike, eval_results: dict) -> Path:
    """Add (or replace) the eval results of an exported model's card; the weights are not touched."""
    eval_results = _clean_eval_results(eval_results)
    info = read_card_info(out_dir)
    info.pop("eval", None)
    path = Path(out_dir) / "README.md"
    atomic_write_bytes(path, render_model_card(info, eval_results).encode())
    return path
