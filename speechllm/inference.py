"""`speechllm predict`: a trained model answering instructions about audio files.

A model source is a run directory, a checkpoint in <run>/checkpoints/, or an export directory
(`speechllm export`, `SpeechLLM.from_pretrained`). Inputs are checked (audio readable and non-empty,
instruction non-empty) before the model is built, so a mistake costs no model loading.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch
from omegaconf import OmegaConf

from speechllm.data.audio import load_audio
from speechllm.data.tasks import TaskRegistry, default_registry
from speechllm.evaluation.generation import generate_by_task, token_budgets
from speechllm.model import export
from speechllm.model.speech_llm import SpeechLLM


class PredictError(ValueError):
    """Unusable input for prediction (audio, instruction, manifest row); one line naming it."""


@dataclass
class Request:
    audio: Path
    instruction: str
    task: str | None  # picks the generated-token budget; None: the fallback budget
    row: dict  # the manifest row (echoed into the output), or {} for a single file
    duration: float


def load_inference_model(source: str | Path, device: torch.device) -> tuple[SpeechLLM, TaskRegistry]:
    """The model of a run directory, checkpoint or export directory, in eval mode on `device`, and its tasks."""
    if export.is_export(source):
        return SpeechLLM.from_pretrained(source).for_inference(export.run_precision(source), device), default_registry()
    from speechllm.evaluation.evaluate import load_model, load_run_config, resolve_run
    from speechllm.training.run import build_registry

    run_dir, checkpoint = resolve_run(source)
    cfg = load_run_config(run_dir)
    model, _, _ = load_model(cfg, checkpoint, device)
    return model, build_registry(cfg.data.task_files)


def sample_rate_of(source: str | Path) -> int:
    """The encoder's sample rate, read from the source's config without building the model."""
    if export.is_export(source):
        return int(OmegaConf.load(Path(source) / export.EXPORT_CONFIG).model.encoder.sample_rate)
    from speechllm.evaluation.evaluate import load_run_config, resolve_run

    return int(load_run_config(resolve_run(source)[0]).model.encoder.sample_rate)


def single_request(audio: str | Path, instruction: str | None, task: str | None) -> Request:
    if not instruction or not instruction.strip():
        raise PredictError('--instruction is empty: ask something about the audio, e.g. --instruction "Transcribe the speech."')
    return Request(Path(audio), instruction.strip(), task, {}, _duration(Path(audio), str(audio)))


def manifest_requests(manifest: str | Path) -> list[Request]:
    """Rows `{"audio": ..., "instruction": ...}` (audio relative to the manifest); a row with a `task` but no
    `instruction` gets one of that task's training templates. Other fields are carried to the output."""
    manifest = Path(manifest)
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PredictError(f"{manifest}: cannot read the manifest ({err})") from None
    registry, requests = default_registry(), []
    for number, line in enumerate(lines, 1):
        where = f"{manifest}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PredictError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("audio"), str):
            raise PredictError(f'{where}: needs an "audio" path')
        task = row.get("task")
        instruction = row.get("instruction")
        if not instruction and task in registry:
            fields = {k: v for k, v in row.items() if k not in ("audio", "task", "target", "instruction", "id")}
            instruction = registry.get(task).instruction(fields, random.Random(f"predict:{number}"))
        if not isinstance(instruction, str) or not instruction.strip():
            raise PredictError(f'{where}: needs a non-empty "instruction" (or a known "task" to draw one from)')
        audio = Path(row["audio"]) if Path(row["audio"]).is_absolute() else manifest.parent / row["audio"]
        requests.append(Request(audio, instruction.strip(), task, row, _duration(audio, where)))
    if not requests:
        raise PredictError(f"{manifest}: no rows")
    return requests


def answer(
    model: SpeechLLM,
    requests: list[Request],
    sample_rate: int,
    registry: TaskRegistry,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    batch_size: int = 8,
) -> list[str]:
    """Answers in request order; batches of similar duration, each task with its token budget."""
    budget = token_budgets(registry, max_new_tokens)
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: requests[i].duration)
    answers: list[str | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        waves = [_wave(requests[i], sample_rate) for i in batch]
        lengths = torch.tensor([w.shape[0] for w in waves])
        wave = torch.zeros(len(waves), int(lengths.max()))
        for row, w in zip(wave, waves):
            row[: w.shape[0]] = w
        mask = torch.arange(wave.shape[1])[None] < lengths[:, None]
        with torch.inference_mode():
            texts = generate_by_task(model, wave.to(device), mask.to(device), [requests[i].instruction for i in batch],
                                     [requests[i].task for i in batch], budget, num_beams=num_beams)
        for i, text in zip(batch, texts):
            answers[i] = text
    return answers


def write_predictions(path: str | Path, requests: list[Request], answers: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for request, text in zip(requests, answers):
            out.write(json.dumps({**request.row, "instruction": request.instruction, "prediction": text},
                                 ensure_ascii=False) + "\n")


def _duration(audio: Path, where: str) -> float:
    """Seconds of audio, from the header; unreadable or empty audio is refused here, before any model loads."""
    prefix = "" if where == str(audio) else f"{where}: "
    try:
        info = sf.info(str(audio))
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        reason = "no such file" if not audio.exists() else str(err).strip().splitlines()[0]
        raise PredictError(f"{prefix}{audio}: unreadable audio ({reason})") from None
    if info.frames == 0:
        raise PredictError(f"{prefix}{audio}: the audio file holds no samples")
    return info.frames / info.samplerate


def _wave(request: Request, sample_rate: int) -> torch.Tensor:
    wave, _ = load_audio(request.audio, sample_rate)
    return wave
