"""Backward passes on CPU through torch's own convolution kernels instead of oneDNN's.

torch 2.13's oneDNN Conv1d backward returns wrong input gradients on more than one thread for some
shapes: for the demo downsampler's first convolution (192 -> 256 channels, kernel 7, stride 2) on a
(38, 192, 91) batch, errors up to 1.3 on gradients no larger than 3.5, different on every call, where one
thread or torch's own kernels agree to 1e-6. Such a batch corrupts the gradients of the downsampler and
the layer weights, and two runs of one config part after a few steps. torch picks the convolution
backend when the backward runs, so only the backward is switched: the forward keeps oneDNN's speed.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

# torch.backends.mkldnn.flags() sets oneDNN's TF32 flag too, and warns each time that only Intel GPUs have it.
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN is available for Intel GPUs")


def without_onednn_on_cpu(device: torch.device):
    """A context for `loss.backward()`: oneDNN off while it runs, when the loss is on the CPU."""
    return torch.backends.mkldnn.flags(enabled=False) if device.type == "cpu" else nullcontext()
