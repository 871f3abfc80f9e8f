"""Adapter for Z-Image and Z-Image-Turbo (``ZImagePipeline``): a single-stream DiT fed the second-to-last hidden
state of a Qwen3 text encoder (one variable-length embedding per prompt, no padding), FLUX.1-VAE latents, a
static-shift schedule on ``linspace(1, 1/T, T)``, and classifier-free guidance ``v_c + g (v_c - v_u)``.

Sources: diffusers' ``pipelines/z_image/pipeline_z_image.py`` and ``models/transformers/transformer_z_image.py``
(Z-Image technical report, arXiv:2511.22699: S3-DiT, Qwen3-4B text encoder, Decoupled-DMD distilled Turbo).

Departures from the pipeline: guidance is expressed as the usual CFG weight ``w`` (``w = 1``: no guidance), so
``guidance_scale = w`` here is the pipeline's ``guidance_scale + 1``; the pipeline's optional
``cfg_normalization`` and ``cfg_truncation`` (both off by default) are not implemented.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..samplers import sigmas_from_scheduler_config
from .base import Conditioning, FlowModel, masked_prompt_conditioning

__all__ = ["ZImageModel", "Z_IMAGE_LORA_TARGETS"]

# Attention projections and SwiGLU feed-forward layers of every block: the main single-stream layers and the
# noise / context refiners (a regular expression, matched in full against module names by PEFT).
Z_IMAGE_LORA_TARGETS = (
    r".*(?:layers|noise_refiner|context_refiner)\.\d+\."
    r"(?:attention\.(?:to_q|to_k|to_v|to_out\.0)|feed_forward\.(?:w1|w2|w3))"
)


class ZImageModel(FlowModel):
    """Z-Image: latents ``(B, 16, H/8, W/8)`` (the pipeline's own layout; the transformer patchifies them 2x2).

    The transformer predicts ``-v`` at the time ``1 - s``: :meth:`velocity` returns the pipeline's ``noise_pred``
    (``v = -out``), so a plain Euler step ``x + (s' - s) v`` is the pipeline's ``scheduler.step``.

    Prompts are encoded one at a time (and cached), each to its own number of tokens (the pipeline keeps only the
    unmasked tokens); a batch is zero-padded to its longest prompt with ``prompt_mask`` marking the real tokens, and
    each prompt's own tokens are handed to the transformer, as the pipeline does.

    Guidance: ``guidance_scale = w`` with ``v = v_c + (w - 1)(v_c - v_u)``, the pipeline's formula for its
    ``guidance_scale = w - 1``; ``w <= 1`` or ``encode(..., negative_prompt=None)`` turns CFG off. Defaults follow
    ``ZImagePipeline`` (50 steps, its guidance 5, so ``w = 6``); Z-Image-Turbo (``turbo=True``, or a checkpoint
    whose path names "turbo") samples with 9 steps and no CFG (``w = 1``), as its model card does.
    """

    family = "z_image"
    pipeline_class_name = "ZImagePipeline"
    uses_negative_prompt = True
    guidance_is_cfg = True
    default_num_steps = 50  # ZImagePipeline's defaults: 50 steps, guidance_scale 5.0 (w = 6 here)
    default_guidance_scale = 6.0
    turbo_num_steps = 9  # Z-Image-Turbo's model card: 9 steps, guidance_scale 0.0 (w = 1: no CFG)
    turbo_guidance_scale = 1.0
    default_lora_rank = 32
    default_lora_alpha = 32
    default_lora_targets = Z_IMAGE_LORA_TARGETS
    # FSDP2 shards the refiners' blocks and the main layers (Omni's siglip_refiner too, where it exists)
    shard_block_lists = ("noise_refiner", "context_refiner", "siglip_refiner", "layers")
    # The pipeline keeps each prompt's real tokens, at most max_sequence_length (512): the estimate's upper bound.
    memory_text_tokens = 512

    @classmethod
    def token_patch_size(cls, transformer_config: dict) -> int:
        """The image patch of ``all_patch_size`` (the pipeline's first, 2 in the released checkpoints)."""
        return int(transformer_config.get("all_patch_size", [2])[0])

    @classmethod
    def transformer_geometry(cls, transformer_config: dict) -> tuple[int, int, int]:
        """``(dim, n_layers + n_refiner_layers, cap_feat_dim)``: the noise refiner (image tokens) and the context
        refiner (text tokens) run side by side before the main layers, so together they count as
        ``n_refiner_layers`` blocks over all the tokens."""
        c = transformer_config
        blocks = int(c["n_layers"]) + int(c.get("n_refiner_layers", 0))
        return int(c["dim"]), blocks, int(c["cap_feat_dim"])

    def __init__(
        self,
        pipe,
        *,
        max_sequence_length: int = 512,
        prompt_cache_size: int = 4096,
        turbo: bool | None = None,
    ):
        super().__init__(pipe, prompt_cache_size=prompt_cache_size)
        if not isinstance(max_sequence_length, int) or not 0 < max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be in 1..1024 for Z-Image.")
        self.max_sequence_length = max_sequence_length
        if turbo is None:
            turbo = "turbo" in Path(str(getattr(pipe, "name_or_path", "") or "")).name.lower()
        self.turbo = bool(turbo)
        if self.turbo:
            self.default_num_steps = self.turbo_num_steps
            self.default_guidance_scale = self.turbo_guidance_scale

    @property
    def native_size(self) -> int:
        """The pipeline's default image size in pixels (1024)."""
        return 1024

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, prompts):
        rows = []
        for prompt in prompts:
            embeds, _ = self.pipe.encode_prompt(
                prompt=[prompt],
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            rows.append((embeds[0].to(self.dtype),))
        return rows

    def _assemble(self, rows, negative_rows):
        return masked_prompt_conditioning(rows, negative_rows)

    @staticmethod
    def _unpad(embeds: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        if mask is None:
            return list(embeds.unbind(0))
        return [e[: int(m.sum())] for e, m in zip(embeds, mask, strict=True)]

    # ------------------------------------------------------------------ latents
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        self._check_size(height, width, f * 2)
        return (self.transformer.config.in_channels, height // f, width // f)

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline's levels: ``torch.linspace(1, 1/T, T)`` shifted as the scheduler's config says (Z-Image and
        Z-Image-Turbo: the static shift 3; a config with dynamic shifting: ``mu`` from the image token count)."""
        _, h, w = self.latent_shape(height, width)
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} must be a positive integer.")
        return sigmas_from_scheduler_config(
            self.scheduler_config,
            num_steps,
            image_seq_len=(h // 2) * (w // 2),
            base_sigmas=torch.linspace(1.0, 1 / num_steps, num_steps).tolist(),
            device=self.device,
        )

    # ------------------------------------------------------------------ velocity
    def _transformer(self, x: torch.Tensor, t: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
        out = self.transformer(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
        return torch.stack(out).squeeze(2)

    def velocity(
        self,
        x: torch.Tensor,
        sigma,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Velocity ``(B, C, h, w)``: minus the transformer's output at time ``1 - s``; with CFG (``guidance_scale >
        1`` and negative embeddings in ``cond``) ``v_c + (w - 1)(v_c - v_u)`` in float32 as the pipeline computes it,
        both passes in one batch. ``detach_uncond=True`` stops the gradient through the unconditional prediction."""
        batch = x.shape[0]
        if len(cond) != batch:
            raise ValueError(
                f"cond holds {len(cond)} prompts but x has batch {batch}; encode one prompt per sample."
            )
        latents = x.to(self.dtype)
        # As ZImagePipeline: the scheduler's timestep 1000 * s (float32), turned into the model time (1000 - t) / 1000.
        t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch) * 1000
        t = (1000 - t) / 1000
        caps = self._unpad(cond.prompt_embeds, cond.prompt_mask)
        cfg = guidance_scale > 1 and cond.negative_prompt_embeds is not None
        if not cfg:
            return -self._transformer(latents, t, caps).float()
        negs = self._unpad(cond.negative_prompt_embeds, cond.negative_prompt_mask)
        out = self._transformer(torch.cat([latents, latents]), torch.cat([t, t]), caps + negs).float()
        pos, neg = out[:batch], out[batch:]
        if detach_uncond:
            neg = neg.detach()
        return -(pos + (guidance_scale - 1) * (pos - neg))
