"""The named trainable groups of a SpeechLLM: the unit that stages train, freeze and checkpoint."""

from __future__ import annotations

from torch import nn

from speechllm.config import TRAINABLE_GROUPS


# FSDP and activation-checkpoint wrappers insert these into module paths once the strategy has wrapped the
# model (`layers.0._fsdp_wrapped_module.self_attn...`); state dicts leave them out, and so do group names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def trainable_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """Group name -> {parameter name (as in model.state_dict()) -> parameter}."""
    groups = {
        "layer_weights": _named(model.layer_weights, "layer_weights"),
        "downsampler": _named(model.downsampler, "downsampler"),
        "projection": _named(model.projection, "projection"),
        "lora": {n: p for n, p in _named(model.llm, "llm").items() if "lora_" in n},
    }
    assert tuple(groups) == TRAINABLE_GROUPS
    return groups


def _named(module: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    named = {}
    for name, param in module.named_parameters(prefix=prefix):
        for wrapper in _WRAPPER_PREFIXES:
            name = name.replace(wrapper, "")
        named[name] = param
    return named
