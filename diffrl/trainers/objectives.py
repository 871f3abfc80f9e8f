"""The numerics every trainer shares, as tested pure functions (float32 whatever the model dtype).

* :func:`group_advantages`: Flow-GRPO / DiffusionNFT group-relative advantages.
* :func:`text_group_ids`: group ids from prompt texts (the reference codes' per-prompt groups).
* :func:`max_variance_subset`: PODS's max-variance down-sampling of a group's rollouts (Xu, Savani, Fang, Kolter,
  arXiv 2504.13818).
* :func:`group_win_rates`, :func:`winrate_advantages`: Pref-GRPO's advantages from win rates within each group
  (Wang et al., arXiv 2508.20751).
* :func:`ppo_clip_loss`: the PPO clipped surrogate with asymmetric clip ("clip-higher") and a trajectory-level
  ratio (GSPO-style) option.
* :func:`guard_log_ratio`, :func:`guard_step_weight`, :func:`grpo_guard_loss`: GRPO-Guard's normalised ratio and
  per-step gradient weight (Wang et al., arXiv 2510.22319).
* :func:`gaussian_kl`: the per-step KL between two Gaussians with the same std, in the samplers' log-prob
  convention (mean over dimensions); :func:`flow_grpo_reference_kl`: the Flow-GRPO reference code's scaling of it.
* :func:`nft_optimality`, :func:`nft_loss`, :func:`nft_old_policy_decay`: DiffusionNFT.
* :func:`refl_loss`: ReFL's hinge (or linear) loss on a differentiable reward.
* :func:`denoising_loss`: the rectified-flow (pre-training) loss, ReFL's optional regulariser.
* :func:`awm_weights`, :func:`awm_matching_loss`, :func:`awm_loss`, :func:`awm_clipped_loss`,
  :func:`awm_sample_clipped_loss`: Advantage Weighted Matching.
* :func:`flow_dpo_loss`, :func:`preference_pairs`: Diffusion-DPO on the flow-matching error (Wallace et al., arXiv
  2311.12908; Flow-DPO of arXiv 2501.13918) and the online pairs from rewards within each group.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

__all__ = [
    "Advantages",
    "PPOStats",
    "group_advantages",
    "max_variance_subset",
    "text_group_ids",
    "group_win_rates",
    "winrate_advantages",
    "ppo_clip_loss",
    "guard_log_ratio",
    "guard_step_weight",
    "grpo_guard_loss",
    "gaussian_kl",
    "flow_grpo_reference_kl",
    "nft_optimality",
    "nft_loss",
    "nft_old_policy_decay",
    "refl_loss",
    "denoising_loss",
    "awm_weights",
    "awm_matching_loss",
    "awm_clipped_loss",
    "awm_sample_clipped_loss",
    "awm_loss",
    "DPOStats",
    "flow_dpo_loss",
    "preference_pairs",
]


@dataclass
class Advantages:
    values: torch.Tensor  # (B,) clipped advantages
    zero_std: torch.Tensor  # (B,) bool, True where the sample's group had identical rewards (no signal)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std: str = "global",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> Advantages:
    """``A_i = (R_i - mean_group(R)) / (std + eps)``, clipped to ``+-clip``.

    Args:
        rewards: ``(B,)`` rewards of every sample of every group (gathered from all processes).
        group_ids: ``(B,)`` integer id of each sample's prompt group.
        std: ``"global"`` (std over the whole batch, the Flow-GRPO/DiffusionNFT reference default) or ``"group"``.
            Both are population stds (``unbiased=False``), as the reference's ``np.std``.
        eps: added to the std.
        clip: clip range (``None``: no clipping).
    """
    if std not in ("global", "group"):
        raise ValueError(f"std={std!r} is not known; use 'global' or 'group'.")
    # float64 statistics, as the reference's numpy: a float32 mean of G equal rewards can be off by one ulp (from
    # G = 8 on), which left a group of equal rewards with advantages of 1e-8 instead of exactly 0
    r = rewards.detach().double()
    if r.ndim != 1 or group_ids.shape != r.shape:
        raise ValueError(
            f"rewards {tuple(r.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)."
        )
    ids, inverse = torch.unique(group_ids, return_inverse=True)
    n = ids.numel()
    count = torch.zeros(n, device=r.device, dtype=r.dtype).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(n, device=r.device, dtype=r.dtype).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]
    group_var = torch.zeros(n, device=r.device, dtype=r.dtype).index_add_(0, inverse, centred**2) / count
    zero_std = group_var[inverse] == 0
    denom = r.std(unbiased=False) if std == "global" else group_var[inverse].sqrt()
    adv = centred / (denom + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return Advantages(values=adv.float(), zero_std=zero_std)


def text_group_ids(prompts: list[str]) -> torch.Tensor:
    """A group id per prompt from its text alone: a 63-bit blake2b hash, the same in every process and run, so that
    after a gather every row of one text shares one id (the reference codes group advantages by prompt text)."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "big") >> 1 for p in prompts],
        dtype=torch.long,
    )


def max_variance_subset(rewards: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` of a group's rewards whose (population) variance is largest: PODS's max-variance down-sampling
    (Xu, Savani, Fang, Kolter, arXiv 2504.13818), which trains on these rollouts only.

    Such a subset is always made of the ``k`` highest and the ``m - k`` lowest rewards for some ``k`` (the paper's
    lemma), so the ``m + 1`` candidates are compared, in float64. Ties go to the ``k`` nearest ``m / 2`` (the
    lower ``k`` first), and equal rewards are ordered by index (a stable sort), so the choice is deterministic.
    Returns the chosen indices into ``rewards``, ascending.
    """
    r = rewards.detach().double().flatten()
    g = r.numel()
    if not 0 < m <= g:
        raise ValueError(f"m={m} must be in 1..{g} (the group's size).")
    order = torch.sort(r, stable=True).indices
    best, best_var = None, -1.0
    for k in sorted(range(m + 1), key=lambda k: (abs(2 * k - m), k)):
        chosen = torch.cat([order[: m - k], order[g - k :]])
        var = float(r[chosen].var(unbiased=False))
        if var > best_var:
            best, best_var = chosen, var
    return torch.sort(best).values


def group_win_rates(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's win rate against the other samples of its group, by comparing scores (float64 ``(B,)``):

        w_i = (1 / (n_g - 1)) * sum over j in g(i), j != i of ([s_i > s_j] + 0.5 [s_i = s_j]),

    a win counting 1, a tie 0.5 and a loss 0; a sample alone in its group gets 0.5. Every pair of a group is
    compared once, as Pref-GRPO compares all pairs of its group with its judge (a tie or an unreadable answer is half
    a win for each; reference ``fastvideo/rewards/unifiedreward_think.py``, ``_pairwise_win_rate``), here with
    ``s_i > s_j`` standing in for the judge's verdict. Within a group of n the win rates sum to ``n / 2``, and they
    depend only on the order of the scores: any strictly increasing transform of the scores leaves them unchanged.
    """
    s = scores.detach().double()
    if s.ndim != 1 or group_ids.shape != s.shape:
        raise ValueError(f"scores {tuple(s.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,).")
    opponent = group_ids[:, None] == group_ids[None, :]
    opponent.fill_diagonal_(False)
    points = (s[:, None] > s[None, :]).double() + 0.5 * (s[:, None] == s[None, :]).double()
    count = opponent.sum(1)
    wins = (points * opponent).sum(1)
    return torch.where(count > 0, wins / count.clamp(min=1), torch.full_like(wins, 0.5))


def winrate_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    rewards_are_win_rates: bool = False,
    eps: float = 1e-8,
    clip: float | None = 5.0,
) -> Advantages:
    """Pref-GRPO's advantages: ``A_i = (w_i - mean_g(w)) / (std_g(w) + eps)``, clipped to ``+-clip``.

    ``w`` are the win rates of :func:`group_win_rates` (or the rewards themselves with ``rewards_are_win_rates``,
    for a reward that already gives each image its win rate from a pairwise judge, such as
    :class:`diffrl.rewards.GroupWinRate`: ranking those again would discard the judge's margins). The normalisation
    is the reference's with ``--use_group`` (Pref-GRPO, ``fastvideo/rewards/dispatcher.py``,
    ``compute_weighted_advantages``): mean and std within each group, the std with Bessel's correction (``n - 1``,
    torch's default) and ``eps = 1e-8``; the trainer clips to ``+-adv_clip`` as the reference's ``adv_clip_max``.
    A group of identical win rates (identical scores) gets advantages of exactly 0; a lone sample gets 0.

    Args:
        rewards: ``(B,)`` scores (or win rates) of every sample of every group (gathered from all processes).
        group_ids: ``(B,)`` integer id of each sample's prompt group.
        rewards_are_win_rates: take ``rewards`` as the win rates instead of computing them.
        eps: added to the group std.
        clip: clip range (``None``: no clipping).
    """
    r = rewards.detach().double()
    if r.ndim != 1 or group_ids.shape != r.shape:
        raise ValueError(
            f"rewards {tuple(r.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)."
        )
    w = r if rewards_are_win_rates else group_win_rates(r, group_ids)
    ids, inverse = torch.unique(group_ids, return_inverse=True)
    n = ids.numel()
    count = torch.zeros(n, device=w.device, dtype=w.dtype).index_add_(0, inverse, torch.ones_like(w))
    mean = torch.zeros(n, device=w.device, dtype=w.dtype).index_add_(0, inverse, w) / count
    centred = w - mean[inverse]
    squares = torch.zeros(n, device=w.device, dtype=w.dtype).index_add_(0, inverse, centred**2)
    std = (squares / (count - 1).clamp(min=1)).sqrt()  # a lone sample: centred is 0, so its advantage is 0
    adv = centred / (std[inverse] + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return Advantages(values=adv.float(), zero_std=squares[inverse] == 0)


@dataclass
class PPOStats:
    loss: torch.Tensor  # () the clipped surrogate loss (to minimise)
    ratio: torch.Tensor  # (B,) or (B, K) the policy ratios
    clipfrac: torch.Tensor  # () fraction of ratios outside the clip range
    approx_kl: torch.Tensor  # () 0.5 * mean((logp - logp_old)^2), a diagnostic


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    clip_range_high: float | None = None,
    trajectory_ratio: bool = False,
) -> PPOStats:
    """``mean(max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)))`` with ``ratio = exp(logp - logp_old)``.

    ``log_prob``/``old_log_prob`` are ``(B,)`` (one step) or ``(B, K)`` (K trained steps); ``advantages`` is ``(B,)``.
    ``clip_range_high`` gives an asymmetric upper clip (DAPO's clip-higher); ``trajectory_ratio=True`` uses one ratio
    per trajectory, ``exp(mean_k(logp_k - logp_old_k))`` (GSPO-style), instead of one per step.
    """
    lp, old = log_prob.float(), old_log_prob.detach().float()
    if lp.shape != old.shape:
        raise ValueError(
            f"log_prob {tuple(lp.shape)} and old_log_prob {tuple(old.shape)} must have the same shape."
        )
    diff = lp - old
    if trajectory_ratio and diff.ndim == 2:
        diff = diff.mean(dim=1)
    loss, ratio, clipfrac = _clipped_surrogate(diff, advantages, clip_range, clip_range_high)
    approx_kl = 0.5 * ((lp - old) ** 2).mean()
    return PPOStats(loss=loss, ratio=ratio.detach(), clipfrac=clipfrac.detach(), approx_kl=approx_kl.detach())


def _clipped_surrogate(log_ratio, advantages, clip_range, clip_range_high):
    """``(mean(max(-A r, -A clip(r, 1 - eps, 1 + eps_high))), r, clipfrac)`` for ``r = exp(log_ratio)``."""
    high = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    adv = adv.view(-1, *([1] * (ratio.ndim - 1))).expand_as(ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = torch.maximum(unclipped, clipped).mean()
    clipfrac = ((ratio < 1.0 - clip_range) | (ratio > 1.0 + high)).float().mean()
    return loss, ratio, clipfrac


def guard_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio of one Gaussian step (RatioNorm, arXiv 2510.22319 Sec. 4), per sample ``(B,)``:

        log r~ = delta (logp - logp_old) + mean_d (mu - mu_old)^2 / (2 delta),

    ``delta`` the step's std (the same under both policies), ``mu``/``mu_old`` the transition means under the current
    and the rollout policy, ``logp`` the samplers' per-dimension mean log-density. With ``x = mu_old + delta z`` the
    plain log-ratio is ``mean_d(z (mu - mu_old)) / delta - mean_d (mu - mu_old)^2 / (2 delta^2)``: its mean over the
    noise is negative (the left shift of the ratio the paper measures) and its spread grows as ``1 / delta``. The
    added term removes the shift and the factor ``delta`` the scale, so ``log r~ = mean_d(z (mu - mu_old))``: zero
    mean and a spread set by the policy change alone, at every step. On-policy (``mu = mu_old``) it is exactly 0.
    ``old_mean`` is a target (no gradient); everything is computed in float32.
    """
    lp, old = log_prob.float(), old_log_prob.detach().float()
    mu, mu_old = mean.float(), old_mean.detach().float()
    if lp.shape != old.shape or mu.shape != mu_old.shape or lp.shape != mu.shape[:1]:
        raise ValueError(
            f"log_prob {tuple(lp.shape)}, old_log_prob {tuple(old.shape)} must be (B,) and mean {tuple(mu.shape)}, "
            f"old_mean {tuple(mu_old.shape)} (B, ...) with the same B."
        )
    delta = torch.as_tensor(
        std, dtype=torch.float32, device=mu.device
    ).detach()  # float, (B,) or (B, 1, ..., 1)
    if delta.ndim > 1:
        delta = delta.reshape(delta.shape[0], -1)[:, 0]
    mse = ((mu - mu_old) ** 2).mean(dim=tuple(range(1, mu.ndim)))
    return delta * (lp - old) + mse / (2 * delta)


def guard_step_weight(sigma, sigma_next) -> torch.Tensor:
    """GRPO-Guard's gradient re-weighting of step ``s -> s_next``: ``1 / |s_next - s|`` (float32, 0-d).

    After RatioNorm the gradient of step k's log-ratio is ``mean_d(z d mu / d theta)``, and ``d mu / d theta`` carries
    the step size ``dt`` (``mu = x + dt (...) v_theta``), so steps of the schedule's large early ``|dt|`` would
    dominate; dividing the step's policy loss by ``|dt|`` evens that out. The weights are not normalised to sum to 1
    (the paper divides by ``dt``; the loss and so the learning rate's scale change by about ``1 / mean |dt|``)."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(())
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32).reshape(())
    dt = (s - s_next).abs()
    if not float(dt) > 0:
        raise ValueError(f"the step {float(s)} -> {float(s_next)} has no length; pass two different levels.")
    return 1.0 / dt


def grpo_guard_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mean: torch.Tensor | None = None,
    old_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    step_weight: torch.Tensor | float = 1.0,
    ratio_norm: bool = True,
    clip_range: float = 1e-4,
    clip_range_high: float | None = None,
) -> PPOStats:
    """The clipped surrogate of one step with GRPO-Guard's options: the ratio from :func:`guard_log_ratio`
    (``ratio_norm``; needs ``mean``, ``old_mean``, ``std``) or the plain ``logp - logp_old``, and the loss
    multiplied by ``step_weight`` (:func:`guard_step_weight` for the gradient re-weighting, 1 for none). With
    ``ratio_norm=False`` and ``step_weight=1`` it is :func:`ppo_clip_loss` exactly. ``approx_kl`` is
    ``0.5 mean(log_ratio^2)`` of the log-ratio the clip sees."""
    if ratio_norm:
        if mean is None or old_mean is None or std is None:
            raise ValueError(
                "ratio_norm=True needs the transition means (mean, old_mean) and the step's std."
            )
        log_ratio = guard_log_ratio(log_prob, old_log_prob, mean, old_mean, std)
    else:
        lp, old = log_prob.float(), old_log_prob.detach().float()
        if lp.shape != old.shape:
            raise ValueError(
                f"log_prob {tuple(lp.shape)} and old_log_prob {tuple(old.shape)} must have the same shape."
            )
        log_ratio = lp - old
    loss, ratio, clipfrac = _clipped_surrogate(log_ratio, advantages, clip_range, clip_range_high)
    w = torch.as_tensor(step_weight, dtype=torch.float32, device=loss.device)
    approx_kl = 0.5 * (log_ratio.detach() ** 2).mean()
    return PPOStats(loss=loss * w, ratio=ratio.detach(), clipfrac=clipfrac.detach(), approx_kl=approx_kl)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(B,)`` KL(N(mean, std^2) || N(ref_mean, std^2)) averaged over dimensions:
    ``mean_d((mean - ref_mean)^2 / (2 std^2))`` (same std; the samplers' mean-over-dims convention)."""
    d = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return d.mean(dim=tuple(range(1, d.ndim)))


def flow_grpo_reference_kl(mean: torch.Tensor, ref_mean: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(B,)`` KL term of the Flow-GRPO reference code: ``mean_d((mean - ref_mean)^2) / (2 sigma_t^2)``
    with ``sigma_t = a sqrt(s / (1 - s))`` the SDE's diffusion coefficient, not the step's std ``sigma_t sqrt(|dt|)``.
    It is :func:`gaussian_kl` times ``|dt|``; the papers' KL weights are given in these units."""
    d = ((mean.float() - ref_mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return d / (2 * sigma_t.float().reshape(-1) ** 2)


def nft_optimality(advantages: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's optimality probability ``r = clamp(0.5 + clip(A, +-clip) / (2 clip), 0, 1)`` (``0.5 + A/10``)."""
    a = advantages.float().clamp(-clip, clip)
    return (0.5 + a / (2 * clip)).clamp(0, 1)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_s: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    *,
    weighting: str = "adaptive",
) -> torch.Tensor:
    """Per-sample ``(B,)`` DiffusionNFT policy loss ``r * L(v+) + (1 - r) * L(v-)`` (before any scaling).

    Implicit policies: ``v+ = beta v_theta + (1 - beta) sg(v_old)``, ``v- = (1 + beta) sg(v_old) - beta v_theta``.
    ``weighting="velocity"``: the paper's ``L(v) = mean_d (v - v*)^2`` with ``v* = (x_s - x0) / s`` (= eps - x0).
    ``weighting="adaptive"``: the reference code's x0-space loss ``mean_d (x0_hat - x0)^2 / sg(max(mean_d |x0_hat -
    x0|, 1e-5))`` with ``x0_hat = x_s - s v``, which equals the velocity loss times ``s^2`` per sample, divided by
    its own (detached) mean absolute error.
    """
    if weighting not in ("adaptive", "velocity"):
        raise ValueError(f"weighting={weighting!r} is not known; use 'adaptive' or 'velocity'.")
    vt, vo = v_theta.float(), v_old.detach().float()
    xs, x0f = x_s.float(), x0.float()
    s = torch.as_tensor(sigma, dtype=torch.float32, device=xs.device).reshape(-1, *([1] * (xs.ndim - 1)))
    v_pos = beta * vt + (1 - beta) * vo
    v_neg = (1 + beta) * vo - beta * vt
    dims = tuple(range(1, xs.ndim))

    def part(v):
        if weighting == "velocity":
            target = (xs - x0f) / s
            return ((v - target) ** 2).mean(dim=dims)
        err = xs - s * v - x0f
        with torch.no_grad():
            w = err.double().abs().mean(dim=dims, keepdim=True).clamp(min=1e-5).float()
        return (err**2 / w).mean(dim=dims)

    rr = r.float().to(xs.device)
    return rr * part(v_pos) + (1 - rr) * part(v_neg)


def nft_old_policy_decay(step: int, *, flat: int = 0, rate: float = 0.001, cap: float = 0.5) -> float:
    """Decay ``d`` of the old-policy soft update ``theta_old <- d theta_old + (1 - d) theta`` at ``step``: 0 for
    ``flat`` steps, then rising by ``rate`` per step up to ``cap`` (reference defaults; OCR: flat 75, rate 0.0075,
    cap 0.999)."""
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def refl_loss(
    rewards: torch.Tensor, *, kind: str = "hinge", target: float = 2.0, scale: float = 1e-3
) -> torch.Tensor:
    """ReFL's loss on differentiable rewards ``(B,)``: ``mean(relu(target - r)) * scale`` (hinge, the reference with
    ImageReward's z-scored output) or ``-mean(r) * scale`` (linear)."""
    r = rewards.float()
    if kind == "hinge":
        return torch.relu(target - r).mean() * scale
    if kind == "linear":
        return -r.mean() * scale
    raise ValueError(f"kind={kind!r} is not known; use 'hinge' or 'linear'.")


def denoising_loss(v_theta: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The rectified-flow (pre-training) loss ``mean((v_theta - (eps - x0))^2)`` over the batch and every dimension,
    with ``v_theta`` the velocity at ``x_s = (1 - s) x0 + s eps``, whose target ``eps - x0`` does not depend on
    ``s``. ``x0`` and ``eps`` are targets (no gradient flows into them)."""
    if not (v_theta.shape == x0.shape == eps.shape):
        raise ValueError(
            f"v_theta {tuple(v_theta.shape)}, x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} must have the same shape."
        )
    target = eps.detach().float() - x0.detach().float()
    return ((v_theta.float() - target) ** 2).mean()


def awm_weights(advantages: torch.Tensor, *, clip: float = 5.0, max_weight: float = 1.0) -> torch.Tensor:
    """AWM's per-sample weights ``clip(A, +-clip) * max_weight / clip`` (float32): the reference code's advantage
    clipped to ``+-adv_clip_max`` and rescaled to ``+-advantage_max`` (scxue/advantage_weighted_matching,
    scripts/train_sd3_awm.py)."""
    return advantages.float().clamp(-clip, clip) * (max_weight / clip)


def awm_matching_loss(
    v_theta: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    *,
    weighting: str = "ghuber",
    power: float = 0.25,
    delta: float = 1e-10,
) -> torch.Tensor:
    """Per-sample ``(B,)`` flow-matching loss of AWM at levels ``t`` (``(B,)``), in float32.

    With ``x_t = (1 - t) x0 + t eps`` the input of ``v_theta`` and ``L = mean_d (v_theta - (eps - x0))^2`` the
    pre-training loss of the sample (arXiv 2509.25050, the AWM objective):

    * ``uniform``: ``L``, the paper's flow-matching loss;
    * ``t``: ``t L``;
    * ``ghuber`` (the reference configs'): ``t ((L + delta)^p - delta^p) / p``, a concave (robust) transform of
      ``L`` whose gradient is ``t (L + delta)^(p - 1)`` times that of ``L``; ``p = 1`` gives ``t L``.

    ``x0`` and ``eps`` are targets (no gradient flows into them).
    """
    if weighting not in ("ghuber", "t", "uniform"):
        raise ValueError(f"weighting={weighting!r} is not known; use ghuber, t or uniform.")
    if not (v_theta.shape == x0.shape == eps.shape):
        raise ValueError(
            f"v_theta {tuple(v_theta.shape)}, x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} must have the same shape."
        )
    target = eps.detach().float() - x0.detach().float()
    err = (v_theta.float() - target) ** 2
    mse = err.mean(dim=tuple(range(1, err.ndim)))
    tt = torch.as_tensor(t, dtype=torch.float32, device=mse.device).reshape(-1).expand_as(mse)
    if weighting == "uniform":
        return mse
    if weighting == "t":
        return tt * mse
    return tt * ((mse + delta) ** power - delta**power) / power


def awm_loss(matching: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AWM's policy loss ``mean_i(w_i * l_i)``: each sample's matching loss (:func:`awm_matching_loss`) weighted by
    its advantage weight (:func:`awm_weights`, detached). Minimising it lowers the matching loss of samples with a
    positive advantage (more likely under the policy) and raises it for negative ones.

    This is the on-policy gradient of the reference code's clipped surrogate ``max(-A r, -A clip(r, 1 +- eps))``
    with ``r = exp(l_old - l)``: at ``r = 1`` (``l_old = sg(l)``, one update per batch of samples) both have the
    gradient ``A grad(l)``, and their values differ by the constant ``mean(A)``.
    """
    m = matching.float()
    w = weights.detach().float().to(m.device)
    if m.shape != w.shape:
        raise ValueError(f"matching {tuple(m.shape)} and weights {tuple(w.shape)} must both be (B,).")
    return (w * m).mean()


def awm_clipped_loss(
    matching: torch.Tensor, old_matching: torch.Tensor, weights: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWM's off-policy policy loss, the reference code's clipped surrogate (its ``exp_first``):
    ``mean_i max(-w_i r_i, -w_i clip(r_i, 1 - c, 1 + c))`` with ``r_i = exp(l_old_i - l_i)``, the ratio of the
    likelihood surrogates ``exp(-l)`` of the policy that is trained (``matching``, with grad) and of the one that
    sampled (``old_matching``, detached: the EMA adapter's matching loss at the same ``x_t``). Float32.

    The gradient is ``w r grad(l)`` where the clip does not act, 0 where it does (``w > 0, r > 1 + c`` or
    ``w < 0, r < 1 - c``); at ``r = 1`` it is :func:`awm_loss`'s. Returns ``(loss, ratio)`` (the ratio detached)."""
    m = matching.float()
    old = old_matching.detach().float().to(m.device)
    w = weights.detach().float().to(m.device)
    if not (m.shape == old.shape == w.shape) or m.ndim != 1:
        raise ValueError(
            f"matching {tuple(m.shape)}, old_matching {tuple(old.shape)} and weights {tuple(w.shape)} must all be (B,)."
        )
    return _awm_surrogate(old - m, w, clip_range)


def awm_sample_clipped_loss(
    matching: torch.Tensor, old_matching: torch.Tensor, weights: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`awm_clipped_loss` with one ratio per sample (the reference code's ``sum_first``): ``matching`` and
    ``old_matching`` are ``(B, K)``, a sample's K training levels, and ``r_i = exp(mean_k (l_old_ik - l_ik))``, the
    ratio of the likelihood surrogates ``exp(-mean_k l)``; the loss is ``mean_i max(-w_i r_i, -w_i clip(r_i, 1 - c,
    1 + c))``. Float32.

    Its gradient is ``w_i r_i mean_k grad(l_ik)`` where the clip does not act, 0 where it does; at ``r = 1`` it is
    :func:`awm_loss`'s over the ``B K`` pairs. Returns ``(loss, ratio)``, the ratio ``(B,)`` and detached."""
    m = matching.float()
    old = old_matching.detach().float().to(m.device)
    w = weights.detach().float().to(m.device)
    if not (m.shape == old.shape) or m.ndim != 2 or w.shape != m.shape[:1]:
        raise ValueError(
            f"matching {tuple(m.shape)} and old_matching {tuple(old.shape)} must both be (B, K) and weights "
            f"{tuple(w.shape)} (B,)."
        )
    return _awm_surrogate((old - m).mean(dim=1), w, clip_range)


def _awm_surrogate(log_ratio: torch.Tensor, w: torch.Tensor, clip_range: float):
    """AWM's clipped surrogate on ``r = exp(log_ratio)`` (the range symmetric): ``(loss, r detached)``."""
    if not clip_range > 0:
        raise ValueError(f"clip_range={clip_range} must be positive.")
    loss, ratio, _ = _clipped_surrogate(log_ratio, w, clip_range, None)
    return loss, ratio.detach()


@dataclass
class DPOStats:
    """Per-pair quantities of :func:`flow_dpo_loss`, all float32 ``(P,)`` and detached except ``loss``."""

    loss: torch.Tensor  # (P,) -log sigmoid(z), with grad
    z: (
        torch.Tensor
    )  # (P,) the logit: implicit reward of the chosen sample minus the rejected one's (the margin)
    model_err_chosen: torch.Tensor  # (P,) mean_d (v_theta(x_w) - (eps - x0_w))^2
    model_err_rejected: torch.Tensor  # (P,) the same for the rejected sample
    ref_err_chosen: torch.Tensor  # (P,) the reference (adapter off) model's error on the chosen sample
    ref_err_rejected: torch.Tensor  # (P,) and on the rejected one


def flow_dpo_loss(
    v_chosen: torch.Tensor,
    v_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    x0_chosen: torch.Tensor,
    x0_rejected: torch.Tensor,
    eps: torch.Tensor,
    beta: float,
) -> DPOStats:
    """Diffusion-DPO's loss on the flow-matching (velocity) error, per pair, in float32.

    For a pair (chosen ``w``, rejected ``l``) noised at the same level ``t`` with the same ``eps``,
    ``x_t = (1 - t) x0 + t eps``, the target velocity ``eps - x0`` and the per-sample error
    ``e(v) = mean_d (v - (eps - x0))^2``:

        z    = -(beta / 2) * [ (e(v_w) - e(v_ref,w)) - (e(v_l) - e(v_ref,l)) ]
        loss = -log sigmoid(z)

    This is the Diffusion-DPO objective (Wallace et al., arXiv 2311.12908, eq. 14: ``-log sigmoid(-beta T w(lambda_t)
    (...))`` with the noise error replaced by the velocity error, as Flow-DPO, arXiv 2501.13918, does) with the
    squared norms taken as means over the ``D`` latent dimensions and the constant ``T w(lambda_t)`` folded into
    ``beta / 2``: with sums the same loss has ``beta_sum = beta / (2 D)``. ``z`` is the difference of the implicit
    rewards ``r = -(beta / 2) (e(v_theta) - e(v_ref))`` of the two samples; when the trained model equals the reference
    ``z = 0`` and the loss is ``log 2``. ``v_*`` are predictions at ``x_t`` of the chosen/rejected latents; the
    reference predictions, latents and noise are targets (no gradient flows into them).
    """
    shapes = {
        tuple(t.shape) for t in (v_chosen, v_rejected, ref_chosen, ref_rejected, x0_chosen, x0_rejected, eps)
    }
    if len(shapes) != 1:
        raise ValueError(
            f"the velocities, latents and noise of flow_dpo_loss must share one shape, got {sorted(shapes)}."
        )
    if not beta > 0:
        raise ValueError(f"beta={beta} must be positive.")
    eps = eps.detach().float()
    dims = tuple(range(1, v_chosen.ndim))

    def err(v, x0):
        return ((v.float() - (eps - x0.detach().float())) ** 2).mean(dim=dims)

    m_w, m_l = err(v_chosen, x0_chosen), err(v_rejected, x0_rejected)
    r_w, r_l = err(ref_chosen.detach(), x0_chosen), err(ref_rejected.detach(), x0_rejected)
    z = -0.5 * beta * ((m_w - r_w) - (m_l - r_l))
    loss = torch.nn.functional.softplus(-z)  # = -log sigmoid(z), stable for any z
    return DPOStats(
        loss=loss,
        z=z.detach(),
        model_err_chosen=m_w.detach(),
        model_err_rejected=m_l.detach(),
        ref_err_chosen=r_w,
        ref_err_rejected=r_l,
    )


def preference_pairs(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, mode: str = "best_worst", min_margin: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference pairs from the rewards of groups of samples of one prompt: ``(chosen, rejected, valid)``, index
    tensors ``(P,)`` into ``rewards`` and a bool mask.

    * ``best_worst``: one pair slot per group, in order of the groups' first rows: its highest reward against its
      lowest (the first row of each on ties), as online DPO recipes pair a group (Flow-Factory's DPO trainer);
    * ``all``: a slot for every two rows ``i < j`` of a group, the higher reward chosen (``i`` on a tie).

    A slot is valid when the chosen reward exceeds the rejected one by more than ``min_margin`` (so a tie never makes
    a pair). Invalid slots are kept, masked, so that every process trains the same number of pairs.
    """
    if mode not in ("best_worst", "all"):
        raise ValueError(f"mode={mode!r} is not known; use best_worst or all.")
    r = rewards.detach().double()
    if r.ndim != 1 or group_ids.shape != r.shape:
        raise ValueError(
            f"rewards {tuple(r.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)."
        )
    order: list[int] = []
    rows: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        if g not in rows:
            order.append(g)
            rows[g] = []
        rows[g].append(i)
    chosen, rejected = [], []
    for g in order:
        idx = rows[g]
        if mode == "best_worst":
            vals = r[idx]
            chosen.append(idx[int(torch.argmax(vals))])
            rejected.append(idx[int(torch.argmin(vals))])
        else:
            for a in range(len(idx)):
                for b in range(a + 1, len(idx)):
                    i, j = idx[a], idx[b]
                    hi, lo = (i, j) if r[i] >= r[j] else (j, i)
                    chosen.append(hi)
                    rejected.append(lo)
    c = torch.tensor(chosen, dtype=torch.long)
    rj = torch.tensor(rejected, dtype=torch.long)
    valid = (r[c] - r[rj]) > min_margin if len(chosen) else torch.zeros(0, dtype=torch.bool)
    return c, rj, valid.cpu()
