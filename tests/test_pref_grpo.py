"""Pref-GRPO's win-rate advantages (``flow_grpo.advantage: winrate``): the group maths against hand-computed values
and its invariances, the config check, and the trainer's handling of a pairwise win-rate reward."""

import math
from pathlib import Path

import pytest
import torch

from diffrl.config import ConfigError
from diffrl.rewards import GroupWinRate, PairwiseReward
from diffrl.train import build_trainer
from diffrl.trainers.objectives import group_advantages, group_win_rates, winrate_advantages

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "flow_grpo.yaml"
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")


def test_win_rates_hand_computed_with_ties_and_self_excluded():
    # group 0: 0.3 ties 0.3 (half a win each), beats 0.1, loses to 0.9; each image meets the other 3, never itself
    scores = torch.tensor([0.3, 0.1, 0.3, 0.9, 2.0, 1.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    w = group_win_rates(scores, groups)
    assert w.dtype == torch.float64
    expected = [(1 + 0.5) / 3, 0 / 3, (1 + 0.5) / 3, 3 / 3, 1.0, 0.0, 0.5]  # the lone image of group 2: 0.5
    assert w.tolist() == pytest.approx(expected, abs=1e-15)
    # interleaved groups: membership comes from the ids, not the row order
    perm = torch.tensor([6, 0, 4, 1, 5, 2, 3])
    assert torch.equal(group_win_rates(scores[perm], groups[perm]), w[perm])


def test_win_rates_of_a_group_sum_to_half_its_size():
    scores = torch.tensor([0.2, 0.2, 0.2, 0.7, -1.0, 3.0, 3.0, 0.0])
    groups = torch.tensor([5, 5, 5, 5, 5, 9, 9, 9])
    w = group_win_rates(scores, groups)
    assert float(w[groups == 5].sum()) == 5 / 2 and float(w[groups == 9].sum()) == 3 / 2


def test_winrate_advantages_hand_computed_normalisation():
    # group 0: w = [0.5, 0, 0.5, 1], mean 0.5, centred [0, -0.5, 0, 0.5], Bessel var 0.5 / 3, std = 1 / sqrt(6)
    scores = torch.tensor([0.3, 0.1, 0.3, 0.9, 4.0, 4.0, 4.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    out = winrate_advantages(scores, groups, clip=None)
    a = 0.5 * math.sqrt(6) / (1 + 1e-8 * math.sqrt(6))  # 0.5 / (std + 1e-8)
    assert out.values.dtype == torch.float32
    assert out.values.tolist() == pytest.approx([0.0, -a, 0.0, a, 0.0, 0.0, 0.0], rel=1e-6)
    assert out.zero_std.tolist() == [False] * 4 + [True] * 3
    # the clip acts on the normalised values
    assert winrate_advantages(scores, groups, clip=1.0).values.tolist() == pytest.approx(
        [0.0, -1.0, 0.0, 1.0, 0, 0, 0]
    )


def test_identical_scores_give_exactly_zero_advantages():
    scores = torch.full((16,), 0.123456789)
    groups = torch.arange(16) // 8
    out = winrate_advantages(scores, groups)
    assert torch.equal(out.values, torch.zeros(16)) and out.zero_std.all()


def test_winrate_advantages_are_invariant_to_monotone_transforms():
    torch.manual_seed(0)
    # rounded, so that there are ties; float64, in which 1e-6 x + 3 still separates every value
    scores = torch.randn(24, dtype=torch.float64).round(decimals=1)
    groups = torch.arange(24) // 8
    base = winrate_advantages(scores, groups)
    for f in (
        torch.exp,
        lambda x: 1e-6 * x + 3.0,
        lambda x: x**3,
        torch.sigmoid,
        lambda x: 1e4 * torch.tanh(x),
    ):
        assert torch.equal(winrate_advantages(f(scores), groups).values, base.values)
    # reversing the order negates the advantages
    assert torch.equal(winrate_advantages(-scores, groups).values, -base.values)


def test_rewards_that_are_win_rates_are_not_ranked_again():
    # win rates from a judge (e.g. soft margins): normalised as they are; ranking them would give [1, 2/3, 1/3, 0]
    w = torch.tensor([0.9, 0.55, 0.5, 0.05])
    groups = torch.zeros(4, dtype=torch.long)
    given = winrate_advantages(w, groups, rewards_are_win_rates=True, clip=None).values.double()
    centred = w.double() - w.double().mean()  # mean 0.5 (up to float32's rounding of the inputs)
    expected = centred / (centred.pow(2).sum().div(3).sqrt() + 1e-8)  # Bessel: n - 1 = 3
    torch.testing.assert_close(given, expected, rtol=1e-6, atol=1e-7)
    ranked = winrate_advantages(w, groups, clip=None).values
    assert not torch.allclose(given.float(), ranked)


def test_config_rejects_unknown_advantage(tmp_path):
    with pytest.raises(ConfigError, match=r"flow_grpo.advantage='rank' must be score .* or winrate"):
        build_trainer(PRESET, [f"output_dir={tmp_path}", f"data.train={PROMPTS}", "flow_grpo.advantage=rank"])


class _Brighter(PairwiseReward):
    """P(a beats b) = sigmoid(20 (mean a - mean b))."""

    name = "brighter"

    def compare_chunk(self, images_a, images_b, prompts, **metadata):
        return torch.sigmoid(20 * (images_a.mean((1, 2, 3)) - images_b.mean((1, 2, 3))))


def test_flow_grpo_with_a_winrate_reward_uses_its_win_rates(tmp_path):
    """Pref-GRPO proper: a pairwise judge's win rates, normalised within the group (not ranked a second time); a
    pointwise reward is ranked by its scores."""
    over = [
        f"output_dir={tmp_path}",
        f"data.train={PROMPTS}",
        "flow_grpo.advantage=winrate",
        "data.eval_size=0",
    ]
    pairwise = build_trainer(PRESET, over, reward=GroupWinRate(_Brighter()))
    assert pairwise.rewards_are_win_rates()
    w = torch.tensor([2 / 3, 2 / 3, 1 / 3, 1 / 3, 0.9, 0.6, 0.4, 0.1])
    groups = torch.arange(8) // 4
    adv = pairwise.advantages(w, groups).values
    # as given: group 0 centred +-1/6, Bessel std sqrt(4 / 36 / 3) = 1 / (3 sqrt(3)), so +-sqrt(3) / 2; group 1
    # centred [0.4, 0.1, -0.1, -0.4], std sqrt(0.34 / 3)
    torch.testing.assert_close(adv, winrate_advantages(w, groups, rewards_are_win_rates=True).values)
    assert adv[:4].tolist() == pytest.approx([math.sqrt(3) / 2] * 2 + [-math.sqrt(3) / 2] * 2, rel=1e-6)
    s1 = math.sqrt(0.34 / 3)
    assert adv[4:].tolist() == pytest.approx([0.4 / s1, 0.1 / s1, -0.1 / s1, -0.4 / s1], rel=1e-5)
    # ranked again, group 1 would be [1, 2/3, 1/3, 0]: other advantages
    assert not torch.allclose(adv[4:], winrate_advantages(w, groups).values[4:], atol=1e-3)
    pointwise = build_trainer(PRESET, over)  # the preset's saturation reward
    assert not pointwise.rewards_are_win_rates()
    torch.testing.assert_close(pointwise.advantages(w, groups).values, winrate_advantages(w, groups).values)
    # advantage=score keeps Flow-GRPO's (global std) normalisation
    score = build_trainer(PRESET, [*over[:-2], "data.eval_size=0"])
    torch.testing.assert_close(score.advantages(w, groups).values, group_advantages(w, groups).values)
