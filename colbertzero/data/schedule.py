"""The order of a phase's global batches, a pure function of the seed (no torch, no communication): which source
each step draws from, how many batches each source gives, and the block-shuffled order of a source's rows.

`plan` and `preflight` count a phase's steps with :func:`batches_per_source`, exactly as the loader will take them.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFFFFFF for k in key])


def name_salt(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


class BlockOrder:
    """Epoch e's order of a source's rows: blocks shuffled, rows shuffled within each block (all from the seed)."""

    def __init__(self, shard_rows: list[int], block_rows: int, seed: int, salt: int):
        starts, sizes = [], []
        base = 0
        for n in shard_rows:  # blocks never straddle shards
            for s in range(0, n, block_rows):
                starts.append(base + s)
                sizes.append(min(block_rows, n - s))
            base += n
        self.starts = np.asarray(starts, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.seed, self.salt = seed, salt
        self._epoch: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._within: dict[tuple[int, int], np.ndarray] = {}

    def _blocks(self, epoch: int):
        if self._epoch is None or self._epoch[0] != epoch:
            perm = seeded_rng(self.seed, self.salt, epoch, 1).permutation(len(self.sizes))
            sizes = self.sizes[perm]
            ends = np.cumsum(sizes)
            self._epoch = (epoch, perm, ends, ends - sizes)
            self._within.clear()
        return self._epoch[1:]

    def _perm(self, epoch: int, b: int) -> np.ndarray:
        p = self._within.get((epoch, b))
        if p is None:
            if len(self._within) > 4096:
                self._within.clear()
            p = self._within[(epoch, b)] = seeded_rng(self.seed, self.salt, epoch, 2, b).permutation(int(self.sizes[b]))
        return p

    def rows(self, epoch: int, pos: np.ndarray) -> np.ndarray:
        perm, ends, firsts = self._blocks(epoch)
        j = np.searchsorted(ends, pos, side="right")
        off = pos - firsts[j]
        out = np.empty(len(pos), dtype=np.int64)
        for u in np.unique(j):
            sel = np.flatnonzero(j == u)
            b = int(perm[u])
            out[sel] = self.starts[b] + self._perm(epoch, b)[off[sel]]
        return out


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    quota = total * weights / weights.sum()
    n = np.floor(quota).astype(np.int64)
    rest = total - int(n.sum())
    if rest > 0:
        n[np.argsort(-(quota - n), kind="stable")[:rest]] += 1
    return n


# ---------------------------------------------------------------- loader
def batches_per_source(data, rows: list[int], global_batch_size: int) -> np.ndarray:
    """Global batches each source contributes to the schedule (see the module docstring); the phase's step count is
    their sum, capped by ``max_steps``. Shared with `plan`, so a projection counts the steps the loader will take."""
    eps = 1e-9
    bpe = np.array([r // global_batch_size for r in rows], dtype=np.int64)
    if data.sampling == "proportional":
        return np.floor(bpe * data.epochs + eps).astype(np.int64)
    w = np.array([s.weight if data.sampling == "weights" else 1.0 for s in data.sources], dtype=np.float64)
    return _largest_remainder(int(math.floor(bpe.sum() * data.epochs + eps)), w)
