"""The model stack: masks and shapes, padding invariance, loss masking, learning, generation."""

from __future__ import annotations

import pytest
import torch

from speechllm.config import ConfigError
from speechllm.model.downsampler import ConvDownsampler
from speechllm.model.llm import switch_off_untrained_adapters
from speechllm.model.speech_llm import IGNORE_INDEX, SpeechLLM
from tests.conftest import record_adapter_calls, tiny_config

LENGTHS = [16000, 12345, 7001]  # odd sample counts: frame and downsampled lengths do not divide evenly


def _padded_batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    waves = [torch.randn(n, generator=gen) * 0.1 for n in lengths]
    wave = torch.zeros(len(waves), max(lengths))
    mask = torch.zeros(len(waves), max(lengths), dtype=torch.bool)
    for i, w in enumerate(waves):
        wave[i, : w.numel()], mask[i, : w.numel()] = w, True
    return waves, wave, mask


@pytest.fixture(scope="module", params=["tiny", "tiny_t5"])
def model(request) -> SpeechLLM:
    torch.manual_seed(0)
    return SpeechLLM(tiny_config(request.param).model).eval()


def test_downsampler_mask_matches_conv_output_lengths():
    down = ConvDownsampler(8, 16, num_layers=2, kernel_size=3, stride=2)
    frames = torch.randn(3, 49, 8)
    mask = torch.arange(49)[None] < torch.tensor([49, 25, 1])[:, None]
    out, out_mask = down(frames, mask)
    # 49 -> 25 -> 13; 25 -> 13 -> 7; 1 -> 1 -> 1 (kernel 3, stride 2, padding 1)
    assert out.shape == (3, 13, 16)
    assert out_mask.sum(-1).tolist() == [13, 7, 1]


def test_audio_embeddings_enter_the_llm_at_the_scale_of_its_token_embeddings(model):
    """However large the downsampled frames, what the frozen LLM reads has its token embeddings' RMS."""
    token_rms = model.llm.get_input_embeddings().weight.pow(2).mean().sqrt()
    for scale in (0.01, 1.0, 100.0):
        frames = torch.randn(2, 7, model.downsampler.convs[-1].out_channels) * scale
        with torch.no_grad():
            audio = model.projection(frames)
        assert torch.allclose(audio.pow(2).mean(-1).sqrt(), token_rms.expand(2, 7), rtol=1e-3), scale


def test_padded_example_matches_unpadded(model):
    waves, wave, mask = _padded_batch(LENGTHS)
    with torch.no_grad():
        batch_emb, batch_mask = model.encode_audio(wave, mask)
        for i, w in enumerate(waves):
            alone, alone_mask = model.encode_audio(w[None], torch.ones(1, w.numel(), dtype=torch.bool))
            n = int(alone_mask.sum())
            assert int(batch_mask[i].sum()) == n
            torch.testing.assert_close(batch_emb[i, :n], alone[0, :n], atol=1e-5, rtol=1e-4)
    # 4x downsampling of a 50 Hz encoder: one second of audio -> about 12.5 frames
    assert int(batch_mask[0].sum()) in (12, 13)


def test_padded_example_has_same_loss_as_alone(model):
    waves, wave, mask = _padded_batch(LENGTHS)
    instructions = ["transcribe the audio", "what is said?", "write it down"]
    targets = ["hello world", "yes", "turn on the lights"]
    with torch.no_grad():
        batch = model(wave, mask, instructions, targets).example_losses
        for i, w in enumerate(waves):
            alone = model(w[None], torch.ones(1, w.numel(), dtype=torch.bool), [instructions[i]], [targets[i]])
            torch.testing.assert_close(batch[i], alone.example_losses[0], atol=1e-4, rtol=1e-4)


def test_input_assembly_does_batch_sized_device_work_once(model):
    """One embedding lookup and no boolean-mask gathers (a GPU sync each) however many examples: per-example
    device work made the LLM step of a 0.5B model wait on the CPU (BENCHMARKS.md, GPU)."""
    counts = []
    for size in (2, 12):
        waves, wave, mask = _padded_batch([7001 + 900 * i for i in range(size)])
        with torch.no_grad():
            audio, audio_mask = model.encode_audio(wave, mask)
            with torch.profiler.profile() as prof:
                model.build_inputs(audio, audio_mask, ["say it"] * size, ["ok"] * size)
        names = [event.name for event in prof.events()]
        counts.append((names.count("aten::embedding"), names.count("aten::nonzero"), names.count("aten::index")))
    assert counts == [(1, 0, 0), (1, 0, 0)]


def test_llm_runs_without_cudnn_attention(model):
    """cuDNN's SDPA is off while the LLM runs, in training and in generation, and on again after it."""
    seen = []
    handle = model.llm.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        _, wave, mask = _padded_batch(LENGTHS[:2])
        with torch.no_grad():
            model(wave, mask, ["say it", "say it"], ["ok", "no"])
            model.generate(wave, mask, ["say it", "say it"], max_new_tokens=2)
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_loss_reaches_only_target_tokens(model):
    """Gradients of the loss reach target positions only: prompt, audio, instruction and padding get none."""
    _, wave, mask = _padded_batch(LENGTHS[:2])
    audio, audio_mask = model.encode_audio(wave, mask)
    inputs = model.build_inputs(audio, audio_mask, ["a long instruction to transcribe", "hi"], ["abc", "de"])
    logits_seen = {}

    def keep_logits(_module, _args, output):
        output.logits.retain_grad()
        logits_seen["logits"] = output.logits

    handle = model.llm.register_forward_hook(keep_logits)
    try:
        model.eval()
        out = model(wave, mask, ["a long instruction to transcribe", "hi"], ["abc", "de"])
        out.loss.backward()
    finally:
        handle.remove()
    grad = logits_seen["logits"].grad.abs().sum(-1)  # (B, positions with logits)
    labels = inputs.labels
    if model.is_seq2seq:  # encoder-decoder predicts label t at position t
        target_positions, predicting = labels != IGNORE_INDEX, grad
    else:  # decoder-only: logits only where a target is predicted, the last len("abc") + eos positions
        assert grad.shape[1] == len("abc") + 1 + 1
        target_positions, predicting = labels[:, -(len("abc") + 1):] != IGNORE_INDEX, grad[:, :-1]
        full = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                         position_ids=inputs.position_ids).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(full.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(out.loss, expected)  # the same loss as from every position's logits
    assert (predicting[target_positions] > 0).all()
    assert (predicting[~target_positions] == 0).all()
    assert int((labels != IGNORE_INDEX).sum()) == len("abc") + 1 + len("de") + 1  # byte tokens + eos each


def test_chunked_loss_equals_the_whole_loss_without_keeping_any_logits():
    """model.llm.loss_chunk_tokens: the same loss, per-example losses and gradients, while autograd keeps no
    (tokens x vocabulary) tensor for the backward pass; chunks of 3 over 12 + 4 + 19 target tokens leave a
    ragged last chunk."""
    _, wave, mask = _padded_batch(LENGTHS)
    instructions = ["transcribe the audio", "what is said?", "write it down"]
    targets = ["hello world", "yes", "turn on the lights"]
    results = []
    for chunk in (0, 3):
        torch.manual_seed(0)
        model = SpeechLLM(tiny_config("tiny", f"model.llm.loss_chunk_tokens={chunk}").model).eval()
        vocab = model.llm.get_output_embeddings().out_features
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
            out = model(wave, mask, instructions, targets)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads, [shape for shape in kept if shape[-1:] == (vocab,)]))
    (whole, whole_grads, whole_logits), (chunked, chunked_grads, chunked_logits) = results
    torch.testing.assert_close(chunked.loss, whole.loss)
    torch.testing.assert_close(chunked.example_losses, whole.example_losses)
    assert chunked.target_tokens.tolist() == whole.target_tokens.tolist() == [12, 4, 19]
    assert whole_grads.keys() == chunked_grads.keys() and any(n.endswith("lora_A.default.weight") for n in whole_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, msg=name)
    assert whole_logits and not chunked_logits  # the whole loss keeps (3 x 19, vocab) fp32 rows; chunks keep none


def test_chunked_loss_refuses_what_it_cannot_compute():
    with pytest.raises(ConfigError, match="loss_chunk_tokens: decoder-only LLMs only"):
        tiny_config("tiny_t5", "model.llm.loss_chunk_tokens=8")
    with pytest.raises(ConfigError, match="loss_chunk_tokens: -1 must be 0"):
        tiny_config("tiny", "model.llm.loss_chunk_tokens=-1")
    # Gemma 2 soft-caps its logits after the LM head, which a loss applying the head itself would skip.
    gemma = tiny_config("tiny", "model.llm.loss_chunk_tokens=8", "model.llm.architecture.model_type=gemma2",
                        "model.llm.architecture.head_dim=24", "model.llm.attn_implementation=eager")
    with pytest.raises(ConfigError, match=r"Gemma2ForCausalLM transforms its logits .*final_logit_softcapping=30"):
        SpeechLLM(gemma.model)


@pytest.mark.parametrize("preset, dtype", [("tiny", torch.bfloat16), ("tiny_t5", torch.float16)])
def test_mixed_precision_stores_frozen_weights_in_its_dtype_and_trains_in_fp32(preset, dtype):
    """What a GPU run under bf16-/16-mixed does before training (SpeechLLMModule.setup): the frozen encoder and LLM
    weights go to autocast's dtype, as from_pretrained(dtype=...) would load them. What trains, the LLM's buffers
    (RoPE) and the modules HF keeps in fp32 (T5's `wo` under fp16) stay fp32, and the loss is autocast's."""
    _, wave, mask = _padded_batch(LENGTHS)
    instructions, targets = ["transcribe", "what is said?", "intent"], ["hello world", "yes", "lights_on"]
    losses = []
    for cast in (False, True):
        torch.manual_seed(0)
        model = SpeechLLM(tiny_config(preset).model).eval()
        if cast:
            model.store_frozen_weights_in(dtype)
        with torch.autocast("cpu", dtype=dtype):
            out = model(wave, mask, instructions, targets)
        out.loss.backward()
        losses.append(out.loss.item())
    trained = {p for group in model.trainable_groups().values() for p in group.values()}
    frozen = {n: p.dtype for n, p in model.named_parameters() if p not in trained}
    kept_fp32 = {n for n in frozen if ".wo." in n} if preset == "tiny_t5" else set()
    assert {n for n, d in frozen.items() if d == torch.float32} == kept_fp32
    assert {d for n, d in frozen.items() if n not in kept_fp32} == {dtype}
    assert {p.dtype for p in trained} == {torch.float32}
    assert {b.dtype for b in model.llm.buffers() if b.is_floating_point()} <= {torch.float32}
    lora = model.trainable_groups()["lora"].values()
    assert lora and all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    assert losses[1] == pytest.approx(losses[0], rel=5e-3)  # 0.08% apart: a bf16 residual stream


def test_adapters_that_never_trained_are_switched_off_without_changing_loss_or_gradients():
    """Stage 1 does not train LoRA, whose B matrices are still zero: switched off, the adapters' code no longer runs
    and the loss and every gradient stay the same to the bit. Adapters that have trained are never switched off."""
    _, wave, mask = _padded_batch(LENGTHS)
    instructions, targets = ["transcribe", "what is said?", "write it down"], ["hello world", "yes", "lights on"]
    torch.manual_seed(0)
    model = SpeechLLM(tiny_config("tiny").model).eval()
    lora = model.trainable_groups()["lora"]
    for param in lora.values():
        param.requires_grad_(False)  # as in stage 1
    adapter_calls = record_adapter_calls(model)
    results = []
    for switch_off in (False, True):
        if switch_off:
            assert switch_off_untrained_adapters(model.llm)
        adapter_calls.clear()
        model.zero_grad(set_to_none=True)
        out = model(wave, mask, instructions, targets)
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        len(adapter_calls)))
    (loss_on, grads_on, calls_on), (loss_off, grads_off, calls_off) = results
    assert calls_on > 0 and calls_off == 0
    assert torch.equal(loss_off, loss_on) and grads_on.keys() == grads_off.keys() and len(grads_on) > 5
    assert all(torch.equal(grads_off[n], g) for n, g in grads_on.items())
    torch.manual_seed(0)
    trained = SpeechLLM(tiny_config("tiny").model)
    next(p for n, p in trained.trainable_groups()["lora"].items() if "lora_B" in n).data.fill_(0.01)
    assert not switch_off_untrained_adapters(trained.llm)


def test_instruction_text_never_appears_in_labels(model):
    _, wave, mask = _padded_batch(LENGTHS[:2])
    audio, audio_mask = model.encode_audio(wave, mask)
    inputs = model.build_inputs(audio, audio_mask, ["INSTRUCTION", "INSTRUCTION"], ["yes", "no"])
    decoded = [model.tokenizer.decode([t for t in row.tolist() if t != IGNORE_INDEX]) for row in inputs.labels]
    assert [d.replace(model.tokenizer.eos_token, "") for d in decoded] == ["yes", "no"]


@pytest.mark.parametrize("preset", ["tiny", "tiny_t5"])
def test_overfits_one_batch(preset):
    torch.manual_seed(0)
    model = SpeechLLM(tiny_config(preset).model)
    trainable = [p for group in ("layer_weights", "downsampler", "projection", "lora")
                 for p in model.trainable_groups()[group].values()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    _, wave, mask = _padded_batch(LENGTHS)
    args = (wave, mask, ["transcribe"] * 3, ["one two", "three", "four five six"])
    losses = []
    for _ in range(30):
        loss = model(*args).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_generate_emits_only_ids_the_tokenizer_can_decode():
    """An LLM that embeds more rows than its tokenizer has tokens (a padded vocabulary; the realistic preset's
    byte tokenizer on 151,936 rows) never generates one of the extra ids: decoding them failed."""
    torch.manual_seed(0)
    model = SpeechLLM(tiny_config("tiny", "model.llm.architecture.vocab_size=4000").model).eval()
    assert model.llm.get_input_embeddings().num_embeddings > len(model.tokenizer)
    emitted = []
    generate = model.llm.generate
    model.llm.generate = lambda **kwargs: emitted.append(generate(**kwargs)) or emitted[-1]
    _, wave, mask = _padded_batch(LENGTHS)
    with torch.inference_mode():
        answers = model.generate(wave, mask, ["say it"] * 3, max_new_tokens=12)
    assert len(answers) == 3 and emitted[0].shape[1] == 12 and emitted[0].max() < len(model.tokenizer)


def test_generate_batched_equals_alone(model):
    waves, wave, mask = _padded_batch(LENGTHS)
    instructions = ["transcribe", "what is said", "repeat"]
    batched = model.generate(wave, mask, instructions, max_new_tokens=6)
    alone = [model.generate(w[None], torch.ones(1, w.numel(), dtype=torch.bool), [instructions[i]], max_new_tokens=6)[0]
             for i, w in enumerate(waves)]
    assert batched == alone
    assert len(model.generate(wave, mask, instructions, max_new_tokens=6, num_beams=3)) == 3


def test_frozen_parts_do_not_require_grad(model):
    assert not any(p.requires_grad for p in model.encoder.parameters())
    lora = set(model.trainable_groups()["lora"].values())
    assert lora and not any(p.requires_grad for p in model.llm.parameters() if p not in lora)
