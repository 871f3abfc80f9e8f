"""Where the toy world's shipped weights live: ``diffrl/toy/assets/`` inside the package.

* ``toy_model_dir()``: the pretrained toy text-to-image model, a diffusers ``StableDiffusion3Pipeline`` directory
  (trained without T5; its ``text_encoder_3`` is a null T5 of zero output, so that a plain
  ``StableDiffusion3Pipeline.from_pretrained(dir)`` loads it); ``load_model("toy")`` loads it. Re-create with ``python scripts/train_toy_model.py`` (see its docstring).
* ``toy_cliptext_model_dir()``: the demo's base, the same model rebuilt around the toy CLIP's text tower (which
  tells "left of" from "right of") and trained 5 000 more steps; ``load_model("toy:cliptext")`` loads it. Re-create
  with ``python benchmarks/toy_base_clip_text.py`` (see :data:`diffrl.utils.SHIPPED_CHECKPOINTS` for the command).
* ``toy_clip_dir()``: the small CLIP trained on the toy world, a transformers ``CLIPModel`` directory; the
  ``clipscore`` reward loads it with ``model="toy:clip"``. Re-create with ``python scripts/train_toy_clip.py``.

The table of shipped folders is :data:`diffrl.utils.SHIPPED_CHECKPOINTS` (rewards read ``"toy:clip"`` from there
without importing the toy world).
"""

from __future__ import annotations

from pathlib import Path

from diffrl.utils import SHIPPED_ROOT, shipped_checkpoint

__all__ = ["ASSETS", "toy_model_dir", "toy_cliptext_model_dir", "toy_clip_dir"]

ASSETS = SHIPPED_ROOT


def toy_model_dir() -> Path:
    """The shipped toy SD3 pipeline directory."""
    return shipped_checkpoint("toy")


def toy_cliptext_model_dir() -> Path:
    """The shipped toy SD3 pipeline directory conditioned on the toy CLIP's text tower (the demo's base)."""
    return shipped_checkpoint("toy:cliptext")


def toy_clip_dir() -> Path:
    """The shipped toy CLIP directory."""
    return shipped_checkpoint("toy:clip")
