"""A short real stage-1 run: what trains, what stays frozen, what the checkpoint holds."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from peft.tuners.lora import LoraLayer

from conftest import REPO, run_overrides
from speechllm.config import load_config
from speechllm.model.speech_llm import SpeechLLM
from speechllm.training.checkpoints import META_KEY
from speechllm.training.run import train

STAGE1_GROUPS = ("layer_weights", "downsampler", "projection")


@pytest.fixture(scope="module")
def stage1(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "stages/stage1.yaml", run_overrides(corpus, out, "trainer.max_steps=6"))
    run = train(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    initial = SpeechLLM(cfg.model)  # the same initialisation the run started from
    return cfg, run, initial


def _frozen_state(model: SpeechLLM) -> dict[str, torch.Tensor]:
    trainable = {name for group in model.trainable_groups().values() for name in group}
    return {k: v for k, v in model.state_dict().items() if k not in trainable}


def test_encoder_and_llm_stay_bit_identical(stage1):
    _, run, initial = stage1
    before, after = _frozen_state(initial), _frozen_state(run.module.model)
    assert before.keys() == after.keys() and len(before) > 50
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_only_stage1_groups_changed(stage1):
    _, run, initial = stage1
    before, after = initial.trainable_groups(), run.module.model.trainable_groups()
    for group in STAGE1_GROUPS:
        assert any(not torch.equal(before[group][k], after[group][k]) for k in before[group]), group
    assert all(torch.equal(before["lora"][k], after["lora"][k]) for k in before["lora"])
    assert not any(p.requires_grad for p in after["lora"].values())
    # Never trained (B = 0), so the run switched the adapters off instead of computing their zero output.
    adapted = [m for m in run.module.model.llm.modules() if isinstance(m, LoraLayer)]
    assert adapted and all(m.disable_adapters for m in adapted)


def test_checkpoint_holds_only_the_trained_groups_and_run_state(stage1):
    cfg, run, _ = stage1
    checkpoint = torch.load(run.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    groups = run.module.model.trainable_groups()
    expected = {f"model.{name}" for group in STAGE1_GROUPS for name in groups[group]}
    assert set(checkpoint["state_dict"]) == expected
    assert not any(".encoder.model." in k or ".llm." in k for k in checkpoint["state_dict"])
    assert checkpoint["global_step"] == 6 and checkpoint["optimizer_states"]
    meta = checkpoint[META_KEY]
    assert (meta["stage"], meta["phase"], meta["trained_groups"]) == ("stage1", "align", list(STAGE1_GROUPS))
    assert meta["model_config"]["llm"]["kind"] == "causal"


def test_run_directory_has_config_logs_and_offline_wandb(stage1):
    cfg, run, _ = stage1
    assert (run.run_dir / "config.yaml").is_file()
    assert "run_name: stage1" in (run.run_dir / "config.yaml").read_text()
    metrics = (run.run_dir / "logs" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss/asr" in metrics
    assert "val/loss/kws" not in metrics  # stage 1 validates on the task it trains
    assert list((run.run_dir / "wandb").glob("offline-run-*")), "offline W&B run missing"


def test_encoder_decoder_llm_trains_end_to_end(corpus, tmp_path):
    """The paper's LLM family (T5): the same stage-1 run with the tiny_t5 preset."""
    cfg = load_config(REPO / "stages/stage1.yaml",
                      run_overrides(corpus, tmp_path, "presets.model=tiny_t5", "trainer.max_steps=3", "wandb.mode=disabled"))
    run = train(cfg)
    checkpoint = torch.load(run.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3 and checkpoint[META_KEY]["model_config"]["llm"]["kind"] == "seq2seq"
    assert {k.split(".")[1] for k in checkpoint["state_dict"]} == {"layer_weights", "downsampler", "projection"}
