"""Diffusion-DPO on flow matching (Wallace et al., arXiv 2311.12908; Flow-DPO of Liu et al., arXiv 2501.13918).

Direct preference optimisation without a reward model in the loss: for a prompt ``c`` and a pair of images (chosen
``x0_w``, rejected ``x0_l``), noise both to the same level ``t`` with the same noise ``eps``,
``x_t = (1 - t) x0 + t eps``, and compare how well the trained model and the frozen reference (the same network with
its LoRA adapter off) predict the flow-matching velocity ``eps - x0`` of each:

    e(v, x0) = mean_d (v(x_t, t, c) - (eps - x0))^2
    z        = -(beta / 2) * [ (e(v_theta, x0_w) - e(v_ref, x0_w)) - (e(v_theta, x0_l) - e(v_ref, x0_l)) ]
    L        = -log sigmoid(z)                                       (:func:`~.objectives.flow_dpo_loss`)

averaged over the step's pairs and ``num_train_timesteps`` levels, one optimiser update per step. ``z`` is the
implicit reward margin: positive when the trained model fits the chosen sample better than the reference does,
relative to the rejected one. At the start (adapter = reference) ``z = 0`` and ``L = log 2``.

The pairs come from one of two places (``dpo.mode``):

* ``offline``: a preference dataset (``dpo.dataset``: a ``{prompt, chosen, rejected}`` .jsonl of images or latents,
  or Pick-a-Pic style data), its images VAE-encoded once and cached (:mod:`diffrl.trainers.preferences`);
  ``pairs_per_step`` pairs per step, in a new random order every epoch (from ``seed`` and the epoch);
* ``online``: every ``online_every`` steps, ``group_size`` images per prompt for ``prompts_per_step`` prompts are
  sampled from the current policy (the ODE, ``sample.guidance_scale``; ``rollout_policy=reference`` samples the
  reference instead and ``sampler=sde`` takes Flow-GRPO's SDE steps, as the Flow-GRPO DPO script does), scored
  with the configured reward (a pairwise judge takes part as its win-rate reward, ``diffrl.rewards.GroupWinRate``),
  and paired within each group (:func:`~.objectives.preference_pairs`: best against worst, or all pairs with a
  reward margin); the steps in between train again on the same pairs with fresh levels and noise. Rows with a conditioning image
  (``metadata["image"]``: FLUX.2's reference images, Qwen-Image-Edit's source image) are sampled and trained with it.

Sources and choices (details in docs/trainers/dpo.md):

* beta and the timestep weighting: a constant ``beta`` on the per-sample *mean* squared velocity error, as the
  Flow-GRPO repository's DPO script does (``yifan123/flow_grpo``, ``scripts/train_sd3_dpo.py``: ``-0.5 * beta`` on
  per-sample means, ``config/dpo.py``: beta 100, diffrl's default), and so do Flow-Factory's DPO trainer
  (``src/flow_factory/trainers/dpo.py``, default 2000) and diffusers' Diffusion-DPO script
  (``examples/research_projects/diffusion_dpo``). The paper's ``beta T w(lambda_t)`` with summed errors is the same
  loss with ``beta_sum = beta / (2 D)`` (D latent dimensions; tested). Flow-DPO derives a time-dependent ``beta_t``
  from the flow-matching ELBO and trains with a constant beta *(verify)*; diffrl has no time-dependent weighting.
* Levels: logit-normal (the Flow-GRPO script's and Flow-Factory's default, SD3's training distribution; the script
  draws indices into the scheduler's shifted training timesteps, diffrl the continuous shifted level) or uniform
  (the paper's ``t ~ U``); the same level and noise for the two samples of a pair (the paper's shared ``t``; both
  scripts repeat the noise for the pair).
* The trained velocity is CFG-free (guidance 1, or FLUX.1-dev's guidance embedding, which is not CFG), as
  Diffusion-DPO trains the conditional network. Online rollouts use ``sample.guidance_scale``.
* Deviations: images are encoded to the VAE posterior's mean, not a sample (diffusers' script samples), so the cache
  holds the encoding; implicit accuracy counts ``z > 0`` (ties, as at the start, count as wrong), as diffusers' does.
  Invalid online pair slots (ties, margins not above ``min_margin``) are kept with weight 0, so every process runs
  the same forwards; the loss is the mean over the valid pairs of all processes. A step with no valid pair anywhere
  makes no update (``train/num_pairs = 0``).
* The reference is the base model (the LoRA adapter off), or with ``ref_update_every > 0`` a second adapter that
  becomes a copy of the trained one every that many steps (the Flow-GRPO script's ``ref_update_step``).
* Not implemented: the paper's SFT-loss mix, DPO variants (e.g. a linear utility or an EMA reference).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import torch

from diffrl.samplers import rollout

from .engine import Trainer
from .objectives import flow_dpo_loss, preference_pairs

__all__ = ["DPOTrainer", "dpo_levels"]

REF = "dpo_ref"  # the adapter that holds the reference with dpo.ref_update_every > 0
_PAIR_KEY = 6  # row_generators purpose of the pairs' levels and noise
_ORDER_KEY = 49979687  # keeps the offline epoch orders apart from every other draw


def dpo_levels(u: torch.Tensor, how: str, shift: float) -> torch.Tensor:
    """Levels ``t`` in (0, 1) from draws ``u``: ``logit_normal`` takes ``u`` standard normal and gives ``sigmoid(u)``,
    ``uniform`` takes ``u`` uniform in [0, 1); then the shift ``s t / (1 + (s - 1) t)``, clamped to [1e-4, 1 - 1e-4]."""
    t = torch.sigmoid(u.float()) if how == "logit_normal" else u.float()
    t = shift * t / (1 + (shift - 1) * t)
    return t.clamp(1e-4, 1 - 1e-4)


class DPOTrainer(Trainer):
    algorithm = "dpo"

    def setup(self) -> None:
        """With ``ref_update_every``: the reference as a second LoRA adapter, float32, a copy of the trained one.
        Offline: the preference pairs as latents (encoded once, cached; the main process writes the cache)."""
        d = self.cfg.dpo
        self.pairs = None
        self.buffer = None  # online: the last sampling round's pairs
        self.ref_params = []
        if d.ref_update_every > 0:
            self.ref_params = self.add_adapter_copy(REF)
        if d.mode != "offline":
            return
        from .preferences import load_preference_pairs

        s = self.cfg.sample
        cache = d.cache_dir or self.cfg.output_dir
        main = self.accelerator.is_main_process
        if main:
            self.pairs = load_preference_pairs(d.dataset, self.model, s.height, s.width, cache)
        self.accelerator.wait_for_everyone()
        if not main:
            self.pairs = load_preference_pairs(d.dataset, self.model, s.height, s.width, cache, write=False)

    def after_sharding(self) -> None:
        if self.ref_params:
            self.ref_params = self.adapter_params(REF)

    def reference(self):
        """A block in which the model is the reference: the ``dpo_ref`` adapter with ``ref_update_every``, else the
        base model (the adapter off)."""
        return self.model.use_adapter(REF) if self.ref_params else self.model.disable_adapter()

    def derived_sizes(self):
        d = self.cfg.dpo
        if d.mode == "online":
            return self.group_sizes(d.prompts_per_step, d.group_size)
        return {"num_processes": self.world, "pairs_per_process": d.pairs_per_step // self.world}

    # ------------------------------------------------------------------------------------------ pairs
    def offline_batch(self, step: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """This process's pairs of ``step``: global slots ``[step P, (step + 1) P)`` of the epochs' orders, each epoch
        a permutation drawn from ``(seed, epoch)``; returns ``(prompts, chosen, rejected)``."""
        d, pairs = self.cfg.dpo, self.pairs
        n, per = len(pairs), d.pairs_per_step // self.world
        first = step * d.pairs_per_step + self.rank * per
        idx, orders = [], {}
        for slot in range(first, first + per):
            epoch, pos = divmod(slot, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.cfg.seed, _ORDER_KEY, epoch]).permutation(n)
            idx.append(int(orders[epoch][pos]))
        prompts = [pairs.prompts[i] for i in idx]
        return prompts, pairs.chosen[idx].to(self.device), pairs.rejected[idx].to(self.device)

    def online_round(self, metrics: dict[str, float]):
        """Sample ``group_size`` images per prompt from the current policy, score them, pair them within each group:
        ``(prompts, chosen, rejected, valid)`` of this process, or ``None`` when a reward was not finite."""
        d, s, model = self.cfg.dpo, self.cfg.sample, self.model
        batch = self.step_batch(d.prompts_per_step)
        prompts, metadata, group_ids = self.expand_groups(batch, d.group_size)
        sigmas = model.schedule(s.num_steps, s.height, s.width)
        cond_all = model.encode_rows(batch.prompts, batch.metadata).repeat_interleave(d.group_size)
        n = len(prompts)

        def sample_chunk(rows):
            stochastic = {}
            if d.sampler == "sde":  # every step an SDE step, each row's noise from its own generator
                stochastic = dict(
                    sampler="sde",
                    noise_level=d.noise_level,
                    generator=self.row_generators(2, rows, self.rank * n),
                )
            policy = self.reference() if d.rollout_policy == "reference" else contextlib.nullcontext()
            with torch.no_grad(), self.autocast(), policy:
                noise = model.sample_noise(
                    len(rows), s.height, s.width, self.row_generators(1, rows, self.rank * n)
                )
                return rollout(
                    model,
                    cond_all.select(rows),
                    sigmas,
                    noise,
                    guidance_scale=s.guidance_scale,
                    solver=d.solver,
                    **stochastic,
                ).final

        x0, scored = self.sample_and_score(n, sample_chunk, prompts, metadata)
        rewards = scored.total.float().to(self.device)
        all_rewards = self.gather(rewards)
        metrics.update(self.reward_metrics(scored.components, all_rewards))
        if not torch.isfinite(all_rewards).all():
            return None
        chosen, rejected, valid = preference_pairs(
            rewards.cpu(), group_ids.cpu(), mode=d.pairs, min_margin=d.min_margin
        )
        gap = (rewards.cpu()[chosen] - rewards.cpu()[rejected]).double()
        valid_all = self.gather(valid.float().to(self.device))
        gap_all = self.gather((gap * valid).float().to(self.device))
        metrics["sample/pair_frac"] = float(valid_all.mean())
        metrics["sample/pair_reward_gap"] = float(gap_all.sum() / valid_all.sum().clamp(min=1))
        x0 = x0.float()
        # the pairs' metadata (a source image of an image-conditioned model) goes with them to the training pass
        pair_metadata = {k: [v[i] for i in chosen.tolist()] for k, v in metadata.items()}
        return (
            [prompts[i] for i in chosen.tolist()],
            x0[chosen],
            x0[rejected],
            valid.to(self.device),
            pair_metadata,
        )

    # ------------------------------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict[str, float]:
        d = self.cfg.dpo
        metrics: dict[str, float] = {}
        if self.ref_params and step > 0 and step % d.ref_update_every == 0:  # the reference catches up
            with torch.no_grad():
                for r, p in zip(self.ref_params, self.params, strict=True):
                    r.copy_(p.detach().float())
            metrics["train/ref_updated"] = 1.0
        if d.mode == "offline":
            prompts, x_w, x_l = self.offline_batch(step)
            valid = torch.ones(len(prompts), dtype=torch.bool, device=self.device)
            pair_metadata = {}
        else:
            if self.buffer is None or step % d.online_every == 0:
                got = self.online_round(metrics)
                if got is None:
                    self.buffer = None
                    return {**metrics, "train/skipped": 1.0}
                self.buffer = got
                metrics["sample/new_pairs"] = 1.0
            else:
                metrics["sample/new_pairs"] = 0.0
            prompts, x_w, x_l, valid, pair_metadata = self.buffer
        metrics.update(self.train_on_pairs(prompts, x_w, x_l, valid, pair_metadata))
        return metrics

    def pair_draws(self, p: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """Levels ``(p, K)`` and noise ``(p, K, *shape)`` of this process's ``p`` pair slots, each slot's from a
        generator keyed by ``(seed, step, global slot)``: micro-batching and the process count change neither."""
        d = self.cfg.dpo
        k = d.num_train_timesteps
        levels, noise = [], []
        for g in self.row_generators(_PAIR_KEY, range(p), self.rank * p):
            u = torch.randn(k, generator=g) if d.timesteps == "logit_normal" else torch.rand(k, generator=g)
            levels.append(dpo_levels(u, d.timesteps, d.time_shift))
            noise.append(torch.randn((k, *shape), generator=g))
        return torch.stack(levels).to(self.device), torch.stack(noise).to(self.device)

    def train_on_pairs(self, prompts, x_w, x_l, valid, metadata=None) -> dict[str, float]:
        """One optimiser update on the pairs: the gradient of the mean DPO loss over the valid pairs of every process
        and the levels. ``metadata`` (one list per key, one entry per pair) reaches the model's ``encode_rows``."""
        cfg, d, model = self.cfg, self.cfg.dpo, self.model
        p = len(prompts)
        n_valid = float(self.sum_over_processes(valid.float().sum().reshape(1).double())[0])
        metrics = {"train/num_pairs": n_valid}
        if n_valid == 0:  # nothing to learn from anywhere: no update
            return {**metrics, "train/skipped": 0.0}
        per_process = n_valid / self.world
        levels, eps_all = self.pair_draws(p, x_w.shape[1:])
        cond_all = model.encode_rows(prompts, metadata)
        guidance = self.cfg_free_guidance()
        k = levels.shape[1]
        names = ("loss", "implicit_acc", "reward_margin", "model_err_chosen", "model_err_rejected")
        sums = dict.fromkeys((*names, "ref_err_chosen", "ref_err_rejected"), 0.0)
        bad = False
        for i in range(0, p, cfg.optim.train_batch_size):
            mb = list(range(i, min(p, i + cfg.optim.train_batch_size)))
            b = len(mb)
            cond = cond_all.select(mb + mb)  # chosen rows, then rejected rows
            w = valid[mb].float() / per_process / k
            for li in range(k):
                t = levels[mb, li]
                eps = eps_all[mb, li]
                t_x = t.view(-1, *([1] * (x_w.ndim - 1)))
                x_t = torch.cat([(1 - t_x) * x_w[mb] + t_x * eps, (1 - t_x) * x_l[mb] + t_x * eps])
                t2 = torch.cat([t, t])
                with self.autocast():
                    v = model.velocity(x_t, t2, cond, guidance).float()
                with torch.no_grad(), self.autocast(), self.reference():
                    v_ref = model.velocity(x_t, t2, cond, guidance).float()
                stats = flow_dpo_loss(v[:b], v[b:], v_ref[:b], v_ref[b:], x_w[mb], x_l[mb], eps, d.beta)
                loss = (stats.loss * w).sum()
                if not torch.isfinite(loss):
                    bad = True
                self.backward(loss)
                for key, value in (
                    ("loss", stats.loss.detach()),
                    ("implicit_acc", (stats.z > 0).float()),
                    ("reward_margin", stats.z),
                    ("model_err_chosen", stats.model_err_chosen),
                    ("model_err_rejected", stats.model_err_rejected),
                    ("ref_err_chosen", stats.ref_err_chosen),
                    ("ref_err_rejected", stats.ref_err_rejected),
                ):
                    sums[key] += float((value * w).sum())
        if self.any_over_processes(bad):
            self.discard_gradients()
            return {**metrics, "train/skipped": 1.0}
        metrics.update(self.finish_update())
        for key, value in sums.items():
            metrics[f"train/{key}"] = self.mean_over_processes(value)
        metrics["train/skipped"] = 0.0
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoints
    def extra_state(self):
        """The reference adapter with ``ref_update_every``; online with ``online_every > 1``, the pairs of the last
        sampling round and their prompts (JSON bytes), so a run resumed between two rounds trains on the same pairs
        (one process only: see the config check)."""
        ref = {}
        if self.ref_params:
            ref = {f"{REF}.{n}": r.detach() for n, r in zip(self.param_names, self.ref_params, strict=True)}
        if self.cfg.dpo.mode != "online" or self.cfg.dpo.online_every == 1 or self.buffer is None:
            return ref
        prompts, x_w, x_l, valid, metadata = self.buffer
        names = json.dumps(list(prompts)).encode()
        kept = {}  # the metadata fields JSON can hold (a source image's path; not a PIL image)
        for key, values in metadata.items():
            try:
                json.dumps(values)
            except TypeError:
                # the condition of an image-conditioned model: a resume without it would differ
                if key == "image":
                    raise ValueError(
                        "the pairs' conditioning images are not file paths, so a checkpoint cannot hold them; name "
                        "them by path in the prompt file, or set dpo.online_every=1."
                    ) from None
                continue
            kept[key] = values
        meta = json.dumps(kept).encode()
        return {
            **ref,
            "dpo_buffer.metadata": torch.frombuffer(bytearray(meta), dtype=torch.uint8).clone(),
            "dpo_buffer.chosen": x_w.contiguous(),
            "dpo_buffer.rejected": x_l.contiguous(),
            "dpo_buffer.valid": valid.to(torch.uint8),
            "dpo_buffer.prompts": torch.frombuffer(bytearray(names), dtype=torch.uint8).clone(),
        }

    def load_extra_state(self, tensors):
        if self.ref_params:
            with torch.no_grad():
                for n, r in zip(self.param_names, self.ref_params, strict=True):
                    self.assign_(r, tensors[f"{REF}.{n}"])
        if "dpo_buffer.chosen" not in tensors:
            return
        prompts = json.loads(bytes(tensors["dpo_buffer.prompts"].cpu().numpy().tobytes()).decode())
        meta = tensors.get("dpo_buffer.metadata")
        metadata = {} if meta is None else json.loads(bytes(meta.cpu().numpy().tobytes()).decode())
        self.buffer = (
            prompts,
            tensors["dpo_buffer.chosen"].to(self.device),
            tensors["dpo_buffer.rejected"].to(self.device),
            tensors["dpo_buffer.valid"].bool().to(self.device),
            metadata,
        )
