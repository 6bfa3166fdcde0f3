"""`speechllm eval` on a short real stage-1 run: per-task report, the model's own predictions, one-line errors."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_overrides, speechllm_command
from speechllm.cli import main
from speechllm.config import load_config
from speechllm.data.audio import load_audio
from speechllm.data.tasks import default_registry
from speechllm.training.run import train

MAX_NEW_TOKENS = "12"  # short answers keep the runs quick; the checks do not depend on the length


@pytest.fixture(scope="module")
def stage1(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "stages/stage1.yaml", run_overrides(corpus, out, "trainer.max_steps=3"))
    return cfg, train(cfg)


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(speechllm_command("eval", *args), cwd=REPO, capture_output=True, text=True, timeout=300)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_eval_reports_each_dev_task_with_its_metric_and_count(stage1, corpus):
    cfg, run = stage1
    result = _eval(str(run.run_dir), "--max-examples", "2", "--max-new-tokens", MAX_NEW_TOKENS)
    assert result.returncode == 0, result.stderr

    report = json.loads((run.run_dir / "eval" / "dev.json").read_text())
    dev_counts = Counter(row["task"] for row in _rows(corpus / "dev.jsonl"))
    registry = default_registry()
    assert set(report["tasks"]) == set(dev_counts)
    for task, entry in report["tasks"].items():
        assert entry["metric"] == registry.get(task).metric
        assert entry["examples"] == min(2, dev_counts[task])
        assert entry["value"] is None or isinstance(entry["value"], float)
        assert entry["samples"] and all(s["task"] == task for s in entry["samples"])
    assert report["global_step"] == 3 and report["loaded_groups"]["checkpoint"] == ["layer_weights", "downsampler", "projection"]

    predictions = _rows(run.run_dir / "eval" / "dev.predictions.jsonl")
    assert len(predictions) == report["examples"] == sum(min(2, n) for n in dev_counts.values())
    assert set(predictions[0]) >= {"id", "task", "instruction", "target", "prediction"}
    for task, entry in report["tasks"].items():  # the table on stdout: one row per task
        assert any(line.split("│")[1:3] and task in line and entry["metric"] in line for line in result.stdout.splitlines())


def test_predictions_are_what_the_trained_model_generates(stage1, corpus, tmp_path):
    """From a checkpoint path, with held-out instructions, one example per batch: each prediction equals
    `SpeechLLM.generate` of the trained model in memory on that example and instruction."""
    cfg, run = stage1
    out = tmp_path / "heldout.json"
    result = _eval(str(run.run_dir / "checkpoints" / "last.ckpt"), "--heldout-instructions", "--max-examples", "1",
                   "--max-batch-size", "1", "--max-new-tokens", MAX_NEW_TOKENS, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["heldout_instructions"] is True

    registry = default_registry()
    rows = {row["id"]: row for row in _rows(corpus / "dev.jsonl")}
    predictions = _rows(tmp_path / "heldout.predictions.jsonl")
    model = run.module.model.eval()
    for p in predictions:
        task, row = registry.get(p["task"]), rows[p["id"]]
        assert p["instruction"] in {task.render(t, row) for t in task.heldout_templates}
        wave, _ = load_audio(corpus / row["audio"], cfg.model.encoder.sample_rate)
        with torch.inference_mode():
            expected = model.generate(wave[None], torch.ones_like(wave[None], dtype=torch.bool), [p["instruction"]],
                                      max_new_tokens=int(MAX_NEW_TOKENS))
        assert p["prediction"] == expected[0], p["id"]


def test_eval_errors_are_one_line(stage1, tmp_path, capsys):
    cfg, run = stage1
    assert main(["eval", str(tmp_path / "no_such_run")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'no_such_run'}: no run directory or checkpoint there\n"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "x.wav", "task": "asr", "target": "hi"}\n')
    assert main(["eval", str(run.run_dir), "--manifest", str(bad), "--out", str(tmp_path / "bad.json")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the validation progress bar
    assert error.startswith("error: 1 bad example(s), first ") and f"{bad}:1: audio file not found" in error
    assert not (tmp_path / "bad.json").exists()
