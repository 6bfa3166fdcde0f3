"""Speed and memory options from config: precision, attention kernel, gradient checkpointing, torch.compile,
the FSDP strategy object, and validation batches that every rank can run in step."""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest
import torch

from speechllm.config import ConfigError, load_config
from speechllm.data.sampler import DurationBatchSampler
from speechllm.model.llm import decoder_layers
from speechllm.model.speech_llm import SpeechLLM
from speechllm.training.module import SpeechLLMModule
from speechllm.training.stage_scheduler import StagePlan
from speechllm.training.strategy import SpeechFSDPStrategy, build_strategy
from tests.conftest import REPO, tiny_config


@pytest.mark.parametrize("overrides, key", [
    (["trainer.precision=fp8"], "trainer.precision"),
    (["trainer.precision=16-true"], "trainer.precision"),
    (["trainer.strategy=deepspeed"], "trainer.strategy"),
    (["trainer.fsdp.sharding_strategy=HYBRID_SHARD"], "trainer.fsdp.sharding_strategy"),
    (["model.llm.attn_implementation=fast"], "model.llm.attn_implementation"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    (["trainer.strategy=fsdp", "eval.generate=true"], "eval.generate"),
])
def test_unsupported_option_is_a_one_line_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        tiny_config("tiny", *overrides)
    assert str(error.value).startswith(f"{key}: ") and "\n" not in str(error.value)


def test_float16_mixed_precision_on_cpu_is_refused_with_the_alternative():
    with pytest.raises(ConfigError, match=r"^trainer.precision: 16-mixed needs a GPU .* use bf16-mixed"):
        tiny_config("tiny", "trainer.accelerator=cpu", "trainer.precision=16-mixed")
    assert tiny_config("tiny", "trainer.precision=32").trainer.precision == "32"  # Lightning's alias of 32-true


@pytest.mark.parametrize("preset, override, expected", [
    ("tiny", None, "sdpa"),
    ("tiny", "model.llm.attn_implementation=eager", "eager"),
    ("tiny_t5", None, "sdpa"),
])
def test_attention_implementation_reaches_the_hf_model(preset, override, expected):
    model = SpeechLLM(tiny_config(preset, *([override] if override else [])).model)
    assert model.llm.get_base_model().config._attn_implementation == expected


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_unavailable_attention_kernel_is_a_config_error_naming_the_key():
    cfg = tiny_config("tiny", "model.llm.attn_implementation=flash_attention_2")
    with pytest.raises(ConfigError, match=r"^model.llm.attn_implementation: flash_attention_2 cannot be used here"):
        SpeechLLM(cfg.model)


def _loss_and_grads(model: SpeechLLM) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and the gradients of every trainable group, LoRA included."""
    model.train()
    for params in model.trainable_groups().values():
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
    gen = torch.Generator().manual_seed(0)
    wave = torch.randn(2, 16000, generator=gen) * 0.1
    mask = torch.ones(2, 16000, dtype=torch.bool)
    mask[1, 11000:] = False
    out = model(wave, mask, ["transcribe the audio", "what is said?"], ["hello world", "yes"])
    out.loss.backward()
    grads = {n: p.grad.clone() for g in model.trainable_groups().values() for n, p in g.items()}
    return out.loss.detach(), grads


def _count_layer_work(model: SpeechLLM) -> list[int]:
    """Per LLM layer, how many of its submodules run (HF checkpointing recomputes inside `forward`)."""
    counts = [0] * len(decoder_layers(model.llm))
    for i, layer in enumerate(decoder_layers(model.llm)):
        for sub in list(layer.modules())[1:]:
            sub.register_forward_pre_hook(lambda module, args, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("preset", ["tiny", "tiny_t5"])
def test_gradient_checkpointing_recomputes_llm_layers_and_gives_the_same_loss_and_gradients(preset):
    torch.manual_seed(0)
    plain = SpeechLLM(tiny_config(preset, "model.lora.dropout=0.0").model)
    torch.manual_seed(0)
    checkpointed = SpeechLLM(tiny_config(preset, "model.lora.dropout=0.0", "model.llm.gradient_checkpointing=true").model)
    work, work_ckpt = _count_layer_work(plain), _count_layer_work(checkpointed)
    loss, grads = _loss_and_grads(plain)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed)
    assert len(work) >= 2 and all(c > w > 0 for c, w in zip(work_ckpt, work)), "layers run again in the backward pass"
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and any("lora_B" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for n, g in grads_ckpt.items() if "lora_A" not in n)  # B starts at 0: A gets none


def test_compiled_llm_layers_give_the_same_loss_and_gradients_and_keep_parameter_names():
    cfg = tiny_config("tiny", "model.lora.dropout=0.0", "trainer.compile=true")
    torch.manual_seed(0)
    eager = SpeechLLMModule(cfg, StagePlan(cfg), [])
    torch.manual_seed(0)
    compiled = SpeechLLMModule(cfg, StagePlan(cfg), [])
    compiled.configure_model()  # what Lightning calls before the strategy wraps the model
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(compiled.model.llm))
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    loss, grads = _loss_and_grads(eager.model)
    loss_compiled, grads_compiled = _loss_and_grads(compiled.model)
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_compiled[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_fsdp_strategy_shards_llm_layers_and_gives_each_trained_module_its_own_unit():
    cfg = tiny_config("tiny", "trainer.strategy=fsdp", "trainer.fsdp.sharding_strategy=SHARD_GRAD_OP")
    assert build_strategy(tiny_config("tiny", "trainer.strategy=ddp").trainer, None) == "ddp"
    model = SpeechLLM(cfg.model)
    for params in model.trainable_groups().values():  # what StageScheduler.setup does before the wrapping
        for p in params.values():
            p.requires_grad_(True)
    strategy = build_strategy(cfg.trainer, model)
    assert isinstance(strategy, SpeechFSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trained parameters share units
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP" and strategy._state_dict_type == "full"
    own_unit = strategy.kwargs["auto_wrap_policy"]._lambda_fn
    units = {name for name, module in model.named_modules() if own_unit(module)}
    layers = {name for name, module in model.named_modules() if type(module).__name__ == "Qwen2DecoderLayer"}
    lora = {name for name, module in model.named_modules() if ".lora_A.default" in name or ".lora_B.default" in name}
    trained = {"layer_weights", "projection.linear", "projection.norm", "downsampler.convs.0", "downsampler.convs.1"}
    assert len(layers) == 2 and len(lora) == 8
    assert units == layers | lora | trained  # frozen encoder, embeddings and norms stay in the root unit
    assert not any(name.startswith("encoder") for name in units)


@pytest.mark.parametrize("examples, world_size, max_batch_size", [(23, 2, 4), (7, 3, None), (5, 2, 1), (11, 4, 1)])
def test_every_rank_gets_the_same_number_of_validation_batches(examples, world_size, max_batch_size):
    """Under FSDP every forward pass is a collective: a rank with one batch more would wait forever."""
    durations = [1.0 + (i * 7919 % 13) / 4 for i in range(examples)]
    ranks = [list(DurationBatchSampler(durations, max_batch_seconds=8.0, max_batch_size=max_batch_size, rank=r,
                                       world_size=world_size)) for r in range(world_size)]
    assert len({len(batches) for batches in ranks}) == 1
    assert sorted(i for batches in ranks for batch in batches for i, _ in batch) == list(range(examples))


def test_slurm_script_starts_one_rank_per_task_on_every_node_with_valid_overrides(tmp_path):
    script = REPO / "scripts/slurm/train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake_srun = tmp_path / "srun"
    fake_srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    fake_srun.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": "/project"}
    result = subprocess.run(["bash", str(script), "stages/stage2.yaml", "trainer.strategy=fsdp"], env=env,
                            capture_output=True, text=True, check=True)
    program, command, stage, *overrides = result.stdout.splitlines()
    assert (program, command, stage) == ("/project/.venv/bin/speechllm", "train", "stages/stage2.yaml")
    assert overrides == ["presets.trainer=gpu", "trainer.devices=8", "trainer.num_nodes=2", "trainer.strategy=fsdp"]
    cfg = load_config(REPO / stage, overrides)  # what every rank will run: a valid configuration
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (8, 2, "fsdp")
    assert load_config(REPO / stage, ["presets.trainer=fsdp"]).trainer.precision == "bf16-mixed"
