"""The GPU benchmarks' code paths on the CPU at tiny sizes, so that ``scripts/gpu_check.sh`` does not find them broken
on a lent GPU machine: the full-size trainer benchmark runs the SD3.5-M presets (their rewards, EMA, checkpointing
and bf16 autocast) and the rollout benchmark compares diffrl's rollouts with the diffusers pipeline."""

import importlib.util
import json
from pathlib import Path

import pytest

from diffrl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "tiny" / "prompts.txt"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_trainers_runs_the_sd35m_presets_on_the_tiny_model(
    tmp_path, one_thread, monkeypatch, fresh_accelerate_state
):
    # the SD3.5-M presets name their own rewards and reward options (hpsv2's version); the benchmark swaps in a
    # weight-free reward, and the options must go with the rewards (a config error on an H200 once)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the benchmark sets it on the CPU: restored afterwards
    bench = _bench("bench_trainers")
    out = tmp_path / "t.json"
    argv = ["--arch", "tiny", "--preset", "sd35m", "--repeats", "1", "--warmup", "1", "--group-size", "2"]
    try:
        results = bench.main([*argv, "--prompts", "1", "--json", str(out)])
    finally:  # the benchmark silences the loading bars for its whole process
        import diffusers
        import transformers

        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
    (res,) = results
    assert json.loads(out.read_text())[0]["arch"] == "tiny"
    for algorithm in ("flow_grpo", "diffusion_nft"):
        trainer = res["trainers"][algorithm]
        assert trainer["seconds_per_step"] > 0
        # the SD3.5-M preset's settings (fp16 autocast, LoRA 32), not the tiny ones (float32)
        preset = load_config(str(bench.PRESETS["sd35m"][algorithm]), [f"data.train={PROMPTS}"])
        assert trainer["settings"]["mixed_precision"] == preset.mixed_precision == "fp16"
        assert trainer["settings"]["lora_rank"] == preset.model.lora_rank == 32
        assert trainer["settings"]["ema_decay"] == preset.ema_decay


def test_bench_rollout_matches_the_pipeline_on_the_tiny_model(one_thread):
    bench = _bench("bench_rollout")
    (res,) = bench.main(
        ["--family", "sd3", "--repeats", "1", "--warmup", "1", "--batch", "2", "--steps", "3"]
    )
    assert res["ms"]["pipeline"] > 0 and res["ms"]["rollout_sde"] > 0
    # float32 on the CPU: diffrl's ODE rollout is the pipeline's Euler sampler
    assert res["max_abs_diff_ode_vs_pipeline"] < 1e-4


@pytest.mark.parametrize("argv", [["--arch", "full"], ["--arch", "full", "--device", "cpu"]])
def test_bench_rollout_full_size_needs_a_gpu(argv, capsys):
    with pytest.raises(SystemExit):
        _bench("bench_rollout").main(argv)
    assert "needs a GPU" in capsys.readouterr().err
