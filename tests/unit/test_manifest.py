"""Specification of manifest validation: one reason per bad row at its line, real audio files, a per-file cache."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.data.manifest import ManifestError, Problem, read_manifest, validate_manifests
from speechllm.data.tasks import TaskError, default_registry
from tests.conftest import REPO, speechllm_command


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16",
              data: np.ndarray | None = None) -> Path:
    """A real sine-tone file (or the given samples)."""
    if data is None:
        t = np.arange(int(seconds * rate)) / rate
        data = np.stack([0.3 * np.sin(2 * np.pi * 220 * (c + 1) * t) for c in range(channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data.astype(np.float32), rate, subtype=subtype)
    return path


def write_manifest(path: Path, rows: list[dict | str]) -> Path:
    """Rows as JSON lines; a str is written verbatim (broken JSON, blank lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def validate(*paths, **options):
    return validate_manifests([str(p) for p in paths], default_registry(),
                              **{"sample_rate": 16000, "max_duration": 30.0, **options})


@pytest.fixture
def audio(tmp_path) -> Path:
    """Good and broken audio files next to the manifests."""
    folder = tmp_path / "audio"
    write_wav(folder / "good.wav")
    whole = (folder / "good.wav").read_bytes()
    (folder / "cut.wav").write_bytes(whole[: len(whole) // 2])  # data chunk cut mid-way
    (folder / "garbage.wav").write_bytes(b"not audio at all" * 8)
    write_wav(folder / "empty.wav", data=np.zeros((0, 1)))
    nan = np.full((8000, 1), 0.1)
    nan[100] = np.nan
    write_wav(folder / "nan.wav", subtype="FLOAT", data=nan)
    return folder


def row(audio: str = "audio/good.wav", task: str = "asr", target: str = "hello world", **extra) -> dict:
    return {"audio": audio, "task": task, "target": target, **extra}


def unknown_task_message(name: str) -> str:
    with pytest.raises(TaskError) as err:
        default_registry().get(name)
    return str(err.value)


BAD_ROWS = {
    "invalid_json": (
        '{"audio": "audio/good.wav", "task": "asr"', "invalid JSON (Expecting ',' delimiter at column 42)"
    ),
    "not_an_object": ('["audio/good.wav", "asr", "hi"]', "expected a JSON object, got an array"),
    "missing_target": ({"audio": "audio/good.wav", "task": "asr"}, "missing field 'target'"),
    "wrong_type": (row(target=3), "field 'target' must be a string, got a number"),
    "bad_duration": (row(duration="1s"), 'field \'duration\' must be a positive number of seconds, got "1s"'),
    "unknown_task": (row(task="dance"), unknown_task_message("dance")),
    "empty_target": (row(target="  "), "empty target"),
    "task_field_missing": (
        row(task="st"), "task 'st' needs field 'target_language' for its instructions (or an explicit 'instruction')"
    ),
    "duplicate_id": (row(id="u1"), "duplicate id 'u1' (first at {manifest}:1)"),
    "audio_missing": (row(audio="audio/nowhere.wav"), "audio file not found: {audio}/nowhere.wav"),
    "truncated": (
        row(audio="audio/cut.wav"), "truncated audio (the file holds less than its header promises): {audio}/cut.wav"
    ),
    "unreadable": (row(audio="audio/garbage.wav"), "unreadable audio (Format not recognised.): {audio}/garbage.wav"),
    "zero_length": (row(audio="audio/empty.wav"), "zero-length audio: {audio}/empty.wav"),
    "non_finite": (row(audio="audio/nan.wav"), "non-finite samples (NaN or inf) in audio: {audio}/nan.wav"),
    "duration_off": (row(duration=1.2), "duration 1.2s is off by more than 10% from the audio's 1.00s"),
    "too_long": (row(duration=1.0, id="long"), "audio is 1.00s long, over max_duration 0.5s: {audio}/good.wav"),
}


@pytest.mark.parametrize("bad, reason", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_each_bad_row_is_reported_at_its_line_with_its_reason(tmp_path, audio, bad, reason):
    good = row(id="u1", duration=1.0)
    manifest = write_manifest(tmp_path / "train.jsonl", [good, "", bad, "   "])
    max_duration = 0.5 if "max_duration" in reason else 30.0
    report = validate(manifest, max_duration=max_duration)
    expected = f"{manifest}:3: " + reason.format(manifest=manifest, audio=audio)
    assert [str(p) for p in report.problems if p.line == 3] == [expected]
    assert report.rows == 2  # blank lines are not rows
    assert report.problems[-1] == Problem(str(manifest), 3, expected.split(": ", 1)[1])


def test_missing_duration_is_a_problem_only_when_required(tmp_path, audio):
    manifest = write_manifest(tmp_path / "dev.jsonl", [row(duration=1.0), row()])
    assert [str(p) for p in validate(manifest, require_duration=True).problems] == [
        f"{manifest}:2: missing field 'duration'"
    ]
    assert validate(manifest).problems == []


def test_a_row_with_several_problems_reports_the_first(tmp_path, audio):
    manifest = write_manifest(tmp_path / "m.jsonl", [row(task="dance", target="", audio="audio/nowhere.wav")])
    assert [p.reason for p in validate(manifest).problems] == [unknown_task_message("dance")]


def test_clean_manifest_resolves_paths_and_counts_stereo_and_resampled(tmp_path):
    mono = write_wav(tmp_path / "corpus" / "wavs" / "mono.wav", seconds=1.0)
    stereo = write_wav(tmp_path / "corpus" / "wavs" / "stereo.wav", seconds=2.0, channels=2)
    narrow = write_wav(tmp_path / "elsewhere" / "narrow.wav", seconds=0.5, rate=8000)
    manifest = write_manifest(tmp_path / "corpus" / "train.jsonl", [
        row(audio="wavs/mono.wav", task="ASR", duration=1.0),
        row(audio="wavs/stereo.wav", task="st", target="hallo", target_language="German", labels=["a"], id="x7"),
        "",
        row(audio=str(narrow), task="st", target="bonjour", instruction="Translate this into French."),
    ])
    report = validate(manifest)
    assert report.problems == []
    assert (report.rows, report.stereo, report.resampled, report.durations_filled) == (3, 1, 1, 2)
    assert report.audio_seconds == pytest.approx(3.5)
    first, second, third = report.examples
    assert [e.audio for e in report.examples] == [str(mono), str(stereo), str(narrow)]
    assert (first.id, first.task, first.source, first.instruction, first.fields) == (
        "train:1", "asr", f"{manifest}:1", None, {}
    )
    assert (second.id, second.fields, second.duration) == ("x7", {"target_language": "German", "labels": ["a"]}, 2.0)
    assert (third.id, third.source, third.instruction) == ("train:4", f"{manifest}:4", "Translate this into French.")
    assert report.summary() == "3 rows: 3 good, 0 bad, 0.00 h of audio, 1 stereo mixed down, 1 resampled"


def test_duration_is_filled_from_the_audio_and_a_close_one_is_replaced_by_the_measured(tmp_path, audio):
    manifest = write_manifest(tmp_path / "m.jsonl", [row(), row(duration=1.05)])
    report = validate(manifest)
    assert [e.duration for e in report.examples] == [1.0, 1.0]
    assert report.durations_filled == 1


def test_without_audio_checks_no_file_is_opened_and_durations_come_from_the_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "SoundFile", None)
    manifest = write_manifest(tmp_path / "m.jsonl", [row(audio="a.wav", duration=2.5), row(audio="b.wav")])
    report = validate(manifest, check_audio=False)
    assert [e.duration for e in report.examples] == [2.5]
    assert [str(p) for p in report.problems] == [
        f"{manifest}:2: missing field 'duration' (needed when audio is not checked)"
    ]


def test_unchanged_manifest_is_validated_again_without_opening_audio(tmp_path, audio, monkeypatch):
    manifest = write_manifest(tmp_path / "m.jsonl", [row(), row(audio="audio/nan.wav"), row(id="again")])
    first = validate(manifest, cache_dir=tmp_path / "cache")
    assert first.audio_files_read == 2  # the same file twice is read once

    def no_audio(*args, **kwargs):
        raise AssertionError("audio opened although the cache knows the file")

    monkeypatch.setattr(sf, "SoundFile", no_audio)
    second = validate(manifest, cache_dir=tmp_path / "cache")
    assert second.audio_files_read == 0
    assert (second.examples, second.problems) == (first.examples, first.problems)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        next((tmp_path / "cache").glob("m-*.json")).name  # one file, no temp files left behind
    ]


def test_only_a_rewritten_or_touched_file_is_read_again(tmp_path):
    a = write_wav(tmp_path / "a.wav")
    b = write_wav(tmp_path / "b.wav")
    manifest = write_manifest(tmp_path / "m.jsonl", [row(audio="a.wav"), row(audio="b.wav")])
    assert validate(manifest, cache_dir=tmp_path / "cache").audio_files_read == 2

    write_wav(a, seconds=2.0)
    report = validate(manifest, cache_dir=tmp_path / "cache")
    assert report.audio_files_read == 1
    assert [e.duration for e in report.examples] == [2.0, 1.0]

    stat = b.stat()
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert validate(manifest, cache_dir=tmp_path / "cache").audio_files_read == 1
    assert validate(manifest, cache_dir=tmp_path / "cache").audio_files_read == 0


def test_a_damaged_cache_file_is_ignored(tmp_path, audio):
    manifest = write_manifest(tmp_path / "m.jsonl", [row()])
    validate(manifest, cache_dir=tmp_path / "cache")
    next((tmp_path / "cache").glob("*.json")).write_text('{"version": 1, "fil')
    report = validate(manifest, cache_dir=tmp_path / "cache")
    assert (report.audio_files_read, len(report.examples)) == (1, 1)


def test_missing_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match=r"nowhere\.jsonl: manifest not found$"):
        read_manifest(tmp_path / "nowhere.jsonl")
    with pytest.raises(ManifestError, match="manifest not found"):
        validate(tmp_path / "nowhere.jsonl")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(speechllm_command(*args), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_validate_lists_problems_and_summary_and_exits_1_for_a_bad_manifest(tmp_path, audio):
    manifest = write_manifest(tmp_path / "m.jsonl", [row(), "{oops", row(audio="audio/nan.wav")])
    result = run_cli("data", "validate", "--allow-missing-duration", str(manifest))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"{manifest}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{manifest}:3: non-finite samples (NaN or inf) in audio: {audio}/nan.wav",
        "3 rows: 1 good, 2 bad, 0.00 h of audio, 0 stereo mixed down, 0 resampled",
    ]


def test_cli_validate_exits_0_for_a_good_manifest_and_1_for_a_missing_one(tmp_path, audio):
    manifest = write_manifest(tmp_path / "m.jsonl", [row(), row(task="ic", target="play_music")])
    strict = run_cli("data", "validate", str(manifest))  # durations are required by default
    assert strict.returncode == 1 and strict.stdout.startswith(f"{manifest}:1: missing field 'duration'")
    result = run_cli("data", "validate", "--allow-missing-duration", str(manifest))
    assert (result.returncode, result.stdout.splitlines()[-1]) == (
        0, "2 rows: 2 good, 0 bad, 0.00 h of audio, 0 stereo mixed down, 0 resampled"
    )
    missing = run_cli("data", "validate", str(tmp_path / "nowhere.jsonl"))
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: {tmp_path}/nowhere.jsonl: manifest not found"


def test_transcripts_as_asr_adds_one_asr_example_per_clip_with_a_transcript():
    from speechllm.data.manifest import Example, transcripts_as_asr

    def row(id, audio, task, target, **fields):
        return Example(id, audio, task, target, None, 1.0, fields, f"m.jsonl:{id}")

    examples = [
        row("a", "/c/1.wav", "ic", "lights_on", transcript="Turn on the lights, please!"),
        row("b", "/c/1.wav", "sf", "device: lights", transcript="Turn on the lights, please!"),  # SLURP: same clip
        row("c", "/c/2.wav", "asr", "hello there"),
        row("d", "/c/2.wav", "st", "Hallo", transcript="Hello there."),  # the clip has an ASR row already
        row("e", "/c/3.wav", "sns", "noise"),  # nothing spoken
        row("f", "/c/4.wav", "kws", "up", transcript=" ,  ", labels=["up"]),  # nothing left to transcribe
    ]
    derived = transcripts_as_asr(examples)
    assert [(e.id, e.audio, e.task, e.target, e.instruction, e.fields) for e in derived] == [
        ("a/asr", "/c/1.wav", "asr", "turn on the lights please", None, {})]
