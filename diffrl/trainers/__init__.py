"""diffrl.trainers: the engine (:mod:`.engine` and its collaborators) and one file per algorithm on top of it.

:func:`build_trainer` (also importable as ``diffrl.train.build_trainer``) builds the trainer a config names; the
algorithm modules are imported only when asked for.
"""

from __future__ import annotations

__all__ = ["TRAINERS", "trainer_class", "build_trainer"]

#: algorithm name -> "module:Class" of its trainer (imported on first use)
TRAINERS = {
    "flow_grpo": "diffrl.trainers.flow_grpo:FlowGRPOTrainer",
    "diffusion_nft": "diffrl.trainers.diffusion_nft:DiffusionNFTTrainer",
    "refl": "diffrl.trainers.refl:ReFLTrainer",
    "awm": "diffrl.trainers.awm:AWMTrainer",
    "dpo": "diffrl.trainers.dpo:DPOTrainer",
}


def trainer_class(algorithm: str):
    """The trainer class of ``algorithm`` (a key of :data:`TRAINERS`)."""
    import importlib

    module, _, name = TRAINERS[algorithm].partition(":")
    return getattr(importlib.import_module(module), name)


def build_trainer(config, overrides: list[str] | None = None, **parts):
    """The trainer for ``config`` (a :class:`~diffrl.config.TrainConfig`, a YAML path or a dict) with dotted
    ``overrides``; ``parts`` may give ``model``, ``reward``, ``eval_reward``, ``train_prompts`` and ``eval_prompts``
    directly (e.g. from a notebook)."""
    from diffrl.config import load_config

    cfg = load_config(config, overrides, given={k for k, v in parts.items() if v is not None})
    return trainer_class(cfg.algorithm)(cfg, **parts)
