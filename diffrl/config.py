"""Typed run configuration: dataclasses with a docstring per field, YAML presets, dotted ``key=value`` overrides.

``load_config("configs/tiny/flow_grpo.yaml", ["optim.lr=1e-4", "max_steps=20"])`` reads a preset, applies the
overrides and validates everything (unknown keys, wrong types, sizes that do not fit) before any model is loaded,
raising :class:`ConfigError` with one sentence that names the bad value and the fix.

Each field's documentation is the string literal right under it (as in cleanrl); :func:`field_docs` reads them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .utils import shipped_config_path

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "SampleConfig",
    "OptimConfig",
    "FlowGRPOConfig",
    "DiffusionNFTConfig",
    "ReFLConfig",
    "AWMConfig",
    "DPOConfig",
    "MonitorConfig",
    "TrainConfig",
    "load_config",
    "config_to_dict",
    "parse_override",
    "RESUME_FREE_KEYS",
    "resume_mismatch",
    "field_docs",
    "config_classes",
    "ALGORITHMS",
]

ALGORITHMS = ("flow_grpo", "diffusion_nft", "refl", "awm", "dpo")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names it and the fix."""


@dataclass
class ModelConfig:
    path: str = ""
    """Hub id or local directory of a diffusers pipeline of a supported family (docs/models.md: SD3/SD3.5, FLUX.1,
    FLUX.2, Qwen-Image, Z-Image, ...), a tiny:<family> test model, or toy / toy:cliptext (the shipped toy models)."""
    dtype: str = "float32"
    """Dtype of the frozen weights: float32, bfloat16 or float16 (LoRA weights and sampler maths stay float32)."""
    lora_rank: int = -1
    """LoRA rank; -1 uses the family default (SD3: 32, FLUX: 64); 0 trains every transformer weight instead."""
    lora_alpha: float = -1.0
    """LoRA alpha; -1 uses the family default (twice the default rank)."""
    lora_init: str = "default"
    """Initial LoRA A matrices (B starts at 0 either way, so the adapted model starts as the base): default (PEFT's
    Kaiming-uniform) or gaussian (N(0, 1/rank), the Flow-GRPO and DiffusionNFT reference codes')."""
    lora_targets: list[str] = field(default_factory=list)
    """Module names to adapt; empty uses the family default (attention projections; FLUX also feed-forward)."""
    lora_from: str = ""
    """Start the trained LoRA from these weights instead of from zero: a diffusers LoRA (a directory such as another
    run's lora/, or its .safetensors file) or a run's checkpoint-N/ (its EMA weights when it kept them). Its rank,
    alpha and adapted modules are used (lora_rank / lora_alpha left at -1, or set to the same). The optimiser and the
    step count start fresh, and the reference policy stays the base model. Empty: a fresh LoRA."""
    gradient_checkpointing: bool = False
    """Recompute transformer activations in the backward pass (less memory, about 30% more time)."""
    offload_text_encoders: bool = False
    """Keep the text encoders on the CPU between encodings: they move to the GPU only to encode prompts the prompt
    cache lacks (each distinct prompt once), so their memory is free while sampling and training; the same
    embeddings either way."""
    vae_dtype: str = "float32"
    """Dtype the VAE decodes in: float32 (as both reference codes do, so rewards see the same images) or model (the
    frozen weights' dtype, less memory)."""
    max_sequence_length: int = 0
    """T5 tokens per prompt (SD3/FLUX); 0 uses the adapter's default (SD3: 256, as the diffusers pipeline; FLUX: 512).
    The Flow-GRPO and DiffusionNFT reference codes encode 128 tokens for SD3.5."""
    expert: str = ""
    """Wan 2.2 A14B (two experts): the one this run trains, high (high-noise, `transformer`) or low (low-noise,
    `transformer_2`), the other staying frozen; or both, each trained on the levels it denoises (its LoRA saved as
    two files, the low-noise one in `lora/transformer_2`). Empty for every other model."""
    guidance_scale_2: float = 0.0
    """Wan 2.2 A14B: the CFG scale of the low-noise expert's steps (the pipeline's `guidance_scale_2`), in rollouts,
    training passes and evaluation alike; 0 uses the guidance scale of the call for both experts."""
    condition_image_size: int = 0
    """Edit and reference-image models (Qwen-Image-Edit, Qwen-Image-Edit-2509, FLUX.2): the source or reference images
    are VAE-encoded at about this side squared pixels, each at its own aspect ratio (Flow-Factory's
    condition_image_size): Qwen-Image-Edit-2509 resizes them to that area (its VL encoder still sees 384 x 384),
    Qwen-Image-Edit too (its pipeline's one size, VL encoder included), FLUX.2 scales down only those above it. 0 keeps
    the pipelines' 1024 x 1024. Training and evaluation alike; `diffrl sample`/`eval` use the pipelines' size."""


@dataclass
class DataConfig:
    train: str = ""
    """Training prompts: a .txt file (one prompt a line), a .jsonl file (a "prompt" field plus metadata per line)
    or "hf:<dataset>[:<split>]" for a Hugging Face datasets dataset."""
    eval: str = ""
    """Held-out evaluation prompts, same formats; empty holds out eval_size prompts of the training set."""
    eval_size: int = 16
    """How many prompts to hold out of the training set when no eval file is given (and how many to evaluate)."""
    prompt_key: str = "prompt"
    """The field holding the prompt in .jsonl files and datasets; the other fields are metadata for rewards."""


@dataclass
class SampleConfig:
    height: int = 512
    """Image height in pixels."""
    width: int = 512
    """Image width in pixels."""
    num_steps: int = 10
    """Sampling steps in training rollouts."""
    guidance_scale: float = 4.5
    """CFG scale (SD3) or guidance-embedding scale (FLUX.1-dev) in training rollouts; DiffusionNFT samples without
    CFG and ignores it for SD3."""
    eval_num_steps: int = 40
    """Sampling steps for evaluation images."""
    eval_guidance_scale: float = 4.5
    """Guidance scale for evaluation images."""
    eval_images_per_prompt: int = 1
    """Evaluation images per held-out prompt, each from its own fixed seed (GenEval uses 4); more images make the
    evaluation means less noisy. The first image of each prompt is the same whatever this number."""
    batch_size: int = 8
    """Most images sampled (and scored) at once on one device; memory knob, does not change results."""
    num_frames: int = 0
    """Video models (Wan): frames per video, 1 more than a multiple of 4 (Wan's VAE: a first frame, then groups of
    4); 0 is the model's default (Wan: 81). Image models: leave it at 0."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping; 0 disables it."""
    use_8bit_adam: bool = False
    """Use bitsandbytes' 8-bit AdamW (needs bitsandbytes and a GPU)."""
    lr_scheduler: str = "constant"
    """Learning-rate schedule: constant, linear or cosine (with warmup_steps of linear warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    train_batch_size: int = 4
    """Most samples in one forward/backward pass on one device; memory knob, does not change results."""


@dataclass
class FlowGRPOConfig:
    group_size: int = 8
    """Images per prompt (G); advantages are relative to the group."""
    prompts_per_step: int = 4
    """Prompt groups per training step, over all processes (must be divisible by the number of processes)."""
    sampler: str = "sde"
    """Stochastic step of the rollouts: sde (Flow-GRPO) or cps (coefficients-preserving)."""
    noise_level: float = 0.7
    """SDE/CPS noise level a."""
    sde_window: int = 0
    """Flow-GRPO-Fast: length of the window of stochastic (and trained) steps; 0 makes every step stochastic."""
    sde_window_range: list[int] = field(default_factory=list)
    """[lo, hi): where the window may start; empty means the first half of the steps (random schedule) or every
    start whose window ends before the last step (sliding schedule)."""
    window_schedule: str = "random"
    """Where the sde_window sits at each training step: random (a start drawn per step in sde_window_range,
    Flow-GRPO-Fast) or sliding (MixGRPO: the window starts at the range's lo and moves window_stride steps later
    every window_shift_every training steps)."""
    window_shift_every: int = 25
    """Sliding schedule: training steps the window stays at one place (MixGRPO's iters_per_group: 25, Flash 20)."""
    window_stride: int = 1
    """Sliding schedule: sampling steps the window moves at each shift (MixGRPO's prog_overlap_step: 1; 0 keeps it
    at its start, as MixGRPO-Flash*)."""
    window_end: str = "wrap"
    """Sliding schedule, when the next start would leave the range: wrap (back to its start, MixGRPO's roll_back)
    or stay (at the last start)."""
    post_window_solver: str = "euler"
    """Deterministic solver of the steps after the sde_window: euler or dpm2 (second-order multistep DPM-Solver++,
    MixGRPO-Flash); the steps before the window are Euler steps either way."""
    ratio_norm: bool = False
    """GRPO-Guard's ratio normalisation: the log-ratio of step k is delta_k (logp - logp_old) + mean_d (mu -
    mu_old)^2 / (2 delta_k), delta_k the step's std, which centres it on 0 and gives it the same scale at every
    step (the rollout's transition means are kept for it)."""
    grad_reweight: bool = False
    """GRPO-Guard's gradient re-weighting: the policy loss of step k is multiplied by 1 / |dt_k| (dt_k = s_{k+1} -
    s_k), which evens the gradient out over the steps."""
    timestep_fraction: float = 0.99
    """Fraction of the stochastic steps that are trained (the reference drops the last step at 10 steps)."""
    timestep_selection: str = "first"
    """Which stochastic steps each image trains: first (the first max(1, int(K * timestep_fraction)) of the K
    stochastic steps, the same for every image: Flow-GRPO's reference) or random (each image its own
    max(1, int((K - 1) * timestep_fraction)) steps, drawn at random among the stochastic steps but the last, anew
    every training step: Pref-GRPO's train_flux.py, a randperm per sample). random needs sde_window=0."""
    clip_range: float = 1e-4
    """PPO clip range eps (1e-5 for Fast/CPS in the reference)."""
    clip_range_high: float = 0.0
    """Upper clip range (DAPO clip-higher); 0 uses clip_range."""
    kl_beta: float = 0.04
    """Weight of the KL to the base model (adapter disabled), in kl_scale units (the reference's: 0.04 for GenEval and
    OCR, 0.01 for PickScore); 0 skips the reference pass."""
    advantage: str = "score"
    """What the group-relative advantage is computed from: score (the reward values, normalised as adv_std says:
    Flow-GRPO) or winrate (Pref-GRPO: each image's win rate against the rest of its group by comparing rewards, a win
    1, a tie 0.5, a loss 0, then normalised by the group's mean and std, n - 1, + 1e-8, whatever adv_std says; a
    pairwise win-rate reward's scores are taken as the win rates as they are)."""
    adv_std: str = "global"
    """Advantage normalisation of advantage=score: global (std over the whole gathered batch, the reference) or
    group."""
    adv_clip: float = 5.0
    """Advantages are clipped to +-adv_clip."""
    train_per_group: int = 0
    """Train on only this many of each group's group_size rollouts (m, at least 2), the m whose rewards vary most
    (PODS's max-variance down-sampling, arXiv 2504.13818: the k best and m - k worst for the best k); their
    advantages are computed among the kept rollouts. The training passes cost m / group_size of the full ones. 0
    (the default, the reference's) trains on every rollout."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (DAPO dynamic sampling); their fraction is logged either way."""
    trajectory_ratio: bool = False
    """One ratio per trajectory from the mean step log-ratio (GSPO-style) instead of one per step."""
    num_inner_epochs: int = 1
    """Passes over each batch of rollouts."""
    num_minibatches: int = 1
    """Optimiser updates per inner epoch: the shuffled samples are split into this many equal parts, one update after
    each, so every update after the first is off-policy and the PPO clip acts (the reference's SD3.5 configs: 2).
    Each process shuffles and splits its own samples, as the reference does, so with more than one part the updates
    depend on the number of processes."""
    kl_scale: str = "reference"
    """Units of the KL term: reference (||mu - mu_ref||^2 / (2 sigma_t^2), the reference code's, in which the papers'
    kl_beta values are given) or exact (the Gaussian KL of the step, divided by 2 sigma_t^2 |dt|: larger by 1/|dt|,
    25x at the first of 10 SD3.5 steps, about 13x on average)."""
    cfg_grad: str = "cond"
    """Gradient through classifier-free guidance when training log-probs: cond (the unconditional prediction is
    detached, the reference code's) or full (both branches, the exact gradient of the guided policy)."""
    drop_zero_advantage: bool = False
    """Leave samples whose advantage is exactly 0 out of the loss (policy and KL terms), as the reference code
    does; with 0/1 rewards those are the groups with equal rewards. Their fraction is logged either way."""
    old_logp: str = "rollout"
    """Old log-probs of the PPO ratio: rollout (stored while sampling, the reference's) or recompute (a no-grad pass
    with the training micro-batches just before the first update, so the first ratio is exactly 1 in bf16 too)."""


@dataclass
class DiffusionNFTConfig:
    group_size: int = 8
    """Images per prompt (G)."""
    prompts_per_step: int = 4
    """Prompt groups per training step, over all processes."""
    train_per_group: int = 0
    """Train on only this many of each group's group_size rollouts (m, at least 2), the m whose rewards vary most
    (PODS's max-variance down-sampling, arXiv 2504.13818: the k best and m - k worst for the best k); their
    advantages are computed among the kept rollouts. The training passes cost m / group_size of the full ones. 0
    (the default, the reference's) trains on every rollout."""
    beta: float = 1.0
    """Strength of the implicit positive/negative policies (0.1 for OCR and multi-reward in the paper)."""
    kl_weight: float = 1e-4
    """Weight of mean((v_theta - v_base)^2), the pull towards the base model (adapter disabled)."""
    weighting: str = "adaptive"
    """Loss: adaptive (the reference code's x0-space loss with a self-normalising weight, the default because it
    is what the published results used) or velocity (the paper's equation)."""
    adv_clip: float = 5.0
    """Advantages are clipped to +-adv_clip before r = 0.5 + A / (2 adv_clip)."""
    decay_flat: int = 0
    """Old-policy soft update: steps with decay 0 (the old policy copies the current one)."""
    decay_rate: float = 0.001
    """Old-policy decay increase per step after decay_flat."""
    decay_cap: float = 0.5
    """Largest old-policy decay."""
    num_train_levels: int = 0
    """Noise levels trained per sample per step, drawn at random from the rollout's levels without repeats; 0 uses all
    but one (a randomly chosen one is left out); values above the number of levels use them all."""
    solver: str = "euler"
    """Deterministic solver of the old policy's rollouts: euler or dpm2 (second-order multistep DPM-Solver++, the
    reference code's); the training levels are the schedule's levels either way."""
    per_sample_levels: bool = False
    """Each sample draws its own random order of the levels (the reference code's); false shares one draw by the
    whole step."""
    num_minibatches: int = 1
    """Optimiser updates per step: the samples are split into this many equal parts, one update after each (the
    reference's gradient_step_per_epoch; its OCR config uses 2). The old-policy decay counts optimiser updates. Each
    process shuffles and splits its own samples, as the reference does."""


@dataclass
class ReFLConfig:
    prompts_per_step: int = 8
    """Prompts (one image each) per training step, over all processes."""
    stop_min: float = 0.75
    """Earliest stop, as a fraction of the sampling steps (the reference stops at steps 30-39 of 40)."""
    stop_max: float = 1.0
    """Latest stop fraction (exclusive)."""
    grad_steps: int = 1
    """Steps before the stop that keep the graph (DRaFT-K); 1 is ReFL's single step."""
    loss: str = "hinge"
    """hinge: relu(target - r) (ReFL with ImageReward) or linear: -r."""
    target: float = 2.0
    """Hinge target."""
    scale: float = 1e-3
    """Loss scale (ReFL: 1e-3)."""
    kl_weight: float = 0.0
    """Weight of mean((v_theta - v_base)^2) on the grad steps (DRaFT+ style regulariser)."""
    denoise_weight: float = 0.0
    """Weight of the flow-matching loss on the model's own ODE samples (ReFL's denoising regulariser); 0: off."""
    grad_guidance_scale: float = -1.0
    """CFG scale of the steps with grad (SD3); -1 uses sample.guidance_scale, 1 makes them CFG-free as ImageReward's
    ReFL script is."""


@dataclass
class AWMConfig:
    group_size: int = 24
    """Images per prompt (G), at least 2; advantages are relative to the group (the reference's 24)."""
    prompts_per_step: int = 24
    """Prompt groups per training step, over all processes (a multiple of the number of processes; the reference's
    PickScore run: 24, GenEval and OCR: 72)."""
    solver: str = "euler"
    """Deterministic solver of the rollouts: euler or dpm2 (second-order multistep DPM-Solver++); awm.sampler makes
    some steps stochastic."""
    sampler: str = "ode"
    """Rollout sampler: ode (deterministic everywhere, the default); sde (Flow-GRPO's ODE-to-SDE step) or cps
    (coefficients-preserving sampling) on the steps that start at a level t in awm.sde_t_range, deterministic
    elsewhere (with solver=dpm2 the steps after that window are DPM-Solver++ steps, the ones before it Euler steps);
    or sa_solver, the reference's: SA-Solver (stochastic Adams predictor and corrector of order 2, PEC) on the
    reference's grid, stochastic (tau = noise_level) on the steps that end at a level t in awm.sde_t_range. No
    likelihood is used."""
    noise_level: float = 0.7
    """The noise of the stochastic rollout steps: sde or cps, their noise scale a (Flow-GRPO's 0.7, positive);
    sa_solver, its stochasticity tau (the reference: 0.4 for GenEval and OCR, 0 for PickScore, the deterministic
    SA-Solver)."""
    sde_t_range: list[float] = field(default_factory=lambda: [0.3, 0.9])
    """[lo, hi]: with sampler sde or cps the rollout steps that start at a level t with lo <= t <= hi are
    stochastic; with sa_solver the steps that end at such a level (the reference's SA-Solver window: [0.3, 0.9])."""
    rollout_policy: str = "current"
    """Which adapter samples the rollouts: current (the trained one, on-policy; the reference configs') or ema (the
    slowly following EMA policy of the ema_kl_weight term, the reference's off_policy). With ema the policy loss is
    the reference's clipped surrogate on r = exp(l_ema - l), the ratio of the EMA and the trained adapter's matching
    losses at the same x_t (awm.clip_range); the EMA adapter is kept even with ema_kl_weight 0."""
    clip_range: float = 1.0
    """With rollout_policy=ema, the ratio's clip: mean(max(-w r, -w clip(r, 1 - c, 1 + c))) (the reference configs'
    clip_range 1). On-policy r = 1 and the clip never acts."""
    ratio: str = "level"
    """With rollout_policy=ema, what one ratio r covers: level (one per sample and training level, the reference's
    loss_type exp_first, its configs') or sample (one per sample, r = exp(mean over its levels of l_ema - l), the
    reference's sum_first; a micro-batch's level passes are then held for one backward, num_train_timesteps times
    the activation memory). On-policy r = 1 and both give the same gradient."""
    train_per_group: int = 0
    """Train on only this many of each group's group_size rollouts (m, at least 2), the m whose rewards vary most
    (PODS's max-variance down-sampling, arXiv 2504.13818: the k best and m - k worst for the best k); their
    advantages are computed among the kept rollouts. The training passes cost m / group_size of the full ones. 0
    (the default, the reference's) trains on every rollout."""
    rollout_guidance: float = 1.0
    """Classifier-free guidance scale of the rollouts (1: none, the reference's). Above 1 (models whose guidance is
    CFG only) the rollouts are the guided model's while the matching loss still trains the guidance-free velocity:
    the policy also learns what guidance adds (a deviation from the paper; a second transformer pass per rollout
    step)."""
    adv_std: str = "global"
    """Advantage normalisation: global (std over the whole gathered batch, the reference configs') or group."""
    adv_clip: float = 5.0
    """Advantages are clipped to +-adv_clip before they are rescaled by adv_max / adv_clip."""
    adv_max: float = 1.0
    """Largest advantage weight after rescaling: the weight is clip(A, +-adv_clip) * adv_max / adv_clip (the
    reference's advantage_max, 1: weights in [-1, 1])."""
    num_train_timesteps: int = 6
    """Noise levels t per sample per step at which the matching loss is evaluated (the reference's 6), each with
    fresh noise."""
    timesteps: str = "levels"
    """How the training levels are drawn: levels (the rollout's own levels, one from each of num_train_timesteps
    equal bins of the level indices [first_level, int(num_steps * timestep_fraction)), the reference's discrete
    draw) or logit_normal (continuous t, stratified logit-normal shifted by time_shift, at least 0.01)."""
    first_level: int = 1
    """With timesteps=levels, the first level index drawn from (1: the reference's GenEval and OCR runs leave out
    the pure-noise level 0; its PickScore run uses 0)."""
    timestep_fraction: float = 0.9
    """With timesteps=levels, the fraction of the rollout's levels drawn from (the reference's 0.9)."""
    time_shift: float = 3.0
    """With timesteps=logit_normal, the shift s of t -> s t / (1 + (s - 1) t) (the reference's 3)."""
    weighting: str = "ghuber"
    """Per-sample matching loss from the mean squared velocity error L at level t: ghuber (t ((L + 1e-10)^p -
    1e-10^p) / p with p = ghuber_power, the reference configs'), t (t L) or uniform (L, the paper's
    flow-matching loss)."""
    ghuber_power: float = 0.25
    """The power p of weighting=ghuber, in (0, 1] (the reference's 0.25; 1 is weighting=t)."""
    kl_weight: float = 1e-3
    """Weight of mean((v_theta - v_base)^2), the pull towards the base model (adapter disabled); the reference's
    GenEval 1e-3, OCR 3e-3, PickScore 1e-4. 0 skips the base forward pass."""
    ema_kl_weight: float = 1.0
    """Weight of mean((v_theta - v_ema)^2), the pull towards a slowly following copy of the policy (a second LoRA
    adapter, the reference's ema_beta 1); 0 keeps no such adapter."""
    ema_kl_rate: float = 0.001
    """That copy's soft update after each step, theta_ema <- d theta_ema + (1 - d) theta with d = min(ema_kl_rate
    * u, ema_kl_cap) and u the optimiser updates so far (the reference's linear kl_ema_decay: 0.001 per update)."""
    ema_kl_cap: float = 0.3
    """Largest decay d of that soft update, in [0, 1) (the reference's kl_ema_decay 0.3)."""


@dataclass
class VideoConfig:
    """How a video run scores its clips with image rewards (a clip reward, see ``diffrl.rewards.video_reward``,
    sees whole videos and ignores these)."""

    frames: list[int] = field(default_factory=list)
    """Indices of the frames an image reward scores, e.g. [0, -1] (negative from the end); empty: see every/num."""
    every: int = 0
    """Score every k-th frame from frame 0 (0: not this way)."""
    num: int = 0
    """Score n frames evenly spaced from the first to the last (1: the middle frame; 0: not this way). With none of
    frames/every/num, every frame is scored."""
    combine: str = "mean"
    """How the scores of a video's frames become its reward: mean or min (the worst frame)."""
    fps: int = 16
    """Frames per second of the videos `diffrl sample` writes (Wan 2.1: 16)."""
    vae_tiling: bool = False
    """Decode videos in overlapping spatial tiles, blended at their seams (diffusers' `AutoencoderKLWan.enable_tiling`):
    the VAE's activations then scale with the tile, not the frame; the video differs from the untiled one near the
    seams (as with the pipeline's own tiling)."""
    vae_tile_size: int = 0
    """With vae_tiling: the tile's height and width in pixels, a multiple of 16; 0 is diffusers' default, 256."""
    vae_tile_stride: int = 0
    """With vae_tiling: pixels between the starts of neighbouring tiles (a multiple of 16, less than the tile: the rest
    is blended); 0 is diffusers' default, 192."""
    vae_slicing: bool = False
    """Decode the videos of a batch one at a time (diffusers' `enable_slicing`): the decoder's activations of one
    video at once, the same videos (equal to 1e-6)."""


@dataclass
class DPOConfig:
    mode: str = "online"
    """Where the preference pairs come from: online (sampled from the current policy every online_every steps and
    paired by the reward within each group) or offline (a preference dataset, dpo.dataset)."""
    beta: float = 100.0
    """The DPO temperature on the per-sample mean squared velocity error (the Flow-GRPO reference code's DPO runs:
    100; Flow-Factory's default 2000); larger keeps the model closer to the reference."""
    num_train_timesteps: int = 1
    """Noise levels t per pair per step, each with fresh noise shared by the chosen and the rejected sample (the
    Diffusion-DPO and Flow-Factory recipes: 1)."""
    timesteps: str = "logit_normal"
    """How t is drawn per pair: logit_normal (sigmoid of a standard normal, shifted by time_shift; SD3's training
    distribution, Flow-Factory's DPO default) or uniform (in (0, 1), Diffusion-DPO's)."""
    time_shift: float = 1.0
    """The shift s of t -> s t / (1 + (s - 1) t) applied to the drawn levels (1: none)."""
    group_size: int = 8
    """Online: images sampled per prompt (at least 2); pairs are formed within each group."""
    prompts_per_step: int = 8
    """Online: prompt groups sampled per sampling round, over all processes (a multiple of the number of
    processes)."""
    online_every: int = 1
    """Online: sample new groups every this many steps; the steps in between train again on the last round's pairs
    (with fresh levels and noise)."""
    pairs: str = "best_worst"
    """Online: best_worst (one pair per group, its best against its worst image) or all (every two images of a
    group, the better one chosen)."""
    min_margin: float = 0.0
    """Online: a pair trains only when the chosen reward exceeds the rejected one by more than this (ties never
    do)."""
    solver: str = "euler"
    """Online: the deterministic solver of the rollouts, euler or dpm2 (with sample.guidance_scale and
    sample.num_steps)."""
    rollout_policy: str = "current"
    """Online: the model the groups are sampled from: current (the trained policy, on-policy DPO) or reference (the
    loss's reference: the base model with the LoRA adapter off, or the dpo.ref_update_every copy; the Flow-GRPO DPO
    script's, which samples with its reference adapter)."""
    sampler: str = "ode"
    """Online: ode (every rollout step deterministic, dpo.solver) or sde (every step Flow-GRPO's SDE step with noise
    dpo.noise_level, each image's noise its own: the Flow-GRPO DPO script's pipeline)."""
    noise_level: float = 0.7
    """Online, with sampler sde: the SDE noise scale a (the Flow-GRPO DPO script's sample.noise_level, 0.7)."""
    ref_update_every: int = 0
    """Every this many steps the reference becomes a copy of the trained policy (a second LoRA adapter; the Flow-GRPO
    DPO script's ref_update_step, its "OnlineDPO"); it is the reference of the loss and, with rollout_policy
    reference, the sampled model. 0 (default): never, the reference is the base model (the adapter off)."""
    dataset: str = ""
    """Offline: a .jsonl file of {"prompt", "chosen", "rejected"} rows (image paths, or .safetensors/.pt latent
    paths, relative to the file) or a Hugging Face datasets directory (save_to_disk) or data files (.parquet,
    .arrow) of Pick-a-Pic style columns caption, jpg_0, jpg_1, label_0 (ties, label_0 = 0.5, are skipped)."""
    pairs_per_step: int = 8
    """Offline: preference pairs per training step, over all processes (a multiple of the number of processes);
    the pairs are visited in a new random order every epoch."""
    cache_dir: str = ""
    """Offline: where the VAE latents of the dataset's images are cached, keyed by a fingerprint of the data, the
    image size and the VAE weights (empty: output_dir), so a resumed run or a second epoch never encodes again."""


@dataclass
class MonitorConfig:
    enabled: bool = True
    """Log the reward-hacking monitor at each evaluation: the training reward on the evaluation images (proxy)
    against the held-out gold signal, their gap, and within-prompt diversity (needs sample.eval_images_per_prompt of
    at least 2); see docs/troubleshooting.md#reward-hacking."""
    gold: str = ""
    """The evaluation-reward component that is the gold signal, e.g. a weight-0 monitor such as
    shapes_extra_objects; empty uses the evaluation reward's weighted sum."""
    features: str = "pixels"
    """Image features of the diversity metric: pixels (RGB means over an 8 x 8 grid, layout and colour),
    histogram (8-bin colour histogram per channel, colour only), or the embeddings of a model, clip (a
    transformers CLIPModel) or dino (a DINOv2 model), compared by cosine distance."""
    feature_model: str = ""
    """The model of features clip or dino: a hub id, a local directory or toy:clip (the toy world's shipped CLIP);
    empty takes openai/clip-vit-large-patch14 for clip and facebook/dinov2-small for dino."""
    min_change: float = 0.0
    """The proxy-up-gold-down warning fires when, between two evaluations, the proxy rose and the gold signal fell
    each by more than this (in each reward's own units)."""
    diversity_collapse: float = 0.5
    """Warn when within-prompt diversity falls below this fraction of its value at the run's first evaluation; 0
    turns the warning off."""


@dataclass
class TrainConfig:
    algorithm: str = "flow_grpo"
    """Trainer: flow_grpo, diffusion_nft, refl, awm or dpo."""
    output_dir: str = "runs/diffrl"
    """Run directory: config, metrics.jsonl, TensorBoard logs, checkpoints and the final LoRA."""
    seed: int = 0
    """Seed of everything (prompt order, noise, dropout)."""
    max_steps: int = 100
    """Training steps (one optimiser update each)."""
    checkpointing_steps: int = 50
    """Save a checkpoint every this many steps (0: only at the end)."""
    checkpoints_total_limit: int = 3
    """Checkpoints to keep (the oldest are deleted, never the newest that verifies); 0 keeps them all."""
    resume_from_checkpoint: str = ""
    """latest, a checkpoint directory, or empty to start fresh."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the start and the end)."""
    log_every: int = 1
    """Write metrics every this many steps."""
    report_to: str = "tensorboard"
    """Extra metric sink: tensorboard, wandb or none (metrics.jsonl is always written)."""
    mixed_precision: str = "no"
    """Autocast: no, bf16 or fp16."""
    ema_decay: float = 0.0
    """EMA of the trained weights, used for evaluation and the final LoRA or pipeline (reference 0.9); 0 disables it.
    Not DiffusionNFT's old policy (diffusion_nft.decay_*), which the loss uses."""
    ema_warmup: bool = False
    """Ramp the EMA decay up as min(ema_decay, (1 + u) / (10 + u)) over optimiser updates u (both reference codes)."""
    ema_every: int = 1
    """Update the EMA every this many optimiser updates (Flow-GRPO's reference: 8)."""
    max_bad_steps: int = 5
    """Consecutive steps with a non-finite reward, loss or gradient before the run stops: it writes a checkpoint,
    marks status.json aborted, writes no final LoRA and exits with code 1 (train() raises TrainingAborted)."""
    fsdp: bool = False
    """Shard the transformer with FSDP2 over the launched processes (also on CPU/gloo; ignored with one process); an
    accelerate config with distributed_type FSDP turns it on whatever this says. LoRA or full fine-tuning; refuses fp16,
    optim.use_8bit_adam and flow_grpo.dynamic_sampling. Wan 2.2's experts (model.expert) shard both experts."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 1 (AdamW states partitioned over the processes) or 2 (gradients too) under any
    multi-process launch (also on CPU/gloo; ignored with one process); 0: off. An accelerate config with
    distributed_type DEEPSPEED sets it from its file. Needs deepspeed (pip install 'diffrl[deepspeed]')."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt sources."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Sampling settings."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser settings."""
    reward: dict[str, float] = field(default_factory=dict)
    """Training reward(s): {name or "module:attr": weight}."""
    reward_kwargs: dict[str, dict] = field(default_factory=dict)
    """Options per reward name, e.g. {hpsv2: {version: v2.1}}."""
    reward_normalize: str = ""
    """Normalisation of each reward of a sum: empty (none), batch (z-scored over the step), running (running
    statistics) or group (z-scored within each prompt's group of images, as Pref-GRPO combines its rewards; needs a
    group trainer, not refl)."""
    eval_reward: dict[str, float] = field(default_factory=dict)
    """Evaluation reward(s), logged separately to catch reward hacking; empty reuses the training reward."""
    group_by: str = "slot"
    """Which images share a group for the advantages of flow_grpo, diffusion_nft and awm: slot (the group_size
    images of each drawn prompt, the default), text (every image of the step whose prompt text is the same, gathered
    over processes; it differs from slot only when a step draws one text twice, from repeated rows of the prompt
    file) or tokens (the same by the text as the model's first tokenizer reads it back, tokenized to at most 256
    tokens and decoded: the reference codes' per-prompt stat trackers' key, so with CLIP texts that differ only in
    case or spacing are one group)."""
    flow_grpo: FlowGRPOConfig = field(default_factory=FlowGRPOConfig)
    """Flow-GRPO settings."""
    diffusion_nft: DiffusionNFTConfig = field(default_factory=DiffusionNFTConfig)
    """DiffusionNFT settings."""
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    """ReFL / DRaFT settings."""
    awm: AWMConfig = field(default_factory=AWMConfig)
    """Advantage Weighted Matching settings."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Diffusion-DPO settings."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """Reward-hacking monitor logged at each evaluation."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """Video models: which frames image rewards score, and how the frames' scores combine."""


# ---------------------------------------------------------------------------------------------- parsing


def config_classes(cls: type | None = None) -> list[type]:
    """``TrainConfig`` (or ``cls``) and every config dataclass nested in it, in field order."""
    import dataclasses

    cls = cls or TrainConfig
    out = [cls]
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out += [c for c in config_classes(f.default_factory) if c not in out]
    return out


def field_docs(cls) -> dict[str, str]:
    """The docstring of each field of a config dataclass (the string literal under its annotation)."""
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, not {value!r}.")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r} must be a list.")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping, e.g. {{name: 1.0}}.")
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be true or false.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer.")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number.")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes (e.g. mixed_precision: no) as a boolean
            return "yes" if value else "no"
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string.")
        return value
    return value


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            if close:
                hint = f" (did you mean {', '.join(sorted(close))}?)"
            elif len(names) <= 12:
                hint = f" ({cls.__name__} has {', '.join(f.name for f in dataclasses.fields(cls))})"
            else:
                hint = ""
            raise ConfigError(
                f"unknown config key {where + '.' if where else ''}{key}{hint}; see docs for the fields of {cls.__name__}."
            )
    kwargs = {k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``(key path, value)`` of one dotted ``key=value`` override; ConfigError naming it when it is not one."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value; write e.g. optim.lr=1e-4.")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        hint = (
            "; quote the whole override for the shell, e.g. 'reward={hpsv2: 1.0}'"
            if raw.count("{") != raw.count("}") or raw.count("[") != raw.count("]")
            else ""
        )
        raise ConfigError(
            f"override {text!r}: cannot parse the value as YAML ({err.__class__.__name__}){hint}."
        ) from None
    return key.strip().split("."), value


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Fields a resumed run may change: bookkeeping (length, logging, checkpoints, the NaN guard), evaluation-only
# settings, and the memory knobs documented as not changing results. Everything else must match the checkpoint.
RESUME_FREE_KEYS = frozenset(
    {
        "max_steps",
        "output_dir",
        "resume_from_checkpoint",
        "eval_every",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "log_every",
        "report_to",
        "max_bad_steps",
        "fsdp",  # checkpoints are the same files sharded or not; only rounding differs
        "zero_stage",
        "sample.eval_num_steps",
        "sample.eval_guidance_scale",
        "sample.eval_images_per_prompt",
        "sample.batch_size",
        "optim.train_batch_size",
        "model.gradient_checkpointing",
        "model.offload_text_encoders",
        "monitor.enabled",
        "monitor.gold",
        "monitor.features",
        "monitor.feature_model",
        "monitor.min_change",
        "monitor.diversity_collapse",
        "video.fps",  # only the frame rate of written videos
        "dpo.cache_dir",
    }
)

_ABSENT = object()

# Fields added after runs were already being checkpointed whose default is not what those runs did: a checkpoint
# without the field ran with this value, so resuming it under the new default is refused rather than silently changed.
LEGACY_VALUES = {"flow_grpo.kl_scale": "exact", "flow_grpo.cfg_grad": "full"}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and (data or not prefix):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def resume_mismatch(saved: dict, current: TrainConfig) -> tuple[str, str, str] | None:
    """The first field where a checkpoint's config (the ``config`` of its ``state.json``) differs from ``current``,
    ignoring :data:`RESUME_FREE_KEYS`: ``(dotted key, checkpoint value, current value)``, the values as JSON text
    (``(not set)`` for a key one side lacks); ``None`` when they agree. A field the checkpoint does not hold (written
    by an older version) counts as its default."""
    now = _flatten(json.loads(json.dumps(config_to_dict(current))))
    then = _flatten(json.loads(json.dumps(saved)))
    defaults = _flatten(json.loads(json.dumps(config_to_dict(TrainConfig()))))
    for key in [*now, *(k for k in then if k not in now)]:
        if key in RESUME_FREE_KEYS:
            continue
        a = then.get(key, LEGACY_VALUES.get(key, defaults.get(key, _ABSENT)))
        b = now.get(key, _ABSENT)
        if a != b:
            a, b = ("(not set)" if v is _ABSENT else json.dumps(v) for v in (a, b))
            return key, a, b
    return None


def load_config(
    source: str | Path | dict | TrainConfig | None = None,
    overrides: list[str] | None = None,
    given: frozenset[str] | set[str] = frozenset(),
) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML file, a dict or a config, with dotted ``key=value`` overrides;
    ``given`` names the parts passed as objects instead (``model``, ``reward``, ``train_prompts``), whose config
    fields may then be empty."""
    import yaml

    if isinstance(source, TrainConfig):
        data = config_to_dict(source)
    elif isinstance(source, dict):
        data = json.loads(json.dumps(source))
    elif source is None:
        data = {}
    else:
        path = Path(shipped_config_path(source))
        if not path.is_file():
            raise ConfigError(
                f"config file {source} does not exist; pass a YAML preset such as configs/tiny/flow_grpo.yaml."
            )
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {source} must hold a mapping of fields, not {type(data).__name__}."
            )
    for text in overrides or []:
        keys, value = parse_override(text)
        _merge(data, keys, value)
    cfg = _build(TrainConfig, data)
    # the presets name their prompt files from the repository root (configs/...): found from any directory
    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        if isinstance(value, str) and value:
            setattr(cfg.data, key, shipped_config_path(value))
    validate(cfg, given=given)
    return cfg


def _at_least(lo):
    return lambda v: v >= lo


def _default_or_at_least(lo):
    return lambda v: v == -1 or v >= lo


def _in_unit(v):  # [0, 1)
    return 0 <= v < 1


# The range of every numeric field not checked with a message of its own in validate(): (dotted key, test, the
# allowed range in words). NaN fails every test. tests/test_trainers.py walks every numeric field with bad values.
_RANGES = [
    ("seed", _at_least(0), "at least 0"),
    ("checkpointing_steps", _at_least(0), "at least 0 (0: a checkpoint only at the end)"),
    ("checkpoints_total_limit", _at_least(0), "at least 0 (0 keeps every checkpoint)"),
    ("eval_every", _at_least(0), "at least 0 (0: evaluate only at the start and the end)"),
    ("log_every", _at_least(1), "at least 1"),
    ("ema_decay", _in_unit, "in [0, 1) (0 turns the EMA off)"),
    (
        "model.lora_rank",
        _default_or_at_least(0),
        "-1 (the family default), 0 (full fine-tuning) or a positive rank",
    ),
    ("model.lora_alpha", lambda v: v == -1 or v > 0, "-1 (twice the default rank) or positive"),
    (
        "model.condition_image_size",
        lambda v: v == 0 or v >= 32,
        "0 (the pipelines' 1024 x 1024) or at least 32 pixels",
    ),
    ("data.eval_size", _at_least(0), "at least 0"),
    ("sample.guidance_scale", _at_least(0), "at least 0 (1: no CFG)"),
    ("sample.eval_guidance_scale", _at_least(0), "at least 0 (1: no CFG)"),
    ("optim.weight_decay", _at_least(0), "at least 0"),
    ("optim.beta1", _in_unit, "in [0, 1)"),
    ("optim.beta2", _in_unit, "in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "positive"),
    ("optim.max_grad_norm", _at_least(0), "at least 0 (0 turns clipping off)"),
    ("optim.warmup_steps", _at_least(0), "at least 0"),
    ("flow_grpo.noise_level", _at_least(0), "at least 0 (0 is the ODE)"),
    ("flow_grpo.clip_range_high", _at_least(0), "at least 0 (0 uses clip_range)"),
    ("flow_grpo.kl_beta", _at_least(0), "at least 0 (0 turns the KL off)"),
    ("flow_grpo.adv_clip", lambda v: v > 0, "positive"),
    ("flow_grpo.window_shift_every", _at_least(1), "at least 1 (training steps per window position)"),
    ("flow_grpo.window_stride", _at_least(0), "at least 0 (0 keeps the sliding window at its start)"),
    ("diffusion_nft.kl_weight", _at_least(0), "at least 0 (0 turns the KL off)"),
    ("diffusion_nft.adv_clip", lambda v: v > 0, "positive"),
    ("diffusion_nft.decay_flat", _at_least(0), "at least 0"),
    ("diffusion_nft.decay_rate", _at_least(0), "at least 0"),
    ("diffusion_nft.decay_cap", _in_unit, "in [0, 1)"),
    ("diffusion_nft.num_train_levels", _at_least(0), "at least 0 (0: all levels but one)"),
    ("refl.target", math.isfinite, "a finite number"),
    ("refl.scale", lambda v: v > 0, "positive"),
    ("refl.kl_weight", _at_least(0), "at least 0 (0 turns the KL-style term off)"),
    ("refl.grad_guidance_scale", lambda v: v == -1 or v >= 0, "-1 (sample.guidance_scale) or at least 0"),
    ("awm.adv_clip", lambda v: v > 0, "positive"),
    ("awm.rollout_guidance", _at_least(1), "at least 1 (1: no classifier-free guidance)"),
    ("awm.noise_level", _at_least(0), "at least 0"),
    ("awm.clip_range", lambda v: 0 < v < math.inf, "positive and finite"),
    ("dpo.noise_level", lambda v: v > 0, "positive (dpo.sampler=ode is the deterministic rollout)"),
    ("awm.adv_max", lambda v: v > 0, "positive"),
    ("awm.num_train_timesteps", _at_least(1), "at least 1"),
    ("awm.first_level", _at_least(0), "at least 0"),
    ("awm.timestep_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("awm.time_shift", lambda v: v > 0, "positive (1: no shift)"),
    ("awm.ghuber_power", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("awm.kl_weight", _at_least(0), "at least 0 (0 turns the KL off)"),
    ("awm.ema_kl_weight", _at_least(0), "at least 0 (0 keeps no EMA adapter)"),
    ("awm.ema_kl_rate", _at_least(0), "at least 0"),
    ("awm.ema_kl_cap", _in_unit, "in [0, 1)"),
    ("dpo.beta", lambda v: 0 < v < math.inf, "positive and finite"),
    ("dpo.num_train_timesteps", _at_least(1), "at least 1"),
    ("dpo.time_shift", lambda v: 0 < v < math.inf, "positive (1: no shift)"),
    ("dpo.online_every", _at_least(1), "at least 1 (1: new pairs every step)"),
    ("dpo.ref_update_every", _at_least(0), "at least 0 (0: the reference stays the base model)"),
    ("dpo.min_margin", lambda v: 0 <= v < math.inf, "at least 0 and finite (0: any strict preference)"),
    ("dpo.pairs_per_step", _at_least(1), "at least 1"),
    ("monitor.min_change", _at_least(0), "at least 0 (0: any rise and fall)"),
    ("monitor.diversity_collapse", _in_unit, "in [0, 1) (0 turns the diversity warning off)"),
]


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(
    cfg: TrainConfig,
    num_processes: int = 1,
    given: frozenset[str] | set[str] = frozenset(),
    sharded: bool | None = None,
    zero_stage: int = 0,
) -> None:
    """Checks that need no model: choices, positive sizes, divisibility by the number of processes. Parts named in
    ``given`` (``model``, ``reward``, ``train_prompts``) come as objects, so their config fields may be empty.
    ``sharded`` (default: ``cfg.fsdp``) also refuses what FSDP does not support; ``zero_stage`` (a DeepSpeed
    launch's ZeRO stage, else 0) what DeepSpeed does not."""

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)

    need(
        not (cfg.fsdp and cfg.zero_stage),
        f"fsdp=true and zero_stage={cfg.zero_stage} both partition the training state; set one of them "
        "(fsdp shards the weights too, ZeRO only gradients and AdamW states).",
    )
    need(
        cfg.zero_stage in (0, 1, 2),
        f"zero_stage={cfg.zero_stage} is not supported; use 1 or 2 (0: off), or shard parameters with fsdp=true.",
    )
    # options that drop samples, so that processes run different numbers of forward and backward passes
    uneven = ""
    if cfg.algorithm == "flow_grpo":
        uneven = next(
            (k for k in ("dynamic_sampling", "drop_zero_advantage") if getattr(cfg.flow_grpo, k)), ""
        )
    # Pref-GRPO's per-image steps: a micro-batch of several images runs one forward per step any of them trains
    ragged = (
        cfg.algorithm == "flow_grpo"
        and cfg.flow_grpo.timestep_selection == "random"
        and cfg.optim.train_batch_size > 1
    )
    ragged_fix = (
        f"flow_grpo.timestep_selection=random with optim.train_batch_size={cfg.optim.train_batch_size} gives the "
        "processes different numbers of forwards (a micro-batch runs one per step any of its images trains), which "
    )
    if zero_stage:
        need(
            zero_stage == 1 or not ragged,
            ragged_fix
            + "deadlocks ZeRO-2's gradient reduction; set optim.train_batch_size=1 or use ZeRO stage 1.",
        )
        need(
            not cfg.fsdp,
            "fsdp=true under a DeepSpeed launch: pick one; set fsdp=false or launch with configs/accelerate/fsdp.yaml.",
        )
        need(
            not cfg.optim.use_8bit_adam,
            "optim.use_8bit_adam is not supported with DeepSpeed (ZeRO partitions a torch AdamW); set it to false.",
        )
        need(
            zero_stage == 1 or not uneven,
            f"flow_grpo.{uneven}=true gives the processes different numbers of backward passes, which "
            "deadlocks ZeRO-2's gradient reduction; set it to false or use ZeRO stage 1.",
        )
        need(
            not cfg.model.expert,
            f"model.expert={cfg.model.expert} under DeepSpeed is not implemented (a backward reaches only the experts "
            "of its levels, which ZeRO's gradient reduction cannot take); launch with fsdp=true, DDP or one process.",
        )

    if cfg.fsdp if sharded is None else sharded:
        need(
            cfg.mixed_precision != "fp16",
            "mixed_precision=fp16 is not supported with FSDP (its loss scaler sees only local shards); use bf16 or no.",
        )
        need(
            not cfg.optim.use_8bit_adam,
            "optim.use_8bit_adam is not supported with FSDP (bitsandbytes on sharded tensors is untested); set it to false.",
        )
        need(
            not uneven,
            f"flow_grpo.{uneven}=true gives the processes different numbers of forwards, which deadlocks FSDP; "
            "set it to false or launch with DDP.",
        )
        need(
            not ragged,
            ragged_fix + "deadlocks FSDP; set optim.train_batch_size=1 (the reference's) or launch with DDP.",
        )

    need(
        cfg.algorithm in ALGORITHMS,
        f"algorithm={cfg.algorithm!r} is not known; use one of {', '.join(ALGORITHMS)}.",
    )
    need(
        bool(cfg.model.path) or "model" in given,
        "model.path is empty; set it to a hub id or a local diffusers pipeline directory.",
    )
    need(
        bool(cfg.data.train) or "train_prompts" in given,
        "data.train is empty; set it to a prompt file (.txt/.jsonl) or hf:<dataset>.",
    )
    need(
        bool(cfg.reward) or "reward" in given,
        "reward is empty; set it to {name: weight}, e.g. reward={pickscore: 1.0}.",
    )
    named = set(cfg.reward) | set(cfg.eval_reward)
    for name, options in cfg.reward_kwargs.items():
        need(
            isinstance(options, dict),
            f"reward_kwargs.{name}={options!r} must be a map of options, e.g. reward_kwargs={{{name}: {{batch_size: 8}}}}.",
        )
        need(
            name in named or "reward" in given,
            f"reward_kwargs names {name!r}, which is not in reward or eval_reward ({', '.join(sorted(named))}); "
            "fix the name or drop its options.",
        )
    need(cfg.max_steps >= 1, f"max_steps={cfg.max_steps} must be at least 1.")
    for key, ok, what in _RANGES:  # every numeric field's range, whatever the algorithm (a typo is a typo)
        value = _get(cfg, key)
        need(ok(value), f"{key}={value} must be {what}.")
    need(
        cfg.max_bad_steps >= 1,
        f"max_bad_steps={cfg.max_bad_steps} must be at least 1 (5: stop after five bad steps in a row).",
    )
    need(
        not (cfg.model.lora_from and cfg.model.lora_targets),
        f"model.lora_targets={cfg.model.lora_targets} cannot change the modules of the LoRA model.lora_from="
        f"{cfg.model.lora_from}, which brings its own; leave model.lora_targets empty.",
    )
    need(
        not (cfg.model.lora_from and cfg.model.lora_rank == 0),
        f"model.lora_from={cfg.model.lora_from} starts a LoRA, but model.lora_rank=0 trains every weight; leave "
        "model.lora_rank at -1 (the LoRA's own rank) or drop model.lora_from.",
    )
    reference = (
        (cfg.algorithm == "flow_grpo" and cfg.flow_grpo.kl_beta > 0)
        or (cfg.algorithm == "diffusion_nft" and cfg.diffusion_nft.kl_weight > 0)
        or (cfg.algorithm == "refl" and cfg.refl.kl_weight > 0)
        or (cfg.algorithm == "awm" and cfg.awm.kl_weight > 0)
        or cfg.algorithm == "dpo"
    )
    need(
        not (cfg.model.lora_rank == 0 and reference),
        "model.lora_rank=0 (full fine-tuning) has no base model to regularise towards; set the KL weight "
        "(flow_grpo.kl_beta / diffusion_nft.kl_weight / refl.kl_weight / awm.kl_weight) to 0 or train a LoRA "
        "(dpo always needs its reference, the model with the LoRA off).",
    )
    need(
        cfg.model.dtype in ("float32", "bfloat16", "float16"),
        f"model.dtype={cfg.model.dtype!r} must be float32, bfloat16 or float16.",
    )
    need(
        cfg.mixed_precision in ("no", "bf16", "fp16"),
        f"mixed_precision={cfg.mixed_precision!r} must be no, bf16 or fp16.",
    )
    need(
        cfg.report_to in ("tensorboard", "wandb", "none"),
        f"report_to={cfg.report_to!r} must be tensorboard, wandb or none.",
    )
    need(
        cfg.reward_normalize in ("", "batch", "running", "group"),
        f"reward_normalize={cfg.reward_normalize!r} must be empty, batch, running or group.",
    )
    need(
        cfg.group_by in ("slot", "text", "tokens"), f"group_by={cfg.group_by!r} must be slot, text or tokens."
    )
    need(
        cfg.group_by == "slot" or cfg.algorithm in ("flow_grpo", "diffusion_nft", "awm"),
        f"group_by={cfg.group_by} groups the advantages of flow_grpo, diffusion_nft and awm; algorithm={cfg.algorithm} "
        "has none to group, so leave group_by at slot.",
    )
    need(
        not (cfg.reward_normalize == "group" and cfg.algorithm == "refl"),
        "reward_normalize=group z-scores each reward within a prompt's group of images, and refl samples one "
        "image per prompt; use batch or running with refl.",
    )
    need(
        cfg.optim.lr_scheduler in ("constant", "linear", "cosine"),
        f"optim.lr_scheduler={cfg.optim.lr_scheduler!r} must be constant, linear or cosine.",
    )
    for name in ("height", "width", "num_steps", "eval_num_steps", "batch_size", "eval_images_per_prompt"):
        value = getattr(cfg.sample, name)
        need(value >= 1, f"sample.{name}={value} must be positive.")
    need(
        cfg.model.lora_init in ("default", "gaussian"),
        f"model.lora_init={cfg.model.lora_init!r} must be default or gaussian.",
    )
    need(
        cfg.model.vae_dtype in ("float32", "model"),
        f"model.vae_dtype={cfg.model.vae_dtype!r} must be float32 or model.",
    )
    need(
        cfg.model.max_sequence_length >= 0,
        f"model.max_sequence_length={cfg.model.max_sequence_length} must be 0 (the model's default) or positive.",
    )
    need(
        cfg.ema_every >= 1, f"ema_every={cfg.ema_every} must be at least 1 (1: after every optimiser update)."
    )
    need(
        cfg.optim.train_batch_size >= 1,
        f"optim.train_batch_size={cfg.optim.train_batch_size} must be positive.",
    )
    need(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be positive.")
    _validate_monitor(cfg, given, need)
    _validate_video(cfg, need)
    if cfg.algorithm == "flow_grpo":
        g = cfg.flow_grpo
        need(
            g.group_size >= 2,
            f"flow_grpo.group_size={g.group_size} must be at least 2 (advantages compare images of a prompt).",
        )
        need(
            g.prompts_per_step % num_processes == 0 and g.prompts_per_step >= 1,
            f"flow_grpo.prompts_per_step={g.prompts_per_step} must be a positive multiple of the {num_processes} processes.",
        )
        need(g.sampler in ("sde", "cps"), f"flow_grpo.sampler={g.sampler!r} must be sde or cps.")
        need(
            0 < g.timestep_fraction <= 1,
            f"flow_grpo.timestep_fraction={g.timestep_fraction} must be in (0, 1].",
        )
        need(
            0 <= g.sde_window <= cfg.sample.num_steps,
            f"flow_grpo.sde_window={g.sde_window} must be between 0 and sample.num_steps.",
        )
        _check_train_per_group("flow_grpo", g, need)
        need(g.adv_std in ("global", "group"), f"flow_grpo.adv_std={g.adv_std!r} must be global or group.")
        need(
            g.advantage in ("score", "winrate"),
            f"flow_grpo.advantage={g.advantage!r} must be score (Flow-GRPO) or winrate (Pref-GRPO).",
        )
        need(g.clip_range > 0, f"flow_grpo.clip_range={g.clip_range} must be positive.")
        need(g.num_inner_epochs >= 1, f"flow_grpo.num_inner_epochs={g.num_inner_epochs} must be at least 1.")
        need(
            g.kl_scale in ("reference", "exact"),
            f"flow_grpo.kl_scale={g.kl_scale!r} must be reference or exact.",
        )
        need(g.cfg_grad in ("cond", "full"), f"flow_grpo.cfg_grad={g.cfg_grad!r} must be cond or full.")
        need(
            g.old_logp in ("rollout", "recompute"),
            f"flow_grpo.old_logp={g.old_logp!r} must be rollout or recompute.",
        )
        images = g.prompts_per_step // num_processes * g.group_size
        need(
            1 <= g.num_minibatches <= images,
            f"flow_grpo.num_minibatches={g.num_minibatches} must be between 1 and the {images} images each process "
            "trains on per step.",
        )
        if g.sde_window_range:
            need(
                len(g.sde_window_range) == 2 and 0 <= g.sde_window_range[0] < g.sde_window_range[1],
                f"flow_grpo.sde_window_range={g.sde_window_range} must be [lo, hi) with 0 <= lo < hi.",
            )
        need(
            g.window_schedule in ("random", "sliding"),
            f"flow_grpo.window_schedule={g.window_schedule!r} must be random or sliding.",
        )
        need(
            g.window_schedule == "random" or g.sde_window > 0,
            "flow_grpo.window_schedule=sliding moves the sde_window, but flow_grpo.sde_window=0 makes every step "
            "stochastic; set flow_grpo.sde_window to the window length (MixGRPO: 4).",
        )
        need(g.window_end in ("wrap", "stay"), f"flow_grpo.window_end={g.window_end!r} must be wrap or stay.")
        need(
            g.post_window_solver in ("euler", "dpm2"),
            f"flow_grpo.post_window_solver={g.post_window_solver!r} must be euler or dpm2.",
        )
        need(
            g.post_window_solver == "euler" or g.sde_window > 0,
            f"flow_grpo.post_window_solver={g.post_window_solver} solves the ODE steps after the sde_window, and "
            "flow_grpo.sde_window=0 leaves none; set flow_grpo.sde_window or post_window_solver=euler.",
        )
        need(
            g.timestep_selection in ("first", "random"),
            f"flow_grpo.timestep_selection={g.timestep_selection!r} must be first or random.",
        )
        if g.timestep_selection == "random":
            need(
                g.sde_window == 0,
                f"flow_grpo.timestep_selection=random draws each image's steps among all stochastic steps, and "
                f"flow_grpo.sde_window={g.sde_window} trains every step of its window; set one of them back "
                "(timestep_selection=first or sde_window=0).",
            )
            need(
                not g.trajectory_ratio,
                "flow_grpo.timestep_selection=random trains different steps for each image, and "
                "flow_grpo.trajectory_ratio=true needs the same steps in every trajectory; set one of them back.",
            )
            need(
                cfg.sample.num_steps >= 2,
                f"flow_grpo.timestep_selection=random draws among the steps before the last, and sample.num_steps="
                f"{cfg.sample.num_steps} leaves none; use at least 2 steps or timestep_selection=first.",
            )
        for name in ("ratio_norm", "grad_reweight"):
            need(
                not (getattr(g, name) and g.trajectory_ratio),
                f"flow_grpo.{name}=true acts on each step's ratio, and flow_grpo.trajectory_ratio=true keeps one "
                "ratio per trajectory; set one of them to false.",
            )
    elif cfg.algorithm == "diffusion_nft":
        n = cfg.diffusion_nft
        need(n.group_size >= 2, f"diffusion_nft.group_size={n.group_size} must be at least 2.")
        need(
            n.prompts_per_step % num_processes == 0 and n.prompts_per_step >= 1,
            f"diffusion_nft.prompts_per_step={n.prompts_per_step} must be a positive multiple of the {num_processes} processes.",
        )
        _check_train_per_group("diffusion_nft", n, need)
        need(n.beta > 0, f"diffusion_nft.beta={n.beta} must be positive.")
        need(
            n.weighting in ("adaptive", "velocity"),
            f"diffusion_nft.weighting={n.weighting!r} must be adaptive or velocity.",
        )
        need(
            cfg.model.lora_rank != 0,
            "diffusion_nft needs a LoRA (model.lora_rank != 0): the old and base policies are adapters.",
        )
        need(n.solver in ("euler", "dpm2"), f"diffusion_nft.solver={n.solver!r} must be euler or dpm2.")
        images = n.prompts_per_step // num_processes * n.group_size
        need(
            1 <= n.num_minibatches <= images,
            f"diffusion_nft.num_minibatches={n.num_minibatches} must be between 1 and the {images} images each process "
            "trains on per step.",
        )
    elif cfg.algorithm == "awm":
        _validate_awm(cfg, num_processes, need)
    elif cfg.algorithm == "dpo":
        _validate_dpo(cfg, num_processes, need)
    else:
        r = cfg.refl
        need(
            r.prompts_per_step % num_processes == 0 and r.prompts_per_step >= 1,
            f"refl.prompts_per_step={r.prompts_per_step} must be a positive multiple of the {num_processes} processes.",
        )
        need(
            0 <= r.stop_min < r.stop_max <= 1,
            f"refl.stop_min={r.stop_min} and refl.stop_max={r.stop_max} must satisfy 0 <= min < max <= 1.",
        )
        need(r.grad_steps >= 1, f"refl.grad_steps={r.grad_steps} must be at least 1.")
        need(r.loss in ("hinge", "linear"), f"refl.loss={r.loss!r} must be hinge or linear.")
        need(
            r.denoise_weight >= 0,
            f"refl.denoise_weight={r.denoise_weight} must be at least 0 (0 turns the denoising regulariser off).",
        )


def _validate_video(cfg: TrainConfig, need) -> None:
    """``sample.num_frames`` (Wan's frame rule), ``model.expert`` and the ``video`` section's frame choice."""
    need(
        cfg.model.expert in ("", "high", "low", "both"),
        f"model.expert={cfg.model.expert!r} must be high, low or both (Wan 2.2's two experts), or empty.",
    )
    need(
        cfg.model.guidance_scale_2 == 0 or cfg.model.guidance_scale_2 >= 1,
        f"model.guidance_scale_2={cfg.model.guidance_scale_2} must be 0 (the guidance scale for both experts) or at "
        "least 1 (1: no CFG on the low-noise steps).",
    )
    f = cfg.sample.num_frames
    need(
        isinstance(f, int) and not isinstance(f, bool) and f >= 0,
        f"sample.num_frames={f!r} must be 0 (the model's default) or a frame count such as 81.",
    )
    need(
        f == 0 or (f - 1) % 4 == 0,
        f"sample.num_frames={f} must be 1 more than a multiple of 4 for Wan's VAE; use "
        f"{(f - 1) // 4 * 4 + 1} or {(f - 1) // 4 * 4 + 5}.",
    )
    v = cfg.video
    ways = [n for n, val in (("frames", v.frames), ("every", v.every), ("num", v.num)) if val]
    need(
        len(ways) <= 1,
        f"video.{' and video.'.join(ways)} are all set, but they are different ways of choosing frames; set one.",
    )
    need(
        all(isinstance(i, int) and not isinstance(i, bool) for i in v.frames),
        f"video.frames={v.frames!r} must be a list of frame indices, e.g. [0, -1].",
    )
    for name in ("every", "num"):
        need(getattr(v, name) >= 0, f"video.{name}={getattr(v, name)} must be at least 0 (0: not used).")
    for name in ("vae_tile_size", "vae_tile_stride"):
        value = getattr(v, name)
        need(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0 and value % 16 == 0,
            f"video.{name}={value!r} must be 0 (diffusers' default) or a positive multiple of 16 pixels, e.g. 256.",
        )
        need(
            v.vae_tiling or not value,
            f"video.{name}={value} sizes the VAE's tiles, but video.vae_tiling is off; set video.vae_tiling=true or "
            f"leave {name} at 0.",
        )
    size, stride = v.vae_tile_size or 256, v.vae_tile_stride or 192
    need(
        not v.vae_tiling or stride < size,
        f"video.vae_tile_stride={stride} must be less than video.vae_tile_size={size} (the overlap is blended); "
        "use a smaller stride.",
    )
    need(v.fps >= 1, f"video.fps={v.fps} must be at least 1 (Wan 2.1: 16).")
    need(v.combine in ("mean", "min"), f"video.combine={v.combine!r} must be mean or min.")
    if f and v.frames:
        bad = [i for i in v.frames if not -f <= i < f]
        need(
            not bad,
            f"video.frames has index {bad[0] if bad else 0} outside a {f}-frame video; use -{f}..{f - 1}.",
        )


def _validate_monitor(cfg: TrainConfig, given, need) -> None:
    """The ``monitor`` section's choices (its numeric ranges are in ``_RANGES``)."""
    m = cfg.monitor
    need(
        m.features in ("pixels", "histogram", "clip", "dino"),
        f"monitor.features={m.features!r} is not implemented; use pixels, histogram, clip or dino.",
    )
    need(
        not m.feature_model or m.features in ("clip", "dino"),
        f"monitor.feature_model={m.feature_model!r} is only read with monitor.features clip or dino (it is "
        f"{m.features}); set monitor.features=clip or dino, or leave monitor.feature_model empty.",
    )
    if m.gold and "reward" not in given:
        need(
            m.gold in cfg.eval_reward,
            f"monitor.gold={m.gold!r} is not a component of eval_reward ({', '.join(cfg.eval_reward) or 'empty'}); "
            f"add it, e.g. eval_reward={{..., {m.gold}: 0.0}} (weight 0: logged, not summed), or leave monitor.gold "
            "empty.",
        )


def _check_train_per_group(section: str, sec, need) -> None:
    """PODS's ``<section>.train_per_group``: 0 (every rollout) or 2..group_size."""
    m, g = sec.train_per_group, sec.group_size
    need(
        m == 0 or 2 <= m <= g,
        f"{section}.train_per_group={m} must be 0 (train on every rollout) or in 2..{g} ({section}.group_size): "
        "the rollouts of a group kept for training.",
    )


def _validate_awm(cfg: TrainConfig, num_processes: int, need) -> None:
    """The ``awm`` section's choices and sizes (its numeric ranges are in ``_RANGES``)."""
    a = cfg.awm
    need(
        a.group_size >= 2,
        f"awm.group_size={a.group_size} must be at least 2 (advantages compare images of a prompt).",
    )
    need(
        a.prompts_per_step % num_processes == 0 and a.prompts_per_step >= 1,
        f"awm.prompts_per_step={a.prompts_per_step} must be a positive multiple of the {num_processes} processes.",
    )
    need(a.solver in ("euler", "dpm2"), f"awm.solver={a.solver!r} must be euler or dpm2.")
    need(
        a.sampler in ("ode", "sde", "cps", "sa_solver"),
        f"awm.sampler={a.sampler!r} must be ode, sde, cps or sa_solver.",
    )
    need(
        a.noise_level > 0 or a.sampler not in ("sde", "cps"),
        f"awm.noise_level={a.noise_level} must be positive with awm.sampler={a.sampler} (awm.sampler=ode is the "
        "deterministic rollout).",
    )
    need(
        a.sampler != "sa_solver" or a.solver == "euler",
        f"awm.solver={a.solver} does not apply to awm.sampler=sa_solver, which is its own multistep solver; leave "
        "awm.solver at euler.",
    )
    need(
        len(a.sde_t_range) == 2 and 0 <= a.sde_t_range[0] <= a.sde_t_range[1] <= 1,
        f"awm.sde_t_range={a.sde_t_range} must be [lo, hi] with 0 <= lo <= hi <= 1, e.g. [0.3, 0.9].",
    )
    _check_train_per_group("awm", a, need)
    need(a.adv_std in ("global", "group"), f"awm.adv_std={a.adv_std!r} must be global or group.")
    need(
        a.timesteps in ("levels", "logit_normal"),
        f"awm.timesteps={a.timesteps!r} must be levels or logit_normal.",
    )
    need(
        a.weighting in ("ghuber", "t", "uniform"),
        f"awm.weighting={a.weighting!r} must be ghuber, t or uniform.",
    )
    need(
        cfg.model.lora_rank != 0 or a.ema_kl_weight == 0,
        f"awm.ema_kl_weight={a.ema_kl_weight} needs a LoRA (its EMA policy is a second adapter); set it to 0 or "
        "train a LoRA (model.lora_rank != 0).",
    )
    need(
        a.rollout_policy in ("current", "ema"),
        f"awm.rollout_policy={a.rollout_policy!r} must be current or ema.",
    )
    need(a.ratio in ("level", "sample"), f"awm.ratio={a.ratio!r} must be level or sample.")
    need(
        cfg.model.lora_rank != 0 or a.rollout_policy == "current",
        "awm.rollout_policy=ema needs a LoRA (its EMA policy is a second adapter); set it to current or train a "
        "LoRA (model.lora_rank != 0).",
    )
    if a.timesteps == "levels":
        last = int(cfg.sample.num_steps * a.timestep_fraction)
        need(
            a.first_level < last,
            f"awm.first_level={a.first_level} leaves no level to train: the levels drawn from are indices "
            f"[first_level, int(sample.num_steps * awm.timestep_fraction)) = [{a.first_level}, {last}); lower "
            "awm.first_level or raise awm.timestep_fraction or sample.num_steps.",
        )


def _validate_dpo(cfg: TrainConfig, num_processes: int, need) -> None:
    """The ``dpo`` section's choices and sizes (its numeric ranges are in ``_RANGES``)."""
    d = cfg.dpo
    need(d.mode in ("online", "offline"), f"dpo.mode={d.mode!r} must be online or offline.")
    need(
        d.timesteps in ("logit_normal", "uniform"),
        f"dpo.timesteps={d.timesteps!r} must be logit_normal or uniform.",
    )
    need(d.pairs in ("best_worst", "all"), f"dpo.pairs={d.pairs!r} must be best_worst or all.")
    need(d.solver in ("euler", "dpm2"), f"dpo.solver={d.solver!r} must be euler or dpm2.")
    need(
        d.rollout_policy in ("current", "reference"),
        f"dpo.rollout_policy={d.rollout_policy!r} must be current or reference.",
    )
    need(d.sampler in ("ode", "sde"), f"dpo.sampler={d.sampler!r} must be ode or sde.")
    need(
        d.sampler == "ode" or d.solver == "euler",
        f"dpo.solver={d.solver} has no step to solve with dpo.sampler=sde (every rollout step is an SDE step); "
        "leave dpo.solver at euler.",
    )
    if d.mode == "online":
        need(
            d.group_size >= 2,
            f"dpo.group_size={d.group_size} must be at least 2 (a pair compares two images of a prompt).",
        )
        need(
            d.prompts_per_step % num_processes == 0 and d.prompts_per_step >= 1,
            f"dpo.prompts_per_step={d.prompts_per_step} must be a positive multiple of the {num_processes} processes.",
        )
        need(
            d.online_every == 1 or num_processes == 1,
            f"dpo.online_every={d.online_every} keeps each process's pairs between rounds, which a checkpoint holds "
            f"for one process only, and this launch has {num_processes}; set dpo.online_every=1 or use one process.",
        )
    else:
        need(
            bool(d.dataset),
            "dpo.mode=offline needs dpo.dataset, a preference .jsonl file or a datasets directory; set it or use "
            "dpo.mode=online.",
        )
        need(
            d.pairs_per_step % num_processes == 0 and d.pairs_per_step >= 1,
            f"dpo.pairs_per_step={d.pairs_per_step} must be a positive multiple of the {num_processes} processes.",
        )
