"""The models `mine` retrieves with, `score` scores with and the dense baseline is evaluated with, named on the command
line as ``KIND[:PATH]``.

- ``bm25``: lexical, with `bm25s` (k1 0.9, b 0.4, English stop words);
- ``dense:PATH``: a sentence-transformers encoder, cosine similarity (``minilm`` is short for the packaged
  all-MiniLM-L6-v2);
- ``colbert:PATH``: a PyLate ColBERT (an export of a phase), MaxSim with the model's own prompts;
- ``cross-encoder:PATH``: a sentence-transformers ``CrossEncoder``, one forward per (query, document) pair.

A retriever (`retrieve`) ranks a whole corpus for each query; a scorer (`score`) scores each query's own candidates.
Cross-encoders only score (ranking a corpus with one would be a forward per document per query).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import file_replacing

KINDS = ("bm25", "dense", "colbert", "cross-encoder")
BM25_PARAMS = {"k1": 0.9, "b": 0.4}  # the usual setting for short passages
_DENSE_BLOCK = 4096  # corpus rows per matrix product when ranking: bounds memory at queries × block floats
_MEMO_MAX = 1 << 20  # texts whose dense vectors a scorer keeps: candidates recur across query batches


class ModelSpecError(ValueError):
    """A model spec that names no usable model (one line: what was given, what to give)."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    path: str | None = None

    @classmethod
    def parse(cls, text: str, where: str = "--model") -> ModelSpec:
        text = (text or "").strip()
        if text == "minilm":
            from ..models import minilm_path

            return cls("dense", minilm_path())
        kind, _, path = text.partition(":")
        if kind not in KINDS:
            raise ModelSpecError(f"{where} {text!r}: give bm25, minilm, dense:PATH, colbert:PATH or cross-encoder:PATH")
        if kind == "bm25":
            if path:
                raise ModelSpecError(f"{where} {text!r}: bm25 takes no path")
            return cls("bm25")
        if not path:
            raise ModelSpecError(f"{where} {text!r}: {kind} needs a model folder: {kind}:PATH")
        if not Path(path).is_dir():
            raise ModelSpecError(f"{where} {text!r}: {path} is not a model folder (this machine reads no hub)")
        return cls(kind, str(Path(path).resolve()))

    @classmethod
    def parse_list(cls, text: str, where: str = "--teacher") -> list[ModelSpec]:
        """One model, or several separated by commas (a fused teacher)."""
        names = [t.strip() for t in (text or "").split(",")]
        if not all(names):
            raise ModelSpecError(f"{where} {text!r}: one model, or several separated by commas (e.g. minilm,bm25)")
        return [cls.parse(t, where) for t in names]

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def _bm25_terms(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


@contextlib.contextmanager
def _quiet_transformers():
    """Loading a packaged checkpoint makes transformers report stale buffers at length; it says nothing useful."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class Model:
    """One loaded model; ``retrieve`` and ``score`` as the kind allows."""

    def __init__(self, spec: ModelSpec, *, batch_size: int = 64, max_length: int | None = None,
                 device: str | None = None):
        self.spec, self.batch_size, self.device = spec, batch_size, device
        self._model = None
        self.max_length = max_length
        self._memo: dict[str, np.ndarray] = {}

    @property
    def model(self):
        if self._model is None and self.spec.kind != "bm25":
            with _quiet_transformers():
                if self.spec.kind == "dense":
                    from sentence_transformers import SentenceTransformer

                    self._model = SentenceTransformer(self.spec.path, device=self.device or "cpu")
                elif self.spec.kind == "cross-encoder":
                    from sentence_transformers import CrossEncoder

                    self._model = CrossEncoder(self.spec.path, device=self.device or "cpu")
                else:
                    from pylate import models

                    self._model = models.ColBERT(self.spec.path, device=self.device or "cpu")
            if self.max_length and self.spec.kind != "colbert":
                self._model.max_seq_length = self.max_length
        return self._model

    # ------------------------------------------------------------ ranking a corpus
    def retrieve(self, queries: list[str], corpus: list[str], depth: int, cache: Path | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, scores)`` ``[queries, min(depth, corpus)]``, best first, ties by corpus order."""
        depth = min(depth, len(corpus))
        if self.spec.kind == "bm25":
            import bm25s

            index = bm25s.BM25(**BM25_PARAMS)
            index.index(_bm25_terms(corpus), show_progress=False)
            idx, sc = index.retrieve(_bm25_terms(queries), k=depth, show_progress=False, n_threads=0)
            return np.asarray(idx, dtype=np.int64), np.asarray(sc, dtype=np.float32)
        if self.spec.kind == "dense":
            docs = self._corpus_vectors(corpus, cache)
            qv = self._dense(queries)
            return _top_k(qv, docs, depth)
        if self.spec.kind == "colbert":
            return self._colbert_retrieve(queries, corpus, depth, cache)
        raise ModelSpecError(f"{self.spec}: a cross-encoder scores candidates, it cannot rank a corpus; mine with "
                             f"bm25, dense:PATH or colbert:PATH and filter with --teacher cross-encoder:PATH")

    def _dense(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    def _corpus_vectors(self, corpus: list[str], cache: Path | None) -> np.ndarray:
        """The corpus' vectors, kept in ``cache`` so the array's other tasks do not encode it again."""
        if cache is None:
            return self._dense(corpus)
        key = hashlib.sha256("\x00".join([str(self.spec), str(self.max_length), *corpus]).encode()).hexdigest()[:16]
        path = cache / f"dense-{key}.npy"
        if path.is_file():
            return np.load(path)
        vecs = self._dense(corpus)
        with file_replacing(path) as tmp, open(tmp, "wb") as f:
            np.save(f, vecs)
        return vecs

    def _colbert_retrieve(self, queries, corpus, depth, cache):
        # torch and PyLate load here, when a ColBERT is used: `plan` and `validate` read the specs on a login node
        from .embeddings import document_embeddings, encode_queries, model_hash, resolve_prompts
        from .search import exact_search

        _, doc_prompt = resolve_prompts(self.model)
        docs = document_embeddings(
            self.model, {str(i): t for i, t in enumerate(corpus)}, dataset="mine", cache_root=cache,
            model_digest=model_hash(self.spec.path) if cache else None, prompt=doc_prompt,
            batch_size=self.batch_size, show_progress=False, workdir=cache,
        )
        q = encode_queries(self.model, queries, batch_size=self.batch_size)
        scores, index = exact_search(q, docs, depth)
        ids = np.asarray([[int(docs.ids[j]) for j in row] for row in index], dtype=np.int64)
        return ids, scores.astype(np.float32)

    # ------------------------------------------------------------ scoring candidates
    def score(self, queries: list[str], candidates: list[list[str]], idf_corpus: list[str] | None = None,
              ) -> list[list[float]]:
        """The model's score of each query's candidates, in their order. BM25 takes its statistics from
        ``idf_corpus`` (every document of the input, so a shard scores as the whole would)."""
        kind = self.spec.kind
        if kind == "bm25":
            import bm25s

            corpus = idf_corpus or sorted({d for ds in candidates for d in ds})
            where = {t: i for i, t in enumerate(corpus)}
            index = bm25s.BM25(**BM25_PARAMS)
            index.index(_bm25_terms(corpus), show_progress=False)
            terms = _bm25_terms(queries)
            inverse = {v: k for k, v in terms.vocab.items()}
            out = []
            for q_ids, ds in zip(terms.ids, candidates):
                s = index.get_scores([inverse[t] for t in q_ids])
                out.append([float(s[where[d]]) for d in ds])
            return out
        if kind == "cross-encoder":
            pairs = [(q, d) for q, ds in zip(queries, candidates) for d in ds]
            flat = np.asarray(self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False),
                              dtype=np.float64).reshape(-1)
            return _unflatten(flat, candidates)
        texts = sorted(set(queries) | {d for ds in candidates for d in ds})
        if kind == "dense":
            # queries and documents are encoded alike (no prompts): each distinct text once, remembered
            new = [t for t in texts if t not in self._memo]
            if len(self._memo) + len(new) > _MEMO_MAX:
                self._memo.clear()
                new = texts
            self._memo.update(zip(new, self._dense(new)) if new else [])
            emb = self._memo
            return [[float(emb[q] @ emb[d]) for d in ds] for q, ds in zip(queries, candidates)]
        return self._colbert_score(queries, candidates)

    def _colbert_score(self, queries, candidates):
        import torch

        from ..scoring import TORCH
        from .embeddings import encode, resolve_prompts

        q_prompt, d_prompt = resolve_prompts(self.model)
        docs = sorted({d for ds in candidates for d in ds})
        where = {t: i for i, t in enumerate(docs)}
        d_emb = encode(self.model, docs, is_query=False, prompt=d_prompt, batch_size=self.batch_size)
        q_emb = encode(self.model, queries, is_query=True, prompt=q_prompt, batch_size=self.batch_size)
        out = []
        with torch.inference_mode():
            for q, ds in zip(q_emb, candidates):
                rows = [torch.as_tensor(np.asarray(d_emb[where[d]])) for d in ds]
                padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # zeros: PyLate's masked tokens
                s = TORCH.scores(torch.as_tensor(np.asarray(q))[None], padded)
                out.append([float(x) for x in s[0]])
        return out


def _unflatten(flat: np.ndarray, shape_like: list[list[str]]) -> list[list[float]]:
    out, i = [], 0
    for ds in shape_like:
        out.append([float(x) for x in flat[i : i + len(ds)]])
        i += len(ds)
    return out


def _top_k(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k, the corpus in blocks; a stable order (score, then corpus index)."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(docs), _DENSE_BLOCK):
        s = queries @ docs[start : start + _DENSE_BLOCK].T
        i = np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)
        cat_s, cat_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
        order = np.lexsort((cat_i, -cat_s), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
    return best_i, best_s
