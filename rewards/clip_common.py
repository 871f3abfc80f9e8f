"""Shared code of the transformers-CLIP rewards (``pickscore``, ``clipscore``, ``aesthetic``).

* Which hub files a CLIP checkpoint directory needs (:func:`clip_hub_files`) and finding them (:func:`resolve_dirs`).
  Besides hub ids and local paths, a spec may name a checkpoint shipped inside diffrl: ``"toy:clip"``
  (:data:`TOY_CLIP_SPEC`), the toy-world CLIP of :mod:`diffrl.toy.clip` in ``diffrl/toy/assets/clip``
  (:func:`builtin_dir`).
* :class:`CLIPImageTransform`: the transform of Hugging Face's ``CLIPImageProcessor`` (read from a
  ``preprocessor_config.json``) in differentiable torch.
* Loading a ``transformers.CLIPModel`` strictly (:func:`load_clip_model`) and projected image / text embeddings
  computed through the sub-modules (:func:`image_embeddings`, :func:`text_embeddings`), which behave the same in
  transformers 4 and 5 (``get_image_features`` returns a tensor in 4 and an output object in 5).

Preprocessing parity. The reference processors resize an 8-bit PIL image: PIL's bicubic resampling (Keys cubic,
a = -0.5, antialiased when shrinking) runs a horizontal pass, rounds and clips to [0, 255], then a vertical pass.
``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` uses the same filter, so the transform here
resizes the width, clamps to [0, 1], then resizes the height and clamps again; the new size and the crop offset
follow ``CLIPImageProcessor`` (longer side ``int(size * long / short)``, crop offset ``(new - crop) // 2``). Against
``CLIPImageProcessor`` / ``CLIPImageProcessorPil`` on PIL images the pixels then differ by at most about 1.1/255
before normalisation (the two 8-bit roundings of the reference), i.e. about 0.017 after it; a single 2-D resize
without the clamps differs by up to 0.3 on noisy images, and rounding the sizes differently shifts the crop by a
pixel. The clamps zero the gradient only at pixels where the bicubic filter overshoots [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffrl.utils import shipped_checkpoint

from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize_bicubic_pil_order
from .weights import HubFile, WeightsNotFoundError, fetch_hint, resolve_snapshot

__all__ = [
    "MODEL_FILES",
    "IMAGE_PROCESSOR_FILES",
    "TOKENIZER_FILES",
    "TOKENIZER_OPTIONAL_FILES",
    "CLIPImageTransform",
    "TOY_CLIP_SPEC",
    "builtin_dir",
    "is_local",
    "check_spec",
    "clip_hub_files",
    "resolve_dirs",
    "missing_files_named",
    "resize_bicubic_pil_order",
    "load_clip_model",
    "load_clip_tokenizer",
    "image_embeddings",
    "text_embeddings",
    "text_max_length",
    "pair_hub_files",
    "CLIPImageTextReward",
    "at_least_float32",
]

#: A transformers CLIP checkpoint: its config and its weights (every default repo has ``model.safetensors``).
MODEL_FILES = ("config.json", "model.safetensors")
#: The image processor's settings (resize, crop, mean, std).
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json",)
#: The CLIP BPE tokenizer: ``tokenizer.json`` is used when present, ``vocab.json`` + ``merges.txt`` otherwise.
TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.json")
#: Present in the default repos but not needed by transformers 5 (the special tokens are in tokenizer_config.json).
TOKENIZER_OPTIONAL_FILES = ("special_tokens_map.json",)


#: Spec of the toy-world CLIP shipped with diffrl (:mod:`diffrl.toy.clip`), usable as ``model`` / ``processor``.
TOY_CLIP_SPEC = "toy:clip"


def builtin_dir(spec: Any) -> Path | None:
    """The shipped directory a built-in spec (``"toy:clip"``) names, or ``None`` for any other spec; a
    FileNotFoundError saying how to re-create it when it is not in this checkout
    (:func:`diffrl.utils.shipped_checkpoint`)."""
    if isinstance(spec, str) and spec == TOY_CLIP_SPEC:
        return shipped_checkpoint(spec)
    return None


def is_local(spec: str | Path) -> bool:
    """Whether ``spec`` names a local path (an existing one, or one written as a path, or a built-in such as
    ``"toy:clip"``) rather than a hub id."""
    if isinstance(spec, str) and spec == TOY_CLIP_SPEC:
        return True
    return Path(str(spec)).expanduser().exists() or str(spec).startswith((".", "/", "~"))


def check_spec(value: Any, arg: str, example: str, allow_none: bool = False) -> None:
    """Raise at construction when a model argument is not a hub id or a path."""
    if value is None and allow_none:
        return
    if not isinstance(value, (str, Path)) or not str(value):
        raise TypeError(
            f"{arg}={value!r} must be a hub repository id (e.g. {example!r}) or a local directory"
            + (", or None." if allow_none else ".")
        )


def clip_hub_files(
    spec: str | Path, *, model: bool = False, image_processor: bool = False, tokenizer: bool = False
) -> list[HubFile]:
    """The hub files of repository ``spec`` for the parts asked for (nothing when ``spec`` is a local path)."""
    if is_local(spec):
        return []
    names = (MODEL_FILES if model else ()) + (IMAGE_PROCESSOR_FILES if image_processor else ())
    names += TOKENIZER_FILES if tokenizer else ()
    files = [HubFile(str(spec), name) for name in names]
    if tokenizer:
        files += [HubFile(str(spec), name, optional=True) for name in TOKENIZER_OPTIONAL_FILES]
    return files


@contextmanager
def missing_files_named(reward_name: str, files: Sequence[HubFile]):
    """Re-raise a :class:`WeightsNotFoundError` naming every required hub file of the reward, not only the first
    repository's, so that one message says all that ``diffrl download <reward>`` would fetch."""
    try:
        yield
    except WeightsNotFoundError as err:
        required = [f for f in files if not f.optional]
        raise WeightsNotFoundError(fetch_hint(reward_name, required)) from err


def resolve_dirs(reward_name: str, parts: Sequence[tuple[str | Path, list[HubFile]]]) -> list[Path]:
    """Local directories for ``(spec, hub files)`` pairs: a built-in spec (``"toy:clip"``) as its shipped
    directory, a local directory as is, a hub id through the HF cache."""
    all_files = [f for _, files in parts for f in files]
    out = []
    with missing_files_named(reward_name, all_files):
        for spec, files in parts:
            shipped = builtin_dir(spec)
            out.append(shipped if shipped is not None else resolve_snapshot(spec, files, reward_name))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Image transform
# ----------------------------------------------------------------------------------------------------------------


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when the tensor is float64 (so gradients can be checked in double precision)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, int):
        return {"shortest_edge": value}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return {k: v for k, v in vars(value).items() if v is not None}  # transformers' SizeDict


@dataclass(frozen=True)
class CLIPImageTransform:
    """``CLIPImageProcessor``'s transform in torch: resize the shorter side to ``shortest_edge`` (bicubic, PIL
    order), crop the centre ``crop_size`` ``(height, width)``, normalise with ``mean`` / ``std``.

    Input: float images ``(B, 3, H, W)`` in [0, 1]; output: ``(B, 3, crop_h, crop_w)`` in float32 (float64 for
    float64 input); differentiable.
    """

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        if self.do_resize and self.do_center_crop and max(self.crop_size) > self.shortest_edge:
            raise ValueError(
                f"crop_size {self.crop_size} is larger than the resized shorter side {self.shortest_edge}; "
                "CLIP crops inside the resized image, so use crop_size <= shortest_edge."
            )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CLIPImageTransform:
        """Read the settings of ``preprocessor_config.json`` in ``directory`` (through transformers'
        ``CLIPImageProcessor``, which also understands the legacy ``"size": 224`` form)."""
        from transformers import CLIPImageProcessor

        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} has no preprocessor_config.json; pass the directory (or hub id) of a CLIP processor."
            )
        proc = CLIPImageProcessor.from_pretrained(directory)
        size, crop = _as_dict(getattr(proc, "size", None)), _as_dict(getattr(proc, "crop_size", None))
        resample = int(getattr(proc, "resample", 3))
        if resample != 3:
            raise ValueError(
                f"{path}: resample={resample} is not supported; only bicubic (3), CLIP's resampling, is implemented."
            )
        if set(size) - {"shortest_edge"}:
            raise ValueError(
                f"{path}: size={size} is not supported; CLIP processors resize the shorter side "
                '({"shortest_edge": 224}).'
            )
        if getattr(proc, "do_rescale", True) is False or not math.isclose(
            float(getattr(proc, "rescale_factor", 1 / 255)), 1 / 255
        ):
            raise ValueError(
                f"{path}: only do_rescale=True with rescale_factor=1/255 (pixels in [0, 1]) is supported."
            )
        do_resize = bool(getattr(proc, "do_resize", True))
        do_crop = bool(getattr(proc, "do_center_crop", True))
        if do_resize and "shortest_edge" not in size:
            raise ValueError(f"{path}: do_resize is set but size={size} has no shortest_edge.")
        if do_crop and not {"height", "width"} <= set(crop):
            raise ValueError(f"{path}: do_center_crop is set but crop_size={crop} has no height and width.")
        return cls(
            shortest_edge=int(size.get("shortest_edge", 224)),
            crop_size=(int(crop.get("height", 224)), int(crop.get("width", 224))),
            mean=tuple(float(m) for m in proc.image_mean),
            std=tuple(float(s) for s in proc.image_std),
            do_resize=do_resize,
            do_center_crop=do_crop,
            do_normalize=bool(getattr(proc, "do_normalize", True)),
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after the shorter-side resize, rounded down as ``CLIPImageProcessor`` does."""
        size = self.shortest_edge
        if height <= width:
            return size, int(size * width / height)
        return int(size * height / width), size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = at_least_float32(images)
        if self.do_resize:
            images = resize_bicubic_pil_order(images, self.resized_size(*images.shape[-2:]))
        if self.do_center_crop:
            h, w = images.shape[-2:]
            ch, cw = self.crop_size
            if ch > h or cw > w:
                raise ValueError(
                    f"images of {h}x{w} pixels are smaller than the crop {ch}x{cw}; pass larger images or enable "
                    "the resize in preprocessor_config.json."
                )
            top, left = (h - ch) // 2, (w - cw) // 2
            images = images[..., top : top + ch, left : left + cw]
        if self.do_normalize:
            images = normalize(images, self.mean, self.std)
        return images

    def settings(self) -> dict[str, Any]:
        return {"transform": "clip_shortest_edge_bicubic_pil_order+center_crop+normalize", **asdict(self)}


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def load_clip_model(directory: str | Path, reward_name: str):
    """A ``transformers.CLIPModel`` from ``directory`` in eval mode with frozen parameters (on the CPU, in the
    checkpoint's dtype). Fails when weights are missing or of the wrong shape instead of initialising them randomly."""
    from transformers import CLIPModel

    model, info = CLIPModel.from_pretrained(directory, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        bad = (missing + [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched])[:5]
        raise ValueError(
            f"reward {reward_name!r}: {directory} is not a complete CLIPModel checkpoint (missing or mismatched "
            f"weights such as {bad}); pass the directory or hub id of a transformers CLIPModel."
        )
    return model.eval().requires_grad_(False)


def load_clip_tokenizer(directory: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(directory)


def _pooled(output: Any) -> torch.Tensor:
    pooled = getattr(output, "pooler_output", None)
    return output[1] if pooled is None else pooled


def image_embeddings(
    vision_model: torch.nn.Module, visual_projection: torch.nn.Module, pixel_values: torch.Tensor
) -> torch.Tensor:
    """Projected (not normalised) CLIP image embeddings ``(B, D)``: the class-token state of ``vision_model``
    through ``visual_projection``, exactly ``CLIPModel.get_image_features``."""
    return visual_projection(_pooled(vision_model(pixel_values=pixel_values)))


def text_embeddings(model: torch.nn.Module, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """Projected (not normalised) CLIP text embeddings ``(B, D)`` of ``prompts`` padded / truncated to
    ``max_length`` tokens, exactly ``CLIPModel.get_text_features`` on the tokenizer's output."""
    device = model.text_projection.weight.device
    tokens = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    out = model.text_model(
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
    )
    return model.text_projection(_pooled(out))


def text_max_length(model: torch.nn.Module, tokenizer) -> int:
    """Prompt length in tokens: the text encoder's positions (77 for CLIP), or less if the tokenizer says so."""
    positions = int(model.config.text_config.max_position_embeddings)
    return min(positions, int(getattr(tokenizer, "model_max_length", positions) or positions))


# ----------------------------------------------------------------------------------------------------------------
# Image-text rewards
# ----------------------------------------------------------------------------------------------------------------


def pair_hub_files(model: str | Path, processor: str | Path | None) -> list[HubFile]:
    """Hub files of a CLIPModel ``model`` and its processor (``None``: ``model``'s repository)."""
    processor = model if processor is None else processor
    files = clip_hub_files(model, model=True) + clip_hub_files(
        processor, image_processor=True, tokenizer=True
    )
    return list(dict.fromkeys(files))


class CLIPImageTextReward(Reward):
    """Base of the rewards that compare an image with its prompt under a transformers ``CLIPModel``.

    Subclasses set ``name`` and ``default_model`` and turn :meth:`cosine` into a score.

    Args:
        model: hub id or local directory of the ``CLIPModel`` (``config.json``, ``model.safetensors``).
        processor: hub id or local directory of its processor (``preprocessor_config.json`` and the tokenizer
            files); ``None`` uses ``model``'s.
        batch_size, device, dtype: see :class:`~diffrl.rewards.Reward`.
    """

    differentiable = True
    default_model = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        model: str | Path,
        processor: str | Path | None,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        check_spec(model, "model", self.default_model)
        check_spec(processor, "processor", self.default_model, allow_none=True)
        self.model_spec = model
        self.processor_spec = model if processor is None else processor
        self.model = None
        self.tokenizer = None
        self.transform: CLIPImageTransform | None = None
        self.max_length = 77

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": str(self.dtype)}
        if self.transform is not None:
            out.update(self.transform.settings(), max_length=self.max_length, vocab_size=len(self.tokenizer))
        return out

    def _load(self) -> None:
        model_dir, processor_dir = resolve_dirs(
            self.name,
            [
                (self.model_spec, clip_hub_files(self.model_spec, model=True)),
                (
                    self.processor_spec,
                    clip_hub_files(self.processor_spec, image_processor=True, tokenizer=True),
                ),
            ],
        )
        self.transform = CLIPImageTransform.from_pretrained(processor_dir)
        self.tokenizer = load_clip_tokenizer(processor_dir)
        self.model = load_clip_model(model_dir, self.name).to(device=self.device, dtype=self.dtype)
        self.max_length = text_max_length(self.model, self.tokenizer)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """float32 ``(B,)`` cosine similarity between each image and its prompt (differentiable in ``images``)."""
        pixels = self.transform(images).to(self.dtype)
        image = image_embeddings(self.model.vision_model, self.model.visual_projection, pixels)
        text = text_embeddings(self.model, self.tokenizer, prompts, self.max_length)
        image, text = (
            F.normalize(at_least_float32(image), dim=-1),
            F.normalize(at_least_float32(text), dim=-1),
        )
        return (image * text).sum(-1)
