"""MixGRPO's sliding window and GRPO-Guard, the two Flow-GRPO options of issue 17.

* the window position per training step against hand-written schedules (the official MixGRPO state machine
  re-stated in the test, its end behaviour, stride 0), the trainer's window for the tiny preset;
* only the window's steps are stochastic, carry log-probs and are trained; dpm2 after the window against hand-run
  steps;
* GRPO-Guard's normalised log-ratio against its formula on hand-made tensors, its analytic properties (exactly
  ``mean_d(z (mu - mu_old))``, no left shift, the same scale at every step), the on-policy loss and gradient
  (the plain ones times the step's std and weight), the 1 / |dt| weights;
* the config's one-sentence errors;
* slow: the toy world with plain Flow-GRPO, MixGRPO and GRPO-Guard from the same seed for the same steps.
"""

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.samplers import dpm2_step, ode_step, rollout, sde_step
from diffrl.samplers.steps import gaussian_log_prob
from diffrl.train import build_trainer
from diffrl.trainers.flow_grpo import FlowGRPOTrainer, sliding_window_start
from diffrl.trainers.objectives import (
    grpo_guard_loss,
    guard_log_ratio,
    guard_step_weight,
    ppo_clip_loss,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "flow_grpo.yaml"
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")
SLIDING = ["flow_grpo.sde_window=2", "flow_grpo.window_schedule=sliding", "flow_grpo.window_shift_every=1"]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    import os

    os.environ.setdefault("DIFFRL_CACHE", str(tmp_path_factory.mktemp("diffrl-cache")))


# ---------------------------------------------------------------------------------------------- the schedule


def _official_states(steps: int, *, every: int, group: int, stride: int, max_ts: int, roll_back: bool):
    """MixGRPO's GRPOTrainingStates ("progressive", prog_overlap), re-stated: the window of each training step."""
    cur, it, out = 0, 0, []
    for _ in range(steps):
        out.append(list(range(cur, min(cur + group, max_ts))))
        it += 1
        if it >= every:
            it, cur = 0, cur + stride
        if cur > max_ts:
            cur = 0 if roll_back else max_ts
    return out


def test_sliding_window_follows_mixgrpos_schedule_while_the_window_is_whole():
    # scripts/finetune/finetune_flux_grpo_MixGRPO.sh: 25 sampling steps, window 4, 25 iterations per move, stride 1,
    # roll_back; the official states run 300 training steps (max_train_steps), the window moving 0 -> 11
    official = _official_states(300, every=25, group=4, stride=1, max_ts=23, roll_back=True)
    # diffrl's starts: every window that ends before the last step, [0, 25 - 1 - 4 + 1) = [0, 21)
    ours = [sliding_window_start(t, 0, 21, shift_every=25, stride=1) for t in range(300)]
    assert [w[0] for w in official] == ours
    assert all(len(w) == 4 for w in official)
    assert ours[0] == ours[24] == 0 and ours[25] == 1 and ours[299] == 11


def test_sliding_window_end_wraps_or_stays():
    # hand-written: starts 0, 2, 4, 6 in [0, 7), two steps each
    wrap = [sliding_window_start(t, 0, 7, shift_every=2, stride=2) for t in range(12)]
    stay = [sliding_window_start(t, 0, 7, shift_every=2, stride=2, end="stay") for t in range(12)]
    assert wrap == [0, 0, 2, 2, 4, 4, 6, 6, 0, 0, 2, 2]
    assert stay == [0, 0, 2, 2, 4, 4, 6, 6, 6, 6, 6, 6]
    # a range that starts later: lo 3, starts 3, 4, 5
    assert [sliding_window_start(t, 3, 6, shift_every=1, stride=1) for t in range(7)] == [3, 4, 5, 3, 4, 5, 3]
    # stride 0 (MixGRPO-Flash*, prog_overlap_step=0): the window never moves
    assert {sliding_window_start(t, 1, 9, shift_every=3, stride=0) for t in range(50)} == {1}
    with pytest.raises(ValueError, match="widen flow_grpo.sde_window_range"):
        sliding_window_start(0, 4, 4, shift_every=1, stride=1)


def test_official_end_behaviour_differs_only_where_its_window_shrinks():
    # The official window is range(cur, min(cur + W, T - 2)): it never holds step T - 2 (nor the last step), its
    # last positions shrink (the very last is empty) and it rolls back to 0 once cur > T - 2. diffrl keeps every
    # window whole and ending before the last step (T - 1), so its last start is T - 1 - W, and wraps right after.
    T, W = 10, 3
    official = _official_states(40, every=2, group=W, stride=1, max_ts=T - 2, roll_back=True)
    ours = [sliding_window_start(t, 0, T - 1 - W + 1, shift_every=2, stride=1) for t in range(40)]
    first_cut = next(i for i, w in enumerate(official) if len(w) < W)
    assert [w[0] for w in official[:first_cut]] == ours[:first_cut]  # the same whole windows up to here
    assert ours[first_cut] == official[first_cut][0] == T - 1 - W  # the same start; theirs cut to 2 steps
    assert official[first_cut] == [6, 7] and len(official[first_cut]) == W - 1
    assert ours[first_cut + 2] == 0 and official[first_cut + 2] == [7]  # ours wrapped, theirs shrank again
    assert official[first_cut + 4] == [] and official[first_cut + 6] == [0, 1, 2]  # an empty window, then 0
    assert ours[first_cut + 2 : first_cut + 2 + first_cut] == ours[:first_cut]  # ours repeats with period 14


def _window_of(step: int, *overrides: str) -> tuple[int, int]:
    cfg = load_config(PRESET, [f"data.train={PROMPTS}", *overrides])
    return FlowGRPOTrainer._window(SimpleNamespace(cfg=cfg, step=step), cfg.sample.num_steps)


def test_trainer_window_per_step():
    # tiny preset: 4 sampling steps, window 2: whole windows before the last step start at 0 or 1
    assert [_window_of(t, *SLIDING) for t in range(5)] == [(0, 2), (1, 3), (0, 2), (1, 3), (0, 2)]
    cps = [*SLIDING, "flow_grpo.sampler=cps", "flow_grpo.sde_window=1", "flow_grpo.window_shift_every=2"]
    assert [_window_of(t, *cps)[0] for t in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    ranged = [*SLIDING, "flow_grpo.sde_window=1", "flow_grpo.sde_window_range=[1, 9]"]
    assert [_window_of(t, *ranged)[0] for t in range(4)] == [
        1,
        2,
        1,
        2,
    ]  # hi lowered to fit before the last step
    with pytest.raises(ValueError, match="sde_window=4 does not fit"):
        _window_of(0, *SLIDING, "flow_grpo.sde_window=4")


# ---------------------------------------------------------------------------------------------- trained steps


def test_only_the_window_is_stochastic_and_trained(tmp_path, monkeypatch):
    trainer = build_trainer(
        PRESET,
        [f"output_dir={tmp_path}", f"data.train={PROMPTS}", "data.eval_size=0", "max_steps=2", *SLIDING],
    )
    import diffrl.trainers.flow_grpo as module

    seen, rollouts = [], []
    step_outputs = FlowGRPOTrainer._step_outputs
    real_rollout = module.rollout

    def recording_step_outputs(self, x, x_next, k, *args, **kw):
        seen.append(k)
        return step_outputs(self, x, x_next, k, *args, **kw)

    def recording_rollout(*args, **kw):
        out = real_rollout(*args, **kw)
        rollouts.append(out)
        return out

    monkeypatch.setattr(FlowGRPOTrainer, "_step_outputs", recording_step_outputs)
    monkeypatch.setattr(module, "rollout", recording_rollout)
    for step, window in ((0, [0, 1]), (1, [1, 2])):
        seen.clear(), rollouts.clear()
        trainer.step = step
        metrics = trainer.train_step(step)
        assert sorted(set(seen)) == window  # log-probs (and the KL's reference pass) only at the window
        assert metrics["train/trained_steps"] == 2 and metrics["train/window_start"] == window[0]
        for out in rollouts:
            assert out.stochastic.tolist() == [k in window for k in range(4)]
            assert torch.isfinite(out.log_probs[:, window]).all()
            others = [k for k in range(4) if k not in window]
            assert torch.isnan(out.log_probs[:, others]).all()


class _Linear:
    """v = a x + b c: an analytic velocity model."""

    def velocity(self, x, sigma, cond, guidance_scale=1.0):
        return 0.3 * x + 0.1 * cond


def test_dpm2_after_the_window_matches_hand_run_steps():
    torch.manual_seed(0)
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    x0, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    model = _Linear()
    out = rollout(
        model,
        cond,
        sigmas,
        x0,
        sampler="sde",
        sde_window=(1, 2),
        solver="dpm2",
        generator=torch.Generator().manual_seed(1),
        keep_means=True,
    )
    # by hand: Euler before the window, the SDE step at 1, dpm2 with the previous data prediction after it, the
    # first-order step to 0
    x = x0.clone()
    g = torch.Generator().manual_seed(1)
    steps, x0_hat_prev = [x], None
    for k in range(5):
        s, s_next = sigmas[k], sigmas[k + 1]
        v = model.velocity(x, s, cond)
        x0_hat = x - s * v
        if k == 0:
            x = ode_step(x, v, s, s_next).sample
        elif k == 1:
            x = sde_step(x, v, s, s_next, 0.7, generator=g).sample
        elif k < 4:
            x = dpm2_step(x, x0_hat, x0_hat_prev, sigmas[k - 1], s, s_next).sample
        else:
            x = dpm2_step(x, x0_hat, x0_hat, s, s, s_next).sample
        x0_hat_prev = x0_hat
        steps.append(x)
    torch.testing.assert_close(out.latents, torch.stack(steps, 1), rtol=0, atol=1e-6)
    assert out.stochastic.tolist() == [False, True, False, False, False]
    # the kept means: the SDE step's mean is its sample minus the noise, the deterministic steps' their sample
    torch.testing.assert_close(out.means[:, 0], out.latents[:, 1])
    assert not torch.equal(out.means[:, 1], out.latents[:, 2])
    # the same rollout with Euler after the window differs only after it
    euler = rollout(
        model, cond, sigmas, x0, sampler="sde", sde_window=(1, 2), generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(euler.latents[:, :3], out.latents[:, :3])
    assert not torch.allclose(euler.latents[:, 3:], out.latents[:, 3:])


# ---------------------------------------------------------------------------------------------- GRPO-Guard


def test_guard_log_ratio_equals_its_formula_on_hand_tensors():
    lp = torch.tensor([-1.0, 0.5])
    old = torch.tensor([-1.5, 0.5])
    mu = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mu_old = torch.tensor([[0.0, 2.0], [0.5, -0.5]])
    std = torch.tensor([0.5, 2.0]).reshape(2, 1)
    # sample 0: 0.5 * 0.5 + mean(1, 0) / (2 * 0.5) = 0.25 + 0.5 = 0.75
    # sample 1: 2 * 0 + mean(0.25, 0.25) / (2 * 2) = 0.0625
    got = guard_log_ratio(lp, old, mu, mu_old, std)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.75, 0.0625]), rtol=0, atol=1e-7)
    # bf16 inputs are computed in float32
    assert guard_log_ratio(lp.bfloat16(), old, mu.bfloat16(), mu_old, 0.5).dtype == torch.float32


def _transition(delta: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu_old = torch.randn(3, 4, 8, 8, generator=g)
    change = 0.05 * torch.randn(3, 4, 8, 8, generator=g)
    z = torch.randn(3, 4, 8, 8, generator=g)
    return mu_old, mu_old + change, z, torch.full((3, 1, 1, 1), delta)


@pytest.mark.parametrize("delta", [0.02, 0.3, 1.5])
def test_guard_log_ratio_is_the_noise_projection_of_the_mean_change(delta):
    mu_old, mu, z, std = _transition(delta)
    x = mu_old + std * z
    lp, old = gaussian_log_prob(x, mu, std), gaussian_log_prob(x, mu_old, std)
    guard = guard_log_ratio(lp, old, mu, mu_old, std)
    # analytic: delta (logp - logp_old) + mse / (2 delta) = mean_d(z (mu - mu_old)), whatever delta
    torch.testing.assert_close(guard, (z * (mu - mu_old)).mean(dim=(1, 2, 3)), rtol=1e-3, atol=1e-6)
    # the left shift: over the antithetic pair z, -z the plain log-ratio averages -mse / (2 delta^2), the guard 0
    lp_neg = gaussian_log_prob(mu_old - std * z, mu, std)
    old_neg = gaussian_log_prob(mu_old - std * z, mu_old, std)
    mse = ((mu - mu_old) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(
        ((lp - old) + (lp_neg - old_neg)) / 2, -mse / (2 * delta**2), rtol=1e-3, atol=1e-6
    )
    guard_neg = guard_log_ratio(lp_neg, old_neg, mu, mu_old, std)
    torch.testing.assert_close(guard + guard_neg, torch.zeros(3), rtol=0, atol=1e-5 * max(1.0, 1 / delta))


def test_guard_log_ratio_has_the_same_scale_at_every_step():
    # the same mean change and noise at a step of std 0.02 and one of std 1.5: the plain log-ratios differ by ~75x,
    # the normalised ones agree
    a, b = _transition(0.02), _transition(1.5)
    ratios = []
    for mu_old, mu, z, std in (a, b):
        x = mu_old + std * z
        lp, old = gaussian_log_prob(x, mu, std), gaussian_log_prob(x, mu_old, std)
        ratios.append((lp - old, guard_log_ratio(lp, old, mu, mu_old, std)))
    (plain_a, guard_a), (plain_b, guard_b) = ratios
    assert (plain_a.abs() / plain_b.abs()).min() > 20
    torch.testing.assert_close(guard_a, guard_b, rtol=1e-3, atol=1e-6)


def test_guard_on_policy_loss_and_gradient_are_the_plain_ones_scaled_by_std_and_weight():
    torch.manual_seed(0)
    mu_old, _, z, std = _transition(0.3)
    std = torch.tensor([0.1, 0.3, 0.9]).reshape(3, 1, 1, 1)
    x = mu_old + std * z
    adv = torch.tensor([1.0, -0.5, 2.0])
    direction = torch.randn_like(mu_old)
    weight = guard_step_weight(0.6, 0.45)  # 1 / 0.15

    def loss_and_grad(kind):
        theta = torch.zeros((), requires_grad=True)
        mu = mu_old + theta * direction  # on-policy at theta = 0
        lp, old = gaussian_log_prob(x, mu, std), gaussian_log_prob(x, mu_old, std)
        if kind == "plain":
            stats = ppo_clip_loss(lp, old, adv, clip_range=1e-4)
        else:
            stats = grpo_guard_loss(
                lp, old, adv, mean=mu, old_mean=mu_old, std=std, step_weight=weight, clip_range=1e-4
            )
        (g,) = torch.autograd.grad(stats.loss, theta)
        return stats, g

    plain, g_plain = loss_and_grad("plain")
    guard, g_guard = loss_and_grad("guard")
    assert (
        torch.equal(guard.ratio, torch.ones(3)) and float(guard.clipfrac) == 0 and float(guard.approx_kl) == 0
    )
    torch.testing.assert_close(guard.loss, weight * plain.loss)  # -w mean(A)
    torch.testing.assert_close(plain.loss, -adv.mean())
    # per sample: d log r / d theta = mean_d(z direction) / delta (plain), mean_d(z direction) (guard)
    proj = (z * direction).mean(dim=(1, 2, 3))
    torch.testing.assert_close(g_plain, -(adv * proj / std.flatten()).mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_guard, -weight * (adv * proj).mean(), rtol=1e-4, atol=1e-7)


def test_guard_without_its_options_is_the_plain_loss():
    lp, old = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.00002, -1.99, -0.5])
    adv = torch.tensor([1.0, -1.0, 0.5])
    a = grpo_guard_loss(lp, old, adv, ratio_norm=False, clip_range=1e-4, clip_range_high=3e-4)
    b = ppo_clip_loss(lp, old, adv, clip_range=1e-4, clip_range_high=3e-4)
    assert (
        torch.equal(a.loss, b.loss) and torch.equal(a.ratio, b.ratio) and torch.equal(a.clipfrac, b.clipfrac)
    )
    with pytest.raises(ValueError, match="needs the transition means"):
        grpo_guard_loss(lp, old, adv)


def test_guard_step_weight_is_one_over_the_step_length():
    assert float(guard_step_weight(1.0, 0.75)) == 4.0
    assert float(guard_step_weight(torch.tensor(0.5), torch.tensor(0.0))) == 2.0
    levels = torch.tensor([1.0, 0.9, 0.7, 0.4, 0.0])
    w = torch.stack([guard_step_weight(levels[k], levels[k + 1]) for k in range(4)])
    # each step's weight times its length is 1: the weighted steps all count the same
    torch.testing.assert_close(w * (levels[:-1] - levels[1:]), torch.ones(4))
    with pytest.raises(ValueError, match="has no length"):
        guard_step_weight(0.5, 0.5)


def test_guard_first_update_is_on_policy_and_the_second_part_is_not(tmp_path):
    trainer = build_trainer(
        PRESET,
        [
            f"output_dir={tmp_path}",
            f"data.train={PROMPTS}",
            "data.eval_size=0",
            "max_steps=1",
            "flow_grpo.ratio_norm=true",
            "flow_grpo.grad_reweight=true",
        ],
    )
    metrics = trainer.train_step(0)
    assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0
    assert metrics["train/clipfrac"] == 0.0 and metrics["train/grad_norm"] > 0


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["flow_grpo.window_schedule=progressive"],
            "window_schedule='progressive' must be random or sliding",
        ),
        (["flow_grpo.window_schedule=sliding"], "sde_window=0 makes every step stochastic"),
        (["flow_grpo.window_end=clip"], "window_end='clip' must be wrap or stay"),
        (["flow_grpo.post_window_solver=dpm3"], "post_window_solver='dpm3' must be euler or dpm2"),
        (["flow_grpo.post_window_solver=dpm2"], "sde_window=0 leaves none"),
        (["flow_grpo.window_shift_every=0"], "window_shift_every=0 must be at least 1"),
        (["flow_grpo.window_stride=-1"], "window_stride=-1 must be at least 0"),
        (
            ["flow_grpo.ratio_norm=true", "flow_grpo.trajectory_ratio=true"],
            "ratio_norm=true acts on each step's ratio",
        ),
        (
            ["flow_grpo.grad_reweight=true", "flow_grpo.trajectory_ratio=true"],
            "grad_reweight=true acts on each step's ratio",
        ),
    ],
)
def test_bad_values_raise_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESET, [f"data.train={PROMPTS}", *overrides])


# ---------------------------------------------------------------------------------------------- toy world (slow)

TOY_VARIANTS = {
    "flow_grpo": [],
    # MixGRPO: a 2-step window sliding over the 8 steps, one place every 5 steps (starts 0..5 in 30 steps)
    "mixgrpo": [
        "flow_grpo.sde_window=2",
        "flow_grpo.window_schedule=sliding",
        "flow_grpo.window_shift_every=5",
    ],
    "grpo_guard": ["flow_grpo.ratio_norm=true", "flow_grpo.grad_reweight=true"],
}


@pytest.mark.slow
def test_toy_world_plain_mixgrpo_and_guard_from_one_seed(tmp_path):
    # measured on one CPU core (about 19 minutes): strict 0.104 -> 0.125 plain (14.4 s a step), 0.104 -> 0.115
    # MixGRPO (8.0 s a step), 0.104 -> 0.146 GRPO-Guard (12.7 s a step): within the noise of 96 held-out images
    from diffrl.demo import ACCURACY_KEY, DEFAULT_CONFIG, PARTIAL_KEY, read_metrics

    results = {}
    for name, extra in TOY_VARIANTS.items():
        out = tmp_path / name
        trainer = build_trainer(
            str(DEFAULT_CONFIG.parent / "flow_grpo.yaml"),
            [
                f"output_dir={out}",
                "report_to=none",
                "eval_every=0",
                "checkpointing_steps=0",
                "max_steps=30",
                *extra,
            ],
        )
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        rows = read_metrics(out / "metrics.jsonl")
        evals = [r for r in rows if ACCURACY_KEY in r]
        steps = [r["time/step_seconds"] for r in rows if "time/step_seconds" in r]
        results[name] = {
            "strict": (evals[0][ACCURACY_KEY], evals[-1][ACCURACY_KEY]),
            "partial": (evals[0][PARTIAL_KEY], evals[-1][PARTIAL_KEY]),
            "wall_s": round(wall, 1),
            "step_s": round(sum(steps) / len(steps), 2),
            "trained_steps": [r for r in rows if "train/trained_steps" in r][-1]["train/trained_steps"],
        }
    print(json.dumps(results))
    (Path("/tmp") / "mixgrpo_toy_results.json").write_text(json.dumps(results, indent=1))
    base = results["flow_grpo"]["strict"][0]
    # the same seed, model and held-out set: every run starts from the same accuracy
    assert all(r["strict"][0] == base for r in results.values())
    # MixGRPO trains 2 steps per trajectory instead of 7, so its steps are faster
    assert results["mixgrpo"]["step_s"] < results["flow_grpo"]["step_s"]
    # no run collapses: at most two standard errors (2 * sqrt(0.25 / 96) = 0.10) under the base accuracy
    for r in results.values():
        assert r["strict"][1] >= base - 2 * math.sqrt(0.25 / 96), results


TINY_VARIANTS = {
    "pref_grpo": [
        "flow_grpo.kl_beta=0",
        "flow_grpo.advantage=winrate",
        "flow_grpo.timestep_selection=random",
        "flow_grpo.timestep_fraction=0.7",
        "flow_grpo.ratio_norm=true",
        "flow_grpo.grad_reweight=true",
    ],
    "mixgrpo": [
        "flow_grpo.sde_window=2",
        "flow_grpo.window_schedule=sliding",
        "flow_grpo.window_shift_every=1",
        "flow_grpo.post_window_solver=dpm2",
    ],
    "grpo_guard": [
        "flow_grpo.kl_beta=0",
        "flow_grpo.ratio_norm=true",
        "flow_grpo.grad_reweight=true",
        "flow_grpo.num_minibatches=2",
        "flow_grpo.old_logp=recompute",
    ],
}


@pytest.mark.parametrize(
    "folder, name",
    [("tiny", n) for n in sorted(TINY_VARIANTS)] + [("toy", n) for n in ("grpo_guard", "mixgrpo")],
)
def test_variant_presets_are_the_flow_grpo_preset_with_the_tested_options(folder, name):
    """configs/<tiny|toy>/<variant>.yaml is configs/<tiny|toy>/flow_grpo.yaml with the options these tests and the
    slow toy runs use, and nothing else (but its output directory)."""
    import dataclasses

    extra = TINY_VARIANTS[name] if folder == "tiny" else TOY_VARIANTS[name]
    over = [f"data.train={PROMPTS}"] if folder == "tiny" else []
    preset = load_config(ROOT / "configs" / folder / f"{name}.yaml", [*over, "output_dir=x"])
    base = load_config(ROOT / "configs" / folder / "flow_grpo.yaml", [*over, "output_dir=x", *extra])
    assert dataclasses.asdict(preset) == dataclasses.asdict(base)
    assert extra  # the preset differs from the plain one
