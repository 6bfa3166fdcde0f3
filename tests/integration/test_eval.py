"""Evaluation on a short real run that trains LoRA: answers during validation, `speechllm eval` reports,
`speechllm predict` giving eval's answers, one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import LORA_STAGE2_RUN, REPO, run_overrides, speechllm_command
from speechllm.cli import main
from speechllm.config import load_config
from speechllm.data.audio import load_audio
from speechllm.data.tasks import default_registry
from speechllm.evaluation.metrics import task_metrics
from speechllm.evaluation.validation import TABLE_COLUMNS
from speechllm.training.run import train

MAX_NEW_TOKENS = "12"  # short answers keep the runs quick; the checks do not depend on the length
VALIDATED = ("asr", "ic", "sc")
LORA_RUN = (
    *LORA_STAGE2_RUN,
    "eval.generate=true",
    f"eval.max_new_tokens={MAX_NEW_TOKENS}",
    "eval.examples_table=3",
)


@pytest.fixture(scope="module")
def lora_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "stages/stage2.yaml", run_overrides(corpus, out, *LORA_RUN))
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def heldout_eval(lora_run, tmp_path_factory) -> list[dict]:
    """Eval from the checkpoint path, held-out instructions (the old flag), one example of each task per batch."""
    cfg, run = lora_run
    out = tmp_path_factory.mktemp("heldout")
    assert main(["eval", str(run.run_dir / "checkpoints" / "last.ckpt"), "--heldout-instructions", "--max-examples", "1",
                 "--max-batch-size", "1", "--max-new-tokens", MAX_NEW_TOKENS, "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["instructions"] == ["heldout"]
    return _rows(out / "predictions.jsonl")


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(speechllm_command("eval", *args), cwd=REPO, capture_output=True, text=True, timeout=300)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_validation_logs_each_trained_task_metric_and_a_wandb_examples_table(lora_run, corpus):
    cfg, run = lora_run
    with open(run.run_dir / "logs" / "metrics.csv", newline="") as f:
        validations = [row for row in csv.DictReader(f) if row.get("val/loss")]
    assert len(validations) == 1  # at step 3
    expected = {f"val/{task}/{m}" for task in VALIDATED for m in task_metrics(default_registry().get(task).metric)}
    assert expected == {"val/asr/wer", "val/ic/accuracy", "val/ic/macro_f1", "val/sc/accuracy", "val/sc/macro_f1"}
    for key in expected:
        assert float(validations[0][key]) >= 0.0, key

    tables = list((run.run_dir / "wandb").glob("offline-run-*/files/media/table/val/examples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == TABLE_COLUMNS
    targets = {row["id"]: row["target"] for row in _rows(corpus / "dev.jsonl")}
    rows = [dict(zip(TABLE_COLUMNS, row)) for row in table["data"]]
    assert len(rows) == 3 and {r["task"] for r in rows} == set(VALIDATED)  # one of each task, not three ASR clips
    assert all(r["reference"] == targets[r["id"]] and r["step"] == 3 and r["audio"] for r in rows)


def test_eval_writes_every_report_with_seen_and_heldout_columns(lora_run, corpus, tmp_path):
    cfg, run = lora_run
    out = tmp_path / "eval"
    result = _eval(str(run.run_dir), "--instructions", "both", "--max-examples", "1",
                   "--max-new-tokens", MAX_NEW_TOKENS, "--max-new-tokens", "asr=16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.png", "predictions.jsonl", "report.json", "report.md"]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((out / "report.json").read_text())
    dev_counts = Counter(row["task"] for row in _rows(corpus / "dev.jsonl"))
    registry = default_registry()
    assert report["instructions"] == ["seen", "heldout"] and report["global_step"] == 3
    assert report["loaded_groups"]["checkpoint"] == ["layer_weights", "downsampler", "projection", "lora"]
    assert set(report["tasks"]) == set(dev_counts)
    for task, entry in report["tasks"].items():
        metrics = list(task_metrics(registry.get(task).metric))
        assert entry["metric"] == metrics[0] and entry["metrics"] == metrics
        assert entry["examples"] == 1
        assert entry["max_new_tokens"] == (16 if task == "asr" else 12)
        for instruction_set in ("seen", "heldout"):
            assert list(entry[instruction_set]) == metrics
            assert all(v is None or isinstance(v, float) for v in entry[instruction_set].values())
            assert entry["samples"][instruction_set] and all(s["task"] == task for s in entry["samples"][instruction_set])

    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("|")]
    assert table[0] == "| task | metric | examples | seen | held-out |"
    assert sorted(line.split("|")[1].strip() for line in table[2:]) == sorted(dev_counts)  # one row per task
    er_like = next(line for line in table if line.startswith("| ic |"))
    assert "accuracy ↑ / macro_f1 ↑" in er_like and er_like.count(" / ") == 3

    predictions = _rows(out / "predictions.jsonl")
    assert len(predictions) == 2 * report["examples"] == 2 * len(dev_counts)
    rows = {row["id"]: row for row in _rows(corpus / "dev.jsonl")}
    for p in predictions:  # every example once per instruction set, phrased from that set's templates
        task = registry.get(p["task"])
        templates = task.train_templates if p["instructions"] == "seen" else task.heldout_templates
        assert p["instruction"] in {task.render(t, rows[p["id"]]) for t in templates}
    assert Counter(p["id"] for p in predictions) == {p["id"]: 2 for p in predictions}
    for task in dev_counts:  # the table on stdout: one row per task
        assert any(line.split("│")[1:2] and line.split("│")[1].strip() == task for line in result.stdout.splitlines())


def test_eval_answers_are_what_the_trained_model_generates(lora_run, heldout_eval, corpus):
    """Each prediction equals `SpeechLLM.generate` of the trained model in memory on that example and instruction."""
    cfg, run = lora_run
    registry = default_registry()
    rows = {row["id"]: row for row in _rows(corpus / "dev.jsonl")}
    model = run.module.model.eval()
    assert len(heldout_eval) == len({row["task"] for row in rows.values()})
    for p in heldout_eval:
        task, row = registry.get(p["task"]), rows[p["id"]]
        assert p["instructions"] == "heldout"
        assert p["instruction"] in {task.render(t, row) for t in task.heldout_templates}
        wave, _ = load_audio(corpus / row["audio"], cfg.model.encoder.sample_rate)
        with torch.inference_mode():
            expected = model.generate(wave[None], torch.ones_like(wave[None], dtype=torch.bool), [p["instruction"]],
                                      max_new_tokens=int(MAX_NEW_TOKENS))
        assert p["prediction"] == expected[0], p["id"]


def test_predict_prints_the_answer_eval_gave(lora_run, heldout_eval, capsys):
    cfg, run = lora_run
    capsys.readouterr()
    for p in [p for p in heldout_eval if p["task"] in ("asr", "ic")]:
        assert main(["predict", "--ckpt", str(run.run_dir), "--audio", p["audio"], "--instruction", p["instruction"],
                     "--max-new-tokens", MAX_NEW_TOKENS]) == 0
        assert capsys.readouterr().out == p["prediction"] + "\n", p["id"]


def test_predict_answers_a_manifest_in_batches_like_eval(lora_run, heldout_eval, tmp_path, capsys):
    cfg, run = lora_run
    manifest, out = tmp_path / "ask.jsonl", tmp_path / "answers.jsonl"
    manifest.write_text("".join(json.dumps({"id": p["id"], "audio": p["audio"], "task": p["task"],
                                            "instruction": p["instruction"]}) + "\n" for p in heldout_eval))
    assert main(["predict", "--ckpt", str(run.run_dir), "--manifest", str(manifest), "--out", str(out),
                 "--max-new-tokens", MAX_NEW_TOKENS]) == 0
    assert capsys.readouterr().out == f"{len(heldout_eval)} answers written to {out}\n"
    answers = _rows(out)
    assert [a["id"] for a in answers] == [p["id"] for p in heldout_eval]
    assert [a["prediction"] for a in answers] == [p["prediction"] for p in heldout_eval]


def test_predict_errors_are_one_line(lora_run, corpus, tmp_path, capsys):
    cfg, run = lora_run
    wav = next((corpus / "audio").rglob("*.wav"))
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text(json.dumps({"audio": str(wav), "instruction": "Transcribe."}) + "\n"
                            + json.dumps({"audio": str(wav)}) + "\n")
    cases = {
        ("--audio", str(tmp_path / "missing.wav"), "--instruction", "Transcribe."):
            f"error: {tmp_path / 'missing.wav'}: unreadable audio (no such file)",
        ("--audio", str(not_audio), "--instruction", "Transcribe."): f"error: {not_audio}: unreadable audio (",
        ("--audio", str(wav), "--instruction", "  "): "error: --instruction is empty",
        ("--audio", str(wav)): "error: --instruction is empty",
        ("--manifest", str(bad_manifest), "--out", str(tmp_path / "o.jsonl")): f'error: {bad_manifest}:2: needs a non-empty "instruction"',
    }
    for args, start in cases.items():
        assert main(["predict", "--ckpt", str(run.run_dir), *args]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1, err


def test_eval_errors_are_one_line(lora_run, tmp_path, capsys):
    cfg, run = lora_run
    assert main(["eval", str(tmp_path / "no_such_run")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'no_such_run'}: no run directory or checkpoint there\n"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "x.wav", "task": "asr", "target": "hi"}\n')
    assert main(["eval", str(run.run_dir), "--manifest", str(bad), "--out", str(tmp_path / "bad")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the validation progress bar
    assert error.startswith("error: 1 bad example(s), first ") and f"{bad}:1: audio file not found" in error
    assert not (tmp_path / "bad").exists()

    assert main(["eval", str(run.run_dir), "--wer-normalize", "lower,stem"]) == 1
    assert capsys.readouterr().err.startswith("error: --wer-normalize: text normalisation 'lower,stem': unknown step 'stem'")
    assert main(["eval", str(run.run_dir), "--max-new-tokens", "asr=0"]) == 1
    assert capsys.readouterr().err == "error: --max-new-tokens asr=0: expected N or TASK=N with a positive N\n"
    assert main(["eval", str(run.run_dir), "--max-new-tokens", "lid=4"]) == 1
    assert capsys.readouterr().err.startswith("error: --max-new-tokens lid=...: no task 'lid'")
