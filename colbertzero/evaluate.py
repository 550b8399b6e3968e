"""Retrieval quality of a PyLate ColBERT model on local BEIR / NanoBEIR folders.

``evaluate(model_path, datasets)`` runs, per dataset folder (its name is the folder's name):
load (:func:`load_beir`) -> judged queries, optional corpus subsample -> document embeddings (disk cache) -> query
embeddings -> exact MaxSim top-100 (or an index for very large corpora) -> :func:`compute_metrics`
(nDCG@10, MRR@10, recall@100, MAP@100; trec_eval semantics, see ``colbertzero.metrics``).

Dataset layouts, each table looked up in this order:
- corpus:  ``corpus.jsonl`` / ``corpus.jsonl.gz`` (BEIR), ``corpus.parquet``, ``corpus/*.parquet`` (NanoBEIR as
  published: ``corpus/train-00000-of-00001.parquet``). Fields ``_id``, ``text``, optional ``title``.
- queries: the same with ``queries``; fields ``_id``, ``text``.
- qrels:   ``qrels/<split>.tsv`` (``query-id  corpus-id  score``, header line optional, TREC's 4-column form
  accepted), ``qrels/*.parquet`` (files named ``<split>-*`` preferred, else all of them), ``qrels.parquet``.
  Parquet columns ``query-id``, ``corpus-id``, optional ``score`` (NanoBEIR lists relevant pairs only: score 1).

Data decisions:
- A document's text is ``f"{title} {text}".strip()``, PyLate's BEIR convention; queries are used as written.
- Qrels naming a query or document the dataset does not have are dropped with a :class:`DatasetWarning` (such a
  judgement can never be retrieved; it almost always means a corpus/qrels mismatch, which the warning surfaces).
  pytrec_eval would instead count unknown documents as relevant-but-missed.
- Duplicate ids keep their first occurrence (warned). Malformed input raises :class:`DatasetError` naming the file,
  the line (or parquet row) and the field.

Prompts: unless ``prompts=False``, queries get the model's ``prompts["query"]`` and documents its
``prompts["document"]`` (PyLate's ``default_prompt_name`` prompt when those keys are missing), exactly as the model
was saved by training, so evaluation cannot drift from it. ``prompts=False`` encodes the bare text (ablations).

Document embeddings are cached on disk, one entry per (model hash, dataset, documents, document prompt, document
length, PyLate version), under ``cache_dir`` (default ``$COLBERTZERO_EMBEDDINGS_CACHE`` or
``~/.cache/colbertzero/embeddings``); an entry is written to a temporary folder and renamed into place, so a killed
run never leaves a half-written entry behind.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import METRICS, compute_metrics, max_cutoff

__all__ = [
    "DatasetError",
    "DatasetWarning",
    "DocumentEmbeddings",
    "EXACT_MAX_DOCS",
    "compute_metrics",
    "document_embeddings",
    "encode_queries",
    "evaluate",
    "exact_search",
    "format_table",
    "load_beir",
    "model_hash",
    "resolve_prompts",
    "subsample_corpus",
]

logger = logging.getLogger(__name__)

EXACT_MAX_DOCS = 100_000  # past this, index="auto" switches from exhaustive MaxSim to an index
CACHE_ENV = "COLBERTZERO_EMBEDDINGS_CACHE"
_CACHE_FORMAT = 1
# Elements of the [queries, documents, query tokens, document tokens] similarity block PyLate's colbert_scores
# materialises for one chunk; it makes ~3 tensors of that size, so this bounds scoring memory (~200 MB on CPU).
_SIM_BLOCK = {"cpu": 1 << 24, "cuda": 1 << 27}
_QUERY_CHUNK_TARGET = 16
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth"}
_CONFIG_SUFFIXES = {".json", ".txt", ".model"}  # configs, tokenizer vocabularies / sentencepiece models


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the file, line/row and field."""


class DatasetWarning(UserWarning):
    """Data that was usable but not clean (unknown ids in qrels, duplicate ids, ...)."""


# --------------------------------------------------------------------------------------------------------- loading


def load_beir(
    path: str | os.PathLike, split: str = "test"
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """``(corpus, queries, qrels)`` of a BEIR or NanoBEIR folder: ``{doc_id: text}``, ``{query_id: text}``,
    ``{query_id: {doc_id: grade}}``. See the module docstring for layouts and the handling of unclean data."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (expected a BEIR or NanoBEIR folder)")
    corpus = _load_texts(root, "corpus", with_title=True)
    queries = _load_texts(root, "queries", with_title=False)
    qrels, qrels_source = _load_qrels(root, split)
    return corpus, queries, _clean_qrels(qrels, corpus, queries, qrels_source)


def _find_table(root: Path, table: str) -> tuple[str, list[Path]]:
    for name in (f"{table}.jsonl", f"{table}.jsonl.gz"):
        if (root / name).is_file():
            return "jsonl", [root / name]
    if (root / f"{table}.parquet").is_file():
        return "parquet", [root / f"{table}.parquet"]
    files = sorted((root / table).glob("*.parquet")) if (root / table).is_dir() else []
    if files:
        return "parquet", files
    raise DatasetError(
        f"{root}: no {table} table: expected {table}.jsonl (BEIR) or {table}/*.parquet / {table}.parquet "
        f"(NanoBEIR); download the dataset into this folder or fix the path"
    )


def _load_texts(root: Path, table: str, *, with_title: bool) -> dict[str, str]:
    fmt, files = _find_table(root, table)
    records = _iter_jsonl(files[0]) if fmt == "jsonl" else _iter_parquet_rows(files)
    out: dict[str, str] = {}
    duplicates = 0
    for where, row in records:
        doc_id = row.get("_id")
        if doc_id is None or (isinstance(doc_id, str) and not doc_id):
            raise DatasetError(f"{where}: missing field '_id' (every {table} record needs an id)")
        text = row.get("text")
        if not isinstance(text, str):
            raise DatasetError(f"{where}: field 'text' is missing or not a string (got {type(text).__name__})")
        if with_title:
            title = row.get("title") or ""
            if not isinstance(title, str):
                raise DatasetError(f"{where}: field 'title' is not a string (got {type(title).__name__})")
            text = f"{title} {text}".strip()
        doc_id = str(doc_id)
        if doc_id in out:
            duplicates += 1
            continue
        out[doc_id] = text
    if duplicates:
        warnings.warn(f"{files[0]}: {duplicates} duplicate '_id' values; kept the first of each", DatasetWarning, 2)
    if not out:
        raise DatasetError(f"{files[0]}: the {table} table is empty")
    return out


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(
                        f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line must hold one JSON object "
                        f"- fix or remove that line"
                    ) from None
                if not isinstance(row, dict):
                    raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e}); re-encode the file as UTF-8") from None


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged or non-parquet file
        raise DatasetError(f"{path}: cannot read as parquet ({e}); re-download the file") from None


def _iter_parquet_rows(files: list[Path]) -> Iterator[tuple[str, dict]]:
    for path in files:
        table = _read_parquet(path)
        columns = {name: table.column(name).to_pylist() for name in ("_id", "text", "title") if name in table.schema.names}
        for required in ("_id", "text"):
            if required not in columns:
                raise DatasetError(f"{path}: no column '{required}' (columns: {table.schema.names})")
        for i in range(table.num_rows):
            yield f"{path} row {i}", {name: values[i] for name, values in columns.items()}


def _grade(value: Any) -> int:
    """Relevance judgement as an int; "2", 2, "2.0" and 2.0 are fine, anything else raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _load_qrels(root: Path, split: str) -> tuple[dict[str, dict[str, int]], Path]:
    qdir = root / "qrels"
    tsv = qdir / f"{split}.tsv"
    if tsv.is_file():
        return _read_qrels_tsv(tsv), tsv
    files = sorted(qdir.glob("*.parquet")) if qdir.is_dir() else []
    files = [f for f in files if f.name.startswith(split)] or files
    if not files and (root / "qrels.parquet").is_file():
        files = [root / "qrels.parquet"]
    if files:
        return _read_qrels_parquet(files), files[0]
    present = sorted(p.name for p in qdir.iterdir()) if qdir.is_dir() else []
    raise DatasetError(
        f"{root}: no qrels for split '{split}': expected qrels/{split}.tsv (BEIR) or qrels/*.parquet (NanoBEIR)"
        + (f"; qrels/ holds {present}" if present else "")
    )


def _read_qrels_tsv(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    first = True
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            if len(parts) == 4:  # TREC qrels: query-id, iteration, doc-id, relevance
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise DatasetError(
                    f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}"
                )
            qid, did, score = (p.strip() for p in parts)
            try:
                grade = _grade(score)
            except ValueError:
                if first:  # BEIR files start with a "query-id corpus-id score" header; others have none
                    first = False
                    continue
                raise DatasetError(f"{path}:{lineno}: score {score!r} is not an integer relevance grade") from None
            first = False
            qrels.setdefault(qid, {})[did] = grade
    return qrels


def _column(table, path: Path, names: tuple[str, ...], required: bool = True):
    for name in names:
        if name in table.schema.names:
            return table.column(name).to_pylist()
    if required:
        raise DatasetError(f"{path}: no column {names[0]!r} (columns: {table.schema.names})")
    return None


def _read_qrels_parquet(files: list[Path]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for path in files:
        table = _read_parquet(path)
        qids = _column(table, path, ("query-id", "query_id", "qid"))
        dids = _column(table, path, ("corpus-id", "corpus_id", "doc_id", "docid"))
        scores = _column(table, path, ("score",), required=False) or [1] * table.num_rows
        for i, (qid, did, score) in enumerate(zip(qids, dids, scores)):
            try:
                grade = _grade(score)
            except (TypeError, ValueError):
                raise DatasetError(f"{path} row {i}: score {score!r} is not an integer relevance grade") from None
            qrels.setdefault(str(qid), {})[str(did)] = grade
    return qrels


def _clean_qrels(qrels, corpus, queries, source: Path) -> dict[str, dict[str, int]]:
    unknown_queries = [q for q in qrels if q not in queries]
    unknown_docs = sorted({d for q, judged in qrels.items() if q in queries for d in judged if d not in corpus})
    if unknown_queries:
        warnings.warn(
            f"{source}: {len(unknown_queries)} query ids have no query text (e.g. {unknown_queries[:3]}); "
            f"their judgements are ignored",
            DatasetWarning,
            3,
        )
    if unknown_docs:
        warnings.warn(
            f"{source}: {len(unknown_docs)} judged document ids are not in the corpus (e.g. {unknown_docs[:3]}); "
            f"those judgements are ignored - check that corpus and qrels come from the same dataset",
            DatasetWarning,
            3,
        )
    cleaned = {}
    for qid, judged in qrels.items():
        if qid not in queries:
            continue
        kept = {d: g for d, g in judged.items() if d in corpus}
        if kept:
            cleaned[qid] = kept
    if not cleaned:
        raise DatasetError(f"{source}: no judgement refers to a known query and document; nothing to evaluate")
    return cleaned


def subsample_corpus(corpus: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]], max_corpus: int | None):
    """At most ``max_corpus`` documents (more only when the judged ones alone exceed it): every judged document,
    then others in sha256(id) order, so the same ids are picked whatever the file order or machine."""
    if max_corpus is None or len(corpus) <= max_corpus:
        return dict(corpus)
    if max_corpus <= 0:
        raise ValueError(f"max_corpus must be positive, got {max_corpus}")
    judged = {d for docs in qrels.values() for d in docs if d in corpus}
    if len(judged) >= max_corpus:
        warnings.warn(
            f"max_corpus={max_corpus} is below the {len(judged)} judged documents; keeping all judged ones",
            DatasetWarning,
            2,
        )
        keep = judged
    else:
        others = sorted((d for d in corpus if d not in judged), key=lambda d: hashlib.sha256(d.encode()).digest())
        keep = judged | set(others[: max_corpus - len(judged)])
    return {d: t for d, t in corpus.items() if d in keep}


# --------------------------------------------------------------------------------------------------------- model


def resolve_prompts(model, enabled: bool = True) -> tuple[str | None, str | None]:
    """(query prompt, document prompt) the evaluation applies: the model's own, or (None, None) when disabled."""
    if not enabled:
        return None, None
    prompts = dict(getattr(model, "prompts", None) or {})
    default_name = getattr(model, "default_prompt_name", None)
    default = prompts.get(default_name) if default_name else None
    # PyLate saves empty prompts ("") when none were set: that means no prompt.
    return prompts.get("query", default) or None, prompts.get("document", default) or None


def _encode(model, texts: list[str], *, is_query: bool, prompt: str | None, batch_size: int, show_progress=False):
    if not texts:
        return []
    if prompt is None and getattr(model, "default_prompt_name", None):
        prompt = ""  # PyLate falls back to its default prompt on None; "no prompt" must stay no prompt
    return model.encode(
        texts, is_query=is_query, prompt=prompt, batch_size=batch_size, show_progress_bar=show_progress
    )


def encode_queries(model, texts: Sequence[str], *, prompts: bool = True, batch_size: int = 32, show_progress=False):
    """Query token embeddings (one float32 array per query) with the prompt :func:`evaluate` uses."""
    query_prompt, _ = resolve_prompts(model, prompts)
    embs = _encode(model, list(texts), is_query=True, prompt=query_prompt, batch_size=batch_size,
                   show_progress=show_progress)
    return [np.asarray(e, dtype=np.float32) for e in embs]


_HASH_MEMO: dict[tuple, str] = {}


def model_hash(model_path: str | os.PathLike) -> str:
    """sha256 over a model folder's weight, config and tokenizer files (relative path + bytes, sorted by path)."""
    root = Path(model_path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a model folder")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in _WEIGHT_SUFFIXES | _CONFIG_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"{root}: no weight files (*.safetensors, *.bin) - is this a model folder?")
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp in _HASH_MEMO:  # hashing a large checkpoint takes seconds; in-process repeats are free
        return _HASH_MEMO[stamp]
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    _HASH_MEMO[stamp] = h.hexdigest()
    return _HASH_MEMO[stamp]


def _model_hash_or_none(model_path: str) -> str | None:
    """The folder hash, looking a hub id up in the local hub cache; None (no embedding cache) when neither works."""
    folder = Path(model_path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo_id=str(model_path), local_files_only=True))
        except Exception:
            logger.warning("model %s is not a local folder: document embeddings will not be cached", model_path)
            return None
    try:
        return model_hash(folder)
    except FileNotFoundError as e:
        logger.warning("%s: document embeddings will not be cached", e)
        return None


# --------------------------------------------------------------------------------------------------------- embeddings


@dataclass
class DocumentEmbeddings:
    """A corpus's token embeddings, flat: document ``i`` (id ``ids[i]``) is ``embeddings[offsets[i]:offsets[i+1]]``.

    Stored longest text first, so consecutive documents have similar token counts and a chunk of them pads little.
    ``embeddings`` is a read-only memory map when it comes from disk: scoring reads one chunk at a time.
    """

    ids: list[str]
    offsets: np.ndarray  # int64 [n + 1]
    embeddings: np.ndarray  # float32 [tokens, dim]
    cached: bool = False  # True when read back from an existing cache entry
    folder: Path | None = None  # the entry on disk; an index for this corpus is kept inside it

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def get(self, i: int) -> np.ndarray:
        return np.asarray(self.embeddings[self.offsets[i] : self.offsets[i + 1]])

    @classmethod
    def load(cls, folder: Path) -> "DocumentEmbeddings":
        meta = json.loads((folder / "meta.json").read_text())
        ids = json.loads((folder / "ids.json").read_text())
        offsets = np.load(folder / "offsets.npy")
        if meta.get("format") != _CACHE_FORMAT or len(ids) + 1 != len(offsets) or offsets[-1] != meta["tokens"]:
            raise ValueError(f"{folder}: inconsistent cache entry")
        emb = np.memmap(folder / "embeddings.f32", dtype=np.float32, mode="r", shape=(meta["tokens"], meta["dim"]))
        return cls(ids=ids, offsets=offsets, embeddings=emb, cached=True, folder=folder)


def _documents_digest(corpus: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for doc_id in sorted(corpus):
        h.update(doc_id.encode() + b"\0" + corpus[doc_id].encode() + b"\0")
    return h.hexdigest()


def _write_embeddings(folder: Path, model, corpus: Mapping[str, str], *, prompt, batch_size, show_progress, desc):
    ids = sorted(corpus, key=lambda d: (-len(corpus[d]), d))  # text length stands in for token count, as in ST
    chunk = max(16 * batch_size, 256)  # a few hundred documents per encode call: steady progress, bounded memory
    offsets = [0]
    dim = 0
    from tqdm.auto import tqdm

    with open(folder / "embeddings.f32", "wb") as f, tqdm(
        total=len(ids), desc=desc, unit="doc", disable=not show_progress
    ) as bar:
        for start in range(0, len(ids), chunk):
            batch = ids[start : start + chunk]
            for emb in _encode(model, [corpus[d] for d in batch], is_query=False, prompt=prompt, batch_size=batch_size):
                emb = np.ascontiguousarray(emb, dtype=np.float32)
                dim = emb.shape[1]
                f.write(emb.tobytes())
                offsets.append(offsets[-1] + emb.shape[0])
            bar.update(len(batch))
    np.save(folder / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    (folder / "ids.json").write_text(json.dumps(ids))
    return offsets[-1], dim


def document_embeddings(
    model,
    corpus: Mapping[str, str],
    *,
    dataset: str,
    cache_root: Path | None,
    model_digest: str | None,
    prompt: str | None,
    batch_size: int = 32,
    show_progress: bool = True,
    workdir: Path | None = None,
) -> DocumentEmbeddings:
    """Embeddings of ``corpus`` with ``prompt``: read from the cache when an entry exists, else encoded and stored.

    Without ``cache_root``/``model_digest`` (no stable model identity) they are written under ``workdir`` instead.
    """
    key_material = {
        "format": _CACHE_FORMAT,
        "model": model_digest,
        "documents": _documents_digest(corpus),
        "prompt": prompt,
        "document_length": getattr(model, "document_length", None),
        "pylate": _pylate_version(),
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
    name = f"{dataset}-{'prompt' if prompt else 'noprompt'}-{key[:16]}"
    if cache_root is not None and model_digest is not None:
        parent = cache_root / model_digest[:16]
    elif workdir is not None:
        parent = workdir
    else:
        raise ValueError("document_embeddings needs a cache (cache_root + model_digest) or a workdir")
    entry = parent / name
    if entry.is_dir():
        try:
            docs = DocumentEmbeddings.load(entry)
            logger.info("%s: document embeddings from cache %s", dataset, entry)
            return docs
        except (OSError, ValueError, KeyError) as e:
            logger.warning("%s: unreadable cache entry (%s); encoding again", entry, e)
            _remove(entry)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        tokens, dim = _write_embeddings(
            tmp, model, corpus, prompt=prompt, batch_size=batch_size, show_progress=show_progress,
            desc=f"{dataset}: encoding documents",
        )
        meta = dict(key_material, dataset=dataset, documents_count=len(corpus), tokens=tokens, dim=dim)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first: use theirs
            if not entry.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    docs = DocumentEmbeddings.load(entry)
    docs.cached = False
    return docs


def _remove(folder: Path) -> None:
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}")
    try:
        os.replace(folder, trash)  # out of the way first, so no reader ever sees a half-deleted entry
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _pylate_version() -> str:
    try:
        from importlib.metadata import version

        return version("pylate")
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------------------------------------- search


def _pad(arrays: Sequence[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(a) for a in arrays])
    width = int(lengths.max()) if len(arrays) else 0
    dim = arrays[0].shape[1]
    padded = torch.zeros(len(arrays), width, dim)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    if width:
        padded[mask] = torch.from_numpy(np.concatenate(arrays, axis=0))
    return padded.to(device), mask.to(device)


def exact_search(
    query_embeddings: Sequence[np.ndarray],
    docs: DocumentEmbeddings,
    k: int,
    *,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
    desc: str = "searching",
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive MaxSim: ``(scores, doc_indices)``, each ``[queries, min(k, docs)]``, best first.

    Scores come from PyLate's ``colbert_scores`` on zero-padded chunks with masks (the same numbers as PyLate's own
    evaluator); only a running top-k per query is kept, merged chunk by chunk with ``torch.topk``.
    """
    from pylate.scores import colbert_scores
    from tqdm.auto import tqdm

    device = torch.device(device)
    n_docs = len(docs)
    k = min(k, n_docs)
    queries, queries_mask = _pad(query_embeddings, device)
    n_q, q_len = queries.shape[0], queries.shape[1]
    top_scores = torch.full((n_q, k), -math.inf, device=device)
    top_index = torch.full((n_q, k), -1, dtype=torch.long, device=device)
    budget = _SIM_BLOCK.get(device.type, _SIM_BLOCK["cuda"])
    lengths = np.diff(docs.offsets)
    q_target = min(n_q, _QUERY_CHUNK_TARGET)
    start = 0
    with torch.inference_mode(), tqdm(total=n_docs, desc=desc, unit="doc", disable=not show_progress) as bar:
        while start < n_docs:
            # Storage is roughly longest first (by characters), so the first document sizes the chunk; the chunk is
            # then trimmed to what its real widest document allows, which keeps the block within budget.
            width = max(int(lengths[start]), 1)
            end = min(n_docs, start + max(1, budget // (q_target * q_len * width)))
            width = max(int(lengths[start:end].max()), 1)
            end = min(end, start + max(1, budget // (q_target * q_len * width)))
            width = max(int(lengths[start:end].max()), 1)
            block = np.array(docs.embeddings[docs.offsets[start] : docs.offsets[end]])  # one read off the memmap
            chunk_lengths = torch.from_numpy(lengths[start:end].astype(np.int64))
            mask = torch.arange(width)[None, :] < chunk_lengths[:, None]
            padded = torch.zeros(end - start, width, docs.dim)
            padded[mask] = torch.from_numpy(block)
            padded, mask = padded.to(device), mask.to(device)
            doc_index = torch.arange(start, end, device=device)
            q_step = max(1, budget // ((end - start) * q_len * width))
            for qs in range(0, n_q, q_step):
                qe = min(n_q, qs + q_step)
                scores = colbert_scores(
                    queries[qs:qe], padded, queries_mask=queries_mask[qs:qe], documents_mask=mask
                ).float()
                cand_scores = torch.cat([top_scores[qs:qe], scores], dim=1)
                cand_index = torch.cat([top_index[qs:qe], doc_index.expand(qe - qs, -1)], dim=1)
                best, pos = torch.topk(cand_scores, k, dim=1)
                top_scores[qs:qe] = best
                top_index[qs:qe] = torch.gather(cand_index, 1, pos)
            bar.update(end - start)
            start = end
    return top_scores.cpu().numpy(), top_index.cpu().numpy()


def _choose_backend(index: str, n_docs: int) -> str:
    choice = (index or "auto").lower()
    if choice not in ("auto", "exact", "plaid", "voyager"):
        raise ValueError(f"index must be 'auto', 'exact', 'plaid' or 'voyager', got {index!r}")
    if choice == "exact" or (choice == "auto" and n_docs <= EXACT_MAX_DOCS):
        return "exact"
    has_plaid, has_voyager = find_spec("fast_plaid") is not None, find_spec("voyager") is not None
    if choice == "plaid" and not has_plaid:
        raise ImportError(
            "index='plaid' needs the fast-plaid package (pip install fast-plaid; its wheels pin their own torch "
            "version); or use index='voyager' (pip install voyager) or index='exact'"
        )
    if choice == "voyager" and not has_voyager:
        raise ImportError("index='voyager' needs the voyager package: pip install voyager (or use index='exact')")
    if choice == "auto":
        if has_plaid:
            return "plaid"
        if not has_voyager:
            raise ImportError(
                f"{n_docs} documents is past the exact-search limit ({EXACT_MAX_DOCS}) and no index package is "
                f"installed: pip install voyager (or fast-plaid), or pass index='exact' to search exhaustively anyway"
            )
        return "voyager"
    return choice


def _index_search(kind, query_embeddings, docs: DocumentEmbeddings, k, folder: Path, device, show_progress):
    """Top-k through a PyLate index kept beside the embeddings; reused only once its build completed."""
    from pylate import indexes, retrieve

    done = folder / f"{kind}.complete"
    built = done.is_file()
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "plaid":
        index = indexes.PLAID(
            index_folder=str(folder), index_name="plaid", override=not built, device=str(device),
            show_progress=show_progress,
        )
    else:
        index = indexes.Voyager(index_folder=str(folder), index_name="voyager", override=not built,
                                embedding_size=docs.dim)
    if not built:
        index.add_documents(documents_ids=docs.ids, documents_embeddings=[docs.get(i) for i in range(len(docs))])
        done.write_text("ok\n")
    results = retrieve.ColBERT(index=index).retrieve(queries_embeddings=query_embeddings, k=k)
    return [{str(r["id"]): float(r["score"]) for r in hits} for hits in results]


# --------------------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model_path: str,
    datasets: list[str],
    *,
    prompts: bool = True,
    batch_size: int = 32,
    max_corpus: int | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    index: str = "auto",
    show_progress: bool = True,
    model=None,
) -> dict:
    """Evaluate a PyLate ColBERT model on dataset folders; see the module docstring.

    ``model``: an already loaded ``pylate.models.ColBERT`` for ``model_path`` (not reloaded; ``device`` moves it).
    It must hold the weights saved at ``model_path``: the embedding cache is keyed by that folder's files, so
    in-memory weights that differ (mid-training) need their own ``cache_dir`` or a save first.
    ``index``: ``"auto"`` (exact up to EXACT_MAX_DOCS documents, then PLAID if fast-plaid is installed, else
    Voyager), ``"exact"``, ``"plaid"`` or ``"voyager"``.
    Returns ``{"model", "prompts", "query_prompt", "document_prompt", "datasets": {name: {metric: value, ...,
    "queries", "documents", "retrieval"}}, "average": {metric: value}}``.
    """
    if not datasets:
        raise ValueError("no dataset given")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_corpus is not None and max_corpus <= 0:
        raise ValueError(f"max_corpus must be positive, got {max_corpus}")
    _choose_backend(index, 0)  # reject a bad name before any work
    paths = [Path(d) for d in datasets]
    names = [p.resolve().name for p in paths]
    for path in paths:
        if not path.is_dir():
            raise DatasetError(f"{path}: dataset folder not found")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"datasets are named by their folder and these names repeat: {repeated}")

    if model is None:
        from pylate import models

        model = models.ColBERT(str(model_path), device=device)
    elif device is not None:
        model.to(device)
    query_prompt, document_prompt = resolve_prompts(model, prompts)
    digest = _model_hash_or_none(str(model_path))
    cache_root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "colbertzero" / "embeddings")
    cache_root = cache_root.expanduser()
    k = max_cutoff(METRICS)
    per_dataset = {}
    with ExitStack() as stack:
        workdir = None if digest else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="colbertzero-eval-")))
        for path, name in zip(paths, names):
            per_dataset[name] = _evaluate_dataset(
                model, path, name, query_prompt=query_prompt, document_prompt=document_prompt,
                batch_size=batch_size, max_corpus=max_corpus, cache_root=cache_root if digest else None,
                digest=digest, workdir=workdir, index=index, k=k, show_progress=show_progress,
            )
    average = {m: float(np.mean([r[m] for r in per_dataset.values()])) for m in METRICS}
    return {
        "model": str(model_path),
        "prompts": bool(prompts),
        "query_prompt": query_prompt,
        "document_prompt": document_prompt,
        "datasets": per_dataset,
        "average": average,
    }


def _evaluate_dataset(model, path, name, *, query_prompt, document_prompt, batch_size, max_corpus, cache_root,
                      digest, workdir, index, k, show_progress) -> dict:
    corpus, queries, qrels = load_beir(path)
    corpus = subsample_corpus(corpus, qrels, max_corpus)
    backend = _choose_backend(index, len(corpus))  # before encoding: a missing package fails in seconds, not hours
    docs = document_embeddings(
        model, corpus, dataset=name, cache_root=cache_root, model_digest=digest, prompt=document_prompt,
        batch_size=batch_size, show_progress=show_progress, workdir=workdir,
    )
    query_ids = list(qrels)
    query_embs = [
        np.asarray(e, dtype=np.float32)
        for e in _encode(model, [queries[q] for q in query_ids], is_query=True, prompt=query_prompt,
                         batch_size=batch_size)
    ]
    if backend == "exact":
        scores, indices = exact_search(
            query_embs, docs, k, device=model.device, show_progress=show_progress, desc=f"{name}: MaxSim search"
        )
        run = {
            qid: {docs.ids[int(i)]: float(s) for s, i in zip(scores[row], indices[row]) if i >= 0}
            for row, qid in enumerate(query_ids)
        }
    else:
        hits = _index_search(backend, query_embs, docs, k, docs.folder / "index", model.device, show_progress)
        run = dict(zip(query_ids, hits))
    scores = compute_metrics(run, qrels, METRICS)
    logger.info("%s: %s", name, {m: round(scores[m], 4) for m in METRICS})
    return {**{m: float(scores[m]) for m in METRICS}, "queries": int(scores["queries"]), "documents": len(docs),
            "retrieval": backend}


# --------------------------------------------------------------------------------------------------------- table

_HEADERS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@100": "R@100", "map@100": "MAP@100"}


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`evaluate`'s result (scores x100), saying how prompts were applied."""
    metrics = list(result.get("average") or METRICS)
    rows = result["datasets"]
    width = max([len("dataset"), len("average")] + [len(n) for n in rows])
    lines = [f"model: {result['model']}"]
    if not result.get("prompts", True):
        lines.append("prompts: OFF (ablation: the model's query/document prompts were not applied)")
    elif result.get("query_prompt") or result.get("document_prompt"):
        lines.append(f"prompts: query {result.get('query_prompt')!r}, document {result.get('document_prompt')!r}")
    else:
        lines.append("prompts: none (the model's config has no query/document prompts)")
    header = f"{'dataset':<{width}}  {'queries':>7}  {'documents':>9}  " + "  ".join(
        f"{_HEADERS.get(m, m):>8}" for m in metrics
    )
    lines += [header, "-" * len(header)]
    for name, r in rows.items():
        mark = "" if r.get("retrieval", "exact") == "exact" else f"  ({r['retrieval']} index)"
        lines.append(
            f"{name:<{width}}  {r['queries']:>7}  {r['documents']:>9}  "
            + "  ".join(f"{100 * r[m]:>8.2f}" for m in metrics)
            + mark
        )
    if len(rows) > 1:
        lines.append("-" * len(header))
        lines.append(f"{'average':<{width}}  {'':>7}  {'':>9}  " + "  ".join(
            f"{100 * result['average'][m]:>8.2f}" for m in metrics))
    lines.append("scores x100")
    return "\n".join(lines)
