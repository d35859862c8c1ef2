"""The ``zerostep`` command: ``train``, ``config check``, ``checkpoint inspect|export``."""

from __future__ import annotations

import argparse
import os
import sys

from zerostep.errors import ConfigError


def _train(args: argparse.Namespace) -> int:
    from zerostep.core.train_job import launch_ranks, nproc_problem, train

    if args.nproc < 1:
        print(f"zerostep train: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"zerostep train: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    if args.experts < 0 or args.ep_size < 1:
        print(
            f"zerostep train: --experts must be >= 0 and --ep-size >= 1, got {args.experts}, {args.ep_size}",
            file=sys.stderr,
        )
        return 2
    if args.ep_size > 1 and args.experts == 0:
        print("zerostep train: --ep-size needs --experts N (the MoE variant of the GPT)", file=sys.stderr)
        return 2
    if args.experts and args.experts % args.ep_size:
        print(
            f"zerostep train: --experts {args.experts} is not divisible by --ep-size {args.ep_size}",
            file=sys.stderr,
        )
        return 2
    launching = "LOCAL_RANK" not in os.environ  # torchrun's ranks check the world in the MoE layer
    if launching and (args.ep_size > args.nproc or args.nproc % args.ep_size):
        print(f"zerostep train: --ep-size {args.ep_size} must divide --nproc {args.nproc}", file=sys.stderr)
        return 2
    if args.config and not os.path.exists(args.config):
        print(f"zerostep train: config file not found: {args.config}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        problem = nproc_problem(args.nproc)
        if problem is not None:
            print(f"zerostep train: {problem}", file=sys.stderr)
            return 2
        argv = ["--steps", str(args.steps), "--out", args.out, "--seed", str(args.seed)]
        argv += ["--sample-bytes", str(args.sample_bytes)]
        argv += ["--experts", str(args.experts), "--ep-size", str(args.ep_size)]
        if args.config:
            argv += ["--config", args.config]
        if not args.compile:
            argv.append("--no-compile")
        return launch_ranks(argv, args.nproc)
    try:
        train(
            args.config,
            args.steps,
            args.out,
            seed=args.seed,
            sample_bytes=args.sample_bytes,
            compile=args.compile,
            experts=args.experts,
            ep_size=args.ep_size,
        )
    except ConfigError as e:
        print(f"zerostep train: bad config: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from zerostep.core.train_job import DEFAULT_STEPS

    parser = argparse.ArgumentParser(prog="zerostep", description="DeepSpeed's engine as pure functions.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the small GPT on the stdlib's sources (the main job)")
    train.add_argument("--config", help="a DeepSpeed JSON config (default: built-in)")
    train.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    train.add_argument("--nproc", type=int, default=1, help="ranks to launch via torch.distributed.run")
    train.add_argument("--out", default="runs/train", help="directory for metrics.jsonl and loss.png")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--sample-bytes", type=int, default=200, help="length of the generated sample")
    train.add_argument("--experts", type=int, default=0, help="MoE GPT: experts per block (0: dense)")
    train.add_argument("--ep-size", type=int, default=1, help="MoE GPT: expert-parallel ranks per group")
    train.add_argument(
        "--no-compile", dest="compile", action="store_false", help="run the step eagerly (no torch.compile)"
    )
    train.set_defaults(func=_train)
    for register in _registrars():
        register(sub)
    return parser


def _registrars():
    from zerostep.core.config import cli as config_cli

    found = [config_cli.register]
    try:
        from zerostep.io import cli as io_cli

        found.append(io_cli.register)
    except ImportError:
        pass
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
