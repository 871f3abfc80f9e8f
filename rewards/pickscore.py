"""PickScore: a CLIP ViT-H/14 fine-tuned on the Pick-a-Pic human preferences (Kirstain et al., arXiv 2305.01569);
differentiable.

Score: ``logit_scale.exp() * cosine(image embedding, prompt embedding)`` of the fine-tuned ``CLIPModel`` (its
learned ``logit_scale.exp()`` is about 100), as in the official inference example; about 21-23 for images of
Stable-Diffusion-class models on their own prompts. Scores compare images of the same prompt (the paper turns
them into preferences with a softmax over a prompt's images).

Checkpoint: hub ``yuvalkirstain/PickScore_v1`` (``config.json``, ``model.safetensors``; 3.94 GB in float32) with
the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (``preprocessor_config.json`` and the tokenizer files:
``tokenizer_config.json``, ``vocab.json``, ``merges.txt``, ``tokenizer.json``, optional
``special_tokens_map.json``), as the official example loads them. The PickScore repository sets no licence on the
hub; the base model (LAION's ViT-H-14) is MIT. Check the model card before commercial use.

Preprocessing (torch, differentiable): the processor's ``CLIPImageProcessor`` settings (shorter side to 224,
bicubic, centre crop 224, OpenAI CLIP mean/std) in :class:`~diffrl.rewards.clip_common.CLIPImageTransform`; prompts
are padded / truncated to 77 tokens.

Deviations from the reference (``AutoProcessor`` + ``AutoModel`` on PIL images): images are float tensors, not
8-bit PIL images, and the resize runs in float (the reference rounds to 8 bits after each resize pass); the
processed pixels differ by at most about 0.017 (normalised units; see ``tests/test_reward_clip.py``). The model
runs in ``dtype``; the cosine and the scale are computed in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .clip_common import CLIPImageTextReward, at_least_float32, pair_hub_files
from .weights import HubFile

__all__ = ["PickScore", "PICKSCORE_MODEL", "PICKSCORE_PROCESSOR"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(CLIPImageTextReward):
    """PickScore, ``logit_scale.exp() * cosine(image, prompt)`` (about 21-23 for SD-class images).

    Args:
        model: hub id or local directory of the transformers ``CLIPModel`` (``config.json``, ``model.safetensors``).
        processor: hub id or local directory of the processor (``preprocessor_config.json`` and the tokenizer
            files); ``None`` uses ``model``'s directory.
        batch_size, device, dtype: see :class:`~diffrl.rewards.Reward`.
    """

    name = "pickscore"
    differentiable = True
    default_model = PICKSCORE_MODEL

    def __init__(
        self,
        model: str | Path = PICKSCORE_MODEL,
        processor: str | Path | None = PICKSCORE_PROCESSOR,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(model, processor, batch_size=batch_size, device=device, dtype=dtype)

    @classmethod
    def hub_files(
        cls, model: str | Path = PICKSCORE_MODEL, processor: str | Path | None = PICKSCORE_PROCESSOR, **kwargs
    ) -> list[HubFile]:
        return pair_hub_files(model, processor)

    def settings(self) -> dict[str, Any]:
        return {"score": "logit_scale.exp() * cosine", **super().settings()}

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        return at_least_float32(self.model.logit_scale).exp() * self.cosine(images, prompts)
