"""StepProfiler: where the time of each training step goes, measured inside real steps.

The model's parts are timed by forward hooks on the SpeechLLM's own modules (encoder, layer-weighted sum
to projection, the whole forward); backward, the optimizer and the wait for a batch by a Lightning
callback (`timer.StepTimer`) or by the bare loop's own marks (`bare_loop.py`). Only `speechllm bench`
installs any of it: normal runs are not hooked. On a GPU every mark synchronises, so that each part's
kernels are charged to that part.

Whatever in a step is not one of the named parts is `framework`: Lightning's loop and hooks, our
callbacks, logging, zero_grad, the learning-rate scheduler.
"""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from speechllm.data.dataset import Batch
from speechllm.model.encoder import ENCODER_FRAMES_PER_SECOND
from speechllm.model.llm import body_and_head
from speechllm.model.speech_llm import SpeechLLM

# Named parts of a step, in step order; `framework` is the remainder.
PARTS = ("data_wait", "encoder", "adapter", "llm", "optimizer", "framework")
PART_LABELS = {
    "data_wait": "data wait",
    "encoder": "encoder (frozen, forward)",
    "adapter": "weighted sum + downsampler + projection",
    "llm": "LLM forward + backward (with input assembly, loss, the whole backward pass)",
    "optimizer": "optimizer (gradient clipping + AdamW step)",
    "framework": "framework (Lightning loop, callbacks, logging, zero_grad, lr scheduler)",
}


@dataclass
class StepRecord:
    """One step: seconds per part, the whole step, and what it processed."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    period: float = 0.0
    examples: int = 0
    audio_seconds: float = 0.0  # valid (unpadded) audio
    llm_tokens: int = 0  # valid LLM positions (audio embeddings + text)
    llm_tokens_squared: int = 0  # sum over sequences of length², for attention FLOPs
    target_tokens: int = 0  # the answers' tokens: the positions the LM head and the loss are for
    rss_bytes: int | None = None

    def close(self, period: float) -> None:
        self.period = period
        named = sum(v for k, v in self.seconds.items() if k != "framework")
        self.seconds["framework"] = max(0.0, period - named)


class StepProfiler:
    """Per-step timings of one SpeechLLM; `begin`/`end` delimit steps, hooks and marks fill them in."""

    def __init__(self, model: SpeechLLM, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else _nothing
        self.sample_rate = model.encoder.sample_rate
        self.steps: list[StepRecord] = []
        self.current: StepRecord | None = None
        self._started: dict[str, float] = {}
        self._step_start = 0.0
        self._handles = [
            model.encoder.register_forward_pre_hook(lambda *_: self.start("encoder")),
            model.encoder.register_forward_hook(lambda *_: self.stop("encoder")),
            model.layer_weights.register_forward_pre_hook(lambda *_: self.start("adapter")),
            model.projection.register_forward_hook(lambda *_: self._after_adapter()),
            # The body, not the whole LLM: the chunked loss runs the body and applies the LM head itself.
            body_and_head(model.llm)[0].register_forward_pre_hook(self._llm_inputs, with_kwargs=True),
            model.register_forward_hook(self._after_model),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def now(self) -> float:
        self._sync()
        return time.perf_counter()

    # Steps -------------------------------------------------------------------------------------------------

    def begin(self, at: float | None = None) -> None:
        self.current = StepRecord()
        self._started = {}
        self._step_start = self.now() if at is None else at

    def end(self) -> float:
        """Closes the step; returns when it ended (the next step's start)."""
        ended = self.now()
        if self.current is not None:
            self.current.close(ended - self._step_start)
            self.current.rss_bytes = current_rss()
            self.steps.append(self.current)
            self.current = None
        return ended

    @contextmanager
    def separate_step(self, into: list[StepRecord]):
        """Time a step of something else (the bare loop) in the middle of this one, into `into`; the step in
        progress resumes afterwards as if that time had not passed."""
        saved = self.current, self._started, self._step_start
        self.begin()
        started = self._step_start
        try:
            yield
        finally:
            record, self.current = self.current, None
            ended = self.now()
            record.close(ended - started)
            record.rss_bytes = current_rss()
            into.append(record)
            self.current, self._started, self._step_start = saved
            self._step_start += ended - started

    def batch(self, batch: Batch) -> None:
        if self.current is None:
            return
        self.current.examples = len(batch)
        if batch.wave_mask is not None:
            self.current.audio_seconds = float(batch.wave_mask.sum()) / self.sample_rate
        elif batch.feature_mask is not None:
            self.current.audio_seconds = float(batch.feature_mask.sum()) / ENCODER_FRAMES_PER_SECOND

    # Parts -------------------------------------------------------------------------------------------------

    def start(self, part: str) -> None:
        if self.current is not None:
            self._started[part] = self.now()

    def stop(self, part: str, into: str | None = None) -> None:
        """Ends `part` (started with `start`) and adds its time to `into` (default: the part itself)."""
        started = self._started.pop(part, None)
        if self.current is not None and started is not None:
            self.current.seconds[into or part] += self.now() - started

    def add(self, part: str, seconds: float) -> None:
        if self.current is not None:
            self.current.seconds[part] += seconds

    def _after_adapter(self) -> None:
        self.stop("adapter")
        self.start("llm")  # input assembly, the LLM and the loss, up to the end of the model's forward

    def _after_model(self, module, args, output) -> None:
        self.stop("llm")
        if self.current is not None:
            self.current.target_tokens += int(output.target_tokens.sum())

    def _llm_inputs(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if self.current is None or mask is None:
            return
        lengths = mask.sum(-1)
        self.current.llm_tokens += int(lengths.sum())
        self.current.llm_tokens_squared += int((lengths.long() ** 2).sum())


def current_rss() -> int | None:
    """This process's resident memory now, in bytes (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return None


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _nothing() -> None:
    pass
