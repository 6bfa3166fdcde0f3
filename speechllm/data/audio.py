"""Reading audio: soundfile, mono, float32, at the encoder's sample rate (resampled in torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the cause."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int  # the file's own rate, before resampling
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def load_audio(path: str | Path, sample_rate: int) -> tuple[torch.Tensor, AudioInfo]:
    """The file as a mono float32 waveform at `sample_rate`, and what the file itself holds."""
    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: zero-length audio")
    if not np.isfinite(data).all():  # a NaN sample would turn the whole batch's loss into NaN
        raise AudioError(f"{path}: non-finite samples (NaN or inf)")
    info = AudioInfo(sample_rate=file_rate, channels=data.shape[1], frames=data.shape[0])
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))  # stereo and more: mix down
    return resample(wave, file_rate, sample_rate), info


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited (windowed-sinc) resampling of a 1-D waveform, as torchaudio's default does.

    torchaudio is not a core dependency (its wheels are CUDA builds that break CPU installs), so the
    same polyphase filter is computed here in plain torch.
    """
    if orig_rate == new_rate:
        return wave
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    kernel, width = _sinc_kernel(orig, new, wave.dtype)
    frames = wave.shape[-1]
    padded = torch.nn.functional.pad(wave.reshape(1, 1, -1), (width, width + orig))
    out = torch.nn.functional.conv1d(padded, kernel.to(wave.device), stride=orig)  # (1, new, steps)
    out = out.transpose(1, 2).reshape(-1)
    return out[: math.ceil(new * frames / orig)]


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, dtype: torch.dtype, zeros: int = 6, rolloff: float = 0.99):
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / cutoff)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * cutoff).clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2  # Hann window
    t = t * math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0, dtype=torch.float64), torch.sin(t) / t)
    kernel = kernel * window * cutoff / orig
    return kernel.to(dtype), width
