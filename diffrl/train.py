"""``python -m diffrl.train CONFIG [key=value ...]`` / ``accelerate launch -m diffrl.train ...`` / ``diffrl train``.

Reads a YAML preset, applies dotted overrides, validates everything before any model is loaded, builds the
trainer named by ``algorithm`` and trains.
"""

from __future__ import annotations

import sys

from .config import ConfigError, TrainConfig, load_config

__all__ = ["build_trainer", "TRAINERS", "main"]

TRAINERS = {
    "flow_grpo": "diffrl.trainers.flow_grpo:FlowGRPOTrainer",
    "diffusion_nft": "diffrl.trainers.diffusion_nft:DiffusionNFTTrainer",
    "refl": "diffrl.trainers.refl:ReFLTrainer",
}


def trainer_class(algorithm: str):
    import importlib

    module, _, name = TRAINERS[algorithm].partition(":")
    return getattr(importlib.import_module(module), name)


def build_trainer(config: TrainConfig | str | dict, overrides: list[str] | None = None, **parts):
    """The trainer for ``config`` (a :class:`TrainConfig`, a YAML path or a dict); ``parts`` may give ``model``,
    ``reward``, ``eval_reward``, ``train_prompts`` and ``eval_prompts`` directly (e.g. from a notebook)."""
    cfg = load_config(config, overrides, given={k for k, v in parts.items() if v is not None})
    return trainer_class(cfg.algorithm)(cfg, **parts)


def main(argv: list[str] | None = None) -> int:
    import argparse

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
    args = parser.parse_args(argv)
    from .trainers.engine import RewardError, TrainingAborted
    from .utils import set_cpu_threads

    try:
        set_cpu_threads(args.threads)
        trainer = build_trainer(args.config, args.overrides)
    except (
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        OSError,  # e.g. a model path that is neither a local pipeline nor a cached hub id
        ValueError,
        ImportError,
        AttributeError,  # a reward named module:attr whose module has no such attribute
        NotImplementedError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except (TrainingAborted, RewardError, OSError) as err:  # one line; the run's checkpoints are on disk
        print(f"error: {err}", file=sys.stderr)
        trainer.accelerator.end_training()
        return 1
    # destroy the process group before the interpreter exits: gloo's worker threads torn down at exit can abort a
    # process that finished ("terminate called without an active exception", seen once in the 2-process CPU tests)
    trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
