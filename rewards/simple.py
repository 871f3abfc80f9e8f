"""Image-statistics rewards: cheap, differentiable, weight-free. Useful to smoke-test a training set-up (a reward
that any model can move) and as regularisers in a combination. ``brightness``: mean luminance (Rec. 601 weights)
in [0, 1]; ``saturation``: mean of ``max(rgb) - min(rgb)`` in [0, 1]."""

from __future__ import annotations

import torch

from .base import Reward

__all__ = ["Brightness", "Saturation"]


class Brightness(Reward):
    name = "brightness"
    differentiable = True

    def score(self, images, prompts, **metadata):
        w = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * w).sum(dim=1).mean(dim=(1, 2))


class Saturation(Reward):
    name = "saturation"
    differentiable = True

    def score(self, images, prompts, **metadata):
        return (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2))
