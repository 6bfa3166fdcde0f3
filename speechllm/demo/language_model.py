"""Stand-in for a pretrained LLM: a small Qwen2 and its BPE tokenizer, trained on the corpus's text.

Like a real instruction-tuned LLM it reads a text, an instruction and writes the answer; here the text is
the sentence the audio will speak, laid out exactly where the SpeechLLM puts the audio embeddings:
`[text][instruction + answer prefix][answer + eos]`. Stage 1 then only has to make audio look like that
text to the frozen LM. It learns the tasks whose answer follows from the words (transcribe, translate,
intent, slots, keywords); speaker and sound tasks are left for LoRA in stage 2. The text comes from the
corpus grammar, train sentences only, and instructions from the training templates only: dev and test
sentences and the held-out instructions stay unseen.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from speechllm.atomic import atomic_write_text
from speechllm.data.synth import draw_texts
from speechllm.data.tasks import default_registry
from speechllm.demo.optimize import train_steps

TEXT_TASKS = ("asr", "st", "ic", "sf", "kwe", "kws")  # tasks whose answer follows from the spoken words
EOS = "<|endoftext|>"
AUDIO_END = "\n"  # stands where the audio embeddings end
ANSWER_PREFIX = "\n"  # model.llm.answer_prefix of the demo preset
ARCHITECTURE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)


def lm_texts(examples_per_task: int, seed: int = 0) -> list[str]:
    """Training documents: `text + AUDIO_END + instruction + ANSWER_PREFIX + answer + EOS`."""
    registry = default_registry()
    rng = random.Random(seed)
    documents = []
    for task in TEXT_TASKS:
        spec = registry.get(task)
        for row in draw_texts(task, examples_per_task, seed=seed, split="train"):
            instruction = spec.instruction(row, rng)
            documents.append(f"{row['text']}{AUDIO_END}{instruction}{ANSWER_PREFIX}{row['target']}{EOS}")
    rng.shuffle(documents)
    return documents


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text stays encodable, e.g. held-out instructions with unseen words)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def pretrain_language_model(out_dir: Path, steps: int, examples_per_task: int = 4000, batch_size: int = 32,
                            lr: float = 3e-3, vocab_size: int = 1024, seed: int = 0, log=print) -> dict:
    """Train tokenizer and LM, save both with `save_pretrained` into `out_dir`; return a summary."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    documents = lm_texts(examples_per_task, seed)
    tokenizer = train_tokenizer(documents, vocab_size)
    encoded = [torch.tensor(ids) for ids in tokenizer(documents, add_special_tokens=False).input_ids]
    held = max(64, len(encoded) // 50)
    train, dev = encoded[held:], encoded[:held]
    config = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, **ARCHITECTURE)
    model = Qwen2ForCausalLM(config)
    rng = random.Random(seed)
    train_steps(model, steps, lambda: _loss(model, rng.sample(train, batch_size), tokenizer.pad_token_id), lr,
                warmup_fraction=0.05, name="language model", log=log, log_every=100)
    with torch.no_grad():
        dev_loss = sum(_loss(model, dev[i : i + 64], tokenizer.pad_token_id).item() for i in range(0, len(dev), 64))
        dev_loss /= math.ceil(len(dev) / 64)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {"steps": steps, "documents": len(documents), "vocab_size": len(tokenizer),
               "dev_loss": round(dev_loss, 4), "parameters": sum(p.numel() for p in model.parameters()),
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out_dir / "pretraining.json", json.dumps(summary, indent=2))  # the "done" mark: last
    return summary


def _loss(model: Qwen2ForCausalLM, sequences: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id)
    labels = torch.full((len(sequences), length), -100)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        labels[i, : len(s)] = s
    return model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
