"""``diffrl demo [key=value ...] [--config PRESET] [--pictures N] [--threads N]``: the embedded toy-world demo
(:func:`diffrl.demo.run_demo`)."""

from __future__ import annotations

import argparse

from .errors import CommandErrors

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from diffrl.demo import DEFAULT_CONFIG

    parser = argparse.ArgumentParser(
        prog="diffrl demo",
        description="Fine-tune the toy-world model on a CPU (about 10 minutes) and draw before/after pictures.",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=10 output_dir=runs/x"
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="toy preset (default: %(default)s)")
    parser.add_argument("--pictures", type=int, default=8, help="held-out prompts in before_after.png")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 without a GPU, see run_demo)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffrl.demo import run_demo

    with CommandErrors(prefix="diffrl demo") as errors:
        run_demo(args.overrides, config=args.config, n_pictures=args.pictures, threads=args.threads)
    return errors.code
