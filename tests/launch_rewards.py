"""Rewards the multi-process tests name in their configs (``tests.launch_rewards:NAME``): the launched processes
import this module by name, so it imports nothing from the test modules."""

import os

import torch

from diffrl.rewards import as_reward


def gated_saturation(images, prompts, **metadata):
    """Saturation for prompts of odd length, a constant for the others: those groups have zero reward std.

    Used by the Flow-GRPO and DiffusionNFT runs so that ``sample/zero_std_frac`` is neither 0 nor 1 (the first
    two steps of the tiny presets draw one prompt of each kind) and the process holding the constant group
    drops all its samples under ``flow_grpo.dynamic_sampling``.
    """
    sat = (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2)).float()
    odd = torch.tensor([len(p) % 2 == 1 for p in prompts], device=sat.device)
    return torch.where(odd, sat, torch.full_like(sat, 0.5))


_CALLS = 0


def _nan_on_rank1_first_call(images, prompts, **metadata):
    """Brightness, but NaN for the first call on the second process only (a local non-finite reward)."""
    global _CALLS
    _CALLS += 1
    out = images.mean(dim=(1, 2, 3))
    if os.environ.get("RANK", "0") == "1" and _CALLS == 1:
        return out * float("nan")
    return out


def _nan_grad(images, prompts, **metadata):  # value 0, gradient of sqrt at 0: non-finite
    return (images - images.detach()).abs().sqrt().mean(dim=(1, 2, 3))


nan_on_rank1_first_call = as_reward(_nan_on_rank1_first_call, name="nan_once", differentiable=True)
nan_grad_reward = as_reward(_nan_grad, name="nan_grad", differentiable=True)


def raises_reward(images, prompts, **metadata):
    """A reward with a bug: it raises (tests/test_checkpoints.py checks the one-line error)."""
    return {"missing": 1}["key"]
