"""Scale options in real runs: gradient accumulation across a phase switch, bf16 mixed precision, and FSDP
over two CPU processes (gloo) that trains, checkpoints and resumes like DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, run_overrides, stored_dtypes
from speechllm.config import load_config
from speechllm.data.audio import load_audio
from speechllm.data.tasks import default_registry
from speechllm.evaluation import evaluate
from speechllm.model import speech_llm
from speechllm.model.llm import decoder_layers
from speechllm.training.checkpoints import META_KEY
from speechllm.training.module import SpeechLLMModule
from speechllm.training.run import train
from test_curriculum import ALIGN, align_then_lora, load_ckpt, metrics_rows, write_stage


def record_training_steps(monkeypatch) -> list[dict]:
    """What each training_step call (one micro-batch) saw: the optimizer step, the batch's tasks, autocast."""
    seen: list[dict] = []
    training_step = SpeechLLMModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.append({"step": self.global_step, "tasks": set(batch.tasks),
                     "autocast": torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None})
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(SpeechLLMModule, "training_step", recording_step)
    return seen


def adam_steps(checkpoint: dict) -> dict[str, set[int]]:
    optimizer = checkpoint["optimizer_states"][0]
    return {g["name"]: {int(optimizer["state"][i]["step"]) for i in g["params"]} for g in optimizer["param_groups"]}


def test_accumulated_micro_batches_make_one_step_and_phases_switch_at_optimizer_steps(corpus, tmp_path, monkeypatch):
    seen = record_training_steps(monkeypatch)
    stage = align_then_lora(tmp_path / "accumulate.yaml", "accumulate", switch=2, end=4)
    run = train(load_config(stage, run_overrides(corpus, tmp_path, "trainer.accumulate_grad_batches=2")))
    # 4 optimizer steps of 2 micro-batches each; the sampler draws the align phase's mixture (ASR only) for the
    # micro-batches of steps 0-1, and the StageScheduler switches LoRA on at step 2, not at micro-batch 2.
    assert [s["step"] for s in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(s["tasks"] == {"asr"} for s in seen[:4])
    checkpoint = load_ckpt(run.run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4 and checkpoint["SpeechDataModule"] == {"consumed_batches": 8}
    steps = adam_steps(checkpoint)
    assert steps["projection"] == {4} and steps["lora"] == {2}, steps  # LoRA's optimizer starts with its phase
    lora_lr = {int(r["step"]): float(r["lr-AdamW/lora"]) for r in metrics_rows(run.run_dir) if r.get("lr-AdamW/lora")}
    assert [lora_lr[s] > 0 for s in range(4)] == [False, False, True, True]


def test_bf16_mixed_precision_trains_under_autocast_with_fp32_weights(corpus, tmp_path, monkeypatch):
    seen = record_training_steps(monkeypatch)
    cfg = load_config(REPO / "stages/stage1.yaml",
                      run_overrides(corpus, tmp_path, "trainer.max_steps=2", "trainer.precision=bf16-mixed"))
    run = train(cfg)
    assert [s["autocast"] for s in seen] == [torch.bfloat16] * 2
    checkpoint = load_ckpt(run.run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    assert {t.dtype for t in checkpoint["state_dict"].values()} == {torch.float32}  # what the optimizer updates
    losses = [float(r["train/loss"]) for r in metrics_rows(run.run_dir) if r.get("train/loss")]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)


def test_bf16_mixed_on_a_gpu_stores_frozen_weights_in_bf16_and_trains_lora_in_fp32(corpus, tmp_path, monkeypatch):
    """On CUDA (here: what `inference_dtype` answers there), the run stores the frozen encoder and LLM in bf16
    before training, and LoRA, switched on mid-run, still trains in fp32. Eval then loads the model as training
    held it and generates under the same autocast: validation's answers."""
    monkeypatch.setattr(speech_llm, "inference_dtype", lambda precision, device: torch.bfloat16)  # training's and eval's
    stored: list[dict] = []
    training_step = SpeechLLMModule.training_step

    def recording_step(self, batch, batch_idx):
        lora = set(self.model.trainable_groups()["lora"].values())
        stored.append({"encoder": {p.dtype for p in self.model.encoder.parameters()},
                       "llm": {p.dtype for p in self.model.llm.parameters() if p not in lora},
                       "lora": {p.dtype for p in lora}})
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(SpeechLLMModule, "training_step", recording_step)
    stage = align_then_lora(tmp_path / "bf16.yaml", "bf16", switch=1, end=3)
    run = train(load_config(stage, run_overrides(corpus, tmp_path, "trainer.precision=bf16-mixed")))
    assert stored == [{"encoder": {torch.bfloat16}, "llm": {torch.bfloat16}, "lora": {torch.float32}}] * 3
    checkpoint = load_ckpt(run.run_dir / "checkpoints" / "last.ckpt")
    assert adam_steps(checkpoint)["lora"] == {2}
    lora = {k: v for k, v in checkpoint["state_dict"].items() if "lora_B" in k}
    assert lora and {v.dtype for v in lora.values()} == {torch.float32} and any(v.abs().sum() > 0 for v in lora.values())

    loaded, _, _ = evaluate.load_model(evaluate.load_run_config(run.run_dir), run.run_dir / "checkpoints" / "last.ckpt",
                                       torch.device("cpu"))
    assert stored_dtypes(loaded) == ({torch.bfloat16}, {torch.float32})
    autocast = []
    decoder_layers(loaded.llm)[0].register_forward_pre_hook(lambda *_: autocast.append(torch.get_autocast_dtype("cpu")
                                                                                         if torch.is_autocast_enabled("cpu") else None))
    wave, mask, instructions = _questions(corpus)
    with torch.inference_mode():
        answers = loaded.generate(wave, mask, instructions, max_new_tokens=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as Lightning's bf16-mixed runs validation
            expected = run.module.model.eval().generate(wave, mask, instructions, max_new_tokens=8)
    assert autocast and set(autocast) == {torch.bfloat16}
    assert answers == expected


def _questions(corpus: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Two dev clips, zero-padded into one batch, each with its row's task's first training template."""
    rows = [json.loads(line) for line in (corpus / "dev.jsonl").read_text().splitlines()[:2]]
    waves = [load_audio(corpus / row["audio"], 16000)[0] for row in rows]
    wave = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    mask = torch.arange(wave.shape[1])[None] < torch.tensor([len(w) for w in waves])[:, None]
    registry = default_registry()
    return wave, mask, [registry.get(row["task"]).render(registry.get(row["task"]).train_templates[0], row) for row in rows]


# FSDP on CPU ------------------------------------------------------------------------------------------------


def launch(corpus: Path, tmp_path: Path, strategy: str, *extra: str) -> tuple[list[dict], list[dict], str]:
    """Two processes train the run `strategy` (align until step 2, then LoRA too, until 6) with the DDP test's
    helper; returns each rank's report, each rank's trained weights (full tensors) and the output."""
    stage = write_stage(tmp_path / f"{strategy}.yaml", strategy, [
        {"name": "align", "until_step": 2, "train": ALIGN, "tasks": {"asr": 1.0}},
        {"name": "lora", "until_step": 6, "train": ALIGN + ["lora"], "tasks": {"asr": 1.0, "ic": 1.0}},
    ])
    out = tmp_path / f"{strategy}-out"
    command = [sys.executable, str(REPO / "tests/integration/ddp_train.py"), str(out), str(stage), *run_overrides(
        corpus, tmp_path / "runs", "trainer.devices=2", "trainer.accelerator=cpu", f"trainer.strategy={strategy}",
        # A constant rate: a run stopped at step 4 and resumed follows the same rates as one that ran through.
        "optim.schedule=constant", "wandb.mode=disabled", *extra)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    return reports, weights, result.stdout + result.stderr


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_fsdp_trains_like_ddp_across_the_lora_phase_switch_and_resumes_from_its_checkpoint(corpus, tmp_path):
    _, (ddp_weights, _), _ = launch(corpus, tmp_path, "ddp")
    # FSDP: stopped at step 4 (in the LoRA phase), then the same command resumes to step 6. With the chunked
    # loss, whose LM head (in FSDP's root unit) runs outside the LLM's forward and again in the backward pass.
    chunked = "model.llm.loss_chunk_tokens=16"
    launch(corpus, tmp_path, "fsdp", chunked, "trainer.max_steps=4")
    stopped = load_ckpt(tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt")
    reports, weights, output = launch(corpus, tmp_path, "fsdp", chunked)
    assert "phase 'lora' at step 4 " in output, "did not resume from the step-4 checkpoint"
    assert [r["world_size"] for r in reports] == [2, 2]

    # The checkpoint holds the trained tensors whole (gathered from the shards), under their usual names.
    assert stopped["global_step"] == 4 and stopped[META_KEY]["phase"] == "lora"
    assert stopped["state_dict"].keys() == {f"model.{name}" for name in ddp_weights}
    assert all(stopped["state_dict"][f"model.{n}"].shape == t.shape for n, t in ddp_weights.items())

    # Both ranks hold the same model, and it is the model DDP trained on the same batches.
    assert reports[0]["sha256"] == reports[1]["sha256"]
    assert reports[0]["lora_b_max"] > 0, "LoRA did not train after the phase switch"
    fsdp_weights = weights[0]
    assert fsdp_weights.keys() == ddp_weights.keys()
    for name, expected in ddp_weights.items():
        error = (fsdp_weights[name] - expected).norm() / expected.norm()
        assert error < 1e-3, f"{name}: FSDP differs from DDP by {error:.1e} (relative)"

    # The resumed run's final checkpoint: the weights in memory, and the optimizer state DDP has (frozen
    # weights left out, LoRA's moments since its phase began), in DDP's format: the same param groups holding
    # the same keys, so either strategy resumes the other's checkpoints.
    final = load_ckpt(tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt")
    ddp_final = load_ckpt(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(final["state_dict"][f"model.{n}"], t) for n, t in fsdp_weights.items())
    assert adam_steps(final) == adam_steps(ddp_final) and adam_steps(final)["lora"] == {4}
    optimizer, ddp_optimizer = final["optimizer_states"][0], ddp_final["optimizer_states"][0]
    assert [(g["name"], g["params"]) for g in optimizer["param_groups"]] == [
        (g["name"], g["params"]) for g in ddp_optimizer["param_groups"]]
    for key, state in ddp_optimizer["state"].items():
        error = (optimizer["state"][key]["exp_avg"] - state["exp_avg"]).norm() / state["exp_avg"].norm()
        assert error < 1e-3, f"optimizer state {key} differs from DDP's by {error:.1e} (relative)"
