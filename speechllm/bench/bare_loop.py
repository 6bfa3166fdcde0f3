"""The reference for framework overhead: the same model and optimizer on the same batch in plain code.

One step is forward (under the run's autocast, as Lightning's precision plugin does), backward, gradient
clipping, the optimizer and scheduler steps and zero_grad, on a batch already on the device; nothing else.
The bench runs one such step next to every step of the Lightning run, on the same batch (StepTimer), so
that the two are compared at the same moments of a machine whose load changes.
"""

from __future__ import annotations

import lightning as L
import torch

from speechllm.bench.profiler import StepProfiler
from speechllm.data.dataset import Batch
from speechllm.model.speech_llm import SpeechLLM

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class BareLoop:
    def __init__(self, model: SpeechLLM, optimizer: torch.optim.Optimizer, scheduler=None,
                 gradient_clip_val: float | None = None, precision: str = "32-true"):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.gradient_clip_val = gradient_clip_val
        self.autocast = AUTOCAST_DTYPES.get(str(precision))
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device_type = next(model.projection.parameters()).device.type
        self.scaler = torch.amp.GradScaler(self.device_type) if self.autocast is torch.float16 else None

    @classmethod
    def for_module(cls, trainer: L.Trainer, pl_module: L.LightningModule) -> "BareLoop":
        """A second optimizer and scheduler like the run's (same parameter groups, same schedule)."""
        configured = pl_module.configure_optimizers()
        return cls(pl_module.model, configured["optimizer"], configured["lr_scheduler"]["scheduler"],
                   trainer.gradient_clip_val, trainer.precision)

    def step(self, batch: Batch, profiler: StepProfiler) -> None:
        profiler.batch(batch)
        with torch.autocast(self.device_type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.model(batch.wave, batch.wave_mask, batch.instructions, batch.targets,
                              features=batch.features, feature_mask=batch.feature_mask).loss
        started = profiler.now()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        profiler.add("llm", profiler.now() - started)
        started = profiler.now()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clip_val)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        profiler.add("optimizer", profiler.now() - started)
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
