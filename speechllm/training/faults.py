"""Faults during training, each turned into a documented outcome instead of lost work or a traceback.

FaultGuard (a Callback) handles:
- SIGTERM / SIGUSR1 (preemption, SLURM's warning before the time limit): the run finishes the step it is
  in, saves checkpoints/last.ckpt at that step and exits (TrainingStopped, exit code 128 + signal);
  SIGUSR1 inside a SLURM job also requeues the job. The same command then resumes it.
- A step whose loss or gradients are not finite: skipped (no parameter or optimizer-state update) and
  counted (`train/skipped_steps`); `faults.max_bad_steps` such steps in a row stop the run, and since
  skipped steps change nothing, the last.ckpt it saves holds the weights from before the first of them.
- An example whose audio broke after the start-up validation: the dataset replaced it in its batch
  (SpeechDataset.substitute_bad); `data.on_bad_example=error` stops the run before that batch trains,
  `skip` counts it (`train/bad_examples`) and appends it to runs/<run>/skipped_train_examples.txt.

Under DDP every decision is taken by all ranks together: each rank's flags are all-reduced (max) at the
same points of every step, so all ranks skip, save and stop at the same step. (Lightning's own SIGTERM
handling raises wherever each rank happens to be, which can deadlock DDP: Lightning issue #20806.)
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig

from speechllm.data.dataset import BadExample
from speechllm.training.checkpoints import LAST

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(RuntimeError):
    """The run stopped on purpose; the message is one line, `kind` prefixes it on the command line."""

    def __init__(self, message: str, exit_code: int = 1, kind: str = "error"):
        super().__init__(message)
        self.exit_code = exit_code
        self.kind = kind


class FaultGuard(L.Callback):
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.max_bad_steps = cfg.faults.max_bad_steps
        self.slurm_requeue = cfg.faults.slurm_requeue
        self.on_bad_example = cfg.data.on_bad_example
        self.last = run_dir / "checkpoints" / LAST
        self.skipped_list = run_dir / "skipped_train_examples.txt"
        self.skipped_steps = 0  # checkpointed: the counts continue across resumes
        self.bad_examples = 0
        self._signals: set[int] = set()
        self._step: int | None = None  # the optimizer step whose micro-batches are running
        self._step_ids: list[str] = []
        self._loss_finite = torch.tensor(True)
        self._bad_streak: list[tuple[int, list[str]]] = []  # consecutive skipped steps: (step, example ids)
        self._stop: TrainingStopped | None = None  # decided and saved after a step, raised at the next hook
        self._saving_before_batch = False

    # Signals ---------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its handlers just before (Trainer._run); ours replace them, and Lightning
        # puts the original ones back when fit ends. A handler only records the signal: the checkpoint is
        # written at the next step boundary, never in the middle of an optimizer update.
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._signals.add(signum)

    def _preempt(self, trainer: L.Trainer, sigusr1: bool, before_batch: bool = False) -> TrainingStopped:
        saved = self._save(trainer, before_batch)
        name, signum = ("SIGUSR1", signal.SIGUSR1) if sigusr1 else ("SIGTERM", signal.SIGTERM)
        then = "run the same command to resume" if saved else "run the same command to start again"
        if sigusr1 and self.slurm_requeue and os.environ.get("SLURM_JOB_ID") and trainer.is_global_zero:
            then = requeue_slurm_job()
        where = f"and saved {self.last}" if saved else "before the first step, nothing to save"
        return TrainingStopped(
            f"{name} received: stopped at step {trainer.global_step} {where}; {then}",
            exit_code=128 + signum, kind="stopped",
        )

    def _raise_pending(self) -> None:
        # A stop decided in on_train_batch_end is raised at the next hook, once Lightning has logged that
        # step's metrics, and before any more training or validation work.
        if self._stop is not None:
            raise self._stop

    # Steps ------------------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._raise_pending()
        at_boundary = trainer.global_step != self._step  # the first micro-batch of an optimizer step
        if at_boundary:
            self._step, self._step_ids, self._loss_finite = trainer.global_step, [], torch.tensor(True)
        self._step_ids.extend(batch.ids)
        sigterm, sigusr1, bad = _agree(pl_module, [
            signal.SIGTERM in self._signals, signal.SIGUSR1 in self._signals, bool(batch.bad),
        ])
        if bad:
            self._bad_examples(trainer, batch.bad, at_boundary)
        if (sigterm or sigusr1) and at_boundary:  # e.g. a signal that arrived during validation
            raise self._preempt(trainer, sigusr1, before_batch=True)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite = self._loss_finite.to(loss.device) & torch.isfinite(loss.detach()).all()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        # After DDP averaged the gradients and before clipping: a parameter without a gradient is left
        # alone by the optimizer (no update, no moment or step-count change) and out of the clipping norm.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = self._loss_finite
        if params:
            # The largest |gradient| is finite iff every gradient is (NaN propagates): one fused reduction
            # instead of a kernel per parameter.
            largest = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=math.inf)
            finite = finite & torch.isfinite(largest).to(finite.device)
        (bad,) = _agree(pl_module, [~finite])
        if not bad:
            self._bad_streak = []
            return
        for param in params:
            param.grad = None
        ids = _gather(list(self._step_ids))
        self.skipped_steps += 1
        self._bad_streak.append((trainer.global_step, ids))
        rank_zero_warn(
            f"step {trainer.global_step}: non-finite loss or gradient, update skipped "
            f"({len(self._bad_streak)} in a row, faults.max_bad_steps={self.max_bad_steps}); batch: {', '.join(ids)}"
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # accumulating: the optimizer step comes with a later micro-batch
        if trainer._logger_connector.should_update_logs:  # the steps whose values reach the loggers
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            pl_module.log("train/bad_examples", float(self.bad_examples), on_step=True, on_epoch=False)
        if len(self._bad_streak) >= self.max_bad_steps:
            self._save(trainer)
            first, ids = self._bad_streak[0]
            self._stop = TrainingStopped(
                f"{len(self._bad_streak)} steps in a row had a non-finite loss or gradient (steps {first}-"
                f"{self._bad_streak[-1][0]}, faults.max_bad_steps={self.max_bad_steps}); the first was step {first}, "
                f"examples {', '.join(ids)}; no update was applied, so {self.last} (saved at step "
                f"{trainer.global_step}) holds the weights from before step {first}: lower optim.lr or check "
                "those examples, then run the same command to resume"
            )
            return
        if trainer.global_step >= trainer.max_steps:
            return  # the run ends now anyway, with its final checkpoint
        sigterm, sigusr1 = _agree(pl_module, [signal.SIGTERM in self._signals, signal.SIGUSR1 in self._signals])
        if sigterm or sigusr1:
            self._stop = self._preempt(trainer, sigusr1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_pending()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_pending()  # a stop decided at the very last step

    # Examples whose audio broke mid-run ------------------------------------------------------------------

    def _bad_examples(self, trainer: L.Trainer, local: list[BadExample], at_boundary: bool) -> None:
        bad = _gather(list(local))
        lost = [b for b in bad if b.substitute is None]
        if self.on_bad_example == "error" or lost:
            first = (lost or bad)[0]
            # Saved before this batch trains: resuming after the fix starts with this very batch. (Not in the
            # middle of gradient accumulation: the last checkpoint then stays as it is.)
            saved = at_boundary and self._save(trainer, before_batch=True)
            saved = f"{self.last} holds step {trainer.global_step}" if saved else "the last checkpoint is untouched"
            more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
            if lost:
                fix = (f"no readable example of its task was found near it either (is the data still there?); {saved}; "
                       "fix the data, then run the same command to resume")
            else:
                fix = (f"fix or remove it and run the same command to resume ({saved}), "
                       "or set data.on_bad_example=skip")
            raise TrainingStopped(f"{first}{more}; {fix}")
        self.bad_examples += len(bad)
        if trainer.is_global_zero:
            with open(self.skipped_list, "a") as listed:
                listed.writelines(f"{b}\n" for b in bad)
        for b in bad:
            rank_zero_warn(f"{b}; replaced in its batch by '{b.substitute}' (data.on_bad_example=skip)")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        for b in batch.bad:  # validation goes on with the stand-in; no collective needed, nothing trains
            rank_zero_warn(f"validation: {b}; replaced by '{b.substitute}'")

    # ------------------------------------------------------------------------------------------------------

    def _save(self, trainer: L.Trainer, before_batch: bool = False) -> bool:
        """last.ckpt at the current step; every rank calls it, rank 0 writes (atomically)."""
        if before_batch and trainer.global_step == 0:
            return False  # nothing trained yet
        self._saving_before_batch = before_batch
        try:
            trainer.save_checkpoint(self.last, weights_only=False)
        finally:
            self._saving_before_batch = False
        return True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._saving_before_batch:
            _as_if_saved_after_the_previous_step(checkpoint)

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "bad_examples": self.bad_examples}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state["skipped_steps"]
        self.bad_examples = state["bad_examples"]


def _as_if_saved_after_the_previous_step(checkpoint: dict) -> None:
    """Make a checkpoint written in on_train_batch_start look like one written in the previous
    on_train_batch_end (where ModelCheckpoint writes), as Lightning's resume logic expects: same global
    step and weights, but the fetched batch not yet counted and the logging step one behind. Without it
    a resumed run would log its steps one too far (Lightning 2.6 loop counters; the tests check this)."""
    loop = checkpoint["loops"]["fit_loop"]
    loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    for counts in loop["epoch_loop.batch_progress"]["total"], loop["epoch_loop.batch_progress"]["current"]:
        counts["ready"] -= 1
        counts["completed"] -= 1


def requeue_slurm_job() -> str:
    """`scontrol requeue` this job (an array job's own task), as Lightning's SLURM auto-requeue does."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"requeueing SLURM job {job} failed ({err}); submit the same command again to resume"
    if result.returncode != 0:
        cause = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[0]
        return f"requeueing SLURM job {job} failed ({cause}); submit the same command again to resume"
    return f"SLURM job {job} requeued: it resumes from this checkpoint when it starts again"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _agree(pl_module: L.LightningModule, flags: list) -> list[bool]:
    """Each flag true on any rank, on every rank (one small all-reduce; none on a single process)."""
    if not _distributed():
        return [bool(f) for f in flags]
    values = torch.stack([torch.as_tensor(f, dtype=torch.float32).to(pl_module.device) for f in flags])
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def _gather(items: list) -> list:
    """Every rank's items, in rank order, on every rank."""
    if not _distributed():
        return items
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [item for rank_items in gathered for item in rank_items]
