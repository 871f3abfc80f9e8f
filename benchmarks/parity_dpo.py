"""Parity of diffrl's online Diffusion-DPO update with the reference code (yifan123/flow_grpo) on a tiny SD3.

The reference trains inside one long ``main()`` (``scripts/train_sd3_dpo.py``, 977 lines at ac4c86e) that needs
CUDA, accelerate, wandb and a prompt dataset, so it cannot be imported and run as is. This script (run by hand, not
part of the test suite) runs ONE training update both ways, side by side, on the same tiny pipeline, prompts, final
latents, rewards, initial LoRA and random draws, in float32 on the CPU. It executes the reference's own functions
where they exist as functions and re-writes only what is inline in ``main()``:

* executed from the clone at run time: ``compute_text_embeddings`` and ``get_sigmas`` (taken out of
  ``scripts/train_sd3_dpo.py`` with ``ast`` and executed in a namespace, since the module imports absl, wandb and
  ml_collections at the top), ``encode_prompt`` (``flow_grpo/diffusers_patch/train_dreambooth_lora_sd3.py``),
  ``PerPromptStatTracker`` with ``type='dpo'`` (``flow_grpo/stat_tracking.py``: +1 for each prompt's best reward, -1
  for its worst), the run configuration ``pickscore_sd3()`` of ``config/dpo.py`` on ``config/base.py`` (a small
  attribute dict stands in for ``ml_collections.ConfigDict``, ``imp.load_source`` for ``imp``), the ``LoraConfig``
  arguments and the one ``target_modules`` list of ``main()`` (``main_lora_setup``; the script checks that ``main()``
  assigns ``target_modules`` once) and the adapter names of its two ``get_peft_model`` calls (``learner``, ``ref``);
* re-written here following ``scripts/train_sd3_dpo.py`` (line numbers of the ac4c86e clone):

  - model set-up: the float32 pipeline with frozen VAE, text encoders and transformer (347-355), the LoRA as
    ``get_peft_model(..., adapter_name="learner")`` then ``get_peft_model(..., adapter_name="ref")`` on the result
    (387-411: peft warns of the second call, silenced here; both adapters sit on the same LoRA layers), the trained
    list (every parameter named ``learner``, 414-418), AdamW with the config's learning rate, betas, weight decay and
    epsilon (442-448; no LR schedule), and ``FlowMatchEulerDiscreteScheduler.from_pretrained`` (535-537), whose
    training timesteps the level draw indexes;
  - after sampling: the CLIP token ids of length 256 (605-611) and the embeddings (598-604: T5 length 128; one prompt
    at a time as diffrl encodes them, since a batched call differs in the last bits), the rewards as a column
    (711-716), the stat tracker on the prompts decoded from the token ids (728-753), and the pairing (759-840): rows
    of non-zero advantage, grouped by ``np.unique`` of the token ids, the two rows of a group swapped when the first
    is the worst, the batch laid out ``[chosen of every pair, rejected of every pair]``;
  - the training epoch (846-974): per level ``j`` of ``num_train_timesteps = int(num_steps * timestep_fraction)``
    (320), ``noise = randn_like(latents)`` with the chosen half repeated for the rejected half (884-886), the level
    draw (890-898: ``u`` logit-normal, ``indices = (u * 1000).long()``, ``timesteps = noise_scheduler.timesteps
    [indices]``), ``get_sigmas`` (902), ``x_t = (1 - sigma) x0 + sigma noise`` (903), the ``learner`` pass and the
    ``ref`` pass under ``no_grad`` (904-923), the target ``noise - x0`` (924), the per-sample mean squared errors
    (926-927), ``inside_term = -0.5 beta ((m_w - r_w) - (m_l - r_l))`` and ``loss = mean(-logsigmoid(inside_term))``
    (928-939), the logged means (940-950), ``accelerator.backward`` (the loss over ``gradient_accumulation_steps *
    num_train_timesteps``, 332 and 952) and, when the accumulation syncs, ``clip_grad_norm_`` over
    ``transformer.parameters()`` and AdamW's step (the prepared optimiser's ``step`` and ``zero_grad`` act only then;
    953-958).

  One process without DDP (with one there is nothing to average), no mixed precision (the reference's default is
  fp16) and no EMA (``ema.step``, line 974, serves evaluation and checkpoints only).

The reference configuration is ``pickscore_sd3()`` shrunk to the tiny sizes: 32 px, ``sample.num_steps`` 4 (3 levels
per pair), 3 prompts x 4 images in one sampling batch, ``train.batch_size = sample.train_batch_size`` (its formula,
line 88). Two things of the reference are set aside, both printed: ``pickscore_sd3()`` sets
``train.gradient_accumulation_steps = sample.num_batches_per_epoch // 2 = 0`` (``config/dpo.py`` line 89), which
``main()`` divides by before any training (line 566, ``ZeroDivisionError``; accelerate's ``accumulate`` would divide
by it too), so it runs with 1, ``geneval_sd3()``'s value (``scripts/single_node/dpo.sh`` launches that config): one
update per epoch, diffrl's one update per step. And line 652 stores ``latents[-1]`` of the ``(batch, num_steps + 1,
...)`` stack of line 633, i.e. the last sample's trajectory (``num_steps + 1`` states), not the samples' final latents:
lines 760-768 then index those states by sample rows, so the reference trains its pairs on intermediate states of one
image. diffrl trains on each pair's final latents, as the code around it (and the SFT/GRPO scripts' ``latents[:,
-1]``) means; both sides here get the final latents (``latents[:, -1]``).

Draws fed to the reference, equal to diffrl's for the same step (diffrl's ``pair_draws``, called with the trainer's
own generators): the first half of ``randn_like`` is diffrl's noise ``eps[slot, j]`` of each pair (the second half,
discarded by line 886, is fresh noise). The levels are a documented deviation that is only a sampling choice
(docs/trainers/dpo.md, "Levels"): diffrl draws the continuous ``t = shift(sigmoid(n))``, ``n ~ N(0, 1)``, the
reference an index ``(u * 1000).long()``, ``u = sigmoid(n')``, into the scheduler's 1000 shifted training timesteps
(index 0 is sigma 1). Here the table the reference indexes (``noise_scheduler.timesteps`` and ``.sigmas`` at lines
898 and 902) holds diffrl's levels (``timesteps = sigmas * 1000`` in float32, as the scheduler computes its own) and
``u`` picks entry ``k`` for pair ``k``, so both sides' passes get bitwise the same ``x_t`` and timesteps. The printed
figure shows where the reference's own draw with ``u = sigmoid(-n)`` (the same law) lands: within 5e-4 to 2e-3 of
diffrl's level (``--reference-change discrete-levels`` trains the reference with it). The reference orders its pairs
by token ids, diffrl by the groups' first rows: pairs are matched by their stored latents, and each gets its slot's
draws.

diffrl runs its own ``DPOTrainer.train_step`` (online, ``best_worst``, ``logit_normal`` levels with the scheduler's
shift 3) with the options of the reference config (``dpo.beta``, ``dpo.num_train_timesteps``, ``optim.*``,
``model.lora_rank/alpha``, ``model.max_sequence_length=128``). The script patches, on the trainer object only:
``trainer.sample_and_score`` (returns the stored latents and rewards, records the prompts), ``trainer.model.velocity``
(records every pass's inputs), ``trainer.step`` (runs 2-3: other prompts and draws), a step pre-hook on its optimiser
(records the clipped gradients) and, in the resumed runs, its optimiser's state.

Both sides load the same pipeline, ``diffrl.models.tiny.build_tiny_sd3`` with two MMDiT blocks (T5 included), and the
same random trained LoRA, A ~ N(0, 1/in), B ~ N(0, 0.05^2), so that the trained and reference predictions differ and
the loss is not log 2. The reference's ``ref`` adapter keeps its ``init_lora_weights="gaussian"`` initialisation
(B = 0), as it stays with ``ref_update_step`` 1e7: it predicts bitwise as the LoRA-off model, diffrl's reference pass
(checked). diffrl leaves the last block's context-query projection out of the LoRA (its output is unused); the
reference's 2 trained tensors there are not compared. Rewards and latents: fixed random numbers. Runs (``RUNS``):

1. ``pickscore_sd3`` as configured: beta 100, ``max_grad_norm`` 1 (acting: norm 8.1), lr 3e-4, AdamW's first update;
   diffrl in micro-batches of 2 pairs;
2. beta 2000 (Flow-Factory's default), clipping acting (norm 106), AdamW resumed, diffrl's step 7, diffrl in one pass
   of the 3 pairs (the reference's batch shape);
3. beta 30, ``max_grad_norm`` 10 (not acting: norm 1.64), lr 1e-3, AdamW resumed, step 23, micro-batches of 1 pair.

"Resumed": both optimisers get the same state, as after 100 updates (``exp_avg`` ~ N(0, 1e-4^2), ``exp_avg_sq`` =
N(0, 1e-3^2)^2 + 1e-8): AdamW's first update is ``lr g / (|g| + eps)``, about ``lr sign(g)``, nearly blind to the
gradient's size; with the state the update is about linear in ``g``.

Check 0, before the runs: ``configs/sd35m_dpo_pickscore.yaml`` against ``pickscore_sd3()``: the options above
plus the run's sizes (``dpo.prompts_per_step`` for the preset's 8 processes), sampling (the ``ref`` adapter, not
updated within the run since ``ref_update_step`` is 1e7, and the SDE pipeline at ``sample.noise_level``),
evaluation, checkpoints, EMA and rewards, 39 values. It fails on any difference (the preset sampled the trained
policy with the ODE before ``dpo.rollout_policy`` and ``dpo.sampler`` existed; that is how it was found).

Checks per run:

1. every forward pass (trained and reference, per pair, level, chosen and rejected): max ``|x_t ref - x_t diffrl|``
   and ``|timestep ref - timestep diffrl|``, bitwise equality; chosen and rejected of a pair at one timestep; the
   levels (``get_sigmas`` against diffrl's); the ``ref`` adapter against the LoRA off;
2. the pairs (chosen, rejected) as rows of the stored samples, and diffrl's valid mask;
3. one update: per LoRA tensor ``max|a - b| / max|b|`` (the largest over the tensors) of the trained tensors after the
   update, of the clipped gradients and of the update (new - old); the gradient norm before clipping; the logged
   loss, reward margin (the reference's ``inside_term``, diffrl's ``train/reward_margin``), implicit accuracy and
   the four mean errors.

Tolerances: 1e-4 relative for the weights after the update, the gradients, the gradient norm and the logged values
(the margin relative to mean ``|z|``, since its mean can be near 0); 1e-3 for the update (new - old), which carries
the float32 rounding of the new weights. Both sides compute the same float32 formulas; what differs is the batch shape
of the passes (diffrl's micro-batches), which moves the velocities in the last bits, and ``z`` is ``beta / 2`` times a
difference of differences of errors near 2.3 that differ by about 1e-3. Measured: gradients up to 2.2e-5 (run 1,
micro-batches of 2), 1.3e-6 (run 2, one pass), 3.2e-6 (run 3); run 2 with micro-batches of 2 instead: 7.5e-5. In
run 1 (AdamW's first update) the weights and the update are checked over the elements whose reference gradient is at
least 1000 times AdamW's eps (14034 of 14336): below, the step's slope ``lr eps / (|g| + eps)^2`` turns the gradients'
float32 gap into a visible part of a step (one element with ``g`` 2.1e-8 against 3.0e-8 moves the weights by 2.2e-5,
1.6e-4 of the tensor's largest value; printed for information). Check 1: 1e-6 (measured: bitwise equal). The script
exits with status 1 when a check fails.

That the check can fail: ``--reference-override KEY=VALUE`` (or ``KEY*=FACTOR``) changes a reference configuration
value after diffrl's options are taken from it; ``--reference-change`` changes the reference side's pairing, noise or
levels. Tried once each:

* ``train.beta*=1.01``: every run fails: gradients 2.3e-3 / 8.1e-4 / 1.2e-2 (runs 1 / 2 / 3), gradient norm 1.2e-2 /
  1.0e-2 / 1.0e-2, loss 3.7e-3 / 8.8e-3 / 3.7e-4, margin 9.2e-3 / 5.7e-3 / 1.2e-3 of mean |z|, update 1.3e-3 / 1.1e-2
  (runs 2-3; run 1's first AdamW update, about ``lr sign(g)``, passes);
* ``reverse-pairs`` (the reference's tracker gets the negated rewards): every check of every run fails: the pairs,
  ``x_t`` (up to 3.7), gradients 3.3 / 3.6 / 2.9, weights 4.3e-3 / 4.2e-3 / 1.4e-2, the margin's sign, the accuracy;
* ``independent-noise`` (line 886's repeat skipped): ``x_t`` up to 4.4, gradients 1.1 / 1.6 / 1.5, weights 4.3e-3 /
  4.1e-3 / 1.4e-2, loss 0.19 / 1.8e-2 / 4.0e-2;
* ``discrete-levels`` (the reference's own 1000-step draw, the documented deviation): timesteps up to 0.48 / 0.65 / 2.1
  apart, ``x_t`` 2.5e-3 / 2.7e-3 / 9.7e-3, gradients 2.5e-2 / 0.17 / 8.6e-2, loss 2.1e-3 / 8.6e-3 / 2.7e-3: the
  discretisation changes one update at the percent level;
* ``train.max_grad_norm*=1.01``: runs 1-2 fail (clipped gradients 9.9e-3, run 2's update 8.2e-3); run 3, not
  clipped, passes;
* ``train.learning_rate*=1.01``: the update 1.0e-2 in every run.

Usage: ``python benchmarks/parity_dpo.py --reference /path/to/flow_grpo_clone [--per-tensor] [--runs 1,2]
[--reference-override train.beta*=1.01] [--reference-change reverse-pairs]`` (CPU, offline, about 9 s; set
``OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1``). Without ``--reference``, or with a folder that has no
``scripts/train_sd3_dpo.py``, it exits with status 2.
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
import warnings
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
PRESET = ROOT / "configs" / "tiny" / "dpo.yaml"
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
SIZE = 32  # pixels; 8x8 latents on the tiny pipeline
GROUP = 4
PROMPTS_PER_STEP = 3  # three pairs
NUM_STEPS = 4  # sample.num_steps: int(4 * timestep_fraction 0.99) = 3 levels per pair
SEED = 42
TOLERANCE = 1e-4
INPUT_TOLERANCE = 1e-6
ADAM_STEP = 100  # the resumed runs' AdamW step count before the update
UPDATE_TOLERANCE = 1e-3  # the update new - old carries the float32 rounding of the new weights
CHANGES = {
    "reverse-pairs": "the reference's stat tracker gets the negated rewards (its chosen and rejected swap)",
    "independent-noise": "the rejected half keeps its own noise (line 886's repeat of the chosen half skipped)",
    "discrete-levels": "the reference's own level draw on its 1000 training timesteps, u = sigmoid(-n) of "
    "diffrl's normal n (the documented discretisation)",
}


@dataclass
class Run:
    label: str
    # reference config values changed from pickscore_sd3
    changes: dict = field(default_factory=dict)
    # the same AdamW moments on both sides, as a resumed run has (else AdamW's first update)
    resumed: bool = False
    step: int = 0  # diffrl's step (its prompts and draws are keyed by it)
    data_seed: int = 7  # the stored latents and rewards
    micro_batch: int = 2  # diffrl's pairs per pass (memory only); the reference passes all pairs at once


RUNS = [
    Run("pickscore_sd3 as configured (beta 100, max_grad_norm 1), AdamW's first update"),
    Run(
        "beta 2000 (Flow-Factory's default), AdamW resumed at step 100",
        {"train.beta": 2000},
        resumed=True,
        step=7,
        data_seed=8,
        micro_batch=PROMPTS_PER_STEP,
    ),
    Run(
        "beta 30, max_grad_norm 10 (not clipped), lr 1e-3, AdamW resumed at step 100",
        {"train.beta": 30, "train.max_grad_norm": 10.0, "train.learning_rate": 1e-3},
        resumed=True,
        step=23,
        data_seed=9,
        micro_batch=1,
    ),
]


# ---------------------------------------------------------------------------------------------- the reference code


def main_of(script: Path) -> ast.FunctionDef:
    tree = ast.parse(script.read_text())
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")


def adapter_names(script: Path) -> list[str]:
    """The ``adapter_name`` of each ``get_peft_model`` call of ``main()``, in order (lines 410-411: ``learner``,
    ``ref``)."""
    names = []
    for node in ast.walk(main_of(script)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "get_peft_model":
            names += [ast.literal_eval(k.value) for k in node.keywords if k.arg == "adapter_name"]
    if len(names) != 2:
        raise SystemExit(
            f"expected two get_peft_model(..., adapter_name=...) calls in main() of {script}: {names}"
        )
    return names


def load_reference(root: Path) -> types.SimpleNamespace:
    """The reference's functions and configuration, executed from the clone at ``root``."""
    code = root.resolve()
    script = code / "scripts" / "train_sd3_dpo.py"
    sys.path.insert(0, str(code))
    from flow_grpo.diffusers_patch.train_dreambooth_lora_sd3 import encode_prompt
    from flow_grpo.stat_tracking import PerPromptStatTracker

    namespace = script_functions(
        script, {"compute_text_embeddings", "get_sigmas"}, {"torch": torch, "encode_prompt": encode_prompt}
    )
    # main() assigns target_modules once (main_lora_setup keeps the last assignment it walks: check there is one)
    assigned = [
        n
        for n in ast.walk(main_of(script))
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "target_modules" for t in n.targets)
    ]
    if len(assigned) != 1:
        raise SystemExit(
            f"main() of {script} assigns target_modules {len(assigned)} times; this script knows one"
        )
    targets, lora_kwargs, max_sequence_length = main_lora_setup(script)
    stub_missing_modules()
    config_module = load_module(code / "config" / "dpo.py", "reference_dpo_config")
    learner, ref_adapter = adapter_names(script)
    return types.SimpleNamespace(
        root=code,
        script=script,
        PerPromptStatTracker=PerPromptStatTracker,
        compute_text_embeddings=namespace["compute_text_embeddings"],
        get_sigmas=namespace["get_sigmas"],
        targets=targets,
        lora_kwargs=lora_kwargs,
        max_sequence_length=max_sequence_length,
        config_module=config_module,
        learner=learner,
        ref_adapter=ref_adapter,
    )


def set_value(cfg, key: str, value) -> None:
    """``cfg.<key> = value``; a key ending in ``*`` multiplies the value there by ``value``."""
    scale = key.endswith("*")
    *path, last = key.rstrip("*").split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, last, getattr(node, last) * value if scale else value)


def reference_config(ref, run: Run, n: int):
    """``pickscore_sd3()`` shrunk to the tiny sizes: one sampling batch of all ``n`` samples (``num_batches_per_epoch``
    1, as configured), ``train.batch_size = sample.train_batch_size`` (the config's formula, line 88), one update per
    epoch; then the run's changes."""
    cfg = ref.config_module.pickscore_sd3()
    cfg.mixed_precision = "no"
    cfg.resolution = SIZE
    cfg.sample.num_steps = NUM_STEPS
    cfg.sample.num_image_per_prompt = GROUP
    cfg.sample.train_batch_size = n
    cfg.train.batch_size = cfg.sample.train_batch_size
    # config/dpo.py line 89 sets num_batches_per_epoch // 2 = 0, which main() divides by (train_sd3_dpo.py line
    # 566) before any training: 1 is geneval_sd3's value (the launch script scripts/single_node/dpo.sh runs it)
    cfg.train.gradient_accumulation_steps = max(1, cfg.train.gradient_accumulation_steps)
    for key, value in run.changes.items():
        set_value(cfg, key, value)
    return cfg


def build_reference_model(ref, model_dir: Path, cfg):
    """The reference's model set-up (``main()`` lines 347-355, 387-418, 442-448, 535-537): float32 pipeline, the
    LoRA ``learner`` then ``ref`` through two ``get_peft_model`` calls, the trained list (every parameter named
    ``learner``), AdamW, the scheduler of the training levels. Returns ``(pipeline, transformer, trained,
    optimizer, noise_scheduler)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        part.requires_grad_(False)
    pipe.transformer.requires_grad_(not cfg.use_lora)
    lora = LoraConfig(target_modules=ref.targets, **ref.lora_kwargs)
    pipe.transformer = get_peft_model(pipe.transformer, lora, adapter_name=ref.learner)
    with (
        warnings.catch_warnings()
    ):  # peft warns of the second get_peft_model: two adapters on the same layers
        warnings.simplefilter("ignore", UserWarning)
        pipe.transformer = get_peft_model(pipe.transformer, lora, adapter_name=ref.ref_adapter)
    transformer = pipe.transformer
    trained = []
    for name, param in transformer.named_parameters():
        if ref.learner in name:
            assert param.requires_grad
            trained.append(param)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        trained,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    return pipe, transformer, trained, optimizer, noise_scheduler


def reference_samples(ref, pipe, prompts, x0, rewards):
    """What the reference keeps after sampling (``main()`` lines 598-611 and 652): the CLIP token ids (length 256),
    the embeddings (``compute_text_embeddings``, T5 length 128; one prompt at a time as diffrl encodes them, since a
    batched call differs in the last bits), the final latents and the rewards ``avg``. Line 652 keeps
    ``latents[-1]`` of the ``(batch, num_steps + 1, ...)`` stack (the last sample's trajectory, not the samples' final
    latents); here ``latents`` holds the final latents of every sample (``latents[:, -1]``), see the docstring."""
    prompt_ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=256, truncation=True, return_tensors="pt"
    ).input_ids
    parts = [
        ref.compute_text_embeddings(
            [p],
            [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
            [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
            max_sequence_length=ref.max_sequence_length,
            device=x0.device,
        )
        for p in prompts
    ]
    return {
        "prompt_ids": prompt_ids,
        "prompt_embeds": torch.cat([e for e, _ in parts]),
        "pooled_prompt_embeds": torch.cat([p for _, p in parts]),
        "latents": x0,
        "rewards": {"avg": rewards.float()},
    }


def reference_pairs(ref, cfg, pipe, samples):
    """``main()`` lines 711-716, 728-753 and 759-840: the rewards as a column,
    ``PerPromptStatTracker.update(..., type='dpo')``
    on the prompts decoded from the token ids (+1 the best, -1 the worst of each prompt, 0 the others), then the
    pairing: the rows of non-zero advantage grouped by token ids (``np.unique``), each group's two rows swapped when
    the first is the worst, and the batch laid out ``[chosen of every pair, rejected of every pair]`` (one process:
    the padding to a multiple of the process count, lines 803-814, adds nothing)."""
    samples = dict(samples)
    samples["rewards"] = dict(samples["rewards"])
    samples["rewards"]["ori_avg"] = samples["rewards"]["avg"]
    samples["rewards"]["avg"] = samples["rewards"]["avg"].unsqueeze(-1)
    gathered_rewards = {key: value.cpu().numpy() for key, value in samples["rewards"].items()}
    stat_tracker = ref.PerPromptStatTracker(cfg.sample.global_std)
    prompt_ids = samples["prompt_ids"].cpu().numpy()
    prompts = pipe.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    advantages = stat_tracker.update(prompts, gathered_rewards["avg"], type=cfg.train.algorithm)
    stat_tracker.clear()

    latents = samples["latents"].cpu().numpy()
    prompt_embeds = samples["prompt_embeds"].cpu().numpy()
    pooled_prompt_embeds = samples["pooled_prompt_embeds"].cpu().numpy()
    non_zero_indices = np.where(advantages != 0)[0]
    filtered_advantages = advantages[non_zero_indices]
    filtered_latents = latents[non_zero_indices]
    filtered_prompt_ids = prompt_ids[non_zero_indices]
    filtered_prompt_embeds = prompt_embeds[non_zero_indices]
    filtered_pooled_prompt_embeds = pooled_prompt_embeds[non_zero_indices]
    unique_prompt_ids = np.unique(filtered_prompt_ids, axis=0)
    concat = {"advantages": [], "latents": [], "prompt_embeds": [], "pooled_prompt_embeds": []}
    for prompt_id in unique_prompt_ids:
        matches = np.where(np.all(filtered_prompt_ids == prompt_id, axis=1))[0]
        concat["advantages"].append(filtered_advantages[matches])
        concat["latents"].append(filtered_latents[matches])
        concat["prompt_embeds"].append(filtered_prompt_embeds[matches])
        concat["pooled_prompt_embeds"].append(filtered_pooled_prompt_embeds[matches])
    concat = {k: torch.as_tensor(np.stack(v, axis=0)) for k, v in concat.items()}
    # lines 816-819 with one process: reshape(1, -1, ...)[0]
    advantages = concat["advantages"].squeeze(-1)
    latents = concat["latents"]
    for i in range(advantages.shape[0]):
        if advantages[i, 0] == -1:
            temp = latents[i, 0].clone()
            latents[i, 0] = latents[i, 1].clone()
            latents[i, 1] = temp
    latents = latents.permute(1, 0, 2, 3, 4)
    prompt_embeds = concat["prompt_embeds"].permute(1, 0, 2, 3)
    pooled_prompt_embeds = concat["pooled_prompt_embeds"].permute(1, 0, 2)
    return {
        "latents": latents.reshape(-1, *latents.shape[2:]),
        "prompt_embeds": prompt_embeds.reshape(-1, *prompt_embeds.shape[2:]),
        "pooled_prompt_embeds": pooled_prompt_embeds.reshape(-1, *pooled_prompt_embeds.shape[2:]),
    }


def fed_scheduler(noise_scheduler, levels: torch.Tensor) -> types.SimpleNamespace:
    """The table the reference's level draw indexes (``noise_scheduler.timesteps[indices]``, line 898, and
    ``get_sigmas``' lookup) holding diffrl's levels: ``sigmas`` = ``t``, ``timesteps`` = ``sigmas *
    num_train_timesteps`` in float32, as the scheduler computes its own."""
    levels = levels.float()
    return types.SimpleNamespace(
        config=noise_scheduler.config,
        sigmas=torch.cat([levels, torch.zeros(1)]),
        timesteps=levels * noise_scheduler.config.num_train_timesteps,
    )


def reference_update(ref, cfg, pipe, transformer, optimizer, noise_scheduler, samples, draws, seen, change):
    """One epoch of the reference training loop (``main()`` lines 846-974) in its order of operations, the random
    draws fed in. Returns a namespace: the gradient norm, the clipped gradients, the logged means (``info``)."""
    from torch.nn import functional as F

    accelerator = types.SimpleNamespace(device=torch.device("cpu"))
    num_train_timesteps = int(cfg.sample.num_steps * cfg.train.timestep_fraction)  # line 320
    gradient_accumulation_steps = cfg.train.gradient_accumulation_steps * num_train_timesteps  # line 332
    total_batch_size = len(samples["latents"])
    out = types.SimpleNamespace(norm=None, grads=None, info=None, levels=[])
    pipe.transformer.set_adapter(ref.learner)  # line 846
    samples_batched = {
        k: v.reshape(-1, total_batch_size // cfg.sample.num_batches_per_epoch, *v.shape[1:])
        for k, v in samples.items()
    }
    samples_batched = [
        dict(zip(samples_batched, x, strict=True)) for x in zip(*samples_batched.values(), strict=True)
    ]
    pipe.transformer.train()
    info = {
        k: []
        for k in (
            "loss",
            "model_w_err",
            "model_l_err",
            "ref_w_err",
            "ref_l_err",
            "inside_term",
            "abs_inside_term",
            "implicit_acc",
        )
    }
    backwards = 0
    for i, sample in enumerate(samples_batched):
        embeds = sample["prompt_embeds"]
        pooled_embeds = sample["pooled_prompt_embeds"]
        for j in range(num_train_timesteps):
            model_input = sample["latents"]
            bsz = model_input.shape[0] // 2
            noise = draws.noise(i, j, model_input)  # torch.randn_like(model_input), line 884
            if change != "independent-noise":
                noise = torch.cat([noise[:bsz], noise[:bsz]], dim=0)  # line 886
            # lines 890-898: u logit-normal, its index into the scheduler's timesteps
            u, scheduler = draws.level(i, j, bsz, noise_scheduler)
            indices = (u * scheduler.config.num_train_timesteps).long()
            timesteps = scheduler.timesteps[indices]
            timesteps = torch.cat([timesteps, timesteps], dim=0)
            sigmas = ref.get_sigmas(
                scheduler, timesteps, accelerator, n_dim=model_input.ndim, dtype=model_input.dtype
            )
            out.levels.append(sigmas.flatten()[:bsz].clone())
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            pipe.transformer.set_adapter(ref.learner)
            seen.append(("trained", noisy_model_input.detach().clone(), timesteps.clone()))
            model_pred = transformer(
                hidden_states=noisy_model_input,
                timestep=timesteps,
                encoder_hidden_states=embeds,
                pooled_projections=pooled_embeds,
                return_dict=False,
            )[0]
            with torch.no_grad():
                pipe.transformer.set_adapter(ref.ref_adapter)
                seen.append(("reference", noisy_model_input.detach().clone(), timesteps.clone()))
                model_pred_ref = transformer(
                    hidden_states=noisy_model_input,
                    timestep=timesteps,
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled_embeds,
                    return_dict=False,
                )[0]
                model_pred_ref = model_pred_ref.detach()
                pipe.transformer.set_adapter(ref.learner)
            target = noise - model_input
            # lines 926-939
            theta_mse = ((model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
            ref_mse = (
                ((model_pred_ref.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
            )
            model_w_err, model_l_err = theta_mse[:bsz], theta_mse[bsz:]
            ref_w_err, ref_l_err = ref_mse[:bsz], ref_mse[bsz:]
            w_diff = model_w_err - ref_w_err
            l_diff = model_l_err - ref_l_err
            w_l_diff = w_diff - l_diff
            inside_term = -0.5 * cfg.train.beta * w_l_diff
            loss = -F.logsigmoid(inside_term)
            loss = torch.mean(loss)
            for key, value in (
                ("loss", loss),
                ("model_w_err", torch.mean(model_w_err)),
                ("model_l_err", torch.mean(model_l_err)),
                ("ref_w_err", torch.mean(ref_w_err)),
                ("ref_l_err", torch.mean(ref_l_err)),
                ("inside_term", torch.mean(inside_term)),
                (
                    "abs_inside_term",
                    torch.mean(inside_term.abs()),
                ),  # for the figures: the scale of the margins
                ("implicit_acc", (inside_term > 0).sum().float() / inside_term.size(0)),
            ):
                info[key].append(float(value.detach()))
            # accelerator.backward divides by gradient_accumulation_steps; the prepared optimiser's step and
            # zero_grad act only when the accumulation syncs (lines 952-958)
            (loss / gradient_accumulation_steps).backward()
            backwards += 1
            if backwards % gradient_accumulation_steps == 0:
                out.norm = float(
                    torch.nn.utils.clip_grad_norm_(transformer.parameters(), cfg.train.max_grad_norm)
                )
                out.grads = {
                    id(p): p.grad.detach().clone() for p in transformer.parameters() if p.grad is not None
                }
                optimizer.step()
                optimizer.zero_grad()
    if backwards % gradient_accumulation_steps != 0 or out.grads is None:
        raise SystemExit("the reference's accumulation did not end on an update")
    out.info = {k: float(np.mean(v)) for k, v in info.items()}
    return out


# ---------------------------------------------------------------------------------------------- diffrl


def diffrl_options(cfg, ref, shift: float) -> list[str]:
    """diffrl's options for a reference configuration."""
    t = cfg.train
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
        "dpo.mode=online",
        f"dpo.beta={float(t.beta)}",
        f"dpo.num_train_timesteps={int(cfg.sample.num_steps * t.timestep_fraction)}",
        "dpo.timesteps=logit_normal",  # compute_density_for_timestep_sampling('logit_normal', 0, 1), line 890
        f"dpo.time_shift={shift}",  # the noise scheduler's shift, through its timesteps
        "dpo.pairs=best_worst",
        "dpo.online_every=1",
        "dpo.min_margin=0.0",
        f"dpo.group_size={cfg.sample.num_image_per_prompt}",
    ]


REFERENCE_PRESET = "sd35m_dpo_pickscore.yaml"
PRESET_GPUS = 8  # the preset's process count for prompts_per_step (its header: verify for your launch)
SD35_SHIFT = 3.0  # stabilityai/stable-diffusion-3.5-medium's scheduler shift (not in the reference clone)


def preset_expectations(cfg, ref) -> dict[str, object]:
    """What ``configs/sd35m_dpo_pickscore.yaml`` must hold for ``pickscore_sd3()``: :func:`diffrl_options` and the
    run's sizes, sampling (the reference adapter, never updated within the preset's steps, and the SDE pipeline),
    evaluation, checkpoints, EMA and rewards (the values the preset's lines cite)."""
    s, t = cfg.sample, cfg.train
    expected = {}
    for option in diffrl_options(cfg, ref, SD35_SHIFT):
        key, _, value = option.partition("=")
        expected[key] = ast.literal_eval(value) if value[:1] in "0123456789-." else value
    expected.update(
        {
            "seed": cfg.seed,
            "checkpointing_steps": cfg.save_freq,
            "checkpoints_total_limit": cfg.num_checkpoint_limit,
            "eval_every": cfg.eval_freq,
            "mixed_precision": cfg.mixed_precision,
            "ema_decay": 0.9
            if t.ema
            else 0.0,  # train_sd3_dpo.py: EMAModuleWrapper(decay=0.9, update_step_interval=8)
            "ema_every": 8,
            "model.lora_init": ref.lora_kwargs.get("init_lora_weights"),
            "sample.height": cfg.resolution,
            "sample.width": cfg.resolution,
            "sample.eval_num_steps": s.eval_num_steps,
            "sample.eval_guidance_scale": s.guidance_scale,
            "dpo.prompts_per_step": PRESET_GPUS
            * s.train_batch_size
            * s.num_batches_per_epoch
            // s.num_image_per_prompt,
            # sampling with the "ref" adapter (line 618)
            "dpo.rollout_policy": "reference",
            # copy_learner_to_ref every ref_update_step updates (line 614): never within the preset's 2000 steps
            "dpo.ref_update_every": 0 if t.ref_update_step > 2000 else t.ref_update_step,
            "dpo.sampler": "sde"
            if s.noise_level > 0
            else "ode",  # pipeline_with_logprob(..., noise_level=...)
            "dpo.noise_level": s.noise_level,
            "reward": dict(cfg.reward_fn),
            "eval_reward": dict(cfg.reward_fn),
        }
    )
    return expected


def check_preset(ref, presets_dir: Path) -> bool:
    """``configs/sd35m_dpo_pickscore.yaml`` against ``config/dpo.py:pickscore_sd3`` (check 0)."""
    from diffrl.config import load_config

    cfg = ref.config_module.pickscore_sd3()
    preset = load_config(presets_dir / REFERENCE_PRESET)
    expected = preset_expectations(cfg, ref)
    wrong = preset_differences(preset, expected)
    print(
        f"  configs/{REFERENCE_PRESET} vs dpo.py:pickscore_sd3: {len(expected)} values, "
        + ("all equal  ok" if not wrong else "DIFFER: " + "; ".join(wrong))
    )
    return not wrong


def build_diffrl(out: Path, model_dir: Path, extra: list[str], micro_batch: int):
    from diffrl.train import build_trainer

    overrides = [
        f"output_dir={out}",
        f"model.path={model_dir}",
        f"sample.height={SIZE}",
        f"sample.width={SIZE}",
        "sample.batch_size=12",
        f"optim.train_batch_size={micro_batch}",
        f"dpo.prompts_per_step={PROMPTS_PER_STEP}",
        "data.eval_size=0",
        "mixed_precision=no",
        "ema_decay=0",
        "max_steps=100000",
        f"seed={SEED}",
        *extra,
    ]
    return build_trainer(str(PRESET), overrides, reward=stored_reward, train_prompts=PROMPTS, eval_prompts=[])


def diffrl_draws(trainer, p: int, latent_shape) -> types.SimpleNamespace:
    """diffrl's draws for its ``p`` pair slots at ``trainer.step``: ``pair_draws``' levels ``(p, K)`` and noise ``(p, K,
    ...)``, and the standard normals ``n`` the levels come from (recomputed with the trainer's generators)."""
    from diffrl.trainers.dpo import _PAIR_KEY, dpo_levels

    d = trainer.cfg.dpo
    levels, noise = trainer.pair_draws(p, latent_shape)
    normals = torch.stack(
        [
            torch.randn(d.num_train_timesteps, generator=g)
            for g in trainer.row_generators(_PAIR_KEY, range(p), 0)
        ]
    )
    assert torch.equal(dpo_levels(normals, d.timesteps, d.time_shift), levels), (
        "the recomputed normals are not diffrl's"
    )
    return types.SimpleNamespace(levels=levels, noise=noise, normals=normals)


def feed_reference(draws, slot_of: list[int], change: str | None) -> types.SimpleNamespace:
    """The reference's ``torch.randn_like`` and level draw for its pair ``k`` (diffrl's slot ``slot_of[k]``) at level
    ``j``: the noise of the chosen half is diffrl's ``eps[slot, j]`` (the rejected half, discarded by line 886, is
    fresh noise); the level table holds diffrl's levels and ``u`` picks entry ``k`` for pair ``k``. With the change
    ``discrete-levels`` the reference draws on its own scheduler with ``u = sigmoid(-n)``."""
    g = torch.Generator().manual_seed(SEED + 1)

    def noise(i: int, j: int, like: torch.Tensor) -> torch.Tensor:
        chosen = torch.stack([draws.noise[s, j] for s in slot_of])
        return torch.cat([chosen, torch.randn(chosen.shape, generator=g)])

    def level(i: int, j: int, bsz: int, noise_scheduler):
        if change == "discrete-levels":
            return torch.sigmoid(-torch.stack([draws.normals[s, j] for s in slot_of])), noise_scheduler
        table = fed_scheduler(noise_scheduler, torch.stack([draws.levels[s, j] for s in slot_of]))
        return (torch.arange(bsz) + 0.5) / noise_scheduler.config.num_train_timesteps, table

    return types.SimpleNamespace(noise=noise, level=level)


# ---------------------------------------------------------------------------------------------- shared set-up


def lora_pairs(trainer, transformer, learner: str):
    """``[(name, diffrl tensor, reference tensor)]`` of the trained adapter, in the order of diffrl's trained list."""
    ref_named = dict(transformer.named_parameters())
    d_named = dict(trainer.model.transformer.named_parameters())
    by_suffix = {}
    for name in ref_named:
        if f".{learner}." in name:
            by_suffix[name.split("transformer_blocks.", 1)[1]] = name
    pairs = []
    for name in trainer.param_names:
        suffix = name.replace(".default.", f".{learner}.").split("transformer_blocks.", 1)[1]
        pairs.append((name, d_named[name], ref_named[by_suffix[suffix]]))
    return pairs


def initialise_lora(trainer, transformer, learner: str, seed: int = 1234) -> list[str]:
    """The same random trained LoRA on both sides: A ~ N(0, 1/in), B ~ N(0, 0.05^2); the reference's ``ref`` adapter
    keeps its initialisation (``init_lora_weights="gaussian"``: B = 0, the base model, as it stays with
    ``ref_update_step`` 1e7). Returns the reference-only trained tensors (the last block's context query)."""
    ref_named = dict(transformer.named_parameters())
    d_named = dict(trainer.model.transformer.named_parameters())
    names = sorted(n for n in ref_named if f".{learner}." in n and "lora_" in n)
    extra = []
    with torch.no_grad():
        for name in names:
            short_name = "transformer_blocks." + name.split("transformer_blocks.", 1)[1]
            d_name = short_name.replace(f".{learner}.", ".default.")
            g = torch.Generator().manual_seed(seed + sum(map(ord, d_name)) * 7919 + len(d_name))
            shape = ref_named[name].shape
            scale = 1 / math.sqrt(shape[1]) if ".lora_A." in name else 0.05
            value = torch.randn(shape, generator=g) * scale
            ref_named[name].copy_(value)
            if d_name in d_named:
                d_named[d_name].copy_(value)
            else:
                extra.append(d_name)
    return extra


def resume_adam(trainer, optimizer, pairs, step: int = ADAM_STEP) -> None:
    """The same AdamW state on both sides, as after ``step`` updates: ``exp_avg`` ~ N(0, 1e-4^2), ``exp_avg_sq`` =
    (N(0, 1e-3^2))^2 + 1e-8 per element (the reference-only tensors start fresh, as AdamW does lazily)."""
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for name, d, r in pairs:
        g = torch.Generator().manual_seed(ADAM_STEP + sum(map(ord, name)) * 7919 + len(name))
        m = 1e-4 * torch.randn(d.shape, generator=g)
        v = (1e-3 * torch.randn(d.shape, generator=g)) ** 2 + 1e-8
        for opt, p in ((inner, d), (optimizer, r)):
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}


@contextlib.contextmanager
def recording(trainer, seen: list, captured: dict):
    """During ``train_step``: every ``velocity`` call's inputs (trained: grad enabled; reference: no grad) and the
    clipped gradients when the optimiser steps."""
    model = trainer.model
    original_velocity = model.velocity

    def velocity(x, sigma, cond, guidance_scale=1.0, **kwargs):
        kind = "trained" if torch.is_grad_enabled() else "reference"
        seen.append((kind, x.detach().clone(), torch.as_tensor(sigma).float().detach().clone() * 1000))
        return original_velocity(x, sigma, cond, guidance_scale, **kwargs)

    def grads(optimizer, args, kwargs):
        captured["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in trainer.params]

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    handle = optimizer.register_step_pre_hook(grads)
    model.velocity = velocity
    try:
        yield
    finally:
        handle.remove()
        del model.velocity


# ---------------------------------------------------------------------------------------------- comparisons


def row_of(latent: torch.Tensor, x0: torch.Tensor) -> int:
    """The row of ``x0`` equal to ``latent`` bitwise."""
    rows = [i for i in range(len(x0)) if torch.equal(x0[i], latent)]
    if len(rows) != 1:
        raise SystemExit(f"a pair latent matches {len(rows)} stored rows")
    return rows[0]


def diffrl_inputs(seen_d, p: int, k: int, micro_batch: int):
    """diffrl's passes (per micro-batch and level: trained, then reference; rows chosen then rejected) as
    ``{(kind, slot, level, side): (x_t, timestep)}``."""
    out = {}
    passes = iter(seen_d)
    for i in range(0, p, micro_batch):
        mb = list(range(i, min(p, i + micro_batch)))
        for j in range(k):
            for _ in range(2):
                kind, x, t = next(passes)
                for r, slot in enumerate(mb):
                    out[(kind, slot, j, "chosen")] = (x[r], t[r])
                    out[(kind, slot, j, "rejected")] = (x[len(mb) + r], t[len(mb) + r])
    return out


def reference_inputs(seen_r, slot_of: list[int]):
    """The reference's passes (per level: trained, then reference; rows ``[chosen pairs, rejected pairs]``) as
    ``{(kind, slot, level, side): (x_t, timestep)}``."""
    out = {}
    P = len(slot_of)
    for n, (kind, x, t) in enumerate(seen_r):
        j = n // 2
        for k, slot in enumerate(slot_of):
            out[(kind, slot, j, "chosen")] = (x[k], t[k])
            out[(kind, slot, j, "rejected")] = (x[P + k], t[P + k])
    return out


def run_update(ref, run: Run, model_dir: Path, out: Path, overrides: dict, change, per_tensor: bool) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffrl.rewards import RewardOutput

    n = GROUP * PROMPTS_PER_STEP
    p = PROMPTS_PER_STEP
    cfg = reference_config(ref, run, n)
    shift = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler").config.shift
    options = diffrl_options(cfg, ref, shift)
    for key, value in overrides.items():  # the reference side only, after diffrl's options are taken
        set_value(cfg, key, value)
    K = int(cfg.sample.num_steps * cfg.train.timestep_fraction)
    g = torch.Generator().manual_seed(run.data_seed)
    x0 = torch.randn(n, 4, SIZE // 4, SIZE // 4, generator=g)
    rewards = torch.randn(n, generator=g)

    trainer = build_diffrl(out, model_dir, options, run.micro_batch)
    trainer.step = run.step  # as in a resumed run: other prompts and draws
    pipe, transformer, trained, optimizer, noise_scheduler = build_reference_model(ref, model_dir, cfg)
    extra = initialise_lora(trainer, transformer, ref.learner)
    pairs = lora_pairs(trainer, transformer, ref.learner)
    before = {name: b.detach().clone() for name, _, b in pairs}
    if run.resumed:
        resume_adam(trainer, optimizer, pairs)

    # diffrl
    given, captured, seen_d = {}, {}, []
    trainer.sample_and_score = stored_rollouts(
        x0, RewardOutput(total=rewards, components={"stored": rewards}), given
    )
    draws = diffrl_draws(trainer, p, x0.shape[1:])
    start = time.perf_counter()
    with recording(trainer, seen_d, captured):
        metrics = trainer.train_step(trainer.step)
    diffrl_seconds = time.perf_counter() - start
    prompts = given["prompts"]
    _, x_w, x_l, valid, _ = trainer.buffer
    d_pairs = [(row_of(x_w[s], x0), row_of(x_l[s], x0)) for s in range(p)]

    # the reference
    start = time.perf_counter()
    signed = -rewards if change == "reverse-pairs" else rewards
    samples = reference_pairs(ref, cfg, pipe, reference_samples(ref, pipe, prompts, x0.clone(), signed))
    r_pairs = [(row_of(samples["latents"][k], x0), row_of(samples["latents"][p + k], x0)) for k in range(p)]
    chosen_slot = {c: s for s, (c, _) in enumerate(d_pairs)}
    slot_of = [chosen_slot.get(c, k) for k, (c, _) in enumerate(r_pairs)]
    if sorted(slot_of) != list(range(p)):  # reversed pairs: match them by their rejected row
        rejected_slot = {r: s for s, (_, r) in enumerate(d_pairs)}
        slot_of = [rejected_slot.get(c, k) for k, (c, _) in enumerate(r_pairs)]
    seen_r = []
    result = reference_update(
        ref,
        cfg,
        pipe,
        transformer,
        optimizer,
        noise_scheduler,
        samples,
        feed_reference(draws, slot_of, change),
        seen_r,
        change,
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

    # check 1: the forward passes' inputs
    ins_d = diffrl_inputs(seen_d, p, K, run.micro_batch)
    ins_r = reference_inputs(seen_r, slot_of)
    keys = sorted(ins_d)
    if set(ins_r) != set(keys):
        line("1. the two sides' forward passes do not cover the same (pass, pair, level, side)", False)
    else:
        dx = max(float((ins_r[key][0] - ins_d[key][0]).abs().max()) for key in keys)
        dt = max(float((ins_r[key][1] - ins_d[key][1]).abs()) for key in keys)
        bitwise = all(
            torch.equal(ins_r[key][0], ins_d[key][0]) and torch.equal(ins_r[key][1], ins_d[key][1])
            for key in keys
        )
        same_t = all(
            torch.equal(ins_r[(kind, s, j, "chosen")][1], ins_r[(kind, s, j, "rejected")][1])
            for kind, s, j, side in keys
        )
        line(
            f"1. forward passes: reference {len(seen_r)} (per level: trained, ref adapter; all {2 * p} rows), diffrl "
            f"{len(seen_d)} (per micro-batch of {run.micro_batch} pairs and level: trained, adapter off); per "
            f"(pass, pair, level, chosen/rejected): max |x_t ref - x_t diffrl| {dx:.1e}, max |timestep ref - "
            f"timestep diffrl| {dt:.1e}; bitwise equal: {bitwise} (tolerance {INPUT_TOLERANCE:.0e})",
            max(dx, dt / 1000) <= INPUT_TOLERANCE,
        )
        line(f"   the reference's chosen and rejected of a pair at one timestep: {same_t}", same_t)
    levels_r = torch.stack(result.levels, dim=1)  # (pair k, level)
    levels_d = torch.stack([draws.levels[s] for s in slot_of])
    grid = torch.sigmoid(-torch.stack([draws.normals[s] for s in slot_of]))
    grid_levels = noise_scheduler.sigmas[(grid * noise_scheduler.config.num_train_timesteps).long()]
    line(
        f"   levels: reference (get_sigmas) vs diffrl max abs {float((levels_r - levels_d).abs().max()):.1e}; drawn "
        f"{', '.join(f'{v:.3f}' for v in levels_d.flatten().tolist())}; the reference's own draw with u = sigmoid(-n) "
        f"on its 1000 training timesteps (shift {shift:g}) lands within "
        f"{float((grid_levels - levels_d).abs().max()):.1e} of them (the documented discretisation)"
    )

    with torch.no_grad():
        _, x_last, t_last = seen_r[-1]
        kwargs = {
            "hidden_states": x_last,
            "timestep": t_last,
            "encoder_hidden_states": samples["prompt_embeds"],
            "pooled_projections": samples["pooled_prompt_embeds"],
            "return_dict": False,
        }
        pipe.transformer.set_adapter(ref.ref_adapter)
        with_ref = transformer(**kwargs)[0]
        with transformer.disable_adapter():
            lora_off = transformer(**kwargs)[0]
        pipe.transformer.set_adapter(ref.learner)
    line(
        f"   the reference's {ref.ref_adapter!r} adapter (its initialisation, B = 0) against its LoRA off: max abs "
        f"{float((with_ref - lora_off).abs().max()):.1e} (diffrl's reference pass is the LoRA off)",
        torch.equal(with_ref, lora_off),
    )

    # check 2: pairs
    same_pairs = sorted(d_pairs) == sorted(r_pairs)
    line(
        f"2. pairs (chosen, rejected) as stored rows: diffrl {d_pairs} (valid {valid.tolist()}), reference "
        f"{[r_pairs[slot_of.index(s)] for s in range(p)]} (its order by token ids: slots {slot_of})",
        same_pairs,
    )

    # check 3: one update
    print("    3. one update (per LoRA tensor max|a - b| / max|b|, the largest over the tensors):")
    grads = [(name, captured["grads"][i], result.grads[id(r)]) for i, (name, _, r) in enumerate(pairs)]
    update = [(name, d.detach() - before[name], r.detach() - before[name]) for name, d, r in pairs]
    threshold = 1000 * cfg.train.adam_epsilon
    masks = [g_r.abs() >= threshold for _, _, g_r in grads]

    def large(group):
        return [(name, a[m], b[m]) for (name, a, b), m in zip(group, masks, strict=True) if bool(m.any())]

    kept, elements = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
    checks = (
        [
            ("trained LoRA after the update", pairs, TOLERANCE),
            ("gradients (clipped)", grads, TOLERANCE),
            ("update (new - old)", update, UPDATE_TOLERANCE),
        ]
        if run.resumed
        else [
            (f"trained LoRA after, |g| >= {threshold:.0e}", large(pairs), TOLERANCE),
            ("trained LoRA after, all elements", pairs, None),
            ("gradients (clipped)", grads, TOLERANCE),
            (f"update, elements |g| >= {threshold:.0e}", large(update), UPDATE_TOLERANCE),
            ("update, all elements", update, None),
        ]
    )
    for what, group, tolerance in checks:
        a, r, where = compare(group)
        line(
            f"   {what:<36} ({len(group)} tensors): max abs {a:.2e}  max rel {r:.2e} "
            + (f"(tolerance {tolerance:.0e}; " if tolerance else "(information; ")
            + f"worst {short(where)})",
            (r <= tolerance) if tolerance else None,
        )
    if not run.resumed:
        line(
            f"   (AdamW's first update; {kept} of {elements} gradient elements at |g| >= 1000 eps; below, its "
            "step lr g / (|g| + eps), of slope lr eps / (|g| + eps)^2, turns the gradients' float32 gap into a "
            "visible part of a step)"
        )
    moved = max(rel(r.detach(), before[name])[0] / float(before[name].abs().max()) for name, _, r in pairs)
    line(f"   the update moved the trained tensors by up to {moved:.2e} of their largest value")
    norm_d, norm_r = metrics.get("train/grad_norm", float("nan")), result.norm
    clipped = norm_r > cfg.train.max_grad_norm
    line(
        f"   grad norm before clipping (max_grad_norm {cfg.train.max_grad_norm:g}: "
        f"{'clipped' if clipped else 'not clipped'}): reference {norm_r:.8g}, diffrl {norm_d:.8g} "
        f"(rel {abs(norm_d - norm_r) / norm_r:.1e})",
        abs(norm_d - norm_r) <= TOLERANCE * norm_r,
    )
    info = result.info
    for label, r_key, d_key in (
        ("loss", "loss", "train/loss"),
        ("reward margin (inside_term)", "inside_term", "train/reward_margin"),
        ("implicit accuracy", "implicit_acc", "train/implicit_acc"),
        ("model error chosen", "model_w_err", "train/model_err_chosen"),
        ("model error rejected", "model_l_err", "train/model_err_rejected"),
        ("ref error chosen", "ref_w_err", "train/ref_err_chosen"),
        ("ref error rejected", "ref_l_err", "train/ref_err_rejected"),
    ):
        r_value, d_value = info[r_key], metrics[d_key]
        scale = info["abs_inside_term"] if r_key == "inside_term" else abs(r_value)
        gap = abs(r_value - d_value) / max(scale, 1e-30)
        note = " of mean |z|" if r_key == "inside_term" else ""
        line(
            f"   {label:<28} reference {r_value:.8g}, diffrl {d_value:.8g} (rel {gap:.1e}{note})",
            gap <= TOLERANCE,
        )
    line(f"   (log 2 = {math.log(2):.8g}; diffrl's train/num_pairs {metrics['train/num_pairs']:g})")
    if per_tensor:
        print("       per tensor (trained after the update / gradient, max abs / max rel):")
        for (name, d, r), (_, gd, gr) in zip(pairs, grads, strict=True):
            a1, r1 = rel(d, r)
            a2, r2 = rel(gd, gr)
            print(f"         {short(name):<34} {a1:.2e} / {r1:.2e}   {a2:.2e} / {r2:.2e}")
    if extra:
        line(
            f"   reference-only trained LoRA tensors, not compared (the last block's context query): {len(extra)}"
        )
    del trainer, pipe, transformer
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, default=None, help="a clone of yifan123/flow_grpo")
    parser.add_argument("--per-tensor", action="store_true", help="print every LoRA tensor's differences")
    parser.add_argument(
        "--reference-override",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="change a reference config value on the reference side only (to see the check fail), e.g. "
        "train.beta=101, or scale it: train.beta*=1.01",
    )
    parser.add_argument(
        "--reference-change",
        choices=sorted(CHANGES),
        default=None,
        help="change the reference side's pairing, noise or levels (to see the check fail): "
        + "; ".join(f"{k}: {v}" for k, v in CHANGES.items()),
    )
    parser.add_argument("--runs", default="", help="comma-separated run numbers (default: all)")
    args = parser.parse_args(argv)
    if args.reference is None:
        print(
            "parity_dpo.py needs the reference code: --reference /path/to/a/clone/of/yifan123/flow_grpo",
            file=sys.stderr,
        )
        return 2
    if not (args.reference / "scripts" / "train_sd3_dpo.py").is_file():
        print(
            f"--reference {args.reference}: not a clone of yifan123/flow_grpo (no scripts/train_sd3_dpo.py in it)",
            file=sys.stderr,
        )
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
        f"reference: {ref.script} (commit {commit or 'unknown: not a git checkout'}); its LoRA {ref.lora_kwargs} on "
        f"{len(ref.targets)} module kinds, adapters {ref.learner!r} (trained) and {ref.ref_adapter!r} (reference); "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}"
    )
    configured = ref.config_module.pickscore_sd3().train.gradient_accumulation_steps
    print(
        f"pickscore_sd3() sets train.gradient_accumulation_steps = {configured} (config/dpo.py line 89), which "
        "train_sd3_dpo.py line 566 divides by before training: run with 1 (geneval_sd3's, the launch script's)"
    )
    print(
        "train_sd3_dpo.py line 652 keeps latents[-1] of the (batch, num_steps + 1, ...) stack (the last sample's "
        "trajectory); both sides here train on the samples' final latents (latents[:, -1])"
    )
    overrides = dict(args.reference_override)
    if overrides:
        print(f"reference side changed (diffrl keeps the config's values): {overrides}")
    if args.reference_change:
        print(f"reference side changed: {args.reference_change}: {CHANGES[args.reference_change]}")
    chosen = [int(x) for x in args.runs.split(",") if x.strip()] or list(range(1, len(RUNS) + 1))
    results = {}
    print("\n0. the shipped preset against the reference configuration it reproduces:")
    results[0] = check_preset(ref, Path(__file__).resolve().parents[1] / "configs")
    with tempfile.TemporaryDirectory(prefix="parity-dpo-") as tmp:
        tmp = Path(tmp)
        from diffrl.models.tiny import build_tiny_sd3

        # two blocks, so that one is not the last, "context pre-only" block
        model_dir = build_tiny_sd3(tmp / "tiny-sd3-2-blocks", num_layers=2)
        print(
            f"one update on stored latents and rewards: {PROMPTS_PER_STEP} prompts x {GROUP} images "
            f"({PROMPTS_PER_STEP} best/worst pairs), {int(NUM_STEPS * 0.99)} levels per pair, float32, CPU; "
            "reference loop vs diffrl "
            "DPOTrainer.train_step"
        )
        for number in chosen:
            run = RUNS[number - 1]
            print(f"\nrun {number}:")
            results[number] = run_update(
                ref, run, model_dir, tmp / f"run-{number}", overrides, args.reference_change, args.per_tensor
            )
    print(
        "\n"
        + "; ".join(f"{f'run {k}' if k else 'preset'}: {'pass' if v else 'FAIL'}" for k, v in results.items())
        + f" ({time.perf_counter() - started:.0f} s)"
    )
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
