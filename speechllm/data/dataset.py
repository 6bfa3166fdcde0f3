"""SpeechDataset: validated examples -> (waveform, instruction, target); collate pads into a Batch."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch.utils.data import Dataset

from speechllm.data.audio import load_audio
from speechllm.data.manifest import Example
from speechllm.data.tasks import TaskRegistry


@dataclass
class Batch:
    wave: torch.Tensor  # (B, samples) float32, zero-padded
    wave_mask: torch.Tensor  # (B, samples) bool, True on real samples
    instructions: list[str]
    targets: list[str]
    tasks: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name) for f in fields(self)} | {
            "wave": self.wave.to(device, non_blocking=True), "wave_mask": self.wave_mask.to(device, non_blocking=True)
        })


@dataclass
class Item:
    wave: torch.Tensor
    instruction: str
    target: str
    task: str
    id: str


class SpeechDataset(Dataset):
    """Indexed by (example index, task epoch), as the batch samplers yield them.

    A row without an explicit instruction gets one drawn from its task's templates with an RNG seeded
    by (seed, index, epoch): the same example is phrased differently each epoch, identically on
    every run and every rank. `heldout_instructions` draws from the held-out templates (evaluation).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        registry: TaskRegistry,
        sample_rate: int,
        seed: int = 0,
        heldout_instructions: bool = False,
    ):
        self.examples = list(examples)
        self.registry = registry
        self.sample_rate = sample_rate
        self.seed = seed
        self.heldout_instructions = heldout_instructions

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        index, epoch = key
        example = self.examples[index]
        wave, _ = load_audio(example.audio, self.sample_rate)
        return Item(wave, self.instruction(index, epoch), example.target, example.task, example.id)

    def instruction(self, index: int, epoch: int) -> str:
        example = self.examples[index]
        if example.instruction:
            return example.instruction
        rng = random.Random(f"{self.seed}:{index}:{epoch}")
        return self.registry.get(example.task).instruction(example.fields, rng, heldout=self.heldout_instructions)


def collate(items: list[Item]) -> Batch:
    lengths = torch.tensor([item.wave.shape[0] for item in items])
    wave = torch.zeros(len(items), int(lengths.max()))
    for row, item in zip(wave, items):
        row[: item.wave.shape[0]] = item.wave
    return Batch(
        wave=wave,
        wave_mask=torch.arange(wave.shape[1])[None] < lengths[:, None],
        instructions=[item.instruction for item in items],
        targets=[item.target for item in items],
        tasks=[item.task for item in items],
        ids=[item.id for item in items],
    )
