"""A tiny random-weight HPSv3 (Qwen2-VL + reward head), built offline, in the layout of the real files.

:func:`build_tiny_hpsv3` writes one directory that serves as both of the reward's sources:

* the base model, as in ``Qwen/Qwen2-VL-7B-Instruct``: ``config.json`` in the flat Qwen2-VL format of that
  repository (transformers 4.45 and 5 both read it), ``preprocessor_config.json`` (``Qwen2VLImageProcessor``
  with the real ``min_pixels``/``max_pixels``/patch sizes and CLIP mean/std), ``chat_template.json`` (the Qwen
  chat format of :data:`diffrl.rewards.tiny.vlm.TINY_CHAT_TEMPLATE`) and a byte-level BPE ``Qwen2Tokenizer``
  written here (the 256 byte symbols, merges that make most words of the HPSv3 instruction single tokens, and
  the 14 special tokens of Qwen2-VL; no ``<|Reward|>``, which the reward adds as the reference does), and the
  base model's own weights ``model.safetensors`` (another random draw, padded vocabulary): the reward never reads
  them, the reference loads them before the checkpoint replaces every one;
* the checkpoint ``HPSv3.safetensors``: the full state dict with transformers 4.45 key names (``visual.*``,
  ``model.*``, ``lm_head.weight``, ``rm_head.{0,3,5}.*``) and embeddings of ``len(tokenizer) + 1`` rows, as
  ``hpsv3/train.py`` resizes them (``config.json`` keeps the larger, padded ``vocab_size``, as the real one does).

The model: a ``Qwen2VLForConditionalGeneration`` with 2 text layers of width 32, 2 vision blocks of width 32
(patch 14, merge 2), and HPSv3's head shape (``Linear(32, 1024), ReLU, Dropout, Linear(1024, 16), ReLU,
Linear(16, 2)``), about 0.2 M parameters; a 448 x 448 image is 1024 patches, 256 visual tokens. The weights are
random (transformers' initialisation with ``initializer_range=0.1`` under ``seed``) except the head's last layer,
rescaled so that ``mu`` varies by about 1 between images and prompts (see :func:`_calibrate_head`), so that the
tests can tell a wrong image or prompt from a right one. Building takes about a second (the first build in a
process about five, importing transformers' Qwen2-VL).

``HPSv3(checkpoint=path, base_model=path)`` loads it through the real loading path; the reference
``hpsv3.HPSv3RewardInferencer`` loads the same directory (``benchmarks/parity_hpsv3.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..hpsv3 import HPSV3_FILE, INSTRUCTION, RATING_SUFFIX, RewardHead, split_checkpoint
from .vlm import TINY_CHAT_TEMPLATE

__all__ = ["build_tiny_hpsv3", "QWEN2_VL_SPECIAL_TOKENS", "TINY_HIDDEN_SIZE"]

#: The special tokens of Qwen2-VL's tokenizer, in id order after the regular vocabulary.
QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TINY_HIDDEN_SIZE = 32
_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_CALIBRATION_PROMPTS = ("a cat", "a red car on a rainy street at night", "two birds", "an apple on a table")


def _merges_for(text: str, pre_tokenize) -> list[tuple[str, str]]:
    """Left-to-right merges that build each pre-token of ``text`` (a byte-level string) from its symbols."""
    merges: dict[tuple[str, str], None] = {}
    for piece, _ in pre_tokenize(text):
        for i in range(2, len(piece) + 1):
            merges[(piece[: i - 1], piece[i - 1])] = None
    return list(merges)


def _tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    bare = Qwen2Tokenizer(
        vocab=dict(vocab), merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    merges = _merges_for(INSTRUCTION + RATING_SUFFIX, bare.backend_tokenizer.pre_tokenizer.pre_tokenize_str)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": QWEN2_VL_SPECIAL_TOKENS[1:]})
    return tok


def _flat_config(tok, vocab_size: int) -> dict:
    """config.json in the flat Qwen2-VL format of the hub repository (tiny sizes)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": TINY_HIDDEN_SIZE,
        "initializer_range": 0.1,
        "intermediate_size": 64,
        "max_position_embeddings": 4096,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,
            "embed_dim": 32,
            "mlp_ratio": 2,
            "num_heads": 2,
            "in_chans": 3,
            "hidden_size": TINY_HIDDEN_SIZE,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
        "vocab_size": vocab_size,
    }


def _calibration_images() -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    return torch.stack(
        [
            torch.stack([xs, ys, 1 - xs]),
            torch.stack([0.5 + 0.5 * torch.sin(9 * xs), ys * xs, 1 - ys]),
            torch.stack([ys, 1 - ys, (xs > 0.5).float()]),
            torch.stack([(xs - 0.5).abs() * 2, 0.3 + 0 * xs, (ys > 0.3).float()]),
        ]
    )


def _calibrate_head(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Random weights give ``mu`` values that differ little between inputs; rescale the head's last layer so that
    over a few images and prompts ``mu`` has mean 5 and spread 1 and ``log sigma`` mean 0 and spread 0.3."""
    from ..hpsv3 import HPSv3

    reward = HPSv3(checkpoint=path, base_model=path).load()
    images = _calibration_images()
    prompts = list(_CALIBRATION_PROMPTS)
    with torch.no_grad():
        outputs = reward.outputs(images, prompts)  # (4, 2), with the random last layer
        outputs = torch.cat([outputs, reward.outputs(images.flip(0), prompts)])
    weight, bias = state["rm_head.5.weight"], state["rm_head.5.bias"]
    for row, (mean, spread) in enumerate(((5.0, 1.0), (0.0, 0.3))):
        values = outputs[:, row]
        scale = spread / values.std().clamp_min(1e-12)
        weight[row] = weight[row] * scale
        bias[row] = (bias[row] - values.mean()) * scale + mean


def _legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names of a ``Qwen2VLForConditionalGeneration`` -> the 4.45 names of the hub files."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.visual."):
            key = key[len("model.") :]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        out[key] = value.detach().clone().contiguous()
    return out


def build_tiny_hpsv3(path: str | Path, *, seed: int = 0, checkpoint_dtype=torch.float32) -> Path:
    """Save a tiny random HPSv3 (base model files and ``HPSv3.safetensors``) to the directory ``path``.

    ``checkpoint_dtype``: dtype of the backbone's tensors in the file (the real one is bfloat16); the head is
    always saved in float32, as the reference keeps it."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    tok.save_pretrained(path)
    rows = len(tok) + 1  # the reference adds <|Reward|> and resizes the embeddings to the tokenizer's length
    (path / "config.json").write_text(json.dumps(_flat_config(tok, 64 * ((rows + 63) // 64)), indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": TINY_CHAT_TEMPLATE}, indent=2))
    processor_config = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": _OPENAI_CLIP_MEAN,
        "image_std": _OPENAI_CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2))

    config = Qwen2VLConfig.from_pretrained(path)
    generator_state = torch.random.get_rng_state()
    try:
        # The base model's own weights (another draw, the padded vocabulary): never read by the reward, which
        # takes every weight from the checkpoint, but the reference loads them before replacing them.
        torch.manual_seed(seed + 1)
        base = Qwen2VLForConditionalGeneration(config).eval()
        torch.manual_seed(seed)
        config.get_text_config().vocab_size = rows
        model = Qwen2VLForConditionalGeneration(config).eval()
        head = RewardHead(TINY_HIDDEN_SIZE)
    finally:
        torch.random.set_rng_state(generator_state)
    save_file(_legacy_names(base.state_dict()), str(path / "model.safetensors"), metadata={"format": "pt"})
    state = _legacy_names(model.state_dict())
    state.update({f"rm_head.{k}": v.detach().clone().float() for k, v in head.state_dict().items()})
    split_checkpoint(state)  # the layout check the reward does
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / HPSV3_FILE))
    _calibrate_head(path, state)
    for key, value in state.items():
        if not key.startswith("rm_head."):
            state[key] = value.to(checkpoint_dtype)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / HPSV3_FILE))
    return path
