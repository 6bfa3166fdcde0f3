"""SpeechDataModule: validated examples -> phased task-mixture batches (train) and duration batches (dev).

The training sampler is a pure function of (seed, batch index), so the sampler position saved in a
checkpoint is just the number of batches consumed, and resume continues from there on every rank.
Lightning restores that position (`load_state_dict`) before it asks for `train_dataloader()`.

With `data.feature_cache`, `prepare_data` (each node's local rank 0, while the other ranks wait) encodes
the run's clips the cache lacks, and `setup` (every rank) reads the cache's index; the datasets then
serve cached hidden states instead of waveforms.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

from speechllm.config import ConfigError
from speechllm.data.dataset import SpeechDataset, collate
from speechllm.data.feature_cache import FeatureCache, build_cache
from speechllm.data.manifest import Example
from speechllm.data.sampler import DurationBatchSampler, MixturePhase, TaskMixtureBatchSampler, temperature_weights
from speechllm.data.tasks import TaskRegistry
from speechllm.model.encoder import ENCODER_FRAMES_PER_SECOND, AudioEncoder, inference_dtype
from speechllm.training.stage_scheduler import StagePlan


class SpeechDataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg: DictConfig,
        plan: StagePlan,
        registry: TaskRegistry,
        train_examples: Sequence[Example],
        dev_examples: Sequence[Example],
        tokenizer=None,
        encoder: AudioEncoder | None = None,
    ):
        """`tokenizer` (the LLM's) is needed only for a token budget, `data.max_batch_tokens`; `encoder` (the
        model's) only for the feature cache, `data.feature_cache`."""
        super().__init__()
        self.cfg = cfg
        self.data = cfg.data
        self.plan = plan
        sample_rate = cfg.model.encoder.sample_rate
        self.encoder = encoder
        self.feature_cache = None
        if self.data.feature_cache:
            if encoder is None:
                raise ValueError("data.feature_cache needs the model's encoder")
            self.feature_cache = FeatureCache.for_encoder(self.data.feature_cache, encoder, self.data.feature_cache_dtype)
        # Audio that breaks mid-run is replaced in its batch (DDP ranks keep identical batch shapes) and
        # reported; FaultGuard applies data.on_bad_example to it.
        self.train_set = SpeechDataset(train_examples, registry, sample_rate, seed=cfg.seed, substitute_bad=True,
                                       feature_cache=self.feature_cache)
        dev = validation_examples(dev_examples, plan.tasks, self.data.max_dev_examples)
        self.dev_set = SpeechDataset(dev, registry, sample_rate, seed=cfg.seed, substitute_bad=True,
                                     feature_cache=self.feature_cache)
        self.mixture = mixture_schedule(plan, train_examples, cfg.trainer.accumulate_grad_batches)
        self.token_counts = None
        if self.data.max_batch_tokens is not None:
            if tokenizer is None:
                raise ValueError("data.max_batch_tokens needs the LLM tokenizer to count tokens")
            audio_rate = ENCODER_FRAMES_PER_SECOND / cfg.model.downsampler.stride ** cfg.model.downsampler.num_layers
            self.token_counts = llm_token_counts(train_examples, registry, tokenizer, audio_rate)
        self.consumed_batches = 0

    def prepare_data(self) -> None:
        if self.feature_cache is None:
            return
        device = self.trainer.strategy.root_device
        # The clips this run reads: its tasks' training examples and its dev examples (other stages add theirs).
        train = [e for e in self.train_set.examples if e.task in self.plan.tasks]
        clips = [(e.audio, e.duration) for e in train + self.dev_set.examples]
        report = build_cache(
            self.feature_cache, self.encoder, clips, device=device,
            autocast_dtype=inference_dtype(self.trainer.precision, device),
            max_batch_seconds=self.data.max_batch_seconds, progress=self.cfg.trainer.enable_progress_bar,
            log=rank_zero_info,
        )
        rank_zero_info(report.summary())

    def setup(self, stage: str) -> None:
        if self.feature_cache is not None:
            self.feature_cache.refresh()  # what prepare_data wrote, on this node's rank 0

    def training_sampler(self, schedule: Sequence[MixturePhase] | None = None, **options) -> TaskMixtureBatchSampler:
        """The training batch sampler of this data config over `schedule` (default: the stage's task mixture)."""
        examples = self.train_set.examples
        return TaskMixtureBatchSampler(
            durations=[e.duration for e in examples],
            tasks=[e.task for e in examples],
            schedule=self.mixture if schedule is None else schedule,
            max_batch_seconds=self.data.max_batch_seconds,
            max_batch_size=self.data.max_batch_size,
            token_counts=self.token_counts,
            max_batch_tokens=self.data.max_batch_tokens,
            num_buckets=self.data.num_buckets,
            seed=self.cfg.seed,
            **options,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = self.training_sampler(rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                                        start_batch=self.consumed_batches)
        rank_zero_info(f"train batches: {sampler.padding_ratio():.1%} of their audio is padding")
        return self._loader(self.train_set, _WholePlan(sampler, self.consumed_batches))

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
            # Its own generator: starting an epoch (or a validation) draws a worker seed, and drawing it
            # from the global RNG would make the training RNG depend on when validation ran.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def state_dict(self) -> dict:
        # Batches handed to the model so far; prefetched-but-unused batches are not counted.
        return {"consumed_batches": self.trainer.global_step * self.cfg.trainer.accumulate_grad_batches}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_batches = state["consumed_batches"]


def llm_token_counts(
    examples: Sequence[Example], registry: TaskRegistry, tokenizer, audio_tokens_per_second: float
) -> np.ndarray:
    """LLM positions an example occupies: its audio embeddings, its longest instruction, its target."""
    targets = tokenizer([e.target for e in examples], add_special_tokens=False).input_ids
    longest_instruction: dict[str, int] = {}  # per task, rendered with the first row's fields

    def instruction_tokens(example: Example) -> int:
        if example.instruction:
            return len(tokenizer(example.instruction, add_special_tokens=False).input_ids)
        if example.task not in longest_instruction:
            task = registry.get(example.task)
            rendered = [task.render(t, example.fields) for t in task.train_templates]
            longest_instruction[example.task] = max(map(len, tokenizer(rendered, add_special_tokens=False).input_ids))
        return longest_instruction[example.task]

    return np.array([
        math.ceil(e.duration * audio_tokens_per_second) + instruction_tokens(e) + len(target) + 1  # + eos
        for e, target in zip(examples, targets)
    ])


def validation_examples(examples: Sequence[Example], tasks: set[str], limit: int | None) -> list[Example]:
    """Dev examples of the tasks this run trains, taken task by task in turn up to `limit`.

    Manifests are often grouped by task, so the first `limit` rows would validate on one task only.
    """
    by_task: dict[str, list[Example]] = {}
    for example in examples:
        if example.task in tasks:
            by_task.setdefault(example.task, []).append(example)
    interleaved = [e for row in itertools.zip_longest(*by_task.values()) for e in row if e is not None]
    return interleaved[:limit] if limit is not None else interleaved


def mixture_schedule(plan: StagePlan, examples: Sequence[Example], accumulation: int) -> list[MixturePhase]:
    """Each phase's task weights (temperature-scaled by task size if asked) over micro-batch indices."""
    sizes = Counter(e.task for e in examples)
    missing = sorted(t for t in plan.tasks if sizes[t] == 0)
    if missing:
        raise ConfigError(
            f"phases: no training examples for task(s) {', '.join(missing)} in data.train_manifests "
            "(add their manifests or drop the task(s) from the phases)"
        )
    return [
        MixturePhase(
            until_batch=phase.end_step * accumulation,
            weights=temperature_weights(phase.tasks, {t: sizes[t] for t in phase.tasks}, phase.task_temperature),
        )
        for phase in plan.phases
    ]


class _WholePlan(Sampler):
    """The training batches from `start` on, reporting the length of the whole plan.

    On resume Lightning restores its batch counter to the batches already consumed and ends the epoch
    when the counter reaches `len(loader)`. With the remaining length instead, the epoch would end
    early and a new one would replay the batches from `start` (the run's one epoch is the whole plan).
    """

    def __init__(self, batches: Sampler, start: int):
        self.batches, self.start = batches, start

    def __len__(self) -> int:
        return self.start + len(self.batches)

    def __iter__(self):
        return iter(self.batches)
