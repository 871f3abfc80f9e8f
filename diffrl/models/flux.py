"""Adapter for FLUX.1 (``FluxPipeline``): packed 2x2 latent tokens, rotary position ids, guidance embedding."""

from __future__ import annotations

import torch

from ..samplers import sigmas_from_scheduler_config
from .base import Conditioning, FlowModel

__all__ = ["FluxModel", "pack_latents", "unpack_latents", "latent_image_ids"]

# Attention projections of the double-stream blocks, their feed-forward layers, and the single-stream blocks'
# attention and MLP projections (a regular expression, matched in full against module names by PEFT).
FLUX_LORA_TARGETS = (
    r".*(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out))"
)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``: each 2x2 patch becomes one token (FLUX's layout)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``(B, h/2 * w/2, 4C)`` -> ``(B, C, h, w)``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids ``(h/2 * w/2, 3)`` of the packed image tokens: ``(0, row, column)``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxModel(FlowModel):
    """FLUX.1 dev/schnell: latents ``(B, 16, H/8, W/8)`` handled unpacked; guidance through the guidance
    embedding when the transformer has one (dev), none otherwise (schnell). No classifier-free guidance pass."""

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    guidance_is_cfg = False  # the guidance embedding (dev) is not classifier-free guidance
    default_num_steps = 28  # FluxPipeline's defaults
    default_guidance_scale = 3.5
    default_lora_rank = 64
    default_lora_alpha = 128
    default_lora_targets = FLUX_LORA_TARGETS
    memory_text_tokens = 512  # T5 tokens (the pipeline's max_sequence_length)

    def __init__(self, pipe, *, max_sequence_length: int = 512, prompt_cache_size: int = 4096):
        super().__init__(pipe, prompt_cache_size=prompt_cache_size)
        self.max_sequence_length = max_sequence_length

    def _encode_uncached(self, prompts):
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        embeds, pooled = embeds.to(self.dtype), pooled.to(self.dtype)
        return [(embeds[i], pooled[i], text_ids) for i in range(len(prompts))]

    def _assemble(self, rows, negative_rows):
        return Conditioning(
            prompt_embeds=torch.stack([r[0] for r in rows]),
            pooled=torch.stack([r[1] for r in rows]),
            text_ids=rows[0][2],
        )

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def native_size(self) -> int:
        """The pipeline's default image size in pixels (``default_sample_size`` latents)."""
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        self._check_size(height, width, f * 2)
        return (self.transformer.config.in_channels // 4, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline's levels: ``linspace(1, 1/T, T)`` shifted by ``mu`` from the image token count."""
        _, h, w = self.latent_shape(height, width)
        return sigmas_from_scheduler_config(
            self.scheduler_config,
            num_steps,
            image_seq_len=(h // 2) * (w // 2),
            flux_base_sigmas=True,
            device=self.device,
        )

    def velocity(
        self,
        x: torch.Tensor,
        sigma,
        cond: Conditioning,
        guidance_scale: float = 3.5,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Velocity ``(B, C, h, w)`` in the model's dtype (FLUX.1's guidance is an embedding, not CFG, so
        ``detach_uncond`` has nothing to detach)."""
        batch, _, h, w = x.shape
        if len(cond) != batch:
            raise ValueError(
                f"cond holds {len(cond)} prompts but x has batch {batch}; encode one prompt per sample."
            )
        hidden = pack_latents(x.to(self.dtype))
        # As FluxPipeline: the timestep 1000 * s in the latents' dtype, divided by 1000.
        t = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch) * 1000).to(
            hidden.dtype
        )
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), dtype=torch.float32, device=x.device)
        out = self.transformer(
            hidden_states=hidden,
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=cond.text_ids,
            img_ids=latent_image_ids(h, w, device=x.device, dtype=hidden.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)
