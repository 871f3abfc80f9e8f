"""Differentiable image preprocessing in torch for the CLIP-family scorers (gradients reach the pixels).

Inputs are float images ``(B, 3, H, W)`` in [0, 1]. Resizing is bicubic with antialiasing (``F.interpolate(...,
antialias=True)``), the torch counterpart of PIL's bicubic resampling used by the reference processors; the
tests compare against the Hugging Face / open_clip processors on PIL images and state the tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "normalize",
    "resize_shortest_center_crop",
    "resize_longest_pad",
    "clip_preprocess",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def _bicubic_clipped(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(
        0.0, 1.0
    )


def resize_bicubic_pil_order(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` images in [0, 1] to ``size`` like PIL's bicubic: width first, then height, each
    pass antialiased and clipped to [0, 1] (PIL clips each 8-bit pass). An axis whose size does not change is
    left untouched. This is what processors that resize PIL images (transformers' CLIP, torchvision on PIL)
    do."""
    h, w = images.shape[-2:]
    new_h, new_w = size
    if new_w != w:
        images = _bicubic_clipped(images, (h, new_w))
    if new_h != h:
        images = _bicubic_clipped(images, (new_h, new_w))
    return images


def resize_shortest_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (bicubic, PIL order), then crop the centre ``size x size`` with
    torchvision's ``CenterCrop`` offsets (CLIP's transform as in torchvision on a PIL image)."""
    h, w = images.shape[-2:]
    # the longer side is truncated, as torchvision's Resize(int) and transformers' CLIPImageProcessor do
    if h <= w:
        new_h, new_w = size, max(size, int(size * w / h))
    else:
        new_h, new_w = max(size, int(size * h / w)), size
    images = resize_bicubic_pil_order(images, (new_h, new_w))
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def resize_longest_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Resize so the longer side is ``size`` (bicubic), then pad to ``size x size`` centred (HPSv2's transform)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    images = _resize(images, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    top, left = pad_h // 2, pad_w // 2
    return F.pad(images, (left, pad_w - left, top, pad_h - top), value=fill)


def clip_preprocess(
    images: torch.Tensor, size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD
) -> torch.Tensor:
    """CLIP's standard preprocessing: shortest side to ``size``, centre crop, normalise."""
    return normalize(resize_shortest_center_crop(images.float(), size), mean, std)
