"""`colbertzero` command line: argument parsing only; every command is a thin call into its module.

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
    return load_recipe(args.recipe, getattr(args, "overrides", None) or [])


def _print_findings(findings, stream=None) -> None:
    for f in findings:
        print(f"  {f}", file=stream or sys.stderr)  # looked up now: sys.stderr may have been replaced since import


# ------------------------------------------------------------------ foundation commands
def cmd_plan(args) -> int:
    from . import preflight
    from .manifest import Manifest

    recipe = _recipe(args)
    mdata = Manifest(args.run_dir).snapshot() if args.run_dir and Manifest(args.run_dir).exists() else None
    bench = preflight.read_gpu_bench(args.gpu_bench) if args.gpu_bench else None
    p = preflight.plan(recipe, mdata, bench)
    if args.json:
        print(json.dumps(p, indent=2))
        return 0
    print(format_plan(p))
    return 0


def format_plan(p: dict) -> str:
    ref = p["reference"]
    lines = [f"recipe {p['recipe']}  (hash {p['recipe_hash'][:12]})"]
    if ref.get("beir_ndcg10") is not None:
        lines.append(f"paper: {ref['beir_ndcg10']} nDCG@10 on BEIR, ~{ref.get('gpu_hours') or '?'} "
                     f"{ref.get('hardware') or 'GPU'}-hours")
    hdr = (f"{'phase':<14}{'kind':<14}{'lr':>9}{'batch':>7}{'temp':>6}{'gc':>5}{'q/d len':>10}{'prompts':>8}"
           f"{'GPUs':>6}{'steps':>8}{'proj GPU-h':>11}{'budget':>8}")
    lines += ["", hdr, "-" * len(hdr)]
    for name, ph in p["phases"].items():
        h = ph["hyperparameters"]
        lengths = f"{h['effective_query_length']}/{h['effective_document_length']}"
        steps = ph["total_steps"] if ph["total_steps"] is not None else "?"
        budget = ph["budget_gpu_hours"] if ph["budget_gpu_hours"] is not None else "-"
        lines.append(
            f"{name:<14}{ph['kind']:<14}{h['lr']:>9.1e}{h['global_batch_size']:>7}{h['temperature']:>6g}"
            f"{h['gradcache_mini_batch'] or '-':>5}{lengths:>10}{'on' if h['prompts']['enabled'] else 'off':>8}"
            f"{ph['gpus']:>6}{steps:>8}{ph['projected_gpu_hours']:>11.1f}{budget:>8}"
        )
    lines.append("")
    for name, ph in p["phases"].items():
        h = ph["hyperparameters"]
        r = h["resources"]
        init = h["init"] if isinstance(h["init"], str) else f"export of phase {h['init']['from']!r}"
        lines.append(f"{name}: init {init}; {len(h['sources'])} source(s), {h['sampling']}; {ph['rows'] or '?'} rows "
                     f"({ph['rows_from']})")
        lines.append(
            f"  {r['nodes']} node(s) × {r['gpus_per_node'] or 'CPU'} GPUs, {r['time_limit']}, partition "
            f"{r['partition'] or 'default'}"
            f", ZeRO-{h['zero_stage']}; projection: {ph['projected_from']}"
        )
    b = p["budget_gpu_hours"]
    lines.append(f"\nprojected {p['projected_gpu_hours']:.1f} GPU-hours for the run; budget "
                 f"{b if b is not None else 'none'}")
    return "\n".join(lines)


def cmd_validate(args) -> int:
    from . import preflight

    recipe = _recipe(args)
    findings = preflight.check(recipe, paths=not args.no_path_checks)
    errs = preflight.errors(findings)
    warns = [f for f in findings if f.level != "error"]
    if errs:
        print(f"{args.recipe}: refused ({len(errs)} error(s)); nothing was written", file=sys.stderr)
        _print_findings(errs)
        _print_findings(warns)
        return Exit.REFUSED
    if not (args.no_path_checks or args.no_hashes):
        bad, hashed = preflight.shard_hashes(recipe, progress=sys.stderr.isatty())
        if bad:
            print(f"{args.recipe}: refused: {len(bad)} prepared shard(s) do not match their index", file=sys.stderr)
            _print_findings(bad)
            return Exit.REFUSED
        if hashed["shards"]:
            print(f"shards: {hashed['shards']} hashed ({hashed['bytes'] / 1e9:.2f} GB), all match their indexes")
    _print_findings(warns)
    print(f"{args.recipe}: ok ({len(recipe.phases)} phase(s): {', '.join(recipe.phases)})")
    return 0


def cmd_status(args) -> int:
    from .report import read_run_manifest, status_json, status_table

    data = read_run_manifest(args.run_dir)  # lock-free: works on read-only or other people's run dirs
    if args.json:
        print(json.dumps(status_json(data), indent=2))
    else:
        print(status_table(data))
    return 0


# ------------------------------------------------------------------ data / train / eval
def cmd_prepare(args) -> int:
    from .data.prepare import index_recipe, prepare_recipe

    if args.array_task is not None and args.array_task >= args.array_tasks:
        raise RecipeError(f"--array-task {args.array_task}: outside 0..{args.array_tasks - 1} (--array-tasks "
                          f"{args.array_tasks}); Slurm's SLURM_ARRAY_TASK_ID is the task's number")
    recipe = _recipe(args)
    if args.index_only:  # after the array tasks: check every shard is there, write the indexes
        summary = index_recipe(recipe, phases=args.phase or None)
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        return 0
    shard_range = None
    if args.array_task is not None:
        shard_range = (args.array_task, args.array_tasks)
    summary = prepare_recipe(
        recipe, phases=args.phase or None, workers=args.workers, verify=args.verify, shard_range=shard_range
    )
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif args.verify:
        for phase, sources in summary.items():
            for name, s in sources.items():
                v = s.get("verify") or {}
                bad = v.get("altered_rebuilt") or []
                print(f"{phase}/{name}: {v.get('hashed', 0)} shard(s) hashed, {len(bad)} altered and rebuilt"
                      + "".join(f"\n  rebuilt {b}" for b in bad))
    return 0


def cmd_fetch(args) -> int:
    from .data.hub import fetch

    report = fetch(_recipe(args), phases=args.phase or None, dry_run=args.dry_run, workers=args.workers)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    total = 0
    for where, e in report.items():
        total += e["bytes"]
        print(f"{where}: {e['repo']}@{(e['revision'] or 'main')[:12]} {e['pattern']}: {len(e['files'])} file(s), "
              f"{e['bytes'] / 2**30:.2f} GiB (listed from the {e['listed_from']}) -> {e['local_dir']}")
        for f in e["files"] if args.dry_run else []:
            print(f"    {f['path']}  {f['bytes']:,} B")
    print(f"{'would fetch' if args.dry_run else 'fetched'} {total / 2**30:.2f} GiB in all")
    return 0


def cmd_train(args) -> int:
    from .train.runner import run_phase

    return run_phase(args.run_dir, args.phase)


def cmd_after_phase(args) -> int:
    from .launcher.requeue import after_phase_in_job

    return after_phase_in_job(args.run_dir, args.phase, args.exit_code, is_main=True)


def cmd_eval_job(args) -> int:
    from .manifest import Manifest
    from .train.evaluation import run_eval_job

    rec = run_eval_job(Manifest(args.run_dir), args.phase, args.step, args.attempt)
    print(json.dumps(rec))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_table

    res = evaluate(
        args.model,
        args.beir,
        prompts=not args.no_prompts,
        batch_size=args.batch_size,
        max_corpus=args.max_corpus,
        cache_dir=args.cache_dir,
        index=args.index,
        runs_dir=args.runs_dir,
    )
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    path = build_report(args.run_dirs, args.out)
    print(f"report: {path}")
    return 0


def _run_work(args, spec) -> int:
    """Local: the shards here (or one, --array-task), merging when none is left. Slurm: an array of the missing
    shards, the last task merging."""
    from .mining import run_shards

    if args.executor == "slurm":
        from .launcher.work import array_options, submit_array

        opts = array_options(partition=args.partition, time=args.time, cpus_per_task=args.cpus_per_task,
                             gpus_per_task=args.gpus_per_task, mem=args.mem)
        r = submit_array(spec, args.out, args.shards, opts)
        if args.json:
            print(json.dumps(r, indent=2))
        elif r["job"] is None:
            print(f"{args.out}: already complete from the same settings; nothing submitted")
        else:
            print(f"submitted array job {r['job']}: shard(s) {', '.join(map(str, r['tasks']))} of {args.shards}; "
                  f"the last to finish writes {args.out} (logs in {r['folder']})")
        return 0
    r = run_shards(spec, args.out, args.shards, task=args.array_task, show_progress=not args.json)
    if args.json:
        print(json.dumps(r, indent=2))
    elif r["merged"]:
        print(f"{r['out']}: " + ", ".join(f"{k} {v}" for k, v in r["stats"].items()))
    else:
        print(f"shard(s) {', '.join(map(str, r['ran']))} done; {len(r['missing'])} of {args.shards} still to run "
              f"({', '.join(map(str, r['missing'][:10]))}{' …' if len(r['missing']) > 10 else ''})")
    return 0


def cmd_mine(args) -> int:
    from .mining import MineSpec
    from .recipe.schema import safe_name

    if (args.teacher is None) != (args.margin is None):
        raise RecipeError("--teacher and --margin go together: the teacher scores, the margin drops negatives it "
                          "scores above positive − margin")
    try:
        safe_name(args.name, "--name")
    except ValueError as e:
        raise RecipeError(str(e)) from None
    spec = MineSpec(input=args.input, name=args.name, retriever=args.retriever, negatives=args.negatives,
                    depth=max(args.depth, args.negatives + args.skip_top), skip_top=args.skip_top,
                    skip_overlapping=args.skip_overlapping, teacher=args.teacher, margin=args.margin,
                    corpus=args.corpus, corpus_column=args.corpus_column, query_column=args.query_column,
                    document_column=args.document_column, max_length=args.max_length)
    return _run_work(args, spec)


def cmd_score(args) -> int:
    from .mining import ScoreSpec

    spec = ScoreSpec(input=args.input, teacher=args.teacher, docs_per_query=args.docs_per_query, sample=args.sample,
                     seed=args.seed, query_column=args.query_column, documents=args.documents,
                     max_length=args.max_length, drop_short=args.drop_short)
    return _run_work(args, spec)


# ------------------------------------------------------------------ launcher
def cmd_launch(args) -> int:
    from .launcher.api import launch

    run = launch(args.recipe, args.run_dir, overrides=args.overrides or [], executor=args.executor,
                 budget=args.budget, wait=args.wait)
    return run.returncode or 0


def cmd_resume(args) -> int:
    from .launcher.api import resume

    run = resume(args.run_dir, executor=args.executor, budget=args.budget, phase_budgets=args.phase_budget,
                 wait=args.wait)
    return run.returncode or 0


def cmd_sbatch(args) -> int:
    from .launcher.sbatch import write_sbatch_scripts

    recipe = _recipe(args)
    paths = write_sbatch_scripts(recipe, args.run_dir, out_dir=args.out)
    for p in paths:
        print(p)
    print(f"submit them chained with `bash {paths[-1]}`, or one by one with --dependency=afterok:JOBID "
          "(slurm/README.md)", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, model=args.model)


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="colbertzero",
        description="SLURM-native training of ColBERT (multi-vector) retrieval models: the ColBERT-Zero pipelines as "
                    "recipes.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def recipe_args(sp):
        sp.add_argument("recipe", help="recipe YAML (see recipes/)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. phases.supervised.lr=1e-5")

    sp = sub.add_parser("plan", help="resolved phases, hyper-parameters, resources and projected GPU-hours")
    recipe_args(sp)
    sp.add_argument("--run-dir", help="use the throughput measured in this run dir")
    sp.add_argument("--gpu-bench", help="before a run: project from tools/bench/gpu.sh's gpu.json (pairs/s per GPU)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("validate", help="every check that needs no cluster; exits 2 and writes nothing on refusal")
    recipe_args(sp)
    sp.add_argument("--no-path-checks", action="store_true", help="skip checks of local data/model paths")
    sp.add_argument("--no-hashes", action="store_true", help="skip the sha256 of prepared shards")
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("status", help="phases, state, steps, checkpoints, GPU-hours, last eval")
    sp.add_argument("run_dir")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("prepare", help="tokenize each phase's sources into Arrow shards")
    recipe_args(sp)
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
    recipe_args(sp)
    sp.add_argument("--phase", action="append", help="only this phase (repeatable)")
    sp.add_argument("--dry-run", action="store_true", help="list the files and sizes per source; download nothing")
    sp.add_argument("--workers", type=_at_least(1), default=8, help="parallel downloads")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_fetch)

    def work_args(sp):
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

    sp = sub.add_parser("mine", help="hard negatives for (query, positive) pairs → the supervised layout")
    work_args(sp)
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
    work_args(sp)
    sp.add_argument("--documents", default="document,negative", help="candidate columns, in order")
    sp.add_argument("--teacher", default="minilm", help="minilm, dense:PATH, colbert:PATH, cross-encoder:PATH, bm25")
    sp.add_argument("--docs-per-query", type=_at_least(1), default=None, help="score the first K candidates")
    sp.add_argument("--sample", type=_at_least(1), default=None, help="score a seeded sample of N rows")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--drop-short", action="store_true",
                    help="drop rows with fewer than --docs-per-query candidates (counted) instead of refusing")
    sp.set_defaults(fn=cmd_score)

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

    sp = sub.add_parser("evaluate", help="nDCG@10, MRR@10, recall@100, MAP@100 of a PyLate model on BEIR-layout data")
    sp.add_argument("model")
    sp.add_argument("--beir", nargs="+", required=True, help="BEIR-layout or NanoBEIR-parquet folders")
    sp.add_argument("--no-prompts", action="store_true", help="ablation: encode without the model's prompts")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--max-corpus", type=int, default=None, help="subsample the corpus (keeps judged documents)")
    sp.add_argument("--cache-dir", default=None)
    sp.add_argument("--index", default="auto", choices=["auto", "exact", "plaid", "voyager"])
    sp.add_argument("--runs-dir", default=None, help="write each dataset's run as DIR/<dataset>.trec (TREC format)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_evaluate)

    sp = sub.add_parser("report", help="Markdown + PNG report of one or several run dirs")
    sp.add_argument("run_dirs", nargs="+")
    sp.add_argument("--out", default=None)
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("launch", help="validate, then submit prepare and the phase chain (Slurm or local)")
    recipe_args(sp)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--executor", choices=["slurm", "local"], default=None, help="default: slurm when sbatch exists")
    sp.add_argument("--budget", type=float, default=None, help="raise the run's GPU-hour budget")
    sp.add_argument("--wait", action="store_true", help="stay until the chain ends (always true for local)")
    sp.set_defaults(fn=cmd_launch)

    sp = sub.add_parser("resume", help="resubmit a run from where its manifest says it is")
    sp.add_argument("run_dir")
    sp.add_argument("--executor", choices=["slurm", "local"], default=None)
    sp.add_argument("--budget", type=float, default=None, help="raise the run's GPU-hour budget")
    sp.add_argument(
        "--phase-budget", action="append", default=[], metavar="PHASE=HOURS", help="raise one phase's budget"
    )
    sp.add_argument("--wait", action="store_true")
    sp.set_defaults(fn=cmd_resume)

    sp = sub.add_parser("sbatch", help="write plain sbatch scripts (one per phase + a prepare array)")
    recipe_args(sp)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--out", default=None, help="folder for the scripts (default RUN_DIR/sbatch)")
    sp.set_defaults(fn=cmd_sbatch)

    sp = sub.add_parser("demo", help="the whole pipeline on CPU in a few minutes: prepare → 3 phases → eval → report")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument("--model", choices=["minilm", "tiny-modernbert"], default="minilm")
    sp.set_defaults(fn=cmd_demo)
    return p


def _user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input or a refused command: one message, exit 2, never a traceback."""
    from .data.shards import DataError
    from .demo.pydocs import DemoDataError
    from .evaluate.beir import DatasetError
    from .launcher.slurm import LaunchError
    from .manifest import ManifestError
    from .mining import TeacherError, WorkError
    from .scoring import ScoringUnavailable

    return (RecipeError, ManifestError, DataError, LaunchError, DemoDataError, DatasetError, TeacherError, WorkError,
            ScoringUnavailable)


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
        if args.cmd in ("train", "after-phase"):
            raise  # inside a job: the whole traceback belongs in the job's log (and the manifest has it)
        where = _crash_report(args.cmd, e)
        print(f"colbertzero {args.cmd}: unexpected error: {type(e).__name__}: {e}\n  full traceback: {where} "
              "(please attach it to a bug report)", file=sys.stderr)
        return Exit.FAILED


if __name__ == "__main__":
    sys.exit(main())
