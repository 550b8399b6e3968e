"""`colbertzero demo`: the whole pipeline on CPU in a few minutes, with nothing from a hub.

prepare → unsupervised → supervised → distillation → evaluate (after every phase) → report, with the local executor,
on `recipes/tiny-cpu.yaml` whose data sections are pointed at a data set built from Python's own documentation
(`demo_data.py`). The recipe written into the output folder is that derivation (`extends:` the tiny recipe), so the
run is reproducible with `colbertzero launch OUT/recipe.yaml --run-dir …`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

# Steps per phase in the demo: enough for the curves to move, short enough for 2 CPU cores.
DEMO_STEPS = {"unsupervised": 24, "supervised": 12, "distillation": 12}


def tiny_recipe_path() -> Path:
    here = Path(__file__).resolve().parent
    for p in (here.parent / "recipes" / "tiny-cpu.yaml", here / "recipes" / "tiny-cpu.yaml"):
        if p.exists():
            return p
    raise FileNotFoundError("recipes/tiny-cpu.yaml not found beside the package; run from a clone of the repository")


def demo_recipe(out: Path, data: dict, model: str) -> dict:
    """The tiny recipe with the demo data, shards and step counts; everything else as tiny-cpu.yaml says."""
    beir = [str(data["beir"])]
    pairs = [{"name": s, "path": str(p), "columns": {"query": "query", "document": "document"}}
             for s, p in sorted(data["pairs"].items())]
    triples = [{"name": "pydocs", "path": str(data["triples"]),
                "columns": {"query": "query", "positive": "pos", "negatives": "neg"}}]
    distill = [{"name": "pydocs", "path": str(data["distill"]),
                "columns": {"query": "query", "documents": "pos,neg", "scores": "pos_scores,neg_scores"}}]
    sources = {"unsupervised": pairs, "supervised": triples, "distillation": distill}
    phases = {}
    for name, srcs in sources.items():
        phases[name] = {
            "data": {"shards_dir": str(out / "shards" / name), "sources": srcs},
            "eval": {"beir": beir, "max_corpus": None},
            "max_steps": DEMO_STEPS[name],
        }
    phases["unsupervised"]["init"] = f"builtin:{model}"
    return {"extends": str(tiny_recipe_path()), "name": f"tiny-cpu-demo-{model}", "phases": phases}


def run_demo(out_dir: str = "runs/demo", model: str = "minilm") -> int:
    from .demo_data import build_demo_data
    from .launch.chain import launch
    from .manifest import Manifest
    from .report import build_report, status_table

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[demo] building the demo data set from Python's documentation → {out / 'data'}")
    data = build_demo_data(out / "data")
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(demo_recipe(out, data, model), sort_keys=False))
    run_dir = out / "run"
    print(f"[demo] recipe {recipe_path} (extends {tiny_recipe_path()}); run dir {run_dir}")
    code = launch(str(recipe_path), str(run_dir), executor="local")
    if code != 0:
        print(f"[demo] the pipeline stopped (exit {code}); `colbertzero status {run_dir}` shows where", file=sys.stderr)
        return code
    report = build_report([str(run_dir)])
    m = Manifest(run_dir)
    last = list(m.read()["phases"])[-1]
    print()
    print(status_table(m.read()))
    print()
    print(f"[demo] done in {time.time() - t0:.0f} s")
    print(f"  run dir : {run_dir}")
    print(f"  model   : {m.export_path(last)}   (pylate.models.ColBERT(path) loads it)")
    print(f"  report  : {report}")
    print(f"  status  : colbertzero status {run_dir}")
    return 0
