"""Padding of the training batches: the duration-bucketing sampler against random batching, same budget.

Both are the training sampler (`TaskMixtureBatchSampler`) over every task of the training manifests,
weighted alike: once bucketed as in training (`data.num_buckets`), once with bucketing off, which packs
each task's shuffled examples greedily under the same budgets (seconds, size, tokens). Batches hold one task
either way, as in training. The share of padding is the sampler's own `padding_ratio` (the figure the
run logs as "train batches: X% of their audio is padding"): 1 - real audio / (longest clip x batch size).
"""

from __future__ import annotations

from dataclasses import dataclass

from speechllm.data.sampler import MixturePhase
from speechllm.training.datamodule import SpeechDataModule


@dataclass
class PaddingRatios:
    bucketed: float
    random: float
    num_buckets: int
    examples: int
    tasks: int


def padding_ratios(datamodule: SpeechDataModule) -> PaddingRatios:
    examples = datamodule.train_set.examples
    tasks = sorted({e.task for e in examples})
    every_task = [MixturePhase(until_batch=1, weights=dict.fromkeys(tasks, 1.0))]

    def ratio(bucketing: bool) -> float:
        return datamodule.training_sampler(every_task, bucketing=bucketing).padding_ratio()

    return PaddingRatios(ratio(bucketing=True), ratio(bucketing=False), datamodule.data.num_buckets, len(examples),
                         len(tasks))
