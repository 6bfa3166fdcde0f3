"""Per-task metrics: one `TaskMetric` per name in `speechllm.data.tasks.METRICS`.

Each accumulates (prediction, reference) strings over batches and computes one number at the end.
Text metrics are torchmetrics' (`WordErrorRate`, `SacreBLEUScore`, `ROUGEScore`, the multiclass F1);
exact match and the set F1s (slots, keywords) are simple counts. Scales are torchmetrics': WER, BLEU
and ROUGE-L are fractions (BLEU 0.25 is sacreBLEU's 25.0).

A task is scored with the metric it registers and that metric's companions (`task_metrics`):
classification tasks report both accuracy and macro-F1, captioning both ROUGE-L and BLEU.
"""

from __future__ import annotations

import math
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import multiclass_f1_score
from torchmetrics.text import ROUGEScore, SacreBLEUScore, WordErrorRate

from speechllm.config import WER_NORMALIZATION_STEPS
from speechllm.data.tasks import METRICS, TaskRegistry

NONE_ANSWER = "none"  # what slot filling (and a keyword list) answers when there is nothing to list
_PUNCTUATION = re.compile(r"[^\w\s']")  # \w keeps letters of every script, digits and '_' (intent labels)
_QUOTE = re.compile(r"(?<!\w)'|'(?!\w)")  # an apostrophe not inside a word (don't) is a quote


# Companion metrics reported next to the one a task registers (first in the report).
COMPANION_METRICS = {"accuracy": ("macro_f1",), "macro_f1": ("accuracy",), "rouge_l": ("bleu",)}


def task_metrics(metric: str) -> tuple[str, ...]:
    """The metrics a task registering `metric` is scored with: it first, then its companions."""
    return (metric, *COMPANION_METRICS.get(metric, ()))


def normalize_text(text: str, steps: Sequence[str] = WER_NORMALIZATION_STEPS) -> str:
    """Unicode NFKC, then each of `steps`: `lower` (lowercase), `punct` (punctuation to spaces,
    apostrophes inside words kept), `whitespace` (spaces collapsed, ends stripped)."""
    text = unicodedata.normalize("NFKC", text)
    if "lower" in steps:
        text = text.lower()
    if "punct" in steps:
        text = _QUOTE.sub(" ", _PUNCTUATION.sub(" ", text))
    if "whitespace" in steps:
        text = " ".join(text.split())
    return text


def parse_normalization(spec: str) -> tuple[str, ...]:
    """'lower,punct,whitespace' -> ('lower', 'punct', 'whitespace'); 'none' (or '') -> ()."""
    steps = tuple(s.strip().lower() for s in spec.split(",") if s.strip())
    if steps == ("none",):
        return ()
    unknown = [s for s in steps if s not in WER_NORMALIZATION_STEPS]
    if unknown:
        raise ValueError(f"text normalisation '{spec}': unknown step '{unknown[0]}' "
                         f"(use a comma-separated subset of {','.join(WER_NORMALIZATION_STEPS)}, or none)")
    return steps


class TaskMetric(ABC):
    """Accumulates predictions against references; `compute` gives the task's score."""

    name: str
    higher_is_better = True

    @abstractmethod
    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None: ...

    @abstractmethod
    def compute(self) -> float: ...


class WER(TaskMetric):
    """Word error rate on normalised text (by default lowercase, no punctuation): lower is better, may exceed 1.

    `normalize` picks the steps of `normalize_text` (e.g. `("lower",)` keeps punctuation, so
    'lights.' against 'lights' is an error); words are split on whitespace either way.
    """

    name = "wer"
    higher_is_better = False

    def __init__(self, normalize: Sequence[str] = WER_NORMALIZATION_STEPS):
        self._metric = WordErrorRate()
        self.normalize = tuple(normalize)

    def update(self, predictions, references):
        self._metric.update([normalize_text(p, self.normalize) for p in predictions],
                            [normalize_text(r, self.normalize) for r in references])

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


class RougeL(TaskMetric):
    """ROUGE-L F-measure (longest common subsequence of words), averaged over examples: the caption metric.

    torchmetrics' `ROUGEScore` without stemming (which would need nltk): text is lowercased and
    reduced to letters and digits before matching.
    """

    name = "rouge_l"

    def __init__(self):
        self._metric = ROUGEScore(rouge_keys="rougeL")

    def update(self, predictions, references):
        self._metric.update(list(predictions), list(references))

    def compute(self) -> float:
        if not self._metric.rougeL_fmeasure:
            return math.nan
        return float(self._metric.compute()["rougeL_fmeasure"])


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


_METRICS: dict[str, type[TaskMetric]] = {
    m.name: m for m in (WER, BLEU, RougeL, ExactMatch, MacroF1, SlotF1, KeywordF1)
}
assert set(_METRICS) == set(METRICS), "every task metric name needs a TaskMetric"


def build_metric(name: str, wer_normalize: Sequence[str] = WER_NORMALIZATION_STEPS) -> TaskMetric:
    """A fresh accumulator for the metric a task registers (one of `speechllm.data.tasks.METRICS`).

    `wer_normalize`: the text normalisation steps of WER (other metrics ignore it).
    """
    if name not in _METRICS:
        raise ValueError(f"unknown metric '{name}' (known: {', '.join(_METRICS)})")
    return WER(wer_normalize) if name == "wer" else _METRICS[name]()


def score(name: str, predictions: Sequence[str], references: Sequence[str], **options) -> float:
    """The metric `name` of predictions against references, in one call (`options`: see build_metric)."""
    metric = build_metric(name, **options)
    metric.update(predictions, references)
    return metric.compute()


@dataclass
class TaskScores:
    """One task's scores: its registered metric first, then the companions (`task_metrics`)."""

    task: str
    values: dict[str, float | None]  # None where the metric is undefined (e.g. WER against empty references)
    higher_is_better: dict[str, bool]
    examples: int

    @property
    def metric(self) -> str:
        return next(iter(self.values))


def score_tasks(
    rows: Iterable[tuple[str, str, str]], registry: TaskRegistry, wer_normalize: Sequence[str] = WER_NORMALIZATION_STEPS
) -> list[TaskScores]:
    """(task, prediction, reference) rows -> one TaskScores per task present, in registry order."""
    by_task: dict[str, tuple[list[str], list[str]]] = {}
    for task, prediction, reference in rows:
        predictions, references = by_task.setdefault(task, ([], []))
        predictions.append(prediction)
        references.append(reference)
    scores = []
    for name in (n for n in registry.names() if n in by_task):
        predictions, references = by_task[name]
        values, directions = {}, {}
        for metric_name in task_metrics(registry.get(name).metric):
            metric = build_metric(metric_name, wer_normalize=wer_normalize)
            metric.update(predictions, references)
            value = metric.compute()
            values[metric_name] = value if math.isfinite(value) else None
            directions[metric_name] = metric.higher_is_better
        scores.append(TaskScores(name, values, directions, len(references)))
    return scores
