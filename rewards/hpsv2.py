"""HPSv2 / HPSv2.1: Human Preference Score v2, an OpenCLIP ViT-H-14 fine-tuned on human preferences (differentiable).

Score: the cosine similarity between the L2-normalised image embedding and the L2-normalised prompt embedding of
the fine-tuned CLIP, i.e. what ``hpsv2.score(...)`` returns. Tables of the HPSv2 paper and README print it x100:
the README's v2.1 benchmark averages 30.63 for SDXL Base 0.9 and 25.35 for Stable Diffusion v1.4 (v2.0: 27.73 and
26.95), i.e. raw scores of about 0.25-0.33 for text-to-image outputs; multiply by 100 to compare with those tables.
Scores are meant to compare images of the same prompt, and v2.0 and v2.1 scores are not comparable.

Checkpoints: hub repository ``xswu/HPSv2``, file ``HPS_v2.1_compressed.pt`` (version ``"v2.1"``, the default) or
``HPS_v2_compressed.pt`` (``"v2.0"``, alias ``"v2"``); each holds ``{"state_dict": ...}`` for
``open_clip.create_model("ViT-H-14")`` (about 2 GB). Licence: the HPSv2 code and ``hpsv2`` package are Apache-2.0
and the base model (LAION's ViT-H-14) is MIT; check the hub repository for any terms of its own on the weights.

Preprocessing (torch, differentiable): resize the longest side to 224 (bicubic, antialiased; sizes rounded with
Python's ``round``), pad with zeros centred to 224 x 224 (the pad is black in [0, 1] space, i.e. added before
normalisation), normalise with the OpenAI CLIP mean/std. This is HPSv2's evaluation transform (``ToTensor`` then
``ResizeMaxSize`` on the float tensor, then ``Normalize``), which open_clip's ``image_transform(...,
resize_mode="longest")`` also implements, on the PIL image.

Deviations from the reference (``hpsv2.img_score.score``):

* The reference runs the fp32 model under ``torch.cuda.amp.autocast()`` (float16 matmuls on a GPU, full fp32 on
  a CPU); here the model runs in ``dtype`` (float32 by default) without autocast, so on a GPU the two differ by
  float16 round-off. On a CPU they agree to 1e-7 (benchmarks/parity_hpsv2.py, shared tiny weights); the
  ViT-H-14 state dicts of open_clip 3.3 and of the package's vendored open_clip have identical names and shapes.
* The reference resizes with torchvision's tensor ``resize``, antialiased since torchvision 0.17; with an older
  torchvision (no antialiasing) its scores of images larger than 224 px differ from these slightly.
* An image whose longest side is already 224 but is not square is padded here; the reference skips the padding
  then (and its model cannot take the non-square input).
* Images are taken as float tensors in [0, 1] (no 8-bit rounding as when a PIL image is read).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize_longest_pad
from .weights import HubFile, resolve_file

__all__ = ["HPSv2", "HPS_REPO", "HPS_FILES", "hps_preprocess"]

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_VERSION_ALIASES = {"v2": "v2.0", "v2.0": "v2.0", "v2.1": "v2.1"}


def hps_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform in torch: longest side to ``size`` (bicubic), zero-pad centred, normalise."""
    return normalize(resize_longest_pad(images.float(), size, fill=0.0), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _canonical_version(version: str) -> str:
    if version not in _VERSION_ALIASES:
        raise ValueError(f"unknown HPS version {version!r}; pass one of 'v2.1' (default), 'v2.0' (or 'v2').")
    return _VERSION_ALIASES[version]


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init():
    """Hide open_clip's 'initialized randomly' warning: the HPS weights are loaded right after creation."""
    root = logging.getLogger()
    flt = _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


class _ScoreWeights(torch.nn.Module):
    """A view of the CLIP whose state dict lacks ``logit_scale``, for :meth:`HPSv2.weight_modules`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in self.model.state_dict().items() if k != "logit_scale"}


def _is_local(spec: str | Path) -> bool:
    path = Path(spec).expanduser()
    return (
        path.exists()
        or str(spec).startswith((".", "/", "~"))
        or path.suffix in {".pt", ".pth", ".bin", ".safetensors"}
    )


class HPSv2(Reward):
    """HPSv2 / HPSv2.1 score: cosine(image, prompt) of the fine-tuned OpenCLIP ViT-H-14 (raw, not x100).

    Args:
        version: ``"v2.1"`` (default, ``HPS_v2.1_compressed.pt``) or ``"v2.0"`` / ``"v2"`` (``HPS_v2_compressed.pt``).
        checkpoint: ``None`` (the version's file of ``xswu/HPSv2`` from the Hugging Face cache or hub), a local
            ``.pt`` file holding ``{"state_dict": ...}``, a directory holding the version's file name, or another
            hub repository id holding that file.
        arch: the open_clip architecture the checkpoint loads into (``"ViT-H-14"``; tests pass a tiny one).
        batch_size, device, dtype: see :class:`diffrl.rewards.Reward`.
    """

    name = "hpsv2"
    differentiable = True

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint: str | Path | None = None,
        arch: str = "ViT-H-14",
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.version = _canonical_version(version)
        if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
            raise TypeError(
                f"checkpoint={checkpoint!r} must be None, a path to a .pt file or a hub repository id."
            )
        if not isinstance(arch, str) or not arch:
            raise ValueError(f"arch={arch!r} must be an open_clip model name such as 'ViT-H-14'.")
        self.checkpoint = checkpoint
        self.arch = arch
        self.image_size = 224

    @classmethod
    def hub_files(
        cls, version: str = "v2.1", checkpoint: str | Path | None = None, **kwargs
    ) -> list[HubFile]:
        version = _canonical_version(version)
        filename = HPS_FILES[version]
        if checkpoint is None:
            return [HubFile(HPS_REPO, filename)]
        if _is_local(checkpoint):
            return []
        return [HubFile(str(checkpoint), filename)]

    def settings(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "arch": self.arch,
            "image_size": self.image_size,
            "preprocess": "resize_longest_bicubic_antialias+zero_pad+openai_clip_norm",
            "score": "cosine",
            "dtype": str(self.dtype),
        }

    def _load(self) -> None:
        # Resolve the file first: with weights absent offline this fails at once, before importing open_clip.
        path = resolve_file(self.checkpoint, HubFile(HPS_REPO, HPS_FILES[self.version]), self.name)

        import open_clip

        if self.arch not in open_clip.list_models():
            raise ValueError(
                f"arch={self.arch!r} is not an open_clip model name; pass one of open_clip.list_models() "
                "(HPSv2 uses 'ViT-H-14') or register it with open_clip.add_model_config first."
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or not state:
            raise ValueError(
                f"reward {self.name!r}: {path} holds no state dict; pass an HPSv2 checkpoint "
                "({'state_dict': ...}) such as HPS_v2.1_compressed.pt."
            )
        if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
            state = {k[len("module.") :]: v for k, v in state.items()}
        with _quiet_random_init():
            model = open_clip.create_model(self.arch, pretrained=None, device="cpu")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"reward {self.name!r}: {path} does not fit open_clip arch {self.arch!r} ({err}); "
                "pass the arch the checkpoint was trained with (HPSv2: 'ViT-H-14')."
            ) from err
        image_size = model.visual.image_size
        self.image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
        self.model = model.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
        self.tokenizer = open_clip.get_tokenizer(self.arch)

    def weight_modules(self) -> list[torch.nn.Module]:
        # CLIP's logit_scale does not enter the score (a cosine), so it stays out of the fingerprint.
        return [_ScoreWeights(self.model)] if hasattr(self, "model") else []

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised float32 prompt embeddings ``(b, d)``."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings ``(b, d)`` of images ``(b, 3, H, W)`` in [0, 1]."""
        pixels = hps_preprocess(images, self.image_size).to(self.dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        return (self.encode_image(images) * self.encode_text(prompts)).sum(dim=-1)
