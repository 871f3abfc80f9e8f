"""benchmarks/bench_learning.py: its trainers' presets load, and its summary over seeds is the hand-computed one."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from diffrl.config import load_config

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "benchmarks" / "bench_learning.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def curve(images, accuracies, seconds=None):
    seconds = seconds or [10 * i for i in images]
    return [
        {"step": i, "images": x, "train_cpu_seconds": s, "accuracy": a}
        for i, (x, a, s) in enumerate(zip(images, accuracies, seconds, strict=True))
    ]


# images per step of every variant: group x prompts (Flow-GRPO family 8 x 16, NFT and AWM 8 x 4), ReFL's 32 prompts
PER_STEP = {
    "diffusion_nft": 32,
    "flow_grpo": 128,
    "pref_grpo": 128,
    "mixgrpo": 128,
    "grpo_guard": 128,
    "refl": 32,
    "awm": 32,
    "dpo": 24,  # online DPO: 6 images x 4 prompts
}


@pytest.mark.parametrize("name", sorted(bench.VARIANTS))
def test_every_variant_loads_and_counts_its_images(name):
    preset, overrides = bench.VARIANTS[name]
    cfg = load_config(str(ROOT / "configs" / "toy" / f"{preset}.yaml"), overrides)
    assert bench.images_per_step(cfg) == PER_STEP[name]
    if name == "mixgrpo":
        assert cfg.flow_grpo.window_schedule == "sliding" and cfg.flow_grpo.sde_window == 2
    if name == "pref_grpo":
        assert cfg.flow_grpo.advantage == "winrate"
    if name == "grpo_guard":
        assert cfg.flow_grpo.ratio_norm and cfg.flow_grpo.grad_reweight
    if name == "dpo":
        assert cfg.dpo.mode == "online"


def test_first_reaching_interpolates_between_evaluations():
    c = curve([0, 100, 200], [0.10, 0.15, 0.25])
    assert bench.first_reaching(c, 0.20, "images") == pytest.approx(150.0)  # halfway from 0.15 to 0.25
    assert bench.first_reaching(c, 0.15, "images") == pytest.approx(100.0)
    assert bench.first_reaching(c, 0.30, "images") is None


def test_summary_over_seeds_is_the_hand_computed_one():
    runs = [
        {"algorithm": "a", "seed": 0, "eval_images": 672, "curve": curve([0, 100, 200], [0.10, 0.20, 0.30])},
        {"algorithm": "a", "seed": 1, "eval_images": 672, "curve": curve([0, 100, 200], [0.12, 0.16, 0.20])},
        {"algorithm": "b", "seed": 0, "eval_images": 672, "curve": curve([0, 400, 800], [0.10, 0.15, 0.25])},
    ]
    s = bench.summarise(runs, 0.10)["per_algorithm"]
    a, b = s["a"], s["b"]
    assert a["base"]["mean"] == pytest.approx(0.11) and a["final"]["mean"] == pytest.approx(0.25)
    # gains 0.20 and 0.08: mean 0.14, sample std sqrt(2 * 0.06^2 / 1)
    assert a["gain"]["mean"] == pytest.approx(0.14)
    assert a["gain"]["std"] == pytest.approx(math.sqrt(2 * 0.06**2))
    assert (a["gain"]["min"], a["gain"]["max"]) == pytest.approx((0.08, 0.20))
    # seed 0 gains 0.10 at 100 images (1000 s), seed 1 never does (target 0.22)
    assert a["images_to_gain"] == pytest.approx(100.0) and a["images_reached"] == "1/2"
    assert a["seconds_to_gain"] == pytest.approx(1000.0)
    # b reaches 0.20 halfway from 400 to 800 images: 600, six times a's 100
    assert b["images_to_gain"] == pytest.approx(600.0) and b["images_ratio"] == pytest.approx(6.0)
    assert a["images_ratio"] == pytest.approx(1.0) and b["gain"]["std"] == 0.0
    # pooled over a's 2 x 672 images: base 0.11, final 0.25, z = 0.14 / sqrt((0.11 * 0.89 + 0.25 * 0.75) / 1344)
    assert a["z"] == pytest.approx(0.14 / math.sqrt((0.11 * 0.89 + 0.25 * 0.75) / 1344))
    assert a["z"] == pytest.approx(9.61, abs=0.01)
    md = bench.table(bench.summarise(runs, 0.10))
    assert "| a | 0 1 | 672 | 11.0 +- 1.4 [10.0, 12.0] |" in md
    assert "| 9.6 |" in md
    assert "600 (1/1 seeds, 6.0x)" in md


def test_mean_curve_band_spans_the_seeds():
    runs = [
        {"curve": curve([0, 100], [0.10, 0.30], [0, 50])},
        {"curve": curve([0, 100], [0.20, 0.10], [0, 70])},
    ]
    xs, mean, lo, hi = bench.mean_curve(runs, "train_cpu_seconds")
    assert xs == pytest.approx([0, 60]) and mean == pytest.approx([0.15, 0.20])
    assert lo == pytest.approx([0.10, 0.10]) and hi == pytest.approx([0.20, 0.30])


def test_extend_continues_runs_as_one_uninterrupted_run(tmp_path):
    """--extend resumes each run from its last checkpoint: 2 steps, then on to 4, give the curve of 4 steps in one go
    (online DPO on the toy model, 4 held-out prompts; resume is bit-identical, so the evaluations agree exactly)."""
    common = ["--algorithms", "dpo", "--seeds", "0", "--eval-images-per-prompt", "1", "--threads", "0"]
    tiny = ["data.eval_size=4", "dpo.prompts_per_step=2", "dpo.group_size=4"]  # 8 images a step
    bench.main([*common, "--samples", "16", "--evals", "1", "--out", str(tmp_path / "short"), *tiny])
    extend = [*common, "--samples", "32", "--extend", str(tmp_path / "short" / "learning.json")]
    bench.main([*extend, "--out", str(tmp_path / "long")])
    bench.main([*common, "--samples", "32", "--evals", "2", "--out", str(tmp_path / "once"), *tiny])
    read = lambda d: json.loads((tmp_path / d / "learning.json").read_text())["runs"][0]  # noqa: E731
    short, long, once = read("short"), read("long"), read("once")
    assert [p["step"] for p in short["curve"]] == [0, 2]
    assert [p["step"] for p in long["curve"]] == [p["step"] for p in once["curve"]] == [0, 2, 4]
    assert [p["images"] for p in long["curve"]] == [0, 16, 32]
    assert [p["partial"] for p in long["curve"]] == [p["partial"] for p in once["curve"]]
    assert long["curve"][:2] == short["curve"] and long["extended_from"] == 2 and long["eval_images"] == 4
    # CPU seconds continue from the earlier run's
    assert long["curve"][2]["train_cpu_seconds"] > short["curve"][1]["train_cpu_seconds"]
    assert long["overrides"] == short["overrides"]
    with pytest.raises(SystemExit, match="exists already"):  # never writes over an earlier extension
        bench.main([*extend, "--out", str(tmp_path / "long")])
