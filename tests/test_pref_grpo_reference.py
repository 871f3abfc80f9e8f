"""The Pref-GRPO FLUX.1-dev preset against the reference run (``CodeGoat24/Pref-GRPO``: ``fastvideo/train_flux.py``,
``fastvideo/rewards/dispatcher.py``, ``scripts/_common_finetune.sh``, ``scripts/lora/lora_ur_think_prefgrpo_flux.sh``).

The reference's formulas are re-stated here from those files (cited per test), not imported: the repository is not
a dependency. What is checked: the preset maps the reference's options; ``--rationorm`` is diffrl's GRPO-Guard
(``ratio_norm`` + ``grad_reweight``) exactly; the reference's levels, and how far FluxPipeline's are from them; the
LoRA targets; and how the preset's advantages relate to the reference's per-reward group normalisation.
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from diffrl.config import load_config
from diffrl.doctor import estimate_memory
from diffrl.models.loading import load_model, tiny_model_dir
from diffrl.rewards import CombinedReward, as_reward
from diffrl.samplers import sde_step, sigmas_from_scheduler_config
from diffrl.trainers.objectives import (
    group_advantages,
    grpo_guard_loss,
    guard_step_weight,
    winrate_advantages,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "flux_dev_pref_grpo_unifiedreward.yaml"
REFERENCE_TARGETS = [  # train_flux.py: default_target_modules
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def reference_levels(steps: int = 25, shift: float = 3.0) -> torch.Tensor:
    """train_flux.py: ``sd3_time_shift(args.shift, torch.linspace(1, 0, sampling_steps + 1))``, float64."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def test_preset_maps_the_reference_options():
    cfg = load_config(PRESET)
    g, s, o, m = cfg.flow_grpo, cfg.sample, cfg.optim, cfg.model
    # lora script: 8 nodes x 8 GPUs, one prompt each, 8 images a prompt, 25 steps, eta 0.7, lr 1e-5, LoRA 64/128
    assert (g.prompts_per_step, g.group_size, s.num_steps, g.noise_level) == (64, 8, 25, 0.7)
    assert (o.lr, m.lora_rank, m.lora_alpha, m.lora_targets) == (1e-5, 64, 128, REFERENCE_TARGETS)
    # common: 720 px (train_flux.py defaults), guidance embedding 3.5, clip 1e-4, adv clip 5, no KL, --rationorm
    assert (s.height, s.width, s.guidance_scale, g.clip_range, g.adv_clip, g.kl_beta) == (
        720,
        720,
        3.5,
        1e-4,
        5,
        0,
    )
    assert g.ratio_norm and g.grad_reweight and not g.drop_zero_advantage
    # --gradient_accumulation_steps 4 over the 8 images of each GPU: two optimiser updates per step
    assert g.num_minibatches == 8 // 4 and g.num_inner_epochs == 1
    # the reference trains, per image, int(24 * 0.6) = 14 of the 24 steps before the last, drawn at random
    assert (g.timestep_fraction, g.timestep_selection, g.sde_window, s.num_steps) == (0.6, "random", 0, 25)
    # 3 epochs over 10,000 prompts on 64 GPUs (DistributedSampler rounds each GPU's share up), one prompt a step
    assert cfg.max_steps == 3 * math.ceil(10_000 / 64)
    # the reward mix {"unifiedreward_think": 0.4, "clip": 0.6}
    assert cfg.reward == {"unifiedreward_pairwise_winrate": 0.4, "clipscore": 0.6}
    assert (cfg.mixed_precision, m.dtype, cfg.fsdp) == ("bf16", "float32", True)


def test_rationorm_of_the_reference_is_grpo_guard_exactly():
    """train_flux.py lines 729-756 (``--rationorm``): ``scale = sqrt(|dt|) * std_dev_t`` (the step's std),
    ``ratio = exp((logp - logp_old + mean((mu - mu_old)^2) / (2 scale^2)) * scale)``, the clipped loss divided by
    ``sqrt(|dt|)^2``. diffrl: ``ratio_norm`` and ``grad_reweight``."""
    torch.manual_seed(0)
    sig = reference_levels().float()
    k = 7
    s, s_next = float(sig[k]), float(sig[k + 1])
    x = torch.randn(16, 4, 6, 6)
    v_old = torch.randn_like(x)
    old = sde_step(x, v_old, s, s_next, 0.7, generator=torch.Generator().manual_seed(1))
    delta = torch.randn_like(x) * torch.linspace(0, 0.05, 16).view(-1, 1, 1, 1)  # sample 0 on-policy
    v = (v_old + delta).requires_grad_(True)
    new = sde_step(x, v, s, s_next, 0.7, prev_sample=old.sample)
    adv = torch.randn(16)
    clip = 1e-4

    # the reference, re-stated
    dt = s_next - s
    scale = math.sqrt(abs(dt)) * float(new.std.flatten()[0] / math.sqrt(abs(dt)))
    mse = ((new.mean - old.mean) ** 2).mean(dim=(1, 2, 3))
    ratio = torch.exp((new.log_prob - old.log_prob + mse / (2 * scale**2)) * scale)
    ref_loss = (
        torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean() / math.sqrt(abs(dt)) ** 2
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, v, retain_graph=True)

    ours = grpo_guard_loss(
        new.log_prob,
        old.log_prob,
        adv,
        mean=new.mean,
        old_mean=old.mean,
        std=new.std,
        step_weight=guard_step_weight(s, s_next),
        ratio_norm=True,
        clip_range=clip,
    )
    (grad,) = torch.autograd.grad(ours.loss, v)
    assert 0 < float(ours.clipfrac) < 1  # both sides of the clip are exercised
    assert float(ours.ratio[0]) == 1.0
    torch.testing.assert_close(ours.ratio, ratio.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)
    # without the 1 / |dt| weight the loss is |dt| times smaller: the weight is what the reference divides by
    plain = grpo_guard_loss(
        new.log_prob, old.log_prob, adv, mean=new.mean, old_mean=old.mean, std=new.std, clip_range=clip
    )
    assert plain.loss.item() == pytest.approx(ref_loss.item() * abs(dt), rel=1e-5)


def test_reference_levels_need_a_fixed_shift(tmp_path):
    """The reference's levels are a fixed shift 3; FluxPipeline's shift by resolution (e^mu = 2.22 at 720 px) is up
    to 0.075 lower. A FLUX.1-dev copy whose scheduler config turns dynamic shifting off gives the reference's levels
    through diffrl's own loader (its config already has shift 3.0)."""
    tiny = tiny_model_dir("tiny:flux")
    dynamic = json.loads((tiny / "scheduler" / "scheduler_config.json").read_text())
    assert dynamic["use_dynamic_shifting"] and dynamic["shift"] == 3.0  # FLUX.1-dev's scheduler values
    at_720 = sigmas_from_scheduler_config(dynamic, 25, image_seq_len=(720 // 16) ** 2, flux_base_sigmas=True)
    gap = reference_levels() - at_720.double()
    assert float(gap.max()) == pytest.approx(0.0747, abs=5e-4) and float(gap.min()) >= 0

    copy = tmp_path / "flux"
    shutil.copytree(tiny, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["use_dynamic_shifting"] = False
    path.write_text(json.dumps(config))
    model = load_model(copy)
    for height, width in [(32, 32), (64, 48)]:  # no longer depends on the size
        levels = model.schedule(25, height, width).double()
        torch.testing.assert_close(levels, reference_levels(), rtol=0, atol=2e-7)


def test_preset_lora_targets_adapt_what_the_reference_adapts():
    """PEFT matches the reference's names as name endings: the double blocks' attention and feed-forward layers and
    the single blocks' attn.to_q/k/v; diffrl's FLUX default also adapts the single blocks' proj_mlp and proj_out."""
    cfg = load_config(PRESET)
    model = load_model("tiny:flux")
    linears = [n for n, mod in model.transformer.named_modules() if isinstance(mod, torch.nn.Linear)]
    expected = {n for n in linears if any(n == t or n.endswith("." + t) for t in REFERENCE_TARGETS)}
    model.add_lora(rank=4, alpha=8, target_modules=cfg.model.lora_targets)
    adapted = {
        n[: -len(".lora_A.default")]
        for n, _ in model.transformer.named_modules()
        if n.endswith(".lora_A.default")
    }
    assert adapted == expected
    single = {n.split(".", 2)[2] for n in adapted if n.startswith("single_transformer_blocks.")}
    assert single == {"attn.to_q", "attn.to_k", "attn.to_v"}
    default = load_model("tiny:flux")
    default.add_lora(rank=4, alpha=8)
    added = {
        n[: -len(".lora_A.default")]
        for n, _ in default.transformer.named_modules()
        if n.endswith(".lora_A.default")
    }
    assert adapted < added and {n.rsplit(".", 1)[1] for n in added - adapted} == {"proj_mlp", "proj_out"}


def reference_advantages(rewards: dict, weights: dict, group_size: int) -> torch.Tensor:
    """dispatcher.py ``compute_weighted_advantages`` with ``use_group`` and ``apply_gdpo``, re-stated: each reward
    z-scored within its group (torch's ``std()``, n - 1, + 1e-8), the weighted sum, then z-scored over the whole
    step (+ 1e-8); train_flux.py clamps to +-adv_clip_max (5) afterwards."""
    total = 0
    for name, weight in weights.items():
        r = rewards[name].double().view(-1, group_size)
        total = total + weight * ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)).flatten()
    return ((total - total.mean()) / (total.std() + 1e-8)).clamp(-5, 5)


def preset_advantages(cfg, rewards: dict) -> torch.Tensor:
    """The preset's advantages from the library's own functions, as the trainer builds them: the combined reward
    with ``reward_normalize``, then ``group_advantages`` with ``adv_std`` (or ``winrate_advantages`` for
    ``advantage: winrate``; a CLIP part makes the total a score to rank)."""
    parts = [(as_reward(lambda images, prompts, n=n: rewards[n], name=n), w) for n, w in cfg.reward.items()]
    combined = CombinedReward(parts, normalize=cfg.reward_normalize or None)
    n = len(next(iter(rewards.values())))
    groups = torch.arange(n) // cfg.flow_grpo.group_size
    total = combined.evaluate(torch.zeros(n, 3, 4, 4), [f"prompt {int(g)}" for g in groups]).total
    g = cfg.flow_grpo
    if g.advantage == "winrate":
        return winrate_advantages(total, groups, clip=g.adv_clip).values.double()
    return group_advantages(total, groups, std=g.adv_std, clip=g.adv_clip).values.double()


def _equal_spread_groups(groups: int, clip_means: torch.Tensor, generator) -> dict:
    """Win rates and CLIP scores whose spread is the same in every group (permutations of one set each)."""
    w = (
        torch.tensor([7, 6, 4.5, 4.5, 3, 2, 1, 0], dtype=torch.float64) / 7
    )  # a group's win rates sum to 8 / 2
    c = torch.tensor([0.01, -0.02, 0.005, 0.0, 0.03, -0.01, -0.015, 0.0], dtype=torch.float64)
    rows_w, rows_c = [], []
    for i in range(groups):
        rows_w.append(w[torch.randperm(8, generator=generator)])
        rows_c.append(clip_means[i] + c[torch.randperm(8, generator=generator)])
    return {"unifiedreward_pairwise_winrate": torch.cat(rows_w), "clipscore": torch.cat(rows_c)}


def test_preset_advantages_against_the_references_combination():
    """With reward_normalize: group the preset's advantages are the reference's times one step-wide factor (the
    population std of the step against the reference's n - 1, and the epsilons), whether or not the prompts' CLIP
    means differ; without it (batch) they are not."""
    cfg = load_config(PRESET)
    assert cfg.reward_normalize == "group"
    gen = torch.Generator().manual_seed(0)
    for means in (
        torch.full((16,), 0.3, dtype=torch.float64),
        0.3 + 0.04 * torch.randn(16, generator=gen, dtype=torch.float64),
    ):
        rewards = _equal_spread_groups(16, means, gen)
        ref, ours = reference_advantages(rewards, cfg.reward, 8), preset_advantages(cfg, rewards)
        factor = float(ref.norm() / ours.norm())
        assert abs(factor - (127 / 128) ** 0.5) < 1e-3, factor  # population std against n - 1
        torch.testing.assert_close(ours * factor, ref, rtol=1e-4, atol=1e-5)
    batch = dataclasses.replace(cfg, reward_normalize="batch")
    ref, ours = reference_advantages(rewards, cfg.reward, 8), preset_advantages(batch, rewards)
    cos = float(ref @ ours / (ref.norm() * ours.norm()))
    assert cos < 0.99, (
        cos
    )  # step-wide statistics weigh CLIP by its spread over all prompts, not within groups
    # the judge alone: diffrl's winrate advantages (win rates as given) are the reference's up to the
    # re-normalisation over the step (--apply_gdpo), a single factor
    judge = {"unifiedreward_pairwise_winrate": 1.0}
    w = rewards["unifiedreward_pairwise_winrate"]
    groups = torch.arange(len(w)) // 8
    ours = winrate_advantages(w, groups, rewards_are_win_rates=True, clip=None).values.double()
    ref = reference_advantages(rewards, judge, 8)
    torch.testing.assert_close(ours / ours.std(), ref, rtol=1e-5, atol=1e-6)


def test_memory_estimate_of_the_preset_offline():
    """``diffrl doctor``'s memory estimate runs on the preset without its weights (published sizes): float32
    FLUX.1-dev and its text encoders, the transformer and its LoRA sharded by FSDP over the processes."""
    cfg = load_config(PRESET)
    one, eight = estimate_memory(cfg), estimate_memory(cfg, num_processes=8)
    assert "published" in one.source and 16e9 < one.params < 18e9
    assert one.weights == one.params * 4
    assert eight.weights < one.weights and "FSDP: transformer and trained tensors / 8" in eight.notes
    assert 70 * 2**30 < one.total < 85 * 2**30 and eight.total < 30 * 2**30  # 78.2 and 26.9 GiB
