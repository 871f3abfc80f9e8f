"""Tests for the tiny offline SD3 / FLUX pipelines of :mod:`diffrl.models.tiny`."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline, StableDiffusion3Pipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTokenizer, T5TokenizerFast  # noqa: E402

from diffrl.models.tiny import (  # noqa: E402
    FLUX_VAE_SCALING_FACTOR,
    FLUX_VAE_SHIFT_FACTOR,
    SD3_VAE_SCALING_FACTOR,
    SD3_VAE_SHIFT_FACTOR,
    TINY_WORDS,
    build_tiny_flux,
    build_tiny_sd3,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)

PROMPTS = ["a red circle", "two blue squares"]
ASCII_PROMPT = "a red circle left of a blue square"


def _weights(path: Path, component: str) -> dict[str, torch.Tensor]:
    files = sorted((path / component).glob("*.safetensors"))
    assert files, f"no safetensors weights in {path / component}"
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_eval(pipe) -> None:
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert modules
    for module in modules:
        training = [name for name, sub in module.named_modules() if sub.training]
        assert not training, f"{type(module).__name__} has modules in train mode: {training[:5]}"


def _call(pipe, guidance_scale: float, output_type: str, steps: int = 2):
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=steps,
        height=32,
        width=32,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    ).images


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def sd3_pipe(sd3_dir) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [build_tiny_sd3, build_tiny_flux], ids=["sd3", "flux"])
def test_same_seed_bitwise_identical_other_seed_differs(builder, tmp_path):
    a = builder(tmp_path / "a", seed=0)
    b = builder(tmp_path / "b", seed=0)
    c = builder(tmp_path / "c", seed=1)
    components = sorted(p.parent.name for p in a.glob("*/*.safetensors"))
    assert "transformer" in components and "vae" in components
    for component in components:
        assert _same_state(_weights(a, component), _weights(b, component)), component
    assert not _same_state(_weights(a, "transformer"), _weights(c, "transformer"))
    assert not _same_state(_weights(a, "vae"), _weights(c, "vae"))


def test_build_leaves_global_rng_alone_and_validates_seed(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_flux(tmp_path / "flux")
    assert torch.equal(torch.rand(4), expected)
    with pytest.raises(ValueError):
        build_tiny_sd3(tmp_path / "bad", seed=-1)
    assert not (tmp_path / "bad").exists()


def test_sd3_clip_encoders_have_distinct_weights(sd3_dir):
    assert not _same_state(_weights(sd3_dir, "text_encoder"), _weights(sd3_dir, "text_encoder_2"))


# ---------------------------------------------------------------------------------------------
# SD3
# ---------------------------------------------------------------------------------------------


def test_sd3_loads_in_eval_mode_with_expected_components(sd3_pipe):
    _assert_eval(sd3_pipe)
    assert type(sd3_pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert type(sd3_pipe.tokenizer_2).__name__ == "CLIPTokenizer"
    assert isinstance(sd3_pipe.tokenizer_3, T5TokenizerFast)
    assert sd3_pipe.vae_scale_factor == 4
    assert sd3_pipe.default_sample_size * sd3_pipe.vae_scale_factor == 32
    assert sd3_pipe.vae.config.scaling_factor == SD3_VAE_SCALING_FACTOR
    assert sd3_pipe.vae.config.shift_factor == SD3_VAE_SHIFT_FACTOR
    assert sd3_pipe.scheduler.config.shift == 3.0
    t5, transformer = sd3_pipe.text_encoder_3, sd3_pipe.transformer
    assert transformer.config.joint_attention_dim == t5.config.d_model
    assert transformer.config.pooled_projection_dim == (
        sd3_pipe.text_encoder.config.projection_dim + sd3_pipe.text_encoder_2.config.projection_dim
    )


def test_sd3_prompt_encoding_is_deterministic(sd3_pipe):
    # Would fail if T5 dropout were active.
    with torch.no_grad():
        first = sd3_pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
        second = sd3_pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    prompt_embeds, _, pooled, _ = first
    assert prompt_embeds.shape[0] == 2 and prompt_embeds.shape[-1] == 64
    assert pooled.shape == (2, 64)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])


def test_sd3_pipeline_call_images(sd3_pipe):
    images = _call(sd3_pipe, 3.0, "pt")
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_sd3_pipeline_call_latents(latent_channels, tmp_path):
    path = build_tiny_sd3(tmp_path / "sd3", latent_channels=latent_channels)
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    latents = _call(pipe, 3.0, "latent")
    assert latents.shape == (2, latent_channels, 8, 8)
    assert torch.isfinite(latents).all()
    with torch.no_grad():
        encoded = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert encoded.shape == (1, latent_channels, 8, 8)


def test_sd3_without_t5(tmp_path):
    path = build_tiny_sd3(tmp_path / "sd3-no-t5", with_t5=False)
    assert not (path / "text_encoder_3").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    _assert_eval(pipe)
    images = _call(pipe, 3.0, "pt")
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()


# ---------------------------------------------------------------------------------------------
# FLUX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_loads_and_runs(guidance_embeds, tmp_path, flux_dir):
    path = flux_dir if guidance_embeds else build_tiny_flux(tmp_path / "flux", guidance_embeds=False)
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    _assert_eval(pipe)
    assert pipe.transformer.config.guidance_embeds is guidance_embeds
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert isinstance(pipe.tokenizer_2, T5TokenizerFast)
    assert pipe.vae_scale_factor == 4
    assert pipe.vae.config.scaling_factor == FLUX_VAE_SCALING_FACTOR
    assert pipe.vae.config.shift_factor == FLUX_VAE_SHIFT_FACTOR
    assert pipe.scheduler.config.use_dynamic_shifting
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert sum(pipe.transformer.config.axes_dims_rope) == pipe.transformer.config.attention_head_dim

    images = _call(pipe, 3.5, "pt")
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()
    # FLUX returns packed latents: 8x8 latents -> 4x4 tokens of 2x2x4 channels.
    latents = _call(pipe, 3.5, "latent")
    assert latents.shape == (2, 16, 16)
    assert torch.isfinite(latents).all()


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def _content_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", [ASCII_PROMPT, "three cats, 2 dogs & one photo-realistic tree!"])
def test_tokenizers_roundtrip_through_saved_pipelines(text, sd3_dir, flux_dir):
    clip_ref, t5_ref = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip_ids, t5_ids = clip_ref(text).input_ids, t5_ref(text).input_ids
    assert clip_ref.unk_token_id not in _content_ids(clip_ref, text)
    assert t5_ref.unk_token_id not in t5_ids

    reloaded_clip = [
        CLIPTokenizer.from_pretrained(sd3_dir / "tokenizer"),
        CLIPTokenizer.from_pretrained(sd3_dir / "tokenizer_2"),
        CLIPTokenizer.from_pretrained(flux_dir / "tokenizer"),
    ]
    reloaded_t5 = [
        T5TokenizerFast.from_pretrained(sd3_dir / "tokenizer_3"),
        T5TokenizerFast.from_pretrained(flux_dir / "tokenizer_2"),
    ]
    for tok in reloaded_clip:
        assert len(tok) == len(clip_ref) and tok.model_max_length == 77
        assert tok(text).input_ids == clip_ids
        assert tok.unk_token_id not in _content_ids(tok, text)
    for tok in reloaded_t5:
        assert len(tok) == len(t5_ref) and tok.model_max_length == 512
        assert tok(text).input_ids == t5_ids
        assert tok.unk_token_id not in t5_ids


def test_tokenizers_are_sensible():
    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    words = ASCII_PROMPT.split()

    clip_ids = clip(ASCII_PROMPT).input_ids
    assert clip_ids[0] == clip.bos_token_id and clip_ids[-1] == clip.eos_token_id
    assert clip_ids[1:-1] == _content_ids(clip, ASCII_PROMPT)
    assert len(clip_ids) == len(words) + 2  # every word of the prompt is a single token
    assert clip.decode(clip_ids, skip_special_tokens=True) == ASCII_PROMPT
    padded = clip(ASCII_PROMPT, padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == clip.pad_token_id

    t5_ids = t5(ASCII_PROMPT).input_ids
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5_ids[-1] == t5.eos_token_id and len(t5_ids) == len(words) + 1
    assert t5.decode(t5_ids, skip_special_tokens=True) == ASCII_PROMPT
    # unknown words are spelled out, never mapped to <unk>
    spelled = t5("zebra quokka").input_ids
    assert t5.unk_token_id not in spelled and len(spelled) > 3


def test_every_tiny_word_is_one_clip_token():
    # BPE applies merges by rank, so words sharing pieces ("right", "triangle") need the merges built in BPE order
    clip = tiny_clip_tokenizer()
    split = {w: clip.tokenize(w) for w in TINY_WORDS if len(clip.tokenize(w)) != 1}
    assert not split
    assert clip.tokenize("three orange triangles to the right of a purple square") == [
        w + "</w>" for w in "three orange triangles to the right of a purple square".split()
    ]


def test_text_encoder_vocab_covers_tokenizers(sd3_pipe, flux_dir):
    for tok, enc in [
        (sd3_pipe.tokenizer, sd3_pipe.text_encoder),
        (sd3_pipe.tokenizer_2, sd3_pipe.text_encoder_2),
        (sd3_pipe.tokenizer_3, sd3_pipe.text_encoder_3),
    ]:
        assert len(tok) <= enc.config.vocab_size
    for enc in (sd3_pipe.text_encoder, sd3_pipe.text_encoder_2):
        assert enc.config.eos_token_id == sd3_pipe.tokenizer.eos_token_id
        assert enc.config.bos_token_id == sd3_pipe.tokenizer.bos_token_id
        assert enc.config.pad_token_id == sd3_pipe.tokenizer.pad_token_id
