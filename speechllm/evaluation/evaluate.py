"""`speechllm eval`: a trained run's model, batched generation over manifests, per-task metrics.

The model is rebuilt from the run's saved `config.yaml` (frozen parts from their source, as in
training) and gets the trained groups of `checkpoints/last.ckpt`. Examples are batched by duration
(`DurationBatchSampler`), answered with `SpeechLLM.generate`, and scored with each task's metric
from the task registry. Writes a JSON report and a JSONL of every prediction.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from speechllm.config import ConfigError, RunConfig
from speechllm.data.dataset import SpeechDataset, collate
from speechllm.data.manifest import Example, validate_manifests
from speechllm.data.sampler import DurationBatchSampler
from speechllm.data.tasks import TaskRegistry
from speechllm.evaluation.metrics import build_metric
from speechllm.model.parts import trainable_groups
from speechllm.model.speech_llm import SpeechLLM
from speechllm.training.checkpoints import LAST, META_KEY, CheckpointError, load_trained_weights, read_checkpoint
from speechllm.training.run import build_registry

SAMPLES_PER_TASK = 3  # example predictions kept in the JSON report, per task


class EvalError(ValueError):
    """Evaluation cannot run on what it was given (bad rows, no examples, no manifests); one line."""


@dataclass
class EvalSettings:
    manifests: list[str] = field(default_factory=list)
    """Manifests to evaluate; empty: the run config's data.<split>_manifests."""
    split: str = "dev"
    """Names the report (<split>.json) and picks the default manifests."""
    heldout_instructions: bool = False
    """Draw instructions from the held-out templates training never used (unseen-instruction evaluation)."""
    max_examples: int | None = None
    """At most this many examples per task (the first ones of each task, in manifest order)."""
    max_batch_size: int | None = None
    """Cap on examples per batch; None uses the run's data.max_batch_size (batches fill data.max_batch_seconds)."""
    num_beams: int = 1
    max_new_tokens: int = 128
    out: Path | None = None
    """JSON report path; None: <run>/eval/<split>[-heldout].json. Predictions go next to it (.predictions.jsonl)."""
    device: str = "auto"
    """auto: cuda if available, else cpu."""
    progress: bool = True


@dataclass
class Prediction:
    id: str
    task: str
    instruction: str
    target: str
    prediction: str
    audio: str


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float | None  # None when the metric is undefined (e.g. WER against empty references)
    higher_is_better: bool
    examples: int


@dataclass
class EvalReport:
    run_dir: Path
    checkpoint: Path
    tasks: list[TaskResult]
    predictions: list[Prediction]
    report_path: Path
    predictions_path: Path
    seconds: float


def evaluate(source: str | Path, settings: EvalSettings) -> EvalReport:
    """Evaluate the run directory (or checkpoint inside <run>/checkpoints/) `source`; writes the reports."""
    start = time.perf_counter()
    run_dir, checkpoint = resolve_run(source)
    cfg = load_run_config(run_dir)
    device = resolve_device(settings.device)
    registry = build_registry(cfg.data.task_files)
    manifests = list(settings.manifests) or default_manifests(cfg, settings.split)
    examples, skipped = load_eval_examples(cfg, registry, run_dir, manifests, settings)
    model, meta, loaded = load_model(cfg, checkpoint, device)
    dataset = SpeechDataset(examples, registry, cfg.model.encoder.sample_rate, seed=cfg.seed,
                            heldout_instructions=settings.heldout_instructions)
    predictions = generate_all(model, dataset, cfg, settings, device)
    results = score_tasks(predictions, registry)
    report = EvalReport(run_dir, checkpoint, results, predictions, *report_paths(run_dir, settings),
                        seconds=time.perf_counter() - start)
    write_reports(report, settings, {
        "stage": meta.get("stage"),
        "phase": meta.get("phase"),
        "global_step": meta.get("global_step"),
        "loaded_groups": loaded,
        "manifests": [str(m) for m in manifests],
        "device": str(device),
        "skipped_bad_rows": skipped,
    })
    return report


def report_paths(run_dir: Path, settings: EvalSettings) -> tuple[Path, Path]:
    """The JSON report (<run>/eval/<split>[-heldout].json unless --out) and the predictions JSONL next to it."""
    name = f"{settings.split}{'-heldout' if settings.heldout_instructions else ''}.json"
    report = Path(settings.out) if settings.out else run_dir / "eval" / name
    return report, report.with_name(report.stem + ".predictions.jsonl")


def write_reports(report: EvalReport, settings: EvalSettings, details: dict) -> None:
    summary = {
        "run_dir": str(report.run_dir),
        "checkpoint": str(report.checkpoint),
        **{k: details[k] for k in ("stage", "phase", "global_step", "loaded_groups")},
        "split": settings.split,
        "heldout_instructions": settings.heldout_instructions,
        "manifests": details["manifests"],
        "max_examples_per_task": settings.max_examples,
        "num_beams": settings.num_beams,
        "max_new_tokens": settings.max_new_tokens,
        "device": details["device"],
        "examples": len(report.predictions),
        "skipped_bad_rows": details["skipped_bad_rows"],
        "seconds": round(report.seconds, 2),
        "predictions_file": str(report.predictions_path),
        "tasks": {
            r.task: {**asdict(r), "samples": [asdict(p) for p in report.predictions if p.task == r.task][:SAMPLES_PER_TASK]}
            for r in report.tasks
        },
    }
    report.report_path.parent.mkdir(parents=True, exist_ok=True)
    report.report_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    with open(report.predictions_path, "w", encoding="utf-8") as out:
        for p in report.predictions:
            out.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device '{name}' is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return device


def resolve_run(source: str | Path) -> tuple[Path, Path]:
    """A run directory -> (it, its checkpoints/last.ckpt); a checkpoint file -> (the run above checkpoints/, it)."""
    path = Path(source)
    if path.is_dir():
        run_dir, checkpoint = path, path / "checkpoints" / LAST
    elif path.is_file():
        run_dir, checkpoint = path.parent.parent, path
        if path.parent.name != "checkpoints":
            raise CheckpointError(f"{path}: a checkpoint must sit in <run>/checkpoints/ (its run's config.yaml is read)")
    else:
        raise CheckpointError(f"{path}: no run directory or checkpoint there")
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no checkpoint (has the run {run_dir} saved one yet?)")
    return run_dir, checkpoint


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's resolved config.yaml (presets already merged in), checked against the schema only:
    training's own checks (steps, phases) do not concern evaluation."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: run config not found (is {run_dir} a speechllm run directory?)")
    try:
        return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    except Exception as err:  # YAML syntax or schema (unknown key, wrong type): both mean a damaged file
        lines = str(err).strip().splitlines()
        raise ConfigError(f"{path}: not a valid run config ({lines[0] if lines else type(err).__name__})") from None


def default_manifests(cfg: DictConfig, split: str) -> list[str]:
    key = f"{split}_manifests"
    if key not in cfg.data:
        raise EvalError(f"--split {split}: the run config has no data.{key}; name the manifests with --manifest")
    if not cfg.data[key]:
        raise EvalError(f"data.{key} of the run is empty; name the manifests with --manifest")
    return list(cfg.data[key])


def load_eval_examples(
    cfg: DictConfig, registry: TaskRegistry, run_dir: Path, manifests: list[str], settings: EvalSettings
) -> tuple[list[Example], int]:
    """Validated examples (bad rows stop evaluation, or are skipped with data.on_bad_example=skip), capped per task."""
    report = validate_manifests(
        manifests,
        registry,
        sample_rate=cfg.model.encoder.sample_rate,
        max_duration=cfg.data.max_duration,
        cache_dir=run_dir.parent / ".manifest_cache",
        progress=settings.progress,
    )
    if report.problems and cfg.data.on_bad_example == "error":
        raise EvalError(
            f"{len(report.problems)} bad example(s), first {report.problems[0]} "
            f"(`speechllm data validate {' '.join(map(str, manifests))}` lists them all)"
        )
    examples, per_task = [], defaultdict(int)
    for example in report.examples:
        if settings.max_examples is None or per_task[example.task] < settings.max_examples:
            per_task[example.task] += 1
            examples.append(example)
    if not examples:
        raise EvalError(f"no usable examples in {', '.join(map(str, manifests))}")
    if settings.heldout_instructions:
        lacking = sorted({e.task for e in examples if not e.instruction and not registry.get(e.task).heldout_templates})
        if lacking:
            raise EvalError(f"--heldout-instructions: task(s) {', '.join(lacking)} have no held-out templates")
    return examples, len(report.problems)


def load_model(cfg: DictConfig, checkpoint: Path, device: torch.device) -> tuple[SpeechLLM, dict, dict[str, list[str]]]:
    """The run's model with its trained weights, in eval mode; also the checkpoint's metadata and what was loaded.

    Groups the checkpoint lacks but the run started from (`init_from`, e.g. a stage that trains only
    LoRA on a previous stage's projection) come from `init_from`; groups that never trained keep the
    run's seeded initialisation, as in training.
    """
    L.seed_everything(cfg.seed, verbose=False)  # the same initialisation the run started from
    model = SpeechLLM(cfg.model)
    meta = read_checkpoint(checkpoint).get(META_KEY, {})
    holder = SimpleNamespace(cfg=cfg, model=model)  # what load_trained_weights reads: .cfg.model and .model
    loaded = {}
    untrained = {g for g, params in trainable_groups(model).items() if params} - set(meta.get("trained_groups", []))
    if cfg.init_from and untrained:
        loaded["init_from"] = load_trained_weights(holder, cfg.init_from)
    loaded["checkpoint"] = load_trained_weights(holder, str(checkpoint))
    return model.to(device).eval(), meta, loaded


def generate_all(
    model: SpeechLLM, dataset: SpeechDataset, cfg: DictConfig, settings: EvalSettings, device: torch.device
) -> list[Prediction]:
    """Every example answered once, batched by duration; returned in manifest order."""
    sampler = DurationBatchSampler(
        [e.duration for e in dataset.examples],
        max_batch_seconds=cfg.data.max_batch_seconds,
        max_batch_size=settings.max_batch_size or cfg.data.max_batch_size,
    )
    workers = cfg.data.num_workers
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        pin_memory=device.type == "cuda")
    index = {example.id: i for i, example in enumerate(dataset.examples)}
    answers: dict[int, Prediction] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not settings.progress) as bar, torch.inference_mode():
        job = bar.add_task(f"eval {settings.split} ({len(dataset)} examples)", total=len(sampler))
        for batch in loader:
            texts = model.generate(
                batch.wave.to(device), batch.wave_mask.to(device), batch.instructions,
                max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
            )
            for id_, task, instruction, target, text in zip(batch.ids, batch.tasks, batch.instructions, batch.targets, texts):
                i = index[id_]
                answers[i] = Prediction(id_, task, instruction, target, text, dataset.examples[i].audio)
            bar.advance(job)
    return [answers[i] for i in sorted(answers)]


def score_tasks(predictions: list[Prediction], registry: TaskRegistry) -> list[TaskResult]:
    """One result per task present, in registry order, with the metric the task registers."""
    by_task: dict[str, list[Prediction]] = defaultdict(list)
    for p in predictions:
        by_task[p.task].append(p)
    results = []
    for name in (n for n in registry.names() if n in by_task):
        metric = build_metric(registry.get(name).metric)
        metric.update([p.prediction for p in by_task[name]], [p.target for p in by_task[name]])
        value = metric.compute()
        value = value if math.isfinite(value) else None
        results.append(TaskResult(name, metric.name, value, metric.higher_is_better, len(by_task[name])))
    return results


def print_table(report: EvalReport, console: Console | None = None) -> None:
    from rich.table import Table

    table = Table(title=f"{report.run_dir} ({report.checkpoint.name})")
    for column, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("examples", "right")):
        table.add_column(column, justify=justify)
    for r in report.tasks:
        arrow = "↑" if r.higher_is_better else "↓"
        table.add_row(r.task, f"{r.metric} {arrow}", "n/a" if r.value is None else f"{r.value:.4f}", str(r.examples))
    (console or Console()).print(table)
