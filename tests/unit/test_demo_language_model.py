"""The demo LM stand-in's training text: spoken text where the audio goes, laid out as SpeechLLM lays it out."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from speechllm.data.synth import draw_texts
from speechllm.data.tasks import default_registry
from speechllm.demo.language_model import (ANSWER_PREFIX, ARCHITECTURE, FRAMES_PER_CHARACTER, LABEL_TASKS, SILENCE,
                                           SILENCE_AROUND, TEXT_TASKS, Documents, SpokenText, _loss, lm_examples, pack, train_tokenizer)


def test_spoken_text_holds_each_word_piece_over_frames_in_order():
    tokenizer = train_tokenizer(lm_examples(30), vocab_size=400)
    spoken, rng = SpokenText(tokenizer), random.Random(0)
    text = "their young sailor opened the cold river"
    pieces = tokenizer(text, add_special_tokens=False).input_ids
    silence = tokenizer.convert_tokens_to_ids(SILENCE)
    for _ in range(20):
        frames = spoken(text, rng)
        runs = [(piece, len(list(run))) for piece, run in itertools.groupby(frames) if piece != silence]
        assert [piece for piece, _ in runs] == pieces  # every piece once, in order, nothing else
        for piece, count in runs:
            characters = len(tokenizer.convert_ids_to_tokens(piece))
            low, high = FRAMES_PER_CHARACTER
            assert max(1, round(characters * low)) <= count <= max(1, round(characters * high))
        assert len(frames) - sum(count for _, count in runs) <= 2 * SILENCE_AROUND + len(pieces)


def test_documents_target_instruction_and_answer_never_the_spoken_part():
    examples = lm_examples(10)
    tokenizer = train_tokenizer(examples, vocab_size=400)
    documents = Documents(examples, tokenizer, seed=0, augment=False)
    ids, positions, labels = documents.batch(examples[:16])
    assert ids.shape[0] < 16  # packed
    tails = []
    for row in range(ids.shape[0]):  # a segment starts where the positions restart at 0
        starts = (positions[row] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        for start, end in zip(starts, starts[1:]):
            segment, targets = ids[row, start:end], labels[row, start:end]
            scored = targets != -100
            if not scored.any():  # padding
                assert (segment == tokenizer.pad_token_id).all()
                continue
            first = int(scored.nonzero()[0])
            assert scored[first:].all() and (targets[first:] == segment[first:]).all()  # a spoken prefix, then targets
            tails.append(segment[first:].tolist())
    expected = [tokenizer(instruction + ANSWER_PREFIX, add_special_tokens=False).input_ids
                + tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                for _, instruction, answer in examples[:16]]  # tokenized in SpeechLLM's parts
    assert sorted(tails) == sorted(expected)


def test_packed_loss_is_the_padded_batchs_loss_in_fewer_rows():
    """Packing changes the layout, not the computation: the same loss and gradients as right-padding every
    example, with attention kept within each (positions restart) and logits at the targets only."""
    torch.manual_seed(0)
    examples = lm_examples(40)
    tokenizer = train_tokenizer(examples, vocab_size=400)
    documents = Documents(examples, tokenizer, seed=0, augment=False)
    encoded = [documents.encode(example) for example in examples[:24]]
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         **ARCHITECTURE))
    length = max(len(ids) for ids, _ in encoded)
    padded = torch.full((len(encoded), length), tokenizer.pad_token_id)
    mask, labels = torch.zeros_like(padded), torch.full_like(padded, -100)
    for row, (ids, spoken) in enumerate(encoded):
        padded[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
        labels[row, spoken : len(ids)] = padded[row, spoken : len(ids)]
    expected = model(input_ids=padded, attention_mask=mask, labels=labels).loss
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    packed = pack(encoded, tokenizer.pad_token_id)
    assert packed[0].shape[0] < len(encoded)
    loss = _loss(model, *packed)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_as_many_random_word_strings_as_sentences_are_transcribed():
    examples = lm_examples(200)
    transcripts = [text for text, _, answer in examples if text == answer]  # transcription: answer = text
    sentences = {row["text"] for row in draw_texts("asr", 200, split="train")}
    random_strings = [text for text in transcripts if text not in sentences]
    assert len(transcripts) == 400 and len(random_strings) >= 195  # a random string may happen to be a sentence
    train_words = {word for text, _, answer in examples if text != answer for word in text.split()} | {
        word for text in sentences for word in text.split()}
    assert {word for text in random_strings for word in text.split()} <= train_words  # nothing from dev or test


def test_a_non_speech_clip_is_silence_only_and_speech_or_not_is_taught():
    examples = lm_examples(40)
    tokenizer = train_tokenizer(examples, vocab_size=400)
    silence = tokenizer.convert_tokens_to_ids(SILENCE)
    sounds = [example for example in examples if example[2] == "non-speech"]
    assert sounds and all(text == "" for text, _, _ in sounds)
    assert set(SpokenText(tokenizer)("", random.Random(0))) == {silence}
    assert {answer for _, _, answer in examples} >= {"speech", "non-speech", "male", "female"}


def test_a_demo_on_fewer_tasks_pretrains_its_lm_on_their_text_only():
    examples = lm_examples(50, tasks=("asr", "ic"))
    intents = {row["target"] for row in draw_texts("ic", 50, split="train")}
    answers = {answer for _, _, answer in examples}
    assert answers & intents and not answers & {"speech", "non-speech", "male", "female"}
    assert len(examples) == 150  # 50 transcripts, 50 intents, 50 random word strings


def test_the_lm_reads_every_tasks_held_out_phrasings_that_the_speech_stages_never_see():
    instructions = {instruction for _, instruction, _ in lm_examples(100)}
    registry = default_registry()
    for task in TEXT_TASKS + LABEL_TASKS:
        spec, rows = registry.get(task), draw_texts(task, 100, split="train")
        heldout = {spec.render(template, row) for template in spec.heldout_templates for row in rows}
        assert instructions & heldout, task  # the LM knows them: eval tests whether speech training keeps them
