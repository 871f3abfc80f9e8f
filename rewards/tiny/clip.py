"""Tiny random-weight transformers CLIP checkpoints and aesthetic heads, built offline, for the tests of the
``pickscore``, ``clipscore`` and ``aesthetic`` rewards.

:func:`build_tiny_clip` writes a directory laid out like the hub repositories the rewards read
(``yuvalkirstain/PickScore_v1``, ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, ``openai/clip-vit-large-patch14``):
``config.json`` + ``model.safetensors`` of a real ``CLIPModel`` (same classes, tiny widths, 224 px input),
``preprocessor_config.json`` of a ``CLIPImageProcessor`` (CLIP's defaults), and a CLIP BPE tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``, ``merges.txt``), so the rewards load it through
their real loading path: ``PickScore(model=path, processor=path)``. The tokenizer is passed in: use the offline one
of :func:`diffrl.models.tiny.tiny_clip_tokenizer` (the rewards layer must not import ``diffrl.models`` itself)::

    from diffrl.models.tiny import tiny_clip_tokenizer
    build_tiny_clip(path, tiny_clip_tokenizer())

:func:`build_tiny_aesthetic_head` writes a ``.pth`` state dict with the key names of the improved-aesthetic-predictor
checkpoint (``layers.{0,2,4,6,7}.{weight,bias}``) for a CLIP of any projection width.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["build_tiny_clip", "build_tiny_aesthetic_head", "TINY_CLIP_PROJECTION_DIM"]

#: Projection (embedding) width of the tiny CLIP: the input width of a matching aesthetic head.
TINY_CLIP_PROJECTION_DIM = 16


def build_tiny_clip(
    path: str | Path,
    tokenizer=None,
    *,
    seed: int = 0,
    projection_dim: int = TINY_CLIP_PROJECTION_DIM,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    image_size: int = 224,
    patch_size: int = 32,
    logit_scale: float | None = None,
) -> Path:
    """Save a tiny ``CLIPModel`` + tokenizer + image processor config to the directory ``path``; returns it.

    Args:
        path: output directory (created).
        tokenizer: a transformers ``CLIPTokenizer`` (fast, byte-level BPE); default
            ``diffrl.tiny_tokenizers.tiny_clip_tokenizer()``. The text tower's vocabulary and length follow it.
        seed: weights are drawn from transformers' initialisation under this seed (the global RNG is untouched).
        projection_dim: width of the image / text embeddings.
        hidden_size, num_layers, num_heads: width, depth and heads of both towers.
        image_size, patch_size: the vision tower's input size (also the processor's resize and crop size) and patch.
        logit_scale: the (log) logit scale; ``None`` keeps CLIP's initial ``log(1 / 0.07)``.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    if tokenizer is None:
        from diffrl.tiny_tokenizers import tiny_clip_tokenizer

        tokenizer = tiny_clip_tokenizer()
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if type(backend).__name__ != "BPE" or not 0 < getattr(tokenizer, "model_max_length", 0) <= 77:
        raise TypeError(
            f"tokenizer={type(tokenizer).__name__} must be a byte-level BPE CLIPTokenizer with model_max_length <= 77, "
            "such as diffrl.models.tiny.tiny_clip_tokenizer()."
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tower = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # tokenizer.json + tokenizer_config.json
    backend.save(str(path))  # vocab.json + merges.txt, as in the hub repositories
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    return path


def build_tiny_aesthetic_head(
    path: str | Path,
    embed_dim: int = TINY_CLIP_PROJECTION_DIM,
    *,
    seed: int = 0,
    widths: Sequence[int] = (32, 16, 8, 4),
) -> Path:
    """Save a random aesthetic head (the original's layout, hidden ``widths`` instead of 1024, 128, 64, 16) reading
    ``embed_dim``-d embeddings as a ``.pth`` state dict at ``path`` (a file; parents created); returns it."""
    from diffrl.rewards.aesthetic import AestheticMLP

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticMLP(embed_dim, widths)
        for (
            layer
        ) in head.layers:  # variance-preserving weights, so the score moves visibly with the embedding
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
    torch.save(head.state_dict(), path)
    return path
