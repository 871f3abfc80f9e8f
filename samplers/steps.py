"""One sampling step of a flow-matching model, as pure functions with per-sample log-probabilities.

Conventions (SD3 / FLUX): ``x_s = (1 - s) x0 + s eps``, the model predicts the velocity ``v = eps - x0``, one step
goes from level ``s`` to ``s_next < s`` with ``dt = s_next - s < 0``.

Every step returns a :class:`StepOutput` with the next sample, the mean and std of the transition, and the
log-probability of the next sample (or of ``prev_sample`` when it is given, so a trainer can recompute the
log-prob of a stored transition under new parameters).

**The log-probability is the mean over the non-batch dimensions** of the element-wise Gaussian log-density,
not the sum. This is the Flow-GRPO reference's convention: with it a policy ratio ``exp(logp - logp_old)`` is
the geometric mean of the per-element ratios, so the PPO clip range (1e-4) and the KL scale stay comparable
across image sizes. Multiply by the number of elements ``C * h * w`` for the true log-density of the whole
latent.

All maths runs in float32 whatever the dtype of ``x`` and ``v`` (which may be bf16/fp16 model outputs); the
returned tensors are float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "StepOutput",
    "ode_step",
    "dpm2_step",
    "sde_step",
    "cps_step",
    "gaussian_log_prob",
    "sde_std",
    "noise_like",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """The result of one sampling step (all float32)."""

    sample: torch.Tensor  # (B, ...) the next sample x_{s_next} (``prev_sample`` when one was given)
    mean: torch.Tensor  # (B, ...) the transition mean
    std: (
        torch.Tensor
    )  # (B, 1, ..., 1) the transition std, broadcastable to ``sample``; zero for a deterministic step
    log_prob: (
        torch.Tensor | None
    )  # (B,) mean over non-batch dims of log N(sample; mean, std); None when std == 0


def _level(s: float | torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """A level as a float32 tensor broadcastable to ``x``: a float, a 0-d tensor or a ``(B,)`` tensor."""
    t = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        return t.reshape((1,) * x.ndim)
    if t.ndim == 1 and t.shape[0] == x.shape[0]:
        return t.reshape((-1,) + (1,) * (x.ndim - 1))
    raise ValueError(
        f"{name} has shape {tuple(t.shape)}; pass a float or a ({x.shape[0]},) tensor, one level per sample."
    )


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(B,)`` mean over non-batch dims of the element-wise log-density of ``N(mean, std^2)``."""
    sample, mean, std = sample.float(), mean.float(), std.float()
    lp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def noise_like(x: torch.Tensor, noise, generator) -> torch.Tensor:
    """Standard normal noise of ``x``'s shape, float32: ``noise`` itself when given (shape-checked), else drawn with
    ``generator`` (one generator, or a list of one per sample so a sample's noise does not depend on its batch)."""
    if noise is not None:
        if noise.shape != x.shape:
            raise ValueError(
                f"noise has shape {tuple(noise.shape)} but the sample has {tuple(x.shape)}; give noise of the sample's shape."
            )
        return noise.to(device=x.device, dtype=torch.float32)
    if isinstance(generator, (list, tuple)):
        # one generator per sample: a sample's noise then never depends on the batch it is drawn in
        if len(generator) != x.shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample."
            )
        rows = [
            torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator
        ]
        return torch.stack(rows).to(x.device)
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device)


def _finish(mean, std, noise, prev_sample, generator, x) -> StepOutput:
    if prev_sample is not None:
        if prev_sample.shape != x.shape:
            raise ValueError(
                f"prev_sample has shape {tuple(prev_sample.shape)} but the sample has {tuple(x.shape)}; "
                "pass the stored next sample of this transition."
            )
        sample = prev_sample.float()
    else:
        sample = mean + std * noise_like(x, noise, generator)
    deterministic = bool((std == 0).any())
    log_prob = None if deterministic else gaussian_log_prob(sample.detach(), mean, std)
    return StepOutput(sample=sample, mean=mean, std=std, log_prob=log_prob)


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> StepOutput:
    """The Euler step ``x_next = x + (s_next - s) * v``; deterministic, so ``std = 0`` and ``log_prob = None``
    (the transition is a point mass with no density)."""
    xf, vf = x.float(), v.float()
    s, s_next = _level(sigma, xf, "sigma"), _level(sigma_next, xf, "sigma_next")
    mean = xf + (s_next - s) * vf
    std = torch.zeros_like(s.expand(xf.shape[:1] + s.shape[1:]))
    return StepOutput(sample=mean, mean=mean, std=std, log_prob=None)


def dpm2_step(
    x: torch.Tensor, x0_hat: torch.Tensor, x0_hat_prev: torch.Tensor, sigma_prev, sigma, sigma_next
) -> StepOutput:
    """One second-order multistep DPM-Solver++ (2M) step for flow matching, deterministic.

    With ``alpha = 1 - s`` and ``lambda(s) = log((1 - s) / s)``, the data predictions ``D0 = x0_hat`` (at ``s``) and
    ``x0_hat_prev`` (at the previous level ``s_prev``), ``h = lambda(s_next) - lambda(s)``, ``r = (lambda(s) -
    lambda(s_prev)) / h`` and ``D1 = (D0 - x0_hat_prev) / r``:

        x_next = (s_next / s) x - (1 - s_next) (exp(-h) - 1) (D0 + D1 / 2).

    The coefficients are computed in float64 from the levels (as diffusers' scheduler and the DiffusionNFT reference
    do), the result in float32. ``s`` lies in (0, 1] and ``s_next`` in [0, s); ``s_prev = 1`` gives ``lambda = -inf``,
    ``D1 = 0``: a first-order step. ``s_prev == s`` (no previous prediction) takes the first-order step in its DDIM
    form, ``x_next = (1 - s_next) x0_hat + s_next eps_hat`` with ``eps_hat = (x - (1 - s) x0_hat) / s`` (the Euler step,
    rounded as the reference's solver rounds it); at ``s_next = 0`` it returns ``x0_hat``. ``std`` is 0, ``log_prob``
    None.
    """
    xf = x.float()
    lv = [torch.as_tensor(v, dtype=torch.float64).reshape(()) for v in (sigma_prev, sigma, sigma_next)]
    sp, s0, st = lv
    if float(st) == 0.0:
        mean = x0_hat.float()
    elif float(sp) == float(s0):  # first order (DDIM): x_next = (1 - s_next) x0_hat + s_next eps_hat
        d0 = x0_hat.float()
        eps_hat = (xf - (1 - s0).to(xf.device) * d0) / s0.to(xf.device)
        mean = ((1 - st).to(xf.device) * d0 + st.to(xf.device) * eps_hat).float()
    else:
        lam = [torch.log(1 - v) - torch.log(v) for v in lv]
        h = lam[2] - lam[1]
        r = (lam[1] - lam[0]) / h
        c_x = (st / s0).to(device=xf.device)
        c_d = ((1 - st) * (torch.exp(-h) - 1.0)).to(device=xf.device)
        d0 = x0_hat.float()
        d1 = (1.0 / r).to(device=xf.device) * (d0 - x0_hat_prev.float())
        mean = c_x * xf - c_d * d0 - 0.5 * c_d * d1
        mean = mean.float()
    std = torch.zeros((xf.shape[0],) + (1,) * (xf.ndim - 1), dtype=torch.float32, device=xf.device)
    return StepOutput(sample=mean, mean=mean, std=std, log_prob=None)


def sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level) -> tuple[torch.Tensor, torch.Tensor]:
    """The Flow-GRPO diffusion coefficient ``sigma_t = a * sqrt(s / (1 - s))`` and the step std ``sigma_t * sqrt(-dt)``,
    for float32 level tensors of any broadcastable shapes.

    At ``s = 1`` the denominator uses ``s_next`` instead of ``s`` (as the reference code does) to stay finite.
    """
    denom = 1 - torch.where(sigma >= 1, sigma_next, sigma)
    sigma_t = noise_level * torch.sqrt(sigma / denom)
    return sigma_t, sigma_t * torch.sqrt(sigma - sigma_next)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level=0.7,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """The Flow-GRPO ODE-to-SDE step (same marginals as the probability-flow ODE).

    ``sigma_t = a * sqrt(s / (1 - s))``, ``mean = x + dt * (v + sigma_t^2 / (2 s) * (x + (1 - s) v))``,
    ``x_next = mean + sigma_t * sqrt(-dt) * z``. With ``noise_level = 0`` it is exactly :func:`ode_step`
    (``log_prob`` is then None).

    Args:
        x: current sample ``(B, ...)`` at level ``sigma``.
        v: model velocity at ``(x, sigma)``, same shape.
        sigma, sigma_next: levels (floats or ``(B,)`` tensors), ``sigma_next < sigma``.
        noise_level: the noise scale ``a`` (reference default 0.7); a float or ``(B,)`` tensor.
        noise: standard normal noise ``z`` to use (drawn with ``generator`` otherwise).
        prev_sample: a stored next sample whose log-prob to compute; no noise is drawn then.
        generator: random generator for ``z``, or a list of one generator per sample.

    Returns:
        :class:`StepOutput`; ``log_prob`` is the per-sample mean over non-batch dims (see the module docstring).
    """
    xf, vf = x.float(), v.float()
    s, s_next = _level(sigma, xf, "sigma"), _level(sigma_next, xf, "sigma_next")
    sigma_t, std = sde_std(s, s_next, _level(noise_level, xf, "noise_level"))
    dt = s_next - s
    # x + dt (v + sigma_t^2 / (2 s) (x + (1 - s) v)), grouped as the Flow-GRPO reference groups it, so that its
    # float32 rounding (and so a stored trajectory's log-probs) agree with the reference code's to the last bits
    mean = xf * (1 + sigma_t**2 / (2 * s) * dt) + vf * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
    std = std.expand(xf.shape[:1] + std.shape[1:])
    return _finish(mean, std, noise, prev_sample, generator, xf)


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level=0.7,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """The coefficients-preserving sampling (CPS) step.

    ``x0_hat = x - s v``, ``x1_hat = x + (1 - s) v``, ``std = s_next * sin(a * pi / 2)``,
    ``mean = (1 - s_next) x0_hat + sqrt(s_next^2 - std^2) x1_hat``, ``x_next = mean + std * z``: the next sample
    keeps exactly the noise coefficient ``s_next`` of the forward process. The step to ``s_next = 0`` is
    deterministic (``log_prob`` None).

    Unlike the Flow-GRPO reference, whose CPS log-prob drops the Gaussian normalisation (it keeps only
    ``-(x_next - mean)^2``), ``log_prob`` here is the full Gaussian log-density, averaged over non-batch dims,
    the same convention as :func:`sde_step`. Arguments as for :func:`sde_step`.
    """
    xf, vf = x.float(), v.float()
    s, s_next = _level(sigma, xf, "sigma"), _level(sigma_next, xf, "sigma_next")
    a = _level(noise_level, xf, "noise_level")
    std = s_next * torch.sin(a * math.pi / 2)
    x0_hat = xf - s * vf
    x1_hat = xf + (1 - s) * vf
    mean = (1 - s_next) * x0_hat + torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0)) * x1_hat
    std = std.expand(xf.shape[:1] + std.shape[1:])
    return _finish(mean, std, noise, prev_sample, generator, xf)
