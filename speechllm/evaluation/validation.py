"""Answers generated during validation (`eval.generate=true`): each task's metrics and a W&B table of examples.

Every rank answers its share of the dev batches (greedy, each task within its token budget); the
answers are gathered (all_gather_object) and scored with the metrics and text normalisation
`speechllm eval` uses. Rank 0 logs a few examples of each task (audio, instruction, reference,
prediction) as the W&B table `val/examples`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from speechllm.data.dataset import Batch
from speechllm.data.tasks import default_registry
from speechllm.evaluation.generation import generate_by_task, token_budgets
from speechllm.evaluation.metrics import parse_normalization, score_tasks
from speechllm.model.speech_llm import SpeechLLM

TABLE_COLUMNS = ["step", "id", "task", "audio", "instruction", "reference", "prediction"]


class ValidationAnswers:
    """One validation pass: `add` each batch, then `finish` logs through the LightningModule."""

    def __init__(self, cfg: DictConfig, tasks: set[str]):
        self.registry = default_registry()
        for path in cfg.data.task_files:
            self.registry.load_yaml(path)
        self.budget = token_budgets(self.registry, cfg.eval.max_new_tokens)
        self.normalization = parse_normalization(cfg.eval.wer_normalize)
        self.sample_rate = cfg.model.encoder.sample_rate
        self.table_size = cfg.eval.examples_table
        # A few examples of every task validated rather than the shortest clips of one.
        self.per_task = math.ceil(self.table_size / max(1, len(tasks)))
        self.rows: list[tuple[str, str, str, str, str]] = []  # (id, task, instruction, reference, prediction)
        self.table_audio: dict[int, np.ndarray | None] = {}  # row index -> waveform (if any), for the table rows

    def add(self, model: SpeechLLM, batch: Batch) -> None:
        texts = generate_by_task(model, batch.wave, batch.wave_mask, batch.instructions, batch.tasks, self.budget,
                                 features=batch.features, feature_mask=batch.feature_mask)
        for i, text in enumerate(texts):
            task = batch.tasks[i]
            if len(self.table_audio) < self.table_size and sum(r[1] == task for r in self.rows_in_table()) < self.per_task:
                # A batch read from the feature cache has no waveform: its table rows go without audio.
                wave = batch.wave[i, batch.wave_mask[i]].float().cpu().numpy() if batch.wave is not None else None
                self.table_audio[len(self.rows)] = wave
            self.rows.append((batch.ids[i], task, batch.instructions[i], batch.targets[i], text))

    def rows_in_table(self) -> list[tuple[str, str, str, str, str]]:
        return [self.rows[i] for i in self.table_audio]

    def finish(self, module) -> None:
        """Log val/<task>/<metric> on every rank (same numbers everywhere) and the table on rank 0."""
        rows = [row for rank_rows in _all_ranks(self.rows) for row in rank_rows]
        scores = score_tasks(((task, prediction, reference) for _, task, _, reference, prediction in rows),
                             self.registry, self.normalization)
        for task in scores:
            for metric, value in task.values.items():
                if value is not None:  # plain floats: identical on every rank, nothing to reduce
                    module.log(f"val/{task.task}/{metric}", float(value))
        if module.global_rank == 0 and self.table_audio:
            self.log_table(module)

    def log_table(self, module) -> None:
        loggers = [logger for logger in module.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        import wandb

        data = [
            [module.global_step, id_, task,
             None if self.table_audio[i] is None else wandb.Audio(self.table_audio[i], sample_rate=self.sample_rate),
             instruction, reference, prediction]
            for i, (id_, task, instruction, reference, prediction) in zip(self.table_audio, self.rows_in_table())
        ]
        for logger in loggers:
            logger.log_table("val/examples", columns=TABLE_COLUMNS, data=data, step=module.global_step)


def _all_ranks(value: list) -> list[list]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
