"""`speechllm train|eval|predict|export|plan|data|bench` — one command line, subcommands per job.

User mistakes (config, data, checkpoints, unreachable models) end with one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechllm.config import ConfigError

DEFAULT_STAGE = "stages/stage1.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


def _train(args) -> int:
    from speechllm.config import load_config
    from speechllm.training.faults import TrainingStopped
    from speechllm.training.run import train

    stage, overrides = args.stage, list(args.overrides)
    if stage and "=" in stage:  # `speechllm train key=value` without a stage file
        stage, overrides = DEFAULT_STAGE, [stage] + overrides
    cfg = load_config(stage or DEFAULT_STAGE, overrides)
    try:
        run = train(cfg)
    except TrainingStopped as stop:  # preempted (exit 128 + signal), or a fault it must not train through
        print(f"{stop.kind}: {stop}", file=sys.stderr)
        return stop.exit_code
    print(f"run saved in {run.run_dir}")
    return 0


def _eval(args) -> int:
    from speechllm.evaluation.evaluate import EvalError, EvalSettings, evaluate
    from speechllm.evaluation.report import print_table

    every_task, per_task = _per_task_counts(args.max_new_tokens, "--max-new-tokens", 1, EvalError)
    report = evaluate(
        args.run_dir,
        EvalSettings(
            manifests=args.manifests,
            split=args.split,
            instructions=args.instructions,
            max_examples=args.max_examples,
            max_batch_size=args.max_batch_size,
            num_beams=args.num_beams,
            max_new_tokens=every_task,
            max_new_tokens_per_task=per_task,
            wer_normalize=args.wer_normalize,
            out=args.out,
            device=args.device,
        ),
    )
    print_table(report)
    print(f"reports in {report.out_dir}: {', '.join(p.name for p in report.files.values())}\n"
          f"{len(report.predictions)} answers in {report.seconds:.1f}s")
    return 0


def _per_task_counts(values: list[str], option: str, least: int, error) -> tuple[int | None, dict[str, int]]:
    """An option's values N (every task; the last one counts) and TASK=N (one task), each N >= `least`."""
    every_task, per_task = None, {}
    for value in values:
        task, sep, number = value.rpartition("=")
        count = int(number) if number.strip().isdigit() else -1
        if count < least:
            wanted = "a positive N" if least == 1 else f"N >= {least}"
            raise error(f"{option} {value}: expected N or TASK=N with {wanted}")
        if sep:
            per_task[task.strip().lower()] = count
        else:
            every_task = count
    return every_task, per_task


def _predict(args) -> int:
    from speechllm.evaluation.evaluate import resolve_device
    from speechllm.inference import (
        PredictError, answer, load_inference_model, manifest_requests, sample_rate_of, single_request,
        write_predictions,
    )

    if bool(args.audio) == bool(args.manifest):
        raise PredictError("give either --audio FILE --instruction TEXT, or --manifest M.jsonl --out P.jsonl")
    if args.manifest and not args.out:
        raise PredictError("--manifest needs --out P.jsonl for the answers")
    sample_rate = sample_rate_of(args.ckpt)  # reads only the config: input mistakes fail before the model loads
    if args.audio:
        requests = [single_request(args.audio, args.instruction, args.task)]
    else:
        requests = manifest_requests(args.manifest)
    model, registry = load_inference_model(args.ckpt, resolve_device(args.device))
    answers = answer(model, requests, sample_rate, registry, max_new_tokens=args.max_new_tokens,
                     num_beams=args.num_beams, batch_size=args.batch_size)
    if args.audio:
        print(answers[0])
    else:
        write_predictions(args.out, requests, answers)
        print(f"{len(answers)} answers written to {args.out}")
    return 0


def _plan(args) -> int:
    import json

    from speechllm.plan import Workload, make_plan, print_plan

    workload = Workload(
        batch_size=args.batch_size, seconds=args.seconds, prompt_tokens=args.prompt_tokens,
        target_tokens=args.target_tokens, devices=args.devices, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    plan = make_plan(args.config, args.overrides, workload)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print_plan(plan)
    return 0


def _bench(args) -> int:
    from speechllm.bench import BenchSettings, run_bench
    from speechllm.bench.report import print_table, write_results

    results = run_bench(BenchSettings(
        out=args.out, steps=args.steps, warmup=args.warmup, preset=args.preset, force=args.force,
        peak_tflops=args.peak_tflops, threads=args.threads, overrides=list(args.overrides),
    ))
    paths = write_results(results, args.out)
    print_table(results)
    print(f"results in {paths['json']} and {paths['md']}")
    return 0


def _export(args) -> int:
    import torch

    from speechllm.evaluation.evaluate import load_model, load_run_config, resolve_run
    from speechllm.model.export import check_target

    check_target(args.out)
    run_dir, checkpoint = resolve_run(args.ckpt)
    cfg = load_run_config(run_dir)
    model, meta, _ = load_model(cfg, checkpoint, torch.device("cpu"))
    source = {"checkpoint": str(checkpoint.resolve()), **{k: meta.get(k) for k in ("stage", "phase", "global_step")}}
    metadata = {"source": source, "precision": cfg.trainer.precision}  # predict on a GPU loads the export in it
    out = model.save_pretrained(args.out, merge_lora=args.merge_lora, metadata=metadata)
    print(f"exported {checkpoint} to {out}{' (LoRA merged into the LLM)' if args.merge_lora else ''}; "
          f"load it with SpeechLLM.from_pretrained('{out}') or `speechllm predict --ckpt {out}`")
    return 0


def _synth(args) -> int:
    from speechllm.data.synth import SYNTH_TASKS, synthesize_corpus

    tasks = args.tasks.split(",") if args.tasks else SYNTH_TASKS
    every_task, per_task = _per_task_counts(args.train_per_task, "--train-per-task", 0, ConfigError)
    summary = synthesize_corpus(
        args.out,
        train_per_task=200 if every_task is None else every_task,
        eval_per_task=args.eval_per_task,
        tasks=tasks,
        train_sizes=per_task,
        seed=args.seed,
        snr_db=args.snr_db,
    )
    print(f"corpus written to {args.out}: {summary}")
    return 0


def _prepare(args) -> int:
    from speechllm.data.converters import ConverterError, prepare

    options = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConverterError(f"--set {item}: expected key=value")
        options[key.strip()] = value
    report = prepare(args.dataset, args.root, args.out, progress=True, **options)
    print(f"{args.out}: {report.summary()}")
    return 0


def _cache(args) -> int:
    """Encode the run's train and dev clips into data.feature_cache (skipping those already there)."""
    from omegaconf import OmegaConf

    from speechllm.config import load_config
    from speechllm.data.feature_cache import FeatureCache, build_cache
    from speechllm.evaluation.evaluate import resolve_device
    from speechllm.model.encoder import AudioEncoder, inference_dtype
    from speechllm.training.run import build_registry, load_examples

    stage, overrides = args.stage, list(args.overrides)
    if stage and "=" in stage:  # `speechllm data cache key=value` without a stage file
        stage, overrides = DEFAULT_STAGE, [stage] + overrides
    cfg = load_config(stage or DEFAULT_STAGE, overrides)
    if not cfg.data.feature_cache:
        raise ConfigError("data.feature_cache: not set; name the cache directory, e.g. data.feature_cache=data/features")
    device = resolve_device(args.device)
    registry = build_registry(cfg.data.task_files)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    examples = [e for split in ("train", "dev") for e in load_examples(cfg, registry, run_dir, split).examples]
    encoder = AudioEncoder(OmegaConf.to_object(cfg.model.encoder))  # HF configs want plain lists
    cache = FeatureCache.for_encoder(cfg.data.feature_cache, encoder, cfg.data.feature_cache_dtype)
    report = build_cache(
        cache, encoder, [(e.audio, e.duration) for e in examples], device=device,
        autocast_dtype=inference_dtype(cfg.trainer.precision, device), max_batch_seconds=cfg.data.max_batch_seconds,
        estimate_only=args.estimate,
    )
    if not args.estimate or report.cached_before == report.clips:  # an estimate was logged before encoding
        print(report.summary())
    return 0


def _validate(args) -> int:
    from speechllm.data.manifest import validate_manifests
    from speechllm.training.run import build_registry

    registry = build_registry(args.task_file)
    report = validate_manifests(
        args.manifests,
        registry,
        sample_rate=args.sample_rate,
        max_duration=args.max_duration,
        require_duration=not args.allow_missing_duration,
        progress=True,
    )
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 1 if report.problems else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechllm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train one stage: speechllm train stages/stage1.yaml [key=value ...]")
    train.add_argument("stage", nargs="?", help=f"stage file (default {DEFAULT_STAGE})")
    train.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.max_steps=20")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="per-task metrics of a trained run: speechllm eval runs/stage1")
    evaluate.add_argument("run_dir", metavar="RUN_DIR_OR_CKPT", help="a run directory, or a checkpoint in <run>/checkpoints/")
    evaluate.add_argument("--manifest", dest="manifests", action="append", default=[],
                          help="manifest to evaluate (repeatable; default: the run's data.<split>_manifests)")
    evaluate.add_argument("--split", default="dev", help="names the report and picks the default manifests (default dev)")
    evaluate.add_argument("--instructions", choices=("seen", "heldout", "both"), default="seen",
                          help="phrase questions with training's templates (seen), the held-out templates training "
                               "never used (heldout), or both, reported side by side (default seen)")
    evaluate.add_argument("--heldout-instructions", dest="instructions", action="store_const", const="heldout",
                          help="same as --instructions heldout")
    evaluate.add_argument("--max-examples", type=_positive_int, help="at most N examples per task (the first of each)")
    evaluate.add_argument("--max-batch-size", type=_positive_int, help="cap on examples per batch")
    evaluate.add_argument("--num-beams", type=_positive_int, default=1, help="1: greedy (default)")
    evaluate.add_argument("--max-new-tokens", action="append", default=[], metavar="N|TASK=N",
                          help="generated-token budget for every task (N) or one task (TASK=N), repeatable; default "
                               "per task: 32 for labels, 64 keywords, 96 slots, 128 transcripts/translations/captions")
    evaluate.add_argument("--wer-normalize", metavar="STEPS",
                          help="text normalisation before WER: comma-separated subset of lower,punct,whitespace, or "
                               "none (default: the run's eval.wer_normalize, lower,punct,whitespace)")
    evaluate.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    evaluate.add_argument("--out", type=Path, metavar="DIR",
                          help="directory for report.json, report.md, predictions.jsonl, metrics.png "
                               "(default <run>/eval/<split>-<instructions>)")
    evaluate.set_defaults(run=_eval)

    predict = commands.add_parser("predict", help="answer an instruction about an audio file (or a manifest of them)")
    predict.add_argument("--ckpt", required=True, metavar="CKPT|RUN_DIR|EXPORT_DIR",
                         help="a run directory, a checkpoint in <run>/checkpoints/, or a `speechllm export` directory")
    predict.add_argument("--audio", type=Path, help="one audio file (the answer is printed)")
    predict.add_argument("--instruction", help="the question or instruction about --audio")
    predict.add_argument("--task", help="the task --audio is asked for, picking its token budget (e.g. ic: short)")
    predict.add_argument("--manifest", type=Path,
                         help='JSONL rows {"audio": ..., "instruction": ...} (or "task" to draw an instruction)')
    predict.add_argument("--out", type=Path, help="JSONL of the manifest's rows with their predictions")
    predict.add_argument("--max-new-tokens", type=_positive_int,
                         help="generated-token budget (default: the task's, else 128)")
    predict.add_argument("--num-beams", type=_positive_int, default=1, help="1: greedy (default)")
    predict.add_argument("--batch-size", type=_positive_int, default=8, help="manifest rows answered together")
    predict.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    predict.set_defaults(run=_predict)

    planner = commands.add_parser(
        "plan", help="parameters and per-device GPU memory (DDP, FSDP) of a model, built on the meta device (no weights)")
    planner.add_argument("config", metavar="CONFIG",
                         help="a model preset (a name in configs/model/, e.g. whisper_large_v3_qwen2_7b, or its YAML; "
                              "every group trains) or a stage file (its phases' groups train)")
    planner.add_argument("overrides", nargs="*", help="config overrides, e.g. model.lora.rank=32 presets.model=NAME")
    planner.add_argument("--batch-size", type=_positive_int, default=8, help="examples per device (default 8)")
    planner.add_argument("--seconds", type=float, default=30.0, help="audio per example (default 30)")
    planner.add_argument("--prompt-tokens", type=int, default=48,
                         help="text positions besides audio and target: template, instruction (default 48)")
    planner.add_argument("--target-tokens", type=int, default=96, help="answer positions (default 96)")
    planner.add_argument("--devices", type=_positive_int, default=8, help="GPUs FSDP shards over (default 8)")
    planner.add_argument("--precision", default="bf16-mixed", help="bf16-mixed (default), 16-mixed, bf16-true, 32-true")
    planner.add_argument("--gradient-checkpointing", action="store_true",
                         help="LLM blocks keep only their inputs (also on with model.llm.gradient_checkpointing=true)")
    planner.add_argument("--json", action="store_true", help="machine-readable output (bytes)")
    planner.set_defaults(run=_plan)

    bench = commands.add_parser(
        "bench", help="time stage-1 training steps: breakdown, framework overhead, padding, feature cache, loader, "
                      "memory (README, Benchmarks)")
    bench.add_argument("overrides", nargs="*", help="config overrides on stages/stage1.yaml, e.g. data.num_workers=2")
    bench.add_argument("--out", type=Path, default=Path("bench"), help="results.json, results.md, runs (default bench)")
    bench.add_argument("--steps", type=_positive_int, default=50, help="measured steps per run (default 50)")
    bench.add_argument("--warmup", type=_positive_int, default=5, help="steps left out of the medians (default 5)")
    bench.add_argument("--preset", choices=("tiny", "realistic"), default="tiny",
                       help="tiny (CPU) or realistic: WavLM-Base-size encoder + 0.5B LLM, random, bf16 (GPU)")
    bench.add_argument("--force", action="store_true", help="run --preset realistic without a GPU (a few small steps)")
    bench.add_argument("--threads", type=int,
                       help="torch threads (default: 1 on CPU, steadier on a shared machine; 0: torch's default)")
    bench.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU on GPUs not in the table")
    bench.set_defaults(run=_bench)

    exporter = commands.add_parser("export", help="a self-contained inference directory (SpeechLLM.from_pretrained)")
    exporter.add_argument("--ckpt", required=True, metavar="CKPT|RUN_DIR", help="a run directory or its checkpoint")
    exporter.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write (new or empty)")
    exporter.add_argument("--merge-lora", action="store_true",
                          help="fold the LoRA adapter into the LLM weights and save that LLM instead of the adapter")
    exporter.set_defaults(run=_export)

    data = commands.add_parser("data", help="make and check data").add_subparsers(required=True, metavar="ACTION")
    synth = data.add_parser("synth", help="write the offline synthetic multi-task corpus")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--train-per-task", action="append", default=[], metavar="N|TASK=N",
                       help="train examples of every task (N, default 200) or of one task (TASK=N), repeatable")
    synth.add_argument("--eval-per-task", type=int, default=40)
    synth.add_argument("--tasks", help="comma-separated subset, e.g. asr,kws")
    synth.add_argument("--snr-db", type=float, help="add noise to speech at this SNR")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synth)

    prepare = data.add_parser("prepare", help="turn a public dataset on disk into a manifest")
    prepare.add_argument("dataset", help="librispeech | covost2 | slurp | speech_commands | csv")
    prepare.add_argument("--root", type=Path, required=True, help="the dataset in its usual layout (csv: the file)")
    prepare.add_argument("--out", type=Path, required=True, help="manifest to write")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="converter option, e.g. subset=train-clean-100 (repeatable)")
    prepare.set_defaults(run=_prepare)

    cache = data.add_parser("cache", help="encode the run's train/dev clips into data.feature_cache "
                                          "(speechllm data cache stages/stage1.yaml data.feature_cache=DIR)")
    cache.add_argument("stage", nargs="?", help=f"stage or config file (default {DEFAULT_STAGE})")
    cache.add_argument("overrides", nargs="*", help="config overrides, e.g. data.feature_cache=data/features")
    cache.add_argument("--device", default="auto", help="where the encoder runs: auto (cuda if available), cpu, cuda:1, ...")
    cache.add_argument("--estimate", action="store_true", help="report the clips to encode and their disk size, then stop")
    cache.set_defaults(run=_cache)

    validate = data.add_parser("validate", help="check manifests row by row (exit 1 if any row is bad)")
    validate.add_argument("manifests", nargs="+")
    validate.add_argument("--sample-rate", type=int, default=16000)
    validate.add_argument("--max-duration", type=float, default=30.0)
    validate.add_argument("--allow-missing-duration", action="store_true",
                          help="accept rows without `duration` (training then reads it from each file)")
    validate.add_argument("--task-file", action="append", default=[], help="YAML file registering extra tasks")
    validate.set_defaults(run=_validate)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _user_errors() -> tuple[type[Exception], ...]:
    from speechllm.bench import BenchError
    from speechllm.data.audio import AudioError
    from speechllm.data.manifest import ManifestError
    from speechllm.data.tasks import TaskError
    from speechllm.data.converters import ConverterError
    from speechllm.data.feature_cache import FeatureCacheError
    from speechllm.evaluation.evaluate import EvalError
    from speechllm.inference import PredictError
    from speechllm.model.export import ExportError
    from speechllm.model.pretrained import ModelSourceError
    from speechllm.training.checkpoints import CheckpointError
    from speechllm.training.run import DataError

    return (ConfigError, DataError, ManifestError, TaskError, AudioError, CheckpointError, ModelSourceError, EvalError,
            ConverterError, PredictError, ExportError, FeatureCacheError, BenchError)


if __name__ == "__main__":
    sys.exit(main())
