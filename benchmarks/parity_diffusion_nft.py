"""Parity of diffrl's DiffusionNFT update with the reference code (NVlabs/DiffusionNFT) on a tiny SD3.

The reference trains inside one long ``main()`` (``scripts/train_nft_sd3.py``) that needs CUDA, NCCL, wandb
and a prompt dataset, so it cannot be imported and run as is. This script (run by hand, not part of the test
suite) executes the reference's own functions where they exist as functions and re-writes only what is inline
in ``main()``:

* executed from the clone at run time: ``return_decay`` and ``compute_text_embeddings`` (taken out of
  ``scripts/train_nft_sd3.py`` with ``ast`` and executed in a namespace, since the module imports absl, wandb
  and ml_collections at the top), ``encode_prompt``
  (``flow_grpo/diffusers_patch/train_dreambooth_lora_sd3.py``), ``PerPromptStatTracker``
  (``flow_grpo/stat_tracking.py``), ``run_sampling`` (``flow_grpo/diffusers_patch/solver.py``),
  ``pipeline_with_logprob`` (``flow_grpo/diffusers_patch/pipeline_with_logprob.py``), ``EMAModuleWrapper``
  (``flow_grpo/ema.py``), the run configurations ``sd3_pickscore()``, ``sd3_multi_reward()`` and ``sd3_ocr()`` of
  ``config/nft.py`` on ``config/base.py`` (with a small attribute dict standing in for
  ``ml_collections.ConfigDict``), and, read with ``ast``, the LoRA target list, the ``LoraConfig`` arguments, the
  ``max_sequence_length`` and the ``EMAModuleWrapper`` arguments of ``main()``, each run function's ``n_gpus`` and
  the scorers' scale and models (check 0);
* re-written here following ``scripts/train_nft_sd3.py`` (line numbers of the NVlabs clone):

  - model set-up, lines ~393-428: ``get_peft_model`` with the reference ``LoraConfig``, a second adapter
    ``"old"`` (``add_adapter``), both float32; the trained and old parameter lists taken with each adapter
    active; AdamW with the config's learning rate, betas, weight decay and epsilon;
  - after sampling, lines ~646-660 and ~742-770: the clean latents and the scheduler's timesteps kept per
    sample; ``PerPromptStatTracker(global_std=True).update`` on the rewards repeated over the
    ``num_train_timesteps`` columns;
  - the training epoch, lines ~786-1037: the shuffled samples (``perm``), a random order of the levels per
    sample (``perms_time``), ``num_batches`` micro-batches, and per micro-batch and level position ``j``:
    ``t = timesteps / 1000``, ``noise = randn_like(x0)``, ``xt = (1 - t) x0 + t noise``, the old prediction
    (``set_adapter("old")``, no grad), the trained prediction (``"default"``), the base prediction
    (``disable_adapter()``), ``r = clamp(clamp(A, +-adv_clip_max) / adv_clip_max / 2 + 0.5, 0, 1)``, the
    implicit positive and negative predictions, the adaptive x0-space weights (detached, in float64), the
    policy loss ``mean((r * pos / beta + (1 - r) * neg / beta) * adv_clip_max)``, ``loss += train.beta * kl``,
    backward of ``loss / (gradient_accumulation_steps * num_train_timesteps)``, and after every
    ``gradient_accumulation_steps * num_train_timesteps`` backward passes ``clip_grad_norm_`` over the
    transformer's parameters, an AdamW step and ``global_step += 1``;
  - the old-policy soft update after the epoch, lines ~1039-1044: ``old <- decay * old + (1 - decay) * new``
    with ``decay = return_decay(global_step, config.decay_type)``.

  One process without DDP (DDP averages gradients over processes; with one there is nothing to average), no
  mixed precision (the reference's default is fp16 autocast; the comparison is in float32) and no EMA (the
  reference's EMA only serves evaluation and checkpoints). The reference's random draws (``torch.randperm``
  for ``perm`` and ``perms_time``, ``torch.randn_like`` for the noise) are fed in, equal to the ones diffrl
  makes for the same step (recomputed with the trainer's own generators: the sample order of the
  ``num_minibatches`` parts, each sample's level order, the noise of each (level position, sample)); check 1
  confirms that both sides' trained forward passes get bitwise the same ``x_t`` and timesteps.

diffrl runs its own ``DiffusionNFTTrainer.train_step`` with the reference-equivalent options
(``per_sample_levels=true``, ``num_minibatches``, ``decay_flat/decay_rate/decay_cap`` of the decay type,
``kl_weight`` = ``train.beta``, ``beta``, ``weighting=adaptive``, ``num_train_levels`` =
``int(0.99 * num_steps)``, ``model.max_sequence_length=128``, the AdamW and clipping values of the reference config). The
script patches, on the trainer object only: ``trainer.sample_and_score`` (check 1: returns the stored latents
and rewards; check 2: wrapped to record prompts and rewards), ``diffrl.trainers.diffusion_nft.rollout`` (check
2: wrapped to record the initial noise and the clean latents), ``trainer.model.velocity`` (check 1: wrapped to
record the trained passes' inputs) and ``trainer.step`` (set to a later step, as a resumed run has, so that
the old policy's decay is not 0).

Both sides load the same pipeline: ``diffrl.models.tiny.build_tiny_sd3`` with two MMDiT blocks (T5 included),
so that one block is not the last, "context pre-only" one, and the same random LoRA (non-zero A and B; the old
adapter differs from the trained one). diffrl leaves the last block's context-query projection out of the LoRA
(its output is unused); the reference's 4 tensors there get zero gradients and are not compared. Checks:

1. one update on stored clean latents and rewards, for ``sd3_pickscore`` (beta 1.0, decay type 1) and
   ``sd3_ocr`` (beta 0.1, decay type 2), each with 1 and 2 optimiser updates per step
   (``gradient_step_per_epoch``), plus one run with the KL weight raised to 0.1 so that the KL term shows in
   the gradients. Printed: max abs and max rel (``max|a - b| / max|b|`` per tensor, the largest over the
   tensors) of the LoRA tensors of both adapters after the update and the soft update, and of AdamW's moments
   of the trained tensors (they hold the gradients: AdamW's first update is about ``lr * sign(g)`` whatever
   the gradient's scale); one line per tensor for the OCR-shaped run (``--per-tensor``: every run);
2. ``--steps`` (3) consecutive steps with ``sd3_ocr`` and 2 updates per step, sampling included from the same
   initial noise: diffrl samples with ``diffusion_nft.solver=dpm2``, the reference with its own
   ``run_sampling(solver="dpm2", deterministic=True)`` (its configs' solver; ``--solver flow``: diffrl's Euler
   against its Euler step at noise level 0), with its transformer at float timesteps ``1000 sigma``. Printed for
   information, not checked: ``pipeline_with_logprob`` rounds the timestep down to an integer; its gap to diffrl's
   rollout with both of its solvers, and how much of it the integer timesteps make;
3. bf16: a diffrl trainer with ``model.dtype=bfloat16``: the dtype of its old adapter, and one soft update at
   decay 0.999 against ``(1 - d) (new - old)`` in float64 (for information, what the same update does to a
   bf16 copy).

Check 0, before these: each shipped preset (``configs/sd35m_diffusion_nft_{pickscore,multireward}.yaml``) against
the reference configuration it reproduces (``sd3_pickscore``, ``sd3_multi_reward``), built from the configuration
object and the code the preset lines cite: the options above (AdamW and clipping, ``beta``, ``kl_weight`` =
``train.beta``, ``adv_clip``, ``num_train_levels``, ``num_minibatches`` = ``gradient_step_per_epoch``, the decay of
``decay_type``, itself checked against ``return_decay`` over steps 0-4999) plus seed, checkpoint and evaluation
intervals, mixed precision, EMA (decay, interval, and the warm-up of ``EMAModuleWrapper.get_current_decay``), model
and LoRA, data set, sizes, sampling and evaluation steps and guidance, batch sizes, ``group_size``,
``prompts_per_step`` (``n_gpus`` x batches x batch size / images per prompt: 48), ``weighting=adaptive``, solver,
per-sample levels (``perms_time``), ``group_by`` and rewards: 44 values for the PickScore preset, 45 with the multi-reward
preset's ``reward_kwargs`` (HPSv2.1, CLIP ViT-L/14). The reward weights mirror what the presets document: a single
reward keeps the reference's weight (the advantages' division by the global std makes its scale irrelevant, so
diffrl's raw PickScore stands for the reference's PickScore / 26); several are summed on the reference scorers'
scales, so each weight is multiplied by its scorer's (PickScore: 1 / the divisor of ``pickscore_scorer.py``; HPSv2.1
and CLIP: the cosine, 1). Not compared: the presets' own choices (``max_steps``, checkpoint limit, output directory,
``data.eval_size``, gradient checkpointing) and the dtypes (set in the reference's code, not by its configuration).
A difference fails check 0 (``key: preset X, reference Y``).

Tolerance: 1e-5 relative per tensor for the LoRA tensors everywhere and for the AdamW moments in check 1 (same
computations, float32 rounding in another order; AdamW's first update turns that into a small part of a step
for a near-zero gradient). Check 2's moments: 1e-4: the first step's rollouts and rewards are bitwise equal (both
sides encode each prompt on its own and solve with the same DPM-2 arithmetic), but from the second step on the two
sides sample with weights that differ in the last bits, so the rollouts and rewards differ by ~5e-7 and the moments
by ~1e-5 relative. Check 3: 1e-2 (float32 rounding of an update of
1e-3 of the difference). The script exits with status 1 when a check fails.

Usage: ``python benchmarks/parity_diffusion_nft.py --reference /path/to/DiffusionNFT_clone [--steps 3]
[--per-tensor] [--presets configs/]`` (CPU, offline, about half a minute; set ``OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import math
import os
import re
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from _parity import compare, git_commit, preset_differences, quiet_libraries, stored_reward, stored_rollouts
from _reference_code import load_module, main_lora_setup, script_functions, stub_missing_modules

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "diffusion_nft.yaml"
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
SIZE = 32  # pixels; 8x8 latents on the tiny pipeline
GROUP = 4
PROMPTS_PER_STEP = 2
MICRO_BATCH = 2
SEED = 42
TOLERANCE = 1e-5
# check 2's AdamW moments: the reference encodes a sampling batch's prompts together and diffrl one prompt at a time,
# so the pooled text embeddings differ in the last bits (~5e-7), and through the sampled latents the rewards (~5e-7
# for a spread of ~0.06), the advantages and the gradients by ~1e-5 relative
SAMPLED_MOMENT_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------- the reference code


def load_reference(root: Path) -> types.SimpleNamespace:
    """The reference's functions and configuration, executed from the clone at ``root``."""
    root = root.resolve()
    script = root / "scripts" / "train_nft_sd3.py"
    if not script.is_file():
        raise SystemExit(f"{root} is not a DiffusionNFT clone (no scripts/train_nft_sd3.py)")
    sys.path.insert(0, str(root))
    from flow_grpo.diffusers_patch.pipeline_with_logprob import pipeline_with_logprob
    from flow_grpo.diffusers_patch.solver import run_sampling
    from flow_grpo.diffusers_patch.train_dreambooth_lora_sd3 import encode_prompt
    from flow_grpo.stat_tracking import PerPromptStatTracker

    # functions of the training script (its module imports absl, wandb, ml_collections... at the top), the LoRA
    # set-up inside main(), and the run configuration: config/nft.py on config/base.py
    namespace = script_functions(
        script,
        {"return_decay", "compute_text_embeddings"},
        {"torch": torch, "np": np, "encode_prompt": encode_prompt},
    )
    targets, lora_kwargs, max_sequence_length = main_lora_setup(script)
    stub_missing_modules()
    config_module = load_module(root / "config" / "nft.py", "reference_nft_config")
    ema_module = load_module(root / "flow_grpo" / "ema.py", "reference_nft_ema")

    return types.SimpleNamespace(
        root=root,
        pipeline_with_logprob=pipeline_with_logprob,
        run_sampling=run_sampling,
        PerPromptStatTracker=PerPromptStatTracker,
        return_decay=namespace["return_decay"],
        compute_text_embeddings=namespace["compute_text_embeddings"],
        lora_targets=targets,
        lora_kwargs=lora_kwargs,
        max_sequence_length=max_sequence_length,
        config_module=config_module,
        EMAModuleWrapper=ema_module.EMAModuleWrapper,
        **run_facts(root),
    )


def _literal_keywords(call: ast.Call) -> dict:
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if isinstance(k.value, ast.Constant)}


def run_facts(root: Path) -> dict:
    """What the presets cite from the reference's code rather than its configuration: the ``EMAModuleWrapper(...)``
    keywords and the per-sample level order (``perms_time``) of ``main()``, the ``n_gpus`` of each run function's
    ``_get_config`` call (``config/nft.py``: the batch formula's process count), and the scorers' scales and models
    (``scores / 26`` of ``pickscore_scorer.py``, the checkpoint of ``hpsv2_scorer.py``, the CLIP of
    ``clip_scorer.py``)."""
    main = next(
        n
        for n in ast.parse((root / "scripts" / "train_nft_sd3.py").read_text()).body
        if isinstance(n, ast.FunctionDef) and n.name == "main"
    )
    calls = [n for n in ast.walk(main) if isinstance(n, ast.Call)]
    ema_kwargs = next(_literal_keywords(c) for c in calls if getattr(c.func, "id", "") == "EMAModuleWrapper")
    per_sample_levels = any(
        isinstance(n, ast.Name) and n.id == "perms_time" and isinstance(n.ctx, ast.Store)
        for n in ast.walk(main)
    )
    n_gpus = {}
    for function in ast.parse((root / "config" / "nft.py").read_text()).body:
        if isinstance(function, ast.FunctionDef):
            for call in ast.walk(function):
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "_get_config":
                    n_gpus[function.name] = _literal_keywords(call).get("n_gpus", 1)  # _get_config's default
    scorer = next(
        n
        for n in ast.walk(ast.parse((root / "flow_grpo" / "pickscore_scorer.py").read_text()))
        if isinstance(n, ast.FunctionDef) and n.name == "__call__"
    )
    pickscore_divisor = next(
        n.right.value
        for n in ast.walk(scorer)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div) and isinstance(n.right, ast.Constant)
    )
    hps = re.search(r"HPS_(v[0-9.]+?)_compressed\.pt", (root / "flow_grpo" / "hpsv2_scorer.py").read_text())
    clip = re.search(
        r'CLIPModel\.from_pretrained\("([^"]+)"\)', (root / "flow_grpo" / "clip_scorer.py").read_text()
    )
    return {
        "ema_kwargs": ema_kwargs,
        "per_sample_levels": per_sample_levels,
        "n_gpus": n_gpus,
        "pickscore_divisor": pickscore_divisor,
        "hpsv2_version": hps.group(1) if hps else None,
        "clip_model": clip.group(1) if clip else None,
    }


def reference_config(ref, name: str, num_minibatches: int, n_samples: int):
    """A reference run configuration (``sd3_ocr`` or the base ``_get_config``) shrunk to the tiny sizes: one
    sampling batch of all samples, micro-batches of ``MICRO_BATCH`` and ``num_minibatches`` updates per epoch
    (what ``_get_config(gradient_step_per_epoch=...)`` arranges with its batch-size search)."""
    if name == "ocr":
        cfg = ref.config_module.sd3_ocr()  # beta 0.1, decay type 2, KL weight 1e-4
    else:
        cfg = ref.config_module.sd3_pickscore()  # beta 1.0, decay type 1
    cfg.mixed_precision = "no"
    cfg.resolution = SIZE
    cfg.sample.num_image_per_prompt = GROUP
    cfg.sample.train_batch_size = n_samples
    cfg.sample.num_batches_per_epoch = 1
    cfg.train.batch_size = MICRO_BATCH
    num_batches = cfg.sample.num_batches_per_epoch * cfg.sample.train_batch_size // cfg.train.batch_size
    cfg.train.gradient_accumulation_steps = num_batches // num_minibatches
    return cfg


def decay_options(decay_type: int) -> list[str]:
    """diffrl's decay options equal to the reference's ``decay_type`` (read back from ``return_decay``)."""
    table = {1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
    flat, rate, cap = table[decay_type]
    return [
        f"diffusion_nft.decay_flat={flat}",
        f"diffusion_nft.decay_rate={rate}",
        f"diffusion_nft.decay_cap={cap}",
    ]


def build_reference_model(ref, model_dir: Path):
    """The reference's model set-up (``main()`` lines ~393-428): float32 pipeline, PEFT LoRA ``"default"`` plus
    ``"old"``, the two parameter lists, AdamW. Returns ``(pipeline, peft_transformer)``."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        part.requires_grad_(False)
    pipe.transformer.requires_grad_(False)  # use_lora
    lora = LoraConfig(target_modules=ref.lora_targets, **ref.lora_kwargs)
    peft_model = get_peft_model(pipe.transformer, lora)
    peft_model.add_adapter("old", lora)
    peft_model.set_adapter("default")
    return pipe, peft_model


def reference_param_lists(peft_model):
    peft_model.set_adapter("default")
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    peft_model.set_adapter("old")
    old = [p for p in peft_model.parameters() if p.requires_grad]
    peft_model.set_adapter("default")
    return trained, old


def reference_optimizer(cfg, params):
    t = cfg.train
    return torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )


def reference_sample(
    ref, pipe, peft_model, embeds, pooled, noise, num_steps, solver="dpm2", integer_timesteps=False
):
    """Reference rollout with the old adapter: ``run_sampling(solver=solver, deterministic=True)`` (``"dpm2"``: its
    second-order DPM-Solver, what its configs use; ``"flow"``: the Euler step at noise level 0) from ``noise``, the
    velocity as in ``pipeline_with_logprob``'s ``v_pred_fn`` but at the float timestep ``1000 * sigma``. Returns the
    clean latents and the decoded images as the pipeline decodes them."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    retrieve_timesteps(pipe.scheduler, num_steps, noise.device)
    sigmas = pipe.scheduler.sigmas.float()

    def velocity(z, sigma):
        if integer_timesteps:  # what pipeline_with_logprob passes: 1000 sigma rounded down
            timesteps = torch.full([z.shape[0]], sigma * 1000, device=z.device, dtype=torch.long)
        else:
            timesteps = torch.full([z.shape[0]], float(sigma * 1000), device=z.device, dtype=torch.float32)
        out = pipe.transformer(
            hidden_states=z,
            timestep=timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return out.to(embeds.dtype)

    peft_model.set_adapter("old")
    with torch.no_grad():
        x0, _, _ = ref.run_sampling(velocity, noise, sigmas, solver, True, 0.0)
    peft_model.set_adapter("default")
    return x0, reference_decode(pipe, x0)


def reference_decode(pipe, latents):
    with torch.no_grad():
        z = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")


def reference_advantages(ref, prompts, rewards, num_train_timesteps):
    """``main()`` lines ~742-770: the rewards repeated per trained timestep, per-prompt means, global std."""
    tracker = ref.PerPromptStatTracker(global_std=True)
    table = rewards.float().unsqueeze(1).repeat(1, num_train_timesteps).numpy()
    return torch.from_numpy(tracker.update(list(prompts), table))


def adaptive_error(prediction, xt, t, x0):
    """The reference's adaptive weighting: the x0-space squared error over its detached mean absolute error
    (computed in float64, as the reference does, so the loss is float64)."""
    dims = tuple(range(1, x0.ndim))
    x0_hat = xt - t * prediction
    with torch.no_grad():
        w = torch.abs(x0_hat.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    return ((x0_hat - x0) ** 2 / w).mean(dim=dims)


def reference_epoch(ref, cfg, peft_model, optimizer, trained, old, samples, draws, global_step, seen=None):
    """One epoch of the reference training loop (``main()`` lines ~786-1044), in its order of operations, with
    the random draws fed in: ``draws.perm`` (sample order), ``draws.perms_time`` (per shuffled sample, its order
    of the levels) and ``draws.noise(b, j)`` (the noise of micro-batch ``b`` at level position ``j``). Returns the
    new ``global_step``, the gradient norms and the decay used for the old policy."""
    num_train_timesteps = int(cfg.sample.num_steps * cfg.train.timestep_fraction)
    batch, _ = samples["timesteps"].shape
    num_batches = cfg.sample.num_batches_per_epoch * cfg.sample.train_batch_size // cfg.train.batch_size
    accumulate = cfg.train.gradient_accumulation_steps * num_train_timesteps
    clip, beta = cfg.train.adv_clip_max, cfg.beta
    peft_model.train()

    shuffled = {k: v[draws.perm] for k, v in samples.items()}
    rows = torch.arange(batch)[:, None]
    for key in ("timesteps", "next_timesteps"):
        shuffled[key] = shuffled[key][rows, draws.perms_time]
    size = batch // num_batches
    backwards, norms = 0, []

    def predict(xt, timesteps, embeds, pooled):
        return peft_model(
            hidden_states=xt,
            timestep=timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    for b in range(num_batches):
        part = {k: v[b * size : (b + 1) * size] for k, v in shuffled.items()}
        embeds, pooled = part["prompt_embeds"], part["pooled_prompt_embeds"]  # guidance 1: no negative half
        x0 = part["latents_clean"]
        dims = tuple(range(1, x0.ndim))
        for j in range(num_train_timesteps):
            timesteps = part["timesteps"][:, j]
            t = (timesteps / 1000.0).view(-1, *([1] * (x0.ndim - 1)))
            noise = draws.noise(b, j)
            xt = (1 - t) * x0 + t * noise
            if seen is not None:
                seen.append((xt.detach().clone(), timesteps.clone()))

            peft_model.set_adapter("old")
            with torch.no_grad():
                v_old = predict(xt, timesteps, embeds, pooled).detach()
            peft_model.set_adapter("default")
            v = predict(xt, timesteps, embeds, pooled)
            with torch.no_grad():
                with peft_model.disable_adapter():
                    v_ref = predict(xt, timesteps, embeds, pooled)
                peft_model.set_adapter("default")

            adv = torch.clamp(part["advantages"][:, j], -clip, clip)
            r = torch.clamp((adv / clip) / 2.0 + 0.5, 0, 1)
            positive = beta * v + (1 - beta) * v_old.detach()
            negative = (1.0 + beta) * v_old.detach() - beta * v

            positive_loss = adaptive_error(positive, xt, t, x0)
            negative_loss = adaptive_error(negative, xt, t, x0)
            per_sample = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
            loss = (per_sample * clip).mean()
            loss = loss + cfg.train.beta * torch.mean(((v - v_ref) ** 2).mean(dim=dims))
            (loss / accumulate).backward()
            backwards += 1
            if backwards % accumulate == 0:
                norms.append(
                    float(torch.nn.utils.clip_grad_norm_(peft_model.parameters(), cfg.train.max_grad_norm))
                )
                optimizer.step()
                optimizer.zero_grad()
                global_step += 1

    decay = ref.return_decay(global_step, cfg.decay_type)
    with torch.no_grad():
        for src, tgt in zip(trained, old, strict=True):
            tgt.data.copy_(tgt.detach().data * decay + src.detach().clone().data * (1.0 - decay))
    return global_step, norms, decay


# ---------------------------------------------------------------------------------------------- diffrl


def build_diffrl(out: Path, extra: list[str], reward):
    from diffrl.train import build_trainer

    overrides = [
        f"output_dir={out}",
        f"model.path={model_dir()}",
        "model.max_sequence_length=128",
        f"sample.height={SIZE}",
        f"sample.width={SIZE}",
        "sample.num_steps=10",
        "sample.batch_size=8",
        f"optim.train_batch_size={MICRO_BATCH}",
        f"diffusion_nft.group_size={GROUP}",
        f"diffusion_nft.prompts_per_step={PROMPTS_PER_STEP}",
        "diffusion_nft.per_sample_levels=true",
        "diffusion_nft.weighting=adaptive",
        "data.eval_size=0",
        "mixed_precision=no",
        "ema_decay=0",
        "max_steps=100000",
        f"seed={SEED}",
        *extra,
    ]
    return build_trainer(str(PRESET), overrides, reward=reward, train_prompts=PROMPTS, eval_prompts=[])


def diffrl_options(cfg, num_minibatches: int) -> list[str]:
    """diffrl's options for a reference configuration."""
    t = cfg.train
    return [
        f"optim.lr={t.learning_rate}",
        f"optim.beta1={t.adam_beta1}",
        f"optim.beta2={t.adam_beta2}",
        f"optim.weight_decay={t.adam_weight_decay}",
        f"optim.eps={t.adam_epsilon}",
        f"optim.max_grad_norm={t.max_grad_norm}",
        f"diffusion_nft.beta={cfg.beta}",
        f"diffusion_nft.kl_weight={t.beta}",
        f"diffusion_nft.adv_clip={float(t.adv_clip_max)}",
        f"diffusion_nft.num_train_levels={int(cfg.sample.num_steps * t.timestep_fraction)}",
        f"diffusion_nft.num_minibatches={num_minibatches}",
        *decay_options(cfg.decay_type),
    ]


PRESETS = {
    "sd35m_diffusion_nft_pickscore.yaml": "sd3_pickscore",
    "sd35m_diffusion_nft_multireward.yaml": "sd3_multi_reward",
}
# each reference scorer's output in units of diffrl's reward of the same name (rewards.py's multi_score sums the
# weighted outputs): PickScore divided by the divisor of pickscore_scorer.py (run_facts), HPSv2.1's cosine, and
# clip_scorer.py's logits_per_image / 100 (CLIP ViT-L/14's logit scale is 100: the cosine)
SCORER_SCALES = {"hpsv2": 1.0, "clipscore": 1.0}


def reward_weights(cfg, ref) -> dict[str, float]:
    """diffrl's reward weights for the reference's ``reward_fn``, as the presets document them: a single reward keeps
    its weight (the advantages' division by the global std makes its scale irrelevant: the PickScore preset's
    ``pickscore: 1.0`` for the reference's PickScore / 26); several are summed on the reference scorers' scales, so
    each weight is multiplied by its scorer's scale (the multi-reward preset's PickScore 1/26)."""
    weights = dict(cfg.reward_fn)
    if len(weights) == 1:
        return {name: float(w) for name, w in weights.items()}
    scales = {"pickscore": 1.0 / ref.pickscore_divisor, **SCORER_SCALES}
    return {name: w * scales[name] for name, w in weights.items()}


def preset_expectations(cfg, ref, function: str) -> dict[str, object]:
    """What a diffrl preset of the reference run ``cfg`` (the run function ``function`` of ``config/nft.py``) must
    hold: :func:`diffrl_options` and the run's sizes, sampler, schedule, evaluation, checkpoints, EMA, LoRA and
    rewards (the values each preset line cites)."""
    s, t = cfg.sample, cfg.train
    # _get_config's batch search: num_batches_per_epoch batches of train_batch_size on each of n_gpus processes,
    # gradient_accumulation_steps batches per optimiser update (num_minibatches = gradient_step_per_epoch)
    num_minibatches = s.num_batches_per_epoch // t.gradient_accumulation_steps
    images_per_step = ref.n_gpus[function] * s.num_batches_per_epoch * s.train_batch_size
    expected = {}
    for option in diffrl_options(cfg, num_minibatches):
        key, _, value = option.partition("=")
        expected[key] = ast.literal_eval(value) if value[:1] in "0123456789-." else value
    ema = ref.ema_kwargs
    expected.update(
        {
            "seed": cfg.seed,
            "checkpointing_steps": cfg.save_freq,
            "eval_every": cfg.eval_freq,
            "mixed_precision": cfg.mixed_precision,
            "ema_decay": ema["decay"] if t.ema else 0.0,
            "ema_warmup": ema_warmup(ref, ema["decay"]),
            "ema_every": ema.get("update_step_interval", 1),
            "model.path": cfg.pretrained.model,
            "model.max_sequence_length": ref.max_sequence_length,
            "model.lora_rank": ref.lora_kwargs["r"],
            "model.lora_alpha": ref.lora_kwargs["lora_alpha"],
            "model.lora_init": ref.lora_kwargs.get("init_lora_weights"),
            "data.train": f"data/{Path(cfg.dataset).name}/train.txt",  # dataset/<name>/{train,test}.txt
            "data.eval": f"data/{Path(cfg.dataset).name}/test.txt",
            "sample.height": cfg.resolution,
            "sample.width": cfg.resolution,
            "sample.num_steps": s.num_steps,
            "sample.guidance_scale": s.guidance_scale,
            "sample.eval_num_steps": s.eval_num_steps,
            "sample.eval_guidance_scale": s.guidance_scale,  # eval(): guidance_scale=config.sample.guidance_scale
            "sample.batch_size": s.train_batch_size,
            "optim.train_batch_size": t.batch_size,
            "reward": reward_weights(cfg, ref),
            "eval_reward": reward_weights(cfg, ref),  # main(): eval_reward_fn = multi_score(config.reward_fn)
            # lines 744-750: the tracker's key is the prompt decoded from the gathered CLIP token ids
            "group_by": "tokens" if cfg.per_prompt_stat_tracking else "slot",
            "diffusion_nft.group_size": s.num_image_per_prompt,
            "diffusion_nft.prompts_per_step": images_per_step // s.num_image_per_prompt,
            "diffusion_nft.weighting": "adaptive",  # the reference's only loss
            # the old policy's rollouts: run_sampling(solver=..., deterministic=...); diffrl's solvers are deterministic
            "diffusion_nft.solver": s.solver if s.deterministic else f"{s.solver} (stochastic)",
            "diffusion_nft.per_sample_levels": ref.per_sample_levels,
        }
    )
    kwargs = {
        "hpsv2": {"version": ref.hpsv2_version},  # hpsv2_scorer.py: HPS_v2.1_compressed.pt
        "clipscore": {"model": ref.clip_model},  # clip_scorer.py: CLIPModel.from_pretrained(...)
    }
    if any(name in kwargs for name in cfg.reward_fn):
        expected["reward_kwargs"] = {name: kwargs[name] for name in cfg.reward_fn if name in kwargs}
    return expected


def ema_warmup(ref, decay: float) -> bool:
    """Whether the reference's ``EMAModuleWrapper.get_current_decay`` is diffrl's ``ema_warmup`` ramp,
    ``min(ema_decay, (1 + u) / (10 + u))`` over optimiser updates ``u`` (checked at u = 0..999)."""
    wrapper = ref.EMAModuleWrapper([], decay=decay)
    return all(
        abs(wrapper.get_current_decay(u) - min(decay, (1 + u) / (10 + u))) <= 1e-15 for u in range(1000)
    )


def decay_gaps(ref, decay_type: int) -> list[str]:
    """Where diffrl's old-policy decay with :func:`decay_options` of ``decay_type`` leaves the reference's
    ``return_decay(step, decay_type)`` (steps 0..4999): empty when it reproduces it."""
    from diffrl.trainers.objectives import nft_old_policy_decay

    options = {o.split("=")[0].split("_")[-1]: float(o.split("=")[1]) for o in decay_options(decay_type)}
    for step in range(5000):
        mine = nft_old_policy_decay(step, flat=options["flat"], rate=options["rate"], cap=options["cap"])
        theirs = ref.return_decay(step, decay_type)
        if abs(mine - theirs) > 1e-12:
            return [
                f"decay_type {decay_type}: diffrl's decay {mine!r} at step {step}, return_decay {theirs!r}"
            ]
    return []


def check_presets(ref, presets_dir: Path) -> bool:
    """Each shipped DiffusionNFT preset against the reference configuration it reproduces: every value of
    :func:`preset_expectations` (check 0)."""
    from diffrl.config import load_config

    ok = True
    folder = presets_dir.resolve()
    shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    for name, function in PRESETS.items():
        cfg = getattr(ref.config_module, function)()
        preset = load_config(presets_dir / name)
        expected = preset_expectations(cfg, ref, function)
        wrong = decay_gaps(ref, cfg.decay_type) + preset_differences(preset, expected)
        ok &= not wrong
        print(
            f"  {shown}/{name} vs config/nft.py:{function}: {len(expected)} values, "
            + ("all equal  ok" if not wrong else "DIFFER: " + "; ".join(wrong))
        )
    return ok


def diffrl_draws(trainer, n: int, num_levels: int, k: int, latent_shape) -> types.SimpleNamespace:
    """The random draws diffrl's ``train_step`` makes at ``trainer.step`` (recomputed with its own generators):
    the sample order of the parts, each sample's level order, the noise of each (level position, sample)."""
    c = trainer.cfg.diffusion_nft
    order = torch.arange(n)
    if c.num_minibatches > 1:
        order = torch.randperm(n, generator=trainer.generator(5))
    levels = np.stack(
        [
            np.random.default_rng([trainer.cfg.seed, trainer.step, 15485863, i]).permutation(num_levels)
            for i in range(n)
        ]
    )
    eps = torch.stack(
        [torch.randn((k, *latent_shape), generator=g) for g in trainer.row_generators(4, range(n), 0)], dim=1
    )
    return types.SimpleNamespace(order=order, levels=torch.as_tensor(levels), eps=eps)


def feed_reference(draws, micro_batch: int) -> types.SimpleNamespace:
    """The reference's ``perm``, ``perms_time`` and ``randn_like`` results that reproduce diffrl's draws."""
    perm = draws.order

    def noise(b: int, j: int) -> torch.Tensor:
        rows = perm[b * micro_batch : (b + 1) * micro_batch]
        return draws.eps[j, rows]

    return types.SimpleNamespace(perm=perm, perms_time=draws.levels[perm], noise=noise)


# ---------------------------------------------------------------------------------------------- shared set-up


def lora_pairs(trainer, peft_model):
    """``[(name, diffrl tensor, reference tensor)]`` for both adapters; and the reference-only tensors."""
    ref_named = dict(peft_model.named_parameters())
    d_named = dict(trainer.model.transformer.named_parameters())
    pairs, used = [], set()
    for name in trainer.param_names:
        for adapter in ("default", "old"):
            d_name = name.replace(".default.", f".{adapter}.")
            r_name = "base_model.model." + d_name
            pairs.append((d_name, d_named[d_name], ref_named[r_name]))
            used.add(r_name)
    extra = [n for n in ref_named if "lora_" in n and n not in used]
    return pairs, extra


def initialise_lora(trainer, peft_model, seed: int = 1234) -> list[str]:
    """The same random LoRA on both sides: A ~ N(0, 1/in), B ~ N(0, 0.05^2), the old adapter the trained one plus
    N(0, 0.02^2) (the reference-only tensors of the last block's unused context query get values too)."""
    pairs, extra = lora_pairs(trainer, peft_model)
    ref_named = dict(peft_model.named_parameters())
    with torch.no_grad():
        values = {}
        for name in sorted(n.replace("base_model.model.", "") for n in ref_named if "lora_" in n):
            if ".old." in name:
                continue
            g = torch.Generator().manual_seed(seed + sum(map(ord, name)) * 7919 + len(name))
            shape = ref_named["base_model.model." + name].shape
            scale = 1 / math.sqrt(shape[1]) if ".lora_A." in name else 0.05
            values[name] = torch.randn(shape, generator=g) * scale
            other = name.replace(".default.", ".old.")
            values[other] = values[name] + 0.02 * torch.randn(shape, generator=g)
        for name, value in values.items():
            ref_named["base_model.model." + name].copy_(value)
        for d_name, d_tensor, _ in pairs:
            d_tensor.copy_(values[d_name])
    return extra


def per_tensor_table(pairs) -> None:
    """One line per trained LoRA tensor: its and its old copy's max abs and max rel difference."""
    named = {n: (a, b) for n, a, b in pairs}
    for name in [n for n in named if ".default." in n]:
        cells = []
        for adapter in ("default", "old"):
            a, b = named[name.replace(".default.", f".{adapter}.")]
            diff = float((a.detach().double() - b.detach().double()).abs().max())
            cells.append(f"{adapter} {diff:.2e} / {diff / max(float(b.detach().abs().max()), 1e-30):.2e}")
        short = name.replace("transformer_blocks.", "block ").replace(".default.weight", "")
        print(f"      {short:<32} {'   '.join(cells)}")


def report(
    label: str,
    trainer,
    peft_model,
    optimizer,
    before,
    extra_lines=(),
    moment_tolerance=TOLERANCE,
    per_tensor=False,
) -> bool:
    """Print and check the LoRA tensors of both adapters and the trained tensors' AdamW moments (which hold the
    gradients: AdamW's first update is about ``lr * sign(g)``, whatever the gradient's scale)."""
    pairs, _ = lora_pairs(trainer, peft_model)
    rows = [(f"{a} adapter", [p for p in pairs if f".{a}." in p[0]]) for a in ("default", "old")]
    trained = [p for p in pairs if ".default." in p[0]]
    for moment in ("exp_avg", "exp_avg_sq"):
        rows.append(
            (
                f"AdamW {moment}",
                [(n, trainer.optimizer.state[d][moment], optimizer.state[r][moment]) for n, d, r in trained],
            )
        )
    ok = True
    print(f"  {label}")
    for what, group in rows:
        a, r, where = compare(group)
        tolerance = moment_tolerance if what.startswith("AdamW") else TOLERANCE
        good = r <= tolerance
        ok &= good
        print(
            f"    {what:<17} ({len(group)} tensors): max abs {a:.2e}  max rel {r:.2e}  {'ok' if good else 'FAIL'} "
            f"(tolerance {tolerance:.0e}; worst: block {where.split('transformer_blocks.')[-1]})"
        )
    moved = max(
        float((d.detach() - before[n]).abs().max() / before[n].abs().max())
        for n, d, _ in pairs
        if ".default." in n
    )
    print(f"    the update moved the trained LoRA tensors by up to {moved:.2e} of their largest value")
    if per_tensor:
        print("    per tensor (max abs / max rel, after the update and the soft update):")
        per_tensor_table(pairs)
    for line in extra_lines:
        print(f"    {line}")
    return ok


def prompt_rows(trainer) -> list[str]:
    batch = trainer.step_batch(trainer.cfg.diffusion_nft.prompts_per_step)
    prompts, _, _ = trainer.expand_groups(batch, trainer.cfg.diffusion_nft.group_size)
    return prompts


def reference_embeddings(ref, pipe, prompts, device):
    """The reference's ``compute_text_embeddings`` (T5 length 128), called once per prompt and concatenated: diffrl
    encodes each prompt on its own (so a prompt's encoding never depends on its batch), and a batched call differs
    in the last bits (4.8e-7 in the pooled embedding here), which would reach the rewards and the gradients."""
    parts = [
        ref.compute_text_embeddings(
            [p],
            [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
            [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
            max_sequence_length=128,
            device=device,
        )
        for p in prompts
    ]
    return torch.cat([e for e, _ in parts]), torch.cat([p for _, p in parts])


def reference_samples(ref, pipe, prompts, x0, advantages, num_steps):
    """The per-sample tensors the reference keeps after sampling (``main()`` lines ~646-660)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    embeds, pooled = reference_embeddings(ref, pipe, prompts, x0.device)
    retrieve_timesteps(pipe.scheduler, num_steps, x0.device)
    timesteps = pipe.scheduler.timesteps.repeat(len(prompts), 1)
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "timesteps": timesteps,
        "next_timesteps": torch.cat([timesteps[:, 1:], torch.zeros_like(timesteps[:, :1])], dim=1),
        "latents_clean": x0,
        "advantages": advantages,
    }


@contextlib.contextmanager
def record_trained_inputs(trainer, seen: list):
    """Record what diffrl's trained forward passes receive (the grad-enabled ``velocity`` calls)."""
    model = trainer.model
    original = model.velocity

    def spy(x, sigma, cond, guidance_scale=1.0):
        if torch.is_grad_enabled():
            seen.append((x.detach().clone(), (torch.as_tensor(sigma).float() * 1000).detach().clone()))
        return original(x, sigma, cond, guidance_scale)

    model.velocity = spy
    try:
        yield
    finally:
        del model.velocity


def inputs_gap(seen_ref, seen_diffrl) -> tuple[float, float]:
    if len(seen_ref) != len(seen_diffrl):
        return float("inf"), float("inf")
    dx = max(float((a[0] - b[0]).abs().max()) for a, b in zip(seen_ref, seen_diffrl, strict=True))
    dt = max(float((a[1] - b[1]).abs().max()) for a, b in zip(seen_ref, seen_diffrl, strict=True))
    return dx, dt


MODEL_DIR: Path | None = None


def model_dir() -> Path:
    return MODEL_DIR


def colour_reward(images, prompts, **metadata):
    """A smooth per-image score with spread within each group (the tiny model's images are noise)."""
    red_minus_blue = (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
    return 10 * red_minus_blue + images.std(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------- the checks


# (reference preset, step index, updates per step, KL weight or None for the preset's 1e-4)
ONE_UPDATE_RUNS = [
    ("pickscore", 199, 1, None),
    ("pickscore", 199, 2, None),
    ("ocr", 99, 1, None),
    ("ocr", 99, 2, None),
    ("pickscore", 199, 2, 0.1),  # the KL term large enough to show in the gradients
]


def spies(trainer, nft_module, captured):
    """Wrappers of ``diffrl.trainers.diffusion_nft.rollout`` (records the initial noise, the clean latents and the
    levels) and of ``trainer.sample_and_score`` (records the prompts and rewards); both return what they wrap."""
    original_rollout, original_score = nft_module.rollout, trainer.sample_and_score

    def rollout(model, cond, sigmas, latents, **kwargs):
        out = original_rollout(model, cond, sigmas, latents, **kwargs)
        captured.setdefault("noise", []).append(latents.detach().clone())
        captured.setdefault("x0", []).append(out.final.detach().clone())
        captured["sigmas"] = sigmas.detach().clone()
        return out

    def sample_and_score(count, sample_chunk, prompts, metadata):
        x, scored = original_score(count, sample_chunk, prompts, metadata)
        captured["prompts"], captured["rewards"] = list(prompts), scored.total.detach().clone()
        return x, scored

    return rollout, sample_and_score


def check_one_update(ref, tmp: Path, per_tensor: bool = False) -> bool:
    from diffrl.rewards import RewardOutput

    print("1. one update on stored latents and rewards (reference loop vs diffrl train_step)")
    ok = True
    n = GROUP * PROMPTS_PER_STEP
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(n, 4, SIZE // 4, SIZE // 4, generator=g)
    rewards = torch.randn(n, generator=g)
    extra = []
    for index, (name, step, num_minibatches, kl_weight) in enumerate(ONE_UPDATE_RUNS):
        cfg = reference_config(ref, name, num_minibatches, n)
        if kl_weight is not None:
            cfg.train.beta = kl_weight
        label = (
            f"sd3_{name}: beta {cfg.beta}, KL {cfg.train.beta:g}, decay type {cfg.decay_type}, "
            f"{num_minibatches} update{'s' if num_minibatches > 1 else ''}"
        )
        trainer = build_diffrl(tmp / f"one-{index}", diffrl_options(cfg, num_minibatches), stored_reward)
        trainer.step = step  # as in a resumed run, so that the old policy's decay is not 0
        pipe, peft_model = build_reference_model(ref, model_dir())
        extra = initialise_lora(trainer, peft_model)
        trained, old = reference_param_lists(peft_model)
        optimizer = reference_optimizer(cfg, trained)
        before = {n_: t.detach().clone() for n_, t, _ in lora_pairs(trainer, peft_model)[0]}

        prompts = prompt_rows(trainer)
        given = {}
        trainer.sample_and_score = stored_rollouts(
            x0, RewardOutput(total=rewards, components={"stored": rewards}), given
        )
        num_levels = cfg.sample.num_steps
        k = int(num_levels * cfg.train.timestep_fraction)
        draws = diffrl_draws(trainer, n, num_levels, k, x0.shape[1:])
        seen_d, seen_r = [], []
        with record_trained_inputs(trainer, seen_d):
            metrics = trainer.train_step(trainer.step)
        assert given["prompts"] == prompts

        advantages = reference_advantages(ref, prompts, rewards, k)
        samples = reference_samples(ref, pipe, prompts, x0.clone(), advantages, cfg.sample.num_steps)
        global_step = step * num_minibatches
        global_step, norms, decay = reference_epoch(
            ref,
            cfg,
            peft_model,
            optimizer,
            trained,
            old,
            samples,
            feed_reference(draws, MICRO_BATCH),
            global_step,
            seen_r,
        )
        dx, dt = inputs_gap(seen_r, seen_d)
        lines = [
            f"old-policy decay: reference return_decay({global_step}, {cfg.decay_type}) = {decay:.6g}, diffrl "
            f"{metrics['train/old_decay']:.6g}; grad norm of the last update: reference {norms[-1]:.7g}, diffrl "
            f"{metrics.get('train/grad_norm', float('nan')):.7g}",
            f"trained forward passes: {len(seen_r)} reference, {len(seen_d)} diffrl; inputs max |xt_ref - x_s_diffrl| "
            f"{dx:.1e}, max |timestep_ref - 1000 sigma_diffrl| {dt:.1e}",
        ]
        show = per_tensor or (name, num_minibatches, kl_weight) == ("ocr", 2, None)  # the OCR config's shape
        good = report(label, trainer, peft_model, optimizer, before, lines, per_tensor=show)
        good &= abs(decay - metrics["train/old_decay"]) < 1e-12 and dx < 1e-5 and dt < 1e-3
        ok &= good
        del trainer, pipe, peft_model
    print(
        f"  reference-only LoRA tensors (the last block's context query, whose output is unused): {len(extra)}"
    )
    return ok


def check_consecutive_steps(
    ref, tmp: Path, steps: int, per_tensor: bool = False, solver: str = "dpm2"
) -> bool:
    ours = {"dpm2": "dpm2", "flow": "euler"}[solver]
    print(
        f"\n2. {steps} consecutive steps with sampling (beta 0.1, decay type 2 started at step 99, 2 updates/step)"
    )
    print(
        f"   diffrl: diffusion_nft.solver={ours}; reference: run_sampling(solver={solver!r}, deterministic=True), "
        "float timesteps"
    )
    n = GROUP * PROMPTS_PER_STEP
    num_minibatches = 2
    cfg = reference_config(ref, "ocr", num_minibatches, n)
    options = [*diffrl_options(cfg, num_minibatches), f"diffusion_nft.solver={ours}"]
    trainer = build_diffrl(tmp / "steps", options, colour_reward)
    trainer.step = 99
    pipe, peft_model = build_reference_model(ref, model_dir())
    initialise_lora(trainer, peft_model)
    trained, old = reference_param_lists(peft_model)
    optimizer = reference_optimizer(cfg, trained)
    global_step = trainer.step * num_minibatches
    k = int(cfg.sample.num_steps * cfg.train.timestep_fraction)

    import diffrl.trainers.diffusion_nft as nft_module

    ok = True
    info_printed = False
    for _ in range(steps):
        captured = {}
        original_rollout = nft_module.rollout
        nft_module.rollout, trainer.sample_and_score = spies(trainer, nft_module, captured)
        names = [n_ for n_, _, _ in lora_pairs(trainer, peft_model)[0]]
        state_before = [t.detach().clone() for _, t, _ in lora_pairs(trainer, peft_model)[0]]
        draws = diffrl_draws(trainer, n, cfg.sample.num_steps, k, (4, SIZE // 4, SIZE // 4))
        try:
            metrics = trainer.train_step(trainer.step)
        finally:
            nft_module.rollout = original_rollout
            del trainer.sample_and_score
        step = trainer.step
        trainer.step += 1
        before = {n_: t.detach().clone() for n_, t in zip(names, state_before, strict=True)}

        prompts = captured["prompts"]
        noise = torch.cat(captured["noise"])
        x0_diffrl = torch.cat(captured["x0"])
        embeds, pooled = reference_embeddings(ref, pipe, prompts, noise.device)
        if not info_printed:
            info_printed = True
            cond = trainer.model.encode(prompts)
            print(
                f"   text embeddings (reference compute_text_embeddings vs diffrl encode): max abs "
                f"{float((cond.prompt_embeds - embeds).abs().max()):.2e} / pooled "
                f"{float((cond.pooled - pooled).abs().max()):.2e}"
            )
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

            retrieve_timesteps(pipe.scheduler, cfg.sample.num_steps, noise.device)
            retrieved = pipe.scheduler.sigmas
            print(
                f"   levels: reference scheduler vs diffrl schedule max abs "
                f"{float((captured['sigmas'] - retrieved.float()).abs().max()):.2e}"
            )
            print_solver_gaps(
                ref, pipe, peft_model, embeds, pooled, noise, x0_diffrl, cfg.sample.num_steps, solver
            )
        x0_ref, images = reference_sample(
            ref, pipe, peft_model, embeds, pooled, noise, cfg.sample.num_steps, solver
        )
        rewards_ref = colour_reward(images, prompts)
        advantages = reference_advantages(ref, prompts, rewards_ref, k)
        samples = reference_samples(ref, pipe, prompts, x0_ref, advantages, cfg.sample.num_steps)
        global_step, norms, decay = reference_epoch(
            ref,
            cfg,
            peft_model,
            optimizer,
            trained,
            old,
            samples,
            feed_reference(draws, MICRO_BATCH),
            global_step,
        )
        x_gap = float((x0_ref - x0_diffrl).abs().max()) / float(x0_diffrl.abs().max())
        r_gap = float((rewards_ref - captured["rewards"]).abs().max())
        lines = [
            f"clean latents max rel {x_gap:.2e}, rewards max abs {r_gap:.2e}, decay reference {decay:.6g} "
            f"diffrl {metrics['train/old_decay']:.6g}, grad norm reference {norms[-1]:.6g} diffrl "
            f"{metrics.get('train/grad_norm', float('nan')):.6g}"
        ]
        good = report(
            f"step {step}",
            trainer,
            peft_model,
            optimizer,
            before,
            lines,
            SAMPLED_MOMENT_TOLERANCE,
            per_tensor,
        )
        good &= abs(decay - metrics["train/old_decay"]) < 1e-12
        ok &= good
    return ok


def print_solver_gaps(ref, pipe, peft_model, embeds, pooled, noise, x0_diffrl, num_steps, solver):
    """For information: the reference's own pipeline (integer timesteps) with the Euler and the DPM2 solver against
    diffrl's rollout, and the part of that gap that the pipeline's integer timesteps make."""
    scale = float(x0_diffrl.abs().max())
    finals = {}
    for name in ("flow", "dpm2"):
        peft_model.set_adapter("old")
        with torch.no_grad():
            _, latents, _ = ref.pipeline_with_logprob(
                pipe,
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                negative_prompt_embeds=embeds,
                negative_pooled_prompt_embeds=pooled,
                num_inference_steps=num_steps,
                guidance_scale=1.0,
                output_type="pt",
                height=SIZE,
                width=SIZE,
                noise_level=0.7,
                deterministic=True,
                solver=name,
                model_type="sd3",
                latents=noise.clone(),
            )
        peft_model.set_adapter("default")
        finals[name] = latents[-1].float()
        gap = float((finals[name] - x0_diffrl).abs().max()) / scale
        print(
            f"   (info) pipeline_with_logprob(solver={name!r}) vs diffrl's rollout (solver {solver!r}): clean latents "
            f"max rel {gap:.2e}"
        )
    x0_int, _ = reference_sample(
        ref, pipe, peft_model, embeds, pooled, noise, num_steps, solver, integer_timesteps=True
    )
    gap = float((finals[solver] - x0_int).abs().max()) / scale
    print(
        f"   (info) pipeline_with_logprob(solver={solver!r}) vs run_sampling with integer timesteps: max rel {gap:.2e} "
        "(the pipeline's gap to diffrl above is its integer timesteps)"
    )


def check_bf16_old_adapter(tmp: Path) -> bool:
    print("\n3. bf16 model: the old adapter's dtype and one soft update at decay 0.999")
    trainer = build_diffrl(
        tmp / "bf16",
        [
            "model.dtype=bfloat16",
            "diffusion_nft.decay_flat=0",
            "diffusion_nft.decay_rate=1.0",
            "diffusion_nft.decay_cap=0.999",
            "sample.num_steps=4",
        ],
        colour_reward,
    )
    dtypes = sorted({str(o.dtype) for o in trainer.old_params})
    trained_dtypes = sorted({str(p.dtype) for p in trainer.params})
    with torch.no_grad():  # make the old adapter differ from the trained one
        for o in trainer.old_params:
            o.add_(0.1 * torch.randn(o.shape, generator=torch.Generator().manual_seed(o.numel())).to(o.dtype))
    before = [o.detach().double().clone() for o in trainer.old_params]
    metrics = trainer.train_step(trainer.step)
    d = metrics["train/old_decay"]
    worst = 0.0
    for o, b, p in zip(trainer.old_params, before, trainer.params, strict=True):
        expected = (1 - d) * (p.detach().double() - b)
        moved = o.detach().double() - b
        worst = max(worst, float((moved - expected).abs().max() / expected.abs().max().clamp_min(1e-30)))
    as_bf16 = 0.0  # for comparison: the same soft update on a bf16 copy of the old adapter (the bug)
    for b, p in zip(before, trainer.params, strict=True):
        o16 = b.to(torch.bfloat16)
        start = o16.double()
        o16.mul_(d).add_(p.detach().to(torch.bfloat16), alpha=1 - d)
        expected = (1 - d) * (p.detach().double() - start)
        as_bf16 = max(as_bf16, float((o16.double() - start - expected).abs().max() / expected.abs().max()))
    ok = dtypes == ["torch.float32"] and worst < 1e-2
    print(
        f"  old adapter dtype {dtypes}, trained adapter dtype {trained_dtypes}, frozen weights "
        f"{trainer.model.dtype}; decay {d}; soft update max |moved - (1-d)(new-old)| / max|(1-d)(new-old)| "
        f"{worst:.3e}  {'ok' if ok else 'FAIL'} (tolerance 1e-2)"
    )
    print(f"    (info) the same soft update on a bfloat16 old adapter: {as_bf16:.3e}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="a clone of NVlabs/DiffusionNFT")
    parser.add_argument("--steps", type=int, default=3, help="consecutive steps of check 2")
    parser.add_argument(
        "--solver",
        choices=("dpm2", "flow"),
        default="dpm2",
        help="check 2's rollout solver: the reference configs' dpm2 (diffrl: diffusion_nft.solver=dpm2) or its Euler",
    )
    parser.add_argument(
        "--per-tensor",
        action="store_true",
        help="print every LoRA tensor's differences in every run (default: one run)",
    )
    parser.add_argument(
        "--presets",
        type=Path,
        default=ROOT / "configs",
        help="check 0's preset folder (default: the shipped configs/; a folder of modified copies shows it failing)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    quiet_libraries()
    torch.manual_seed(0)
    ref = load_reference(args.reference)
    import peft

    commit = git_commit(ref.root)
    print(
        f"reference: {ref.root} (commit {commit or 'unknown'}); its LoRA {ref.lora_kwargs} on "
        f"{len(ref.lora_targets)} module names; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}"
    )
    results = {}
    print("\n0. the shipped presets against the reference configurations they reproduce:")
    results["presets"] = check_presets(ref, args.presets)
    print()
    with tempfile.TemporaryDirectory(prefix="parity-nft-") as tmp:
        tmp = Path(tmp)
        global MODEL_DIR
        from diffrl.models.tiny import build_tiny_sd3

        # the tiny SD3 pipeline of diffrl.models.tiny with two blocks, so that one is not the last, "context
        # pre-only" block (whose context query and output projection are unused or absent)
        MODEL_DIR = build_tiny_sd3(tmp / "tiny-sd3-2-blocks", num_layers=2)
        results["one update"] = check_one_update(ref, tmp, args.per_tensor)
        results["consecutive steps"] = check_consecutive_steps(
            ref, tmp, args.steps, args.per_tensor, args.solver
        )
        results["bf16 old adapter"] = check_bf16_old_adapter(tmp)
    print("\n" + "; ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
