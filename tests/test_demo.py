"""The embedded demo's code path (``diffrl demo``) for a couple of steps on the shipped toy model."""

import json

import pytest

from diffrl.cli.demo import main
from diffrl.config import load_config
from diffrl.demo import (
    DEFAULT_CONFIG,
    DEMO_OVERRIDES,
    accuracy_gain,
    fresh_output_dir,
    read_metrics,
    run_demo,
    showcase_order,
    threads_hint,
)


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    lines = DEFAULT_CONFIG.with_name("eval.jsonl").read_text().splitlines()[:6]
    path = tmp_path_factory.mktemp("prompts") / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_demo_runs_and_writes_its_outputs(tmp_path, small_eval, monkeypatch):
    out = tmp_path / "demo"
    lines = []
    monkeypatch.chdir(tmp_path)  # not the repository root: the preset's training prompt file is still found
    summary = run_demo(
        [
            f"output_dir={out}",
            "max_steps=2",
            "eval_every=0",
            f"data.eval={small_eval}",
            "report_to=none",
            "awm.prompts_per_step=2",
            "awm.group_size=2",
        ],
        n_pictures=3,
        log=lines.append,
    )
    for name in ("curves.png", "before_after.png", "metrics.jsonl", "demo_summary.json", "pipeline"):
        assert (out / name).exists(), name
    assert (out / "pipeline" / "model_index.json").is_file()  # the preset fully fine-tunes: no LoRA
    assert not (out / "lora").exists()
    assert any(f"{out / 'pipeline'} and" in line for line in lines)
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "eval/reward/shapes_accuracy/mean" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert summary["base_strict_accuracy"] == evals[0]["eval/reward/shapes_accuracy/mean"]
    assert summary["final_strict_accuracy"] == evals[-1]["eval/reward/shapes_accuracy/mean"]
    assert 0.0 <= summary["final_strict_accuracy"] <= 1.0 and summary["eval_prompts"] == 6
    assert json.loads((out / "demo_summary.json").read_text())["max_steps"] == 2
    assert 0 < summary["train_cpu_seconds"] <= summary["total_cpu_seconds"]
    # the preset samples 4 images a held-out prompt: the gain's error is over 24 images
    gain, se = accuracy_gain(summary["base_strict_accuracy"], summary["final_strict_accuracy"], 24)
    assert summary["eval_images"] == 24
    assert (summary["gain_points"], summary["gain_standard_error_points"]) == (gain, se)
    assert any("held-out strict accuracy: base" in line and "over 24 images" in line for line in lines)
    assert any("2 steps, evaluation of held-out prompts every 2 steps" in line for line in lines)
    assert any(r.get("reward/shapes_verifier/mean") is not None for r in records)
    counts = summary["before_after"]  # the picture's pool: the 6 distinct held-out prompts
    assert counts["prompts"] == 6
    assert 0 <= counts["fixed_without_extra_shapes"] <= counts["fixed"] <= 6 and 0 <= counts["broken"] <= 6


@pytest.mark.parametrize(
    "mode",
    [("model.lora_rank=0", "awm.ema_kl_weight=0"), ("model.lora_rank=16", "awm.ema_kl_weight=3")],
    ids=["full-fine-tuning", "lora"],
)
def test_the_before_pictures_are_the_base_models(mode, tmp_path, small_eval, monkeypatch):
    """The picture's "before" row is the base model's images of its prompts and seeds, with a LoRA (the adapter
    switched off) and with full fine-tuning (the base loaded again); the "after" row is the trained model's."""
    import torch

    import diffrl.demo as demo
    from diffrl.models import load_model
    from diffrl.sampling import sample_images

    seen = {}

    def grab(before, after, prompts, *args):
        seen.update(before=before, after=after, prompts=prompts)

    monkeypatch.setattr(demo, "before_after_grid", grab)
    overrides = [f"output_dir={tmp_path / 'demo'}", "max_steps=1", "eval_every=0", f"data.eval={small_eval}"]
    overrides += ["report_to=none", "awm.prompts_per_step=2", "awm.group_size=2", *mode]
    summary = run_demo(overrides, n_pictures=3, log=lambda line: None)
    assert (tmp_path / "demo" / ("pipeline" if mode[0].endswith("=0") else "lora")).is_dir()
    kw = dict(num_steps=8, guidance_scale=1.0, height=64, width=64, seed=12345, batch_size=64)  # the demo's
    with torch.no_grad():
        base = sample_images(load_model("toy:cliptext"), seen["prompts"], **kw)
    assert len(seen["prompts"]) == 3 and summary["max_steps"] == 1
    torch.testing.assert_close(seen["before"], base, rtol=0, atol=1e-5)
    assert (seen["after"] - base).abs().max() > 1e-3  # one step of training moved the images


def test_the_demo_preset_is_awm_from_the_clip_text_toy_model_with_the_demos_reward():
    cfg = load_config(DEFAULT_CONFIG, DEMO_OVERRIDES)
    assert DEFAULT_CONFIG.name == "demo.yaml"
    assert (cfg.algorithm, cfg.model.path, cfg.max_steps) == ("awm", "toy:cliptext", 348)
    assert (cfg.model.lora_rank, cfg.optim.lr, cfg.awm.ema_kl_weight) == (0, 3e-5, 0.0)  # full fine-tuning
    # the preset alone trains what the demo trains: DEMO_OVERRIDES repeats its reward for the other presets
    assert (
        load_config(DEFAULT_CONFIG).reward == cfg.reward == {"shapes_verifier": 1.0, "shapes_accuracy": 1.0}
    )
    assert cfg.output_dir == "runs/demo"


def test_the_threads_hint_shows_only_for_the_one_thread_default_on_several_cores():
    hint = threads_hint(1, None, 8)
    assert hint and "one torch thread" in hint and "--threads N (N from 2 to 8) shortens the run" in hint
    assert "this machine has 2 CPUs, and on an otherwise idle machine --threads 2 shortens" in threads_hint(
        1, None, 2
    )
    assert threads_hint(1, None, 1) is None  # one core: nothing to gain
    assert threads_hint(1, 1, 8) is None  # --threads 1 asked for
    assert threads_hint(None, None, 8) is None  # left to torch (a GPU, or OMP_NUM_THREADS set)
    assert threads_hint(2, 2, 8) is None


def test_accuracy_gain_is_in_points_with_the_error_of_a_difference():
    # 0.25 -> 0.5 on 96 images: sqrt(0.25 * 0.75 / 96 + 0.5 * 0.5 / 96) = sqrt(0.0045573) = 0.067508
    gain, se = accuracy_gain(0.25, 0.5, 96)
    assert gain == pytest.approx(25.0) and se == pytest.approx(6.7508, abs=1e-4)
    assert accuracy_gain(0.0, 1.0, 10) == (100.0, 0.0)  # certain outcomes have no spread
    with pytest.raises(ValueError, match="n=0 evaluation images"):
        accuracy_gain(0.2, 0.3, 0)


def test_showcase_order_shows_fixes_without_extra_shapes_first():
    before_ok = [True, False, False, False, True]
    after_ok = [True, True, True, False, False]
    after_exact = [True, False, True, False, False]  # 1 was fixed with extra shapes, 2 without
    assert showcase_order(before_ok, after_ok, after_exact) == [2, 0, 1, 3, 4]


def test_demo_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert main([f"output_dir={out}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "{}\n"  # nothing already written is touched


def test_demo_names_a_missing_config(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_running_the_demo_again_writes_beside_the_earlier_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("diffrl.demo.time.strftime", lambda fmt: "20261203-101500")
    cfg = load_config(DEFAULT_CONFIG, DEMO_OVERRIDES)
    assert fresh_output_dir(cfg, []) == "runs/demo"  # nothing there yet
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "metrics.jsonl").write_text("{}\n")
    fresh = fresh_output_dir(cfg, [])
    assert fresh == "runs/demo-20261203-101500" and not (tmp_path / fresh).exists()
    (tmp_path / fresh).mkdir()
    assert fresh_output_dir(cfg, []) == f"{fresh}-2"  # within the same second: another name still
    # an output_dir given explicitly, or a resumed run, stays where it was asked to be
    assert fresh_output_dir(cfg, ["output_dir=runs/demo"]) == "runs/demo"
    cfg.resume_from_checkpoint = "latest"
    assert fresh_output_dir(cfg, []) == "runs/demo"
