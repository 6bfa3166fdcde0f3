"""Stand-in for a pretrained LLM: a small Qwen2 and its BPE tokenizer, trained on the corpus's text.

A 7B LLM reads audio embeddings it has never seen because it is large and general; a 0.8M-parameter
stand-in is neither. So it is pretrained on the text laid out the way the audio path can present it:
where the SpeechLLM puts the audio embeddings come the words as *spoken text*, each word piece repeated
over about as many 80 ms frames as it takes to say (0.6 to 1.1 frames a character), silence frames
around, then `[instruction + answer prefix][answer + eos]` tokenized exactly as `SpeechLLM` does. Stage 1
then has to make each audio frame look like the word piece spoken in it, and the frozen LM reads it.

Half of the transcription examples are random strings of the corpus's words: a grammar's sentences can
be recalled rather than read, those can only be read, so the LM learns to copy what it is given instead of
completing familiar sentences. It learns the tasks whose answer follows from the words (transcribe,
translate, intent, slots, keywords, speech or not) and to answer the speaker task with one of its labels,
which LoRA learns to choose in stage 2. The text comes from the corpus grammar, train sentences only: dev
and test sentences stay unseen. Instructions come from all of a task's templates, the held-out ones too,
some words dropped at random so that it keys on what names the task rather than on whole templates. A real
LLM understands a phrasing it was never tuned on because it reads English; a 0.8M stand-in cannot, so it is
taught the held-out phrasings here, in text, and only the speech stages never see them. Held-out
instructions then measure what SpeechVerse measures with them: whether training on the audio path keeps
the LLM's instruction following or narrows it to the training templates.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torchmetrics.text import WordErrorRate
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from speechllm.atomic import atomic_write_text
from speechllm.data.synth import draw_texts
from speechllm.data.tasks import Task, default_registry
from speechllm.demo.optimize import train_steps

TEXT_TASKS = ("asr", "st", "ic", "sf", "kwe", "kws")  # tasks whose answer follows from the spoken words
# Speech or not follows from whether any word is spoken; the speaker's gender does not follow from the text
# (the LM learns to answer with one of the two labels, LoRA what tells them apart).
LABEL_TASKS = ("sns", "sc")
EOS = "<|endoftext|>"
SILENCE = "<|silence|>"  # a spoken-text frame with no word in it
ANSWER_PREFIX = "\n"  # model.llm.answer_prefix of the demo preset
FRAMES_PER_CHARACTER = (0.6, 1.1)  # 80 ms frames (the demo's downsampler halves 50 Hz frames twice)
SILENCE_AROUND = 4  # at most this many silence frames before and after the words
SILENCE_BETWEEN = 0.1  # chance of a silence frame after a word piece
SOUND_FRAMES = (10, 50)  # a non-speech clip: 0.8 to 4 s with no word in it
RANDOM_TRANSCRIPTS = 1.0  # transcripts of random word strings, per example of each task
INSTRUCTION_WORD_DROPOUT = 0.15  # on half the instructions: the LM keys on what names the task, not whole templates
READING_EXAMPLES = 100  # dev sentences the LM transcribes from spoken text after pretraining
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

Example = tuple[str, str, str]  # (spoken text, instruction, answer)


def lm_examples(examples_per_task: int, seed: int = 0,
                tasks: tuple[str, ...] = TEXT_TASKS + LABEL_TASKS) -> list[Example]:
    """Train sentences with instructions for each of `tasks`, and random-word transcripts."""
    registry = default_registry()
    rng = random.Random(seed)
    examples = []
    for task in (task for task in TEXT_TASKS + LABEL_TASKS if task in tasks):
        spec = registry.get(task)
        for row in draw_texts(task, examples_per_task, seed=seed, split="train"):
            spoken = "" if row.get("sound") else row["text"]  # a non-speech clip says nothing
            examples.append((spoken, any_instruction(spec, row, rng), row["target"]))
    words = sorted({word for text, _, _ in examples for word in text.split()})
    asr = registry.get("asr")
    for _ in range(int(examples_per_task * RANDOM_TRANSCRIPTS)):
        text = " ".join(rng.choices(words, k=rng.randint(2, 10)))
        examples.append((text, any_instruction(asr, {"text": text, "target": text}, rng), text))
    rng.shuffle(examples)
    return examples


def any_instruction(spec: Task, fields: dict, rng: random.Random) -> str:
    """An instruction from all of the task's templates, training and held-out (see the module's docstring)."""
    return spec.render(rng.choice(spec.templates()), fields)


def train_tokenizer(examples: list[Example], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text stays encodable, e.g. held-out instructions with unseen words)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, SILENCE],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((part for example in examples for part in example), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=[SILENCE])


class SpokenText:
    """Token ids of a text as the audio path presents it: word pieces held over frames, silence around."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tokenizer = tokenizer
        self.silence = tokenizer.convert_tokens_to_ids(SILENCE)

    def __call__(self, text: str, rng: random.Random) -> list[int]:
        if not text:  # a clip with no words in it (a non-speech sound): no piece, as long as a sentence
            return [self.silence] * rng.randint(*SOUND_FRAMES)
        frames = [self.silence] * rng.randint(0, SILENCE_AROUND)
        for piece in self.tokenizer(text, add_special_tokens=False).input_ids:
            characters = len(self.tokenizer.convert_ids_to_tokens(piece))
            frames += [piece] * max(1, round(characters * rng.uniform(*FRAMES_PER_CHARACTER)))
            if rng.random() < SILENCE_BETWEEN:
                frames.append(self.silence)
        return frames + [self.silence] * rng.randint(0, SILENCE_AROUND)


def drop_words(instruction: str, rng: random.Random) -> str:
    kept = [word for word in instruction.split() if rng.random() >= INSTRUCTION_WORD_DROPOUT]
    return " ".join(kept) or instruction


class Documents:
    """Training sequences, drawn afresh each time: new frame timings and word drops on every draw."""

    def __init__(self, examples: list[Example], tokenizer: PreTrainedTokenizerFast, seed: int, augment: bool = True):
        self.examples, self.tokenizer, self.rng, self.augment = examples, tokenizer, random.Random(seed), augment
        self.spoken = SpokenText(tokenizer)

    def encode(self, example: Example) -> tuple[list[int], int]:
        """Ids of `[spoken text][instruction + answer prefix][answer + eos]` (tokenized in those parts, as
        SpeechLLM does) and the length of the spoken part, which is never a target."""
        text, instruction, answer = example
        if self.augment and self.rng.random() < 0.5:
            instruction = drop_words(instruction, self.rng)
        spoken = self.spoken(text, self.rng)
        ids = self.tokenizer(instruction + ANSWER_PREFIX, add_special_tokens=False).input_ids
        ids += self.tokenizer(answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
        return spoken + ids, len(spoken)

    def batch(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed ids, positions and labels (see `pack`)."""
        return pack([self.encode(example) for example in examples], self.tokenizer.pad_token_id)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.batch(self.rng.sample(self.examples, batch_size))


def pack(encoded: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, positions and labels of encoded examples (ids, length of the spoken part) packed into rows as long
    as the longest (longest first, each into the first row it fits): right-padding each to the longest wasted
    a third of the batch. Positions restart at 0 for each example and for the padding, so transformers'
    packed-sequence mask keeps attention within each example and RoPE sees what it would alone. The spoken
    part and padding are never targets."""
    encoded = sorted(encoded, key=lambda item: -len(item[0]))
    length = len(encoded[0][0])
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for ids, spoken in encoded:
        row = next((row for row in rows if len(row[0]) + len(ids) <= length), None)
        if row is None:
            rows.append(row := ([], [], []))
        row[0].extend(ids)
        row[1].extend(range(len(ids)))
        row[2].extend([-100] * spoken + ids[spoken:])
    for ids, positions, labels in rows:
        padding = length - len(ids)
        ids.extend([pad_id] * padding)
        positions.extend(range(padding))
        labels.extend([-100] * padding)
    return tuple(torch.tensor([row[part] for row in rows]) for part in range(3))


def pretrain_language_model(out_dir: Path, steps: int, examples_per_task: int = 4000, batch_size: int = 32,
                            lr: float = 3e-3, vocab_size: int = 2048, seed: int = 0,
                            tasks: tuple[str, ...] = TEXT_TASKS + LABEL_TASKS, log=print) -> dict:
    """Train tokenizer and LM on the text of `tasks`, save both with `save_pretrained` into `out_dir`; return
    a summary."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    examples = lm_examples(examples_per_task, seed, tasks)
    tokenizer = train_tokenizer(examples, vocab_size)
    held = max(64, len(examples) // 50)
    train = Documents(examples[held:], tokenizer, seed)
    dev = Documents(examples[:held], tokenizer, seed + 1, augment=False)
    config = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, **ARCHITECTURE)
    model = Qwen2ForCausalLM(config)
    train_steps(model, steps, lambda: _loss(model, *train.sample(batch_size)), lr,
                warmup_fraction=0.05, name="language model", log=log, log_every=100)
    with torch.no_grad():
        chunks = [dev.examples[i : i + 64] for i in range(0, held, 64)]
        dev_loss = sum(_loss(model, *dev.batch(chunk)).item() for chunk in chunks) / len(chunks)
    reading_wer = transcript_wer_from_spoken_text(
        model, tokenizer, draw_texts("asr", READING_EXAMPLES, seed, split="dev"), seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {"steps": steps, "examples": len(examples), "vocab_size": len(tokenizer),
               "dev_loss": round(dev_loss, 4), "dev_wer_from_text": round(reading_wer, 4),
               "parameters": sum(p.numel() for p in model.parameters()),
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out_dir / "pretraining.json", json.dumps(summary, indent=2))  # the "done" mark: last
    return summary


@torch.no_grad()
def transcript_wer_from_spoken_text(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[dict],
                                    seed: int = 0) -> float:
    """WER of the LM transcribing sentences it is given as spoken text, where the audio would be: the best
    the SpeechLLM can do on ASR through this LM if stage 1 made the audio look exactly like spoken text."""
    spec, rng, spoken = default_registry().get("asr"), random.Random(seed), SpokenText(tokenizer)
    predictions = []
    for row in rows:
        instruction = tokenizer(spec.instruction(row, rng) + ANSWER_PREFIX, add_special_tokens=False).input_ids
        ids = torch.tensor([spoken(row["text"], rng) + instruction])
        out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        predictions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return float(WordErrorRate()(predictions, [row["target"] for row in rows]))


def _loss(model: Qwen2ForCausalLM, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets of a packed batch. Logits are computed at the targets
    only: the spoken part, most of each example, never is one."""
    hidden = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    scored = targets != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][scored]), targets[scored])
