"""The frozen LLM (decoder-only or encoder-decoder), its tokenizer, and LoRA adapters through peft."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from speechllm.config import ConfigError, LLMConfig, LoRAConfig
from speechllm.model.pretrained import from_pretrained, seeded_init

_AUTO_CLASSES = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}


def build_llm(cfg: LLMConfig) -> PreTrainedModel:
    auto = _AUTO_CLASSES[cfg.kind]
    architecture = dict(cfg.architecture)
    if cfg.pretrained:
        model = from_pretrained(auto, cfg.pretrained, "model.llm.pretrained", **architecture)
    else:
        config = AutoConfig.for_model(architecture.pop("model_type"), **architecture)
        model = seeded_init(lambda: auto.from_config(config))
    model.requires_grad_(False)
    return model


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
