"""StepTimer: the Lightning callback that times the steps of a real training run (README, "Benchmarks").

It feeds a StepProfiler (profiler.py) at the step's boundaries and Lightning's hooks: the wait for the batch
(the slots Lightning's data fetcher calls around `next(loader)` for its profiler), backward (from
on_before_backward to on_after_backward), the optimizer (from on_before_optimizer_step, where this callback
comes after the run's own, to the end of the optimizer's step). A step runs from the end of the previous
step's on_train_batch_end (for the first one, from its batch request) to the end of its own.

With `bare=True` it also runs one bare step (bare_loop.py) on every batch, alternately just before and
just after the Lightning step, with a second optimizer like the run's; that time is left out of the
Lightning steps. Paired this way, both see the same batches under the same machine load.
"""

from __future__ import annotations

import lightning as L

from speechllm.bench.bare_loop import BareLoop
from speechllm.bench.profiler import StepProfiler, StepRecord


class StepTimer(L.Callback):
    def __init__(self, bare: bool = False):
        self.with_bare = bare
        self.profiler: StepProfiler | None = None
        self.bare_steps: list[StepRecord] = []
        self._bare: BareLoop | None = None
        self._last_end: float | None = None
        self._fetch_started = 0.0
        self._fetched = False  # whether the fetcher reported this step's wait
        self._handles = []

    @property
    def steps(self) -> list[StepRecord]:
        return self.profiler.steps if self.profiler else []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.profiler = StepProfiler(pl_module.model, trainer.strategy.root_device)
        self._handles = [optimizer.register_step_post_hook(lambda *_: self.profiler.stop("optimizer"))
                         for optimizer in trainer.optimizers]
        if self.with_bare:
            self._bare = BareLoop.for_module(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's fetcher calls these around every `next(loader)` (its profiler's slots; no-ops by default).
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is None or not hasattr(fetcher, "_start_profiler"):
            return
        start, stop = fetcher._start_profiler, fetcher._stop_profiler

        def fetch_started():
            self._fetch_started = self.profiler.now()
            if self._last_end is None:  # the first step starts with its batch request
                self.profiler.begin(at=self._fetch_started)
            start()

        def fetch_stopped():
            stop()
            self.profiler.add("data_wait", self.profiler.now() - self._fetch_started)
            self._fetched = True

        fetcher._start_profiler, fetcher._stop_profiler = fetch_started, fetch_stopped

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.profiler.current is None:  # the first step, and the fetcher's slots were not there
            self.profiler.begin()
        elif not self._fetched:  # no fetcher slots: the whole gap since the last step counts as wait
            self.profiler.add("data_wait", self.profiler.now() - self._last_end)
        self._fetched = False
        self.profiler.batch(batch)
        if self._bare is not None and len(self.profiler.steps) % 2 == 1:
            self._bare_step(batch)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.profiler.start("backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        # The whole backward pass goes with the LLM's: most of it is there (input gradients through every layer).
        self.profiler.stop("backward", into="llm")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.profiler.start("optimizer")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._last_end = self.profiler.end()
        if self._bare is not None and len(self.profiler.steps) % 2 == 1:  # the step just closed was even
            self._bare_step(batch)
            self._last_end = self.profiler.now()
        self.profiler.begin(at=self._last_end)  # the next step starts now; its batch request comes later

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.profiler.current = None  # the step begun after the last one never ran
        self.profiler.remove()
        for handle in self._handles:
            handle.remove()
        self._bare = None

    def _bare_step(self, batch) -> None:
        with self.profiler.separate_step(self.bare_steps):
            self._bare.step(batch, self.profiler)
