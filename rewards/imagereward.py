"""ImageReward v1.0 (Xu et al. 2023, arXiv 2304.05977): a BLIP model fine-tuned on human preferences (differentiable).

Score: the image goes through BLIP's ViT-L/16 (224 px); the prompt (BERT ``bert-base-uncased`` WordPiece, padded
and truncated to 35 tokens, ``[CLS]`` first) goes through BLIP's BERT-base text encoder, which cross-attends to
every image token in each of its 12 layers; the final hidden state of ``[CLS]`` goes through a linear MLP
768 -> 1024 -> 128 -> 64 -> 16 -> 1 (no activations; its dropouts are off at inference) and is standardised:
``(mlp(h_cls) - 0.16717362830052426) / 1.0333394966054072``, what ``ImageReward.score(prompt, image)`` returns.
Scores are standardised over the training data, so most lie roughly in [-2.5, 2.5] (the README's example prints 0.58,
0.27, -1.41 and -2.03 for four images of one prompt); ReFL's loss is ``relu(2 - score)``.

Checkpoint: hub repository ``THUDM/ImageReward``, files ``ImageReward.pt`` (a plain state dict of the original
``ImageReward`` module, about 1.8 GB) and ``med_config.json`` (the BERT configuration); the tokenizer is
``bert-base-uncased`` (files ``vocab.txt`` and ``tokenizer_config.json``) with BLIP's special tokens ``[DEC]``
(bos) and ``[ENC]`` added. Licence: the ImageReward code is Apache-2.0; check the hub repository for terms of its
own on the weights.

Implementation: the original BLIP modules (timm-style ViT and BLIP's ``med.py`` BERT) are replaced by
``transformers.BlipVisionModel`` and ``transformers.BlipTextModel``; :func:`convert_imagereward_state_dict` maps
every key of the original checkpoint to them (the text keys keep their names; the ViT keys are renamed, see
``_VISION_RULES``) and the weights load with ``strict=True``. The vision configuration is read off the checkpoint's
tensor shapes (width, depth, patch, image size, MLP width; heads = width / 64, as in BLIP's ViT-B and ViT-L); the
text configuration comes from ``med_config.json`` with the cross-attention width set to the vision width, as BLIP
does (the file's ``encoder_width`` is ignored, as in the original).

Preprocessing (torch, differentiable, :func:`imagereward_preprocess`): shorter side to 224 (bicubic, antialiased,
in PIL's order: width then height, each pass clipped to [0, 1]; the longer side truncated to an integer as
torchvision does), centre crop 224 x 224, normalise with the OpenAI
CLIP mean/std, i.e. the reference's ``Resize(224, BICUBIC)``, ``CenterCrop(224)``, ``ToTensor()``,
``Normalize(...)`` on a PIL image (``diffrl.rewards.preprocess.clip_preprocess``).

Deviations from the reference (``ImageReward.ImageReward.score``):

* Resizing is torch's antialiased bicubic on float images instead of PIL's bicubic on 8-bit images: pixel
  values after normalisation differ by about one 8-bit step (see the tests for the measured tolerances).
* Attention masks add the dtype's minimum instead of -10000 to masked positions (no difference in float32).
* The MLP head runs in float32 whatever ``dtype`` is (the reference casts the ``[CLS]`` feature to float32 too).
* Prompts are scored in batches; the reference scores one (prompt, image) pair per call.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from .weights import HubFile, WeightsNotFoundError, fetch_hint, resolve_file, resolve_snapshot

__all__ = [
    "ImageReward",
    "IMAGEREWARD_REPO",
    "convert_imagereward_state_dict",
    "vision_config_from_state_dict",
    "text_config_from_med_config",
    "build_score_mlp",
    "imagereward_preprocess",
    "SCORE_MEAN",
    "SCORE_STD",
    "MAX_LENGTH",
]

IMAGEREWARD_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
TOKENIZER_FILES = ("tokenizer_config.json", "vocab.txt")

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_LENGTH = 35  # the reference tokenises with padding="max_length", truncation=True, max_length=35
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"  # BLIP's added special tokens (bos and additional)

# The score MLP is nn.Sequential(Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear):
# its Linear layers sit at these indices (mlp.layers.<i>.weight / .bias) and dropouts at 1, 3 and 5.
MLP_LINEAR_INDICES = (0, 2, 4, 6, 7)
MLP_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}

# Checkpoint entries the scorer does not use, dropped explicitly: BLIP's contrastive projections (present in
# ImageReward.pt), the text encoder's persistent ``position_ids`` buffer (always arange; transformers rebuilds it),
# and the heads, momentum encoders and queues of BLIP pre-training checkpoints, should a checkpoint carry them.
DROPPED_PREFIXES = (
    "blip.vision_proj.",
    "blip.text_proj.",
    "blip.itm_head.",
    "blip.visual_encoder_m.",
    "blip.text_encoder_m.",
    "blip.vision_proj_m.",
    "blip.text_proj_m.",
    "blip.text_decoder.",
)
DROPPED_KEYS = (
    "blip.text_encoder.embeddings.position_ids",
    "blip.image_queue",
    "blip.text_queue",
    "blip.idx_queue",
    "blip.ptr_queue",
    "blip.temp",
)

# Original ViT (BLIP's vit.py, timm layout) -> transformers BlipVisionModel, below ``blip.visual_encoder.``.
# qkv is fused in both, with the same (3 * width, width) layout, so every tensor is copied unchanged.
_VISION_RULES = (
    (r"cls_token", r"embeddings.class_embedding"),  # (1, 1, D) both
    (r"pos_embed", r"embeddings.position_embedding"),  # (1, 1 + N, D) both
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),  # Conv2d(3, D, p, stride p)
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
)
# Original BERT (BLIP's med.py, no pooler, no token-type embeddings) -> transformers BlipTextModel, below
# ``blip.text_encoder.``: the names are the same (BlipTextModel follows med.py), so the rules only validate.
_TEXT_RULES = (
    r"embeddings\.(word_embeddings|position_embeddings)\.weight",
    r"embeddings\.LayerNorm\.(weight|bias)",
    r"encoder\.layer\.\d+\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
    r"encoder\.layer\.\d+\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
    r"encoder\.layer\.\d+\.intermediate\.dense\.(weight|bias)",
    r"encoder\.layer\.\d+\.output\.(dense|LayerNorm)\.(weight|bias)",
)
_MLP_RULE = r"mlp\.layers\.(" + "|".join(str(i) for i in MLP_LINEAR_INDICES) + r")\.(weight|bias)"

VISION_HEAD_DIM = 64  # BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16)
VISION_LAYER_NORM_EPS = 1e-6  # vit.py: partial(nn.LayerNorm, eps=1e-6)


def convert_imagereward_state_dict(
    original: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an original ``ImageReward.pt`` state dict into ``(vision, text, mlp)`` state dicts for
    ``transformers.BlipVisionModel``, ``transformers.BlipTextModel(add_pooling_layer=False)`` and the score
    ``nn.Sequential`` of :func:`build_score_mlp`.

    Keys listed in ``DROPPED_PREFIXES`` / ``DROPPED_KEYS`` are dropped; any other key that no rule maps raises a
    ``KeyError`` naming it. Tensors are not copied.
    """
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    mlp: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in original.items():
        if key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES):
            continue
        if key.startswith("blip.visual_encoder."):
            sub = key[len("blip.visual_encoder.") :]
            for pattern, target in _VISION_RULES:
                if re.fullmatch(pattern, sub):
                    vision[re.sub(f"^{pattern}$", target, sub)] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            sub = key[len("blip.text_encoder.") :]
            if any(re.fullmatch(pattern, sub) for pattern in _TEXT_RULES):
                text[sub] = value
            else:
                unknown.append(key)
        elif re.fullmatch(_MLP_RULE, key):
            mlp[key[len("mlp.layers.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise KeyError(
            f"ImageReward checkpoint has {len(unknown)} unexpected key(s): {shown}; pass an original ImageReward.pt "
            "state dict (keys blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)."
        )
    return vision, text, mlp


def vision_config_from_state_dict(
    vision: Mapping[str, torch.Tensor], overrides: Mapping[str, Any] | None = None
):
    """A ``BlipVisionConfig`` read off the shapes of a converted vision state dict.

    Width, patch size, image size (``patch * sqrt(positions - 1)``), depth and MLP width come from the tensors;
    heads are ``width / 64`` (BLIP's ViT-B and ViT-L), LayerNorm eps 1e-6, exact GELU. ``overrides`` (e.g.
    ``{"num_attention_heads": 2}``) replace any of these.
    """
    from transformers import BlipVisionConfig

    try:
        width = vision["embeddings.class_embedding"].shape[-1]
        patch = vision["embeddings.patch_embedding.weight"].shape[-1]
        positions = vision["embeddings.position_embedding"].shape[1]
        intermediate = vision["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise KeyError(
            f"ImageReward checkpoint lacks the vision tensor {err}; pass a complete ImageReward.pt."
        ) from None
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(
            f"ImageReward checkpoint's pos_embed has {positions} positions, not 1 + a square number of patches."
        )
    kwargs = dict(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // VISION_HEAD_DIM),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )
    kwargs.update(overrides or {})
    if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise ValueError(
            f"vision width {kwargs['hidden_size']} is not a multiple of {kwargs['num_attention_heads']} heads; "
            "pass vision_config={'num_attention_heads': <heads>}."
        )
    return BlipVisionConfig(**kwargs)


def text_config_from_med_config(med: Mapping[str, Any], encoder_hidden_size: int):
    """A ``BlipTextConfig`` (with cross-attention to ``encoder_hidden_size``-wide image tokens) from the BERT
    configuration ``med_config.json``; its ``encoder_width`` is ignored, as BLIP sets it to the vision width."""
    from transformers import BlipTextConfig

    missing = [
        k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in med
    ]
    if missing:
        raise ValueError(f"med_config lacks {missing}; pass ImageReward's med_config.json (a BERT config).")
    if not med.get("add_cross_attention", False):
        raise ValueError(
            "med_config has add_cross_attention false; ImageReward's text encoder needs cross-attention."
        )
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"med_config position_embedding_type={med['position_embedding_type']!r} is not supported; only 'absolute'."
        )
    hidden = int(med["hidden_size"])
    return BlipTextConfig(
        vocab_size=int(med["vocab_size"]),
        hidden_size=hidden,
        encoder_hidden_size=int(encoder_hidden_size),
        intermediate_size=int(med.get("intermediate_size", 4 * hidden)),
        num_hidden_layers=int(med["num_hidden_layers"]),
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=int(med.get("max_position_embeddings", 512)),
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=float(med.get("hidden_dropout_prob", 0.0)),
        attention_probs_dropout_prob=float(med.get("attention_probs_dropout_prob", 0.0)),
        initializer_range=float(med.get("initializer_range", 0.02)),
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # BlipTextLayer builds its cross-attention only for decoders; forward stays bidirectional
        use_cache=False,
    )


def build_score_mlp(mlp: Mapping[str, torch.Tensor]) -> torch.nn.Sequential:
    """The score head ``nn.Sequential`` with the original indices (Linear at 0, 2, 4, 6, 7; Dropout at 1, 3, 5),
    sized from the converted MLP state dict (768 -> 1024 -> 128 -> 64 -> 16 -> 1 for ImageReward v1.0)."""
    layers: list[torch.nn.Module] = []
    for index in range(max(MLP_LINEAR_INDICES) + 1):
        if index in MLP_LINEAR_INDICES:
            weight = mlp.get(f"{index}.weight")
            if weight is None:
                raise KeyError(
                    f"ImageReward checkpoint lacks mlp.layers.{index}.weight; pass a complete ImageReward.pt."
                )
            layers.append(torch.nn.Linear(weight.shape[1], weight.shape[0], device="meta"))
        else:
            layers.append(torch.nn.Dropout(MLP_DROPOUTS[index]))
    return torch.nn.Sequential(*layers)


def imagereward_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The reference transform in torch (differentiable): ``Resize(size, BICUBIC)`` (shorter side to ``size``, the
    longer one truncated to an integer as torchvision does), ``CenterCrop(size)``, OpenAI CLIP normalisation.
    Bicubic resizing is antialiased (PIL's resampling); images are float ``(B, 3, H, W)`` in [0, 1]."""
    return clip_preprocess(images, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _is_local(spec: str | Path) -> bool:
    path = Path(spec).expanduser()
    return (
        path.exists()
        or str(spec).startswith((".", "/", "~"))
        or path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".json"}
    )


def _local_med_config(checkpoint: str | Path | None) -> Path | None:
    """``med_config.json`` next to a local checkpoint (in its directory), if there is one."""
    if checkpoint is None or not _is_local(checkpoint):
        return None
    path = Path(checkpoint).expanduser()
    folder = path if path.is_dir() else path.parent
    candidate = folder / MED_CONFIG_FILE
    return candidate if candidate.is_file() else None


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(
            f"ImageReward checkpoint does not fit the {what} built from it ({err}); pass a matching "
            "ImageReward.pt and med_config.json."
        ) from err


class ImageReward(Reward):
    """ImageReward v1.0 score of (image, prompt): the standardised BLIP preference score (higher is better).

    Args:
        checkpoint: ``None`` (``THUDM/ImageReward``'s ``ImageReward.pt`` from the Hugging Face cache or hub), a local
            ``.pt`` file or a directory holding ``ImageReward.pt``, or another hub repository id holding that file.
        med_config: ``None`` (the ``med_config.json`` next to a local checkpoint, else the one of the checkpoint's
            hub repository, ``THUDM/ImageReward`` by default), a local JSON file or directory, or a hub repo id.
        tokenizer: hub id or local directory of the BERT tokenizer (``vocab.txt`` + ``tokenizer_config.json``);
            ``[DEC]`` and ``[ENC]`` are added as BLIP does.
        vision_config: overrides of the vision configuration read off the checkpoint (e.g.
            ``{"num_attention_heads": 12}``); ``None`` for ImageReward's ViT-L/16.
        batch_size, device, dtype: see :class:`diffrl.rewards.Reward`.
    """

    name = "imagereward"
    differentiable = True

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        med_config: str | Path | None = None,
        tokenizer: str | Path = DEFAULT_TOKENIZER,
        *,
        vision_config: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        for arg, value in (("checkpoint", checkpoint), ("med_config", med_config)):
            if value is not None and not isinstance(value, (str, Path)):
                raise TypeError(f"{arg}={value!r} must be None, a local path or a hub repository id.")
        if not isinstance(tokenizer, (str, Path)) or not str(tokenizer):
            raise TypeError(
                f"tokenizer={tokenizer!r} must be a hub id such as 'bert-base-uncased' or a local directory."
            )
        if vision_config is not None:
            from transformers import BlipVisionConfig

            known = set(BlipVisionConfig().to_dict())
            bad = sorted(set(vision_config) - known)
            if bad:
                raise ValueError(
                    f"vision_config has unknown keys {bad}; use BlipVisionConfig fields such as 'num_attention_heads'."
                )
        self.checkpoint = checkpoint
        self.med_config = med_config
        self.tokenizer_spec = tokenizer
        self.vision_config = dict(vision_config) if vision_config is not None else None
        self.image_size = 224

    # ------------------------------------------------------------------ files
    @classmethod
    def hub_files(
        cls,
        checkpoint: str | Path | None = None,
        med_config: str | Path | None = None,
        tokenizer: str | Path = DEFAULT_TOKENIZER,
        **kwargs,
    ) -> list[HubFile]:
        files = []
        if checkpoint is None:
            files.append(HubFile(IMAGEREWARD_REPO, CHECKPOINT_FILE))
        elif not _is_local(checkpoint):
            files.append(HubFile(str(checkpoint), CHECKPOINT_FILE))
        if med_config is None:
            if checkpoint is not None and not _is_local(checkpoint):
                files.append(HubFile(str(checkpoint), MED_CONFIG_FILE))
            elif _local_med_config(checkpoint) is None:
                files.append(HubFile(IMAGEREWARD_REPO, MED_CONFIG_FILE))
        elif not _is_local(med_config):
            files.append(HubFile(str(med_config), MED_CONFIG_FILE))
        if not _is_local(tokenizer):
            files.extend(HubFile(str(tokenizer), name) for name in TOKENIZER_FILES)
        return files

    def _resolve(self) -> tuple[Path, Path, Path]:
        try:
            ckpt = resolve_file(self.checkpoint, HubFile(IMAGEREWARD_REPO, CHECKPOINT_FILE), self.name)
            med_spec = self.med_config
            if med_spec is None:  # next to a local checkpoint, else its hub repo, else THUDM/ImageReward
                med_spec = _local_med_config(self.checkpoint)
                if med_spec is None and self.checkpoint is not None and not _is_local(self.checkpoint):
                    med_spec = self.checkpoint
            med = resolve_file(med_spec, HubFile(IMAGEREWARD_REPO, MED_CONFIG_FILE), self.name)
            tok = resolve_snapshot(self.tokenizer_spec, list(TOKENIZER_FILES), self.name)
        except WeightsNotFoundError as err:
            # name every file the reward needs, not just the first one found missing
            files = self.hub_files(self.checkpoint, self.med_config, self.tokenizer_spec)
            raise WeightsNotFoundError(fetch_hint(self.name, files)) from err
        return ckpt, med, tok

    def settings(self) -> dict[str, Any]:
        return {
            "tokenizer": str(self.tokenizer_spec),
            "max_length": MAX_LENGTH,
            "score_mean": SCORE_MEAN,
            "score_std": SCORE_STD,
            "preprocess": "resize_shortest_bicubic_antialias+center_crop+openai_clip_norm",
            "vision_config": self.vision_config,
            "dtype": str(self.dtype),
        }

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        # Resolve every file first: with weights absent offline this fails at once, before importing transformers.
        ckpt_path, med_path, tok_path = self._resolve()

        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

        original = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if not isinstance(original, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in original.values()
        ):
            raise ValueError(
                f"reward {self.name!r}: {ckpt_path} is not a flat state dict of tensors; pass ImageReward.pt."
            )
        vision_sd, text_sd, mlp_sd = convert_imagereward_state_dict(original)
        with open(med_path, encoding="utf-8") as f:
            med = json.load(f)
        vision_cfg = vision_config_from_state_dict(vision_sd, self.vision_config)
        text_cfg = text_config_from_med_config(med, encoder_hidden_size=vision_cfg.hidden_size)

        # Build on the meta device (no random init of ~450M parameters) and take the checkpoint's tensors.
        with torch.device("meta"):
            vision = BlipVisionModel(vision_cfg)
            text = BlipTextModel(text_cfg, add_pooling_layer=False)
        mlp = build_score_mlp(mlp_sd)
        _load_strict(vision, vision_sd, "BlipVisionModel")
        _load_strict(text, text_sd, "BlipTextModel")
        _load_strict(mlp, mlp_sd, "score MLP")
        # The only state outside the checkpoint: the non-persistent position ids (an arange, as in med.py).
        text.embeddings.position_ids = torch.arange(text_cfg.max_position_embeddings).expand((1, -1))
        for module, what in ((vision, "vision"), (text, "text"), (mlp, "MLP")):
            left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
            if left:
                raise RuntimeError(f"ImageReward {what} tensors {left} were not loaded from the checkpoint.")

        self.vision = vision.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
        self.text = text.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
        self.mlp = mlp.eval().requires_grad_(False).to(device=self.device, dtype=torch.float32)
        self.image_size = int(vision_cfg.image_size)

        tokenizer = BertTokenizer.from_pretrained(str(tok_path))
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
        if len(tokenizer) > text_cfg.vocab_size:
            raise ValueError(
                f"tokenizer {self.tokenizer_spec!r} has {len(tokenizer)} tokens with [DEC] and [ENC], more than the "
                f"text encoder's vocab_size {text_cfg.vocab_size}; pass the tokenizer the checkpoint was trained with."
            )
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ scoring
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 pixel values ``(b, 3, S, S)`` (S = 224) of images ``(b, 3, H, W)`` in [0, 1] (differentiable)."""
        return imagereward_preprocess(images, self.image_size)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``(b, 35)`` as the reference makes them (``[CLS]`` first)."""
        if not self._loaded:
            self.load()
        enc = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def score_pixel_values(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores ``(b,)`` float32 of already preprocessed pixel values ``(b, 3, S, S)`` (normalised)."""
        if not self._loaded:
            self.load(pixel_values.device)
        input_ids, attention_mask = self.tokenize(prompts)
        image_embeds = self.vision(
            pixel_values=pixel_values.to(device=self.device, dtype=self.dtype)
        ).last_hidden_state
        hidden = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            return_dict=True,
        ).last_hidden_state
        raw = self.mlp(hidden[:, 0, :].float())[:, 0]
        return (raw - SCORE_MEAN) / SCORE_STD

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        return self.score_pixel_values(self.preprocess(images), prompts)
