"""``python -m diffrl.train CONFIG [key=value ...]`` / ``accelerate launch -m diffrl.train ...`` / ``diffrl train``.

Reads a YAML preset, applies dotted overrides, validates everything before any model is loaded, builds the
trainer named by ``algorithm`` and trains. :func:`build_trainer` is the library part; the command's arguments are
read in :mod:`diffrl.cli.train`.
"""

from __future__ import annotations

import sys

from .config import TrainConfig, load_config

__all__ = ["build_trainer", "TRAINERS"]

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


if (
    __name__ == "__main__"
):  # python -m diffrl.train / accelerate launch -m diffrl.train: the diffrl train command
    from diffrl.cli.train import main

    sys.exit(main())
