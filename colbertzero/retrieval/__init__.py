"""Turning text into vectors and ranking with them, below both `evaluate/` and `mining/`: `embeddings` (encoding with
a model's prompts, the on-disk document cache), `search` (exact MaxSim, indexes for very large corpora), `models`
(the models named ``bm25``, ``dense:PATH``, ``colbert:PATH``, ``cross-encoder:PATH``: ranking a corpus, scoring
candidates), used by mining, scoring, the dense baseline and evaluation alike."""

from .models import Model, ModelSpec, ModelSpecError

__all__ = ["Model", "ModelSpec", "ModelSpecError"]
