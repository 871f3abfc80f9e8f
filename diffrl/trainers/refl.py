"""ReFL (Xu et al., ImageReward, arXiv 2304.05977) and DRaFT-K (Clark et al., arXiv 2309.17400): reward
backpropagation through the last sampling steps.

Per step and prompt: draw a stop index ``j`` in ``[stop_min * T, stop_max * T)``; run the ODE steps before it
without grad; then ``grad_steps`` (K) Euler steps with grad, the last of which jumps from level ``s_j`` straight
to ``0`` (``x0_hat = x - s_j v_theta(x, s_j)``, ReFL's one-step prediction; K = 1 is ReFL, K > 1 is DRaFT-K with
per-step gradient checkpointing when ``model.gradient_checkpointing`` is on). Decode with grad, score with a
differentiable reward and minimise

    L = scale * mean(relu(target - r))   (hinge, the reference with ImageReward)   or   -scale * mean(r)  (linear)
        + kl_weight * mean((v_theta - v_base)^2) over the grad steps   (DRaFT+/KL-style regulariser, optional),

with ``v_base`` the network with its adapter disabled.

Deviations: the reference (SD1.4, 40 steps) stops at steps 30-39; here the stop range is a fraction of the
configured steps. The paper's optional pre-training (denoising) loss is not included.
"""

from __future__ import annotations

import numpy as np
import torch

from diffrl.samplers import rollout

from .engine import Trainer
from .objectives import refl_loss

__all__ = ["ReFLTrainer"]


class ReFLTrainer(Trainer):
    algorithm = "refl"
    needs_differentiable_reward = True

    def derived_sizes(self):
        c = self.cfg.refl
        return {
            "num_processes": self.world,
            "images_per_process": c.prompts_per_step // self.world,
            "images_per_step": c.prompts_per_step,
        }

    def _stop_index(self, num_steps: int) -> int:
        c = self.cfg.refl
        lo = min(num_steps - 1, int(c.stop_min * num_steps))
        hi = max(lo + 1, min(num_steps, int(np.ceil(c.stop_max * num_steps))))
        lo = max(lo, c.grad_steps - 1)
        hi = max(hi, lo + 1)
        return int(np.random.default_rng([self.cfg.seed, self.step, 32452843]).integers(lo, hi))

    def train_step(self, step: int) -> dict[str, float]:
        cfg, c, s = self.cfg, self.cfg.refl, self.cfg.sample
        model = self.model
        batch = self.step_batch(c.prompts_per_step)
        n = len(batch.prompts)
        sigmas = model.schedule(s.num_steps, s.height, s.width)
        j = self._stop_index(s.num_steps)
        K = min(c.grad_steps, j + 1)
        # levels s_0 .. s_j, then a last jump to 0: the grad window is the last K steps of this schedule
        levels = torch.cat([sigmas[: j + 1], sigmas.new_zeros(1)])
        cond_all = model.encode(batch.prompts)
        sums = {"loss": 0.0, "kl": 0.0}
        rewards_all = []
        components: dict[str, list] = {}
        bad = False
        for i in range(0, n, cfg.optim.train_batch_size):
            mb = list(range(i, min(n, i + cfg.optim.train_batch_size)))
            cond = cond_all.select(mb)
            noise = model.sample_noise(len(mb), s.height, s.width, self.row_generators(1, mb, self.rank * n))
            with self.autocast():
                head = (
                    rollout(model, cond, levels[: levels.numel() - K], noise, guidance_scale=s.guidance_scale)
                    if K < levels.numel() - 1
                    else None
                )
            x = head.final if head is not None else noise
            kl = torch.zeros((), device=self.device)
            for k in range(levels.numel() - 1 - K, levels.numel() - 1):
                sig = levels[k].expand(len(mb))
                with self.autocast():
                    v = model.velocity(x, sig, cond, s.guidance_scale).float()
                if c.kl_weight > 0:
                    with torch.no_grad(), model.disable_adapter(), self.autocast():
                        v_ref = model.velocity(x.detach(), sig, cond, s.guidance_scale).float()
                    kl = kl + ((v - v_ref) ** 2).mean() / K
                x = x.float() + (levels[k + 1] - levels[k]) * v
            images = model.decode(x)
            prompts_mb = [batch.prompts[m] for m in mb]
            meta_mb = {key: [vals[m] for m in mb] for key, vals in batch.metadata.items()}
            scored = self.reward.evaluate(images, prompts_mb, **meta_mb)
            r = scored.total.float()
            loss = refl_loss(r, kind=c.loss, target=c.target, scale=c.scale) + c.kl_weight * kl
            if not torch.isfinite(loss):
                bad = True
            w = len(mb) / n
            self.accelerator.backward(loss * w)
            sums["loss"] += float(loss.detach()) * w
            sums["kl"] += float(kl.detach()) * w
            rewards_all.append(r.detach())
            for name, v in scored.components.items():
                components.setdefault(name, []).append(v.detach().float())
        rewards = self.gather(torch.cat(rewards_all).to(self.device))
        metrics = self.reward_metrics({name: torch.cat(v) for name, v in components.items()}, rewards)
        if bad or not torch.isfinite(rewards).all():
            self.optimizer.zero_grad(set_to_none=True)
            return {**metrics, "train/skipped": 1.0}
        metrics.update(self.finish_update())
        metrics["train/loss"] = self.mean_over_processes(sums["loss"])
        metrics["train/kl"] = self.mean_over_processes(sums["kl"])
        metrics["train/stop_index"] = float(j)
        metrics["train/skipped"] = 0.0
        return metrics
