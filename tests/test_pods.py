"""PODS (Xu, Savani, Fang, Kolter, "Not All Rollouts are Useful", arXiv 2504.13818): ``<trainer>.train_per_group``
trains Flow-GRPO, DiffusionNFT and AWM on each group's rollouts of most varied reward, with advantages computed among
them. The subset against hand-worked cases and brute force; each trainer's update on exactly those rows."""

import itertools
from pathlib import Path

import pytest
import torch
from step_spies import spy_step

from diffrl.config import ConfigError, load_config
from diffrl.train import build_trainer
from diffrl.trainers.objectives import awm_weights, group_advantages, max_variance_subset, nft_optimality

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
PROMPTS = str(TINY / "prompts.txt")
TRAINERS = ["flow_grpo", "diffusion_nft", "awm"]

pytestmark = pytest.mark.usefixtures("private_tiny_cache")


# ---------------------------------------------------------------------------------------------- the subset


def test_max_variance_subset_by_hand():
    r = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.8, 0.3, 0.7, 0.4])
    # the two lowest (0.1, 0.2) and the two highest (0.9, 0.8): variance 0.1225; three high and one low: 0.0875
    assert max_variance_subset(r, 4).tolist() == [0, 1, 3, 4]
    # one low reward among equal ones: every subset that holds it has variance 3/16; the balanced k = 2 is taken,
    # and equal rewards in index order (the lowest, the first 1.0, and the last two 1.0)
    assert max_variance_subset(torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 1]), 4).tolist() == [0, 3, 6, 7]
    assert max_variance_subset(r, 8).tolist() == list(range(8))
    for bad in (0, 9):
        with pytest.raises(ValueError, match=f"m={bad} must be in 1..8"):
            max_variance_subset(r, bad)


def test_max_variance_subset_is_the_brute_force_maximum():
    gen = torch.Generator().manual_seed(0)
    for g in range(2, 9):
        for trial in range(6):
            # rewards with ties (rounded) and without
            r = torch.rand(g, generator=gen, dtype=torch.float64)
            if trial % 2:
                r = (r * 3).round() / 3
            for m in range(1, g + 1):
                chosen = max_variance_subset(r, m)
                assert chosen.numel() == m and len(set(chosen.tolist())) == m
                best = max(float(r[list(c)].var(unbiased=False)) for c in itertools.combinations(range(g), m))
                assert float(r[chosen].var(unbiased=False)) == pytest.approx(best, abs=1e-12)


# ---------------------------------------------------------------------------------------------- the trainers


def _trainer(tmp_path, algo, *extra):
    return build_trainer(
        TINY / f"{algo}.yaml", [f"output_dir={tmp_path}", f"data.train={PROMPTS}", "data.eval_size=0", *extra]
    )


def _kept(rewards):
    """The rows the tiny presets' step (2 groups of 4) must train with m = 2: each group's most varied pair, which
    is its lowest and its highest reward."""
    keep = [
        *max_variance_subset(rewards[:4], 2).tolist(),
        *(4 + max_variance_subset(rewards[4:], 2)).tolist(),
    ]
    for start in (0, 4):
        group = rewards[start : start + 4]
        assert {rewards[k].item() for k in keep if start <= k < start + 4} == {
            group.min().item(),
            group.max().item(),
        }
    return keep


@pytest.mark.parametrize("algo, bad", [(a, b) for a in TRAINERS for b in (1, 5)])
def test_bad_train_per_group_is_refused(algo, bad):
    with pytest.raises(
        ConfigError, match=rf"{algo}.train_per_group={bad} must be 0 .* or in 2..4 \({algo}.group"
    ):
        load_config(TINY / f"{algo}.yaml", [f"data.train={PROMPTS}", f"{algo}.train_per_group={bad}"])


def test_flow_grpo_trains_the_kept_rows_with_their_own_advantages(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "flow_grpo", "flow_grpo.train_per_group=2", "flow_grpo.adv_std=group")
    seen = spy_step(trainer, monkeypatch, "_accumulate_part")
    metrics = trainer.train_step(0)
    r = seen["rewards"]
    keep = _kept(r)
    ((part, _, _, _, adv, *_),) = seen["calls"]  # one update: num_minibatches 1
    assert sorted(part.tolist()) == keep
    expected = group_advantages(
        r[keep], torch.tensor([0, 0, 1, 1]), std="group", clip=trainer.cfg.flow_grpo.adv_clip
    )
    torch.testing.assert_close(adv[keep], expected.values)
    assert (adv[[i for i in range(8) if i not in keep]] == 0).all()
    assert metrics["sample/kept_reward_std"] == pytest.approx(float(r[keep].std(unbiased=False)), rel=1e-5)
    assert metrics[f"reward/{trainer.reward.name}/mean"] == pytest.approx(float(r.mean()), rel=1e-6)


def test_diffusion_nft_trains_the_kept_rows_with_their_own_optimality(tmp_path, monkeypatch):
    trainer = _trainer(
        tmp_path, "diffusion_nft", "diffusion_nft.train_per_group=2", "diffusion_nft.num_minibatches=2"
    )
    seen = spy_step(trainer, monkeypatch, "_accumulate_part")
    metrics = trainer.train_step(0)
    r = seen["rewards"]
    keep = _kept(r)
    # two updates, on the kept rows only, each once
    parts = [call[0] for call in seen["calls"]]
    assert len(parts) == 2 and sorted(torch.cat(parts).tolist()) == keep
    c = trainer.cfg.diffusion_nft
    adv = group_advantages(r[keep], torch.tensor([0, 0, 1, 1]), std="global", clip=c.adv_clip)
    optimality = seen["calls"][0][3]
    torch.testing.assert_close(optimality[keep], nft_optimality(adv.values, c.adv_clip))
    assert metrics["sample/kept_reward_std"] == pytest.approx(float(r[keep].std(unbiased=False)), rel=1e-5)


def test_awm_trains_the_kept_rows_with_their_levels_noise_and_own_advantages(tmp_path, monkeypatch):
    """The update's samples are each group's two most varied rollouts, weighted by advantages among them (by hand),
    with the levels and the noise that the full run draws for those rows."""
    trainer = _trainer(tmp_path, "awm", "awm.train_per_group=2", "awm.adv_std=group")
    seen = spy_step(trainer, monkeypatch, "_accumulate")
    metrics = trainer.train_step(0)
    r = seen["rewards"]
    keep = _kept(r)
    ((n, x0, weights, levels, eps, *_),) = seen["calls"]
    assert n == 4
    torch.testing.assert_close(x0, seen["x0"][keep], rtol=0, atol=0)
    a = trainer.cfg.awm
    adv = group_advantages(r[keep], torch.tensor([0, 0, 1, 1]), std="group")
    torch.testing.assert_close(weights, awm_weights(adv.values, clip=a.adv_clip, max_weight=a.adv_max))
    # by hand: two rewards a group, their half-difference d is the group's std, so A = +-d / (d + 1e-4) and the
    # weight A * adv_max / adv_clip = A / 5, positive for the higher reward
    for j in (0, 2):
        lo, hi = sorted((r[keep[j]].item(), r[keep[j + 1]].item()))
        d = (hi - lo) / 2
        w_hi = d / (d + 1e-4) / 5
        got = {r[keep[j]].item(): weights[j].item(), r[keep[j + 1]].item(): weights[j + 1].item()}
        assert got[hi] == pytest.approx(w_hi, rel=1e-5) and got[lo] == pytest.approx(-w_hi, rel=1e-5)
    s = trainer.cfg.sample
    sigmas = trainer.model.schedule(s.num_steps, s.height, s.width)
    torch.testing.assert_close(levels, trainer.train_levels(sigmas, 8)[keep], rtol=0, atol=0)
    assert eps.shape[1] == 4
    assert metrics[f"reward/{trainer.reward.name}/mean"] == pytest.approx(float(r.mean()), rel=1e-6)
    assert metrics["sample/kept_reward_std"] == pytest.approx(float(r[keep].std(unbiased=False)), rel=1e-5)


@pytest.mark.parametrize("algo", TRAINERS)
def test_keeping_the_whole_group_is_the_full_update(algo, tmp_path):
    extra = ("diffusion_nft.num_minibatches=2",) if algo == "diffusion_nft" else ()
    runs = []
    for keep in ((), (f"{algo}.train_per_group=4",)):
        trainer = _trainer(tmp_path / str(len(keep)), algo, *extra, *keep)
        metrics = trainer.train_step(0)
        runs.append(([p.detach().clone() for p in trainer.params], metrics))
    (full, m_full), (same, m_same) = runs
    assert m_full["train/loss"] == m_same["train/loss"] and "sample/kept_reward_std" not in m_same
    assert all(torch.equal(a, b) for a, b in zip(full, same, strict=True))
