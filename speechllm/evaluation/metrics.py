"""Per-task metrics: one `TaskMetric` per name in `speechllm.data.tasks.METRICS`.

Each accumulates (prediction, reference) strings over batches and computes one number at the end.
Text metrics are torchmetrics' (`WordErrorRate`, `SacreBLEUScore`, the multiclass F1); exact match
and the set F1s (slots, keywords) are simple counts. Scales are torchmetrics': WER and BLEU are
fractions (BLEU 0.25 is sacreBLEU's 25.0).
"""

from __future__ import annotations

import math
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import multiclass_f1_score
from torchmetrics.text import SacreBLEUScore, WordErrorRate

from speechllm.data.tasks import METRICS

NONE_ANSWER = "none"  # what slot filling (and a keyword list) answers when there is nothing to list
_PUNCTUATION = re.compile(r"[^\w\s']")  # \w keeps letters of every script, digits and '_' (intent labels)
_QUOTE = re.compile(r"(?<!\w)'|'(?!\w)")  # an apostrophe not inside a word (don't) is a quote


def normalize_text(text: str) -> str:
    """Lowercase, punctuation replaced by spaces (apostrophes inside words kept), spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _QUOTE.sub(" ", _PUNCTUATION.sub(" ", text))
    return " ".join(text.split())


class TaskMetric(ABC):
    """Accumulates predictions against references; `compute` gives the task's score."""

    name: str
    higher_is_better = True

    @abstractmethod
    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None: ...

    @abstractmethod
    def compute(self) -> float: ...


class WER(TaskMetric):
    """Word error rate on normalised text (lowercase, no punctuation): lower is better, may exceed 1."""

    name = "wer"
    higher_is_better = False

    def __init__(self):
        self._metric = WordErrorRate()

    def update(self, predictions, references):
        self._metric.update([normalize_text(p) for p in predictions], [normalize_text(r) for r in references])

    def compute(self) -> float:
        return float(self._metric.compute())


class BLEU(TaskMetric):
    """Corpus sacreBLEU (13a tokenisation, case-sensitive), on the raw text as translation is scored."""

    name = "bleu"

    def __init__(self):
        self._metric = SacreBLEUScore()

    def update(self, predictions, references):
        self._metric.update([p.strip() for p in predictions], [[r.strip()] for r in references])

    def compute(self) -> float:
        return float(self._metric.compute())


class ExactMatch(TaskMetric):
    """Accuracy: the share of predictions equal to their reference after normalisation."""

    name = "accuracy"

    def __init__(self):
        self.correct = self.total = 0

    def update(self, predictions, references):
        self.correct += sum(normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references, strict=True))
        self.total += len(references)

    def compute(self) -> float:
        return self.correct / self.total if self.total else math.nan


class MacroF1(TaskMetric):
    """F1 averaged over the labels that occur in the references (after normalisation).

    A prediction outside that label set is wrong for its reference's class and counts as a false
    positive of no class, as scikit-learn's `f1_score(average="macro", labels=...)` treats it.
    """

    name = "macro_f1"

    def __init__(self):
        self.predictions: list[str] = []
        self.references: list[str] = []

    def update(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        self.predictions += [normalize_text(p) for p in predictions]
        self.references += [normalize_text(r) for r in references]

    def compute(self) -> float:
        if not self.references:
            return math.nan
        labels = {label: i for i, label in enumerate(sorted(set(self.references)))}
        other = len(labels)  # one extra class for every out-of-set prediction, left out of the average
        preds = torch.tensor([labels.get(p, other) for p in self.predictions])
        target = torch.tensor([labels[r] for r in self.references])
        per_class = multiclass_f1_score(preds, target, num_classes=other + 1, average="none")
        return float(per_class[:other].mean())


class SetF1(TaskMetric):
    """Micro F1 over items parsed from each answer: true positives, false positives and false
    negatives are summed over all examples. No items anywhere (every answer 'none') scores 1."""

    def __init__(self):
        self.tp = self.fp = self.fn = 0

    @staticmethod
    @abstractmethod
    def parse(text: str) -> set: ...

    def update(self, predictions, references):
        for prediction, reference in zip(predictions, references, strict=True):
            predicted, expected = self.parse(prediction), self.parse(reference)
            hits = len(predicted & expected)
            self.tp += hits
            self.fp += len(predicted) - hits
            self.fn += len(expected) - hits

    def compute(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 1.0


class SlotF1(SetF1):
    """F1 over `slot: value` pairs of answers written `a: b; c: d` (or 'none')."""

    name = "slot_f1"

    @staticmethod
    def parse(text: str) -> set[tuple[str, str]]:
        return parse_slots(text)


class KeywordF1(SetF1):
    """F1 over the keyword sets of answers written `k1, k2, ...`."""

    name = "keyword_f1"

    @staticmethod
    def parse(text: str) -> set[str]:
        return parse_keywords(text)


def parse_slots(text: str) -> set[tuple[str, str]]:
    """'city: rome; date: this weekend' -> {('city', 'rome'), ('date', 'this weekend')}; 'none' -> {}.

    A part without ':' is a slot with an empty value, so it can only be wrong.
    """
    if normalize_text(text) == NONE_ANSWER:
        return set()
    pairs = set()
    for part in text.split(";"):
        slot, _, value = part.partition(":")
        slot, value = normalize_text(slot), normalize_text(value)
        if slot or value:
            pairs.add((slot, value))
    return pairs


def parse_keywords(text: str) -> set[str]:
    """'telescope, Camera.' -> {'telescope', 'camera'}; 'none' -> {}."""
    if normalize_text(text) == NONE_ANSWER:
        return set()
    return {word for word in (normalize_text(part) for part in text.split(",")) if word}


_METRICS: dict[str, type[TaskMetric]] = {m.name: m for m in (WER, BLEU, ExactMatch, MacroF1, SlotF1, KeywordF1)}
assert set(_METRICS) == set(METRICS), "every task metric name needs a TaskMetric"


def build_metric(name: str) -> TaskMetric:
    """A fresh accumulator for the metric a task registers (one of `speechllm.data.tasks.METRICS`)."""
    try:
        return _METRICS[name]()
    except KeyError:
        raise ValueError(f"unknown metric '{name}' (known: {', '.join(_METRICS)})") from None


def score(name: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """The metric `name` of predictions against references, in one call."""
    metric = build_metric(name)
    metric.update(predictions, references)
    return metric.compute()
