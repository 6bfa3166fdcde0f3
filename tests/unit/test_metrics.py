"""Each task metric on hand-made predictions whose score is known."""

from __future__ import annotations

import math

import pytest

from speechllm.data.tasks import METRICS, default_registry
from speechllm.evaluation.metrics import (
    build_metric,
    normalize_text,
    parse_keywords,
    parse_normalization,
    parse_slots,
    score,
    task_metrics,
)


def test_normalisation_lowercases_and_drops_punctuation_but_keeps_words_whole():
    assert normalize_text("  Turn ON the lights, please!  ") == "turn on the lights please"
    assert normalize_text("'Don't' stop") == "don't stop"
    assert normalize_text("lights_on") == "lights_on"
    assert normalize_text("Bring mir den Schlüssel.") == "bring mir den schlüssel"


def test_wer_of_one_substitution_in_four_words_is_a_quarter():
    assert score("wer", ["turn of the lights"], ["turn off the lights"]) == pytest.approx(0.25)


def test_wer_ignores_case_and_punctuation():
    assert score("wer", ["Turn off the lights."], ["turn off the lights"]) == 0.0


def test_wer_counts_errors_over_all_reference_words_of_the_corpus():
    # 1 deletion out of 2 words, 0 errors out of 3 words: 1/5, not the mean of 1/2 and 0.
    assert score("wer", ["hello", "a b c"], ["hello world", "a b c"]) == pytest.approx(0.2)
    assert build_metric("wer").higher_is_better is False


def test_wer_normalisation_steps_are_configurable():
    prediction, reference = ["Turn off the lights."], ["turn off the lights"]
    assert score("wer", prediction, reference, wer_normalize=("lower", "punct", "whitespace")) == 0.0
    assert score("wer", prediction, reference, wer_normalize=("lower",)) == pytest.approx(0.25)  # 'lights.'
    assert score("wer", prediction, reference, wer_normalize=("punct",)) == pytest.approx(0.25)  # 'Turn'
    assert score("wer", prediction, reference, wer_normalize=()) == pytest.approx(0.5)
    assert normalize_text(" A,  b ", ("punct",)) == " A   b "
    assert normalize_text(" A,  b ", ("punct", "whitespace")) == "A b"


def test_normalisation_spec_parses_step_lists_and_rejects_unknown_steps():
    assert parse_normalization("lower,punct,whitespace") == ("lower", "punct", "whitespace")
    assert parse_normalization(" Lower , punct") == ("lower", "punct")
    assert parse_normalization("none") == () and parse_normalization("") == ()
    with pytest.raises(ValueError, match="unknown step 'stem'"):
        parse_normalization("lower,stem")


def test_bleu_is_one_for_identical_text_and_zero_without_shared_words():
    reference = "Bitte schalte den weißen Fernseher im Wohnzimmer aus."
    assert score("bleu", [reference], [reference]) == pytest.approx(1.0)
    assert score("bleu", ["Hallo Welt"], [reference]) == 0.0


def test_bleu_is_between_for_a_partly_right_translation():
    value = score("bleu", ["Bitte schalte den neuen Fernseher im Wohnzimmer aus."],
                  ["Bitte schalte den weißen Fernseher im Wohnzimmer aus."])
    assert 0.3 < value < 0.9


def test_accuracy_is_exact_match_after_normalisation():
    predictions = ["Lights_On.", "non-speech", "yes", "left"]
    references = ["lights_on", "Non-speech", "no", "left"]
    assert score("accuracy", predictions, references) == pytest.approx(0.75)
    assert score("accuracy", ["speech please"], ["speech"]) == 0.0  # extra words are wrong


def test_macro_f1_averages_the_reference_labels_equally():
    # happy: P=1/1 R=1/2 F1=2/3; sad: P=1/2 R=1/1 F1=2/3; 'angry' never in references: not averaged.
    predictions = ["happy", "sad", "sad"]
    references = ["happy", "happy", "sad"]
    assert score("macro_f1", predictions, references) == pytest.approx(2 / 3)


def test_macro_f1_counts_out_of_set_predictions_as_misses():
    # neutral: P=1 R=1/2 F1=2/3; sad: P=1 R=1 F1=1; the out-of-set 'bored' adds no class.
    predictions = ["neutral", "bored", "sad"]
    references = ["neutral", "neutral", "sad"]
    assert score("macro_f1", predictions, references) == pytest.approx((2 / 3 + 1) / 2)
    assert score("macro_f1", ["Sad!"], ["sad"]) == 1.0


def test_emotion_and_sentiment_report_accuracy_and_macro_f1():
    registry = default_registry()
    for task in ("er", "asc"):
        assert task_metrics(registry.get(task).metric) == ("macro_f1", "accuracy")
    assert task_metrics("accuracy") == ("accuracy", "macro_f1")
    # 3 of 4 right: accuracy 3/4; happy F1 = 1, sad: P=1/2 R=1 F1=2/3, angry: R=0 F1=0 -> mean 5/9.
    predictions = ["happy", "sad", "sad", "happy"]
    references = ["happy", "sad", "angry", "happy"]
    assert score("accuracy", predictions, references) == pytest.approx(3 / 4)
    assert score("macro_f1", predictions, references) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_captions_are_scored_with_rouge_l_and_bleu():
    assert task_metrics(default_registry().get("ac").metric) == ("rouge_l", "bleu")
    caption = "a dog barks while cars pass by"
    assert score("rouge_l", [caption], [caption]) == pytest.approx(1.0)
    assert score("rouge_l", ["birds sing"], [caption]) == 0.0
    # LCS 'a dog barks' of 3 words: P = 3/4, R = 3/7, F = 2PR/(P+R) = 6/11; case and punctuation ignored.
    assert score("rouge_l", ["A dog barks loudly."], [caption]) == pytest.approx(6 / 11)
    # averaged over examples, not pooled: (1 + 0) / 2
    assert score("rouge_l", [caption, "birds sing"], [caption, caption]) == pytest.approx(0.5)
    assert math.isnan(build_metric("rouge_l").compute())


def test_slot_pairs_parse_from_semicolon_lists():
    assert parse_slots("City: Rome; date: this weekend.") == {("city", "rome"), ("date", "this weekend")}
    assert parse_slots("none") == set() and parse_slots("None.") == set()
    assert parse_slots("device ceiling light") == {("device ceiling light", "")}


def test_slot_f1_of_partially_right_pairs():
    # example 1: 1 hit, 1 wrong value (fp + fn); example 2: 1 missed pair; example 3: 'none' right.
    predictions = ["city: rome; date: today", "none", "none"]
    references = ["city: rome; date: this weekend", "device: ceiling light", "none"]
    # tp=1, fp=1, fn=2 -> F1 = 2/(2+1+2)
    assert score("slot_f1", predictions, references) == pytest.approx(2 / 5)
    assert score("slot_f1", ["date: this weekend; city: Rome"], ["city: rome; date: this weekend"]) == 1.0


def test_slot_f1_is_one_when_nothing_is_expected_and_nothing_predicted():
    assert score("slot_f1", ["none", "none"], ["none", "none"]) == 1.0
    assert score("slot_f1", ["device: lamp"], ["none"]) == 0.0


def test_keyword_f1_over_comma_separated_sets():
    assert parse_keywords("Telescope, camera.") == {"telescope", "camera"}
    # example 1: tp=1 fn=1; example 2: tp=1 fp=1 -> F1 = 4/(4+1+1)
    predictions = ["camera", "umbrella, tornado"]
    references = ["telescope, camera", "umbrella"]
    assert score("keyword_f1", predictions, references) == pytest.approx(4 / 6)
    assert score("keyword_f1", ["camera, telescope"], ["telescope, camera"]) == 1.0


def test_metrics_accumulate_across_updates_like_one_call():
    metric = build_metric("keyword_f1")
    metric.update(["camera"], ["telescope, camera"])
    metric.update(["umbrella, tornado"], ["umbrella"])
    assert metric.compute() == pytest.approx(4 / 6)
    accuracy = build_metric("accuracy")
    assert math.isnan(accuracy.compute())


def test_every_registered_task_metric_exists():
    for task in default_registry().names():
        assert build_metric(default_registry().get(task).metric).name in METRICS
    with pytest.raises(ValueError, match="unknown metric 'cer'"):
        build_metric("cer")
