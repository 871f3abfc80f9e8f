"""Run a flow model from noise through a schedule, with windows of stochastic steps and of steps that keep grad.

``rollout`` is what every trainer samples with:

* Flow-GRPO: SDE (or CPS) steps, usually in a window (Flow-GRPO-Fast / MixGRPO), everything under no-grad,
  per-step log-probs of the stochastic transitions kept for the PPO ratio;
* DiffusionNFT: ODE steps only, no grad, only the final latents matter;
* ReFL / DRaFT-K: ODE steps under no-grad, then a window of the last K steps that keep the autograd graph
  (optionally with gradient checkpointing per step) so a reward's gradient reaches the model.

The model is anything with ``velocity(x, sigma, cond, guidance_scale) -> v`` (the adapters in
``diffrl.models`` and any user object of that shape; see :class:`VelocityModel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint

from .steps import StepOutput, cps_step, dpm2_step, ode_step, sde_step

__all__ = ["VelocityModel", "RolloutOutput", "rollout", "resolve_window", "SAMPLERS", "SOLVERS"]

SAMPLERS = ("ode", "sde", "cps")
SOLVERS = ("euler", "dpm2")


class VelocityModel(Protocol):
    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, guidance_scale: float = 1.0
    ) -> torch.Tensor: ...


@dataclass
class RolloutOutput:
    """What a rollout produced (float32 throughout)."""

    # (B, T+1, C, h, w) the trajectory, detached; latents[:, 0] is the initial noise (video models: every latent
    # has a frame axis, (B, T+1, C, F', h, w); the log-probs average over it too)
    latents: torch.Tensor
    # (T+1,) the levels, sigmas[k] -> sigmas[k+1] is step k
    sigmas: torch.Tensor
    # (B, T) log-prob of step k's transition (mean over dims); NaN where step k was deterministic
    log_probs: torch.Tensor
    # (T,) bool, True where step k was an SDE/CPS step
    stochastic: torch.Tensor
    # (B, C, h, w) the final latents; carries the autograd graph when the grad window reached the end
    final: torch.Tensor
    # (B, T, C, h, w) each step's transition mean (keep_means=True), else None
    means: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    def stochastic_steps(self) -> torch.Tensor:
        """Indices ``(K,)`` of the stochastic steps."""
        return torch.nonzero(self.stochastic).flatten()


def resolve_window(window, num_steps: int, name: str) -> tuple[int, int]:
    """A step window as ``(start, end)`` with ``0 <= start <= end <= num_steps`` (end exclusive).

    ``None`` means no step, ``"all"`` every step; negative indices count from the end as in Python slices
    (``(-1, None)`` is the last step).
    """
    if window is None:
        return (0, 0)
    if window == "all":
        return (0, num_steps)
    try:
        start, end = window
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}={window!r} is not a window; pass (start, end) step indices, 'all' or None."
        ) from None
    start, end, _ = slice(start, end).indices(num_steps)
    if end < start:
        raise ValueError(
            f"{name}={window!r} is empty for {num_steps} steps; pass (start, end) with start < end."
        )
    return start, end


def rollout(
    model: VelocityModel,
    cond: Any,
    sigmas: torch.Tensor,
    latents: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    sampler: str = "ode",
    solver: str = "euler",
    noise_level: float = 0.7,
    sde_window="all",
    grad_window=None,
    gradient_checkpointing: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    keep_means: bool = False,
) -> RolloutOutput:
    """Sample from ``latents`` (the initial noise at level ``sigmas[0]``) through the ``T + 1`` levels ``sigmas``.

    Args:
        model: object with ``velocity(x, sigma, cond, guidance_scale)``.
        cond: the conditioning for the batch (from ``model.encode(prompts)``).
        sigmas: ``(T+1,)`` decreasing levels ending at 0 (``model.schedule(...)``).
        latents: ``(B, C, h, w)`` initial noise.
        guidance_scale: classifier-free guidance (SD3) or guidance embedding (FLUX.1-dev) scale.
        sampler: ``"ode"`` (deterministic everywhere), ``"sde"`` (Flow-GRPO ODE-to-SDE) or ``"cps"`` in the SDE window.
        solver: the deterministic steps: ``"euler"`` or ``"dpm2"`` (second-order multistep DPM-Solver++, the
            DiffusionNFT reference's: Euler for the first step and the step to 0, :func:`~diffrl.samplers.dpm2_step`
            in between). With ``sampler="sde"``/``"cps"`` it solves only the steps after the SDE window (MixGRPO-
            Flash: its first step uses the data prediction of the window's last step); the steps before the window
            stay Euler steps.
        noise_level: the SDE/CPS noise scale ``a``.
        sde_window: which steps are stochastic when ``sampler != "ode"``: ``"all"``, ``None`` or ``(start, end)``.
        grad_window: which steps keep the autograd graph (``None``: none, ``"all"`` or ``(start, end)``,
            e.g. ``(-1, None)`` for the last step); the other steps run under ``torch.no_grad()``.
        gradient_checkpointing: recompute each grad-window step's model call in the backward pass instead of
            storing its activations.
        generator: random generator for the SDE/CPS noise (drawn step by step, in order), or a list of one
            generator per sample (each sample's noise then does not depend on the batch it is sampled in).
        keep_means: also return every step's transition mean (detached), e.g. for GRPO-Guard's ratio
            normalisation.

    Returns:
        :class:`RolloutOutput` with the detached trajectory, the levels, per-step log-probs and the final latents.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not known; choose one of {SAMPLERS}.")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not known; choose one of {SOLVERS}.")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}; pass the (T+1,) levels of a schedule.")
    if latents.ndim < 2:
        raise ValueError(f"latents has shape {tuple(latents.shape)}; pass (B, C, h, w) initial noise.")
    num_steps = sigmas.numel() - 1
    sde_lo, sde_hi = resolve_window(sde_window if sampler != "ode" else None, num_steps, "sde_window")
    grad_lo, grad_hi = resolve_window(grad_window, num_steps, "grad_window")
    if sampler == "cps" and sde_hi > sde_lo and float(sigmas[sde_hi]) == 0.0:
        raise ValueError(
            f"the CPS step to level 0 is deterministic, but sde_window={sde_window!r} includes the last step; "
            f"end the window before step {num_steps - 1}."
        )

    batch = latents.shape[0]
    x = latents.float()
    trajectory = [x.detach()]
    log_probs = torch.full((batch, num_steps), float("nan"), dtype=torch.float32, device=x.device)
    stochastic = torch.zeros(num_steps, dtype=torch.bool)
    stochastic[sde_lo:sde_hi] = True
    step_fn = sde_step if sampler == "sde" else cps_step
    x0_prev = None  # dpm2: the previous step's data prediction
    means = [] if keep_means else None

    for k in range(num_steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        keeps_grad = grad_lo <= k < grad_hi
        ctx = torch.enable_grad() if keeps_grad else torch.no_grad()
        with ctx:
            s_batch = s.expand(batch)
            if keeps_grad and gradient_checkpointing:
                v = checkpoint(model.velocity, x, s_batch, cond, guidance_scale, use_reentrant=False)
            else:
                v = model.velocity(x, s_batch, cond, guidance_scale)
            if stochastic[k]:
                out: StepOutput = step_fn(x, v, s, s_next, noise_level, generator=generator)
                if out.log_prob is None:  # noise_level 0: the step is the ODE step, deterministic
                    stochastic[k] = False
                else:
                    log_probs[:, k] = out.log_prob if keeps_grad else out.log_prob.detach()
            elif solver == "dpm2" and k >= sde_hi:
                x0_hat = x.float() - s * v.float()
                if 0 < k < num_steps - 1:
                    out = dpm2_step(x, x0_hat, x0_prev, sigmas[k - 1], s, s_next)
                else:  # the first-order step, in the data-prediction form the multistep solver uses
                    out = dpm2_step(x, x0_hat, x0_hat, s, s, s_next)
            else:
                out = ode_step(x, v, s, s_next)
            if solver == "dpm2":  # every step's data prediction, for the next dpm2 step
                x0_prev = x.float() - s * v.float()
        x = out.sample
        trajectory.append(x.detach())
        if means is not None:
            means.append(out.mean.detach())

    return RolloutOutput(
        latents=torch.stack(trajectory, dim=1),
        sigmas=sigmas,
        log_probs=log_probs,
        stochastic=stochastic.to(x.device),
        means=torch.stack(means, dim=1) if means is not None else None,
        final=x,
    )
