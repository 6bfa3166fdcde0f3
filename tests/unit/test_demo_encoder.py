"""The demo encoder stand-in: its first convolution starts as a filterbank, not noise; its pitch target."""

from __future__ import annotations

import torch

from speechllm.demo.encoder import centre_frequencies, filterbank, pitch_loss, pitch_track


def test_each_filter_pair_answers_most_to_a_tone_at_its_own_frequency():
    filters = filterbank(128, 400)  # 25 ms windows at 16 kHz, as the stand-in's first convolution
    t = torch.arange(4000) / 16000
    for hertz in (250.0, 1000.0, 4000.0):
        tone = torch.sin(2 * torch.pi * hertz * t)[None, None]
        response = torch.nn.functional.conv1d(tone, filters, stride=160).pow(2).mean(-1)[0]
        energy = response[:64] + response[64:]  # a cosine and a sine filter share each centre frequency
        best = centre_frequencies(64)[energy.argmax()]
        assert abs(best - hertz) / hertz < 0.1, (hertz, best)


def _voiced(hertz: float, seconds: float = 0.5, sample_rate: int = 16000) -> torch.Tensor:
    """A buzz with a voice's falling harmonics."""
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    return sum(torch.sin(2 * torch.pi * hertz * k * t) / k for k in range(1, 12))


def test_pitch_track_finds_male_and_female_voices_fundamental_and_leaves_faint_frames_unvoiced():
    for hertz in (85.0, 120.0, 190.0, 240.0):
        track = pitch_track(torch.cat([_voiced(hertz), 0.1 * _voiced(hertz), torch.zeros(4000)]))
        voiced = track[~track.isnan()].exp()
        assert abs(voiced.median() - hertz) / hertz < 0.03, (hertz, voiced.median())
        assert 20 <= len(voiced) <= 25 and track[-30:].isnan().all()  # 0.5 s at 50 frames/s; the faint rest: none


def test_pitch_loss_counts_voiced_frames_only():
    head = torch.nn.Linear(4, 1)
    hidden = torch.randn(2, 6, 4, requires_grad=True)
    pitch = torch.tensor([[0.5, float("nan"), 1.0, float("nan"), float("nan"), float("nan")], [float("nan")] * 6])
    loss = pitch_loss(head, hidden, pitch[:, :5])  # the track may be a frame shorter than the encoder's output
    loss.backward()
    predicted = head(hidden).squeeze(-1).detach()
    assert torch.isclose(loss, ((predicted[0, [0, 2]] - torch.tensor([0.5, 1.0])) ** 2).mean())
    assert hidden.grad[0, [1, 3, 4, 5]].abs().sum() == 0 and hidden.grad[1].abs().sum() == 0
