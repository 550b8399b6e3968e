"""PyLate-exact tokenization, done once at prepare time, padded per batch at load time.

PyLate 1.6.0 turns a text into model inputs in three places; this module reproduces the chain exactly:

1. ``ColBERTCollator``: ``prompt + text`` when a prompt is set for the column (queries: the query prompt; positives,
   negatives and distillation documents: the document prompt).
2. sentence-transformers' ``Transformer.tokenize``: ``str(text).strip()``, lower-case when the module says so, then
   the tokenizer with ``truncation="longest_first"`` and ``max_length = length - 1`` (``length`` when the prefix is
   empty) — PyLate sets ``max_seq_length`` that way to leave room for the prefix token.
3. ``ColBERT.tokenize``: the [Q]/[D] prefix token inserted after the first token (CLS), attention 1 for it; queries
   padded to the full query length with the pad id (PyLate sets it to [MASK]) when the model expands queries, and
   the whole query mask set to 1 when it attends to expansion tokens.

Steps 1-3 up to the prefix are done by :meth:`PhaseTokenizer.encode` (unpadded token lists, stored in shards);
the padding of step 3 per batch by the loader (:func:`pad_ragged`, pad id and query width as PyLate's).

The tokenizer itself comes from ``pylate.models.ColBERT`` loaded once from the phase's model source, so the [Q]/[D]
tokens are added exactly as PyLate adds them. A phase whose ``init`` is ``{from: <earlier phase>}`` is not exported
yet at prepare time; its tokenizer is that of the first phase in the chain whose init is a path (an export keeps the
tokenizer of the model it started from): :func:`tokenizer_source`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from colbertzero.data.shards import DataError
from colbertzero.models import ModelSettings, TokenSettings, build_colbert, resolve_model_ref, settings_for

if TYPE_CHECKING:  # pragma: no cover
    from colbertzero.recipe import Recipe


def settings_for_phase(recipe: "Recipe", phase_name: str) -> ModelSettings:
    """The phase's model settings (``models.settings_for``); their ``tokens()`` part decides the ids."""
    return settings_for(recipe, phase_name)


def tokenizer_source(recipe: "Recipe", phase_name: str) -> str:
    """The model path whose tokenizer the phase uses: its init, or, for ``init: {from: P}``, P's, recursively."""
    seen = [phase_name]
    phase = recipe.phase(phase_name)
    while phase.init_from is not None:
        seen.append(phase.init_from)
        phase = recipe.phase(phase.init_from)
    assert isinstance(phase.init, str)
    return resolve_model_ref(phase.init)  # builtin:* names (tests, demo) → their local folders


class PhaseTokenizer:
    """A Hugging Face tokenizer as PyLate configures it, plus the settings; picklable (sent to prepare workers)."""

    def __init__(self, hf_tokenizer, settings: TokenSettings, *, do_lower_case: bool, source: str,
                 query_prefix_id: int | None, document_prefix_id: int | None):
        self.hf = hf_tokenizer
        self.settings = settings
        self.do_lower_case = bool(do_lower_case)
        self.source = source
        self.query_prefix_id = query_prefix_id
        self.document_prefix_id = document_prefix_id
        if hf_tokenizer.padding_side != "right":
            raise DataError(
                f"tokenizer of {source}: padding side {hf_tokenizer.padding_side!r}; colbertzero pads on the right "
                "as PyLate's encoder models do"
            )
        # PyLate pads with [MASK] (or EOS for decoder models); it set pad_token_id accordingly on load.
        self.pad_id = int(hf_tokenizer.pad_token_id)
        self.vocab_size = len(hf_tokenizer)
        self.dtype = np.uint16 if self.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model, settings: TokenSettings, source: str | None = None) -> "PhaseTokenizer":
        """From a loaded ``pylate.models.ColBERT`` (the trainer has one; prepare loads one)."""
        have = {k: getattr(model, k) for k in ("query_length", "document_length", "query_prefix", "document_prefix",
                                                "do_query_expansion", "attend_to_expansion_tokens")}
        diffs = [f"{k}: model {v!r}, phase {getattr(settings, k)!r}" for k, v in have.items()
                 if v != getattr(settings, k)]
        if diffs:
            raise DataError("the model tokenizes differently from the phase's settings: " + "; ".join(diffs))
        return cls(
            model.tokenizer,
            settings,
            do_lower_case=getattr(model[0], "do_lower_case", False),
            source=source or "",
            query_prefix_id=model.query_prefix_id,
            document_prefix_id=model.document_prefix_id,
        )

    # ---------------------------------------------------------------- encoding
    def _encode(self, texts: Sequence[str], prompt: str, length: int, prefix_id: int | None) -> list[list[int]]:
        if not texts:
            return []
        if prompt:
            texts = [prompt + t for t in texts]
        texts = [str(t).strip() for t in texts]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        ids = self.hf(
            texts,
            padding=False,
            truncation="longest_first",
            max_length=length - 1 if prefix_id is not None else length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        if prefix_id is not None:
            ids = [[s[0], prefix_id, *s[1:]] for s in ids]
        return ids

    def encode_queries(self, texts: Sequence[str]) -> list[list[int]]:
        s = self.settings
        return self._encode(texts, s.query_prompt, s.query_length, self.query_prefix_id)

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        s = self.settings
        return self._encode(texts, s.document_prompt, s.document_length, self.document_prefix_id)

    def pad(self, lens: np.ndarray, flat: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Padded ids and mask of token lists (see :func:`pad_ragged`) with PyLate's pad id."""
        return pad_ragged(lens, flat, width, self.pad_id)

    # ---------------------------------------------------------------- identity
    def identity(self) -> dict[str, Any]:
        """What the shard index records and the loader compares: a hash over everything that decides the ids."""
        if getattr(self, "_identity", None) is None:
            self._identity = self._make_identity()
        return dict(self._identity)

    def _make_identity(self) -> dict[str, Any]:
        hf = self.hf
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is not None:
            spec = json.loads(backend.to_str())
            # truncation/padding hold the state of the last call, not the tokenizer's identity
            spec.pop("truncation", None)
            spec.pop("padding", None)
        else:  # pragma: no cover - slow tokenizers are gone from transformers 5, kept for completeness
            spec = {"vocab": sorted(hf.get_vocab().items())}
        ident = {
            "class": type(hf).__name__,
            "vocab_size": self.vocab_size,
            "do_lower_case": self.do_lower_case,
            "truncation_side": hf.truncation_side,
            "query_prefix_id": self.query_prefix_id,
            "document_prefix_id": self.document_prefix_id,
            "pad_id": self.pad_id,
            "cls_id": hf.cls_token_id,
            "sep_id": hf.sep_token_id,
        }
        digest = hashlib.sha256(json.dumps([spec, ident], sort_keys=True).encode()).hexdigest()
        return {"source": self.source, **ident, "sha256": digest}


def ragged_positions(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Indices of the concatenation of the ranges ``[starts[k], starts[k] + lens[k])``, vectorised."""
    first = np.cumsum(lens) - lens
    return np.repeat(starts - first, lens) + np.arange(int(lens.sum()), dtype=np.int64)


def pad_ragged(lens: np.ndarray, flat: np.ndarray, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists (``lens`` and their concatenation ``flat``) → right-padded ``[n, width]`` ids and 0/1 mask.

    One boolean-mask write for the whole batch: row-major order of the mask is the order of ``flat``.
    """
    if len(lens) and int(lens.max()) > width:
        raise ValueError(f"a token list of {int(lens.max())} does not fit the padded width {width}")
    mask = np.arange(width)[None, :] < np.asarray(lens)[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = flat
    return ids, mask.astype(np.int64)


@functools.lru_cache(maxsize=8)
def _load(source: str, settings: ModelSettings) -> PhaseTokenizer:
    # PyLate/transformers report resized embeddings and unused weights while loading; none of it matters here.
    quiet = [logging.getLogger(n) for n in ("pylate", "sentence_transformers", "transformers")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        model = build_colbert(source, settings, "cpu")
    except OSError as e:
        raise DataError(f"cannot load the tokenizer of {source}: {e}") from None
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)
    return PhaseTokenizer.from_model(model, settings.tokens(), source=source)


def load_phase_tokenizer(recipe: "Recipe", phase_name: str) -> PhaseTokenizer:
    """The phase's tokenizer exactly as PyLate builds it (cached per model source and settings in this process)."""
    return _load(tokenizer_source(recipe, phase_name), settings_for_phase(recipe, phase_name))
