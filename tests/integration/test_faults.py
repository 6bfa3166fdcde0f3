"""Faults during training: preemption signals, non-finite steps, audio that breaks mid-run, checkpoints that
cannot be written or read, models that cannot be found. Each ends in its documented outcome, and no
checkpoint is ever left truncated."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_overrides, speechllm_command
from speechllm.config import load_config
from speechllm.training.checkpoints import CheckpointError
from speechllm.training.faults import TrainingStopped
from speechllm.training.module import SpeechLLMModule
from speechllm.training.run import train

STAGE1 = str(REPO / "stages/stage1.yaml")
QUICK = ("trainer.val_check_interval=1000",)  # no validation inside these short runs unless asked


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_checkpoints_whole(directory: Path) -> None:
    """Every checkpoint loads; no temporary file of an interrupted write is left."""
    assert not list(directory.glob(".*tmp*")), sorted(p.name for p in directory.iterdir())
    for path in directory.glob("*.ckpt"):
        load_ckpt(path)


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def last_metric(run_dir: Path, key: str) -> float:
    return [float(r[key]) for r in metrics_rows(run_dir) if r.get(key)][-1]


def message_lines(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def small_asr_manifest(corpus: Path, out: Path, rows: int = 3) -> tuple[Path, list[dict]]:
    """A few ASR rows with their own copies of the audio (tests corrupt them); every batch holds them all."""
    (out / "audio").mkdir(parents=True, exist_ok=True)
    picked = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()][:rows]
    for row in picked:
        copy_of = out / "audio" / Path(row["audio"]).name
        shutil.copyfile(corpus / row["audio"], copy_of)
        row["audio"] = str(copy_of)
    manifest = out / "small.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in picked))
    return manifest, picked


def wait_for_checkpoint(process: subprocess.Popen, last: Path, min_step: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before the fault could be injected"
        if last.is_file() and (step := load_ckpt(last)["global_step"]) >= min_step:  # atomic: never half a file
            return step
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


# 1. Preemption: SIGTERM / SIGUSR1 ------------------------------------------------------------------------


def start_and_signal(command: list[str], signum: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """Start a run, send `signum` once it trains, and return its result."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        seen = []
        for line in process.stderr:  # the StageScheduler announces the phase at the first training batch
            seen.append(line)
            if "phase 'align' at step 0" in line:
                time.sleep(1.0)  # a few steps into training
                process.send_signal(signum)
                break
        stderr = "".join(seen) + process.stderr.read()
        process.wait(timeout=120)
    finally:
        process.kill()
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, "", stderr)


def test_sigterm_saves_the_current_step_and_the_same_command_resumes(corpus, tmp_path):
    command = speechllm_command("train", STAGE1, *run_overrides(
        corpus, tmp_path, "run_name=pre", "trainer.max_steps=30", "checkpoint.every_n_steps=1000", *QUICK))
    last = tmp_path / "pre" / "checkpoints" / "last.ckpt"

    stopped = start_and_signal(command, signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    (message,) = message_lines(stopped.stderr, "stopped: ")
    step = load_ckpt(last)["global_step"]  # no periodic checkpoint before step 1000: this one is the signal's
    assert f"SIGTERM received: stopped at step {step} and saved {last}; run the same command to resume" in message
    assert 0 <= step < 30
    assert_checkpoints_whole(last.parent)

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step} " in resumed.stderr, "did not continue from the signal's checkpoint"
    final = load_ckpt(last)
    assert final["global_step"] == 30 and final["SpeechDataModule"] == {"consumed_batches": 30}
    steps = [int(r["step"]) for r in metrics_rows(tmp_path / "pre") if r.get("train/loss")]
    assert steps == list(range(30)), "a step was lost or trained twice"


def test_a_signal_during_validation_stops_before_the_next_step(corpus, tmp_path, monkeypatch):
    validation_step = SpeechLLMModule.validation_step

    def signalled_validation(self, batch, batch_idx):
        if self.global_step == 2 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # lands while validation runs after step 1
        return validation_step(self, batch, batch_idx)

    monkeypatch.setattr(SpeechLLMModule, "validation_step", signalled_validation)
    overrides = run_overrides(corpus, tmp_path, "run_name=val", "trainer.max_steps=4", "trainer.val_check_interval=2",
                              "checkpoint.every_n_steps=1000", "data.max_dev_examples=2")
    with pytest.raises(TrainingStopped, match="SIGTERM received: stopped at step 2 and saved") as stop:
        train(load_config(STAGE1, overrides))
    assert stop.value.exit_code == 128 + signal.SIGTERM
    last = tmp_path / "val" / "checkpoints" / "last.ckpt"
    assert load_ckpt(last)["global_step"] == 2

    monkeypatch.setattr(SpeechLLMModule, "validation_step", validation_step)
    train(load_config(STAGE1, overrides))
    assert load_ckpt(last)["global_step"] == 4
    steps = [int(r["step"]) for r in metrics_rows(tmp_path / "val") if r.get("train/loss")]
    assert steps == [0, 1, 2, 3], "a step was lost or trained twice"


def test_sigusr1_in_a_slurm_job_saves_then_requeues_the_job(corpus, tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    command = speechllm_command("train", STAGE1, *run_overrides(
        corpus, tmp_path, "run_name=slurm", "trainer.max_steps=30", "checkpoint.every_n_steps=1000", *QUICK))

    stopped = start_and_signal(command, signal.SIGUSR1, env)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    (message,) = message_lines(stopped.stderr, "stopped: ")
    step = load_ckpt(tmp_path / "slurm" / "checkpoints" / "last.ckpt")["global_step"]
    assert f"SIGUSR1 received: stopped at step {step}" in message and "SLURM job 4242 requeued" in message
    assert calls.read_text().split() == ["requeue", "4242"]


# 2. Non-finite loss or gradients ---------------------------------------------------------------------------


def poison_steps(monkeypatch, bad_steps: set[int]) -> dict[int, dict]:
    """training_step returns NaN at `bad_steps`; records the trained state and batch at the start of each step."""
    seen: dict[int, dict] = {}
    original = SpeechLLMModule.training_step

    def step(self, batch, batch_idx):
        trained = self.saved_state_keys()
        seen[self.global_step] = {
            "weights": {k: v.detach().clone() for k, v in self.state_dict().items() if k in trained},
            "optimizer": copy.deepcopy(self.trainer.optimizers[0].state_dict()),
            "ids": list(batch.ids),
        }
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step in bad_steps else loss

    monkeypatch.setattr(SpeechLLMModule, "training_step", step)
    return seen


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_step_is_skipped_and_counted(corpus, tmp_path, monkeypatch):
    seen = poison_steps(monkeypatch, {2})
    cfg = load_config(STAGE1, run_overrides(corpus, tmp_path, "run_name=nan1", "trainer.max_steps=4", *QUICK))
    run = train(cfg)
    assert same_weights(seen[2]["weights"], seen[3]["weights"]), "the NaN step changed the weights"
    assert not same_weights(seen[1]["weights"], seen[2]["weights"])
    final = load_ckpt(run.run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 4  # the bad batch is consumed, not retried
    assert {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()} == {3}, "optimizer stepped on NaN"
    assert final["callbacks"]["FaultGuard"]["skipped_steps"] == 1
    assert last_metric(run.run_dir, "train/skipped_steps") == 1


def test_consecutive_non_finite_steps_stop_with_the_state_from_before_the_first(corpus, tmp_path, monkeypatch):
    seen = poison_steps(monkeypatch, {2, 3, 4})
    cfg = load_config(STAGE1, run_overrides(
        corpus, tmp_path, "run_name=nan3", "trainer.max_steps=10", "faults.max_bad_steps=3", *QUICK))
    with pytest.raises(TrainingStopped) as stop:
        train(cfg)
    message = str(stop.value)
    assert "\n" not in message and stop.value.exit_code == 1
    assert "3 steps in a row had a non-finite loss or gradient (steps 2-4" in message
    assert f"examples {', '.join(seen[2]['ids'])};" in message
    last = tmp_path / "nan3" / "checkpoints" / "last.ckpt"
    saved = load_ckpt(last)
    assert saved["global_step"] == 5 and 5 not in seen
    assert same_weights(saved["state_dict"], seen[2]["weights"]), "last.ckpt differs from the state before the NaN"
    moments = seen[2]["optimizer"]["state"]
    assert all(torch.equal(saved["optimizer_states"][0]["state"][i]["exp_avg"], moments[i]["exp_avg"]) for i in moments)
    assert saved["callbacks"]["FaultGuard"]["skipped_steps"] == 3
    assert_checkpoints_whole(last.parent)


# 3. Audio that breaks during training ----------------------------------------------------------------------


def test_audio_corrupted_mid_run_stops_naming_the_example_and_resumes_after_the_fix(corpus, tmp_path):
    manifest, rows = small_asr_manifest(corpus, tmp_path / "data")
    victim = Path(rows[1]["audio"])
    original = victim.read_bytes()
    command = speechllm_command("train", STAGE1, *run_overrides(
        corpus, tmp_path, "run_name=bad", f"data.train_manifests=[{manifest}]", "trainer.max_steps=30",
        "checkpoint.every_n_steps=1", *QUICK))
    last = tmp_path / "bad" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(process, last, min_step=1)  # training has started, past validation
        victim.write_bytes(b"RIFF\x00\x00 this is no longer a wave file" * 50)
        _, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    (error,) = message_lines(stderr, "error: ")
    step = load_ckpt(last)["global_step"]
    assert f"{manifest}:2: example '{rows[1]['id']}' became unusable during training: {victim}: " in error
    assert f"{last} holds step {step}" in error and "data.on_bad_example=skip" in error
    assert step < 30
    assert_checkpoints_whole(last.parent)

    victim.write_bytes(original)  # fixed: the same command resumes at the saved step and finishes
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step} " in resumed.stderr
    assert load_ckpt(last)["global_step"] == 30
    steps = [int(r["step"]) for r in metrics_rows(tmp_path / "bad") if r.get("train/loss")]
    assert steps == list(range(30)), "a step was lost or trained twice"


def test_audio_corrupted_mid_run_with_skip_is_replaced_counted_and_listed(corpus, tmp_path, monkeypatch):
    manifest, rows = small_asr_manifest(corpus, tmp_path / "data")
    victim = Path(rows[1]["audio"])
    batches: list[list[str]] = []
    original = SpeechLLMModule.training_step

    def step(self, batch, batch_idx):
        batches.append(list(batch.ids))
        if self.global_step == 1:  # after validation at start-up, while training
            victim.write_bytes(b"not audio")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SpeechLLMModule, "training_step", step)
    cfg = load_config(STAGE1, run_overrides(
        corpus, tmp_path, "run_name=skip", f"data.train_manifests=[{manifest}]", "data.on_bad_example=skip",
        "trainer.max_steps=6", *QUICK))
    run = train(cfg)
    assert rows[1]["id"] in batches[0], "the victim was not in the batches to begin with"
    later = batches[3:]  # loaded after the corruption (one batch is prefetched)
    assert all(rows[1]["id"] not in ids for ids in later)
    assert [len(ids) for ids in later] == [len(batches[0])] * len(later), "a batch lost its size"
    listed = (run.run_dir / "skipped_train_examples.txt").read_text().splitlines()
    assert listed and all(line.startswith(f"{manifest}:2: example '{rows[1]['id']}' became unusable") for line in listed)
    assert last_metric(run.run_dir, "train/bad_examples") == len(listed)
    assert load_ckpt(run.run_dir / "checkpoints" / "last.ckpt")["callbacks"]["FaultGuard"]["bad_examples"] == len(listed)


# 4. Checkpoints: retention, unwritable places, full disks, unreadable files -------------------------------


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory) -> Path:
    """A 3-step run with a checkpoint at every step: its output directory, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("finished")
    train(load_config(STAGE1, run_overrides(
        corpus, out, "run_name=done", "trainer.max_steps=3", "checkpoint.every_n_steps=1", *QUICK)))
    return out


def copy_of(finished_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished_run, tmp_path / "out")
    return tmp_path / "out"


def test_keep_best_keeps_the_k_best_checkpoints_by_the_dev_metric_and_last(corpus, tmp_path):
    cfg = load_config(STAGE1, run_overrides(
        corpus, tmp_path, "run_name=best", "trainer.max_steps=6", "trainer.val_check_interval=1",
        "checkpoint.keep_best=2", "checkpoint.every_n_steps=3", "data.max_dev_examples=2"))
    run = train(cfg)
    directory = run.run_dir / "checkpoints"
    best = sorted(directory.glob("best-*.ckpt"))
    assert sorted(p.name for p in directory.glob("*.ckpt") if p not in best) == ["last-prev.ckpt", "last.ckpt"]
    losses = sorted(float(r["val/loss"]) for r in metrics_rows(run.run_dir) if r.get("val/loss"))
    assert len(losses) == 6
    kept = sorted(float(p.stem.split("val_loss=")[1]) for p in best)
    assert kept == pytest.approx(losses[:2], abs=1e-4)
    for path in best:
        assert f"best-step={load_ckpt(path)['global_step']}-" in path.name
    assert_checkpoints_whole(directory)


def test_a_file_where_the_checkpoint_directory_should_be_fails_at_start_up(corpus, tmp_path):
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "checkpoints").write_text("not a directory")
    cfg = load_config(STAGE1, run_overrides(corpus, tmp_path, "run_name=blocked", "trainer.max_steps=3"))
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="checkpoints cannot be written there") as error:
        train(cfg)
    assert "\n" not in str(error.value) and str(tmp_path / "blocked" / "checkpoints") in str(error.value)
    assert time.monotonic() - started < 30
    assert (tmp_path / "blocked" / "checkpoints").read_text() == "not a directory"


def test_a_full_disk_is_one_line_and_leaves_the_previous_checkpoint_whole(finished_run, corpus, tmp_path, monkeypatch):
    out = copy_of(finished_run, tmp_path)
    last = out / "done" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100_000, 100_000))
    cfg = load_config(STAGE1, run_overrides(
        corpus, out, "run_name=done", "trainer.max_steps=6", "checkpoint.every_n_steps=1", *QUICK))
    with pytest.raises(CheckpointError, match=r"not enough disk space for the checkpoint \(needs about 2 MiB, 0 MiB free") as error:
        train(cfg)
    assert "\n" not in str(error.value) and str(last) in str(error.value)
    assert last.read_bytes() == before and load_ckpt(last)["global_step"] == 3
    assert_checkpoints_whole(last.parent)


def test_an_unreadable_last_checkpoint_names_the_newest_readable_one_and_resuming_from_it_works(
    finished_run, corpus, tmp_path
):
    out = copy_of(finished_run, tmp_path)
    directory = out / "done" / "checkpoints"
    last, previous = directory / "last.ckpt", directory / "last-prev.ckpt"
    last.write_bytes(last.read_bytes()[:5000])  # a truncated copy, a failing disk, ...
    overrides = run_overrides(corpus, out, "run_name=done", "trainer.max_steps=5", "checkpoint.every_n_steps=1", *QUICK)
    with pytest.raises(CheckpointError) as error:
        train(load_config(STAGE1, overrides))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{last}: unreadable checkpoint")
    step = load_ckpt(previous)["global_step"]
    assert f"the newest readable checkpoint there is {previous} (step {step}): continue from it with resume={previous}" in message

    train(load_config(STAGE1, [*overrides, f"resume={previous}"]))
    assert load_ckpt(last)["global_step"] == 5
    assert_checkpoints_whole(directory)


# 5. A model that cannot be found ---------------------------------------------------------------------------


@pytest.mark.parametrize("offline", ["1", None], ids=["HF_HUB_OFFLINE", "no-network"])
def test_a_model_name_that_cannot_be_found_is_a_one_line_error_in_seconds(tmp_path, offline):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | ({"HF_HUB_OFFLINE": offline} if offline else {})
    started = time.monotonic()
    result = subprocess.run(
        speechllm_command("train", STAGE1, f"output_dir={tmp_path}", "model.llm.pretrained=nobody/no-such-llm"),
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert time.monotonic() - started < 60
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (error,) = message_lines(result.stderr, "error: ")
    assert error.startswith("error: model.llm.pretrained='nobody/no-such-llm'") and "local directory" in error
    assert not any(tmp_path.iterdir()), "the run started before the model was found"


def test_under_ddp_a_fault_seen_by_one_rank_skips_the_step_on_every_rank(corpus, tmp_path):
    # Rank 1's loss is infinite at step 2 while the averaged gradients stay finite: only rank 1 can tell,
    # and a rank that stepped while the other skipped would leave the ranks with different weights.
    out = tmp_path / "checksums"
    command = [sys.executable, str(REPO / "tests/integration/ddp_train.py"), str(out), "--inf-loss=1:2", STAGE1,
               *run_overrides(corpus, tmp_path, "run_name=ddp", "trainer.max_steps=4", "trainer.devices=2",
                              "trainer.strategy=ddp", "trainer.accelerator=cpu", *QUICK)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    for rank in ranks:
        weights = rank["weights_by_step"]
        assert weights[1] != weights[2] and weights[2] == weights[3]
    assert load_ckpt(tmp_path / "ddp" / "checkpoints" / "last.ckpt")["callbacks"]["FaultGuard"]["skipped_steps"] == 1
