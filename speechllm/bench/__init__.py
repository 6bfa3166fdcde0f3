"""`speechllm bench`: where a training step's time goes, framework overhead, padding, the feature cache's
speed-up, loader throughput, memory and (on GPUs) model FLOPs utilisation. README, "Benchmarks".

- `runner.py`: the benchmark, in one process (`run_bench`)
- `profiler.py`: per-step timings from hooks inside real steps (`StepProfiler`, `StepTimer`)
- `bare_loop.py`: the plain-loop reference for framework overhead
- `padding.py`: bucketed against random batches
- `flops.py`: model FLOPs and GPU peaks
- `report.py`: results.json, results.md, the terminal table
"""

from speechllm.bench.runner import BenchError, BenchSettings, run_bench

__all__ = ["BenchError", "BenchSettings", "run_bench"]
