import math

import numpy as np
import pytest
import torch

from diffrl.trainers.objectives import (
    denoising_loss,
    gaussian_kl,
    group_advantages,
    nft_loss,
    nft_old_policy_decay,
    nft_optimality,
    ppo_clip_loss,
    refl_loss,
)


def _reference_advantages(prompts, rewards, global_std):
    # The Flow-GRPO reference's per-prompt tracker (population std, +1e-4), written out in numpy.
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    adv = np.zeros_like(rewards)
    for p in np.unique(prompts):
        group = rewards[prompts == p]
        std = (np.std(rewards) if global_std else np.std(group)) + 1e-4
        adv[prompts == p] = (group - group.mean()) / std
    return adv


@pytest.mark.parametrize("std", ["global", "group"])
def test_group_advantages_match_reference_tracker(std):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=g)
    groups = torch.arange(6).repeat_interleave(4)[torch.randperm(24, generator=g)]
    ours = group_advantages(rewards, groups, std=std, clip=None).values
    ref = _reference_advantages(groups.tolist(), rewards.tolist(), std == "global")
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_group_advantages_hand_computed_clip_and_zero_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 7.0, 7.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    out = group_advantages(rewards, groups, std="group", clip=None)
    expected = torch.tensor([-0.5, 0.5, -0.5, 0.5, 0.0, 0.0]) / torch.tensor(
        [0.5001, 0.5001, 0.5001, 0.5001, 1e-4, 1e-4]
    )
    torch.testing.assert_close(out.values, expected)
    assert out.zero_std.tolist() == [False, False, False, False, True, True]
    # one outlier in a group of 100: A = 99 / sqrt(99) ~ 9.95 before clipping, exactly 5 after
    outlier = torch.cat([torch.zeros(99), torch.tensor([100.0])])
    adv = group_advantages(outlier, torch.zeros(100, dtype=torch.long), std="global", clip=5.0).values
    assert adv.max().item() == 5.0
    assert adv.min().item() == pytest.approx(-1 / (math.sqrt(99) + 1e-4), rel=1e-5)
    with pytest.raises(ValueError, match="std="):
        group_advantages(rewards, groups, std="batch")


@pytest.mark.parametrize("group_size", [4, 8, 24])
def test_a_group_of_equal_rewards_has_advantage_exactly_zero(group_size):
    # a float32 mean of G equal values is off by one ulp for many values from G = 8 on; the statistics are float64
    # (as the reference's numpy), so every such group is exactly 0 and counted as zero-std
    g = torch.Generator().manual_seed(0)
    values = torch.rand(200, generator=g)
    for v in values:
        rewards = torch.cat([v.repeat(group_size), torch.rand(group_size, generator=g)])
        groups = torch.arange(2).repeat_interleave(group_size)
        out = group_advantages(rewards, groups)
        assert bool((out.values[:group_size] == 0).all()) and bool(out.zero_std[:group_size].all())
        assert not bool((out.values[group_size:] == 0).any())
        assert out.values.dtype == torch.float32


def test_ppo_loss_on_policy_and_clipping():
    adv = torch.tensor([1.0, -2.0])
    lp = torch.tensor([-1.0, -1.0], requires_grad=True)
    stats = ppo_clip_loss(lp, lp.detach(), adv)
    assert torch.equal(stats.ratio, torch.ones(2)) and stats.clipfrac.item() == 0
    assert stats.loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    stats.loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 2)  # d/dlogp of -A * exp(logp - old) at ratio 1
    # ratio 1.5 with A > 0 is clipped to 1 + eps: no gradient; with A < 0 the unclipped term wins
    lp2 = torch.tensor([math.log(1.5), math.log(1.5)], requires_grad=True)
    stats = ppo_clip_loss(lp2, torch.zeros(2), adv, clip_range=0.2)
    assert stats.loss.item() == pytest.approx((-1.0 * 1.2 + 2.0 * 1.5) / 2)
    assert stats.clipfrac.item() == 1.0
    stats.loss.backward()
    assert lp2.grad[0].item() == 0 and lp2.grad[1].item() == pytest.approx(2.0 * 1.5 / 2)
    # asymmetric clip-higher
    high = ppo_clip_loss(
        torch.tensor([math.log(1.25)]), torch.zeros(1), torch.ones(1), clip_range=0.2, clip_range_high=0.28
    )
    assert high.loss.item() == pytest.approx(-1.25) and high.clipfrac.item() == 0


def test_trajectory_ratio_is_geometric_mean_of_steps():
    lp = torch.tensor([[0.1, 0.3], [0.0, -0.2]])
    stats = ppo_clip_loss(lp, torch.zeros(2, 2), torch.ones(2), clip_range=10.0, trajectory_ratio=True)
    torch.testing.assert_close(stats.ratio, torch.exp(torch.tensor([0.2, -0.1])))
    per_step = ppo_clip_loss(lp, torch.zeros(2, 2), torch.ones(2), clip_range=10.0)
    assert per_step.ratio.shape == (2, 2)


def test_gaussian_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    m, mr = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.5, 0.2, 1.0]).view(3, 1, 1, 1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, std), torch.distributions.Normal(mr, std)
    )
    torch.testing.assert_close(gaussian_kl(m, mr, std), ref.mean(dim=(1, 2, 3)))


def test_nft_optimality_probability():
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0])
    torch.testing.assert_close(nft_optimality(a), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))


def test_nft_loss_limits_and_weighting():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    s = torch.tensor([0.2, 0.4, 0.6, 0.8])
    x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    target = eps - x0
    v_old = target + 0.1 * torch.randn(x0.shape, generator=g)
    v = v_old + 0.05 * torch.randn(x0.shape, generator=g)
    r = torch.tensor([1.0, 0.0, 0.5, 0.25])
    # beta = 1: v+ = v_theta, v- = 2 v_old - v_theta (the paper's implicit negative policy)
    loss = nft_loss(v, v_old, x_s, x0, s, r, 1.0, weighting="velocity")
    pos = ((v - target) ** 2).mean(dim=(1, 2, 3))
    neg = ((2 * v_old - v - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, r * pos + (1 - r) * neg)
    # perfect velocity and r = 1: zero loss
    assert nft_loss(target, target, x_s, x0, s, torch.ones(4), 0.5, weighting="velocity").abs().max() < 1e-10
    # adaptive: x0-space error divided by its own detached mean absolute value
    ada = nft_loss(v, v_old, x_s, x0, s, torch.ones(4), 1.0, weighting="adaptive")
    err = x_s - s.view(-1, 1, 1, 1) * v - x0
    torch.testing.assert_close(ada, (err**2).mean(dim=(1, 2, 3)) / err.abs().mean(dim=(1, 2, 3)))
    # the gradient with r = 1 pulls v_theta towards the target
    vg = v.clone().requires_grad_(True)
    nft_loss(vg, v_old, x_s, x0, s, torch.ones(4), 1.0, weighting="velocity").sum().backward()
    assert ((vg.grad * (v - target)).sum() > 0).item()
    with pytest.raises(ValueError, match="weighting"):
        nft_loss(v, v_old, x_s, x0, s, r, 1.0, weighting="x")


def test_nft_decay_schedules():
    assert [nft_old_policy_decay(k) for k in (0, 100, 1000)] == [0.0, pytest.approx(0.1), 0.5]
    ocr = dict(flat=75, rate=0.0075, cap=0.999)
    assert nft_old_policy_decay(74, **ocr) == 0.0
    assert nft_old_policy_decay(175, **ocr) == pytest.approx(0.75)
    assert nft_old_policy_decay(10_000, **ocr) == 0.999


def test_refl_loss():
    r = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = refl_loss(r)
    assert loss.item() == pytest.approx(1e-3 * (1.0 + 0.0) / 2)
    loss.backward()
    torch.testing.assert_close(r.grad, torch.tensor([-0.5e-3, 0.0]))
    assert refl_loss(torch.tensor([1.0, 3.0]), kind="linear", scale=1.0).item() == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="kind"):
        refl_loss(r, kind="square")


def test_denoising_loss_by_hand():
    # two samples of two "pixels": target eps - x0 = [[-1, -1], [2, -1]]
    x0 = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    eps = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    v = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = denoising_loss(v, x0, eps)
    # squared errors [[1, 1], [1, 4]], mean over the batch and the dimensions
    assert loss.item() == pytest.approx(7 / 4)
    loss.backward()
    # d/dv mean((v - t)^2) = 2 (v - t) / 4
    torch.testing.assert_close(v.grad, torch.tensor([[0.5, 0.5], [-0.5, 1.0]]))
    # the exact velocity of the straight path x_s = (1 - s) x0 + s eps, whatever s, costs nothing
    s = 0.3
    x_s = (1 - s) * x0 + s * eps
    exact = (x_s - x0) / s
    assert denoising_loss(exact, x0, eps).item() == pytest.approx(0.0, abs=1e-10)
    # no gradient flows into the targets
    x0g = x0.clone().requires_grad_(True)
    assert not denoising_loss(v.detach(), x0g, eps).requires_grad
    with pytest.raises(ValueError, match="same shape"):
        denoising_loss(v, x0[:1], eps)
