"""SpeechDataset: validated examples -> (waveform, instruction, target); collate pads into a Batch.

An audio file can break after the start-up validation (overwritten, truncated, on a failing disk). With
`substitute_bad=True` (training) such an example is replaced by the readable example of the same task
nearest in duration, and the Item says which example was bad and why: every DDP rank still gets a full
batch of the usual shape, and the training loop decides what to do (`data.on_bad_example`).

With a feature cache (`data.feature_cache`) a batch is read from the cache when it holds a current copy
of every clip of the batch, and from the audio files otherwise (a file changed since it was cached, or
was never readable): the model then runs its encoder on that batch, and bad audio is substituted as usual.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
from torch.utils.data import Dataset

from speechllm.data.audio import AudioError, load_audio
from speechllm.data.feature_cache import CacheEntry, FeatureCache
from speechllm.data.manifest import Example
from speechllm.data.tasks import TaskRegistry


@dataclass
class Batch:
    """Audio as waveforms (`wave`, `wave_mask`) or, read from the feature cache, as the encoder's hidden
    states (`features`, `feature_mask`); the other pair is None."""

    wave: torch.Tensor | None  # (B, samples) float32, zero-padded
    wave_mask: torch.Tensor | None  # (B, samples) bool, True on real samples
    instructions: list[str]
    targets: list[str]
    tasks: list[str]
    ids: list[str]
    bad: list["BadExample"] = field(default_factory=list)  # examples replaced by a substitute in this batch
    features: torch.Tensor | None = None  # (layers, B, frames, width) fp16/bf16, zero-padded
    feature_mask: torch.Tensor | None = None  # (B, frames) bool, True on valid encoder frames

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)


@dataclass(frozen=True)
class BadExample:
    """An example whose audio could not be used when it was loaded, and what stood in for it."""

    id: str
    source: str  # manifest:line
    reason: str  # the AudioError: file and cause
    substitute: str | None  # id of the example used instead; None: no readable one was found

    def __str__(self) -> str:  # the format of skipped_<split>_examples.txt
        return f"{self.source}: example '{self.id}' became unusable during training: {self.reason}"


@dataclass
class Item:
    wave: torch.Tensor | None  # None when read from the feature cache
    instruction: str
    target: str
    task: str
    id: str
    bad: BadExample | None = None
    features: torch.Tensor | None = None  # (layers, frames, width) from the feature cache


class SpeechDataset(Dataset):
    """Indexed by (example index, task epoch), as the batch samplers yield them.

    A row without an explicit instruction gets one drawn from its task's templates with an RNG seeded
    by (seed, index, epoch): the same example is phrased differently each epoch, identically on
    every run and every rank. `heldout_instructions` draws from the held-out templates (evaluation).
    Unreadable audio raises AudioError, or with `substitute_bad` is replaced (see the module docstring).
    With a `feature_cache`, batches whose clips it holds are read from it (see the module docstring).
    """

    MAX_SUBSTITUTE_TRIES = 8

    def __init__(
        self,
        examples: Sequence[Example],
        registry: TaskRegistry,
        sample_rate: int,
        seed: int = 0,
        heldout_instructions: bool = False,
        substitute_bad: bool = False,
        feature_cache: FeatureCache | None = None,
    ):
        self.examples = list(examples)
        self.registry = registry
        self.sample_rate = sample_rate
        self.seed = seed
        self.heldout_instructions = heldout_instructions
        self.substitute_bad = substitute_bad
        self.feature_cache = feature_cache
        self._by_duration: dict[str, list[tuple[float, int]]] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Item]:
        """A batch's items (the DataLoader asks for whole batches): all from the cache, or all from audio."""
        if self.feature_cache is not None:
            entries = [self.feature_cache.lookup(self.examples[index].audio) for index, _ in keys]
            if all(entry is not None for entry in entries):
                return [self._cached_item(index, epoch, entry) for (index, epoch), entry in zip(keys, entries)]
        return [self._audio_item(index, epoch) for index, epoch in keys]

    def _cached_item(self, index: int, epoch: int, entry: CacheEntry) -> Item:
        example = self.examples[index]
        features = self.feature_cache.read(entry)
        return Item(None, self.instruction(index, epoch), example.target, example.task, example.id, features=features)

    def _audio_item(self, index: int, epoch: int) -> Item:
        example = self.examples[index]
        try:
            wave, _ = load_audio(example.audio, self.sample_rate)
        except AudioError as err:
            if not self.substitute_bad:
                raise
            return self._substitute(index, epoch, str(err))
        return Item(wave, self.instruction(index, epoch), example.target, example.task, example.id)

    def instruction(self, index: int, epoch: int) -> str:
        example = self.examples[index]
        if example.instruction:
            return example.instruction
        rng = random.Random(f"{self.seed}:{index}:{epoch}")
        return self.registry.get(example.task).instruction(example.fields, rng, heldout=self.heldout_instructions)

    def _substitute(self, index: int, epoch: int, reason: str) -> Item:
        """The same task's readable example nearest in duration (so the batch keeps its size), tried outwards."""
        example = self.examples[index]
        for other in self._neighbours(index, self.MAX_SUBSTITUTE_TRIES):
            try:
                wave, _ = load_audio(self.examples[other].audio, self.sample_rate)
            except AudioError:
                continue
            stand_in = self.examples[other]
            bad = BadExample(example.id, example.source, reason, stand_in.id)
            return Item(wave, self.instruction(other, epoch), stand_in.target, stand_in.task, stand_in.id, bad)
        # Nothing readable nearby: silence keeps the batch's shape; the training loop stops on `substitute=None`.
        silence = torch.zeros(self.sample_rate)
        bad = BadExample(example.id, example.source, reason, None)
        return Item(silence, self.instruction(index, epoch), example.target, example.task, example.id, bad)

    def _neighbours(self, index: int, limit: int) -> list[int]:
        if self._by_duration is None:
            self._by_duration = {}
            for i, e in enumerate(self.examples):
                self._by_duration.setdefault(e.task, []).append((e.duration, i))
            for entries in self._by_duration.values():
                entries.sort()
        entries = self._by_duration[self.examples[index].task]
        duration = self.examples[index].duration
        at = bisect.bisect_left(entries, (duration, index))
        below, above, nearest = at - 1, at + 1, []
        while len(nearest) < limit and (below >= 0 or above < len(entries)):
            if above >= len(entries) or (below >= 0 and duration - entries[below][0] <= entries[above][0] - duration):
                nearest.append(entries[below][1])
                below -= 1
            else:
                nearest.append(entries[above][1])
                above += 1
        return nearest


def collate(items: list[Item]) -> Batch:
    """Waveforms, or cached hidden states (a batch has one or the other), zero-padded with their masks."""
    text = dict(
        instructions=[item.instruction for item in items],
        targets=[item.target for item in items],
        tasks=[item.task for item in items],
        ids=[item.id for item in items],
        bad=[item.bad for item in items if item.bad is not None],
    )
    if items[0].features is not None:
        lengths = torch.tensor([item.features.shape[1] for item in items])
        layers, _, width = items[0].features.shape
        features = items[0].features.new_zeros(layers, len(items), int(lengths.max()), width)
        for i, item in enumerate(items):
            features[:, i, : item.features.shape[1]] = item.features
        mask = torch.arange(features.shape[2])[None] < lengths[:, None]
        return Batch(wave=None, wave_mask=None, features=features, feature_mask=mask, **text)
    lengths = torch.tensor([item.wave.shape[0] for item in items])
    wave = torch.zeros(len(items), int(lengths.max()))
    for row, item in zip(wave, items):
        row[: item.wave.shape[0]] = item.wave
    return Batch(wave=wave, wave_mask=torch.arange(wave.shape[1])[None] < lengths[:, None], **text)
