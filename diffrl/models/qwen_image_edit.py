"""Adapter for Qwen-Image-Edit (``QwenImageEditPipeline``): Qwen-Image conditioned on a source image, which enters
twice, as in the pipeline (diffusers ``pipelines/qwenimage/pipeline_qwenimage_edit.py``; the Qwen-Image technical report,
arXiv 2508.02324, on image editing):

* the Qwen2.5-VL encoder reads the prompt together with the image (the edit prompt template, its first 64 tokens
  dropped), for the prompt and for the negative prompt;
* the VAE latents of the image, normalised per channel and packed into 2x2 tokens, are appended after the noisy
  latent tokens; the transformer attends to both (a second entry in ``img_shapes``) and only the noisy tokens'
  outputs are the velocity.

The source image is resized, as the pipeline does, to about ``condition_area`` pixels (1024 x 1024) at its own aspect
ratio, in multiples of 32 pixels, independently of the output size.

The trainers, ``diffrl sample`` and ``diffrl eval`` take each prompt's source image from its row's metadata
(``metadata["image"]``: a path, which :func:`diffrl.data.load_prompts` resolves against the prompt file's folder, or a
PIL image), through :meth:`QwenImageEditModel.encode_rows`; rewards receive the same ``image`` metadata. Not
implemented: a batch whose source images give different condition sizes (a clear ``ValueError``: every batch must
share one, e.g. images of one aspect ratio).

:class:`QwenImageEditPlusModel` (``QwenImageEditPlusPipeline``, Qwen-Image-Edit-2509) takes one or several source
images per prompt (``metadata["image"]`` a path or a list of paths): each is shown to the VL encoder at about
384 x 384 pixels, introduced as "Picture i: " in the prompt, and appended as latent tokens at about 1024 x 1024
pixels, one ``img_shapes`` entry per image.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from .base import Conditioning, open_rgb_image
from .flux import pack_latents
from .qwen_image import QwenImageModel

__all__ = ["QwenImageEditModel", "QwenImageEditPlusModel", "edit_condition_size"]


def edit_condition_size(width: int, height: int, area: int = 1024 * 1024) -> tuple[int, int]:
    """``(width, height)`` the pipeline resizes a ``width x height`` source image to: the aspect ratio kept, about
    ``area`` pixels, each side rounded to a multiple of 32 (``calculate_dimensions`` in the pipeline's module)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    return round(w / 32) * 32, round(w / ratio / 32) * 32


def _condition_area(side: int) -> int:
    if isinstance(side, bool) or not isinstance(side, int) or side < 32:
        raise ValueError(f"condition_image_size={side!r} must be an integer of at least 32 pixels.")
    return side * side


class QwenImageEditModel(QwenImageModel):
    """Qwen-Image-Edit: :class:`QwenImageModel` whose conditioning also carries the source image's latent tokens
    (``Conditioning.image_latents``, ``image_grid``). Encode with ``encode(prompts, images=[...])``, one source image
    (a PIL image or a path) per prompt; every image of a batch must give the same condition size."""

    family = "qwen_image_edit"
    pipeline_class_name = "QwenImageEditPipeline"
    default_condition_area = 1024 * 1024  # the pipeline's (calculate_dimensions(1024 * 1024, ratio))
    # the prompt's 512 text tokens and the source image's vision tokens: 1024 x 1024 pixels in 28 x 28 merged patches
    memory_text_tokens = 512 + 1024 * 1024 // (28 * 28)
    condition_images_default = 1  # every row has its source image

    @classmethod
    def condition_tokens(cls, vae_factor: int, patch: int, side: int = 0) -> int:
        """A square source image's latent tokens at ``side x side`` pixels (``model.condition_image_size``; 0: the
        pipeline's 1024 x 1024 condition size)."""
        return ((side or 1024) // (vae_factor * patch)) ** 2

    def __init__(
        self,
        pipe,
        *,
        max_sequence_length: int = 512,
        prompt_cache_size: int = 4096,
        condition_area: int | None = None,
    ):
        super().__init__(pipe, max_sequence_length=max_sequence_length, prompt_cache_size=prompt_cache_size)
        area = self.default_condition_area if condition_area is None else condition_area
        if area < 32 * 32:
            raise ValueError(f"condition_area={area!r} must be at least 32 * 32 pixels.")
        self.condition_area = int(area)

    def set_condition_image_size(self, side: int) -> None:
        """Resize source images to about ``side x side`` pixels (aspect ratio kept, multiples of 32) instead of the
        pipeline's 1024 x 1024, for the VL encoder and the VAE alike (this pipeline's one condition size); the
        config's ``model.condition_image_size``."""
        self.condition_area = _condition_area(side)

    # ------------------------------------------------------------------ source images
    _open = staticmethod(open_rgb_image)

    def _condition(self, image) -> tuple[object, torch.Tensor, tuple[int, int]]:
        """``(resized PIL image for the VL encoder, packed latent tokens (N_c, 4C), token grid)`` of one source
        image, as the pipeline prepares them: resized to the condition size, scaled to [-1, 1], encoded by the VAE
        as a one-frame video (the distribution's mode), normalised per channel ``(z - mean) / std``, packed."""
        w, h = edit_condition_size(*image.size, self.condition_area)
        processor = self.pipe.image_processor
        resized = processor.resize(image, h, w)
        z = self._latents(processor.preprocess(resized, h, w))
        return resized, pack_latents(z)[0].to(self.dtype), (z.shape[2] // 2, z.shape[3] // 2)

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latents ``(1, C, h, w)`` of preprocessed pixels ``(1, 3, H, W)`` in [-1, 1]: encoded as a
        one-frame video (the distribution's mode), then ``(z - mean) / std`` per channel."""
        with self.vae_lock:
            z = self.vae.encode(pixels.unsqueeze(2).to(self.device, self.vae.dtype)).latent_dist.mode()
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return ((z - mean) / std)[:, :, 0]

    def encode_rows(self, prompts: Sequence[str], metadata: dict[str, list] | None = None) -> Conditioning:
        """The trainers' encode: each prompt with the source image of its row, ``metadata["image"]``."""
        images = (metadata or {}).get("image")
        if images is None:
            raise ValueError(
                "Qwen-Image-Edit needs a source image for every prompt: give each row of a .jsonl prompt file an "
                '"image" field (an image path, relative to the prompt file).'
            )
        return self.encode(prompts, images=images)

    @staticmethod
    def _image_key(image) -> str:
        return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()

    # ------------------------------------------------------------------ text with the image
    def _embed(self, prompt: str, resized) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(prompt=[prompt], image=resized, device=self.device)
        return embeds[0].to(self.dtype)

    def encode(
        self,
        prompts: Sequence[str] | str,
        negative_prompt: str | Sequence[str] | None = "",
        *,
        images: Sequence | None = None,
    ) -> Conditioning:
        """Encode each prompt with its source image (and the negative prompt with the same image, as the pipeline
        does for true CFG); each (prompt, image) pair is encoded once and cached."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if images is None:
            raise ValueError(
                "Qwen-Image-Edit conditions on a source image: call encode(prompts, images=[...]) with one image per "
                "prompt; the trainers and diffrl sample/eval pass each prompt row's metadata['image'] through "
                "encode_rows."
            )
        if not prompts or not all(isinstance(p, str) for p in prompts) or len(images) != len(prompts):
            raise ValueError(
                f"encode needs a non-empty list of prompt strings and one image per prompt; got {len(prompts)} "
                f"prompts and {len(images)} images."
            )
        if isinstance(negative_prompt, str) or negative_prompt is None:
            negatives = [negative_prompt] * len(prompts)
        elif len(negative_prompt) == len(prompts):
            negatives = list(negative_prompt)
        else:
            raise ValueError(
                f"negative_prompt={negative_prompt!r} must be a string or one string per prompt."
            )
        rows, negative_rows, latents, grids = [], [], [], []
        for prompt, negative, image in zip(prompts, negatives, images, strict=True):
            image = self._open(image)
            key = f"{self.condition_area}:{getattr(self, 'vae_area', 0)}:{self._image_key(image)}"
            cached = self._cache.get(f"image\x00{key}")
            if cached is None:
                resized, tokens, grid = self._condition(image)
                cached = (tokens, torch.tensor(grid), resized)
                self._cache.put(f"image\x00{key}", cached)
            tokens, grid, resized = cached
            latents.append(tokens)
            grids.append(grid)
            for text, out in ((prompt, rows), (negative, negative_rows)):
                if text is None:
                    continue
                entry = self._cache.get(f"{key}\x00{text}")
                if entry is None:
                    with self.text_encoders_on_device():
                        entry = (self._embed(text, resized),)
                    self._cache.put(f"{key}\x00{text}", entry)
                out.append(entry)
        if any(g.tolist() != grids[0].tolist() for g in grids):
            raise ValueError(
                "the source images of one batch give different condition sizes "
                f"({sorted({tuple(g.tolist()) for g in grids})} latent tokens); batch images of one aspect ratio."
            )
        cond = self._assemble(rows, negative_rows if negative_prompt is not None else None)
        cond.image_latents = torch.stack(latents)
        cond.image_grid = torch.stack(grids).to(cond.image_latents.device)
        return cond


class QwenImageEditPlusModel(QwenImageEditModel):
    """Qwen-Image-Edit-2509 (``QwenImageEditPlusPipeline``): one or several source images per prompt. The VL encoder
    sees each at about ``condition_area`` pixels (384 x 384, the pipeline's ``CONDITION_IMAGE_SIZE``) after a
    "Picture i: " label; their latent tokens, at about ``vae_area`` pixels (1024 x 1024, ``VAE_IMAGE_SIZE``), follow
    the noisy tokens in the order of the images. ``encode(prompts, images=[...])`` takes, per prompt, an image or a
    list of images; all prompts of a batch need the same number of images of the same condition sizes."""

    family = "qwen_image_edit_plus"
    pipeline_class_name = "QwenImageEditPlusPipeline"
    default_condition_area = 384 * 384
    default_vae_area = 1024 * 1024
    # the prompt's 512 text tokens and one source image's vision tokens (384 x 384 pixels in 28 x 28 merged patches)
    memory_text_tokens = 512 + 384 * 384 // (28 * 28)

    def __init__(self, pipe, *, vae_area: int | None = None, **kwargs):
        super().__init__(pipe, **kwargs)
        area = self.default_vae_area if vae_area is None else vae_area
        if area < 32 * 32:
            raise ValueError(f"vae_area={area!r} must be at least 32 * 32 pixels.")
        self.vae_area = int(area)

    def set_condition_image_size(self, side: int) -> None:
        """VAE-encode source images at about ``side x side`` pixels (aspect ratio kept, multiples of 32) instead of
        the pipeline's 1024 x 1024, as Flow-Factory's ``condition_image_size`` (``_preprocess_condition_images``:
        ``calculate_dimensions`` of that area); the VL encoder still sees them at about 384 x 384. The config's
        ``model.condition_image_size``."""
        self.vae_area = _condition_area(side)

    def _condition(self, image) -> tuple[object, torch.Tensor, tuple[int, ...]]:
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        shown, tokens, grid = [], [], []
        processor = self.pipe.image_processor
        for img in images:
            w, h = edit_condition_size(*img.size, self.condition_area)
            shown.append(processor.resize(img, h, w))
            vw, vh = edit_condition_size(*img.size, self.vae_area)
            z = self._latents(processor.preprocess(img, vh, vw))
            tokens.append(pack_latents(z)[0].to(self.dtype))
            grid += [z.shape[2] // 2, z.shape[3] // 2]
        return shown, torch.cat(tokens), tuple(grid)

    def _open(self, image):
        if isinstance(image, (list, tuple)):
            return [QwenImageEditModel._open(i) for i in image]
        return QwenImageEditModel._open(image)

    @staticmethod
    def _image_key(image) -> str:
        images = image if isinstance(image, list) else [image]
        return "+".join(QwenImageEditModel._image_key(i) for i in images)
