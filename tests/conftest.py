"""Shared fixtures: tiny model configs and one small synthetic corpus per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from speechllm.config import load_config

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def own_wandb_service(monkeypatch):
    """Subprocesses start their own W&B service. wandb.init in this process exports WANDB_SERVICE, and a
    killed run attached to that shared service would keep its run id "in use" for the resumed run."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


def record_adapter_calls(model) -> list:
    """A list that grows by one each time one of `model`'s LoRA adapters runs (a hook on every lora_A)."""
    calls = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def stored_dtypes(model) -> tuple[set, set]:
    """The dtypes `model` stores its frozen weights in, and those it stores what trains in."""
    trained = {p for group in model.trainable_groups().values() for p in group.values()}
    return {p.dtype for p in model.parameters() if p not in trained}, {p.dtype for p in trained}


def tiny_config(model_preset: str = "tiny", *overrides: str):
    """A full RunConfig with a tiny model preset and no data or trainer preset."""
    return load_config(None, [f"presets.model={model_preset}", "presets.data=null", "presets.trainer=null", *overrides])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small real spoken corpus (espeak-ng), every synthetic task, shared by the whole session."""
    from speechllm.data.synth import synthesize_corpus

    out = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(out, train_per_task=12, eval_per_task=4, seed=0, progress=False)
    return out


def speechllm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "speechllm.cli", *args]


def run_overrides(corpus: Path, output_dir: Path, *extra: str) -> list[str]:
    """A quick, quiet training run on the session corpus, written under `output_dir`."""
    return [
        f"output_dir={output_dir}",
        f"data.train_manifests=[{corpus}/train.jsonl]",
        f"data.dev_manifests=[{corpus}/dev.jsonl]",
        "data.num_workers=0",
        "data.max_batch_seconds=12",
        "data.max_dev_examples=8",
        "checkpoint.every_n_steps=3",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


# Stage 2 without its stage-1 start: every group, LoRA included, trains from step 0 at a visible rate.
LORA_STAGE2_RUN = (
    "init_from=null",
    "trainer.max_steps=3",
    "optim.warmup_steps=0",
    "optim.lr=1.0e-2",
    "phases=[{name: multitask, until_step: 3, train: [layer_weights, downsampler, projection, lora], "
    "tasks: {asr: 1.0, ic: 1.0, sc: 1.0}}]",
)
