"""The named trainable groups of a SpeechLLM: the unit that stages train, freeze and checkpoint."""

from __future__ import annotations

from torch import nn

from speechllm.config import TRAINABLE_GROUPS


def trainable_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """Group name -> {parameter name (as in model.state_dict()) -> parameter}."""
    groups = {
        "layer_weights": dict(model.layer_weights.named_parameters(prefix="layer_weights")),
        "downsampler": dict(model.downsampler.named_parameters(prefix="downsampler")),
        "projection": dict(model.projection.named_parameters(prefix="projection")),
        "lora": {n: p for n, p in model.llm.named_parameters(prefix="llm") if "lora_" in n},
    }
    assert tuple(groups) == TRAINABLE_GROUPS
    return groups
