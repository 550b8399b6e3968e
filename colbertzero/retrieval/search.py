"""Top-k retrieval over cached document embeddings: exact MaxSim (PyLate's scores, in blocks of bounded memory) or,
for very large corpora, a PyLate index (PLAID with fast-plaid, else Voyager)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..scoring import select
from .embeddings import DocumentEmbeddings

EXACT_MAX_DOCS = 100_000  # past this, index="auto" switches from exhaustive MaxSim to an index
# Elements of the [query tokens, document tokens] similarity tile of one chunk (`Scorer.search_scores` holds one):
# bounds scoring memory (64 MB on CPU).
_SIM_BLOCK = {"cpu": 1 << 24, "cuda": 1 << 27}
_QUERY_CHUNK_TARGET = 16


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

    Scores come from PyLate's ``colbert_scores`` on zero-padded chunks (the same numbers as PyLate's own evaluator),
    through the fused kernel on a GPU that runs it (`colbertzero.scoring`); only a running top-k per query is kept,
    merged chunk by chunk with ``torch.topk``.
    """
    device = torch.device(device)
    scorer = select("auto", device, docs.dim)
    n_docs = len(docs)
    k = min(k, n_docs)
    queries, _ = _pad(query_embeddings, device)
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
            block = torch.from_numpy(docs.block(start, end)).float()  # one read off the disk
            chunk_lengths = torch.from_numpy(lengths[start:end].astype(np.int64))
            mask = torch.arange(width)[None, :] < chunk_lengths[:, None]
            padded = torch.zeros(end - start, width, docs.dim)
            padded[mask] = block
            padded = padded.to(device)
            doc_index = torch.arange(start, end, device=device)
            q_step = max(1, budget // ((end - start) * q_len * width))
            for qs in range(0, n_q, q_step):
                qe = min(n_q, qs + q_step)
                scores = scorer.search_scores(queries[qs:qe], padded).float()  # zero-padded: no mask needed
                cand_scores = torch.cat([top_scores[qs:qe], scores], dim=1)
                cand_index = torch.cat([top_index[qs:qe], doc_index.expand(qe - qs, -1)], dim=1)
                best, pos = torch.topk(cand_scores, k, dim=1)
                top_scores[qs:qe] = best
                top_index[qs:qe] = torch.gather(cand_index, 1, pos)
            bar.update(end - start)
            start = end
    return top_scores.cpu().numpy(), top_index.cpu().numpy()


def choose_backend(index: str, n_docs: int) -> str:
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


def index_search(kind, query_embeddings, docs: DocumentEmbeddings, k, folder: Path, device, show_progress):
    """Top-k through a PyLate index kept beside the embeddings; reused only once its build completed."""
    from pylate import indexes, retrieve  # the index packages (fast-plaid, voyager) are optional


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
