"""The plain training loop both stand-ins are pretrained with: AdamW, linear warm-up, cosine decay, clipping."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from speechllm.training.cpu_backward import without_onednn_on_cpu


def train_steps(model: torch.nn.Module, steps: int, batch_loss: Callable[[], torch.Tensor], lr: float,
                warmup_fraction: float, name: str, log=print, log_every: int = 50) -> None:
    """`steps` optimizer updates on `batch_loss()` (the next batch's loss), logging every `log_every`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, int(steps * warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    started = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        loss = batch_loss()
        with without_onednn_on_cpu(loss.device):  # oneDNN's conv backward is wrong on several CPU threads
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % log_every == 0 or step == steps:
            log(f"{name} step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
