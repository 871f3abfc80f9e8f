"""DiffusionNFT: online RL on the forward process (Zheng et al., arXiv 2509.16117).

Per step: sample G images per prompt from the *old* policy with a deterministic solver (Euler or DPM-Solver++ 2M)
and no CFG, keeping only the clean latents ``x0``; score them; turn rewards into optimality probabilities
``r = clamp(0.5 + clip(A, +-5) / 10, 0, 1)`` with ``A = (R - mean_prompt R) / (global std + 1e-4)``. Then, at
training levels ``s`` drawn from the rollout's levels, with fresh noise ``x_s = (1 - s) x0 + s eps``:

    v+ = beta v_theta + (1 - beta) sg(v_old),   v- = (1 + beta) sg(v_old) - beta v_theta,
    L  = (5 / beta) * [ r * l(v+) + (1 - r) * l(v-) ]  +  kl_weight * mean((v_theta - v_base)^2),

with ``l`` the reference code's adaptive x0-space loss (default) or the paper's velocity loss, and ``v_base`` the
network with its adapter disabled. After the step's updates the old policy moves towards the current one:
``theta_old <- d theta_old + (1 - d) theta`` with ``d = min(rate * (u - flat), cap)``, ``u`` the optimiser updates so
far.

The old policy is a second LoRA adapter (``"old"``) on the same transformer, so no second model copy is kept. Both
adapters are float32 whatever the model's dtype (PEFT makes a new adapter in the base layer's dtype; in bf16 the soft
update could not move it at d = 0.999).

The reference code (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py), and where diffrl lets a run differ from it:

* ``num_minibatches``: optimiser updates per step (the reference's ``gradient_step_per_epoch``, 2 for OCR); the decay
  ``d`` counts optimiser updates made so far, this step's included, as the reference's global step does.
* ``per_sample_levels``: the reference draws a level order per sample; diffrl's default shares one draw by the step
  (unchanged from earlier versions, so their runs resume and reproduce).
* ``solver``: the rollouts' deterministic solver, the Euler ODE by default (unchanged from earlier versions) or the
  reference's second-order multistep DPM-Solver++ (``dpm2``); any deterministic solver is allowed by the method.
  The reference's sampling pipeline passes the timestep to the transformer as an integer (``sigma * 1000`` floored),
  diffrl as the exact float, as both do when training.
* The training levels are ``num_train_levels`` of the rollout's non-zero levels in random order (default: all
  but one, the reference's ``int(0.99 T)``).
"""

from __future__ import annotations

import numpy as np
import torch

from diffrl.samplers import rollout

from .engine import Trainer
from .objectives import group_advantages, nft_loss, nft_old_policy_decay, nft_optimality

__all__ = ["DiffusionNFTTrainer"]

OLD = "old"


class DiffusionNFTTrainer(Trainer):
    algorithm = "diffusion_nft"

    def setup(self) -> None:
        self.old_params = self.add_adapter_copy(OLD)

    def after_sharding(self) -> None:
        self.old_params = self.adapter_params(OLD)

    def derived_sizes(self):
        c = self.cfg.diffusion_nft
        return self.group_sizes(c.prompts_per_step, c.group_size)

    def updates_per_step(self) -> int:
        return self.cfg.diffusion_nft.num_minibatches

    def train_step(self, step: int) -> dict[str, float]:
        cfg, c, s = self.cfg, self.cfg.diffusion_nft, self.cfg.sample
        model = self.model
        batch = self.step_batch(c.prompts_per_step)
        G = c.group_size
        prompts, metadata, group_ids = self.expand_groups(batch, G)
        sigmas = model.schedule(s.num_steps, s.height, s.width)
        guidance = self.cfg_free_guidance()
        cond_all = model.encode_rows(batch.prompts, batch.metadata).repeat_interleave(G)

        # 1. rollouts of the old policy (ODE, no grad), keep x0
        n = len(prompts)

        def sample_chunk(rows):
            with torch.no_grad(), model.use_adapter(OLD), self.autocast():
                noise = model.sample_noise(
                    len(rows), s.height, s.width, self.row_generators(1, rows, self.rank * n)
                )
                return rollout(
                    model, cond_all.select(rows), sigmas, noise, guidance_scale=guidance, solver=c.solver
                ).final

        x0, scored = self.sample_and_score(n, sample_chunk, prompts, metadata)
        rewards = scored.total.float().to(self.device)
        all_rewards = self.gather(rewards)
        metrics = self.reward_metrics(scored.components, all_rewards)
        if not torch.isfinite(all_rewards).all():
            return {**metrics, "train/skipped": 1.0}
        # the rows trained on (with train_per_group, each group's most varied; as many on every process) and their
        # advantages among themselves; the other rows are not trained (their r is never read)
        rows = self.pods_rows(rewards, G, c.train_per_group)
        nk = len(rows)
        all_groups = self.gather(self.advantage_groups(prompts, group_ids)[rows].to(self.device))
        adv_all = group_advantages(self.gather(rewards[rows]), all_groups, std="global", clip=c.adv_clip)
        r = torch.full((n,), 0.5, device=self.device)
        r[rows] = nft_optimality(adv_all.values[self.rank * nk : (self.rank + 1) * nk], c.adv_clip).to(
            r.device
        )
        metrics["sample/zero_std_frac"] = float(adv_all.zero_std.float().mean())
        if nk < n:
            metrics["sample/kept_reward_std"] = float(self.gather(rewards[rows]).std(unbiased=False))

        # 2. training levels and the NFT loss
        levels = sigmas[:-1]
        k = min(c.num_train_levels or max(1, levels.numel() - 1), levels.numel())
        if c.per_sample_levels:  # each sample its own order of the levels, keyed by its global row
            pick = np.stack(
                [
                    np.random.default_rng([cfg.seed, self.step, 15485863, self.rank * n + i]).permutation(
                        levels.numel()
                    )[:k]
                    for i in range(n)
                ]
            )
        else:
            pick = np.tile(
                np.random.default_rng([cfg.seed, self.step, 15485863]).permutation(levels.numel())[:k], (n, 1)
            )
        # (n, k): the level index of sample i's li-th training level
        pick = torch.as_tensor(pick, device=levels.device)
        # the noise of every (level, sample) drawn up front and per global row, so neither micro-batching nor the
        # number of processes changes which noise a sample gets
        eps_all = torch.stack(
            [
                torch.randn((k, *x0.shape[1:]), generator=g)
                for g in self.row_generators(4, range(n), self.rank * n)
            ],
            dim=1,
        ).to(self.device)
        # the samples in num_minibatches parts, one optimiser update after each (one part: in row order)
        order = torch.tensor(rows, dtype=torch.long)
        if c.num_minibatches > 1:
            order = order[torch.randperm(nk, generator=self.generator(5))]
        parts = list(torch.tensor_split(order, c.num_minibatches))
        sizes = self.sum_over_processes(torch.tensor([p.numel() for p in parts], dtype=torch.float64))
        sums = {"policy_loss": 0.0, "kl": 0.0, "old_deviate": 0.0}
        for part, size in zip(parts, sizes.tolist(), strict=True):
            bad = self._accumulate_part(
                part, size / self.world, x0, r, levels, pick, eps_all, cond_all, guidance, sums
            )
            if self.any_over_processes(bad):
                self.discard_gradients()
                return {**metrics, "train/skipped": 1.0}
            metrics.update(self.finish_update())

        # 3. old policy soft update, its decay counted in optimiser updates (the reference's global step)
        d = nft_old_policy_decay(
            (self.step + 1) * c.num_minibatches, flat=c.decay_flat, rate=c.decay_rate, cap=c.decay_cap
        )
        with torch.no_grad():
            for o, p in zip(self.old_params, self.params, strict=True):
                o.mul_(d).add_(p.detach(), alpha=1 - d)
        for key, value in sums.items():  # each part added its mean: the mean over the parts
            metrics[f"train/{key}"] = self.mean_over_processes(value / len(parts))
        metrics["train/loss"] = metrics["train/policy_loss"] + c.kl_weight * metrics["train/kl"]
        metrics["train/old_decay"] = d
        metrics["train/skipped"] = 0.0
        return metrics

    def _accumulate_part(
        self, part, per_process, x0, r, levels, pick, eps_all, cond_all, guidance, sums
    ) -> bool:
        """Backward passes of one part's micro-batches at every training level: the gradient of the part's mean loss
        over all processes' samples and levels (``per_process``: the part's global size over the process count).
        Returns True when a loss was not finite."""
        cfg, c, model = self.cfg, self.cfg.diffusion_nft, self.model
        bad = False
        k = pick.shape[1]
        for i in range(0, part.numel(), cfg.optim.train_batch_size):
            mb = part[i : i + cfg.optim.train_batch_size].tolist()
            cond = cond_all.select(mb)
            for li in range(k):
                sig_b = levels[pick[mb, li]]  # (B,) each sample's level
                eps = eps_all[li, mb]
                s_b = sig_b.view(-1, *([1] * (x0.ndim - 1)))
                x_s = (1 - s_b) * x0[mb] + s_b * eps
                with self.autocast():
                    v = model.velocity(x_s, sig_b, cond, guidance).float()
                with torch.no_grad(), self.autocast():
                    with model.use_adapter(OLD):
                        v_old = model.velocity(x_s, sig_b, cond, guidance).float()
                    if c.kl_weight > 0:
                        with model.disable_adapter():
                            v_ref = model.velocity(x_s, sig_b, cond, guidance).float()
                policy = nft_loss(v, v_old, x_s, x0[mb], sig_b, r[mb], c.beta, weighting=c.weighting) * (
                    c.adv_clip / c.beta
                )
                loss = policy.mean()
                kl = ((v - v_ref) ** 2).mean() if c.kl_weight > 0 else torch.zeros((), device=self.device)
                loss = loss + c.kl_weight * kl
                if not torch.isfinite(loss):
                    bad = True
                w = len(mb) / per_process / k
                self.backward(loss * w)
                sums["policy_loss"] += float(policy.detach().mean()) * w
                sums["kl"] += float(kl.detach()) * w
                sums["old_deviate"] += float(((v.detach() - v_old) ** 2).mean()) * w
        return bad

    def extra_state(self):
        return {f"old.{n}": o.detach() for n, o in zip(self.param_names, self.old_params, strict=True)}

    def load_extra_state(self, tensors):
        with torch.no_grad():
            for n, o in zip(self.param_names, self.old_params, strict=True):
                self.assign_(o, tensors[f"old.{n}"])
