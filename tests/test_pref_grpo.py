"""Pref-GRPO's win-rate advantages (``flow_grpo.advantage: winrate``): the group maths against hand-computed values
and its invariances, the config check, and the trainer's handling of a pairwise win-rate reward."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

import diffrl.trainers.flow_grpo as fg
from diffrl.config import ConfigError, load_config
from diffrl.rewards import GroupWinRate, PairwiseReward
from diffrl.train import build_trainer
from diffrl.trainers.common import seeded_generator
from diffrl.trainers.flow_grpo import FlowGRPOTrainer, random_train_steps
from diffrl.trainers.objectives import group_advantages, group_win_rates, winrate_advantages

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "flow_grpo.yaml"
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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


# ---------------------------------------------------------------------------------------------- trained steps per image
# Pref-GRPO's reference (CodeGoat24/Pref-GRPO, fastvideo/train_flux.py, train_one_step) draws a torch.randperm of the
# sampling steps but the last for each image and trains the first int(steps * timestep_fraction) of it:
# flow_grpo.timestep_selection=random. On the tiny preset (4 SDE steps) the pool is steps 0, 1, 2, and
# timestep_fraction 0.7 trains int(3 * 0.7) = 2 of them per image.

ROW_KEY = 2**31 - 1  # the engine's key of per-row generators: (seed, step, ROW_KEY, purpose, global row)
RANDOM = ["flow_grpo.timestep_selection=random", "flow_grpo.timestep_fraction=0.7"]


def test_random_train_steps_are_the_first_of_each_rows_permutation():
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    perms = [torch.randperm(5, generator=torch.Generator().manual_seed(s)).tolist() for s in (0, 1, 2)]
    pool = [10, 11, 12, 13, 14]
    drawn = random_train_steps(pool, 3, gens)
    assert drawn.tolist() == [sorted(pool[j] for j in p[:3]) for p in perms]
    assert drawn.shape == (3, 3) and drawn.dtype == torch.long
    with pytest.raises(ValueError, match="cannot draw 6 trained steps from the 5 steps"):
        random_train_steps(pool, 6, gens)


class _Spy:
    """Records the rollouts' latents, the training forwards' (x, k), the PPO terms and the losses handed to
    backward."""

    def __init__(self, monkeypatch, trainer):
        self.latents, self.forwards, self.ppo, self.backwards = [], [], [], []
        real_rollout, real_ppo = fg.rollout, fg.ppo_clip_loss
        real_outputs, real_backward = FlowGRPOTrainer._step_outputs, trainer.backward

        def rollout(*a, **k):
            out = real_rollout(*a, **k)
            self.latents.append(out.latents)
            return out

        def outputs(tr, x, x_next, k, *a, **kw):
            if torch.is_grad_enabled():
                self.forwards.append((x.detach().clone(), k))
            return real_outputs(tr, x, x_next, k, *a, **kw)

        def ppo(*a, **k):
            out = real_ppo(*a, **k)
            self.ppo.append(out.loss.detach())
            return out

        def backward(loss):
            self.backwards.append(loss.detach())
            real_backward(loss)

        monkeypatch.setattr(fg, "rollout", rollout)
        monkeypatch.setattr(fg, "ppo_clip_loss", ppo)
        monkeypatch.setattr(FlowGRPOTrainer, "_step_outputs", outputs)
        trainer.backward = backward

    def trained_pairs(self) -> list[tuple[int, int]]:
        """(row, step) of every training forward, the row found by its latents."""
        latents = torch.cat(self.latents)
        pairs = []
        for x, k in self.forwards:
            for xi in x:
                rows = [r for r in range(latents.shape[0]) if torch.equal(latents[r, k], xi)]
                assert len(rows) == 1
                pairs.append((rows[0], k))
        return pairs


def test_each_image_trains_its_own_random_steps_and_its_loss_is_their_mean(tmp_path, monkeypatch):
    """One step of 8 images (2 prompts x 4), micro-batches of 1: the (image, step) pairs trained are each image's
    draw, for seed 0 at step 0 the ones listed, and every backward pass is that pair's PPO term over 8 images x 2
    steps, so the step's loss is the mean over images of each image's mean over its own steps."""
    trainer = build_trainer(
        PRESET,
        [
            f"output_dir={tmp_path}",
            f"data.train={PROMPTS}",
            "max_steps=1",
            "data.eval_size=0",
            "optim.train_batch_size=1",
            "flow_grpo.kl_beta=0",
            *RANDOM,
        ],
    )
    spy = _Spy(monkeypatch, trainer)
    trainer.train()
    # seed 0, step 0: image r trains the first two of torch.randperm(3) under its row's generator
    expected = {
        r: sorted(torch.randperm(3, generator=seeded_generator(0, 0, ROW_KEY, 3, r))[:2].tolist())
        for r in range(8)
    }
    assert expected == {
        0: [0, 2],
        1: [1, 2],
        2: [0, 1],
        3: [0, 1],
        4: [0, 2],
        5: [1, 2],
        6: [0, 2],
        7: [1, 2],
    }
    pairs = spy.trained_pairs()
    assert len(pairs) == len(set(pairs)) == 16
    assert {r: sorted(k for rr, k in pairs if rr == r) for r in range(8)} == expected
    assert 3 not in [k for _, k in pairs]  # never the last step
    # one backward per (image, step), each the PPO term / (8 images x 2 steps)
    assert len(spy.backwards) == len(spy.ppo) == 16
    for loss, term in zip(spy.backwards, spy.ppo, strict=True):
        torch.testing.assert_close(loss, term / 16, rtol=0, atol=0)
    terms = torch.stack(spy.ppo)
    assert terms.abs().max() > 0.1  # single images' terms (-A on policy), not a vanishing mean
    row = _metrics(tmp_path)[-1]
    assert row["train/trained_steps"] == 2.0
    # the logged loss is the same mean (about 0 here: on policy it is -mean A)
    assert row["train/loss"] == pytest.approx(float(terms.mean()), abs=1e-6)


def test_random_steps_of_a_whole_pool_train_as_the_first_steps_do(tmp_path):
    """timestep_fraction 1 draws every step but the last for every image: the same update, bit for bit, as the first
    3 of the 4 steps (timestep_fraction 0.75, timestep_selection first)."""
    weights = []
    for name, extra in (
        ("random", ["flow_grpo.timestep_selection=random", "flow_grpo.timestep_fraction=1.0"]),
        ("first", ["flow_grpo.timestep_fraction=0.75"]),
    ):
        trainer = build_trainer(
            PRESET,
            [
                f"output_dir={tmp_path / name}",
                f"data.train={PROMPTS}",
                "max_steps=1",
                "data.eval_size=0",
                *extra,
            ],
        )
        before = [p.detach().clone() for p in trainer.params]
        trainer.train()
        assert _metrics(tmp_path / name)[-1]["train/trained_steps"] == 3.0
        weights.append([p.detach().clone() for p in trainer.params])
    assert any(not torch.equal(a, b) for a, b in zip(before, weights[0], strict=True))
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["flow_grpo.timestep_selection=last"],
            "flow_grpo.timestep_selection='last' must be first or random",
        ),
        (
            [*RANDOM, "flow_grpo.sde_window=2"],
            "flow_grpo.timestep_selection=random draws each image's steps among all stochastic steps, and "
            "flow_grpo.sde_window=2",
        ),
        ([*RANDOM, "flow_grpo.trajectory_ratio=true"], "needs the same steps in every trajectory"),
        ([*RANDOM, "sample.num_steps=1", "sample.eval_num_steps=1"], "sample.num_steps=1 leaves none"),
    ],
)
def test_bad_timestep_selection_raises_one_sentence(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(PRESET, [f"output_dir={tmp_path}", *overrides])


def test_random_steps_in_micro_batches_of_several_images_are_refused_where_forwards_must_match():
    """A micro-batch of several images runs one forward per step any of them trains, so processes run different
    numbers of forwards: refused under FSDP and ZeRO-2 (which need the same on every process), allowed with micro-
    batches of one image (the reference's) and under DDP or ZeRO-1."""
    from diffrl.config import validate

    cfg = load_config(PRESET, [f"data.train={PROMPTS}", *RANDOM])  # train_batch_size 4
    message = (
        "flow_grpo.timestep_selection=random with optim.train_batch_size=4 gives the processes different"
    )
    with pytest.raises(
        ConfigError, match=re.escape(message) + ".*deadlocks FSDP; set optim.train_batch_size=1"
    ):
        validate(cfg, 2, sharded=True)
    with pytest.raises(ConfigError, match="deadlocks ZeRO-2's gradient reduction"):
        validate(cfg, 2, zero_stage=2)
    validate(cfg, 2)  # DDP
    validate(cfg, 2, zero_stage=1)
    one = load_config(PRESET, [f"data.train={PROMPTS}", *RANDOM, "optim.train_batch_size=1"])
    validate(one, 2, sharded=True)
    validate(one, 2, zero_stage=2)
