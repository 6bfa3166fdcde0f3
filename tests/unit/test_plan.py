"""`speechllm plan` and the real presets: built on the meta device from their architecture values, the models
have the published parameter counts; trainable counts are the trained groups (LoRA by its formula); FSDP
shards what DDP replicates; the activation estimate matches what autograd saves; the CLI prints the table."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from omegaconf import OmegaConf
from transformers import WhisperConfig, WhisperModel

from speechllm import cli
from speechllm.config import ConfigError, load_config
from speechllm.model.speech_llm import SpeechLLM
from speechllm.plan import (
    Workload, _lora_layers, _lora_positions, _lora_stack, activation_bytes, build_on_meta, lora_parameters_expected,
    make_plan, sequence_lengths,
)
from tests.conftest import REPO, speechllm_command

WAVLM_T5 = "wavlm_large_flan_t5_xl"
WHISPER_QWEN = "whisper_large_v3_qwen2_7b"
# Published sizes: WavLM paper (Table 1) 316.62M; HF google/flan-t5-xl 2,849,757,184 (T5ForConditionalGeneration);
# HF openai/whisper-large-v3 1,543,490,560 of which ~0.64B encoder; HF Qwen/Qwen2.5-7B(-Instruct) 7,615,616,512.
WAVLM_LARGE = 316.62e6
FLAN_T5_XL = 2_849_757_184
WHISPER_LARGE_V3 = 1_543_490_560
WHISPER_LARGE_V3_ENCODER = 0.637e9
QWEN25_7B = 7_615_616_512


@pytest.fixture(scope="module")
def plans():
    return {name: make_plan(name) for name in (WAVLM_T5, WHISPER_QWEN)}


def test_wavlm_large_flan_t5_xl_has_the_published_sizes(plans):
    parameters = plans[WAVLM_T5].parameters
    assert parameters["encoder"] == pytest.approx(WAVLM_LARGE, rel=0.01)  # HF WavLMModel: 315,452,096
    assert parameters["llm"] == FLAN_T5_XL  # its own lm_head: transformers 5 would tie it to `shared`


def test_whisper_large_v3_qwen2_7b_has_the_published_sizes(plans):
    parameters = plans[WHISPER_QWEN].parameters
    assert parameters["encoder"] == pytest.approx(WHISPER_LARGE_V3_ENCODER, rel=0.01)
    assert parameters["llm"] == QWEN25_7B
    # The preset's architecture is the whole published Whisper model, decoder included.
    architecture = OmegaConf.to_object(load_config(None, [f"presets.model={WHISPER_QWEN}"]).model.encoder.architecture)
    with torch.device("meta"):
        whisper = WhisperModel(WhisperConfig(**architecture))
    assert sum(p.numel() for p in whisper.parameters()) == WHISPER_LARGE_V3


@pytest.mark.parametrize("preset", [WAVLM_T5, WHISPER_QWEN])
def test_trainable_parameters_are_the_trained_groups_and_lora_follows_its_formula(plans, preset):
    plan = plans[preset]
    p = plan.parameters
    assert plan.trained_groups == ["layer_weights", "downsampler", "projection", "lora"]
    assert plan.trainable_parameters == p["layer_weights"] + p["downsampler"] + p["projection"] + p["lora"]
    assert plan.total_parameters == plan.trainable_parameters + p["encoder"] + p["llm"]

    cfg = load_config(None, [f"presets.model={preset}"]).model
    model = build_on_meta(cfg)
    assert sum(q.numel() for q in model.parameters() if q.requires_grad) == plan.trainable_parameters
    assert p["lora"] == lora_parameters_expected(model)
    r, arch = cfg.lora.rank, cfg.llm.architecture
    if preset == WAVLM_T5:  # q and v (2048 -> 2048) in 24 encoder self-attentions, 24 decoder self- and cross-attentions
        assert p["lora"] == (24 * 2 + 24 * 4) * r * (2048 + 2048)
        encoder_layers, width = 24 + 1, 1024
    else:  # q, o: 3584 -> 3584; k, v: 3584 -> 4 kv heads x 128
        kv = arch.num_key_value_heads * arch.hidden_size // arch.num_attention_heads
        assert p["lora"] == arch.num_hidden_layers * r * (2 * (3584 + 3584) + 2 * (3584 + kv))
        encoder_layers, width = 32 + 1, 1280
    d = cfg.downsampler
    assert p["layer_weights"] == encoder_layers
    assert p["downsampler"] == d.kernel_size * width * d.channels + d.channels + (d.num_layers - 1) * (
        d.kernel_size * d.channels * d.channels + d.channels)
    llm_width = arch.get("d_model") or arch.get("hidden_size")
    assert p["projection"] == d.channels * llm_width + 2 * llm_width  # linear and bias, then the norm's gain


def test_a_stage_file_trains_only_the_groups_its_phases_name():
    plan = make_plan("stages/stage1.yaml", [f"presets.model={WAVLM_T5}"])
    assert plan.trained_groups == ["layer_weights", "downsampler", "projection"]
    assert plan.trainable_parameters == plan.total_parameters - sum(plan.parameters[g] for g in ("encoder", "llm", "lora"))
    with_lora = make_plan(WAVLM_T5)
    assert plan.memory["ddp"]["optimizer_states"] < with_lora.memory["ddp"]["optimizer_states"]


@pytest.mark.parametrize("preset", [WAVLM_T5, WHISPER_QWEN])
def test_fsdp_shards_what_ddp_replicates(preset):
    sharded_items = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")
    plans = {n: make_plan(preset, workload=Workload(devices=n)) for n in (1, 2, 8)}
    sharded = {n: sum(p.memory["fsdp"][k] for k in sharded_items) for n, p in plans.items()}
    for n, plan in plans.items():
        ddp, fsdp = plan.memory["ddp"], plan.memory["fsdp"]
        assert ddp == plans[1].memory["ddp"]  # DDP replicates: the device count changes nothing
        assert fsdp["activations"] == ddp["activations"] > 0  # activations are per device batch either way
        assert fsdp["gathered_weights"] == plans[1].memory["fsdp"]["gathered_weights"] > 0
        assert sharded[n] == pytest.approx(sharded[1] / n, rel=1e-6)
        if n >= 2:
            assert fsdp["total"] < ddp["total"]
    # Each of 8 FSDP devices holds an eighth of the frozen weights every DDP device holds.
    ddp, fsdp = plans[8].memory["ddp"], plans[8].memory["fsdp"]
    assert fsdp["frozen_weights"] * 8 == pytest.approx(ddp["frozen_weights"], rel=1e-6)


def test_activations_scale_with_the_batch_and_shrink_with_gradient_checkpointing():
    small, large = (make_plan(WHISPER_QWEN, workload=Workload(batch_size=b)) for b in (2, 4))
    for key in ("encoder_forward", "encoder_hidden_states", "adapter", "llm_layers", "logits"):
        assert large.activations[key] == 2 * small.activations[key] > 0
    checkpointed = make_plan(WHISPER_QWEN, workload=Workload(batch_size=4, gradient_checkpointing=True))
    assert checkpointed.activations["llm_layers"] < large.activations["llm_layers"] / 5
    assert checkpointed.memory["ddp"]["total"] < large.memory["ddp"]["total"]
    full_precision = make_plan(WHISPER_QWEN, workload=Workload(batch_size=4, precision="32-true"))
    assert full_precision.memory["ddp"]["frozen_weights"] == 2 * large.memory["ddp"]["frozen_weights"]


def test_logits_are_planned_for_the_targets_or_one_loss_chunk():
    """Decoder-only logits exist only where targets are predicted (96 target tokens + eos per example, not the
    audio and prompt positions); with model.llm.loss_chunk_tokens, for one chunk of them at a time."""
    vocab, per_element = 152064, 2 + 4 + 4  # Qwen2.5-7B; bf16 logits, their fp32 copy, fp32 log-softmax
    whole = make_plan(WHISPER_QWEN, workload=Workload(batch_size=4))
    assert whole.activations["logits"] == 4 * 97 * vocab * per_element
    chunked = make_plan(WHISPER_QWEN, ["model.llm.loss_chunk_tokens=128"], workload=Workload(batch_size=4))
    assert chunked.activations["logits"] == 128 * vocab * per_element
    assert whole.memory["ddp"]["total"] - chunked.memory["ddp"]["total"] == (4 * 97 - 128) * vocab * per_element


def _saved_bytes(model, forward) -> int:
    """Bytes autograd saves for the backward pass during `forward` (each storage once, parameters left out)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def _small(preset: str, *overrides: str):
    """The real preset at toy width (same structure, keys and LoRA targets), random weights on the CPU, bf16."""
    cfg = load_config(None, [f"presets.model={preset}", "model.encoder.pretrained=null", "model.llm.pretrained=null",
                             "model.llm.tokenizer=byt5", "model.downsampler.channels=32", *overrides])
    model = SpeechLLM(cfg.model)
    model.llm.to(torch.bfloat16)
    return cfg, model.train()


QWEN_SMALL = ["model.llm.architecture.hidden_size=128", "model.llm.architecture.intermediate_size=352",
              "model.llm.architecture.num_hidden_layers=3", "model.llm.architecture.num_attention_heads=4",
              "model.llm.architecture.num_key_value_heads=2", "model.llm.architecture.vocab_size=512",
              "model.encoder.architecture.d_model=32", "model.encoder.architecture.encoder_layers=2",
              "model.encoder.architecture.encoder_attention_heads=2", "model.encoder.architecture.encoder_ffn_dim=64",
              "model.encoder.architecture.decoder_layers=1"]
T5_SMALL = ["model.llm.architecture.d_model=128", "model.llm.architecture.d_kv=32", "model.llm.architecture.d_ff=320",
            "model.llm.architecture.num_layers=3", "model.llm.architecture.num_decoder_layers=3",
            "model.llm.architecture.num_heads=4", "model.llm.architecture.vocab_size=512",
            # CPU attention with dropout falls back to materialised scores; GPU kernels fuse it (the plan's case).
            "model.llm.architecture.dropout_rate=0.0",
            "model.encoder.architecture.hidden_size=32", "model.encoder.architecture.num_hidden_layers=2",
            "model.encoder.architecture.num_attention_heads=2", "model.encoder.architecture.intermediate_size=64",
            "model.encoder.architecture.conv_dim=[16,16,16,16,16,16,16]"]


@pytest.mark.parametrize("lora_rank", [0, 16])
def test_decoder_only_activation_estimate_matches_what_autograd_saves(lora_rank):
    cfg, model = _small(WHISPER_QWEN, *QWEN_SMALL, f"model.lora.rank={lora_rank}")
    positions = 300
    embeds = torch.randn(1, positions, 128, dtype=torch.bfloat16, requires_grad=True)
    measured = _saved_bytes(model, lambda: model.llm(inputs_embeds=embeds))
    trained = ["layer_weights", "downsampler", "projection"] + (["lora"] if lora_rank else [])
    sequence = {"encoder_frames": 1500, "audio_positions": 250, "llm_positions": positions}
    estimate = activation_bytes(model, cfg.model, trained, Workload(batch_size=1, precision="bf16-true"), sequence)
    # CPU dropout keeps its mask in the input dtype (2 bytes per element), CUDA's in bool (1 byte, as estimated).
    cpu_masks = sum(positions * m.in_features for n, m in model.llm.named_modules() if n.endswith("lora_A.default"))
    assert estimate["llm_layers"] + cpu_masks == pytest.approx(measured, rel=0.08)


def test_t5_activation_estimate_matches_what_autograd_saves():
    cfg, model = _small(WAVLM_T5, *T5_SMALL, "model.lora.rank=0")
    encoder_positions, decoder_positions = 300, 60
    embeds = torch.randn(1, encoder_positions, 128, dtype=torch.bfloat16, requires_grad=True)
    decoder_ids = torch.zeros(1, decoder_positions, dtype=torch.long)
    measured = _saved_bytes(model, lambda: model.llm(inputs_embeds=embeds, decoder_input_ids=decoder_ids))
    sequence = {"encoder_frames": 100, "audio_positions": 25, "llm_encoder_positions": encoder_positions,
                "llm_decoder_positions": decoder_positions}
    estimate = activation_bytes(model, cfg.model, ["projection"], Workload(batch_size=1, precision="bf16-true"), sequence)
    assert estimate["llm_layers"] == pytest.approx(measured, rel=0.08)


@pytest.mark.parametrize("preset, small", [(WAVLM_T5, T5_SMALL), (WHISPER_QWEN, QWEN_SMALL)])
def test_a_training_forward_saves_what_the_plan_estimates(preset, small):
    """The whole SpeechLLM forward (fp32): encoder hidden states, downsampler, projection, LLM with LoRA, logits."""
    cfg, model = _small(preset, *small, "model.lora.rank=8")
    model.llm.float()
    batch, seconds, instruction, target = 2, 6.0, "x" * 20, "y" * 40
    wave = torch.randn(batch, int(seconds * 16000))
    measured = _saved_bytes(model, lambda: model(wave, torch.ones_like(wave, dtype=torch.bool), [instruction] * batch,
                                                 [target] * batch))
    if model.is_seq2seq:
        prompt = len(instruction) + 1  # + eos; byte-level tokens
    else:
        texts = (cfg.model.llm.prompt_prefix, instruction, cfg.model.llm.answer_prefix)
        prompt = sum(len(model._token_ids(text)) for text in texts)
    workload = Workload(batch_size=batch, seconds=seconds, prompt_tokens=prompt, target_tokens=len(target),
                        precision="32-true")
    sequence = sequence_lengths(model, workload)
    estimate = activation_bytes(model, cfg.model, ["layer_weights", "downsampler", "projection", "lora"], workload,
                                sequence)
    saved = sum(estimate[k] for k in ("encoder_hidden_states", "adapter", "llm_layers", "logits"))
    assert saved + _cpu_dropout_masks(model, sequence, batch) == pytest.approx(measured, rel=0.1)


def _cpu_dropout_masks(model, sequence, batch) -> int:
    """What the plan leaves out because it counts GPU kernels: ATen's CPU dropout keeps its mask in the input
    dtype (fp32 here), the GPU's in 1 byte, for each LoRA adapter's dropped-out input."""
    return batch * sum(_lora_positions(model, name, _lora_stack(model, name), sequence) * module.in_features * (4 - 1)
                       for name, module, _, dropout in _lora_layers(model) if dropout)


@pytest.mark.parametrize("preset, small", [(WAVLM_T5, T5_SMALL), (WHISPER_QWEN, QWEN_SMALL)])
def test_preset_architecture_values_are_safe_overrides_for_from_pretrained(tmp_path, preset, small):
    """A checkpoint of the preset's structure loads with the preset's values as overrides and every weight intact
    (transformers 5 rejects a bare rope_theta; tie_word_embeddings=False would leave T5's embeddings random)."""
    cfg, model = _small(preset, *small, "model.lora.rank=0")
    model.encoder.model.save_pretrained(tmp_path / "encoder")
    model.llm.save_pretrained(tmp_path / "llm")
    reloaded = SpeechLLM(load_config(None, [f"presets.model={preset}", *small, "model.downsampler.channels=32",
                                            f"model.encoder.pretrained={tmp_path / 'encoder'}",
                                            f"model.llm.pretrained={tmp_path / 'llm'}", "model.llm.tokenizer=byt5",
                                            "model.lora.rank=0"]).model)
    for part in ("encoder", "llm"):
        saved, loaded = getattr(model, part).state_dict(), getattr(reloaded, part).state_dict()
        assert saved.keys() == loaded.keys()
        for name in saved:
            assert torch.equal(saved[name].float(), loaded[name].float()), f"{part}: {name} was not loaded"
    head, embeddings = reloaded.llm.get_output_embeddings(), reloaded.llm.get_input_embeddings()
    assert (head.weight is embeddings.weight) == bool(cfg.model.llm.architecture.tie_word_embeddings)


def test_planning_needs_no_hub_and_no_weights(monkeypatch):
    from speechllm.model import encoder, llm

    def no_download(*args, **kwargs):
        raise AssertionError("plan tried to load a pretrained model")

    monkeypatch.setattr(encoder, "from_pretrained", no_download)
    monkeypatch.setattr(llm, "from_pretrained", no_download)
    model = build_on_meta(load_config(None, [f"presets.model={WHISPER_QWEN}"]).model)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_a_preset_without_architecture_values_cannot_be_planned(tmp_path):
    preset = tmp_path / "hub_only.yaml"
    preset.write_text("llm: {kind: causal, pretrained: Qwen/Qwen2.5-7B-Instruct}\n")
    with pytest.raises(ConfigError, match="model.llm.architecture: needs model_type"):
        make_plan(str(preset))
    with pytest.raises(ConfigError, match="longer than the Whisper window"):
        make_plan(WHISPER_QWEN, workload=Workload(seconds=31))


def test_plan_command_prints_the_table():
    table = subprocess.run(speechllm_command("plan", WHISPER_QWEN, "--devices", "4"), cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, "COLUMNS": "160"}, timeout=120)
    assert table.returncode == 0, table.stderr
    for text in ("7,615,616,512", "636,968,960", "trainable", "DDP", "FSDP (4 devices)", "activations", "Assumptions"):
        assert text in table.stdout


def test_plan_command_writes_json(capsys):
    assert cli.main(["plan", str(REPO / f"configs/model/{WAVLM_T5}.yaml"), "--json", "--batch-size", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["parameters"]["llm"] == FLAN_T5_XL and plan["workload"]["batch_size"] == 2
    assert plan["memory_bytes"]["fsdp"]["total"] < plan["memory_bytes"]["ddp"]["total"]
    assert cli.main(["plan", WAVLM_T5, "--precision", "fp8"]) == 2
    assert "--precision: 'fp8' is not one of" in capsys.readouterr().err
