"""Adapter for Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): MMDiT velocity with classifier-free guidance."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..samplers import sigmas_from_scheduler_config
from .base import Conditioning, FlowModel

__all__ = ["SD3Model", "CollapsedContextAttnProcessor", "collapse_empty_t5", "null_t5_encoder", "is_null_t5"]

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


class CollapsedContextAttnProcessor:
    """SD3 joint attention in which the last context token stands for ``multiplicity`` identical tokens.

    An SD3 pipeline without T5 appends ``max_sequence_length`` all-zero T5 tokens to the CLIP tokens. Identical
    context tokens stay identical through every MMDiT block (every layer acts per token and equal queries get
    equal outputs), and ``m`` identical keys/values weigh in the softmax like one key with ``log(m)`` added to its
    logit. So a context of the CLIP tokens plus *one* zero token, attended with that bias, computes what the full
    context computes (the same maths, not the same bits), at a fraction of the cost when the image is small.

    Only inputs whose context has exactly ``collapsed_len`` tokens are treated so; any other call (the pipeline's
    own full-length context, SD3.5's image-only ``attn2``) goes to the wrapped ``original`` processor unchanged.
    """

    def __init__(self, original, multiplicity: int, collapsed_len: int):
        self.original = original
        self.log_m = math.log(multiplicity)
        self.collapsed_len = collapsed_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if (
            encoder_hidden_states is None
            or encoder_hidden_states.shape[1] != self.collapsed_len
            or attention_mask is not None
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = (
            split(attn.to_q(hidden_states)),
            split(attn.to_k(hidden_states)),
            split(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_m
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, :], dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]).to(q.dtype)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, ctx


def null_t5_encoder(d_model: int, vocab_size: int):
    """A one-layer ``T5EncoderModel`` whose weights are all zero, so its output is exactly zero for every prompt: the
    context an SD3 pipeline uses when it has no T5. A checkpoint trained without T5 (the toy model) ships it as
    ``text_encoder_3`` so that a plain ``StableDiffusion3Pipeline.from_pretrained(dir)`` loads it (T5 is not an
    optional component of that pipeline) and makes the same images; :class:`SD3Model` drops it again on load
    (:func:`is_null_t5`), which keeps the collapsed-context speed-up."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=8,
        num_layers=1,
        num_heads=1,
        feed_forward_proj="relu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    encoder = T5EncoderModel(config).eval()
    with torch.no_grad():
        for param in encoder.parameters():
            param.zero_()
    return encoder


def is_null_t5(encoder) -> bool:
    """Whether ``encoder`` is a T5 encoder whose final RMS norm has an all-zero weight, so that it outputs zeros for
    every finite input (:func:`null_t5_encoder`); a real T5 never is."""
    norm = getattr(getattr(encoder, "encoder", None), "final_layer_norm", None)
    weight = getattr(norm, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.device.type != "meta" and not bool(weight.any())


def collapse_empty_t5(transformer, clip_len: int, max_sequence_length: int) -> None:
    """Wrap every attention processor of ``transformer`` in :class:`CollapsedContextAttnProcessor` (idempotent)."""
    procs = {}
    for name, proc in transformer.attn_processors.items():
        if isinstance(proc, CollapsedContextAttnProcessor):
            proc = proc.original
        procs[name] = CollapsedContextAttnProcessor(proc, max_sequence_length, clip_len + 1)
    transformer.set_attn_processor(procs)


class SD3Model(FlowModel):
    """SD3 / SD3.5: latents ``(B, 16, H/8, W/8)``, CFG ``v = v_u + w (v_c - v_u)`` in one batched pass."""

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    uses_negative_prompt = True
    default_lora_rank = 32
    default_lora_alpha = 64
    default_lora_targets = SD3_LORA_TARGETS
    memory_text_tokens = 77 + 256  # CLIP's 77 and T5's 256 (the pipeline's max_sequence_length)

    @classmethod
    def token_patch_size(cls, transformer_config: dict) -> int:
        return int(transformer_config.get("patch_size", 2))

    @classmethod
    def unused_lora_modules_in(cls, transformer_config: dict) -> list[str]:
        # SD3Transformer2DModel makes its last block context-pre-only (see _unused_lora_modules)
        return [f"transformer_blocks.{int(transformer_config['num_layers']) - 1}.attn.add_q_proj"]

    def __init__(
        self,
        pipe,
        *,
        max_sequence_length: int = 256,
        prompt_cache_size: int = 4096,
        collapse_t5_padding: bool = True,
    ):
        null_t5 = None
        if is_null_t5(getattr(pipe, "text_encoder_3", None)):
            # its output is the zeros the pipeline uses without T5 (null_t5_encoder): run without it, and keep it
            # for save_pretrained, so that the saved pipeline loads in plain diffusers as the original does
            null_t5 = (pipe.text_encoder_3, pipe.tokenizer_3)
            pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
        super().__init__(pipe, prompt_cache_size=prompt_cache_size)
        self._null_t5 = null_t5
        self.max_sequence_length = max_sequence_length
        # Without T5 the pipeline's context ends in max_sequence_length zero tokens; keep one of them and let the
        # attention count it max_sequence_length times (exact, see CollapsedContextAttnProcessor).
        self.collapse_t5_padding = bool(
            collapse_t5_padding and getattr(pipe, "text_encoder_3", None) is None and max_sequence_length > 1
        )
        if self.collapse_t5_padding:
            self._clip_len = pipe.tokenizer_max_length
            collapse_empty_t5(self.transformer, self._clip_len, max_sequence_length)

    def save_pretrained(self, save_directory):
        """Save the whole pipeline (after full fine-tuning); a checkpoint that shipped the all-zero T5
        (:func:`null_t5_encoder`, the toy models) is saved with it again, so that a plain
        ``StableDiffusion3Pipeline.from_pretrained(save_directory)`` loads it, as it loads the original."""
        if self._null_t5 is None or self.has_lora:
            return super().save_pretrained(save_directory)
        encoder, tokenizer = self._null_t5
        self.pipe.register_modules(text_encoder_3=encoder, tokenizer_3=tokenizer)
        try:
            return super().save_pretrained(save_directory)
        finally:
            self.pipe.register_modules(text_encoder_3=None, tokenizer_3=None)

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
        if self.collapse_t5_padding:
            embeds = embeds[:, : self._clip_len + 1]
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

    @property
    def native_size(self) -> int:
        """The image size (pixels) the transformer was configured for (``sample_size`` latents)."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f, p = self.vae_scale_factor, self.patch_size
        self._check_size(height, width, f * p)
        limit = self.transformer.config.get("pos_embed_max_size")
        if limit:  # the positional embedding is cropped from a (limit x limit)-patch grid
            most = int(limit) * p * f
            for name, value in (("height", height), ("width", width)):
                if value > most:
                    raise ValueError(
                        f"{name}={value} is larger than this SD3 model can make (at most {most} pixels, its native "
                        f"size is {self.native_size}); ask for a smaller image, e.g. {self.native_size}."
                    )
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
        self,
        x: torch.Tensor,
        sigma,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Velocity ``(B, C, h, w)`` in the model's dtype; CFG when ``guidance_scale > 1`` (as the pipeline does).

        ``detach_uncond=True`` stops the gradient through the unconditional prediction of CFG (the Flow-GRPO
        reference's training log-probs): the value is unchanged, only the conditional branch is trained."""
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
            if detach_uncond:
                uncond = uncond.detach()
            out = uncond + guidance_scale * (text - uncond)
        return out
