"""Adapters for FLUX.2: ``Flux2Pipeline`` (FLUX.2 [dev]: Mistral-3 prompt embeddings, guidance as an embedding) and
``Flux2KleinPipeline`` (FLUX.2 [klein]: Qwen3 prompt embeddings, true CFG against the empty prompt on the base
models, none on the step-distilled ones).

Both share the transformer (``Flux2Transformer2DModel``), the VAE (``AutoencoderKLFlux2``, whose latents are
2x2-patchified and normalised by the VAE's batch-norm statistics) and the schedule (``linspace(1, 1/T, T)`` shifted by
an empirical ``mu`` that depends on the image token count *and* the step count). Sources: diffusers'
``pipelines/flux2/pipeline_flux2.py`` and ``pipeline_flux2_klein.py`` (``compute_empirical_mu``, ``_patchify_latents``,
``_pack_latents``, ``_prepare_text_ids``/``_prepare_latent_ids``), ``models/transformers/transformer_flux2.py``.

Reference images (the pipelines' ``image=``): each prompt may come with one or several reference images, prepared as
the pipelines' ``__call__`` and ``prepare_image_latents`` do: an image above 1024 x 1024 pixels is resized (Lanczos)
to about that area at its aspect ratio, each side floored to a multiple of 16 pixels (twice the VAE factor),
preprocessed to [-1, 1] (``resize_mode="crop"``), VAE-encoded (the posterior's mode), 2x2-patchified, normalised by the
VAE's batch-norm statistics and packed into tokens. The reference tokens follow the noisy tokens in the transformer's
sequence, with position ids ``(10 + 10 k, row, col, 0)`` for the ``k``-th image (``_prepare_image_ids``: a time
offset keeps them apart from the noisy tokens at ``t = 0``); only the noisy tokens' outputs are the velocity, and with
Klein's CFG the unconditional pass sees the same reference tokens. The trainers, ``diffrl sample``/``eval`` and the
doctor's probe take them from the prompt rows' ``metadata["image"]`` (a path, a PIL image or a list of them) through
:meth:`Flux2Model.encode_rows`; rewards receive the same ``image`` metadata. Each image is encoded once and cached
(``Conditioning.image_latents``, ``image_grid``), so rollouts, log-probs and re-evaluations see the same condition.
Not implemented (a ``ValueError`` naming the fix): a batch whose rows mix prompts with and without reference images,
or whose reference images give different token grids (the transformer takes one set of position ids per batch).

Departures from the pipelines: the prompt-upsampling option of ``Flux2Pipeline`` (``caption_upsample_temperature``)
is not supported; Klein's CFG batches the conditional and unconditional passes (the pipeline runs two forward passes:
equal within float rounding); the pipelines' output size follows the first reference image when no size is given,
ours is always the configured ``height`` x ``width``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Sequence

import torch

from ..samplers import sigmas_from_scheduler_config
from .base import Conditioning, FlowModel, open_rgb_image

__all__ = [
    "Flux2Model",
    "Flux2KleinModel",
    "FLUX2_LORA_TARGETS",
    "flux2_empirical_mu",
    "flux2_reference_ids",
    "flux2_reference_size",
]

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


def flux2_reference_size(
    width: int, height: int, area: int = 1024 * 1024, multiple: int = 16
) -> tuple[int, int]:
    """``(width, height)`` a ``width x height`` reference image is prepared at: above ``area`` pixels scaled (aspect
    kept, each side truncated) to about ``area``, then each side floored to a multiple of ``multiple`` (the pipelines'
    ``__call__``, step 4, and ``Flux2ImageProcessor._resize_to_target_area``)."""
    if width * height > area:
        scale = math.sqrt(area / (width * height))
        width, height = int(width * scale), int(height * scale)
    return (width // multiple) * multiple, (height // multiple) * multiple


def flux2_reference_ids(grid: Sequence[int], scale: int = 10) -> torch.Tensor:
    """Position ids ``(N_ref, 4)`` of reference tokens whose token grids are ``grid = (h_0, w_0, h_1, w_1, ...)``:
    ``(scale + scale * k, row, col, 0)`` for image ``k``, row-major, images in order (``_prepare_image_ids``)."""
    grid = [int(g) for g in grid]
    parts = [
        torch.cartesian_prod(
            torch.tensor([scale + scale * k]), torch.arange(h), torch.arange(w), torch.arange(1)
        )
        for k, (h, w) in enumerate(zip(grid[0::2], grid[1::2], strict=True))
    ]
    return torch.cat(parts) if parts else torch.zeros(0, 4, dtype=torch.long)


def _not_legacy_processor_kwargs(record: logging.LogRecord) -> bool:
    """False for transformers' "Kwargs passed to `processor.__call__` have to be in `processor_kwargs`" warning, which
    diffusers' Flux2Pipeline causes in ``apply_chat_template`` (its call, not the user's: nothing to act on), and
    which would otherwise print once for every new prompt."""
    return "have to be in `processor_kwargs`" not in record.getMessage()


@contextlib.contextmanager
def _quiet_legacy_processor_kwargs():
    """Silence only that warning, only while the pipeline encodes prompts."""
    log = logging.getLogger("transformers.processing_utils")
    log.addFilter(_not_legacy_processor_kwargs)
    try:
        yield
    finally:
        log.removeFilter(_not_legacy_processor_kwargs)


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
    reference_area = (
        1024 * 1024
    )  # reference images above this many pixels are scaled down to it (the pipelines')

    @classmethod
    def condition_tokens(cls, vae_factor: int, patch: int, side: int = 0) -> int:
        """A reference image's tokens at most: a square image at the area it is scaled down to,
        ``model.condition_image_size`` squared (0: the pipelines' 1024 x 1024); smaller images keep their size and
        bring fewer. Text-to-image rows have none (``condition_images_default`` 0)."""
        return ((side or 1024) // (vae_factor * patch)) ** 2

    def __init__(self, pipe, *, max_sequence_length: int = 512, prompt_cache_size: int = 4096):
        super().__init__(pipe, prompt_cache_size=prompt_cache_size)
        if not isinstance(max_sequence_length, int) or not 0 < max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be in 1..1024 for FLUX.2.")
        self.max_sequence_length = max_sequence_length

    def set_condition_image_size(self, side: int) -> None:
        """Scale reference images above ``side x side`` pixels down to about that area (instead of 1024 x 1024), as
        Flow-Factory's ``condition_image_size`` (``_resize_condition_images``); the config's
        ``model.condition_image_size``."""
        if isinstance(side, bool) or not isinstance(side, int) or side < 32:
            raise ValueError(f"condition_image_size={side!r} must be an integer of at least 32 pixels.")
        self.reference_area = side * side

    @property
    def native_size(self) -> int:
        """The pipeline's default image size in pixels (``default_sample_size`` latents)."""
        return int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    # ------------------------------------------------------------------ text
    def _encode_uncached(self, prompts):
        with _quiet_legacy_processor_kwargs():
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

    # ------------------------------------------------------------------ reference images
    def encode_rows(self, prompts: Sequence[str], metadata: dict[str, list] | None = None) -> Conditioning:
        """The trainers' encode: each prompt with the reference image(s) of its row, ``metadata["image"]`` (a path, a
        PIL image or a list of them); text only when no row has one."""
        images = (metadata or {}).get("image")
        if images is None or all(i is None for i in images):
            return self.encode(prompts)
        return self.encode(prompts, images=images)

    def encode(
        self,
        prompts: Sequence[str] | str,
        negative_prompt: str | Sequence[str] | None = "",
        *,
        images: Sequence | None = None,
    ) -> Conditioning:
        """As :meth:`FlowModel.encode`; with ``images`` (one entry per prompt: an image, a path or a list of them)
        the conditioning also carries their reference tokens, each image encoded once and cached."""
        cond = super().encode(prompts, negative_prompt=negative_prompt)
        if images is None:
            return cond
        images = list(images)
        if len(images) != len(cond):
            raise ValueError(
                f"got {len(cond)} prompts and {len(images)} reference images; give one entry per prompt."
            )
        given = [i is not None and not (isinstance(i, (list, tuple)) and not i) for i in images]
        if not all(given):
            raise ValueError(
                f"{given.count(False)} of {len(images)} prompts of this batch have no reference image; give every row "
                'of the prompt file an "image" field, or none of them (one batch is all reference-conditioned or all '
                "text-to-image)."
            )
        latents, grids = [], []
        for entry in images:
            tokens, grid = self._reference(entry)
            latents.append(tokens)
            grids.append(grid)
        if any(g.tolist() != grids[0].tolist() for g in grids):
            raise ValueError(
                "the reference images of one batch give different token grids "
                f"({sorted({tuple(g.tolist()) for g in grids})}); give every prompt of a batch as many reference "
                "images of the same sizes."
            )
        cond.image_latents = torch.stack(latents)
        cond.image_grid = torch.stack(grids).to(cond.image_latents.device)
        return cond

    _open = staticmethod(open_rgb_image)

    def _reference(self, entry) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (N_ref, 4C) in the model's dtype, grid (2K,) long)`` of one prompt's reference image(s), from
        the cache or encoded now."""
        opened = [self._open(i) for i in (entry if isinstance(entry, (list, tuple)) else [entry])]
        digest = hashlib.sha1()
        for im in opened:
            digest.update(repr(im.size).encode() + im.tobytes())
        key = f"reference\x00{self.reference_area}\x00{digest.hexdigest()}"
        cached = self._cache.get(key)
        if cached is None:
            tokens, grid = [], []
            with torch.no_grad():
                for im in opened:
                    z = self._reference_latents(im)  # (1, 4C, h, w)
                    tokens.append(z[0].flatten(1).T)
                    grid += [z.shape[2], z.shape[3]]
            cached = (torch.cat(tokens).to(self.dtype), torch.tensor(grid, device=self.device))
            self._cache.put(key, cached)
        return cached

    def _reference_latents(self, image) -> torch.Tensor:
        """Patchified, batch-normalised latents ``(1, 4C, h, w)`` of one reference image, as the pipelines'
        ``_encode_vae_image``."""
        processor = self.pipe.image_processor
        processor.check_image_input(image)  # the pipelines' limits: sides of 64+ pixels, aspect ratio up to 8
        w, h = flux2_reference_size(*image.size, self.reference_area, 2 * self.vae_scale_factor)
        if image.size[0] * image.size[1] > self.reference_area:
            from PIL import Image

            scale = math.sqrt(self.reference_area / (image.size[0] * image.size[1]))
            size = (int(image.size[0] * scale), int(image.size[1] * scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        pixels = processor.preprocess(image, height=h, width=w, resize_mode="crop")
        with self.vae_lock:
            z = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        b, c, zh, zw = z.shape
        z = z.view(b, c, zh // 2, 2, zw // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, zh // 2, zw // 2)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            z.device, z.dtype
        )
        return (z - mean) / std

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

    def _transformer(self, tokens, t, embeds, guidance, h, w, cond: Conditioning):
        """The transformer's output on the noisy tokens ``(B, h w, 4C)``; the reference tokens of ``cond`` (if any)
        are appended after them, with their ids, and their outputs dropped."""
        batch = tokens.shape[0]
        img_ids, txt_ids = self._ids(batch, h, w, embeds.shape[1], tokens.device)
        if cond.image_latents is not None:
            grid = cond.image_grid
            if bool((grid != grid[:1]).any()):
                raise ValueError(
                    "the reference images of this batch give different token grids; batch prompts whose reference "
                    "images have the same sizes."
                )
            refs = cond.image_latents.to(tokens.dtype)
            if refs.shape[0] != batch:  # the CFG batch: the same reference tokens for both halves
                refs = refs.repeat(batch // refs.shape[0], 1, 1)
            ref_ids = flux2_reference_ids(grid[0].tolist()).to(tokens.device)
            tokens = torch.cat([tokens, refs], dim=1)
            img_ids = torch.cat([img_ids, ref_ids.expand(batch, -1, -1)], dim=1)
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
        return self._unpack(self._transformer(tokens, t, cond.prompt_embeds, guidance, h, w, cond), h, w)


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

    def encode(self, prompts, negative_prompt: str | list[str] | None = "", *, images=None):
        """As :meth:`Flux2Model.encode`; the pipeline's only negative prompt is the empty one, so others are refused."""
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if any(n != "" for n in negatives):
                raise ValueError(
                    f"negative_prompt={negative_prompt!r}: Flux2KleinPipeline guides against the empty prompt only; "
                    "pass '' (CFG) or None (no CFG)."
                )
        return super().encode(prompts, negative_prompt=negative_prompt, images=images)

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
            return self._unpack(self._transformer(tokens, t, cond.prompt_embeds, None, h, w, cond), h, w)
        embeds = torch.cat([cond.prompt_embeds, cond.negative_prompt_embeds])
        out = self._transformer(torch.cat([tokens, tokens]), torch.cat([t, t]), embeds, None, h, w, cond)
        text, uncond = out[:batch], out[batch:]
        if detach_uncond:
            uncond = uncond.detach()
        return self._unpack(uncond + guidance_scale * (text - uncond), h, w)
