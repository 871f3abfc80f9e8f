"""Trainers end to end on the tiny SD3/FLUX pipelines: CLI runs, every weight moves, metrics, LoRA output, resume
(config check, metrics rows, reward statistics), invariance, non-finite rewards, fp16 loss scaling and early
one-sentence errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from diffrl.config import ConfigError, TrainConfig, field_docs, load_config
from diffrl.train import build_trainer
from diffrl.trainers.engine import TrainingAborted

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ["flow_grpo", "diffusion_nft", "refl", "awm", "dpo"]
PRESET = {a: ROOT / "configs" / "tiny" / f"{a}.yaml" for a in ALGOS}
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    os.environ["DIFFRL_CACHE"] = str(tmp_path_factory.mktemp("diffrl-cache"))
    yield


def _overrides(out, *extra):
    return [f"output_dir={out}", f"data.train={PROMPTS}", *extra]


def _trained(out: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted(out.glob("checkpoint-*"))
    return load_file(str(ckpts[-1] / "trainable.safetensors"))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- presets and errors


def test_every_shipped_preset_validates_without_loading_weights():
    presets = sorted((ROOT / "configs").rglob("*.yaml"))
    presets = [p for p in presets if "accelerate" not in p.parts]
    assert presets
    from diffrl.rewards.registry import reward_class

    for path in presets:
        cfg = load_config(path, [f"data.train={PROMPTS}"] if "tiny" in path.parts else [])
        for name in [*cfg.reward, *cfg.eval_reward, *cfg.reward_kwargs]:
            reward_class(name)  # every named reward exists (nothing is loaded)


def test_every_config_field_is_documented():
    import dataclasses

    from diffrl import config as c

    # TrainConfig and its eleven sections (monitor, video and dpo included)
    assert len(c.config_classes()) == 12
    for cls in c.config_classes():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1e-4"], "unknown config key optim.lrr.*did you mean lr"),
        (["optim.learning_rate=1e-4"], r"optim.learning_rate \(OptimConfig has lr, .*weight_decay"),
        (["max_steps=abc"], "max_steps='abc' must be an integer"),
        (["flow_grpo.group_size=1"], "group_size=1 must be at least 2"),
        (["algorithm=ppo"], "algorithm='ppo' is not known"),
        (["flow_grpo.sampler=ddim"], "sampler='ddim'"),
        (["reward={}"], "reward is empty"),
        (["max_bad_steps=0"], "max_bad_steps=0 must be at least 1"),
        (["model.lora_rank=0"], "lora_rank=0 .* has no base model"),
        (["algorithm=refl", "refl.denoise_weight=-1"], "refl.denoise_weight=-1.0 must be at least 0"),
        # the shell split 'reward={hpsv2: 1.0}' at the space: the error says to quote it
        (["reward={hpsv2:", "1.0}"], "cannot parse the value as YAML.*quote the whole override"),
        (["fsdp=true", "zero_stage=2"], "fsdp=true and zero_stage=2 both partition"),
        (["reward_kwargs={saturation: 3}"], r"reward_kwargs.saturation=3 must be a map of options"),
        (
            ["reward_kwargs={saturaton: {batch_size: 2}}"],
            "reward_kwargs names 'saturaton', which is not in reward",
        ),
    ],
)
def test_bad_config_values_raise_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESET["flow_grpo"], [f"data.train={PROMPTS}", *overrides])


def _numeric_fields():
    import dataclasses
    import typing

    from diffrl import config as c

    sections = {
        f.name: f.default_factory
        for f in dataclasses.fields(TrainConfig)
        if f.default_factory is not dataclasses.MISSING
    }
    out = []
    for prefix, cls in [
        ("", TrainConfig),
        *[(f"{name}.", cls) for name, cls in sections.items() if cls in c.config_classes()],
    ]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                out.append((prefix + f.name, hints[f.name]))
    return out


NUMERIC_FIELDS = _numeric_fields()


@pytest.mark.parametrize("key, kind", NUMERIC_FIELDS, ids=[k for k, _ in NUMERIC_FIELDS])
def test_every_numeric_field_refuses_values_out_of_its_range(key, kind):
    # each section's fields are checked with its algorithm's preset (and whatever the algorithm)
    section = key.split(".")[0] if "." in key else ""
    preset = PRESET[section] if section in PRESET else PRESET["flow_grpo"]
    bad = ["-5"] + (["nan", "-inf"] if kind is float else [])
    if key == "refl.target":  # any finite hinge target is allowed, negative ones too
        bad = ["nan", "inf"]
    for value in bad:
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}="):
            load_config(preset, [f"data.train={PROMPTS}", f"{key}={value}"])
    assert len(NUMERIC_FIELDS) > 50


def test_bad_inputs_fail_before_any_model_is_loaded(tmp_path, monkeypatch):
    import diffrl.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    import diffrl.models

    monkeypatch.setattr(diffrl.models, "load_model", no_load)
    cases = [
        (["data.train=/nonexistent/prompts.txt"], FileNotFoundError, r"prompts.txt does not exist; pass"),
        (  # a relative path: the error says where it was looked for
            ["data.train=nonexistent/prompts.txt"],
            FileNotFoundError,
            r"does not exist \(relative paths are read from the current directory, /",
        ),
        (["reward={no_such_reward: 1.0}"], ValueError, "unknown reward 'no_such_reward'"),
        (["reward={pickscor: 1.0}"], ValueError, r"unknown reward 'pickscor' \(did you mean pickscore\?\)"),
        (
            ["algorithm=refl", "reward={saturation: 1.0}", "reward={jpeg_compressibility: 1.0}"],
            ValueError,
            "score-only",
        ),
        (  # a function named module:attr is score-only unless marked; the error says how
            ["algorithm=refl", "reward={tests.launch_rewards:gated_saturation: 1.0}"],
            ValueError,
            r"reward_kwargs=\{'tests.launch_rewards:gated_saturation': \{differentiable: true\}\}",
        ),
    ]
    monkeypatch.syspath_prepend(str(ROOT))  # tests.launch_rewards, however pytest was started
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases.append(([f"data.train={empty}"], ValueError, "holds no prompts"))
    # the toy verifier needs each prompt's scene, which the tiny .txt prompts do not have
    cases.append(
        (
            ["reward={shapes_verifier: 1.0}"],
            ValueError,
            r"reward 'shapes_verifier' needs the metadata field 'scene'",
        )
    )
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        cases.append(
            (["report_to=wandb"], ImportError, "report_to=wandb needs the wandb package: pip install wandb")
        )
    for extra, exc, message in cases:
        overrides = (
            _overrides(tmp_path / "out", *extra)
            if "data.train" not in " ".join(extra)
            else [f"output_dir={tmp_path / 'out'}", *extra]
        )
        algo = "refl" if "algorithm=refl" in extra else "flow_grpo"
        with pytest.raises(exc, match=message):
            build_trainer(PRESET[algo], overrides)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        build_trainer(PRESET["flow_grpo"], _overrides(blocker / "sub"))


def test_cli_exits_nonzero_with_one_line_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffrl.train",
            str(PRESET["flow_grpo"]),
            f"output_dir={tmp_path}",
            "flow_grpo.group_size=1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: flow_grpo.group_size=1 must be at least 2")


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize(
    # awm's and dpo's two CLI runs (25-30 s each) are opt-in (--run-slow) to keep their default tests short
    "algo",
    [a if a not in ("awm", "dpo") else pytest.param(a, marks=pytest.mark.slow) for a in ALGOS],
)
def test_cli_run_moves_every_weight_logs_metrics_and_writes_a_loadable_lora(algo, family, tmp_path):
    out = tmp_path / "run"
    extra = ["max_steps=2", "checkpointing_steps=0", f"model.path=tiny:{family}"]
    if family == "sd3":
        extra.append("report_to=tensorboard")  # the default sink (the tiny presets say none)
    cmd = [sys.executable, "-m", "diffrl", "train", str(PRESET[algo]), *_overrides(out, *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "[diffrl] resolved config saved to" in proc.stdout and "resolved config:" not in proc.stdout
    )  # quiet
    assert "Loading pipeline components" not in proc.stderr
    trainer = build_trainer(
        PRESET[algo], _overrides(tmp_path / "fresh", "max_steps=2", f"model.path=tiny:{family}")
    )
    initial = {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)}
    final = _trained(out)
    assert set(final) == set(initial)
    unchanged = [n for n in initial if torch.equal(initial[n], final[n])]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not change, e.g. {unchanged[:2]}"
    rows = _metrics(out)
    keys = set().union(*rows)
    expected = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        f"reward/{trainer.reward.name}/mean",
        "eval/reward/" + trainer.eval_reward.name + "/mean",
    }
    if algo == "flow_grpo":
        expected |= {"train/clipfrac", "train/kl", "train/ratio_mean", "sample/zero_std_frac"}
    assert expected <= keys, expected - keys
    assert (out / "config.json").is_file() and list((out / "eval").glob("*.png"))
    if family == "sd3":
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # the LoRA loads into a plain diffusers pipeline
    pipe_cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = pipe_cls.from_pretrained(os.environ["DIFFRL_CACHE"] + f"/tiny/{family}-v1")
    pipe.load_lora_weights(out / "lora")
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    # written readable as the umask allows (safetensors alone writes owner-only files), and the path is printed
    mask = os.umask(0)
    os.umask(mask)
    for f in [*(out / "lora").iterdir(), *out.glob("checkpoint-*/*.safetensors")]:
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~mask, f
    assert f"final LoRA written to {out / 'lora'}" in proc.stdout


def test_flow_grpo_first_inner_step_is_on_policy(tmp_path):
    trainer = build_trainer(PRESET["flow_grpo"], _overrides(tmp_path, "max_steps=1", "flow_grpo.kl_beta=0.1"))
    metrics = trainer.train_step(0)
    assert (
        metrics["train/ratio_mean"] == 1.0
        and metrics["train/clipfrac"] == 0.0
        and metrics["train/approx_kl"] == 0.0
    )


def test_flow_grpo_trajectory_ratio_logs_the_kl_it_trains_with(tmp_path):
    # The first step is on-policy and the KL to the base is 0 (a fresh LoRA is a no-op); both modes then take the
    # same update (one ratio per trajectory or one per step have the same gradient at ratio 1), so at the second
    # step both log the same positive KL. Before the fix the trajectory mode logged 0.
    kl = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        build_trainer(
            PRESET["flow_grpo"],
            _overrides(
                out,
                "max_steps=2",
                "data.eval_size=0",
                "flow_grpo.kl_beta=0.1",
                f"flow_grpo.trajectory_ratio={mode}",
            ),
        ).train()
        kl[mode] = [r["train/kl"] for r in _metrics(out) if "train/kl" in r]
    assert kl["true"][0] == pytest.approx(0.0, abs=1e-12) and kl["false"][0] == pytest.approx(0.0, abs=1e-12)
    assert kl["true"][1] > 0
    assert kl["true"][1] == pytest.approx(kl["false"][1], rel=1e-3)


def test_lr_schedule_counts_inner_epochs(tmp_path):
    # linear decay over max_steps=2 steps of 2 updates each: the lr after the first step is half the peak, not 0
    trainer = build_trainer(
        PRESET["flow_grpo"],
        _overrides(
            tmp_path,
            "max_steps=2",
            "flow_grpo.num_inner_epochs=2",
            "optim.lr_scheduler=linear",
            "optim.lr=1e-3",
        ),
    )
    metrics = trainer.train_step(0)
    assert metrics["train/lr"] == pytest.approx(5e-4)


def test_flux_trainer_runs(tmp_path):
    trainer = build_trainer(
        PRESET["diffusion_nft"],
        _overrides(tmp_path, "max_steps=1", "model.path=tiny:flux", "sample.guidance_scale=3.5"),
    )
    before = [p.detach().clone() for p in trainer.params]
    trainer.train()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))
    pipe = FluxPipeline.from_pretrained(os.environ["DIFFRL_CACHE"] + "/tiny/flux-v1")
    pipe.load_lora_weights(tmp_path / "lora")


# ReFL's denoising regulariser draws its own levels and noise: resume and micro-batching must not change them
# ... and so must the reference options: minibatch updates, dropped samples, recomputed old log-probs, per-sample
# levels, the EMA schedule
VARIANTS = [(a, ()) for a in ALGOS] + [
    ("refl", ("refl.denoise_weight=1.0",)),
    (
        "flow_grpo",
        (
            "flow_grpo.num_minibatches=2",
            "flow_grpo.drop_zero_advantage=true",
            "flow_grpo.old_logp=recompute",
            "flow_grpo.kl_scale=exact",
            "flow_grpo.cfg_grad=full",
            "ema_decay=0.9",
            "ema_warmup=true",
            "ema_every=2",
        ),
    ),
    (
        "diffusion_nft",
        (
            "diffusion_nft.per_sample_levels=true",
            "diffusion_nft.num_minibatches=2",
            "diffusion_nft.solver=dpm2",
        ),
    ),
    (
        "awm",
        (
            "awm.timesteps=logit_normal",
            "awm.weighting=uniform",
            "awm.solver=dpm2",
            "awm.adv_std=group",
            "awm.ema_kl_rate=0.2",
            "awm.sampler=sde",  # stochastic steps 1-2 of the tiny model's 4, dpm2 after them
        ),
    ),
    # AWM with the reference's SA-Solver rollouts (noisy on the steps that end in [0.3, 0.9])
    ("awm", ("awm.sampler=sa_solver", "awm.noise_level=0.4")),
    # AWM off-policy (the reference's off_policy): rollouts from the EMA adapter, which lags from step 1 on (decay
    # 0.2), the clipped ratio to it, one a sample (its sum_first; the per-level ratio is tests/test_distributed.py's),
    # without the EMA pull (the adapter kept and checkpointed for the rollouts alone)
    (
        "awm",
        (
            "awm.rollout_policy=ema",
            "awm.ratio=sample",
            "awm.ema_kl_rate=0.2",
            "awm.clip_range=0.05",
            "awm.ema_kl_weight=0",
        ),
    ),
    # AWM trained on each group's two rollouts of most varied reward (PODS's max-variance down-sampling)
    ("awm", ("awm.train_per_group=2",)),
    # AWM with full fine-tuning (the demo's), which keeps neither pull term, DPM-Solver++ rollouts and logit-normal
    # levels
    (
        "awm",
        (
            "model.lora_rank=0",
            "awm.kl_weight=0",
            "awm.ema_kl_weight=0",
            "awm.solver=dpm2",
            "awm.timesteps=logit_normal",
        ),
    ),
    # Flow-GRPO on each group's two most varied rollouts (PODS), two updates a step
    ("flow_grpo", ("flow_grpo.train_per_group=2", "flow_grpo.num_minibatches=2")),
    # DiffusionNFT on each group's two most varied rollouts (PODS), two updates a step
    ("diffusion_nft", ("diffusion_nft.train_per_group=2", "diffusion_nft.num_minibatches=2")),
    # MixGRPO-Flash: the window moves every step (the resume at step 2 lands mid-schedule), dpm2 after it
    (
        "flow_grpo",
        (
            "flow_grpo.sde_window=2",
            "flow_grpo.window_schedule=sliding",
            "flow_grpo.window_shift_every=1",
            "flow_grpo.post_window_solver=dpm2",
        ),
    ),
    # GRPO-Guard, with an off-policy second part so that the normalised ratio moves
    (
        "flow_grpo",
        (
            "flow_grpo.ratio_norm=true",
            "flow_grpo.grad_reweight=true",
            "flow_grpo.num_minibatches=2",
            "flow_grpo.old_logp=recompute",
        ),
    ),
    # Pref-GRPO: advantages from the win rates within each group
    ("flow_grpo", ("flow_grpo.advantage=winrate",)),
    # DPO: pairs kept between sampling rounds (the resume at step 2 lands mid-round), all pairs with a margin,
    # uniform shifted levels
    (
        "dpo",
        (
            "dpo.online_every=3",
            "dpo.pairs=all",
            "dpo.min_margin=0.001",
            "dpo.timesteps=uniform",
            "dpo.time_shift=3.0",
        ),
    ),
    # DPO as the Flow-GRPO DPO script samples: from the reference, with SDE steps; the reference a copy of the policy
    # every 2 steps (the resume at step 2 lands on a copy)
    ("dpo", ("dpo.rollout_policy=reference", "dpo.sampler=sde", "dpo.ref_update_every=2")),
    # Qwen-Image: prompts of different token counts padded with a mask, true CFG in Flow-GRPO's rollouts
    ("flow_grpo", ("model.path=tiny:qwen_image",)),
    # (DiffusionNFT on Qwen-Image: ~17 s for both tests, opt-in with --run-slow)
    ("diffusion_nft", ("model.path=tiny:qwen_image",)),
    # Pref-GRPO's reference options: each image trains its own random steps (drawn per step and row), win rates,
    # RatioNorm and the step weights, two updates a step with recomputed old log-probs
    (
        "flow_grpo",
        (
            "flow_grpo.timestep_selection=random",
            "flow_grpo.timestep_fraction=0.7",
            "flow_grpo.advantage=winrate",
            "flow_grpo.ratio_norm=true",
            "flow_grpo.grad_reweight=true",
            "flow_grpo.num_minibatches=2",
            "flow_grpo.old_logp=recompute",
        ),
    ),
]
VARIANT_IDS = [
    *ALGOS,
    "refl-denoise",
    "flow_grpo-reference-options",
    "diffusion_nft-reference-options",
    "awm-options",
    "awm-sa_solver",
    "awm-off-policy",
    "awm-pods",
    "awm-full",
    "flow_grpo-pods",
    "diffusion_nft-pods",
    "flow_grpo-mixgrpo-flash",
    "flow_grpo-guard",
    "flow_grpo-pref-grpo",
    "dpo-options",
    "dpo-reference-rollouts",
    "flow_grpo-qwen_image",
    "diffusion_nft-qwen_image",
    "flow_grpo-pref-grpo-reference",
]


def _variants(slow: set[str]):
    """VARIANTS as parameters, the ones named in ``slow`` opt-in (--run-slow) to keep the default tests short."""
    return [
        pytest.param(a, e, id=i, marks=[pytest.mark.slow] if i in slow else [])
        for (a, e), i in zip(VARIANTS, VARIANT_IDS, strict=True)
    ]


# dpo's plain resume is opt-in to keep dpo's default tests under 40 s: dpo-options resumes mid-round, which covers more
@pytest.mark.parametrize("algo, extra", _variants({"dpo", "diffusion_nft-qwen_image"}))
def test_resume_is_bitwise_identical(algo, extra, tmp_path):
    full = build_trainer(
        PRESET[algo],
        _overrides(tmp_path / "full", "max_steps=4", "checkpointing_steps=2", "data.eval_size=0", *extra),
    )
    full.train()
    half = build_trainer(
        PRESET[algo],
        _overrides(tmp_path / "half", "max_steps=2", "checkpointing_steps=2", "data.eval_size=0", *extra),
    )
    half.train()
    resumed = build_trainer(
        PRESET[algo],
        _overrides(
            tmp_path / "half",
            "max_steps=4",
            "checkpointing_steps=2",
            "data.eval_size=0",
            "resume_from_checkpoint=latest",
            *extra,
        ),
    )
    resumed.train()
    a, b = _trained(tmp_path / "full"), _trained(tmp_path / "half")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _one_step_per_micro_batch(algo: str, tmp_path: Path, *extra: str):
    """One unclipped step with micro-batches of 1 and of 4: ``(initial weights, [weights after each])``."""
    results = []
    for mb in (1, 4):
        trainer = build_trainer(
            PRESET[algo],
            _overrides(
                tmp_path / f"mb{mb}",
                "max_steps=1",
                f"optim.train_batch_size={mb}",
                "data.eval_size=0",
                "optim.max_grad_norm=0",
                *extra,
            ),
        )
        before = [p.detach().clone() for p in trainer.params]
        trainer.train()
        results.append([p.detach().clone() for p in trainer.params])
    return before, results


@pytest.mark.parametrize("algo, extra", _variants({"dpo-options", "diffusion_nft-qwen_image"}))
def test_micro_batch_size_does_not_change_the_update(algo, extra, tmp_path):
    _, results = _one_step_per_micro_batch(algo, tmp_path, *extra)
    # forward batches of 1 vs 4 rows differ in the last bits, which Adam can turn into a few percent of one step
    # (lr 1e-3) for a near-zero gradient: the weights agree to 2e-5
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_nonfinite_rewards_skip_updates_and_stop_cleanly(tmp_path):
    calls = {"n": 0}

    def flaky(images, prompts, **metadata):
        calls["n"] += 1
        out = images.mean(dim=(1, 2, 3)).detach()
        return out * float("nan") if calls["n"] in (1,) or calls["n"] >= 3 else out

    trainer = build_trainer(
        PRESET["flow_grpo"],
        _overrides(tmp_path, "max_steps=10", "max_bad_steps=3", "data.eval_size=0"),
        reward=flaky,
    )
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(
        TrainingAborted, match=r"3 steps in a row had a non-finite .* stopped at step 5 of 10"
    ):
        trainer.train()
    rows = _metrics(tmp_path)
    skipped = [r["train/skipped"] for r in rows if "train/skipped" in r]
    assert skipped[:2] == [1.0, 0.0]  # the first step is skipped, the second trains
    assert trainer.step == 5  # steps 3, 4 and 5 are bad in a row: the run stops after the third
    assert (tmp_path / "checkpoint-000005").is_dir()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))
    # the output says it is not a finished run: no final LoRA, status.json aborted with the reason
    assert not (tmp_path / "lora").exists()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "aborted" and status["step"] == 5 and "max_bad_steps=3" in status["reason"]


def test_python_api_with_a_plain_function_reward(tmp_path):
    cfg = TrainConfig(algorithm="refl", output_dir=str(tmp_path), max_steps=1, report_to="none")
    cfg.model.path = "tiny:sd3"
    cfg.data.train = PROMPTS
    cfg.data.eval_size = 0
    cfg.reward = {"placeholder": 1.0}
    cfg.sample.height = cfg.sample.width = 32
    cfg.sample.num_steps = 4
    cfg.refl.prompts_per_step = 2

    def darkness(images, prompts, **metadata):
        return 1 - images.mean(dim=(1, 2, 3))

    from diffrl.rewards import as_reward

    trainer = build_trainer(cfg, reward=as_reward(darkness, differentiable=True))
    assert trainer.reward.name == "darkness"
    metrics = trainer.train()
    assert "reward/darkness/mean" in metrics


@pytest.mark.parametrize("algo", ["flow_grpo", "diffusion_nft", "awm", "dpo"])
def test_sampling_chunk_size_and_background_scoring_do_not_change_the_update(algo, tmp_path):
    # sample.batch_size=2 samples in 4 chunks, each scored in a background thread; 8 samples everything at once
    results = []
    for bs in (2, 8):
        trainer = build_trainer(
            PRESET[algo],
            _overrides(
                tmp_path / f"bs{bs}",
                "max_steps=1",
                f"sample.batch_size={bs}",
                "data.eval_size=0",
                "optim.max_grad_norm=0",
            ),
        )
        trainer.train()
        results.append([p.detach().clone() for p in trainer.params])
    # batched matmuls of 2 vs 8 rows differ in the last bits; Adam turns a near-zero gradient's noise into up to a
    # few percent of one step (lr 1e-3), so the weights agree to 2e-5 rather than to float precision
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_yaml_no_reads_as_the_string_no():
    assert (
        load_config(PRESET["flow_grpo"], [f"data.train={PROMPTS}", "mixed_precision=no"]).mixed_precision
        == "no"
    )


def test_parts_given_as_objects_need_no_config_fields(tmp_path):
    # a notebook passes the model, a reward function and prompt rows with metadata; the config leaves them out
    from diffrl.models import load_model

    seen = []

    def reward(images, prompts, scene=None, **_):
        seen.append(list(scene))
        return images.mean(dim=(1, 2, 3))

    cfg = {
        "algorithm": "diffusion_nft",
        "output_dir": str(tmp_path / "run"),
        "max_steps": 1,
        "report_to": "none",
        "sample": {"height": 32, "width": 32, "num_steps": 2, "eval_num_steps": 2},
        "diffusion_nft": {"group_size": 2, "prompts_per_step": 1},
    }
    rows = [{"prompt": "a red circle", "scene": "s0"}, {"prompt": "a blue square", "scene": "s1"}]
    trainer = build_trainer(
        cfg, model=load_model("tiny:sd3"), reward=reward, train_prompts=rows, eval_prompts=[]
    )
    assert trainer.train_set.prompts == ["a red circle", "a blue square"]
    assert trainer.train_set.metadata == [{"scene": "s0"}, {"scene": "s1"}]
    trainer.train()
    assert seen and set(seen[0]) <= {"s0", "s1"}
    with pytest.raises(ConfigError, match="model.path is empty"):
        build_trainer(cfg, reward=reward, train_prompts=rows)


def test_a_fresh_run_never_appends_to_an_old_one(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(FileExistsError, match="already holds a run"):
        build_trainer(PRESET["refl"], _overrides(tmp_path, "max_steps=1"))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_weighted_single_reward_logs_raw_and_weighted_scores(tmp_path):
    trainer = build_trainer(PRESET["refl"], _overrides(tmp_path, "max_steps=1", "reward={brightness: 2.0}"))
    metrics = trainer.train_step(0)
    assert metrics["reward/combined/mean"] == pytest.approx(2 * metrics["reward/brightness/mean"], rel=1e-5)


def test_nonfinite_gradients_count_as_bad_steps(tmp_path):
    from diffrl.rewards import as_reward

    def nan_grad(images, prompts, **metadata):  # value 0, gradient of sqrt at 0: infinite
        return (images - images.detach()).abs().sqrt().mean(dim=(1, 2, 3))

    trainer = build_trainer(
        PRESET["refl"],
        _overrides(tmp_path, "max_steps=10", "max_bad_steps=2", "data.eval_size=0"),
        reward=as_reward(nan_grad, differentiable=True),
    )
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(TrainingAborted):
        trainer.train()
    rows = [r for r in _metrics(tmp_path) if "train/bad_steps_in_a_row" in r]
    assert [r.get("train/nonfinite_grad") for r in rows] == [1.0, 1.0]
    assert trainer.step == 2  # stopped after two bad steps in a row, nothing updated
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))


# ---------------------------------------------------------------------------------------------- fp16 loss scaling


def _with_cpu_scaler(trainer, **kwargs):
    # accelerate makes a GradScaler only for fp16 on CUDA; a CPU one exercises the same code path in the engine
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", **kwargs)
    return trainer.accelerator.scaler


def test_fp16_loss_scaling_is_undone_before_the_update(tmp_path):
    results = []
    for scaled in (False, True):
        trainer = build_trainer(
            PRESET["refl"], _overrides(tmp_path / str(scaled), "max_steps=1", "data.eval_size=0")
        )
        scaler = _with_cpu_scaler(trainer, init_scale=1024.0, growth_interval=1) if scaled else None
        metrics = trainer.train_step(0)
        state = [trainer.optimizer.state[p]["exp_avg"].clone() for p in trainer.params]
        results.append((metrics, [p.detach().clone() for p in trainer.params], state, scaler))
    (plain, plain_params, plain_state, _), (amp, amp_params, amp_state, scaler) = results
    # the clipped norm and Adam's moments see the true gradient, not 1024 times it
    assert amp["train/grad_norm"] == pytest.approx(plain["train/grad_norm"], rel=1e-6)
    for a, b in zip(plain_state, amp_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    for a, b in zip(plain_params, amp_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert scaler.get_scale() == 2048.0 and amp["train/loss_scale"] == 2048.0  # a good step grows the scale
    assert "train/fp16_overflow" not in amp and "train/loss_scale" not in plain


def test_fp16_overflow_skips_the_update_backs_off_and_is_not_a_bad_step(tmp_path):
    from diffrl.rewards import as_reward

    def nan_grad(images, prompts, **metadata):  # value 0, gradient of sqrt at 0: non-finite
        return (images - images.detach()).abs().sqrt().mean(dim=(1, 2, 3))

    reward = as_reward(nan_grad, differentiable=True)
    overrides = _overrides(tmp_path, "max_steps=3", "max_bad_steps=1", "data.eval_size=0")
    trainer = build_trainer(PRESET["refl"], overrides, reward=reward)
    scaler = _with_cpu_scaler(trainer, init_scale=1024.0)
    before = [p.detach().clone() for p in trainer.params]
    trainer.train()
    rows = [r for r in _metrics(tmp_path) if "train/bad_steps_in_a_row" in r]
    assert trainer.step == 3  # max_bad_steps=1 would have stopped the run after its first step
    assert [r["train/fp16_overflow"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["train/loss_scale"] for r in rows] == [512.0, 256.0, 128.0]
    assert all(r["train/bad_steps_in_a_row"] == 0.0 and "train/nonfinite_grad" not in r for r in rows)
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))
    # the scale is checkpointed with the optimiser
    resumed = build_trainer(PRESET["refl"], [*overrides, "resume_from_checkpoint=latest"], reward=reward)
    _with_cpu_scaler(resumed, init_scale=1024.0)
    resumed.load_checkpoint("latest")
    assert resumed.accelerator.scaler.get_scale() == scaler.get_scale() == 128.0


# ---------------------------------------------------------------------------------------------- resume


def test_resume_restores_running_reward_statistics(tmp_path):
    two_rewards = [
        "reward={brightness: 1.0, saturation: 0.5}",
        "reward_normalize=running",
        "data.eval_size=0",
    ]
    full = build_trainer(PRESET["refl"], _overrides(tmp_path / "full", "max_steps=4", *two_rewards))
    full.train()
    half = build_trainer(PRESET["refl"], _overrides(tmp_path / "half", "max_steps=2", *two_rewards))
    half.train()
    saved = json.loads((tmp_path / "half" / "checkpoint-000002" / "state.json").read_text())["reward_state"]
    assert saved["reward"] == half.reward.training_state() and set(saved["reward"]["running"]) == {
        "brightness",
        "saturation",
    }
    resumed = build_trainer(
        PRESET["refl"],
        _overrides(tmp_path / "half", "max_steps=4", "resume_from_checkpoint=latest", *two_rewards),
    )
    resumed.load_checkpoint("latest")
    assert resumed.reward.training_state() == saved["reward"]
    resumed.train()
    assert resumed.reward.training_state() == full.reward.training_state()
    a, b = _trained(tmp_path / "full"), _trained(tmp_path / "half")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_eval_images_per_prompt_adds_seeds_and_keeps_the_first_image(tmp_path, monkeypatch):
    from diffrl.rewards import as_reward

    seen: dict[int, list[torch.Tensor]] = {}

    def record(images, prompts, **metadata):  # scores each image by its mean; keeps what evaluation sampled
        seen.setdefault(len(seen), []).append(images.detach().clone())
        return images.mean(dim=(1, 2, 3))

    def evaluate(per: int, out: Path) -> tuple[torch.Tensor, dict]:
        seen.clear()
        trainer = build_trainer(
            PRESET["flow_grpo"],
            _overrides(
                out, "data.eval_size=3", f"sample.eval_images_per_prompt={per}", "sample.batch_size=4"
            ),
            reward=as_reward(record),
        )
        metrics = trainer.evaluate()
        return torch.cat([t for chunks in seen.values() for t in chunks]), metrics

    import diffrl.trainers.eval_grid as eval_grid

    drawn = []
    real_grid = eval_grid.save_eval_grid

    def grid(images, prompts, components, path, title=""):
        drawn.append((images.detach().clone(), list(prompts), title))
        return real_grid(images, prompts, components, path, title)

    monkeypatch.setattr(eval_grid, "save_eval_grid", grid)
    one, m1 = evaluate(1, tmp_path / "one")
    two, m2 = evaluate(2, tmp_path / "two")
    # the picture shows the first image of each prompt only, whatever eval_images_per_prompt is
    (g1, p1, t1), (g2, p2, t2) = drawn
    assert g1.shape[0] == g2.shape[0] == 3 and p1 == p2
    torch.testing.assert_close(g2, g1, rtol=0, atol=1e-5)
    assert "6 held-out images" in t2 and "the first of each prompt's 2 shown" in t2 and "shown" not in t1
    assert (tmp_path / "two" / "eval" / "step_000000.png").is_file()
    assert one.shape[0] == 3 and two.shape[0] == 6
    # image 0 of each prompt: the one-image seeds. Equal up to float rounding, not bitwise: the two runs sample in
    # batches of different sizes, and with more than one thread the kernels then sum in different orders
    torch.testing.assert_close(two[:3], one, rtol=0, atol=1e-5)
    assert all(float((two[3 + i] - two[i]).abs().max()) > 1e-2 for i in range(3))  # image 1: new seeds
    key = next(k for k in m2 if k.startswith("eval/reward/"))
    assert m2[key] == pytest.approx(float(two.mean(dim=(1, 2, 3)).mean()), rel=1e-5)
    assert m1[key] == pytest.approx(float(one.mean(dim=(1, 2, 3)).mean()), rel=1e-5)


def test_evaluation_does_not_move_running_reward_statistics(tmp_path):
    # with an empty eval_reward the training reward object is also the evaluation reward
    run = ["reward={brightness: 1.0, saturation: 0.5}", "reward_normalize=running", "data.eval_size=2"]
    trainer = build_trainer(PRESET["refl"], _overrides(tmp_path, "max_steps=1", "eval_reward={}", *run))
    assert trainer.eval_reward is trainer.reward
    trainer.train()
    stats = trainer.reward.training_state()
    assert set(stats["running"]) == {"brightness", "saturation"}
    trainer.evaluate()
    assert trainer.reward.training_state() == stats


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tmp_path, capsys):
    run = ["max_steps=4", "checkpointing_steps=2", "checkpoints_total_limit=0", "data.eval_size=0"]
    build_trainer(PRESET["refl"], _overrides(tmp_path, *run)).train()
    # as if killed after logging step 4 (half way through a fifth row) but before its checkpoint was written
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-000004")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')
    capsys.readouterr()
    build_trainer(PRESET["refl"], _overrides(tmp_path, *run, "resume_from_checkpoint=latest")).train()
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]
    assert "dropped 3 rows logged after step 2" in capsys.readouterr().out


def test_resume_refuses_another_config_before_loading_anything(tmp_path, monkeypatch):
    base = _overrides(tmp_path / "run", "max_steps=2", "data.eval_size=0")
    build_trainer(PRESET["refl"], base).train()
    import diffrl.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the resumed config was checked")

    with monkeypatch.context() as m:
        m.setattr(diffrl.models, "load_model", no_load)
        with pytest.raises(
            ConfigError, match=r"optim\.lr=0\.001 but the current config has optim\.lr=0\.002"
        ):
            build_trainer(PRESET["refl"], [*base, "resume_from_checkpoint=latest", "optim.lr=2e-3"])
        with pytest.raises(ConfigError, match=r"reward\.saturation=\(not set\) .* reward\.saturation=1\.0"):
            build_trainer(
                PRESET["refl"],
                [*base, "resume_from_checkpoint=latest", "reward={brightness: 1.0, saturation: 1.0}"],
            )
    # bookkeeping may change; so may everything when a new output_dir starts from the checkpoint's weights
    free = ["max_steps=5", "log_every=2", "checkpointing_steps=1", "report_to=none", "eval_every=1"]
    build_trainer(PRESET["refl"], [*base, "resume_from_checkpoint=latest", *free])
    ckpt = tmp_path / "run" / "checkpoint-000002"
    trainer = build_trainer(
        PRESET["refl"],
        [*base, f"output_dir={tmp_path / 'new'}", f"resume_from_checkpoint={ckpt}", "optim.lr=2e-3"],
    )
    trainer.load_checkpoint(str(ckpt))
    assert trainer.step == 2


# ---------------------------------------------------------------------------------------------- ReFL batch norm


def test_refl_batch_normalisation_takes_the_whole_step_whatever_the_micro_batch(tmp_path):
    before, results = _one_step_per_micro_batch(
        "refl", tmp_path, "reward={brightness: 1.0, saturation: 0.5}", "reward_normalize=batch"
    )
    # per micro-batch statistics would give a micro-batch of one image a total of 0 and no gradient
    moved = max(float((a - b).abs().max()) for a, b in zip(before, results[0], strict=True))
    assert moved > 1e-4
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------- ReFL denoising


def test_refl_denoising_regulariser_logs_its_loss_and_changes_the_update(tmp_path):
    rows, weights = {}, {}
    for weight in (0.0, 1.0):
        out = tmp_path / str(weight)
        trainer = build_trainer(
            PRESET["refl"],
            _overrides(out, "max_steps=2", "data.eval_size=0", f"refl.denoise_weight={weight}"),
        )
        trainer.train()
        rows[weight] = [r for r in _metrics(out) if "train/loss" in r]
        weights[weight] = [p.detach().clone() for p in trainer.params]
    assert all("train/denoise_loss" not in r for r in rows[0.0])
    assert all(r["train/denoise_loss"] > 0 for r in rows[1.0])
    # the first step starts from the same weights: the losses differ by exactly the weighted regulariser
    first_off, first_on = rows[0.0][0], rows[1.0][0]
    assert first_on["train/loss"] - first_off["train/loss"] == pytest.approx(
        first_on["train/denoise_loss"], rel=1e-5
    )
    assert any(not torch.equal(a, b) for a, b in zip(weights[0.0], weights[1.0], strict=True))


@pytest.mark.parametrize(
    "stop, last", [(("0.5", "0.75"), False), (("0.75", "1.0"), True)], ids=["j<T-1", "j=T-1"]
)
def test_refl_denoising_regulariser_trains_on_the_full_ode_sample(stop, last, tmp_path, monkeypatch):
    # x0 is the full ODE sample from the step's noise whether the stop index is the last step (x0_hat, reused) or
    # not (the ODE continued from s_j without grad); x_s = (1 - s) x0 + s eps with s in (0, 1) and eps per row
    import diffrl.trainers.refl as refl
    from diffrl.samplers import rollout

    trainer = build_trainer(
        PRESET["refl"],
        _overrides(
            tmp_path,
            "max_steps=1",
            "data.eval_size=0",
            "refl.denoise_weight=1.0",
            f"refl.stop_min={stop[0]}",
            f"refl.stop_max={stop[1]}",
        ),
    )
    model, s = trainer.model, trainer.cfg.sample
    T = s.num_steps
    assert (trainer._stop_index(T) == T - 1) == last
    batch = trainer.step_batch(trainer.cfg.refl.prompts_per_step)
    n = len(batch.prompts)
    with torch.no_grad():
        noise = model.sample_noise(n, s.height, s.width, trainer.row_generators(1, range(n), 0))
        sigmas = model.schedule(T, s.height, s.width)
        expected = rollout(
            model, model.encode(batch.prompts), sigmas, noise, guidance_scale=s.guidance_scale
        ).final
    seen = {}
    velocity, loss = model.velocity, refl.denoising_loss

    def spy_velocity(x, sigma, cond, guidance_scale=1.0):
        if guidance_scale == 1.0:  # only the regulariser calls the velocity without CFG
            seen["x_s"], seen["s"] = x.detach().clone(), torch.as_tensor(sigma).detach().clone()
        return velocity(x, sigma, cond, guidance_scale)

    def spy_loss(v, x0, eps):
        seen["x0"], seen["eps"] = x0.detach().clone(), eps.detach().clone()
        return loss(v, x0, eps)

    monkeypatch.setattr(model, "velocity", spy_velocity)
    monkeypatch.setattr(refl, "denoising_loss", spy_loss)
    metrics = trainer.train_step(0)
    assert metrics["train/denoise_loss"] > 0
    torch.testing.assert_close(seen["x0"], expected.float(), rtol=1e-4, atol=1e-5)
    level = seen["s"].view(-1, 1, 1, 1)
    assert seen["s"].shape == (n,) and bool(((seen["s"] > 0) & (seen["s"] < 1)).all())
    assert len(set(seen["s"].tolist())) == n  # one level per sample
    torch.testing.assert_close(seen["x_s"], (1 - level) * seen["x0"] + level * seen["eps"])


def test_an_image_size_the_model_cannot_make_fails_before_training(tmp_path, monkeypatch):
    import diffrl.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the image size was checked")

    monkeypatch.setattr(loading, "load_model", no_load)  # the check reads the config files only
    # the tiny SD3 model makes at most 256 x 256 (32 x 32 patches of 2 x 2 latents of 4 x 4 pixels)
    with pytest.raises(
        ValueError, match=r"height=1024 is larger than this SD3 model can make \(at most 256 pixels"
    ):
        build_trainer(PRESET["flow_grpo"], _overrides(tmp_path, "sample.height=1024", "sample.width=1024"))
    with pytest.raises(ValueError, match=r"width=36 must be a positive multiple of 8 for this flux model"):
        build_trainer(
            PRESET["flow_grpo"],
            _overrides(tmp_path, "model.path=tiny:flux", "sample.height=32", "sample.width=36"),
        )
    assert not (tmp_path / "metrics.jsonl").exists()
