"""Tiny, offline, randomly initialised SD3, FLUX.1, Qwen-Image, Z-Image and FLUX.2 pipelines for tests and benchmarks.

The builders in this module assemble *real* diffusers pipelines -- the actual
:class:`~diffusers.StableDiffusion3Pipeline` / :class:`~diffusers.FluxPipeline` classes with the
actual transformer, VAE, text-encoder, tokenizer and scheduler classes -- but with every component
shrunk to a few thousand parameters and initialised from a fixed seed.  The pipeline is written to a
directory with ``save_pretrained``, so it can be loaded back exactly like a downloaded checkpoint::

    import os
    os.environ["HF_HUB_OFFLINE"] = "1"

    from diffusers import StableDiffusion3Pipeline
    from diffrl.models.tiny import build_tiny_sd3

    path = build_tiny_sd3(tmp_dir / "tiny-sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    images = pipe(prompt="a red circle", height=32, width=32, num_inference_steps=4, output_type="pt").images

Nothing is downloaded: the tokenizers are built from hand-written vocabularies
(:func:`tiny_clip_tokenizer`, :func:`tiny_t5_tokenizer`) and every model from a config.  The models
produce noise, of course, but every tensor has the same structure (names, ranks, conditioning paths,
latent packing, VAE scaling/shift factors, scheduler shifting) as the full-size checkpoints, so code
that runs on the tiny pipelines runs on the real ones.

Geometry
--------
Both VAEs downsample by 4 (``vae_scale_factor == 4``), so a 32x32 image maps to 8x8 latents:

* SD3: latents ``(B, latent_channels, 8, 8)``; the transformer patchifies them (patch size 2) into
  16 image tokens.  ``transformer.config.sample_size == 8`` so the pipeline's default resolution is 32.
* FLUX: latents ``(B, latent_channels, 8, 8)`` are packed into 2x2 patches, giving
  ``(B, 16, 4 * latent_channels)`` tokens -- this packed form is what ``output_type="latent"`` returns.

Determinism
-----------
Each component is created right after ``torch.manual_seed`` with a seed derived from ``seed`` and
the component's name, so the same ``seed`` gives bitwise identical weights, independently of which
optional components (e.g. T5) are built.  The caller's global RNG state is restored afterwards.
All modules are put in eval mode before saving (modules created from a config start in train mode,
and T5 has dropout); ``from_pretrained`` returns them in eval mode as well.
"""

from __future__ import annotations

import inspect
import zlib
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from diffrl.tiny_tokenizers import TINY_WORDS, tiny_clip_tokenizer, tiny_qwen2_tokenizer, tiny_t5_tokenizer

__all__ = [
    "CLIP_HIDDEN_SIZE",
    "CLIP_PROJECTION_DIM",
    "T5_D_MODEL",
    "TINY_WORDS",
    "SD3_VAE_SCALING_FACTOR",
    "SD3_VAE_SHIFT_FACTOR",
    "FLUX_VAE_SCALING_FACTOR",
    "FLUX_VAE_SHIFT_FACTOR",
    "build_tiny_sd3",
    "build_tiny_flux",
    "build_tiny_qwen_image",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "build_tiny_z_image",
    "Z_IMAGE_TURBO_SCHEDULER_CONFIG",
    "build_tiny_flux2",
    "build_tiny_flux2_klein",
    "FLUX2_SCHEDULER_CONFIG",
    "build_tiny_wan",
    "WAN_SCHEDULER_SHIFT",
    "build_tiny_wan_i2v",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
]

#: Width of the tiny CLIP text encoders (both SD3 encoders and the FLUX one).
CLIP_HIDDEN_SIZE = 32
#: Projection width of the tiny ``CLIPTextModelWithProjection`` encoders (SD3).
CLIP_PROJECTION_DIM = 32
#: Width of the tiny T5 encoder.  SD3 pads the concatenated CLIP hidden states (32 + 32) to the T5
#: width, so it must be at least ``2 * CLIP_HIDDEN_SIZE``.
T5_D_MODEL = 64

#: VAE latent normalisation constants of the real SD3 / SD3.5 VAE.
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_SHIFT_FACTOR = 0.0609
#: VAE latent normalisation constants of the real FLUX.1 VAE.
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159

# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------


def _seed(seed: int, component: str) -> None:
    """Seed torch's global RNG with a per-component seed derived from ``seed``.

    torch's CPU generator (mt19937) only uses the low 32 bits of the seed, so the derived seed is
    kept within 32 bits: ``(seed + crc32(component)) mod 2**32``, distinct for distinct ``seed`` values
    below ``2**32``.
    """
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    torch.manual_seed((seed + zlib.crc32(component.encode())) % 2**32)


def _clip_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN_SIZE,
        intermediate_size=2 * CLIP_HIDDEN_SIZE,
        projection_dim=CLIP_PROJECTION_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_D_MODEL,
        d_kv=16,
        d_ff=2 * T5_D_MODEL,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.1,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    _seed(seed, "text_encoder_t5")
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float, seed: int) -> AutoencoderKL:
    # Three blocks -> two downsamplings -> vae_scale_factor = 2 ** (3 - 1) = 4.
    _seed(seed, "vae")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()


def _flux_axes_dims_rope(attention_head_dim: int) -> tuple[int, int, int]:
    """Split the head dim over FLUX's (text/index, row, col) RoPE axes like FLUX.1 does (16, 56, 56)."""
    if attention_head_dim % 2 or attention_head_dim < 6:
        raise ValueError(f"attention_head_dim must be even and >= 6 for FLUX RoPE, got {attention_head_dim}")
    pairs = attention_head_dim // 2
    spatial = max(1, pairs * 7 // 16)
    first = pairs - 2 * spatial
    if first < 1:
        spatial = (pairs - 1) // 2
        first = pairs - 2 * spatial
    return (2 * first, 2 * spatial, 2 * spatial)


def _prepare_dir(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------


def build_tiny_sd3(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    latent_channels: int = 4,
    with_t5: bool = True,
    shift: float = 3.0,
) -> Path:
    """Build a tiny random :class:`~diffusers.StableDiffusion3Pipeline` and save it to ``path``.

    Components (all real library classes, float32, eval mode):

    * ``transformer``: :class:`~diffusers.SD3Transformer2DModel`, patch size 2,
      ``in_channels = out_channels = latent_channels``, ``sample_size=8`` (default resolution 32x32),
      ``pos_embed_max_size=32`` (images up to 256x256), ``joint_attention_dim=64`` (T5 width),
      ``pooled_projection_dim=64`` (2 x CLIP projection), ``caption_projection_dim =
      num_attention_heads * attention_head_dim``.
    * ``text_encoder`` / ``text_encoder_2``: :class:`~transformers.CLIPTextModelWithProjection`
      (hidden 32, projection 32, 2 layers, 2 heads, 77 positions), with different random weights,
      and ``tokenizer`` / ``tokenizer_2`` from :func:`tiny_clip_tokenizer`.
    * ``text_encoder_3``: :class:`~transformers.T5EncoderModel` (d_model 64, 2 layers, 4 heads, gated-gelu)
      with ``tokenizer_3`` from :func:`tiny_t5_tokenizer`; the pipeline pads the concatenated CLIP
      hidden states (32 + 32) to the T5 width.
    * ``vae``: :class:`~diffusers.AutoencoderKL`, channels (16, 32, 32), spatial factor 4, with SD3's
      ``scaling_factor=1.5305`` and ``shift_factor=0.0609``; a 32x32 image gives 8x8 latents.
    * ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with ``shift=shift``.

    Load it with ``StableDiffusion3Pipeline.from_pretrained(path)`` (set ``HF_HUB_OFFLINE=1``).

    Args:
        path: Output directory (created if needed); gets ``model_index.json`` and one sub-folder per
            component, like a hub checkpoint.
        seed: Seed of the random weights, in ``[0, 2**32)``; the same seed gives bitwise identical
            weights.  The global torch RNG state is left unchanged.
        num_layers: Number of joint (MM-DiT) transformer blocks.
        num_attention_heads: Attention heads of the transformer.
        attention_head_dim: Per-head width of the transformer.
        latent_channels: VAE latent channels (real SD3 uses 16).
        with_t5: If False the pipeline is saved without T5 (``text_encoder_3`` and ``tokenizer_3`` are
            None, as with ``from_pretrained(..., text_encoder_3=None, tokenizer_3=None)`` on a real
            checkpoint); the pipeline then feeds zeros in place of the T5 embeddings.  Reloading such
            a directory requires passing ``text_encoder_3=None, tokenizer_3=None`` to
            ``from_pretrained`` explicitly (``model_index.json`` records them as ``[null, null]``, which
            diffusers rejects for non-optional components).  diffusers logs "text_encoder_3=None ...
            cannot be saved" while saving; that message is expected.
        shift: Flow-matching timestep shift of the scheduler (SD3 uses 3.0).

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    with torch.random.fork_rng(devices=[]):
        pipe = _tiny_sd3_pipeline(
            seed=seed,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            latent_channels=latent_channels,
            with_t5=with_t5,
            shift=shift,
        )
    path = _prepare_dir(path)
    pipe.save_pretrained(path)
    return path


def _tiny_sd3_pipeline(
    *,
    seed: int,
    num_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    latent_channels: int,
    with_t5: bool,
    shift: float,
) -> StableDiffusion3Pipeline:
    inner_dim = num_attention_heads * attention_head_dim

    clip_tokenizer = tiny_clip_tokenizer()
    clip_config = _clip_text_config(clip_tokenizer)
    _seed(seed, "text_encoder")
    text_encoder = CLIPTextModelWithProjection(clip_config).eval()
    _seed(seed, "text_encoder_2")
    text_encoder_2 = CLIPTextModelWithProjection(clip_config).eval()

    t5_tokenizer = tiny_t5_tokenizer() if with_t5 else None
    text_encoder_3 = _t5_encoder(t5_tokenizer, seed) if with_t5 else None

    _seed(seed, "transformer")
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=T5_D_MODEL,
        caption_projection_dim=inner_dim,
        pooled_projection_dim=2 * CLIP_PROJECTION_DIM,
        out_channels=latent_channels,
        pos_embed_max_size=32,
    ).eval()

    vae = _vae(latent_channels, SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )


def build_tiny_flux(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    latent_channels: int = 4,
    guidance_embeds: bool = True,
) -> Path:
    """Build a tiny random :class:`~diffusers.FluxPipeline` and save it to ``path``.

    Components (all real library classes, float32, eval mode):

    * ``transformer``: :class:`~diffusers.FluxTransformer2DModel`, patch size 1 on *packed* latents,
      so ``in_channels = 4 * latent_channels`` (the pipeline packs 2x2 latent patches and uses
      ``in_channels // 4`` latent channels); ``joint_attention_dim=64`` (T5 width),
      ``pooled_projection_dim=32`` (CLIP width), RoPE ``axes_dims_rope`` splitting
      ``attention_head_dim`` like FLUX.1 (16 -> (4, 6, 6)), ``guidance_embeds`` as given
      (True: FLUX.1-dev style guidance distillation; False: FLUX.1-schnell style).
    * ``text_encoder``: :class:`~transformers.CLIPTextModel` (hidden 32, 2 layers; its pooled output
      is the pooled projection) with ``tokenizer`` from :func:`tiny_clip_tokenizer`.
    * ``text_encoder_2``: :class:`~transformers.T5EncoderModel` (d_model 64, 2 layers, 4 heads) with
      ``tokenizer_2`` from :func:`tiny_t5_tokenizer` (``model_max_length=512``).
    * ``vae``: :class:`~diffusers.AutoencoderKL`, channels (16, 32, 32), spatial factor 4 (image
      sizes must be multiples of 8), FLUX's ``scaling_factor=0.3611`` and ``shift_factor=0.1159``.
    * ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with FLUX.1's resolution
      dependent shifting (``use_dynamic_shifting=True``, base/max shift 0.5/1.15 over 256..4096
      image tokens, ``shift=3.0``).

    A 32x32 image corresponds to latents ``(B, latent_channels, 8, 8)``, i.e. 16 packed tokens
    ``(B, 16, 4 * latent_channels)``, which is what ``output_type="latent"`` returns.

    Load it with ``FluxPipeline.from_pretrained(path)`` (set ``HF_HUB_OFFLINE=1``).

    Args:
        path: Output directory (created if needed).
        seed: Seed of the random weights, in ``[0, 2**32)``; the same seed gives bitwise identical
            weights.  The global torch RNG state is left unchanged.
        num_layers: Number of dual-stream (MM-DiT) blocks.
        num_single_layers: Number of single-stream blocks.
        num_attention_heads: Attention heads of the transformer.
        attention_head_dim: Per-head width; even and >= 6 (it is split over the 3 RoPE axes).
        latent_channels: VAE latent channels (real FLUX.1 uses 16).
        guidance_embeds: Whether the transformer embeds the guidance scale (FLUX.1-dev style).

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    with torch.random.fork_rng(devices=[]):
        pipe = _tiny_flux_pipeline(
            seed=seed,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            latent_channels=latent_channels,
            guidance_embeds=guidance_embeds,
        )
    path = _prepare_dir(path)
    pipe.save_pretrained(path)
    return path


def _tiny_flux_pipeline(
    *,
    seed: int,
    num_layers: int,
    num_single_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    latent_channels: int,
    guidance_embeds: bool,
) -> FluxPipeline:
    clip_tokenizer = tiny_clip_tokenizer()
    _seed(seed, "text_encoder")
    text_encoder = CLIPTextModel(_clip_text_config(clip_tokenizer)).eval()

    t5_tokenizer = tiny_t5_tokenizer()
    text_encoder_2 = _t5_encoder(t5_tokenizer, seed)

    _seed(seed, "transformer")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        out_channels=None,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_HIDDEN_SIZE,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=_flux_axes_dims_rope(attention_head_dim),
    ).eval()

    vae = _vae(latent_channels, FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )

    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


#: The scheduler settings of Qwen-Image's ``scheduler/scheduler_config.json``: dynamic shift from 256 to 8192 image
#: tokens (``mu`` from 0.5 to 0.9), the shifted levels stretched so the last one is 0.02.
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

# The words of QwenImagePipeline's prompt template, so the tiny tokenizer splits the template's system turn into the
# 34 tokens the real Qwen2.5 tokenizer does (the pipeline drops exactly those).
_QWEN_TEMPLATE_WORDS = "system user assistant Describe".split() + [
    " " + w
    for w in "the image by detailing color shape size texture quantity text spatial relationships of "
    "objects and background".split()
]

#: Width of the tiny Qwen2.5-VL text model (the transformer's ``joint_attention_dim``).
QWEN_TEXT_HIDDEN_SIZE = 32


def _qwen_text_encoder(tokenizer, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in (
            "<|endoftext|>",
            "<|im_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<|vision_start|>",
            "<|vision_end|>",
        )
    }
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=64 * ((len(tokenizer) + 63) // 64),
            hidden_size=QWEN_TEXT_HIDDEN_SIZE,
            intermediate_size=2 * QWEN_TEXT_HIDDEN_SIZE,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=QWEN_TEXT_HIDDEN_SIZE,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    _seed(seed, "text_encoder")
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    latent_channels: int = 4,
) -> Path:
    """Build a tiny random :class:`~diffusers.QwenImagePipeline` and save it to ``path``.

    Components (all real library classes, float32, eval mode):

    * ``transformer``: :class:`~diffusers.QwenImageTransformer2DModel` on packed 2x2 latent tokens
      (``in_channels = 4 * latent_channels``, ``out_channels = latent_channels``), ``joint_attention_dim`` the text
      width (32), RoPE axes splitting ``attention_head_dim`` like FLUX.1's (16 -> (4, 6, 6)).
    * ``text_encoder``: :class:`~transformers.Qwen2_5_VLForConditionalGeneration` (text: 2 layers of width 32, 4
      heads, 2 key/value heads; vision: one block of width 16, unused by the pipeline), with ``tokenizer`` from
      :func:`~diffrl.tiny_tokenizers.tiny_qwen2_tokenizer`, whose vocabulary splits the pipeline's prompt template
      into the same 34 leading tokens as Qwen2.5's (the ones the pipeline drops).
    * ``vae``: :class:`~diffusers.AutoencoderKLQwenImage` (base width 8, ``dim_mult=(1, 2, 4)``: spatial factor 4,
      so sizes are multiples of 8), ``z_dim = latent_channels`` with the first ``latent_channels`` of Qwen-Image's
      per-channel ``latents_mean`` / ``latents_std``.
    * ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with
      :data:`QWEN_IMAGE_SCHEDULER_CONFIG` (Qwen-Image's own).

    A 32x32 image has latents ``(B, latent_channels, 8, 8)``, 16 packed tokens; the pipeline's ``output_type="latent"``
    returns them packed, ``(B, 16, 4 * latent_channels)``.

    Args:
        path: Output directory (created if needed).
        seed: Seed of the random weights, in ``[0, 2**32)``; the global torch RNG state is left unchanged.
        num_layers: Dual-stream transformer blocks.
        num_attention_heads: Attention heads of the transformer.
        attention_head_dim: Per-head width; even and >= 6 (split over the 3 RoPE axes).
        latent_channels: VAE latent channels (Qwen-Image uses 16), at most 16.

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    if not 1 <= latent_channels <= 16:
        raise ValueError(f"latent_channels must be in 1..16, got {latent_channels}")
    # the class's defaults are Qwen-Image's per-channel latent statistics
    params = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    latents_mean = list(params["latents_mean"].default)[:latent_channels]
    latents_std = list(params["latents_std"].default)[:latent_channels]
    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_qwen2_tokenizer(_QWEN_TEMPLATE_WORDS)
        text_encoder = _qwen_text_encoder(tokenizer, seed)
        _seed(seed, "transformer")
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * latent_channels,
            out_channels=latent_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=QWEN_TEXT_HIDDEN_SIZE,
            axes_dims_rope=_flux_axes_dims_rope(attention_head_dim),
        ).eval()
        _seed(seed, "vae")
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=latent_channels,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True],
            latents_mean=latents_mean,
            latents_std=latents_std,
        ).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
        pipe = QwenImagePipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
    path = _prepare_dir(path)
    pipe.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# Z-Image
# ----------------------------------------------------------------------------------------------

#: The scheduler settings of Z-Image-Turbo's ``scheduler/scheduler_config.json``: a static shift of 3, no
#: resolution-dependent shifting (the few-step distilled model samples with 8-9 steps and no CFG).
Z_IMAGE_TURBO_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}

#: A minimal chat template in the Qwen3 format: ``<|im_start|>role\ncontent<|im_end|>\n`` per message, then the
#: assistant's turn; with ``enable_thinking=False`` an empty thinking block follows, as Qwen3's own template writes.
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

#: Width of the tiny Qwen3 text model (the Z-Image transformer's ``cap_feat_dim``).
QWEN3_HIDDEN_SIZE = 32


def _tiny_qwen3_tokenizer():
    tokenizer = tiny_qwen2_tokenizer(["user", "assistant", "<think>", "</think>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def _qwen3_text_encoder(tokenizer, seed: int, *, causal_lm: bool = False, num_hidden_layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=64 * ((len(tokenizer) + 63) // 64),
        hidden_size=QWEN3_HIDDEN_SIZE,
        intermediate_size=2 * QWEN3_HIDDEN_SIZE,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=causal_lm,
    )
    _seed(seed, "text_encoder")
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def build_tiny_z_image(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 1,
    num_refiner_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    latent_channels: int = 4,
    scheduler_config: dict | None = None,
) -> Path:
    """Build a tiny random :class:`~diffusers.ZImagePipeline` and save it to ``path``.

    Components (all real library classes, float32, eval mode):

    * ``transformer``: :class:`~diffusers.ZImageTransformer2DModel` (single-stream, patch size 2, ``num_layers``
      main blocks and ``num_refiner_layers`` noise / context refiner blocks, width ``heads * head_dim``), RoPE axes
      splitting the head dim like FLUX.1's (16 -> (4, 6, 6)), ``cap_feat_dim`` the text width (32).
    * ``text_encoder``: :class:`~transformers.Qwen3Model` (2 layers of width 32, 4 heads, 2 key/value heads) whose
      second-to-last hidden state is the prompt embedding, with a tiny Qwen2 byte-level BPE ``tokenizer`` carrying a
      Qwen3-style chat template (:data:`QWEN3_CHAT_TEMPLATE`).
    * ``vae``: :class:`~diffusers.AutoencoderKL`, spatial factor 4 (sizes must be multiples of 8), the FLUX.1 VAE's
      scaling and shift factors (Z-Image uses the FLUX.1 VAE).
    * ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with ``scheduler_config`` (default
      :data:`Z_IMAGE_TURBO_SCHEDULER_CONFIG`, Z-Image-Turbo's static shift 3).

    A 32x32 image has latents ``(B, latent_channels, 8, 8)``, which is what ``output_type="latent"`` returns.
    """
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    dim = num_attention_heads * attention_head_dim
    with torch.random.fork_rng(devices=[]):
        tokenizer = _tiny_qwen3_tokenizer()
        text_encoder = _qwen3_text_encoder(tokenizer, seed)
        _seed(seed, "transformer")
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=latent_channels,
            dim=dim,
            n_layers=num_layers,
            n_refiner_layers=num_refiner_layers,
            n_heads=num_attention_heads,
            n_kv_heads=num_attention_heads,
            cap_feat_dim=QWEN3_HIDDEN_SIZE,
            axes_dims=list(_flux_axes_dims_rope(attention_head_dim)),
            axes_lens=[1024, 64, 64],
        ).eval()
        vae = _vae(latent_channels, FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR, seed)
        scheduler = FlowMatchEulerDiscreteScheduler(**(scheduler_config or Z_IMAGE_TURBO_SCHEDULER_CONFIG))
        pipe = ZImagePipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
    path = _prepare_dir(path)
    pipe.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# FLUX.2
# ----------------------------------------------------------------------------------------------

#: The scheduler settings of FLUX.2's ``scheduler/scheduler_config.json``: dynamic (exponential) time shifting, whose
#: ``mu`` the pipelines compute themselves from the token count and the step count.
FLUX2_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


def _flux2_transformer(
    seed, *, in_channels, num_layers, num_single_layers, heads, head_dim, text_dim, guidance
):
    from diffusers import Flux2Transformer2DModel

    if head_dim % 8:
        raise ValueError(f"attention_head_dim must be a multiple of 8 (4 RoPE axes), got {head_dim}")
    _seed(seed, "transformer")
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        timestep_guidance_channels=32,
        axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds=guidance,
    ).eval()


def _flux2_vae(latent_channels: int, seed: int):
    from diffusers import AutoencoderKLFlux2

    _seed(seed, "vae")
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    # batch-norm statistics away from (0, 1), so the pipeline's normalisation is exercised
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.running_mean.shape))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape))
    return vae


#: Hidden-state layers that FLUX.2 [klein] stacks into its prompt embedding (``text_encoder_out_layers``).
FLUX2_KLEIN_TEXT_LAYERS = (9, 18, 27)


def build_tiny_flux2_klein(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    latent_channels: int = 4,
    is_distilled: bool = False,
) -> Path:
    """Build a tiny random :class:`~diffusers.Flux2KleinPipeline` and save it to ``path``.

    Components (all real library classes, float32, eval mode):

    * ``transformer``: :class:`~diffusers.Flux2Transformer2DModel` on 2x2-patchified latents (``in_channels = 4 *
      latent_channels``), no guidance embedding, ``joint_attention_dim`` three text widths (96), 4 RoPE axes.
    * ``text_encoder``: :class:`~transformers.Qwen3ForCausalLM` with 27 layers of width 32 (the pipeline stacks hidden
      states 9, 18 and 27), the tiny Qwen2 ``tokenizer`` with a Qwen3-style chat template.
    * ``vae``: :class:`~diffusers.AutoencoderKLFlux2` (spatial factor 4, so sizes are multiples of 8), batch-norm
      statistics set away from (0, 1).
    * ``scheduler``: :data:`FLUX2_SCHEDULER_CONFIG`; ``is_distilled`` as given (False: a base model, with CFG).

    A 32x32 image has latents ``(B, 4 * latent_channels, 4, 4)``; the pipeline's ``output_type="latent"`` returns the
    VAE's latents ``(B, latent_channels, 8, 8)`` (de-normalised, unpatchified).
    """
    from diffusers import Flux2KleinPipeline

    with torch.random.fork_rng(devices=[]):
        tokenizer = _tiny_qwen3_tokenizer()
        text_encoder = _qwen3_text_encoder(
            tokenizer, seed, causal_lm=True, num_hidden_layers=max(FLUX2_KLEIN_TEXT_LAYERS)
        )
        transformer = _flux2_transformer(
            seed,
            in_channels=4 * latent_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            heads=num_attention_heads,
            head_dim=attention_head_dim,
            text_dim=len(FLUX2_KLEIN_TEXT_LAYERS) * QWEN3_HIDDEN_SIZE,
            guidance=False,
        )
        vae = _flux2_vae(latent_channels, seed)
        pipe = Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=is_distilled,
        )
    path = _prepare_dir(path)
    pipe.save_pretrained(path)
    return path


#: A minimal chat template in the Mistral-3 format for message contents given as lists of parts:
#: ``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]`` for the system turn, ``[INST]...[/INST]`` for user turns (text parts only).
MISTRAL3_CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ c['text'] }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ c['text'] }}[/INST]{% endif %}{% endif %}{% endfor %}{% endfor %}"
)
_MISTRAL3_SPECIAL_TOKENS = [
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]

#: Hidden-state layers that FLUX.2 [dev] stacks into its prompt embedding (``text_encoder_out_layers``).
FLUX2_TEXT_LAYERS = (10, 20, 30)


def _tiny_pixtral_processor():
    """A :class:`~transformers.PixtralProcessor` over the tiny byte-level BPE tokenizer (whose vocabulary makes each
    word of FLUX.2's system message one token), with Pixtral's image tokens and :data:`MISTRAL3_CHAT_TEMPLATE`."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PixtralImageProcessor, PixtralProcessor

    words = [" " + w for w in SYSTEM_MESSAGE.replace(",", " ").replace(".", " ").split()]
    tokenizer = tiny_qwen2_tokenizer(words + SYSTEM_MESSAGE.split()[:1])
    tokenizer.add_tokens(_MISTRAL3_SPECIAL_TOKENS, special_tokens=True)
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(), tokenizer=tokenizer, chat_template=MISTRAL3_CHAT_TEMPLATE
    )


def _mistral3_text_encoder(tokenizer, seed: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=64 * ((len(tokenizer) + 63) // 64),
            hidden_size=QWEN3_HIDDEN_SIZE,
            intermediate_size=2 * QWEN3_HIDDEN_SIZE,
            num_hidden_layers=max(FLUX2_TEXT_LAYERS),
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            image_size=64,
            patch_size=16,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )
    _seed(seed, "text_encoder")
    return Mistral3ForConditionalGeneration(config).eval()


def build_tiny_flux2(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    latent_channels: int = 4,
) -> Path:
    """Build a tiny random :class:`~diffusers.Flux2Pipeline` (FLUX.2 [dev]) and save it to ``path``.

    Components (all real library classes, float32, eval mode): the transformer and VAE of
    :func:`build_tiny_flux2_klein` with a guidance embedding (``guidance_embeds=True``), and
    :class:`~transformers.Mistral3ForConditionalGeneration` as ``text_encoder`` (text: 30 layers of width 32, as the
    pipeline stacks hidden states 10, 20 and 30; vision: one Pixtral block, unused) with a
    :class:`~transformers.PixtralProcessor` as ``tokenizer`` (the tiny byte-level tokenizer with a Mistral-3 style
    chat template). ``output_type="latent"`` of this pipeline returns the packed tokens ``(B, h * w, 4 * C)``.
    """
    from diffusers import Flux2Pipeline

    with torch.random.fork_rng(devices=[]):
        processor = _tiny_pixtral_processor()
        text_encoder = _mistral3_text_encoder(processor.tokenizer, seed)
        transformer = _flux2_transformer(
            seed,
            in_channels=4 * latent_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            heads=num_attention_heads,
            head_dim=attention_head_dim,
            text_dim=len(FLUX2_TEXT_LAYERS) * QWEN3_HIDDEN_SIZE,
            guidance=True,
        )
        vae = _flux2_vae(latent_channels, seed)
        pipe = Flux2Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=processor,
            transformer=transformer,
        )
    path = _prepare_dir(path)
    pipe.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2 text-to-video
# ----------------------------------------------------------------------------------------------

#: Width of the tiny UMT5 text encoder (the Wan transformer's ``text_dim``).
WAN_TEXT_D_MODEL = 32
#: Static shift of the tiny Wan pipeline's Euler scheduler (Wan's ``flow_shift`` for 480p video).
WAN_SCHEDULER_SHIFT = 3.0


def _wan_transformer(latent_channels: int, num_layers: int, seed: int, component: str):
    from diffusers import WanTransformer3DModel

    _seed(seed, component)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE over (frame, row, col) splits it 4 + 4 + 4
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=WAN_TEXT_D_MODEL,
        freq_dim=32,
        ffn_dim=48,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    ).eval()


def build_tiny_wan(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    latent_channels: int = 4,
    two_experts: bool = False,
    boundary_ratio: float = 0.875,
    ti2v: bool = False,
) -> Path:
    """Build a tiny random :class:`~diffusers.WanPipeline` (Wan 2.1, Wan 2.2 with two experts, or Wan 2.2 TI2V) and
    save it.

    Components (all real library classes, float32, eval mode):

    * ``transformer``: :class:`~diffusers.WanTransformer3DModel` (patch ``(1, 2, 2)``, 2 heads of width 12, 2 blocks,
      ``text_dim`` 32); with ``two_experts`` a second one, ``transformer_2`` (the low-noise expert of Wan 2.2 A14B),
      from its own seed, and the pipeline's ``boundary_ratio``: the first expert denoises while the timestep is at
      least ``boundary_ratio * 1000``, the second below.
    * ``text_encoder``: :class:`~transformers.UMT5EncoderModel` (2 layers of width 32) with the tiny T5 tokenizer of
      :func:`~diffrl.tiny_tokenizers.tiny_t5_tokenizer`.
    * ``vae``: :class:`~diffusers.AutoencoderKLWan` (base width 8, ``dim_mult=(1, 2, 4)``, both downsamplings also
      temporal): 4x in space and 4x in time like Wan 2.1's 8x/4x, so ``num_frames`` follows Wan's rule
      ``(F - 1) % 4 == 0`` and a ``F x 32 x 32`` video has latents ``(B, latent_channels, (F - 1) / 4 + 1, 8, 8)``;
      the first ``latent_channels`` of Wan's per-channel ``latents_mean`` / ``latents_std``.
    * ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with the static shift
      :data:`WAN_SCHEDULER_SHIFT` (the released checkpoints ship ``UniPCMultistepScheduler`` with flow sigmas and
      the same shift; diffrl's adapter reads either, and an Euler scheduler lets a test compare rollouts step by
      step with the pipeline).

    Args:
        path: Output directory (created if needed).
        seed: Seed of the random weights, in ``[0, 2**32)``; the global torch RNG state is left unchanged.
        num_layers: Transformer blocks (per expert).
        latent_channels: VAE latent channels (Wan 2.1 uses 16), at most 16.
        two_experts: Build Wan 2.2's two-expert layout.
        boundary_ratio: Wan 2.2's switch point (A14B text-to-video: 0.875); only with ``two_experts``.
        ti2v: Build Wan 2.2 TI2V-5B's layout instead (``tiny:wan22_ti2v``): the pipeline's ``expand_timesteps=True``
            (a timestep per video token) and the Wan 2.2 VAE's geometry (the ``AutoencoderKLWan`` config of diffusers'
            ``scripts/convert_wan_to_diffusers.py``, ``vae22_diffusers_config``, at base width 8 and one residual block
            per level): ``is_residual``, ``patch_size=2`` (12 pixel channels), ``dim_mult=(1, 2, 4, 4)`` with the
            temporal downsamplings ``(False, True, True)``, so 16x in space and 4x in time, 48 latent channels
            (``latent_channels`` is ignored) with Wan 2.1's 16 per-channel statistics repeated three times.

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    if not 1 <= latent_channels <= 16:
        raise ValueError(f"latent_channels must be in 1..16, got {latent_channels}")
    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    latents_mean = list(params["latents_mean"].default)[:latent_channels]
    latents_std = list(params["latents_std"].default)[:latent_channels]
    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_t5_tokenizer()
        config = UMT5Config(
            vocab_size=len(tokenizer),
            d_model=WAN_TEXT_D_MODEL,
            d_kv=8,
            d_ff=2 * WAN_TEXT_D_MODEL,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.1,
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        _seed(seed, "text_encoder")
        text_encoder = UMT5EncoderModel(config).eval()
        if ti2v:
            latent_channels = 48
            latents_mean = list(params["latents_mean"].default) * 3
            latents_std = list(params["latents_std"].default) * 3
        transformer = _wan_transformer(latent_channels, num_layers, seed, "transformer")
        transformer_2 = (
            _wan_transformer(latent_channels, num_layers, seed, "transformer_2") if two_experts else None
        )
        _seed(seed, "vae")
        vae_config = dict(
            base_dim=8,
            z_dim=latent_channels,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[True, True],
            latents_mean=latents_mean,
            latents_std=latents_std,
            scale_factor_temporal=4,
            scale_factor_spatial=4,
        )
        if ti2v:  # the Wan 2.2 VAE's layout (16x in space: 8x in its blocks, then 2x2 pixel patches)
            vae_config.update(
                decoder_base_dim=8,
                dim_mult=[1, 2, 4, 4],
                temperal_downsample=[False, True, True],
                in_channels=12,
                out_channels=12,
                patch_size=2,
                is_residual=True,
                scale_factor_spatial=16,
            )
        vae = AutoencoderKLWan(**vae_config).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=WAN_SCHEDULER_SHIFT)
        pipe = WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio if two_experts else None,
            expand_timesteps=ti2v,
        )
    path = _prepare_dir(path)
    pipe.save_pretrained(path)
    return path


#: The tiny edit pipeline's VL processor sees images of at most this many pixels (the real one: 28 * 28 * 1280),
#: so a 32x32 to 64x64 source image is 4 vision tokens after the 2x2 merge.
TINY_QWEN_EDIT_MAX_PIXELS = 56 * 56


def build_tiny_qwen_image_edit(
    path: str | Path, *, seed: int = 0, latent_channels: int = 4, plus: bool = False
) -> Path:
    """Build a tiny random :class:`~diffusers.QwenImageEditPipeline` and save it to ``path``: the components of
    :func:`build_tiny_qwen_image` (same seed, same weights) plus the ``processor`` the edit pipeline gives the source
    image to, a :class:`~transformers.Qwen2VLProcessor` over the same tokenizer with a
    :class:`~transformers.Qwen2VLImageProcessor` whose patch (14), temporal patch (2) and merge size (2) are the tiny
    Qwen2.5-VL vision tower's, limited to :data:`TINY_QWEN_EDIT_MAX_PIXELS` pixels. ``plus=True`` saves the same
    components as a :class:`~diffusers.QwenImageEditPlusPipeline` (several source images)."""
    import tempfile

    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        base = QwenImagePipeline.from_pretrained(
            build_tiny_qwen_image(Path(tmp) / "t2i", seed=seed, latent_channels=latent_channels)
        )
        image_processor = Qwen2VLImageProcessor(
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
            min_pixels=28 * 28,
            max_pixels=TINY_QWEN_EDIT_MAX_PIXELS,
        )
        # the processor class requires a video processor (the edit pipeline never gives it a video)
        processor = Qwen2VLProcessor(
            image_processor=image_processor, tokenizer=base.tokenizer, video_processor=Qwen2VLVideoProcessor()
        )
        pipe = (QwenImageEditPlusPipeline if plus else QwenImageEditPipeline)(
            scheduler=base.scheduler,
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            processor=processor,
            transformer=base.transformer,
        )
        path = _prepare_dir(path)
        pipe.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2 image-to-video
# ----------------------------------------------------------------------------------------------

#: Width of the tiny CLIP vision encoder of the Wan 2.1 image-to-video pipeline (the transformer's ``image_dim``).
WAN_I2V_CLIP_HIDDEN = 16
#: Side of the square image the tiny CLIP vision encoder sees: 2 x 2 patches of 14 pixels and a class token.
WAN_I2V_CLIP_IMAGE_SIZE = 28


def _wan_i2v_transformer(
    latent_channels: int, mask_channels: int, num_layers: int, seed: int, component: str, clip: bool
):
    """The tiny Wan transformer of :func:`_wan_transformer` with the image-to-video input: the noisy latent, the
    ``mask_channels`` mask and the condition latent concatenated (``2 C + 4`` channels; Wan 2.1 I2V 14B: 36), and,
    with ``clip``, Wan 2.1's image cross-attention (``image_dim``, ``added_kv_proj_dim``)."""
    from diffusers import WanTransformer3DModel

    _seed(seed, component)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=2 * latent_channels + mask_channels,
        out_channels=latent_channels,
        text_dim=WAN_TEXT_D_MODEL,
        freq_dim=32,
        ffn_dim=48,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=WAN_I2V_CLIP_HIDDEN if clip else None,
        added_kv_proj_dim=2 * 12 if clip else None,  # the transformer's width, as Wan 2.1 I2V 14B's 5120
        rope_max_seq_len=1024,
    ).eval()


def build_tiny_wan_i2v(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    latent_channels: int = 4,
    two_experts: bool = False,
    boundary_ratio: float = 0.9,
) -> Path:
    """Build a tiny random :class:`~diffusers.WanImageToVideoPipeline` and save it to ``path``: the text encoder,
    tokenizer, VAE and scheduler of :func:`build_tiny_wan` (same seed, same weights) with image-to-video
    transformers, whose input is the noisy latent, a 4-channel first-frame mask and the source image's latent
    (``2 * latent_channels + 4`` channels).

    * Wan 2.1 layout (default): one transformer with image cross-attention (``image_dim`` 16, ``added_kv_proj_dim``
      24) and the CLIP image encoder, a :class:`~transformers.CLIPVisionModelWithProjection` (2 layers of width 16,
      14-pixel patches of a 28 x 28 image: 5 tokens) with its :class:`~transformers.CLIPImageProcessor`
      (``image_processor``), built from their config classes.
    * ``two_experts`` (Wan 2.2 I2V A14B layout): ``transformer`` and ``transformer_2`` without image cross-attention,
      no image encoder, and the pipeline's ``boundary_ratio`` (Wan 2.2 I2V A14B: 0.9).

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    import tempfile

    from diffusers import WanImageToVideoPipeline, WanPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        base = WanPipeline.from_pretrained(
            build_tiny_wan(
                Path(tmp) / "t2v", seed=seed, num_layers=num_layers, latent_channels=latent_channels
            )
        )
        mask_channels = int(base.vae.config.scale_factor_temporal)
        with torch.random.fork_rng(devices=[]):
            transformer = _wan_i2v_transformer(
                latent_channels, mask_channels, num_layers, seed, "i2v_transformer", clip=not two_experts
            )
            transformer_2 = (
                _wan_i2v_transformer(
                    latent_channels, mask_channels, num_layers, seed, "i2v_transformer_2", False
                )
                if two_experts
                else None
            )
            image_encoder = image_processor = None
            if not two_experts:
                _seed(seed, "image_encoder")
                image_encoder = CLIPVisionModelWithProjection(
                    CLIPVisionConfig(
                        hidden_size=WAN_I2V_CLIP_HIDDEN,
                        intermediate_size=2 * WAN_I2V_CLIP_HIDDEN,
                        projection_dim=WAN_I2V_CLIP_HIDDEN,
                        num_hidden_layers=2,
                        num_attention_heads=2,
                        image_size=WAN_I2V_CLIP_IMAGE_SIZE,
                        patch_size=14,
                    )
                ).eval()
                side = WAN_I2V_CLIP_IMAGE_SIZE
                image_processor = CLIPImageProcessor(
                    size={"shortest_edge": side}, crop_size={"height": side, "width": side}
                )
        pipe = WanImageToVideoPipeline(
            tokenizer=base.tokenizer,
            text_encoder=base.text_encoder,
            vae=base.vae,
            scheduler=base.scheduler,
            image_processor=image_processor,
            image_encoder=image_encoder,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio if two_experts else None,
        )
        path = _prepare_dir(path)
        pipe.save_pretrained(path)
    return path
