"""Adapter for Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): MMDiT velocity with classifier-free guidance."""

from __future__ import annotations

import torch

from ..samplers import sigmas_from_scheduler_config
from .base import Conditioning, FlowModel

__all__ = ["SD3Model"]

# Joint-attention projections of every MMDiT block (the Flow-GRPO / DiffusionNFT reference targets).
SD3_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]


class SD3Model(FlowModel):
    """SD3 / SD3.5: latents ``(B, 16, H/8, W/8)``, CFG ``v = v_u + w (v_c - v_u)`` in one batched pass."""

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    default_lora_rank = 32
    default_lora_alpha = 64
    default_lora_targets = SD3_LORA_TARGETS

    def __init__(self, pipe, *, max_sequence_length: int = 256, prompt_cache_size: int = 4096):
        super().__init__(pipe, prompt_cache_size=prompt_cache_size)
        self.max_sequence_length = max_sequence_length

    def _unused_lora_modules(self) -> list[str]:
        # The last MMDiT block is "context pre-only": its text-token queries are computed but their attention
        # output is discarded, so a LoRA there would never receive a gradient.
        names = []
        for i, block in enumerate(self.transformer.transformer_blocks):
            if getattr(block, "context_pre_only", False):
                names.append(f"transformer_blocks.{i}.attn.add_q_proj")
        return names

    def _encode_uncached(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        embeds, pooled = embeds.to(self.dtype), pooled.to(self.dtype)
        return [(embeds[i], pooled[i]) for i in range(len(prompts))]

    def _assemble(self, rows, negative_rows):
        cond = Conditioning(
            prompt_embeds=torch.stack([r[0] for r in rows]),
            pooled=torch.stack([r[1] for r in rows]),
        )
        if negative_rows is not None:
            cond.negative_prompt_embeds = torch.stack([r[0] for r in negative_rows])
            cond.negative_pooled = torch.stack([r[1] for r in negative_rows])
        return cond

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self._check_size(height, width, self.vae_scale_factor * self.patch_size)
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline's levels for ``num_steps`` at this resolution (static shift unless the scheduler shifts
        by resolution)."""
        _, h, w = self.latent_shape(height, width)
        seq = (h // self.patch_size) * (w // self.patch_size)
        return sigmas_from_scheduler_config(
            self.scheduler_config, num_steps, image_seq_len=seq, device=self.device
        )

    def velocity(
        self, x: torch.Tensor, sigma, cond: Conditioning, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Velocity ``(B, C, h, w)`` in the model's dtype; CFG when ``guidance_scale > 1`` (as the pipeline does)."""
        batch = x.shape[0]
        if len(cond) != batch:
            raise ValueError(
                f"cond holds {len(cond)} prompts but x has batch {batch}; encode one prompt per sample."
            )
        t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch) * 1000
        hidden = x.to(self.dtype)
        embeds, pooled = cond.prompt_embeds, cond.pooled
        cfg = guidance_scale > 1
        if cfg:
            if cond.negative_prompt_embeds is None:
                raise ValueError(
                    "guidance_scale > 1 needs negative embeddings; encode with negative_prompt='' (the default)."
                )
            hidden = torch.cat([hidden, hidden])
            t = torch.cat([t, t])
            embeds = torch.cat([cond.negative_prompt_embeds, embeds])
            pooled = torch.cat([cond.negative_pooled, pooled])
        out = self.transformer(
            hidden_states=hidden,
            timestep=t,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if cfg:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        return out
