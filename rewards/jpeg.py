"""JPEG compressibility and incompressibility, the classic DDPO tasks (score-only).

The score is the size in kilobytes of the image saved as a JPEG (quality 95 by default, the DDPO setting):
``jpeg_incompressibility`` rewards large files (detail), ``jpeg_compressibility`` is its negative (flat images).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import Reward

__all__ = ["JpegCompressibility", "JpegIncompressibility", "jpeg_size_kb"]


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> list[float]:
    """Size in kB (1000 bytes) of each image ``(B, 3, H, W)`` in [0, 1] saved as an 8-bit RGB JPEG."""
    arr = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a), mode="RGB").save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return sizes


class JpegIncompressibility(Reward):
    """JPEG file size in kB: larger is better."""

    name = "jpeg_incompressibility"
    differentiable = False
    sign = 1.0

    def __init__(self, quality: int = 95, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= quality <= 100:
            raise ValueError(f"quality={quality!r} must be between 1 and 100 (DDPO uses 95).")
        self.quality = quality

    def settings(self):
        return {"quality": self.quality}

    def score(self, images, prompts, **metadata):
        return [self.sign * s for s in jpeg_size_kb(images, self.quality)]


class JpegCompressibility(JpegIncompressibility):
    """Negative JPEG file size in kB: smaller files are better."""

    name = "jpeg_compressibility"
    sign = -1.0
