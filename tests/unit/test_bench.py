"""`speechllm bench` on the session corpus for a few steps: every field of results.json, with sane values.

Timing targets are never asserted here (a test machine's load decides them); the bench's own machinery is.
"""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from speechllm.bench import BenchError, BenchSettings, run_bench
from speechllm.bench.flops import flop_model, peak_bf16_tflops
from speechllm.bench.padding import padding_ratios
from speechllm.bench.profiler import PARTS, StepProfiler
from speechllm.bench.report import markdown, write_results
from speechllm.cli import main
from speechllm.model.speech_llm import SpeechLLM
from speechllm.training.datamodule import SpeechDataModule
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def results(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    overrides = [f"data.train_manifests=[{corpus}/train.jsonl]", "data.max_batch_seconds=8", "data.num_workers=1",
                 "wandb.mode=disabled", "trainer.enable_progress_bar=false"]
    results = run_bench(BenchSettings(out=out, steps=3, warmup=1, overrides=overrides))
    write_results(results, out)
    return out, results


def test_results_hold_every_measure_with_sane_values(results):
    out, r = results
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(r))  # plain JSON, no NaN
    assert set(r) >= {"date", "machine", "settings", "model", "step_time", "step_time_cached", "overhead",
                      "overhead_cached", "padding", "feature_cache", "loader", "memory", "throughput", "targets"}
    assert r["machine"]["device"] == "cpu" and r["machine"]["cpu_cores"] >= 1 and r["machine"]["torch"]
    assert r["machine"]["torch_threads"] == 1  # the CPU default: steadier on a shared machine
    assert r["settings"]["steps"] == 3 and r["settings"]["warmup"] == 1

    step = r["step_time"]
    assert step["steps"] == 3 and step["seconds"] > 0
    assert set(step["parts"]) == set(PARTS)
    for part in ("encoder", "adapter", "llm", "optimizer"):
        assert step["parts"][part] > 0, part
    assert sum(step["parts_mean"].values()) == pytest.approx(step["mean_seconds"], rel=0.02)
    cached = r["step_time_cached"]
    assert cached["parts"]["encoder"] == 0 and cached["parts"]["llm"] > 0  # no encoder from the cache

    overhead = r["overhead"]
    assert overhead["bare_seconds"] > 0 and overhead["ratio"] == pytest.approx(step["seconds"] / overhead["bare_seconds"])
    assert overhead["bare_parts"]["data_wait"] == 0 and overhead["bare_parts"]["encoder"] > 0

    assert 0 <= r["padding"]["bucketed"] <= r["padding"]["random"] <= 1  # the session corpus is too small to bucket
    assert r["padding"]["examples"] == 8 * 12 and r["padding"]["tasks"] == 8

    cache = r["feature_cache"]
    assert cache["build_clips"] == 12 and cache["cache_mib"] > 0 and cache["build_seconds"] > 0
    assert cache["epoch_batches"] >= 1 and 1 <= cache["measured_batches"] <= 3
    assert cache["speedup"] > 1 and 0 < cache["encoder_share"] < 1

    loader = r["loader"]
    assert loader["workers"] == 1 and loader["batches_per_second"] > 0 and loader["ratio"] > 0
    assert r["memory"]["peak_rss_mib"] > 100 and "gpu_max_allocated_mib" not in r["memory"]
    assert 0 < r["model"]["trainable"] < r["model"]["total"]
    assert set(r["model"]["trainable_groups"]) == {"layer_weights", "downsampler", "projection"}  # stage 1

    throughput = r["throughput"]
    assert throughput["llm_tokens_per_second"] > 0 and throughput["audio_seconds_per_second"] > 0
    assert throughput["model_tflops_per_second"] > 0 and throughput["mfu"] is None  # MFU: GPUs only
    assert [t["name"] for t in r["targets"]] == ["overhead", "padding", "cache_speedup", "loader_ratio"]
    assert all(isinstance(t["met"], bool) for t in r["targets"])


def test_markdown_report_names_every_target(results):
    out, r = results
    text = (out / "results.md").read_text()
    assert text == markdown(r)
    for needle in ("framework overhead", "padding", "feature cache", "loader throughput", "trainable / total",
                   "LLM forward + backward", "data wait"):
        assert needle in text
    assert text.count(": met") + text.count(": MISSED") == 4


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_step_counts_llm_positions_and_targets_whichever_loss_runs(chunk):
    """Throughput and model FLOPs come from these counts; the chunked loss (model.llm.loss_chunk_tokens) runs the
    LLM's body and its LM head separately, and the counts must not change with it."""
    torch.manual_seed(0)
    model = SpeechLLM(tiny_config("tiny", f"model.llm.loss_chunk_tokens={chunk}").model)
    wave, mask = torch.randn(2, 16000) * 0.1, torch.ones(2, 16000, dtype=torch.bool)
    mask[1, 7000:] = False
    instructions, targets = ["say it", "say it again"], ["abc", "de"]
    profiler = StepProfiler(model)
    profiler.begin()
    model(wave, mask, instructions, targets)
    profiler.end()
    step = profiler.steps[0]
    with torch.no_grad():
        lengths = model.build_inputs(*model.encode_audio(wave, mask), instructions, targets).attention_mask.sum(-1)
    assert (step.llm_tokens, step.llm_tokens_squared) == (int(lengths.sum()), int((lengths ** 2).sum()))
    assert step.target_tokens == len("abc") + 1 + len("de") + 1  # byte tokens + eos each
    # The frozen LM head (384 x 96) is credited per target token only: forward + its input's gradient.
    flops = flop_model(model)
    assert flops.head_per_target == 4 * 384 * 96 and 0 < flops.llm_per_token


def test_bucketing_pads_less_than_random_batches_with_the_same_budget():
    rng = np.random.default_rng(0)
    durations = np.clip(rng.lognormal(1.0, 0.5, 2000), 0.5, 20.0)
    examples = [SimpleNamespace(duration=float(d), task=("asr", "st")[i % 2]) for i, d in enumerate(durations)]
    datamodule = SimpleNamespace(
        train_set=SimpleNamespace(examples=examples), token_counts=None, cfg=SimpleNamespace(seed=0),
        data=SimpleNamespace(max_batch_seconds=60.0, max_batch_size=None, max_batch_tokens=None, num_buckets=10),
    )
    datamodule.training_sampler = functools.partial(SpeechDataModule.training_sampler, datamodule)  # the real one
    ratios = padding_ratios(datamodule)
    assert ratios.random > 0.25 and ratios.bucketed < ratios.random / 2
    assert (ratios.examples, ratios.tasks, ratios.num_buckets) == (2000, 2, 10)


def test_gpu_peaks_by_device_name():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_bf16_tflops("NVIDIA L4") == 121.0 and peak_bf16_tflops("NVIDIA L40S") == 362.1
    assert peak_bf16_tflops("Tesla T4") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_realistic_preset_without_a_gpu_is_refused_in_one_line(capsys):
    with pytest.raises(BenchError, match="needs a GPU .* --force"):
        run_bench(BenchSettings(preset="realistic"))
    assert main(["bench", "--preset", "realistic"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --preset realistic needs a GPU") and err.count("\n") == 1
