"""ConvDownsampler: a Conv1d stack that shortens the frame sequence and keeps the padding mask exact."""

from __future__ import annotations

import torch
from torch import nn


class ConvDownsampler(nn.Module):
    """`num_layers` strided Conv1d + GELU; the sequence shortens by stride**num_layers.

    Padded frames are zeroed before every conv, so a valid frame sees exactly what it would see if the
    example were alone (the conv's own zero padding): a padded batch gives the unpadded result.
    """

    def __init__(self, in_dim: int, channels: int, num_layers: int = 2, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        dims = [in_dim] + [channels] * num_layers
        self.convs = nn.ModuleList(
            nn.Conv1d(d_in, d_out, kernel_size, stride=stride, padding=self.padding)
            for d_in, d_out in zip(dims[:-1], dims[1:])
        )
        self.activation = nn.GELU()

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for _ in self.convs:
            lengths = self._conv_length(lengths)
        return lengths

    def _conv_length(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + 2 * self.padding - self.kernel_size, self.stride, rounding_mode="floor") + 1

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, F, D), mask (B, F) bool -> (B, F', C), mask (B, F')."""
        lengths = mask.sum(-1)
        x = frames.transpose(1, 2)
        for conv in self.convs:
            x = self.activation(conv(x * mask[:, None, :].to(x.dtype)))
            lengths = self._conv_length(lengths)
            mask = torch.arange(x.shape[-1], device=x.device)[None] < lengths[:, None]
        return x.transpose(1, 2), mask

