"""The one module DeepSpeed wraps: a PyLate ColBERT model plus the contrastive temperature.

Keeping the temperature inside the wrapped module lets DeepSpeed own it like any weight (optimizer state, ZeRO
partitioning, checkpoints) and lets ZeRO-3 gather it in the module's forward. `forward` returns the temperature as an
output for that reason: reading a ZeRO-3 parameter outside a forward would need `GatheredParameters`.

State-dict names: the ColBERT weights are under `colbert.` (`module.colbert` is a plain PyLate `ColBERT`, what export
saves); a learnable temperature is the parameter `temperature`, shape `(1,)` (DeepSpeed cannot flatten 0-dim
parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pylate.models import ColBERT
from torch import nn

from colbertzero.recipe import Phase


class ColBERTForTraining(nn.Module):
    """`forward(features) -> {"embeddings": L2-normalised token embeddings [B, L, dim], "temperature": (1,) fp32}`."""

    def __init__(self, colbert: ColBERT, temperature: float = 1.0, learnable_temperature: bool = False) -> None:
        super().__init__()
        self.colbert = colbert
        self.fixed_temperature = float(temperature)
        # Learnt as the temperature itself, not its log: in bf16 a log-temperature near log(0.02) is only resolved to
        # ~1.6 % of the temperature, the temperature itself to ~0.4 %.
        self.temperature = nn.Parameter(torch.tensor([float(temperature)])) if learnable_temperature else None
        # What PyLate's losses read from the model for masking (copied: DeepSpeed hides the module behind the engine).
        self.skiplist: list[int] = list(colbert.skiplist)
        self.do_query_expansion: bool = bool(colbert.do_query_expansion)

    @classmethod
    def for_phase(cls, colbert: ColBERT, phase: Phase) -> "ColBERTForTraining":
        if phase.kind == "distillation" and phase.learnable_temperature:
            raise ValueError("learnable_temperature: the distillation loss (PyLate's) has no temperature")
        return cls(colbert, phase.temperature, phase.learnable_temperature)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # A fresh dict: sentence-transformers writes its outputs into the dict it is given, and GradCache feeds the
        # same features twice.
        out = self.colbert(dict(features))
        embeddings = F.normalize(out["token_embeddings"], p=2, dim=-1)
        if self.temperature is not None:
            # A copy, never the parameter itself: ZeRO-3 empties the parameter's storage after the forward.
            temperature = self.temperature.to(torch.float32, copy=True)
        else:
            temperature = torch.full((1,), self.fixed_temperature, dtype=torch.float32, device=embeddings.device)
        return {"embeddings": embeddings, "temperature": temperature}

    def query_mask(self, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """PyLate's rule: with query expansion every query token (the [MASK] expansions included) is scored."""
        return None if self.do_query_expansion else features["attention_mask"].bool()

    def document_mask(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Padding and skiplist (punctuation) tokens do not score, as in PyLate's losses."""
        keep = ColBERT.skiplist_mask(features["input_ids"], self.skiplist)
        return keep & features["attention_mask"].bool()
