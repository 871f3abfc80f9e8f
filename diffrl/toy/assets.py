"""Where the toy world's shipped weights live: ``diffrl/toy/assets/`` inside the package.

* ``toy_model_dir()``: the pretrained toy text-to-image model, a diffusers ``StableDiffusion3Pipeline`` directory
  (no T5); ``load_model("toy")`` loads it. Re-create with ``python scripts/train_toy_model.py`` (see its docstring).
* ``toy_clip_dir()``: the small CLIP trained on the toy world, a transformers ``CLIPModel`` directory; the
  ``clipscore`` reward loads it with ``model="toy:clip"``. Re-create with ``python scripts/train_toy_clip.py``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS", "toy_model_dir", "toy_clip_dir"]

ASSETS = Path(__file__).resolve().parent / "assets"


def _require(path: Path, marker: str, what: str, command: str) -> Path:
    if not (path / marker).is_file():
        raise FileNotFoundError(
            f"the {what} is not in this checkout ({path} has no {marker}); re-create it with: {command}"
        )
    return path


def toy_model_dir() -> Path:
    """The shipped toy SD3 pipeline directory."""
    return _require(
        ASSETS / "sd3",
        "model_index.json",
        "toy text-to-image model",
        "python scripts/train_toy_model.py --out runs/toy-model && cp -r runs/toy-model/ckpt-7000 diffrl/toy/assets/sd3",
    )


def toy_clip_dir() -> Path:
    """The shipped toy CLIP directory."""
    return _require(
        ASSETS / "clip",
        "config.json",
        "toy CLIP",
        "python scripts/train_toy_clip.py --out diffrl/toy/assets/clip",
    )
