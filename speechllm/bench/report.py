"""The benchmark's results as `results.json`, `results.md` and a rich table on the terminal."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from speechllm.atomic import atomic_write_text
from speechllm.bench.profiler import PART_LABELS, PARTS

TARGET_LABELS = {
    "overhead": "framework overhead: our step / bare loop step",
    "padding": "padding share of bucketed batches",
    "cache_speedup": "stage-1 epoch from the feature cache: speed-up",
    "loader_ratio": "loader throughput / training steps per second",
}


def write_results(results: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md"}
    atomic_write_text(paths["json"], json.dumps(_finite(results), indent=2, default=_plain, allow_nan=False) + "\n")
    atomic_write_text(paths["md"], markdown(results))
    return paths


def rows(results: dict) -> list[tuple[str, str, str]]:
    """(measure, value, target) rows shared by the terminal table and the markdown."""
    step, cached, over = results["step_time"], results["step_time_cached"], results["overhead"]
    over_cached = results["overhead_cached"]
    cache, loader, memory = results["feature_cache"], results["loader"], results["memory"]
    model, throughput, padding = results["model"], results["throughput"], results["padding"]
    targets = {t["name"]: _target(t) for t in results["targets"]}
    out = [("training step (median, from audio)", f"{_ms(step['seconds'])} ({step['steps_per_second']:.2f} steps/s)", "")]
    for part in PARTS:
        share = step["parts"][part] / step["seconds"] if step["seconds"] else math.nan
        out.append((f"  {PART_LABELS[part]}", f"{_ms(step['parts'][part])} ({share:.0%})", ""))
    out += [
        ("training step (median, from the feature cache)", f"{_ms(cached['seconds'])}", ""),
        ("  of which encoder / data wait", f"{_ms(cached['parts']['encoder'])} / {_ms(cached['parts']['data_wait'])}", ""),
        ("bare loop step, same model, optimizer, batches", _ms(over["bare_seconds"]), ""),
        (TARGET_LABELS["overhead"], f"{over['ratio']:.3f} (without data wait {over['ratio_without_data_wait']:.3f}; "
                                    f"paired: {over['paired_extra_seconds'] * 1000:+.1f} ms a step, {over['paired_ratio']:.3f})",
         targets["overhead"]),
        ("  the same from the feature cache", f"{over_cached['ratio']:.3f} ({_ms(cached['seconds'])} / "
                                              f"{_ms(over_cached['bare_seconds'])}; without data wait "
                                              f"{over_cached['ratio_without_data_wait']:.3f})", ""),
        (TARGET_LABELS["padding"], f"{padding['bucketed']:.1%} (random batches: {padding['random']:.1%})",
         targets["padding"]),
        ("stage-1 epoch, from audio / from the cache",
         f"{cache['epoch_seconds_audio']:.1f} s / {cache['epoch_seconds_cached']:.1f} s ({cache['epoch_batches']} "
         f"batches x median step; measured {cache['measured_seconds_audio']:.1f} s / "
         f"{cache['measured_seconds_cached']:.1f} s for {cache['measured_batches']})", ""),
        (TARGET_LABELS["cache_speedup"], f"{cache['speedup']:.2f}x (the encoder is {cache['encoder_share']:.0%} of a "
                                         f"step from audio: {cache['encoder_free_speedup']:.2f}x without it)",
         targets["cache_speedup"]),
        ("  cache build (separate)", f"{cache['build_seconds']:.1f} s, {cache['build_clips']} clips, "
                                     f"{cache['cache_mib']:.1f} MiB", ""),
        (TARGET_LABELS["loader_ratio"],
         f"{loader['ratio']:.1f}x ({loader['batches_per_second']:.1f} batches/s, {loader['workers']} worker(s), "
         f"vs {loader['steps_per_second']:.2f} steps/s)", targets["loader_ratio"]),
        ("  the same from the feature cache", f"{loader['cached_ratio']:.1f}x ({loader['cached_batches_per_second']:.1f} "
                                              f"batches/s vs {loader['cached_steps_per_second']:.2f} steps/s)", ""),
        ("throughput (from audio)", f"{throughput['llm_tokens_per_second']:,.0f} LLM tokens/s, "
                                    f"{throughput['audio_seconds_per_second']:.1f} audio s/s, "
                                    f"{throughput['examples_per_second']:.1f} examples/s", ""),
        ("model FLOPs", _flops(throughput), ""),
        ("peak memory", _memory(memory), ""),
        ("parameters: trainable / total", f"{model['trainable']:,} / {model['total']:,} "
                                          f"({model['trainable_share']:.2%})", ""),
    ]
    return out


def print_table(results: dict, console: Console | None = None) -> None:
    machine = results["machine"]
    title = (f"speechllm bench, preset {results['settings']['preset']}: {machine.get('gpu') or machine['cpu']} "
             f"({machine['cpu_cores']} cores), {results['date']}")
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target")
    for measure, value, target in rows(results):
        table.add_row(measure, value, target)
    (console or Console()).print(table)


def markdown(results: dict) -> str:
    machine, settings = results["machine"], results["settings"]
    device = machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_cores']} cores"
    lines = [
        f"# speechllm bench: preset `{settings['preset']}`",
        "",
        f"{results['date']}; {device}; torch {machine['torch']}, Lightning {machine['lightning']}, "
        f"transformers {machine['transformers']}; {machine['torch_threads']} torch thread(s); "
        f"load average {machine['load_average']:.1f} at the end.",
        f"Stage 1 (`{Path(settings['stage']).name}`), model preset `{settings['model']}`, {settings['precision']}, "
        f"batches of up to {settings['max_batch_seconds']:g} s of audio, {settings['num_workers']} loader worker(s); "
        f"{settings['steps']} measured steps after {settings['warmup']} warm-up steps (medians).",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        *(f"| {m.strip() if not m.startswith('  ') else '&nbsp;&nbsp;' + m.strip()} | {v} | {t} |"
          for m, v, t in rows(results)),
        "",
    ]
    return "\n".join(lines)


def _target(target: dict) -> str:
    sign = "<=" if target["kind"] == "max" else ">="
    verdict = "met" if target["met"] else "MISSED"
    return f"{sign} {target['target']:g}: {verdict}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _flops(throughput: dict) -> str:
    text = f"{throughput['model_tflops_per_second']:.3f} TFLOP/s"
    if throughput["mfu"] is not None:
        return f"{text}, MFU {throughput['mfu']:.1%} of {throughput['peak_tflops']:g} TFLOP/s"
    return f"{text} (MFU: GPU only)"


def _memory(memory: dict) -> str:
    text = f"RSS {memory['peak_rss_mib']:,.0f} MiB (training steps: {memory['train_rss_max_mib']:,.0f} MiB)"
    if "gpu_max_allocated_mib" in memory:
        text += f"; GPU allocated {memory['gpu_max_allocated_mib']:,.0f} MiB"
    return text


def _finite(value):
    """NaN (a measure that could not be taken, e.g. from a single batch) becomes null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
