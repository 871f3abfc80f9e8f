"""Wan 2.2 on the tiny offline pipelines: both experts trained in one run (``expert="both"``, ``tiny:wan22``), its LoRA
reloaded by a plain diffusers pipeline, a Flow-GRPO step and a bitwise resume; the video VAE's tiling and slicing."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import WanPipeline  # noqa: E402

from diffrl.models import load_model  # noqa: E402
from diffrl.models.loading import tiny_model_dir  # noqa: E402
from diffrl.models.wan import WanExperts  # noqa: E402
from diffrl.samplers import rollout  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")

ROOT = Path(__file__).resolve().parents[1]
SIZE = (32, 48)
FRAMES = 5
STEPS = (
    4  # levels 1000 s of tiny:wan22's schedule: 1000, ~955, ~875 (high-noise expert) then ~700 (low-noise)
)


def _randomise_lora_b(transformer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _pipeline_latents(pipe, seed: int):
    return pipe(
        "a red cat",
        negative_prompt="",
        guidance_scale=5.0,
        height=SIZE[0],
        width=SIZE[1],
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="latent",
    ).frames


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """tiny:wan22 with a rank-4 LoRA on both experts (random B matrices, so it changes every step), saved to disk."""
    model = load_model("tiny:wan22", num_frames=FRAMES, expert="both")
    model.add_lora(rank=4, alpha=8)
    _randomise_lora_b(model.transformer)
    path = model.save_lora(tmp_path_factory.mktemp("wan22-both") / "lora")
    return model, path


def _ours(model, seed: int):
    levels = model.schedule(STEPS, *SIZE)
    noise = model.sample_noise(1, *SIZE, generator=[torch.Generator().manual_seed(seed)])
    with torch.no_grad():
        return rollout(
            model, model.encode(["a red cat"], negative_prompt=""), levels, noise, guidance_scale=5.0
        )


def test_both_experts_train_and_their_lora_loads_in_diffusers(both):
    """expert="both": one module holding both experts is what trains (its weights ``high.*`` then ``low.*``), the LoRA
    changes the steps of both experts, and the two saved files loaded into a fresh pipeline (the second with
    ``load_into_transformer_2=True``) reproduce the rollout to 1e-5; diffrl's loader puts them back on both."""
    from diffrl.models.lora_files import load_lora

    model, path = both
    assert isinstance(model.transformer, WanExperts) and model.expert == "both"
    assert (
        model.transformer.high is model.pipe.transformer and model.transformer.low is model.pipe.transformer_2
    )
    assert model.trains_several_experts and not model.trains_some_levels_only
    names = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert (
        len(names) == len(model.trainable_parameters()) == 64
    )  # 2 experts x 2 blocks x 8 projections x (A, B)
    assert names[:32] == ["high." + n for n in (m.removeprefix("low.") for m in names[32:])]
    with pytest.raises(TypeError, match="not called itself"):
        model.transformer(torch.zeros(1))
    levels = model.schedule(STEPS, *SIZE)
    n_high = int((levels[:-1] * 1000 >= 875).sum())
    assert 0 < n_high < STEPS
    ours = _ours(model, seed=1)
    with model.disable_adapter():  # the reference policy: both adapters off
        base = _ours(model, seed=1)
    # the first (high-noise) step already differs, and the low-noise steps add to it
    assert (ours.latents[:, 1] - base.latents[:, 1]).abs().max().item() > 1e-3
    assert (ours.final - base.final).abs().max().item() > 1e-3
    assert sorted(p.name for p in path.iterdir()) == [
        "diffrl_wan_expert.json",
        "pytorch_lora_weights.safetensors",
        "transformer_2",
    ]
    assert json.loads((path / "diffrl_wan_expert.json").read_text()) == {"expert": "both"}
    fresh = WanPipeline.from_pretrained(tiny_model_dir("tiny:wan22"))
    fresh.set_progress_bar_config(disable=True)
    assert (_pipeline_latents(fresh, seed=1) - base.final).abs().max().item() < 1e-5
    fresh.load_lora_weights(path)
    fresh.load_lora_weights(path / "transformer_2", load_into_transformer_2=True)
    assert (_pipeline_latents(fresh, seed=1) - ours.final).abs().max().item() < 1e-5
    # only one file loaded (the high-noise expert's): a different video
    half = WanPipeline.from_pretrained(tiny_model_dir("tiny:wan22"))
    half.set_progress_bar_config(disable=True)
    half.load_lora_weights(path)
    assert (_pipeline_latents(half, seed=1) - ours.final).abs().max().item() > 1e-3
    again = load_model(
        "tiny:wan22", num_frames=FRAMES
    )  # no expert given: the file next to the LoRA says both
    assert "64 tensors" in load_lora(again, path)
    assert again.expert == "both" and isinstance(again.transformer, WanExperts)
    assert (_ours(again, seed=1).final - ours.final).abs().max().item() < 1e-5


_LOAD_BOTH = """
import json, sys, torch
from diffusers import WanPipeline
assert "diffrl" not in sys.modules
pipe = WanPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(sys.argv[2])
pipe.load_lora_weights(sys.argv[2] + "/transformer_2", load_into_transformer_2=True)
out = pipe("a red cat", negative_prompt="", guidance_scale=5.0, height=32, width=48, num_frames=5,
           num_inference_steps=4, generator=[torch.Generator().manual_seed(1)], output_type="latent").frames
print(json.dumps(out.flatten().tolist()))
"""


@pytest.mark.slow
def test_both_experts_lora_loads_in_a_process_without_diffrl(both):
    """The two files in a fresh Python process that imports diffusers only (about 20 s here: slow)."""
    model, path = both
    ours = _ours(model, seed=1).final
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_BOTH, str(tiny_model_dir("tiny:wan22")), str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1])).view_as(ours)
    assert (ours - expected).abs().max().item() < 1e-5


def _overrides(out, *extra):
    return [
        f"output_dir={out}",
        f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
        "model.path=tiny:wan22",
        "model.expert=both",
        f"sample.num_frames={FRAMES}",
        "eval_every=0",
        "data.eval_size=0",
        "report_to=none",
        *extra,
    ]


def test_flow_grpo_step_trains_both_experts(tmp_path):
    """model.expert=both: one Flow-GRPO step moves every LoRA tensor of both experts (each from the steps its levels
    route to it), on-policy (ratio exactly 1, no KL); gradient clipping sees both experts' gradients."""
    from diffrl.train import build_trainer

    trainer = build_trainer(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml",
        _overrides(
            tmp_path / "run",
            "max_steps=1",
            "checkpointing_steps=0",
            "optim.max_grad_norm=1e-6",
            "video.vae_tiling=true",
            "video.vae_tile_size=32",
            "video.vae_tile_stride=16",
            "video.vae_slicing=true",
            "model.gradient_checkpointing=true",
        ),
    )
    model = trainer.model
    assert isinstance(model.transformer, WanExperts)
    assert model.pipe.transformer.gradient_checkpointing and model.pipe.transformer_2.gradient_checkpointing
    vae = model.vae  # the video settings reach the VAE
    assert (
        vae.use_tiling
        and vae.use_slicing
        and (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (32, 16)
    )
    names = trainer.param_names
    assert sum(n.startswith("high.") for n in names) == sum(n.startswith("low.") for n in names) == 32
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    moved = {n for n, a, p in zip(names, before, trainer.params, strict=True) if not torch.equal(a, p)}
    assert moved == set(names)
    assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0
    assert metrics["train/grad_norm"] > 1e-6  # the norm over both experts, clipped to the tiny max_grad_norm


def test_both_experts_resume_is_bitwise_identical(tmp_path):
    """Two Flow-GRPO steps in one go, and one step, a checkpoint and a resumed second step: the same weights of both
    experts bit for bit; the checkpoint loads back onto both experts with diffrl's loader."""
    from safetensors.torch import load_file

    from diffrl.models.lora_files import load_lora
    from diffrl.train import build_trainer

    preset = ROOT / "configs" / "tiny" / "flow_grpo.yaml"
    sizes = (
        "sample.num_steps=3",
        "flow_grpo.prompts_per_step=1",
        "flow_grpo.group_size=2",
        "optim.train_batch_size=2",
    )
    build_trainer(
        preset, _overrides(tmp_path / "full", "max_steps=2", "checkpointing_steps=1", *sizes)
    ).train()
    build_trainer(
        preset, _overrides(tmp_path / "half", "max_steps=1", "checkpointing_steps=1", *sizes)
    ).train()
    resumed = build_trainer(
        preset,
        _overrides(
            tmp_path / "half", "max_steps=2", "checkpointing_steps=1", "resume_from_checkpoint=latest", *sizes
        ),
    )
    resumed.train()
    a = load_file(str(tmp_path / "full" / "checkpoint-000002" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoint-000002" / "trainable.safetensors"))
    first = load_file(str(tmp_path / "full" / "checkpoint-000001" / "trainable.safetensors"))
    assert a.keys() == b.keys() and len(a) == 64
    assert {k.split(".", 1)[0] for k in a} == {"high", "low"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], first[k]) for k in a)  # the second step moved every tensor of both
    model = load_model("tiny:wan22", num_frames=FRAMES)
    load_lora(model, tmp_path / "full" / "checkpoint-000002")
    assert model.expert == "both"
    named = dict(model.transformer.named_parameters())
    assert not (
        tmp_path / "full" / "checkpoint-000002" / "ema.safetensors"
    ).exists()  # no EMA: the trained weights load
    assert all(torch.equal(named[k], v) for k, v in a.items())
    final = tmp_path / "full" / "lora"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert (final / "transformer_2" / "pytorch_lora_weights.safetensors").is_file()


# ------------------------------------------------------------------------------------------- VAE tiling and slicing


def test_vae_slicing_and_tiling_decode(tmp_path):
    """Slicing decodes the videos one at a time: bitwise each video's own decode, within 2e-6 of the batched one
    (measured 1.2e-6: batched convolutions round differently). Tiling: tiles at least as large as the frame decode
    whole frames (bitwise); 32-pixel tiles 16 apart on 32x48 frames blend 6 tiles and equal the pipeline's own tiled
    decode to 1e-5; on the tiny random VAE (receptive field larger than a tile) they change pixels by 0.023 on average,
    0.26 at most, of the [0, 1] range (measured); the tiled decode stays differentiable."""
    model = load_model("tiny:wan", num_frames=FRAMES)
    z = torch.randn(2, *model.latent_shape(*SIZE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.decode(z)
        alone = torch.cat([model.decode(z[i : i + 1]) for i in range(2)])
        model.set_vae_slicing()
        sliced = model.decode(z)
        model.set_vae_slicing(False)
        assert torch.equal(sliced, alone)
        assert (sliced - whole).abs().max().item() < 2e-6
        model.set_vae_tiling(tile_size=48, tile_stride=32)  # no frame side is larger than a tile
        assert torch.equal(model.decode(z), whole)
        model.set_vae_tiling(tile_size=32, tile_stride=16)
        tiled = model.decode(z)
    diff = (tiled - whole).abs()
    assert 1e-3 < diff.mean().item() < 0.05 and diff.max().item() < 0.5, (diff.mean(), diff.max())
    pipe = WanPipeline.from_pretrained(tiny_model_dir("tiny:wan"))
    pipe.vae.enable_tiling(32, 32, 16, 16)
    with torch.no_grad():
        cfg = pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        video = pipe.vae.decode(z * std + mean, return_dict=False)[0]
        video = pipe.video_processor.postprocess_video(video, output_type="pt")
    assert (tiled - video).abs().max().item() < 1e-5
    zg = z[:1].clone().requires_grad_(True)
    model.decode(zg).mean().backward()
    assert torch.isfinite(zg.grad).all() and zg.grad.abs().sum() > 0
    model.set_vae_tiling(False)
    assert not model.vae.use_tiling
    for bad, match in (
        (dict(tile_size=30), "tile_size=30 must be a positive multiple of the VAE's 4x"),
        (dict(tile_size=32, tile_stride=32), "tile_stride=32 must be less than tile_size=32"),
    ):
        with pytest.raises(ValueError, match=match):
            model.set_vae_tiling(**bad)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["video.vae_tile_size=100", "video.vae_tiling=true"],
            r"video.vae_tile_size=100 must be 0 .* multiple of 16",
        ),
        (
            ["video.vae_tile_stride=64"],
            "video.vae_tile_stride=64 sizes the VAE's tiles, but video.vae_tiling is off",
        ),
        (
            ["video.vae_tiling=true", "video.vae_tile_size=128", "video.vae_tile_stride=192"],
            r"video.vae_tile_stride=192 must be less than video.vae_tile_size=128",
        ),
    ],
)
def test_vae_tiling_settings_are_checked_before_loading(overrides, match):
    """Bad values fail with one sentence at load_config; an image model refuses the video VAE settings."""
    from diffrl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(
            ROOT / "configs" / "tiny" / "flow_grpo.yaml",
            [f"data.train={ROOT / 'configs/tiny/prompts.txt'}", *overrides],
        )


def test_image_model_refuses_video_vae_settings(tmp_path):
    from diffrl.config import ConfigError
    from diffrl.train import build_trainer

    with pytest.raises(
        ConfigError, match=r"video.vae_slicing=true is for video models, but tiny:sd3 makes images"
    ):
        build_trainer(
            ROOT / "configs" / "tiny" / "flow_grpo.yaml",
            [
                f"output_dir={tmp_path / 'run'}",
                f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
                "video.vae_slicing=true",
                "report_to=none",
            ],
        )


def test_memory_estimate_counts_both_experts_and_the_video_vae_settings():
    """``diffrl doctor``'s estimate for Wan 2.2 A14B (published sizes): expert=both trains twice one expert's LoRA (and,
    fully fine-tuned, holds both 14.29B experts in float32); the VAE term of sampling, ``B_dec F_dec H_t W_t C a 3``
    (4 frames at once, 96 channels, bf16), shrinks to 256 x 256 tiles with tiling and to one video with slicing; FSDP
    divides both experts' weights (the frozen one's too); the
    advice for a video model that does not fit names both settings."""
    from diffrl.config import load_config
    from diffrl.doctor import estimate_memory, memory

    tiny = ROOT / "configs" / "tiny" / "flow_grpo.yaml"
    common = [
        "model.path=Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        "model.dtype=bfloat16",
        "sample.height=480",
        "sample.width=832",
        "sample.num_frames=81",
        "sample.batch_size=2",
    ]

    def est(*extra):
        return estimate_memory(load_config(tiny, [*common, *extra]))

    one, both = est("model.expert=low"), est("model.expert=both")
    assert both.trainable_params == 2 * one.trainable_params and both.params == one.params
    full_one, full_both = (
        est("model.expert=low", "model.lora_rank=0", "flow_grpo.kl_beta=0"),
        est("model.expert=both", "model.lora_rank=0", "flow_grpo.kl_beta=0"),
    )
    expert = full_one.trainable_params
    assert 14.28e9 < expert < 14.30e9 and full_both.trainable_params == 2 * expert
    assert full_both.weights - full_one.weights == expert * (4 - 2)  # the second expert in float32 too
    # FSDP over 8 processes shards both experts, the frozen one too: 7/8 of 2 x 14.29B bf16 weights leave a process
    for which in ("low", "both"):
        sharded = estimate_memory(
            load_config(tiny, [*common, f"model.expert={which}", "fsdp=true"]), num_processes=8
        )
        plain = est(f"model.expert={which}")
        assert plain.weights - sharded.weights == pytest.approx(2 * expert * 2 * 7 / 8, abs=2), which
    vae = 4 * 96 * 2 * 3  # per pixel: frames decoded at once, channels, bf16 bytes, elements per channel
    tiled = est("model.expert=low", "video.vae_tiling=true")
    assert one.sample_activations - tiled.sample_activations == 2 * vae * (480 * 832 - 256 * 256)
    sliced = est("model.expert=low", "video.vae_slicing=true")
    assert one.sample_activations - sliced.sample_activations == (2 - 1) * vae * 480 * 832
    assert one.video and "video.vae_tiling=true, video.vae_slicing=true" in memory._memory_fix(
        load_config(tiny, common), video=True
    )
    assert "vae_tiling" not in memory._memory_fix(load_config(tiny, []), video=False)


# ------------------------------------------------------------------------------------------- Wan 2.2 TI2V-5B

TI2V_SIZE = (32, 64)  # multiples of 32: the 16x VAE times the 2x2 patches


@pytest.fixture(scope="module")
def ti2v():
    model = load_model("tiny:wan22_ti2v", num_frames=FRAMES)
    pipe = WanPipeline.from_pretrained(tiny_model_dir("tiny:wan22_ti2v"))
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


def test_ti2v_geometry_schedule_and_memory_hooks(ti2v):
    """TI2V-5B's layout: 48 latent channels, 16x spatial and 4x temporal compression (a 5 x 32 x 64 video has latents
    (48, 2, 2, 4)), sizes in multiples of 32, the pipeline scheduler's levels bit for bit; the adapter's memory hooks
    read the same geometry from the config files, and the published TI2V-5B row counts 5.0B transformer parameters."""
    from diffrl.config import load_config
    from diffrl.doctor import estimate_memory

    model, pipe = ti2v
    assert model.expand_timesteps and pipe.config.expand_timesteps and model.num_experts == 1
    assert model.latent_shape(*TI2V_SIZE) == (48, 2, 2, 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        model.latent_shape(48, 64)
    for steps in (2, 5):
        pipe.scheduler.set_timesteps(steps)
        assert torch.equal(model.schedule(steps, *TI2V_SIZE), pipe.scheduler.sigmas)
    vcfg = dict(model.vae.config)
    # 8 decoder channels at half resolution, unfolded 2x2: 2 per output pixel
    assert type(model).vae_geometry(vcfg) == (16, 2, 48) and model.vae_scale_factor == 16
    assert type(model).memory_frames(FRAMES, vcfg) == (2, 4)
    est = estimate_memory(
        load_config(
            ROOT / "configs" / "tiny" / "flow_grpo.yaml", ["model.path=Wan-AI/Wan2.2-TI2V-5B-Diffusers"]
        )
    )
    assert 4.99e9 < est.params - 5.681e9 - 0.7047e9 < 5.01e9
    assert (
        est.trainable_params == 32 * 30 * 8 * 2 * 3072
    )  # rank 32 on 8 square projections per block, width 3072


@pytest.mark.parametrize("negative,cfg,steps", [("", 5.0, 3), (None, 1.0, 2)])
def test_ti2v_rollout_reproduces_the_pipeline(ti2v, negative, cfg, steps):
    """A noise-free rollout equals ``pipe(output_type="latent")`` (measured: bit for bit; tested to 1e-5), with the
    transformer given one timestep per video token, ``(B, F' h w / 4)``, all at the sample's ``1000 s``, as the
    pipeline's ``expand_timesteps`` branch; with CFG both passes run as one batch."""
    model, pipe = ti2v
    prompts = ["a red cat", "two green circles"]
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    expected = pipe(
        prompts,
        negative_prompt=negative,
        guidance_scale=cfg,
        height=TI2V_SIZE[0],
        width=TI2V_SIZE[1],
        num_frames=FRAMES,
        num_inference_steps=steps,
        generator=gens,
        output_type="latent",
    ).frames
    seen = []
    hook = model.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    try:
        cond = model.encode(prompts, negative_prompt=negative)
        gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
        noise = model.sample_noise(2, *TI2V_SIZE, generator=gens)
        levels = model.schedule(steps, *TI2V_SIZE)
        with torch.no_grad():
            got = rollout(model, cond, levels, noise, guidance_scale=cfg).final
    finally:
        hook.remove()
    assert got.shape == expected.shape == (2, 48, 2, 2, 4)
    assert (got - expected).abs().max().item() < 1e-5
    rows = 4 if cfg > 1 else 2
    assert [tuple(t.shape) for t in seen] == [(rows, 2 * 1 * 2)] * steps
    for t, level in zip(seen, levels[:-1], strict=True):
        assert torch.equal(t, torch.full_like(t, float(level) * 1000))


def test_ti2v_decode_equals_the_pipeline_video(ti2v):
    model, pipe = ti2v
    z = torch.randn(1, *model.latent_shape(*TI2V_SIZE), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.decode(z)
        cfg = pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, 48, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, 48, 1, 1, 1)
        video = pipe.video_processor.postprocess_video(pipe.vae.decode(z * std + mean)[0], output_type="pt")
    assert ours.shape == video.shape == (1, FRAMES, 3, *TI2V_SIZE)
    assert (ours - video).abs().max().item() < 1e-5


def test_ti2v_flow_grpo_step_is_on_policy(tmp_path):
    """Training TI2V-5B text-to-video: one Flow-GRPO step moves every LoRA tensor, ratio exactly 1."""
    from diffrl.train import build_trainer

    trainer = build_trainer(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
            "model.path=tiny:wan22_ti2v",
            f"sample.num_frames={FRAMES}",
            "sample.width=64",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
    )
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
    assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0


def test_ti2v_image_conditioned_mode_is_refused():
    """TI2V's image-to-video mode (another pipeline class with ``expand_timesteps``) is refused by name."""
    from types import SimpleNamespace

    from diffrl.models import WanModel

    class WanImageToVideoPipeline:
        config = SimpleNamespace(expand_timesteps=True)

    with pytest.raises(
        NotImplementedError, match="Wan 2.2 TI2V's image-conditioned mode .* is not implemented"
    ):
        WanModel(WanImageToVideoPipeline())


def test_wan22_preset_trains_both_experts_with_the_references_guidance():
    """configs/wan22_t2v_a14b_pref_grpo_unifiedreward.yaml (Pref-GRPO's lora_ur_flex_prefgrpo_wan22.sh): both experts,
    CFG 4 on the high-noise steps and 3 on the low-noise ones (--cfg_infer 4.0, --cfg_infer_2 3.0); the rest is
    checked with the other Pref-GRPO presets in tests/test_pref_grpo_presets.py. model.guidance_scale_2 reaches the
    adapter, and a one-transformer model or a scale below 1 is refused."""
    from diffrl.config import ConfigError, load_config
    from diffrl.models import load_model_from_config

    cfg = load_config(ROOT / "configs" / "wan22_t2v_a14b_pref_grpo_unifiedreward.yaml")
    assert (cfg.model.expert, cfg.model.guidance_scale_2, cfg.sample.guidance_scale) == ("both", 3.0, 4.0)
    tiny = load_config(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml", ["model.path=tiny:wan22", "model.guidance_scale_2=3"]
    )
    assert load_model_from_config(tiny.model).guidance_scale_2 == 3.0
    with pytest.raises(
        ValueError, match="model.guidance_scale_2=2.0 is the CFG scale of Wan 2.2's low-noise expert"
    ):
        load_model_from_config(
            load_config(
                ROOT / "configs" / "tiny" / "flow_grpo.yaml",
                ["model.path=tiny:wan", "model.guidance_scale_2=2"],
            ).model
        )
    with pytest.raises(ConfigError, match="model.guidance_scale_2=0.5 must be 0"):
        load_config(ROOT / "configs" / "tiny" / "flow_grpo.yaml", ["model.guidance_scale_2=0.5"])


@pytest.mark.parametrize(
    "algo", ["diffusion_nft"] + [pytest.param(a, marks=pytest.mark.slow) for a in ("refl", "awm", "dpo")]
)  # about 3 s each on 2 busy cores: DiffusionNFT (old-policy adapters on both experts) by default
def test_every_trainer_takes_a_step_with_both_experts(algo, tmp_path):
    """model.expert=both with each other trainer's tiny preset: one step moves trainable tensors of both experts (the
    trainers' extra adapters, DiffusionNFT's old policy and AWM's EMA, exist on both) with finite metrics."""
    import numpy as np

    from diffrl.train import build_trainer

    trainer = build_trainer(
        ROOT / "configs" / "tiny" / f"{algo}.yaml",
        _overrides(tmp_path / "run", "max_steps=1", "checkpointing_steps=0"),
    )
    model = trainer.model
    assert isinstance(model.transformer, WanExperts)
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    moved = {
        n.split(".", 1)[0]
        for n, a, p in zip(trainer.param_names, before, trainer.params, strict=True)
        if not torch.equal(a, p)
    }
    assert moved == {"high", "low"}, moved
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    if algo in ("diffusion_nft", "awm"):
        extra = {"diffusion_nft": "old", "awm": "ema"}[algo]
        adapters = set(model.pipe.transformer.peft_config) & set(model.pipe.transformer_2.peft_config)
        assert "default" in adapters and len(adapters) >= 2, (extra, adapters)


@pytest.mark.parametrize("expert", ["both", "low"])
def test_deepspeed_is_refused_for_experts(expert, tmp_path, monkeypatch):
    """Wan 2.2's experts train under FSDP (tests/test_distributed.py, tests/test_wan22_fsdp.py); DeepSpeed is refused
    with one sentence, by the config check before any model loads and by the engine for a model passed in."""
    from diffrl.config import ConfigError, load_config, validate
    from diffrl.train import build_trainer
    from diffrl.trainers.engine import Trainer

    preset = ROOT / "configs" / "tiny" / "flow_grpo.yaml"
    overrides = _overrides(tmp_path / "run", "max_steps=1", "checkpointing_steps=0")
    overrides[overrides.index("model.expert=both")] = f"model.expert={expert}"
    cfg = load_config(preset, overrides)
    validate(cfg, 2, sharded=True)  # the experts under FSDP are fine
    validate(load_config(preset, [*overrides, "model.lora_rank=0", "flow_grpo.kl_beta=0"]), 2, sharded=True)
    with pytest.raises(ConfigError, match=f"model.expert={expert} under DeepSpeed is not implemented"):
        validate(cfg, 2, zero_stage=2)
    # the engine, after the training mode is set (a model passed in has its expert chosen already)
    monkeypatch.setattr(Trainer, "zero_stage", property(lambda self: 2))
    which = "both" if expert == "both" else "one"
    with pytest.raises(NotImplementedError, match=f"training {which} of Wan 2.2's experts under DeepSpeed"):
        build_trainer(preset, overrides)
