"""Stages as data: a StagePlan of phases, and the StageScheduler callback that applies it.

DDP-safe by construction (see README, "Curriculum"): requires_grad is decided once, before the model is
wrapped, for every group that trains in *any* phase of the run. A phase that does not train a group
gives it learning rate 0; when the group starts training its optimizer state is reset. Nothing else
in the code base freezes or unfreezes parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from speechllm.config import TRAINABLE_GROUPS
from speechllm.model.llm import switch_off_untrained_adapters


@dataclass(frozen=True)
class Phase:
    index: int
    name: str
    start_step: int
    end_step: int  # exclusive
    train: frozenset[str]
    tasks: dict[str, float]
    task_temperature: float | None
    lr: dict[str, float]  # peak learning rate per trained group
    warmup_steps: int


class StagePlan:
    """The phases of one run, clipped to `max_steps`; learning rates are a pure function of the step."""

    def __init__(self, cfg: DictConfig):
        max_steps = cfg.trainer.max_steps
        phases, start = [], 0
        for i, p in enumerate(cfg.phases):
            end = p.until_step if max_steps < 0 else min(p.until_step, max_steps)
            if start >= end:
                break
            phases.append(
                Phase(
                    index=i,
                    name=p.name,
                    start_step=start,
                    end_step=end,
                    train=frozenset(p.train),
                    tasks={task.lower(): float(w) for task, w in p.tasks.items() if w > 0},
                    task_temperature=p.task_temperature,
                    lr={group: float(p.lr.get(group, cfg.optim.lr)) for group in p.train},
                    warmup_steps=cfg.optim.warmup_steps if p.warmup_steps is None else p.warmup_steps,
                )
            )
            start = end
        self.phases = phases
        self.total_steps = start
        self.schedule = cfg.optim.schedule
        self.min_lr_ratio = cfg.optim.min_lr_ratio
        self.stage = cfg.stage

    @property
    def trained_groups(self) -> list[str]:
        """Groups that train in at least one phase, in canonical order."""
        used = set().union(*(p.train for p in self.phases))
        return [g for g in TRAINABLE_GROUPS if g in used]

    @property
    def tasks(self) -> set[str]:
        return set().union(*(p.tasks for p in self.phases))

    def phase_at(self, step: int) -> Phase:
        for phase in self.phases:
            if step < phase.end_step:
                return phase
        return self.phases[-1]

    def learning_rate(self, group: str, step: int) -> float:
        phase = self.phase_at(step)
        if group not in phase.train:
            return 0.0
        peak, local = phase.lr[group], step - phase.start_step
        if local < phase.warmup_steps:
            return peak * (local + 1) / (phase.warmup_steps + 1)
        if self.schedule == "constant":
            return peak
        span = max(1, phase.end_step - phase.start_step - phase.warmup_steps)
        progress = min(1.0, (local - phase.warmup_steps) / span)
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def lr_lambda(self, group: str) -> Callable[[int], float]:
        # A closure, not an object: LambdaLR would pickle an object's state into checkpoints and a
        # resumed run would then follow the old plan instead of its own config.
        return lambda step: self.learning_rate(group, step)


class StageScheduler(L.Callback):
    def __init__(self, plan: StagePlan):
        self.plan = plan
        self._phase: Phase | None = None
        self._gated: list = []  # parameters of the groups the current phase does not train

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Runs before the strategy wraps the model (DDP/FSDP): the only safe moment to set requires_grad.
        trained = set(self.plan.trained_groups)
        for group, params in pl_module.model.trainable_groups().items():
            for param in params.values():
                param.requires_grad_(group in trained)
        if "lora" not in trained and switch_off_untrained_adapters(pl_module.model.llm):
            rank_zero_info(f"[{self.plan.stage}] LoRA neither trains in this run nor has trained before: switched off")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        phase = self.plan.phase_at(step)
        if phase is self._phase:
            return
        # On resume, the phase before the checkpoint's step tells which groups were already training.
        previous = self._phase or (self.plan.phase_at(step - 1) if step > 0 else None)
        starting = phase.train - previous.train if previous else frozenset()
        groups = pl_module.model.trainable_groups()
        if starting:
            _reset_optimizer_state(trainer.optimizers[0], groups, starting)
        self._phase = phase
        self._gated = [p for group in set(self.plan.trained_groups) - phase.train for p in groups[group].values()]
        rank_zero_info(
            f"[{self.plan.stage}] phase '{phase.name}' at step {step} (until {phase.end_step}): "
            f"training {', '.join(sorted(phase.train))}; tasks {phase.tasks}"
        )

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        # Gated groups computed gradients (DDP needs them: same graph in every phase) but must not count
        # in gradient clipping's norm nor build optimizer moments. Called after the gradients were
        # all-reduced and before clipping, identically on every rank.
        for param in self._gated:
            param.grad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Only on the steps Lightning writes to the loggers (as its LearningRateMonitor does): a value logged
        # at other steps is never written, and each `log` costs about a millisecond (on GPUs, a blocking copy).
        if trainer._logger_connector.should_update_logs:
            pl_module.log("train/phase", float(self._phase.index), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"phase": self._phase.name if self._phase else None}


def _reset_optimizer_state(optimizer, groups: dict, starting: frozenset[str]) -> None:
    """A group that starts training forgets moments accumulated (at lr 0) while it was gated off."""
    for group in starting:
        for param in groups[group].values():
            optimizer.state.pop(param, None)
