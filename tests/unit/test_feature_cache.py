"""The encoder feature cache: exact features, keys that tell encoders apart, no stale reads, safe builds."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from speechllm.data import feature_cache as fc
from speechllm.data.audio import load_audio
from speechllm.data.dataset import SpeechDataset, collate
from speechllm.data.feature_cache import FeatureCache, FeatureCacheError, build_cache, cache_key, encoder_identity
from speechllm.data.manifest import Example
from speechllm.data.tasks import default_registry
from speechllm.evaluation.generation import generate_by_task
from speechllm.model.encoder import AudioEncoder, inference_dtype
from speechllm.model.speech_llm import SpeechLLM
from tests.conftest import tiny_config

# fp16 keeps 11 significant bits: relative error <= 2^-11 ~ 4.9e-4.
FP16 = dict(rtol=1e-3, atol=1e-3)


def _encoder(*overrides: str) -> AudioEncoder:
    return AudioEncoder(OmegaConf.to_object(tiny_config("tiny", *overrides).model.encoder))


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    return _encoder()


@pytest.fixture()
def clips(corpus, tmp_path) -> list[tuple[str, float]]:
    """Six ASR clips copied into this test's directory (tests rewrite them), with their durations."""
    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    out = []
    for row in [r for r in rows if r["task"] == "asr"][:6]:
        target = tmp_path / "audio" / (row["id"] + ".wav")
        target.parent.mkdir(exist_ok=True)
        shutil.copy(corpus / row["audio"], target)
        out.append((str(target), row["duration"]))
    return out


def _alone(encoder: AudioEncoder, audio: str) -> torch.Tensor:
    """The clip's hidden states (layers, valid frames, width), encoded on its own in fp32."""
    wave, _ = load_audio(audio, encoder.sample_rate)
    hidden, mask = encoder(wave[None], torch.ones(1, wave.numel(), dtype=torch.bool))
    return hidden[:, 0, : int(mask.sum())]


def _examples(clips, target="x") -> list[Example]:
    return [Example(id=f"c{i}", audio=audio, task="asr", target=target, instruction=None, duration=duration,
                    fields={}, source=f"m.jsonl:{i + 1}") for i, (audio, duration) in enumerate(clips)]


def _build(cache, encoder, clips, **kwargs):
    return build_cache(cache, encoder, clips, progress=False, log=lambda _: None, **kwargs)


def test_cached_features_equal_the_encoder_output(encoder, clips, tmp_path):
    cache = FeatureCache.for_encoder(tmp_path / "cache", encoder)
    # Batches of 2 padded clips, a shard every ~2 clips: padding and shard boundaries must not show.
    report = _build(cache, encoder, clips, max_batch_size=2, shard_bytes=60_000)
    assert (report.encoded, report.cached_before, report.clips) == (6, 0, 6)
    assert len(list(cache.directory.glob("shard-*.json"))) >= 3 and len(cache) == 6
    assert report.written_bytes == cache.disk_bytes()
    # The estimate counts 50 frames per second of the declared durations: within a frame per clip.
    assert abs(report.estimated_bytes - report.written_bytes) <= 6 * cache.frame_bytes
    for audio, _ in clips:
        cached = cache.get(audio)
        assert cached.dtype == torch.float16
        torch.testing.assert_close(cached.float(), _alone(encoder, audio), **FP16)


def test_bfloat16_cache_holds_the_features_at_bfloat16_precision(encoder, clips, tmp_path):
    cache = FeatureCache.for_encoder(tmp_path / "cache", encoder, dtype="bfloat16")
    _build(cache, encoder, clips[:2])
    for audio, _ in clips[:2]:
        cached = cache.get(audio)
        assert cached.dtype == torch.bfloat16
        torch.testing.assert_close(cached.float(), _alone(encoder, audio), rtol=8e-3, atol=8e-3)


def test_values_beyond_float16_stop_the_build_naming_bfloat16(clips, tmp_path, monkeypatch):
    encoder = _encoder()
    forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda wave, mask: (forward(wave, mask)[0] * 1e6, forward(wave, mask)[1]))
    with pytest.raises(FeatureCacheError, match="feature_cache_dtype=bfloat16"):
        _build(FeatureCache.for_encoder(tmp_path / "cache", encoder), encoder, clips[:1])


def test_rewritten_audio_is_a_miss_never_served_stale(encoder, clips, tmp_path):
    cache = FeatureCache.for_encoder(tmp_path / "cache", encoder)
    _build(cache, encoder, clips)
    audio = clips[0][0]
    before = cache.get(audio)
    data, rate = sf.read(audio, dtype="float32")
    sf.write(audio, np.ascontiguousarray(data[::-1]), rate)  # other content, same length

    assert cache.lookup(audio) is None and cache.get(audio) is None
    dataset = SpeechDataset(_examples(clips), default_registry(), encoder.sample_rate, feature_cache=cache)
    cached_batch = collate(dataset.__getitems__([(1, 0), (2, 0)]))
    assert cached_batch.wave is None and cached_batch.features.shape[:2] == (encoder.num_layers, 2)
    # One changed clip in a batch: the whole batch is read as audio, for the encoder to run on.
    mixed_batch = collate(dataset.__getitems__([(0, 0), (1, 0)]))
    assert mixed_batch.features is None and mixed_batch.wave.shape[0] == 2

    report = _build(cache, encoder, clips)  # re-encodes only the changed clip; its new entry wins
    assert (report.encoded, report.cached_before) == (1, 5)
    after = cache.get(audio)
    torch.testing.assert_close(after.float(), _alone(encoder, audio), **FP16)
    assert not torch.allclose(after.float(), before.float(), **FP16)


def test_deleted_audio_in_a_cached_run_is_substituted_as_without_cache(encoder, clips, tmp_path):
    cache = FeatureCache.for_encoder(tmp_path / "cache", encoder)
    _build(cache, encoder, clips)
    dataset = SpeechDataset(_examples(clips), default_registry(), encoder.sample_rate, substitute_bad=True,
                            feature_cache=cache)
    os.remove(clips[0][0])
    batch = collate(dataset.__getitems__([(0, 0), (1, 0)]))
    assert batch.features is None and [bad.id for bad in batch.bad] == ["c0"] and batch.bad[0].substitute


def test_encoder_key_changes_with_config_weights_and_dtype(encoder):
    key = cache_key(encoder_identity(encoder, "float16"))
    assert key.startswith("wavlm-")
    assert cache_key(encoder_identity(_encoder(), "float16")) == key  # rebuilt the same: the same cache
    assert cache_key(encoder_identity(encoder, "bfloat16")) != key
    assert cache_key(encoder_identity(_encoder("model.encoder.normalize_waveform=false"), "float16")) != key
    assert cache_key(encoder_identity(_encoder("model.encoder.architecture.num_hidden_layers=2"), "float16")) != key
    assert cache_key(encoder_identity(_encoder("model.encoder.architecture.layer_norm_eps=1e-6"), "float16")) != key
    other = _encoder()
    with torch.no_grad():
        other.model.encoder.layers[0].attention.out_proj.weight[0, 0] += 1e-3  # the same config, other weights
    assert cache_key(encoder_identity(other, "float16")) != key


def test_interrupted_build_leaves_a_readable_cache_and_resumes(encoder, clips, tmp_path, monkeypatch):
    cache = FeatureCache.for_encoder(tmp_path / "cache", encoder)
    calls = 0

    def load_then_fail(path, rate):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt  # e.g. Ctrl-C while reading the 4th clip
        return load_audio(path, rate)

    monkeypatch.setattr(fc, "load_audio", load_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _build(cache, encoder, clips, max_batch_size=1, shard_bytes=1 << 30)
    monkeypatch.undo()
    assert len(cache.refresh()) == 3  # the clips encoded before the interruption
    # A build killed outright leaves a shard without an index: never read, removed by the next build.
    (cache.directory / "shard-00042.bin").write_bytes(b"\x00" * 1000)

    report = _build(cache, encoder, clips)
    assert (report.encoded, report.cached_before) == (3, 3)
    assert not (cache.directory / "shard-00042.bin").exists()
    assert sorted(p.stem for p in cache.directory.glob("shard-*.bin")) == sorted(
        p.stem for p in cache.directory.glob("shard-*.json"))
    for audio, _ in clips:
        torch.testing.assert_close(cache.get(audio).float(), _alone(encoder, audio), **FP16)


@pytest.fixture(scope="module")
def model() -> SpeechLLM:
    torch.manual_seed(0)
    return SpeechLLM(tiny_config("tiny").model).eval()


def test_loss_from_cached_features_matches_loss_from_audio(model, clips, tmp_path):
    cache = FeatureCache.for_encoder(tmp_path / "cache", model.encoder)
    _build(cache, model.encoder, clips)
    examples = _examples(clips, target="every little neighbor")
    keys = [(0, 0), (3, 0), (5, 0)]  # clips of different lengths: padded in both batches
    audio = collate(SpeechDataset(examples, default_registry(), 16000).__getitems__(keys))
    cached = collate(SpeechDataset(examples, default_registry(), 16000, feature_cache=cache).__getitems__(keys))
    assert cached.wave is None and cached.instructions == audio.instructions
    with torch.no_grad():
        from_audio = model(audio.wave, audio.wave_mask, audio.instructions, audio.targets)
        from_cache = model(None, None, cached.instructions, cached.targets,
                           features=cached.features, feature_mask=cached.feature_mask)
    torch.testing.assert_close(from_cache.example_losses, from_audio.example_losses, rtol=1e-3, atol=1e-4)


def test_generation_from_features_equals_generation_from_audio(model, clips):
    waves = [load_audio(a, 16000)[0] for a, _ in clips[:3]]
    wave = torch.zeros(3, max(w.numel() for w in waves))
    mask = torch.zeros_like(wave, dtype=torch.bool)
    for i, w in enumerate(waves):
        wave[i, : w.numel()], mask[i, : w.numel()] = w, True
    hidden, frame_mask = model.encoder(wave, mask)
    args = (["transcribe", "what is said?", "transcribe"], ["asr", "ic", "asr"], lambda task: 6)
    from_audio = generate_by_task(model, wave, mask, *args)
    assert generate_by_task(model, None, None, *args, features=hidden, feature_mask=frame_mask) == from_audio


def test_frozen_encoder_runs_in_the_mixed_precision_dtype(clips):
    assert inference_dtype("bf16-mixed", "cuda") == torch.bfloat16
    assert inference_dtype("16-mixed", "cuda:1") == torch.float16
    assert inference_dtype("bf16-mixed", "cpu") is None and inference_dtype("32-true", "cuda") is None
    encoder = _encoder()
    wave, _ = load_audio(clips[0][0], 16000)
    mask = torch.ones(1, wave.numel(), dtype=torch.bool)
    reference, _ = encoder(wave[None], mask)
    encoder.cast_weights(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, _ = encoder(wave[None], mask)
    assert not hidden.requires_grad
    # bf16 keeps 8 significant bits; after a few layers the features agree to about a percent of their scale.
    assert (hidden.float() - reference).abs().max() < 0.05 * reference.abs().max()
