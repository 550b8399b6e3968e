"""``colbertzero prepare``: raw sources → pre-tokenized Arrow shards + an index per source (see ``shards.py``).

``prepare_recipe`` plans every source of the chosen phases (all by default; ``plan.py``), tokenizes the shards that
are not finished yet (``workers`` processes; finished shards are skipped, ``verify=True`` re-hashes them first and
redoes the damaged ones) and writes each source's ``index.json``. With ``shard_range=(i, n)`` — Slurm array task
``i`` of ``n`` — it only does its share of the shards (every task computes the same plan and takes shards
``i, i+n, …``) and writes no index; run ``index_recipe`` once after all tasks (it refuses while a shard is missing).
Both return a summary ``{phase: {source: {...}}}``. Roles, columns and the rules for rows: docs/data.md.

Bad input raises :class:`DataError` naming the file, the row (and JSONL line) and the column; the source then has
no ``index.json`` (nothing is marked prepared) while the shards already finished stay for the next run.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from colbertzero.data import shards
from colbertzero.data.plan import Job, SourcePlan, key_hash, plan_source, write_source_index
from colbertzero.data.shards import DataError
from colbertzero.data.sources import as_text, iter_rows, kd_row, row_texts, row_value
from colbertzero.data.tokenize import PhaseTokenizer, load_phase_tokenizer, settings_for_phase
from colbertzero.teachers import near_uniform, sharpness

log = logging.getLogger(__name__)

TEXT_BATCH = 1024  # rows tokenized per call: large enough for the fast tokenizer, small enough for flat memory

_TOKENIZERS: dict[str, PhaseTokenizer] = {}


def _init_worker(tokenizers: dict[str, PhaseTokenizer]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process; the pool is the parallelism
    logging.basicConfig(level=logging.WARNING)
    _TOKENIZERS.update(tokenizers)


class RaggedBuilder:
    """Token lists accumulated chunk by chunk as numpy (Python int lists of a whole shard would not fit)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lens: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []

    def add(self, lists: list[list[int]]) -> np.ndarray:
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        self.lens.append(lens)
        self.vals.append(np.fromiter(itertools.chain.from_iterable(lists), dtype=self.dtype, count=int(lens.sum())))
        return lens

    def array(self) -> tuple[pa.Array, np.ndarray]:
        lens = np.concatenate(self.lens) if self.lens else np.zeros(0, np.int64)
        vals = np.concatenate(self.vals) if self.vals else np.zeros(0, self.dtype)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(vals)), lens


def histogram(lens: np.ndarray) -> list[int]:
    return np.bincount(lens.astype(np.int64)).tolist() if lens.size else []


def chunked(it: Iterator, n: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


def _row_columns(job: Job) -> list[str]:
    # JSONL rows come whole; columnar inputs read only the mapped columns
    if job.plan.input.format == "jsonl":
        return []
    return sorted({c for cs in job.plan.columns.values() for c in cs})


def _pairs_shard(job: Job, tok: PhaseTokenizer) -> tuple[pa.Table, dict]:
    plan, cols = job.plan, job.plan.columns
    pos_role = "document" if plan.kind == "unsupervised" else "positive"
    qr, dr = RaggedBuilder(tok.dtype), RaggedBuilder(tok.dtype)
    per_row: list[np.ndarray] = []
    max_len: list[np.ndarray] = []
    neg_hist = np.zeros(plan.max_negatives + 1, dtype=np.int64)
    first_short: dict[str, str] = {}
    beyond_max = 0  # negatives past max_negatives in a row: not kept, counted
    for chunk in chunked(iter_rows(plan.input, job.range, _row_columns(job)), TEXT_BATCH):
        queries, docs, counts = [], [], []
        for row, where in chunk:
            queries.append(as_text(row_value(row, cols["query"][0], "query", where), cols["query"][0], "query", where))
            pc_ = cols[pos_role][0]
            docs.append(as_text(row_value(row, pc_, pos_role, where), pc_, pos_role, where, first_of_list=True))
            n = 0
            if plan.kind == "supervised":
                negs = row_texts(row, cols["negatives"], "negatives", where)
                beyond_max += max(0, len(negs) - plan.max_negatives)
                negs = negs[: plan.max_negatives]
                docs.extend(negs)
                n = len(negs)
                if n < plan.max_negatives:
                    first_short.setdefault(str(n), where)
            neg_hist[n] += 1
            counts.append(1 + n)
        qr.add(tok.encode_queries(queries))
        dl = dr.add(tok.encode_documents(docs))
        counts = np.asarray(counts, dtype=np.int64)
        per_row.append(counts)
        bounds = np.concatenate([[0], np.cumsum(counts)[:-1]])
        max_len.append(np.maximum.reduceat(dl, bounds))
    q_arr, q_lens = qr.array()
    d_arr, d_lens = dr.array()
    counts = np.concatenate(per_row)
    doc_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    table = pa.table({
        "query": q_arr,
        "documents": pa.ListArray.from_arrays(pa.array(doc_offsets), d_arr),
        "max_doc_len": pa.array(np.concatenate(max_len).astype(np.int32)),
    })
    stats = {
        "query_tokens": int(q_lens.sum()), "document_tokens": int(d_lens.sum()), "documents": int(d_lens.size),
        "query_hist": histogram(q_lens), "document_hist": histogram(d_lens),
        "negatives_hist": neg_hist.tolist(), "first_row_with_negatives": first_short,
        "negatives_beyond_max": beyond_max,
    }
    return table, stats


def _lookup(keys: list[str], keys_file: str, what: str, wheres: list[str], table_src: str) -> np.ndarray:
    idx = pc.index_in(pa.array(keys, pa.large_string()), value_set=shards.open_table(Path(keys_file)).column(0))
    if idx.null_count:
        k = int(np.flatnonzero(idx.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{wheres[k]}: {what} {keys[k]!r} is not in {table_src}; every id must name a row of that "
                        "table")
    return idx.to_numpy().astype(np.int32)


def _kd_shard(job: Job, tok: PhaseTokenizer) -> tuple[pa.Table, dict]:
    plan, dpq = job.plan, job.plan.docs_per_query
    qkeys, dkeys, scores, qwhere, dwhere = [], [], [], [], []
    for row, where in iter_rows(plan.input, job.range, _row_columns(job)):
        q, docs, sc = kd_row(row, where, plan.columns, dpq)
        qkeys.append(q)
        qwhere.append(where)
        dkeys.extend(docs)
        dwhere.extend([where] * dpq)
        scores.extend(sc)
    qt, dt = plan.tables["queries"], plan.tables["documents"]
    qname = "query id" if "query_id" in plan.columns else "query"
    dname = "document id" if "document_ids" in plan.columns else "document"
    q_idx = _lookup(qkeys, qt.keys_file, qname, qwhere, qt.input.path)
    d_idx = _lookup(dkeys, dt.keys_file, dname, dwhere, dt.input.path)
    table = pa.table({
        "query_idx": pa.array(q_idx),
        "doc_idx": pa.FixedSizeListArray.from_arrays(pa.array(d_idx), dpq),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(scores, dtype=np.float32)), dpq),
    })
    # how peaked softmax(teacher scores) is: the index flags a target the loss would find near uniform
    sharp = sharpness(np.asarray(scores, dtype=np.float64).reshape(-1, dpq).tolist())
    return table, {"target_top1_sum": (sharp["top1"] or 0.0) * sharp["queries"], "target_queries": sharp["queries"]}


def _table_shard(job: Job, tok: PhaseTokenizer) -> tuple[pa.Table, dict]:
    t = job.plan.tables[job.target]
    enc = tok.encode_queries if t.name == "queries" else tok.encode_documents
    r = RaggedBuilder(tok.dtype)
    cols = [] if t.input.format == "jsonl" else [t.text_col]
    for chunk in chunked(iter_rows(t.input, job.range, cols), TEXT_BATCH):
        role = f"{t.name}.text"
        r.add(enc([as_text(row_value(row, t.text_col, role, w), t.text_col, role, w) for row, w in chunk]))
    arr, lens = r.array()
    return pa.table({"input_ids": arr}), {"tokens": int(lens.sum()), "hist": histogram(lens)}


def _run_job(job: Job) -> dict:
    tok = _TOKENIZERS[job.plan.tok_key]
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        if job.target == "rows":
            table, stats = (_kd_shard if job.plan.kind == "distillation" else _pairs_shard)(job, tok)
        else:
            table, stats = _table_shard(job, tok)
    except DataError as e:
        raise DataError(f"phase {job.plan.phase}, source {job.plan.name}: {e}; nothing was marked prepared") from None
    meta = {"key": job.plan.key, "row_start": job.range.row_start, **stats}
    timing = {"seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3)}
    return shards.write_shard(job.out, table, {**meta, **timing})



def _plans(recipe, phases: list[str] | None) -> tuple[list[SourcePlan], dict[str, PhaseTokenizer]]:
    names = phases or list(recipe.phases)
    tokenizers: dict[str, PhaseTokenizer] = {}
    plans: list[SourcePlan] = []
    for p in names:
        phase = recipe.phase(p)
        tok = load_phase_tokenizer(recipe, p)
        tk = key_hash({"tokenizer": tok.identity()["sha256"], "settings": settings_for_phase(recipe, p).as_dict()})
        tokenizers[tk] = tok
        for i, src in enumerate(phase.data.sources):
            try:
                plans.append(plan_source(recipe, p, i, tok, tk))
            except DataError as e:
                msg = str(e) if str(e).startswith("phases.") else f"phase {p}, source {src.name}: {e}"
                raise DataError(f"{msg}; nothing was marked prepared") from None
    by_folder: dict[Path, SourcePlan] = {}
    for pl in plans:
        other = by_folder.setdefault(pl.folder.resolve(), pl)
        if other is not pl and other.key != pl.key:
            raise DataError(
                f"phases {other.phase} and {pl.phase} both prepare {pl.folder} with different settings; "
                "give them different data.shards_dir"
            )
    uniq = list({pl.folder.resolve(): pl for pl in plans}.values())
    return uniq, tokenizers


def _summary(plan: SourcePlan, written: int, skipped: int, status: str, index: dict | None) -> dict:
    out = {"folder": str(plan.folder), "kind": plan.kind, "rows": plan.input.rows, "shards": len(plan.jobs()),
           "written": written, "skipped": skipped, "status": status}
    if index:
        out.update(tokens=index["tokens"], n_docs=index["n_docs"])
        for key in ("dropped", "target"):
            if key in index:
                out[key] = index[key]
    return out


def target_warning(phase: str, source: str, target: dict | None) -> str | None:
    """One line when a distillation source's teacher target is near uniform (`teachers.near_uniform`)."""
    if not target or not near_uniform(target):
        return None
    return (f"warning: phase {phase}, source {source}: the teacher's scores make a near-uniform target (mean top-1 "
            f"probability {target['top1']:.3f}, uniform {target['uniform']:.3f}): distillation would teach the "
            f"student to flatten its ranking. Scores that are similarities or probabilities need a scale: "
            f"`colbertzero score --scale auto` writes them scaled (docs/own-data.md, \"Pick and check a teacher\")")


def prepare_recipe(recipe, phases: list[str] | None = None, workers: int = 1, verify: bool = False,
                   shard_range: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Prepare the phases' sources; see the module docstring. Returns ``{phase: {source: summary}}``."""
    if shard_range is not None:
        i, n = shard_range
        if not (0 <= i < n):
            raise ValueError(f"shard_range {shard_range}: expected (task_id, n_tasks) with 0 <= task_id < n_tasks")
    plans, tokenizers = _plans(recipe, phases)
    _TOKENIZERS.update(tokenizers)
    pending: list[Job] = []
    counts: dict[int, list[int]] = {}
    done: set[int] = set()
    altered: dict[int, list[str]] = {}  # with verify: shards whose bytes no longer match their sidecar
    for k, plan in enumerate(plans):
        ip = shards.index_path(plan.folder)
        if ip.is_file():
            try:
                current = json.loads(ip.read_text()).get("key") == plan.key
            except (OSError, ValueError):
                current = False
            # an up-to-date index is trusted after a cheap size check of every shard (the loader's own check)
            if current and not verify and all(shards.finished_meta(j.out, plan.key) for j in plan.jobs()):
                done.add(k)
                counts[k] = [0, len(plan.jobs())]
                continue
            ip.unlink(missing_ok=True)  # stale or being checked: not "prepared" until re-indexed
        jobs = plan.jobs()
        if shard_range is not None:
            jobs = jobs[shard_range[0]::shard_range[1]]
        counts[k] = [0, 0]
        for job in jobs:
            if shards.finished_meta(job.out, plan.key, full_hash=verify) is not None:
                counts[k][1] += 1
            else:
                if verify and shards.finished_meta(job.out, plan.key) is not None:  # whole and current, bytes changed
                    altered.setdefault(k, []).append(str(job.out))
                shards.remove_shard(job.out)  # other settings, damaged, or half a shard: redo it
                pending.append(job)
    metas = _run(pending, tokenizers, workers, progress)
    position = {id(p): k for k, p in enumerate(plans)}
    busy: dict[int, list[float]] = {}
    for job, meta in zip(pending, metas):
        k = position[id(job.plan)]
        counts[k][0] += 1
        b = busy.setdefault(k, [0.0, 0.0])
        b[0] += meta["seconds"]
        b[1] += meta["cpu_seconds"]
    summary: dict[str, dict] = {}
    for k, plan in enumerate(plans):
        index = None
        if k in done:
            status, index = "up to date", shards.read_json(shards.index_path(plan.folder))
        elif shard_range is None:
            index, status = write_source_index(plan), "prepared"
        else:
            status = "shards done, index pending"
        summary.setdefault(plan.phase, {})[plan.name] = _summary(plan, *counts[k], status, index)
        if verify:
            bad = altered.get(k, [])
            summary[plan.phase][plan.name]["verify"] = {"hashed": counts[k][1] + len(bad), "altered_rebuilt": bad}
        warning = target_warning(plan.phase, plan.name, (index or {}).get("target"))
        if warning:
            summary[plan.phase][plan.name]["warning"] = warning
            print(warning, file=sys.stderr, flush=True)
        wall, cpu = busy.get(k, (0.0, 0.0))
        summary[plan.phase][plan.name].update(worker_seconds=round(wall, 3), worker_cpu_seconds=round(cpu, 3))
    return summary


def index_recipe(recipe, phases: list[str] | None = None, progress: bool = True) -> dict:
    """The final step after Slurm array tasks: check that every shard is finished and write the indexes."""
    plans, tokenizers = _plans(recipe, phases)
    _TOKENIZERS.update(tokenizers)
    summary: dict[str, dict] = {}
    for plan in plans:
        index = write_source_index(plan)
        summary.setdefault(plan.phase, {})[plan.name] = _summary(plan, 0, len(plan.jobs()), "prepared", index)
    return summary


def _job_rows(job: Job) -> int:
    return job.range.rows


def _run(jobs: list[Job], tokenizers: dict[str, PhaseTokenizer], workers: int, progress: bool) -> list[dict]:
    """Run the jobs; their sidecars in job order."""
    if not jobs:
        return []
    metas: dict[int, dict] = {}
    bar = tqdm(total=sum(map(_job_rows, jobs)), unit="rows", desc="prepare", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) == 1:
            for k, job in enumerate(jobs):
                metas[k] = _run_job(job)
                bar.update(_job_rows(job))
            return [metas[k] for k in range(len(jobs))]
        # fork: workers inherit the loaded tokenizer (spawn re-imports transformers and unpickles it, ~4 s each);
        # the parent has not encoded anything, so no tokenizer thread pool exists to be forked.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with cf.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                                    initargs=(tokenizers,)) as pool:
            futures = {pool.submit(_run_job, j): k for k, j in enumerate(jobs)}
            try:
                for fut in cf.as_completed(futures):
                    metas[futures[fut]] = fut.result()
                    bar.update(_job_rows(jobs[futures[fut]]))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
    return [metas[k] for k in range(len(jobs))]


def verify_lines(summary: dict) -> list[str]:
    """What `colbertzero prepare --verify` prints: per source, shards hashed and the altered ones rebuilt."""
    lines = []
    for phase, sources in summary.items():
        for name, s in sources.items():
            v = s.get("verify") or {}
            bad = v.get("altered_rebuilt") or []
            lines.append(f"{phase}/{name}: {v.get('hashed', 0)} shard(s) hashed, {len(bad)} altered and rebuilt")
            lines += [f"  rebuilt {b}" for b in bad]
    return lines
