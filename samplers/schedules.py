"""Noise-level schedules of flow-matching models, equal to diffusers' ``FlowMatchEulerDiscreteScheduler``.

A schedule is a float32 tensor of ``T + 1`` levels ``s_0 > s_1 > ... > s_T = 0``; step ``k`` goes from
``s_k`` to ``s_{k+1}``, and the transformer sees the timestep ``1000 * s``.

Two shifting rules cover the supported families:

* SD3 / SD3.5 use a *static* shift ``s' = shift * s / (1 + (shift - 1) * s)`` (``shift = 3.0``) applied to
  levels spaced evenly in timestep between the scheduler's largest and smallest training level (this is how
  diffusers computes them, including the smallest level being shifted twice).
* FLUX.1 uses a *resolution-dependent* shift ``mu`` from the number of image tokens (``calculate_shift``) and
  the time shift ``exp(mu) / (exp(mu) + (1 / s - 1))`` on ``linspace(1, 1 / T, T)``.

The arithmetic mirrors diffusers' (float64 numpy where diffusers uses it, float32 where it casts), so the
levels match bit for bit; ``tests/test_schedules.py`` checks that against the real scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "calculate_shift",
    "time_shift",
    "static_shift",
    "flow_match_sigmas",
    "sigmas_from_scheduler_config",
]


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent shift ``mu``: linear in the image token count, ``base_shift`` at ``base_seq_len``
    tokens and ``max_shift`` at ``max_seq_len`` tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, t: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """The dynamic time shift, ``exp(mu) / (exp(mu) + (1/t - 1))`` (or ``mu / (mu + (1/t - 1))`` when linear)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** 1.0)
    raise ValueError(f"time_shift kind={kind!r} is not supported; use 'exponential' or 'linear'.")


def static_shift(shift: float, s):
    """The static shift of SD3: ``shift * s / (1 + (shift - 1) * s)``."""
    return shift * s / (1 + (shift - 1) * s)


def _train_level_range(shift: float, dynamic: bool, num_train_timesteps: int) -> tuple[float, float]:
    # The scheduler's constructor: levels t/N for t = N..1 in float32, statically shifted unless dynamic.
    ends = torch.tensor([float(num_train_timesteps), 1.0], dtype=torch.float32) / num_train_timesteps
    if not dynamic:
        ends = static_shift(shift, ends)
    return ends[0].item(), ends[1].item()


def flow_match_sigmas(
    num_steps: int,
    *,
    shift: float = 1.0,
    mu: float | None = None,
    base_sigmas: np.ndarray | list[float] | None = None,
    time_shift_type: str = "exponential",
    num_train_timesteps: int = 1000,
    shift_terminal: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``T + 1`` float32 levels (ending in 0) of a flow-matching Euler schedule.

    Args:
        num_steps: number of sampling steps ``T`` (>= 1).
        shift: static shift (SD3.5: 3.0); ignored when ``mu`` is given.
        mu: dynamic (resolution-dependent) shift; when given, the static shift is not applied.
        base_sigmas: the unshifted levels to start from (FLUX passes ``linspace(1, 1/T, T)``); by default
            levels evenly spaced in timestep between the scheduler's largest and smallest training level.
        time_shift_type: ``"exponential"`` (FLUX) or ``"linear"`` dynamic shift.
        num_train_timesteps: the scheduler's training timestep count (1000).
        shift_terminal: when set (Qwen-Image: 0.02), the shifted levels are stretched so that the last one before
            0 equals it: ``1 - (1 - s) / ((1 - s_last) / (1 - shift_terminal))``.
        device: where to put the result.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(
            f"num_steps={num_steps!r} must be a positive integer; pass the number of sampling steps."
        )
    dynamic = mu is not None
    if base_sigmas is None:
        s_max, s_min = _train_level_range(shift, dynamic, num_train_timesteps)
        sig = (
            np.linspace(s_max * num_train_timesteps, s_min * num_train_timesteps, num_steps)
            / num_train_timesteps
        )
    else:
        sig = np.array(base_sigmas).astype(np.float32)
        if sig.shape != (num_steps,):
            raise ValueError(
                f"base_sigmas has {sig.shape} levels but num_steps={num_steps}; give one level per step."
            )
    sig = time_shift(mu, sig, time_shift_type) if dynamic else static_shift(shift, sig)
    if shift_terminal:
        one_minus = 1 - sig
        sig = 1 - (one_minus / (one_minus[-1] / (1 - shift_terminal)))
    out = torch.from_numpy(np.asarray(sig)).to(dtype=torch.float32, device=device)
    return torch.cat([out, torch.zeros(1, dtype=torch.float32, device=out.device)])


_UNSUPPORTED_OPTIONS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def sigmas_from_scheduler_config(
    config: Mapping[str, Any],
    num_steps: int,
    *,
    image_seq_len: int | None = None,
    flux_base_sigmas: bool = False,
    base_sigmas: list[float] | np.ndarray | None = None,
    mu: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The levels a diffusers pipeline would use, from its ``FlowMatchEulerDiscreteScheduler`` config.

    Args:
        config: the scheduler's config (``pipe.scheduler.config`` or the parsed ``scheduler_config.json``).
        num_steps: number of sampling steps.
        image_seq_len: number of image tokens; needed when the scheduler uses dynamic shifting.
        flux_base_sigmas: start from ``linspace(1, 1/T, T)`` as ``FluxPipeline`` does (instead of the
            scheduler's own spacing, as ``StableDiffusion3Pipeline`` does).
        base_sigmas: the ``T`` unshifted levels a pipeline passes itself (Z-Image and FLUX.2 pass
            ``torch.linspace(1, 1/T, T).tolist()`` or ``np.linspace(1, 1/T, T)``); overrides ``flux_base_sigmas``.
        mu: the dynamic shift a pipeline computes itself (FLUX.2's empirical ``mu`` from the token count and the
            step count) instead of ``calculate_shift``; used only when the scheduler shifts dynamically.
        device: where to put the result.
    """
    for opt in _UNSUPPORTED_OPTIONS:
        if config.get(opt):
            raise NotImplementedError(
                f"scheduler option {opt}={config.get(opt)!r} is not supported by diffrl's samplers; "
                "use a FlowMatchEulerDiscreteScheduler config without it."
            )
    n_train = int(config.get("num_train_timesteps", 1000))
    given_mu, mu = mu, None
    if config.get("use_dynamic_shifting", False) and given_mu is not None:
        mu = float(given_mu)
    elif config.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError(
                "this scheduler shifts by resolution: pass image_seq_len (the number of image tokens)."
            )
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    base = np.linspace(1.0, 1 / num_steps, num_steps) if flux_base_sigmas else None
    if base_sigmas is not None:
        base = base_sigmas
    return flow_match_sigmas(
        num_steps,
        shift=float(config.get("shift", 1.0)),
        mu=mu,
        base_sigmas=base,
        time_shift_type=config.get("time_shift_type", "exponential"),
        num_train_timesteps=n_train,
        shift_terminal=config.get("shift_terminal"),
        device=device,
    )
