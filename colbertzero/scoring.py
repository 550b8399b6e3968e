"""MaxSim backends: PyLate's torch path, or late-interaction-kernels' fused Triton kernel on a CUDA GPU.

Chosen once (`select`) — per phase from the recipe's `scores_backend`, per evaluation or mining run with "auto" — and
named in the log and the manifest. Every backend returns PyLate's torch values: a masked document token scores 0
(callers hand over documents zeroed at their masked tokens, and no document mask reaches a kernel, whose masks would
exclude the token instead: another maximum when every real similarity is negative) and a masked query token adds
nothing. The fused kernel rounds its inputs to fp16/bf16 tiles (fp32 accumulation): equal to the torch path within
that rounding, which `tools/bench/gpu.py` measures on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from pylate.scores import colbert_kd_scores, colbert_scores

BACKENDS = ("auto", "torch", "lik")
LIK = "late-interaction-kernels"


class ScoringUnavailable(RuntimeError):
    """The recipe asked for a backend this machine cannot run."""


@dataclass(frozen=True)
class Scorer:
    name: str  # "torch" | "lik" (PyLate's backend names)
    why: str  # the reason it was chosen, for the log

    def best_match(self, q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MaxSim of every query against every document with each maximum's position: (scores [queries, documents]
        fp32, best document token [queries, documents, query tokens] int64). `q` and `d` must be zero at their masked
        tokens. The [queries, documents, query tokens, document tokens] block exists only on the torch path."""
        if self.name == "lik":
            from late_interaction_kernels.forward import maxsim_forward

            # The kernel is autotuned per query length: zero query tokens (they add 0) round it up to a power of
            # two, so queries of varying length (no expansion) reuse a few tunings instead of one per length.
            n_q, length = q.shape[0], q.shape[1]
            bucket = max(16, 1 << (length - 1).bit_length())
            scores, at = maxsim_forward(torch.nn.functional.pad(q, (0, 0, 0, bucket - length)), d, save_argmax=True)
            return scores, at.view(n_q, d.shape[0], bucket)[:, :, :length].long()
        best, at = torch.einsum("ash,bth->abst", q, d).max(dim=-1)
        return best.sum(dim=-1), at

    def search_scores(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """MaxSim of every query against every document [queries, documents] for search (no gradient), `q` and `d`
        zero-padded (a zero query token adds nothing, a zero document token scores 0: PyLate's values). The torch path
        is one matrix product and a max over each document's tokens, the only tile it holds: PyLate's einsum lays the
        block out as [queries, documents, query tokens, document tokens] (a permuted copy) and multiplies it by the
        query mask (another), which halves the rate on a CPU (tools/bench/beir_scale.py)."""
        if self.name != "torch":
            return self.scores(q, d)
        (a, s, h), (b, t) = q.shape, d.shape[:2]
        sims = (q.reshape(a * s, h) @ d.reshape(b * t, h).T).view(a, s, b, t)
        return sims.amax(dim=-1).sum(dim=1)

    def width(self, doc_len: int, dim: int) -> int:
        """Elements per (query, document, query token) the scoring holds at once: the similarity row on the torch
        path, the picked best document token (the gradient's gather) on both."""
        return max(doc_len, dim) if self.name == "torch" else dim

    def scores(self, q: torch.Tensor, d: torch.Tensor, q_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`pylate.scores.colbert_scores` with this backend; `d` zero-padded (no document mask needed)."""
        return colbert_scores(q, d, queries_mask=q_mask, backend=self.name)

    def kd_scores(self, q: torch.Tensor, q_mask: torch.Tensor | None, d: torch.Tensor,
                  d_mask: torch.Tensor) -> torch.Tensor:
        """`pylate.scores.colbert_kd_scores` (each query against its own documents, `d` [queries, n, tokens, dim])
        with this backend, differentiable; masked document tokens are zeroed here."""
        d = d * d_mask.unsqueeze(-1).to(d.dtype)
        return colbert_kd_scores(q, d, queries_mask=q_mask, backend=self.name)


TORCH = Scorer("torch", "PyLate's torch scores")


def lik_status(device: torch.device, dim: int = 128) -> str | None:
    """None when the fused kernel can run here for `dim`-wide embeddings, else why not."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import late_interaction_kernels.forward  # noqa: F401 - needs Triton, which CUDA builds of torch bring
    except ImportError as e:
        return f"{LIK} is not importable ({e}); install it with `pip install '.[gpu]'`"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"{torch.cuda.get_device_name(device)} is older than Ampere (the kernel's tensor-core tiles)"
    if dim % 8 or dim > 256:
        return f"embedding size {dim} (the kernel needs a multiple of 8, at most 256)"
    return None


def select(requested: str, device: torch.device | str, dim: int = 128) -> Scorer:
    """The backend for `requested` ("auto": the fused kernel when it runs here, else torch) on `device`."""
    if requested not in BACKENDS:
        raise ScoringUnavailable(f"scores_backend {requested!r}: one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return Scorer("torch", "scores_backend: torch")
    device = torch.device(device)
    problem = lik_status(device, dim)
    if problem is None:
        try:
            v = version(LIK)
        except PackageNotFoundError:
            v = "?"
        return Scorer("lik", f"{LIK} {v} on {torch.cuda.get_device_name(device)}")
    if requested == "lik":
        raise ScoringUnavailable(f"scores_backend: lik, but {problem}. Use scores_backend: auto (falls back to "
                                 "torch) or torch")
    return Scorer("torch", problem)
