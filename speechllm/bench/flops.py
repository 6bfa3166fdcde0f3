"""Model FLOPs of a training step, and model FLOPs utilisation (MFU) against the GPU's peak.

Counted on the useful work only: valid audio seconds and valid LLM positions (padding is not credited).

- LLM, per valid position, for every linear layer with P weights (LoRA included, embeddings looked up, not
  multiplied): 2P forward + 2P for the gradient of its input (needed whenever anything before the LLM
  trains: the audio path does in every stage) + 2P for the weight gradient if the weights train. A frozen
  LLM thus costs 4P per position, a trained one the usual 6P. The LM head counts the same, per target
  token: the only positions whose logits the loss needs (decoder-only steps compute no others; the chunked
  loss's recomputed logits are not credited, as no recomputation is). Attention adds
  4·L·d·S² per sequence of S positions forward (scores and values over every layer, d = heads x head
  width, causal masking not discounted, as in PaLM's MFU) and twice that backward.
- Encoder (frozen, forward only) and the weighted sum + downsampler + projection (forward and backward,
  counted as 3x forward): measured once with torch's FlopCounterMode on 10 s of audio, scaled by the
  batch's valid audio seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from speechllm.model.encoder import ENCODER_FRAMES_PER_SECOND
from speechllm.model.llm import base_llm, body_and_head
from speechllm.model.speech_llm import SpeechLLM

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, from the vendor data sheets; the first match wins.
PEAK_BF16_TFLOPS = (
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.4),
    (("H200", "NVL"), 835.0),
    (("H200",), 989.4),
    (("GH200",), 989.4),
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("L40S",), 362.1),
    (("L4",), 121.0),
    (("A10G",), 70.0),
    (("A10",), 125.0),
)
_PROBE_SECONDS = 10.0


def peak_bf16_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak by its name (torch.cuda.get_device_name), None if not in the table."""
    words = set(device_name.upper().replace("-", " ").split())  # "NVIDIA A100-SXM4-80GB" -> A100, SXM4, ...
    for needles, tflops in PEAK_BF16_TFLOPS:
        if words.issuperset(needles):
            return tflops
    return None


@dataclass
class FlopModel:
    """Per-step model FLOPs from what the step processed."""

    llm_per_token: float  # linear layers but the LM head, forward + backward
    head_per_target: float  # the LM head, forward + backward
    llm_attention_per_token_squared: float  # forward + backward, times S² per sequence
    audio_per_second: float  # encoder forward + audio path forward/backward

    def step_flops(self, audio_seconds: float, llm_tokens: int, llm_tokens_squared: int, target_tokens: int) -> float:
        return (self.llm_per_token * llm_tokens + self.llm_attention_per_token_squared * llm_tokens_squared
                + self.head_per_target * target_tokens + self.audio_per_second * audio_seconds)


def flop_model(model: SpeechLLM) -> FlopModel:
    head = body_and_head(model.llm)[1]
    per_token = per_target = 0.0
    for module in model.llm.modules():
        if isinstance(module, nn.Linear):
            weights = module.weight.numel()
            flops = 4 * weights + (2 * weights if module.weight.requires_grad else 0)  # forward + input gradient
            if module is head:
                per_target += flops
            else:
                per_token += flops
    config = base_llm(model.llm).config
    layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.num_layers
    heads = getattr(config, "num_attention_heads", None) or config.num_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    attention = 4 * layers * heads * head_dim
    return FlopModel(per_token, per_target, 3 * attention, audio_flops_per_second(model))


def audio_flops_per_second(model: SpeechLLM) -> float:
    """Encoder forward + 3x the audio path's forward, per second of audio (measured on a 10 s probe)."""
    encoder = model.encoder
    device = next(model.projection.parameters()).device
    samples = int(_PROBE_SECONDS * encoder.sample_rate)
    wave = torch.randn(1, samples, device=device) * 0.1
    mask = torch.ones(1, samples, dtype=torch.bool, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        hidden, frame_mask = encoder(wave, mask)
    encoder_flops = counter.get_total_flops()
    frames = int(_PROBE_SECONDS * ENCODER_FRAMES_PER_SECOND)
    hidden = torch.zeros(encoder.num_layers, 1, frames, encoder.hidden_size, device=device)
    frame_mask = torch.ones(1, frames, dtype=torch.bool, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_features(hidden, frame_mask)
    return (encoder_flops + 3 * counter.get_total_flops()) / _PROBE_SECONDS

