"""`speechllm train|eval|data` — one command line, subcommands per job.

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
    from speechllm.training.run import train

    stage, overrides = args.stage, list(args.overrides)
    if stage and "=" in stage:  # `speechllm train key=value` without a stage file
        stage, overrides = DEFAULT_STAGE, [stage] + overrides
    cfg = load_config(stage or DEFAULT_STAGE, overrides)
    run = train(cfg)
    print(f"run saved in {run.run_dir}")
    return 0


def _eval(args) -> int:
    from speechllm.evaluation.evaluate import EvalSettings, evaluate, print_table

    report = evaluate(
        args.run_dir,
        EvalSettings(
            manifests=args.manifests,
            split=args.split,
            heldout_instructions=args.heldout_instructions,
            max_examples=args.max_examples,
            max_batch_size=args.max_batch_size,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            out=args.out,
            device=args.device,
        ),
    )
    print_table(report)
    print(f"report: {report.report_path}\npredictions: {report.predictions_path}\n"
          f"{len(report.predictions)} examples in {report.seconds:.1f}s")
    return 0


def _synth(args) -> int:
    from speechllm.data.synth import SYNTH_TASKS, synthesize_corpus

    tasks = args.tasks.split(",") if args.tasks else SYNTH_TASKS
    summary = synthesize_corpus(
        args.out,
        train_per_task=args.train_per_task,
        eval_per_task=args.eval_per_task,
        tasks=tasks,
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
    evaluate.add_argument("--heldout-instructions", action="store_true",
                          help="phrase instructions with the held-out templates training never saw")
    evaluate.add_argument("--max-examples", type=_positive_int, help="at most N examples per task (the first of each)")
    evaluate.add_argument("--max-batch-size", type=_positive_int, help="cap on examples per batch")
    evaluate.add_argument("--num-beams", type=_positive_int, default=1, help="1: greedy (default)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=128)
    evaluate.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    evaluate.add_argument("--out", type=Path,
                          help="JSON report (default <run>/eval/<split>[-heldout].json); predictions go next to it")
    evaluate.set_defaults(run=_eval)

    data = commands.add_parser("data", help="make and check data").add_subparsers(required=True, metavar="ACTION")
    synth = data.add_parser("synth", help="write the offline synthetic multi-task corpus")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--train-per-task", type=int, default=200)
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
    from speechllm.data.audio import AudioError
    from speechllm.data.manifest import ManifestError
    from speechllm.data.tasks import TaskError
    from speechllm.data.converters import ConverterError
    from speechllm.evaluation.evaluate import EvalError
    from speechllm.model.pretrained import ModelSourceError
    from speechllm.training.checkpoints import CheckpointError
    from speechllm.training.run import DataError

    return (ConfigError, DataError, ManifestError, TaskError, AudioError, CheckpointError, ModelSourceError, EvalError,
            ConverterError)


if __name__ == "__main__":
    sys.exit(main())
