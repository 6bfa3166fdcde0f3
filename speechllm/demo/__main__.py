"""`python -m speechllm.demo [--root runs/demo] [--size full|ci]`: see speechllm/demo/pipeline.py."""

import argparse
from pathlib import Path

from speechllm.demo.pipeline import SIZES, Demo


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m speechllm.demo", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("runs/demo"), help="where everything goes (default runs/demo)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full: `make demo`; ci: the reduced test")
    parser.add_argument("--tasks", default=None, help="comma-separated corpus tasks (default: all eight)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the run without stage 1")
    args = parser.parse_args()
    demo = Demo(args.root, SIZES[args.size], ablation=not args.no_ablation)
    if args.tasks:
        demo.tasks = tuple(t.strip() for t in args.tasks.split(","))
    demo.run()


if __name__ == "__main__":
    main()
