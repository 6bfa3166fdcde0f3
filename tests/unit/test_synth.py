import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.config import ConfigError
from speechllm.data.synth import INTENTS, KEYWORDS, MAX_WORDS, SPLITS, SYNTH_TASKS, VARIANTS, synthesize_corpus

SIZES = dict(train_per_task=4, eval_per_task=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synthesize_corpus(out, seed=0, progress=False, **SIZES)


def manifest(out, split):
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def rows_of(out, task=None):
    return [row for split in SPLITS for row in manifest(out, split) if task in (None, row["task"])]


def test_every_row_has_its_16khz_mono_audio_of_the_declared_duration(corpus):
    out, summary = corpus
    for split in SPLITS:
        rows = manifest(out, split)
        per_task = SIZES["train_per_task" if split == "train" else "eval_per_task"]
        assert [row["task"] for row in rows] == [task for task in SYNTH_TASKS for _ in range(per_task)]
        assert summary["examples"][split] == len(rows)
        for row in rows:
            assert {"id", "audio", "task", "target", "duration"} <= row.keys() and row["target"]
            assert row["audio"].startswith(f"audio/{split}/")
            info = sf.info(str(out / row["audio"]))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert row["duration"] == round(info.frames / 16000, 3)
            assert all(isinstance(v, (str, int, float, list)) for v in row.values())
    assert len({row["id"] for row in rows_of(out)}) == len(rows_of(out))
    assert summary["audio_seconds"] == pytest.approx(sum(row["duration"] for row in rows_of(out)), abs=0.1)


def test_asr_targets_are_the_lowercase_unpunctuated_transcript(corpus):
    for row in rows_of(corpus[0], "asr"):
        assert row["target"] == row["transcript"]
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", row["target"]) and 3 <= len(row["target"].split()) <= MAX_WORDS


def test_kws_target_is_the_one_candidate_spoken_or_none(corpus):
    for row in rows_of(corpus[0], "kws"):
        spoken = set(row["transcript"].replace(",", "").split())
        assert row["labels"] and (row["target"] in row["labels"] or row["target"] == "none")
        assert spoken & set(row["labels"]) == ({row["target"]} - {"none"})


def test_kwe_target_lists_the_planted_keywords_in_spoken_order(corpus):
    for row in rows_of(corpus[0], "kwe"):
        keywords = row["target"].split(", ")
        assert keywords == [word for word in row["transcript"].split() if word in KEYWORDS]


def test_ic_and_sf_targets_name_the_intent_and_its_slots_in_order(corpus):
    out = corpus[0]
    assert all(row["target"] in INTENTS for row in rows_of(out, "ic"))
    for row in rows_of(out, "sf"):
        assert row["intent"] in INTENTS
        if row["target"] == "none":
            assert "{" not in "".join(INTENTS[row["intent"]])  # only slot-free intents have no slots
            continue
        pairs = [pair.split(": ") for pair in row["target"].split("; ")]
        assert all(re.fullmatch(r"[a-z]+", slot) for slot, _ in pairs)
        positions = [row["transcript"].find(value) for _, value in pairs]
        assert -1 not in positions and positions == sorted(positions)


def test_sc_target_is_the_gender_of_the_speaking_voice(corpus):
    for row in rows_of(corpus[0], "sc"):  # (and the voices' genders are espeak's own: the test below)
        variant, split = row["voice"].split("+")[1], row["id"].split("-")[0]
        assert variant in VARIANTS[split][row["target"]]


def test_sns_non_speech_clips_are_sounds_without_a_voice(corpus):
    rows = rows_of(corpus[0], "sns")
    assert {row["target"] for row in rows} <= {"speech", "non-speech"}
    for row in rows:
        assert ("voice" in row) == (row["target"] == "speech") == ("sound" not in row)


def test_st_rows_carry_a_german_target_language_and_sentence(corpus):
    for row in rows_of(corpus[0], "st"):
        assert row["target_language"] == "German"
        assert row["target"][0].isupper() and row["target"].endswith(".")


def test_dev_and_test_voices_and_sentences_never_occur_in_train(corpus):
    out = corpus[0]
    train = manifest(out, "train")
    for split in ("dev", "test"):
        rows = manifest(out, split)
        assert not {r["voice"] for r in rows if "voice" in r} & {r["voice"] for r in train if "voice" in r}
        assert not {r["transcript"] for r in rows if "transcript" in r} & {
            r["transcript"] for r in train if "transcript" in r
        }
        held_out = {v for variants in VARIANTS[split].values() for v in variants}
        assert {r["voice"].split("+")[1] for r in rows if "voice" in r} <= held_out


def test_each_voice_variant_is_in_one_split_and_has_the_gender_its_espeak_file_declares():
    import espeakng_loader

    variants = [(split, gender, v) for split, genders in VARIANTS.items() for gender, vs in genders.items() for v in vs]
    assert len({v for _, _, v in variants}) == len(variants)
    for _, gender, variant in variants:
        declared = (Path(espeakng_loader.get_data_path()) / "voices" / "!v" / variant).read_text(errors="ignore")
        assert re.search(rf"^gender\s+{gender}\b", declared, re.M | re.I), variant


def test_same_seed_gives_an_identical_corpus_and_another_seed_a_different_one(corpus, tmp_path):
    out = corpus[0]
    synthesize_corpus(tmp_path / "same", seed=0, progress=False, **SIZES)
    synthesize_corpus(tmp_path / "other", seed=1, progress=False, **SIZES)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "same") for p in (tmp_path / "same").rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (tmp_path / "same" / f).read_bytes() for f in files)
    assert (out / "train.jsonl").read_text() != (tmp_path / "other" / "train.jsonl").read_text()


def test_snr_db_adds_white_noise_at_that_snr_to_speech_only(corpus, tmp_path):
    out = corpus[0]
    synthesize_corpus(tmp_path, seed=0, snr_db=10.0, progress=False, **SIZES)
    assert manifest(tmp_path, "train") == manifest(out, "train")
    for row in manifest(out, "train"):
        clean, noisy = (sf.read(str(d / row["audio"]))[0] for d in (out, tmp_path))
        if row.get("sound"):
            assert np.array_equal(clean, noisy)
            continue
        scale = np.dot(noisy, clean) / np.dot(clean, clean)  # the two clips are peak-normalised differently
        noise = noisy / scale - clean
        assert 10 * np.log10(np.mean(clean**2) / np.mean(noise**2)) == pytest.approx(10.0, abs=1.0)


def test_a_task_subset_writes_only_those_tasks(tmp_path):
    summary = synthesize_corpus(tmp_path, train_per_task=2, eval_per_task=1, tasks=["st", "kws"], progress=False)
    assert summary["per_task"] == {"st": {"train": 2, "dev": 1, "test": 1}, "kws": {"train": 2, "dev": 1, "test": 1}}
    assert [row["task"] for row in manifest(tmp_path, "train")] == ["st", "st", "kws", "kws"]


def test_a_task_can_have_more_train_examples_and_its_first_ones_stay_the_same(tmp_path):
    summary = synthesize_corpus(tmp_path / "big", train_per_task=1, eval_per_task=1, tasks=["asr", "ic"],
                                train_sizes={"ASR": 3}, progress=False)
    assert summary["per_task"] == {"asr": {"train": 3, "dev": 1, "test": 1}, "ic": {"train": 1, "dev": 1, "test": 1}}
    assert summary["examples"] == {"train": 4, "dev": 2, "test": 2}
    small = synthesize_corpus(tmp_path / "small", train_per_task=1, eval_per_task=1, tasks=["asr", "ic"],
                              progress=False)
    big_rows, small_rows = manifest(tmp_path / "big", "train"), manifest(tmp_path / "small", "train")
    assert [row["task"] for row in big_rows] == ["asr", "asr", "asr", "ic"]
    assert [big_rows[0], big_rows[3]] == small_rows  # more ASR leaves the first ASR clip and the other tasks alone
    assert small["per_task"]["asr"]["train"] == 1


def test_cli_train_per_task_takes_a_default_and_per_task_counts(tmp_path, capsys):
    from speechllm.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--train-per-task", "1", "--train-per-task", "kws=2",
                 "--eval-per-task", "0", "--tasks", "sns,kws"]) == 0
    assert [row["task"] for row in manifest(tmp_path, "train")] == ["sns", "kws", "kws"]
    assert main(["data", "synth", "--out", str(tmp_path), "--train-per-task", "kws=-1"]) == 2
    assert "error: --train-per-task kws=-1: expected N or TASK=N with N >= 0" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--tasks", "asr", "--train-per-task", "ic=2"]) == 2
    assert "train sizes name 'ic', not among the corpus's tasks (asr)" in capsys.readouterr().err


def test_unknown_task_is_a_config_error_listing_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown synthetic task 'nope' \(known: asr, kws, kwe"):
        synthesize_corpus(tmp_path, tasks=["asr", "nope"], progress=False)
