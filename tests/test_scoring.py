"""The MaxSim backend choice (colbertzero/scoring.py) and the torch path's equality with PyLate's masked scores. The
fused kernel itself needs CUDA: tools/bench/gpu.py compares it with the torch path on the GPU (`scoring_check`)."""

from __future__ import annotations

import pytest
import torch
from pylate.scores import colbert_kd_scores, colbert_scores

from colbertzero import scoring


def test_auto_falls_back_to_torch_and_says_why_and_lik_is_refused_without_cuda():
    s = scoring.select("auto", "cpu")
    assert (s.name, s.why) == ("torch", "no CUDA device")
    assert scoring.select("torch", "cpu").why == "scores_backend: torch"
    with pytest.raises(scoring.ScoringUnavailable, match=r"scores_backend: lik, but no CUDA device\. Use "):
        scoring.select("lik", "cpu")
    with pytest.raises(scoring.ScoringUnavailable, match="one of auto, torch, lik"):
        scoring.select("fast", "cpu")


def _embeddings(*shape, g):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_zeroed_documents_without_a_mask_give_pylates_masked_scores_and_gradients():
    """What the backends are handed (documents zeroed at masked tokens, no document mask) equals PyLate's scores
    with the mask — including pairs whose every real similarity is negative, where the maximum is a masked 0."""
    g = torch.Generator().manual_seed(0)
    q, d = _embeddings(4, 6, 8, g=g), _embeddings(4, 5, 9, 8, g=g)
    d_mask = torch.rand(4, 5, 9, generator=g) > 0.4
    d_mask[..., 0] = True
    q_mask = torch.rand(4, 6, generator=g) > 0.3
    real = torch.einsum("ash,abth->abst", q, d).masked_fill(~d_mask[:, :, None, :], -1).amax(-1)
    assert (real < 0).any()

    def run(fn):
        qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
        out = fn(qq, dd)
        (out * torch.arange(1.0, out.numel() + 1, dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), qq.grad, dd.grad

    ours = run(lambda qq, dd: scoring.TORCH.kd_scores(qq, q_mask, dd, d_mask))
    theirs = run(lambda qq, dd: colbert_kd_scores(qq, dd, queries_mask=q_mask, documents_mask=d_mask,
                                                  backend="torch"))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    flat, flat_mask = d.reshape(20, 9, 8), d_mask.reshape(20, 9)
    zeroed = flat * flat_mask.unsqueeze(-1)
    torch.testing.assert_close(scoring.TORCH.scores(q, zeroed, q_mask),
                               colbert_scores(q, flat, queries_mask=q_mask, documents_mask=flat_mask, backend="torch"),
                               rtol=1e-12, atol=1e-12)
    scores, at = scoring.TORCH.best_match(q * q_mask.unsqueeze(-1), zeroed)
    torch.testing.assert_close(scores, scoring.TORCH.scores(q, zeroed, q_mask), rtol=1e-12, atol=1e-12)
    assert at.shape == (4, 20, 6) and at.dtype == torch.int64 and int(at.max()) < 9
