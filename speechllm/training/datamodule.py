"""SpeechDataModule: validated examples -> phased task-mixture batches (train) and duration batches (dev).

The training sampler is a pure function of (seed, batch index), so the sampler position saved in a
checkpoint is just the number of batches consumed, and resume continues from there on every rank.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from speechllm.data.dataset import SpeechDataset, collate
from speechllm.data.manifest import Example
from speechllm.data.sampler import DurationBatchSampler, MixturePhase, TaskMixtureBatchSampler, temperature_weights
from speechllm.data.tasks import TaskRegistry
from speechllm.training.stage_scheduler import StagePlan


class SpeechDataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg: DictConfig,
        plan: StagePlan,
        registry: TaskRegistry,
        train_examples: Sequence[Example],
        dev_examples: Sequence[Example],
    ):
        super().__init__()
        self.cfg = cfg
        self.data = cfg.data
        self.plan = plan
        sample_rate = cfg.model.encoder.sample_rate
        self.train_set = SpeechDataset(train_examples, registry, sample_rate, seed=cfg.seed)
        dev = list(dev_examples)[: self.data.max_dev_examples]
        self.dev_set = SpeechDataset(dev, registry, sample_rate, seed=cfg.seed)
        self.mixture = mixture_schedule(plan, train_examples, cfg.trainer.accumulate_grad_batches)
        self.consumed_batches = 0

    def train_dataloader(self) -> DataLoader:
        examples = self.train_set.examples
        sampler = TaskMixtureBatchSampler(
            durations=[e.duration for e in examples],
            tasks=[e.task for e in examples],
            schedule=self.mixture,
            max_batch_seconds=self.data.max_batch_seconds,
            max_batch_size=self.data.max_batch_size,
            num_buckets=self.data.num_buckets,
            seed=self.cfg.seed,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            start_batch=self.consumed_batches,
        )
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        sampler = DurationBatchSampler(
            [e.duration for e in self.dev_set.examples],
            max_batch_seconds=self.data.max_batch_seconds,
            max_batch_size=self.data.max_batch_size,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
        )
        return self._loader(self.dev_set, sampler)

    def _loader(self, dataset: SpeechDataset, batch_sampler) -> DataLoader:
        workers = self.data.num_workers
        return DataLoader(
            dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=self.cfg.trainer.accelerator != "cpu",
        )

    def state_dict(self) -> dict:
        # Batches handed to the model so far; prefetched-but-unused batches are not counted.
        return {"consumed_batches": self.trainer.global_step * self.cfg.trainer.accumulate_grad_batches}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_batches = state["consumed_batches"]


def mixture_schedule(plan: StagePlan, examples: Sequence[Example], accumulation: int) -> list[MixturePhase]:
    """Each phase's task weights (temperature-scaled by task size if asked) over micro-batch indices."""
    sizes = Counter(e.task for e in examples)
    missing = sorted(t for t in plan.tasks if sizes[t] == 0)
    if missing:
        raise ValueError(f"phases mix tasks with no training examples: {', '.join(missing)} (check data.train_manifests)")
    return [
        MixturePhase(
            until_batch=phase.end_step * accumulation,
            weights=temperature_weights(phase.tasks, {t: sizes[t] for t in phase.tasks}, phase.task_temperature),
        )
        for phase in plan.phases
    ]
