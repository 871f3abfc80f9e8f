"""DeepSpeed ZeRO stages 1 and 2 (``diffrl.trainers.zero``).

Fast tests need no DeepSpeed: what the engine refuses in a DeepSpeed config or a run config, the dict it passes to
``deepspeed.initialize``, and the shipped accelerate config. Slow tests (``--run-slow``, and deepspeed installed:
``pip install -e '.[deepspeed]'``) launch 2 gloo processes on the CPU with ``zero_stage=N``: accelerate ignores a
DeepSpeed config on the CPU (``ACCELERATE_USE_DEEPSPEED`` is read only when not ``cpu``), so, as with ``fsdp=true``,
the run's own ``zero_stage`` is how DeepSpeed runs here; on GPUs the accelerate config sets the same thing.

Tolerances and the 1-process reference runs are those of ``test_distributed.py``: a 2-process run agrees with one
process with the same global batch up to float32 rounding (the weights to 2e-5), and the comparison checks that the
update is far larger than that.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from launch_rewards import gated_saturation
from test_distributed import (
    FSDP_EXTRA,
    GATED,
    PRESET,
    PROMPTS,
    WEIGHT_ATOL,
    WEIGHT_RTOL,
    _checkpoint_tensors,
    _launch_two_processes,
    _max_abs_diff,
    _metrics,
    _resume_two_processes,
    assert_matches_one_process,
    two_step_overrides,
)

from diffrl.config import ConfigError, load_config, validate
from diffrl.rewards import as_reward
from diffrl.train import build_trainer
from diffrl.trainers.zero import check_deepspeed_config, deepspeed_init_config

ROOT = Path(__file__).resolve().parents[1]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="needs deepspeed: pip install -e '.[deepspeed]'"
)
ALGOS = ["flow_grpo", "diffusion_nft", "refl"]


def _cfg(algo="flow_grpo", *overrides):
    return load_config(PRESET[algo], [f"data.train={PROMPTS}", *overrides])


# ---------------------------------------------------------------------------------------------- fast: refusals


@pytest.mark.parametrize(
    "ds, match",
    [
        ({"zero_optimization": {"stage": 0}}, "stage=0"),
        ({"zero_optimization": {"stage": 3}}, "stage 3 is not supported"),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            "offload_optimizer.device=cpu",
        ),
        (
            {"zero_optimization": {"stage": 1, "offload_param": {"device": "nvme"}}},
            "offload_param.device=nvme",
        ),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "'optimizer' section"),
        ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16 is not supported"),
    ],
)
def test_deepspeed_config_refusals(ds, match):
    with pytest.raises(ConfigError, match=match):
        check_deepspeed_config(ds, _cfg())


def test_deepspeed_config_refuses_fp16_autocast_and_accepts_stages_1_and_2():
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        check_deepspeed_config({"zero_optimization": {"stage": 2}}, _cfg("refl", "mixed_precision=fp16"))
    # what accelerate's plugin writes for zero_stage 2 (placeholders and offload "none")
    plugin = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 4,
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "none", "nvme_path": None},
            "offload_param": {"device": "none", "nvme_path": None},
            "stage3_gather_16bit_weights_on_model_save": False,
            "reduce_bucket_size": 1000,
        },
        "gradient_clipping": "auto",
        "bf16": {"enabled": True},
    }
    cfg = _cfg("flow_grpo", "optim.max_grad_norm=0.7", "mixed_precision=bf16")
    assert check_deepspeed_config(plugin, cfg) == 2
    init = deepspeed_init_config(plugin, cfg, num_processes=4)
    # the run owns accumulation, clipping and precision; the file's ZeRO tuning is kept, offload keys dropped
    assert init["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert init["managed_gradient_accumulation"] is False and init["gradient_accumulation_steps"] == 1
    assert init["gradient_clipping"] == 0.7
    assert init["train_batch_size"] == 4 and "bf16" not in init and "fp16" not in init
    stage1 = deepspeed_init_config({"zero_optimization": {"stage": 1, "overlap_comm": True}}, cfg, 2)
    assert stage1["zero_optimization"] == {"stage": 1, "overlap_comm": False}


@pytest.mark.parametrize(
    "algo, overrides, stage, match",
    [
        ("refl", ["optim.use_8bit_adam=true"], 2, "use_8bit_adam"),
        ("flow_grpo", ["flow_grpo.dynamic_sampling=true"], 2, "dynamic_sampling"),
        ("diffusion_nft", ["fsdp=true"], 1, "fsdp=true under a DeepSpeed launch"),
    ],
)
def test_validate_refuses_what_deepspeed_does_not_support(algo, overrides, stage, match):
    cfg = _cfg(algo, *overrides)  # fine without DeepSpeed
    with pytest.raises(ConfigError, match=match):
        validate(cfg, 2, zero_stage=stage)


def test_zero_stage_field_is_checked_before_any_model_loads():
    with pytest.raises(ConfigError, match="zero_stage=3 is not supported"):
        _cfg("flow_grpo", "zero_stage=3")
    validate(
        _cfg("flow_grpo", "flow_grpo.dynamic_sampling=true"), 2, zero_stage=1
    )  # ZeRO-1 reduces at the step


def test_zero_stage_with_one_process_trains_without_deepspeed_and_says_so(tmp_path, shared_cache, capsys):
    trainer = build_trainer(
        PRESET["refl"], [f"output_dir={tmp_path}", f"data.train={PROMPTS}", "zero_stage=2"]
    )
    assert trainer.world == 1 and trainer.zero_stage == 0 and trainer.ds_engine is None
    assert "zero_stage=2 with one process: nothing to partition" in capsys.readouterr().out


def test_an_accelerate_deepspeed_launch_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    import types

    import accelerate

    import diffrl.trainers.engine as engine
    import diffrl.trainers.zero as zero

    def fake(stage):
        plugin = types.SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
        return types.SimpleNamespace(
            distributed_type=types.SimpleNamespace(name="DEEPSPEED"),
            state=types.SimpleNamespace(deepspeed_plugin=plugin),
            num_processes=2,
        )

    monkeypatch.setattr(engine.Trainer, "_load_model", lambda self: pytest.fail("the model was loaded"))
    base = [f"output_dir={tmp_path}", f"data.train={PROMPTS}"]
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: fake(3))
    with pytest.raises(ConfigError, match="ZeRO stage 3 is not supported"):
        build_trainer(PRESET["flow_grpo"], base)
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: fake(2))
    with pytest.raises(ConfigError, match="zero_stage=1 but the accelerate DeepSpeed config says stage 2"):
        build_trainer(PRESET["flow_grpo"], [*base, "zero_stage=1"])
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        build_trainer(PRESET["flow_grpo"], [*base, "flow_grpo.dynamic_sampling=true"])

    def missing():
        raise ImportError(
            "ZeRO needs deepspeed (pip install 'diffrl[deepspeed]'), which failed to import: none."
        )

    monkeypatch.setattr(zero, "require_deepspeed", missing)  # deepspeed absent: said before the model loads
    with pytest.raises(ImportError, match="pip install 'diffrl\\[deepspeed\\]'"):
        build_trainer(PRESET["flow_grpo"], base)


def test_shipped_deepspeed_accelerate_config_is_zero2_and_launches_deepspeed():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType

    path = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type == DistributedType.DEEPSPEED and cfg.mixed_precision == "no"
    assert cfg.deepspeed_config["zero_stage"] == 2
    assert (
        cfg.deepspeed_config["offload_optimizer_device"]
        == "none"
        == cfg.deepspeed_config["offload_param_device"]
    )
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "diffrl.train", "x.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_deepspeed and args.zero_stage == 2 and args.num_processes == 8


# ---------------------------------------------------------------------------------------------- slow: 2 processes


def _ds_overrides(out: Path, algo: str, stage: int, *extra: str) -> list[str]:
    return two_step_overrides(out, algo, f"zero_stage={stage}", *extra)


@pytest.fixture(scope="module")
def ds_run(shared_cache, tmp_path_factory):
    """A 2-process ZeRO run, launched once per module and key: its output directory."""
    runs: dict[tuple, Path] = {}

    def run(algo: str, stage: int, extra: tuple[str, ...] = (), returncode: int = 0) -> Path:
        key = (algo, stage, extra)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"zero{stage}-{algo}") / "two"
            proc = _launch_two_processes(algo, out, shared_cache, _ds_overrides(out, algo, stage, *extra))
            assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-5000:]
            derived = json.loads((out / "config.json").read_text())["derived"]
            assert derived["num_processes"] == 2 and derived["deepspeed_zero_stage"] == stage, derived
            runs[key] = out
        return runs[key]

    return run


def _reference(algo: str, out: Path, *extra: str):
    trainer = build_trainer(
        PRESET[algo],
        _ds_overrides(out, algo, 0, *extra),
        **({"reward": gated_saturation} if GATED in " ".join(FSDP_EXTRA[algo]) else {}),
    )
    initial = {
        f"trainable/{n}": p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)
    }
    trainer.train()
    return initial


@needs_deepspeed
@pytest.mark.slow  # ~60 s per case on a 2-core CPU (a 2-process launch, deepspeed's import, a 1-process run)
@pytest.mark.parametrize("algo, stage", [(a, 2) for a in ALGOS] + [("diffusion_nft", 1)])
def test_zero_two_processes_match_one_process_with_the_same_global_batch(algo, stage, tmp_path, ds_run):
    ref_out = tmp_path / "one"
    initial = _reference(algo, ref_out)
    diff, update = assert_matches_one_process(ds_run(algo, stage), ref_out, initial, state_ratio=(0.45, 0.6))
    print(f"\n[{algo} ZeRO-{stage}] max |w_zero - w_1proc| = {diff:.3g}; max update = {update:.3g}")


@needs_deepspeed
@pytest.mark.slow  # ~60 s
def test_zero2_full_fine_tuning_matches_one_process(tmp_path, ds_run):
    extra = ("model.lora_rank=0", "optim.lr=1e-3", "flow_grpo.kl_beta=0")
    ref_out = tmp_path / "one"
    initial = _reference("flow_grpo", ref_out, *extra)
    out = ds_run("flow_grpo", 2, extra)
    assert_matches_one_process(out, ref_out, initial, state_ratio=(0.45, 0.6), lora=False)
    assert (
        out / "pipeline" / "model_index.json"
    ).is_file()  # the final full pipeline, written by the main process
    from safetensors.torch import load_file

    files = sorted((out / "pipeline" / "transformer").glob("*.safetensors"))
    ref_files = sorted((ref_out / "pipeline" / "transformer").glob("*.safetensors"))
    got, ref = load_file(str(files[0])), load_file(str(ref_files[0]))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


@needs_deepspeed
@pytest.mark.slow  # ~45 s (one more launch; the uninterrupted run is shared)
@pytest.mark.parametrize("algo", ["diffusion_nft", "flow_grpo"])
def test_zero2_resume_replays_the_uninterrupted_run_bitwise(algo, tmp_path, shared_cache, ds_run):
    full = ds_run(algo, 2)
    out = tmp_path / "resumed"
    proc = _resume_two_processes(
        algo, full / "checkpoint-000001", out, shared_cache, _ds_overrides(out, algo, 2)
    )
    assert "resumed from" in proc.stdout + proc.stderr
    a = _checkpoint_tensors(full / "checkpoint-000002")
    b = _checkpoint_tensors(out / "checkpoint-000002")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa = torch.load(full / "checkpoint-000002" / "optim.pt", map_location="cpu", weights_only=False)[
        "optimizer"
    ]
    ob = torch.load(out / "checkpoint-000002" / "optim.pt", map_location="cpu", weights_only=False)[
        "optimizer"
    ]
    for i in oa["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa["state"][i][key], ob["state"][i][key]), (i, key)


@needs_deepspeed
@pytest.mark.slow  # ~60 s (a 1-process run and one 2-process launch)
def test_zero2_resumes_an_unsharded_checkpoint(tmp_path, shared_cache):
    algo = "diffusion_nft"
    ref_out = tmp_path / "one"
    _reference(algo, ref_out)
    out = tmp_path / "two"
    proc = _resume_two_processes(
        algo, ref_out / "checkpoint-000001", out, shared_cache, _ds_overrides(out, algo, 2)
    )
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = _checkpoint_tensors(ref_out / "checkpoint-000002"), _checkpoint_tensors(out / "checkpoint-000002")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


@needs_deepspeed
@pytest.mark.slow  # ~50 s
def test_zero2_skips_a_step_with_a_nonfinite_reward_on_one_process(tmp_path, shared_cache, ds_run):
    """ReFL backpropagates the NaN on one process; every process drops its (partitioned) gradients and the next
    step trains: the weights end where a 1-process run whose first step is skipped ends."""
    extra = (
        "reward={tests.launch_rewards:nan_on_rank1_first_call: 1.0}",
        "reward_normalize=",
        "data.eval_size=0",
        "ema_decay=0",
    )
    out = ds_run("refl", 2, extra)
    rows = [r for r in _metrics(out) if "train/skipped" in r]
    assert [r["train/skipped"] for r in rows] == [1.0, 0.0]
    final = _checkpoint_tensors(out / "checkpoint-000002")
    assert all(torch.isfinite(v).all() for v in final.values())

    calls = {"n": 0}

    def _nan_first(images, prompts, **metadata):
        calls["n"] += 1
        out_ = images.mean(dim=(1, 2, 3))
        return out_ * float("nan") if calls["n"] == 1 else out_

    nan_first = as_reward(_nan_first, name="nan_once", differentiable=True)

    ref_out = tmp_path / "one"
    trainer = build_trainer(PRESET["refl"], _ds_overrides(ref_out, "refl", 0, *extra[1:]), reward=nan_first)
    initial = [p.detach().clone() for p in trainer.params]
    trainer.train()
    ref = _checkpoint_tensors(ref_out / "checkpoint-000002")
    first = _checkpoint_tensors(out / "checkpoint-000001")
    assert all(
        torch.equal(first[f"trainable/{n}"], p) for n, p in zip(trainer.param_names, initial, strict=True)
    )
    assert (
        _max_abs_diff(ref, {f"trainable/{n}": p for n, p in zip(trainer.param_names, initial, strict=True)})
        > 0
    )
    for k in ref:
        torch.testing.assert_close(final[k], ref[k], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


@needs_deepspeed
@pytest.mark.slow  # ~50 s
def test_zero2_nonfinite_gradients_skip_the_update(tmp_path, ds_run):
    """A finite reward with a NaN gradient: DeepSpeed's overflow check skips the update on every process; the engine
    counts a bad step and stops after max_bad_steps, with a checkpoint, weights unchanged."""
    out = ds_run(
        "refl",
        2,
        ("reward={tests.launch_rewards:nan_grad_reward: 1.0}", "max_bad_steps=2", "data.eval_size=0"),
        returncode=1,  # stopped by max_bad_steps: a non-zero exit
    )
    rows = [r for r in _metrics(out) if "train/bad_steps_in_a_row" in r]
    assert [r.get("train/nonfinite_grad") for r in rows] == [1.0, 1.0]
    first, last = (
        _checkpoint_tensors(out / "checkpoint-000001"),
        _checkpoint_tensors(out / "checkpoint-000002"),
    )
    for k in first:
        assert torch.equal(first[k], last[k]), k


@needs_deepspeed
@pytest.mark.slow  # ~60 s (two 2-process launches)
def test_zero2_with_bf16_and_gradient_checkpointing_matches_ddp(tmp_path, shared_cache, ds_run):
    """ReFL under bf16 autocast (the engine's own: accelerate leaves precision to DeepSpeed's config) with the
    transformer's gradient checkpointing. Against the DDP launch with the same split, only the order of the gradient
    reduction differs, so the weights agree to float32 rounding; the trained weights stay float32."""
    extra = ("model.gradient_checkpointing=true", "mixed_precision=bf16")
    zero = ds_run("refl", 2, extra)
    ddp = tmp_path / "ddp"
    proc = _launch_two_processes("refl", ddp, shared_cache, _ds_overrides(ddp, "refl", 0, *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    a, b = _checkpoint_tensors(ddp / "checkpoint-000002"), _checkpoint_tensors(zero / "checkpoint-000002")
    initial = _checkpoint_tensors(ddp / "checkpoint-000001")
    assert a.keys() == b.keys() and _max_abs_diff(a, initial) > 0
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        torch.testing.assert_close(b[key], a[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    rows = [r for r in _metrics(zero) if "train/lr" in r]
    assert [r["train/skipped"] for r in rows] == [0.0, 0.0]
    # bf16 autocast really ran: the bf16 run differs from an fp32 one by more than the reduction order does
    fp32 = ds_run("refl", 2)
    c = _checkpoint_tensors(fp32 / "checkpoint-000002")
    assert _max_abs_diff(b, c) > 10 * _max_abs_diff(a, b)


@pytest.mark.skipif(HAS_DEEPSPEED, reason="checks the message shown when deepspeed is not installed")
def test_without_deepspeed_zero_says_how_to_install_it():
    from diffrl.trainers.zero import require_deepspeed

    with pytest.raises(ImportError, match=r"pip install 'diffrl\[deepspeed\]'"):
        require_deepspeed()
