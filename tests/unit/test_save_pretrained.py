"""SpeechLLM.save_pretrained / from_pretrained on an encoder-decoder with a Whisper encoder (no training needed)."""

from __future__ import annotations

import torch

from conftest import tiny_config
from speechllm.model.speech_llm import SpeechLLM

WHISPER = ("model.encoder.kind=whisper", "model.encoder.architecture={num_mel_bins: 80, d_model: 32, encoder_layers: 2, "
           "encoder_attention_heads: 2, encoder_ffn_dim: 64, max_source_positions: 100, decoder_layers: 1}")


def test_whisper_t5_model_round_trips_through_an_export(tmp_path):
    model = SpeechLLM(tiny_config("tiny_t5", *WHISPER).model).eval()
    with torch.no_grad():  # a trained-looking model: non-zero LoRA, moved projection
        for name, param in model.named_parameters():
            if "lora_B" in name or name.startswith("projection"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "export")
    loaded = SpeechLLM.from_pretrained(tmp_path / "export")

    assert type(loaded.encoder.model).__name__ == "WhisperEncoder" and loaded.is_seq2seq
    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    wave = torch.randn(2, 8000)
    mask = torch.ones_like(wave, dtype=torch.bool)
    mask[1, 5000:] = False
    instructions = ["Transcribe the audio.", "What is the intent?"]
    assert loaded.generate(wave, mask, instructions, max_new_tokens=8) == model.generate(wave, mask, instructions,
                                                                                          max_new_tokens=8)
