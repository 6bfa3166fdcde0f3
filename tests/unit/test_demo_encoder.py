"""The demo encoder stand-in's first convolution starts as a filterbank, not noise."""

from __future__ import annotations

import torch

from speechllm.demo.encoder import centre_frequencies, filterbank


def test_each_filter_pair_answers_most_to_a_tone_at_its_own_frequency():
    filters = filterbank(128, 400)  # 25 ms windows at 16 kHz, as the stand-in's first convolution
    t = torch.arange(4000) / 16000
    for hertz in (250.0, 1000.0, 4000.0):
        tone = torch.sin(2 * torch.pi * hertz * t)[None, None]
        response = torch.nn.functional.conv1d(tone, filters, stride=160).pow(2).mean(-1)[0]
        energy = response[:64] + response[64:]  # a cosine and a sine filter share each centre frequency
        best = centre_frequencies(64)[energy.argmax()]
        assert abs(best - hertz) / hertz < 0.1, (hertz, best)
