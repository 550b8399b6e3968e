"""Data path: raw sources → pre-tokenized Arrow shards (``prepare``) → single-source global batches (``loader``).

- :func:`prepare_recipe` / :func:`index_recipe` (``prepare.py``): tokenize once, PyLate-exact, in parallel,
  restartable, with a verified index per source.
- :class:`GlobalBatchLoader` (``loader.py``): memory-mapped, one source per step on every rank, exact resume;
  yields :class:`Batch` (docs/CONTRACTS.md).
- ``tokenize.py``: the tokenization rules; ``shards.py``: the on-disk format and its checks.

Names are imported lazily so that prepare's worker processes do not import torch (the loader's dependency).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Batch": "colbertzero.data.loader",
    "GlobalBatchLoader": "colbertzero.data.loader",
    "prepare_recipe": "colbertzero.data.prepare",
    "index_recipe": "colbertzero.data.prepare",
    "DataError": "colbertzero.data.shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'colbertzero.data' has no attribute {name!r}")
