"""Manifests: JSONL rows -> validated Examples, every bad row named as `manifest:line: reason`.

A row: `audio` (relative to the manifest's directory, or absolute), `task`, `target`, and optionally
`instruction`, `duration` (seconds), `id`; any other field (`target_language`, `labels`, ...) is kept
for the task's instruction templates.

Decoding every audio file is what makes validation slow, so what a file holds (rate, channels,
frames, whether it decodes cleanly) is cached under `cache_dir`, keyed by path, size and mtime:
re-validating an unchanged corpus, on every DDP rank and every resumed run, opens no audio.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile as sf
from rich.console import Console
from rich.progress import track

from speechllm.atomic import atomic_write_text
from speechllm.data.tasks import Task, TaskError, TaskRegistry
from speechllm.evaluation.metrics import normalize_text

REQUIRED = ("audio", "task", "target")
OPTIONAL = ("instruction", "duration", "id")  # every other field goes to Example.fields
DURATION_TOLERANCE = 0.10  # a declared duration may differ this much (relative) from the audio's
CACHE_VERSION = 1
_BLOCK_FRAMES = 1 << 16
# libsndfile quietly shortens a truncated WAV to the bytes present; only its log shows the cut.
_WAV_CUT = re.compile(r"^data\s*:\s*\d+ \(should be \d+\)", re.MULTILINE)
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object", type(None): "null"}


class ManifestError(ValueError):
    """A manifest file that cannot be read at all (bad rows inside one are Problems instead)."""


@dataclass(frozen=True)
class Example:
    id: str
    audio: str  # absolute path
    task: str  # canonical task name
    target: str
    instruction: str | None  # None: drawn from the task's templates each time the example is used
    duration: float  # seconds; measured from the audio when it was checked
    fields: dict  # the row's other fields, for instruction templates (target_language, labels, ...)
    source: str  # "manifest:line"


@dataclass(frozen=True)
class Problem:
    manifest: str
    line: int  # 1-based
    reason: str

    def __str__(self) -> str:
        return f"{self.manifest}:{self.line}: {self.reason}"


@dataclass
class ValidationReport:
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows: int = 0  # non-blank lines
    stereo: int = 0  # good examples with several channels (load_audio mixes them down)
    resampled: int = 0  # good examples whose file rate differs from the target rate
    durations_filled: int = 0  # good rows without a duration, measured from their audio
    audio_seconds: float = 0.0  # of the good examples
    audio_files_read: int = 0  # files decoded this time, i.e. not answered by the cache

    def summary(self) -> str:
        return (
            f"{self.rows} rows: {len(self.examples)} good, {len(self.problems)} bad, "
            f"{self.audio_seconds / 3600:.2f} h of audio, {self.stereo} stereo mixed down, {self.resampled} resampled"
        )


@dataclass(frozen=True)
class AudioFacts:
    """What one audio file holds, as far as validation cares; `error` says why it cannot be used."""

    sample_rate: int = 0
    channels: int = 0
    frames: int = 0
    finite: bool = True
    error: str | None = None


class _BadRow(Exception):
    """The first reason a row cannot be used."""


def read_manifest(path: str | Path) -> list[tuple[int, str]]:
    """The manifest's non-blank lines with their 1-based line numbers."""
    try:
        with open(path, encoding="utf-8-sig") as lines:  # -sig: editors that prepend a BOM
            return [(number, line.rstrip("\n")) for number, line in enumerate(lines, 1) if line.strip()]
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: manifest is not UTF-8 text") from None
    except OSError as err:
        raise ManifestError(f"{path}: manifest not readable ({err.strerror})") from None


def validate_manifests(
    paths: Iterable[str | Path],
    registry: TaskRegistry,
    *,
    sample_rate: int,
    max_duration: float,
    check_audio: bool = True,
    require_duration: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> ValidationReport:
    """Check every row; good rows become Examples, bad ones Problems carrying the row's first fault.

    With check_audio=False no audio file is opened at all and every row must declare its duration.
    """
    validator = _Validator(registry, sample_rate, max_duration, check_audio, require_duration)
    console = Console(stderr=True)  # the bar stays off stdout, where the CLI prints problems
    for path in paths:
        lines = read_manifest(path)
        cache = _AudioCache(Path(path), cache_dir)
        for number, text in track(lines, f"validating {path}", console=console, disable=not progress):
            validator.row(str(path), number, text, cache)
        cache.save()
    return validator.report


class _Validator:
    def __init__(self, registry, sample_rate, max_duration, check_audio, require_duration):
        self.registry = registry
        self.sample_rate = sample_rate
        self.max_duration = max_duration
        self.check_audio = check_audio
        self.require_duration = require_duration
        self.report = ValidationReport()
        self.ids: dict[str, tuple[str, bool]] = {}  # id -> (first source, explicitly given)

    def row(self, manifest: str, line: int, text: str, cache: _AudioCache) -> None:
        self.report.rows += 1
        try:
            self.report.examples.append(self._example(manifest, line, text, cache))
        except _BadRow as bad:
            self.report.problems.append(Problem(manifest, line, str(bad)))

    def _example(self, manifest: str, line: int, text: str, cache: _AudioCache) -> Example:
        row = _parse(text)
        task = _check_fields(row, self.registry)
        source = f"{manifest}:{line}"
        id_ = self._unique_id(row, Path(manifest).stem, line, source)
        audio = os.path.normpath(os.path.join(os.path.abspath(os.path.dirname(manifest)), row["audio"]))
        declared = row.get("duration")
        if self.check_audio:
            facts = self._audio_facts(audio, cache)
            duration = facts.frames / facts.sample_rate
            if declared is None and self.require_duration:
                raise _BadRow("missing field 'duration'")
            if declared is not None and abs(declared - duration) > DURATION_TOLERANCE * duration:
                raise _BadRow(f"duration {declared:g}s is off by more than 10% from the audio's {duration:.2f}s")
        elif declared is None:
            raise _BadRow("missing field 'duration' (needed when audio is not checked)")
        else:
            facts, duration = AudioFacts(), float(declared)
        if duration > self.max_duration:
            raise _BadRow(f"audio is {duration:.2f}s long, over max_duration {self.max_duration:g}s: {audio}")

        self.report.stereo += facts.channels > 1
        self.report.resampled += bool(facts.sample_rate) and facts.sample_rate != self.sample_rate
        self.report.durations_filled += declared is None
        self.report.audio_seconds += duration
        return Example(
            id=id_,
            audio=audio,
            task=task.name,
            target=row["target"],
            instruction=row.get("instruction"),
            duration=duration,
            fields={k: v for k, v in row.items() if k not in REQUIRED + OPTIONAL},
            source=source,
        )

    def _unique_id(self, row: dict, stem: str, line: int, source: str) -> str:
        """Explicit ids must be unique; default ids (`stem:line`) may repeat across same-named manifests."""
        explicit = row.get("id") is not None
        id_ = str(row["id"]) if explicit else f"{stem}:{line}"
        if id_ in self.ids:
            first, first_explicit = self.ids[id_]
            if explicit or first_explicit:
                raise _BadRow(f"duplicate id '{id_}' (first at {first})")
        self.ids.setdefault(id_, (source, explicit))
        return id_

    def _audio_facts(self, path: str, cache: _AudioCache) -> AudioFacts:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise _BadRow(f"audio file not found: {path}") from None
        except OSError as err:
            raise _BadRow(f"audio file not readable: {path} ({err.strerror})") from None
        facts = cache.get(path, stat)
        if facts is None:
            facts = probe_audio(path)
            self.report.audio_files_read += 1
            cache.put(path, stat, facts)
        if facts.error:
            raise _BadRow(f"{facts.error}: {path}")
        if facts.frames == 0:
            raise _BadRow(f"zero-length audio: {path}")
        if not facts.finite:
            raise _BadRow(f"non-finite samples (NaN or inf) in audio: {path}")
        return facts


def _parse(text: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise _BadRow(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {_JSON_TYPES[type(row)]}")
    return row


def _check_fields(row: dict, registry: TaskRegistry) -> Task:
    """Everything about a row that needs no audio: fields, types, task, target, template fields."""
    for name in REQUIRED:
        if name not in row:
            raise _BadRow(f"missing field '{name}'")
    for name, kinds in (("audio", str), ("task", str), ("target", str), ("instruction", str), ("id", (str, int))):
        value = row.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise _BadRow(f"field '{name}' must be a string, got {_JSON_TYPES[type(value)]}")
    duration = row.get("duration")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 < duration < math.inf
    ):
        raise _BadRow(f"field 'duration' must be a positive number of seconds, got {json.dumps(duration)}")
    if not row["audio"].strip():
        raise _BadRow("field 'audio' is empty")
    try:
        task = registry.get(row["task"])
    except TaskError as err:
        raise _BadRow(str(err)) from None
    if not row["target"].strip():
        raise _BadRow("empty target")
    instruction = row.get("instruction")
    if instruction is not None and not instruction.strip():
        raise _BadRow("empty instruction (leave it out to draw one from the task's templates)")
    missing = sorted(name for name in task.fields() if row.get(name) in (None, ""))
    if missing and instruction is None:
        needed = ", ".join(f"'{name}'" for name in missing)
        raise _BadRow(f"task '{task.name}' needs field {needed} for its instructions (or an explicit 'instruction')")
    return task


def probe_audio(path: str) -> AudioFacts:
    """Decode the whole file: only a full read finds a cut-off file or NaN/inf samples."""
    frames, finite = 0, True
    try:
        with sf.SoundFile(path) as audio:
            header_frames, cut = audio.frames, bool(_WAV_CUT.search(audio.extra_info))
            for block in audio.blocks(_BLOCK_FRAMES, dtype="float32", always_2d=True):
                frames += len(block)
                finite = finite and bool(np.isfinite(block).all())
    except sf.LibsndfileError as err:
        return AudioFacts(error=f"unreadable audio ({err.error_string})")
    except (RuntimeError, OSError) as err:
        return AudioFacts(error=f"unreadable audio ({err})")
    if cut or frames < header_frames:
        return AudioFacts(error="truncated audio (the file holds less than its header promises)")
    return AudioFacts(audio.samplerate, audio.channels, frames, finite)


class _AudioCache:
    """AudioFacts of one manifest's files, keyed by (path, size, mtime_ns), kept as JSON in cache_dir.

    Written whole, through a temp file and os.replace, so concurrent ranks never see half a file;
    only files the manifest still names are kept.
    """

    def __init__(self, manifest: Path, cache_dir: str | Path | None):
        self.file = None
        self.loaded: dict = {}
        self.entries: dict = {}
        if cache_dir is not None:
            name = hashlib.sha256(str(manifest.absolute()).encode()).hexdigest()[:16]
            self.file = Path(cache_dir) / f"{manifest.stem}-{name}.json"
            self.loaded = self._load()

    def _load(self) -> dict:
        try:
            stored = json.loads(self.file.read_text())
        except (OSError, ValueError):  # absent or damaged: validate from scratch
            return {}
        return stored.get("files", {}) if stored.get("version") == CACHE_VERSION else {}

    def get(self, path: str, stat: os.stat_result) -> AudioFacts | None:
        entry = self.entries.get(path) or self.loaded.get(path)
        if entry is None or entry["size"] != stat.st_size or entry["mtime_ns"] != stat.st_mtime_ns:
            return None
        self.entries[path] = entry
        return AudioFacts(**entry["facts"])

    def put(self, path: str, stat: os.stat_result, facts: AudioFacts) -> None:
        self.entries[path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "facts": asdict(facts)}

    def save(self) -> None:
        if self.file is None or self.entries == self.loaded:
            return
        atomic_write_text(self.file, json.dumps({"version": CACHE_VERSION, "files": self.entries}))


def transcripts_as_asr(examples: Sequence[Example]) -> list[Example]:
    """An ASR example for each clip of another task whose row carries a `transcript` (the synthetic corpus,
    SLURP and CoVoST rows do): the clip, the transcript as ASR's target (lowercase, no punctuation, as ASR
    answers). Alignment on ASR then covers every word the corpus speaks, not only those of its ASR
    sentences: a keyword that only keyword-spotting clips say is otherwise never mapped to its token, and the
    audio path drops it. One per clip: SLURP's intent and slot rows share theirs, and a clip that already has
    an ASR row gets none."""
    heard = {e.audio for e in examples if e.task == "asr"}
    derived = []
    for e in examples:
        transcript = e.fields.get("transcript")
        target = normalize_text(transcript) if isinstance(transcript, str) else ""
        if e.audio not in heard and target:
            heard.add(e.audio)
            derived.append(replace(e, id=f"{e.id}/asr", task="asr", target=target, instruction=None, fields={}))
    return derived


def write_manifest(path: str | Path, rows: list[dict]) -> None:
    """All rows as JSON lines, written whole (see speechllm.atomic): no reader sees half a manifest."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
