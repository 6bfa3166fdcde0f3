"""Specification of the dataset converters: tiny trees in each dataset's own layout, real audio files,
manifests whose rows are exactly what the task formats ask for, and that pass validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.data.converters import CONVERTERS, LANGUAGE_NAMES, ConverterError, prepare, slots
from speechllm.data.manifest import validate_manifests
from speechllm.data.tasks import default_registry

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def write_audio(path: Path, frames: int = 16000, rate: int = 16000) -> Path:
    """A real sine tone; the format follows the suffix (.flac, .wav)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(frames) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


def assert_valid(manifest: Path) -> None:
    report = validate_manifests([manifest], default_registry(), sample_rate=16000, max_duration=30.0,
                                require_duration=True)
    assert [str(p) for p in report.problems] == []
    assert len(report.examples) == len(rows(manifest))


# --- LibriSpeech ---------------------------------------------------------------------------------------


@pytest.fixture
def librispeech(tmp_path) -> Path:
    """LibriSpeech/{train-clean-100,dev-clean}/<speaker>/<chapter>/ as the archives unpack."""
    root = tmp_path / "LibriSpeech"
    chapter = root / "train-clean-100" / "19" / "198"
    write_lines(chapter / "19-198.trans.txt", [
        "19-198-0000 NORTHANGER ABBEY",
        "19-198-0001 THAT'S WHAT  SHE SAID",
        "19-198-0002 NO AUDIO FOR THIS ONE",
    ])
    write_audio(chapter / "19-198-0000.flac", frames=16000)
    write_audio(chapter / "19-198-0001.flac", frames=12345, rate=8000)
    dev = root / "dev-clean" / "84" / "121123"
    write_lines(dev / "84-121123.trans.txt", ["84-121123-0000 GO DO YOU HEAR"])
    write_audio(dev / "84-121123-0000.flac", frames=8000)
    return root


def test_librispeech_rows_are_lowercase_transcripts_with_audio_relative_to_the_manifest(librispeech, tmp_path):
    out = tmp_path / "manifests" / "ls" / "train.jsonl"  # parent directories do not exist yet
    report = prepare("librispeech", librispeech, out, subset="train-clean-100")

    audio = "../../LibriSpeech/train-clean-100/19/198"
    assert rows(out) == [
        {"id": "19-198-0000", "audio": f"{audio}/19-198-0000.flac", "task": "asr", "target": "northanger abbey",
         "duration": 1.0},
        {"id": "19-198-0001", "audio": f"{audio}/19-198-0001.flac", "task": "asr", "target": "that's what she said",
         "duration": 1.543},  # 12345 frames at 8 kHz, 3 decimals
    ]
    assert report.rows == {"asr": 2}
    assert report.skipped == {"audio file not found": 1}
    assert report.skipped_examples["audio file not found"] == [
        str(librispeech / "train-clean-100/19/198/19-198-0002.flac")]
    assert_valid(out)


def test_librispeech_root_may_be_the_subset_itself_or_name_several(librispeech, tmp_path):
    prepare("librispeech", librispeech / "dev-clean", tmp_path / "dev.jsonl")
    assert [row["target"] for row in rows(tmp_path / "dev.jsonl")] == ["go do you hear"]

    report = prepare("librispeech", librispeech.parent, tmp_path / "both.jsonl", subset="dev-clean,train-clean-100")
    assert report.rows == {"asr": 3}


def test_librispeech_with_several_subsets_and_none_chosen_names_them(librispeech, tmp_path):
    with pytest.raises(ConverterError, match="holds subsets dev-clean, train-clean-100; choose with subset="):
        prepare("librispeech", librispeech, tmp_path / "x.jsonl")


# --- CoVoST 2 ------------------------------------------------------------------------------------------

TSV_HEADER = "path\tsentence\ttranslation\tclient_id"


@pytest.fixture
def common_voice(tmp_path) -> Path:
    """A Common Voice language directory whose mp3 clips were converted to wav (same stems)."""
    root = tmp_path / "cv" / "en"
    write_audio(root / "clips" / "common_voice_en_1.wav", frames=24000)
    write_audio(root / "clips" / "common_voice_en_2.wav", frames=16000)
    write_lines(root / "covost_v2.en_de.train.tsv", [
        TSV_HEADER,
        'common_voice_en_1.mp3\tHe said "hello".\tEr sagte "hallo".\tc1',  # no quoting in CoVoST's TSVs
        "common_voice_en_2.mp3\tTurn it off.\tMach es aus.\tc2",
        "common_voice_en_3.mp3\tNot downloaded.\tNicht geladen.\tc3",
    ])
    return root


def test_covost2_rows_translate_into_the_named_target_language(common_voice, tmp_path):
    out = tmp_path / "st.jsonl"
    report = prepare("covost2", common_voice, out)

    assert rows(out) == [
        {"id": "common_voice_en_1", "audio": "cv/en/clips/common_voice_en_1.wav", "task": "st",
         "target": 'Er sagte "hallo".', "duration": 1.5, "target_language": "German",
         "transcript": 'He said "hello".'},
        {"id": "common_voice_en_2", "audio": "cv/en/clips/common_voice_en_2.wav", "task": "st",
         "target": "Mach es aus.", "duration": 1.0, "target_language": "German", "transcript": "Turn it off."},
    ]
    assert report.skipped == {"audio file not found": 1}
    assert_valid(out)


def test_covost2_reads_the_unsplit_release_tsv_by_its_split_column(tmp_path):
    root = tmp_path / "ja"
    write_audio(root / "clips" / "a.wav")
    write_audio(root / "clips" / "b.wav")
    write_audio(root / "clips" / "c.wav")
    write_lines(tmp_path / "tsv" / "covost_v2.en_ja.tsv", [
        "path\ttranslation\tsplit", "a.mp3\tこんにちは\ttrain", "b.mp3\tさようなら\ttrain_covost",
        "c.mp3\tはい\tdev"])

    out = tmp_path / "st.jsonl"
    prepare("covost2", root, out, target_lang="ja", split="train", tsv_dir=str(tmp_path / "tsv"))
    assert [(r["id"], r["target"], r["target_language"]) for r in rows(out)] == [
        ("a", "こんにちは", "Japanese"), ("b", "さようなら", "Japanese")]
    assert_valid(out)


def test_covost2_language_names_cover_its_target_languages_and_keep_other_codes():
    assert LANGUAGE_NAMES["zh-CN"] == "Chinese" and LANGUAGE_NAMES["sv-SE"] == "Swedish"
    assert len({"de", "ja", "zh-CN", "fr", "es", "ca", "fa", "ar", "et", "mn", "tr", "lv", "sl", "sv-SE", "ta",
                "id", "cy"} - set(LANGUAGE_NAMES)) == 0


def test_covost2_without_the_split_tsv_names_it(common_voice, tmp_path):
    with pytest.raises(ConverterError, match=f"expected {common_voice}/covost_v2.en_de.dev.tsv"):
        prepare("covost2", common_voice, tmp_path / "x.jsonl", split="dev")


# --- SLURP ---------------------------------------------------------------------------------------------


@pytest.fixture
def slurp(tmp_path) -> Path:
    """A SLURP checkout: dataset/slurp/<split>.jsonl, audio unpacked into audio/slurp_real."""
    root = tmp_path / "slurp"
    entries = [
        {"slurp_id": 1, "sentence": "wake me up at five am this week",
         "sentence_annotation": "wake me up at [time : five am] [date : this week]", "intent": "alarm_set",
         "recordings": [{"file": "audio-1-headset.flac"}, {"file": "audio-1.flac"}]},
        {"slurp_id": 2, "sentence": "how many unread emails do i have",
         "sentence_annotation": "how many unread emails do i have", "intent": "email_query",
         "recordings": [{"file": "audio-2.flac"}]},
    ]
    write_lines(root / "dataset" / "slurp" / "devel.jsonl", [json.dumps(e) for e in entries])
    write_audio(root / "audio" / "slurp_real" / "audio-1-headset.flac", frames=20000)
    write_audio(root / "audio" / "slurp_real" / "audio-2.flac", frames=16000)
    return root


def test_slurp_gives_an_intent_row_and_a_slot_row_per_recording(slurp, tmp_path):
    out = tmp_path / "slurp_dev.jsonl"
    report = prepare("slurp", slurp, out, split="devel")

    audio = "slurp/audio/slurp_real"
    assert rows(out) == [
        {"id": "audio-1-headset-ic", "audio": f"{audio}/audio-1-headset.flac", "task": "ic", "target": "alarm_set",
         "duration": 1.25, "transcript": "wake me up at five am this week"},
        {"id": "audio-1-headset-sf", "audio": f"{audio}/audio-1-headset.flac", "task": "sf",
         "target": "time: five am; date: this week", "duration": 1.25, "transcript": "wake me up at five am this week"},
        {"id": "audio-2-ic", "audio": f"{audio}/audio-2.flac", "task": "ic", "target": "email_query", "duration": 1.0,
         "transcript": "how many unread emails do i have"},
        {"id": "audio-2-sf", "audio": f"{audio}/audio-2.flac", "task": "sf", "target": "none", "duration": 1.0,
         "transcript": "how many unread emails do i have"},
    ]
    assert report.rows == {"ic": 2, "sf": 2}
    assert report.skipped == {"audio file not found": 2}  # audio-1.flac: its ic row and its sf row
    assert_valid(out)


def test_slurp_tasks_option_and_dev_alias(slurp, tmp_path):
    report = prepare("slurp", slurp, tmp_path / "ic.jsonl", split="dev", tasks="ic")
    assert report.rows == {"ic": 2}
    assert {row["task"] for row in rows(tmp_path / "ic.jsonl")} == {"ic"}


def test_slurp_audio_may_lie_directly_under_root(slurp, tmp_path):
    (slurp / "audio" / "slurp_real").rename(slurp / "slurp_real")
    out = tmp_path / "slurp_dev.jsonl"
    prepare("slurp", slurp, out, split="devel", tasks="sf")
    assert [row["audio"] for row in rows(out)] == [
        "slurp/slurp_real/audio-1-headset.flac", "slurp/slurp_real/audio-2.flac"]
    assert_valid(out)


def test_slurp_slots_keep_annotation_order_and_squeeze_spaces():
    assert slots("wake me up at [time : five am] this week") == "time: five am"
    assert slots("call [person : raju] [personal_info :  phone  number]") == (
        "person: raju; personal_info: phone number")
    assert slots("how many unread emails do i have") == "none"


# --- Speech Commands -----------------------------------------------------------------------------------


@pytest.fixture
def speech_commands(tmp_path) -> Path:
    root = tmp_path / "speech_commands_v0.02"
    for name in ("yes/aaa_nohash_0", "yes/bbb_nohash_0", "cat/ccc_nohash_1", "cat/ddd_nohash_0", "off/eee_nohash_0"):
        write_audio(root / f"{name}.wav", frames=16000)
    write_audio(root / "_background_noise_" / "white_noise.wav", frames=16000 * 3)
    write_lines(root / "validation_list.txt", ["yes/bbb_nohash_0.wav"])
    write_lines(root / "testing_list.txt", ["cat/ddd_nohash_0.wav"])
    return root


def test_speech_commands_folds_non_keywords_into_none_and_skips_background_noise(speech_commands, tmp_path):
    out = tmp_path / "kws_train.jsonl"
    report = prepare("speech_commands", speech_commands, out, split="train")

    audio = "speech_commands_v0.02"
    assert rows(out) == [
        {"id": "cat/ccc_nohash_1", "audio": f"{audio}/cat/ccc_nohash_1.wav", "task": "kws", "target": "none",
         "duration": 1.0, "labels": KEYWORDS},
        {"id": "off/eee_nohash_0", "audio": f"{audio}/off/eee_nohash_0.wav", "task": "kws", "target": "off",
         "duration": 1.0, "labels": KEYWORDS},
        {"id": "yes/aaa_nohash_0", "audio": f"{audio}/yes/aaa_nohash_0.wav", "task": "kws", "target": "yes",
         "duration": 1.0, "labels": KEYWORDS},
    ]
    assert report.skipped == {}
    assert_valid(out)


def test_speech_commands_split_lists_and_own_keywords(speech_commands, tmp_path):
    prepare("speech_commands", speech_commands, tmp_path / "dev.jsonl", split="dev")
    assert [row["id"] for row in rows(tmp_path / "dev.jsonl")] == ["yes/bbb_nohash_0"]

    prepare("speech_commands", speech_commands, tmp_path / "test.jsonl", split="test", keywords="cat,dog")
    assert rows(tmp_path / "test.jsonl")[0] | {"audio": None} == {
        "id": "cat/ddd_nohash_0", "audio": None, "task": "kws", "target": "cat", "duration": 1.0,
        "labels": ["cat", "dog"]}
    assert_valid(tmp_path / "test.jsonl")

    for listing in ("validation_list.txt", "testing_list.txt"):  # as in the separately released test set
        (speech_commands / listing).unlink()
    report = prepare("speech_commands", speech_commands, tmp_path / "all.jsonl", split="all")
    assert report.rows == {"kws": 5}


# --- CSV / TSV -----------------------------------------------------------------------------------------


@pytest.fixture
def emotions(tmp_path) -> Path:
    """An IEMOCAP-like TSV of emotion codes, audio paths relative to it."""
    root = tmp_path / "iemocap"
    for name in ("s1.wav", "s2.wav", "s3.wav"):
        write_audio(root / "wav" / name, frames=16000)
    return write_lines(root / "labels.tsv", [
        "utt\tpath\temotion", "u1\twav/s1.wav\tang", "u2\twav/s2.wav\tHap", "u3\twav/s3.wav\tfru",
        "u4\twav/missing.wav\tsad"])


def test_csv_maps_labels_and_counts_those_outside_the_task_label_set(emotions, tmp_path):
    out = tmp_path / "er.jsonl"
    report = prepare("csv", emotions, out, task="er", target_column="emotion", id_column="utt",
                     label_map="ang:angry,Hap:happy")

    assert rows(out) == [
        {"id": "u1", "audio": "iemocap/wav/s1.wav", "task": "er", "target": "angry", "duration": 1.0},
        {"id": "u2", "audio": "iemocap/wav/s2.wav", "task": "er", "target": "happy", "duration": 1.0},
    ]
    assert report.skipped == {"label 'fru' not in task 'er' labels (neutral, happy, sad, angry)": 1,
                              "audio file not found": 1}
    assert report.rows == {"er": 2}
    assert_valid(out)


def test_csv_autodetects_columns_for_open_ended_tasks_and_takes_audio_root(tmp_path):
    write_audio(tmp_path / "clips" / "dog.flac", frames=16000)
    table = write_lines(tmp_path / "meta" / "captions.csv", ["file,caption", 'dog.flac,"A dog barks, twice."'])

    out = tmp_path / "ac.jsonl"
    prepare("csv", table, out, task="ac", audio_root=str(tmp_path / "clips"))
    assert rows(out) == [{"audio": "clips/dog.flac", "task": "ac", "target": "A dog barks, twice.", "duration": 1.0}]
    assert_valid(out)


def test_csv_fills_task_fields_from_mapped_columns(tmp_path):
    write_audio(tmp_path / "a.wav")
    table = write_lines(tmp_path / "st.csv", ["audio,target,lang", "a.wav,Bonjour,French"])
    with pytest.raises(ConverterError, match="task 'st' needs field 'target_language'; map a column to it with"):
        prepare("csv", table, tmp_path / "st.jsonl", task="st")

    prepare("csv", table, tmp_path / "st.jsonl", task="st", columns="target_language:lang")
    assert rows(tmp_path / "st.jsonl")[0]["target_language"] == "French"
    assert_valid(tmp_path / "st.jsonl")


def test_csv_task_is_required_and_must_be_registered(emotions, tmp_path):
    with pytest.raises(ConverterError, match="csv: option 'task' is required"):
        prepare("csv", emotions, tmp_path / "x.jsonl")
    with pytest.raises(ConverterError, match="csv: unknown task 'emotion' \\(known: asr, st,"):
        prepare("csv", emotions, tmp_path / "x.jsonl", task="emotion")
    with pytest.raises(ConverterError, match="csv: option 'columns' cannot set 'target'"):
        prepare("csv", emotions, tmp_path / "x.jsonl", task="er", target_column="emotion", columns="target:utt")


# --- prepare: errors, skips, writing -------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ConverterError) as err:
        prepare("timit", tmp_path, tmp_path / "x.jsonl")
    assert str(err.value) == "unknown dataset 'timit' (known: librispeech, covost2, slurp, speech_commands, csv)"
    assert set(CONVERTERS) == {"librispeech", "covost2", "slurp", "speech_commands", "csv"}


@pytest.mark.parametrize("dataset, expected", [
    ("librispeech", "expected {root}/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt"),
    ("covost2", "expected the Common Voice clips directory {root}/clips"),
    ("slurp", "expected {root}/dataset/slurp/train.jsonl"),
    ("speech_commands", "expected {root}/validation_list.txt"),
    ("csv", "expected --root to be a CSV/TSV file, {root} is not a file"),
])
def test_a_root_in_another_layout_is_refused_naming_the_expected_path(dataset, expected, tmp_path):
    root = tmp_path / "elsewhere"
    write_audio(root / "some" / "clip.wav")
    with pytest.raises(ConverterError) as err:
        prepare(dataset, root, tmp_path / "x.jsonl", **({"task": "er"} if dataset == "csv" else {}))
    assert expected.format(root=root) in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x.jsonl").exists()


def test_options_are_checked_and_converted_from_strings(speech_commands, tmp_path):
    with pytest.raises(ConverterError, match="speech_commands: unknown option 'keyword' \\(known: split, keywords, "
                                             "max_duration, workers\\)"):
        prepare("speech_commands", speech_commands, tmp_path / "x.jsonl", keyword="yes")
    with pytest.raises(ConverterError, match="option 'max_duration=long': expected a number"):
        prepare("speech_commands", speech_commands, tmp_path / "x.jsonl", max_duration="long")
    with pytest.raises(ConverterError, match="option 'split' is 'validation'; choose one of train, dev, test, all"):
        prepare("speech_commands", speech_commands, tmp_path / "x.jsonl", split="validation")
    with pytest.raises(ConverterError, match="option 'label_map=ang-angry': expected key:value pairs"):
        prepare("csv", tmp_path / "x.csv", tmp_path / "x.jsonl", task="er", label_map="ang-angry")


def test_long_unreadable_and_empty_audio_is_skipped_and_counted(tmp_path):
    write_audio(tmp_path / "ok.wav", frames=16000)
    write_audio(tmp_path / "long.wav", frames=40000)
    write_audio(tmp_path / "empty.wav", frames=0)
    (tmp_path / "garbage.flac").write_bytes(b"not audio at all" * 8)
    table = write_lines(tmp_path / "sns.csv", ["audio,label", *(f"{n},speech" for n in
                                                                 ("ok.wav", "long.wav", "empty.wav", "garbage.flac"))])
    out = tmp_path / "sns.jsonl"
    report = prepare("csv", table, out, task="sns", max_duration="2")

    assert [row["audio"] for row in rows(out)] == ["ok.wav"]
    reasons = dict(report.skipped)
    unreadable = [r for r in reasons if r.startswith("unreadable audio (")]
    assert reasons == {"longer than max_duration 2s": 1, "empty audio": 1, unreadable[0]: 1}
    assert report.skipped_examples["longer than max_duration 2s"] == [f"{tmp_path / 'long.wav'} (2.50s)"]
    assert "skipped 1: longer than max_duration 2s" in report.summary()
    assert_valid(out)

    prepare("csv", table, out, task="sns", max_duration="none")  # none: keep every length
    assert [row["audio"] for row in rows(out)] == ["ok.wav", "long.wav"]


def test_manifest_is_replaced_whole_and_nothing_is_written_when_no_row_survives(speech_commands, tmp_path):
    out = tmp_path / "kws.jsonl"
    out.write_text("old\n")
    prepare("speech_commands", speech_commands, out, split="dev")
    assert len(rows(out)) == 1
    assert sorted(os.listdir(tmp_path)) == ["kws.jsonl", "speech_commands_v0.02"]  # no temporary left

    for clip in speech_commands.glob("yes/*.wav"):
        clip.unlink()
    with pytest.raises(ConverterError, match="speech_commands: no rows to write from .* \\(nothing found"):
        prepare("speech_commands", speech_commands, tmp_path / "new.jsonl", split="dev")
    assert not (tmp_path / "new.jsonl").exists()


def test_cli_prepare_passes_options_and_reports_one_line_errors(speech_commands, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "speechllm.cli", "data", "prepare", *args],
                              capture_output=True, text=True, timeout=120)

    out = tmp_path / "test.jsonl"
    done = cli("speech_commands", "--root", str(speech_commands), "--out", str(out), "--set", "split=test",
               "--set", "keywords=cat,dog")
    assert done.returncode == 0, done.stderr
    assert rows(out)[0]["labels"] == ["cat", "dog"]
    failed = cli("speech_commands", "--root", str(speech_commands), "--out", str(out), "--set", "split=sideways")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("error: ") and "split" in failed.stderr
