"""The frozen LLM (decoder-only or encoder-decoder), its tokenizer, and LoRA adapters through peft."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from speechllm.config import ConfigError, LLMConfig, LoRAConfig
from speechllm.model.pretrained import from_pretrained, seeded_init

_AUTO_CLASSES = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}
# Architecture values that are not passed on to `from_pretrained`: the checkpoint decides them. Weight tying
# follows what the checkpoint holds; transformers 5 forces T5's tie_word_embeddings to True and keeps a separate
# lm_head only when the checkpoint has one (Flan-T5), so overriding it with False would leave T5's input
# embeddings untied from `shared` and randomly initialised.
_CHECKPOINT_DECIDES = ("model_type", "tie_word_embeddings")


def build_llm(cfg: LLMConfig) -> PreTrainedModel:
    auto = _AUTO_CLASSES[cfg.kind]
    architecture = dict(cfg.architecture)
    attention = {"attn_implementation": cfg.attn_implementation}
    try:
        if cfg.pretrained:
            overrides = {k: v for k, v in architecture.items() if k not in _CHECKPOINT_DECIDES}
            model = from_pretrained(auto, cfg.pretrained, "model.llm.pretrained", **attention, **overrides)
        else:
            config = AutoConfig.for_model(architecture.pop("model_type"), **architecture)
            model = seeded_init(lambda: auto.from_config(config, **attention))
            if architecture.get("tie_word_embeddings") is False:
                seeded_init(lambda: _untie_output_embeddings(model))
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        cause = str(err).strip().splitlines()[0]
        raise ConfigError(f"model.llm.attn_implementation: {cfg.attn_implementation} cannot be used here ({cause})") from None
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        # Non-reentrant: LoRA weights inside a layer get their gradients whether or not the layer's inputs
        # require grad (the reentrant form needs peft's enable_input_require_grads for that).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The LLM's repeated transformer blocks (Qwen2DecoderLayer, LlamaDecoderLayer, T5Block, ...): the units
    FSDP shards and `trainer.compile` compiles. HF names them in `_no_split_modules`; its layers also derive
    from GradientCheckpointingLayer."""
    model = base_llm(llm)
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names or isinstance(m, GradientCheckpointingLayer)]


# Config fields of causal LMs that change the logits after the LM head (Gemma 2/3, Cohere, Granite): a loss that
# applies the head itself (model.llm.loss_chunk_tokens) would leave them out.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def base_llm(llm: nn.Module) -> PreTrainedModel:
    """The HF model itself, whether or not peft wrapped it for LoRA (the adapters live inside its layers)."""
    return llm.get_base_model() if isinstance(llm, PeftModel) else llm


def cast_frozen_weights(llm: nn.Module, dtype: torch.dtype, trained: set[nn.Parameter]) -> None:
    """Store the frozen LLM's weights in `dtype` (mixed precision's autocast dtype), as `from_pretrained(dtype=...)`
    would: half the memory of an fp32 checkpoint or a random preset, and autocast no longer casts every weight at
    every step (it caches no cast of a frozen weight). The `trained` parameters (LoRA) stay fp32, for the
    optimizer; so do the buffers (RoPE's inverse frequencies) and the modules the model keeps in fp32 (T5's `wo`
    under fp16)."""
    model = base_llm(llm)
    keep = set(model._keep_in_fp32_modules_strict or ())
    if dtype == torch.float16:
        keep |= set(model._keep_in_fp32_modules or ())
    for name, param in model.named_parameters():
        if param not in trained and not keep.intersection(name.split(".")):
            param.data = param.data.to(dtype)


def switch_off_untrained_adapters(llm: nn.Module) -> bool:
    """Switch off LoRA layers whose adapters never trained (every B matrix zero, as peft starts it): they add
    exactly zero to their layer's output, so a run that does not train them (stage 1) need not compute that zero
    (dropout, products and casts, forward and backward, in every adapted layer). Returns whether it did."""
    if not isinstance(llm, PeftModel) or any(p.any() for n, p in llm.named_parameters() if "lora_B" in n):
        return False
    llm.base_model.disable_adapter_layers()
    return True


def body_and_head(llm: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """A decoder-only LLM's transformer body (embeddings to final norm, returning `last_hidden_state`) and its LM
    head, LoRA included: for a loss that applies the head itself."""
    model = base_llm(llm)
    return model.base_model, model.get_output_embeddings()


def check_logits_are_head_output(llm: PreTrainedModel) -> None:
    """The chunked loss applies the LM head itself: refuse models whose forward changes the logits after it."""
    for name in _LOGIT_TRANSFORMS:
        value = getattr(llm.config, name, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(f"model.llm.loss_chunk_tokens: {type(llm).__name__} transforms its logits after the "
                              f"LM head ({name}={value}), which the chunked loss would leave out; set it to 0")


def _untie_output_embeddings(model: PreTrainedModel) -> None:
    """Give the LM head its own weights where transformers tied them although the architecture says untied
    (T5 in transformers 5 always ties): a model built from config then has the parameters of the checkpoint."""
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or output.weight is not embeddings.weight:
        return
    # Its own initialisation (T5's: normal with std initializer_factor), so that a saved copy is not re-tied
    # on loading as equal to the embeddings.
    output.weight = nn.Parameter(torch.empty_like(embeddings.weight))
    nn.init.normal_(output.weight, std=getattr(model.config, "initializer_factor", 1.0))
    name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is output.weight)
    model.all_tied_weights_keys.pop(name, None)  # or save_pretrained would leave it out as a tied copy


def build_tokenizer(cfg: LLMConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or cfg.pretrained
    if source == "byt5":
        tokenizer = ByT5Tokenizer()
    elif source:
        tokenizer = from_pretrained(AutoTokenizer, source, "model.llm.tokenizer")
    else:
        raise ConfigError("model.llm.tokenizer: set a tokenizer (`byt5`, a hub name or a local path)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocabulary(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    vocab = llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"model.llm: tokenizer has {len(tokenizer)} tokens but the LLM embeds only {vocab} "
            "(raise architecture.vocab_size or use the model's own tokenizer)"
        )


def add_lora(llm: PreTrainedModel, cfg: LoRAConfig) -> PeftModel:
    """Inject LoRA adapters; peft freezes the base weights. B starts at zero, so the LLM is unchanged."""
    config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules)
    )
    return get_peft_model(llm, config)
