"""Training from the encoder feature cache: built lazily, the same losses as from audio; `speechllm data cache`."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import REPO, run_overrides
from speechllm.cli import main
from speechllm.config import load_config
from speechllm.model.speech_llm import SpeechLLM
from speechllm.training.run import train


def _losses(run_dir) -> dict[str, list[float]]:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in ("train/loss", "val/loss")}


def test_training_from_the_cache_matches_training_from_audio(corpus, tmp_path, monkeypatch):
    encoded_from_audio = []
    encode_audio = SpeechLLM.encode_audio
    monkeypatch.setattr(SpeechLLM, "encode_audio", lambda self, *a: encoded_from_audio.append(1) or encode_audio(self, *a))

    def run(name: str, *extra: str):
        overrides = run_overrides(corpus, tmp_path, f"run_name={name}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                  "wandb.mode=disabled", *extra)
        return train(load_config(REPO / "stages/stage1.yaml", overrides))

    from_audio = run("audio")
    assert encoded_from_audio, "the reference run must run the encoder"
    encoded_from_audio.clear()
    from_cache = run("cached", f"data.feature_cache={tmp_path / 'features'}")
    assert not encoded_from_audio, "every batch of the cached run should come from the cache"

    # Built lazily, before fitting: the stage's task (asr) in train, and the dev examples it validates on.
    (cache_dir,) = (tmp_path / "features").iterdir()
    indexed = {path for index in cache_dir.glob("shard-*.json") for path in json.loads(index.read_text())["clips"]}
    assert len(indexed) == 12 + 4 and all("-asr-" in path for path in indexed)
    audio, cached = _losses(from_audio.run_dir), _losses(from_cache.run_dir)
    assert len(audio["train/loss"]) == 2 and len(audio["val/loss"]) == 1
    for key in audio:
        assert cached[key] == pytest.approx(audio[key], rel=1e-3)


def _small_corpus(corpus, out, rows_per_split):
    """Manifests with the first ASR rows of the session corpus (absolute audio paths)."""
    for split, count in rows_per_split.items():
        rows = [json.loads(line) for line in (corpus / f"{split}.jsonl").read_text().splitlines()]
        rows = [r | {"audio": str(corpus / r["audio"])} for r in rows if r["task"] == "asr"][:count]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cache_command_reports_the_size_first_builds_then_skips_everything(corpus, tmp_path, capsys):
    _small_corpus(corpus, tmp_path, {"train": 5, "dev": 2})
    command = ["data", "cache", str(REPO / "stages/stage1.yaml"), f"output_dir={tmp_path / 'runs'}",
               f"data.train_manifests=[{tmp_path / 'train.jsonl'}]", f"data.dev_manifests=[{tmp_path / 'dev.jsonl'}]",
               f"data.feature_cache={tmp_path / 'features'}"]

    assert main([*command, "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "7 of 7 clips to encode" in out and "B on disk (float16, 4 layers x 64 dims" in out and "free" in out
    assert not list((tmp_path / "features").glob("*/shard-*")), "--estimate encodes nothing"

    assert main(command) == 0
    out = capsys.readouterr().out
    assert out.index("on disk") < out.index("encoded 7 clip(s)")
    assert main(command) == 0
    assert "all 7 clips already cached" in capsys.readouterr().out


def test_cache_command_without_a_cache_directory_is_one_line_naming_the_key(capsys):
    assert main(["data", "cache", str(REPO / "stages/stage1.yaml")]) == 2
    assert "data.feature_cache" in capsys.readouterr().err
