"""A tiny random-weight open_clip CLIP with the structure of ViT-H-14, for offline tests of the HPSv2 reward.

The architecture is registered with open_clip under :data:`TINY_OPEN_CLIP_ARCH` (same model class as ViT-H-14: a
vision transformer at 224 px with patch 14 and class-token pooling, a causal text transformer over the same 49408
BPE vocabulary with 77 tokens, the same tokenizer), only with tiny widths and depths. :func:`save_tiny_hps_checkpoint`
writes it in the format of the HPSv2 files on the hub (``{"state_dict": model.state_dict()}``), so tests load it
through the reward's real loading path: ``HPSv2(checkpoint=<file>, arch=TINY_OPEN_CLIP_ARCH)``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = [
    "TINY_OPEN_CLIP_ARCH",
    "TINY_OPEN_CLIP_CONFIG",
    "register_tiny_open_clip",
    "build_tiny_open_clip",
    "save_tiny_hps_checkpoint",
]

TINY_OPEN_CLIP_ARCH = "diffrl-tiny-ViT-H-14"

# The keys of open_clip's ViT-H-14 config (embed 1024; vision 32 x 1280, head width 80; text 24 x 1024, 16 heads),
# with tiny sizes. Only keys that every open_clip version understands, so the vendored copy in the `hpsv2` package
# can build the same model (benchmarks/parity_hpsv2.py).
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_open_clip() -> str:
    """Make ``open_clip.create_model`` / ``get_tokenizer`` know the tiny architecture; returns its name."""
    import open_clip

    if TINY_OPEN_CLIP_ARCH not in open_clip.list_models():
        # open_clip reads the JSON when registering and keeps the config in memory, so the file can go afterwards.
        with tempfile.TemporaryDirectory(prefix="diffrl_tiny_open_clip_") as tmp:
            path = Path(tmp) / f"{TINY_OPEN_CLIP_ARCH}.json"
            path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
            open_clip.add_model_config(path)
    return TINY_OPEN_CLIP_ARCH


def build_tiny_open_clip(seed: int = 0) -> torch.nn.Module:
    """The tiny CLIP with weights drawn from open_clip's own initialisation under ``seed`` (global RNG untouched)."""
    import open_clip

    arch = register_tiny_open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
    return model.eval()


def save_tiny_hps_checkpoint(
    directory: str | Path, filename: str = "HPS_v2.1_compressed.pt", seed: int = 0
) -> Path:
    """Save the tiny CLIP as an HPSv2-style checkpoint ``{"state_dict": ...}`` in ``directory``; returns the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    torch.save({"state_dict": build_tiny_open_clip(seed).state_dict()}, path)
    return path
