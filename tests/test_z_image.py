"""The Z-Image adapter against diffusers' own ZImagePipeline, on the tiny offline pipeline (``tiny:z_image``):
schedule (static shift of Z-Image / Z-Image-Turbo, and dynamic shifting), prompt encoding, a noise-free rollout with
and without CFG, decoding, a LoRA saved for ``load_lora_weights`` (checked in a process that never imports diffrl),
and every trainer's tiny preset taking a step."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline  # noqa: E402
from diffusers.pipelines.z_image.pipeline_z_image import (  # noqa: E402
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)

from diffrl.models import ADAPTERS, ZImageModel, load_model  # noqa: E402
from diffrl.models.loading import tiny_model_dir  # noqa: E402
from diffrl.models.tiny import Z_IMAGE_TURBO_SCHEDULER_CONFIG  # noqa: E402
from diffrl.samplers import rollout, sigmas_from_scheduler_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")

PROMPTS = ["a red cat", "the blue square on the left of a tree", "two green circles"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny:z_image")


@pytest.fixture(scope="module")
def pipe():
    p = ZImagePipeline.from_pretrained(tiny_model_dir("tiny:z_image"))
    p.set_progress_bar_config(disable=True)
    return p


def _pipeline_sigmas(scheduler, steps: int, image_seq_len: int) -> torch.Tensor:
    # ZImagePipeline.__call__'s schedule: mu from the token count, its default sigmas, retrieve_timesteps
    c = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
    return scheduler.sigmas


def test_detected_and_loaded(model):
    assert ADAPTERS["ZImagePipeline"] is ZImageModel
    assert isinstance(model, ZImageModel) and model.family == "z_image"
    assert model.vae_scale_factor == 4 and model.latent_shape(32, 48) == (4, 8, 12)
    assert model.guidance_is_cfg and model.uses_negative_prompt
    assert (model.default_num_steps, model.default_guidance_scale) == (
        50,
        6.0,
    )  # the pipeline's 50 steps, CFG 5
    with pytest.raises(ValueError, match="multiple of 8"):
        model.latent_shape(36, 32)
    with pytest.raises(ValueError, match="max_sequence_length=0"):
        ZImageModel(model.pipe, max_sequence_length=0)


def test_turbo_defaults(model, tmp_path):
    turbo = ZImageModel(model.pipe, turbo=True)
    assert (turbo.default_num_steps, turbo.default_guidance_scale) == (9, 1.0)  # 9 steps, no CFG
    link = tmp_path / "Z-Image-Turbo"
    link.symlink_to(tiny_model_dir("tiny:z_image"))
    assert load_model(link).turbo and not model.turbo


DYNAMIC = {
    **Z_IMAGE_TURBO_SCHEDULER_CONFIG,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
}


@pytest.mark.parametrize("config", [Z_IMAGE_TURBO_SCHEDULER_CONFIG, DYNAMIC], ids=["static", "dynamic"])
@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
@pytest.mark.parametrize("steps", [2, 9])
def test_schedule_equals_pipeline_bitwise(model, config, size, steps):
    h, w = size
    expected = _pipeline_sigmas(FlowMatchEulerDiscreteScheduler(**config), steps, (h // 8) * (w // 8))
    model.scheduler_config = dict(FlowMatchEulerDiscreteScheduler(**config).config)
    try:
        got = model.schedule(steps, h, w)
    finally:
        model.scheduler_config = dict(model.pipe.scheduler.config)
    assert torch.equal(got, expected), (got, expected)
    if (
        config is Z_IMAGE_TURBO_SCHEDULER_CONFIG
    ):  # the static shift by hand: 3 s / (1 + 2 s) on linspace(1, 1/T, T)
        s = torch.linspace(1.0, 1 / steps, steps).double()
        torch.testing.assert_close(got[:-1].double(), 3 * s / (1 + 2 * s), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seq", [4096, 2304])  # 1024x1024 and 768x768 pixels: the real model's token counts
def test_schedule_real_resolutions_bitwise(seq):
    for config in (Z_IMAGE_TURBO_SCHEDULER_CONFIG, DYNAMIC):
        expected = _pipeline_sigmas(FlowMatchEulerDiscreteScheduler(**config), 9, seq)
        got = sigmas_from_scheduler_config(
            config, 9, image_seq_len=seq, base_sigmas=torch.linspace(1.0, 1 / 9, 9).tolist()
        )
        assert torch.equal(got, expected)


def test_encode_equals_pipeline_and_is_cached(model, pipe):
    model.clear_prompt_cache()
    cond = model.encode(PROMPTS, negative_prompt="")
    embeds, negs = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=True)
    lengths = [e.shape[0] for e in embeds]
    assert len(set(lengths)) > 1  # prompts of different lengths: padded to the longest, masked
    assert cond.prompt_mask.sum(1).tolist() == lengths
    for i, e in enumerate(embeds):
        assert torch.equal(cond.prompt_embeds[i, : lengths[i]], e)
        assert not cond.prompt_embeds[i, lengths[i] :].any()
        assert torch.equal(cond.negative_prompt_embeds[i, : negs[i].shape[0]], negs[i])
    assert cond.negative_prompt_mask.all()
    calls = []
    handle = model.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = model.encode(PROMPTS[::-1])
    finally:
        handle.remove()
    assert not calls and torch.equal(
        again.prompt_embeds[0, : lengths[2]], cond.prompt_embeds[2, : lengths[2]]
    )


def _pipeline_latents(pipe, prompts, negative, guidance, steps, seed, size=(32, 48)):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        list(prompts),  # the pipeline writes the chat template into the lists it is given
        negative_prompt=list(negative) if isinstance(negative, list) else negative,
        guidance_scale=guidance,
        height=size[0],
        width=size[1],
        num_inference_steps=steps,
        generator=gens,
        output_type="latent",
    ).images


def _ours(model, prompts, negative, w, steps, seed, size=(32, 48)):
    cond = model.encode(prompts, negative_prompt=negative)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    noise = model.sample_noise(len(prompts), *size, generator=gens)
    return rollout(model, cond, model.schedule(steps, *size), noise, guidance_scale=w).final


@pytest.mark.parametrize(
    "prompts,negative,guidance,steps",
    [
        (["a red cat"], "", 5.0, 2),  # the pipeline's default guidance 5 is w = 6 here
        (PROMPTS[:2], ["", "blurry"], 3.0, 3),  # contexts of different lengths
        (PROMPTS[1:], None, 0.0, 4),  # Z-Image-Turbo: no CFG
    ],
)
def test_rollout_reproduces_pipeline(model, pipe, prompts, negative, guidance, steps):
    expected = _pipeline_latents(pipe, prompts, negative, guidance, steps, seed=7)
    got = _ours(model, prompts, negative if guidance > 0 else None, guidance + 1, steps, seed=7)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, diff
    assert (
        got - model.sample_noise(len(prompts), 32, 48, generator=torch.Generator().manual_seed(7))
    ).abs().max() > 0.1


def test_decode_equals_pipeline_images(model, pipe):
    images = pipe(
        "two green circles",
        guidance_scale=2.0,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    latents = _ours(model, ["two green circles"], "", 3.0, 2, seed=3, size=(32, 32))
    ours = model.decode(latents)
    assert ours.shape == images.shape == (1, 3, 32, 32)
    assert (ours - images).abs().max().item() < 1e-5


_PLAIN_LORA = """
import os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from diffusers import ZImagePipeline
pipe = ZImagePipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(sys.argv[2])
latents = pipe("a red cat", guidance_scale=3.0, height=32, width=48, num_inference_steps=2,
               generator=[torch.Generator().manual_seed(1)], output_type="latent").images
assert "diffrl" not in sys.modules
torch.save(latents, sys.argv[3])
"""


@pytest.mark.parametrize(
    "isolated", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["in_process", "without_diffrl"]
)
def test_lora_saved_for_load_lora_weights(tmp_path, isolated):
    """The saved LoRA, loaded by ``ZImagePipeline.load_lora_weights`` into a fresh pipeline, samples what the adapted
    model samples; under --run-slow also in a second process that never imports diffrl (~15 s)."""
    model = load_model("tiny:z_image")
    model.add_lora(rank=4, alpha=8)
    names = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    for part in ("attention.to_q", "attention.to_out.0", "feed_forward.w1", "feed_forward.w2"):
        for block in ("layers.0", "noise_refiner.0", "context_refiner.0"):
            assert any(f"{block}.{part}.lora_A" in n for n in names), (block, part)
    assert all("lora_" in n for n in names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ours = _ours(model, ["a red cat"], "", 4.0, 2, seed=1)
    with model.disable_adapter():
        base = _ours(model, ["a red cat"], "", 4.0, 2, seed=1)
    assert (ours - base).abs().max().item() > 1e-3  # the adapter changes the samples
    model.save_lora(tmp_path / "lora")
    if isolated:
        out = tmp_path / "plain.pt"
        args = [str(tiny_model_dir("tiny:z_image")), str(tmp_path / "lora"), str(out)]
        subprocess.run([sys.executable, "-c", _PLAIN_LORA, *args], check=True, capture_output=True, text=True)
        expected = torch.load(out)
    else:
        fresh = ZImagePipeline.from_pretrained(tiny_model_dir("tiny:z_image"))
        fresh.set_progress_bar_config(disable=True)
        fresh.load_lora_weights(tmp_path / "lora")
        expected = _pipeline_latents(fresh, ["a red cat"], "", 3.0, 2, seed=1)
    assert (ours - expected).abs().max().item() < 1e-5


# Flow-GRPO by default, the other trainers under --run-slow (1-2 s each, plus building the trainer)
@pytest.mark.parametrize(
    "algo",
    ["flow_grpo", *(pytest.param(a, marks=pytest.mark.slow) for a in ("diffusion_nft", "refl", "awm"))],
)
def test_every_trainer_takes_a_step_on_z_image(algo, tmp_path):
    """Each trainer's tiny preset on ``tiny:z_image``: one step moves every trainable tensor with finite metrics;
    Flow-GRPO's first update is on-policy (ratio exactly 1, no KL) in float32."""
    from diffrl.train import build_trainer

    trainer = build_trainer(
        ROOT / "configs" / "tiny" / f"{algo}.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
            "model.path=tiny:z_image",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
    )
    assert isinstance(trainer.model, ZImageModel)
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    unchanged = [
        n for n, a, p in zip(trainer.param_names, before, trainer.params, strict=True) if torch.equal(a, p)
    ]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not move, e.g. {unchanged[:2]}"
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    if algo == "flow_grpo":
        assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0
