"""The encoder feature cache: the hidden states the layer-weighted sum reads, encoded once per clip.

The encoder is frozen, so a clip's hidden states are the same in every epoch and every stage, and for a
small trainable stack they are most of a step's compute. With `data.feature_cache=DIR` they are encoded
once (`speechllm data cache`, or at the start of `speechllm train` for the clips still missing) and read
back from memory-mapped shards instead of the audio.

    DIR/<kind>-<encoder key>/
      encoder.json       what the key stands for (family, HF config, weight digest, dtype), layers, width
      shard-00000.bin    raw 16-bit floats, clip after clip, each (layers, frames, width): valid frames only
      shard-00000.json   that shard's index: resolved audio path -> offset, frames, size, mtime_ns
      .lock              held by a build (flock): one build of a cache at a time

A shard's index is written (atomically) once its .bin is complete and flushed: a .bin without an index
is what an interrupted build left, never read, and removed by the next build, which encodes only the
clips no index holds. A later shard wins over an earlier one for the same path (a clip re-encoded after
its file changed).

Keys. The encoder key hashes everything the features depend on: this format's version, the encoder
family, sample rate and waveform normalisation, its full HF config, a SHA-256 of its weights, and the
storage dtype. Hashing the weights themselves (about 1 s per GB on one core, once per start) rather than
their name or files means a moved or re-downloaded checkpoint keeps its cache, and a fine-tuned or
re-initialised encoder never reads another's. An audio file is known by its resolved path, size and
modification time (ns), taken before it is read: a file rewritten after caching is a miss, read as
audio, never a stale hit.

Storage dtype. float16 (default): half of fp32 on disk, relative error 2^-11 (finer than the bf16
autocast the encoder runs in on GPUs); a value beyond ±65504 stops the build, naming the fix. bfloat16:
fp32's range, relative error 2^-8; numpy has no bf16, so its bits are stored as int16 and read back as a
torch.bfloat16 view.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from speechllm.atomic import atomic_write_text
from speechllm.data.audio import AudioError, load_audio
from speechllm.model.encoder import ENCODER_FRAMES_PER_SECOND, AudioEncoder

FORMAT_VERSION = 1
CACHE_DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.int16)}
# HF config fields that do not change what the encoder computes.
_CONFIG_NOISE = {"transformers_version", "architectures", "torch_dtype", "dtype"}
_SHARD = re.compile(r"shard-(\d+)\.(bin|json)$")


class FeatureCacheError(RuntimeError):
    """A feature cache that cannot be built; the message names the directory or clip and the fix."""


@dataclass(frozen=True)
class AudioIdentity:
    path: str  # resolved: the same file through another relative path or a symlink is the same clip
    size: int
    mtime_ns: int


def audio_identity(audio: str | Path) -> AudioIdentity | None:
    """What a cached clip is known by; None when the file is gone."""
    path = os.path.realpath(audio)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return AudioIdentity(path, stat.st_size, stat.st_mtime_ns)


def encoder_identity(encoder: AudioEncoder, dtype: str) -> dict:
    """Everything a clip's cached hidden states depend on besides the clip itself."""
    config = encoder.model.config.to_dict()
    return {
        "format": FORMAT_VERSION,
        "kind": encoder.kind,
        "sample_rate": encoder.sample_rate,
        "normalize_waveform": encoder.normalize_waveform,
        "config": {k: v for k, v in sorted(config.items()) if not k.startswith("_") and k not in _CONFIG_NOISE},
        "weights": weights_digest(encoder.model),
        "dtype": dtype,
    }


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(identity: dict) -> str:
    """The cache's directory name under data.feature_cache: `<kind>-<16 hex digits>`."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return f"{identity['kind']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class CacheEntry:
    shard: int
    offset: int  # in elements of the storage dtype
    frames: int
    size: int  # the audio file's identity when it was encoded
    mtime_ns: int


class FeatureCache:
    """One encoder's cached hidden states, looked up by audio file and read as (layers, frames, width).

    Datasets hand it to their DataLoader workers: it pickles without its open memory maps.
    """

    def __init__(self, directory: str | Path, num_layers: int, hidden_size: int, dtype: str = "float16",
                 identity: dict | None = None):
        if dtype not in CACHE_DTYPES:
            raise FeatureCacheError(f"data.feature_cache_dtype: '{dtype}' is not one of {', '.join(CACHE_DTYPES)}")
        self.directory = Path(directory)
        self.num_layers, self.hidden_size, self.dtype = num_layers, hidden_size, dtype
        self.identity = identity
        self.entries: dict[str, CacheEntry] = {}
        self._maps: dict[int, np.memmap] = {}

    @classmethod
    def for_encoder(cls, root: str | Path, encoder: AudioEncoder, dtype: str = "float16") -> "FeatureCache":
        """The cache of `encoder`'s features under `root`; empty until `refresh` reads its index."""
        identity = encoder_identity(encoder, dtype)
        return cls(Path(root) / cache_key(identity), encoder.num_layers, encoder.hidden_size, dtype, identity)

    @property
    def frame_bytes(self) -> int:
        return self.num_layers * self.hidden_size * 2

    def __len__(self) -> int:
        return len(self.entries)

    def refresh(self) -> "FeatureCache":
        """(Re-)read the index of every finished shard."""
        entries = {}
        for number, index in _shards(self.directory, ".json"):
            for path, e in json.loads(index.read_text())["clips"].items():
                entries[path] = CacheEntry(number, e["offset"], e["frames"], e["size"], e["mtime_ns"])
        self.entries, self._maps = entries, {}
        return self

    def lookup(self, audio: str | Path) -> CacheEntry | None:
        """The entry of `audio` if it was encoded from the file as it is now."""
        identity = audio_identity(audio)
        entry = self.entries.get(identity.path) if identity else None
        if entry is None or (entry.size, entry.mtime_ns) != (identity.size, identity.mtime_ns):
            return None
        return entry

    def read(self, entry: CacheEntry) -> torch.Tensor:
        """The clip's hidden states (layers, frames, width), in the storage dtype."""
        count = self.num_layers * entry.frames * self.hidden_size
        if entry.shard not in self._maps:
            path = self.directory / _shard_name(entry.shard, ".bin")
            self._maps[entry.shard] = np.memmap(path, dtype=CACHE_DTYPES[self.dtype][1], mode="r")
        values = np.array(self._maps[entry.shard][entry.offset: entry.offset + count])  # a copy: the map stays read-only
        tensor = torch.from_numpy(values).view(self.num_layers, entry.frames, self.hidden_size)
        return tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor

    def get(self, audio: str | Path) -> torch.Tensor | None:
        entry = self.lookup(audio)
        return None if entry is None else self.read(entry)

    def disk_bytes(self) -> int:
        return sum(path.stat().st_size for _, path in _shards(self.directory, ".bin"))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}


@dataclass
class BuildReport:
    directory: Path
    clips: int  # distinct audio files asked for
    cached_before: int
    estimated_bytes: int = 0  # of the clips still missing
    encoded: int = 0
    written_bytes: int = 0
    seconds: float = 0.0
    unreadable: list[str] = field(default_factory=list)  # left out; training reads them as audio (and substitutes)

    def summary(self) -> str:
        if self.cached_before == self.clips:
            return f"feature cache {self.directory}: all {self.clips} clips already cached"
        skipped = f"; {len(self.unreadable)} unreadable clip(s) left out" if self.unreadable else ""
        return (f"feature cache {self.directory}: encoded {self.encoded} clip(s) ({_size(self.written_bytes)}) in "
                f"{self.seconds:.1f}s; {self.cached_before} of {self.clips} were cached already{skipped}")


def build_cache(
    cache: FeatureCache,
    encoder: AudioEncoder,
    clips: Iterable[tuple[str, float]],
    *,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    max_batch_seconds: float = 60.0,
    max_batch_size: int = 32,
    shard_bytes: int = 1 << 30,
    shard_seconds: float = 120.0,
    estimate_only: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Encode the clips (audio path, duration in seconds) the cache lacks and append them as new shards.

    The estimated size is logged (and the free space checked) before anything is encoded; with
    `estimate_only` nothing else happens. A shard is finished every `shard_bytes` or `shard_seconds`
    (whichever comes first) and when the build stops for any reason, so an interrupted build keeps
    what it encoded, up to the clip being written.
    """
    cache.directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache.directory):
        cache.refresh()
        distinct = {os.path.realpath(audio): (audio, duration) for audio, duration in clips}
        todo = sorted((c for c in distinct.values() if cache.lookup(c[0]) is None), key=lambda c: c[1])
        frames = sum(math.ceil(duration * ENCODER_FRAMES_PER_SECOND) for _, duration in todo)
        report = BuildReport(cache.directory, len(distinct), len(distinct) - len(todo), frames * cache.frame_bytes)
        if not todo:
            return report
        free = shutil.disk_usage(cache.directory).free
        log(f"feature cache {cache.directory}: {len(todo)} of {len(distinct)} clips to encode "
            f"({_hours(sum(c[1] for c in todo))} of audio), about {_size(report.estimated_bytes)} on disk "
            f"({cache.dtype}, {cache.num_layers} layers x {cache.hidden_size} dims x {ENCODER_FRAMES_PER_SECOND} "
            f"frames/s); {_size(free)} free")
        if free < report.estimated_bytes * 1.05 + (1 << 20):
            raise FeatureCacheError(
                f"{cache.directory}: not enough disk space for the feature cache (needs about "
                f"{_size(report.estimated_bytes)}, {_size(free)} free); free some space, point data.feature_cache "
                "at another disk, or train without it"
            )
        if estimate_only:
            return report
        started = time.perf_counter()
        batch_size = max_batch_size if encoder.batch_invariant else 1  # else padding would change the features
        _encode_clips(cache, encoder, todo, report, torch.device(device), autocast_dtype, max_batch_seconds,
                      batch_size, _ShardWriter(cache, shard_bytes, shard_seconds), progress)
        report.seconds = time.perf_counter() - started
        cache.refresh()
    return report


def _encode_clips(cache, encoder, todo, report, device, autocast_dtype, max_batch_seconds, batch_size, writer,
                  progress) -> None:
    if cache.identity is not None:
        atomic_write_text(cache.directory / "encoder.json", json.dumps(
            {**cache.identity, "num_layers": cache.num_layers, "hidden_size": cache.hidden_size},
            indent=2, default=str))
    home = next(encoder.parameters()).device
    encoder.to(device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, disable=not progress) as bar:
            job = bar.add_task("encoding features", total=len(todo))
            for batch in _batches(todo, max_batch_seconds, batch_size):
                identities, waves = [], []
                for audio, _ in batch:
                    # Taken before reading: a file rewritten meanwhile no longer matches its entry (a miss).
                    identity = audio_identity(audio)
                    try:
                        if identity is None:
                            raise AudioError(f"{audio}: file not found")
                        waves.append(load_audio(audio, encoder.sample_rate)[0])
                        identities.append(identity)
                    except AudioError as err:
                        report.unreadable.append(str(err))
                if waves:
                    for identity, features in zip(identities, _encode(encoder, waves, device, autocast_dtype, cache.dtype)):
                        report.written_bytes += writer.add(identity, features)
                        report.encoded += 1
                bar.advance(job, len(batch))
    except BaseException:
        with contextlib.suppress(Exception):  # keep what was encoded; the original error is the one to report
            writer.finish()
        raise
    else:
        writer.finish()
    finally:
        encoder.to(home)


def _batches(clips: Sequence[tuple[str, float]], max_seconds: float, max_size: int) -> Iterator[list]:
    """Clips sorted by duration into batches of at most `max_size`, padded audio at most `max_seconds`."""
    batch: list[tuple[str, float]] = []
    for clip in clips:
        if batch and (len(batch) == max_size or (len(batch) + 1) * clip[1] > max_seconds):
            yield batch
            batch = []
        batch.append(clip)
    if batch:
        yield batch


def _encode(encoder: AudioEncoder, waves: list[torch.Tensor], device: torch.device,
            autocast_dtype: torch.dtype | None, dtype: str) -> list[np.ndarray]:
    """Each wave's hidden states (layers, valid frames, width) as a numpy array in the storage dtype."""
    lengths = torch.tensor([w.numel() for w in waves])
    wave = torch.zeros(len(waves), int(lengths.max()))
    for row, w in zip(wave, waves):
        row[: w.numel()] = w
    mask = torch.arange(wave.shape[1])[None] < lengths[:, None]
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        hidden, frame_mask = encoder(wave.to(device), mask.to(device))
    hidden = hidden.to(CACHE_DTYPES[dtype][0]).cpu()
    out = []
    for i, frames in enumerate(frame_mask.sum(-1).tolist()):
        clip = hidden[:, i, :frames].contiguous()
        if not torch.isfinite(clip).all():
            raise FeatureCacheError(
                f"encoder hidden states do not fit {dtype} (beyond ±65504, or not finite) in a batch of "
                f"{len(waves)} clip(s); set data.feature_cache_dtype=bfloat16"
            )
        out.append((clip.view(torch.int16) if dtype == "bfloat16" else clip).numpy())
    return out


class _ShardWriter:
    """Appends clips to numbered shard files; a shard is usable once `finish` has written its index."""

    def __init__(self, cache: FeatureCache, shard_bytes: int, shard_seconds: float):
        self.directory = cache.directory
        for _, unfinished in _shards(self.directory, ".bin"):  # left by an interrupted build: no index names them
            if not unfinished.with_suffix(".json").exists():
                unfinished.unlink()
        self.number = max((n for n, _ in _shards(self.directory, "")), default=-1) + 1
        self.shard_bytes, self.shard_seconds = shard_bytes, shard_seconds
        self._file = None

    def add(self, identity: AudioIdentity, features: np.ndarray) -> int:
        if self._file is None:
            self._file = open(self.directory / _shard_name(self.number, ".bin"), "wb")
            self._started, self._elements, self._clips = time.monotonic(), 0, {}
        self._file.write(memoryview(features).cast("B"))
        self._clips[identity.path] = {"offset": self._elements, "frames": features.shape[1],
                                      "size": identity.size, "mtime_ns": identity.mtime_ns}
        self._elements += features.size
        if self._elements * 2 >= self.shard_bytes or time.monotonic() - self._started >= self.shard_seconds:
            self.finish()
        return features.nbytes

    def finish(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())  # the data is on disk before any index points at it
        self._file.close()
        self._file = None
        index = {"format": FORMAT_VERSION, "clips": self._clips}
        atomic_write_text(self.directory / _shard_name(self.number, ".json"), json.dumps(index))
        self.number += 1


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Builds of one cache take turns (a second `speechllm data cache`, another node's rank 0): the
    second one then finds the first one's clips cached."""
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _shard_name(number: int, suffix: str) -> str:
    return f"shard-{number:05d}{suffix}"


def _shards(directory: Path, suffix: str) -> list[tuple[int, Path]]:
    """(number, path) of the shard files with `suffix` (".bin", ".json", "" for both), by number."""
    if not directory.is_dir():
        return []
    found = ((_SHARD.match(p.name), p) for p in directory.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m and p.name.endswith(suffix))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError
