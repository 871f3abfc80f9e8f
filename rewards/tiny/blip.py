"""A tiny random-weight ImageReward (BLIP) in the original checkpoint format, built offline for tests.

:func:`imagereward_original_shapes` lists every tensor of the original ``ImageReward`` module's state dict (the
names and shapes ``torch.save(model.state_dict())`` writes, i.e. what ``ImageReward.pt`` holds) for any sizes,
following the original code:

* ``ImageReward``: ``blip`` (``BLIP_Pretrain``) and ``mlp.layers`` = ``Sequential(Linear(T, 1024), Dropout,
  Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1))``: Linear at 0, 2, 4, 6, 7.
* ``BLIP_Pretrain``: ``visual_encoder`` (ViT), ``text_encoder`` (``med.BertModel(add_pooling_layer=False)`` with
  ``encoder_width`` set to the ViT width V), ``vision_proj = Linear(V, 256)``, ``text_proj = Linear(T, 256)``.
* ViT (``vit.VisionTransformer``, qkv_bias, mlp_ratio 4): ``cls_token (1, 1, V)``, ``pos_embed (1, 1 + (S/p)^2, V)``,
  ``patch_embed.proj`` Conv2d(3, V, p, stride p) (timm ``PatchEmbed``, its norm an Identity), ``blocks.<i>.norm1``,
  ``.attn.qkv (3V, V)``, ``.attn.proj (V, V)``, ``.norm2``, ``.mlp.fc1 (4V, V)``, ``.mlp.fc2 (V, 4V)``, then ``norm``;
  no classifier head.
* BERT (``med.py``): ``embeddings.word_embeddings (vocab, T)``, ``embeddings.position_embeddings (P, T)``,
  ``embeddings.LayerNorm``, the persistent buffer ``embeddings.position_ids (1, P)`` (no token-type embeddings);
  per layer ``attention.self.{query,key,value} (T, T)``, ``attention.output.{dense (T, T), LayerNorm}``,
  ``crossattention.self.query (T, T)``, ``crossattention.self.{key,value} (T, V)``,
  ``crossattention.output.{dense, LayerNorm}``, ``intermediate.dense (I, T)``, ``output.{dense (T, I), LayerNorm}``.

:func:`build_tiny_imagereward` writes such a checkpoint with tiny sizes, a tiny ``med_config.json`` and an offline
BERT tokenizer, loadable with ``ImageReward(checkpoint=<dir>/ImageReward.pt, med_config=<dir>/med_config.json,
tokenizer=<dir>/tokenizer)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["imagereward_original_shapes", "build_tiny_imagereward", "TINY_VOCAB", "REAL_MED_CONFIG"]

# THUDM/ImageReward's med_config.json (the BERT-base configuration BLIP uses).
REAL_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}

MLP_WIDTHS = (1024, 128, 64, 16, 1)  # outputs of the Linear layers at indices 0, 2, 4, 6, 7
MLP_INDICES = (0, 2, 4, 6, 7)

TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "-"]
    + "a an the of in on with and at by day night time low high depth field effect light".split()
    + "photo painting picture portrait drawing render cat dog bird birds ocean sea sky clouds city tree".split()
    + "red blue green yellow black white old young small big".split()
    + ["##s", "##ed", "##ing", "##y"]
)


def imagereward_original_shapes(
    *,
    vision_width: int = 1024,
    vision_depth: int = 24,
    patch_size: int = 16,
    image_size: int = 224,
    text_hidden: int = 768,
    text_layers: int = 12,
    text_intermediate: int = 3072,
    vocab_size: int = 30524,
    max_positions: int = 512,
    embed_dim: int = 256,
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the original ``ImageReward`` state dict (defaults: ImageReward v1.0, ViT-L/16 at 224
    and BERT-base). ``blip.text_encoder.embeddings.position_ids`` is an int64 buffer, every other entry float."""
    v, t, i = vision_width, text_hidden, text_intermediate
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        shapes[f"{name}.weight"] = (out_features, in_features)
        shapes[f"{name}.bias"] = (out_features,)

    def layer_norm(name: str, width: int) -> None:
        shapes[f"{name}.weight"] = (width,)
        shapes[f"{name}.bias"] = (width,)

    ve = "blip.visual_encoder"
    shapes[f"{ve}.cls_token"] = (1, 1, v)
    shapes[f"{ve}.pos_embed"] = (1, 1 + (image_size // patch_size) ** 2, v)
    shapes[f"{ve}.patch_embed.proj.weight"] = (v, 3, patch_size, patch_size)
    shapes[f"{ve}.patch_embed.proj.bias"] = (v,)
    for b in range(vision_depth):
        p = f"{ve}.blocks.{b}"
        layer_norm(f"{p}.norm1", v)
        linear(f"{p}.attn.qkv", 3 * v, v)
        linear(f"{p}.attn.proj", v, v)
        layer_norm(f"{p}.norm2", v)
        linear(f"{p}.mlp.fc1", 4 * v, v)
        linear(f"{p}.mlp.fc2", v, 4 * v)
    layer_norm(f"{ve}.norm", v)

    te = "blip.text_encoder"
    shapes[f"{te}.embeddings.position_ids"] = (1, max_positions)
    shapes[f"{te}.embeddings.word_embeddings.weight"] = (vocab_size, t)
    shapes[f"{te}.embeddings.position_embeddings.weight"] = (max_positions, t)
    layer_norm(f"{te}.embeddings.LayerNorm", t)
    for n in range(text_layers):
        p = f"{te}.encoder.layer.{n}"
        for attn, kv_width in (("attention", t), ("crossattention", v)):
            linear(f"{p}.{attn}.self.query", t, t)
            linear(f"{p}.{attn}.self.key", t, kv_width)
            linear(f"{p}.{attn}.self.value", t, kv_width)
            linear(f"{p}.{attn}.output.dense", t, t)
            layer_norm(f"{p}.{attn}.output.LayerNorm", t)
        linear(f"{p}.intermediate.dense", i, t)
        linear(f"{p}.output.dense", t, i)
        layer_norm(f"{p}.output.LayerNorm", t)

    linear("blip.vision_proj", embed_dim, v)
    linear("blip.text_proj", embed_dim, t)

    width = t
    for index, out in zip(MLP_INDICES, MLP_WIDTHS, strict=True):
        linear(f"mlp.layers.{index}", out, width)
        width = out
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random values that keep a deep random network sensitive to its input (unit-variance activations)."""
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    if "LayerNorm" in name or ".norm" in name:
        base = 1.0 if name.endswith("weight") else 0.0
        return base + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("bias"):
        return 0.05 * torch.randn(shape, generator=g)
    if name.endswith(("cls_token", "pos_embed")) or "embeddings." in name:
        return 0.5 * torch.randn(shape, generator=g)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=g) / fan_in**0.5


def build_tiny_imagereward(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny ImageReward to ``path``: ``ImageReward.pt`` (original key names; ViT width 128 with 2 heads of
    64, 2 blocks, patch 16 at 224 px; BERT width 32, 2 layers, 2 heads; the real MLP widths), ``med_config.json``
    and ``tokenizer/`` (a ``BertTokenizer`` from a small ``vocab.txt`` with ``[DEC]`` and ``[ENC]`` added).
    Returns ``path``."""
    from transformers import BertTokenizer

    root = Path(path)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(tok_dir))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.save_pretrained(str(tok_dir))
    vocab_size = len(tokenizer)  # the words plus [DEC] and [ENC], as 30522 + 2 = 30524 for the real model

    med = dict(
        REAL_MED_CONFIG,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=40,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=vocab_size,
    )  # "encoder_width": 768 kept as in the real file: BLIP overrides it with the ViT width
    (root / "med_config.json").write_text(json.dumps(med, indent=2), encoding="utf-8")

    shapes = imagereward_original_shapes(
        vision_width=128,
        vision_depth=2,
        patch_size=16,
        image_size=224,
        text_hidden=med["hidden_size"],
        text_layers=med["num_hidden_layers"],
        text_intermediate=med["intermediate_size"],
        vocab_size=vocab_size,
        max_positions=med["max_position_embeddings"],
    )
    g = torch.Generator().manual_seed(seed)
    state = {name: _random_tensor(name, shape, g) for name, shape in shapes.items()}
    torch.save(state, root / "ImageReward.pt")
    return root
