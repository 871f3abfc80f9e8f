"""The memory estimate: a rough peak of one training process from the safetensors headers (or published sizes),
compared with the GPU's total memory."""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .findings import Finding, GiB, count, gib
from .model_files import ModelLocation, supported_pipelines, weight_files

__all__ = ["MemoryEstimate", "PublishedModel", "UnknownModelSize", "estimate_memory", "check_memory"]


class UnknownModelSize(LookupError):
    """The model's weights are not present offline and it is not one of the checkpoints of known size."""


@dataclass(frozen=True)
class PublishedModel:
    """A well-known checkpoint's sizes, for estimates without its weights: the transformer's ``config.json`` (its
    class and the fields that differ from that class's defaults; the transformer is built from it on the ``meta``
    device, which allocates nothing, to read its tensor shapes), the VAE ``config.json`` fields the adapter's
    ``vae_geometry`` reads, and the parameters of every other component (text encoders and VAE). The configs are
    the checkpoints' own ``transformer/config.json`` and ``vae/config.json`` on the Hugging Face hub.
    ``frozen_transformers`` counts further copies of the transformer's architecture held frozen in memory (Wan 2.2
    A14B's second expert: one expert trains, both stay on the device). ``vae_params`` is the share of
    ``other_params`` that stays on the device with ``model.offload_text_encoders``: the VAE's, and an image encoder's
    (Wan 2.1 I2V's CLIP); the rest are the text encoders' (what that setting keeps off the device)."""

    pipeline: str  # the pipeline class (model_index.json's _class_name), which names the adapter
    transformer: dict[str, Any]
    vae: dict[str, Any]
    other_params: float
    frozen_transformers: int = 0
    vae_params: float = 0.0

    @property
    def text_encoder_params(self) -> float:
        """The text (and vision-language) encoders' parameters: ``other_params`` less the VAE's."""
        return self.other_params - self.vae_params


_SD3_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16}
_SD3_VAE_PARAMS = 0.084e9  # the SD3 / FLUX.1 VAE (AutoencoderKL, 16 latent channels)
# CLIP-L 124M + OpenCLIP bigG 695M + T5-XXL encoder 4.76B + VAE 84M
_SD3_OTHERS = 5.66e9
_SD35_LARGE = {
    "_class_name": "SD3Transformer2DModel",
    "num_layers": 38,
    "num_attention_heads": 38,
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
_FLUX1 = {
    "_class_name": "FluxTransformer2DModel",
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
}
# Qwen-Image (Qwen tech report, arXiv 2508.02324, sec. 2): a 20B MMDiT of 60 dual-stream blocks, width 24 x 128;
# the Qwen2.5-VL-7B-Instruct encoder (8.29B parameters with its vision tower, as its model card says) and the
# 127M-parameter AutoencoderKLQwenImage (the Wan-2.1 VAE layout). Qwen-Image-Edit has the same components.
_QWEN_IMAGE = {
    "_class_name": "QwenImageTransformer2DModel",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
_QWEN_VAE = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "temperal_downsample": [False, True, True],
}
_QWEN_VAE_PARAMS = 0.127e9
_QWEN_OTHERS = 8.292e9 + _QWEN_VAE_PARAMS
# Z-Image-Turbo (Z-Image report, arXiv 2511.22699: a 6B single-stream DiT): its transformer/config.json has dim 3840,
# 30 heads (30 key/value heads), 30 layers, 2 noise- and 2 context-refiner layers, cap_feat_dim 2560 (Qwen3-4B's
# hidden size), patch 2 (frame patch 1), RoPE axes (32, 48, 48) with theta 256, 16 input channels: 6.15B parameters
# built from it. Text encoder Qwen3-4B (4.02B, as its model card's 4.0B; the tied embeddings count once) and the
# FLUX.1 VAE (83.8M).
_Z_IMAGE_TURBO = {
    "_class_name": "ZImageTransformer2DModel",
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "cap_feat_dim": 2560,
    "axes_dims": [32, 48, 48],
    "rope_theta": 256.0,
    "qk_norm": True,
}
_QWEN3_4B = 4.022e9
_FLUX1_VAE_PARAMS = 0.0838e9
# FLUX.2 (diffusers' Flux2Transformer2DModel, whose defaults are FLUX.2 [dev]'s config, and the FLUX.2 conversion
# script's klein-4B config): [dev] 8 double and 48 single blocks of 48 heads x 128, joint_attention_dim 15360 (three
# Mistral hidden states of 5120 concatenated), 128 input channels, patch 1, mlp_ratio 3, guidance embedding: 32.2B;
# [klein] 4B 5 double and 20 single blocks of 24 heads x 128, joint_attention_dim 7680 (three Qwen3-4B states of
# 2560), no guidance embedding: 3.88B. AutoencoderKLFlux2: the FLUX.1 VAE layout with 32 latent channels (84.0M).
_FLUX2 = {
    "_class_name": "Flux2Transformer2DModel",
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "guidance_embeds": True,
}
_FLUX2_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 32}
_FLUX2_VAE_PARAMS = 0.0840e9
# Wan 2.1 / 2.2 text-to-video (Wan report, arXiv 2503.20314, table 1, and the Wan team's configs wan_t2v_1_3B.py /
# wan_t2v_14B.py): 1.3B: width 1536 (12 heads x 128), 30 layers, FFN 8960; 14B: width 5120 (40 x 128), 40 layers,
# FFN 13824; both patch (1, 2, 2), 16 latent channels, text_dim 4096, freq_dim 256. Wan 2.2 A14B: two experts of the
# 14B architecture (high- and low-noise). The UMT5-XXL encoder (d_model 4096, d_ff 10240, 24 layers, 64 heads,
# 256384-token vocabulary: 5.68B) and the Wan-2.1 VAE (126.9M, the layout of Qwen-Image's).
_WAN_14B = {
    "_class_name": "WanTransformer3DModel",
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
_WAN_VAE = {**_QWEN_VAE, "scale_factor_spatial": 8, "scale_factor_temporal": 4}
_WAN_OTHERS = 5.681e9 + _QWEN_VAE_PARAMS
# Wan 2.2 TI2V-5B (the Wan team's config wan_ti2v_5B.py; diffusers' scripts/convert_wan_to_diffusers.py, model type
# Wan2.2-TI2V-5B and vae22_diffusers_config): width 3072 (24 heads x 128), 30 layers, FFN 14336, 48 latent channels;
# the Wan 2.2 VAE: base 160 (decoder 256), dim_mult (1, 2, 4, 4), temporal downsamplings (False, True, True), 2x2 pixel
# patches, 16x in space and 4x in time, 48 channels: 704.7M parameters (counted from that config on the meta device).
_WAN_TI2V_5B = {
    **_WAN_14B,
    "num_attention_heads": 24,
    "ffn_dim": 14336,
    "num_layers": 30,
    "in_channels": 48,
    "out_channels": 48,
}
_WAN22_VAE = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "dim_mult": [1, 2, 4, 4],
    "temperal_downsample": [False, True, True],
    "z_dim": 48,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
}
#: Published sizes of well-known checkpoints, used when their weights are not present offline. A new family adds
#: rows here (and the adapter's size hooks: ``token_patch_size``, ``vae_geometry``, ``transformer_geometry``,
#: ``memory_frames``, ``unused_lora_modules_in``, ``memory_text_tokens``, ``condition_tokens``); nothing below
#: branches on a family.
_PUBLISHED = {
    "stabilityai/stable-diffusion-3.5-medium": PublishedModel(
        "StableDiffusion3Pipeline",
        {
            "_class_name": "SD3Transformer2DModel",
            "num_layers": 24,
            "num_attention_heads": 24,
            "attention_head_dim": 64,
            "caption_projection_dim": 1536,
            "pos_embed_max_size": 384,
            "dual_attention_layers": list(range(13)),
            "qk_norm": "rms_norm",
        },
        _SD3_VAE,
        _SD3_OTHERS,
        vae_params=_SD3_VAE_PARAMS,
    ),
    "stabilityai/stable-diffusion-3.5-large": PublishedModel(
        "StableDiffusion3Pipeline", _SD35_LARGE, _SD3_VAE, _SD3_OTHERS, vae_params=_SD3_VAE_PARAMS
    ),
    "stabilityai/stable-diffusion-3.5-large-turbo": PublishedModel(
        "StableDiffusion3Pipeline", _SD35_LARGE, _SD3_VAE, _SD3_OTHERS, vae_params=_SD3_VAE_PARAMS
    ),
    "stabilityai/stable-diffusion-3-medium-diffusers": PublishedModel(
        "StableDiffusion3Pipeline",
        {
            "_class_name": "SD3Transformer2DModel",
            "num_layers": 24,
            "num_attention_heads": 24,
            "attention_head_dim": 64,
            "caption_projection_dim": 1536,
            "pos_embed_max_size": 192,
        },
        _SD3_VAE,
        _SD3_OTHERS,
        vae_params=_SD3_VAE_PARAMS,
    ),
    # CLIP-L 124M + T5-XXL encoder 4.76B + VAE 84M
    "black-forest-labs/FLUX.1-dev": PublishedModel(
        "FluxPipeline", {**_FLUX1, "guidance_embeds": True}, _SD3_VAE, 4.97e9, vae_params=_SD3_VAE_PARAMS
    ),
    "black-forest-labs/FLUX.1-schnell": PublishedModel(
        "FluxPipeline", {**_FLUX1, "guidance_embeds": False}, _SD3_VAE, 4.97e9, vae_params=_SD3_VAE_PARAMS
    ),
    "Qwen/Qwen-Image": PublishedModel(
        "QwenImagePipeline", _QWEN_IMAGE, _QWEN_VAE, _QWEN_OTHERS, vae_params=_QWEN_VAE_PARAMS
    ),
    "Qwen/Qwen-Image-Edit": PublishedModel(
        "QwenImageEditPipeline", _QWEN_IMAGE, _QWEN_VAE, _QWEN_OTHERS, vae_params=_QWEN_VAE_PARAMS
    ),
    "Qwen/Qwen-Image-Edit-2509": PublishedModel(
        "QwenImageEditPlusPipeline", _QWEN_IMAGE, _QWEN_VAE, _QWEN_OTHERS, vae_params=_QWEN_VAE_PARAMS
    ),
    "Tongyi-MAI/Z-Image-Turbo": PublishedModel(
        "ZImagePipeline",
        _Z_IMAGE_TURBO,
        _SD3_VAE,
        _QWEN3_4B + _FLUX1_VAE_PARAMS,
        vae_params=_FLUX1_VAE_PARAMS,
    ),
    # Mistral-Small-3.2-24B (24B with its vision tower, as its model card says) + the VAE
    "black-forest-labs/FLUX.2-dev": PublishedModel(
        "Flux2Pipeline", _FLUX2, _FLUX2_VAE, 24.0e9 + _FLUX2_VAE_PARAMS, vae_params=_FLUX2_VAE_PARAMS
    ),
    "black-forest-labs/FLUX.2-klein-4B": PublishedModel(
        "Flux2KleinPipeline",
        {
            **_FLUX2,
            "num_layers": 5,
            "num_single_layers": 20,
            "num_attention_heads": 24,
            "joint_attention_dim": 7680,
            "guidance_embeds": False,
        },
        _FLUX2_VAE,
        _QWEN3_4B + _FLUX2_VAE_PARAMS,
        vae_params=_FLUX2_VAE_PARAMS,
    ),
    # Z-Image (the base model Z-Image-Turbo is distilled from): the same 6B transformer, text encoder and VAE
    "Tongyi-MAI/Z-Image": PublishedModel(
        "ZImagePipeline",
        _Z_IMAGE_TURBO,
        _SD3_VAE,
        _QWEN3_4B + _FLUX1_VAE_PARAMS,
        vae_params=_FLUX1_VAE_PARAMS,
    ),
    # FLUX.2 [klein] 9B (base and distilled): 8 double and 24 single blocks of width 4096 (32 heads of 128), the text
    # width three stacked Qwen3-8B hidden states (3 x 4096), Qwen3-8B (8.19B) as text encoder; the block counts and
    # width are BFL's release figures, not read from a config.json here (none was reachable offline)
    **{
        f"black-forest-labs/FLUX.2-klein-{variant}9B": PublishedModel(
            "Flux2KleinPipeline",
            {
                **_FLUX2,
                "num_layers": 8,
                "num_single_layers": 24,
                "num_attention_heads": 32,
                "joint_attention_dim": 12288,
                "guidance_embeds": False,
            },
            _FLUX2_VAE,
            8.19e9 + _FLUX2_VAE_PARAMS,
            vae_params=_FLUX2_VAE_PARAMS,
        )
        for variant in ("", "base-")
    },
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": PublishedModel(
        "WanPipeline",
        {**_WAN_14B, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
        _WAN_VAE,
        _WAN_OTHERS,
        vae_params=_QWEN_VAE_PARAMS,
    ),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": PublishedModel(
        "WanPipeline", _WAN_14B, _WAN_VAE, _WAN_OTHERS, vae_params=_QWEN_VAE_PARAMS
    ),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": PublishedModel(
        "WanPipeline", _WAN_14B, _WAN_VAE, _WAN_OTHERS, frozen_transformers=1, vae_params=_QWEN_VAE_PARAMS
    ),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": PublishedModel(
        "WanPipeline", _WAN_TI2V_5B, _WAN22_VAE, 5.681e9 + 0.7047e9, vae_params=0.7047e9
    ),
    # Wan image-to-video (diffusers' scripts/convert_wan_to_diffusers.py configs "Wan-I2V-14B-480p" / "-720p" and
    # "Wan2.2-I2V-14B-720p"): the 14B transformer with 36 input channels (the noisy latent, 4 mask channels, the
    # condition latent); Wan 2.1's also with image cross-attention (image_dim 1280, added_kv_proj_dim 5120) and the
    # CLIP ViT-H/14 vision encoder (CLIPVisionModelWithProjection: width 1280, 32 layers, projection 1024: 0.632B,
    # counted from that config); Wan 2.2 I2V A14B: two experts, no image encoder.
    **{
        f"Wan-AI/Wan2.1-I2V-14B-{res}-Diffusers": PublishedModel(
            "WanImageToVideoPipeline",
            {**_WAN_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
            _WAN_VAE,
            _WAN_OTHERS + 0.632e9,
            vae_params=_QWEN_VAE_PARAMS + 0.632e9,  # the VAE and the CLIP image encoder (not offloaded)
        )
        for res in ("480P", "720P")
    },
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": PublishedModel(
        "WanImageToVideoPipeline",
        {**_WAN_14B, "in_channels": 36},
        _WAN_VAE,
        _WAN_OTHERS,
        frozen_transformers=1,
        vae_params=_QWEN_VAE_PARAMS,
    ),
}
#: Activation elements stored per token and width unit in one transformer block for backward (Korthikanti et al.
#: 2022, 34 s b h bytes at 16 bit, without the attention matrix that fused attention does not store).
_ACT_PER_BLOCK = 16
#: Activation elements per pixel and first VAE decoder channel live at once while decoding (no grad).
_VAE_PER_PIXEL = 3


@dataclass
class MemoryEstimate:
    """Bytes per process by term (see :func:`estimate_memory`); ``total`` is their sum."""

    weights: int
    trained: int
    buffers: int
    activations: int
    rewards: int
    overhead: int
    params: int
    trainable_params: int
    source: str
    notes: list[str] = field(default_factory=list)
    # the two candidates of ``activations`` (its max): a training pass's and a sampling pass's
    train_activations: int = 0
    sample_activations: int = 0
    # model.offload_text_encoders: the text encoders' bytes, on the device only while encoding (then not in
    # ``weights``); 0 when they stay on the device (then in ``weights``)
    text_encoders: int = 0
    video: bool = (
        False  # a video model (its VAE decodes frames: video.vae_tiling / vae_slicing lower that term)
    )

    @property
    def total(self) -> int:
        """The peak: the larger of the encoding moment (``text_encoders`` on the device, no activations) and the
        sampling or training passes (``activations``), over what stays on the device throughout."""
        resident = self.weights + self.trained + self.buffers + self.rewards + self.overhead
        return resident + max(self.activations, self.text_encoders)


def _tensor_shapes(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], int]:
    """``({name: shape}, approx_numel)``: shapes read from safetensors headers (no tensor is loaded); ``.bin``
    files, which have no header, count as float32 by size."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    approx = 0
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        elif path.is_file():
            approx += path.stat().st_size // 4
    return shapes, approx


def _peft_match(module: str, targets) -> bool:
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _transformer_on_meta(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the state dict of the diffusers transformer ``config`` describes, built on the ``meta``
    device (no memory allocated, no weights read): the names and shapes its safetensors file holds."""
    return dict(_meta_shapes(json.dumps(config, sort_keys=True)))


@functools.lru_cache(maxsize=32)
def _meta_shapes(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import diffusers
    import torch

    config = json.loads(config_json)
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(config)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _model_facts(cfg, model_dir: Path | None) -> dict[str, Any]:
    """Family, parameter counts, architecture and LoRA size, from the pipeline directory or published sizes. What
    differs between families comes from the adapter class (``token_patch_size``, ``vae_geometry``,
    ``unused_lora_modules_in``, ``memory_text_tokens``, the LoRA defaults) and, for published sizes, from the rows
    of ``_PUBLISHED``."""
    from ..models.loading import ADAPTERS

    m = cfg.model
    if model_dir is not None:
        index = json.loads((Path(model_dir) / "model_index.json").read_text())
        family = supported_pipelines().get(index.get("_class_name"), "sd3")
        adapter = next(c for c in ADAPTERS.values() if c.family == family)
        params: dict[str, int] = {}  # per pipeline component
        transformer_shapes: dict[str, tuple[int, ...]] = {}
        approx = False
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, list) or value[0] is None:
                continue
            shapes, extra = _tensor_shapes(weight_files(Path(model_dir) / name))
            approx = approx or extra > 0
            params[name] = sum(math.prod(s) for s in shapes.values()) + extra
            if name == "transformer":
                transformer_shapes = shapes
        tcfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
        vcfg = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
        transformer = params.get("transformer", 0)
        total = sum(params.values())
        # the components FlowModel.text_encoders() moves (named text_encoder*)
        text = sum(v for k, v in params.items() if k.startswith("text_encoder"))
        frozen = 1 if params.get("transformer_2") else 0  # Wan 2.2's second expert
        source = "safetensors headers" + (" and .bin sizes" if approx else "")
    else:
        if m.path not in _PUBLISHED:
            raise UnknownModelSize(f"{m.path} is not present offline and its size is not known")
        row = _PUBLISHED[m.path]
        adapter = ADAPTERS[row.pipeline]
        tcfg, vcfg = row.transformer, row.vae
        transformer_shapes = _transformer_on_meta(tcfg)
        transformer = sum(math.prod(s) for s in transformer_shapes.values())
        total = transformer * (1 + row.frozen_transformers) + int(row.other_params)
        text = int(row.text_encoder_params)
        frozen = row.frozen_transformers
        source = f"published sizes of {m.path} (the weights are not present offline)"
    width, blocks, text_width = adapter.transformer_geometry(tcfg)
    latent_frames, decoded_frames = adapter.memory_frames(cfg.sample.num_frames, vcfg)
    rank = m.lora_rank if m.lora_rank > 0 else adapter.default_lora_rank
    targets = m.lora_targets or adapter.default_lora_targets
    exclude = set() if m.lora_targets else set(adapter.unused_lora_modules_in(tcfg))
    lora = 0
    for key, shape in transformer_shapes.items():
        module = key.removesuffix(".weight")
        if (
            key.endswith(".weight")
            and len(shape) == 2
            and module not in exclude
            and _peft_match(module, targets)
        ):
            lora += rank * (shape[0] + shape[1])
    vae_factor, vae_channels, latent_channels = adapter.vae_geometry(vcfg)
    return {
        "family": adapter.family,
        "params": int(total),
        "transformer": int(transformer),
        "frozen_transformers": int(frozen),
        "text_encoders": int(text),
        "width": width,
        "blocks": blocks,
        "patch": adapter.token_patch_size(tcfg),
        "vae_factor": vae_factor,
        "vae_channels": vae_channels,
        "latent_channels": latent_channels,
        "text_width": text_width,
        "latent_frames": latent_frames,
        "decoded_frames": decoded_frames,
        "video": bool(getattr(adapter, "is_video", False)),
        "text_tokens": adapter.memory_text_tokens,
        "condition_tokens": adapter.condition_tokens(
            vae_factor, adapter.token_patch_size(tcfg), getattr(m, "condition_image_size", 0)
        ),
        "condition_images": _condition_images(cfg, adapter),  # (count, where it comes from)
        # a second (negative-prompt) pass per sample where guidance is classifier-free with a negative prompt
        "true_cfg": adapter.guidance_is_cfg and adapter.uses_negative_prompt,
        "lora": lora,
        "source": source,
    }


def _condition_images(cfg, adapter) -> tuple[int, str]:
    """Conditioning images of one training row for the estimate, and where the number comes from: the most
    ``metadata["image"]`` entries a row of ``data.train`` has (a path counts one, a list its length), at least the
    adapter's ``condition_images_default`` (an edit model's one source image), which is also the number when the
    prompts are not a local file doctor can read (a ``hf:`` dataset, a file not there yet: the config checks name
    those)."""
    default = int(getattr(adapter, "condition_images_default", 0))
    spec = getattr(cfg.data, "train", "") or ""
    if not adapter.condition_tokens(8, 2):
        return 0, "none"
    if not spec or spec.startswith("hf:"):
        return default, "assumed"
    from ..data import load_prompts

    try:
        rows = load_prompts(spec, cfg.data.prompt_key).metadata
    except (OSError, ValueError, ImportError):
        return default, "assumed"
    counts = [
        len(v) if isinstance(v, (list, tuple)) else int(v is not None)
        for v in (row.get("image") for row in rows)
    ]
    return max([*counts, default]), "data.train"  # an edit model needs its source image in every row anyway


def estimate_memory(
    cfg,
    model_dir: str | Path | None = None,
    *,
    reward_bytes: int = 0,
    cuda: bool = False,
    num_processes: int = 1,
) -> MemoryEstimate:
    """A rough *estimate* of the peak memory of one training process: nothing is measured, and the constants below
    have not been calibrated against measured peaks, so read it as an order of magnitude with its breakdown.

    ``model_dir`` is the pipeline directory: parameter counts are read from its safetensors headers without
    loading any tensor; without it, the published sizes of a few well-known checkpoints are used
    (:class:`UnknownModelSize` for others). With ``b_w`` the bytes of ``model.dtype``, ``a`` the bytes of an
    activation (2 when the weights are 16-bit or ``mixed_precision`` is set, else 4)::

        total       = weights + trained + buffers + rewards + overhead + max(activations, text_encoders)
        weights     = P_all * b_w              (every pipeline component stays on the device; a full fine-tune
                                                keeps the transformer in float32: + P_transformer * (4 - b_w));
                                                with ``model.offload_text_encoders`` less P_text * b_w
        text_encoders = P_text * b_w with ``model.offload_text_encoders`` (on the device only while encoding
                      prompts the cache lacks, when no sampling or training activations are live), else 0
        trained     = P_train * (4 [LoRA weights, float32; 0 for full fine-tuning] + 4 [grads] + 8 [AdamW m, v;
                      2 for 8-bit Adam] + 4 [EMA, when ema_decay > 0] + 4 [DiffusionNFT's old-policy adapter])
        sharding    (several processes) ``zero_stage: 1`` divides the AdamW term by their number, ``2`` the grads
                    too; ``fsdp: true`` divides the transformer's weights and the whole trained term
                    (Wan 2.2: both experts' weights, the frozen one's too)
        buffers     = n_local * (L_txt * D_txt * b_w * g + stored latents * 4)   (the step's text embeddings,
                      g = 2 with CFG negatives, and Flow-GRPO's (T + 1) trajectory latents / the final latents)
        activations = max(train, sample)
        train       = k * c * B_t * N * d * a * (16 * blocks)     without gradient checkpointing
                    = k * c * B_t * N * d * a * (blocks + 16)     with it (block inputs + one recomputed block)
        sample      = c * B_s * N * d * a * 16 + B_dec * F_dec * H_t * W_t * C_vae * a * 3   (a block without
                                                                                  grad + VAE decode)
        overhead    = 1 GiB on CUDA (context, allocator), 0 on the CPU

    where ``P_all`` / ``P_transformer`` / ``P_train`` / ``P_text`` are all / transformer / trained / text encoder
    parameters (the components named ``text_encoder*``; the text encoders' activations while encoding, one prompt
    at a time without gradients, are not counted) (LoRA:
    ``r (in + out)`` per adapted linear; a frozen second expert, Wan 2.2's, is in ``P_all`` only, and in ``P_train``
    too with ``model.expert: both``), ``B_dec`` the videos decoded at once (``sample.batch_size``, 1 with
    ``video.vae_slicing``), ``H_t x W_t`` the pixels decoded at once per frame (``H x W``, at most the tile's
    ``video.vae_tile_size`` (256 by default) per side with ``video.vae_tiling``),
    ``N = F' H W / (f p)^2 + L_txt`` tokens (``F'`` latent frames and ``F_dec`` frames decoded at once from the
    adapter's ``memory_frames``: 1 and 1 for images, Wan's ``(F - 1) / 4 + 1`` and 4; VAE factor f, patch p, text
    tokens
    ``L_txt``, the adapter's ``memory_text_tokens``: SD3 333, FLUX 512, Qwen-Image at most 512; f and p from its
    ``vae_geometry`` and ``token_patch_size``; plus the adapter's ``condition_tokens`` times the conditioning images
    of a training row, the latent tokens of an edit model's source image or of a FLUX.2 reference image at
    ``model.condition_image_size``, times the most ``metadata["image"]`` entries a row of ``data.train`` has, the
    adapter's ``condition_images_default`` when doctor cannot read the file), ``d`` the transformer width and ``blocks`` its
    blocks (the adapter's ``transformer_geometry``), ``c = 2`` where guidance is true CFG with
    a negative prompt (SD3, Qwen-Image: a doubled batch) and the trainer samples with it,
    ``B_t = optim.train_batch_size``, ``B_s = sample.batch_size``, ``k`` = ReFL's ``grad_steps`` (else 1),
    ``n_local`` the samples of one step on one of ``num_processes`` processes, ``D_txt`` the text embedding width,
    ``C_lat F' (H / f) (W / f)`` float32 values a stored latent,
    and ``rewards`` the size of the rewards' cached weight files (``reward_bytes``).
    """
    import torch

    from ..utils import resolve_dtype

    facts = _model_facts(cfg, Path(model_dir) if model_dir is not None else None)
    m, s, o = cfg.model, cfg.sample, cfg.optim
    b_w = torch.empty((), dtype=resolve_dtype(m.dtype)).element_size()
    a = 2 if (b_w == 2 or cfg.mixed_precision != "no") else 4
    full = m.lora_rank == 0
    # Wan 2.2 with model.expert=both: both experts (the same architecture) train
    experts = 2 if getattr(m, "expert", "") == "both" else 1
    p_train = (facts["transformer"] if full else facts["lora"]) * experts

    world = max(1, int(num_processes))
    fsdp = world if cfg.fsdp and world > 1 else 1
    zero = cfg.zero_stage if world > 1 else 0
    transformer = facts["transformer"] * experts * (4 if full else b_w)
    weights = facts["params"] * b_w - facts["transformer"] * experts * b_w + transformer / fsdp
    # FSDP shards Wan 2.2's frozen expert too (each expert its own root; WanModel.shard_roots)
    frozen = max(0, facts["frozen_transformers"] - (experts - 1)) * facts["transformer"] * b_w
    weights -= frozen - frozen / fsdp
    offload = bool(m.offload_text_encoders)
    text_encoders = facts["text_encoders"] * b_w if offload else 0
    weights -= text_encoders
    adam = (2 if o.use_8bit_adam else 8) / (world if zero >= 1 else 1)
    grads = 4 / (world if zero >= 2 else 1)
    per_param = (0 if full else 4) + grads + adam
    per_param += 4 if cfg.ema_decay > 0 else 0
    per_param += 4 if cfg.algorithm == "diffusion_nft" else 0
    awm = cfg.algorithm == "awm"
    # the ema_ref adapter: for the EMA pull, and for the off-policy rollouts even without the pull
    per_param += 4 if awm and (cfg.awm.ema_kl_weight > 0 or cfg.awm.rollout_policy == "ema") else 0
    trained = p_train * per_param / fsdp

    f, p = facts["vae_factor"], facts["patch"]
    n_img = facts["latent_frames"] * (s.height // (f * p)) * (s.width // (f * p))
    l_txt = facts["text_tokens"]
    n_cond, cond_from = facts["condition_images"]
    tokens = n_img + facts["condition_tokens"] * n_cond + l_txt
    d = facts["width"]
    # CFG-free trainers (DiffusionNFT, AWM) train the conditional velocity only
    cfg_pass = facts["true_cfg"] and cfg.algorithm not in ("diffusion_nft", "awm") and s.guidance_scale > 1
    c = 2 if cfg_pass else 1
    k = cfg.refl.grad_steps if cfg.algorithm == "refl" else 1
    k = 2 if cfg.algorithm == "dpo" else k  # a DPO pass holds the chosen and the rejected rows of each pair
    if awm and cfg.awm.rollout_policy == "ema" and cfg.awm.ratio == "sample":
        # a micro-batch's level passes are held for the sample ratio's backward
        k = cfg.awm.num_train_timesteps
    per_sample = c * tokens * d * a
    if m.gradient_checkpointing:
        train_act = k * o.train_batch_size * per_sample * (facts["blocks"] + _ACT_PER_BLOCK)
    else:
        train_act = k * o.train_batch_size * per_sample * _ACT_PER_BLOCK * facts["blocks"]
    sample_act = s.batch_size * per_sample * _ACT_PER_BLOCK
    # a video VAE (video.vae_tiling: one tile of the frame at a time; video.vae_slicing: one video at a time)
    v = cfg.video
    tile = (v.vae_tile_size or 256) if v.vae_tiling else max(s.height, s.width)
    vae_pixels = facts["decoded_frames"] * min(s.height, tile) * min(s.width, tile)
    decoded_at_once = 1 if v.vae_slicing else s.batch_size
    sample_act += decoded_at_once * vae_pixels * facts["vae_channels"] * a * _VAE_PER_PIXEL

    latent = facts["latent_channels"] * facts["latent_frames"] * (s.height // f) * (s.width // f) * 4
    if cfg.algorithm == "flow_grpo":
        g = cfg.flow_grpo
        n_local, stored = g.prompts_per_step // world * g.group_size, (s.num_steps + 1) * latent
    elif cfg.algorithm == "diffusion_nft":
        n = cfg.diffusion_nft
        n_local, stored = n.prompts_per_step // world * n.group_size, latent
    elif cfg.algorithm == "awm":
        n_local, stored = cfg.awm.prompts_per_step // world * cfg.awm.group_size, latent
    elif cfg.algorithm == "dpo":
        d = cfg.dpo
        online = d.mode == "online"
        n_local = d.prompts_per_step // world * d.group_size if online else 2 * (d.pairs_per_step // world)
        stored = latent
    else:
        n_local, stored = cfg.refl.prompts_per_step // world, latent
    buffers = n_local * (l_txt * facts["text_width"] * b_w * (2 if cfg_pass else 1) + stored)

    notes = [f"{n_local} samples a step on each of {world} process(es)"]
    if offload:
        notes.append(
            f"text encoders offloaded ({gib(text_encoders)}): on the device only while encoding, so the peak is the "
            f"larger of the encoding moment (+{gib(text_encoders)}) and the training step "
            f"(+{gib(max(train_act, sample_act))} activations)"
        )
    if cond_from == "data.train":
        notes.append(
            f"{n_cond} conditioning image(s) a row (the most in data.train) x {facts['condition_tokens']} tokens"
        )
    elif cond_from == "assumed":
        notes.append(
            f"{n_cond} conditioning image(s) a row x {facts['condition_tokens']} tokens assumed (data.train not "
            f"read: each of its rows' metadata images adds as many tokens)"
        )
    if fsdp > 1:
        notes.append(f"FSDP: transformer and trained tensors / {world}")
    elif zero:
        notes.append(f"ZeRO-{zero}: AdamW states{' and grads' if zero == 2 else ''} / {world}")
    return MemoryEstimate(
        weights=int(weights),
        trained=int(trained),
        buffers=int(buffers),
        activations=int(max(train_act, sample_act)),
        rewards=int(reward_bytes),
        overhead=GiB if cuda else 0,
        params=int(facts["params"]),
        trainable_params=int(p_train),
        source=facts["source"],
        notes=notes,
        train_activations=int(train_act),
        sample_activations=int(sample_act),
        text_encoders=int(text_encoders),
        video=bool(facts["video"]),
    )


def _device_capacity(device: str) -> tuple[int, str] | None:
    """``(bytes, name)`` of the GPU's total memory, or None on the CPU (nothing to compare with)."""
    import torch

    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return None
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return int(props.total_memory), f"{props.name} (cuda:{index})"


def _memory_fix(cfg, video: bool = False) -> str:
    m, o = cfg.model, cfg.optim
    steps = []
    if video and not (cfg.video.vae_tiling and cfg.video.vae_slicing):
        steps.append(
            "decode videos in tiles and one at a time (video.vae_tiling=true, video.vae_slicing=true)"
        )
    if not m.gradient_checkpointing:
        steps.append("set model.gradient_checkpointing=true")
    if m.dtype == "float32":
        steps.append("use model.dtype=bfloat16")
    if m.lora_rank == 0:
        steps.append("train a LoRA (model.lora_rank=32)")
        if cfg.zero_stage < 2 and not cfg.fsdp:
            steps.append(
                "shard it over several GPUs (fsdp=true, or zero_stage=2 for the gradients and AdamW states)"
            )
    if o.train_batch_size > 1 or cfg.sample.batch_size > 1:
        steps.append("lower optim.train_batch_size and sample.batch_size")
    steps.append("or use a GPU with more memory")
    return ", ".join(steps[:-1]).capitalize() + (", " if len(steps) > 1 else "") + steps[-1] + "."


def check_memory(
    cfg, location: ModelLocation | None, reward_bytes: int, uncached: list[str], device: str
) -> Finding:
    try:
        root = location.directory() if location is not None and location.available else None
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        est = estimate_memory(
            cfg, root, reward_bytes=reward_bytes, cuda=device.startswith("cuda"), num_processes=world
        )
    except UnknownModelSize:
        return Finding(
            "memory",
            "WARN",
            f"cannot estimate: the weights of {cfg.model.path} are not present offline and its size is not known",
            "Download the model first (see the model check), then run doctor again.",
        )
    except (OSError, ValueError, KeyError) as err:
        return Finding(
            "memory",
            "WARN",
            f"cannot estimate: {err.__class__.__name__}: {err}",
            "Check that the model directory holds complete config.json and safetensors files.",
        )
    train_kind = "full fine-tuning" if cfg.model.lora_rank == 0 else "LoRA"
    offloaded = " less the offloaded text encoders" if est.text_encoders else ""
    parts = [
        f"weights {gib(est.weights)} ({count(est.params)} params at {cfg.model.dtype}{offloaded})",
        f"trained {gib(est.trained)} ({count(est.trainable_params)} {train_kind} params, grads, AdamW)",
        f"buffers {gib(est.buffers)}",
        f"activations {gib(est.activations)}"
        if not est.text_encoders
        else f"max(activations {gib(est.activations)}, text encoders while encoding {gib(est.text_encoders)})",
    ]
    if est.rewards:
        parts.append(f"rewards {gib(est.rewards)}")
    if est.overhead:
        parts.append(f"CUDA overhead {gib(est.overhead)}")
    notes = list(est.notes)
    if uncached:
        notes.append(f"not counted: the weights of {', '.join(uncached)} (not cached)")
    msg = (
        f"estimated peak ~{gib(est.total)} a process = {' + '.join(parts)}; {'; '.join(notes)}; "
        f"from {est.source}; an estimate, not a measurement"
    )
    capacity = _device_capacity(device)
    if capacity is None:
        return Finding("memory", "OK", msg + f"; no GPU on {device} to compare with")
    total, what = capacity
    share = est.total / total
    msg += f"; {share:.0%} of {gib(total)} on {what}"
    if share > 1.0:
        return Finding("memory", "FAIL", msg, _memory_fix(cfg, est.video))
    if share > 0.85:
        return Finding("memory", "WARN", msg + " (little headroom)", _memory_fix(cfg, est.video))
    return Finding("memory", "OK", msg)
