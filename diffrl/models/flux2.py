"""Adapters for FLUX.2: ``Flux2Pipeline`` (FLUX.2 [dev]: Mistral-3 prompt embeddings, guidance as an embedding) and
``Flux2KleinPipeline`` (FLUX.2 [klein]: Qwen3 prompt embeddings, true CFG against the empty prompt on the base
models, none on the step-distilled ones).

Both share the transformer (``Flux2Transformer2DModel``), the VAE (``AutoencoderKLFlux2``, whose latents are
2x2-patchified and normalised by the VAE's batch-norm statistics) and the schedule (``linspace(1, 1/T, T)`` shifted by
an empirical ``mu`` that depends on the image token count *and* the step count). Sources: diffusers'
``pipelines/flux2/pipeline_flux2.py`` and ``pipeline_flux2_klein.py`` (``compute_empirical_mu``, ``_patchify_latents``,
``_pack_latents``, ``_prepare_text_ids``/``_prepare_latent_ids``), ``models/transformers/transformer_flux2.py``.

Departures from the pipelines: the prompt-upsampling option of ``Flux2Pipeline`` (``caption_upsample_temperature``)
and image conditioning (reference images) are not supported; Klein's CFG batches the conditional and unconditional
passes (the pipeline runs two forward passes: equal within float rounding).
"""

from __future__ import annotations

import torch

from ..samplers import sigmas_from_scheduler_config
from .base import Conditioning, FlowModel

__all__ = ["Flux2Model", "Flux2KleinModel", "FLUX2_LORA_TARGETS", "flux2_empirical_mu"]

# Attention projections and feed-forward layers of the double-stream blocks (image and text streams), and the fused
# QKV+MLP input and output projections of the single-stream blocks (a regular expression, matched in full by PEFT).
FLUX2_LORA_TARGETS = (
    r".*(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(?:to_qkv_mlp_proj|to_out))"
)


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's dynamic shift ``mu``: two lines in the token count fitted at 10 and 200 steps, interpolated linearly in
    the step count (above 4300 tokens, the 200-step line alone), as diffusers' ``compute_empirical_mu``."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


class Flux2Model(FlowModel):
    """FLUX.2 [dev]: latents ``(B, 4C, H/16, W/16)`` in the pipeline's own space (the VAE's ``C = 32`` channels
    patchified 2x2 and batch-normalised; each position is one transformer token); the guidance scale enters the
    transformer as an embedding (no CFG pass). Prompt embeddings are the text encoder's hidden states at three layers,
    concatenated per token, for all ``max_sequence_length`` (padded) tokens, as the pipeline feeds them."""

    family = "flux2"
    pipeline_class_name = "Flux2Pipeline"
    guidance_is_cfg = False  # the guidance embedding is not classifier-free guidance
    uses_negative_prompt = False
    default_num_steps = 50  # Flux2Pipeline's defaults
    default_guidance_scale = 4.0
    default_lora_rank = 64
    default_lora_alpha = 64
    default_lora_targets = FLUX2_LORA_TARGETS
    # Every prompt is padded to max_sequence_length (512) tokens, as the pipelines feed them.
    memory_text_tokens = 512

    def __init__(self, pipe, *, max_sequence_length: int = 512, prompt_cache_size: int = 4096):
        super().__init__(pipe, prompt_cache_size=prompt_cache_size)
        if not isinstance(max_sequence_length, int) or not 0 < max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be in 1..1024 for FLUX.2.")
        self.max_sequence_length = max_sequence_length

    @property
    def native_size(self) -> int:
        """The pipeline's default image size in pixels (``default_sample_size`` latents)."""
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, prompts):
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return [(e.to(self.dtype),) for e in embeds]

    def _assemble(self, rows, negative_rows):
        embeds = torch.stack([r[0] for r in rows])
        cond = Conditioning(prompt_embeds=embeds, pooled=embeds.new_zeros(len(rows), 0))
        if negative_rows is not None:
            neg = torch.stack([r[0] for r in negative_rows])
            cond.negative_prompt_embeds = neg
            cond.negative_pooled = neg.new_zeros(len(rows), 0)
        return cond

    # ------------------------------------------------------------------ latents
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        self._check_size(height, width, f * 2)
        return (self.transformer.config.in_channels, height // (2 * f), width // (2 * f))

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The pipeline's levels: ``linspace(1, 1/T, T)`` time-shifted by :func:`flux2_empirical_mu` of the token
        count and ``T`` (static shift instead if the scheduler's config turns dynamic shifting off)."""
        _, h, w = self.latent_shape(height, width)
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} must be a positive integer.")
        return sigmas_from_scheduler_config(
            self.scheduler_config,
            num_steps,
            image_seq_len=h * w,
            flux_base_sigmas=True,
            mu=flux2_empirical_mu(h * w, num_steps),
            device=self.device,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, 4C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1], float32, differentiable: the batch-norm
        statistics undone, the 2x2 patches unfolded to ``(B, C, 2h, 2w)``, then the VAE decoder (as the pipeline)."""
        bn = self.vae.bn
        z = latents.to(self.vae.dtype)
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            z.device, z.dtype
        )
        z = z * std + mean
        b, c4, h, w = z.shape
        z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ velocity
    @staticmethod
    def _ids(batch: int, h: int, w: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids ``(t, h, w, l)``: ``(0, row, col, 0)`` per image token, ``(0, 0, 0, i)`` per text token."""
        one = torch.arange(1)
        img = torch.cartesian_prod(one, torch.arange(h), torch.arange(w), one)
        txt = torch.cartesian_prod(one, one, one, torch.arange(length))
        return img.expand(batch, -1, -1).to(device), txt.expand(batch, -1, -1).to(device)

    def _transformer(self, tokens, t, embeds, guidance, h, w):
        img_ids, txt_ids = self._ids(tokens.shape[0], h, w, embeds.shape[1], tokens.device)
        return self.transformer(
            hidden_states=tokens,
            timestep=t / 1000,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0][:, : h * w]

    def _prepare(self, x, sigma, cond):
        batch, c, h, w = x.shape
        if len(cond) != batch:
            raise ValueError(
                f"cond holds {len(cond)} prompts but x has batch {batch}; encode one prompt per sample."
            )
        tokens = x.to(self.dtype).reshape(batch, c, h * w).permute(0, 2, 1)
        # As the pipelines: the timestep 1000 * s in the latents' dtype, divided by 1000.
        t = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch) * 1000).to(
            tokens.dtype
        )
        return tokens, t

    @staticmethod
    def _unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def velocity(
        self,
        x: torch.Tensor,
        sigma,
        cond: Conditioning,
        guidance_scale: float = 4.0,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Velocity ``(B, 4C, h, w)`` in the model's dtype, the guidance scale embedded (``detach_uncond`` has
        nothing to detach)."""
        _, _, h, w = x.shape
        tokens, t = self._prepare(x, sigma, cond)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((x.shape[0],), float(guidance_scale), dtype=torch.float32, device=x.device)
        return self._unpack(self._transformer(tokens, t, cond.prompt_embeds, guidance, h, w), h, w)


class Flux2KleinModel(Flux2Model):
    """FLUX.2 [klein] (4B / 9B, Qwen3 text encoder): as :class:`Flux2Model` without a guidance embedding; the base
    models use true CFG ``v_u + w (v_c - v_u)`` against the empty prompt when ``guidance_scale > 1`` (the pipeline's
    defaults: 50 steps, ``w = 4``); the step-distilled ones (``is_distilled`` in the pipeline's config) never do CFG
    and sample with 4 steps (their model cards' settings, ``w = 1``)."""

    family = "flux2_klein"
    pipeline_class_name = "Flux2KleinPipeline"
    guidance_is_cfg = True
    uses_negative_prompt = True
    default_num_steps = 50  # Flux2KleinPipeline's defaults (base models)
    default_guidance_scale = 4.0
    distilled_num_steps = 4  # FLUX.2 [klein] 4B / 9B model cards: 4 steps, guidance 1
    distilled_guidance_scale = 1.0

    def __init__(self, pipe, *, max_sequence_length: int = 512, prompt_cache_size: int = 4096):
        super().__init__(pipe, max_sequence_length=max_sequence_length, prompt_cache_size=prompt_cache_size)
        self.is_distilled = bool(pipe.config.get("is_distilled", False))
        if self.is_distilled:  # as the pipeline: no negative prompt is encoded, no CFG pass
            self.uses_negative_prompt = False
            self.default_num_steps = self.distilled_num_steps
            self.default_guidance_scale = self.distilled_guidance_scale

    def encode(self, prompts, negative_prompt: str | list[str] | None = ""):
        """As :meth:`FlowModel.encode`; the pipeline's only negative prompt is the empty one, so others are refused."""
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if any(n != "" for n in negatives):
                raise ValueError(
                    f"negative_prompt={negative_prompt!r}: Flux2KleinPipeline guides against the empty prompt only; "
                    "pass '' (CFG) or None (no CFG)."
                )
        return super().encode(prompts, negative_prompt=negative_prompt)

    def velocity(
        self,
        x: torch.Tensor,
        sigma,
        cond: Conditioning,
        guidance_scale: float = 4.0,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Velocity ``(B, 4C, h, w)`` in the model's dtype; true CFG when ``guidance_scale > 1`` and ``cond`` holds
        the empty prompt's embeddings (both passes in one batch). ``detach_uncond=True`` stops the gradient through
        the unconditional prediction."""
        batch, _, h, w = x.shape
        tokens, t = self._prepare(x, sigma, cond)
        if not (guidance_scale > 1 and cond.negative_prompt_embeds is not None):
            return self._unpack(self._transformer(tokens, t, cond.prompt_embeds, None, h, w), h, w)
        embeds = torch.cat([cond.prompt_embeds, cond.negative_prompt_embeds])
        out = self._transformer(torch.cat([tokens, tokens]), torch.cat([t, t]), embeds, None, h, w)
        text, uncond = out[:batch], out[batch:]
        if detach_uncond:
            uncond = uncond.detach()
        return self._unpack(uncond + guidance_scale * (text - uncond), h, w)
