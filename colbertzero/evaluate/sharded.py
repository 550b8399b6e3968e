"""`colbertzero beir`: exact BEIR evaluation of one checkpoint at full scale, in three stages that run as Slurm arrays
or here, each resuming item by item (docs/reproducing.md, step 4: the conventions; docs/CONTRACTS.md: the folder;
docs/performance.md: the arithmetic).

- **encode**: one item per dataset's queries and per (dataset, corpus shard): token embeddings (fp16 by default)
  written whole into a temp folder and renamed into place with their ids and offsets, documents longest first.
- **search**: one item per (dataset, shard): every query of the dataset against the shard (`exact_search`: tiles
  of bounded size, a running top-k), the shard's top-k saved.
- **merge**: the top-k of the shards' top-ks is the exact global top-k; BEIR's identical-id rule, a TREC run file
  and pytrec_eval metrics per dataset; CQADupStack's sub-forums averaged into one column.

Planning reads each dataset once and writes every item's texts to a file of its own (``<dataset>/input/``) before
``OUT/beir.json`` (the settings and the datasets' sizes): a task reads its shard, never the whole corpus. A command
over unfinished work of other settings is refused, naming what changed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.sources import fingerprint
from ..files import atomic_write_json, file_replacing, now_iso, replace_dir, temp_dir_beside
from ..retrieval.embeddings import DocumentEmbeddings, model_hash, resolve_prompts, write_embeddings
from .beir import DatasetError, load_beir, subsample_corpus
from .metrics import METRICS, compute_metrics, max_cutoff, without_identical_ids, write_trec_run

STAGES = ("encode", "search", "merge")
# Query lengths of PyLate's BEIR evaluation script (document length 300 for all), the setting ColBERT models of
# PyLate are reported with: https://github.com/lightonai/pylate/blob/main/examples/evaluation/beir_dataset.py
PYLATE_BEIR_QUERY_LENGTH = {
    "quora": 32, "climate-fever": 64, "nq": 32, "msmarco": 32, "hotpotqa": 32, "nfcorpus": 32, "scifact": 48,
    "trec-covid": 48, "fiqa": 32, "arguana": 64, "scidocs": 48, "dbpedia-entity": 32, "webis-touche2020": 32,
    "fever": 32, "cqadupstack": 32,
}
PYLATE_BEIR_DOCUMENT_LENGTH = 300
LENGTHS = ("pylate-beir", "model")
DTYPES = ("float16", "float32")


class EvaluationError(ValueError):
    """Settings or a folder the evaluation cannot use; one message naming what to change."""


@dataclass(frozen=True)
class Settings:
    model: str
    prompts: bool = True
    lengths: str = "pylate-beir"
    dtype: str = "float16"
    shard_docs: int = 250_000
    k: int = 100
    batch_size: int = 32
    max_corpus: int | None = None
    split: str | None = None  # None: BEIR's split per dataset

    def __post_init__(self):
        if self.lengths not in LENGTHS:
            raise EvaluationError(f"--lengths {self.lengths!r}: one of {', '.join(LENGTHS)}")
        if self.dtype not in DTYPES:
            raise EvaluationError(f"--dtype {self.dtype!r}: one of {', '.join(DTYPES)}")
        if self.k < max_cutoff(METRICS):
            raise EvaluationError(f"--k {self.k}: the metrics need the top {max_cutoff(METRICS)} documents")
        for what, v in (("--shard-docs", self.shard_docs), ("--batch-size", self.batch_size),
                        ("--max-corpus", self.max_corpus or 1)):
            if v <= 0:
                raise EvaluationError(f"{what} {v}: must be positive")
        if not Path(self.model).is_dir():
            raise EvaluationError(f"{self.model}: not a model folder (an export of a phase, or a PyLate model saved "
                                  f"locally; this command reads no hub)")


@dataclass
class Dataset:
    key: str  # "scifact", or "cqadupstack/android" for a sub-forum
    path: str
    column: str  # the table's column: the folder's name, "cqadupstack" for each of its sub-forums
    split: str
    split_note: str | None
    query_length: int | None  # None: the model's own
    document_length: int | None
    documents: int = 0
    queries: int = 0
    shards: int = 0
    fingerprint: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return self.key.replace("/", "__")


def _is_dataset(p: Path) -> bool:
    return any((p / f"corpus{s}").exists() for s in (".jsonl", ".jsonl.gz", ".parquet", ""))


def find_datasets(paths: list[str]) -> list[tuple[str, Path, str]]:
    """(key, folder, column) per dataset: a BEIR folder is one; a folder of BEIR folders (CQADupStack as BEIR ships
    it) is one column made of its sub-folders."""
    found = []
    for raw in paths:
        p = Path(raw).resolve()
        if not p.is_dir():
            raise DatasetError(f"{raw}: dataset folder not found")
        if _is_dataset(p):
            found.append((p.name, p, p.name))
            continue
        subs = sorted(s for s in p.iterdir() if s.is_dir() and _is_dataset(s))
        if not subs:
            raise DatasetError(f"{raw}: neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) nor a folder of "
                               f"them (CQADupStack's layout)")
        found += [(f"{p.name}/{s.name}", s, p.name) for s in subs]
    keys = [k for k, _, _ in found]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise DatasetError(f"datasets are named by their folder and these names repeat: {repeated}")
    return found


def choose_split(path: Path, column: str, requested: str | None) -> tuple[str, str | None]:
    """BEIR's split for the dataset (``dev`` for MS MARCO, else ``test``) unless one is asked for; a folder without
    that split's judgements but with ``test`` ones (a TREC-DL cut of MS MARCO) is scored on ``test``, and says so."""
    if requested:
        return requested, None
    want = beir_split(column)
    if want != "test" and not _has_split(path, want) and _has_split(path, "test"):
        return "test", f"no qrels for BEIR's '{want}' split here; scored on 'test' (not comparable with BEIR's {want})"
    return want, None


def beir_split(column: str) -> str:
    """BEIR scores MS MARCO (and a folder named for it: msmarco-5k) on ``dev`` (6,980 queries; its ``test`` is
    TREC-DL 2019's 43), every other dataset on ``test``."""
    return "dev" if re.sub(r"[^a-z0-9]", "", column.lower()).startswith("msmarco") else "test"


def _has_split(path: Path, split: str) -> bool:
    q = path / "qrels"
    return (q / f"{split}.tsv").is_file() or any(q.glob(f"{split}*.parquet"))


def _lengths(settings: Settings, key: str, column: str) -> tuple[int | None, int | None]:
    if settings.lengths == "model":
        return None, None
    q = PYLATE_BEIR_QUERY_LENGTH.get(key.lower(), PYLATE_BEIR_QUERY_LENGTH.get(column.lower()))
    return q, PYLATE_BEIR_DOCUMENT_LENGTH


def _load(ds: Dataset, max_corpus: int | None):
    corpus, queries, qrels = load_beir(ds.path, split=ds.split)
    corpus = subsample_corpus(corpus, qrels, max_corpus)
    return corpus, {q: queries[q] for q in qrels}, qrels


class Evaluation:
    """One evaluation's folder: its plan (``beir.json``), the stages' items and what is done."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).resolve()
        self.plan_path = self.out / "beir.json"

    # ------------------------------------------------------------ plan
    def plan(self, settings: Settings, paths: list[str], record: dict | None = None, replace: bool = False) -> dict:
        """Read each dataset once (sizes, split), write ``beir.json``; the same settings over existing work keep it.
        ``record`` ({"run_dir", "phase"}): the merge also records the results as that phase's evaluation.
        ``replace``: unfinished work of other settings is deleted instead of refused (a phase's own folder, whose
        export was written again)."""
        if record:
            check_record(record)
        datasets = []
        for key, path, column in find_datasets(paths):
            split, note = choose_split(path, column, settings.split)
            q_len, d_len = _lengths(settings, key, column)
            ds = Dataset(key=key, path=str(path), column=column, split=split, split_note=note,
                         query_length=q_len, document_length=d_len, fingerprint=fingerprint(path))
            corpus, queries, _ = _load(ds, settings.max_corpus)
            ds.documents, ds.queries = len(corpus), len(queries)
            ds.shards = max(1, math.ceil(ds.documents / settings.shard_docs))
            datasets.append(ds)
        plan = json.loads(json.dumps({"settings": asdict(settings), "model_hash": model_hash(settings.model),
                                      "datasets": [asdict(d) for d in datasets]}))  # as beir.json holds it
        if self.plan_path.is_file():
            have = json.loads(self.plan_path.read_text())
            if {k: have.get(k) for k in plan} != plan:
                if not (replace or (self.out / "results.json").is_file()):
                    raise EvaluationError(self._changed(have, plan))
                shutil.rmtree(self.out)  # finished work of other settings: a new evaluation replaces it
            else:
                if record and have.get("record") != record:
                    atomic_write_json(self.plan_path, {**have, "record": record})
                return json.loads(self.plan_path.read_text())
        self.out.mkdir(parents=True, exist_ok=True)
        for ds in datasets:
            self._write_inputs(ds, settings.max_corpus)
        atomic_write_json(self.plan_path, {**plan, "record": record, "created": now_iso()})  # last: the plan is whole
        return json.loads(self.plan_path.read_text())

    def _inputs(self, ds: Dataset) -> Path:
        return self.out / ds.folder / "input"

    def _write_inputs(self, ds: Dataset, max_corpus: int | None) -> None:
        """Each item's texts in a file of its own (and the judgements the merge scores with): a task reads its shard,
        never the whole corpus, so its memory follows the shard size."""
        corpus, queries, qrels = _load(ds, max_corpus)
        folder = self._inputs(ds)
        ids = list(corpus)
        parts = [(f"shard-{s:05d}.parquet", ids[ds.documents * s // ds.shards: ds.documents * (s + 1) // ds.shards])
                 for s in range(ds.shards)]
        for name, chosen, texts in [("queries.parquet", list(queries), queries)] + [
                (n, c, corpus) for n, c in parts]:
            table = pa.table({"id": chosen, "text": [texts[i] for i in chosen]})
            with file_replacing(folder / name) as tmp:
                pq.write_table(table, tmp)
        atomic_write_json(folder / "qrels.json", qrels)

    def _texts(self, ds: Dataset, shard: int) -> dict[str, str]:
        name = "queries.parquet" if shard < 0 else f"shard-{shard:05d}.parquet"
        table = pq.read_table(self._inputs(ds) / name)
        return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))

    def _changed(self, have: dict, want: dict) -> str:
        hs, ws = have.get("settings", {}), want["settings"]
        changed = sorted(k for k in {**hs, **ws} if hs.get(k) != ws.get(k))
        if have.get("model_hash") != want["model_hash"]:
            changed.append("the model's weights")
        own = [[{k: v for k, v in d.items() if k != "shards"} for d in plan.get("datasets", [])]  # shards follow
               for plan in (have, want)]                                                             # from shard_docs
        if own[0] != own[1]:
            changed.append("the datasets (list, files or split)")
        return (f"{self.out} holds an unfinished evaluation of other settings (changed: {', '.join(changed)}); finish "
                f"it with the same command, or delete that folder to start over")

    def load(self) -> tuple[Settings, list[Dataset]]:
        """The plan, read once per version of beir.json (`missing` asks for it per item)."""
        try:
            st = self.plan_path.stat()
        except FileNotFoundError:
            raise EvaluationError(f"{self.plan_path}: no evaluation planned here; run `colbertzero beir` first"
                                  ) from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if getattr(self, "_loaded", (None,))[0] != stamp:
            plan = json.loads(self.plan_path.read_text())
            self._loaded = (stamp, Settings(**plan["settings"]), [Dataset(**d) for d in plan["datasets"]])
        return self._loaded[1], self._loaded[2]

    # ------------------------------------------------------------ items
    def items(self, stage: str) -> list[tuple[int, int]]:
        """(dataset, shard) per item of a stage; shard -1 is the dataset's queries (encode only)."""
        _, datasets = self.load()
        if stage == "merge":
            return [(0, 0)]
        first = -1 if stage == "encode" else 0
        return [(i, s) for i, d in enumerate(datasets) for s in range(first, d.shards)]

    def _dir(self, ds: Dataset, shard: int) -> Path:
        return self.out / ds.folder / ("queries" if shard < 0 else f"shard-{shard:05d}")

    def _top(self, ds: Dataset, shard: int) -> Path:
        return self.out / ds.folder / f"top-{shard:05d}.npz"

    def done(self, stage: str, item: int) -> bool:
        if stage == "merge":
            return (self.out / "results.json").is_file()
        _, datasets = self.load()
        d, s = self.items(stage)[item]
        ds = datasets[d]
        return (self._dir(ds, s) / "meta.json").is_file() if stage == "encode" else self._top(ds, s).is_file()

    def missing(self, stage: str) -> list[int]:
        return [i for i in range(len(self.items(stage))) if not self.done(stage, i)]

    # ------------------------------------------------------------ stages
    def run(self, stage: str, item: int | None = None, *, device: str | None = None, show_progress=True) -> list[int]:
        """Run one item of a stage (``item``) or every missing one; returns the items run."""
        if stage not in STAGES:
            raise EvaluationError(f"stage {stage!r}: one of {', '.join(STAGES)}")
        n = len(self.items(stage))
        if item is not None and not 0 <= item < n:
            raise EvaluationError(f"--task {item}: the {stage} stage has items 0..{n - 1}")
        if stage == "search" and self.missing("encode"):
            raise EvaluationError(f"{self.out}: the encode stage has {len(self.missing('encode'))} item(s) to run "
                                  f"before search")
        todo = [item] if item is not None else self.missing(stage)
        todo = [i for i in todo if not self.done(stage, i)]
        if stage == "merge":
            if todo:
                self.merge()
            return todo
        settings, datasets = self.load()
        model = None
        for i in todo:
            d, s = self.items(stage)[i]
            if stage == "encode":
                model = model or _load_model(settings.model, device)
                self._encode(settings, datasets[d], s, model, show_progress)
            else:
                self._search(settings, datasets[d], s, device, show_progress)
        return todo

    def _encode(self, settings: Settings, ds: Dataset, shard: int, model, show_progress: bool) -> None:
        texts = self._texts(ds, shard)
        q_prompt, d_prompt = resolve_prompts(model, settings.prompts)
        default_q, default_d = model.query_length, model.document_length
        model.query_length = ds.query_length or default_q
        model.document_length = ds.document_length or default_d
        if shard < 0:
            prompt, what = q_prompt, f"{ds.key}: encoding queries"
        else:
            prompt, what = d_prompt, f"{ds.key}: encoding shard {shard + 1}/{ds.shards}"
        final = self._dir(ds, shard)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(final)
        try:
            tokens, dim = write_embeddings(tmp, model, texts, prompt=prompt, batch_size=settings.batch_size,
                                           show_progress=show_progress, desc=what, is_query=shard < 0,
                                           dtype=np.dtype(settings.dtype))
            atomic_write_json(tmp / "meta.json", {
                "format": 1, "dtype": settings.dtype, "tokens": tokens, "dim": dim, "documents_count": len(texts),
                "query_length": model.query_length, "document_length": model.document_length, "prompt": prompt})
            replace_dir(tmp, final)
        finally:
            model.query_length, model.document_length = default_q, default_d
            shutil.rmtree(tmp, ignore_errors=True)

    def _search(self, settings: Settings, ds: Dataset, shard: int, device: str | None, show_progress: bool) -> None:
        from ..retrieval.search import exact_search

        queries = DocumentEmbeddings.load(self._dir(ds, -1))
        docs = DocumentEmbeddings.load(self._dir(ds, shard))
        q = [queries.block(i, i + 1).astype(np.float32) for i in range(len(queries))]
        scores, index = exact_search(q, docs, settings.k, device=device or _device(),
                                     show_progress=show_progress, desc=f"{ds.key}: searching shard {shard + 1}")
        with file_replacing(self._top(ds, shard)) as tmp, open(tmp, "wb") as f:
            np.savez(f, scores=scores.astype(np.float32), index=index.astype(np.int64))

    def merge(self) -> dict:
        settings, datasets = self.load()
        missing = self.missing("search")
        if missing:
            raise EvaluationError(f"{self.out}: {len(missing)} search item(s) not done yet; run them, then merge")
        per_key = {}
        for ds in datasets:
            per_key[ds.key] = self._merge_dataset(settings, ds)
        columns: dict[str, list[str]] = {}
        for ds in datasets:
            columns.setdefault(ds.column, []).append(ds.key)
        table = {}
        for column, keys in columns.items():
            rows = [per_key[k] for k in keys]
            if keys == [column]:
                table[column] = rows[0]
                continue
            table[column] = {**{m: float(np.mean([r[m] for r in rows])) for m in METRICS},
                             "queries": sum(r["queries"] for r in rows), "documents": sum(r["documents"] for r in rows),
                             "retrieval": "exact", "split": "/".join(sorted({r["split"] for r in rows})),
                             "mean_of": len(rows), "query_length": rows[0]["query_length"],
                             "document_length": rows[0]["document_length"]}
        q_meta = json.loads((self._dir(datasets[0], -1) / "meta.json").read_text())
        d_meta = json.loads((self._dir(datasets[0], 0) / "meta.json").read_text())
        result = {
            "model": settings.model, "prompts": settings.prompts, "query_prompt": q_meta["prompt"],
            "document_prompt": d_meta["prompt"], "kind": "beir", "settings": asdict(settings),
            "datasets": table, "average": {m: float(np.mean([r[m] for r in table.values()])) for m in METRICS},
            "parts": {k: v for k, v in per_key.items() if k not in table},
        }
        atomic_write_json(self.out / "results.json", result)
        record = json.loads(self.plan_path.read_text()).get("record")
        if record:
            record_in_run(result, record, self.out / "runs")
        return result

    def _merge_dataset(self, settings: Settings, ds: Dataset) -> dict:
        qrels = json.loads((self._inputs(ds) / "qrels.json").read_text())
        q_ids = DocumentEmbeddings.load(self._dir(ds, -1)).ids
        scores = np.full((len(q_ids), 0), -np.inf, dtype=np.float32)
        ids = np.empty((len(q_ids), 0), dtype=object)
        for s in range(ds.shards):  # folded shard by shard: the merge holds the queries' top-k, whatever the shards
            top = np.load(self._top(ds, s))
            shard_ids = np.asarray(DocumentEmbeddings.load(self._dir(ds, s)).ids, dtype=object)
            idx = top["index"]
            scores = np.concatenate([scores, np.where(idx >= 0, top["scores"], -np.inf)], axis=1)
            ids = np.concatenate([ids, shard_ids[np.clip(idx, 0, None)]], axis=1)
            keep = np.argsort(-scores, axis=1, kind="stable")[:, : settings.k]  # ties: the earlier shard first
            scores, ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
        run = {qid: {str(d): float(v) for d, v in zip(ids[row], scores[row]) if np.isfinite(v)}
               for row, qid in enumerate(q_ids)}
        run = without_identical_ids(run)  # BEIR's ignore_identical_ids
        write_trec_run(run, self.out / "runs" / f"{ds.folder}.trec", tag=ds.folder)
        m = compute_metrics(run, qrels, METRICS, ignore_identical_ids=False)
        q_meta = json.loads((self._dir(ds, -1) / "meta.json").read_text())
        d_meta = json.loads((self._dir(ds, 0) / "meta.json").read_text())
        out = {**{k: float(m[k]) for k in METRICS}, "queries": int(m["queries"]), "documents": ds.documents,
               "retrieval": "exact", "split": ds.split, "query_length": q_meta["query_length"],
               "document_length": d_meta["document_length"]}
        if ds.split_note:
            out["split_note"] = ds.split_note
        return out


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(path: str, device: str | None):
    from pylate import models

    return models.ColBERT(path, device=device or _device())


def evaluate_here(out: str | os.PathLike, settings: Settings, paths: list[str], *, device: str | None = None,
                  show_progress: bool = True, record: dict | None = None, replace: bool = False) -> dict:
    """Every stage in this process (what `--executor local` runs); work already done is kept."""
    ev = Evaluation(out)
    ev.plan(settings, paths, record=record, replace=replace)
    for stage in STAGES:
        ev.run(stage, device=device, show_progress=show_progress)
    return results(out)


def results(out: str | os.PathLike) -> dict:
    path = Path(out) / "results.json"
    if not path.is_file():
        raise EvaluationError(f"{path}: not written yet (the merge stage writes it)")
    return json.loads(path.read_text())


def check_record(record: dict) -> None:
    """The run and phase the results are to be recorded in exist (before any work)."""
    from ..manifest import Manifest

    if not record.get("phase"):
        raise EvaluationError("--run-dir needs --phase: the phase whose evaluation this is")
    Manifest(record["run_dir"]).phase(record["phase"])  # ManifestError naming the run and its phases


def record_in_run(result: dict, record: dict, runs: Path) -> None:
    """The results as the phase's evaluation: its eval.json, its TREC runs, the manifest's ``eval`` (the report's
    results table reads it)."""
    from ..manifest import Manifest

    manifest = Manifest(record["run_dir"])
    layout = manifest.layout.phase(record["phase"])
    copy_runs(runs, layout.runs)
    atomic_write_json(layout.eval_json, result)

    def put(p):
        p["eval"] = result
        if p.get("beir_eval"):  # submitted after the phase: now done
            p["beir_eval"] = {**p["beir_eval"], "state": "done", "finished": now_iso()}

    manifest.update_phase(record["phase"], put)


def copy_runs(runs: Path, dest: Path) -> None:
    """The evaluation's TREC run files into a run dir's ``runs/`` (per-query comparisons read them there)."""
    for run in sorted(Path(runs).glob("*.trec")):
        dest.mkdir(parents=True, exist_ok=True)
        with file_replacing(dest / run.name) as tmp:
            shutil.copyfile(run, tmp)


def settings_for(ev, model: str) -> Settings:
    """A phase's ``eval`` block (recipe) as the settings of the evaluation of ``model`` on its ``eval.beir``: after
    the phase, and the demo's starting model alike."""
    return Settings(model=model, lengths=ev.lengths, dtype=ev.dtype, shard_docs=ev.shard_docs,
                    batch_size=ev.batch_size, max_corpus=ev.max_corpus)


def evaluate_phase(manifest, phase_name: str, export: str | os.PathLike, *, device: str | None = None,
                   defer: bool = False) -> dict | None:
    """A phase's eval.beir on its export, in the phase's ``beir/`` folder, recorded as the phase's evaluation.
    ``defer``: only plan it and mark the manifest's ``beir_eval`` planned (the Slurm job's host side submits the
    arrays: `launcher.work.submit_phase_beir`); else run every stage here and return the results. A folder left by an
    earlier export is replaced."""
    ev = manifest.recipe().phase(phase_name).eval
    record = {"run_dir": str(manifest.run_dir), "phase": phase_name}
    folder = manifest.layout.phase(phase_name).beir
    settings = settings_for(ev, str(export))
    if not defer:
        return evaluate_here(folder, settings, ev.beir, device=device, record=record, replace=True)
    Evaluation(folder).plan(settings, ev.beir, record=record, replace=True)
    manifest.update_phase(phase_name, lambda p: p.update(
        beir_eval={"state": "planned", "out": str(folder), "time": now_iso()}))
    return None


def run_planned(manifest, phase_name: str) -> dict | None:
    """A phase's deferred eval.beir run here instead of as arrays (the local executor inside a Slurm allocation:
    there is no host side after srun to submit them)."""
    planned = manifest.phase(phase_name).get("beir_eval") or {}
    if planned.get("state") != "planned":
        return None
    ev = Evaluation(planned["out"])
    for stage in STAGES:
        ev.run(stage)
    return results(ev.out)
