"""AWM: Advantage Weighted Matching (Xue, Ge, Zhang, Li, Ma, arXiv 2509.25050).

The paper shows that DDPO-style policy gradients (Flow-GRPO) amount to score/flow matching against *noisy* targets
(the next state of an SDE step) and proposes to train with the pre-training loss itself, on clean samples, each
sample weighted by its advantage. No SDE and no likelihood are needed: any deterministic solver makes the rollouts.

Per step: sample G images per prompt from the current policy (an ODE solver by default) and no CFG (guidance 1 for SD3,
as the reference's configs), keeping only the clean latents ``x0``; score them; compute group-relative advantages
``A = (R - mean_group R) / (std + 1e-4)`` and the weights ``w = clip(A, +-c) * a_max / c``. Then, at K levels ``t``
per sample, with fresh noise ``x_t = (1 - t) x0 + t eps``:

    l(t)  = rho_t( mean_d (v_theta(x_t, t) - (eps - x0))^2 )                       (the matching loss, weighted)
    L     = mean_{i,k} w_i l_ik  +  kl_weight * mean (v_theta - v_base)^2  +  ema_kl_weight * mean (v_theta - v_ema)^2

with one optimiser update per step, and after it the EMA policy moves towards the current one,
``theta_ema <- d theta_ema + (1 - d) theta`` with ``d = min(rate * u, cap)`` (``u``: optimiser updates so far).

The reference code (scxue/advantage_weighted_matching, scripts/train_sd3_awm.py and config/dgx_awm.py), and where
diffrl differs from it (details and the reference values in docs/trainers/awm.md):

* The reference writes the loss as a PPO clipped surrogate on ``r = exp(l_old - l)``; it makes one optimiser update
  per batch of rollouts (gradient accumulation over all of them), so ``l_old = sg(l)``, ``r = 1`` and the clip
  (range 1) never acts. diffrl computes that gradient, ``w grad(l)``, directly (:func:`awm_loss`), and has no
  second update per step. The reference's ``off_policy`` (rollouts from the EMA adapter, ``l_old`` the EMA adapter's
  matching loss, so ``r != 1``) is ``awm.rollout_policy=ema``, with the clipped surrogate
  (:func:`awm_clipped_loss`, ``awm.clip_range``): one ratio per sample and level (its ``loss_type`` ``exp_first``,
  the configs'), or with ``awm.ratio=sample`` one per sample from the mean over its levels (its ``sum_first``,
  :func:`awm_sample_clipped_loss`).
* ``rho_t`` is ``awm.weighting``: the reference's configs use ``ghuber`` (``t ((L + 1e-10)^p - 1e-10^p) / p``,
  p = 0.25), the paper's equation is ``uniform`` (``L``); both and ``t`` (``t L``) are offered.
* Levels (``awm.timesteps=levels``, the reference's ``discrete`` draws): the indices ``[first_level, int(T *
  fraction))`` of the rollout's T levels in K equal bins, one index drawn in each. The reference draws one set per
  micro-batch; diffrl draws one per sample keyed by its global row, so the micro-batch size and the number of
  processes do not change the update. ``logit_normal`` is the reference's continuous stratified draw (shift 3).
* Rollouts: the Euler ODE (default) or DPM-Solver++ 2M (``awm.solver``), optionally with Flow-GRPO's SDE or CPS
  steps for ``t`` in ``awm.sde_t_range`` (``awm.sampler`` sde or cps); or the reference's own sampler,
  ``awm.sampler=sa_solver``: SA-Solver (:func:`~diffrl.samplers.sa_solver_rollout`, predictor and corrector of order
  2, PEC mode, on the reference's grid), with ``tau = awm.noise_level`` on the steps that end at a level in
  ``awm.sde_t_range`` (the reference: 0.4 on [0.3, 0.9] for GenEval and OCR, 0 for PickScore). Each row's noise
  comes from its own generator (the reference: one draw for the batch).
* The matching loss is computed in float32 (the reference: float64).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from diffrl.samplers import rollout, sa_solver_levels, sa_solver_rollout

from .engine import Trainer
from .objectives import (
    awm_clipped_loss,
    awm_loss,
    awm_matching_loss,
    awm_sample_clipped_loss,
    awm_weights,
    group_advantages,
    nft_old_policy_decay,
)

__all__ = ["AWMTrainer", "level_indices", "logit_normal_levels"]

EMA = "ema_ref"
_LEVELS_KEY = 32452843  # keeps the training-level draws apart from every other draw of the step


def level_indices(first: int, last: int, k: int, u: np.ndarray) -> np.ndarray:
    """Stratified level indices: ``[first, last)`` cut into ``k`` bins at ``floor(linspace(first, last, k + 1))``
    and one index ``lower + floor(u_j (upper - lower))`` drawn in bin ``j`` from ``u`` (``(k,)`` uniforms in [0, 1));
    an empty bin gives its lower bound (the reference's ``discrete`` draw)."""
    bounds = np.floor(np.linspace(first, last, k + 1)).astype(np.int64)
    lower, upper = bounds[:-1], bounds[1:]
    return lower + np.floor(u * (upper - lower)).astype(np.int64)


def logit_normal_levels(u: np.ndarray, shift: float) -> np.ndarray:
    """Stratified logit-normal levels: for ``k = len(u)`` uniforms, ``t_j = sigmoid(Phi^-1((j + u_j) / k))``,
    shifted ``s t / (1 + (s - 1) t)`` and at least 0.01 (the reference's ``logit_normal`` draw)."""
    k = len(u)
    q = torch.as_tensor(np.clip((np.arange(k) + u) / k, 1e-7, 1 - 1e-7), dtype=torch.float64)
    t = torch.sigmoid(torch.special.ndtri(q))
    t = shift * t / (1 + (shift - 1) * t)
    return t.clamp(min=0.01).numpy()


class AWMTrainer(Trainer):
    algorithm = "awm"

    def setup(self) -> None:
        """Refuse ``awm.rollout_guidance`` on a model without CFG; then the EMA policy of the ``ema_kl_weight`` term: a
        second LoRA adapter, float32, a copy of the trained one."""
        if self.cfg.awm.rollout_guidance > 1 and not self.model.guidance_is_cfg:
            raise ValueError(
                f"awm.rollout_guidance={self.cfg.awm.rollout_guidance} needs a model whose guidance is classifier-free "
                f"guidance; {self.cfg.model.path}'s is a guidance embedding, set by sample.guidance_scale: leave "
                "awm.rollout_guidance at 1."
            )
        self.sde_window = self._sde_window()
        self.ema_params = []
        if not self._keeps_ema():
            return
        self.ema_params = self.add_adapter_copy(EMA)

    def _keeps_ema(self) -> bool:
        """Whether the EMA policy (a second adapter) is kept: for the ``ema_kl_weight`` pull or as the rollout
        policy (``awm.rollout_policy=ema``)."""
        a = self.cfg.awm
        return a.ema_kl_weight > 0 or a.rollout_policy == "ema"

    def _sde_window(self) -> tuple[int, int] | None:
        """``(start, end)`` of the stochastic rollout steps of ``awm.sampler`` sde or cps: the steps that start at a
        level in ``awm.sde_t_range``; for sa_solver the steps that end at such a level on its grid (``None`` for the
        ODE and for sa_solver without noise). Refuses a range that holds no step, and a CPS window that would end
        with the deterministic step to level 0."""
        a, s = self.cfg.awm, self.cfg.sample
        if a.sampler == "ode" or (a.sampler == "sa_solver" and a.noise_level == 0):
            return None
        sigmas = self.model.schedule(s.num_steps, s.height, s.width)
        lo, hi = a.sde_t_range
        if a.sampler == "sa_solver":
            grid = sa_solver_levels(sigmas)
            ends = [float(t) for t in grid[1:-1]]  # the last step, to 0, returns a data prediction: no noise
            steps = [k for k, t in enumerate(ends) if lo <= t <= hi]
            if not steps:
                levels = ", ".join(f"{t:.3g}" for t in ends)
                raise ValueError(
                    f"awm.sde_t_range={list(a.sde_t_range)} holds none of the levels SA-Solver's noisy steps end at "
                    f"({levels}); widen it, or set awm.noise_level=0 for the deterministic SA-Solver."
                )
            return steps[0], steps[-1] + 1
        steps = [k for k in range(len(sigmas) - 1) if lo <= float(sigmas[k]) <= hi]
        levels = ", ".join(f"{float(t):.3g}" for t in sigmas[:-1])
        if not steps:
            raise ValueError(
                f"awm.sde_t_range={list(a.sde_t_range)} holds none of the rollout steps' starting levels ({levels}); "
                "widen it or set awm.sampler=ode."
            )
        start, end = steps[0], steps[-1] + 1
        if a.sampler == "cps" and end == len(sigmas) - 1 and float(sigmas[-1]) == 0.0:
            raise ValueError(
                f"awm.sampler=cps cannot make the last rollout step (to level 0) stochastic, and "
                f"awm.sde_t_range={list(a.sde_t_range)} holds its starting level {float(sigmas[-2]):.3g}; raise the "
                "range's lower end above it."
            )
        return start, end

    def _sa_tau(self, t: float) -> float:
        """SA-Solver's stochasticity at a step's target level ``t``: ``awm.noise_level`` in ``awm.sde_t_range``, 0
        elsewhere (the reference's ``noise_level if 0.3 <= t <= 0.9 else 0``)."""
        lo, hi = self.cfg.awm.sde_t_range
        return self.cfg.awm.noise_level if lo <= t <= hi else 0.0

    def after_sharding(self) -> None:
        if self._keeps_ema():
            self.ema_params = self.adapter_params(EMA)

    def derived_sizes(self):
        a = self.cfg.awm
        return self.group_sizes(a.prompts_per_step, a.group_size)

    def train_levels(self, sigmas: torch.Tensor, n: int, rows=None) -> torch.Tensor:
        """``(len(rows), K)`` training levels of this process's samples ``rows`` (default: all ``n``), each
        sample's drawn from a generator keyed by ``(seed, step, global row)``."""
        a, cfg = self.cfg.awm, self.cfg
        k = a.num_train_timesteps
        out = []
        for i in range(n) if rows is None else rows:
            rng = np.random.default_rng([cfg.seed, self.step, _LEVELS_KEY, self.rank * n + i])
            u = rng.random(k)
            if a.timesteps == "levels":
                last = int(cfg.sample.num_steps * a.timestep_fraction)
                idx = level_indices(a.first_level, last, k, u)
                out.append(sigmas[torch.as_tensor(idx)].float())
            else:
                out.append(torch.as_tensor(logit_normal_levels(u, a.time_shift), dtype=torch.float32))
        return torch.stack(out).to(self.device)

    def train_step(self, step: int) -> dict[str, float]:
        a, s = self.cfg.awm, self.cfg.sample
        model = self.model
        batch = self.step_batch(a.prompts_per_step)
        G = a.group_size
        prompts, metadata, group_ids = self.expand_groups(batch, G)
        sigmas = model.schedule(s.num_steps, s.height, s.width)
        guidance = self.cfg_free_guidance()
        roll_guidance = a.rollout_guidance if a.rollout_guidance > 1 else guidance
        cond_all = model.encode_rows(batch.prompts, batch.metadata).repeat_interleave(G)

        # 1. rollouts of the current policy (ODE, or stochastic in awm.sde_t_range; no grad; with
        # awm.rollout_guidance > 1 the guided policy), keep x0
        n = len(prompts)

        def sample_chunk(rows):
            # each row's initial noise, and its rollout noise, from its own generators
            noise_gens = self.row_generators(2, rows, self.rank * n) if self.sde_window is not None else None
            policy = model.use_adapter(EMA) if a.rollout_policy == "ema" else contextlib.nullcontext()
            with torch.no_grad(), self.autocast(), policy:
                noise = model.sample_noise(
                    len(rows), s.height, s.width, self.row_generators(1, rows, self.rank * n)
                )
                cond = cond_all.select(rows)
                if a.sampler == "sa_solver":
                    levels = sa_solver_levels(sigmas)
                    return sa_solver_rollout(
                        model,
                        cond,
                        levels,
                        noise,
                        tau=self._sa_tau,
                        guidance_scale=roll_guidance,
                        generator=noise_gens,
                    ).final
                stochastic = {}
                if self.sde_window is not None:
                    stochastic = dict(
                        sampler=a.sampler,
                        noise_level=a.noise_level,
                        sde_window=self.sde_window,
                        generator=noise_gens,
                    )
                return rollout(
                    model, cond, sigmas, noise, guidance_scale=roll_guidance, solver=a.solver, **stochastic
                ).final

        x0, scored = self.sample_and_score(n, sample_chunk, prompts, metadata)
        rewards = scored.total.float().to(self.device)
        all_rewards = self.gather(rewards)
        metrics = self.reward_metrics(scored.components, all_rewards)
        if not torch.isfinite(all_rewards).all():
            return {**metrics, "train/skipped": 1.0}
        # the rows trained on (every process keeps as many: whole groups are a process's own), their advantages
        # among themselves
        keep = self.pods_rows(rewards, G, a.train_per_group)
        nk = len(keep)
        all_groups = self.gather(self.advantage_groups(prompts, group_ids)[keep].to(self.device))
        adv_all = group_advantages(self.gather(rewards[keep]), all_groups, std=a.adv_std, clip=a.adv_clip)
        weights = awm_weights(
            adv_all.values[self.rank * nk : (self.rank + 1) * nk], clip=a.adv_clip, max_weight=a.adv_max
        )
        metrics["sample/zero_std_frac"] = float(adv_all.zero_std.float().mean())

        # 2. training levels and noise, drawn up front per global row (micro-batching and processes change neither)
        levels = self.train_levels(sigmas, n, keep)
        k = levels.shape[1]
        eps_all = torch.stack(
            [
                torch.randn((k, *x0.shape[1:]), generator=g)
                for g in self.row_generators(4, keep, self.rank * n)
            ],
            dim=1,
        ).to(self.device)
        if nk < n:
            x0, cond_all = x0[keep], cond_all.select(keep)
            metrics["sample/kept_reward_std"] = float(self.gather(rewards[keep]).std(unbiased=False))

        # 3. the weighted matching loss, one optimiser update
        sums = {"policy_loss": 0.0, "matching": 0.0, "kl": 0.0, "ema_kl": 0.0}
        if a.rollout_policy == "ema":
            sums.update(ratio_mean=0.0, clip_frac=0.0)
        bad = self._accumulate(nk, x0, weights, levels, eps_all, cond_all, guidance, sums)
        if self.any_over_processes(bad):
            self.discard_gradients()
            return {**metrics, "train/skipped": 1.0}
        metrics.update(self.finish_update())

        # 4. the EMA policy follows, its decay counted in optimiser updates (the reference's global step)
        d = nft_old_policy_decay(self.step + 1, flat=0, rate=a.ema_kl_rate, cap=a.ema_kl_cap)
        if self.ema_params:
            with torch.no_grad():
                for e, p in zip(self.ema_params, self.params, strict=True):
                    e.mul_(d).add_(p.detach(), alpha=1 - d)
        for key, value in sums.items():
            metrics[f"train/{key}"] = self.mean_over_processes(value)
        metrics["train/loss"] = (
            metrics["train/policy_loss"]
            + a.kl_weight * metrics["train/kl"]
            + a.ema_kl_weight * metrics["train/ema_kl"]
        )
        metrics["train/weight_abs_mean"] = float(self.gather(weights.abs()).mean())
        metrics["train/ema_decay"] = d if self.ema_params else 0.0
        metrics["train/skipped"] = 0.0
        return metrics

    def _accumulate(self, n, x0, weights, levels, eps_all, cond_all, guidance, sums) -> bool:
        """Backward passes of the micro-batches at every training level: the gradient of the mean loss over all
        processes' samples and levels. With ``awm.ratio=sample`` (off-policy) a micro-batch's levels are held for
        one backward, since a sample's ratio needs all of them. Returns True when a loss was not finite."""
        cfg, a, model = self.cfg, self.cfg.awm, self.model
        off_policy = a.rollout_policy == "ema"
        per_sample = off_policy and a.ratio == "sample"
        bad = False
        k = levels.shape[1]
        for i in range(0, n, cfg.optim.train_batch_size):
            mb = list(range(i, min(n, i + cfg.optim.train_batch_size)))
            cond = cond_all.select(mb)
            w = len(mb) / n / k
            held, held_old, held_penalty = [], [], 0.0
            for li in range(k):
                t_b = levels[mb, li]
                eps = eps_all[li, mb]
                t_x = t_b.view(-1, *([1] * (x0.ndim - 1)))
                x_t = (1 - t_x) * x0[mb] + t_x * eps
                with self.autocast():
                    v = model.velocity(x_t, t_b, cond, guidance).float()
                zero = torch.zeros((), device=self.device)
                kl, ema_kl = zero, zero
                if a.kl_weight > 0:
                    with torch.no_grad(), self.autocast(), model.disable_adapter():
                        v_ref = model.velocity(x_t, t_b, cond, guidance).float()
                    kl = ((v - v_ref) ** 2).mean()
                if self.ema_params:
                    with torch.no_grad(), self.autocast(), model.use_adapter(EMA):
                        v_ema = model.velocity(x_t, t_b, cond, guidance).float()
                    ema_kl = ((v - v_ema) ** 2).mean()
                matching = awm_matching_loss(v, x0[mb], eps, t_b, weighting=a.weighting, power=a.ghuber_power)
                penalty = a.kl_weight * kl + a.ema_kl_weight * ema_kl
                sums["matching"] += float(matching.detach().mean()) * w
                sums["kl"] += float(kl.detach()) * w
                sums["ema_kl"] += float(ema_kl.detach()) * w
                old = None
                if off_policy:  # the ratio to the EMA policy that sampled
                    old = awm_matching_loss(
                        v_ema, x0[mb], eps, t_b, weighting=a.weighting, power=a.ghuber_power
                    )
                if per_sample:  # the sample's ratio needs its every level: hold the graphs
                    held.append(matching)
                    held_old.append(old)
                    held_penalty = held_penalty + penalty
                    continue
                if off_policy:
                    policy, ratio = awm_clipped_loss(matching, old, weights[mb], a.clip_range)
                else:
                    policy = awm_loss(matching, weights[mb])
                loss = policy + penalty
                bad = bad or not bool(torch.isfinite(loss))
                self.backward(loss * w)
                sums["policy_loss"] += float(policy.detach()) * w
                if off_policy:
                    self._ratio_metrics(sums, ratio, a.clip_range, w)
            if per_sample:
                policy, ratio = awm_sample_clipped_loss(
                    torch.stack(held, dim=1), torch.stack(held_old, dim=1), weights[mb], a.clip_range
                )
                loss = policy * k + held_penalty  # the levels' mean, as each level's w = len(mb) / n / k
                bad = bad or not bool(torch.isfinite(loss))
                self.backward(loss * w)
                sums["policy_loss"] += float(policy.detach()) * w * k
                self._ratio_metrics(sums, ratio, a.clip_range, w * k)
        return bad

    @staticmethod
    def _ratio_metrics(sums: dict, ratio: torch.Tensor, clip_range: float, w: float) -> None:
        """Add the off-policy ratio's mean and clipped share, weighted ``w``, to ``sums``."""
        sums["ratio_mean"] += float(ratio.mean()) * w
        sums["clip_frac"] += float(((ratio - 1).abs() > clip_range).float().mean()) * w

    def extra_state(self):
        if not self.ema_params:  # ema_kl_weight = 0: no EMA adapter
            return {}
        return {f"{EMA}.{n}": e.detach() for n, e in zip(self.param_names, self.ema_params, strict=True)}

    def load_extra_state(self, tensors):
        if not self.ema_params:
            return
        with torch.no_grad():
            for n, e in zip(self.param_names, self.ema_params, strict=True):
                self.assign_(e, tensors[f"{EMA}.{n}"])
