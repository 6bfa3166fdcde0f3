"""The curriculum across stages and phases: init_from, DDP-safe phase switches, exact resume, mixtures, refusals."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, record_adapter_calls, run_overrides, speechllm_command
from speechllm.config import ConfigError, load_config
from speechllm.data.audio import load_audio
from speechllm.evaluation.evaluate import load_model, load_run_config
from speechllm.model.speech_llm import SpeechLLM
from speechllm.training.checkpoints import META_KEY, AtomicCheckpointIO, CheckpointError, load_trained_weights
from speechllm.training.datamodule import SpeechDataModule
from speechllm.training.module import SpeechLLMModule
from speechllm.training.run import build_registry, load_examples, train
from speechllm.training.stage_scheduler import StagePlan

ALIGN = ["layer_weights", "downsampler", "projection"]
STAGE1_GROUPS = tuple(ALIGN)


def write_stage(path: Path, run_name: str, phases: list[dict]) -> Path:
    """A stage file: tiny model, the session corpus (via run_overrides), the given phases."""
    stage = {
        "stage": "curriculum",
        "run_name": run_name,
        "presets": {"model": "tiny", "data": "synth", "trainer": "cpu"},
        "optim": {"lr": 5.0e-3, "warmup_steps": 0},
        "phases": phases,
    }
    OmegaConf.save(OmegaConf.create(stage), path)
    return path


def align_then_lora(path: Path, run_name: str, switch: int, end: int) -> Path:
    """Phase 1 aligns the audio path on ASR; at `switch` LoRA starts training and IC joins the mixture."""
    return write_stage(path, run_name, [
        {"name": "align", "until_step": switch, "train": ALIGN, "tasks": {"asr": 1.0}},
        {"name": "lora", "until_step": end, "train": ALIGN + ["lora"], "tasks": {"asr": 1.0, "ic": 1.0}},
    ])


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def frozen_state(model: SpeechLLM) -> dict[str, torch.Tensor]:
    trainable = {name for group in model.trainable_groups().values() for name in group}
    return {k: v for k, v in model.state_dict().items() if k not in trainable}


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [r for r in metrics_rows(run_dir) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(steps)}"
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


@pytest.fixture(scope="module")
def stage1(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "stages/stage1.yaml", run_overrides(corpus, out, "trainer.max_steps=3"))
    return out, train(cfg)


# 1. Stage 2 after stage 1 ------------------------------------------------------------------------------


def test_stage2_starts_from_stage1_weights_at_step_0_with_a_fresh_optimizer(stage1, corpus):
    out, run1 = stage1
    stage1_ckpt = load_ckpt(run1.run_dir / "checkpoints" / "last.ckpt")
    cfg = load_config(REPO / "stages/stage2.yaml", run_overrides(
        corpus, out, f"init_from={run1.run_dir}", "phases.0.until_step=2", "phases.1.until_step=4",
        "optim.warmup_steps=1",
    ))
    # init_from copies exactly the groups stage 1 trained, unchanged.
    probe = SpeechLLMModule(cfg, StagePlan(cfg), build_registry([]).names())
    assert load_trained_weights(probe, str(run1.run_dir)) == list(STAGE1_GROUPS)
    probe_groups = probe.model.trainable_groups()
    for group in STAGE1_GROUPS:
        assert all(torch.equal(p, stage1_ckpt["state_dict"][f"model.{n}"]) for n, p in probe_groups[group].items())
    del probe

    run2 = train(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    fresh = SpeechLLM(cfg.model)
    after, initial = run2.module.model.trainable_groups(), fresh.trainable_groups()
    for group in STAGE1_GROUPS:  # trained on in stage 2, from the stage-1 values
        assert any(not torch.equal(p, stage1_ckpt["state_dict"][f"model.{n}"]) for n, p in after[group].items()), group
    assert any(not torch.equal(p, initial["lora"][n]) for n, p in after["lora"].items())
    before_state, after_state = frozen_state(fresh), frozen_state(run2.module.model)
    assert before_state.keys() == after_state.keys() and len(before_state) > 50
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state), "encoder/LLM changed"

    ckpt = load_ckpt(run2.run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt[META_KEY]["phase"] == "multitask"
    # A carried-over optimizer would count 3 + 4 steps; a fresh one counts the 4 of stage 2.
    adam_steps = {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4}
    names = [g["name"] for g in ckpt["optimizer_states"][0]["param_groups"]]
    assert "lora" in names and "projection" in names
    assert min(train_losses(run2.run_dir)) == 0


def test_a_resumed_run_keeps_the_init_from_weights_it_does_not_train(stage1, corpus):
    """A stage that trains LoRA only on the audio path of stage 1, stopped and resumed: a resume does not read
    init_from again, so its checkpoints carry that audio path, unchanged, for the resume and for a later stage."""
    out, run1 = stage1
    stage = write_stage(out / "lora_only.yaml", "lora_only",
                        [{"name": "lora", "until_step": 4, "train": ["lora"], "tasks": {"asr": 1.0}}])
    overrides = run_overrides(corpus, out, f"init_from={run1.run_dir}")
    train(load_config(stage, [*overrides, "trainer.max_steps=2"]))
    resumed = train(load_config(stage, overrides))
    assert load_ckpt(resumed.run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    stage1_weights = load_ckpt(run1.run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    groups = resumed.module.model.trainable_groups()
    for group in STAGE1_GROUPS:
        assert all(torch.equal(p, stage1_weights[f"model.{n}"]) for n, p in groups[group].items()), group
    later = SpeechLLMModule(load_config(stage, overrides), StagePlan(load_config(stage, overrides)), [])
    assert load_trained_weights(later, str(resumed.run_dir)) == [*STAGE1_GROUPS, "lora"]


def test_eval_of_a_stage_that_never_trained_lora_answers_without_computing_it(stage1, corpus):
    """Stage 1's LoRA adds zero, so the model eval and predict load runs none of its code, with the same answers."""
    _, run1 = stage1
    model, _, _ = load_model(load_run_config(run1.run_dir), run1.run_dir / "checkpoints" / "last.ckpt",
                             torch.device("cpu"))
    calls = record_adapter_calls(model)
    row = json.loads((corpus / "dev.jsonl").read_text().splitlines()[0])
    wave, _ = load_audio(corpus / row["audio"], model.cfg.encoder.sample_rate)
    results = []
    for adapters_on in (False, True):
        if adapters_on:
            model.llm.base_model.enable_adapter_layers()
        calls.clear()
        with torch.inference_mode():
            answers = model.generate(wave[None], torch.ones_like(wave[None], dtype=torch.bool),
                                     ["Transcribe the audio."], max_new_tokens=6)
        results.append((answers, len(calls)))
    (off, calls_off), (on, calls_on) = results
    assert calls_off == 0 and calls_on > 0 and off == on


# 2. DDP: phase switches keep ranks in sync; flipping requires_grad after wrapping does not -------------


def run_ddp(corpus: Path, tmp_path: Path, naive: bool) -> tuple[dict, dict]:
    stage = align_then_lora(tmp_path / "ddp.yaml", "ddp", switch=3, end=6)
    out = tmp_path / "checksums"
    command = [sys.executable, str(REPO / "tests/integration/ddp_train.py"), str(out), *(["--naive"] if naive else []),
               str(stage), *run_overrides(corpus, tmp_path / "runs", "trainer.devices=2", "trainer.strategy=ddp",
                                          "trainer.accelerator=cpu")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    checkpoint = load_ckpt(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 6 and len(checkpoint[META_KEY]["rng_states"]) == 2
    # The ranks train on different batches, so unsynchronised gradients would show.
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 6
    assert all(set(b0) != set(b1) for b0, b1 in zip(ranks[0]["batches"], ranks[1]["batches"]))
    return ranks[0], ranks[1]


def test_ddp_ranks_stay_identical_when_a_phase_switches_lora_on(corpus, tmp_path):
    rank0, rank1 = run_ddp(corpus, tmp_path, naive=False)
    assert rank0["sha256"] == rank1["sha256"]
    assert rank0["lora_b_max"] > 0, "LoRA did not train after the phase switch"


def test_ddp_guard_flipping_requires_grad_at_the_phase_switch_desynchronises_ranks(corpus, tmp_path):
    # The control for the test above: the naive freezing runs without error, and the ranks drift apart.
    rank0, rank1 = run_ddp(corpus, tmp_path, naive=True)
    assert rank0["sha256"]["lora"] != rank1["sha256"]["lora"]


# 3. A run killed mid-training resumes exactly ------------------------------------------------------------


def test_sigkilled_run_resumes_exactly_where_it_stopped(corpus, tmp_path):
    stage = align_then_lora(tmp_path / "resume.yaml", "resume", switch=4, end=10)

    def command(out: Path) -> list[str]:
        # LoRA dropout makes the result depend on the restored RNG state, not only on weights and data.
        return speechllm_command("train", str(stage), *run_overrides(
            corpus, out, "checkpoint.every_n_steps=2", "trainer.deterministic=true", "model.lora.dropout=0.1", "seed=7",
        ))

    killed_dir = tmp_path / "killed" / "resume"
    last = killed_dir / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(command(tmp_path / "killed"), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while killed_at is None and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be killed"
            if last.is_file():
                step = load_ckpt(last)["global_step"]  # atomic writes: never a half-written file
                if step >= 2:
                    os.kill(process.pid, signal.SIGKILL)
                    killed_at = step
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    assert killed_at is not None and 2 <= killed_at < 10, killed_at
    interrupted = load_ckpt(last)
    assert interrupted["global_step"] >= killed_at and interrupted[META_KEY]["phase"] in ("align", "lora")
    resume_step = interrupted["global_step"]

    resumed = subprocess.run(command(tmp_path / "killed"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {resume_step} " in resumed.stdout + resumed.stderr, "did not continue from the checkpoint"
    whole = subprocess.run(command(tmp_path / "whole"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    final = load_ckpt(last)
    reference = load_ckpt(tmp_path / "whole" / "resume" / "checkpoints" / "last.ckpt")
    assert (final["global_step"], final[META_KEY]["phase"]) == (10, "lora")
    assert final["SpeechDataModule"] == {"consumed_batches": 10}
    assert final["state_dict"].keys() == reference["state_dict"].keys()
    for name, tensor in reference["state_dict"].items():
        assert torch.allclose(final["state_dict"][name], tensor, rtol=0, atol=1e-6), name
    # One metrics file for the whole run: steps before the kill from the first process, then the rest,
    # with the losses of the uninterrupted run at every step.
    losses, expected = train_losses(killed_dir), train_losses(tmp_path / "whole" / "resume")
    assert sorted(losses) == list(range(10)) == sorted(expected)
    assert all(math.isclose(losses[s], expected[s], rel_tol=1e-5) for s in expected), (losses, expected)


_WRITER = """
import sys, time, torch
from speechllm.training.checkpoints import AtomicCheckpointIO

class SlowToWrite:  # stalls torch.save halfway through writing the file, so the kill lands mid-write
    def __reduce__(self):
        print("writing", flush=True)
        time.sleep(60)
        return (int, (0,))

save = AtomicCheckpointIO().save_checkpoint if sys.argv[2] == "atomic" else torch.save
save({"step": 1, "x": torch.arange(1000)}, sys.argv[1])
save({"step": 2, "x": torch.arange(1000), "slow": SlowToWrite()}, sys.argv[1])
"""


def kill_during_second_write(target: Path, kind: str) -> None:
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), kind], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
    finally:
        process.kill()
        process.wait()


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path):
    target = tmp_path / "atomic" / "last.ckpt"
    kill_during_second_write(target, "atomic")
    assert torch.load(target, weights_only=True)["step"] == 1
    assert list(target.parent.glob(".last.ckpt.tmp-*")), "the kill did not land during the write"
    AtomicCheckpointIO().save_checkpoint({"step": 3}, target)
    names = sorted(p.name for p in target.parent.iterdir())
    assert names == ["last-prev.ckpt", "last.ckpt"], "a killed writer's temporary file remains"
    assert torch.load(target.with_name("last-prev.ckpt"), weights_only=True)["step"] == 1  # the one replaced
    # The control: a plain torch.save loses the previous checkpoint to the same kill.
    plain = tmp_path / "plain" / "last.ckpt"
    plain.parent.mkdir()
    kill_during_second_write(plain, "plain")
    with pytest.raises(Exception):
        torch.load(plain, weights_only=True)


# 4. The task mixture follows the phases ------------------------------------------------------------------


def test_sampled_task_mixture_matches_each_phase_and_switches_with_it(corpus, tmp_path):
    stage = write_stage(tmp_path / "mix.yaml", "mix", [
        {"name": "a", "until_step": 400, "train": ALIGN, "tasks": {"asr": 3.0, "kws": 1.0}},
        {"name": "b", "until_step": 800, "train": ALIGN + ["lora"], "tasks": {"ic": 1.0, "st": 1.0, "sns": 2.0}},
    ])
    cfg = load_config(stage, run_overrides(corpus, tmp_path, "trainer.accumulate_grad_batches=2"))
    plan, registry = StagePlan(cfg), build_registry([])
    examples = load_examples(cfg, registry, tmp_path / "mix", "train").examples
    sequences = []
    for rank in (0, 1):
        datamodule = SpeechDataModule(cfg, plan, registry, examples, [])
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = datamodule.train_dataloader()
        assert len(loader) == 800 * 2  # micro-batches: steps x accumulation
        sequences.append([[examples[i] for i, _ in batch] for batch in loader.batch_sampler])
    tasks = [{e.task for e in batch} for batch in sequences[0]]
    assert all(len(t) == 1 for t in tasks), "a batch mixes tasks"
    tasks = [t.pop() for t in tasks]
    assert tasks == [{e.task for e in batch}.pop() for batch in sequences[1]], "ranks disagree on the task of a batch"
    # Every micro-batch belongs to the phase the StageScheduler is in at its optimizer step.
    assert all(task in plan.phase_at(i // 2).tasks for i, task in enumerate(tasks))
    for phase in plan.phases:
        drawn = Counter(tasks[phase.start_step * 2 : phase.end_step * 2])
        n, total = sum(drawn.values()), sum(phase.tasks.values())
        for task, weight in phase.tasks.items():
            p = weight / total
            assert abs(drawn[task] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (phase.name, task, drawn)


# 5. Fail fast -------------------------------------------------------------------------------------------


def test_missing_init_from_is_a_one_line_error_naming_the_path(corpus, tmp_path):
    missing = tmp_path / "no_such_run"
    result = subprocess.run(
        speechllm_command("train", "stages/stage2.yaml", *run_overrides(corpus, tmp_path, f"init_from={missing}")),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(missing) in errors[0] and "init_from" in errors[0], result.stderr
    assert not (tmp_path / "stage2").exists()


@pytest.mark.parametrize("override, key", [("model.lora.rank=8", "lora.rank"),
                                           ("model.downsampler.channels=64", "downsampler.channels")])
def test_init_from_a_different_model_config_is_refused_naming_the_keys(stage1, corpus, tmp_path, override, key):
    _, run1 = stage1
    overrides = run_overrides(corpus, tmp_path, f"init_from={run1.run_dir}", override)
    cfg = load_config(REPO / "stages/stage2.yaml", overrides)
    with pytest.raises(CheckpointError, match=f"model config differs from this run in {key}") as error:
        train(cfg)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "stage2").exists(), "refused only after starting the run"


def test_phase_task_without_examples_is_a_one_line_config_error(corpus, tmp_path):
    cfg = load_config(REPO / "stages/stage1.yaml", run_overrides(corpus, tmp_path, "phases.0.tasks.er=1.0"))
    with pytest.raises(ConfigError, match=r"phases: no training examples for task\(s\) er in data") as error:
        train(cfg)
    assert "\n" not in str(error.value)
