"""The trainers learn: from the shipped toy model and a fixed seed, held-out strict accuracy rises (slow, CPU).

Each trainer runs its preset (``configs/toy/<algorithm>.yaml``, all three CFG-free, so they share the base model's
held-out accuracy) for a fixed budget and is evaluated on the held-out prompts of ``configs/toy/eval.jsonl``
(96 unseen compositions, fixed per-image seeds) before and after.

Why the margins are beyond evaluation noise: an accuracy measured on m images has a standard error of at most
sqrt(0.25 / m), so a difference of two independent measurements at most sqrt(0.5 / m). DiffusionNFT is evaluated
on 96 images (one per prompt): at most 0.072, and its margin 0.15 is more than two of those. Flow-GRPO learns
more slowly per sample, so it is evaluated on 288 images (``sample.eval_images_per_prompt=3``): at most 0.042,
and its margin 0.09 is more than two of those. ReFL (DRaFT through the whole chain on ``shapes_soft``, the
differentiable relaxation of the verifier) gains least, so it is evaluated on 384 images (4 per prompt): at most
0.036, and at the accuracies it moves between (0.13 -> 0.23) about 0.028, so its margin 0.06 is more than two
standard errors at those accuracies (1.7 of the worst case). The before and after images share prompts and noise,
which makes the real error of the difference smaller still. The partial credit must rise as well.
"""

import json

import pytest

from diffrl.demo import ACCURACY_KEY, DEFAULT_CONFIG, PARTIAL_KEY, read_metrics
from diffrl.train import build_trainer

TOY = DEFAULT_CONFIG.parent
# algorithm: (overrides, margin, held-out images); measured on one CPU core in the comments
BUDGET = {
    # about 6 minutes; measured: 0.104 -> 0.260 strict, 0.563 -> 0.715 partial
    "diffusion_nft": (["max_steps=150"], 0.15, 96),
    # 20 480 training images, about 30 minutes; measured: 0.142 -> 0.247 strict, 0.569 -> 0.703 partial (after
    # 100 steps it had gained only 0.142 -> 0.215 strict, 0.569 -> 0.666 partial)
    "flow_grpo": (["max_steps=160", "sample.eval_images_per_prompt=3"], 0.09, 288),
    # 12 800 training images (400 steps of 32), about 18 minutes; measured: 0.133 -> 0.195 strict (+0.0625, just
    # above the margin, which was set from the noise estimate before the run), 0.564 -> 0.618 partial; the same
    # run peaked at 0.227 at step 380 (benchmarks/bench_learning.py)
    "refl": (["max_steps=400", "sample.eval_images_per_prompt=4"], 0.06, 384),
    # 4 800 training images (150 steps of 32), about 11 minutes on a loaded 2-core CPU; measured: 0.142 -> 0.271
    # strict, 0.569 -> 0.720 partial (the margin on 288 images is Flow-GRPO's)
    "awm": (["max_steps=150", "sample.eval_images_per_prompt=3"], 0.09, 288),
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(BUDGET))
def test_trainer_raises_held_out_accuracy(algorithm, tmp_path):
    overrides, margin, images = BUDGET[algorithm]
    out = tmp_path / algorithm
    trainer = build_trainer(
        str(TOY / f"{algorithm}.yaml"),
        [f"output_dir={out}", "report_to=none", "eval_every=0", "checkpointing_steps=0", *overrides],
    )
    assert len(trainer.eval_set) * trainer.cfg.sample.eval_images_per_prompt == images
    trainer.train()
    evals = [r for r in read_metrics(out / "metrics.jsonl") if ACCURACY_KEY in r]
    base, final = evals[0], evals[-1]
    summary = {k: (base[k], final[k]) for k in (ACCURACY_KEY, PARTIAL_KEY)}
    print(algorithm, json.dumps(summary))
    assert final[ACCURACY_KEY] - base[ACCURACY_KEY] >= margin, summary
    assert final[PARTIAL_KEY] > base[PARTIAL_KEY], summary


@pytest.mark.slow
def test_the_demo_preset_raises_held_out_accuracy_in_58_steps(tmp_path):
    """``configs/toy/demo.yaml`` (AWM fully fine-tuning ``toy:cliptext``), seed 1, for a sixth of its 348 steps (to
    its first evaluation): the held-out strict accuracy on its own 384 images rises by at least 0.09, about 2.6
    standard errors of the difference of two independent measurements at these accuracies (0.034). Measured: 0.268
    -> 0.445 strict, 0.655 -> 0.775 partial, about 1.5 minutes on one CPU core."""
    out = tmp_path / "demo"
    trainer = build_trainer(
        str(DEFAULT_CONFIG),
        [f"output_dir={out}", "report_to=none", "seed=1", "max_steps=58", "checkpointing_steps=0"],
    )
    assert len(trainer.eval_set) * trainer.cfg.sample.eval_images_per_prompt == 384
    trainer.train()
    evals = [r for r in read_metrics(out / "metrics.jsonl") if ACCURACY_KEY in r]
    assert [r["step"] for r in evals] == [0, 58]
    base, final = evals
    summary = {k: (base[k], final[k]) for k in (ACCURACY_KEY, PARTIAL_KEY)}
    print("demo", json.dumps(summary))
    assert final[ACCURACY_KEY] - base[ACCURACY_KEY] >= 0.09, summary
    assert final[PARTIAL_KEY] > base[PARTIAL_KEY], summary


# The second-wave trainers gain less per image on the toy world (benchmarks/bench_learning.py, 3 seeds: 2.6-4.7
# points of strict accuracy after 3 200 images), too little to tell from noise by comparing two strict accuracies
# of a feasible evaluation. Their test compares the same held-out images before and after instead: the trainer
# evaluates 7 fixed seeds per prompt (672 images) at step 0 and at the end, from the same noise, and the test keeps
# each image's score. The per-image differences of the verifier's partial credit give a paired statistic
# z = mean(d) / (std(d) / sqrt(672)); z >= 3 is a rise with a one-sided error probability of about 0.1%. The
# strict accuracy must not fall. Budgets are the benchmark's (3 200 images) or the preset's own (online DPO: its
# 50 steps, 1 200 images; past about 80 steps it diverges, docs/trainers/dpo.md); measured on one CPU core in the
# comments.
PAIRED = {
    # 25 steps of 128 images; measured: partial credit 0.567 -> 0.606 (z 5.2), strict 0.131 -> 0.173 (z 3.4)
    "mixgrpo": ["max_steps=25"],
    # 25 steps of 128 images; measured: partial credit 0.567 -> 0.603 (z 4.8), strict 0.131 -> 0.167 (z 2.8)
    "grpo_guard": ["max_steps=25"],
    # 40 steps of 128 images (5 120); measured: partial credit 0.567 -> 0.594 (z 3.9), strict 0.131 -> 0.167 (z 3.1).
    # At 25 steps it measured 0.567 -> 0.588, z 2.97, short of the bar, so its budget was raised, not the bar lowered
    "pref_grpo": ["max_steps=40"],
    # the preset's 50 steps of 24 images; measured: partial credit 0.567 -> 0.593 (z 4.5), strict 0.131 -> 0.152
    # (z 2.2)
    "dpo": [],
}
PAIRED_Z = 3.0


def paired_z(before: list[float], after: list[float]) -> float:
    """Mean of the per-image differences ``after - before`` over its standard error (sample standard deviation
    over sqrt(n)); inf when every difference is the same positive number."""
    import statistics

    d = [a - b for a, b in zip(after, before, strict=True)]
    sd = statistics.stdev(d)
    mean = statistics.fmean(d)
    return mean / (sd / len(d) ** 0.5) if sd > 0 else (float("inf") if mean > 0 else 0.0)


def test_paired_z_hand_computed():
    # differences 0.1, 0.3, 0.2: mean 0.2, sample std 0.1, z = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3
    assert paired_z([0.5, 0.2, 0.4], [0.6, 0.5, 0.6]) == pytest.approx(2 * 3**0.5)
    assert paired_z([0.0, 0.0], [1.0, 1.0]) == float("inf")
    assert paired_z([0.5, 0.5], [0.5, 0.5]) == 0.0


def _paired_before_after(trainer) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Train and return each held-out image's ``partial`` and ``strict`` scores from the trainer's own first and
    last evaluations (the same 672 images' noise both times)."""
    assert len(trainer.eval_set) * trainer.cfg.sample.eval_images_per_prompt == 672
    scores: dict[int, dict[str, list[float]]] = {}
    evaluate_reward = trainer.evaluate_reward

    def keep(reward, images, prompts, **metadata):
        result = evaluate_reward(reward, images, prompts, **metadata)
        if reward is trainer.eval_reward:
            mine = scores.setdefault(trainer.step, {"partial": [], "strict": []})
            mine["partial"] += result.components["shapes_verifier"].float().tolist()
            mine["strict"] += result.components["shapes_accuracy"].float().tolist()
        return result

    trainer.evaluate_reward = keep
    trainer.train()
    first, last = min(scores), max(scores)
    assert (first, last) == (0, trainer.cfg.max_steps)
    return scores[first], scores[last]


def _assert_paired_rise(name: str, before: dict[str, list[float]], after: dict[str, list[float]]) -> None:
    z = paired_z(before["partial"], after["partial"])
    z_strict = paired_z(before["strict"], after["strict"])
    mean = {k: (sum(before[k]) / 672, sum(after[k]) / 672) for k in before}
    print(name, json.dumps({"mean": mean, "z_partial": z, "z_strict": z_strict}))
    assert len(before["partial"]) == len(after["partial"]) == 672
    assert z >= PAIRED_Z, (mean, z)
    assert mean["strict"][1] >= mean["strict"][0], (mean, z_strict)


_PAIRED_OVERRIDES = [
    "report_to=none",
    "eval_every=0",
    "checkpointing_steps=0",
    "sample.eval_images_per_prompt=7",
]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PAIRED))
def test_second_wave_trainer_raises_held_out_credit_paired(preset, tmp_path):
    out = tmp_path / preset
    trainer = build_trainer(
        str(TOY / f"{preset}.yaml"), [f"output_dir={out}", *_PAIRED_OVERRIDES, *PAIRED[preset]]
    )
    _assert_paired_rise(preset, *_paired_before_after(trainer))


# Offline Diffusion-DPO on a preference dataset the toy model makes itself (scripts/make_toy_preferences.py: the
# first 256 training prompts x 8 images, the verifier's strict score as the judge, one pair per prompt with a right
# and a wrong image: 167 pairs), 100 steps of 16 pairs (about 10 epochs); the same paired test as above. Measured
# (one CPU core, 4 min 17 s in all): partial credit 0.567 -> 0.599 (z 4.2), strict 0.131 -> 0.171 (z 3.1).
OFFLINE_DPO = {"prompts": 256, "images": 8, "overrides": ["max_steps=100", "dpo.pairs_per_step=16"]}


@pytest.mark.slow
def test_offline_dpo_raises_held_out_credit_paired(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_toy_preferences", TOY.parent.parent / "scripts" / "make_toy_preferences.py"
    )
    prefs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prefs)
    n_pairs = prefs.make_toy_preferences(
        tmp_path / "prefs", prompts=OFFLINE_DPO["prompts"], images=OFFLINE_DPO["images"]
    )
    print("offline dpo pairs", n_pairs)
    trainer = build_trainer(
        str(TOY / "dpo.yaml"),
        [
            f"output_dir={tmp_path / 'run'}",
            *_PAIRED_OVERRIDES,
            "dpo.mode=offline",
            f"dpo.dataset={tmp_path / 'prefs' / 'prefs.jsonl'}",
            *OFFLINE_DPO["overrides"],
        ],
    )
    _assert_paired_rise("dpo offline", *_paired_before_after(trainer))
