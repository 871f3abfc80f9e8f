"""SA-Solver for flow matching: stochastic Adams predictor-corrector rollouts (Xue et al., arXiv 2309.05019).

The AWM reference samples its GenEval and OCR rollouts with SA-Solver (``use_sa_solver``: predictor and corrector of
order 2, PEC mode, stochastic only where the level lies in [0.3, 0.9]); this module is diffrl's implementation of that
sampler, in the data-prediction form the paper recommends.

With ``alpha_t = 1 - t``, ``sigma_t = t``, the half log-SNR ``lambda_t = log((1 - t) / t)`` and the model's data
prediction ``x0(x, t) = x - t v(x, t)``, one step from level ``s`` to ``t < s`` with stochasticity ``tau`` reads,
for ``c = 1 + tau^2`` and ``h = lambda_t - lambda_s``:

    x_t = (t / s) e^{-tau^2 h} x_s  +  alpha_t c sum_j w_j x0_j  +  t sqrt(1 - e^{-2 tau^2 h}) z,      z ~ N(0, I)

    w_j = int_{-h}^{0} e^{c u} l_j(u) du

where ``x0_j`` are data predictions at the levels ``lambda_j`` and ``l_j`` their Lagrange basis polynomials in
``u = lambda - lambda_t``. ``tau = 0`` is the deterministic (DPM-Solver++-type) multistep ODE solver, whose first
order is the Euler step; ``tau = 1`` follows the reverse-time SDE. The **predictor** (stochastic Adams-Bashforth)
uses the ``p`` latest predictions (at ``s`` and before); the model is then evaluated once at the predicted point
(``x0_t``), and the **corrector** (stochastic Adams-Moulton, PEC mode: the corrected point is not evaluated again)
redoes the step from ``x_s`` with ``x0_t`` and the ``q - 1`` latest older predictions, with the same ``z``. So a
rollout of ``T`` levels costs ``T`` model calls, as the Euler ODE does.

The schedule of the reference's sampler, kept here:

* order 2 adds the "few steps" term of the paper's appendix D to both updates: the weight of the divided
  difference ``(x0_0 - x0_1) / (lambda_0 - lambda_1)`` of the two newest predictions grows by
  ``h^2 / 2 - (c h - 1 + e^{-c h}) / c^2`` (for the predictor this makes it ``h^2 / 2``);
* warm-up: step ``k`` (``1 <= k``, to level ``t_k``) uses predictor order ``min(p, k)`` and corrector order
  ``min(q, k + 1)`` while ``k < max(p, q - 1)``, then ``min(p, T - k + 1)`` and ``min(q, T - k + 2)`` (lower orders
  at the end); the first step has no corrector when it is a warm-up step (``max(p, q - 1) > 1``);
* the last step, to level 0, returns the data prediction of the last model call (no update, no noise), and
  ``tau`` of a step is taken at its target level ``t_k``.

The reference also moves the first level from 1 to ``1 - 1e-3`` (``lambda`` is ``-inf`` at 1) and the last level
before 0 to half the one before it; :func:`sa_solver_levels` makes these two changes to a schedule. The
coefficients are computed in float64 from the levels, the samples in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .rollout import RolloutOutput, VelocityModel
from .steps import noise_like

__all__ = ["sa_solver_levels", "sa_solver_rollout", "sa_solver_weights"]

_MAX_ORDER = 4


def sa_solver_levels(sigmas: torch.Tensor, first: float = 1 - 1e-3) -> torch.Tensor:
    """The reference's SA-Solver grid made from a schedule ``sigmas`` (``(T+1,)``, decreasing, ending at 0): the
    first level lowered to ``first`` when it is above it, and the last level before 0 set to half the one before
    it (for ``T >= 2``). Float32."""
    t = torch.as_tensor(sigmas, dtype=torch.float32).clone()
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"sigmas has shape {tuple(t.shape)}; pass the (T+1,) levels of a schedule.")
    if t.numel() >= 3:
        t[-2] = t[-3] / 2
    t[0] = min(float(t[0]), first)
    return t


def _half_log_snr(t: float) -> float:
    return math.log1p(-t) - math.log(t)


def _exp_moments(c: float, h: float, n: int) -> list[float]:
    """``I_k = int_{-h}^{0} e^{c u} u^k du`` for ``k < n`` (closed form, by parts: ``I_k = -(e^{-c h} (-h)^k + k
    I_{k-1}) / c``)."""
    e = math.exp(-c * h)
    moments = [(1 - e) / c]
    for k in range(1, n):
        moments.append(-(e * (-h) ** k + k * moments[-1]) / c)
    return moments


def sa_solver_weights(lambdas: list[float], lambda_s: float, lambda_t: float, tau: float) -> list[float]:
    """The weights ``c w_j`` of the data predictions at the half log-SNRs ``lambdas`` (newest first) in one step from
    ``lambda_s`` to ``lambda_t``, including the order-2 "few steps" term; the update adds ``alpha_t sum_j weights[j]
    x0_j``."""
    order = len(lambdas)
    if not 1 <= order <= _MAX_ORDER:
        raise ValueError(f"{order} data predictions given; SA-Solver's orders run from 1 to {_MAX_ORDER}.")
    c = 1 + tau**2
    h = lambda_t - lambda_s
    moments = np.asarray(_exp_moments(c, h, order))
    nodes = np.asarray(lambdas, dtype=np.float64) - lambda_t
    weights = []
    for j in range(order):
        others = np.delete(nodes, j)
        poly = np.atleast_1d(np.poly(others)) / np.prod(nodes[j] - others)  # l_j(u), highest power first
        weights.append(float(poly[::-1] @ moments))
    if order == 2:  # appendix D: the divided difference's weight gets h^2/2 - (c h - 1 + e^{-c h}) / c^2
        extra = (h * h / 2 - (c * h - 1 + math.exp(-c * h)) / c**2) / (lambdas[0] - lambdas[1])
        weights[0] += extra
        weights[1] -= extra
    return [c * w for w in weights]


def _as_tau(tau) -> Callable[[float], float]:
    if callable(tau):
        return tau
    value = float(tau)
    if value < 0:
        raise ValueError(f"tau={value} is negative; the stochasticity must be 0 or more.")
    return lambda t: value


def sa_solver_rollout(
    model: VelocityModel,
    cond: Any,
    sigmas: torch.Tensor,
    latents: torch.Tensor,
    *,
    tau: float | Callable[[float], float] = 0.0,
    guidance_scale: float = 1.0,
    predictor_order: int = 2,
    corrector_order: int = 2,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> RolloutOutput:
    """Sample from ``latents`` (the noise, taken to be at level ``sigmas[0]``) with SA-Solver in PEC mode, under
    no-grad (the result carries no autograd graph).

    Args:
        model: object with ``velocity(x, sigma, cond, guidance_scale)``.
        cond: the conditioning for the batch.
        sigmas: ``(T+1,)`` decreasing levels in ``(0, 1)`` ending at 0 (e.g. ``sa_solver_levels(model.schedule(...))``).
        latents: ``(B, ...)`` initial noise.
        tau: the stochasticity, a float or a function of the step's target level (the reference: ``0.7 if 0.3 <= t
            <= 0.9 else 0``); 0 everywhere is a deterministic multistep ODE solver.
        guidance_scale: passed to ``model.velocity``.
        predictor_order, corrector_order: 1 to 4, and 0 to 4 (0: no corrector); the reference's 2 and 2.
        generator: generator of the noise ``z`` (drawn for the stochastic steps only, in order), or a list of one
            generator per sample.

    Returns:
        :class:`~diffrl.samplers.RolloutOutput`: the trajectory (its last entry the final data prediction), the levels,
        ``stochastic`` True for the steps with ``tau > 0`` and NaN log-probs (SA-Solver gives none).
    """
    levels = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
    if levels.ndim != 1 or levels.numel() < 3:
        raise ValueError(
            f"sigmas has shape {tuple(levels.shape)}; pass the (T+1,) levels of a schedule, T >= 2."
        )
    t = [float(v) for v in levels.double().cpu()]
    num_steps = len(t) - 1
    if not (t[-1] == 0.0 and 0 < t[-2] and t[0] < 1 and all(a > b for a, b in zip(t, t[1:], strict=False))):
        raise ValueError(
            f"sigmas {[round(v, 4) for v in t]} must decrease from below 1 to 0 (lambda is infinite at 1); "
            "make them with sa_solver_levels(schedule)."
        )
    if predictor_order not in range(1, _MAX_ORDER + 1) or corrector_order not in range(0, _MAX_ORDER + 1):
        raise ValueError(
            f"predictor_order={predictor_order}, corrector_order={corrector_order}: SA-Solver takes a predictor "
            f"order from 1 to {_MAX_ORDER} and a corrector order from 0 to {_MAX_ORDER}."
        )
    tau_of = _as_tau(tau)
    warm = max(predictor_order, corrector_order - 1)
    if num_steps < warm:
        raise ValueError(
            f"{num_steps} steps are too few for predictor order {predictor_order} and corrector order "
            f"{corrector_order}; use at least {warm} steps or lower the orders."
        )
    batch = latents.shape[0]
    lam = [_half_log_snr(v) if 0 < v < 1 else float("nan") for v in t]

    def data_prediction(x, k):
        v = model.velocity(x, levels[k].expand(batch), cond, guidance_scale)
        return x - t[k] * v.float()

    def update(x, k, history, tau_k, z):
        """One step from level t[k-1] to t[k] with the predictions ``history`` ((level index, x0), newest first)."""
        weights = sa_solver_weights([lam[i] for i, _ in history], lam[k - 1], lam[k], tau_k)
        h = lam[k] - lam[k - 1]
        out = (t[k] / t[k - 1]) * math.exp(-(tau_k**2) * h) * x
        for w, (_, x0) in zip(weights, history, strict=True):
            out = out + ((1 - t[k]) * w) * x0
        if z is not None:
            out = out + (t[k] * math.sqrt(-math.expm1(-2 * tau_k**2 * h))) * z
        return out

    x = latents.float()
    trajectory = [x]
    stochastic = torch.zeros(num_steps, dtype=torch.bool)
    with torch.no_grad():
        history = [(0, data_prediction(x, 0))]  # newest first
        for k in range(1, num_steps):
            tau_k = float(tau_of(t[k]))
            if tau_k < 0:
                raise ValueError(
                    f"tau({t[k]:.4g}) = {tau_k} is negative; the stochasticity must be 0 or more."
                )
            z = noise_like(x, None, generator) if tau_k > 0 else None
            stochastic[k - 1] = tau_k > 0
            if k < warm:
                p, q = min(predictor_order, k), min(corrector_order, k + 1)
            else:
                p, q = min(predictor_order, num_steps - k + 1), min(corrector_order, num_steps - k + 2)
            x_pred = update(x, k, history[:p], tau_k, z)
            x0_new = data_prediction(x_pred, k)
            if q > 0 and not (k == 1 < warm):  # PEC: correct with the new prediction, no second model call
                x = update(x, k, [(k, x0_new)] + history[: q - 1], tau_k, z)
            else:
                x = x_pred
            history = ([(k, x0_new)] + history)[:warm]
            trajectory.append(x)
        final = history[0][1]  # the last step, to level 0: the data prediction of the last model call
        trajectory.append(final)

    return RolloutOutput(
        latents=torch.stack(trajectory, dim=1),
        sigmas=levels,
        log_probs=torch.full((batch, num_steps), float("nan"), dtype=torch.float32, device=x.device),
        stochastic=stochastic.to(x.device),
        final=final,
    )
