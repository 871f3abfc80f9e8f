"""Adapter for Wan 2.1 / 2.2 image-to-video (``WanImageToVideoPipeline``): the text-to-video adapter
(:class:`~diffrl.models.wan.WanModel`) whose transformer also sees a source image, the first frame of the video.

The image enters as the pipeline gives it (diffusers ``pipelines/wan/pipeline_wan_i2v.py``, ``prepare_latents`` and
``__call__``; the Wan report, arXiv:2503.20314, section 4.2 on image-to-video):

* a *condition latent* concatenated to the noisy latent along the channels: a mask of ``t`` channels (the VAE's
  temporal factor, 4), 1 on the first latent frame and 0 on the others, then the VAE latents (the distribution's
  mode, normalised ``(z - mean) / std`` per channel) of a video whose first frame is the source image resized to the
  sampling size and whose other ``F - 1`` frames are zeros: ``2 C + 4`` input channels in all (36 for Wan's 16);
* Wan 2.1 only (the transformer's ``image_dim`` is set): the penultimate hidden states of the CLIP vision encoder
  (``image_encoder``, with its ``image_processor``; 257 tokens of width 1280 for ViT-H/14) given to every block's
  cross-attention next to the prompt (``encoder_hidden_states_image``); Wan 2.2 I2V A14B has no image encoder.

With CFG both branches see the same image condition and image embeddings; only the prompt differs (the negative
prompt on the unconditional branch), as in the pipeline.

Where the condition lives: the condition latent depends on the sampling size (``height``, ``width``, frames), which
the trainers do not give to ``encode``. :meth:`WanI2VModel.encode` (and ``encode_rows``, which reads each prompt row's
``metadata["image"]``: a path, resolved against the prompt file's folder by :func:`diffrl.data.load_prompts`, or a
PIL image) puts in the :class:`~diffrl.models.base.Conditioning` the CLIP embeddings (``image_embeds``) and one key
per row (``source_keys``) naming its source image in the adapter's cache; :meth:`WanI2VModel.velocity` takes the size
from the latents it is given and uses the condition latent of ``(image, size)``, computed once without gradient and
cached (:meth:`WanI2VModel.image_condition`), so a rollout, its log-probs and the trainers' re-evaluations all see the
same condition. Rewards receive the same ``image`` metadata as the prompts (the source image's path).

How it departs from the pipeline, besides what :mod:`diffrl.models.wan` says of the text-to-video adapter: nothing in
the maths; the pipeline's ``last_image`` (first-and-last-frame video, Wan FLF2V), ``image_embeds`` given directly, and
Wan 2.2 TI2V 5B's image-conditioned mode (``expand_timesteps``) are not implemented.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import Conditioning, open_rgb_image
from .wan import WanModel

__all__ = ["WanI2VModel"]


class WanI2VModel(WanModel):
    """Wan image-to-video: :class:`~diffrl.models.wan.WanModel` conditioned on one source image per prompt. Encode
    with ``encode(prompts, images=[...])`` (a PIL image or a path per prompt); the trainers and ``diffrl sample`` /
    ``diffrl eval`` pass each prompt row's ``metadata["image"]`` through :meth:`encode_rows`.

    ``condition_cache_size`` bounds the condition latents kept (one per source image and sampling size, on the model's
    device: 20 x 21 x 60 x 104 values, 5 MiB in bfloat16, for 81 frames at 480 x 832); four times as many source
    images are kept (on the CPU, with their CLIP embeddings on the device). An evicted condition is recomputed, bit for
    bit the same.
    """

    family = "wan_i2v"
    pipeline_class_name = "WanImageToVideoPipeline"
    # the prompt's 512 UMT5 tokens and Wan 2.1's 257 CLIP tokens (an upper bound for Wan 2.2 I2V, which has none)
    memory_text_tokens = 512 + 257
    required_metadata = ("image",)  # each prompt row's source image

    def __init__(self, pipe, *, condition_cache_size: int = 64, **kwargs):
        super().__init__(pipe, **kwargs)
        cfg = self.high_noise_expert.config
        self.mask_channels = self.temporal_factor
        z = int(self.vae.config.z_dim)
        if cfg.in_channels != 2 * z + self.mask_channels:
            raise ValueError(
                f"this WanImageToVideoPipeline's transformer takes {cfg.in_channels} input channels, but image-to-video "
                f"needs {2 * z + self.mask_channels} (the noisy latent, {self.mask_channels} mask channels and the "
                "condition latent); load an image-to-video checkpoint."
            )
        self.uses_clip = cfg.image_dim is not None
        if self.uses_clip and (pipe.image_encoder is None or pipe.image_processor is None):
            raise ValueError(
                "this Wan 2.1 image-to-video transformer takes CLIP image embeddings (image_dim is set), but the "
                "pipeline has no image_encoder or image_processor; load the checkpoint with both."
            )
        if cfg.added_kv_proj_dim is not None and self.max_sequence_length != 512:
            raise ValueError(
                f"max_sequence_length={self.max_sequence_length} must be 512 for Wan 2.1 image-to-video: its "
                "cross-attention takes the tokens before the last 512 as the image's."
            )
        if not isinstance(condition_cache_size, int) or condition_cache_size < 1:
            raise ValueError(
                f"condition_cache_size={condition_cache_size!r} must be a positive integer such as 64."
            )
        self.condition_cache_size = condition_cache_size
        self._sources: OrderedDict[int, tuple] = (
            OrderedDict()
        )  # key -> (RGB PIL image, CLIP embeddings or None)
        self._conditions: OrderedDict[tuple, torch.Tensor] = (
            OrderedDict()
        )  # (key, H, W, F) -> (2C+4 - C, F', h, w)

    # ------------------------------------------------------------------ geometry
    def lora_file_entries(self, state, metadata):
        """Wan 2.1 I2V (a transformer with ``image_dim``): zero LoRA weights on each adapted block's image
        cross-attention projections (``attn2.add_k_proj``, ``attn2.add_v_proj``), which diffrl does not train, and
        those names in the config's ``target_modules``. diffusers' Wan loader adds exactly these zeros to a LoRA that
        lacks them (``_maybe_expand_t2v_lora_for_i2v``, made for text-to-video LoRAs), after which PEFT warned that
        the file held modules its config did not name; written here, the file is a complete image-to-video LoRA and
        loads without the warning, with the same outputs (a zero LoRA adds nothing)."""
        targets = metadata.get("target_modules")
        if getattr(self.transformer.config, "image_dim", None) is None or not isinstance(
            targets, (list, tuple)
        ):
            return state, metadata
        extra = {}
        for name, module in self.transformer.named_modules():
            if not name.endswith(("attn2.add_k_proj", "attn2.add_v_proj")):
                continue
            reference = state.get(f"{name.rsplit('.', 1)[0]}.to_k.lora_A.weight")
            if reference is None or f"{name}.lora_A.weight" in state:
                continue
            layer = getattr(module, "base_layer", module)
            rank = reference.shape[0]
            extra[f"{name}.lora_A.weight"] = reference.new_zeros(rank, layer.in_features)
            extra[f"{name}.lora_B.weight"] = reference.new_zeros(layer.out_features, rank)
        if not extra:
            return state, metadata
        targets = sorted({*targets, "add_k_proj", "add_v_proj"})
        return {**state, **extra}, {**metadata, "target_modules": targets}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The noisy latent's shape ``(C, F', h, w)``: the VAE's ``z_dim`` channels (the transformer's input has the
        condition's channels too)."""
        _, frames, h, w = super().latent_shape(height, width)
        return (int(self.vae.config.z_dim), frames, h, w)

    def clear_prompt_cache(self) -> None:
        super().clear_prompt_cache()
        self._sources.clear()
        self._conditions.clear()

    def to(self, device=None, dtype=None):
        out = super().to(device=device, dtype=dtype)
        self._sources.clear()
        self._conditions.clear()
        return out

    # ------------------------------------------------------------------ source images
    _open = staticmethod(open_rgb_image)

    @staticmethod
    def _key(image) -> int:
        """A 63-bit key of the image's pixels and size."""
        digest = hashlib.sha1(image.tobytes() + repr(image.size).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    @staticmethod
    def _remember(cache: OrderedDict, key, value, size: int) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)

    def _register(self, image) -> int:
        """The key of ``image`` (opened as RGB), its CLIP embeddings computed once (Wan 2.1)."""
        image = self._open(image)
        key = self._key(image)
        if key in self._sources:
            self._sources.move_to_end(key)
            return key
        embeds = None
        if self.uses_clip:
            with torch.no_grad():
                # the pipeline's encode_image: the CLIP vision encoder's penultimate hidden states
                embeds = self.pipe.encode_image(image, device=self.device)[0].to(self.dtype)
        self._remember(self._sources, key, (image, embeds), 4 * self.condition_cache_size)
        return key

    def image_condition(self, image, height: int, width: int, num_frames: int | None = None) -> torch.Tensor:
        """The condition latent ``(1, t + C, F', h, w)`` (model dtype) of a source image for ``num_frames`` frames of
        ``height x width`` (default: :attr:`num_frames`): the first-frame mask, then the normalised VAE latents of the
        image resized to the size (the pipeline's ``video_processor``) followed by ``F - 1`` zero frames. Computed once
        per (image, size) without gradient."""
        key = image if isinstance(image, int) else self._register(image)
        frames = self.num_frames if num_frames is None else num_frames
        entry = (key, height, width, frames)
        cached = self._conditions.get(entry)
        if cached is not None:
            self._conditions.move_to_end(entry)
            return cached
        if key not in self._sources:
            raise ValueError(
                "a conditioning names a source image this model no longer holds (more source images were used since "
                "than condition_cache_size); encode the prompts again or load the model with a larger "
                "condition_cache_size."
            )
        self.latent_shape(height, width)
        source = self._sources[key][0]
        vae, cfg = self.vae, self.vae.config
        with torch.no_grad():
            pixels = self.pipe.video_processor.preprocess(source, height=height, width=width)  # (1, 3, H, W)
            pixels = pixels.to(self.device, torch.float32).unsqueeze(2)
            video = torch.cat([pixels, pixels.new_zeros(1, 3, frames - 1, height, width)], dim=2)
            with self.vae_lock:  # the trainers decode in a background thread meanwhile
                z = vae.encode(video.to(vae.dtype)).latent_dist.mode().float()  # (1, C, F', h, w)
            mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            z = (z - mean) * inv_std
            mask = z.new_zeros(1, self.mask_channels, *z.shape[2:])
            mask[:, :, 0] = 1  # the first latent frame holds the given image
            condition = torch.cat([mask, z], dim=1).to(self.dtype)
        self._remember(self._conditions, entry, condition, self.condition_cache_size)
        return condition

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        prompts: Sequence[str] | str,
        negative_prompt: str | Sequence[str] | None = "",
        *,
        images: Sequence | None = None,
    ) -> Conditioning:
        """Encode each prompt (and the negative prompt) as :meth:`WanModel.encode`, with its source image: the CLIP
        embeddings (Wan 2.1) and the image's key for the condition latent :meth:`velocity` uses."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if images is None:
            raise ValueError(
                "Wan image-to-video conditions on a source image: call encode(prompts, images=[...]) with one image "
                "per prompt; the trainers and diffrl sample/eval pass each prompt row's metadata['image'] through "
                "encode_rows."
            )
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence) or len(images) != len(prompts):
            n = len(images) if isinstance(images, Sequence) and not isinstance(images, (str, Path)) else 1
            raise ValueError(
                f"encode needs one source image per prompt; got {len(prompts)} prompts and {n} image(s)."
            )
        cond = super().encode(prompts, negative_prompt)
        keys = [self._register(image) for image in images]
        cond.source_keys = torch.tensor(keys, dtype=torch.long, device=self.device)
        if self.uses_clip:
            cond.image_embeds = torch.stack([self._sources[k][1] for k in keys])
        return cond

    def encode_rows(self, prompts: Sequence[str], metadata: dict[str, list] | None = None) -> Conditioning:
        """The trainers' encode: each prompt with the source image of its row, ``metadata["image"]``."""
        images = (metadata or {}).get("image") or [None] * len(prompts)
        missing = [i for i, image in enumerate(images) if image is None]
        if missing:
            i = missing[0]
            raise ValueError(
                f"Wan image-to-video needs a source image for every prompt, but the row of prompt {prompts[i]!r} "
                f"({len(missing)} of {len(prompts)} rows of this batch) has none; give each row of a .jsonl prompt "
                'file an "image" field (an image path, relative to the prompt file).'
            )
        return self.encode(prompts, images=images)

    # ------------------------------------------------------------------ velocity
    def velocity(
        self,
        x: torch.Tensor,
        sigma,
        cond: Conditioning,
        guidance_scale: float = 5.0,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """:meth:`WanModel.velocity` of the noisy latents ``x (B, C, F', h, w)`` with each row's condition latent
        concatenated along the channels (the size read from ``x``) and Wan 2.1's CLIP embeddings, on both CFG
        branches."""
        if x.ndim != 5:
            raise ValueError(f"x has shape {tuple(x.shape)}; Wan takes video latents (B, C, frames, h, w).")
        if cond.source_keys is None:
            raise ValueError(
                "this conditioning has no source images; encode with encode(prompts, images=[...]) or encode_rows."
            )
        if len(cond) != x.shape[0]:
            raise ValueError(
                f"cond holds {len(cond)} prompts but x has batch {x.shape[0]}; encode one prompt per sample."
            )
        f, t = self.vae_scale_factor, self.temporal_factor
        height, width, frames = x.shape[3] * f, x.shape[4] * f, (x.shape[2] - 1) * t + 1
        condition = torch.cat(
            [self.image_condition(k, height, width, frames) for k in cond.source_keys.tolist()]
        )
        inputs = torch.cat([x, condition.to(x.dtype)], dim=1)
        return super().velocity(inputs, sigma, cond, guidance_scale, detach_uncond=detach_uncond)
