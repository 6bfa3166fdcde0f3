"""Padding of the training batches: the duration-bucketing sampler against random batching, same budget.

Both are the training sampler (`TaskMixtureBatchSampler`) over every task of the training manifests,
weighted alike: once bucketed as in training (`data.num_buckets`), once with bucketing off, which packs
each task's shuffled examples greedily under the same budgets (seconds, size, tokens). Batches hold one task
either way, as in training. The share of padding is the sampler's own `padding_ratio` (the figure the
run logs as "train batches: X% of their audio is padding"): 1 - real audio / (longest clip x batch size).
"""

from __future__ import annotations

from dataclasses import dataclass

from speechllm.data.sampler import MixturePhase, TaskMixtureBatchSampler
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
    data = datamodule.data

    def ratio(bucketing: bool) -> float:
        return TaskMixtureBatchSampler(
            durations=[e.duration for e in examples],
            tasks=[e.task for e in examples],
            schedule=every_task,
            max_batch_seconds=data.max_batch_seconds,
            max_batch_size=data.max_batch_size,
            token_counts=datamodule.token_counts,
            max_batch_tokens=data.max_batch_tokens,
            num_buckets=data.num_buckets,
            seed=datamodule.cfg.seed,
            bucketing=bucketing,
        ).padding_ratio()

    return PaddingRatios(ratio(bucketing=True), ratio(bucketing=False), data.num_buckets, len(examples), len(tasks))
