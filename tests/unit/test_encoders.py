"""Every encoder family through encoder -> layer weights -> downsampler: shapes, masks, padding invariance."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from speechllm.config import EncoderConfig
from speechllm.model.downsampler import ConvDownsampler
from speechllm.model.encoder import AudioEncoder
from speechllm.model.layer_weights import LayerWeightedSum

WAVEFORM_ARCH = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    conv_dim=[16] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    feat_extract_norm="layer", do_stable_layer_norm=True,
)
ARCHITECTURES = {
    "wavlm": WAVEFORM_ARCH,
    "hubert": WAVEFORM_ARCH,
    "wav2vec2": WAVEFORM_ARCH,
    # A 2-second Whisper window (max_source_positions * 2 mel frames of 10 ms).
    "whisper": dict(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                    encoder_ffn_dim=64, max_source_positions=100, decoder_layers=1),
}
LENGTHS = [16000, 12345, 7001]


def encoder(kind: str) -> AudioEncoder:
    cfg = OmegaConf.merge(OmegaConf.structured(EncoderConfig), {"kind": kind, "architecture": ARCHITECTURES[kind]})
    return AudioEncoder(OmegaConf.to_object(cfg))  # plain lists, as SpeechLLM hands them to HF configs


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_audio_path_shapes_masks_and_padding_invariance(kind):
    enc = encoder(kind)
    weights = LayerWeightedSum(enc.num_layers)
    down = ConvDownsampler(enc.hidden_size, 24, num_layers=2, kernel_size=3, stride=2)
    gen = torch.Generator().manual_seed(0)
    waves = [torch.randn(n, generator=gen) * 0.1 for n in LENGTHS]
    wave = torch.zeros(len(waves), max(LENGTHS))
    mask = torch.zeros_like(wave, dtype=torch.bool)
    for i, w in enumerate(waves):
        wave[i, : w.numel()], mask[i, : w.numel()] = w, True

    def audio_path(wave, mask):
        hidden, frame_mask = enc(wave, mask)
        assert hidden.shape[0] == enc.num_layers and not hidden.requires_grad
        return down(weights(hidden), frame_mask)

    with torch.no_grad():
        out, out_mask = audio_path(wave, mask)
        # 50 encoder frames per second, 4x shorter: 1 s -> 12 or 13 frames; lengths follow the samples.
        assert out.shape[-1] == 24 and int(out_mask[0].sum()) in (12, 13)
        assert out_mask.sum(-1).tolist() == sorted(out_mask.sum(-1).tolist(), reverse=True)
        for i, w in enumerate(waves):
            alone, alone_mask = audio_path(w[None], torch.ones(1, w.numel(), dtype=torch.bool))
            n = int(alone_mask.sum())
            assert int(out_mask[i].sum()) == n
            torch.testing.assert_close(out[i, :n], alone[0, :n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_encoder_is_frozen_and_stays_in_eval_mode(kind):
    enc = encoder(kind)
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())
    config = enc.model.config
    assert getattr(config, "layerdrop", 0.0) == 0.0 and getattr(config, "mask_time_prob", 0.0) == 0.0
