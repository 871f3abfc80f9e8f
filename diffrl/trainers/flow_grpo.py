"""Flow-GRPO: online RL for flow-matching models through an ODE-to-SDE sampler (Liu et al., arXiv 2505.05470).

Per step, for each of the step's prompts, sample a group of G images with SDE (or CPS) steps, keeping each
stochastic transition's log-probability ``logp_old`` (float32, mean over dimensions: see diffrl.samplers.steps);
score them; compute group-relative advantages ``A = (R - mean_group R) / (std + 1e-4)`` (std over the whole
gathered batch by default), clipped to +-5. Then, for every trained step k of every trajectory,

    ratio = exp(logp_theta(x_{k+1} | x_k) - logp_old),   L = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))
                                                           + beta * KL(mu_theta, mu_base),

with mu_base from the same network with its LoRA adapter disabled. Each inner epoch shuffles the samples and splits
them into ``num_minibatches`` parts, one optimiser update after each (the first part is on-policy, later parts are
not, so the clip acts).

Options: a window of ``sde_window`` stochastic (and trained) steps placed at random in ``sde_window_range``
(Flow-GRPO-Fast), asymmetric clipping (``clip_range_high``, DAPO), dropping groups with identical rewards
(``dynamic_sampling``), one ratio per trajectory (``trajectory_ratio``, GSPO-style), and:

* MixGRPO (Li et al., arXiv 2507.21802, Sec. 3.2, Algorithm 1; official code Tencent-Hunyuan/MixGRPO,
  ``fastvideo/utils/grpo_states.py`` "progressive" and ``fastvideo/utils/sampling_utils.py``):
  ``window_schedule="sliding"`` moves the window ``window_stride`` steps later every ``window_shift_every`` training
  steps through the allowed starts and back to the first (``window_end="wrap"``, the official ``--roll_back``) or
  stays at the last (``"stay"``): :func:`sliding_window_start`, a pure function of the step, so resume replays it.
  Only the window is stochastic and trained (the official ``training_strategy="part"``). ``post_window_solver="dpm2"``
  solves the ODE steps after the window with DPM-Solver++ 2M (MixGRPO-Flash's ``dpm_apply_strategy="post"``).
  Deviations: the official window is ``range(cur, min(cur + W, T - 2))``, so it never holds step T - 2, shrinks at
  its last positions and is empty at the very last; diffrl keeps every window whole, ending before the last step,
  and wraps when the next one would not fit (the same schedule over the official 300-step runs). Flash's
  re-spacing of the levels after the window into fewer steps (``dpm_post_compress_ratio``) is not implemented.
* GRPO-Guard (Wang et al., arXiv 2510.22319; no official code published): ``ratio_norm`` replaces the step's
  log-ratio by ``delta_k (logp - logp_old) + mean_d (mu - mu_old)^2 / (2 delta_k)`` = ``mean_d(z (mu - mu_old))``
  (centred, the same scale at every step: RatioNorm), the rollout keeping its transition means;
  ``grad_reweight`` multiplies the step's clipped policy term by ``1 / |dt_k|``. Choices the paper leaves open:
  the weights are not normalised, the KL term is not re-weighted, both are refused with ``trajectory_ratio``
  (see :func:`~diffrl.trainers.objectives.grpo_guard_loss`).

* Pref-GRPO (Wang et al., arXiv 2508.20751, Sec. 3; official code CodeGoat24/Pref-GRPO,
  ``fastvideo/rewards/unifiedreward_think.py`` and ``fastvideo/rewards/dispatcher.py``): ``advantage="winrate"``
  replaces each image's reward by its win rate against the other G - 1 images of its group (a win 1, a tie 0.5),
  ``w_i = (1 / (G - 1)) sum_{j != i} ([R_i > R_j] + 0.5 [R_i = R_j])``, and normalises it within the group,
  ``A_i = (w_i - mean_g w) / (std_g w + 1e-8)`` (std with n - 1, the reference's ``--use_group``), clipped to
  +-adv_clip (:func:`~diffrl.trainers.objectives.winrate_advantages`). Win rates move by whole steps of
  1 / (G - 1) however close two scores are, so near-identical scores no longer make large advantages (the paper's
  "illusory advantage"). A pairwise win-rate reward (``GroupWinRate``) already gives win rates from its judge, and
  they are used as they are. Deviations: the paper ranks with a pairwise judge; with a pointwise reward diffrl
  compares the scores. The reference normalises each reward of a multi-reward spec separately and sums the weighted
  advantages (and its latest scripts re-normalise the sum over the batch, ``--apply_gdpo``); diffrl ranks the
  weighted total.

The reference code (yifan123/flow_grpo, scripts/train_sd3.py), and where diffrl lets a run differ from it (each a
named option; the defaults and why are in docs/trainers/flow_grpo.md):

* ``kl_scale``: the KL's units. ``reference`` (default) divides ``mean_d ||mu - mu_ref||^2`` by ``2 sigma_t^2``, the
  diffusion coefficient, as the reference does and as the published betas assume; ``exact`` is the Gaussian KL of
  the step, divided by its variance ``2 sigma_t^2 |dt|`` (1/|dt| larger: about 13x on the 10-step SD3.5 schedule).
* ``cfg_grad``: ``cond`` (default, the reference's) detaches the unconditional prediction of CFG in the training
  forward; ``full`` back-propagates through both branches (the exact gradient of the guided policy).
* ``num_minibatches``: 1 by default (one on-policy update per step); the reference's SD3.5 configs make 2.
* ``drop_zero_advantage``: false by default; the reference drops samples whose advantage is exactly 0 (and pads
  its mask with random ones to a multiple of its micro-batch count; diffrl does not pad).
* ``old_logp``: ``rollout`` (default, the reference's) or ``recompute`` with the training micro-batches, which makes
  the first ratio exactly 1 in bf16 too.

Other deviations: the CPS log-prob is the full Gaussian log-density (the reference keeps only ``-(x - mu)^2``);
``timestep_fraction`` keeps the first ``int(fraction * K)`` of the K stochastic steps (at least one) when every step
is stochastic, and with a window every window step is trained; each process samples whole groups.
``timestep_selection="random"`` is Pref-GRPO's choice instead (``fastvideo/train_flux.py``: a ``torch.randperm`` of
the steps but the last per sample, its first ``int((K - 1) * fraction)`` trained): each image trains its own random
steps (:func:`random_train_steps`), its loss the mean over them; each step's forward takes the rows that train it.
"""

from __future__ import annotations

import numpy as np
import torch

from diffrl.samplers import cps_step, rollout, sde_std, sde_step

from .engine import Trainer
from .objectives import (
    flow_grpo_reference_kl,
    gaussian_kl,
    group_advantages,
    grpo_guard_loss,
    guard_step_weight,
    ppo_clip_loss,
    winrate_advantages,
)

__all__ = ["FlowGRPOTrainer", "random_train_steps", "sliding_window_start"]


def random_train_steps(pool: list[int], count: int, generators) -> torch.Tensor:
    """Pref-GRPO's trained steps (``timestep_selection="random"``): for each sample's generator, the steps
    ``pool[j]`` of the first ``count`` indices j of ``torch.randperm(len(pool), generator)``, sorted; ``(n, count)``
    long. The reference (CodeGoat24/Pref-GRPO, ``fastvideo/train_flux.py``, ``train_one_step``) draws one
    ``torch.randperm`` of the steps per sample and trains its first ``int(steps * timestep_fraction)``."""
    if not 1 <= count <= len(pool):
        raise ValueError(f"cannot draw {count} trained steps from the {len(pool)} steps {pool}.")
    drawn = [sorted(pool[int(j)] for j in torch.randperm(len(pool), generator=g)[:count]) for g in generators]
    return torch.tensor(drawn, dtype=torch.long).reshape(-1, count)


def sliding_window_start(
    step: int, lo: int, hi: int, *, shift_every: int, stride: int, end: str = "wrap"
) -> int:
    """MixGRPO's window start at training step ``step``: ``lo`` for the first ``shift_every`` steps, then
    ``stride`` sampling steps later every ``shift_every`` steps, over the starts ``lo, lo + stride, ... < hi``; past
    the last of them it goes back to ``lo`` (``end="wrap"``, the official ``roll_back``) or stays there
    (``"stay"``). ``stride=0`` keeps it at ``lo``. A pure function of the step, so a resumed run replays it."""
    if hi <= lo:
        raise ValueError(f"no window start in [{lo}, {hi}); widen flow_grpo.sde_window_range.")
    positions = (hi - 1 - lo) // stride + 1 if stride > 0 else 1
    moves = step // shift_every
    index = moves % positions if end == "wrap" else min(moves, positions - 1)
    return lo + stride * index


class FlowGRPOTrainer(Trainer):
    algorithm = "flow_grpo"

    def derived_sizes(self):
        g = self.cfg.flow_grpo
        return self.group_sizes(g.prompts_per_step, g.group_size)

    def _window(self, num_steps: int) -> tuple[int, int]:
        g = self.cfg.flow_grpo
        last = num_steps - 1 if g.sampler == "cps" else num_steps  # the CPS step to 0 is deterministic
        if g.sde_window == 0:
            return 0, last
        if g.window_schedule == "sliding":
            # windows end before the last step (MixGRPO never trains it), inside sde_window_range when given
            top = min(last, num_steps - 1) - g.sde_window + 1
            lo, hi = g.sde_window_range or [0, top]
            hi = min(hi, top)
            if hi <= lo:
                raise ValueError(
                    f"flow_grpo.sde_window={g.sde_window} does not fit before the last of {num_steps} steps from "
                    f"{lo}; shorten it."
                )
            start = sliding_window_start(
                self.step, lo, hi, shift_every=g.window_shift_every, stride=g.window_stride, end=g.window_end
            )
            return start, start + g.sde_window
        lo, hi = g.sde_window_range or [0, max(1, num_steps // 2)]
        hi = min(hi, last - g.sde_window + 1)
        if hi <= lo:
            raise ValueError(
                f"flow_grpo.sde_window={g.sde_window} does not fit in {num_steps} steps from {lo}; shorten it."
            )
        start = int(np.random.default_rng([self.cfg.seed, self.step, 104729]).integers(lo, hi))
        return start, start + g.sde_window

    def rewards_are_win_rates(self) -> bool:
        """True when every weighted part of the training reward is a pairwise win-rate reward
        (:class:`diffrl.rewards.GroupWinRate`, e.g. ``unifiedreward_pairwise_winrate``): its scores already are win
        rates, which ``advantage=winrate`` then normalises as they are instead of ranking them again."""
        from diffrl.rewards import CombinedReward, GroupWinRate

        r = self.reward
        parts = [p for p, w in r.parts if w != 0] if isinstance(r, CombinedReward) else [r]
        return bool(parts) and all(isinstance(p, GroupWinRate) for p in parts)

    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor):
        """Advantages of the gathered batch: Flow-GRPO's from the scores, or Pref-GRPO's from the win rates."""
        g = self.cfg.flow_grpo
        if g.advantage == "winrate":
            return winrate_advantages(
                rewards, group_ids, rewards_are_win_rates=self.rewards_are_win_rates(), clip=g.adv_clip
            )
        return group_advantages(rewards, group_ids, std=g.adv_std, clip=g.adv_clip)

    def updates_per_step(self) -> int:
        return self.cfg.flow_grpo.num_inner_epochs * self.cfg.flow_grpo.num_minibatches

    def train_step(self, step: int) -> dict[str, float]:
        g, s = self.cfg.flow_grpo, self.cfg.sample
        model = self.model
        batch = self.step_batch(g.prompts_per_step)
        G = g.group_size
        prompts, metadata, group_ids = self.expand_groups(batch, G)
        sigmas = model.schedule(s.num_steps, s.height, s.width)
        window = self._window(s.num_steps)

        # 1. rollouts with log-probs (no grad), decode, score
        cond_all = model.encode_rows(batch.prompts, batch.metadata).repeat_interleave(G)
        trajs, logps, means = [], [], []
        n = len(prompts)

        def sample_chunk(rows):
            with torch.no_grad(), self.autocast():
                noise = model.sample_noise(
                    len(rows), s.height, s.width, self.row_generators(1, rows, self.rank * n)
                )
                out = rollout(
                    model,
                    cond_all.select(rows),
                    sigmas,
                    noise,
                    guidance_scale=s.guidance_scale,
                    sampler=g.sampler,
                    noise_level=g.noise_level,
                    sde_window=window,
                    solver=g.post_window_solver,
                    generator=self.row_generators(2, rows, self.rank * n),
                    keep_means=g.ratio_norm,
                )
            trajs.append(out.latents)
            logps.append(out.log_probs)
            if g.ratio_norm:
                means.append(out.means)
            return out.final

        _, scored = self.sample_and_score(n, sample_chunk, prompts, metadata)
        latents = torch.cat(trajs)  # (n, T+1, C, h, w)
        old_logp = torch.cat(logps)  # (n, T)
        old_mean = (
            torch.cat(means) if g.ratio_norm else None
        )  # (n, T, C, h, w) the rollout's transition means
        rewards = scored.total.float().to(self.device)

        # 2. advantages over the whole gathered batch (with train_per_group, over the rows kept for training:
        # every process keeps as many, and the others get no advantage)
        all_rewards = self.gather(rewards)
        metrics = self.reward_metrics(scored.components, all_rewards)
        if not torch.isfinite(all_rewards).all():
            self.discard_gradients()
            return {**metrics, "train/skipped": 1.0}
        rows = self.pods_rows(rewards, G, g.train_per_group)
        nk = len(rows)
        all_groups = self.gather(self.advantage_groups(prompts, group_ids)[rows].to(self.device))
        adv_all = self.advantages(self.gather(rewards[rows]), all_groups)
        local = slice(self.rank * nk, (self.rank + 1) * nk)
        keep = torch.tensor(rows, dtype=torch.long, device=self.device)
        adv = torch.zeros(n, device=self.device)
        adv[keep] = adv_all.values[local].to(adv.device)
        zero_std = adv_all.zero_std[local].to(keep.device)
        if g.dynamic_sampling:
            keep = keep[~zero_std]
        if g.drop_zero_advantage:
            keep = keep[adv[keep] != 0]
        metrics["sample/zero_std_frac"] = float(adv_all.zero_std.float().mean())
        metrics["sample/zero_adv_frac"] = float((adv_all.values == 0).float().mean())
        if nk < n:
            metrics["sample/kept_reward_std"] = float(self.gather(rewards[rows]).std(unbiased=False))

        # 3. trained steps: which steps each sample trains, (n, T) (the same for every sample unless random)
        trained, per_sample = self._trained_mask(list(range(window[0], window[1])), n, s.num_steps)
        train_steps = [k for k in range(s.num_steps) if bool(trained[:, k].any())]
        # each inner epoch: a shuffled order split into num_minibatches parts, one optimiser update after each part
        parts = []
        for epoch in range(g.num_inner_epochs):
            order = keep[torch.randperm(keep.numel(), generator=self.generator(3, epoch)).to(keep.device)]
            parts.append(list(torch.tensor_split(order, g.num_minibatches)))
        # global sample count of every part (the loss is a mean over all processes' samples of the part)
        sizes = self.sum_over_processes(
            torch.tensor([[p.numel() for p in ep] for ep in parts], dtype=torch.float64)
        )
        if g.old_logp == "recompute":
            old_logp, old_mean, metrics["train/old_logp_max_diff"] = self._recompute_old_logp(
                latents, old_logp, old_mean, cond_all, sigmas, (train_steps, trained), parts[0]
            )
        stats = {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "ratio_mean": 0.0, "approx_kl": 0.0, "count": 0}
        updates = 0
        for epoch, epoch_parts in enumerate(parts):
            for part, size in zip(epoch_parts, sizes[epoch].tolist(), strict=True):
                if size == 0:  # no process kept a sample for this part: no update
                    continue
                bad = self._accumulate_part(
                    part,
                    size / self.world,
                    latents,
                    (old_logp, old_mean),
                    adv,
                    cond_all,
                    sigmas,
                    (train_steps, trained, per_sample),
                    stats,
                )
                if self.any_over_processes(bad):
                    self.discard_gradients()
                    return {**metrics, "train/skipped": 1.0}
                metrics.update(self.finish_update())
                updates += 1
        # sums and counts over processes (with dynamic_sampling a process may keep fewer samples, or none)
        keys = ("loss", "kl", "clipfrac", "ratio_mean", "approx_kl")
        totals = torch.tensor([stats[k] for k in keys] + [stats["count"]], dtype=torch.float64)
        totals = self.sum_over_processes(totals).cpu()
        c = max(1.0, float(totals[-1]))
        for key, value in zip(keys, totals[:-1].tolist(), strict=True):
            metrics[f"train/{key}"] = value / c
        metrics["train/skipped"] = 0.0
        metrics["train/trained_steps"] = float(per_sample)
        if g.sde_window:
            metrics["train/window_start"] = float(window[0])
        metrics["train/updates"] = float(updates)
        return metrics

    def _trained_mask(self, stochastic: list[int], n: int, num_steps: int) -> tuple[torch.Tensor, int]:
        """The steps each of this process's ``n`` samples trains: ``(mask (n, T) bool, steps per sample)``.
        ``first``: the window's steps, or the first ``max(1, int(K * timestep_fraction))`` of the K stochastic ones
        when every step is stochastic, for every sample. ``random``: each sample's own
        ``max(1, int((K - 1) * timestep_fraction))`` of the stochastic steps but the last (the reference trains
        ``timesteps[:, :-1]``), from a generator keyed by its global row, so neither the process count nor a resume
        changes the draw."""
        g = self.cfg.flow_grpo
        mask = torch.zeros(n, num_steps, dtype=torch.bool)
        if g.timestep_selection == "random":
            pool = [k for k in stochastic if k < num_steps - 1]
            count = max(1, int(len(pool) * g.timestep_fraction))
            drawn = random_train_steps(pool, count, self.row_generators(3, range(n), self.rank * n))
            mask.scatter_(1, drawn, True)
            return mask, count
        steps = (
            stochastic if g.sde_window else stochastic[: max(1, int(len(stochastic) * g.timestep_fraction))]
        )
        mask[:, steps] = True
        return mask, len(steps)

    @staticmethod
    def _rows_at(rows: list[int], k: int, trained: torch.Tensor) -> list[int]:
        """The rows among ``rows`` (in their order) that train step k."""
        return [r for r in rows if bool(trained[r, k])]

    def _step_outputs(self, x, x_next, k, sigmas, cond, *, reference: bool = False):
        """The trained step k's transition under the current policy (or the base model, ``reference=True``)."""
        g, s, model = self.cfg.flow_grpo, self.cfg.sample, self.model
        step_fn = sde_step if g.sampler == "sde" else cps_step
        sig = sigmas[k].expand(x.shape[0])
        with self.autocast():
            v = model.velocity(x, sig, cond, s.guidance_scale, detach_uncond=g.cfg_grad == "cond")
        return step_fn(x, v, sigmas[k], sigmas[k + 1], g.noise_level, prev_sample=x_next)

    def _kl(self, out, ref, sigmas, k: int) -> torch.Tensor:
        """Per-sample KL term of step k in ``kl_scale`` units (CPS: both units agree, its std has no ``dt``)."""
        g = self.cfg.flow_grpo
        if g.kl_scale == "reference" and g.sampler == "sde":
            sigma_t, _ = sde_std(sigmas[k].float(), sigmas[k + 1].float(), g.noise_level)
            return flow_grpo_reference_kl(out.mean, ref.mean, sigma_t)
        return gaussian_kl(out.mean, ref.mean, out.std)

    @torch.no_grad()
    def _recompute_old_logp(self, latents, old_logp, old_mean, cond_all, sigmas, steps, first_parts):
        """``old_logp="recompute"``: the log-probs of the trained steps under the rollout policy, computed before the
        first update with the micro-batches (rows, order, batch shape) the first inner epoch trains with, so the first
        ratio is exactly 1 whatever the dtype (and the transition means with them, for ``ratio_norm``). ``steps`` is
        ``(trained steps, (n, T) mask of each sample's)``. Returns them and the log-probs' largest difference from the
        rollout's."""
        train_steps, trained = steps
        fresh = old_logp.clone()
        fresh_mean = old_mean.clone() if old_mean is not None else None
        bs = self.cfg.optim.train_batch_size
        for part in first_parts:
            for i in range(0, part.numel(), bs):
                mb = part[i : i + bs].tolist()
                for k in train_steps:
                    rows = self._rows_at(mb, k, trained)
                    if not rows:
                        continue
                    cond = cond_all.select(rows)
                    out = self._step_outputs(latents[rows, k], latents[rows, k + 1], k, sigmas, cond)
                    fresh[rows, k] = out.log_prob
                    if fresh_mean is not None:
                        fresh_mean[rows, k] = out.mean
        cols = list(train_steps)
        diff = (fresh[:, cols] - old_logp[:, cols]).abs()
        local = torch.tensor([float(diff.max()) if diff.numel() else 0.0], device=self.device)
        return fresh, fresh_mean, float(self.gather(local).max())

    def _accumulate_part(self, part, per_process, latents, old, adv, cond_all, sigmas, steps, stats):
        """Backward passes of one part's micro-batches: the gradient of the part's mean over all processes' samples of
        each sample's mean loss over its trained steps (``per_process``: the part's global size over the process
        count, the mean the gradient all-reduce takes). ``old`` is ``(old log-probs, old transition means or
        None)``; ``steps`` is ``(trained steps, (n, T) mask of each sample's, steps per sample)``: each step's forward
        takes the micro-batch's rows that train it. Returns True when a loss was not finite."""
        cfg, g, model = self.cfg, self.cfg.flow_grpo, self.model
        old_logp, old_mean = old
        train_steps, trained, per_sample = steps
        guard = g.ratio_norm or g.grad_reweight
        bad = False
        for i in range(0, part.numel(), cfg.optim.train_batch_size):
            batch = part[i : i + cfg.optim.train_batch_size].tolist()
            step_logps, step_old = [], []
            total = 0.0
            kl_sum = torch.zeros((), device=self.device)  # trajectory_ratio: the KL of every trained step
            for k in train_steps:
                mb = self._rows_at(batch, k, trained)  # every row of the micro-batch unless random
                if not mb:
                    continue
                cond = cond_all.select(mb)
                weight = len(mb) / per_process / per_sample
                x, x_next = latents[mb, k], latents[mb, k + 1]
                out = self._step_outputs(x, x_next, k, sigmas, cond)
                loss_k = torch.zeros((), device=self.device)
                kl = torch.zeros((), device=self.device)
                if g.kl_beta > 0:
                    with torch.no_grad(), model.disable_adapter():
                        ref = self._step_outputs(x, x_next, k, sigmas, cond)
                    kl = self._kl(out, ref, sigmas, k).mean()
                    loss_k = loss_k + g.kl_beta * kl
                if g.trajectory_ratio:
                    step_logps.append(out.log_prob)
                    step_old.append(old_logp[mb, k])
                    total = total + loss_k * weight
                    kl_sum = kl_sum + kl.detach()
                elif guard:  # GRPO-Guard: the normalised ratio and/or the 1 / |dt| weight of the policy term
                    ppo = grpo_guard_loss(
                        out.log_prob,
                        old_logp[mb, k],
                        adv[mb],
                        mean=out.mean,
                        old_mean=old_mean[mb, k] if g.ratio_norm else None,
                        std=out.std,
                        step_weight=guard_step_weight(sigmas[k], sigmas[k + 1]) if g.grad_reweight else 1.0,
                        ratio_norm=g.ratio_norm,
                        clip_range=g.clip_range,
                        clip_range_high=g.clip_range_high or None,
                    )
                    loss_k = loss_k + ppo.loss
                    self._accumulate(stats, ppo, kl, len(mb))
                    if not torch.isfinite(loss_k):
                        bad = True
                    self.backward(loss_k * weight)
                else:
                    ppo = ppo_clip_loss(
                        out.log_prob,
                        old_logp[mb, k],
                        adv[mb],
                        clip_range=g.clip_range,
                        clip_range_high=g.clip_range_high or None,
                    )
                    loss_k = loss_k + ppo.loss
                    self._accumulate(stats, ppo, kl, len(mb))
                    if not torch.isfinite(loss_k):
                        bad = True
                    self.backward(loss_k * weight)
            if g.trajectory_ratio:
                ppo = ppo_clip_loss(
                    torch.stack(step_logps, 1),
                    torch.stack(step_old, 1),
                    adv[batch],
                    clip_range=g.clip_range,
                    clip_range_high=g.clip_range_high or None,
                    trajectory_ratio=True,
                )
                total = total + ppo.loss * len(batch) / per_process
                # the micro-batch's mean KL over its trained steps, as the per-step branch logs it
                self._accumulate(stats, ppo, kl_sum / len(train_steps), len(batch))
                if not torch.isfinite(total):
                    bad = True
                self.backward(total)
        return bad

    @staticmethod
    def _accumulate(stats, ppo, kl, weight: int) -> None:
        stats["loss"] += float(ppo.loss.detach()) * weight
        stats["kl"] += float(kl.detach()) * weight
        stats["clipfrac"] += float(ppo.clipfrac) * weight
        stats["ratio_mean"] += float(ppo.ratio.mean()) * weight
        stats["approx_kl"] += float(ppo.approx_kl) * weight
        stats["count"] += weight
