"""`speechllm eval`: a trained run's model, batched generation over manifests, per-task metrics.

The model is rebuilt from the run's saved `config.yaml` (frozen parts from their source, as in
training) and gets the trained groups of `checkpoints/last.ckpt`. Examples are batched task by task
and by duration (`DurationBatchSampler`), answered with `SpeechLLM.generate` under each task's token
budget, once per instruction set (training's seen templates, held-out templates, or both), and scored
with each task's metrics. `speechllm.evaluation.report` writes the results.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from speechllm.config import INSTRUCTION_SETS, ConfigError, RunConfig
from speechllm.data.dataset import SpeechDataset, collate
from speechllm.data.manifest import Example, validate_manifests
from speechllm.data.sampler import DurationBatchSampler
from speechllm.data.tasks import TaskRegistry
from speechllm.evaluation.generation import generate_by_task, token_budgets
from speechllm.evaluation.metrics import TaskScores, parse_normalization, score_tasks
from speechllm.model.llm import switch_off_untrained_adapters
from speechllm.model.parts import trainable_groups
from speechllm.model.speech_llm import SpeechLLM
from speechllm.training.checkpoints import LAST, META_KEY, CheckpointError, load_trained_weights, read_checkpoint
from speechllm.training.run import build_registry


class EvalError(ValueError):
    """Evaluation cannot run on what it was given (bad rows, no examples, no manifests); one line."""


@dataclass
class EvalSettings:
    manifests: list[str] = field(default_factory=list)
    """Manifests to evaluate; empty: the run config's data.<split>_manifests."""
    split: str = "dev"
    """Names the default output directory and picks the default manifests."""
    instructions: str = "seen"
    """seen: phrased with training's templates; heldout: with the held-out templates training never
    used (unseen-instruction evaluation); both: every example answered twice, reported side by side.
    Rows with their own `instruction` keep it in every set."""
    max_examples: int | None = None
    """At most this many examples per task (the first ones of each task, in manifest order)."""
    max_batch_size: int | None = None
    """Cap on examples per batch; None uses the run's data.max_batch_size (batches fill data.max_batch_seconds)."""
    num_beams: int = 1
    max_new_tokens: int | None = None
    """Generated-token budget for every task; None: each task's default (`generation.DEFAULT_MAX_NEW_TOKENS`)."""
    max_new_tokens_per_task: dict[str, int] = field(default_factory=dict)
    """Budgets for single tasks, over `max_new_tokens`."""
    wer_normalize: str | None = None
    """WER text normalisation, e.g. 'lower,punct,whitespace' or 'none'; None: the run's eval.wer_normalize."""
    out: Path | None = None
    """Output directory; None: <run>/eval/<split>-<instructions>/."""
    device: str = "auto"
    """auto: cuda if available, else cpu."""
    progress: bool = True
    chart: bool = True
    """Draw the metrics as a PNG bar chart (matplotlib)."""


@dataclass
class Prediction:
    id: str
    task: str
    instructions: str  # the instruction set: seen | heldout
    instruction: str
    target: str
    prediction: str
    audio: str


@dataclass
class EvalReport:
    run_dir: Path
    checkpoint: Path
    instruction_sets: list[str]  # seen and/or heldout, the report's columns
    scores: dict[str, list[TaskScores]]  # instruction set -> one entry per task present
    predictions: list[Prediction]
    out_dir: Path
    budgets: dict[str, int]  # max new tokens per task
    details: dict  # what the JSON report records about the run and the settings
    seconds: float = 0.0
    files: dict[str, Path] = field(default_factory=dict)  # written by report.write_reports


def evaluate(source: str | Path, settings: EvalSettings) -> EvalReport:
    """Evaluate the run directory (or checkpoint inside <run>/checkpoints/) `source`; writes the reports."""
    from speechllm.evaluation.report import write_reports

    start = time.perf_counter()
    if settings.instructions not in INSTRUCTION_SETS:
        raise EvalError(f"--instructions {settings.instructions}: use one of {', '.join(INSTRUCTION_SETS)}")
    sets = ["seen", "heldout"] if settings.instructions == "both" else [settings.instructions]
    run_dir, checkpoint = resolve_run(source)
    cfg = load_run_config(run_dir)
    try:
        normalization = parse_normalization(settings.wer_normalize or cfg.eval.wer_normalize)
    except ValueError as err:
        raise EvalError(f"--wer-normalize: {err}") from None
    device = resolve_device(settings.device)
    registry = build_registry(cfg.data.task_files)
    unknown = sorted(set(settings.max_new_tokens_per_task) - set(registry.names()))
    if unknown:
        raise EvalError(f"--max-new-tokens {unknown[0]}=...: no task '{unknown[0]}' (tasks: {', '.join(registry.names())})")
    manifests = list(settings.manifests) or default_manifests(cfg, settings.split)
    examples, skipped = load_eval_examples(cfg, registry, run_dir, manifests, settings, heldout="heldout" in sets)
    model, meta, loaded = load_model(cfg, checkpoint, device)
    budget = token_budgets(registry, settings.max_new_tokens, settings.max_new_tokens_per_task)
    predictions = []
    for instruction_set in sets:
        dataset = SpeechDataset(examples, registry, cfg.model.encoder.sample_rate, seed=cfg.seed,
                                heldout_instructions=instruction_set == "heldout")
        predictions += generate_all(model, dataset, cfg, settings, device, budget, instruction_set)
    scores = {
        s: score_tasks(((p.task, p.prediction, p.target) for p in predictions if p.instructions == s), registry,
                       normalization)
        for s in sets
    }
    tasks = [t for t in registry.names() if any(e.task == t for e in examples)]
    out_dir = Path(settings.out) if settings.out else run_dir / "eval" / f"{settings.split}-{settings.instructions}"
    details = {
        "stage": meta.get("stage"),
        "phase": meta.get("phase"),
        "global_step": meta.get("global_step"),
        "loaded_groups": loaded,
        "split": settings.split,
        "manifests": [str(m) for m in manifests],
        "max_examples_per_task": settings.max_examples,
        "num_beams": settings.num_beams,
        "wer_normalize": ",".join(normalization) or "none",
        "device": str(device),
        "skipped_bad_rows": skipped,
    }
    report = EvalReport(run_dir, checkpoint, sets, scores, predictions, out_dir, {t: budget(t) for t in tasks}, details)
    report.seconds = time.perf_counter() - start
    write_reports(report, chart=settings.chart)
    return report


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
    cfg: DictConfig, registry: TaskRegistry, run_dir: Path, manifests: list[str], settings: EvalSettings,
    heldout: bool = False,
) -> tuple[list[Example], int]:
    """Validated examples (bad rows stop evaluation, or are skipped with data.on_bad_example=skip), capped per task.

    `heldout`: the examples will be phrased with held-out templates, so their tasks must have some.
    """
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
    if heldout:
        lacking = sorted({e.task for e in examples if not e.instruction and not registry.get(e.task).heldout_templates})
        if lacking:
            raise EvalError(f"--instructions {settings.instructions}: task(s) {', '.join(lacking)} have no held-out templates")
    return examples, len(report.problems)


def load_model(cfg: DictConfig, checkpoint: Path, device: torch.device) -> tuple[SpeechLLM, dict, dict[str, list[str]]]:
    """The run's model with its trained weights, in eval mode; also the checkpoint's metadata and what was loaded.

    Groups the checkpoint lacks but the run started from (`init_from`, e.g. a stage that trains only
    LoRA on a previous stage's projection) come from `init_from`; groups that never trained keep the
    run's seeded initialisation, as in training. LoRA adapters that never trained are switched off. Under the
    run's `*-mixed` precision on a GPU, the frozen weights are stored and generation runs in its dtype.
    """
    L.seed_everything(cfg.seed, verbose=False)  # the same initialisation the run started from
    model = SpeechLLM(cfg.model)
    meta = read_checkpoint(checkpoint).get(META_KEY, {})
    holder = SimpleNamespace(cfg=cfg, model=model)  # what load_trained_weights reads: .cfg.model and .model
    loaded = {}
    saved = {*meta.get("trained_groups", []), *meta.get("carried_groups", [])}
    untrained = {g for g, params in trainable_groups(model).items() if params} - saved
    if cfg.init_from and untrained:
        loaded["init_from"] = load_trained_weights(holder, cfg.init_from)
    loaded["checkpoint"] = load_trained_weights(holder, str(checkpoint))
    switch_off_untrained_adapters(model.llm)  # a stage-1 model's LoRA adds zero: generate without computing it
    # The run's mixed precision, as in training: half the memory, validation's numbers.
    return model.for_inference(cfg.trainer.precision, device), meta, loaded


def generate_all(
    model: SpeechLLM,
    dataset: SpeechDataset,
    cfg: DictConfig,
    settings: EvalSettings,
    device: torch.device,
    budget,
    instruction_set: str,
) -> list[Prediction]:
    """Every example answered once, in batches of one task (so each gets its task's token budget)
    sorted by duration; returned in manifest order."""
    batches = eval_batches(dataset, cfg.data.max_batch_seconds, settings.max_batch_size or cfg.data.max_batch_size)
    workers = cfg.data.num_workers
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                        pin_memory=device.type == "cuda")
    answers: dict[int, Prediction] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not settings.progress) as bar, torch.inference_mode():
        job = bar.add_task(f"eval {settings.split}, {instruction_set} instructions ({len(dataset)} examples)",
                           total=len(batches))
        for keys, batch in zip(batches, loader):  # the loader keeps the batch order, workers or not
            texts = generate_by_task(model, batch.wave.to(device), batch.wave_mask.to(device), batch.instructions,
                                     batch.tasks, budget, num_beams=settings.num_beams)
            for (i, _), instruction, text in zip(keys, batch.instructions, texts):
                example = dataset.examples[i]
                answers[i] = Prediction(example.id, example.task, instruction_set, instruction, example.target, text,
                                        example.audio)
            bar.advance(job)
    return [answers[i] for i in sorted(answers)]


def eval_batches(dataset: SpeechDataset, max_batch_seconds: float, max_batch_size: int | None) -> list[list[tuple[int, int]]]:
    """(example index, epoch 0) batches: each holds one task's examples of similar duration."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(dataset.examples):
        by_task[example.task].append(i)
    batches = []
    for rows in by_task.values():
        sampler = DurationBatchSampler([dataset.examples[i].duration for i in rows], max_batch_seconds=max_batch_seconds,
                                       max_batch_size=max_batch_size)
        batches += [[(rows[j], epoch) for j, epoch in batch] for batch in sampler]
    return batches
