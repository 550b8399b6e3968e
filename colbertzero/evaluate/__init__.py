"""Retrieval quality of a PyLate ColBERT model on local BEIR / NanoBEIR folders, in one process (small sets, the
in-training evaluations; `sharded.py` is the full-scale `colbertzero beir`).

``evaluate(model_path, datasets)`` runs, per dataset folder (its name is the folder's name): load (``beir.py``) ->
judged queries, optional corpus subsample -> document embeddings, cached on disk (``retrieval/embeddings.py``) -> query
embeddings -> exact MaxSim top-100 (or an approximate index on request: ``retrieval/search.py``) -> nDCG@10, MRR@10,
recall@100, MAP@100 (``metrics.py``, trec_eval semantics).

Prompts: unless ``prompts=False``, queries get the model's ``prompts["query"]`` and documents its
``prompts["document"]`` (PyLate's ``default_prompt_name`` prompt when those keys are missing), exactly as the model
was saved by training, so evaluation cannot drift from it. ``prompts=False`` encodes the bare text (ablations).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from pylate import models

from ..retrieval.embeddings import (
    CACHE_ENV,
    DocumentEmbeddings,
    document_embeddings,
    encode,
    encode_queries,
    model_hash,
    model_hash_or_none,
    resolve_prompts,
)
from ..retrieval.search import EXACT_MAX_DOCS, choose_backend, exact_search, index_search
from .beir import DatasetError, DatasetWarning, load_beir, subsample_corpus
from .metrics import METRICS, compute_metrics, max_cutoff, without_identical_ids, write_trec_run

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


def evaluate(
    model_path: str,
    datasets: list[str],
    *,
    prompts: bool = True,
    batch_size: int = 32,
    max_corpus: int | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    index: str = "exact",
    show_progress: bool = True,
    model=None,
    runs_dir: str | os.PathLike | None = None,
) -> dict:
    """Evaluate a PyLate ColBERT model on dataset folders; see the module docstring.

    ``model``: an already loaded ``pylate.models.ColBERT`` for ``model_path`` (not reloaded; ``device`` moves it).
    It must hold the weights saved at ``model_path``: the embedding cache is keyed by that folder's files, so
    in-memory weights that differ (mid-training) need their own ``cache_dir`` or a save first.
    ``index``: ``"exact"`` (the default: exhaustive MaxSim, memory bounded by the tile; `colbertzero beir` shards
    it for full-size corpora), ``"plaid"`` or ``"voyager"`` (approximate; Voyager keeps an HNSW graph of every token
    in RAM, ~1 KB a token: MS MARCO's 700M tokens would need ~0.7 TB, so only small corpora), or ``"auto"`` (exact
    up to EXACT_MAX_DOCS documents, then PLAID if fast-plaid is installed, else Voyager).
    ``runs_dir``: write each dataset's run there as ``<dataset>.trec`` (TREC format, after BEIR's identical-id rule),
    so any other tool can score it again.
    Returns ``{"model", "prompts", "query_prompt", "document_prompt", "datasets": {name: {metric: value, ...,
    "queries", "documents", "retrieval"}}, "average": {metric: value}}``.
    """
    if not datasets:
        raise ValueError("no dataset given")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_corpus is not None and max_corpus <= 0:
        raise ValueError(f"max_corpus must be positive, got {max_corpus}")
    choose_backend(index, 0)  # reject a bad name before any work
    paths = [Path(d) for d in datasets]
    names = [p.resolve().name for p in paths]
    for path in paths:
        if not path.is_dir():
            raise DatasetError(f"{path}: dataset folder not found")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"datasets are named by their folder and these names repeat: {repeated}")

    if model is None:
        model = models.ColBERT(str(model_path), device=device)
    elif device is not None:
        model.to(device)
    query_prompt, document_prompt = resolve_prompts(model, prompts)
    digest = model_hash_or_none(str(model_path))
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
                runs_dir=Path(runs_dir) if runs_dir is not None else None,
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
                      digest, workdir, index, k, show_progress, runs_dir) -> dict:
    corpus, queries, qrels = load_beir(path)
    corpus = subsample_corpus(corpus, qrels, max_corpus)
    backend = choose_backend(index, len(corpus))  # before encoding: a missing package fails in seconds, not hours
    docs = document_embeddings(
        model, corpus, dataset=name, cache_root=cache_root, model_digest=digest, prompt=document_prompt,
        batch_size=batch_size, show_progress=show_progress, workdir=workdir,
    )
    query_ids = list(qrels)
    query_embs = [
        np.asarray(e, dtype=np.float32)
        for e in encode(model, [queries[q] for q in query_ids], is_query=True, prompt=query_prompt,
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
        hits = index_search(backend, query_embs, docs, k, docs.folder / "index", model.device, show_progress)
        run = dict(zip(query_ids, hits))
    run = without_identical_ids(run)  # BEIR's ignore_identical_ids
    if runs_dir is not None:
        write_trec_run(run, runs_dir / f"{name}.trec", tag=name)
    scores = compute_metrics(run, qrels, METRICS, ignore_identical_ids=False)  # dropped above, once
    logger.info("%s: %s", name, {m: round(scores[m], 4) for m in METRICS})
    return {**{m: float(scores[m]) for m in METRICS}, "queries": int(scores["queries"]), "documents": len(docs),
            "retrieval": backend}


_HEADERS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@100": "R@100", "map@100": "MAP@100"}


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`evaluate`'s result (scores x100), saying how prompts were applied."""
    metrics = list(result.get("average") or METRICS)
    rows = result["datasets"]
    width = max([len("dataset"), len("average")] + [len(n) for n in rows])
    lines = [f"model: {result['model']}"]
    if result.get("kind") == "teacher":  # evaluate_teacher's: encoders without prompts, BM25, a fusion
        lines.append("as a retriever" + (f", fused by {result['fusion']} (candidates: each model's top-100)"
                                         if result.get("fusion") else ""))
    elif not result.get("prompts", True):
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
