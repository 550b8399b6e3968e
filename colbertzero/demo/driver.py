"""`colbertzero demo`: the whole pipeline on CPU in a few minutes, with nothing from a hub.

prepare → unsupervised → supervised → distillation → evaluate (the starting model, then after every phase) → report,
with the local executor, on `recipes/tiny-cpu.yaml` whose data sections are pointed at a data set built from Python's
own documentation (`demo/data.py`). The recipe written into the output folder is that derivation (`extends:` the
tiny recipe), so the run is reproducible with `colbertzero launch OUT/recipe-MODEL.yaml --run-dir …`.

Layout of ``--out`` (one run per model, the data shared)::

    OUT/data/                      the demo data set (BEIR folder for evaluation under data/beir/pydocs)
    OUT/derived/                   supervised and distillation data made from it by `mine` and `score`
    OUT/recipe-<model>.yaml        the recipe the run uses
    OUT/<model>/run/               the run dir (manifest, phases, report/, eval-init.json)
    OUT/<model>/shards/<phase>/    tokenized shards
    OUT/cache/                     document embeddings of the evaluations (safe to delete)

Running the demo again with the same ``--out`` continues an interrupted run from its newest checkpoints, or says
the run is complete and rewrites the report.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ..files import atomic_write_json
from ..layout import RunLayout
from ..manifest import Manifest, ManifestError
from ..models import colbert_for, resolve_model_ref
from ..recipe import load_recipe
from ..report import build_report, status_table
from .derived import recipe_sources

MODELS = {"minilm": "builtin:minilm", "tiny-modernbert": "builtin:tiny-modernbert"}

# Optimizer steps per phase: enough for MiniLM to learn its 384→128 projection (+5 nDCG@10 over the fresh one on
# the held-out queries). A step takes ~1 s (contrastive) to ~2 s (distillation) of 2 idle CPU cores. Distillation:
# 48 steps over 256 scored queries at lr 1e-4 end above the supervised phase (64.98 vs 64.17, inside the noise of
# 200 queries); 16 steps over 64 at tiny-cpu's 3e-5 ended below it (63.85): docs/performance.md.
DEMO_STEPS = {"unsupervised": 40, "supervised": 16, "distillation": 48}
# What the demo changes in tiny-cpu.yaml besides data and steps. Supervised at tiny-cpu's lr (5e-5) undid most of
# what the unsupervised phase had taught MiniLM on the held-out queries (-4.8 nDCG@10 measured); at 2e-5 it keeps it.
# Distillation's KL to MiniLM's soft target (top-1 0.21 where uniform is 0.125) is a small loss; at 3e-5 the model
# barely moved from the supervised one.
DEMO_HYPERPARAMETERS = {"supervised": {"lr": 2.0e-5}, "distillation": {"lr": 1.0e-4}}
# tiny-cpu.yaml checkpoints every 4 steps and keeps 2; a MiniLM checkpoint with its
# optimizer state is ~350 MB, so the demo writes one every 10 steps and keeps the newest (a stop still saves one).
DEMO_CADENCE = {"save_every": 10, "keep_last": 1}
# Evaluation: the 200 held-out queries against their 200 answers plus 300 other documents of the corpus (~950 in
# all). Encoding the documents is most of an evaluation's cost, and the demo evaluates four models.
EVAL_MAX_CORPUS: int | None = 500


def tiny_recipe_path() -> Path:
    package = Path(__file__).resolve().parents[1]
    for p in (package.parent / "recipes" / "tiny-cpu.yaml", package / "recipes" / "tiny-cpu.yaml"):
        if p.exists():
            return p
    raise FileNotFoundError("recipes/tiny-cpu.yaml not found beside the package; run from a clone of the repository")


def demo_paths(out: Path, model: str) -> dict[str, Path]:
    return {
        "data": out / "data",
        "derived": out / "derived",
        "recipe": out / f"recipe-{model}.yaml",
        "run": out / model / "run",
        "shards": out / model / "shards",
        "cache": out / "cache",
    }


def demo_recipe(paths: dict[str, Path], data: dict, derived: dict, model: str) -> dict:
    """The tiny recipe with the demo data, shards, step counts, eval size, checkpoint cadence and
    DEMO_HYPERPARAMETERS; everything else as tiny-cpu.yaml says."""
    beir = [str(data["beir"])]
    pairs = [{"name": s, "path": str(p), "columns": {"query": "query", "document": "document"}}
             for s, p in sorted(data["pairs"].items())]
    sources = {"unsupervised": pairs, **recipe_sources(derived)}
    phases = {}
    for name, srcs in sources.items():
        phases[name] = {
            "data": {"shards_dir": str(paths["shards"] / name), "sources": srcs},
            "eval": {"beir": beir, "max_corpus": EVAL_MAX_CORPUS},
            "max_steps": DEMO_STEPS[name],
            "cadence": DEMO_CADENCE,
            **DEMO_HYPERPARAMETERS.get(name, {}),
        }
    phases["unsupervised"]["init"] = MODELS[model]
    return {
        "extends": str(tiny_recipe_path()),
        "name": f"tiny-cpu-demo-{model}",
        "description": f"colbertzero demo: tiny-cpu.yaml on the Python-documentation data set, {MODELS[model]}",
        # one tokenizing process per core: the demo data is a few thousand rows
        "prepare": {"workers": max(1, min(2, os.cpu_count() or 1))},
        "phases": phases,
    }


def _quiet_env(cache: Path) -> None:
    """Offline, and only the progress that matters (the phases' own bars); children inherit all of it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # The demo's evaluations are of throw-away models: keep their embeddings inside --out, not in ~/.cache.
    os.environ.setdefault("COLBERTZERO_EMBEDDINGS_CACHE", str(cache / "embeddings"))
    import torch  # after the settings above: libraries read them when imported

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed detects anyway, without its warning


# ---------------------------------------------------------------- the starting point
def evaluate_init(run_dir: str | os.PathLike, *, show_progress: bool = True) -> dict:
    """Evaluate the first phase's starting model on that phase's eval sets; cached in ``RUN_DIR/eval-init.json``.

    The model is built exactly as the phase runner builds it (same seed before the ColBERT head is created), so a
    fresh projection here is the one training starts from. The result is :func:`colbertzero.evaluate.evaluate`'s,
    plus ``phase``, ``init`` and ``recipe_hash`` (a cached file of another recipe is recomputed).
    """
    # torch, transformers and huggingface_hub read their settings when imported: after run_demo's _quiet_env.
    import torch

    from ..evaluate.sharded import copy_runs, evaluate_here, settings_for

    m = Manifest(run_dir)
    data = m.read()
    recipe = m.recipe()
    first = next(iter(recipe.phases))
    phase = recipe.phase(first)
    if phase.init_from is not None:
        raise ValueError(f"phase {first!r} starts from another phase; there is no separate starting model")
    if not phase.eval.beir:
        raise ValueError(f"phase {first!r} has no eval.beir datasets to evaluate the starting model on")
    path = m.layout.eval_init
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("recipe_hash") == data["recipe_hash"]:
                return cached
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: evaluate again
    # The built-in tiny model is created (with its own seed) before seeding, as it is already there for the runner.
    init_path = resolve_model_ref(phase.init)
    torch.manual_seed(phase.seed)
    colbert = colbert_for(recipe, first, init_path, "cpu")
    with tempfile.TemporaryDirectory(prefix="colbertzero-init-") as tmp:
        # Evaluated as the phases' exports are (eval.beir's settings, the same stages); both are thrown away.
        colbert.save(os.path.join(tmp, "model"))
        result = evaluate_here(os.path.join(tmp, "beir"), settings_for(phase.eval, os.path.join(tmp, "model")),
                               phase.eval.beir, show_progress=show_progress)
        copy_runs(Path(tmp, "beir", "runs"), m.layout.init_runs)
    result.update(model=f"{phase.init} (init of phase {first!r}, seed {phase.seed})", phase="init",
                  init=phase.init, recipe_hash=data["recipe_hash"])
    atomic_write_json(path, result)
    return result


def ndcg_by_stage(run_dir: str | os.PathLike) -> dict[str, dict[str, float | None]]:
    """``{dataset: {"init": x, phase: y, ...}}``, nDCG@10 in percent, from eval-init.json and the manifest."""
    run_dir = Path(run_dir)
    stages: list[tuple[str, dict | None]] = []
    init = RunLayout.of(run_dir).eval_init
    stages.append(("init", json.loads(init.read_text()) if init.is_file() else None))
    stages += [(n, p.get("eval")) for n, p in Manifest(run_dir).read()["phases"].items()]
    datasets = dict.fromkeys(ds for _, ev in stages for ds in ((ev or {}).get("datasets") or {}))
    out: dict[str, dict[str, float | None]] = {ds: {} for ds in datasets}
    for stage, ev in stages:
        for ds in datasets:
            v = (((ev or {}).get("datasets") or {}).get(ds) or {}).get("ndcg@10")
            out[ds][stage] = None if v is None else 100.0 * v
    return out


def format_stages(table: dict[str, dict[str, float | None]]) -> str:
    stages = list(dict.fromkeys(s for row in table.values() for s in row))
    width = max([len("dataset")] + [len(d) for d in table])
    lines = [f"{'nDCG@10':<{width}}  " + "  ".join(f"{s:>12}" for s in stages)]
    for ds, row in table.items():
        cells = [f"{row[s]:>12.2f}" if row.get(s) is not None else f"{'—':>12}" for s in stages]
        lines.append(f"{ds:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------- the command
def run_demo(out_dir: str = "runs/demo", model: str = "minilm") -> int:
    if model not in MODELS:
        print(f"colbertzero demo: --model {model!r}: one of {', '.join(MODELS)}", file=sys.stderr)
        return 2
    out = Path(out_dir).resolve()
    paths = demo_paths(out, model)
    _quiet_env(paths["cache"])

    # After _quiet_env: huggingface_hub and transformers read their offline/verbosity settings when imported.
    from ..launcher.api import launch
    from .data import build_demo_data
    from .derived import derive_demo_data

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[demo] demo data from Python's documentation → {paths['data']}", flush=True)
    data = build_demo_data(paths["data"])
    print("[demo] supervised and distillation data, derived from the pairs:", flush=True)
    derived = derive_demo_data(data, paths["derived"], log=lambda line: print(f"  $ {line}", flush=True))
    paths["recipe"].write_text(yaml.safe_dump(demo_recipe(paths, data, derived, model), sort_keys=False))
    run_dir = paths["run"]
    print(f"[demo] recipe {paths['recipe']} (extends {tiny_recipe_path()})", flush=True)
    try:
        m = Manifest.create(run_dir, load_recipe(paths["recipe"]))
    except ManifestError as e:
        # The same --out with another configuration (an edited tiny-cpu.yaml, another Python's docstrings).
        print(f"colbertzero demo: {e}\n  {out} holds an earlier demo run of another configuration: give another "
              f"--out, or delete {paths['run'].parent}", file=sys.stderr)
        return 2
    done = all(p["state"] == "done" for p in m.read()["phases"].values())
    print(f"[demo] run dir {run_dir}" + (" (complete: nothing to train)" if done else ""), flush=True)

    print(f"[demo] evaluating the starting model ({MODELS[model]}, fresh ColBERT projection)", flush=True)
    init = evaluate_init(run_dir)
    print(f"[demo] init nDCG@10 {100 * init['average']['ndcg@10']:.2f} → {RunLayout.of(run_dir).eval_init}", flush=True)

    code = launch(str(paths["recipe"]), str(run_dir), executor="local", wait=True).returncode
    if code != 0:
        print(f"[demo] the pipeline stopped (exit {code}); `colbertzero status {run_dir}` shows where; run the same "
              f"command again to continue from the newest checkpoint", file=sys.stderr)
        return code
    report = build_report([str(run_dir)])
    data_m = m.read()
    last = list(data_m["phases"])[-1]
    print()
    print(status_table(data_m))
    print()
    print(format_stages(ndcg_by_stage(run_dir)))
    print()
    print(f"[demo] done in {time.time() - t0:.0f} s")
    print(f"  run dir : {run_dir}")
    print(f"  model   : {m.export_path(last)}   (pylate.models.ColBERT(path) loads it)")
    print(f"  report  : {report}")
    print(f"  init    : {RunLayout.of(run_dir).eval_init}   (the starting model's evaluation)")
    print(f"  status  : colbertzero status {run_dir}")
    return 0
