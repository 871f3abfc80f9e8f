"""ReFL (Xu et al., ImageReward, arXiv 2304.05977) and DRaFT-K (Clark et al., arXiv 2309.17400): reward
backpropagation through the last sampling steps.

Per step and prompt: draw a stop index ``j`` in ``[stop_min * T, stop_max * T)``; run the ODE steps before it
without grad; then ``grad_steps`` (K) Euler steps with grad, the last of which jumps from level ``s_j`` straight
to ``0`` (``x0_hat = x - s_j v_theta(x, s_j)``, ReFL's one-step prediction; K = 1 is ReFL, K > 1 is DRaFT-K;
``model.gradient_checkpointing`` turns on the transformer's own checkpointing). Decode with grad, score with a
differentiable reward and minimise

    L = scale * mean(relu(target - r))   (hinge, the reference with ImageReward)   or   -scale * mean(r)  (linear)
        + kl_weight * mean((v_theta - v_base)^2) over the grad steps   (DRaFT+/KL-style regulariser, optional)
        + denoise_weight * mean((v_theta(x_s, s, c) - (eps - x0))^2)   (denoising regulariser, optional),

with ``v_base`` the network with its adapter disabled. The denoising term is ReFL's pre-training loss with the
model's own samples as data (there is no pre-training set here): ``x0`` is the final latent of the full ODE sample
from the step's noise (``x0_hat`` itself, detached, when ``j`` is the last step; otherwise the ODE runs on without
grad from the window's latent at ``s_j`` to 0: ``T - j`` extra sampling steps), ``s = sigmoid(n)`` with
``n ~ N(0, 1)`` (logit-normal, the level distribution of SD3's and the toy model's pre-training), fresh noise
``eps``, ``x_s = (1 - s) x0 + s eps``, both per sample from the step's row generators; ``v_theta`` is the plain
conditional velocity (no CFG; FLUX keeps its distilled guidance embedding at ``sample.guidance_scale``).

A combined reward with ``reward_normalize: batch`` is z-scored with the statistics of the whole step (all
micro-batches, all processes), not of each micro-batch: every micro-batch is first sampled and scored without grad
(one extra pass over the grad window, the decode and the reward), then again with grad and normalised with those
fixed statistics (no gradient flows through them). ``running`` statistics update on every reward call, i.e. per
micro-batch and per process.

Guidance: the steps before the window use ``sample.guidance_scale``, the grad steps ``refl.grad_guidance_scale``
(default -1: the same). ImageReward's ReFL script samples CFG-free throughout (one conditional pass per step), which
``sample.guidance_scale: 1`` reproduces; the default keeps CFG in the grad steps so the trained model is the one
sampled with CFG at inference.

Deviations: the reference (SD1.4, 40 steps) stops at steps 30-39; here the stop range is a fraction of the
configured steps. The paper alternates the reward loss with a pre-training loss on pre-training data; here the
denoising term is added to every step's loss and its data are the model's own samples.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from diffrl.rewards import CombinedReward
from diffrl.samplers import rollout

from .engine import Trainer
from .objectives import denoising_loss, refl_loss

__all__ = ["ReFLTrainer"]

_DENOISE_ROWS = 5  # row-generator purpose of the denoising regulariser's levels and noise (1: initial noise)


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

    def _start(self, mb: list[int], n: int, cond, levels: torch.Tensor, K: int) -> torch.Tensor:
        """The latents of micro-batch ``mb`` where the grad window begins: seeded noise run through the ODE steps
        before the window, without grad."""
        s = self.cfg.sample
        noise = self.model.sample_noise(len(mb), s.height, s.width, self.row_generators(1, mb, self.rank * n))
        if K >= levels.numel() - 1:
            return noise
        with self.autocast():
            head = rollout(
                self.model, cond, levels[: levels.numel() - K], noise, guidance_scale=s.guidance_scale
            )
        return head.final

    def _window(
        self, x: torch.Tensor, cond, levels: torch.Tensor, K: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last K steps (with grad unless called under ``torch.no_grad()``): ``(x0_hat, KL-style term, the
        latents at s_j before the last jump, detached)``."""
        c, s, model = self.cfg.refl, self.cfg.sample, self.model
        guidance = c.grad_guidance_scale if c.grad_guidance_scale >= 0 else s.guidance_scale
        kl = torch.zeros((), device=self.device)
        x_j = x
        for k in range(levels.numel() - 1 - K, levels.numel() - 1):
            x_j = x
            sig = levels[k].expand(x.shape[0])
            with self.autocast():
                v = model.velocity(x, sig, cond, guidance).float()
            if c.kl_weight > 0 and torch.is_grad_enabled():
                with torch.no_grad(), model.disable_adapter(), self.autocast():
                    v_ref = model.velocity(x.detach(), sig, cond, guidance).float()
                kl = kl + ((v - v_ref) ** 2).mean() / K
            x = x.float() + (levels[k + 1] - levels[k]) * v
        return x, kl, x_j.detach()

    def _denoise(
        self,
        x0_hat: torch.Tensor,
        x_j: torch.Tensor,
        cond,
        sigmas: torch.Tensor,
        j: int,
        mb: list[int],
        n: int,
    ) -> torch.Tensor:
        """The denoising regulariser of micro-batch ``mb`` (with grad): flow matching on the model's own samples.

        ``x0`` is the final latent of the full ODE sample: ``x0_hat`` (detached) when ``j`` is the last step, else
        the ODE from ``x_j`` (at ``s_j``) through the rest of the schedule ``sigmas``, without grad. Each sample's
        level ``s = sigmoid(N(0, 1))`` and noise come from its row generator, so neither the micro-batch nor the
        number of processes changes them."""
        s, model = self.cfg.sample, self.model
        if j == sigmas.numel() - 2:
            x0 = x0_hat.detach().float()
        else:
            with torch.no_grad(), self.autocast():
                x0 = rollout(model, cond, sigmas[j:], x_j, guidance_scale=s.guidance_scale).final.float()
        gens = self.row_generators(_DENOISE_ROWS, mb, self.rank * n)
        level = torch.stack([torch.sigmoid(torch.randn((), generator=g)) for g in gens]).to(self.device)
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(self.device)
        level_b = level.view(-1, *([1] * (x0.ndim - 1)))
        x_s = (1 - level_b) * x0 + level_b * eps
        # no CFG: the conditional velocity; FLUX.1-dev's distilled guidance embedding is not CFG and stays on
        guidance = self.cfg_free_guidance()
        with self.autocast():
            v = model.velocity(x_s, level, cond, guidance).float()
        return denoising_loss(v, x0, eps)

    def _step_statistics(self, batch, micro_batches, cond_all, levels, K) -> tuple[dict, dict]:
        """``reward_normalize: batch`` over the whole step: each micro-batch is first sampled and scored without
        grad, the raw component scores are gathered over processes and their ``(mean, std)`` computed once. Returns
        the statistics and each micro-batch's starting latents (reused by the grad pass)."""
        n = len(batch.prompts)
        starts, components = {}, {}
        for i, mb in enumerate(micro_batches):
            cond = cond_all.select(mb)
            starts[i] = self._start(mb, n, cond, levels, K)
            with torch.no_grad():
                x0, _, _ = self._window(starts[i], cond, levels, K)
                images = self.model.decode(x0)
                meta_mb = {key: [vals[m] for m in mb] for key, vals in batch.metadata.items()}
                scored = self.evaluate_reward(self.reward, images, [batch.prompts[m] for m in mb], **meta_mb)
            for name, v in scored.components.items():
                components.setdefault(name, []).append(v.float())
        gathered = {name: self.gather(torch.cat(v).to(self.device)) for name, v in components.items()}
        return self.reward.batch_statistics(gathered), starts

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
        cond_all = model.encode_rows(batch.prompts, batch.metadata)
        bs = cfg.optim.train_batch_size
        micro_batches = [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]
        # the reward is called per micro-batch; a batch-normalised sum takes its statistics from the whole step
        whole_batch = isinstance(self.reward, CombinedReward) and self.reward.normalize == "batch"
        stats, starts = (
            self._step_statistics(batch, micro_batches, cond_all, levels, K) if whole_batch else ({}, {})
        )
        sums = {"loss": 0.0, "kl": 0.0, "denoise_loss": 0.0}
        rewards_all = []
        components: dict[str, list] = {}
        bad = False
        for i, mb in enumerate(micro_batches):
            cond = cond_all.select(mb)
            x = starts[i] if whole_batch else self._start(mb, n, cond, levels, K)
            x, kl, x_j = self._window(x, cond, levels, K)
            images = model.decode(x)
            prompts_mb = [batch.prompts[m] for m in mb]
            meta_mb = {key: [vals[m] for m in mb] for key, vals in batch.metadata.items()}
            with self.reward.fixed_statistics(stats) if whole_batch else contextlib.nullcontext():
                scored = self.evaluate_reward(self.reward, images, prompts_mb, **meta_mb)
            r = scored.total.float()
            loss = refl_loss(r, kind=c.loss, target=c.target, scale=c.scale) + c.kl_weight * kl
            if not torch.isfinite(loss):
                bad = True
            w = len(mb) / n
            self.backward(loss * w)
            if c.denoise_weight > 0:  # its own backward: the reward's graph is freed first
                denoise = self._denoise(x, x_j, cond, sigmas, j, mb, n)
                term = c.denoise_weight * denoise
                if not torch.isfinite(term):
                    bad = True
                self.backward(term * w)
                loss = loss.detach() + term.detach()
                sums["denoise_loss"] += float(denoise.detach()) * w
            sums["loss"] += float(loss.detach()) * w
            sums["kl"] += float(kl.detach()) * w
            rewards_all.append(r.detach())
            for name, v in scored.components.items():
                components.setdefault(name, []).append(v.detach().float())
        rewards = self.gather(torch.cat(rewards_all).to(self.device))
        metrics = self.reward_metrics({name: torch.cat(v) for name, v in components.items()}, rewards)
        if self.any_over_processes(bad) or not torch.isfinite(rewards).all():
            self.discard_gradients()
            return {**metrics, "train/skipped": 1.0}
        metrics.update(self.finish_update())
        metrics["train/loss"] = self.mean_over_processes(sums["loss"])
        metrics["train/kl"] = self.mean_over_processes(sums["kl"])
        if c.denoise_weight > 0:
            metrics["train/denoise_loss"] = self.mean_over_processes(sums["denoise_loss"])
        metrics["train/stop_index"] = float(j)
        metrics["train/skipped"] = 0.0
        return metrics
