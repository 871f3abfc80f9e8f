"""Tiny, offline, randomly initialised SD3 and FLUX.1 pipelines for tests and benchmarks.

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
