"""Adapter for Qwen-Image (``QwenImagePipeline``): Qwen2.5-VL prompt embeddings with a mask, packed 2x2 latent
tokens, a resolution-dependent schedule stretched to ``shift_terminal``, true CFG with a norm-preserving rescale,
and a 3-D (video-style) VAE whose latents are normalised per channel."""

from __future__ import annotations

import torch

from ..samplers import sigmas_from_scheduler_config
from .base import Conditioning, FlowModel, masked_prompt_conditioning
from .flux import pack_latents, unpack_latents

__all__ = ["QwenImageModel", "QWEN_IMAGE_LORA_TARGETS"]

# The attention projections of every dual-stream block, image and text streams.
QWEN_IMAGE_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]


class QwenImageModel(FlowModel):
    """Qwen-Image: latents ``(B, 16, H/8, W/8)`` handled unpacked (the pipeline's are ``(B, 1, 16, H/8, W/8)``,
    packed into 2x2 tokens); true CFG ``v = v_u + w (v_c - v_u)`` rescaled per token to the conditional
    prediction's norm, as the pipeline does when ``true_cfg_scale > 1`` and a negative prompt is given.

    Prompts are encoded one at a time (and cached), each to its own number of tokens; a batch is zero-padded to its
    longest prompt, with ``prompt_mask`` marking the real tokens (the transformer masks the padding out of its
    attention). ``guidance_scale`` is ``true_cfg_scale``; ``encode(..., negative_prompt=None)`` turns CFG off.
    """

    family = "qwen_image"
    pipeline_class_name = "QwenImagePipeline"
    uses_negative_prompt = True
    default_num_steps = 50  # QwenImagePipeline's defaults (true_cfg_scale 4 with a negative prompt)
    default_guidance_scale = 4.0
    default_lora_rank = 64
    default_lora_alpha = 128
    default_lora_targets = QWEN_IMAGE_LORA_TARGETS
    # The pipeline pads a batch to its longest prompt, at most max_sequence_length (512): the estimate's upper bound.
    memory_text_tokens = 512

    @classmethod
    def vae_geometry(cls, vae_config: dict) -> tuple[int, int, int]:
        """AutoencoderKLQwenImage: one spatial halving per ``temperal_downsample`` entry, full-resolution decoder
        blocks of ``base_dim * dim_mult[0]`` channels, ``z_dim`` latent channels."""
        factor = 2 ** len(vae_config["temperal_downsample"])
        channels = int(vae_config["base_dim"]) * int(vae_config["dim_mult"][0])
        return factor, channels, int(vae_config["z_dim"])

    @classmethod
    def unused_lora_modules_in(cls, transformer_config: dict) -> list[str]:
        # The last block's text stream is computed but dropped (the model outputs the image tokens only): a LoRA
        # on its text queries or its text output projection would never receive a gradient.
        last = int(transformer_config["num_layers"]) - 1
        return [f"transformer_blocks.{last}.attn.add_q_proj", f"transformer_blocks.{last}.attn.to_add_out"]

    def __init__(self, pipe, *, max_sequence_length: int = 512, prompt_cache_size: int = 4096):
        super().__init__(pipe, prompt_cache_size=prompt_cache_size)
        if not 0 < max_sequence_length <= 1024:
            raise ValueError(
                f"max_sequence_length={max_sequence_length!r} must be in 1..1024 for Qwen-Image."
            )
        self.max_sequence_length = max_sequence_length

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    @property
    def native_size(self) -> int:
        """The pipeline's default image size in pixels (``default_sample_size`` latents)."""
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    def _unused_lora_modules(self) -> list[str]:
        return self.unused_lora_modules_in(dict(self.transformer.config))

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, prompts):
        rows = []
        for prompt in prompts:
            embeds, _ = self.pipe.encode_prompt(
                prompt=[prompt], device=self.device, max_sequence_length=self.max_sequence_length
            )
            rows.append((embeds[0].to(self.dtype),))
        return rows

    def _assemble(self, rows, negative_rows):
        return masked_prompt_conditioning(rows, negative_rows)

    # ------------------------------------------------------------------ latents
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        self._check_size(height, width, f * 2)
        return (self.transformer.config.in_channels // 4, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline's levels: ``linspace(1, 1/T, T)`` shifted by ``mu`` from the image token count, then
        stretched so the last level before 0 is the scheduler's ``shift_terminal``."""
        _, h, w = self.latent_shape(height, width)
        return sigmas_from_scheduler_config(
            self.scheduler_config,
            num_steps,
            image_seq_len=(h // 2) * (w // 2),
            flux_base_sigmas=True,
            device=self.device,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1], float32, differentiable (the pipeline's
        de-normalisation ``z * std + mean`` per channel, decoded as a one-frame video)."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype).unsqueeze(2)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        images = self.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> latents ``(B, C, h, w)`` in float32, the inverse of :meth:`decode`:
        the posterior mean of the one-frame video, normalised ``(z - mean) / std`` per channel; no gradient."""
        cfg = self.vae.config
        with torch.no_grad():
            x = (images.to(self.vae.device, self.vae.dtype) * 2 - 1).unsqueeze(2)
            with self.vae_lock:
                z = self.vae.encode(x).latent_dist.mode()
            mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            return ((z - mean) / std)[:, :, 0].float()

    # ------------------------------------------------------------------ velocity
    def _transformer(self, hidden, t, embeds, mask, h, w, cond: Conditioning | None = None):
        if mask is not None and bool(mask.all()):
            mask = None  # as the pipeline: no mask when no prompt of the batch is padded
        shapes = [(1, h // 2, w // 2)]
        n = hidden.shape[1]
        # Qwen-Image-Edit: the source image's latent tokens follow the noisy ones
        if cond is not None and cond.image_latents is not None:
            extra = cond.image_latents.to(hidden.dtype)
            if bool((cond.image_grid != cond.image_grid[:1]).any()):
                raise ValueError(
                    "the source images of one batch have different condition sizes; batch them apart."
                )
            if hidden.shape[0] == 2 * extra.shape[0]:  # both CFG passes in one batch
                extra = torch.cat([extra, extra])
            hidden = torch.cat([hidden, extra], dim=1)
            # one (rows, columns) token grid per source image, in the order of their tokens
            shapes.extend((1, int(r), int(c)) for r, c in cond.image_grid[0].reshape(-1, 2))
        out = self.transformer(
            hidden_states=hidden,
            timestep=t / 1000,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[shapes] * hidden.shape[0],
            return_dict=False,
        )[0]
        return out[:, :n]

    def velocity(
        self,
        x: torch.Tensor,
        sigma,
        cond: Conditioning,
        guidance_scale: float = 4.0,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Velocity ``(B, C, h, w)`` in the model's dtype; true CFG when ``guidance_scale > 1`` and ``cond`` holds
        negative embeddings (as the pipeline: conditional and unconditional predictions combined, then each packed
        token rescaled to the conditional prediction's norm). Both passes run as one batch, the shorter context
        zero-padded and masked.

        ``detach_uncond=True`` stops the gradient through the unconditional prediction."""
        batch, _, h, w = x.shape
        if len(cond) != batch:
            raise ValueError(
                f"cond holds {len(cond)} prompts but x has batch {batch}; encode one prompt per sample."
            )
        hidden = pack_latents(x.to(self.dtype))
        # As QwenImagePipeline: the timestep 1000 * s in the latents' dtype, divided by 1000.
        t = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch) * 1000).to(
            hidden.dtype
        )
        embeds, mask = cond.prompt_embeds, cond.prompt_mask
        cfg = guidance_scale > 1 and cond.negative_prompt_embeds is not None
        if not cfg:
            return unpack_latents(self._transformer(hidden, t, embeds, mask, h, w, cond), h, w)
        neg, neg_mask = cond.negative_prompt_embeds, cond.negative_prompt_mask
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if neg_mask is None:
            neg_mask = torch.ones(neg.shape[:2], dtype=torch.long, device=neg.device)
        both = Conditioning.cat(
            [
                Conditioning(prompt_embeds=neg, pooled=neg[:, 0, :0], prompt_mask=neg_mask),
                Conditioning(prompt_embeds=embeds, pooled=embeds[:, 0, :0], prompt_mask=mask),
            ]
        )
        out = self._transformer(
            torch.cat([hidden, hidden]), torch.cat([t, t]), both.prompt_embeds, both.prompt_mask, h, w, cond
        )
        uncond, text = out.chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        combined = uncond + guidance_scale * (text - uncond)
        out = combined * (torch.norm(text, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return unpack_latents(out, h, w)
