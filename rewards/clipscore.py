"""CLIP score: the cosine similarity between the image and the prompt under a transformers CLIP; differentiable.

Score: ``max(scale * cosine(image embedding, prompt embedding), clamp_min)``, by default the raw cosine
(``scale=1.0``, ``clamp_min=None``), about 0.2-0.35 for matching image-text pairs with CLIP ViT-L/14. torchmetrics'
``CLIPScore`` (and the CLIPScore paper's ``w = 100``-style tables) report ``max(100 * cosine, 0)``, which is
``scale=100.0, clamp_min=0.0``; the clamp's gradient is zero where it is active.

Checkpoint: any transformers ``CLIPModel``; default hub ``openai/clip-vit-large-patch14`` (torchmetrics' default
too): ``config.json``, ``model.safetensors`` and, from the same repository unless ``processor`` is given,
``preprocessor_config.json`` and the tokenizer files (``tokenizer_config.json``, ``vocab.json``, ``merges.txt``,
``tokenizer.json``, optional ``special_tokens_map.json``). OpenAI's CLIP weights are MIT-licensed.
``model="toy:clip"`` loads the small CLIP trained on the toy world that ships in ``diffrl/toy/assets/clip``
(:mod:`diffrl.toy.clip`; 64x64 input, 16-token prompts), a differentiable prompt-aware reward for toy runs.

Preprocessing (torch, differentiable): the processor's ``CLIPImageProcessor`` settings (for ViT-L/14: shorter
side to 224, bicubic, centre crop 224, OpenAI CLIP mean/std), see
:class:`~diffrl.rewards.clip_common.CLIPImageTransform`; prompts are padded / truncated to 77 tokens (torchmetrics
truncates too, with a warning).

Deviations from torchmetrics: scores are per image (torchmetrics averages over the batch), images are float tensors
rather than 8-bit images (processed pixels within about 0.017 of ``CLIPImageProcessor``'s, normalised units), and
the model runs in ``dtype`` with the cosine in float32.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .clip_common import CLIPImageTextReward, pair_hub_files
from .weights import HubFile

__all__ = ["CLIPScore", "CLIPSCORE_MODEL"]

CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class CLIPScore(CLIPImageTextReward):
    """``max(scale * cosine(image, prompt), clamp_min)`` under a CLIP model (default: the plain cosine).

    Args:
        model: hub id or local directory of a transformers ``CLIPModel``.
        processor: hub id or local directory of its processor (image settings and tokenizer); ``None``: ``model``.
        scale: factor on the cosine, a positive number (torchmetrics: 100).
        clamp_min: lower bound applied after scaling, or ``None`` for none (torchmetrics: 0).
        batch_size, device, dtype: see :class:`~diffrl.rewards.Reward`.
    """

    name = "clipscore"
    differentiable = True
    default_model = CLIPSCORE_MODEL

    def __init__(
        self,
        model: str | Path = CLIPSCORE_MODEL,
        processor: str | Path | None = None,
        scale: float = 1.0,
        clamp_min: float | None = None,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(model, processor, batch_size=batch_size, device=device, dtype=dtype)
        if not _is_number(scale) or scale <= 0:
            raise ValueError(
                f"scale={scale!r} must be a positive number (1.0: the cosine; torchmetrics uses 100)."
            )
        if clamp_min is not None and not _is_number(clamp_min):
            raise ValueError(
                f"clamp_min={clamp_min!r} must be a finite number or None (torchmetrics uses 0)."
            )
        self.scale = float(scale)
        self.clamp_min = None if clamp_min is None else float(clamp_min)

    @classmethod
    def hub_files(
        cls, model: str | Path = CLIPSCORE_MODEL, processor: str | Path | None = None, **kwargs
    ) -> list[HubFile]:
        return pair_hub_files(model, processor)

    def settings(self) -> dict[str, Any]:
        return {"score": "cosine", "scale": self.scale, "clamp_min": self.clamp_min, **super().settings()}

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        scores = self.scale * self.cosine(images, prompts)
        return scores if self.clamp_min is None else scores.clamp_min(self.clamp_min)
