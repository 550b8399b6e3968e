"""`colbertzero` command line: argument parsing, then one call into the module that does the work and owns its
messages (the checks, tables and summaries printed here are made there).

Each command imports its module when it runs, not at start-up: `plan`, `validate` and `status` answer on a login node
in a fraction of a second, without loading torch, DeepSpeed or PyLate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

from .recipe import RecipeError, load_recipe
from .runtime import Exit


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum, else argparse's own one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    return parse


def _recipe(args):
    return load_recipe(args.recipe, getattr(args, "overrides", None) or [], cluster=getattr(args, "cluster", None))


def _out(obj, as_json: bool, lines) -> int:
    """Print ``obj`` as JSON, or the human form: ``lines(obj)`` (a string or lines)."""
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        text = lines(obj)
        text = text if isinstance(text, str) else "\n".join(text)
        if text:
            print(text)
    return 0


# ------------------------------------------------------------------ plan, validate, status, report
def cmd_plan(args) -> int:
    from . import plan
    from .manifest import Manifest

    mdata = Manifest(args.run_dir).snapshot() if args.run_dir and Manifest(args.run_dir).exists() else None
    bench = plan.read_gpu_bench(args.gpu_bench) if args.gpu_bench else None
    return _out(plan.plan(_recipe(args), mdata, bench), args.json, plan.plan_table)


def cmd_validate(args) -> int:
    from . import preflight

    lines = preflight.validate(_recipe(args), args.recipe, paths=not args.no_path_checks, hashes=not args.no_hashes,
                               progress=sys.stderr.isatty())
    print("\n".join(lines))
    return 0


def cmd_status(args) -> int:
    from .report import live_states, read_run_manifest, status_json, status_table

    data = read_run_manifest(args.run_dir)  # lock-free: works on read-only or other people's run dirs
    live = live_states(data)  # helper jobs still open: Slurm's word on them
    return _out(status_json(data, live), args.json, lambda _: status_table(data, live))


def cmd_report(args) -> int:
    from .report import build_report

    print(f"report: {build_report(args.run_dirs, args.out)}")
    return 0


# ------------------------------------------------------------------ data
def cmd_prepare(args) -> int:
    from .data.prepare import index_recipe, prepare_recipe, verify_lines

    if args.array_task is not None and args.array_task >= args.array_tasks:
        raise RecipeError(f"--array-task {args.array_task}: outside 0..{args.array_tasks - 1} (--array-tasks "
                          f"{args.array_tasks}); Slurm's SLURM_ARRAY_TASK_ID is the task's number")
    recipe = _recipe(args)
    if args.index_only:  # after the array tasks: check every shard is there, write the indexes
        return _out(index_recipe(recipe, phases=args.phase or None), args.json, lambda _: [])
    shard_range = None if args.array_task is None else (args.array_task, args.array_tasks)
    summary = prepare_recipe(recipe, phases=args.phase or None, workers=args.workers, verify=args.verify,
                             shard_range=shard_range)
    return _out(summary, args.json, verify_lines if args.verify else lambda _: [])


def cmd_fetch(args) -> int:
    from .data.hub import fetch, fetch_lines

    report = fetch(_recipe(args), phases=args.phase or None, dry_run=args.dry_run, workers=args.workers)
    return _out(report, args.json, lambda r: fetch_lines(r, args.dry_run))


def _run_work(args, spec) -> int:
    """Local: the shards here (or one, --array-task), merging when none is left. Slurm: an array of the missing
    shards, the last task merging."""
    if args.executor == "slurm":
        from .launcher.work import array_options, submit_array, submitted_line

        opts = array_options(partition=args.partition, time=args.time, cpus_per_task=args.cpus_per_task,
                             gpus_per_task=args.gpus_per_task, mem=args.mem)
        r = submit_array(spec, args.out, args.shards, opts)
        return _out(r, args.json, lambda r: submitted_line(r, args.out, args.shards))
    from .mining import run_line, run_shards

    r = run_shards(spec, args.out, args.shards, task=args.array_task, show_progress=not args.json)
    return _out(r, args.json, lambda r: run_line(r, args.shards))


def cmd_mine(args) -> int:
    from .mining import MineSpec

    return _run_work(args, MineSpec(
        input=args.input, name=args.name, retriever=args.retriever, negatives=args.negatives, depth=args.depth,
        skip_top=args.skip_top, skip_overlapping=args.skip_overlapping, teacher=args.teacher, margin=args.margin,
        corpus=args.corpus, corpus_column=args.corpus_column, query_column=args.query_column,
        document_column=args.document_column, max_length=args.max_length))


def cmd_score(args) -> int:
    from .mining import ScoreSpec

    return _run_work(args, ScoreSpec(
        input=args.input, teacher=args.teacher, docs_per_query=args.docs_per_query, sample=args.sample,
        seed=args.seed, query_column=args.query_column, documents=args.documents, max_length=args.max_length,
        drop_short=args.drop_short, scale=args.scale, fusion=args.fusion))


# ------------------------------------------------------------------ inside jobs: train, after-phase, eval-job, chain
def cmd_train(args) -> int:
    from .runtime import HeldSignals

    held = HeldSignals()  # a stop signal while torch loads is kept for the runner, not fatal to this rank
    try:
        from .train.runner import run_phase

        return run_phase(args.run_dir, args.phase)
    finally:
        held.close()


def cmd_after_phase(args) -> int:
    from .launcher.requeue import after_phase_in_job

    return after_phase_in_job(args.run_dir, args.phase, args.exit_code)


def cmd_eval_job(args) -> int:
    from .manifest import Manifest
    from .train.evaluation import run_eval_job

    print(json.dumps(run_eval_job(Manifest(args.run_dir), args.phase, args.step, args.attempt)))
    return 0


def cmd_local_chain(args) -> int:
    from .launcher.local import run_chain

    return run_chain(args.run_dir, args.lock_fd)


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_table

    if args.teacher:  # a teacher (or a fusion) as a retriever: what distillation can at best pass on
        from .evaluate.dense import evaluate_teacher

        res = evaluate_teacher(args.model, args.beir, fusion=args.fusion, batch_size=args.batch_size,
                               max_corpus=args.max_corpus, runs_dir=args.runs_dir, cache=args.cache_dir)
        return _out(res, args.json, format_table)
    res = evaluate(args.model, args.beir, prompts=not args.no_prompts, batch_size=args.batch_size,
                   max_corpus=args.max_corpus, cache_dir=args.cache_dir, index=args.index, runs_dir=args.runs_dir)
    return _out(res, args.json, format_table)


def cmd_beir(args) -> int:
    from .evaluate import format_table
    from .evaluate.sharded import STAGES, Evaluation, Settings, evaluate_here, results

    ev = Evaluation(args.out)
    if args.stage:  # one stage (or one item of it) here: what an array task runs
        task = args.task
        if task is None and args.stage != "merge" and os.environ.get("SLURM_ARRAY_TASK_ID"):
            task = int(os.environ["SLURM_ARRAY_TASK_ID"])  # in an array task, its id is the item
        ran = ev.run(args.stage, task, show_progress=not args.json)
        return _out({"stage": args.stage, "ran": ran, "missing": ev.missing(args.stage)}, args.json,
                    lambda r: f"{r['stage']}: ran {len(r['ran'])} item(s); {len(r['missing'])} still to run")
    if not args.model and not args.datasets and ev.plan_path.is_file():  # the evaluation planned there: go on
        if args.executor == "slurm":
            return _beir_submit(args, ev)
        for stage in STAGES:
            ev.run(stage, show_progress=not args.json)
        return _out(results(args.out), args.json, format_table)
    if not args.model or not args.datasets:
        raise RecipeError("beir: give MODEL and --datasets (or only --out to go on with the evaluation planned there)")
    settings = Settings(model=os.path.abspath(args.model), prompts=not args.no_prompts, lengths=args.lengths,
                        dtype=args.dtype, shard_docs=args.shard_docs, k=args.k, batch_size=args.batch_size,
                        max_corpus=args.max_corpus, split=args.split)
    record = {"run_dir": os.path.abspath(args.run_dir), "phase": args.phase} if args.run_dir else None
    if args.executor == "slurm":
        ev.plan(settings, args.datasets, record=record)
        return _beir_submit(args, ev)
    res = evaluate_here(args.out, settings, args.datasets, show_progress=not args.json, record=record)
    return _out(res, args.json, format_table)


def _beir_submit(args, ev) -> int:
    from .launcher.work import array_options, submit_beir, submitted_beir_line
    from .recipe.loading import load_cluster

    opts = array_options(partition=args.partition, time=args.time, cpus_per_task=args.cpus_per_task,
                         gpus_per_task=args.gpus_per_task, mem=args.mem)
    profile = load_cluster(args.cluster) if args.cluster else None
    return _out(submit_beir(str(ev.out), opts, profile), args.json, submitted_beir_line)


# ------------------------------------------------------------------ launcher
def cmd_launch(args) -> int:
    from .launcher.api import launch

    run = launch(args.recipe, args.run_dir, overrides=args.overrides or [], executor=args.executor,
                 budget=args.budget, wait=args.wait, cluster=args.cluster)
    return run.returncode or 0


def cmd_resume(args) -> int:
    from .launcher.api import resume

    run = resume(args.run_dir, executor=args.executor, budget=args.budget, phase_budgets=args.phase_budget,
                 wait=args.wait)
    return run.returncode or 0


def cmd_cancel(args) -> int:
    from .launcher.api import cancel

    cancelled = cancel(args.run_dir)
    print(f"cancelled: {', '.join(cancelled)}" if cancelled else f"{args.run_dir}: nothing queued or running")
    return 0


def cmd_sbatch(args) -> int:
    from .launcher.sbatch import write_sbatch_scripts

    paths = write_sbatch_scripts(_recipe(args), args.run_dir, out_dir=args.out)
    print("\n".join(map(str, paths)))
    print(f"submit them chained with `bash {paths[-1]}`, or one by one with --dependency=afterok:JOBID "
          "(slurm/README.md)", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, model=args.model)


# ------------------------------------------------------------------ parser
def _recipe_args(sp) -> None:
    sp.add_argument("recipe", help="recipe YAML (see recipes/)")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. phases.supervised.lr=1e-5")
    sp.add_argument("--cluster", help="a cluster profile: a name in clusters/ or a path (the recipe's cluster.profile; "
                                      "docs/cluster.md)")


def _plan_commands(sub) -> None:
    sp = sub.add_parser("plan", help="resolved phases, hyper-parameters, resources and projected GPU-hours")
    _recipe_args(sp)
    sp.add_argument("--run-dir", help="use the throughput measured in this run dir")
    sp.add_argument("--gpu-bench", help="before a run: project from tools/bench/gpu.sh's gpu.json (pairs/s per GPU)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("validate", help="every check that needs no cluster; exits 2 and writes nothing on refusal")
    _recipe_args(sp)
    sp.add_argument("--no-path-checks", action="store_true", help="skip checks of local data/model paths")
    sp.add_argument("--no-hashes", action="store_true", help="skip the sha256 of prepared shards")
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("status", help="phases, state, steps, checkpoints, GPU-hours, last eval")
    sp.add_argument("run_dir")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("report", help="Markdown + PNG report of one or several run dirs")
    sp.add_argument("run_dirs", nargs="+")
    sp.add_argument("--out", default=None)
    sp.set_defaults(fn=cmd_report)


def _data_commands(sub) -> None:
    sp = sub.add_parser("prepare", help="tokenize each phase's sources into Arrow shards")
    _recipe_args(sp)
    sp.add_argument("--phase", action="append", help="only this phase (repeatable)")
    sp.add_argument("--workers", type=_at_least(1), default=max(1, min(8, os.cpu_count() or 1)))
    sp.add_argument("--verify", action="store_true", help="full sha256 check of existing shards")
    sp.add_argument("--array-task", type=_at_least(0), default=None,
                    help="Slurm array task id: do this share of the shards")
    sp.add_argument("--array-tasks", type=_at_least(1), default=1, help="number of array tasks")
    sp.add_argument("--index-only", action="store_true", help="after the array tasks: write the shard indexes")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_prepare)

    sp = sub.add_parser("fetch", help="download each source's Hub files (on a node with internet)")
    _recipe_args(sp)
    sp.add_argument("--phase", action="append", help="only this phase (repeatable)")
    sp.add_argument("--dry-run", action="store_true", help="list the files and sizes per source; download nothing")
    sp.add_argument("--workers", type=_at_least(1), default=8, help="parallel downloads")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_fetch)


def _work_args(sp) -> None:
    sp.add_argument("input", help="JSONL or parquet file, folder or glob of parquet shards, save_to_disk folder")
    sp.add_argument("--out", required=True, help="output folder (written whole when the last shard is done)")
    sp.add_argument("--query-column", default="query")
    sp.add_argument("--max-length", type=_at_least(8), default=None, help="tokens per text for dense/cross "
                    "encoders (default: the model's)")
    sp.add_argument("--shards", type=_at_least(1), default=1, help="query ranges (Slurm array tasks)")
    sp.add_argument("--array-task", type=_at_least(0), default=None,
                    help="run this shard only (in your own sbatch array: $SLURM_ARRAY_TASK_ID)")
    sp.add_argument("--executor", choices=["local", "slurm"], default="local")
    sp.add_argument("--partition", default=None, help="Slurm: partition of the array tasks")
    sp.add_argument("--time", default="1:00:00", help="Slurm: time limit of one array task")
    sp.add_argument("--cpus-per-task", type=_at_least(1), default=4)
    sp.add_argument("--gpus-per-task", type=_at_least(0), default=0)
    sp.add_argument("--mem", default=None)
    sp.add_argument("--json", action="store_true")


def _mining_commands(sub) -> None:
    sp = sub.add_parser("mine", help="hard negatives for (query, positive) pairs → the supervised layout")
    _work_args(sp)
    sp.add_argument("--name", required=True, help="the source name (the split and file name of the output)")
    sp.add_argument("--document-column", default="document", help="the positive (text or list: first is written)")
    sp.add_argument("--retriever", default="bm25", help="bm25, minilm, dense:PATH or colbert:PATH")
    sp.add_argument("--corpus", default=None, help="documents to mine from (default: the input's positives)")
    sp.add_argument("--corpus-column", default="text")
    sp.add_argument("--negatives", type=_at_least(1), default=8, help="negatives kept per query")
    sp.add_argument("--depth", type=_at_least(1), default=50, help="candidates ranked per query")
    sp.add_argument("--skip-top", type=_at_least(0), default=0, help="pass over the best K candidates")
    sp.add_argument("--skip-overlapping", action="store_true",
                    help="not a document that contains a positive or the query, or is contained in a positive")
    sp.add_argument("--teacher", default=None, help="false-negative filter: minilm, dense:PATH, colbert:PATH, "
                    "cross-encoder:PATH (with --margin)")
    sp.add_argument("--margin", type=float, default=None,
                    help="drop a negative the teacher scores above positive − MARGIN")
    sp.set_defaults(fn=cmd_mine)

    sp = sub.add_parser("score", help="teacher scores of each query's candidates → the distillation layout")
    _work_args(sp)
    sp.add_argument("--documents", default="document,negative", help="candidate columns, in order")
    sp.add_argument("--teacher", default="minilm", help="minilm, dense:PATH, colbert:PATH, cross-encoder:PATH, bm25; "
                    "several, comma-separated, are fused (--fusion)")
    sp.add_argument("--fusion", default="zsum", choices=["zsum", "rrf"],
                    help="several teachers: mean of per-query standardised scores, or reciprocal-rank fusion")
    sp.add_argument("--scale", default="auto", help="multiply the scores by this before writing: auto (= span:1, "
                    "the median query's scores then span 1, as the student's normalised scores do), span:X, labels "
                    "(the temperature that best predicts the first candidate, the positive) or a number (1: as the "
                    "teacher gives them)")
    sp.add_argument("--docs-per-query", type=_at_least(1), default=None, help="score the first K candidates")
    sp.add_argument("--sample", type=_at_least(1), default=None, help="score a seeded sample of N rows")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--drop-short", action="store_true",
                    help="drop rows with fewer than --docs-per-query candidates (counted) instead of refusing")
    sp.set_defaults(fn=cmd_score)


def _job_commands(sub) -> None:
    """What runs inside jobs (started by srun, torchrun, submitit, the local executor)."""
    sp = sub.add_parser("train", help="run one phase in this process (one per GPU; started by srun/torchrun/submitit)")
    sp.add_argument("run_dir")
    sp.add_argument("--phase", required=True)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("after-phase", help="(inside a phase job) apply the requeue policy to the phase's exit code")
    sp.add_argument("run_dir")
    sp.add_argument("--phase", required=True)
    sp.add_argument("--exit-code", type=int, required=True)
    sp.set_defaults(fn=cmd_after_phase)

    sp = sub.add_parser("eval-job", help="(started by a phase at eval_every) score a saved in-training export")
    sp.add_argument("run_dir")
    sp.add_argument("--phase", required=True)
    sp.add_argument("--step", type=_at_least(1), required=True)
    sp.add_argument("--attempt", default="")
    sp.set_defaults(fn=cmd_eval_job)

    sp = sub.add_parser("local-chain", help="(started by the local executor) the run's chain on this machine")
    sp.add_argument("run_dir")
    sp.add_argument("--lock-fd", type=int, default=None)
    sp.set_defaults(fn=cmd_local_chain)

    sp = sub.add_parser("evaluate", help="nDCG@10, MRR@10, recall@100, MAP@100 of a PyLate model on BEIR-layout data")
    sp.add_argument("model", help="a PyLate model folder; with --teacher, what `score --teacher` takes")
    sp.add_argument("--beir", nargs="+", required=True, help="BEIR-layout or NanoBEIR-parquet folders")
    sp.add_argument("--teacher", action="store_true", help="MODEL is a teacher (bm25, minilm, dense:P, colbert:P, "
                    "several comma-separated: fused, candidates from each one's top-100)")
    sp.add_argument("--fusion", default="zsum", choices=["zsum", "rrf"], help="with --teacher: how several fuse")
    sp.add_argument("--no-prompts", action="store_true", help="ablation: encode without the model's prompts")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--max-corpus", type=int, default=None, help="subsample the corpus (keeps judged documents)")
    sp.add_argument("--cache-dir", default=None)
    sp.add_argument("--index", default="exact", choices=["exact", "auto", "plaid", "voyager"],
                    help="exact (default); plaid / voyager: approximate indexes (Voyager holds every token in RAM: "
                         "small corpora only); auto: exact up to 100k documents, then an index")
    sp.add_argument("--runs-dir", default=None, help="write each dataset's run as DIR/<dataset>.trec (TREC format)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_evaluate)


def _beir_command(sub) -> None:
    sp = sub.add_parser("beir", help="exact BEIR evaluation at full scale: encode, search, merge (arrays or here)")
    sp.add_argument("model", nargs="?", help="a PyLate model folder (a phase's export)")
    sp.add_argument("--datasets", nargs="+", help="BEIR folders; a folder of them (CQADupStack) is one column")
    sp.add_argument("--out", required=True, help="the evaluation's folder (embeddings, top-k, runs/, results.json)")
    sp.add_argument("--executor", choices=["local", "slurm"], default="local")
    sp.add_argument("--stage", choices=["encode", "search", "merge"], default=None,
                    help="run this stage of the evaluation planned in --out (with --task: one item of it)")
    sp.add_argument("--task", type=_at_least(0), default=None, help="with --stage: this item ($SLURM_ARRAY_TASK_ID)")
    sp.add_argument("--split", default=None, help="every dataset's split (default: BEIR's, dev for MS MARCO)")
    sp.add_argument("--lengths", choices=["pylate-beir", "model"], default="pylate-beir",
                    help="query/document lengths: PyLate's BEIR script's per dataset (default) or the model's")
    sp.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored token embeddings")
    sp.add_argument("--shard-docs", type=_at_least(1), default=250_000, help="documents per encode/search item")
    sp.add_argument("--k", type=_at_least(100), default=100, help="documents kept per query")
    sp.add_argument("--batch-size", type=_at_least(1), default=32)
    sp.add_argument("--max-corpus", type=_at_least(1), default=None, help="subsample each corpus (keeps judged "
                    "documents)")
    sp.add_argument("--no-prompts", action="store_true", help="ablation: encode without the model's prompts")
    sp.add_argument("--run-dir", default=None, help="record the results as this run's phase evaluation (--phase)")
    sp.add_argument("--phase", default=None)
    sp.add_argument("--partition", default=None, help="Slurm: partition of the jobs")
    sp.add_argument("--time", default="1:00:00", help="Slurm: time limit of one item")
    sp.add_argument("--cpus-per-task", type=_at_least(1), default=4)
    sp.add_argument("--gpus-per-task", type=_at_least(0), default=0)
    sp.add_argument("--mem", default=None)
    sp.add_argument("--cluster", default=None, help="Slurm: a cluster profile (name or file): its srun options and "
                    "container for every task")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_beir)


def _launcher_commands(sub) -> None:
    sp = sub.add_parser("launch", help="validate, then start prepare and the phase chain (Slurm or local)")
    _recipe_args(sp)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--executor", choices=["slurm", "local"], default=None, help="default: slurm when sbatch exists")
    sp.add_argument("--budget", type=float, default=None, help="raise the run's GPU-hour budget")
    sp.add_argument("--wait", action="store_true", help="stay until the chain ends; Ctrl-C then stops a local chain "
                    "at a checkpoint")
    sp.set_defaults(fn=cmd_launch)

    sp = sub.add_parser("resume", help="start a run again from where its manifest says it is")
    sp.add_argument("run_dir")
    sp.add_argument("--executor", choices=["slurm", "local"], default=None)
    sp.add_argument("--budget", type=float, default=None, help="raise the run's GPU-hour budget")
    sp.add_argument("--phase-budget", action="append", default=[], metavar="PHASE=HOURS",
                    help="raise one phase's budget")
    sp.add_argument("--wait", action="store_true")
    sp.set_defaults(fn=cmd_resume)

    sp = sub.add_parser("cancel", help="cancel a run's jobs (a local chain stops at a checkpoint)")
    sp.add_argument("run_dir")
    sp.set_defaults(fn=cmd_cancel)

    sp = sub.add_parser("sbatch", help="write plain sbatch scripts (one per phase + a prepare array)")
    _recipe_args(sp)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--out", default=None, help="folder for the scripts (default RUN_DIR/sbatch)")
    sp.set_defaults(fn=cmd_sbatch)

    sp = sub.add_parser("demo", help="the whole pipeline on CPU in a few minutes: prepare → 3 phases → eval → report")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--model", choices=["minilm", "tiny-modernbert"], default="minilm")
    sp.set_defaults(fn=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="colbertzero",
        description="SLURM-native training of ColBERT (multi-vector) retrieval models: the ColBERT-Zero pipelines as "
                    "recipes.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for commands in (_plan_commands, _data_commands, _mining_commands, _beir_command, _job_commands,
                     _launcher_commands):
        commands(sub)
    return p


# ------------------------------------------------------------------ errors
def _user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input or a refused command: one message, exit 2, never a traceback."""
    from .data.shards import DataError
    from .demo.pydocs import DemoDataError
    from .evaluate.beir import DatasetError
    from .evaluate.sharded import EvaluationError
    from .manifest import ManifestError
    from .mining import WorkError
    from .retrieval import ModelSpecError
    from .scoring import ScoringUnavailable
    from .slurm import LaunchError
    from .train.accelerator import AcceleratorError

    return (RecipeError, ManifestError, DataError, LaunchError, DemoDataError, DatasetError, ModelSpecError, WorkError,
            ScoringUnavailable, AcceleratorError, EvaluationError)


def _crash_report(cmd: str, exc: BaseException) -> str:
    """Write the full traceback of an unexpected error to a file; returns its path."""
    folder = os.environ.get("COLBERTZERO_CRASH_DIR") or tempfile.gettempdir()
    path = os.path.join(folder, f"colbertzero-{cmd}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.txt")
    with open(path, "w") as f:
        f.write(f"colbertzero {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(exc, file=f)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options too (`validate R --no-path-checks a.b=1`).
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = (args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = int(args.fn(args) or 0)
        sys.stdout.flush()  # a reader that left shows here, inside the handler, not at interpreter exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `colbertzero status RUN | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # else the interpreter's final flush raises again
        return 0
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"colbertzero {args.cmd}: {e}", file=sys.stderr)
            return Exit.REFUSED
        if args.cmd in ("train", "after-phase", "local-chain"):
            raise  # inside a job: the whole traceback belongs in the job's log (and the manifest has it)
        where = _crash_report(args.cmd, e)
        print(f"colbertzero {args.cmd}: unexpected error: {type(e).__name__}: {e}\n  full traceback: {where} "
              "(please attach it to a bug report)", file=sys.stderr)
        return Exit.FAILED


if __name__ == "__main__":
    sys.exit(main())
