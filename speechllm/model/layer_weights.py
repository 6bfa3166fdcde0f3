"""LayerWeightedSum: the paper's learnable weighted combination of all encoder layers."""

from __future__ import annotations

import torch
from torch import nn


class LayerWeightedSum(nn.Module):
    """One learnable scalar per encoder layer.

    softmax: Σ softmax(w)_l · h_l (weights start uniform, always a convex combination);
    mean:    (1/L) Σ w_l · h_l with raw weights starting at 1 (SpeechVerse's formulation).
    """

    def __init__(self, num_layers: int, normalization: str = "softmax"):
        super().__init__()
        self.normalization = normalization
        start = torch.zeros(num_layers) if normalization == "softmax" else torch.ones(num_layers)
        self.weights = nn.Parameter(start)

    def layer_weights(self) -> torch.Tensor:
        if self.normalization == "softmax":
            return self.weights.softmax(-1)
        return self.weights / self.weights.numel()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (L, B, F, D) -> (B, F, D)."""
        weights = self.layer_weights().to(hidden_states.dtype)
        return torch.einsum("l,lbfd->bfd", weights, hidden_states)
