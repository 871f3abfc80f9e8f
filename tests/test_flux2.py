"""The FLUX.2 adapters against diffusers' own pipelines, on tiny offline pipelines: ``Flux2KleinPipeline``
(``tiny:flux2_klein``, Qwen3 text encoder, true CFG) and ``Flux2Pipeline`` (``tiny:flux2``, Mistral-3 text encoder,
guidance embedding): schedule, prompt encoding, a noise-free rollout, decoding, a LoRA saved for
``load_lora_weights`` (checked in a process that never imports diffrl), and every trainer's tiny preset taking a
step."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps  # noqa: E402

from diffrl.models import ADAPTERS, Flux2KleinModel, Flux2Model, load_model  # noqa: E402
from diffrl.models.flux2 import flux2_empirical_mu  # noqa: E402
from diffrl.models.loading import tiny_model_dir  # noqa: E402
from diffrl.models.tiny import FLUX2_SCHEDULER_CONFIG  # noqa: E402
from diffrl.samplers import rollout  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")

PROMPTS = ["a red cat", "the blue square on the left of a tree", "two green circles"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def klein():
    return load_model("tiny:flux2_klein")


@pytest.fixture(scope="module")
def klein_pipe():
    p = Flux2KleinPipeline.from_pretrained(tiny_model_dir("tiny:flux2_klein"))
    p.set_progress_bar_config(disable=True)
    return p


def _pipeline_sigmas(scheduler, steps: int, image_seq_len: int) -> torch.Tensor:
    # the pipelines' schedule: linspace(1, 1/T, T) and the empirical mu of the token count and T
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


def _vae_latents(pipe, x: torch.Tensor) -> torch.Tensor:
    """Our latents ``(B, 4C, h, w)`` as the pipeline's ``output_type="latent"``, with the pipeline's own helpers."""
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return pipe._unpatchify_latents(x * std + bn.running_mean.view(1, -1, 1, 1))


@pytest.mark.parametrize("seq,steps", [(16, 4), (4096, 50), (6000, 28), (1024, 1)])
def test_empirical_mu_equals_pipeline(seq, steps):
    assert flux2_empirical_mu(seq, steps) == compute_empirical_mu(seq, steps)


def test_klein_detected_and_loaded(klein):
    assert ADAPTERS["Flux2KleinPipeline"] is Flux2KleinModel
    assert isinstance(klein, Flux2KleinModel) and klein.family == "flux2_klein"
    assert klein.vae_scale_factor == 4 and klein.latent_shape(32, 48) == (16, 4, 6)
    assert klein.guidance_is_cfg and klein.uses_negative_prompt and not klein.is_distilled
    assert (klein.default_num_steps, klein.default_guidance_scale) == (50, 4.0)  # the pipeline's defaults
    with pytest.raises(ValueError, match="multiple of 8"):
        klein.latent_shape(36, 32)
    with pytest.raises(ValueError, match="empty prompt only"):
        klein.encode(["a red cat"], negative_prompt="blurry")


STATIC = {**FLUX2_SCHEDULER_CONFIG, "use_dynamic_shifting": False}


@pytest.mark.parametrize("config", [FLUX2_SCHEDULER_CONFIG, STATIC], ids=["dynamic", "static"])
@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
@pytest.mark.parametrize("steps", [4, 50])
def test_schedule_equals_pipeline_bitwise(klein, config, size, steps):
    h, w = size
    expected = _pipeline_sigmas(FlowMatchEulerDiscreteScheduler(**config), steps, (h // 8) * (w // 8))
    klein.scheduler_config = dict(FlowMatchEulerDiscreteScheduler(**config).config)
    try:
        got = klein.schedule(steps, h, w)
    finally:
        klein.scheduler_config = dict(klein.pipe.scheduler.config)
    assert torch.equal(got, expected), (got, expected)


@pytest.mark.parametrize("seq", [4096, 1024])  # 1024x1024 and 512x512 pixels: the real models' token counts
def test_schedule_real_resolutions_bitwise(klein, seq):
    for steps in (4, 50):
        expected = _pipeline_sigmas(FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG), steps, seq)
        side = int(seq**0.5) * 8
        assert torch.equal(klein.schedule(steps, side, side), expected)
        # by hand: exp(mu) / (exp(mu) + 1/s - 1) at s = 1/T (the last level before 0)
        mu = compute_empirical_mu(seq, steps)
        s = 1 / steps
        assert expected[-2].item() == pytest.approx(np.exp(mu) / (np.exp(mu) + 1 / s - 1), rel=1e-6)


def test_klein_encode_equals_pipeline_and_is_cached(klein, klein_pipe):
    klein.clear_prompt_cache()
    cond = klein.encode(PROMPTS)
    embeds, text_ids = klein_pipe.encode_prompt(list(PROMPTS), device="cpu")
    assert embeds.shape == (3, 512, 96) and text_ids.shape == (3, 512, 4)
    assert torch.equal(cond.prompt_embeds, embeds)  # one prompt at a time there too: the same bits
    neg, _ = klein_pipe.encode_prompt("", device="cpu")
    assert torch.equal(cond.negative_prompt_embeds, neg.expand(3, -1, -1))
    calls = []
    handle = klein.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = klein.encode(PROMPTS[::-1])
    finally:
        handle.remove()
    assert not calls and torch.equal(again.prompt_embeds[0], cond.prompt_embeds[2])


def _pipeline_latents(pipe, prompts, guidance, steps, seed, size=(32, 48)):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        prompt=list(prompts),
        guidance_scale=guidance,
        height=size[0],
        width=size[1],
        num_inference_steps=steps,
        generator=gens,
        output_type="latent",
    ).images


def _ours(model, prompts, negative, guidance, steps, seed, size=(32, 48)):
    cond = model.encode(prompts, negative_prompt=negative)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    noise = model.sample_noise(len(prompts), *size, generator=gens)
    return rollout(model, cond, model.schedule(steps, *size), noise, guidance_scale=guidance).final


@pytest.mark.parametrize(
    "prompts,guidance,steps", [(["a red cat"], 4.0, 2), (PROMPTS[:2], 2.5, 3), (PROMPTS[1:], 1.0, 2)]
)
def test_klein_rollout_reproduces_pipeline(klein, klein_pipe, prompts, guidance, steps):
    expected = _pipeline_latents(klein_pipe, prompts, guidance, steps, seed=7)
    got = _vae_latents(klein_pipe, _ours(klein, prompts, "", guidance, steps, seed=7))
    assert got.shape == expected.shape == (len(prompts), 4, 8, 12)
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, diff


def test_klein_distilled_never_guides(tmp_path):
    """A step-distilled Klein (``is_distilled``): no negative prompt encoded, no CFG pass whatever the scale, 4 steps,
    as its pipeline."""
    pipe = Flux2KleinPipeline.from_pretrained(tiny_model_dir("tiny:flux2_klein"))
    pipe.register_to_config(is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    model = Flux2KleinModel(pipe)
    assert model.is_distilled and not model.uses_negative_prompt
    assert (model.default_num_steps, model.default_guidance_scale) == (4, 1.0)
    cond = model.encode(["a red cat"])
    assert cond.negative_prompt_embeds is None
    expected = _pipeline_latents(pipe, ["a red cat"], 4.0, 2, seed=1)  # the scale is ignored
    got = _vae_latents(pipe, _ours(model, ["a red cat"], "", 4.0, 2, seed=1))
    assert (got - expected).abs().max().item() < 1e-5


def test_klein_decode_equals_pipeline_images(klein, klein_pipe):
    images = klein_pipe(
        prompt="two green circles",
        guidance_scale=3.0,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    ours = klein.decode(_ours(klein, ["two green circles"], "", 3.0, 2, seed=3, size=(32, 32)))
    assert ours.shape == images.shape == (1, 3, 32, 32)
    assert (ours - images).abs().max().item() < 1e-5


_PLAIN_LORA = """
import os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
import diffusers
pipe = getattr(diffusers, sys.argv[1]).from_pretrained(sys.argv[2])
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(sys.argv[3])
latents = pipe(prompt="a red cat", guidance_scale=3.0, height=32, width=48, num_inference_steps=2,
               generator=[torch.Generator().manual_seed(1)], output_type="latent").images
assert "diffrl" not in sys.modules
torch.save(latents, sys.argv[4])
"""


def _check_lora(spec: str, pipeline_class: str, tmp_path, to_pipeline_latents, isolated: bool):
    model = load_model(spec)
    model.add_lora(rank=4, alpha=8)
    names = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    for part in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_v_proj",
        "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff.linear_in",
        "transformer_blocks.0.ff_context.linear_out",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
    ):
        assert any(f"{part}.lora_A" in n for n in names), part
    assert all("lora_" in n for n in names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ours = _ours(model, ["a red cat"], "", 3.0, 2, seed=1)
    with model.disable_adapter():
        base = _ours(model, ["a red cat"], "", 3.0, 2, seed=1)
    assert (ours - base).abs().max().item() > 1e-3  # the adapter changes the samples
    model.save_lora(tmp_path / "lora")
    if isolated:  # in a process that never imports diffrl
        out = tmp_path / "plain.pt"
        args = [pipeline_class, str(tiny_model_dir(spec)), str(tmp_path / "lora"), str(out)]
        subprocess.run([sys.executable, "-c", _PLAIN_LORA, *args], check=True, capture_output=True, text=True)
        expected = torch.load(out)
    else:
        import diffusers

        fresh = getattr(diffusers, pipeline_class).from_pretrained(tiny_model_dir(spec))
        fresh.set_progress_bar_config(disable=True)
        fresh.load_lora_weights(tmp_path / "lora")
        expected = _pipeline_latents(fresh, ["a red cat"], 3.0, 2, seed=1)
    got = to_pipeline_latents(model.pipe, ours)
    assert (got - expected).abs().max().item() < 1e-5


def test_klein_lora_saved_for_load_lora_weights(tmp_path):
    _check_lora("tiny:flux2_klein", "Flux2KleinPipeline", tmp_path, _vae_latents, isolated=False)


@pytest.mark.slow  # ~15-30 s: a second process imports torch and diffusers
def test_klein_lora_loads_in_a_process_without_diffrl(tmp_path):
    _check_lora("tiny:flux2_klein", "Flux2KleinPipeline", tmp_path, _vae_latents, isolated=True)


# ------------------------------------------------------------------------------------- FLUX.2 [dev] (Flux2Pipeline)


@pytest.fixture(scope="module")
def dev():
    return load_model("tiny:flux2")


@pytest.fixture(scope="module")
def dev_pipe():
    p = Flux2Pipeline.from_pretrained(tiny_model_dir("tiny:flux2"))
    p.set_progress_bar_config(disable=True)
    return p


def _packed(pipe, x: torch.Tensor) -> torch.Tensor:
    """Our latents ``(B, 4C, h, w)`` as Flux2Pipeline's ``output_type="latent"`` (packed tokens), its own helper."""
    return pipe._pack_latents(x)


def test_dev_detected_and_loaded(dev):
    assert ADAPTERS["Flux2Pipeline"] is Flux2Model
    assert type(dev) is Flux2Model and dev.family == "flux2" and dev.guidance_embeds
    assert type(dev.pipe.text_encoder).__name__ == "Mistral3ForConditionalGeneration"
    assert not dev.guidance_is_cfg and not dev.uses_negative_prompt
    assert (dev.default_num_steps, dev.default_guidance_scale) == (50, 4.0)  # Flux2Pipeline's defaults
    assert dev.latent_shape(32, 48) == (16, 4, 6)
    assert dev.encode(["a red cat"]).negative_prompt_embeds is None


def test_dev_encode_equals_pipeline(dev, dev_pipe):
    dev.clear_prompt_cache()
    cond = dev.encode(PROMPTS[:2])
    embeds, text_ids = dev_pipe.encode_prompt(list(PROMPTS[:2]), device="cpu")
    assert embeds.shape == (2, 512, 96)
    assert (cond.prompt_embeds - embeds).abs().max().item() < 1e-5  # batched there, one at a time here
    for i, p in enumerate(PROMPTS[:2]):
        assert torch.equal(cond.prompt_embeds[i], dev_pipe.encode_prompt(p, device="cpu")[0][0])
    ids = torch.zeros(512, 4, dtype=text_ids.dtype)
    ids[:, 3] = torch.arange(512)
    assert torch.equal(text_ids[0], ids)  # (0, 0, 0, l): the ids the adapter builds


@pytest.mark.parametrize("prompts,guidance,steps", [(["a red cat"], 4.0, 2), (PROMPTS[:2], 2.5, 3)])
def test_dev_rollout_reproduces_pipeline(dev, dev_pipe, prompts, guidance, steps):
    expected = _pipeline_latents(dev_pipe, prompts, guidance, steps, seed=5)
    got = _packed(dev_pipe, _ours(dev, prompts, None, guidance, steps, seed=5))
    assert got.shape == expected.shape == (len(prompts), 24, 16)
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, diff
    other = _packed(dev_pipe, _ours(dev, prompts, None, guidance + 2, steps, seed=5))
    assert (other - got).abs().max().item() > 1e-4  # the guidance embedding matters


def test_dev_decode_equals_pipeline_images(dev, dev_pipe):
    images = dev_pipe(
        prompt="two green circles",
        guidance_scale=3.0,
        height=32,
        width=48,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    ours = dev.decode(_ours(dev, ["two green circles"], None, 3.0, 2, seed=3))
    assert ours.shape == images.shape == (1, 3, 32, 48)
    assert (ours - images).abs().max().item() < 1e-5


def test_dev_lora_saved_for_load_lora_weights(tmp_path):
    _check_lora("tiny:flux2", "Flux2Pipeline", tmp_path, _packed, isolated=False)


@pytest.mark.slow  # ~15-30 s: a second process imports torch and diffusers
def test_dev_lora_loads_in_a_process_without_diffrl(tmp_path):
    _check_lora("tiny:flux2", "Flux2Pipeline", tmp_path, _packed, isolated=True)


# Flow-GRPO by default, the other trainers under --run-slow (about 2 s each, plus building the trainer)
_ALGOS = ["flow_grpo", *(pytest.param(a, marks=pytest.mark.slow) for a in ("diffusion_nft", "refl", "awm"))]


@pytest.mark.parametrize("spec", ["tiny:flux2_klein", "tiny:flux2"])
@pytest.mark.parametrize("algo", _ALGOS)
def test_every_trainer_takes_a_step_on_flux2(algo, spec, tmp_path):
    """Each trainer's tiny preset on both FLUX.2 pipelines: one step moves every trainable tensor with finite
    metrics; Flow-GRPO's first update is on-policy (ratio exactly 1, no KL) in float32."""
    from diffrl.train import build_trainer

    trainer = build_trainer(
        ROOT / "configs" / "tiny" / f"{algo}.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
            f"model.path={spec}",
            "model.max_sequence_length=64",  # the pipeline pads every prompt to it: 512 text tokens are slow here
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
    )
    assert type(trainer.model) is (Flux2KleinModel if spec.endswith("klein") else Flux2Model)
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    unchanged = [
        n for n, a, p in zip(trainer.param_names, before, trainer.params, strict=True) if torch.equal(a, p)
    ]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not move, e.g. {unchanged[:2]}"
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    if algo == "flow_grpo":
        assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0


# ------------------------------------------------------------------------------------- reference images (image=)


def _ref(seed: int, size=(64, 72)):
    """A random RGB image ``size = (width, height)``; the pipelines refuse sides under 64 pixels."""
    from PIL import Image

    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    )


def test_reference_size_by_hand():
    from diffrl.models.flux2 import flux2_reference_size

    assert flux2_reference_size(100, 70) == (96, 64)  # floored to multiples of 16, no resize below the area
    # 2048 x 1024: scaled by sqrt(1/2) to 1448 x 724 (truncated), floored to 1440 x 720
    assert flux2_reference_size(2048, 1024) == (1440, 720)
    assert flux2_reference_size(72, 64, multiple=8) == (72, 64)


def test_reference_latents_and_ids_equal_pipeline(dev, dev_pipe):
    """Two reference images: the cached tokens and their ids are ``prepare_image_latents``'s (the pipeline's own
    preprocessing, VAE mode, patchify, batch-norm, packing; ids ``(10 + 10 k, row, col, 0)``)."""
    from diffrl.models.flux2 import flux2_reference_ids

    refs = [_ref(1, (64, 72)), _ref(2, (87, 64))]  # the second floored to 80 x 64 pixels
    cond = dev.encode(["a red cat", "two green circles"], images=[refs, refs])
    pixels = [
        dev_pipe.image_processor.preprocess(r, height=h, width=w, resize_mode="crop")
        for r, (w, h) in zip(refs, [(64, 72), (80, 64)], strict=True)
    ]
    latents, ids = dev_pipe.prepare_image_latents(pixels, 2, None, "cpu", dev_pipe.vae.dtype)
    assert cond.image_latents.shape == latents.shape == (2, 9 * 8 + 8 * 10, 16)
    assert torch.equal(cond.image_latents, latents)
    assert cond.image_grid.tolist() == [[9, 8, 8, 10]] * 2
    assert torch.equal(flux2_reference_ids(cond.image_grid[0].tolist()), ids[0])
    assert ids[0, 0].tolist() == [10, 0, 0, 0] and ids[0, 72].tolist() == [20, 0, 0, 0]  # by hand
    calls = []
    handle = dev.vae.register_forward_pre_hook(lambda *a: calls.append(1))
    try:  # cached per image
        again = dev.encode(["a red cat"], images=[list(refs)])
    finally:
        handle.remove()
    assert not calls and torch.equal(again.image_latents[0], cond.image_latents[0])


def _pipeline_reference_latents(pipe, prompts, refs, guidance, steps, seed, size=(32, 48)):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        prompt=list(prompts),
        image=refs,
        guidance_scale=guidance,
        height=size[0],
        width=size[1],
        num_inference_steps=steps,
        generator=gens,
        output_type="latent",
    ).images


@pytest.mark.parametrize("n_refs", [1, 2])
@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_reference_rollout_reproduces_pipeline(variant, n_refs, request):
    """A noise-free rollout with one and with two reference images (given as files, through ``encode_rows``) is
    ``pipe(image=..., output_type="latent")`` within 1e-5, and differs from the text-to-image rollout."""
    model = request.getfixturevalue(variant)
    pipe = request.getfixturevalue(f"{variant}_pipe")
    refs = [_ref(11, (64, 72)), _ref(12, (72, 64))][:n_refs]
    prompts = ["a red cat", "two green circles"]
    negative = "" if variant == "klein" else None
    expected = _pipeline_reference_latents(pipe, prompts, refs, 3.0, 2, seed=4)
    tmp = Path(request.getfixturevalue("tmp_path"))
    paths = []
    for i, r in enumerate(refs):
        r.save(tmp / f"ref{i}.png")
        paths.append(str(tmp / f"ref{i}.png"))
    cond = model.encode_rows(prompts, {"image": [paths, paths]})
    gens = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    noise = model.sample_noise(2, 32, 48, generator=gens)
    final = rollout(model, cond, model.schedule(2, 32, 48), noise, guidance_scale=3.0).final
    to_pipe = _vae_latents if variant == "klein" else _packed
    diff = (to_pipe(pipe, final) - expected).abs().max().item()
    assert diff < 1e-5, diff
    plain = rollout(
        model,
        model.encode(prompts, negative_prompt=negative),
        model.schedule(2, 32, 48),
        noise,
        guidance_scale=3.0,
    ).final
    assert (plain - final).abs().max().item() > 1e-3  # the reference tokens matter


def test_reference_batches_refuse_mixed_rows_and_grids(dev):
    with pytest.raises(ValueError, match="1 of 2 prompts of this batch have no reference image"):
        dev.encode_rows(["a red cat", "two green circles"], {"image": [_ref(1), None]})
    with pytest.raises(ValueError, match="different token grids"):
        dev.encode(["a red cat", "two green circles"], images=[_ref(1, (64, 72)), _ref(2, (72, 64))])
    with pytest.raises(ValueError, match="too small"):  # the pipelines' own limit
        dev.encode(["a red cat"], images=[_ref(1, (48, 64))])
    assert dev.encode_rows(["a red cat"], {"image": [None]}).image_latents is None  # no images: text to image


def _reference_prompt_file(tmp_path):
    """Five prompt rows, each naming its own reference image relative to the .jsonl file: ``(rows, path)``."""
    import json

    (tmp_path / "images").mkdir()
    rows = []
    for i, prompt in enumerate(
        ["a red cat", "a blue square", "two green circles", "a tree", "a yellow star"]
    ):
        _ref(30 + i).save(tmp_path / "images" / f"{i}.png")
        rows.append({"prompt": prompt, "image": f"images/{i}.png"})
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, path


@pytest.mark.parametrize("algo", ["flow_grpo", "diffusion_nft", "refl", "awm", "dpo"])  # 1-3 s each
def test_every_trainer_takes_a_step_with_reference_images(algo, tmp_path):
    """A .jsonl prompt file whose rows each name a reference image: a step of each trainer's tiny
    preset on tiny FLUX.2 [klein] (Flow-GRPO) or [dev] (the others) moves every trainable tensor, encodes each
    prompt with its own images, and the reward receives the image paths; Flow-GRPO's first update is on-policy."""
    from diffrl.rewards import as_reward
    from diffrl.train import build_trainer

    rows, prompts = _reference_prompt_file(tmp_path)
    seen = []

    def saturation_with_reference(images, prompts, image=None, **metadata):
        seen.extend(image)
        return images.std(dim=1).mean(dim=(1, 2))

    spec = "tiny:flux2_klein" if algo == "flow_grpo" else "tiny:flux2"
    trainer = build_trainer(
        ROOT / "configs" / "tiny" / f"{algo}.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            "data.eval_size=1",
            f"model.path={spec}",
            "model.max_sequence_length=64",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
        reward=as_reward(saturation_with_reference, differentiable=True),
    )
    encoded = []
    original = trainer.model.encode

    def spy(prompts, negative_prompt="", *, images=None):
        encoded.extend(zip(prompts, images, strict=True))
        return original(prompts, negative_prompt, images=images)

    trainer.model.encode = spy
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    unchanged = [
        n for n, a, p in zip(trainer.param_names, before, trainer.params, strict=True) if torch.equal(a, p)
    ]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not move, e.g. {unchanged[:2]}"
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    by_prompt = {r["prompt"]: str(tmp_path / r["image"]) for r in rows}
    assert encoded and all(by_prompt[p] == str(img) for p, img in encoded)
    assert seen and set(seen) <= set(by_prompt.values())
    if algo == "flow_grpo":
        assert metrics["train/ratio_mean"] == 1.0 and metrics["train/approx_kl"] == 0.0


def test_online_dpo_keeps_the_pairs_reference_images_across_a_resume(tmp_path):
    """Online Diffusion-DPO with ``online_every=2``: the pairs kept for the next step carry their rows' reference
    images, through a checkpoint's extra state too, and the next step re-encodes each prompt with its image."""
    from diffrl.train import build_trainer

    rows, prompts = _reference_prompt_file(tmp_path)
    trainer = build_trainer(
        ROOT / "configs" / "tiny" / "dpo.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            "data.eval_size=1",
            "model.path=tiny:flux2",
            "model.max_sequence_length=64",
            "dpo.online_every=2",
            "max_steps=2",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
        ],
    )
    trainer.train_step(0)
    by_prompt = {r["prompt"]: str(tmp_path / r["image"]) for r in rows}
    kept_prompts, *_, kept_metadata = trainer.buffer
    kept_images = kept_metadata["image"]
    assert kept_images == [by_prompt[p] for p in kept_prompts]
    state = trainer.extra_state()
    trainer.buffer = None
    trainer.load_extra_state(state)
    assert trainer.buffer[0] == kept_prompts and trainer.buffer[4]["image"] == kept_images
    encoded = []
    original = trainer.model.encode

    def spy(prompts, negative_prompt="", *, images=None):
        encoded.extend(zip(prompts, images, strict=True))
        return original(prompts, negative_prompt, images=images)

    trainer.model.encode = spy
    metrics = trainer.train_step(1)  # trains on the kept pairs: no new sampling round
    assert metrics["sample/new_pairs"] == 0.0
    assert sorted(encoded) == sorted(zip(kept_prompts, kept_images, strict=True))


def test_reference_above_the_area_is_resized_as_the_pipeline(dev, dev_pipe, monkeypatch):
    """An image above ``reference_area`` pixels: scaled (Lanczos, sides truncated) as the pipelines'
    ``_resize_to_target_area``, floored to multiples of 8 here (2 x the tiny VAE's factor), then encoded; the area is
    lowered to 96 x 80 pixels so that a small image exercises the path the real 1024 x 1024 limit takes."""
    monkeypatch.setattr(dev, "reference_area", 96 * 80)
    big = _ref(5, (200, 130))
    cond = dev.encode(["a red cat"], images=[big])
    resized = dev_pipe.image_processor._resize_to_target_area(big, 96 * 80)
    assert resized.size == (108, 70)  # sqrt(7680 / 26000) = 0.5435: 108.7 x 70.7, truncated
    pixels = dev_pipe.image_processor.preprocess(resized, height=64, width=104, resize_mode="crop")
    latents, _ = dev_pipe.prepare_image_latents([pixels], 1, None, "cpu", dev_pipe.vae.dtype)
    assert cond.image_grid[0].tolist() == [8, 13]  # 64 x 104 pixels / 8
    assert torch.equal(cond.image_latents, latents)


# ------------------------------------------------- Flow-Factory's FLUX.2 [dev] recipes (presets) and condition size


def test_condition_image_size_scales_reference_images_down_to_its_area(tmp_path):
    """``model.condition_image_size: 64`` (Flow-Factory's ``condition_image_size``): a reference image above 64 x 64
    pixels is scaled to about that area, sides truncated, then floored to multiples of 8 (2 x the tiny VAE's factor);
    one at or below it keeps its size. Bad values are refused before loading, other families at loading."""
    from diffrl.config import ConfigError, load_config
    from diffrl.models import load_model_from_config

    base = [f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}"]
    with pytest.raises(ConfigError, match=r"model.condition_image_size=16 must be 0 .* or at least 32"):
        load_config(ROOT / "configs" / "tiny" / "flow_grpo.yaml", [*base, "model.condition_image_size=16"])
    cfg = load_config(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml",
        [*base, "model.path=tiny:flux2", "model.condition_image_size=64"],
    )
    model = load_model_from_config(cfg.model)
    assert model.reference_area == 64 * 64 and type(model).reference_area == 1024 * 1024
    # 64 x 72 = 4608 > 4096 pixels: x sqrt(4096 / 4608) = 0.9428 -> 60.3 x 67.9, truncated 60 x 67, floored 56 x 64
    assert model.encode(["a red cat"], images=[_ref(1, (64, 72))]).image_grid[0].tolist() == [8, 7]
    # 64 x 64 = 4096 pixels, not above the area: kept
    assert model.encode(["a red cat"], images=[_ref(2, (64, 64))]).image_grid[0].tolist() == [8, 8]
    sd3 = load_config(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml",
        [*base, "model.path=tiny:sd3", "model.condition_image_size=64"],
    )
    with pytest.raises(ValueError, match=r"model.condition_image_size=64 .* is a sd3 model; set it to 0"):
        load_model_from_config(sd3.model)


def flow_factory_gdpo(rewards: dict, weights: dict, group_size: int) -> torch.Tensor:
    """Flow-Factory's ``AdvantageProcessor.compute_gdpo`` (src/flow_factory/advantage/advantage_processor.py at
    a0b2bc5), re-stated: each reward z-scored within its group (population std, at least 1e-6) and weighted, the sum
    z-scored over the whole batch (its mean and population std, at least 1e-6); grpo.py clamps the advantages to
    adv_clip_range (+-5) in the loss."""
    total = 0
    for name, weight in weights.items():
        r = rewards[name].double().view(-1, group_size)
        std = r.std(1, unbiased=False, keepdim=True).clamp(min=1e-6)
        total = total + weight * ((r - r.mean(1, keepdim=True)) / std).flatten()
    return ((total - total.mean()) / total.std(unbiased=False).clamp(min=1e-6)).clamp(-5, 5)


def test_preset_advantages_are_flow_factorys_gdpo():
    """configs/flux2_dev_flow_grpo_clip_pickscore.yaml's advantages, built by the library as the trainer builds them
    (the combined reward with reward_normalize group, then group_advantages with adv_std global), equal
    Flow-Factory's gdpo of CLIP (weight 1) and PickScore (0.5) up to the epsilons, with prompts whose mean scores and
    spreads differ; a plain weighted sum (reward_normalize '') does not."""
    from diffrl.config import load_config
    from diffrl.rewards import CombinedReward, as_reward
    from diffrl.trainers.objectives import group_advantages

    cfg = load_config(ROOT / "configs" / "flux2_dev_flow_grpo_clip_pickscore.yaml")
    assert cfg.reward == {"clipscore": 1.0, "pickscore": 0.5} and cfg.flow_grpo.adv_std == "global"
    gen = torch.Generator().manual_seed(0)
    groups, g = 12, cfg.flow_grpo.group_size
    spread = torch.rand(groups, 1, generator=gen, dtype=torch.float64) + 0.2  # each prompt its own spread
    rewards = {  # CLIP cosines about 0.3 (spread 0.01), PickScores about 22 (spread 0.5)
        "clipscore": (
            0.3
            + 0.03 * torch.rand(groups, 1, generator=gen, dtype=torch.float64)
            + 0.01 * spread * torch.randn(groups, g, generator=gen, dtype=torch.float64)
        ).flatten(),
        "pickscore": (
            22
            + torch.randn(groups, 1, generator=gen, dtype=torch.float64)
            + 0.5 * torch.randn(groups, g, generator=gen, dtype=torch.float64)
        ).flatten(),
    }
    ids = torch.arange(groups * g) // g
    prompts = [f"prompt {int(i)}" for i in ids]

    def ours(normalize):
        parts = [
            (as_reward(lambda images, prompts, n=n: rewards[n].float(), name=n), w)
            for n, w in cfg.reward.items()
        ]
        total = (
            CombinedReward(parts, normalize=normalize).evaluate(torch.zeros(len(ids), 3, 4, 4), prompts).total
        )
        return group_advantages(
            total, ids, std=cfg.flow_grpo.adv_std, clip=cfg.flow_grpo.adv_clip
        ).values.double()

    ref = flow_factory_gdpo(rewards, cfg.reward, g)
    torch.testing.assert_close(ours(cfg.reward_normalize), ref, rtol=1e-3, atol=1e-4)
    plain = ours(None)
    assert float(plain @ ref / (plain.norm() * ref.norm())) < 0.99  # PickScore's scale would outweigh CLIP's


def _flow_factory_flux2_dry_run(preset: Path, prompts: Path, tmp_path, extra: list[str]):
    """One training step of ``preset`` shrunk onto tiny:flux2 (float32, rank 4, 32 x 32, 2 prompts x 2 images, 64
    text tokens) with stand-in rewards under the preset's names and weights; returns the trainer and its metrics."""
    from diffrl.config import load_config
    from diffrl.rewards import CombinedReward, as_reward
    from diffrl.train import build_trainer

    cfg = load_config(preset)
    parts = [
        (as_reward(lambda images, prompts, k=k, **kw: images[:, k].mean(dim=(1, 2)), name=name), weight)
        for k, (name, weight) in enumerate(cfg.reward.items())
    ]
    trainer = build_trainer(
        preset,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            f"data.eval={prompts}",
            "model.path=tiny:flux2",
            "model.dtype=float32",
            "model.max_sequence_length=64",
            "mixed_precision=no",
            "model.lora_rank=4",
            "sample.height=32",
            "sample.width=32",
            "flow_grpo.group_size=2",
            "flow_grpo.prompts_per_step=2",
            "max_steps=1",
            "eval_every=0",
            "checkpointing_steps=0",
            "report_to=none",
            *extra,
        ],
        reward=CombinedReward(parts, normalize=cfg.reward_normalize or None),
    )
    adapted = {
        n.removesuffix(".lora_A")
        for n, _ in trainer.model.transformer.named_modules()
        if n.endswith(".lora_A")
    }
    # the recipe's names: diffrl's FLUX.2 default but the single blocks' attn.to_out
    import re

    from diffrl.models.flux2 import FLUX2_LORA_TARGETS

    linears = [  # the adapted ones are PEFT layers around their nn.Linear, base_layer
        n.removesuffix(".base_layer")
        for n, m in trainer.model.transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    default = {n for n in linears if re.fullmatch(FLUX2_LORA_TARGETS, n)}
    single_out = {
        n for n in default if n.startswith("single_transformer_blocks.") and n.endswith("attn.to_out")
    }
    assert single_out and adapted == default - single_out
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    assert all(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
    # the second of the two updates is off-policy by one tiny update: the mean ratio is near 1, not exactly
    assert abs(metrics["train/ratio_mean"] - 1.0) < 1e-3
    return trainer, metrics


def test_flow_factory_t2i_preset_maps_the_recipe_and_runs_on_the_tiny_model(tmp_path):
    """configs/flux2_dev_flow_grpo_clip_pickscore.yaml against Flow-Factory's examples/grpo/lora/flux2/t2i.yaml (at
    a0b2bc5): the recipe's values, written out by hand here, and one step of the preset, shrunk, on tiny:flux2 with
    its window of one SDE step among steps 1..3 of 8 and the recipe's LoRA targets."""
    from diffrl.config import load_config

    preset = ROOT / "configs" / "flux2_dev_flow_grpo_clip_pickscore.yaml"
    cfg = load_config(preset)
    g, s, m = cfg.flow_grpo, cfg.sample, cfg.model
    assert (m.path, m.lora_rank, m.lora_alpha, m.lora_init) == (
        "black-forest-labs/FLUX.2-dev",
        64,
        128,
        "gaussian",
    )
    assert (m.gradient_checkpointing, m.condition_image_size, m.max_sequence_length) == (False, 0, 512)
    assert (g.group_size, g.prompts_per_step, g.num_minibatches, g.num_inner_epochs) == (16, 48, 2, 1)
    assert (g.sampler, g.noise_level, g.sde_window, list(g.sde_window_range)) == ("sde", 1.0, 1, [1, 4])
    assert (g.clip_range, g.kl_beta, g.adv_clip, g.adv_std, cfg.reward_normalize) == (
        1e-4,
        0.0,
        5.0,
        "global",
        "group",
    )
    assert (
        cfg.reward == cfg.eval_reward == {"clipscore": 1.0, "pickscore": 0.5}
    )  # CLIP weight 1.0, PickScore 0.5
    assert (s.height, s.width, s.num_steps, s.guidance_scale, s.eval_num_steps, s.eval_guidance_scale) == (
        512,
        512,
        8,
        4.0,
        28,
        4.0,
    )
    assert (s.batch_size, cfg.optim.train_batch_size, cfg.data.eval_size) == (1, 1, 150)
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.max_grad_norm) == (
        3e-4,
        1e-4,
        0.9,
        0.999,
        1e-8,
        1.0,
    )
    assert (cfg.ema_decay, cfg.ema_every, cfg.zero_stage, cfg.mixed_precision, cfg.seed) == (
        0.9,
        8,
        2,
        "bf16",
        42,
    )
    assert (cfg.checkpointing_steps, cfg.eval_every) == (20, 20)
    prompts = tmp_path / "t2is.jsonl"  # rows as dataset/t2is has them: a prompt only
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS))
    trainer, _ = _flow_factory_flux2_dry_run(preset, prompts, tmp_path, [])
    assert (
        isinstance(trainer.model, Flux2Model) and trainer.model.guidance_embeds
    )  # guidance 4 is the embedding


def test_flow_factory_i2i_preset_maps_the_recipe_and_runs_on_the_tiny_model(tmp_path):
    """configs/flux2_dev_i2i_flow_grpo_pickscore.yaml against Flow-Factory's examples/grpo/lora/flux2/i2i.yaml (at
    a0b2bc5): what it changes from t2i.yaml, by hand, the rest equal to the text-to-image preset; one step of the
    preset, shrunk, on tiny:flux2 with a reference image per row, scaled to condition_image_size (64 here)."""
    from diffrl.config import config_to_dict, load_config

    preset = ROOT / "configs" / "flux2_dev_i2i_flow_grpo_pickscore.yaml"
    cfg = load_config(preset)
    s = cfg.sample
    assert (s.height, s.width, s.num_steps, s.eval_num_steps, cfg.model.condition_image_size) == (
        384,
        384,
        10,
        28,
        384,
    )
    assert cfg.reward == cfg.eval_reward == {"pickscore": 1.0} and cfg.data.eval_size == 128
    t2i = config_to_dict(load_config(ROOT / "configs" / "flux2_dev_flow_grpo_clip_pickscore.yaml"))
    i2i = config_to_dict(cfg)
    changed = {k for k in i2i if i2i[k] != t2i[k]}
    assert changed == {"output_dir", "model", "data", "sample", "reward", "eval_reward"}
    assert {k for k in i2i["model"] if i2i["model"][k] != t2i["model"][k]} == {"condition_image_size"}
    assert {k for k in i2i["sample"] if i2i["sample"][k] != t2i["sample"][k]} == {
        "height",
        "width",
        "num_steps",
    }
    rows, prompts = _reference_prompt_file(tmp_path)  # 64 x 72 reference images
    trainer, _ = _flow_factory_flux2_dry_run(preset, prompts, tmp_path, ["model.condition_image_size=64"])
    assert trainer.model.reference_area == 64 * 64
    cond = trainer.model.encode_rows(["a red cat"], {"image": [str(tmp_path / rows[0]["image"])]})
    assert cond.image_grid[0].tolist() == [8, 7]  # 64 x 72 scaled to 56 x 64 pixels (see the test above)


def test_encoding_does_not_print_the_pipelines_processor_kwargs_warning(dev, caplog):
    # diffusers' Flux2Pipeline passes processor options the way transformers warns about, once per encoded prompt;
    # the warning is silenced while diffrl encodes, and only then
    import logging

    def warned() -> bool:
        return any("processor_kwargs" in r.getMessage() for r in caplog.records)

    dev.clear_prompt_cache()
    with caplog.at_level(logging.WARNING):
        dev.encode(["a brand new prompt for the cache"])
        assert not warned()
        log = logging.getLogger("transformers.processing_utils")
        assert not log.filters
        log.warning(
            "Kwargs passed to `processor.__call__` have to be in `processor_kwargs` dict, not in `**kwargs`"
        )
        assert warned()
