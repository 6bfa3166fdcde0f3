"""Training's backward pass gives right convolution gradients on several CPU threads
(speechllm/training/cpu_backward.py: torch 2.13's oneDNN Conv1d backward does not, for some shapes)."""

from __future__ import annotations

import copy

import pytest
import torch

from speechllm.training.module import SpeechLLMModule
from speechllm.training.stage_scheduler import StagePlan
from tests.conftest import tiny_config


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def input_gradient(conv: torch.nn.Conv1d, frames: torch.Tensor, backward) -> torch.Tensor:
    frames = frames.clone().requires_grad_(True)
    backward(conv(frames).square().sum())
    return frames.grad


def test_training_backward_gives_the_float64_conv_gradients_on_two_cpu_threads(two_threads):
    cfg = tiny_config()
    module = SpeechLLMModule(cfg, StagePlan(cfg), [])
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(192, 256, 7, stride=2, padding=3)  # the demo downsampler's first convolution
    frames = torch.randn(38, 192, 91)  # a batch on which oneDNN's input gradients came out wrong
    truth = input_gradient(copy.deepcopy(conv).double(), frames.double(), torch.Tensor.backward).float()
    for _ in range(5):  # the wrong gradients differed from call to call
        torch.testing.assert_close(input_gradient(conv, frames, module.backward), truth, rtol=1e-4, atol=1e-4)
