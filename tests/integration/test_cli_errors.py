"""User mistakes end the run before training with one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from conftest import REPO, run_overrides, speechllm_command


def train(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(speechllm_command("train", *args), cwd=cwd, capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("optim.lrr=0.1", ("command line", "optim.lrr", "not in 'OptimConfig'")),
        ("trainer.max_steps=many", ("command line", "trainer.max_steps", "could not be converted to Integer")),
        ("model.encoder.kind=conformer", ("model.encoder.kind", "not one of wavlm")),
        ("phases.0.train=[lora,decoder]", ("phases[0]", "'decoder' is not one of")),
    ],
)
def test_bad_override_is_a_one_line_config_error(tmp_path, override, fragments):
    assert_one_line_error(train("stages/stage1.yaml", override, f"output_dir={tmp_path}"), 2, *fragments)
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"


def test_unknown_key_in_a_stage_file_names_the_file_and_key(tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text("stage: mine\noptim:\n  lr: 1.0e-3\n  warmup: 5\n")
    assert_one_line_error(train(str(stage)), 2, str(stage), "optim.warmup")
    stage.write_text("stage: mine\noptim:\n  lr: fast\n")
    assert_one_line_error(train(str(stage)), 2, str(stage), "optim.lr", "could not be converted to Float")


def test_bad_manifest_rows_stop_training_naming_manifest_and_line(corpus, tmp_path):
    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()[:3]]
    for row in rows:
        row["audio"] = str(corpus / row["audio"])
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wave file")
    rows += [
        {**rows[0], "id": "missing", "audio": str(tmp_path / "missing.wav")},
        {**rows[0], "id": "unknown-task", "task": "lipreading"},
        {**rows[0], "id": "garbage", "audio": str(tmp_path / "garbage.wav")},
    ]
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = run_overrides(corpus, tmp_path / "runs", f"data.train_manifests=[{manifest}]", "run_name=bad")
    result = train("stages/stage1.yaml", *overrides)
    assert_one_line_error(result, 1, "3 bad example(s) in data.train_manifests")
    stderr = result.stderr.splitlines()
    problems = stderr[stderr.index(next(l for l in stderr if l.startswith("error: "))) + 1:]
    assert problems[0].startswith(f"{manifest}:4: ") and "missing.wav" in problems[0]
    assert problems[1].startswith(f"{manifest}:5: unknown task 'lipreading'")
    assert problems[2].startswith(f"{manifest}:6: ") and "garbage.wav" in problems[2]
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()

    # on_bad_example=skip trains on the good rows and lists the skipped ones in the run directory.
    skipped = train("stages/stage1.yaml", *overrides, "data.on_bad_example=skip", "trainer.max_steps=1")
    assert skipped.returncode == 0, skipped.stderr
    listed = (tmp_path / "runs" / "bad" / "skipped_train_examples.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in listed] == [f"{manifest}:{n}" for n in (4, 5, 6)]
    hparams = yaml.safe_load((tmp_path / "runs" / "bad" / "logs" / "hparams.yaml").read_text())
    assert hparams["data_stats"]["train"] | {"hours": None} == {
        "examples": 3, "skipped": 3, "transcripts_as_asr": 0, "hours": None, "stereo_mixed_down": 0, "resampled": 0}


def test_missing_init_from_fails_fast(tmp_path):
    result = train("stages/stage2.yaml", f"init_from={tmp_path}/no_such_run", f"output_dir={tmp_path}")
    assert_one_line_error(result, 1, f"{tmp_path}/no_such_run")
