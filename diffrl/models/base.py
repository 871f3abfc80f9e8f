"""The part of a model adapter that SD3 and FLUX share: prompt cache, decode, LoRA, reference policy, saving.

An adapter wraps a loaded diffusers pipeline and gives the trainers and samplers a small, stateless surface:

* ``encode(prompts) -> Conditioning`` (text encoders frozen, results cached per prompt string),
* ``velocity(x, sigma, cond, guidance_scale) -> v`` (the transformer's flow-matching velocity),
* ``decode(latents) -> images`` in [0, 1], differentiable, and its inverse ``encode_images(images) -> latents``,
* ``schedule(num_steps, height, width)`` and ``sample_noise(batch, height, width, generator)``,
* ``add_lora(...)`` / ``set_full_finetuning()``, ``disable_adapter()`` (the base model as reference policy),
  ``save_lora(dir)`` in the diffusers LoRA format, ``enable_gradient_checkpointing()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..utils import apply_umask, canonical_safetensors_header

__all__ = ["Conditioning", "FlowModel", "masked_prompt_conditioning", "open_rgb_image"]


@dataclass
class Conditioning:
    """Text conditioning for a batch of B prompts (tensors in the model's dtype, on its device)."""

    prompt_embeds: torch.Tensor  # (B, L, D) token embeddings
    pooled: torch.Tensor  # (B, P) pooled embedding
    negative_prompt_embeds: torch.Tensor | None = None  # (B, L, D) SD3 CFG: the negative prompt's embeddings
    negative_pooled: torch.Tensor | None = None  # (B, P)
    text_ids: torch.Tensor | None = None  # (L, 3) FLUX text position ids, shared by the batch
    prompt_mask: torch.Tensor | None = None  # (B, L) Qwen-Image: 1 for the prompt's tokens, 0 for padding
    negative_prompt_mask: torch.Tensor | None = None  # (B, L') the negative prompt's
    image_latents: torch.Tensor | None = (
        None  # (B, N_c, 4C) Qwen-Image-Edit: the source image's packed latent tokens; FLUX.2: the reference images'
    )
    image_grid: torch.Tensor | None = (
        None  # (B, 2) their token grid (rows, columns), long; (B, 2K) for K images
    )
    image_embeds: torch.Tensor | None = None  # (B, N_i, D_i) Wan 2.1 I2V: the source image's CLIP states
    source_keys: torch.Tensor | None = None  # (B,) long Wan I2V: each row's source image key (adapter cache)
    _cfg: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def cfg_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[negative; positive]`` embeddings and pooled embeddings ``(2B, ...)`` for one batched CFG pass,
        concatenated once and reused while the four tensors stay the same objects."""
        if self.negative_prompt_embeds is None or self.negative_pooled is None:
            raise ValueError(
                "classifier-free guidance needs negative embeddings; encode with negative_prompt='' (the default)."
            )
        parts = (self.negative_prompt_embeds, self.prompt_embeds, self.negative_pooled, self.pooled)
        if self._cfg is None or any(a is not b for a, b in zip(self._cfg[0], parts, strict=True)):
            merged = (torch.cat(parts[:2]), torch.cat(parts[2:]))
            self._cfg = (parts, merged)
        return self._cfg[1]

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map_batched(self, fn) -> Conditioning:
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            out[f.name] = fn(value) if (value is not None and f.name != "text_ids") else value
        return Conditioning(**out)

    def select(self, index) -> Conditioning:
        """The rows ``index`` (an int list, a slice or an index tensor) of the batch."""
        if isinstance(index, int):
            index = [index]
        return self._map_batched(lambda t: t[index])

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each prompt ``repeats`` times in a row (a group of G images per prompt)."""
        return self._map_batched(lambda t: t.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate batches along the batch dimension."""
        first = items[0]
        out = {}
        for f in dataclasses.fields(first):
            if not f.init:
                continue
            values = [getattr(c, f.name) for c in items]
            if f.name == "text_ids" or values[0] is None:
                out[f.name] = values[0]
            else:
                if f.name in _PADDED_FIELDS:  # per-batch token counts (Qwen-Image): zero-pad to the longest
                    longest = max(v.shape[1] for v in values)
                    values = [_pad_tokens(v, longest) for v in values]
                out[f.name] = torch.cat(values, dim=0)
        return Conditioning(**out)


# Conditioning fields whose token count may differ between batches (Qwen-Image pads each batch to its longest
# prompt, with a mask); cat() zero-pads them to a common length.
_PADDED_FIELDS = ("prompt_embeds", "negative_prompt_embeds", "prompt_mask", "negative_prompt_mask")


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def open_rgb_image(image):
    """A source or reference image as an RGB PIL image: a PIL image, or the path of an image file (read and closed)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise ValueError(f"image={image!r} must be a PIL image or the path of an image file.")


def masked_prompt_conditioning(rows, negative_rows) -> Conditioning:
    """The :class:`Conditioning` of prompts encoded each to its own number of tokens (rows of ``(embeds (L_i, D),)``):
    zero-padded to the longest, ``prompt_mask`` 1 on the real tokens, no pooled embedding; the negative prompts'
    likewise. Families whose transformer masks text padding (Qwen-Image, Z-Image) assemble their batches with it."""

    def pad(rows) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(r[0].shape[0] for r in rows)
        embeds = torch.stack(
            [torch.cat([r[0], r[0].new_zeros(longest - r[0].shape[0], r[0].shape[1])]) for r in rows]
        )
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=embeds.device)
        for i, r in enumerate(rows):
            mask[i, : r[0].shape[0]] = 1
        return embeds, mask

    embeds, mask = pad(rows)
    cond = Conditioning(prompt_embeds=embeds, pooled=embeds.new_zeros(len(rows), 0), prompt_mask=mask)
    if negative_rows is not None:
        neg, neg_mask = pad(negative_rows)
        cond.negative_prompt_embeds = neg
        cond.negative_pooled = neg.new_zeros(len(rows), 0)
        cond.negative_prompt_mask = neg_mask
    return cond


class _PromptCache:
    """A bounded least-recently-used cache of per-prompt encodings (tuples of tensors without batch dim)."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._data: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()

    def get(self, key: str):
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: tuple[torch.Tensor, ...]) -> None:
        if self.max_size <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()


class FlowModel:
    """Base class of the SD3 and FLUX adapters; build one with :func:`diffrl.models.load_model`."""

    family: str = ""
    pipeline_class_name: str = ""
    uses_negative_prompt: bool = False  # whether encode() also encodes the negative prompt (true CFG)
    guidance_is_cfg: bool = (
        True  # False where guidance_scale enters the transformer as an embedding (FLUX.1-dev)
    )
    default_num_steps: int = 40  # the sampling steps `diffrl sample`/`eval` use unless told otherwise
    default_guidance_scale: float = 4.5  # the guidance they use unless told otherwise
    default_lora_rank: int = 32
    default_lora_alpha: int = 64
    default_lora_targets: list[str] | str = []
    # Text tokens per prompt the transformer attends to, as `diffrl doctor`'s memory estimate counts them (an upper
    # bound where a family pads to a maximum length).
    memory_text_tokens: int = 0
    # Metadata fields every prompt row must carry for this model (Wan image-to-video: its source image, "image"),
    # checked by the trainers when the model is set up, before any sampling.
    required_metadata: tuple[str, ...] = ()
    # Conditioning images a prompt row brings by default (its ``metadata["image"]``: an edit model's source image,
    # FLUX.2's reference images), each ``condition_tokens`` more transformer tokens; `diffrl doctor`'s memory
    # estimate counts the most a row of ``data.train`` has, or this many when it cannot read the prompt file.
    condition_images_default: int = 0

    # ------------------------------------------------------------------ sizes from config files (no model built)
    # The memory estimate (diffrl.doctor.memory) reads these from a pipeline's config.json files, so a family's
    # geometry lives with its adapter and the estimate has no family branches.
    @classmethod
    def token_patch_size(cls, transformer_config: dict) -> int:
        """Latent pixels per side of one image token: 2 (2x2 latent patches packed into a token)."""
        return 2

    @classmethod
    def vae_geometry(cls, vae_config: dict) -> tuple[int, int, int]:
        """``(downsampling factor, channels of the decoder's full-resolution blocks, latent channels)`` from the
        VAE's config (``AutoencoderKL``: ``block_out_channels``, ``latent_channels``)."""
        channels = vae_config["block_out_channels"]
        return 2 ** (len(channels) - 1), int(channels[0]), int(vae_config.get("latent_channels", 16))

    @classmethod
    def condition_tokens(cls, vae_factor: int, patch: int, side: int = 0) -> int:
        """Latent tokens of a conditioning image appended to the noisy ones (edit models) encoded at about ``side``
        squared pixels (0: the pipeline's size), for the estimate: 0."""
        return 0

    @classmethod
    def transformer_geometry(cls, transformer_config: dict) -> tuple[int, int, int]:
        """``(width, blocks, text embedding width)`` from the transformer's config: ``num_attention_heads *
        attention_head_dim``, ``num_layers + num_single_layers`` and ``joint_attention_dim`` (the width if absent)."""
        width = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
        blocks = int(transformer_config.get("num_layers", 0)) + int(
            transformer_config.get("num_single_layers", 0)
        )
        return width, blocks, int(transformer_config.get("joint_attention_dim", width))

    @classmethod
    def memory_frames(cls, num_frames: int, vae_config: dict) -> tuple[int, int]:
        """``(latent frames, frames the VAE decodes at once)`` of one sample for the estimate: ``(1, 1)`` for an
        image model (``num_frames``, the ``sample.num_frames`` setting, is ignored)."""
        return 1, 1

    @classmethod
    def unused_lora_modules_in(cls, transformer_config: dict) -> list[str]:
        """Modules left out of the default LoRA because they would get no gradient, named from the transformer's
        config (the same names ``_unused_lora_modules`` finds on a loaded model). None by default."""
        return []

    def __init__(self, pipe, *, prompt_cache_size: int = 4096):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.scheduler_config = dict(pipe.scheduler.config)
        self._cache = _PromptCache(prompt_cache_size)
        self._mode = "frozen"
        self._offload_text = False  # text encoders kept on the CPU between encodings (offload_text_encoders)
        self._text_on_device = False  # inside text_encoders_on_device: nested uses do not move them again
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
                module.requires_grad_(False)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def vae_lock(self) -> threading.RLock:
        """Held around every use of the VAE that may run in two threads at once: the trainers decode and score one
        rollout chunk in a background thread while the next chunk samples, and an image-conditioned adapter may
        VAE-encode a source image during sampling. Video VAEs (Wan, Qwen-Image) keep a causal feature cache on the
        module, so two concurrent calls would corrupt each other's outputs."""
        lock = self.__dict__.get("_vae_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_vae_lock", threading.RLock())  # atomic under the GIL
        return lock

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> FlowModel:
        """Move the whole pipeline; clears the prompt cache (its tensors live on the old device). Offloaded text
        encoders (:meth:`offload_text_encoders`) stay on the CPU."""
        self.pipe.to(device=device, dtype=dtype)
        self._cache.clear()
        if self._offload_text:
            self.offload_text_encoders()
        return self

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text (and vision-language) encoders: its components named ``text_encoder*``."""
        return [
            m
            for name, m in self.pipe.components.items()
            if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)
        ]

    def offload_text_encoders(self, enabled: bool = True) -> FlowModel:
        """Keep the text encoders on the CPU between encodings, so their memory is free while sampling and training.
        They move to the model's device only to encode prompts the prompt cache does not hold, and back after; the
        embeddings are the same as without offloading (the same modules run on the same device). ``enabled=False``
        puts them back on the model's device."""
        self._offload_text = bool(enabled)
        target = torch.device("cpu") if enabled else self.device
        for module in self.text_encoders():
            module.to(target)
        return self

    @contextlib.contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """Run the body with the text encoders on the model's device (a no-op unless they are offloaded)."""
        if not self._offload_text or self._text_on_device:
            yield
            return
        for module in self.text_encoders():
            module.to(self.device)
        self._text_on_device = True
        try:
            yield
        finally:
            self._text_on_device = False
            for module in self.text_encoders():
                module.to("cpu")

    # ------------------------------------------------------------------ to implement per family
    def _encode_uncached(self, prompts: list[str]) -> list[tuple[torch.Tensor, ...]]:
        raise NotImplementedError

    def _assemble(self, rows: list[tuple[torch.Tensor, ...]], negative_rows) -> Conditioning:
        raise NotImplementedError

    def velocity(
        self,
        x: torch.Tensor,
        sigma,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ text
    def _encode_cached(self, prompts: Sequence[str]) -> list[tuple[torch.Tensor, ...]]:
        missing = list(dict.fromkeys(p for p in prompts if self._cache.get(p) is None))
        fresh = {}
        if missing:
            # One prompt at a time: a prompt's conditioning then never depends on which other prompts shared the
            # batch (batched matmuls differ in the last bits), so runs and resumes reproduce bitwise.
            with torch.no_grad(), self.text_encoders_on_device():
                rows = [self._encode_uncached([p])[0] for p in missing]
            fresh = dict(zip(missing, rows, strict=True))
            for p, row in fresh.items():
                self._cache.put(p, row)
        return [fresh[p] if p in fresh else self._cache.get(p) for p in prompts]

    def encode(
        self, prompts: Sequence[str] | str, negative_prompt: str | Sequence[str] | None = ""
    ) -> Conditioning:
        """Encode prompts with the frozen text encoders; each distinct prompt string is encoded once and cached.

        ``negative_prompt`` is the unconditional prompt for classifier-free guidance (SD3, Qwen-Image; FLUX ignores
        it), one for the batch or one per prompt.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts={prompts!r} must be a non-empty list of strings.")
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        negatives = (
            list(negatives) if self.uses_negative_prompt and isinstance(negatives, (list, tuple)) else []
        )
        uncached = any(self._cache.get(p) is None for p in [*prompts, *negatives] if isinstance(p, str))
        # one trip of offloaded text encoders to the device for the prompts and the negative prompts together
        with self.text_encoders_on_device() if uncached else contextlib.nullcontext():
            return self._encode_rows_and_negatives(prompts, negative_prompt)

    def _encode_rows_and_negatives(self, prompts: list[str], negative_prompt) -> Conditioning:
        rows = self._encode_cached(prompts)
        negative_rows = None
        if negative_prompt is not None and self.uses_negative_prompt:
            if isinstance(negative_prompt, str):
                negative_rows = self._encode_cached([negative_prompt]) * len(prompts)
            elif len(negative_prompt) == len(prompts) and all(isinstance(p, str) for p in negative_prompt):
                negative_rows = self._encode_cached(list(negative_prompt))
            else:
                raise ValueError(
                    f"negative_prompt={negative_prompt!r} must be a string or one string per prompt."
                )
        return self._assemble(rows, negative_rows)

    def encode_rows(self, prompts: Sequence[str], metadata: dict[str, list] | None = None) -> Conditioning:
        """``encode(prompts)`` as the trainers call it, with the prompt rows' metadata (one list per key, one entry
        per prompt). Text-to-image families use the text only; Qwen-Image-Edit reads each row's source image from
        ``metadata["image"]``."""
        return self.encode(prompts)

    def clear_prompt_cache(self) -> None:
        self._cache.clear()

    def first_tokenizer(self):
        """The pipeline's first tokenizer (``pipe.tokenizer``; a processor's own tokenizer), or None."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        return getattr(tokenizer, "tokenizer", tokenizer)

    def tokenizer_texts(self, prompts: Sequence[str], max_length: int = 256) -> list[str]:
        """The prompts as the first tokenizer reads them back: tokenized (padded and cut to ``max_length`` tokens)
        and decoded without special tokens, the key by which the Flow-GRPO, DiffusionNFT and AWM reference codes
        group advantages (``tokenizers[0](prompts, max_length=256, ...)``, ``pipeline.tokenizer.batch_decode``).
        CLIP's reads lower-case the text and normalise its spacing."""
        tokenizer = self.first_tokenizer()
        if tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} has no tokenizer (pipe.tokenizer) to read the prompts back with; use "
                "group_by=text."
            )
        ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True).input_ids
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ latents and images
    def _check_size(self, height: int, width: int, multiple: int) -> None:
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(
                    f"{name}={value!r} must be a positive multiple of {multiple} for this {self.family} model."
                )

    def sample_noise(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Initial noise ``(B, C, h, w)`` in float32, drawn as diffusers' pipelines draw it (``generator`` may be a
        list of one generator per sample)."""
        shape = (batch, *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1], float32, differentiable."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:
            z = z + cfg.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> latents ``(B, C, h, w)`` in float32, the inverse of :meth:`decode`:
        the VAE posterior's mean (not a sample, so a cached encoding is the encoding), shifted and scaled by the
        VAE config's factors. No gradient (preference data and other given images are targets).

        An adapter that decodes its own way (another VAE) must encode its own way too; it raises until it does."""
        if type(self).decode is not FlowModel.decode:
            raise NotImplementedError(
                f"{type(self).__name__} decodes latents its own way and has no encode_images yet; implement it as "
                "the inverse of its decode."
            )
        cfg = self.vae.config
        with torch.no_grad(), self.vae_lock:
            x = images.to(self.vae.device, self.vae.dtype) * 2 - 1
            z = self.vae.encode(x).latent_dist.mode()
            if getattr(cfg, "shift_factor", None) is not None:
                z = z - cfg.shift_factor
            return (z * cfg.scaling_factor).float()

    # ------------------------------------------------------------------ training modes
    def enable_gradient_checkpointing(self) -> None:
        """Recompute the transformer blocks' activations in the backward pass (diffusers' own checkpointing)."""
        self.transformer.enable_gradient_checkpointing()

    def add_lora(
        self,
        rank: int | None = None,
        alpha: float | None = None,
        target_modules: list[str] | str | None = None,
        *,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
    ) -> None:
        """Attach a trainable LoRA adapter (PEFT) to the transformer; only its weights require grad.

        Defaults per family: SD3 r=32, alpha=64 on the joint-attention projections; FLUX r=64, alpha=128 on
        the attention projections and the feed-forward layers. ``init_lora_weights=True`` makes the adapter a
        no-op at start (B = 0), so the adapted model starts as the base model.
        """
        from peft import LoraConfig

        if self._mode == "full":
            raise ValueError("this model is set for full fine-tuning; load it again to train a LoRA instead.")
        loaded = sorted(getattr(self.transformer, "peft_config", None) or {})
        if loaded:  # a new adapter would become the only active one and silently switch these off
            raise ValueError(self._loaded_lora_message(loaded))
        rank = self.default_lora_rank if rank is None else rank
        alpha = self.default_lora_alpha if alpha is None else alpha
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"lora rank={rank!r} must be a positive integer (e.g. 32).")
        extra = {}
        if target_modules is None and self._unused_lora_modules():
            extra["exclude_modules"] = self._unused_lora_modules()
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=target_modules if target_modules is not None else self.default_lora_targets,
            init_lora_weights=init_lora_weights,
            **extra,
        )
        self.add_lora_config(config, adapter_name)

    def add_lora_config(self, config, adapter_name: str = "default") -> None:
        """Attach a trainable LoRA adapter made from a PEFT ``LoraConfig`` as it is (what :meth:`add_lora` does after
        choosing the family's defaults; :func:`diffrl.models.lora_files.start_lora_from` passes a loaded LoRA's)."""
        if self._mode == "full":
            raise ValueError("this model is set for full fine-tuning; load it again to train a LoRA instead.")
        loaded = sorted(getattr(self.transformer, "peft_config", None) or {})
        if loaded:
            raise ValueError(self._loaded_lora_message(loaded))
        self.transformer.add_adapter(config, adapter_name=adapter_name)
        self._mode = "lora"

    @staticmethod
    def _loaded_lora_message(loaded: list[str]) -> str:
        return (
            f"this model already holds the LoRA adapter(s) {', '.join(loaded)} (e.g. from load_lora); a new one "
            "would switch them off. To train on top of a LoRA, set model.lora_from to it (Python: "
            "diffrl.models.lora_files.start_lora_from on the base model), or fuse it first "
            "(model.pipe.fuse_lora(); model.pipe.unload_lora_weights())."
        )

    def _unused_lora_modules(self) -> list[str]:
        """Default-target modules whose output never reaches the model's output (left out of the default LoRA)."""
        return []

    def set_full_finetuning(self) -> None:
        """Train every transformer weight (no adapter; no reference policy without a second copy)."""
        if self._mode == "lora":
            raise ValueError("this model has a LoRA adapter; load it again for full fine-tuning.")
        self.transformer.requires_grad_(True)
        self._mode = "full"

    @property
    def has_lora(self) -> bool:
        return self._mode == "lora"

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    #: The transformer's ``nn.ModuleList`` attributes whose blocks FSDP2 shards one by one (``fully_shard`` per
    #: block, then the whole transformer); a family whose transformer names its blocks differently lists its own.
    shard_block_lists: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks")

    def shard_blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks FSDP2 shards one by one (from :attr:`shard_block_lists`); empty when the
        transformer has none of them (then FSDP is refused for this model)."""
        return [
            block
            for name in self.shard_block_lists
            for block in (getattr(self.transformer, name, None) or [])
        ]

    def shard_roots(self) -> list[torch.nn.Module]:
        """The modules FSDP2 shards after the blocks, each its own root (``fully_shard`` on each): the trained
        transformer, or a family's several trained transformers (Wan 2.2's two experts)."""
        return [self.transformer]

    def set_shard_sync(self, any_over_processes) -> None:
        """Called by the engine once the trained weights are sharded with FSDP2, with a function that takes a bool
        tensor of this process and returns the element-wise "true on any process" (a collective). A family whose
        forwards could take different sharded modules on different processes (Wan 2.2's experts) uses it to keep
        the processes' all-gathers and reduce-scatters in step; the others need nothing."""

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model (the reference policy) inside this block: the LoRA adapters are switched off, the
        trained one and any loaded with :func:`diffrl.models.lora_files.load_lora`."""
        if self._mode == "full":
            raise ValueError(
                "full fine-tuning keeps no copy of the base weights, so there is no reference policy; "
                "train a LoRA (add_lora) to get the base model by disabling the adapter."
            )
        if not self.has_lora and not getattr(self.transformer, "peft_config", None):
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    @contextlib.contextmanager
    def use_adapter(self, adapter_name: str) -> Iterator[None]:
        """Run with another LoRA adapter of the transformer active (e.g. DiffusionNFT's old policy)."""
        if not self.has_lora:
            raise ValueError("this model has no LoRA adapter; call add_lora() first.")
        active = "default"
        self.transformer.set_adapter(adapter_name)
        try:
            yield
        finally:
            self.transformer.set_adapter(active)

    # ------------------------------------------------------------------ saving
    def lora_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise ValueError("this model has no LoRA adapter; call add_lora() first.")
        return get_peft_model_state_dict(self.transformer, adapter_name=adapter_name)

    def save_lora(
        self,
        save_directory: str | Path,
        adapter_name: str = "default",
        state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Save the LoRA in the diffusers format (``pytorch_lora_weights.safetensors`` with the adapter config
        as metadata), so ``pipe.load_lora_weights(save_directory)`` loads it into a plain diffusers pipeline.
        ``state`` is the adapter's :meth:`lora_state_dict` when already at hand (e.g. gathered from FSDP shards)."""
        save_directory = Path(save_directory)
        state = state if state is not None else self.lora_state_dict(adapter_name)
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        metadata = self.transformer.peft_config[adapter_name].to_dict()
        # PEFT keeps target_modules (and exclude_modules) as sets, whose order changes with the hash seed: sorted,
        # the same run writes the same bytes
        metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in metadata.items()}
        state, metadata = self.lora_file_entries(state, metadata)
        if metadata.get("exclude_modules"):
            # the adapter's patterns minus the excluded modules, as the list of modules that hold LoRA weights: a
            # pipeline loading it then adapts exactly those (with the exclusion it warns that nothing was excluded,
            # since the saved weights already leave those modules out)
            metadata["target_modules"] = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})
            metadata["exclude_modules"] = None
        type(self.pipe).save_lora_weights(
            save_directory,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=metadata,
        )
        for path in save_directory.glob("*.safetensors"):
            canonical_safetensors_header(path)
        apply_umask(save_directory)  # safetensors writes owner-only files
        return save_directory

    def lora_file_entries(
        self, state: dict[str, torch.Tensor], metadata: dict
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """The LoRA weights and adapter config :meth:`save_lora` writes, from the trained ones; a family whose
        diffusers loader expects more entries adds them here (Wan 2.1 image-to-video). As they are by default."""
        return state, metadata

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Save the whole pipeline (after full fine-tuning) so ``from_pretrained(save_directory)`` loads it."""
        if self.has_lora:
            raise ValueError("this model trains a LoRA; save it with save_lora() (or fuse it first).")
        self.pipe.save_pretrained(save_directory)
        apply_umask(save_directory)
        return Path(save_directory)
