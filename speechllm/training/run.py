"""The training recipe: config -> validated data -> model -> Lightning Trainer -> runs/<run_name>/."""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from speechllm.atomic import atomic_write_text
from speechllm.data.manifest import Example, transcripts_as_asr, validate_manifests
from speechllm.data.tasks import TaskRegistry, default_registry
from speechllm.model.pretrained import check_model_sources
from speechllm.model.speech_llm import SpeechLLM
from speechllm.training.checkpoints import (
    LAST,
    META_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    UnreadableCheckpoint,
    check_writable,
    load_trained_weights,
    newest_readable,
    read_compatible,
)
from speechllm.training.datamodule import SpeechDataModule
from speechllm.training.faults import FaultGuard
from speechllm.training.loggers import build_loggers, finish_loggers
from speechllm.training.module import SpeechLLMModule
from speechllm.training.stage_scheduler import StagePlan, StageScheduler
from speechllm.training.strategy import build_strategy


# Our batch sampler resumes from the checkpoint's position (SpeechDataModule.state_dict), which Lightning
# cannot see: its warning that the loader is not resumable would be wrong.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# The frozen encoder is in eval mode on purpose (no dropout, deterministic features).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class DataError(ValueError):
    """Bad manifest rows found before training; the message lists them as manifest:line: reason."""


@dataclass
class TrainingRun:
    run_dir: Path
    module: SpeechLLMModule  # the trained model, in memory (tests compare it with its sources)
    datamodule: SpeechDataModule  # its data (`speechllm bench` reads the same batches again)


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> TrainingRun:
    """`callbacks`: added to the run's own (`speechllm bench` times steps with one)."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    registry = build_registry(cfg.data.task_files)
    plan = StagePlan(cfg)
    # Checkpoints are checked first: a wrong path or model config fails in seconds, not after data checks.
    resume_path = resolve_resume(cfg, run_dir)
    resumed = read_resume(resume_path, cfg.model) if resume_path else None
    initial = read_compatible(cfg.init_from, cfg.model) if cfg.init_from and resumed is None else None
    check_model_sources(cfg.model)  # a model name that cannot be found fails now, not after the data checks
    train_data = load_examples(cfg, registry, run_dir, "train")
    dev_data = load_examples(cfg, registry, run_dir, "dev")
    check_writable(run_dir / "checkpoints")

    module = SpeechLLMModule(cfg, plan, registry.names())
    datamodule = SpeechDataModule(
        cfg, plan, registry, train_data.examples, dev_data.examples, tokenizer=module.model.tokenizer,
        encoder=module.model.encoder,
    )
    if initial is not None:
        loaded = load_trained_weights(module, cfg.init_from, initial)
        module.carried_groups = [group for group in loaded if group not in plan.trained_groups]
        rank_zero_info(f"init_from {cfg.init_from}: loaded {', '.join(loaded) or 'nothing'}")
    module.wandb_run_id = (resumed or {}).get(META_KEY, {}).get("wandb_run_id") or uuid.uuid4().hex[:8]
    resume_step = resumed["global_step"] if resumed else None
    del resumed, initial  # Lightning reads the resume checkpoint again itself

    trainer = build_trainer(
        cfg, plan, run_dir, module.wandb_run_id, resume_step, validate=len(datamodule.dev_set) > 0, model=module.model,
        extra_callbacks=callbacks,
    )
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))  # eval and export rebuild from it
    for logger in trainer.loggers:  # counts of skipped, resampled, ... rows, next to the config
        logger.log_hyperparams({"data_stats": {"train": train_data.stats, "dev": dev_data.stats}})
    try:
        # A preempted or faulty run ends in TrainingStopped (faults.py), having saved last.ckpt itself.
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
        # The periodic checkpoint may predate the last steps; the final state always lands in last.ckpt.
        trainer.save_checkpoint(run_dir / "checkpoints" / LAST, weights_only=False)
    finally:
        finish_loggers(trainer.loggers)
    return TrainingRun(run_dir, module, datamodule)


def build_trainer(
    cfg: DictConfig,
    plan: StagePlan,
    run_dir: Path,
    wandb_run_id: str,
    resume_step: int | None,
    validate: bool,
    model: SpeechLLM,
    extra_callbacks: Sequence[L.Callback] = (),
) -> L.Trainer:
    t = cfg.trainer
    callbacks = [
        StageScheduler(plan),
        FaultGuard(cfg, run_dir),
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            every_n_train_steps=cfg.checkpoint.every_n_steps,
            save_top_k=0,
            save_last=True,
            save_on_train_epoch_end=False,
            # Always last.ckpt: a moved run directory or resume=never would otherwise write last-v1.ckpt,
            # and resume=auto would go on reading the stale last.ckpt.
            enable_version_counter=False,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.checkpoint.keep_best and validate:
        monitor = cfg.checkpoint.monitor
        callbacks.append(ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename=f"best-step={{step}}-{monitor.replace('/', '_')}={{{monitor}:.4f}}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=cfg.checkpoint.mode,
            save_top_k=cfg.checkpoint.keep_best,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        ))
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # FaultGuard handles SIGUSR1 (save at a step boundary, then requeue); Lightning's auto-requeue
        # would save mid-step to an hpc_ckpt_*.ckpt that resume=auto does not read.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if t.enable_progress_bar:
        callbacks.append(RichProgressBar())
    callbacks.extend(extra_callbacks)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t, model),  # auto, ddp, or FSDP wrapping this model's layers (strategy.py)
        precision=t.precision,
        max_steps=plan.total_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval if validate and t.val_check_interval else None,
        check_val_every_n_epoch=None if validate and t.val_check_interval else 1,
        limit_val_batches=(t.limit_val_batches if t.limit_val_batches is not None else 1.0) if validate else 0,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        default_root_dir=run_dir,
        logger=build_loggers(cfg, run_dir, wandb_run_id, resume_step),
        callbacks=callbacks,
        plugins=plugins,
        use_distributed_sampler=False,  # our batch sampler shards across ranks itself
    )


def build_registry(task_files) -> TaskRegistry:
    registry = default_registry()
    for path in task_files:
        registry.load_yaml(path)
    return registry


@dataclass
class SplitData:
    examples: list[Example]
    stats: dict[str, float]  # logged with the run's hyperparameters (W&B config, hparams.yaml)


def load_examples(cfg: DictConfig, registry: TaskRegistry, run_dir: Path, split: str) -> SplitData:
    """Validate a split's manifests; bad rows stop the run (error) or are dropped, counted and listed (skip)."""
    key = f"data.{split}_manifests"
    manifests = list(cfg.data[f"{split}_manifests"])
    if not manifests:
        if split == "train":
            raise DataError(f"{key}: no training manifests configured")
        return SplitData([], {})
    report = validate_manifests(
        manifests,
        registry,
        sample_rate=cfg.model.encoder.sample_rate,
        max_duration=cfg.data.max_duration,
        cache_dir=Path(cfg.output_dir) / ".manifest_cache",
    )
    rank_zero_info(f"{key}: {report.summary()}")
    if report.problems and cfg.data.on_bad_example == "error":
        listed = "\n".join(str(p) for p in report.problems[:20])
        more = f"\n... and {len(report.problems) - 20} more" if len(report.problems) > 20 else ""
        raise DataError(
            f"{len(report.problems)} bad example(s) in {key} (fix them, or set data.on_bad_example=skip):\n{listed}{more}"
        )
    if report.problems and rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"skipped_{split}_examples.txt").write_text("".join(f"{p}\n" for p in report.problems))
        rank_zero_info(f"{key}: skipped {len(report.problems)} bad example(s), listed in {run_dir}/skipped_{split}_examples.txt")
    if not report.examples:
        raise DataError(f"{key}: no usable examples")
    derived = transcripts_as_asr(report.examples) if split == "train" and cfg.data.transcripts_as_asr else []
    if derived:
        rank_zero_info(f"data.transcripts_as_asr: {len(derived)} ASR examples from other tasks' transcripts")
    stats = {
        "examples": len(report.examples),
        "transcripts_as_asr": len(derived),
        "skipped": len(report.problems),
        "hours": round(report.audio_seconds / 3600, 3),
        "stereo_mixed_down": report.stereo,
        "resampled": report.resampled,
    }
    return SplitData(report.examples + derived, stats)


def read_resume(path: Path, model_cfg: DictConfig) -> dict:
    """The checkpoint to resume; an unreadable one is reported with the newest readable one next to it."""
    try:
        return read_compatible(path, model_cfg, "resume")
    except UnreadableCheckpoint as err:
        other = newest_readable(path.parent, exclude=path)
        if other is None:
            hint = "no other readable checkpoint next to it: start over with resume=never"
        else:
            hint = (f"the newest readable checkpoint there is {other[0]} (step {other[1]}): continue from it with "
                    f"resume={other[0]}, or start over with resume=never")
        raise CheckpointError(f"{err}; {hint}") from None


def resolve_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / LAST
        return last if last.is_file() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise CheckpointError(f"resume: no checkpoint at {path}")
    return path
