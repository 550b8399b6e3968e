"""Model side of an evaluation: the prompts a model applies, query encoding, and document embeddings cached on disk.

The cache holds one entry per (model hash, dataset, documents, document prompt, document length, PyLate version),
under ``cache_dir`` (default ``$COLBERTZERO_EMBEDDINGS_CACHE`` or ``~/.cache/colbertzero/embeddings``); an entry is
written to a temporary folder and renamed into place, so a killed run never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..files import temp_dir_beside

CACHE_ENV = "COLBERTZERO_EMBEDDINGS_CACHE"
_CACHE_FORMAT = 1
_FILES = {"float32": "embeddings.f32", "float16": "embeddings.f16"}  # meta.json's "dtype" (float32 when absent)
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth"}
_CONFIG_SUFFIXES = {".json", ".txt", ".model"}  # configs, tokenizer vocabularies / sentencepiece models

logger = logging.getLogger(__name__)


def resolve_prompts(model, enabled: bool = True) -> tuple[str | None, str | None]:
    """(query prompt, document prompt) the evaluation applies: the model's own, or (None, None) when disabled."""
    if not enabled:
        return None, None
    prompts = dict(getattr(model, "prompts", None) or {})
    default_name = getattr(model, "default_prompt_name", None)
    default = prompts.get(default_name) if default_name else None
    # PyLate saves empty prompts ("") when none were set: that means no prompt.
    return prompts.get("query", default) or None, prompts.get("document", default) or None


def encode(model, texts: list[str], *, is_query: bool, prompt: str | None, batch_size: int, show_progress=False):
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
    embs = encode(model, list(texts), is_query=True, prompt=query_prompt, batch_size=batch_size,
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


def model_hash_or_none(model_path: str) -> str | None:
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



@dataclass
class DocumentEmbeddings:
    """A corpus's token embeddings, flat: document ``i`` (id ``ids[i]``) is ``embeddings[offsets[i]:offsets[i+1]]``.

    Stored longest text first, so consecutive documents have similar token counts and a chunk of them pads little.
    ``embeddings`` is a read-only memory map when it comes from disk: scoring reads one chunk at a time.
    """

    ids: list[str]
    offsets: np.ndarray  # int64 [n + 1]
    embeddings: np.ndarray  # float32 or float16 [tokens, dim]
    cached: bool = False  # True when read back from an existing cache entry
    folder: Path | None = None  # the entry on disk; an index for this corpus is kept inside it

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def get(self, i: int) -> np.ndarray:
        return np.asarray(self.embeddings[self.offsets[i] : self.offsets[i + 1]])

    def block(self, start: int, end: int) -> np.ndarray:
        """Documents ``start..end`` as one array of their tokens, in the stored dtype (torch widens fp16 far faster
        than numpy). From disk it is a plain read, not a page of the memory map: mapped pages stay resident once
        touched, so a scan through a large corpus would grow."""
        lo, hi = int(self.offsets[start]), int(self.offsets[end])
        if not isinstance(self.embeddings, np.memmap) or self.folder is None:
            return np.asarray(self.embeddings[lo:hi])
        dtype, dim = self.embeddings.dtype, self.dim
        with open(self.embeddings.filename, "rb") as f:
            f.seek(lo * dim * dtype.itemsize)
            flat = np.fromfile(f, dtype=dtype, count=(hi - lo) * dim)
        return flat.reshape(hi - lo, dim)

    @classmethod
    def load(cls, folder: Path) -> "DocumentEmbeddings":
        meta = json.loads((folder / "meta.json").read_text())
        ids = json.loads((folder / "ids.json").read_text())
        offsets = np.load(folder / "offsets.npy")
        if meta.get("format") != _CACHE_FORMAT or len(ids) + 1 != len(offsets) or offsets[-1] != meta["tokens"]:
            raise ValueError(f"{folder}: inconsistent cache entry")
        dtype = np.dtype(meta.get("dtype", "float32"))
        emb = np.memmap(folder / _FILES[dtype.name], dtype=dtype, mode="r", shape=(meta["tokens"], meta["dim"]))
        return cls(ids=ids, offsets=offsets, embeddings=emb, cached=True, folder=folder)


def _documents_digest(corpus: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for doc_id in sorted(corpus):
        h.update(doc_id.encode() + b"\0" + corpus[doc_id].encode() + b"\0")
    return h.hexdigest()


def write_embeddings(folder: Path, model, texts: Mapping[str, str], *, prompt, batch_size, show_progress, desc,
                     is_query: bool = False, dtype=np.float32) -> tuple[int, int]:
    """Encode ``texts`` ({id: text}) into ``folder`` (embeddings, ``offsets.npy``, ``ids.json``), longest text first;
    returns (tokens, dim). The caller writes ``meta.json`` (with ``dtype``) and renames the folder into place."""
    ids = sorted(texts, key=lambda d: (-len(texts[d]), d))  # text length stands in for token count, as in ST
    chunk = max(16 * batch_size, 256)  # a few hundred documents per encode call: steady progress, bounded memory
    offsets = [0]
    dim = 0
    with open(folder / _FILES[np.dtype(dtype).name], "wb") as f, tqdm(
        total=len(ids), desc=desc, unit="query" if is_query else "doc", disable=not show_progress
    ) as bar:
        for start in range(0, len(ids), chunk):
            batch = ids[start : start + chunk]
            for emb in encode(model, [texts[d] for d in batch], is_query=is_query, prompt=prompt,
                              batch_size=batch_size):
                emb = np.ascontiguousarray(emb, dtype=dtype)
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
    tmp = temp_dir_beside(entry)
    try:
        tokens, dim = write_embeddings(
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
    trash = temp_dir_beside(folder)
    try:
        os.replace(folder, trash)  # out of the way first, so no reader ever sees a half-deleted entry
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _pylate_version() -> str:
    try:
        return version("pylate")
    except Exception:
        return "unknown"
