"""LAION aesthetic score (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE"); differentiable.

Score: a small MLP on the L2-normalised CLIP ViT-L/14 image embedding, predicting the mean 1-10 rating people give
an image; about 5-6.5 for good generated or photographic images (the LAION-Aesthetics subsets cut at 5, 6 and
6.5). The prompt is not used. The head is ``Linear(768, 1024) Dropout Linear(1024, 128) Dropout Linear(128, 64)
Dropout Linear(64, 16) Linear(16, 1)`` with no activations, so it is an affine function of the embedding; its
state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``. The widths are read from the checkpoint, so a head for
another CLIP (or the tiny test one) loads too, as long as its input width is the CLIP's projection width.

Checkpoints: the head ``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth`` on the hub (3.7 MB; the LFS
SHA-256 ``21dd590f...f1e0`` is byte-identical to ``sac+logos+ava1-l14-linearMSE.pth`` of
github.com/christophschuhmann/improved-aesthetic-predictor, Apache-2.0; saved from ``cuda:0``, so it is loaded
with ``map_location="cpu"``), and the CLIP ``openai/clip-vit-large-patch14`` (``config.json``,
``model.safetensors``, ``preprocessor_config.json``; MIT). A local ``.pth`` file (or a directory holding
``head_filename``) and a local CLIP directory are accepted as well.

Preprocessing (torch, differentiable): the CLIP processor's settings (shorter side to 224, bicubic, centre crop
224, OpenAI CLIP mean/std), see :class:`~diffrl.rewards.clip_common.CLIPImageTransform`.

Deviations from the reference (OpenAI's ``clip`` package preprocessing PIL images, then ``encode_image``; TRL's
DDPO scorer uses transformers' ``CLIPProcessor`` + ``CLIPModel`` the same way): images are float tensors and the
resize runs in float, within about 0.017 (normalised units) of ``CLIPImageProcessor``'s pixels; the CLIP runs in
``dtype`` while the 3.7 MB head and the normalisation run in float32 (float64 if ``dtype`` is float64). Only the
vision half of the CLIP is kept in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .clip_common import (
    CLIPImageTransform,
    at_least_float32,
    check_spec,
    clip_hub_files,
    image_embeddings,
    is_local,
    load_clip_model,
    missing_files_named,
)
from .weights import HubFile, resolve_file, resolve_snapshot

__all__ = ["AestheticScore", "AestheticMLP", "AESTHETIC_HEAD_REPO", "AESTHETIC_HEAD_FILE", "AESTHETIC_CLIP"]

AESTHETIC_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "aesthetic-model.pth"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"

_LINEAR_INDICES = (0, 2, 4, 6, 7)  # positions of the Linear layers in the original nn.Sequential
_DROPOUTS = (0.2, 0.2, 0.1)  # after the first three Linear layers (inactive in eval mode)


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: ``embed_dim -> widths[0] -> ... -> widths[-1] -> 1``, dropout after
    the first three layers, no activations; the same module layout (and state-dict keys) as the original."""

    def __init__(self, embed_dim: int = 768, widths: Sequence[int] = (1024, 128, 64, 16)):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths={tuple(widths)} must have 4 hidden widths, like (1024, 128, 64, 16).")
        dims = [embed_dim, *widths, 1]
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(_DROPOUTS):
                layers.append(nn.Dropout(_DROPOUTS[i]))
        self.layers = nn.Sequential(*layers)

    @property
    def embed_dim(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> AestheticMLP:
        """Build the head with the widths found in ``state`` and load it (strictly)."""
        expected = {f"layers.{i}.{p}" for i in _LINEAR_INDICES for p in ("weight", "bias")}
        if not isinstance(state, dict) or set(state) != expected:
            found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{source} is not an improved-aesthetic-predictor head: expected the keys "
                f"{sorted(expected)}, found {found}; pass a file such as sac+logos+ava1-l14-linearMSE.pth."
            )
        shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in _LINEAR_INDICES]
        for (out_a, _), (_, in_b) in pairwise(shapes):
            if out_a != in_b:
                raise ValueError(f"{source}: the layer shapes {shapes} do not chain; the file is corrupt.")
        if shapes[-1][0] != 1:
            raise ValueError(
                f"{source}: the last layer has {shapes[-1][0]} outputs; an aesthetic head has 1."
            )
        head = cls(shapes[0][1], [s[0] for s in shapes[:-1]])
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:  # e.g. a bias of the wrong length
            raise ValueError(f"{source}: the weights do not fit the aesthetic head ({err}).") from err
        return head


class AestheticScore(Reward):
    """LAION aesthetic predictor: MLP(normalised CLIP ViT-L/14 image embedding), about 5-6.5 for good images.

    Args:
        clip_model: hub id or local directory of the transformers ``CLIPModel`` whose image embedding the head reads.
        head: hub repository id of the head, a local ``.pth`` file, or a directory holding ``head_filename``.
        head_filename: the head's file name in ``head`` (hub repository or directory).
        processor: hub id or local directory with the ``preprocessor_config.json``; ``None``: ``clip_model``'s.
        batch_size, device, dtype: see :class:`~diffrl.rewards.Reward` (``dtype`` applies to the CLIP; the head
            runs in float32).
    """

    name = "aesthetic"
    differentiable = True

    def __init__(
        self,
        clip_model: str | Path = AESTHETIC_CLIP,
        head: str | Path = AESTHETIC_HEAD_REPO,
        head_filename: str = AESTHETIC_HEAD_FILE,
        processor: str | Path | None = None,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        check_spec(clip_model, "clip_model", AESTHETIC_CLIP)
        check_spec(head, "head", AESTHETIC_HEAD_REPO)
        check_spec(processor, "processor", AESTHETIC_CLIP, allow_none=True)
        if not isinstance(head_filename, str) or not head_filename:
            raise ValueError(
                f"head_filename={head_filename!r} must be a file name such as {AESTHETIC_HEAD_FILE!r}."
            )
        self.clip_spec = clip_model
        self.head_spec = head
        self.head_filename = head_filename
        self.processor_spec = clip_model if processor is None else processor
        self.vision_model = None
        self.visual_projection = None
        self.head: AestheticMLP | None = None
        self.transform: CLIPImageTransform | None = None

    @classmethod
    def hub_files(
        cls,
        clip_model: str | Path = AESTHETIC_CLIP,
        head: str | Path = AESTHETIC_HEAD_REPO,
        head_filename: str = AESTHETIC_HEAD_FILE,
        processor: str | Path | None = None,
        **kwargs,
    ) -> list[HubFile]:
        processor = clip_model if processor is None else processor
        files = [] if is_local(head) else [HubFile(str(head), head_filename)]
        files += clip_hub_files(clip_model, model=True) + clip_hub_files(processor, image_processor=True)
        return list(dict.fromkeys(files))

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"score": "mlp(normalize(clip_image_embedding))", "dtype": str(self.dtype)}
        if self.transform is not None:
            out.update(self.transform.settings())
        return out

    def _load(self) -> None:
        files = self.hub_files(self.clip_spec, self.head_spec, self.head_filename, self.processor_spec)
        with missing_files_named(self.name, files):
            head_path = resolve_file(
                self.head_spec, HubFile(AESTHETIC_HEAD_REPO, self.head_filename), self.name
            )
            clip_dir = resolve_snapshot(self.clip_spec, clip_hub_files(self.clip_spec, model=True), self.name)
            processor_dir = resolve_snapshot(
                self.processor_spec, clip_hub_files(self.processor_spec, image_processor=True), self.name
            )
        # map_location: the original file holds cuda:0 tensors
        state = torch.load(head_path, map_location="cpu", weights_only=True)
        head = AestheticMLP.from_state_dict(state, source=str(head_path))
        self.transform = CLIPImageTransform.from_pretrained(processor_dir)
        clip = load_clip_model(clip_dir, self.name)
        width = clip.visual_projection.out_features
        if head.embed_dim != width:
            raise ValueError(
                f"reward {self.name!r}: the head {head_path} reads {head.embed_dim}-d embeddings but the CLIP "
                f"{self.clip_spec} gives {width}-d ones; sac+logos+ava1-l14-linearMSE goes with "
                f"{AESTHETIC_CLIP} (768-d)."
            )
        # Keep the vision half only: the text tower is not needed.
        self.vision_model = clip.vision_model.to(device=self.device, dtype=self.dtype)
        self.visual_projection = clip.visual_projection.to(device=self.device, dtype=self.dtype)
        head_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.head = head.eval().requires_grad_(False).to(device=self.device, dtype=head_dtype)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """float32 L2-normalised CLIP image embeddings ``(B, D)`` (differentiable in ``images``)."""
        pixels = self.transform(images).to(self.dtype)
        return F.normalize(
            at_least_float32(image_embeddings(self.vision_model, self.visual_projection, pixels)), dim=-1
        )

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        return self.head(self.embed(images))[:, 0]
