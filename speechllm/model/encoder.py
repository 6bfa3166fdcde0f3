"""AudioEncoder: a frozen HF speech encoder that returns every hidden state and the frame padding mask."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from speechllm.config import EncoderConfig
from speechllm.model.pretrained import from_pretrained, seeded_init

# The wav2vec2 family reads raw waveforms; Whisper reads log-mel features.
WAVEFORM_ENCODERS = {
    "wavlm": (WavLMConfig, WavLMModel),
    "hubert": (HubertConfig, HubertModel),
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
}
# Every supported family emits 50 frames per second of 16 kHz audio (a 320-sample conv stride; Whisper:
# 100 mel frames per second, halved by its second conv).
ENCODER_FRAMES_PER_SECOND = 50
# Frozen encoders must be deterministic: no layer dropping, no time masking, no dropout.
_NO_STOCHASTICITY = {"layerdrop": 0.0, "mask_time_prob": 0.0, "mask_feature_prob": 0.0}


class AudioEncoder(nn.Module):
    """Wraps WavLM / HuBERT / wav2vec 2.0 / the Whisper encoder; frozen, always in eval mode."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.kind = cfg.kind
        self.sample_rate = cfg.sample_rate
        self.normalize_waveform = cfg.normalize_waveform
        self.model = _build(cfg)
        self.model.requires_grad_(False)
        self.model.eval()
        config = self.model.config
        self.num_layers = config.num_hidden_layers + 1  # hidden_states includes the embedding output
        self.hidden_size = config.d_model if cfg.kind == "whisper" else config.hidden_size
        if cfg.kind == "whisper":
            self._mel = _LogMel(config, cfg.sample_rate)
        # The wav2vec2-family feature extractor returns an attention mask only for layer-norm models;
        # group-norm models (e.g. wav2vec2-base) were trained on zero padding without one.
        self._use_attention_mask = getattr(config, "feat_extract_norm", "layer") == "layer"

    @property
    def batch_invariant(self) -> bool:
        """Whether a clip's hidden states are the same alone and padded in a batch.

        Group-norm wav2vec2-family models (no attention mask) normalise over the padding too; Whisper and
        attention-masked models do not see it.
        """
        return self.kind == "whisper" or self._use_attention_mask

    def cast_weights(self, dtype: torch.dtype) -> None:
        """Store the frozen weights in `dtype` (mixed precision's autocast dtype): half the memory and no cast of
        them at every step. Whisper's log-mel front end keeps its fp32 filters (its STFT runs in fp32)."""
        self.model.to(dtype)

    def train(self, mode: bool = True) -> "AudioEncoder":
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the trainer asks
        return self

    @torch.no_grad()
    def forward(self, wave: torch.Tensor, wave_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wave (B, T) float, wave_mask (B, T) bool -> hidden states (L, B, F, D), frame mask (B, F)."""
        lengths = wave_mask.sum(-1)
        if self.kind == "whisper":
            return self._forward_whisper(wave, lengths)
        if self.normalize_waveform:
            wave = _normalize(wave, wave_mask)
        wave = (wave * wave_mask).to(self.model.dtype)
        attention_mask = wave_mask.long() if self._use_attention_mask else None
        out = self.model(wave, attention_mask=attention_mask, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states)
        frame_lengths = self.model._get_feat_extract_output_lengths(lengths)
        return hidden, _lengths_to_mask(frame_lengths, hidden.shape[2])

    def _forward_whisper(self, wave: torch.Tensor, lengths: torch.Tensor):
        features = self._mel(wave, lengths)
        out = self.model(features.to(self.model.dtype), output_hidden_states=True)
        hidden = torch.stack(out.hidden_states)
        # mel frames = samples // hop; the two encoder convs then halve the rate once.
        frame_lengths = (lengths // self._mel.hop_length + 1) // 2
        return hidden, _lengths_to_mask(frame_lengths.clamp(max=hidden.shape[2]), hidden.shape[2])


def inference_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The dtype the frozen encoder and LLM are stored and run in under a Lightning `precision`: autocast's, for
    *-mixed on CUDA.

    None (nothing is cast) elsewhere: CPU runs keep what they built or loaded, and a `*-true` precision converts
    the whole model anyway.
    """
    if torch.device(device).type != "cuda":
        return None
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))


def _build(cfg: EncoderConfig) -> nn.Module:
    overrides = {**cfg.architecture, **_NO_STOCHASTICITY}
    if cfg.kind == "whisper":
        if cfg.pretrained and _saved_architecture(cfg.pretrained) == "WhisperEncoder":  # an export's encoder/
            return from_pretrained(WhisperEncoder, cfg.pretrained, "model.encoder.pretrained", **overrides)
        if cfg.pretrained:
            whisper = from_pretrained(WhisperModel, cfg.pretrained, "model.encoder.pretrained", **overrides)
            return whisper.get_encoder()
        return seeded_init(lambda: WhisperEncoder(WhisperConfig(**overrides)))
    config_cls, model_cls = WAVEFORM_ENCODERS[cfg.kind]
    if cfg.pretrained:
        return from_pretrained(model_cls, cfg.pretrained, "model.encoder.pretrained", **overrides)
    return seeded_init(lambda: model_cls(config_cls(**overrides)))


def _saved_architecture(source: str) -> str | None:
    """The model class a local HF directory was saved from (config.json `architectures`), if any."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    return (json.loads(config.read_text()).get("architectures") or [None])[0]


class _LogMel(nn.Module):
    """Whisper's log-mel spectrogram in torch, batched, padded to the encoder's fixed window."""

    def __init__(self, config: WhisperConfig, sample_rate: int):
        super().__init__()
        self.hop_length = 160
        self.n_fft = 400
        self.num_samples = config.max_source_positions * 2 * self.hop_length
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=sample_rate)
        self.register_buffer("filters", torch.tensor(extractor.mel_filters, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if wave.shape[1] > self.num_samples:
            raise ValueError(f"audio longer than the Whisper window ({self.num_samples / 16000:.0f} s)")
        keep = torch.arange(wave.shape[1], device=wave.device)[None] < lengths[:, None]
        wave = nn.functional.pad(wave.float() * keep, (0, self.num_samples - wave.shape[1]))
        stft = torch.stft(wave, self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self.filters.T @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log_spec + 4.0) / 4.0


def _normalize(wave: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (wave * mask).sum(-1, keepdim=True) / count
    var = (((wave - mean) * mask) ** 2).sum(-1, keepdim=True) / count
    return (wave - mean) / torch.sqrt(var + 1e-7)


def _lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len, device=lengths.device)[None] < lengths[:, None]
