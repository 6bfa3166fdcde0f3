"""Public datasets, kept on disk in their usual layouts, to JSONL manifests (`speechllm data prepare`).

A converter walks one dataset's layout and yields candidate rows (or the reason an item is left out);
`prepare` then measures every audio file (header only, in a thread pool), leaves out what is missing,
unreadable, empty or over `max_duration`, and writes the manifest atomically. Every left-out item is
counted under its reason in the PrepareReport, so the written manifest passes `speechllm data validate`
(which also decodes every file, and so catches the rare truncated one this header read cannot).

Options arrive as strings from the command line and are converted by each converter's annotations:
lists as `yes,no,up`, mappings as `ang:angry,hap:happy`, numbers as numbers.

Layouts (root is what `--root` names):
  librispeech      root/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt and <id>.flac beside it
  covost2          root = a Common Voice language dir with clips/; covost_v2.<src>_<tgt>.<split>.tsv in
                   root (or tsv_dir); clips converted to .wav/.flac are found by stem, before the .mp3
  slurp            root/dataset/slurp/<split>.jsonl; audio in root/audio/slurp_{real,synth} or root/slurp_*
  speech_commands  root/<word>/<hash>_nohash_<n>.wav with validation_list.txt and testing_list.txt
  csv              root = a CSV/TSV file with a header row, audio paths relative to its directory
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import re
import types
import typing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

import soundfile as sf
from rich.console import Console
from rich.progress import track

from speechllm.data.manifest import write_manifest
from speechllm.data.tasks import TaskError, default_registry

# CoVoST 2's languages (and English, for X -> en) by English name; other codes are kept as given.
LANGUAGE_NAMES = {
    "en": "English", "de": "German", "ja": "Japanese", "zh-CN": "Chinese", "fr": "French", "es": "Spanish",
    "ca": "Catalan", "fa": "Persian", "ar": "Arabic", "et": "Estonian", "mn": "Mongolian", "tr": "Turkish",
    "lv": "Latvian", "sl": "Slovenian", "sv-SE": "Swedish", "ta": "Tamil", "id": "Indonesian", "cy": "Welsh",
}
SPEECH_COMMANDS_KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SLURP_SPLITS = ("train", "devel", "test", "train_synthetic")
_SLOT = re.compile(r"\[\s*([^\[\]:]+?)\s*:\s*([^\[\]]*?)\s*\]")  # SLURP's "[time : five am]"
_CONVERTED_AUDIO = (".wav", ".flac")  # Common Voice clips converted from mp3, preferred when present
_SKIP_EXAMPLES = 5  # items named per skip reason in the report


class ConverterError(ValueError):
    """A dataset, option or root that cannot be converted; one line naming the thing and the fix."""


@dataclass(frozen=True)
class Candidate:
    """A manifest row before its audio is measured; `audio` is absolute, `id` None leaves it out."""

    id: str | None
    audio: Path
    task: str
    target: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """An item of the dataset that gets no row, and why."""

    reason: str
    item: str


@dataclass
class PrepareReport:
    dataset: str
    out: Path
    rows: Counter = field(default_factory=Counter)  # task -> rows written
    skipped: Counter = field(default_factory=Counter)  # reason -> items left out
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few items
    audio_seconds: float = 0.0

    def skip(self, reason: str, item: str) -> None:
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < _SKIP_EXAMPLES:
            examples.append(item)

    def summary(self) -> str:
        tasks = ", ".join(f"{task} {n}" for task, n in self.rows.items()) or "none"
        lines = [f"{self.dataset}: {sum(self.rows.values())} rows ({tasks}), "
                 f"{self.audio_seconds / 3600:.2f} h of audio, {sum(self.skipped.values())} skipped -> {self.out}"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped {n}: {reason} (e.g. {', '.join(self.skipped_examples[reason])})")
        return "\n".join(lines)


# --- LibriSpeech -------------------------------------------------------------------------------------

def librispeech(root: Path, *, subset: list[str] | None = None) -> Iterator[Candidate | Skip]:
    """ASR: one row per transcript line, the transcript lowercased (LibriSpeech has no punctuation)."""
    for split_dir in _librispeech_dirs(root, subset):
        for transcripts in sorted(split_dir.glob("*/*/*.trans.txt")):
            for number, line in enumerate(transcripts.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                utterance, _, text = line.strip().partition(" ")
                if not text.strip():
                    yield Skip("empty transcript", f"{transcripts}:{number}")
                    continue
                audio = transcripts.parent / f"{utterance}.flac"
                yield Candidate(utterance, audio, "asr", " ".join(text.lower().split()))


def _librispeech_dirs(root: Path, subset: list[str] | None) -> list[Path]:
    if (root / "LibriSpeech").is_dir():  # the archive's top directory
        root = root / "LibriSpeech"
    if subset:
        for name in subset:
            if not (root / name).is_dir():
                raise ConverterError(f"librispeech: subset directory {root / name} not found")
        return [root / name for name in subset]
    if next(root.glob("*/*/*.trans.txt"), None) is not None:
        return [root]
    found = sorted(p.name for p in root.glob("*") if next(p.glob("*/*/*.trans.txt"), None) is not None)
    if found:
        raise ConverterError(f"librispeech: {root} holds subsets {', '.join(found)}; choose with subset=NAME[,NAME]")
    raise ConverterError(f"librispeech: expected {root}/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt "
                         "(root is a subset such as train-clean-100, or pass subset=train-clean-100)")


# --- CoVoST 2 -----------------------------------------------------------------------------------------

def covost2(root: Path, *, source_lang: str = "en", target_lang: str = "de", split: str = "train",
            tsv_dir: Path | None = None) -> Iterator[Candidate | Skip]:
    """ST: Common Voice clips with CoVoST 2 translations; target_language is the target's English name."""
    clips = root / "clips"
    if not clips.is_dir():
        raise ConverterError(f"covost2: expected the Common Voice clips directory {clips}")
    _choose("covost2", "split", split, ("train", "dev", "test"))
    language = LANGUAGE_NAMES.get(target_lang, target_lang)
    for line, row in _covost_rows(tsv_dir or root, source_lang, target_lang, split):
        path, translation = (row.get("path") or "").strip(), (row.get("translation") or "").strip()
        if not path:
            yield Skip("no clip path", line)
        elif not translation:
            yield Skip("empty translation", f"{line} ({path})")
        else:
            fields = {"target_language": language}
            if (row.get("sentence") or "").strip():
                fields["transcript"] = row["sentence"].strip()
            yield Candidate(Path(path).stem, _clip(clips, path), "st", translation, fields)


def _covost_rows(tsv_dir: Path, source: str, target: str, split: str) -> Iterator[tuple[str, dict]]:
    """Rows of the split's TSV, or of the unsplit release TSV filtered by its `split` column."""
    split_tsv = tsv_dir / f"covost_v2.{source}_{target}.{split}.tsv"
    whole_tsv = tsv_dir / f"covost_v2.{source}_{target}.tsv"
    if not split_tsv.is_file() and not whole_tsv.is_file():
        raise ConverterError(f"covost2: expected {split_tsv} (from CoVoST's get_covost_splits.py) or {whole_tsv}; "
                             "pass tsv_dir=DIR if the TSVs are elsewhere")
    tsv = split_tsv if split_tsv.is_file() else whole_tsv
    wanted = None if tsv is split_tsv else ({split, f"{split}_covost"} if split == "train" else {split})
    with open(tsv, encoding="utf-8", newline="") as f:
        # CoVoST writes its TSVs with pandas: no quoting, backslash escapes
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        for row in reader:
            if wanted is None or row.get("split") in wanted:
                yield f"{tsv}:{reader.line_num}", row


def _clip(clips: Path, name: str) -> Path:
    as_written = clips / name
    for suffix in _CONVERTED_AUDIO:
        converted = as_written.with_suffix(suffix)
        if converted != as_written and converted.is_file():
            return converted
    return as_written


# --- SLURP --------------------------------------------------------------------------------------------

def slurp(root: Path, *, split: str = "train", tasks: list[str] = ("ic", "sf"),
          audio_dir: Path | None = None) -> Iterator[Candidate | Skip]:
    """IC (scenario_action) and SF ('type: value; ...' or 'none') rows for every recording of a split."""
    split = {"dev": "devel", "validation": "devel"}.get(split, split)
    _choose("slurp", "split", split, SLURP_SPLITS)
    for task in tasks:
        _choose("slurp", "tasks", task, ("ic", "sf"))
    index = root / "dataset" / "slurp" / f"{split}.jsonl"
    if not index.is_file():
        raise ConverterError(f"slurp: expected {index} (root is a checkout of the SLURP repository)")
    audio_dirs = _slurp_audio_dirs(root, audio_dir)
    for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConverterError(f"slurp: {index}:{number}: invalid JSON ({err.msg})") from None
        targets = {"ic": entry.get("intent", ""), "sf": slots(entry.get("sentence_annotation", ""))}
        for recording in entry.get("recordings", []):
            audio = _find(audio_dirs, recording["file"])
            for task in tasks:
                if not targets[task]:
                    yield Skip(f"no {task} target", f"{index}:{number}")
                    continue
                fields = {"transcript": entry["sentence"]} if entry.get("sentence") else {}
                yield Candidate(f"{Path(recording['file']).stem}-{task}", audio, task, targets[task], fields)


def slots(annotation: str) -> str:
    """SLURP's `wake me up at [time : five am]` as `time: five am`; pairs joined with '; ', or 'none'."""
    pairs = [f"{kind}: {' '.join(value.split())}" for kind, value in _SLOT.findall(annotation)]
    return "; ".join(pairs) or "none"


def _slurp_audio_dirs(root: Path, audio_dir: Path | None) -> list[Path]:
    if audio_dir is not None:
        if not audio_dir.is_dir():
            raise ConverterError(f"slurp: audio_dir {audio_dir} not found")
        return [audio_dir]
    dirs = [d / kind for d in (root / "audio", root) for kind in ("slurp_real", "slurp_synth") if (d / kind).is_dir()]
    if not dirs:
        raise ConverterError(f"slurp: expected the audio in {root / 'audio' / 'slurp_real'} or {root / 'slurp_real'} "
                             "(or pass audio_dir=DIR)")
    return dirs


def _find(dirs: list[Path], name: str) -> Path:
    """The first directory holding the file; else the first directory's path (then skipped as missing)."""
    return next((d / name for d in dirs if (d / name).is_file()), dirs[0] / name)


# --- Speech Commands ----------------------------------------------------------------------------------

def speech_commands(root: Path, *, split: str = "train",
                    keywords: list[str] = SPEECH_COMMANDS_KEYWORDS) -> Iterator[Candidate | Skip]:
    """KWS: the spoken word when it is a keyword, else 'none'; rows carry the keyword list as `labels`.

    split=all takes every clip, e.g. of the separately released test set, which has no split lists.
    """
    _choose("speech_commands", "split", split, ("train", "dev", "test", "all"))
    if not keywords:
        raise ConverterError("speech_commands: option 'keywords' is empty")
    names = () if split == "all" else ("validation", "testing")
    lists = {name: _clip_list(root / f"{name}_list.txt") for name in names}
    words = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    if not words:
        raise ConverterError(f"speech_commands: expected word directories such as {root / 'yes'}")
    for word_dir in words:
        for clip in sorted(word_dir.glob("*.wav")):
            name = f"{word_dir.name}/{clip.name}"
            if split == "all" or split == _speech_commands_split(name, lists):
                target = word_dir.name if word_dir.name in keywords else "none"
                yield Candidate(name[: -len(".wav")], clip, "kws", target, {"labels": list(keywords)})


def _clip_list(path: Path) -> set[str]:
    if not path.is_file():
        raise ConverterError(f"speech_commands: expected {path} (or pass split=all for a folder without split lists)")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _speech_commands_split(name: str, lists: dict[str, set[str]]) -> str:
    return "dev" if name in lists["validation"] else "test" if name in lists["testing"] else "train"


# --- CSV / TSV ------------------------------------------------------------------------------------------

_AUDIO_COLUMNS = ("audio", "path", "file", "filename", "file_name", "audio_path", "wav")
_TARGET_COLUMNS = ("target", "label", "caption")
_ROW_KEYS = ("id", "audio", "task", "target", "duration")  # set by the converter and prepare, not by `columns`
_DELIMITERS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


def table(root: Path, *, task: str, audio_column: str | None = None, target_column: str | None = None,
          id_column: str | None = None, label_map: dict[str, str] | None = None, audio_root: Path | None = None,
          delimiter: str | None = None, columns: dict[str, str] | None = None,
          task_file: Path | None = None) -> Iterator[Candidate | Skip]:
    """Any task from a CSV/TSV with a header: ER, ASC, AC, SNS, ...; `columns` maps field:column.

    Labels go through `label_map` first; for tasks with a label set the result must be one of the
    labels (compared ignoring case), else the row is skipped and counted under its label.
    """
    if not root.is_file():
        raise ConverterError(f"csv: expected --root to be a CSV/TSV file, {root} is not a file")
    spec = _task(task, task_file)
    with open(root, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=_delimiter(root, delimiter))
        header = reader.fieldnames or []
        audio_col = _column(root, header, audio_column, _AUDIO_COLUMNS, "audio_column")
        target_col = _column(root, header, target_column, _TARGET_COLUMNS, "target_column")
        mapped = _mapped_columns(root, header, columns or {})
        if id_column is not None:
            _column(root, header, id_column, (), "id_column")
        missing = sorted(spec.fields() - set(mapped))
        if missing:
            raise ConverterError(f"csv: task '{spec.name}' needs field '{missing[0]}'; "
                                 f"map a column to it with columns={missing[0]}:COLUMN")
        base = audio_root or root.parent
        labels = {label.lower(): label for label in spec.labels or ()}
        for row in reader:
            where = f"{root}:{reader.line_num}"
            audio, raw = (row.get(audio_col) or "").strip(), (row.get(target_col) or "").strip()
            target = (label_map or {}).get(raw, raw)
            if not audio:
                yield Skip("empty audio path", where)
            elif not target:
                yield Skip("empty target", where)
            elif labels and target.lower() not in labels:
                yield Skip(f"label '{raw}' not in task '{spec.name}' labels ({', '.join(spec.labels)})", where)
            else:
                fields = {name: (row.get(column) or "").strip() for name, column in mapped.items()}
                row_id = (row.get(id_column) or "").strip() or None if id_column else None
                yield Candidate(row_id, base / audio, spec.name, labels.get(target.lower(), target), fields)


def _mapped_columns(path: Path, header: list[str], columns: dict[str, str]) -> dict[str, str]:
    """Row field -> CSV column, for fields such as target_language (or an explicit instruction)."""
    for name in columns:
        if name in _ROW_KEYS:
            raise ConverterError(f"csv: option 'columns' cannot set '{name}' (use id_column, audio_column, "
                                 "target_column; task is an option and duration is measured)")
    return {name: _column(path, header, column, (), f"columns ({name})") for name, column in columns.items()}


def _task(name: str, task_file: Path | None):
    registry = default_registry()
    try:
        if task_file is not None:
            registry.load_yaml(task_file)
        return registry.get(name)
    except TaskError as err:
        raise ConverterError(f"csv: {err}") from None


def _delimiter(path: Path, given: str | None) -> str:
    if given:
        return _DELIMITERS.get(given.lower(), given)
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _column(path: Path, header: list[str], given: str | None, defaults: tuple[str, ...], option: str) -> str:
    if given is not None:
        if given not in header:
            raise ConverterError(f"csv: {path} has no column '{given}' for {option} (columns: {', '.join(header)})")
        return given
    lowered = {name.lower(): name for name in header}
    found = next((lowered[name] for name in defaults if name in lowered), None)
    if found is None:
        raise ConverterError(f"csv: {path} has none of the columns {', '.join(defaults)}; "
                             f"name one with {option}=COLUMN (columns: {', '.join(header)})")
    return found


# --- prepare ----------------------------------------------------------------------------------------------

CONVERTERS: dict[str, Callable[..., Iterable[Candidate | Skip]]] = {
    "librispeech": librispeech,
    "covost2": covost2,
    "slurp": slurp,
    "speech_commands": speech_commands,
    "csv": table,
}


def _common(*, max_duration: float | None = 30.0, workers: int = 8) -> None:
    """Options of every dataset: clips longer than max_duration (seconds; none: keep all) are skipped,
    as `speechllm data validate` rejects them at its default; workers read audio headers in parallel."""


def prepare(dataset: str, root: str | Path, out: str | Path, *, progress: bool = False, **options) -> PrepareReport:
    """Convert the dataset at `root` into the manifest `out`; options may be strings (from the CLI)."""
    if dataset not in CONVERTERS:
        raise ConverterError(f"unknown dataset '{dataset}' (known: {', '.join(CONVERTERS)})")
    converter = CONVERTERS[dataset]
    common = _options(dataset, _common, {k: v for k, v in options.items() if k in _parameters(_common)})
    chosen = _options(dataset, converter, {k: v for k, v in options.items() if k not in _parameters(_common)})
    root, out = Path(root), Path(out)
    if not root.exists():
        raise ConverterError(f"{dataset}: root {root} not found")
    if out.is_dir():
        raise ConverterError(f"{dataset}: --out {out} is a directory; name the manifest, e.g. {out / 'train.jsonl'}")
    report = PrepareReport(dataset, out)
    candidates = []
    for item in converter(root, **chosen):
        if isinstance(item, Skip):
            report.skip(item.reason, item.item)
        else:
            candidates.append(item)
    rows = _measured_rows(candidates, out.parent.absolute(), report, progress=progress, **common)
    if not rows:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in report.skipped.most_common(3))
        reasons = reasons or "nothing found for these options"
        raise ConverterError(f"{dataset}: no rows to write from {root} ({reasons})")
    write_manifest(out, rows)
    return report


def _measured_rows(candidates: list[Candidate], out_dir: Path, report: PrepareReport, *, progress: bool,
                   max_duration: float | None, workers: int) -> list[dict]:
    paths = list(dict.fromkeys(os.path.abspath(c.audio) for c in candidates))  # SLURP: one file, two rows
    console = Console(stderr=True)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # libsndfile releases the GIL while reading
        measured = track(pool.map(_duration, paths), total=len(paths), console=console, disable=not progress,
                         description=f"reading {len(paths)} audio headers")
        durations = dict(zip(paths, measured))
    rows, ids = [], set()
    for candidate in candidates:
        path = os.path.abspath(candidate.audio)
        duration = durations[path]
        if isinstance(duration, str):
            report.skip(duration, path)
        elif max_duration is not None and duration > max_duration:
            report.skip(f"longer than max_duration {max_duration:g}s", f"{path} ({duration:.2f}s)")
        elif candidate.id is not None and candidate.id in ids:
            report.skip("duplicate id", candidate.id)
        else:
            ids.add(candidate.id)
            row = {"id": candidate.id} if candidate.id is not None else {}
            row.update(audio=Path(os.path.relpath(path, out_dir)).as_posix(), task=candidate.task,
                       target=candidate.target, duration=duration, **candidate.fields)
            rows.append(row)
            report.rows[candidate.task] += 1
            report.audio_seconds += duration
    return rows


def _duration(path: str) -> float | str:
    """Seconds (3 decimals) from the file's header, or the reason the file cannot be used."""
    if not os.path.isfile(path):
        return "audio file not found"
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        return f"unreadable audio ({getattr(err, 'error_string', err)})"
    if info.frames <= 0 or info.samplerate <= 0:
        return "empty audio"
    return round(info.frames / info.samplerate, 3)


# --- options ----------------------------------------------------------------------------------------------

def _parameters(function: Callable) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY}


def _options(dataset: str, function: Callable, given: dict) -> dict:
    """`given` checked against the function's keyword-only parameters and converted to their types."""
    parameters, hints = _parameters(function), typing.get_type_hints(function)
    if function is not _common:
        unknown = sorted(set(given) - set(parameters))
        if unknown:
            known = ", ".join([*parameters, *_parameters(_common)])
            raise ConverterError(f"{dataset}: unknown option '{unknown[0]}' (known: {known})")
        for name, parameter in parameters.items():
            if parameter.default is inspect.Parameter.empty and name not in given:
                raise ConverterError(f"{dataset}: option '{name}' is required (--set {name}=VALUE)")
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **{name: _convert(dataset, name, value, hints[name]) for name, value in given.items()}}


def _convert(dataset: str, name: str, value, hint):
    """A command-line string as the option's type; values of other types pass through unchanged."""
    if not isinstance(value, str):
        return value
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint):
        if value.strip().lower() in ("", "none", "null"):
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin = typing.get_origin(hint)
    try:
        if hint is str:
            return value
        if hint in (int, float):
            return _number(hint, value)
        if hint is Path:
            return Path(value).expanduser()
        if origin is list:
            return [item.strip() for item in value.split(",") if item.strip()]
        if origin is dict:
            return dict(_pair(item) for item in value.split(",") if item.strip())
    except ValueError as err:
        raise ConverterError(f"{dataset}: option '{name}={value}': {err}") from None
    raise TypeError(f"option '{name}' has an unsupported type {hint}")  # a converter's annotation, not user input


def _number(kind: type, value: str):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"expected {'a whole' if kind is int else 'a'} number") from None


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition(":")
    if not sep or not key.strip():
        raise ValueError(f"expected key:value pairs separated by commas, got '{item.strip()}'")
    return key.strip(), value.strip()


def _choose(dataset: str, option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConverterError(f"{dataset}: option '{option}' is '{value}'; choose one of {', '.join(allowed)}")
