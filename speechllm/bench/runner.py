"""`speechllm bench`: one run that measures a stage-1 training step from every side.

In order, in one process:

1. Stage 1 trained from audio by our Trainer (`speechllm.training.run.train`, every callback and logger of a
   normal run) for warm-up + N steps, timed by a StepTimer: the step-time breakdown, memory, throughput. Next
   to each of its steps, the same batch goes through the same model in a bare step with its own optimizer
   (bare_loop.py): the framework-overhead reference, measured at the same moments.
2. The same run's training loader alone (its configured workers), over the same batches: loader throughput.
3. The padding of bucketed against random batches (same budget) over the training manifests.
4. The encoder feature cache of stage 1's training clips, built afresh (build time), then stage 1 trained from
   it for the batches of one epoch of its data (at most N): epoch time with and without the cache.

Every time is a median over the steps after the warm-up, so that a busy machine disturbs single steps, not the
result; the epoch is its number of batches times the median step.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning
import torch
import transformers
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from speechllm.bench.flops import flop_model, peak_bf16_tflops
from speechllm.bench.padding import padding_ratios
from speechllm.bench.profiler import PARTS, StepRecord, peak_rss
from speechllm.bench.timer import StepTimer
from speechllm.config import load_config
from speechllm.data.feature_cache import FeatureCache, build_cache
from speechllm.data.sampler import MixturePhase
from speechllm.model.encoder import AudioEncoder, inference_dtype
from speechllm.training.datamodule import SpeechDataModule
from speechllm.training.run import train

STAGE = Path(__file__).resolve().parents[2] / "stages" / "stage1.yaml"
# The tiny preset is stage 1 as `make train-stage1` runs it; the realistic one swaps in a WavLM-Base-size
# encoder and a Qwen2-0.5B-size LLM, both random (configs/model/wavlm_base_qwen2_0.5b_random.yaml), in bf16.
PRESETS = {
    "tiny": [],
    "realistic": ["presets.model=wavlm_base_qwen2_0.5b_random", "presets.trainer=gpu", "data.max_batch_seconds=120",
                  "data.num_workers=4"],
}
# `--preset realistic --force` without a GPU: a few small steps, to check the path end to end.
FORCED_ON_CPU = ["presets.trainer=cpu", "data.max_batch_seconds=8", "data.num_workers=1"]
TARGETS = {  # name: (target, "max" if the value must not exceed it, else "min")
    "overhead": (1.10, "max"),
    "padding": (0.10, "max"),
    "cache_speedup": (3.0, "min"),
    "loader_ratio": (5.0, "min"),
}


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message is one line with the fix."""


@dataclass
class BenchSettings:
    out: Path = Path("bench")
    steps: int = 50
    """Measured steps per run (after the warm-up)."""
    warmup: int = 5
    """Steps run first and left out of every median (allocations, worker start, first-time dispatch)."""
    preset: str = "tiny"
    force: bool = False
    """Run the realistic preset without a GPU (a few small steps)."""
    peak_tflops: float | None = None
    """The accelerator's dense bf16 peak for MFU, when its name is not in flops.PEAK_BF16_TFLOPS."""
    threads: int | None = None
    """torch's intra-op threads in this process. None: 1 on CPUs (torch's default, one per core, stalls whenever
    another job on the machine deschedules one of them), torch's default on GPUs; 0: torch's default."""
    overrides: list[str] = field(default_factory=list)
    stage: Path = STAGE


def run_bench(settings: BenchSettings) -> dict:
    settings = _checked(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(settings, "audio", settings.warmup + settings.steps)
    device = _device(cfg)
    threads = settings.threads if settings.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    skip = settings.warmup

    # 1. Our Trainer, from audio, next to bare steps on the same batches.
    if device.type == "cuda":
        torch.cuda.init()  # memory statistics before CUDA's lazy start fail ("Invalid device argument")
        torch.cuda.reset_peak_memory_stats(device)
    audio_timer = StepTimer(bare=True)
    run = train(cfg, callbacks=[audio_timer])
    audio_steps, bare_steps = audio_timer.steps[skip:], audio_timer.bare_steps[skip:]
    memory = {"peak_rss_mib": _mib(peak_rss())}
    if device.type == "cuda":
        memory["gpu_max_allocated_mib"] = _mib(torch.cuda.max_memory_allocated(device))
    memory["train_rss_max_mib"] = _mib(max(s.rss_bytes or 0 for s in audio_steps))
    model, datamodule = run.module.model, run.datamodule
    parameters = _parameters(model)

    flops = flop_model(model.to(device))  # Lightning's teardown moved the model to the CPU
    model.cpu()

    # 2. The loader alone.
    loader_rate = _loader_throughput(datamodule, settings.warmup + settings.steps)

    # 3. Padding.
    padding = padding_ratios(datamodule)

    # 4. The feature cache: built afresh, then one epoch from it.
    epoch_batches = _batches_per_epoch(datamodule)
    measured = min(epoch_batches, settings.steps)
    build = _build_cache(cfg, out / "feature_cache", datamodule, device)
    cached_cfg = _config(settings, "cached", settings.warmup + measured, f"data.feature_cache={out / 'feature_cache'}")
    cached_timer = StepTimer(bare=True)
    cached_run = train(cached_cfg, callbacks=[cached_timer])
    cached_steps, cached_bare_steps = cached_timer.steps[skip:], cached_timer.bare_steps[skip:]
    cached_loader_rate = _loader_throughput(cached_run.datamodule, settings.warmup + measured)

    results = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(device),
        "settings": _settings(settings, cfg),
        "model": parameters,
        "step_time": _breakdown(audio_steps),
        "step_time_cached": _breakdown(cached_steps),
        "overhead": _overhead(audio_steps, bare_steps),
        "overhead_cached": _overhead(cached_steps, cached_bare_steps),
        "padding": {"bucketed": padding.bucketed, "random": padding.random, "num_buckets": padding.num_buckets,
                    "examples": padding.examples, "tasks": padding.tasks},
        "feature_cache": _cache_result(audio_steps, cached_steps, epoch_batches, measured, build),
        "loader": _loader_result(loader_rate, audio_steps, cached_loader_rate, cached_steps, cfg),
        "memory": memory,
        "throughput": _throughput(audio_steps, flops, device, settings.peak_tflops),
    }
    results["targets"] = _targets(results)
    return results


# Configuration ---------------------------------------------------------------------------------------------

def _checked(settings: BenchSettings) -> BenchSettings:
    if settings.preset not in PRESETS:
        raise BenchError(f"--preset {settings.preset}: not one of {', '.join(PRESETS)}")
    if settings.steps < 1 or settings.warmup < 1:
        raise BenchError("--steps and --warmup must be at least 1")
    if settings.preset == "realistic" and not torch.cuda.is_available():
        if not settings.force:
            raise BenchError("--preset realistic needs a GPU (none is visible): it trains a 0.5B-parameter LLM; "
                             "add --force to run a few small steps on the CPU anyway")
        settings = dataclasses.replace(settings, steps=min(settings.steps, 2), warmup=min(settings.warmup, 1))
    return settings


def _config(settings: BenchSettings, name: str, steps: int, *extra: str) -> DictConfig:
    preset = list(PRESETS[settings.preset])
    if settings.preset == "realistic" and not torch.cuda.is_available():
        preset += FORCED_ON_CPU
    return load_config(settings.stage, [
        *preset,
        *settings.overrides,
        f"output_dir={Path(settings.out) / 'runs'}",
        f"run_name={name}",
        "resume=never",
        "init_from=null",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=null",
        "trainer.accumulate_grad_batches=1",
        "data.dev_manifests=[]",  # no validation inside the measured steps
        "data.feature_cache=null",
        "trainer.devices=1",  # one process: the bench times one device's steps
        "trainer.num_nodes=1",
        "trainer.strategy=auto",
        *extra,
    ])


def _device(cfg: DictConfig) -> torch.device:
    if cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


# Measurements ----------------------------------------------------------------------------------------------

def _loader_throughput(datamodule: SpeechDataModule, count: int) -> float:
    """Batches per second of the training loader alone (its configured workers), after its first batch."""
    loader = datamodule.train_dataloader()
    arrived = []
    for _ in zip(range(count), loader):
        arrived.append(time.perf_counter())
    del loader  # ends its workers
    return (len(arrived) - 1) / (arrived[-1] - arrived[0]) if len(arrived) > 1 else float("nan")


def _batches_per_epoch(datamodule: SpeechDataModule) -> int:
    """Batches of the stage's first phase until its training data has been seen once (a task epoch ends)."""
    sampler = datamodule.training_sampler([MixturePhase(until_batch=2**40, weights=datamodule.mixture[0].weights)])
    count = 0
    for batch in sampler:
        if any(epoch > 0 for _, epoch in batch):
            break
        count += 1
    return count


@dataclass
class CacheBuild:
    seconds: float
    clips: int
    bytes: int


def _build_cache(cfg: DictConfig, root: Path, datamodule: SpeechDataModule, device: torch.device) -> CacheBuild:
    """Encodes stage 1's training clips into a fresh cache (what a run with data.feature_cache reads)."""
    encoder = AudioEncoder(OmegaConf.to_object(cfg.model.encoder))  # as the cached run builds it (same weights)
    cache = FeatureCache.for_encoder(root, encoder, cfg.data.feature_cache_dtype)
    shutil.rmtree(cache.directory, ignore_errors=True)  # the build time is measured, never skipped
    tasks = datamodule.plan.tasks
    clips = [(e.audio, e.duration) for e in datamodule.train_set.examples if e.task in tasks]
    started = time.perf_counter()
    report = build_cache(cache, encoder, clips, device=device,
                         autocast_dtype=inference_dtype(cfg.trainer.precision, device),
                         max_batch_seconds=cfg.data.max_batch_seconds, progress=cfg.trainer.enable_progress_bar,
                         log=rank_zero_info)
    seconds = time.perf_counter() - started
    rank_zero_info(report.summary())
    return CacheBuild(seconds, report.encoded, cache.disk_bytes())


# Results ---------------------------------------------------------------------------------------------------

def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def _breakdown(steps: list[StepRecord]) -> dict:
    """Medians per part and of the whole step; `parts_mean` adds up to `mean_seconds` exactly."""
    period = _median(s.period for s in steps)
    return {
        "steps": len(steps),
        "seconds": period,
        "steps_per_second": 1 / period if period else float("nan"),
        "mean_seconds": statistics.fmean(s.period for s in steps) if steps else float("nan"),
        "parts": {part: _median(s.seconds[part] for s in steps) for part in PARTS},
        "parts_mean": {part: statistics.fmean(s.seconds[part] for s in steps) if steps else float("nan")
                       for part in PARTS},
    }


def _overhead(ours: list[StepRecord], bare: list[StepRecord]) -> dict:
    ours_time, bare_time = _median(s.period for s in ours), _median(s.period for s in bare)
    without_wait = _median(s.period - s.seconds["data_wait"] for s in ours)
    # Each Lightning step and its bare step ran on the same batch, back to back: their difference is free of
    # the spread between short and long batches.
    extra = _median(a.period - b.period for a, b in zip(ours, bare))
    return {
        "ours_seconds": ours_time,
        "bare_seconds": bare_time,
        "ratio": ours_time / bare_time,
        "ratio_without_data_wait": without_wait / bare_time,
        "paired_extra_seconds": extra,
        "paired_ratio": (bare_time + extra) / bare_time,
        "bare_parts": {part: _median(s.seconds[part] for s in bare) for part in PARTS},
    }


def _cache_result(audio: list[StepRecord], cached: list[StepRecord], epoch_batches: int, measured: int,
                  build: CacheBuild) -> dict:
    """One epoch as its number of batches times the median step over the same batches in both runs: a stall of
    the machine in one step moves a sum, not a median. The measured wall times (stalls included) come along."""
    audio, cached = audio[:measured], cached[:measured]
    from_audio = _median(s.period for s in audio) * epoch_batches
    from_cache = _median(s.period for s in cached) * epoch_batches
    encoder_share = sum(s.seconds["encoder"] for s in audio) / sum(s.period for s in audio)
    return {
        "epoch_batches": epoch_batches,
        "measured_batches": measured,
        "epoch_seconds_audio": from_audio,
        "epoch_seconds_cached": from_cache,
        "speedup": from_audio / from_cache,
        "measured_seconds_audio": sum(s.period for s in audio),
        "measured_seconds_cached": sum(s.period for s in cached),
        # What the cache gives if it removes exactly the encoder's time (the rest of a step is the same).
        "encoder_share": encoder_share,
        "encoder_free_speedup": 1 / (1 - encoder_share),
        "build_seconds": build.seconds,
        "build_clips": build.clips,
        "cache_mib": _mib(build.bytes),
    }


def _loader_result(rate: float, steps: list[StepRecord], cached_rate: float, cached_steps: list[StepRecord],
                   cfg: DictConfig) -> dict:
    step_rate = 1 / _median(s.period for s in steps)
    cached_step_rate = 1 / _median(s.period for s in cached_steps)
    return {
        "workers": cfg.data.num_workers,
        "batches_per_second": rate,
        "steps_per_second": step_rate,
        "ratio": rate / step_rate,
        "cached_batches_per_second": cached_rate,
        "cached_steps_per_second": cached_step_rate,
        "cached_ratio": cached_rate / cached_step_rate,
    }


def _throughput(steps: list[StepRecord], flops, device: torch.device, peak_tflops: float | None) -> dict:
    wall = sum(s.period for s in steps)
    model_flops = sum(flops.step_flops(s.audio_seconds, s.llm_tokens, s.llm_tokens_squared, s.target_tokens)
                      for s in steps)
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = peak_bf16_tflops(torch.cuda.get_device_name(device))
    achieved = model_flops / wall / 1e12
    return {
        "llm_tokens_per_second": sum(s.llm_tokens for s in steps) / wall,
        "audio_seconds_per_second": sum(s.audio_seconds for s in steps) / wall,
        "examples_per_second": sum(s.examples for s in steps) / wall,
        "model_tflops_per_second": achieved,
        "peak_tflops": peak_tflops,
        "mfu": achieved / peak_tflops if peak_tflops else None,
    }


def _targets(results: dict) -> list[dict]:
    values = {
        "overhead": results["overhead"]["ratio"],
        "padding": results["padding"]["bucketed"],
        "cache_speedup": results["feature_cache"]["speedup"],
        "loader_ratio": results["loader"]["ratio"],
    }
    targets = []
    for name, (target, kind) in TARGETS.items():
        value = values[name]
        met = value <= target if kind == "max" else value >= target
        targets.append({"name": name, "value": value, "target": target, "kind": kind, "met": bool(met)})
    return targets


def _parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = {g: sum(p.numel() for p in params.values() if p.requires_grad)
              for g, params in model.trainable_groups().items()}
    return {"total": total, "trainable": trainable, "trainable_share": trainable / total,
            "trainable_groups": {g: n for g, n in groups.items() if n}}


def _machine(device: torch.device) -> dict:
    machine = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),  # intra-op threads of the training process
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _settings(settings: BenchSettings, cfg: DictConfig) -> dict:
    return {
        "preset": settings.preset,
        "stage": str(settings.stage),
        "steps": settings.steps,
        "warmup": settings.warmup,
        "threads": settings.threads,
        "overrides": list(settings.overrides),
        "model": cfg.presets.model,
        "precision": cfg.trainer.precision,
        "max_batch_seconds": cfg.data.max_batch_seconds,
        "num_workers": cfg.data.num_workers,
        "gradient_clip_val": cfg.trainer.gradient_clip_val,
    }


def _mib(n: float) -> float:
    return n / 2**20
