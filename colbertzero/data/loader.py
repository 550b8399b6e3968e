"""Global batches from prepared shards: one source per step, the same on every rank, exactly resumable.

Public API::

    loader = GlobalBatchLoader(recipe, phase_name, rank, world_size, seed=None, verify_hashes=False, tokenizer=None)
    loader.total_steps            # optimizer steps of the phase: Σ per-source batches (× epochs), capped by max_steps
    for batch in loader: ...      # Batch per docs/CONTRACTS.md, from loader.step to total_steps
    loader.batch(step)            # any step, a pure function of (recipe, shards, seed, rank, world_size, step)
    loader.state_dict() / loader.load_state_dict(state)
    loader.consumed()             # {source: rows consumed globally so far}

How a step is made, with no communication between ranks:

- Source schedule: each source contributes ``floor(floor(rows / G) × epochs)`` global batches (``proportional``;
  ``weights``/``uniform`` share ``floor(Σ floor(rows / G) × epochs)`` batches by weight), in an order drawn from the
  seed. Step ``t`` belongs to ``schedule[t]``; it is that source's ``j``-th batch, ``j`` counted in the schedule.
- Within a source: epoch ``e`` orders the rows by blocks — the source's blocks of ``block_rows`` contiguous rows in a
  seeded order, the rows of each block in a seeded order — so reads stay within a few contiguous regions (random
  single-row reads are ~16× slower). Each epoch drops its last partial batch so no row repeats within a batch.
  ``data.length_bucketing`` sorts windows of ``BUCKET_BATCHES`` global batches by their rows' longest document and
  shuffles the resulting batches within the window.
- Rank ``r`` takes rows ``[r·G/W, (r+1)·G/W)`` of the global batch. Queries and documents are padded to the longest
  sequence of the *global* batch (so every rank has the same shapes for all_gather); queries to the full query length
  when the model expands them. Pad id and masks are PyLate's (see ``tokenize.py``).

Because a batch depends only on the step, ``state_dict`` is the next step plus a fingerprint of everything that
decides the order; a restart at step k yields exactly what an uninterrupted run yields from k on, whichever
processes run it (even with another world size, as long as it divides the global batch).

On open every source's index is checked against the phase: kind, token settings, shapes and the tokenizer's hash
(a difference is a DataError naming the setting), and every shard against the index (size always; sha256 when the
mtime moved, e.g. after a copy, or with ``verify_hashes``). Shards are memory-mapped: memory does not grow with data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from colbertzero.data import shards
from colbertzero.data.schedule import BlockOrder, batches_per_source, name_salt, seeded_rng
from colbertzero.data.shards import DataError
from colbertzero.data.tokenize import (
    PhaseTokenizer,
    load_phase_tokenizer,
    pad_ragged,
    ragged_positions,
    settings_for_phase,
)

log = logging.getLogger(__name__)

BLOCK_ROWS = 256  # rows read contiguously; a global batch mixes G / BLOCK_ROWS random blocks
BUCKET_BATCHES = 16  # length bucketing sorts this many global batches at a time


@dataclass
class Batch:
    """One optimizer step's data for one rank (docs/CONTRACTS.md)."""

    step: int
    source: str
    queries: dict[str, torch.Tensor]  # input_ids, attention_mask: [B_local, Lq]
    documents: dict[str, torch.Tensor]  # [B_local * n_docs, Ld], query i owns rows i*n_docs … i*n_docs+n_docs-1
    n_docs: int
    scores: torch.Tensor | None  # [B_local, n_docs] teacher scores (distillation)
    n_tokens: int  # real tokens in this rank's batch (queries + documents, unpadded)
    global_batch_size: int
    row_ids: torch.Tensor | None = None  # the source rows of this rank's queries (for logs and tests)


# ---------------------------------------------------------------- memory-mapped stores
def _np(arr) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=True)


class _Ragged:
    """Token lists spread over shards, addressed by one global index; views into memory-mapped files."""

    def __init__(self, chunks: list[tuple[np.ndarray, np.ndarray]]):
        self.offsets = [c[0] for c in chunks]
        self.values = [c[1] for c in chunks]
        self.starts = np.concatenate([[0], np.cumsum([len(o) - 1 for o in self.offsets])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _parts(self, idx: np.ndarray):
        if len(self.offsets) == 1:
            yield 0, slice(None), idx
            return
        k = np.searchsorted(self.starts, idx, side="right") - 1
        for c in np.unique(k):
            sel = np.flatnonzero(k == c)
            yield int(c), sel, idx[sel] - self.starts[c]

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty(len(idx), dtype=np.int64)
        for c, sel, local in self._parts(idx):
            off = self.offsets[c]
            out[sel] = off[local + 1] - off[local]
        return out

    def gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lengths, concatenated tokens) of the token lists ``idx``, in that order."""
        if len(self.offsets) == 1:
            off = self.offsets[0]
            starts = off[idx]
            lens = off[idx + 1] - starts
            return lens, self.values[0][ragged_positions(starts, lens)]
        lens = self.lengths(idx)
        out_first = np.cumsum(lens) - lens
        flat = np.empty(int(lens.sum()), dtype=self.values[0].dtype)
        for c, sel, local in self._parts(idx):
            starts = self.offsets[c][local]
            part = lens[sel]
            flat[ragged_positions(out_first[sel], part)] = self.values[c][ragged_positions(starts, part)]
        return lens, flat


class _Rows:
    """Per-row numpy columns over the row shards, addressed by global row."""

    def __init__(self, columns: list[dict[str, np.ndarray]]):
        self.cols = columns
        self.starts = np.concatenate([[0], np.cumsum([self._rows(c) for c in columns])]).astype(np.int64)

    @staticmethod
    def _rows(cols: dict[str, np.ndarray]) -> int:
        if "doc_offsets" in cols:
            return len(cols["doc_offsets"]) - 1
        return len(next(iter(cols.values())))

    def parts(self, rows: np.ndarray):
        k = np.searchsorted(self.starts, rows, side="right") - 1
        for c in np.unique(k):
            sel = np.flatnonzero(k == c)
            yield int(c), sel, rows[sel] - self.starts[c]

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        first = self.cols[0][name]
        out = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
        for c, sel, local in self.parts(rows):
            out[sel] = self.cols[c][name][local]
        return out


def _one_chunk(table, name: str, path: Path):
    if name not in table.schema.names:
        raise DataError(f"{path}: no column {name!r}; the shard was written by another version: re-run prepare")
    col = table.column(name)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


class _Source:
    """One prepared source: row → query index, document indices, scores; plus the stores they index."""

    def __init__(self, name: str, folder: Path, index: dict):
        self.name = name
        self.folder = folder
        self.kind = index["kind"]
        self.n_docs = int(index["n_docs"])
        self.tables = []  # keep the memory maps alive
        cols = []
        q_chunks, d_chunks = [], []
        doc_base = 0
        self.doc_base: list[int] = []  # global index of each shard's first document
        for e in index["shards"]:
            path = folder / e["file"]
            t = shards.open_table(path)
            if t.num_rows != e["rows"]:
                raise DataError(f"{path}: {t.num_rows} rows, the index says {e['rows']}; re-run prepare")
            self.tables.append(t)
            if self.kind == "distillation":
                dpq = self.n_docs
                cols.append({
                    "query_idx": _np(_one_chunk(t, "query_idx", path)),
                    "doc_idx": _np(_one_chunk(t, "doc_idx", path).values).reshape(-1, dpq),
                    "scores": _np(_one_chunk(t, "scores", path).values).reshape(-1, dpq),
                })
            else:
                q = _one_chunk(t, "query", path)
                docs = _one_chunk(t, "documents", path)
                inner = docs.values
                q_chunks.append((_np(q.offsets), _np(q.values)))
                d_chunks.append((_np(inner.offsets), _np(inner.values)))
                # views only: per-row arrays built here would grow memory with the dataset
                cols.append({"doc_offsets": _np(docs.offsets), "max_doc_len": _np(_one_chunk(t, "max_doc_len", path))})
                self.doc_base.append(doc_base)
                doc_base += len(inner)
        if self.kind == "distillation":
            for tname, chunks in (("queries", q_chunks), ("documents", d_chunks)):
                for e in index["tables"][tname]["shards"]:
                    t = shards.open_table(folder / tname / e["file"])
                    self.tables.append(t)
                    ids = _one_chunk(t, "input_ids", folder / tname / e["file"])
                    chunks.append((_np(ids.offsets), _np(ids.values)))
        self.rows_store = _Rows(cols)
        self.rows = int(self.rows_store.starts[-1])
        if self.rows != index["rows"]:
            raise DataError(f"{folder}: shards hold {self.rows} rows, the index says {index['rows']}; re-run prepare")
        self.q_store = _Ragged(q_chunks)
        self.d_store = _Ragged(d_chunks)

    def query_idx(self, rows: np.ndarray) -> np.ndarray:
        return self.rows_store.take("query_idx", rows).astype(np.int64) if self.kind == "distillation" else rows

    def doc_idx(self, rows: np.ndarray) -> np.ndarray:
        """[n, n_docs] document indices: positive first; missing negatives repeat the row's own, cyclically."""
        if self.kind == "distillation":
            return self.rows_store.take("doc_idx", rows).astype(np.int64)
        start = np.empty((len(rows), 1), dtype=np.int64)
        count = np.empty((len(rows), 1), dtype=np.int64)
        for c, sel, local in self.rows_store.parts(rows):
            off = self.rows_store.cols[c]["doc_offsets"]
            start[sel, 0] = off[local] + self.doc_base[c]
            count[sel, 0] = off[local + 1] - off[local]
        j = np.arange(self.n_docs)[None, :]
        neg = 1 + (j - 1) % np.maximum(count - 1, 1)
        return start + np.where(j == 0, 0, neg)

    def scores(self, rows: np.ndarray) -> np.ndarray | None:
        return self.rows_store.take("scores", rows) if self.kind == "distillation" else None

    def max_doc_len(self, rows: np.ndarray) -> np.ndarray:
        if self.kind == "distillation":
            d = self.doc_idx(rows)
            return self.d_store.lengths(d.ravel()).reshape(d.shape).max(axis=1)
        return self.rows_store.take("max_doc_len", rows).astype(np.int64)


class GlobalBatchLoader:
    """Single-source global batches for one rank; see the module docstring."""

    def __init__(self, recipe, phase_name: str, rank: int = 0, world_size: int = 1, seed: int | None = None,
                 verify_hashes: bool = False, tokenizer: PhaseTokenizer | Any | None = None,
                 block_rows: int = BLOCK_ROWS):
        phase = recipe.phase(phase_name)
        data = phase.data
        self.phase_name = phase_name
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch_size = batch = phase.global_batch_size
        if not (0 <= self.rank < self.world_size):
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if batch % self.world_size:
            raise DataError(f"phases.{phase_name}.global_batch_size {batch} is not divisible by the world size "
                            f"{world_size}")
        self.local_batch_size = batch // self.world_size
        self.seed = phase.seed if seed is None else int(seed)
        self.block_rows = int(block_rows)
        self.bucketing = data.length_bucketing
        settings = settings_for_phase(recipe, phase_name)
        self.settings = settings
        tok = self._tokenizer(recipe, phase_name, tokenizer, settings)
        self.pad_id = tok.pad_id
        expected_tok = tok.identity()

        self.sources: list[_Source] = []
        self._indexes: list[dict] = []
        for i, src in enumerate(data.sources):
            folder = shards.source_dir(data, src.name)
            what = f"phase {phase_name}, source {src.name}"
            index = shards.read_index(folder, what)
            self._check(index, phase, i, settings.as_dict(), expected_tok, folder, what)
            shards.verify_shards(folder, index, full=verify_hashes)
            self._indexes.append(index)
            self.sources.append(_Source(src.name, folder, index))
        for s in self.sources:
            if s.rows < batch:
                raise DataError(
                    f"phase {phase_name}, source {s.name}: {s.rows} rows, fewer than one global batch ({batch}); "
                    "drop the source or lower global_batch_size"
                )
        self._orders = [
            BlockOrder([e["rows"] for e in ix["shards"]], self.block_rows, self.seed, name_salt(s.name))
            for s, ix in zip(self.sources, self._indexes)
        ]
        self._bpe = np.array([s.rows // batch for s in self.sources], dtype=np.int64)
        self._make_schedule(data, phase)
        self._window: tuple[tuple[int, int, int], np.ndarray, np.ndarray] | None = None
        self.step = 0

    def verify_share(self, share: int, shares: int) -> list[str]:
        """Hash this share of every source's shards (see shards.hash_share); the problems found."""
        return [p for s, ix in zip(self.sources, self._indexes) for p in shards.hash_share(s.folder, ix, share, shares)]

    # ---------------------------------------------------------------- checks
    @staticmethod
    def _tokenizer(recipe, phase_name, tokenizer, settings) -> PhaseTokenizer:
        if tokenizer is None:
            return load_phase_tokenizer(recipe, phase_name)
        if isinstance(tokenizer, PhaseTokenizer):
            return tokenizer
        return PhaseTokenizer.from_model(tokenizer, settings)  # a pylate ColBERT

    def _check(self, index: dict, phase, i: int, settings: dict, tok: dict, folder: Path, what: str) -> None:
        data, src = phase.data, phase.data.sources[i]
        fix = f"re-run `colbertzero prepare RECIPE --phase {self.phase_name}`"
        if index.get("kind") != phase.kind:
            raise DataError(f"{what}: {folder} holds {index.get('kind')} data, the phase is {phase.kind}; {fix}")
        diffs = [f"{k}: shards {index['settings'].get(k)!r}, recipe {v!r}" for k, v in settings.items()
                 if index["settings"].get(k) != v]
        if phase.kind == "supervised":
            for k in ("max_negatives", "negatives"):
                if index.get(k) != getattr(data, k):
                    diffs.append(f"data.{k}: shards {index.get(k)!r}, recipe {getattr(data, k)!r}")
        if phase.kind == "distillation" and index.get("docs_per_query") != data.docs_per_query:
            diffs.append(f"data.docs_per_query: shards {index.get('docs_per_query')!r}, recipe {data.docs_per_query!r}")
        if diffs:
            raise DataError(f"{what}: {folder} was prepared with other settings — " + "; ".join(diffs) + f"; {fix}")
        have = index.get("tokenizer", {})
        if have.get("sha256") != tok["sha256"]:
            detail = [f"{k}: {have.get(k)!r} vs {tok[k]!r}" for k in tok
                      if k not in ("sha256", "source") and have.get(k) != tok[k]]
            raise DataError(
                f"{what}: {folder} was tokenized with another tokenizer ({have.get('source')!r}, sha256 "
                f"{str(have.get('sha256'))[:12]}…) than the phase's ({tok['source']!r}, {tok['sha256'][:12]}…)"
                + (f": {'; '.join(detail)}" if detail else "") + f"; {fix}"
            )
        fp = index.get("input", {}).get("fingerprint", {})
        p = Path(src.path)
        if fp.get("path") == str(p) and p.is_file():
            st = p.stat()
            if (st.st_size, st.st_mtime_ns) != (fp.get("size"), fp.get("mtime_ns")):
                log.warning("%s: %s changed since it was prepared; the shards hold the old rows (%s)", what, p, fix)

    # ---------------------------------------------------------------- schedule
    def _make_schedule(self, data, phase) -> None:
        n = batches_per_source(data, [s.rows for s in self.sources], self.global_batch_size)
        sched = seeded_rng(self.seed, 0x5C4E).permutation(np.repeat(np.arange(len(self.sources), dtype=np.int32), n))
        if phase.max_steps is not None:
            sched = sched[: phase.max_steps]
        if len(sched) == 0:
            raise DataError(f"phase {self.phase_name}: no full global batch to train on (rows × epochs < global batch)")
        self.schedule = sched
        self.ordinal = np.empty(len(sched), dtype=np.int64)
        for s in range(len(self.sources)):
            at = np.flatnonzero(sched == s)
            self.ordinal[at] = np.arange(len(at))
        self.plan = {
            "seed": self.seed, "global_batch_size": self.global_batch_size, "sampling": data.sampling,
            "epochs": data.epochs, "max_steps": phase.max_steps, "block_rows": self.block_rows,
            "length_bucketing": self.bucketing, "bucket_batches": BUCKET_BATCHES,
            "weights": [s.weight for s in data.sources],
            "sources": [[s.name, s.rows, ix["key"]] for s, ix in zip(self.sources, self._indexes)],
            "schedule_sha256": hashlib.sha256(sched.tobytes()).hexdigest(),
        }

    @property
    def total_steps(self) -> int:
        return len(self.schedule)

    def source_at(self, step: int) -> str:
        return self.sources[int(self.schedule[step])].name

    def consumed(self, step: int | None = None) -> dict[str, int]:
        """Rows taken from each source, over all ranks, by the steps before ``step`` (default: the next step)."""
        step = self.step if step is None else step
        counts = np.bincount(self.schedule[:step], minlength=len(self.sources))
        return {s.name: int(c) * self.global_batch_size for s, c in zip(self.sources, counts)}

    # ---------------------------------------------------------------- rows of a step
    def global_rows(self, step: int) -> tuple[int, np.ndarray]:
        """(source index, the global batch's rows in that source) for a step."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside 0..{self.total_steps - 1}")
        s = int(self.schedule[step])
        j = int(self.ordinal[step])
        batch, per_epoch = self.global_batch_size, int(self._bpe[s])
        epoch, in_epoch = divmod(j, per_epoch)
        if in_epoch == 0 and epoch > 0:
            log.info("phase %s: source %s starts epoch %d at step %d; consumed %s",
                     self.phase_name, self.sources[s].name, epoch, step, self.consumed(step))
        order = self._orders[s]
        if not self.bucketing:
            return s, order.rows(epoch, in_epoch * batch + np.arange(batch))
        w, slot = divmod(in_epoch, BUCKET_BATCHES)
        key = (s, epoch, w)
        if self._window is None or self._window[0] != key:
            first = w * BUCKET_BATCHES
            nb = min(BUCKET_BATCHES, per_epoch - first)
            rows = order.rows(epoch, first * batch + np.arange(nb * batch))
            rows = rows[np.argsort(self.sources[s].max_doc_len(rows), kind="stable")].reshape(nb, batch)
            self._window = (key, rows, seeded_rng(self.seed, self._orders[s].salt, epoch, 3, w).permutation(nb))
        _, rows, perm = self._window
        return s, rows[perm[slot]]

    # ---------------------------------------------------------------- batches
    def batch(self, step: int) -> Batch:
        s, rows = self.global_rows(step)
        src = self.sources[s]
        st = self.settings
        lo = self.rank * self.local_batch_size
        mine = rows[lo: lo + self.local_batch_size]

        q_idx = src.query_idx(rows)
        if st.do_query_expansion:
            lq = st.query_length
        else:
            lq = int(src.q_store.lengths(q_idx).max())
        ld = int(src.max_doc_len(rows).max())

        q_lens, q_flat = src.q_store.gather(q_idx[lo: lo + self.local_batch_size])
        q_ids, q_mask = pad_ragged(q_lens, q_flat, lq, self.pad_id)
        if st.attend_to_expansion_tokens:
            q_mask[:] = 1
        d_lens, d_flat = src.d_store.gather(src.doc_idx(mine).ravel())
        d_ids, d_mask = pad_ragged(d_lens, d_flat, ld, self.pad_id)
        n_tokens = int(q_lens.sum() + d_lens.sum())
        scores = src.scores(mine)
        return Batch(
            step=step,
            source=src.name,
            queries={"input_ids": torch.from_numpy(q_ids), "attention_mask": torch.from_numpy(q_mask)},
            documents={"input_ids": torch.from_numpy(d_ids), "attention_mask": torch.from_numpy(d_mask)},
            n_docs=src.n_docs,
            scores=None if scores is None else torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)),
            n_tokens=n_tokens,
            global_batch_size=self.global_batch_size,
            row_ids=torch.from_numpy(mine.copy()),
        )

    def __iter__(self) -> Iterator[Batch]:
        """Batches from ``self.step`` on; the step advances *before* a batch is handed out, so a checkpoint taken
        after training on it resumes with the next one."""
        while self.step < self.total_steps:
            k = self.step
            self.step += 1
            yield self.batch(k)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"version": 1, "step": self.step, "plan": self.plan, "world_size": self.world_size,
                "consumed": self.consumed()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise DataError(f"loader state version {state.get('version')!r}; this colbertzero writes version 1")
        saved = state["plan"]
        diffs = [f"{k}: saved {json.dumps(saved.get(k))}, now {json.dumps(v)}" for k, v in self.plan.items()
                 if k != "schedule_sha256" and saved.get(k) != v]
        if not diffs and saved.get("schedule_sha256") != self.plan["schedule_sha256"]:
            diffs.append("the source schedule")
        if diffs:
            raise DataError(
                f"phase {self.phase_name}: cannot resume the data order exactly, it was made with other settings — "
                + "; ".join(diffs)
            )
        step = int(state["step"])
        if not 0 <= step <= self.total_steps:
            raise DataError(f"loader state step {step} is outside 0..{self.total_steps}")
        self.step = step
