"""AudioProjection: downsampled audio frames -> the LLM's embedding space, at the scale of its text embeddings."""

from __future__ import annotations

import torch
from torch import nn


class AudioProjection(nn.Module):
    """Linear map, then RMSNorm whose gain starts at the root-mean-square of the LLM's token embeddings.

    The frozen LLM has only ever read token embeddings. A plain linear projection is free to grow its
    outputs far past their scale (on the demo it reached 700x the norm of a token embedding), and then
    what the LLM's layers write into the residual stream at audio positions is drowned out. The norm keeps
    audio embeddings at the scale the LLM knows; the gain still learns.
    """

    def __init__(self, in_features: int, token_embeddings: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(in_features, token_embeddings.shape[1])
        self.norm = nn.RMSNorm(token_embeddings.shape[1], eps=1e-6)
        if not token_embeddings.is_meta:  # `speechllm plan` builds on the meta device: no values to match
            with torch.no_grad():
                self.norm.weight.fill_(token_embeddings.float().pow(2).mean().sqrt().item())

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(frames))
