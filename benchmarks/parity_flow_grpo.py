"""Parity of diffrl's Flow-GRPO update with the reference code (yifan123/flow_grpo), on the tiny random SD3 pipeline.

The reference is a training script, not a library: its sampler, SDE step, prompt encoder and advantage tracker are
importable modules, but the update itself is written inline in the 1000-line ``main()`` of ``scripts/train_sd3.py``
(whose imports need wandb, absl and ml_collections). This script (run by hand, not part of the test suite):

1. loads the reference from the clone given with ``--reference``: its config (``config/grpo.py``'s
   ``pickscore_sd3()``, read with a stand-in for ``ml_collections.ConfigDict`` when that package is missing, then
   shrunk to the tiny sizes: 3 prompts x 4 images of 32x32 pixels, ``sample.num_batches_per_epoch=4`` micro-batches,
   ``gradient_accumulation_steps=2`` (``num_batches_per_epoch // 2``, as that config sets it) so 2 optimiser updates
   per step, float32 on the CPU; everything else stays: 10 steps of which ``int(10 * 0.99) = 9`` are trained, CFG 4.5,
   noise level 0.7, clip range 1e-4, advantages clipped to 5, global std, AdamW 3e-4, grad-norm clip 1.0; the KL
   weight is ``--beta``); its modules ``flow_grpo.diffusers_patch.sd3_pipeline_with_logprob`` (sampling),
   ``sd3_sde_with_logprob`` (SDE step and log-prob), ``train_dreambooth_lora_sd3.encode_prompt`` and
   ``flow_grpo.stat_tracking.PerPromptStatTracker``; from ``scripts/train_sd3.py`` the functions
   ``compute_log_prob`` (CFG with the unconditional prediction detached) and ``compute_text_embeddings``, compiled
   alone from the file's syntax tree and executed, and the LoRA target list, the ``LoraConfig`` arguments (r=32,
   alpha=64) and the T5 length (128) that ``main()`` uses, read from its syntax tree;
2. re-writes the parts of ``main()`` that are inline (:class:`ReferenceRun`), following lines:

   * 377-471, set-up: a second copy of the pipeline with the frozen parts' grads off, the LoRA by
     ``get_peft_model`` (it also adapts the last block's ``attn.add_q_proj``, whose output SD3 discards; diffrl leaves
     that module out, the reference's copy gets a zero gradient and is not compared), ``torch.optim.AdamW`` with
     ``config.train``'s settings; 540-545: the negative-prompt embeddings for sampling and training;
   * 602-707, sampling: ``pipeline_with_logprob`` per batch of ``sample.train_batch_size`` prompts with
     ``transformer.eval()``, the trajectory split into ``latents``/``next_latents``, ``timesteps`` from the scheduler,
     the rewards of each batch, the batches concatenated; each prompt is encoded by its own
     ``compute_text_embeddings`` call, as diffrl encodes (a batched call differs in the last bits: 7e-7 in the pooled
     embedding);
   * 738-795, advantages: the rewards repeated over the trained steps, ``PerPromptStatTracker(global_std=True)
     .update`` (``(r - mean of the prompt) / (std of all + 1e-4)``, float64), then ``clear()``;
   * 797-817, the zero-advantage mask: samples whose advantages are all 0 are dropped. The reference then pads the
     mask with random zero-advantage samples up to a multiple of ``num_batches_per_epoch``; diffrl's
     ``drop_zero_advantage`` does not. The sizes here never need the padding (asserted);
   * 827-955, training: per inner epoch a permutation of the kept samples (the reference draws ``torch.randperm``;
     here it is given the order diffrl draws, ``Trainer.generator(3, epoch)``, so both sides form the same
     micro-batches), the rebatch into ``num_batches_per_epoch`` micro-batches, ``transformer.train()``, CFG
     embeddings ``[negative; prompt]``; for each trained step ``j``: ``compute_log_prob``, the same under
     ``disable_adapter()`` for the KL when ``beta > 0``, ``A = clamp(adv, +-adv_clip_max)``, ``ratio = exp(logp -
     logp_old)``, ``policy_loss = mean(max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range)))``,
     ``kl_loss = mean(mean_dims((mu - mu_ref)^2) / (2 std_dev_t^2))``, ``loss = policy_loss + beta * kl_loss``;
     accelerate's gradient accumulation over ``gradient_accumulation_steps * num_train_timesteps`` backward passes
     (``accelerator.backward`` divides each loss by that count; on the last pass of each group
     ``clip_grad_norm_(transformer.parameters(), max_grad_norm)``, ``optimizer.step()``, ``optimizer.zero_grad()``);
     the logged ``approx_kl`` and ``clipfrac`` of each update;
3. runs diffrl's ``FlowGRPOTrainer.train_step`` (``diffrl.train.build_trainer`` on ``configs/tiny/flow_grpo.yaml``
   with overrides taken from the reference config) with the reference options ``flow_grpo.kl_scale=reference
   cfg_grad=cond num_minibatches=2 drop_zero_advantage=true old_logp=rollout`` and ``model.max_sequence_length=128``,
   on the same pipeline weights, prompts (diffrl's draw for the step) and initial LoRA (rank 32 with random A and B,
   B != 0, so the KL and the clip are not trivially 0), copied into the reference's.

Checks. Each prints, per trained LoRA tensor, ``max|a - b|``, ``max|a - b| / max|b|`` (the measure checked),
the largest element-wise ``|a - b| / |b|`` over entries above 1e-3 of the largest, and ``update rel``, the same
measure on the tensors' change in the step; and per optimiser update the gradient difference
(``max|a - b| / max|b|`` per tensor, the worst tensor), gradient norm, clipfrac, approx_kl, policy loss and KL of both
sides and the samples each side trained.

* ``[0] presets``, before the others: each shipped preset that reproduces a reference run
  (``configs/sd35m_flow_grpo_{pickscore,geneval,ocr}.yaml``; the bf16 one is diffrl's own variant) against the
  configuration it names (``config/grpo.py``'s ``pickscore_sd3``, ``geneval_sd3``, ``general_ocr_sd3``, each made
  anew), 53 values each, taken from the reference's code (written here only: the reference options below and the
  prompt-file names of its two dataset classes, ``PROMPT_FILES``): the config's seed, ``save_freq``,
  ``num_checkpoint_limit``, ``eval_freq``, mixed precision, sizes (resolution, steps, guidance, batch sizes; the
  evaluation's guidance is ``sample.guidance_scale``, as ``eval()`` samples), AdamW settings, rewards (the
  evaluation's too, as ``main()`` builds both from ``reward_fn``), dataset folder (and the prompt file the
  ``prompt_fn``'s dataset class opens), group size, noise level, timestep fraction, clip range, KL weight,
  advantage std and clip, inner epochs, ``flow_grpo.prompts_per_step`` = ``gpu_number`` (read from the config
  function's syntax tree, 32) x ``num_batches_per_epoch`` x ``train_batch_size`` / group size (48) and
  ``num_minibatches`` = ``num_batches_per_epoch // gradient_accumulation_steps`` (2); from ``main()`` of
  ``scripts/train_sd3.py`` (its syntax tree) the LoRA's ``r``, ``lora_alpha`` and ``init_lora_weights``, the T5
  length, the ``EMAModuleWrapper`` keywords (``decay`` when ``train.ema``, ``update_step_interval``; its
  ``get_current_decay(0) < decay`` gives ``ema_warmup``), the transformer's and the VAE's dtypes, no LR schedule
  and no gradient checkpointing; and the reference options that [1] and [2] run diffrl with
  (``REFERENCE_OPTIONS``: ``sampler=sde sde_window=0 kl_scale=reference cfg_grad=cond drop_zero_advantage=true
  old_logp=rollout``). It prints per preset the count and "all equal" or each ``key: preset X, reference Y``, and
  fails on any difference. ``--presets-dir`` points it at other copies of the three files.
* ``[1] one update``: stored rollouts (sampled once by the reference's ``pipeline_with_logprob`` from the initial
  LoRA), their log-probs and fixed rewards (one prompt's 4 rewards equal: advantage 0, dropped) are fed to diffrl
  by replacing ``diffrl.trainers.flow_grpo.rollout`` and giving it a reward that returns the stored values; both
  sides take one step (2 updates; the second is off-policy, so the clip acts). Run at ``--beta`` (0.04, the
  reference's GenEval/OCR weight) and at ``--kl-check-beta`` (100), where the KL term is a sizeable part of the
  gradient, so that its formula is checked too.
* ``[2] steps with sampling``: ``--steps`` consecutive full steps (sample, decode, score, update) of both, the reward
  a fixed function of the images (one prompt's rewards a constant). diffrl draws its noise (the initial latents in
  ``model.sample_noise`` and the SDE noise of ``diffrl.samplers.rollout.sde_step``, both wrapped to record what it
  drew); the reference gets the same initial latents through ``pipeline_with_logprob(latents=...)`` and the same
  SDE noise through its module's ``randn_tensor``, replaced while it samples.
* ``[3] zero-advantage mask``: diffrl's ``group_advantages`` and the reference's ``PerPromptStatTracker`` on reward
  sets with one group of G equal rewards (G = 4, 8, 24; the reference's PickScore config has 24): passes when
  diffrl's zero advantages are the reference's, i.e. ``drop_zero_advantage`` drops the samples the reference drops.
* ``[5] text groups``: ``group_by=text`` on reward sets of three slots of G (4, 8, 24) whose first and last share
  a prompt text: diffrl's advantages (``text_group_ids``) against the reference's ``PerPromptStatTracker`` with its
  global and its per-prompt std; passes when they agree within 1e-5 and the slot grouping does not (1e-3). Then
  ``group_by=tokens`` with the first and last texts differing in case and spacing only, the reference keying its
  tracker by the texts read back through its CLIP tokenizer: passes when diffrl's agree within 1e-5 and
  ``group_by=text``'s do not.
* ``[4]`` for the record, no pass/fail: the ``[1]`` set-up with each of diffrl's other options alone
  (``kl_scale=exact``, ``cfg_grad=full``, ``num_minibatches=1``, ``drop_zero_advantage=false``), diffrl's defaults
  (reference, cond, 1, false) and its former behaviour (exact, full, 1, false): the relative L2 difference from the
  reference's step of the LoRA change and of the first update's gradient.

Tolerance. ``[1]`` and ``[2]`` pass when both sides trained the same samples in every update, every update's
gradient agrees to ``max(--grad-tolerance, --floor-factor x floor)`` and every LoRA tensor to ``max(--tolerance,
--floor-factor x floor)`` (defaults 1e-4, 1e-5 and 5), where ``floor`` is the float32 noise floor measured in the
same check: the reference against itself with its inputs moved by one ulp (every stored latent in ``[1]``, the
initial latents of each step in ``[2]``). The output says for every check whether the strict tolerance was met.
diffrl's SDE step groups the mean's terms as the reference does (``x (1 + ...) + v (...) dt``), so one update on
stored rollouts agrees bitwise (measured: 0 in every tensor, gradients and AdamW steps included). Over several steps
with sampling the first step's trajectories, log-probs and rewards are bitwise equal too, and the LoRA tensors agree to
about 1e-6 of their largest entry (the gradients to 4e-7: the last bits of the reward-to-loss path differ, e.g. the
reference multiplies float64 advantages into its loss); later steps sample from weights that differ by that much.
The floor shows how much less than the tolerance that is:
AdamW divides each entry's step by that entry's own gradient, so a one-ulp change of the inputs moves entries whose
gradient is near 0 by about 1e-4 of the largest entry of their LoRA tensor.

Monkeypatches (all undone after use; diffrl's code is not changed): ``diffrl.trainers.flow_grpo.rollout`` (replaced by
the stored rollouts, or wrapped to record the trajectories), ``ppo_clip_loss``, ``flow_grpo_reference_kl`` and
``gaussian_kl`` in ``diffrl.trainers.flow_grpo`` (wrapped to record each call), the trainer's ``finish_update``
(wrapped to record the gradient before it clips), the trainer model's ``sample_noise`` and
``diffrl.samplers.rollout.sde_step`` (wrapped to record the noise, drawn with ``diffrl.samplers.steps.noise_like``
as ``sde_step`` draws it), and the reference's ``flow_grpo.diffusers_patch.sd3_sde_with_logprob.randn_tensor``.

Usage: ``python benchmarks/parity_flow_grpo.py --reference /path/to/flow_grpo_clone [--steps 3] [--beta 0.04]
[--presets-dir DIR]``
(offline, with ``OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1``; about 30 s on one CPU core). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import math
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from _parity import preset_differences
from _parity import preset_value as shared_preset_value
from _reference_code import load_module, main_lora_setup, script_functions, stub_missing_modules

ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = ROOT / "configs" / "tiny" / "flow_grpo.yaml"
PROMPTS = [
    "a red circle",
    "a yellow cat",
    "a blue square",
    "a pink apple",
    "a brown chair",
    "a white car on the road",
]
ZERO_PROMPT = PROMPTS[1]  # the prompt whose group gets equal rewards (advantage 0)
REF_PREFIX = "base_model.model."  # PeftModel's prefix of the wrapped transformer's parameter names

# ---------------------------------------------------------------------------------------------- the reference


def load_reference(root: Path) -> SimpleNamespace:
    """The reference's config, modules and the functions of ``scripts/train_sd3.py`` this script executes."""
    script = root / "scripts" / "train_sd3.py"
    if not script.is_file():
        raise SystemExit(f"--reference {root} is not a flow_grpo clone (no scripts/train_sd3.py)")
    sys.path.insert(0, str(root))
    stub_missing_modules()
    grpo_config = load_module(root / "config" / "grpo.py", "flow_grpo_reference_config")
    from flow_grpo.diffusers_patch import sd3_pipeline_with_logprob, sd3_sde_with_logprob
    from flow_grpo.diffusers_patch.train_dreambooth_lora_sd3 import encode_prompt
    from flow_grpo.ema import EMAModuleWrapper
    from flow_grpo.stat_tracking import PerPromptStatTracker

    namespace = script_functions(
        script,
        {"compute_log_prob", "compute_text_embeddings"},
        {
            "torch": torch,
            "sde_step_with_logprob": sd3_sde_with_logprob.sde_step_with_logprob,
            "encode_prompt": encode_prompt,
        },
    )
    lora_targets, lora_kwargs, max_sequence_length = main_lora_setup(script)
    return SimpleNamespace(
        root=root,
        script=script,
        config_module=grpo_config,
        config=grpo_config.pickscore_sd3(),
        ema_cls=EMAModuleWrapper,
        pipeline_with_logprob=sd3_pipeline_with_logprob.pipeline_with_logprob,
        sde_module=sd3_sde_with_logprob,
        stat_tracker_cls=PerPromptStatTracker,
        compute_log_prob=namespace["compute_log_prob"],
        compute_text_embeddings=namespace["compute_text_embeddings"],
        lora_targets=lora_targets,
        lora_kwargs=lora_kwargs,
        max_sequence_length=max_sequence_length,
    )


def tiny_reference_config(ref: SimpleNamespace, args) -> None:
    """``pickscore_sd3()`` at the tiny sizes: its algorithm settings stay (steps, guidance, noise level, clip range,
    timestep fraction, AdamW, grad clip, global std, gradient accumulation = num_batches_per_epoch / 2)."""
    c = ref.config
    c.resolution = args.size
    c.mixed_precision = "no"
    c.sample.num_image_per_prompt = args.group_size
    c.sample.num_batches_per_epoch = args.num_batches
    c.sample.train_batch_size = args.prompts * args.group_size // args.num_batches
    c.train.batch_size = c.sample.train_batch_size
    c.train.gradient_accumulation_steps = c.sample.num_batches_per_epoch // 2
    if args.beta is not None:
        c.train.beta = args.beta


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class ReferenceRun:
    """The inline parts of the reference's ``main()`` (set-up, sampling, advantages, mask, training), with its state
    (LoRA weights, AdamW, accelerate's backward-pass counter) kept between steps."""

    def __init__(self, ref: SimpleNamespace, model_dir: Path, lora: dict[str, torch.Tensor], config=None):
        from diffusers import StableDiffusion3Pipeline
        from peft import LoraConfig, get_peft_model

        self.ref = ref
        self.config = c = config if config is not None else ref.config
        pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            module.requires_grad_(False)
        pipe.transformer.requires_grad_(not c.use_lora)
        pipe.transformer = get_peft_model(
            pipe.transformer, LoraConfig(target_modules=ref.lora_targets, **ref.lora_kwargs)
        )
        self.pipe, self.transformer = pipe, pipe.transformer
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
        named = dict(self.transformer.named_parameters())
        with torch.no_grad():
            for name, value in lora.items():
                named[REF_PREFIX + name].copy_(value)
        trained = {n[len(REF_PREFIX) :]: p for n, p in named.items() if p.requires_grad}
        self.names = {n: p for n, p in trained.items() if n in lora}  # the tensors compared with diffrl's
        self.extra = {
            n: p for n, p in trained.items() if n not in lora
        }  # the reference's only (see the docstring)
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=c.train.learning_rate,
            betas=(c.train.adam_beta1, c.train.adam_beta2),
            weight_decay=c.train.adam_weight_decay,
            eps=c.train.adam_epsilon,
        )
        self.num_train_timesteps = int(c.sample.num_steps * c.train.timestep_fraction)
        self.accumulation = c.train.gradient_accumulation_steps * self.num_train_timesteps
        self.backward_passes = 0  # accelerate's GradientState.step
        neg, neg_pooled = self.encode([""])
        self.sample_neg = neg.repeat(c.sample.train_batch_size, 1, 1)
        self.sample_neg_pooled = neg_pooled.repeat(c.sample.train_batch_size, 1)
        self.train_neg = neg.repeat(c.train.batch_size, 1, 1)
        self.train_neg_pooled = neg_pooled.repeat(c.train.batch_size, 1)
        self.stat_tracker = ref.stat_tracker_cls(c.sample.global_std)

    def encode(self, prompts):
        # one prompt at a time, as diffrl encodes (a batched encoder differs in the last bits with the batch)
        rows = [
            self.ref.compute_text_embeddings(
                [p], self.text_encoders, self.tokenizers, self.ref.max_sequence_length, "cpu"
            )
            for p in prompts
        ]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def lora(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.names.items()}

    def sample(self, prompts, initial_noise, sde_noise, reward_fn):
        """Sampling as lines 602-736: ``sde_noise[k]`` is the ``(n, C, h, w)`` noise of step k for all rows."""
        c = self.config
        self.transformer.eval()
        bs = c.sample.train_batch_size
        samples = []
        for i in range(c.sample.num_batches_per_epoch):
            rows = slice(i * bs, (i + 1) * bs)
            batch_prompts = prompts[rows]
            prompt_embeds, pooled_prompt_embeds = self.encode(batch_prompts)
            queue = [z[rows] for z in sde_noise]

            def next_noise(shape, generator=None, device=None, dtype=None, queue=queue):
                z = queue.pop(0)
                assert tuple(z.shape) == tuple(shape), (z.shape, shape)
                return z.to(device=device, dtype=dtype)

            with torch.no_grad(), patched(self.ref.sde_module, "randn_tensor", next_noise):
                images, latents, log_probs = self.ref.pipeline_with_logprob(
                    self.pipe,
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    negative_prompt_embeds=self.sample_neg,
                    negative_pooled_prompt_embeds=self.sample_neg_pooled,
                    num_inference_steps=c.sample.num_steps,
                    guidance_scale=c.sample.guidance_scale,
                    output_type="pt",
                    height=c.resolution,
                    width=c.resolution,
                    noise_level=c.sample.noise_level,
                    latents=initial_noise[rows],
                )
            assert not queue, "the reference drew fewer SDE noises than diffrl"
            latents = torch.stack(latents, dim=1)
            samples.append(
                {
                    "prompt_embeds": prompt_embeds,
                    "pooled_prompt_embeds": pooled_prompt_embeds,
                    "timesteps": self.pipe.scheduler.timesteps.repeat(bs, 1),
                    "latents": latents[:, :-1],
                    "next_latents": latents[:, 1:],
                    "log_probs": torch.stack(log_probs, dim=1),
                    "rewards": torch.as_tensor(reward_fn(images, batch_prompts)).float(),
                }
            )
        return {k: torch.cat([s[k] for s in samples]) for k in samples[0]}

    def set_timesteps(self):
        """The scheduler's timesteps as sampling leaves them (``compute_log_prob`` looks sigmas up by timestep)."""
        self.pipe.scheduler.set_timesteps(self.config.sample.num_steps)

    def advantages_and_mask(self, samples, prompts):
        """Lines 738-817: advantages per (sample, trained step), then the samples with a non-zero one."""
        c = self.config
        samples = dict(samples)
        rewards = samples.pop("rewards").unsqueeze(1).repeat(1, self.num_train_timesteps)
        advantages = self.stat_tracker.update(prompts, rewards.numpy())
        self.stat_tracker.clear()
        samples["advantages"] = torch.as_tensor(advantages)
        mask = samples["advantages"].abs().sum(dim=1) != 0
        true_count = int(mask.sum())
        assert true_count % c.sample.num_batches_per_epoch == 0, (
            f"{true_count} kept samples: the reference would pad with random zero-advantage samples; "
            "choose sizes where it does not"
        )
        return {k: v[mask] for k, v in samples.items()}, mask

    def step(self, samples, prompts, perms):
        """Advantages, mask and training of one step; the updates name the rows of the step they trained."""
        kept, mask = self.advantages_and_mask(samples, prompts)
        updates = self.train(kept, perms)
        kept_rows = torch.nonzero(mask).flatten()
        for u in updates:
            u["rows"] = sorted(int(kept_rows[r]) for r in u["rows"])
        return updates

    def train(self, samples, perms):
        """Lines 827-955 with ``perms[inner_epoch]`` for the reference's ``torch.randperm``. Returns one record per
        optimiser update: gradient (before clipping), its norm and the logged statistics."""
        c = self.config
        total_batch_size, num_timesteps = samples["timesteps"].shape
        assert num_timesteps == c.sample.num_steps
        updates = []
        current = torch.arange(total_batch_size)  # which kept sample sits at each position
        for inner_epoch in range(c.train.num_inner_epochs):
            # the reference permutes the already permuted samples; pick the permutation that gives diffrl's order
            perm = torch.argsort(current)[perms[inner_epoch]]
            samples = {k: v[perm] for k, v in samples.items()}
            current = current[perm]
            size = total_batch_size // c.sample.num_batches_per_epoch
            batched = {k: v.reshape(-1, size, *v.shape[1:]) for k, v in samples.items()}
            batched = [dict(zip(batched, x, strict=True)) for x in zip(*batched.values(), strict=True)]
            self.transformer.train()
            info = defaultdict(list)
            rows = []
            for i, sample in enumerate(batched):
                embeds = torch.cat([self.train_neg[: len(sample["prompt_embeds"])], sample["prompt_embeds"]])
                pooled = torch.cat(
                    [
                        self.train_neg_pooled[: len(sample["pooled_prompt_embeds"])],
                        sample["pooled_prompt_embeds"],
                    ]
                )
                rows += current[i * size : (i + 1) * size].tolist()
                for j in range(self.num_train_timesteps):
                    self.backward_passes += 1
                    sync = self.backward_passes % self.accumulation == 0
                    _, log_prob, mean, std_dev_t = self.ref.compute_log_prob(
                        self.transformer, self.pipe, sample, j, embeds, pooled, c
                    )
                    if c.train.beta > 0:
                        with torch.no_grad(), self.transformer.disable_adapter():
                            _, _, mean_ref, _ = self.ref.compute_log_prob(
                                self.transformer, self.pipe, sample, j, embeds, pooled, c
                            )
                    advantages = torch.clamp(
                        sample["advantages"][:, j], -c.train.adv_clip_max, c.train.adv_clip_max
                    )
                    ratio = torch.exp(log_prob - sample["log_probs"][:, j])
                    unclipped = -advantages * ratio
                    clipped = -advantages * torch.clamp(
                        ratio, 1.0 - c.train.clip_range, 1.0 + c.train.clip_range
                    )
                    policy_loss = torch.mean(torch.maximum(unclipped, clipped))
                    if c.train.beta > 0:
                        kl_loss = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
                            2 * std_dev_t**2
                        )
                        kl_loss = torch.mean(kl_loss)
                        loss = policy_loss + c.train.beta * kl_loss
                        info["kl_loss"].append(float(kl_loss.detach()))
                    else:
                        loss = policy_loss
                    with torch.no_grad():
                        info["approx_kl"].append(
                            float(0.5 * torch.mean((log_prob - sample["log_probs"][:, j]) ** 2))
                        )
                        info["clipfrac"].append(
                            float(torch.mean((torch.abs(ratio - 1.0) > c.train.clip_range).float()))
                        )
                        info["policy_loss"].append(float(policy_loss))
                    # accelerator.backward divides the loss by the accumulation steps
                    (loss / self.accumulation).backward()
                    if sync:
                        grads = {
                            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                            for n, p in self.names.items()
                        }
                        extra_grad = max(
                            [float(p.grad.abs().max()) for p in self.extra.values() if p.grad is not None],
                            default=0.0,
                        )
                        norm = torch.nn.utils.clip_grad_norm_(
                            self.transformer.parameters(), c.train.max_grad_norm
                        )
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                        updates.append(
                            {
                                "grads": grads,
                                "grad_norm": float(norm),
                                "extra_grad": extra_grad,
                                "rows": sorted(rows),
                                **{k: float(np.mean(v)) for k, v in info.items()},
                            }
                        )
                        info, rows = defaultdict(list), []
        return updates


# ---------------------------------------------------------------------------------------------- diffrl


# diffrl's options for what the reference's code does (not its config): every step stochastic by the SDE of
# sd3_sde_with_logprob.py; train_sd3.py's KL mean((mu - mu_ref)^2) / (2 std_dev_t^2), compute_log_prob's detached
# unconditional prediction, its mask of all-zero-advantage samples and the sampling log-probs as the old ones. Checks
# [1] and [2] run diffrl with these; check 0 asks the presets for them.
REFERENCE_OPTIONS = {
    "sampler": "sde",
    "sde_window": 0,
    "kl_scale": "reference",
    "cfg_grad": "cond",
    "drop_zero_advantage": True,
    "old_logp": "rollout",
}


def diffrl_overrides(ref: SimpleNamespace, args, out: Path, **options) -> list[str]:
    c = ref.config
    # the reference's micro-batch once the zero-advantage group is dropped
    kept_per_batch = (args.prompts - 1) * args.group_size // args.num_batches
    flow = {
        "group_size": args.group_size,
        "prompts_per_step": args.prompts,
        "sampler": REFERENCE_OPTIONS["sampler"],
        "noise_level": c.sample.noise_level,
        "sde_window": REFERENCE_OPTIONS["sde_window"],
        "timestep_fraction": c.train.timestep_fraction,
        "clip_range": c.train.clip_range,
        "kl_beta": c.train.beta,
        "adv_std": "global" if c.sample.global_std else "group",
        "adv_clip": float(c.train.adv_clip_max),
        "num_inner_epochs": c.train.num_inner_epochs,
        "kl_scale": REFERENCE_OPTIONS["kl_scale"],
        "cfg_grad": REFERENCE_OPTIONS["cfg_grad"],
        "num_minibatches": c.sample.num_batches_per_epoch // c.train.gradient_accumulation_steps,
        "drop_zero_advantage": REFERENCE_OPTIONS["drop_zero_advantage"],
        "old_logp": REFERENCE_OPTIONS["old_logp"],
    }
    flow.update(options)
    return [
        f"output_dir={out}",
        "report_to=none",
        f"seed={args.seed}",
        "max_steps=100",
        "checkpointing_steps=0",
        "mixed_precision=no",
        "data.eval_size=0",
        "model.path=tiny:sd3",
        "model.dtype=float32",
        "model.vae_dtype=float32",
        f"model.max_sequence_length={ref.max_sequence_length}",
        f"model.lora_rank={ref.lora_kwargs['r']}",
        f"model.lora_alpha={ref.lora_kwargs['lora_alpha']}",
        f"sample.height={c.resolution}",
        f"sample.width={c.resolution}",
        f"sample.num_steps={c.sample.num_steps}",
        f"sample.guidance_scale={c.sample.guidance_scale}",
        f"sample.batch_size={c.sample.train_batch_size}",  # the reference's sampling batch: the same shapes
        f"optim.lr={c.train.learning_rate}",
        f"optim.beta1={c.train.adam_beta1}",
        f"optim.beta2={c.train.adam_beta2}",
        f"optim.weight_decay={c.train.adam_weight_decay}",
        f"optim.eps={c.train.adam_epsilon}",
        f"optim.max_grad_norm={c.train.max_grad_norm}",
        "optim.lr_scheduler=constant",
        f"optim.train_batch_size={max(1, kept_per_batch)}",
        *[f"flow_grpo.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flow.items()],
    ]


def make_trainer(ref, args, workdir: Path, reward, lora: dict[str, torch.Tensor], **options):
    from diffrl.train import build_trainer

    out = Path(tempfile.mkdtemp(dir=workdir, prefix="diffrl-"))
    trainer = build_trainer(
        str(TINY_PRESET),
        diffrl_overrides(ref, args, out, **options),
        reward=reward,
        train_prompts=PROMPTS[: args.prompts],
    )
    named = dict(zip(trainer.param_names, trainer.params, strict=True))
    if lora:
        assert set(named) == set(lora), sorted(set(named) ^ set(lora))
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(lora[n])
    return trainer


def random_lora(trainer, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA with random A and B (B != 0): the adapted model differs from the base, so the KL is not 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in zip(trainer.param_names, trainer.params, strict=True):
        scale = 1 / math.sqrt(p.shape[1]) if "lora_A" in n else 0.01
        out[n] = torch.randn(p.shape, generator=g) * scale
    return out


def diffrl_lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)}


def step_prompts(trainer) -> list[str]:
    g = trainer.cfg.flow_grpo
    prompts, _, _ = trainer.expand_groups(trainer.step_batch(g.prompts_per_step), g.group_size)
    return prompts


def diffrl_perms(trainer, kept: int) -> list[torch.Tensor]:
    """The orders diffrl's train_step draws for the kept samples, one per inner epoch (read before ``step`` moves)."""
    return [
        torch.randperm(kept, generator=trainer.generator(3, e))
        for e in range(trainer.cfg.flow_grpo.num_inner_epochs)
    ]


@contextlib.contextmanager
def record_updates(trainer, updates: list):
    """Wrap ``ppo_clip_loss`` (each call's old log-probs and statistics), the KL functions and ``finish_update`` (the
    gradient before it clips) to split diffrl's step into optimiser updates."""
    module = importlib.import_module("diffrl.trainers.flow_grpo")
    original_ppo, original_finish = module.ppo_clip_loss, trainer.finish_update
    calls = []

    kls = []

    def ppo(log_prob, old_log_prob, advantages, **kw):
        stats = original_ppo(log_prob, old_log_prob, advantages, **kw)
        calls.append({"old": old_log_prob.detach().clone(), "stats": stats, "n": log_prob.shape[0]})
        return stats

    def recording(fn):
        def wrapper(*a, **kw):
            out = fn(*a, **kw)
            kls.append(float(out.detach().mean()))
            return out

        return wrapper

    def finish():
        grads = {
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in zip(trainer.param_names, trainer.params, strict=True)
        }
        metrics = original_finish()
        updates.append(
            {
                "grads": grads,
                "grad_norm": metrics.get("train/grad_norm", float("nan")),
                "calls": list(calls),
                "clipfrac": float(np.mean([float(c["stats"].clipfrac) for c in calls])),
                "approx_kl": float(np.mean([float(c["stats"].approx_kl) for c in calls])),
                "policy_loss": float(np.mean([float(c["stats"].loss.detach()) for c in calls])),
                "kl_loss": float(np.mean(kls)) if kls else 0.0,
            }
        )
        calls.clear()
        kls.clear()
        return metrics

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(module, "ppo_clip_loss", ppo))
        for name in ("flow_grpo_reference_kl", "gaussian_kl"):
            stack.enter_context(patched(module, name, recording(getattr(module, name))))
        trainer.finish_update = finish
        try:
            yield
        finally:
            del trainer.finish_update


def rows_of_update(update, old_logp: torch.Tensor, train_steps: int) -> list[int]:
    """Which samples an update of diffrl trained, from the old log-probs its ``ppo_clip_loss`` calls got."""
    rows = []
    for i, call in enumerate(update["calls"]):
        if i % train_steps:
            continue  # every micro-batch's first call (k = 0) names its rows
        for v in call["old"].tolist():
            rows.append(int((old_logp[:, 0] - v).abs().argmin()))
    return sorted(rows)


@contextlib.contextmanager
def stored_rollouts(latents: torch.Tensor, log_probs: torch.Tensor):
    """diffrl's rollout replaced by the stored trajectories (the chunks of rows come in order)."""
    from diffrl.samplers import RolloutOutput

    module = importlib.import_module("diffrl.trainers.flow_grpo")
    start = [0]

    def fake(model, cond, sigmas, noise, **kw):  # chunks come in row order
        rows = slice(start[0], start[0] + noise.shape[0])
        start[0] += noise.shape[0]
        return RolloutOutput(
            latents=latents[rows].clone(),
            sigmas=sigmas,
            log_probs=log_probs[rows].clone(),
            stochastic=torch.ones(latents.shape[1] - 1, dtype=torch.bool),
            final=latents[rows, -1].clone(),
        )

    with patched(module, "rollout", fake):
        yield


@contextlib.contextmanager
def record_noise(trainer, record: dict):
    """Record the initial latents and the SDE noise diffrl draws (drawn as it draws them, then passed on)."""
    rollout_module = importlib.import_module("diffrl.samplers.rollout")
    steps_module = importlib.import_module("diffrl.samplers.steps")
    trainer_module = importlib.import_module("diffrl.trainers.flow_grpo")
    original_sde, original_noise, original_rollout = (
        rollout_module.sde_step,
        trainer.model.sample_noise,
        trainer_module.rollout,
    )
    record.update(initial=[], sde=[], latents=[], log_probs=[])

    def sample_noise(*a, **kw):
        z = original_noise(*a, **kw)
        record["initial"].append(z.clone())
        return z

    def sde_step(x, v, sigma, sigma_next, noise_level=0.7, *, noise=None, prev_sample=None, generator=None):
        if noise is None and prev_sample is None:
            noise = steps_module.noise_like(x.float(), None, generator)
            record["sde"].append(noise.clone())
        return original_sde(
            x, v, sigma, sigma_next, noise_level, noise=noise, prev_sample=prev_sample, generator=generator
        )

    def rollout(*a, **kw):
        out = original_rollout(*a, **kw)
        record["latents"].append(out.latents.clone())
        record["log_probs"].append(out.log_probs.clone())
        return out

    trainer.model.sample_noise = sample_noise
    rollout_module.sde_step = sde_step
    trainer_module.rollout = rollout
    try:
        yield
    finally:
        rollout_module.sde_step = original_sde
        trainer_module.rollout = original_rollout
        del trainer.model.sample_noise


# ---------------------------------------------------------------------------------------------- comparisons


def tensor_rows(mine: dict, theirs: dict, initial: dict) -> dict[str, tuple]:
    """Per tensor: max|a-b|, max|a-b| / max|b|, element-wise relative (entries above 1e-3 of the largest), and the
    second measure on the change from ``initial``."""
    rows = {}
    for name in sorted(mine):
        a, b = mine[name].double(), theirs[name].double()
        diff = (a - b).abs()
        scale = b.abs().max().item()
        big = b.abs() >= 1e-3 * scale
        elementwise = (diff[big] / b.abs()[big]).max().item() if big.any() else 0.0
        da, db = a - initial[name].double(), b - initial[name].double()
        update_rel = (da - db).abs().max().item() / max(db.abs().max().item(), 1e-30)
        rows[name] = (diff.max().item(), diff.max().item() / max(scale, 1e-30), elementwise, update_rel)
    return rows


def grad_rel(mine: dict, theirs: dict) -> float:
    """The worst tensor's ``max|a - b| / max|b|``."""
    return max(
        (mine[n] - theirs[n]).abs().max().item() / max(theirs[n].abs().max().item(), 1e-30) for n in mine
    )


def global_rel(mine: dict, theirs: dict, initial: dict | None = None) -> float:
    """``||a - b|| / ||b||`` over all tensors together (of the change from ``initial`` when given)."""
    num = den = 0.0
    for n in mine:
        a, b = mine[n].double(), theirs[n].double()
        if initial is not None:
            a, b = a - initial[n].double(), b - initial[n].double()
        num += float(((a - b) ** 2).sum())
        den += float((b**2).sum())
    return math.sqrt(num / max(den, 1e-300))


def judge(worst: float, floor: float, tolerance: float, factor: float) -> tuple[bool, float]:
    allowed = max(tolerance, factor * floor)
    return worst <= allowed, allowed


def report_updates(mine: list, theirs: list, floor: list, mine_rows: list, args) -> bool:
    """Per optimiser update: gradients (diffrl against the reference, and the reference's floor), statistics, samples."""
    ok = len(mine) == len(theirs) == len(floor)
    print(
        f"  optimiser updates: diffrl {len(mine)}, reference {len(theirs)}, reference from inputs moved by one ulp {len(floor)}"
    )
    print(
        f"    {'':6} {'grad rel':>9} {'floor':>9} {'grad norm diffrl':>17} {'reference':>11} {'clipfrac d / r':>15} "
        f"{'approx_kl diffrl':>17} {'reference':>11} {'policy loss d / r':>21} {'KL term d / r':>21}"
    )
    for u, (a, b, f) in enumerate(zip(mine, theirs, floor, strict=False)):
        rel, fl = grad_rel(a["grads"], b["grads"]), grad_rel(f["grads"], b["grads"])
        good, allowed = judge(rel, fl, args.grad_tolerance, args.floor_factor)
        same = mine_rows[u] == b["rows"] == f["rows"]
        ok &= good and same
        print(
            f"    {u:<6} {rel:9.2e} {fl:9.2e} {a['grad_norm']:17.7g} {b['grad_norm']:11.7g} "
            f"{a['clipfrac']:7.4f} {b['clipfrac']:7.4f} {a['approx_kl']:17.5e} {b['approx_kl']:11.5e} "
            f"{a['policy_loss']:10.3e} {b['policy_loss']:10.3e} {a['kl_loss']:10.4e} {b.get('kl_loss', 0.0):10.4e}"
            f"{'' if good else f'  <-- over {allowed:.1e}'}"
        )
        print(
            f"           samples: diffrl {mine_rows[u]}, reference {b['rows']}{'' if same else '  <-- differ'}"
        )
    return ok


def report_lora(mine: dict, theirs: dict, floor: dict, initial: dict, args, title: str) -> bool:
    rows, floor_rows = tensor_rows(mine, theirs, initial), tensor_rows(floor, theirs, initial)
    print(f"  {title} (a = diffrl, b = reference; floor: the reference from inputs moved by one ulp)")
    print(
        f"    {'LoRA tensor':<60} {'max|a-b|':>9} {'/max|b|':>9} {'floor':>9} {'elem rel':>9} {'update rel':>10}"
    )
    for name, (abs_diff, rel, elementwise, update_rel) in rows.items():
        short = name.replace("transformer_blocks.", "").replace(".default.weight", "")
        print(
            f"    {short:<60} {abs_diff:9.2e} {rel:9.2e} {floor_rows[name][1]:9.2e} {elementwise:9.2e} {update_rel:10.2e}"
        )
    worst = max(r[1] for r in rows.values())
    floor_worst = max(r[1] for r in floor_rows.values())
    good, allowed = judge(worst, floor_worst, args.tolerance, args.floor_factor)
    print(
        f"    worst max|a-b|/max|b|: {worst:.2e} (floor {floor_worst:.2e}); allowed {allowed:.1e}: "
        f"{'ok' if good else 'FAIL'}; strict tolerance {args.tolerance:g} {'met' if worst <= args.tolerance else 'not met'}"
    )
    return good


def diffrl_rows(updates: list, old_logp: torch.Tensor, train_steps: int) -> list[list[int]]:
    return [rows_of_update(u, old_logp, train_steps) for u in updates]


def nudge(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    """Every entry moved by one ulp, up or down at random: the float32 noise floor's input."""
    up = torch.rand(tensor.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    inf = torch.full_like(tensor, math.inf)
    return torch.where(up, torch.nextafter(tensor, inf), torch.nextafter(tensor, -inf))


# ---------------------------------------------------------------------------------------------- checks


class StoredReward:
    """A reward that returns stored values, chunk by chunk in row order (diffrl scores each sampled chunk)."""

    __name__ = "stored_reward"

    def __init__(self, prompts=None, rewards=None):
        self.prompts, self.rewards, self.next = prompts, rewards, 0

    def __call__(self, images, prompts, **_):
        rows = slice(self.next, self.next + len(prompts))
        assert prompts == self.prompts[rows], "diffrl scored other prompts than the stored ones"
        self.next = rows.stop % len(self.prompts)
        return self.rewards[rows].clone()


def image_reward(images: torch.Tensor, prompts: list[str], **_) -> torch.Tensor:
    """A fixed function of the images (red minus blue, plus contrast); one prompt's rewards are a constant."""
    images = images.float()
    score = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2)) + images.std(dim=(1, 2, 3))
    constant = torch.tensor([p == ZERO_PROMPT for p in prompts])
    return torch.where(constant, torch.full_like(score, 0.25), score)


def set_lora(trainer, lora: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in zip(trainer.param_names, trainer.params, strict=True):
            p.copy_(lora[n])


def stored_step(ref, args, workdir, model_dir) -> dict:
    """Prompts, initial LoRA, rollouts sampled by the reference from that LoRA, and fixed rewards for step 0."""
    c = ref.config
    trainer = make_trainer(ref, args, workdir, StoredReward(), {})
    lora0 = random_lora(trainer, args.seed + 1)
    prompts = step_prompts(trainer)
    sampler = ReferenceRun(ref, model_dir, lora0)
    g = torch.Generator().manual_seed(args.seed + 2)
    shape = (len(prompts), *trainer.model.latent_shape(c.resolution, c.resolution))
    initial = torch.randn(shape, generator=g)
    sde = [torch.randn(shape, generator=g) for _ in range(c.sample.num_steps)]
    rollouts = sampler.sample(prompts, initial, sde, lambda images, p: torch.zeros(len(p)))
    rewards = torch.rand(len(prompts), generator=torch.Generator().manual_seed(args.seed + 3))
    rewards[torch.tensor([p == ZERO_PROMPT for p in prompts])] = 0.25  # equal rewards: advantage 0, dropped
    rollouts["rewards"] = rewards
    levels = trainer.model.schedule(c.sample.num_steps, c.resolution, c.resolution)
    cond = trainer.model.encode(prompts)
    embeds, pooled = sampler.encode(prompts)
    print(f"  prompts (diffrl's draw for step 0): {prompts}")
    print(f"  stored rewards: {[round(float(r), 4) for r in rewards]}")
    print(
        f"  set-up: noise levels max|diffrl - reference scheduler| {float((levels - sampler.pipe.scheduler.sigmas).abs().max()):.1e}; "
        f"prompt embeddings max diff {float((cond.prompt_embeds - embeds).abs().max()):.1e}, pooled "
        f"{float((cond.pooled - pooled).abs().max()):.1e}"
    )
    return {
        "prompts": prompts,
        "lora0": lora0,
        "rollouts": rollouts,
        "rewards": rewards,
        "latents": torch.cat([rollouts["latents"], rollouts["next_latents"][:, -1:]], dim=1),
        "log_probs": rollouts["log_probs"],
    }


def diffrl_on_stored(ref, args, workdir, base, **options):
    trainer = make_trainer(
        ref, args, workdir, StoredReward(base["prompts"], base["rewards"]), base["lora0"], **options
    )
    updates = []
    with stored_rollouts(base["latents"], base["log_probs"]), record_updates(trainer, updates):
        metrics = trainer.train_step(trainer.step)
    kept = int(sum(p != ZERO_PROMPT for p in base["prompts"]))
    return trainer, updates, metrics, diffrl_perms(trainer, kept)


def reference_on_stored(ref, model_dir, base, perms):
    run = ReferenceRun(ref, model_dir, base["lora0"])
    run.set_timesteps()
    updates = run.step(base["rollouts"], base["prompts"], perms)
    return run, updates


def check_one_update(ref, args, workdir, model_dir, base) -> bool:
    trainer, d_updates, metrics, perms = diffrl_on_stored(ref, args, workdir, base)
    run, r_updates = reference_on_stored(ref, model_dir, base, perms)
    # the floor: the reference on the same rollouts with every latent moved by one ulp
    trajectory = nudge(base["latents"], args.seed + 5)
    nudged = {
        **base,
        "rollouts": {**base["rollouts"], "latents": trajectory[:, :-1], "next_latents": trajectory[:, 1:]},
    }
    floor, f_updates = reference_on_stored(ref, model_dir, nudged, perms)
    c = ref.config
    beta, c.train.beta = c.train.beta, 0.0
    _, no_kl = reference_on_stored(ref, model_dir, base, perms)
    c.train.beta = beta
    kl_share = global_rel(no_kl[0]["grads"], r_updates[0]["grads"])
    print(
        f"  diffrl: sample/zero_adv_frac {metrics['sample/zero_adv_frac']:.3f} (of {len(base['prompts'])} samples), "
        f"train/updates {metrics['train/updates']:.0f}, train/kl {metrics['train/kl']:.4e}, "
        f"train/clipfrac {metrics['train/clipfrac']:.4f}; the KL term is {kl_share:.1%} of the first update's gradient "
        "(||g - g(beta=0)|| / ||g||, reference)"
    )
    print(
        f"  reference-only LoRA tensors: {[n.replace('.default.weight', '') for n in sorted(run.extra)]}, largest "
        f"gradient {max(u['extra_grad'] for u in r_updates):.1e} (not compared)"
    )
    ok = report_updates(
        d_updates,
        r_updates,
        f_updates,
        diffrl_rows(d_updates, base["log_probs"], run.num_train_timesteps),
        args,
    )
    ok &= report_lora(
        diffrl_lora(trainer), run.lora(), floor.lora(), base["lora0"], args, "LoRA after the step"
    )
    base["lora_ref"], base["ref_updates"] = run.lora(), r_updates
    return ok


def check_sampling_steps(ref, args, workdir, model_dir) -> bool:
    c = ref.config
    trainer = make_trainer(ref, args, workdir, image_reward, {})
    lora0 = random_lora(trainer, args.seed + 1)
    set_lora(trainer, lora0)
    reference = ReferenceRun(ref, model_dir, lora0)
    floor = ReferenceRun(
        ref, model_dir, lora0
    )  # the floor: the reference from initial latents moved by one ulp
    ok = True
    for step in range(args.steps):
        prompts = step_prompts(trainer)
        noise, d_updates = {}, []
        with record_noise(trainer, noise), record_updates(trainer, d_updates):
            metrics = trainer.train_step(trainer.step)
        kept = int(sum(p != ZERO_PROMPT for p in prompts))
        perms = diffrl_perms(trainer, kept)
        trainer.step += 1  # what Trainer.train does after train_step
        # diffrl sampled chunks of rows in order; each drew its initial latents, then one noise per step
        assert len(noise["sde"]) == len(noise["initial"]) * c.sample.num_steps
        initial = torch.cat(noise["initial"])
        sde = [torch.cat(noise["sde"][k :: c.sample.num_steps]) for k in range(c.sample.num_steps)]
        d_latents, d_log_probs = torch.cat(noise["latents"]), torch.cat(noise["log_probs"])
        with torch.no_grad():
            d_rewards = image_reward(trainer.model.decode(d_latents[:, -1]), prompts)

        samples = reference.sample(prompts, initial, sde, image_reward)
        f_samples = floor.sample(prompts, nudge(initial, args.seed + 6 + step), sde, image_reward)
        r_latents = torch.cat([samples["latents"], samples["next_latents"][:, -1:]], dim=1)
        f_latents = torch.cat([f_samples["latents"], f_samples["next_latents"][:, -1:]], dim=1)
        print(
            f"  step {step}: prompts {sorted(set(prompts))}, diffrl reward mean "
            f"{metrics[f'reward/{trainer.reward.name}/mean']:.4f}, kept {kept} of {len(prompts)}"
        )
        print(
            f"    sampling max|diffrl - reference| (floor): latents {float((d_latents - r_latents).abs().max()):.1e} "
            f"({float((f_latents - r_latents).abs().max()):.1e}), log-probs "
            f"{float((d_log_probs - samples['log_probs']).abs().max()):.1e} "
            f"({float((f_samples['log_probs'] - samples['log_probs']).abs().max()):.1e}), rewards "
            f"{float((d_rewards - samples['rewards']).abs().max()):.1e} "
            f"({float((f_samples['rewards'] - samples['rewards']).abs().max()):.1e})"
        )
        r_updates = reference.step(samples, prompts, perms)
        f_updates = floor.step(f_samples, prompts, perms)
        ok &= report_updates(
            d_updates,
            r_updates,
            f_updates,
            diffrl_rows(d_updates, d_log_probs, reference.num_train_timesteps),
            args,
        )
        ok &= report_lora(
            diffrl_lora(trainer), reference.lora(), floor.lora(), lora0, args, f"LoRA after step {step}"
        )
    return ok


def check_zero_advantages(ref, args) -> bool:
    from diffrl.trainers.objectives import group_advantages

    ok = True
    g = torch.Generator().manual_seed(args.seed + 4)
    print(
        f"    {'G':>3} {'reward sets':>12} {'zero advantages: reference':>27} {'diffrl':>7} {'sets that differ':>17}"
    )
    for group in (4, 8, 24):
        trials, differ, ref_zeros, diffrl_zeros = 200, 0, 0, 0
        for _ in range(trials):
            rewards = torch.rand(3 * group, generator=g)
            rewards[:group] = torch.rand(1, generator=g)  # group 0: G equal rewards
            prompts = [f"prompt {i // group}" for i in range(3 * group)]
            ref_adv = ref.stat_tracker_cls(True).update(prompts, rewards.numpy())
            ours = group_advantages(
                rewards, torch.arange(3).repeat_interleave(group), std="global", clip=5.0
            ).values
            ref_zero, our_zero = ref_adv == 0, (ours == 0).numpy()
            ref_zeros += int(ref_zero.sum())
            diffrl_zeros += int(our_zero.sum())
            differ += int((ref_zero != our_zero).any())
        ok &= differ == 0
        print(
            f"    {group:3d} {trials:12d} {ref_zeros:27d} {diffrl_zeros:7d} {differ:17d}{'' if differ == 0 else '  <-- differ'}"
        )
    return ok


def check_text_groups(ref, args, model_dir) -> bool:
    """``group_by=text`` against the reference's stat tracker on steps that draw one text twice: three slots of G
    rewards, the first and the last with the same prompt text. diffrl's advantages (``text_group_ids``) must equal
    the reference's, with its global and its per-prompt std; grouped by slot they must not (so the check can fail).
    Then ``group_by=tokens`` with the first and last texts differing in case and spacing only: the reference keys
    its tracker by the texts read back through its first tokenizer (``train_sd3.py`` 628-634 and 757-760,
    re-written: ``tokenizers[0](prompts, padding="max_length", max_length=256, truncation=True)`` and
    ``pipeline.tokenizer.batch_decode(ids, skip_special_tokens=True)``, the tiny pipeline's CLIP tokenizer);
    diffrl's ``FlowModel.tokenizer_texts`` must give the same advantages, and ``group_by=text`` must not."""
    from transformers import CLIPTokenizer

    from diffrl.models.loading import load_model
    from diffrl.trainers.objectives import group_advantages, text_group_ids

    ref_tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    model = load_model(str(model_dir))

    def decoded(prompts):  # the reference's key
        ids = ref_tokenizer(
            prompts, padding="max_length", max_length=256, truncation=True, return_tensors="pt"
        ).input_ids
        return ref_tokenizer.batch_decode(ids.numpy(), skip_special_tokens=True)

    ok = True
    g = torch.Generator().manual_seed(args.seed + 5)
    print(
        f"    {'G':>3} {'std':>7} {'reward sets':>12} {'max |A_ref - A_text|':>21} {'max |A_ref - A_slot|':>21} "
        f"{'tokens: |A_ref - A_tokens|':>27} {'|A_ref - A_text|':>17}"
    )
    for group in (4, 8, 24):
        for std in ("global", "group"):
            worst_text, worst_slot, worst_tokens, worst_raw = 0.0, 0.0, 0.0, 0.0
            for trial in range(100):
                rewards = torch.rand(3 * group, generator=g)
                texts = ["a red circle", f"a blue square {trial}", "a red circle"]
                prompts = [texts[i // group] for i in range(3 * group)]
                ref_adv = ref.stat_tracker_cls(std == "global").update(prompts, rewards.numpy())
                ref_adv = torch.as_tensor(ref_adv, dtype=torch.float64)
                text = group_advantages(rewards, text_group_ids(prompts), std=std, clip=None).values
                slot = group_advantages(
                    rewards, torch.arange(3).repeat_interleave(group), std=std, clip=None
                ).values
                worst_text = max(worst_text, float((ref_adv - text.double()).abs().max()))
                worst_slot = max(worst_slot, float((ref_adv - slot.double()).abs().max()))
                # the same text in other case and spacing: one group for the reference, as for group_by=tokens
                texts = ["A Red circle", f"a blue square {trial}", "a red  CIRCLE"]
                prompts = [texts[i // group] for i in range(3 * group)]
                ref_adv = ref.stat_tracker_cls(std == "global").update(decoded(prompts), rewards.numpy())
                ref_adv = torch.as_tensor(ref_adv, dtype=torch.float64)
                ids = text_group_ids(model.tokenizer_texts(prompts))
                tokens = group_advantages(rewards, ids, std=std, clip=None).values
                raw = group_advantages(rewards, text_group_ids(prompts), std=std, clip=None).values
                worst_tokens = max(worst_tokens, float((ref_adv - tokens.double()).abs().max()))
                worst_raw = max(worst_raw, float((ref_adv - raw.double()).abs().max()))
            good = worst_text < 1e-5 and worst_slot > 1e-3 and worst_tokens < 1e-5 and worst_raw > 1e-3
            ok &= good
            print(
                f"    {group:3d} {std:>7} {100:12d} {worst_text:21.2e} {worst_slot:21.2e} {worst_tokens:27.2e} "
                f"{worst_raw:17.2e}{'' if good else '  <-- differ'}"
            )
    return ok


def check_variants(ref, args, workdir, base) -> None:
    variants = [
        ("reference options (check [1])", {}),
        ("kl_scale=exact", {"kl_scale": "exact"}),
        ("cfg_grad=full", {"cfg_grad": "full"}),
        ("num_minibatches=1", {"num_minibatches": 1}),
        ("drop_zero_advantage=false", {"drop_zero_advantage": False}),
        ("defaults (reference, cond, 1, false)", {"num_minibatches": 1, "drop_zero_advantage": False}),
        (
            "former behaviour (exact, full, 1, false)",
            {"kl_scale": "exact", "cfg_grad": "full", "num_minibatches": 1, "drop_zero_advantage": False},
        ),
    ]
    print(
        f"    {'diffrl options':<42} {'LoRA change rel':>16} {'1st update gradient rel':>24} {'updates':>8}"
    )
    for label, options in variants:
        trainer, updates, _, _ = diffrl_on_stored(ref, args, workdir, base, **options)
        change = global_rel(diffrl_lora(trainer), base["lora_ref"], base["lora0"])
        first = global_rel(updates[0]["grads"], base["ref_updates"][0]["grads"])
        print(f"    {label:<42} {change:16.3e} {first:24.3e} {len(updates):8d}")


# ---------------------------------------------------------------------------------------------- check 0: presets

PRESETS = {
    "sd35m_flow_grpo_pickscore.yaml": "pickscore_sd3",
    "sd35m_flow_grpo_geneval.yaml": "geneval_sd3",
    "sd35m_flow_grpo_ocr.yaml": "general_ocr_sd3",
}
# train_sd3.py: the prompt files that the dataset class of each prompt_fn opens in config.dataset
# (TextPromptDataset: f"{split}.txt", GenevalPromptDataset: f"{split}_metadata.jsonl")
PROMPT_FILES = {"general_ocr": "{split}.txt", "geneval": "{split}_metadata.jsonl"}


def config_gpus(path: Path, function: str) -> int:
    """The ``gpu_number`` that the config function ``function`` of ``path`` assigns (its batch formula uses it)."""
    tree = ast.parse(path.read_text())
    body = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function), None)
    for node in ast.walk(body) if body is not None else ():
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "gpu_number" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{path}:{function} assigns no gpu_number; this script knows another layout")


def main_settings(script: Path) -> SimpleNamespace:
    """What ``main()`` of ``script`` fixes in code, not in the config: the ``EMAModuleWrapper`` keywords, the dtype
    the pipeline is loaded in and the dtypes its ``transformer`` and ``vae`` are moved to (None: not cast), and
    whether the script makes an LR scheduler or turns gradient checkpointing on."""
    text = script.read_text()
    tree = ast.parse(text)
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    ema, moved, loaded = None, {}, None
    for node in ast.walk(main):
        if not isinstance(node, ast.Call):
            continue
        func, keywords = node.func, {k.arg: k.value for k in node.keywords}
        dtype = keywords.get("dtype", keywords.get("torch_dtype"))
        dtype = dtype.attr if isinstance(dtype, ast.Attribute) else None  # torch.float32 -> "float32"
        if getattr(func, "id", "") == "EMAModuleWrapper":
            ema = {k: ast.literal_eval(v) for k, v in keywords.items() if isinstance(v, ast.Constant)}
        elif not isinstance(func, ast.Attribute):
            continue
        elif func.attr == "from_pretrained" and getattr(func.value, "id", "") == "StableDiffusion3Pipeline":
            loaded = dtype or "float32"  # diffusers loads in float32 without a torch_dtype
        elif (
            func.attr == "to"
            and isinstance(func.value, ast.Attribute)
            and getattr(func.value.value, "id", "") == "pipeline"
        ):
            moved.setdefault(func.value.attr, dtype)
    if ema is None or loaded is None or not {"transformer", "vae"} <= moved.keys():
        raise SystemExit(f"could not find the EMA and the model set-up in main() of {script}")
    return SimpleNamespace(
        ema=ema,
        dtype=moved["transformer"] or loaded,
        vae_dtype=moved["vae"] or loaded,
        lr_scheduler="(a schedule)"
        if any(w in text for w in ("lr_scheduler", "get_scheduler", "LambdaLR"))
        else "constant",
        gradient_checkpointing="gradient_checkpointing" in text,
    )


def exact_ratio(a: int, b: int) -> int | float:
    """``a / b``, an int when it divides (a fraction never equals a preset's count)."""
    return a // b if a % b == 0 else a / b


def preset_expectations(cfg, ref: SimpleNamespace, gpus: int, code: SimpleNamespace) -> dict[str, object]:
    """What a diffrl preset of the reference run ``cfg`` (a config of ``config/grpo.py``, made for ``gpus`` GPUs)
    must hold: the run's seed, checkpoints, evaluation, precision, EMA (``code``: :func:`main_settings`), model and
    LoRA, prompt files, sizes, optimiser, rewards and Flow-GRPO settings, and :data:`REFERENCE_OPTIONS` (the values
    each preset line cites)."""
    s, t = cfg.sample, cfg.train
    images_per_step = gpus * s.num_batches_per_epoch * s.train_batch_size  # all GPUs' images of one epoch
    files = PROMPT_FILES.get(cfg.prompt_fn, f"(no dataset class for prompt_fn {cfg.prompt_fn})")
    decay = code.ema["decay"]
    if not cfg.per_prompt_stat_tracking:
        adv_std = "batch (per_prompt_stat_tracking off)"  # no diffrl option: never equal
    else:
        adv_std = "global" if s.global_std else "group"
    return {
        "seed": cfg.seed,
        "checkpointing_steps": cfg.save_freq,
        "checkpoints_total_limit": cfg.num_checkpoint_limit,
        "eval_every": cfg.eval_freq,
        "mixed_precision": cfg.mixed_precision,
        "ema_decay": decay if t.ema else 0.0,
        "ema_warmup": ref.ema_cls([], decay=decay).get_current_decay(0) < decay,
        "ema_every": code.ema.get("update_step_interval", 1),
        "model.path": cfg.pretrained.model,
        "model.dtype": code.dtype,
        "model.vae_dtype": code.vae_dtype,
        "model.max_sequence_length": ref.max_sequence_length,
        "model.lora_rank": ref.lora_kwargs["r"],
        "model.lora_alpha": ref.lora_kwargs["lora_alpha"],
        "model.lora_init": {True: "default"}.get(ref.lora_kwargs.get("init_lora_weights", True), "gaussian"),
        "model.gradient_checkpointing": code.gradient_checkpointing,
        "data.train": f"{Path(cfg.dataset).name}/{files.format(split='train')}",  # the folder and the file
        "data.eval": f"{Path(cfg.dataset).name}/{files.format(split='test')}",
        "sample.height": cfg.resolution,
        "sample.width": cfg.resolution,
        "sample.num_steps": s.num_steps,
        "sample.guidance_scale": s.guidance_scale,
        "sample.eval_num_steps": s.eval_num_steps,
        "sample.eval_guidance_scale": s.guidance_scale,  # eval() samples at sample.guidance_scale
        "sample.batch_size": s.train_batch_size,
        "optim.lr": t.learning_rate,
        "optim.beta1": t.adam_beta1,
        "optim.beta2": t.adam_beta2,
        "optim.weight_decay": t.adam_weight_decay,
        "optim.eps": t.adam_epsilon,
        "optim.max_grad_norm": t.max_grad_norm,
        "optim.use_8bit_adam": t.use_8bit_adam,
        "optim.lr_scheduler": code.lr_scheduler,
        "optim.train_batch_size": t.batch_size,
        "reward": dict(cfg.reward_fn),
        "eval_reward": dict(cfg.reward_fn),  # main(): eval_reward_fn is multi_score of config.reward_fn
        # lines 757-760: the tracker's key is the prompt decoded from the gathered CLIP token ids
        "group_by": "tokens" if cfg.per_prompt_stat_tracking else "slot",
        "flow_grpo.group_size": s.num_image_per_prompt,
        "flow_grpo.prompts_per_step": exact_ratio(images_per_step, s.num_image_per_prompt),
        "flow_grpo.noise_level": s.noise_level,
        "flow_grpo.timestep_fraction": t.timestep_fraction,
        "flow_grpo.clip_range": t.clip_range,
        "flow_grpo.kl_beta": t.beta,
        "flow_grpo.adv_std": adv_std,
        "flow_grpo.adv_clip": float(t.adv_clip_max),
        "flow_grpo.num_inner_epochs": t.num_inner_epochs,
        "flow_grpo.num_minibatches": exact_ratio(s.num_batches_per_epoch, t.gradient_accumulation_steps),
        **{f"flow_grpo.{k}": v for k, v in REFERENCE_OPTIONS.items()},
    }


def preset_value(preset, key: str):
    """The preset's value of the dotted ``key`` (``data.*``: the prompt file's folder and name)."""
    value = shared_preset_value(preset, key)
    return "/".join(Path(value).parts[-2:]) if key.startswith("data.") else value


def check_presets(ref: SimpleNamespace, presets_dir: Path) -> bool:
    """Each shipped Flow-GRPO preset against the reference configuration it names: every value of
    :func:`preset_expectations` (check 0)."""
    from diffrl.config import load_config

    config_file = ref.root / "config" / "grpo.py"
    code = main_settings(ref.script)
    ok = True
    for name, function in PRESETS.items():
        cfg = getattr(ref.config_module, function)()  # a fresh config (ref.config is shrunk for the checks)
        expected = preset_expectations(cfg, ref, config_gpus(config_file, function), code)
        preset = load_config(presets_dir / name)
        wrong = preset_differences(preset, expected, value=preset_value)
        ok &= not wrong
        path = presets_dir.resolve() / name
        print(
            f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} vs grpo.py:{function}: "
            f"{len(expected)} values, "
            + ("all equal  ok" if not wrong else f"{len(wrong)} DIFFER: " + "; ".join(wrong))
        )
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference", required=True, type=Path, help="clone of github.com/yifan123/flow_grpo"
    )
    parser.add_argument("--steps", type=int, default=3, help="consecutive steps with sampling (check [2])")
    parser.add_argument(
        "--beta", type=float, default=0.04, help="KL weight (GenEval/OCR configs 0.04, PickScore 0.01)"
    )
    parser.add_argument(
        "--kl-check-beta", type=float, default=100.0, help="KL weight of the second run of check [1]"
    )
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max|a - b| / max|b| per LoRA tensor")
    parser.add_argument(
        "--grad-tolerance", type=float, default=1e-4, help="max|a - b| / max|b| per gradient tensor"
    )
    parser.add_argument(
        "--floor-factor", type=float, default=10.0, help="allowed multiple of the float32 noise floor"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--presets-dir",
        type=Path,
        default=ROOT / "configs",
        help="where check 0 reads the Flow-GRPO presets (default: the shipped configs/)",
    )
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument(
        "--num-batches", type=int, default=4, help="the reference's sample.num_batches_per_epoch"
    )
    args = parser.parse_args(argv)
    if not 2 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be between 2 and {len(PROMPTS)}")
    if args.num_batches % 4 or args.group_size % args.num_batches:
        # 2 updates of num_batches / 2 micro-batches (half as many in the floor run); the kept samples split evenly
        parser.error("--num-batches must be a multiple of 4 that divides --group-size")
    torch.set_num_threads(1)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    ref = load_reference(args.reference.resolve())
    tiny_reference_config(ref, args)
    from diffrl.models.loading import tiny_model_dir

    model_dir = tiny_model_dir("tiny:sd3")
    c = ref.config
    print(
        f"reference {args.reference} (pickscore_sd3 at tiny sizes): {c.sample.num_steps} steps, "
        f"{int(c.sample.num_steps * c.train.timestep_fraction)} trained, guidance {c.sample.guidance_scale}, noise "
        f"level {c.sample.noise_level}, clip_range {c.train.clip_range}, beta {c.train.beta}, adv_clip_max "
        f"{c.train.adv_clip_max}, AdamW lr {c.train.learning_rate} weight decay {c.train.adam_weight_decay}, "
        f"max_grad_norm {c.train.max_grad_norm}, {c.sample.num_batches_per_epoch} micro-batches x gradient "
        f"accumulation {c.train.gradient_accumulation_steps}, LoRA r={ref.lora_kwargs['r']} "
        f"alpha={ref.lora_kwargs['lora_alpha']}, T5 length {ref.max_sequence_length}; {args.prompts} prompts x "
        f"{args.group_size} images of {c.resolution}x{c.resolution}, float32 on the CPU"
    )
    results = {}
    print("\n[0] the shipped presets against the reference configurations they reproduce")
    results["[0] presets"] = check_presets(ref, args.presets_dir)
    with tempfile.TemporaryDirectory(prefix="parity-flow-grpo-") as tmp:
        workdir = Path(tmp)
        print(
            "\n[1] one step (2 updates) on stored rollouts, diffrl with flow_grpo.kl_scale=reference cfg_grad=cond "
            "num_minibatches=2 drop_zero_advantage=true"
        )
        base = stored_step(ref, args, workdir, model_dir)
        for beta in (args.beta, args.kl_check_beta):
            print(f"\n  -- beta = {beta:g}")
            c.train.beta = beta
            results[f"[1] one update, beta {beta:g}"] = check_one_update(ref, args, workdir, model_dir, base)
            if beta == args.beta:
                lora_ref, ref_updates = base["lora_ref"], base["ref_updates"]
        c.train.beta = args.beta
        base["lora_ref"], base["ref_updates"] = lora_ref, ref_updates
        print(
            f"\n[2] {args.steps} steps with sampling, diffrl's noise given to the reference (beta = {args.beta:g})"
        )
        results[f"[2] {args.steps} steps with sampling"] = check_sampling_steps(ref, args, workdir, model_dir)
        print("\n[3] zero-advantage mask: one group of G equal float32 rewards, global std")
        results["[3] zero-advantage mask"] = check_zero_advantages(ref, args)
        print(
            "\n[5] group_by=text and tokens: steps that draw one prompt text twice, against the reference's stat "
            "tracker"
        )
        results["[5] text groups"] = check_text_groups(ref, args, model_dir)
        print(
            f"\n[4] for the record: diffrl's other options against the reference step of [1] (beta = {args.beta:g}; "
            "||a - b|| / ||b|| over all LoRA tensors)"
        )
        check_variants(ref, args, workdir, base)
    print()
    for name, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    if all(results.values()):
        print("parity: diffrl's Flow-GRPO update with the reference options equals the reference code's")
        return 0
    print("parity FAILED")
    return 1


if __name__ == "__main__":
    sys.exit(main())
