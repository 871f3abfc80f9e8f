"""Parity of diffrl's AWM update with the reference code (scxue/advantage_weighted_matching) on a tiny SD3.

The reference trains inside one long ``main()`` (``scripts/train_sd3_awm.py``, 1424 lines at be51372) that needs
CUDA, accelerate, wandb and a prompt dataset, so it cannot be imported and run as is. This script (run by hand, not
part of the test suite) runs ONE training update both ways, side by side, on the same tiny pipeline, prompts, clean
latents, rewards, initial LoRA and random draws, in float32 on the CPU. It executes the reference's own functions
where they exist as functions and re-writes only what is inline in ``main()``:

* executed from the clone at run time: ``compute_log_prob_awm`` (the prediction and its float64 matching loss with
  the ``weighting``: ``ghuber``, ``t`` or ``Uniform``) and ``compute_text_embeddings`` (both taken out of
  ``scripts/train_sd3_awm.py`` with ``ast`` and executed in a namespace, since the module imports absl, wandb and
  ml_collections at the top), ``encode_prompt`` (``flow_grpo/diffusers_patch/train_dreambooth_lora_sd3.py``),
  ``PerPromptStatTracker`` (``flow_grpo/stat_tracking.py``), the run configuration ``pickscore_sd3_no_cfg_1node()``
  of ``config/dgx_awm.py`` on ``config/base_awm.py`` (a small attribute dict stands in for
  ``ml_collections.ConfigDict``, ``imp.load_source`` for ``imp``), and the ``LoraConfig`` arguments and the target
  modules of ``lora_type == "attn"`` (read out of ``main()`` with ``ast``);
* re-written here following ``scripts/train_sd3_awm.py`` (line numbers of the be51372 clone):

  - model set-up, lines 569-686: float32 pipeline, the ``attn`` targets (612-622), ``get_peft_model`` with the
    reference ``LoraConfig`` (632-643), the trained list taken right after it (646), a second adapter ``"ema"``
    (``add_adapter``, its list taken under ``set_adapter("ema")``, a copy of the trained one; 650-659), AdamW with
    the config's learning rate, betas, weight decay and epsilon (680-686). The LR schedule (688-704: cosine from lr
    to lr / 3 over ``decay_steps`` = 1e10 updates) gives lr (1 - 3e-16) at the update made here: a plain AdamW at lr;
  - after sampling: the scheduler's ``timesteps`` per sample and the final latents as ``next_latents`` (909-934); the
    rewards as a column (997), ``PerPromptStatTracker(global_std).update`` (1016-1039, the prompts as given: the
    reference decodes them from CLIP token ids, which gives the same groups here), the advantages as a tensor
    (1043-1048). The mask of lines 1056-1067 is not used to filter (its ``randperm`` runs only when the count is not
    a multiple of ``sample.num_batches_per_epoch``, 1 here);
  - the training epoch: the shuffled samples (``perm``, 1086; the per-sample time permutation of 1090-1101 is an
    ``arange``, a no-op), micro-batches of ``train.batch_size`` (1104-1111); per micro-batch the level draw of
    ``config.time_type`` (``logit_normal`` 1138-1160, ``discrete`` 1172-1180, ``discrete_wo_init`` 1197-1205), the
    clean latents, embeddings repeated ``train_timesteps`` times and one ``randn_tensor`` per level (1209-1221); old
    log-probs only for the micro-batches past ``gradient_accumulation_steps`` (1227-1239: none here on-policy), and
    with ``off_policy`` for every micro-batch under ``set_adapter("ema")`` (1233-1239);
    then per micro-batch (1242-1390) ``x_t = (1 - t) x0 + t noise``, ``compute_log_prob_awm`` with the trained
    adapter, under ``disable_adapter()`` (no grad) and under ``set_adapter("ema")`` (no grad) (1268-1280); the
    detached log-probs of the same pass as ``old_log_probs`` (1283-1284); the weight ``clamp(A, +-adv_clip_max) /
    adv_clip_max * advantage_max`` (1293-1299); the ratio ``exp(l - l_old)`` (``exp_first`` per level,
    ``sum_first`` of the level means; 1301-1316); the clipped surrogate ``mean(max(-A r, -A clip(r, 1 +-
    clip_range)))`` (1318-1327); the ``Uniform`` KL to the base and to the EMA adapter and ``loss = policy + beta kl
    + ema_beta ema_kl`` (1330-1354); ``accelerator.backward`` (the loss over ``gradient_accumulation_steps``, 1372)
    and, when the accumulation syncs, ``clip_grad_norm_`` over the trained list, AdamW's step (the prepared
    optimiser's ``step`` and ``zero_grad`` act only then; 1373-1379) and ``global_step += 1`` (1389);
  - the EMA adapter's soft update after the epoch (1409-1419): ``decay = min(kl_ema_decay, 0.001 global_step)``
    (``linear``), ``ema <- decay ema + (1 - decay) trained``.

  One process without DDP (with one process there is nothing to average), no mixed precision (the reference's
  default is fp16; the comparison is in float32, the reference's matching loss and KL terms in float64 as it
  computes them) and no evaluation EMA (``EMAModuleWrapper`` serves evaluation and checkpoints only).

Levels per sample: diffrl draws each sample's levels (and noise) from generators keyed by its row; the reference
draws one set of levels per micro-batch. Here the reference runs with ``train.batch_size = 1`` (and
``gradient_accumulation_steps = train.num_batches_per_epoch`` = the number of samples, the config's formula for these
sizes), so its per-micro-batch draw is a per-sample draw and the update is the same: the mean over the micro-batches
of the mean over their levels is the mean over samples and levels, diffrl's. The reference's draws are fed in, equal
to diffrl's for the same step (recomputed with the trainer's own generators): for the micro-batch of sample ``i =
perm[b]``, ``torch.rand`` returns diffrl's uniforms of row ``i`` (as float32), ``randn_tensor`` at level ``j``
diffrl's noise ``eps[j, i]``, and ``logit_normal``'s ``torch.randperm`` of the levels is the identity (diffrl does
not shuffle them; the noises are i.i.d., so the shuffle pairs nothing differently). ``perm`` (the sample order) is a
seeded permutation: diffrl does not shuffle (one update per step: the order only changes float rounding). diffrl runs
with micro-batches of 2 (``optim.train_batch_size``, a memory knob) to show that they do not matter either.

diffrl runs its own ``AWMTrainer.train_step`` with the options of the reference config (``awm.*``, ``optim.*``,
``model.lora_rank/alpha``, ``model.max_sequence_length=128``). The script patches, on the trainer object only:
``trainer.sample_and_score`` (returns the stored latents and rewards, records the prompts), ``trainer.model.velocity``
(records the trained passes' inputs), ``trainer.step`` (a later step, as a resumed run has, so that the EMA decay is
not 0), a step pre-hook on its optimiser (records the clipped gradients); and, during ``train_step``,
``diffrl.trainers.awm.awm_weights`` (records the advantage weights it returns).

Both sides load the same pipeline, ``diffrl.models.tiny.build_tiny_sd3`` with two MMDiT blocks (T5 included), and
the same random LoRA: A ~ N(0, 1/in), B ~ N(0, 0.05^2), the EMA adapter the trained one plus N(0, 0.02^2), so that
every term is non-trivial (the base and EMA predictions differ from the trained one). diffrl leaves the last block's
context-query projection out of the LoRA (its output is unused); the reference's 2 trained tensors there are not
compared. Rewards: fixed random numbers, two prompts of 4 samples. Runs (``RUNS``):

1. ``pickscore_sd3_no_cfg_1node`` as configured (14 steps, 6 levels from indices [0, 12) ``discrete``, ghuber 0.25,
   KL to the base 1e-4, EMA pull 1, EMA decay ``linear`` capped at 0.3, adv clip 5, advantage_max 1, ``exp_first``,
   clip_range 1), at step 149 (EMA decay 0.15);
2. the same with ``discrete_wo_init`` (indices from 1: the GenEval and OCR runs'), KL to the base 0.1 (so that the
   term shows in the gradients), ``adv_clip_max`` 1.5 (the clip acts on one sample), ``advantage_max`` 2,
   ``sum_first``;
3. ``logit_normal`` levels (shift 3) at step 349 (EMA decay at its cap, 0.3);
4. ``t`` weighting (the matching loss times t, no ghuber);
5. ``off_policy`` with ``clip_range`` 0.01 (diffrl: ``awm.rollout_policy=ema``): the old log-probs are the EMA
   adapter's, so the ratio is not 1 (its mean 0.992 here) and the clip acts on about a third of the (sample, level)
   pairs. The rollouts are the stored latents on both sides, so what is compared is the update on them; that the
   trainer samples with the EMA adapter is tested in ``tests/test_awm.py``.
6. ``off_policy`` with ``sum_first`` and ``clip_range`` 0.008 (diffrl: ``awm.rollout_policy=ema awm.ratio=sample``):
   one ratio a sample, ``exp`` of the mean over its 6 levels (the reference's micro-batch is one sample here); the
   clip acts on half of the samples.

Check 0, before the runs: each shipped preset (``configs/sd35m_awm_{pickscore,geneval,ocr}.yaml``) against the
reference configuration it reproduces (``pickscore_sd3_no_cfg_1node``, ``geneval_...``, ``ocr_...``): the options
above plus the run's sizes (``awm.prompts_per_step`` from the config's 8-GPU batch formula), sampler and noise,
schedule, evaluation, checkpoints, EMA, rewards and ``group_by``, 47-48 values each. It fails on any difference (it caught the
PickScore preset drawing its levels from index 1 where the reference's ``discrete`` draws from 0).

Checks per run:

1. the trained forward passes, per (sample, level): max |x_t ref - x_t diffrl|, |t_ref - t_diffrl| and |1000 t_ref -
   1000 t_diffrl| (the transformer's timestep); ``x_t`` recomputed with diffrl's formula, clean latents and noise at
   the reference's ``t`` must equal the reference's bitwise (so the inputs differ only through ``t``: the reference's
   ``t`` is ``scheduler.timesteps / 1000``, float32 ``1000 sigma / 1000``, one ulp (6e-8) from diffrl's ``sigma`` at
   some levels, which moves ``x_t`` by up to 4.8e-7; with ``logit_normal`` its float32 ``icdf`` against diffrl's
   float64 ``ndtri``, 1.2e-7); with ``discrete*`` the level indices; the advantage weights;
2. one update: per LoRA tensor ``max|a - b| / max|b|`` (the largest over the tensors) of the trained tensors after
   the update, of the clipped gradients and of the update (new - old); the gradient norm (before clipping) and the
   losses on both sides (the reference's surrogate ``policy_loss`` is ``-mean(w)`` at ratio 1 by construction; its
   ``mean(w l)``, diffrl's ``train/policy_loss``, is computed here from its log-probs; with ``off_policy`` diffrl
   logs the surrogate itself, and its ratio mean and clipped share are compared too);
3. the EMA adapter after its soft update, and the decay on both sides.

Tolerances: 1e-4 relative per tensor for the weights after the update, the gradients and the EMA adapter, and for
the gradient norm, the weights ``w`` and the losses (same computations; float32 against the reference's float64
loss, other batch shapes, rounding in another order: measured up to 2e-5 for the weights, 3e-6 for the gradients).
The update (new - old): 1e-3, over the elements whose reference gradient is at least 1000 times AdamW's eps: the
update of float32 weights carries their rounding (one ulp of a weight in [0.25, 0.5) is 3e-8, 1e-4 of a step of lr
3e-4), and AdamW's first step ``lr g / (|g| + eps)`` has the slope ``lr eps / (|g| + eps)^2``, which turns the
gradients' float32 gap (~4e-9) into up to 1 % of a step where ``|g|`` is near eps (the update over all elements is
printed for information: up to 9e-3). Check 1: ``x_t`` and ``t`` within 1e-6 absolute, and the bitwise recompute.
The script exits with status 1 when a check fails.

That the check can fail: ``--reference-override KEY=VALUE`` changes a value of the reference configuration only
(after diffrl's options are taken from it). Tried once each: ``train.ghuber_power=0.3`` (diffrl 0.25) fails runs 1-3
(gradients max rel 3e-2 / 7e-2 / 1e-2, weights 4e-3, matching loss 0.15; run 4, ``t`` weighting, has no ghuber and
passes), ``train.ghuber_power=0.26`` fails them as well (gradients 6e-3 / 1e-2 / 2e-3); ``train.beta=0.2`` (run 2's
KL weight 0.1 doubled) fails every run (run 2: gradients 0.33, the KL terms of the loss 0.14); ``train.beta=0.0002``
(run 1's 1e-4 doubled) fails run 1 (gradients 2e-3, weights 1e-3); ``train.ema_beta=2`` fails every run (gradient
norm 0.16 against 0.079); ``train.kl_ema_decay=0.2`` fails only run 3 (decay 0.2 against 0.3: EMA adapter 6e-2;
the other runs' decay, 0.15, is under both caps); on run 5, ``train.clip_range=0.02`` (clipped share 0.02 against
0.31, gradients 0.79) and ``train.off_policy=False`` (gradients 0.95) fail it; on run 6 ``train.loss_type=exp_first``
(the per-level ratio against diffrl's per-sample one) fails it (gradients 0.18, clipped share 0.46 against 0.5).

Usage: ``python benchmarks/parity_awm.py --reference /path/to/advantage_weighted_matching_clone [--per-tensor]
[--runs 1,2] [--reference-override train.ghuber_power=0.3]`` (CPU, offline, about 15 s; set ``OMP_NUM_THREADS=1
HF_HUB_OFFLINE=1``). The clone's root may be the repository (which keeps its code in ``advantage_weighted_matching/``)
or that folder.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import math
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from _parity import (
    compare,
    git_commit,
    parse_override,
    preset_differences,
    quiet_libraries,
    rel,
    short,
    stored_reward,
    stored_rollouts,
)
from _reference_code import load_module, main_lora_setup, script_functions, stub_missing_modules

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "awm.yaml"
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
SIZE = 32  # pixels; 8x8 latents on the tiny pipeline
GROUP = 4
PROMPTS_PER_STEP = 2
DIFFRL_MICRO_BATCH = 2  # diffrl's micro-batch (memory only); the reference's is 1 (levels per sample)
SEED = 42
TOLERANCE = 1e-4
UPDATE_TOLERANCE = (
    1e-3  # the update new - old carries the float32 rounding of the new weights (see the docstring)
)
INPUT_TOLERANCE = 1e-6
REFERENCE_EMA = "ema"  # the reference's EMA adapter (train_sd3_awm.py line 650)
DIFFRL_EMA = "ema_ref"  # diffrl.trainers.awm.EMA


@dataclass
class Run:
    label: str
    step: int  # diffrl's 0-based step: the reference's global_step before the update
    changes: dict = field(
        default_factory=dict
    )  # reference config values changed from pickscore_sd3_no_cfg_1node


RUNS = [
    Run("pickscore_sd3_no_cfg_1node (discrete, KL 1e-4, ghuber 0.25)", 149),
    Run(
        "discrete_wo_init, KL 0.1, adv clip 1.5, advantage_max 2, sum_first",
        149,
        {
            "time_type": "discrete_wo_init",
            "train.beta": 0.1,
            "train.adv_clip_max": 1.5,
            "train.advantage_max": 2,
            "train.loss_type": "sum_first",
        },
    ),
    Run("logit_normal levels (shift 3), EMA decay at its cap", 349, {"time_type": "logit_normal"}),
    Run("t weighting", 149, {"train.weighting": "t"}),
    Run(
        "off_policy: the ratio to the EMA adapter, clip range 0.01",
        149,
        {"train.off_policy": True, "train.clip_range": 0.01},
    ),
    Run(
        "off_policy with sum_first: one ratio a sample, clip range 0.008",
        149,
        {"train.off_policy": True, "train.clip_range": 0.008, "train.loss_type": "sum_first"},
    ),
]


# ---------------------------------------------------------------------------------------------- the reference code


def code_root(root: Path) -> Path:
    """The folder of the clone that holds ``scripts/train_sd3_awm.py`` (the repository keeps its code in
    ``advantage_weighted_matching/``)."""
    for candidate in (root, root / "advantage_weighted_matching"):
        if (candidate / "scripts" / "train_sd3_awm.py").is_file():
            return candidate.resolve()
    raise SystemExit(
        f"{root} is not a clone of scxue/advantage_weighted_matching (no scripts/train_sd3_awm.py in it or in its "
        "advantage_weighted_matching/ folder)"
    )


def reference_lora_targets(script: Path, lora_type: str) -> list[str]:
    """The ``target_modules`` list that ``main()`` assigns under ``if config.lora_type == lora_type`` (the first
    ``target_modules`` of ``main()`` is not enough: there is one per ``lora_type``)."""
    tree = ast.parse(script.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    for node in ast.walk(main):
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and getattr(node.test.left, "attr", "") == "lora_type"
            and isinstance(node.test.comparators[0], ast.Constant)
            and node.test.comparators[0].value == lora_type
        ):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(
                    getattr(t, "id", "") == "target_modules" for t in stmt.targets
                ):
                    return ast.literal_eval(stmt.value)
    raise SystemExit(f"no target_modules for lora_type {lora_type!r} in main() of {script}")


def load_reference(root: Path) -> types.SimpleNamespace:
    """The reference's functions and configuration, executed from the clone at ``root``."""
    code = code_root(root)
    script = code / "scripts" / "train_sd3_awm.py"
    sys.path.insert(0, str(code))
    from flow_grpo.diffusers_patch.train_dreambooth_lora_sd3 import encode_prompt
    from flow_grpo.stat_tracking import PerPromptStatTracker

    namespace = script_functions(
        script,
        {"compute_text_embeddings", "compute_log_prob_awm"},
        {"torch": torch, "np": np, "encode_prompt": encode_prompt},
    )
    _, lora_kwargs, max_sequence_length = main_lora_setup(script)
    stub_missing_modules()
    config_module = load_module(code / "config" / "dgx_awm.py", "reference_dgx_awm_config")
    return types.SimpleNamespace(
        root=Path(root).resolve(),
        code=code,
        PerPromptStatTracker=PerPromptStatTracker,
        compute_text_embeddings=namespace["compute_text_embeddings"],
        compute_log_prob_awm=namespace["compute_log_prob_awm"],
        lora_kwargs=lora_kwargs,
        max_sequence_length=max_sequence_length,
        config_module=config_module,
        script=script,
    )


def set_value(cfg, key: str, value) -> None:
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, last, value)


def reference_config(ref, run: Run, n: int):
    """``pickscore_sd3_no_cfg_1node()`` shrunk to the tiny sizes: one sampling batch of all ``n`` samples,
    micro-batches of 1 (levels per sample), one optimiser update per epoch (``gradient_accumulation_steps`` =
    ``train.num_batches_per_epoch``, the config's formula), then the run's changes."""
    cfg = ref.config_module.pickscore_sd3_no_cfg_1node()
    cfg.mixed_precision = "no"
    cfg.resolution = SIZE
    cfg.sample.num_image_per_prompt = GROUP
    cfg.sample.train_batch_size = n
    cfg.sample.num_batches_per_epoch = 1
    cfg.train.batch_size = 1
    per_epoch = cfg.sample.train_batch_size // cfg.train.batch_size * cfg.sample.num_batches_per_epoch
    cfg.train.gradient_accumulation_steps = per_epoch
    cfg.train.num_batches_per_epoch = per_epoch
    for key, value in run.changes.items():
        set_value(cfg, key, value)
    return cfg


def build_reference_model(ref, model_dir: Path, lora_type: str):
    """The reference's model set-up (``main()`` lines 569-686). Returns ``(pipeline, peft_model, trained, ema)``."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        part.requires_grad_(False)
    pipe.transformer.requires_grad_(False)  # use_lora
    lora = LoraConfig(target_modules=reference_lora_targets(ref.script, lora_type), **ref.lora_kwargs)
    transformer = get_peft_model(pipe.transformer, lora)
    trained = [p for p in transformer.parameters() if p.requires_grad]
    transformer.add_adapter(REFERENCE_EMA, lora)
    transformer.set_adapter(REFERENCE_EMA)
    ema = [p for p in transformer.parameters() if p.requires_grad]
    transformer.set_adapter("default")
    with torch.no_grad():
        for src, tgt in zip(trained, ema, strict=True):
            tgt.data.copy_(src.detach().data)
            assert src is not tgt
    return pipe, transformer, trained, ema


def reference_optimizer(cfg, params):
    t = cfg.train
    return torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )


def reference_embeddings(ref, pipe, prompts, device):
    """The reference's ``compute_text_embeddings`` (T5 length 128), one prompt at a time as diffrl encodes them (a
    batched call differs in the last bits, which would reach the gradients)."""
    parts = [
        ref.compute_text_embeddings(
            [p],
            [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
            [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
            max_sequence_length=ref.max_sequence_length,
            device=device,
        )
        for p in prompts
    ]
    return torch.cat([e for e, _ in parts]), torch.cat([p for _, p in parts])


def reference_advantages(ref, cfg, prompts, rewards):
    """``main()`` lines 997 and 1016-1048: the rewards as a column, per-prompt means, the global std."""
    tracker = ref.PerPromptStatTracker(cfg.sample.global_std)
    advantages = tracker.update(list(prompts), rewards.float().unsqueeze(-1).numpy())
    tracker.clear()
    return torch.as_tensor(advantages)


def reference_samples(ref, cfg, pipe, prompts, x0, advantages):
    """The per-sample tensors the reference keeps after sampling (``main()`` lines 909-934): ``next_latents`` holds
    only the final latents here (the training reads ``next_latents[:, -1]``), ``latents`` only its shape."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    embeds, pooled = reference_embeddings(ref, pipe, prompts, x0.device)
    retrieve_timesteps(pipe.scheduler, cfg.sample.num_steps, x0.device)
    timesteps = pipe.scheduler.timesteps.repeat(len(prompts), 1)
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "timesteps": timesteps,
        "latents": x0.unsqueeze(1),
        "next_latents": x0.unsqueeze(1),
        "advantages": advantages,
    }


def reference_levels(cfg, sample, draws, i):
    """The level draw of micro-batch ``i`` (``main()`` lines 1138-1205), ``(K B, 1, 1, 1)``; the indices (None for
    ``logit_normal``)."""
    K, B = cfg.train.train_timesteps, cfg.train.batch_size
    if cfg.time_type == "logit_normal":  # lines 1138-1160
        base_uniform_vector = (torch.arange(K) + draws.rand(i, K)) / K
        normal_dist = torch.distributions.Normal(loc=0.0, scale=1.0)
        # line 1148 overwrites the clamped icdf of line 1147 with this one
        u_standard_vector = normal_dist.icdf(base_uniform_vector)
        u_standard_shuffled = u_standard_vector[draws.randperm(i, K)]
        m, s, shift = 0.0, 1.0, cfg.time_shift
        u = u_standard_shuffled * s + m
        t_vector = torch.sigmoid(u)
        t_vector_shifted = shift * t_vector / (1 + (shift - 1) * t_vector)
        timesteps = torch.repeat_interleave(t_vector_shifted, repeats=B)
        timesteps = torch.clamp(timesteps, min=0.01)
        return timesteps.view(-1, 1, 1, 1), None
    first = {"discrete": 0, "discrete_wo_init": 1}.get(cfg.time_type)
    if first is None:
        raise SystemExit(f"time_type {cfg.time_type!r} is not re-written here")
    # lines 1172-1180 (discrete) and 1197-1205 (discrete_wo_init)
    boundaries = torch.linspace(
        first,
        int(cfg.sample.num_steps * cfg.train.timestep_fraction),
        steps=cfg.train.train_timesteps + 1,
    )
    lower_bounds = boundaries[:-1].long()
    upper_bounds = boundaries[1:].long()
    rand_u = draws.rand(i, K)
    t_indices = lower_bounds + (rand_u * (upper_bounds - lower_bounds)).long()
    train_totalindex = torch.repeat_interleave(t_indices, repeats=B)
    return sample["timesteps"][0][train_totalindex].view(-1, 1, 1, 1) / 1000, t_indices


def reference_update(ref, cfg, pipe, peft_model, optimizer, trained, ema, samples, draws, global_step, seen):
    """One epoch of the reference training loop (``main()`` lines 1084-1419) in its order of operations, with the
    random draws fed in. Returns a namespace: the new ``global_step``, the gradient norms, the clipped gradients,
    the level indices per sample, the per-micro-batch losses and the EMA decay."""
    K, B = cfg.train.train_timesteps, cfg.train.batch_size
    gas = cfg.train.gradient_accumulation_steps
    total_batch_size = samples["timesteps"].shape[0]
    out = types.SimpleNamespace(norms=[], grads=None, indices={}, losses={}, decay=None)

    # line 1086: shuffle the samples (the time permutation of lines 1090-1101 is an arange: nothing to do)
    perm = draws.perm
    samples = {k: v[perm] for k, v in samples.items()}
    # lines 1104-1111: micro-batches
    size = total_batch_size // cfg.train.num_batches_per_epoch
    samples_batched = [
        {k: v[b * size : (b + 1) * size] for k, v in samples.items()}
        for b in range(cfg.train.num_batches_per_epoch)
    ]
    peft_model.train()

    def log_prob_of(sample, timesteps, embeds, pooled, noised_latents):
        return ref.compute_log_prob_awm(
            peft_model,
            pipe,
            sample,
            timesteps,
            embeds,
            pooled,
            cfg,
            noised_latents,
            sample["clean_latents"],
            sample["train_random_noise"],
            weighting=cfg.train.weighting,
        )

    # lines 1119-1240: levels, noise and (off-policy micro-batches only) old log-probs
    for i, sample in enumerate(samples_batched):
        embeds, pooled = sample["prompt_embeds"], sample["pooled_prompt_embeds"]  # train.cfg is False
        timesteps, t_indices = reference_levels(cfg, sample, draws, i)
        if t_indices is not None:
            out.indices[int(perm[i])] = t_indices.clone()
        clean_latents = sample["next_latents"][:, -1]
        embeds = torch.cat([embeds] * K, dim=0)
        pooled = torch.cat([pooled] * K, dim=0)
        clean_latents = torch.cat([clean_latents] * K, dim=0)
        train_random_noise = torch.cat([draws.noise(i, j) for j in range(K)], dim=0)  # randn_tensor per level
        sample["timesteps"] = timesteps
        sample["train_random_noise"] = train_random_noise
        sample["clean_latents"] = clean_latents
        if not cfg.train.off_policy and i < gas:
            continue
        noised_latents = (1 - timesteps) * sample["clean_latents"] + timesteps * sample["train_random_noise"]
        if cfg.train.off_policy:  # lines 1233-1239: the old log-probs are the EMA adapter's
            peft_model.set_adapter(REFERENCE_EMA)
        with torch.no_grad():
            log_prob, _, _ = log_prob_of(sample, timesteps, embeds, pooled, noised_latents)
        sample["old_log_probs"] = log_prob.reshape(K, B)
        if cfg.train.off_policy:
            peft_model.set_adapter("default")

    # lines 1242-1390: the training passes
    backwards = 0
    losses = {
        k: []
        for k in (
            "policy_loss",
            "kl_loss",
            "ema_kl_loss",
            "loss",
            "matching",
            "weighted",
            "abs_weighted",
            "abs_weights",
            "ratio",
            "clip_frac",
        )
    }
    for i, sample in enumerate(samples_batched):
        embeds = torch.cat([sample["prompt_embeds"]] * K, dim=0)
        pooled = torch.cat([sample["pooled_prompt_embeds"]] * K, dim=0)
        timesteps = sample["timesteps"]
        noised_latents = (1 - timesteps) * sample["clean_latents"] + timesteps * sample["train_random_noise"]
        seen.append((int(perm[i]), noised_latents.detach().clone(), timesteps.view(-1).clone()))

        log_prob, model_output, std_dev_t = log_prob_of(sample, timesteps, embeds, pooled, noised_latents)
        if cfg.train.beta > 0:
            with torch.no_grad():
                with peft_model.disable_adapter():
                    _, model_output_ref, _ = log_prob_of(sample, timesteps, embeds, pooled, noised_latents)
        if cfg.train.ema_beta > 0:
            peft_model.set_adapter(REFERENCE_EMA)
            with torch.no_grad():
                _, model_output_ema, _ = log_prob_of(sample, timesteps, embeds, pooled, noised_latents)
            peft_model.set_adapter("default")

        if not cfg.train.off_policy and i < gas:
            sample["old_log_probs"] = log_prob.reshape(K, B).detach()
        sample["log_probs"] = log_prob.reshape(K, B)
        sample["model_output"] = model_output.reshape(K, B, *model_output.shape[1:])
        sample["model_output_ref"] = model_output_ref.reshape(K, B, *model_output_ref.shape[1:])
        sample["model_output_ema"] = model_output_ema.reshape(K, B, *model_output_ema.shape[1:])
        sample["std_dev_t"] = std_dev_t.reshape(K, B, *std_dev_t.shape[1:])

        advantages = torch.clamp(sample["advantages"][:, 0], -cfg.train.adv_clip_max, cfg.train.adv_clip_max)
        if cfg.train.advantage_max is not None:
            advantages = advantages / cfg.train.adv_clip_max * cfg.train.advantage_max
        weights = advantages  # for the figures below: the weights before the exp_first repeat
        if cfg.train.loss_type == "sum_first":
            ratio = torch.exp(sample["log_probs"].mean(dim=0) - sample["old_log_probs"].mean(dim=0).detach())
        elif cfg.train.loss_type == "exp_first":
            ratio = torch.exp(sample["log_probs"].view(-1) - sample["old_log_probs"].view(-1).detach())
            advantages = advantages.unsqueeze(0).repeat(K, 1).view(-1)
        else:
            raise SystemExit(f"loss_type {cfg.train.loss_type!r} is not re-written here")
        unclipped_loss = -advantages * ratio
        clipped_loss = -advantages * torch.clamp(
            ratio, 1.0 - cfg.train.clip_range, 1.0 + cfg.train.clip_range
        )
        policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
        if cfg.train.kl_weight != "Uniform" or cfg.train.kl_ema_weight != "Uniform":
            raise SystemExit("only the Uniform KL weights (the reference configs') are re-written here")
        if cfg.train.beta > 0:
            kl_loss = ((sample["model_output"] - sample["model_output_ref"]) ** 2).mean(
                dim=(2, 3, 4), keepdim=True
            )
            kl_loss = kl_loss.mean(dim=0).mean()
            if cfg.train.ema_beta > 0:
                ema_kl_loss = ((sample["model_output"] - sample["model_output_ema"]) ** 2).mean(
                    dim=(2, 3, 4), keepdim=True
                )
                ema_kl_loss = ema_kl_loss.mean(dim=0).mean()
                loss = policy_loss + cfg.train.beta * kl_loss + cfg.train.ema_beta * ema_kl_loss
            else:
                ema_kl_loss = torch.zeros(())
                loss = policy_loss + cfg.train.beta * kl_loss
        else:
            kl_loss = ema_kl_loss = torch.zeros(())
            loss = policy_loss

        # for the figures (not part of the update): the matching loss l = -log_prob and mean(w l)
        matching = -sample["log_probs"].detach()
        losses["matching"].append(float(matching.mean()))
        losses["weighted"].append(float((weights.unsqueeze(0) * matching).mean()))
        losses["abs_weighted"].append(float((weights.abs().unsqueeze(0) * matching).mean()))
        losses["abs_weights"].append(float(weights.abs().mean()))
        losses["ratio"].append(float(ratio.detach().mean()))
        losses["clip_frac"].append(float(((ratio.detach() - 1).abs() > cfg.train.clip_range).double().mean()))
        for key, value in (
            ("policy_loss", policy_loss),
            ("kl_loss", kl_loss),
            ("ema_kl_loss", ema_kl_loss),
            ("loss", loss),
        ):
            losses[key].append(float(value.detach()))

        (loss / gas).backward()  # accelerator.backward: the loss over gradient_accumulation_steps
        backwards += 1
        if backwards % gas == 0:  # accelerator.sync_gradients
            out.norms.append(float(torch.nn.utils.clip_grad_norm_(trained, cfg.train.max_grad_norm)))
            out.grads = [None if p.grad is None else p.grad.detach().clone() for p in trained]
            optimizer.step()
            optimizer.zero_grad()
            global_step += 1

    # lines 1409-1419: the EMA adapter's soft update
    with torch.no_grad():
        if cfg.train.kl_ema_decay_type == "constant":
            decay = cfg.train.kl_ema_decay
        elif cfg.train.kl_ema_decay_type == "linear":
            decay = min(cfg.train.kl_ema_decay, 0.001 * global_step)
        for src_param, tgt_param in zip(trained, ema, strict=True):
            tgt_param.data.copy_(
                tgt_param.detach().data * decay + src_param.detach().clone().data * (1.0 - decay)
            )
    out.global_step, out.decay = global_step, decay
    out.losses = {k: float(np.mean(v)) for k, v in losses.items()}
    return out


# ---------------------------------------------------------------------------------------------- diffrl


def diffrl_options(cfg, ref) -> list[str]:
    """diffrl's options for a reference configuration."""
    t = cfg.train
    timesteps = "logit_normal" if cfg.time_type == "logit_normal" else "levels"
    if t.loss_type not in ("exp_first", "sum_first"):
        raise SystemExit(f"loss_type {t.loss_type!r} has no diffrl counterpart")
    return [
        f"optim.lr={t.learning_rate}",
        f"optim.beta1={t.adam_beta1}",
        f"optim.beta2={t.adam_beta2}",
        f"optim.weight_decay={t.adam_weight_decay}",
        f"optim.eps={t.adam_epsilon}",
        f"optim.max_grad_norm={t.max_grad_norm}",
        f"sample.num_steps={cfg.sample.num_steps}",
        f"sample.guidance_scale={cfg.sample.guidance_scale}",
        f"model.lora_rank={ref.lora_kwargs['r']}",
        f"model.lora_alpha={ref.lora_kwargs['lora_alpha']}",
        f"model.max_sequence_length={ref.max_sequence_length}",
        f"awm.adv_std={'global' if cfg.sample.global_std else 'group'}",
        f"awm.adv_clip={float(t.adv_clip_max)}",
        f"awm.adv_max={float(t.advantage_max)}",
        f"awm.num_train_timesteps={t.train_timesteps}",
        f"awm.timesteps={timesteps}",
        f"awm.first_level={1 if cfg.time_type == 'discrete_wo_init' else 0}",
        f"awm.timestep_fraction={t.timestep_fraction}",
        f"awm.time_shift={cfg.time_shift}",
        f"awm.weighting={t.weighting.lower()}",
        f"awm.ghuber_power={t.ghuber_power}",
        f"awm.kl_weight={t.beta}",
        f"awm.ema_kl_weight={float(t.ema_beta)}",
        "awm.ema_kl_rate=0.001",  # hard-coded in the reference's "linear" decay (line 1413)
        f"awm.ema_kl_cap={t.kl_ema_decay}",
        f"awm.rollout_policy={'ema' if t.off_policy else 'current'}",
        f"awm.clip_range={float(t.clip_range)}",
        f"awm.ratio={'sample' if t.loss_type == 'sum_first' else 'level'}",
    ]


PRESETS = {
    "sd35m_awm_pickscore.yaml": "pickscore_sd3_no_cfg_1node",
    "sd35m_awm_geneval.yaml": "geneval_sd3_no_cfg_1node",
    "sd35m_awm_ocr.yaml": "ocr_sd3_no_cfg_1node",
}
GPUS = 8  # dgx_awm.py's gpu_numbers, which its batch formulas use


def preset_expectations(cfg, ref) -> dict[str, object]:
    """What a diffrl preset of the reference run ``cfg`` must hold: :func:`diffrl_options` and the run's sizes,
    sampler, schedule, evaluation and rewards (the values each preset line cites)."""
    s, t = cfg.sample, cfg.train
    expected = {}
    for option in diffrl_options(cfg, ref):
        key, _, value = option.partition("=")
        expected[key] = ast.literal_eval(value) if value[:1] in "0123456789-." else value
    images_per_step = GPUS * s.num_batches_per_epoch * s.train_batch_size
    expected.update(
        {
            "seed": cfg.seed,
            "checkpointing_steps": cfg.save_freq,
            "eval_every": cfg.eval_freq,
            "mixed_precision": cfg.mixed_precision,
            "ema_decay": t.ema_decay if t.ema else 0.0,
            "ema_every": t.ema_update_step_interval,
            "model.lora_init": ref.lora_kwargs.get("init_lora_weights"),
            "sample.height": cfg.resolution,
            "sample.width": cfg.resolution,
            "sample.eval_num_steps": s.eval_num_steps,
            "sample.eval_guidance_scale": s.guidance_scale,
            "sample.batch_size": s.train_batch_size,
            "awm.group_size": s.num_image_per_prompt,
            "awm.prompts_per_step": images_per_step // s.num_image_per_prompt,
            "awm.sampler": "sa_solver" if t.use_sa_solver else "ode",
            "awm.noise_level": s.noise_level,
            "reward": dict(cfg.reward_fn),
            "eval_reward": dict(cfg.reward_fn),
            "group_by": "tokens",  # train_sd3_awm.py: stat_tracker.update(prompts decoded from the gathered tokens)
        }
    )
    if t.use_sa_solver and s.noise_level > 0:
        expected["awm.sde_t_range"] = [
            0.3,
            0.9,
        ]  # sd3_pipeline_with_logprob.py's stochasticity_control_function
    return expected


def check_presets(ref, presets_dir: Path) -> bool:
    """Each shipped AWM preset against the reference configuration it names: every value of
    :func:`preset_expectations` (check 0)."""
    from diffrl.config import load_config

    ok = True
    for name, function in PRESETS.items():
        cfg = getattr(ref.config_module, function)()
        preset = load_config(presets_dir / name)
        wrong = preset_differences(preset, preset_expectations(cfg, ref))
        ok &= not wrong
        count = len(preset_expectations(cfg, ref))
        print(
            f"  configs/{name} vs dgx_awm.py:{function}: {count} values, "
            + ("all equal  ok" if not wrong else "DIFFER: " + "; ".join(wrong))
        )
    return ok


def build_diffrl(out: Path, model_dir: Path, extra: list[str], reward):
    from diffrl.train import build_trainer

    overrides = [
        f"output_dir={out}",
        f"model.path={model_dir}",
        f"sample.height={SIZE}",
        f"sample.width={SIZE}",
        "sample.batch_size=8",
        f"optim.train_batch_size={DIFFRL_MICRO_BATCH}",
        f"awm.group_size={GROUP}",
        f"awm.prompts_per_step={PROMPTS_PER_STEP}",
        "data.eval_size=0",
        "mixed_precision=no",
        "ema_decay=0",
        "max_steps=100000",
        f"seed={SEED}",
        *extra,
    ]
    return build_trainer(str(PRESET), overrides, reward=reward, train_prompts=PROMPTS, eval_prompts=[])


def diffrl_draws(trainer, n: int, latent_shape) -> types.SimpleNamespace:
    """The random draws of diffrl's ``train_step`` at ``trainer.step`` (recomputed with its own generators): each
    row's level uniforms (``train_levels``), its levels, and the noise ``eps[level, row]``."""
    from diffrl.trainers.awm import _LEVELS_KEY

    a, cfg = trainer.cfg.awm, trainer.cfg
    k = a.num_train_timesteps
    uniforms = np.stack(
        [np.random.default_rng([cfg.seed, trainer.step, _LEVELS_KEY, row]).random(k) for row in range(n)]
    )
    sigmas = trainer.model.schedule(cfg.sample.num_steps, cfg.sample.height, cfg.sample.width)
    levels = trainer.train_levels(sigmas, n)
    indices = None
    if a.timesteps == "levels":
        from diffrl.trainers.awm import level_indices

        last = int(cfg.sample.num_steps * a.timestep_fraction)
        indices = torch.as_tensor(np.stack([level_indices(a.first_level, last, k, u) for u in uniforms]))
        assert torch.equal(levels, sigmas[indices].float()), "the recomputed levels are not train_levels'"
    eps = torch.stack(
        [torch.randn((k, *latent_shape), generator=g) for g in trainer.row_generators(4, range(n), 0)], dim=1
    )
    return types.SimpleNamespace(uniforms=uniforms, levels=levels, indices=indices, eps=eps, sigmas=sigmas)


def feed_reference(draws, perm: torch.Tensor) -> types.SimpleNamespace:
    """The reference's ``torch.rand``, ``torch.randperm`` (of the levels) and ``randn_tensor`` results for its
    micro-batch ``b`` (of one sample, ``perm[b]``) that reproduce diffrl's draws for that sample."""

    def rand(b: int, k: int) -> torch.Tensor:
        return torch.from_numpy(draws.uniforms[int(perm[b])][:k]).float()

    def randperm(b: int, k: int) -> torch.Tensor:
        return torch.arange(k)

    def noise(b: int, j: int) -> torch.Tensor:
        return draws.eps[j, int(perm[b])].unsqueeze(0)

    return types.SimpleNamespace(perm=perm, rand=rand, randperm=randperm, noise=noise)


# ---------------------------------------------------------------------------------------------- shared set-up


def lora_pairs(trainer, peft_model, adapter: str = "default"):
    """``[(name, diffrl tensor, reference tensor)]`` of the trained (``default``) or the EMA adapter, in the order
    of diffrl's trained list."""
    ref_named = dict(peft_model.named_parameters())
    d_named = dict(trainer.model.transformer.named_parameters())
    d_adapter, r_adapter = {"default": ("default", "default"), "ema": (DIFFRL_EMA, REFERENCE_EMA)}[adapter]
    pairs = []
    for name in trainer.param_names:
        d_name = name.replace(".default.", f".{d_adapter}.")
        r_name = "base_model.model." + name.replace(".default.", f".{r_adapter}.")
        pairs.append((name, d_named[d_name], ref_named[r_name]))
    return pairs


def initialise_lora(trainer, peft_model, seed: int = 1234) -> list[str]:
    """The same random LoRA on both sides: A ~ N(0, 1/in), B ~ N(0, 0.05^2), the EMA adapter the trained one plus
    N(0, 0.02^2). Returns the reference-only trained tensors (the last block's context query)."""
    ref_named = dict(peft_model.named_parameters())
    d_named = dict(trainer.model.transformer.named_parameters())
    names = sorted(n.replace("base_model.model.", "") for n in ref_named if "lora_" in n and ".default." in n)
    with torch.no_grad():
        for name in names:
            g = torch.Generator().manual_seed(seed + sum(map(ord, name)) * 7919 + len(name))
            shape = ref_named["base_model.model." + name].shape
            scale = 1 / math.sqrt(shape[1]) if ".lora_A." in name else 0.05
            value = torch.randn(shape, generator=g) * scale
            ema_value = value + 0.02 * torch.randn(shape, generator=g)
            ref_named["base_model.model." + name].copy_(value)
            ref_named["base_model.model." + name.replace(".default.", f".{REFERENCE_EMA}.")].copy_(ema_value)
            if name in d_named:
                d_named[name].copy_(value)
                d_named[name.replace(".default.", f".{DIFFRL_EMA}.")].copy_(ema_value)
    return [n for n in names if n not in d_named]


def prompt_rows(trainer) -> list[str]:
    batch = trainer.step_batch(trainer.cfg.awm.prompts_per_step)
    prompts, _, _ = trainer.expand_groups(batch, trainer.cfg.awm.group_size)
    return prompts


@contextlib.contextmanager
def recording(trainer, seen: list, captured: dict):
    """During ``train_step``: the trained forward passes' inputs (grad-enabled ``velocity`` calls), the weights
    ``awm_weights`` returns, and the clipped gradients when the optimiser steps."""
    import diffrl.trainers.awm as awm_module

    model = trainer.model
    original_velocity, original_weights = model.velocity, awm_module.awm_weights

    def velocity(x, sigma, cond, guidance_scale=1.0, **kwargs):
        if torch.is_grad_enabled():
            seen.append((x.detach().clone(), torch.as_tensor(sigma).float().detach().clone()))
        return original_velocity(x, sigma, cond, guidance_scale, **kwargs)

    def awm_weights(*args, **kwargs):
        captured["weights"] = original_weights(*args, **kwargs)
        return captured["weights"]

    def grads(optimizer, args, kwargs):
        captured["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in trainer.params]

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    handle = optimizer.register_step_pre_hook(grads)
    model.velocity, awm_module.awm_weights = velocity, awm_weights
    try:
        yield
    finally:
        handle.remove()
        del model.velocity
        awm_module.awm_weights = original_weights


# ---------------------------------------------------------------------------------------------- comparisons


def inputs_gap(seen_r, seen_d, n: int, k: int, micro_batch: int, x0, eps) -> dict[str, float]:
    """The reference's trained passes (one per sample: its ``k`` levels stacked) and diffrl's (one per micro-batch
    and level), arranged as ``(sample, level)``: the largest differences of ``x_t``, of ``t`` and of the
    transformer's timestep ``1000 t``; and of the reference's ``x_t`` from ``x_t`` recomputed with diffrl's formula
    from diffrl's clean latents and noise at the reference's ``t`` (0: the inputs differ only through ``t``)."""
    xr, tr = [[None] * k for _ in range(n)], [[None] * k for _ in range(n)]
    for row, x, t in seen_r:
        for j in range(k):
            xr[row][j], tr[row][j] = x[j], t[j]
    xd, td = [[None] * k for _ in range(n)], [[None] * k for _ in range(n)]
    passes = iter(seen_d)
    for i in range(0, n, micro_batch):
        rows = list(range(i, min(n, i + micro_batch)))
        for j in range(k):
            x, t = next(passes)
            for r, row in enumerate(rows):
                xd[row][j], td[row][j] = x[r], t[r]
    pairs = [(i, j) for i in range(n) for j in range(k)]
    return {
        "x": max(float((xr[i][j] - xd[i][j]).abs().max()) for i, j in pairs),
        "x_scale": max(float(xd[i][j].abs().max()) for i, j in pairs),
        "t": max(float((tr[i][j] - td[i][j]).abs()) for i, j in pairs),
        "t1000": max(float((tr[i][j] * 1000 - td[i][j] * 1000).abs()) for i, j in pairs),
        "x_at_t_ref": max(
            float((xr[i][j] - ((1 - tr[i][j]) * x0[i] + tr[i][j] * eps[j, i])).abs().max()) for i, j in pairs
        ),
    }


def run_update(ref, run: Run, model_dir: Path, out: Path, overrides: dict, per_tensor: bool) -> bool:
    from diffrl.rewards import RewardOutput

    n = GROUP * PROMPTS_PER_STEP
    cfg = reference_config(ref, run, n)
    options = diffrl_options(cfg, ref)
    for key, value in overrides.items():  # the reference side only, after diffrl's options are taken
        set_value(cfg, key, value)
    K = cfg.train.train_timesteps
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(n, 4, SIZE // 4, SIZE // 4, generator=g)
    rewards = torch.randn(n, generator=g)

    trainer = build_diffrl(out, model_dir, options, stored_reward)
    trainer.step = run.step  # as in a resumed run, so that the EMA decay is not 0
    pipe, peft_model, trained, ema = build_reference_model(ref, model_dir, cfg.lora_type)
    extra = initialise_lora(trainer, peft_model)
    optimizer = reference_optimizer(cfg, trained)
    pairs = lora_pairs(trainer, peft_model)
    ema_pairs = lora_pairs(trainer, peft_model, "ema")
    before = {name: b.detach().clone() for name, _, b in pairs}
    ema_gap = max(rel(e, before[name])[1] for name, _, e in ema_pairs)
    ref_index = {id(p): i for i, p in enumerate(trained)}

    # diffrl
    prompts = prompt_rows(trainer)
    given, captured, seen_d = {}, {}, []
    trainer.sample_and_score = stored_rollouts(
        x0, RewardOutput(total=rewards, components={"stored": rewards}), given
    )
    draws = diffrl_draws(trainer, n, x0.shape[1:])
    start = time.perf_counter()
    with recording(trainer, seen_d, captured):
        metrics = trainer.train_step(trainer.step)
    diffrl_seconds = time.perf_counter() - start
    assert given["prompts"] == prompts

    # the reference
    start = time.perf_counter()
    advantages = reference_advantages(ref, cfg, prompts, rewards)
    samples = reference_samples(ref, cfg, pipe, prompts, x0.clone(), advantages)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    seen_r = []
    result = reference_update(
        ref,
        cfg,
        pipe,
        peft_model,
        optimizer,
        trained,
        ema,
        samples,
        feed_reference(draws, perm),
        run.step,
        seen_r,
    )
    reference_seconds = time.perf_counter() - start

    print(
        f"  {run.label} (step {run.step}; diffrl {diffrl_seconds:.1f} s, reference {reference_seconds:.1f} s)"
    )
    ok = True

    def line(text: str, good: bool | None = None) -> None:
        nonlocal ok
        mark = "" if good is None else ("  ok" if good else "  FAIL")
        if good is not None:
            ok &= good
        print(f"    {text}{mark}")

    # check 1: inputs, levels, weights
    gap = inputs_gap(seen_r, seen_d, n, K, DIFFRL_MICRO_BATCH, x0, draws.eps)
    line(
        f"1. trained passes: reference {len(seen_r)} (one per sample, its {K} levels stacked), diffrl {len(seen_d)} "
        f"(micro-batch {DIFFRL_MICRO_BATCH} x level); per (sample, level): max |x_t ref - x_t diffrl| {gap['x']:.1e} "
        f"(|x_t| up to {gap['x_scale']:.2f}), max |t_ref - t_diffrl| {gap['t']:.1e}, max |1000 t_ref - 1000 t_diffrl| "
        f"{gap['t1000']:.1e} (tolerance {INPUT_TOLERANCE:.0e} for x_t and t)",
        max(gap["x"], gap["t"]) <= INPUT_TOLERANCE,
    )
    line(
        f"   x_t of diffrl's formula, clean latents and noise at the reference's t against the reference's x_t: max "
        f"abs {gap['x_at_t_ref']:.1e} (the inputs differ only through t)",
        gap["x_at_t_ref"] == 0.0,
    )
    sched = samples["timesteps"][0] / 1000
    schedule_gap = float((sched - draws.sigmas[:-1]).abs().max())
    if draws.indices is not None:
        equal = all(torch.equal(result.indices[i], draws.indices[i]) for i in range(n))
        span = sorted({int(v) for v in draws.indices.flatten()})
        line(
            f"   level indices (the reference's draw vs diffrl's): equal for every sample: {equal}; drawn {span}; the "
            f"reference's t = scheduler.timesteps / 1000 vs diffrl's schedule: max abs {schedule_gap:.1e} (float32 "
            "1000 sigma / 1000)",
            equal,
        )
    w_ref = advantages[:, 0].clamp(-cfg.train.adv_clip_max, cfg.train.adv_clip_max)
    w_ref = w_ref / cfg.train.adv_clip_max * cfg.train.advantage_max
    clipped = int((advantages[:, 0].abs() > cfg.train.adv_clip_max).sum())
    dw = float((captured["weights"].double() - w_ref).abs().max())
    line(
        f"   advantage weights: max |w_ref - w_diffrl| {dw:.1e} (|w| up to {float(w_ref.abs().max()):.3f}; {clipped} of "
        f"{n} clipped at |A| = {cfg.train.adv_clip_max:g})",
        dw <= TOLERANCE * float(w_ref.abs().max()),
    )

    # check 2: one update
    print("    2. one update (per tensor max|a - b| / max|b|, the largest over the tensors):")
    grads = [
        (name, captured["grads"][i], result.grads[ref_index[id(r)]]) for i, (name, _, r) in enumerate(pairs)
    ]
    update = [(name, d.detach() - before[name], r.detach() - before[name]) for name, d, r in pairs]
    threshold = 1000 * cfg.train.adam_epsilon
    masks = [g_r.abs() >= threshold for _, _, g_r in grads]
    update_large = [
        (name, du[m], ru[m]) for (name, du, ru), m in zip(update, masks, strict=True) if bool(m.any())
    ]
    kept, elements = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
    for what, group, tolerance in (
        ("trained LoRA after the update", pairs, TOLERANCE),
        ("gradients (clipped)", grads, TOLERANCE),
        (f"update, elements |g| >= {threshold:.0e}", update_large, UPDATE_TOLERANCE),
        ("update, all elements", update, None),
    ):
        a, r, where = compare(group)
        line(
            f"   {what:<32} ({len(group)} tensors): max abs {a:.2e}  max rel {r:.2e} "
            + (f"(tolerance {tolerance:.0e}; " if tolerance else "(information; ")
            + f"worst {short(where)})",
            (r <= tolerance) if tolerance else None,
        )
    line(
        f"   ({kept} of {elements} gradient elements at |g| >= 1000 AdamW eps; below, AdamW's first step lr g / (|g| + "
        "eps), of slope lr eps / (|g| + eps)^2, turns the gradients' float32 gap into a visible part of a step)"
    )
    moved = max(rel(r.detach(), before[name])[0] / float(before[name].abs().max()) for name, _, r in pairs)
    line(f"   the update moved the trained tensors by up to {moved:.2e} of their largest value")
    norm_d, norm_r = metrics.get("train/grad_norm", float("nan")), result.norms[-1]
    line(
        f"   grad norm before clipping (max_grad_norm {cfg.train.max_grad_norm:g}): reference {norm_r:.8g}, diffrl "
        f"{norm_d:.8g} (rel {abs(norm_d - norm_r) / norm_r:.1e})",
        abs(norm_d - norm_r) <= TOLERANCE * norm_r,
    )
    losses = result.losses
    penalties_r = losses["loss"] - losses["policy_loss"]
    penalties_d = metrics["train/loss"] - metrics["train/policy_loss"]
    if cfg.train.off_policy:  # diffrl logs the clipped surrogate itself, and the ratio to the EMA adapter
        policy_rows = (
            (
                "surrogate max(-w r, -w clip(r))",
                losses["policy_loss"],
                metrics["train/policy_loss"],
                losses["abs_weights"],
            ),
            ("ratio r = exp(l_ema - l), mean", losses["ratio"], metrics["train/ratio_mean"], 1.0),
            ("clipped share |r - 1| > clip", losses["clip_frac"], metrics["train/clip_frac"], 1.0),
        )
    else:
        policy_rows = (
            (
                "mean(w l) (diffrl: policy_loss)",
                losses["weighted"],
                metrics["train/policy_loss"],
                losses["abs_weighted"],
            ),
        )
    for label, r_value, d_value, scale in (
        ("matching mean(l)", losses["matching"], metrics["train/matching"], losses["matching"]),
        *policy_rows,
        ("KL to the base", losses["kl_loss"], metrics["train/kl"], losses["kl_loss"]),
        ("KL to the EMA adapter", losses["ema_kl_loss"], metrics["train/ema_kl"], losses["ema_kl_loss"]),
        ("loss - policy loss (KL terms)", penalties_r, penalties_d, penalties_r),
    ):
        gap_v = abs(r_value - d_value) / max(abs(scale), 1e-30)
        note = {
            id(losses["abs_weighted"]): " of mean(|w| l)",
            id(losses["abs_weights"]): " of mean(|w|)",
        }.get(id(scale), "")
        line(
            f"   {label:<32} reference {r_value:.8g}, diffrl {d_value:.8g} (rel {gap_v:.1e}{note})",
            gap_v <= TOLERANCE,
        )
    if not cfg.train.off_policy:
        line(
            f"   (the reference's surrogate policy_loss {losses['policy_loss']:.8g} is -mean(w) = "
            f"{-float(w_ref.mean()):.8g} at ratio 1, by construction; diffrl logs mean(w l))"
        )
    if per_tensor:
        print("       per tensor (trained after the update / gradient, max abs / max rel):")
        for (name, d, r), (_, gd, gr) in zip(pairs, grads, strict=True):
            a1, r1 = rel(d, r)
            a2, r2 = rel(gd, gr)
            print(f"         {short(name):<34} {a1:.2e} / {r1:.2e}   {a2:.2e} / {r2:.2e}")

    # check 3: the EMA adapter
    a, r, where = compare(ema_pairs)
    decay_d = metrics["train/ema_decay"]
    line(
        f"3. EMA adapter after the soft update ({len(ema_pairs)} tensors; it differed from the trained one by up to "
        f"{ema_gap:.2e} rel before): max abs {a:.2e}  max rel {r:.2e} (worst {short(where)})",
        r <= TOLERANCE,
    )
    line(
        f"   EMA decay: reference min(kl_ema_decay, 0.001 global_step = {result.global_step}) = {result.decay:.6g}, "
        f"diffrl {decay_d:.6g}",
        abs(result.decay - decay_d) < 1e-12,
    )
    if extra:
        line(f"   reference-only LoRA tensors, not compared (the last block's context query): {len(extra)}")
    del trainer, pipe, peft_model
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference", type=Path, default=None, help="a clone of scxue/advantage_weighted_matching"
    )
    parser.add_argument("--per-tensor", action="store_true", help="print every LoRA tensor's differences")
    parser.add_argument(
        "--reference-override",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="change a reference config value on the reference side only (to see the check fail), "
        "e.g. train.ghuber_power=0.3",
    )
    parser.add_argument("--runs", default="", help="comma-separated run numbers (default: all)")
    args = parser.parse_args(argv)
    if args.reference is None:
        print(
            "parity_awm.py needs the reference code: --reference /path/to/a/clone/of/scxue/advantage_weighted_matching",
            file=sys.stderr,
        )
        return 2
    if not args.reference.exists():
        print(f"--reference {args.reference}: no such directory", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import peft

    quiet_libraries()
    torch.manual_seed(0)
    started = time.perf_counter()
    ref = load_reference(args.reference)
    commit = git_commit(ref.root)
    print(
        f"reference: {ref.code} (commit {commit or 'unknown: not a git checkout'}); its LoRA {ref.lora_kwargs} on the "
        f"attn modules; torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}"
    )
    overrides = dict(args.reference_override)
    if overrides:
        print(f"reference side changed (diffrl keeps the config's values): {overrides}")
    chosen = [int(x) for x in args.runs.split(",") if x.strip()] or list(range(1, len(RUNS) + 1))
    results = {}
    print("\n0. the shipped presets against the reference configurations they reproduce:")
    results[0] = check_presets(ref, Path(__file__).resolve().parents[1] / "configs")
    with tempfile.TemporaryDirectory(prefix="parity-awm-") as tmp:
        tmp = Path(tmp)
        from diffrl.models.tiny import build_tiny_sd3

        # two blocks, so that one is not the last, "context pre-only" block
        model_dir = build_tiny_sd3(tmp / "tiny-sd3-2-blocks", num_layers=2)
        print(
            f"one update on stored latents and rewards: {PROMPTS_PER_STEP} prompts x {GROUP} images, float32, CPU; "
            f"reference loop (train.batch_size 1) vs diffrl AWMTrainer.train_step"
        )
        for number in chosen:
            run = RUNS[number - 1]
            print(f"\nrun {number}:")
            results[number] = run_update(
                ref, run, model_dir, tmp / f"run-{number}", overrides, args.per_tensor
            )
    print(
        "\n"
        + "; ".join(
            f"{f'run {k}' if k else 'presets'}: {'pass' if v else 'FAIL'}" for k, v in results.items()
        )
        + f" ({time.perf_counter() - started:.0f} s)"
    )
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
