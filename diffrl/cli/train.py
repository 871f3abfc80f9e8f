"""``diffrl train CONFIG [key=value ...]``, also ``python -m diffrl.train`` and ``accelerate launch -m diffrl.train``:
read the arguments, build the trainer (:func:`diffrl.trainers.build_trainer`) and train."""

from __future__ import annotations

import argparse

from .errors import CommandErrors

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl train", description="Train with a YAML config and key=value overrides."
    )
    parser.add_argument("config", help="YAML preset, e.g. configs/tiny/flow_grpo.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4 max_steps=20"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 without a GPU unless OMP_NUM_THREADS is set; see diffrl.utils.set_cpu_threads)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffrl.trainers import build_trainer
    from diffrl.utils import set_cpu_threads

    with CommandErrors() as errors:
        set_cpu_threads(args.threads)
        trainer = build_trainer(args.config, args.overrides)
        # a failure from here on is the run's (exit 1; its checkpoints are on disk), reported before the process
        # group ends
        errors.started(cleanup=trainer.accelerator.end_training)
        trainer.train()
        # destroy the process group before the interpreter exits: gloo's worker threads torn down at exit can abort
        # a process that finished ("terminate called without an active exception", seen once in the 2-process CPU
        # tests)
        trainer.accelerator.end_training()
    return errors.code
