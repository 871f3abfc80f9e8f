"""AWM (Advantage Weighted Matching, arXiv 2509.25050): the loss on hand-made tensors, the level draws against the
reference's formulas worked by hand, the config checks, and the trainer's step on the tiny SD3 pipeline (zero
advantages leave the weights alone, the EMA adapter follows its schedule, the levels are the rollout's)."""

import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.train import build_trainer
from diffrl.trainers.awm import level_indices, logit_normal_levels
from diffrl.trainers.objectives import (
    awm_clipped_loss,
    awm_loss,
    awm_matching_loss,
    awm_sample_clipped_loss,
    awm_weights,
    group_advantages,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "awm.yaml"
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")


pytestmark = pytest.mark.usefixtures("private_tiny_cache")


# ---------------------------------------------------------------------------------------------- the objective


def _two_samples():
    # sample 0: target eps - x0 = 1 everywhere, v = 3 -> L = 4; sample 1: target 0, v = (1, -1, 1, -1) -> L = 1
    x0 = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    eps = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    v = torch.tensor([[3.0, 3.0, 3.0, 3.0], [1.0, -1.0, 1.0, -1.0]], requires_grad=True)
    t = torch.tensor([0.25, 0.5])
    return v, x0, eps, t


def test_matching_loss_by_hand():
    v, x0, eps, t = _two_samples()
    assert awm_matching_loss(v, x0, eps, t, weighting="uniform").tolist() == [4.0, 1.0]
    assert awm_matching_loss(v, x0, eps, t, weighting="t").tolist() == [1.0, 0.5]
    # ghuber, p = 1/2: t (sqrt(L + 1e-10) - 1e-5) / (1/2) = 0.25 * (2 - 1e-5) * 2 and 0.5 * (1 - 1e-5) * 2
    g = awm_matching_loss(v, x0, eps, t, weighting="ghuber", power=0.5)
    torch.testing.assert_close(g, torch.tensor([0.999995, 0.99999]), rtol=1e-6, atol=1e-7)
    # p = 1 is weighting t (up to delta = 1e-10)
    torch.testing.assert_close(
        awm_matching_loss(v, x0, eps, t, weighting="ghuber", power=1.0), torch.tensor([1.0, 0.5])
    )
    # the gradient of ghuber is t (L + delta)^(p - 1) dL/dv; dL/dv = 2 (v - target) / D
    g.sum().backward()
    expected = torch.tensor(
        [
            [0.25 * 4**-0.5 * 2 * 2 / 4] * 4,
            [0.5 * 1**-0.5 * 2 * s / 4 for s in (1.0, -1.0, 1.0, -1.0)],
        ]
    )
    torch.testing.assert_close(v.grad, expected)


def test_matching_loss_refuses_unknown_weighting_and_shapes():
    v, x0, eps, t = _two_samples()
    with pytest.raises(ValueError, match="weighting='huber' is not known"):
        awm_matching_loss(v, x0, eps, t, weighting="huber")
    with pytest.raises(ValueError, match="must have the same shape"):
        awm_matching_loss(v, x0[:, :2], eps, t)


def test_weights_clip_and_rescale():
    a = torch.tensor([-7.0, -2.5, 0.0, 1.0, 5.0, 9.0])
    torch.testing.assert_close(
        awm_weights(a, clip=5.0, max_weight=1.0), torch.tensor([-1.0, -0.5, 0.0, 0.2, 1.0, 1.0])
    )
    torch.testing.assert_close(
        awm_weights(a, clip=2.0, max_weight=3.0), torch.tensor([-3.0, -3.0, 0.0, 1.5, 3.0, 3.0])
    )


def test_loss_is_the_weighted_mean_and_its_gradient_follows_the_sign():
    v, x0, eps, t = _two_samples()
    m = awm_matching_loss(v, x0, eps, t, weighting="uniform")
    loss = awm_loss(m, torch.tensor([0.5, -1.0]))
    assert loss.item() == pytest.approx((0.5 * 4 - 1.0 * 1) / 2)
    loss.backward()
    # d/dv of 0.5 * mean_i(w_i L_i): w_0 / 2 * 2 (v - 1) / 4 = 0.25 per element; w_1 / 2 * 2 v / 4 = -v / 4
    torch.testing.assert_close(v.grad, torch.tensor([[0.25] * 4, [-0.25, 0.25, -0.25, 0.25]]))
    # a positive weight pulls v towards the target (descent lowers L_0), a negative one pushes it away
    with torch.no_grad():
        stepped = v - 0.1 * v.grad
    after = awm_matching_loss(stepped, x0, eps, t, weighting="uniform")
    assert after[0] < 4.0 and after[1] > 1.0


def test_clipped_loss_by_hand():
    # r = exp(l_old - l): l = (1, 1, 2, 0.5), l_old = (1, 2, 1, 1.5) -> r = (1, e, 1/e, e); clip 0.5 -> [0.5, 1.5]
    m = torch.tensor([1.0, 1.0, 2.0, 0.5], requires_grad=True)
    old = torch.tensor([1.0, 2.0, 1.0, 1.5])
    w = torch.tensor([0.4, 0.5, -0.5, -0.2])
    e = math.e
    loss, ratio = awm_clipped_loss(m, old, w, 0.5)
    torch.testing.assert_close(ratio, torch.tensor([1.0, e, 1 / e, e]))
    # per sample max(-w r, -w clip(r)): -0.4; max(-0.5 e, -0.75) = -0.75 (clipped); max(0.5 / e, 0.25) = 0.25
    # (clipped); max(0.2 e, 0.3) = 0.2 e (a negative weight with r above the clip is not clipped)
    expected = (-0.4 - 0.75 + 0.25 + 0.2 * e) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dl of -w r = w r where unclipped, 0 where the clip acts; divided by the batch of 4
    torch.testing.assert_close(m.grad, torch.tensor([0.4, 0.0, 0.0, -0.2 * e]) / 4)
    assert not ratio.requires_grad


def test_clipped_loss_at_ratio_one_has_the_on_policy_gradient():
    v, x0, eps, t = _two_samples()
    w = torch.tensor([0.5, -1.0])
    awm_loss(awm_matching_loss(v, x0, eps, t), w).backward()
    on_policy = v.grad.clone()
    v.grad = None
    m = awm_matching_loss(v, x0, eps, t)
    loss, ratio = awm_clipped_loss(m, m.detach(), w, 1.0)
    assert ratio.tolist() == [1.0, 1.0] and loss.item() == pytest.approx(-w.mean().item())
    loss.backward()
    torch.testing.assert_close(v.grad, on_policy)


def test_clipped_loss_refuses_bad_shapes_and_range():
    m = torch.ones(3)
    with pytest.raises(ValueError, match=r"must all be \(B,\)"):
        awm_clipped_loss(m, torch.ones(2), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="clip_range=0 must be positive"):
        awm_clipped_loss(m, m, m, 0)


def test_sample_clipped_loss_by_hand():
    # one ratio a sample from the mean over its two levels: r_i = exp(mean_k (l_old - l)); old - l per sample:
    # (0, 0) -> r = 1; (1, 1) -> e; (2, 0) -> e (its level ratios, e^2 and 1, are not what is clipped)
    m = torch.tensor([[1.0, 1.0], [1.0, 2.0], [0.5, 1.5]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0], [2.0, 3.0], [2.5, 1.5]])
    w = torch.tensor([0.4, 0.5, -0.2])
    e = math.e
    loss, ratio = awm_sample_clipped_loss(m, old, w, 0.5)
    torch.testing.assert_close(ratio, torch.tensor([1.0, e, e]))
    # max(-w r, -w clip(r, 0.5, 1.5)): -0.4; max(-0.5 e, -0.75) = -0.75 (clipped); max(0.2 e, 0.3) = 0.2 e
    assert loss.item() == pytest.approx((-0.4 - 0.75 + 0.2 * e) / 3, rel=1e-6)
    loss.backward()
    # d/dl_ik of -w_i exp(mean_k (old - l)) = w_i r_i / K where unclipped, 0 where clipped; over the batch of 3
    expected = torch.tensor([[0.2, 0.2], [0.0, 0.0], [-0.1 * e, -0.1 * e]]) / 3
    torch.testing.assert_close(m.grad, expected)
    assert not ratio.requires_grad and ratio.shape == (3,)


def test_sample_ratio_of_one_level_is_the_level_ratio_and_at_one_the_on_policy_gradient():
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(5, 1, generator=gen)
    old = m + 0.3 * torch.randn(5, 1, generator=gen)
    w = torch.randn(5, generator=gen)
    by_sample = awm_sample_clipped_loss(m, old, w, 0.2)
    by_level = awm_clipped_loss(m[:, 0], old[:, 0], w, 0.2)
    torch.testing.assert_close(by_sample[0], by_level[0])
    torch.testing.assert_close(by_sample[1], by_level[1])
    # three levels at r = 1: the gradient of mean_{i,k} w_i l_ik, awm_loss's over the 15 (sample, level) pairs
    m3 = torch.rand(5, 3, generator=gen, requires_grad=True)
    awm_loss(m3.flatten(), w.repeat_interleave(3)).backward()
    on_policy = m3.grad.clone()
    m3.grad = None
    loss, ratio = awm_sample_clipped_loss(m3, m3.detach(), w, 1.0)
    assert ratio.tolist() == [1.0] * 5
    loss.backward()
    torch.testing.assert_close(m3.grad, on_policy)


def test_sample_clipped_loss_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"must both be \(B, K\) and weights \(3,\) \(B,\)"):
        awm_sample_clipped_loss(torch.ones(3), torch.ones(3), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match=r"weights \(2,\) \(B,\)"):
        awm_sample_clipped_loss(torch.ones(3, 2), torch.ones(3, 2), torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="clip_range=-1 must be positive"):
        awm_sample_clipped_loss(torch.ones(3, 2), torch.ones(3, 2), torch.ones(3), -1)


def test_zero_advantages_give_a_zero_gradient():
    v, x0, eps, t = _two_samples()
    for weighting in ("ghuber", "t", "uniform"):
        v.grad = None
        m = awm_matching_loss(v, x0, eps, t, weighting=weighting)
        awm_loss(m, awm_weights(torch.zeros(2))).backward()
        assert torch.equal(v.grad, torch.zeros_like(v))
    # a group whose rewards are all equal has advantage exactly 0, so its samples weigh nothing
    adv = group_advantages(torch.tensor([0.3, 0.3, 0.3, 0.9, 0.1, 0.5]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert adv.values[:3].tolist() == [0.0, 0.0, 0.0] and adv.zero_std[:3].all()


def _gradient_for_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """The gradient of the AWM loss of a linear velocity model on fixed samples, for the given rewards."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    t = torch.rand(8, generator=gen)
    weight = torch.randn(6, 6, generator=gen, requires_grad=True)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = x_t @ weight
    groups = torch.arange(8) // 4
    w = awm_weights(group_advantages(rewards, groups).values)
    awm_loss(awm_matching_loss(v, x0, eps, t), w).backward()
    return weight.grad


def test_scaling_the_rewards_leaves_the_update_unchanged():
    rewards = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.2, 0.25, 0.9, 0.6], dtype=torch.float64)
    base = _gradient_for_rewards(rewards)
    assert base.abs().max() > 0
    for k in (1e-1, 7.0, 1e3):
        # normalised advantages are invariant to a positive scale, up to the 1e-4 added to the std (relative
        # 1e-4 / (k std) here, std = 0.27)
        torch.testing.assert_close(_gradient_for_rewards(rewards * k), base, rtol=5e-3, atol=1e-7)
        torch.testing.assert_close(_gradient_for_rewards(rewards + k), base, rtol=1e-5, atol=1e-7)
    # and a negative scale reverses it (the better samples become the worse)
    torch.testing.assert_close(_gradient_for_rewards(-rewards), -base, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- the levels


def test_level_indices_by_hand():
    # the reference GenEval/OCR draw: 14 steps, fraction 0.9, 6 levels from index 1: bins at
    # floor(linspace(1, 12, 7)) = 1, 2, 4, 6, 8, 10, 12
    assert level_indices(1, 12, 6, np.zeros(6)).tolist() == [1, 2, 4, 6, 8, 10]
    assert level_indices(1, 12, 6, np.full(6, 0.5)).tolist() == [1, 3, 5, 7, 9, 11]
    assert level_indices(1, 12, 6, np.full(6, 0.999)).tolist() == [1, 3, 5, 7, 9, 11]
    # its PickScore draw starts at 0: floor(linspace(0, 12, 7)) = 0, 2, 4, ...
    assert level_indices(0, 12, 6, np.full(6, 0.75)).tolist() == [1, 3, 5, 7, 9, 11]
    # more levels than indices: an empty bin gives its lower bound (floor(linspace(1, 3, 7)) = 1,1,1,2,2,2,3)
    assert level_indices(1, 3, 6, np.full(6, 0.9)).tolist() == [1, 1, 1, 2, 2, 2]


def test_logit_normal_levels_by_hand():
    # one level at u = 0.5: q = 0.5, Phi^-1 = 0, sigmoid = 1/2, shifted by 3: 1.5 / 2
    assert logit_normal_levels(np.array([0.5]), 3.0).tolist() == pytest.approx([0.75])
    # two at the middle of their strata: q = 1/4 and 3/4
    z = NormalDist().inv_cdf(0.75)
    s = [1 / (1 + math.exp(z)), 1 / (1 + math.exp(-z))]
    expected = [3 * x / (1 + 2 * x) for x in s]
    assert logit_normal_levels(np.array([0.5, 0.5]), 3.0).tolist() == pytest.approx(expected, rel=1e-12)
    # no shift: symmetric about 1/2; the clamp at 0.01
    lo, hi = logit_normal_levels(np.array([0.5, 0.5]), 1.0)
    assert lo + hi == pytest.approx(1.0)
    assert logit_normal_levels(np.array([0.0, 0.5]), 1e-3)[0] == 0.01


# ---------------------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["awm.weighting=huber"], "awm.weighting='huber' must be ghuber, t or uniform"),
        (["awm.timesteps=uniform"], "awm.timesteps='uniform' must be levels or logit_normal"),
        (["awm.solver=sa"], "awm.solver='sa' must be euler or dpm2"),
        (["awm.adv_std=prompt"], "awm.adv_std='prompt' must be global or group"),
        (["awm.group_size=1"], "awm.group_size=1 must be at least 2"),
        (["awm.first_level=3"], r"awm.first_level=3 leaves no level to train.*\[3, 3\)"),
        (["awm.ghuber_power=1.5"], r"awm.ghuber_power=1.5 must be in \(0, 1\]"),
        (["awm.rollout_guidance=0.5"], "awm.rollout_guidance=0.5 must be at least 1"),
        (["awm.sampler=sa"], "awm.sampler='sa' must be ode, sde, cps or sa_solver"),
        (
            ["awm.sampler=sa_solver", "awm.solver=dpm2"],
            "awm.solver=dpm2 does not apply to awm.sampler=sa_solver, which is its own multistep solver",
        ),
        (["awm.sampler=sa_solver", "awm.noise_level=-0.1"], r"awm.noise_level=-0.1 .*must be at least 0"),
        (
            ["awm.sde_t_range=[0.9,0.3]"],
            r"awm.sde_t_range=\[0.9, 0.3\] must be \[lo, hi\] with 0 <= lo <= hi <= 1",
        ),
        (["awm.sde_t_range=[0.3]"], r"awm.sde_t_range=\[0.3\] must be \[lo, hi\]"),
        (
            ["awm.sampler=sde", "awm.noise_level=0"],
            r"awm.noise_level=0.0 must be positive with awm.sampler=sde \(awm.sampler=ode is the deterministic",
        ),
        (["model.lora_rank=0"], "lora_rank=0 .* has no base model.*awm.kl_weight"),
        (["model.lora_rank=0", "awm.kl_weight=0"], "awm.ema_kl_weight=1.0 needs a LoRA"),
        (["awm.rollout_policy=old"], "awm.rollout_policy='old' must be current or ema"),
        (
            ["model.lora_rank=0", "awm.kl_weight=0", "awm.ema_kl_weight=0", "awm.rollout_policy=ema"],
            "awm.rollout_policy=ema needs a LoRA",
        ),
        (["awm.clip_range=0"], r"awm.clip_range=0.0 must be positive and finite"),
        (["awm.ratio=pair"], "awm.ratio='pair' must be level or sample"),
        (["awm.train_per_group=1"], r"awm.train_per_group=1 must be 0 \(train on every rollout\) or in 2..4"),
        (["awm.train_per_group=5"], r"awm.train_per_group=5 must be 0 .* or in 2..4 \(awm.group_size\)"),
    ],
)
def test_bad_awm_values_raise_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESET, [f"data.train={PROMPTS}", *overrides])


def test_full_fine_tuning_without_the_pull_terms_is_allowed():
    cfg = load_config(
        PRESET, [f"data.train={PROMPTS}", "model.lora_rank=0", "awm.kl_weight=0", "awm.ema_kl_weight=0"]
    )
    assert cfg.algorithm == "awm"


# ---------------------------------------------------------------------------------------------- the trainer


def _trainer(tmp_path, *extra, reward=None):
    return build_trainer(
        PRESET,
        [f"output_dir={tmp_path}", f"data.train={PROMPTS}", "data.eval_size=0", *extra],
        reward=reward,
    )


def test_zero_advantages_leave_the_weights_unchanged(tmp_path):
    # a reward equal for every image: every group's advantages are 0; without the two pull terms and weight decay
    # the gradient, and so Adam's step, is exactly 0
    def constant(images, prompts, **metadata):
        return torch.full((images.shape[0],), 0.5)

    trainer = _trainer(
        tmp_path, "awm.kl_weight=0", "awm.ema_kl_weight=0", "optim.weight_decay=0", reward=constant
    )
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    assert metrics["sample/zero_std_frac"] == 1.0 and metrics["train/policy_loss"] == 0.0
    assert metrics["train/matching"] > 0
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))


def test_ema_adapter_follows_its_schedule_and_the_levels_are_the_rollouts(tmp_path):
    trainer = _trainer(tmp_path, "awm.ema_kl_rate=0.5", "awm.ema_kl_cap=0.3", "awm.num_train_timesteps=3")
    assert len(trainer.ema_params) == len(trainer.params)
    theta0 = [p.detach().clone() for p in trainer.params]
    assert all(torch.equal(e, p) for e, p in zip(trainer.ema_params, theta0, strict=True))
    metrics = trainer.train_step(0)
    assert metrics["train/ema_decay"] == pytest.approx(0.3)  # min(0.5 * 1 update, 0.3)
    for e, p0, p1 in zip(trainer.ema_params, theta0, trainer.params, strict=True):
        torch.testing.assert_close(e, 0.3 * p0 + 0.7 * p1.detach())
    # the training levels: indices [1, int(4 * 0.9)) = {1, 2} of the 4-step schedule, per sample
    s = trainer.cfg.sample
    sigmas = trainer.model.schedule(s.num_steps, s.height, s.width)
    levels = trainer.train_levels(sigmas, 8)
    assert levels.shape == (8, 3)
    allowed = {float(sigmas[1]), float(sigmas[2])}
    assert set(levels.flatten().tolist()) <= allowed
    # bins floor(linspace(1, 3, 4)) = 1, 1, 2, 3: the first bin is empty (index 1), the second gives 1, the third 2
    assert torch.equal(levels[:, 0], levels[:, 1]) and (levels[:, 2] == float(sigmas[2])).all()


def test_logit_normal_levels_differ_per_sample_and_the_step_trains(tmp_path):
    trainer = _trainer(tmp_path, "awm.timesteps=logit_normal", "awm.weighting=uniform", "awm.solver=dpm2")
    s = trainer.cfg.sample
    levels = trainer.train_levels(trainer.model.schedule(s.num_steps, s.height, s.width), 8)
    assert ((levels >= 0.01) & (levels < 1)).all() and len(set(levels[:, 0].tolist())) == 8
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    assert metrics["train/skipped"] == 0.0 and math.isfinite(metrics["train/loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))


def test_rollout_guidance_samples_with_cfg_and_trains_the_guidance_free_velocity(tmp_path, monkeypatch):
    """awm.rollout_guidance=3: the rollouts (the images scored) are the CFG-guided model's, while every velocity the
    loss trains is the guidance-free one (guidance 1); the default samples without CFG."""
    import diffrl.trainers.awm as awm_module

    seen = {"rollout": [], "velocity": []}
    real_rollout = awm_module.rollout

    def recording_rollout(model, cond, sigmas, noise, **kw):
        seen["rollout"].append(kw["guidance_scale"])
        return real_rollout(model, cond, sigmas, noise, **kw)

    monkeypatch.setattr(awm_module, "rollout", recording_rollout)
    for guidance in (1.0, 3.0):
        seen["rollout"].clear()
        trainer = _trainer(tmp_path / str(guidance), f"awm.rollout_guidance={guidance}")
        real_velocity = trainer.model.velocity

        def recording_velocity(x, sigma, cond, guidance_scale=1.0, _real=real_velocity, **kw):
            seen["velocity"].append((guidance_scale, torch.is_grad_enabled()))
            return _real(x, sigma, cond, guidance_scale, **kw)

        monkeypatch.setattr(trainer.model, "velocity", recording_velocity)
        seen["velocity"].clear()
        metrics = trainer.train_step(0)
        assert metrics["train/skipped"] == 0.0
        assert seen["rollout"] and set(seen["rollout"]) == {guidance}
        # the rollout's velocity calls (no grad) carry the CFG scale; every call the loss trains through carries 1
        trained = {g for g, grad in seen["velocity"] if grad}
        assert trained == {1.0}, seen["velocity"]
        assert (guidance, False) in seen["velocity"]


@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_stochastic_rollouts_on_the_steps_of_sde_t_range_each_row_its_own(sampler, tmp_path, monkeypatch):
    """awm.sampler=sde / cps: the rollout steps that start at a level in awm.sde_t_range are stochastic (the others
    deterministic), the images differ from the ODE's, and each row's noise comes from its own generator, so the same
    seed gives the same images and sampling one image at a time gives the same images as in chunks of 8."""
    import diffrl.trainers.awm as awm_module

    seen = []
    real_rollout = awm_module.rollout

    def recording_rollout(model, cond, sigmas, noise, **kw):
        out = real_rollout(model, cond, sigmas, noise, **kw)
        seen.append((kw, sigmas, out))
        return out

    monkeypatch.setattr(awm_module, "rollout", recording_rollout)

    def first_step(name, *extra):
        seen.clear()
        metrics = _trainer(tmp_path / name, *extra).train_step(0)
        assert metrics["train/skipped"] == 0.0 and math.isfinite(metrics["train/loss"])
        return torch.cat([out.final for _, _, out in seen]), list(seen)

    ode, calls = first_step("ode")
    assert "sampler" not in calls[0][0] and not calls[0][2].stochastic.any()
    stochastic, calls = first_step("sde", f"awm.sampler={sampler}", "awm.sde_t_range=[0.5,0.9]")
    kw, sigmas, out = calls[0]
    # the tiny model's 4 levels are 1, 0.858, 0.602, 0.009: the steps that start at 0.858 and 0.602
    starts = [k for k in range(len(sigmas) - 1) if 0.5 <= float(sigmas[k]) <= 0.9]
    assert starts == [1, 2] and kw["sde_window"] == (1, 3)
    assert kw["sampler"] == sampler and kw["noise_level"] == 0.7
    assert out.stochastic.tolist() == [False, True, True, False]
    assert (stochastic - ode).abs().max() > 0.1
    again, _ = first_step("again", f"awm.sampler={sampler}", "awm.sde_t_range=[0.5,0.9]")
    assert torch.equal(again, stochastic)
    one_by_one, calls = first_step(
        "one", f"awm.sampler={sampler}", "awm.sde_t_range=[0.5,0.9]", "sample.batch_size=1"
    )
    assert len(calls) == 8
    torch.testing.assert_close(one_by_one, stochastic, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["awm.sampler=sde", "awm.sde_t_range=[0.7,0.8]"],
            r"awm.sde_t_range=\[0.7, 0.8\] holds none of the rollout steps' starting levels \(1, 0.858, 0.602, "
            r"0.00893\); widen it or set awm.sampler=ode\.",
        ),
        (
            ["awm.sampler=cps", "awm.sde_t_range=[0.0,0.9]"],
            r"awm.sampler=cps cannot make the last rollout step \(to level 0\) stochastic.*starting level 0.00893",
        ),
    ],
)
def test_a_stochastic_window_without_steps_or_a_cps_step_to_zero_is_refused(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, *extra)


def test_rollout_guidance_needs_a_cfg_model(tmp_path):
    with pytest.raises(
        ValueError, match=r"awm.rollout_guidance=3.0 needs a model whose guidance is classifier-free"
    ):
        _trainer(tmp_path, "model.path=tiny:flux", "awm.rollout_guidance=3")


def test_sa_solver_rollouts_are_the_references_sampler_each_row_its_own(tmp_path, monkeypatch):
    """awm.sampler=sa_solver: SA-Solver on the reference's grid, noisy (tau = awm.noise_level) on the steps that end
    at a level in awm.sde_t_range; the same seed gives the same images, sampling one image at a time the same images
    as chunks of 8; noise level 0 is the deterministic SA-Solver, which is not the Euler ODE."""
    import diffrl.trainers.awm as awm_module
    from diffrl.samplers import sa_solver_levels

    seen = []

    def recording(real):
        def wrapper(model, cond, sigmas, noise, **kw):
            out = real(model, cond, sigmas, noise, **kw)
            seen.append((real.__name__, kw, sigmas, out))
            return out

        return wrapper

    monkeypatch.setattr(awm_module, "sa_solver_rollout", recording(awm_module.sa_solver_rollout))
    monkeypatch.setattr(awm_module, "rollout", recording(awm_module.rollout))

    def first_step(name, *extra):
        seen.clear()
        trainer = _trainer(tmp_path / name, *extra)
        metrics = trainer.train_step(0)
        assert metrics["train/skipped"] == 0.0 and math.isfinite(metrics["train/loss"])
        return trainer, torch.cat([out.final for *_, out in seen]), list(seen)

    _, ode, calls = first_step("ode")
    assert {name for name, *_ in calls} == {"rollout"}
    trainer, noisy, calls = first_step("sa", "awm.sampler=sa_solver", "awm.sde_t_range=[0.5,0.9]")
    assert {name for name, *_ in calls} == {"sa_solver_rollout"}
    _, kw, sigmas, out = calls[0]
    schedule = trainer.model.schedule(4, trainer.cfg.sample.height, trainer.cfg.sample.width)
    # the tiny model's levels 1, 0.858, 0.602, 0.009, 0 become 0.999, 0.858, 0.602, 0.301, 0
    torch.testing.assert_close(sigmas, sa_solver_levels(schedule))
    assert [round(float(v), 3) for v in sigmas] == [0.999, 0.858, 0.602, 0.301, 0.0]
    assert [kw["tau"](float(t)) for t in sigmas[1:]] == [0.7, 0.7, 0.0, 0.0]
    assert out.stochastic.tolist() == [True, True, False, False]
    assert isinstance(kw["generator"], list) and len(kw["generator"]) == out.final.shape[0]
    _, again, _ = first_step("again", "awm.sampler=sa_solver", "awm.sde_t_range=[0.5,0.9]")
    assert torch.equal(again, noisy)
    _, one_by_one, calls = first_step(
        "one", "awm.sampler=sa_solver", "awm.sde_t_range=[0.5,0.9]", "sample.batch_size=1"
    )
    assert len(calls) == 8
    torch.testing.assert_close(one_by_one, noisy, rtol=1e-4, atol=1e-4)
    _, deterministic, calls = first_step("det", "awm.sampler=sa_solver", "awm.noise_level=0")
    assert not calls[0][3].stochastic.any() and (deterministic - noisy).abs().max() > 0.1
    # from the same initial noise, the deterministic SA-Solver (a second-order multistep solver) is not Euler's ODE
    assert (deterministic - ode).abs().max() > 0.05


def test_an_sa_solver_window_without_noisy_steps_is_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"awm.sde_t_range=\[0.95, 1.0\] holds none of the levels SA-Solver's noisy steps end at \(0.858, "
        r"0.602, 0.301\); widen it, or set awm.noise_level=0 for the deterministic SA-Solver\.",
    ):
        _trainer(tmp_path, "awm.sampler=sa_solver", "awm.sde_t_range=[0.95,1.0]")
    _trainer(tmp_path / "det", "awm.sampler=sa_solver", "awm.sde_t_range=[0.95,1.0]", "awm.noise_level=0")


@pytest.mark.parametrize("ema_kl_weight", [1.0, 0.0])
def test_off_policy_rollouts_come_from_the_ema_adapter_and_the_ratio_is_to_it(
    tmp_path, monkeypatch, ema_kl_weight
):
    """awm.rollout_policy=ema (the reference's off_policy): the rollouts are the EMA adapter's samples (the same
    images as rolling the trained adapter after copying the EMA weights into it), the EMA adapter is kept (and
    checkpointed) even without the EMA pull, and the policy loss is the clipped surrogate on the ratio to it."""
    import diffrl.trainers.awm as awm_module

    finals = []
    real_rollout = awm_module.rollout

    def recording(model, cond, sigmas, noise, **kw):
        out = real_rollout(model, cond, sigmas, noise, **kw)
        finals.append(out.final)
        return out

    monkeypatch.setattr(awm_module, "rollout", recording)
    extra = [f"awm.ema_kl_weight={ema_kl_weight}", "awm.clip_range=0.02"]
    trainer = _trainer(tmp_path / "ema", "awm.rollout_policy=ema", *extra)
    assert len(trainer.ema_params) == len(trainer.params)
    assert set(trainer.extra_state()) == {f"ema_ref.{n}" for n in trainer.param_names}
    # move the EMA adapter away from the trained one, so that the two policies sample different images
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for e in trainer.ema_params:
            e.add_(0.3 * torch.randn(e.shape, generator=gen))
    ema_weights = [e.detach().clone() for e in trainer.ema_params]
    metrics = trainer.train_step(0)
    assert metrics["train/skipped"] == 0.0 and math.isfinite(metrics["train/policy_loss"])
    # the ratio to a different policy is not 1, and with a clip of 0.02 some of it is clipped
    assert abs(metrics["train/ratio_mean"] - 1) > 1e-3 and 0 < metrics["train/clip_frac"] <= 1
    off_policy = finals[-1]

    # the same step's rollouts from the trained adapter holding the EMA weights: the same images
    finals.clear()
    same = _trainer(tmp_path / "copy", *extra)
    with torch.no_grad():
        for p, e in zip(same.params, ema_weights, strict=True):
            p.copy_(e)
    same.train_step(0)
    torch.testing.assert_close(finals[-1], off_policy, rtol=1e-5, atol=1e-5)
    # and not the on-policy rollouts of the trained adapter
    finals.clear()
    on_policy = _trainer(tmp_path / "current", *extra)
    on_policy.train_step(0)
    assert (finals[-1] - off_policy).abs().max() > 1e-2
    assert "train/ratio_mean" not in on_policy.train_step(1)


def _off_policy_step(tmp_path, *extra):
    """One off-policy step of a trainer whose EMA adapter was moved away from the trained one (so r != 1); returns
    the trained weights after it and the step's metrics."""
    trainer = _trainer(tmp_path, "awm.rollout_policy=ema", "awm.clip_range=0.005", *extra)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for e in trainer.ema_params:
            e.add_(0.1 * torch.randn(e.shape, generator=gen))
    metrics = trainer.train_step(0)
    return [p.detach().clone() for p in trainer.params], metrics


def test_off_policy_sample_ratio_does_not_depend_on_micro_batches_and_acts(tmp_path):
    """awm.ratio=sample (the reference's sum_first) holds a micro-batch's levels for one backward: micro-batches of
    1 and of 4 samples make the same update. It is another update than the per-level ratio's when a sample has two
    levels, and the same with one."""
    whole, m_whole = _off_policy_step(tmp_path / "b4", "awm.ratio=sample", "optim.train_batch_size=4")
    split, m_split = _off_policy_step(tmp_path / "b1", "awm.ratio=sample", "optim.train_batch_size=1")
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for key in ("train/ratio_mean", "train/clip_frac", "train/policy_loss", "train/matching", "train/ema_kl"):
        assert m_whole[key] == pytest.approx(m_split[key], rel=1e-5, abs=1e-7), key
    assert abs(m_whole["train/ratio_mean"] - 1) > 1e-3 and m_whole["train/clip_frac"] > 0
    # the per-level ratio: another update (and clipped share) with two levels a sample
    by_level, m_level = _off_policy_step(tmp_path / "level", "awm.ratio=level")
    assert max((a - b).abs().max().item() for a, b in zip(whole, by_level, strict=True)) > 1e-6
    assert m_level["train/matching"] == pytest.approx(m_whole["train/matching"], rel=1e-6)
    # one level a sample: one ratio either way
    one = [
        _off_policy_step(tmp_path / r, f"awm.ratio={r}", "awm.num_train_timesteps=1")
        for r in ("level", "sample")
    ]
    for a, b in zip(one[0][0], one[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert one[0][1]["train/ratio_mean"] == pytest.approx(one[1][1]["train/ratio_mean"], rel=1e-6)


def test_off_policy_with_a_copied_ema_is_the_on_policy_update(tmp_path):
    """At the first step the EMA adapter is a copy of the trained one: the rollouts, the ratio (1) and the update
    are the on-policy ones (the surrogate's gradient at r = 1 is awm_loss's)."""
    runs = {}
    for policy in ("current", "ema"):
        trainer = _trainer(tmp_path / policy, f"awm.rollout_policy={policy}")
        metrics = trainer.train_step(0)
        runs[policy] = ([p.detach().clone() for p in trainer.params], metrics)
    (on, m_on), (off, m_off) = runs["current"], runs["ema"]
    assert m_off["train/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m_off["train/clip_frac"] == 0.0
    assert m_off["train/matching"] == pytest.approx(m_on["train/matching"], rel=1e-6)
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
