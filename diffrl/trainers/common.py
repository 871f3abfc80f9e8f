"""Names the engine, its collaborators and the trainers share: the run's errors, seeded generators, a step's prompts.

:mod:`diffrl.trainers.engine` re-exports them; this module imports nothing of the trainers, so every other module of
the package can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TrainingAborted", "TrainingStopped", "RewardError", "seeded_generator", "StepBatch"]


class TrainingAborted(RuntimeError):
    """The run stopped before ``max_steps`` (``max_bad_steps`` non-finite steps in a row); its last checkpoint is
    written and ``status.json`` says ``aborted``, but no final LoRA or pipeline is."""


class TrainingStopped(RuntimeError):
    """The run stopped before ``max_steps`` on a signal (SIGTERM or SIGUSR1, :mod:`diffrl.trainers.stopping`): the
    checkpoint of the step it stopped after is written and ``status.json`` says ``stopped``; no final evaluation,
    LoRA or pipeline is written. ``signum`` is the signal this process received (None when another process did)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class RewardError(RuntimeError):
    """A reward raised (or returned what is not one score per image) during training; the message names the reward
    and the step, and the original exception is its ``__cause__``."""


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from integer keys (e.g. seed, step, process, purpose)."""
    seq = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys])
    return torch.Generator(device=device).manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))


@dataclass
class StepBatch:
    """This process's prompts of one step."""

    prompts: list[str]  # (k,) local prompts
    metadata: dict[str, list]  # per-prompt metadata lists
    group_ids: torch.Tensor  # (k,) global index of each prompt within the step's prompt list
