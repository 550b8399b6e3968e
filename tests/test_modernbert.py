"""The real architecture on CPU: ModernBERT-base (random weights) with a byte-level BPE tokenizer of ModernBERT's kind
through one step of every phase, its FLOP count by hand, and the attention implementations agreeing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pylate.models import ColBERT

from colbertzero.models import colbert_for
from colbertzero.recipe import RecipeError, load_recipe
from colbertzero.train.metering import FlopCounter

ROOT = Path(__file__).resolve().parents[1]


def test_one_step_of_each_phase(modernbert_base, flag_examples, tmp_path):
    """Shards tokenized with the BPE tokenizer, the loader, the DeepSpeed engine, one step per phase kind."""
    flag = flag_examples
    rows = {
        "cached_contrastive": [{"query": r["query"], "document": r["pos"][0]} for r in flag],
        "contrastive": [{"query": r["query"], "positive": r["pos"][0], "negatives": [r["neg"][0]]} for r in flag],
        "distillation": [{"query": r["query"], "documents": (r["pos"] + r["neg"])[:4],
                          "scores": (r["pos_scores"] + r["neg_scores"])[:4]} for r in flag],
    }
    for name, rs in rows.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fidelity_worker.py"), "ours", modernbert_base,
                           str(tmp_path), "1"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for name in rows:
        out = torch.load(tmp_path / name / "ours.pt", weights_only=True)
        assert len(out["losses"]) == 1 and all(torch.isfinite(torch.tensor(out["losses"]))), (name, out["losses"])
        assert out["grad_norms"][0] > 0 and torch.isfinite(torch.tensor(out["grad_norms"][0])), name
        index = json.loads((tmp_path / name / "shards" / "rows" / "index.json").read_text())
        assert index["tokenizer"]["vocab_size"] == 8192 + 2  # the BPE vocabulary and PyLate's [Q] / [D]
    assert out["state"]["0.auto_model.layers.21.mlp.Wo.weight"].shape == (768, 1152)  # all 22 layers trained


def test_flop_count_of_modernbert_base_by_hand(modernbert_base):
    colbert = ColBERT(modernbert_base, device="cpu", query_length=39, document_length=300)
    cfg = colbert[0].auto_model.config
    h, i, layers = 768, 1152, 22  # ModernBERT-base
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (h, i, layers)
    # Per layer: Wqkv, attention out, MLP in (gated: 2 x intermediate), MLP out; LayerNorms without bias: the
    # attention norm (none in layer 0), the MLP norm; then the embeddings' and the final norm; the 768 -> 128 head.
    n = layers * (h * 3 * h + h * h + h * 2 * i + i * h) + (2 * layers - 1) * h + 2 * h + h * 128
    counter = FlopCounter(colbert, SimpleNamespace(kind="unsupervised", gradcache_mini_batch=8,
                                                   gather_across_ranks=False, gradient_accumulation=1), world_size=1)
    assert counter.n_params == n

    def pairs(outputs: int, keys: int, window: int | None) -> int:  # position by position
        return sum(1 for a in range(outputs) for b in range(keys) if window is None or abs(a - b) <= window)

    # global attention every third layer (0, 3, ..., 21), a 128-token window (64 each side) on the others
    windows = [None if k % 3 == 0 else 64 for k in range(layers)]
    q_real, d_real = (12, 20), (300, 90)  # a document longer than the window, one shorter
    q_mask = torch.tensor([[1] * q + [0] * (39 - q) for q in q_real])
    d_mask = torch.tensor([[1] * d + [0] * (300 - d) for d in d_real])
    batch = SimpleNamespace(queries={"attention_mask": q_mask}, documents={"attention_mask": d_mask})
    forward = 0.0
    for q in q_real:  # expanded queries: 39 outputs each, attending to their real tokens
        forward += 2 * n * 39 + 4 * h * sum(pairs(39, q, w) for w in windows)
    for d in d_real:
        forward += 2 * n * d + 4 * h * sum(pairs(d, d, w) for w in windows)
    maxsim = 2 * 128 * (2 * 39) * sum(d_real)  # every query against both documents
    assert counter.total(counter.local(batch)) == pytest.approx(4 * forward + 3 * maxsim, rel=1e-12)


def test_attention_implementations_agree(tiny_modernbert):
    """eager and sdpa give the same query embeddings, the [MASK] expansion positions included."""
    texts = ["what is late interaction?", "maxsim"]
    out = {}
    for impl in ("eager", "sdpa"):
        recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [f"model.attn_implementation={impl}"])
        torch.manual_seed(0)
        model = colbert_for(recipe, "unsupervised", tiny_modernbert, "cpu")
        assert model[0].auto_model.config._attn_implementation == impl
        out[impl] = model.encode(texts, is_query=True, convert_to_tensor=True)
    for a, b in zip(out["eager"], out["sdpa"]):
        assert a.shape[0] == 31  # 24 + 7 prompt tokens: every expansion position is there
        assert torch.allclose(a, b, atol=1e-5)


def test_flash_attention_with_unpadded_expansion_tokens_is_refused():
    with pytest.raises(RecipeError, match="come out as zeros"):
        load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["model.attn_implementation=flash_attention_2"])
    ok = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["model.attn_implementation=flash_attention_2",
                                                          "model.attend_to_expansion_tokens=true"])
    assert ok.model.attn_implementation == "flash_attention_2"
