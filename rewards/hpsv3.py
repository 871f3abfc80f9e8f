"""HPSv3: Human Preference Score v3, a Qwen2-VL-7B-Instruct with a reward head, trained on human preferences
(score-only).

The reference is the ``hpsv3`` package 1.0.0 (PyPI; code MIT, github.com/MizzenAI/HPSv3), ICCV 2025,
[arXiv:2508.03789](https://arxiv.org/abs/2508.03789). What it computes, with the files and lines of that wheel:

* **Model** (``hpsv3/model/qwen2vl_trainer.py`` l.59-247, ``Qwen2VLRewardModelBT``): a
  ``Qwen2VLForConditionalGeneration`` (``Qwen/Qwen2-VL-7B-Instruct``, ``hpsv3/config/HPSv3_7B.yaml`` l.8) whose
  ``lm_head`` is unused, plus ``rm_head``. With ``rm_head_type: "ranknet"`` and no ``rm_head_kwargs`` (the
  config, l.2) the head is ``Linear(3584, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2)``
  (l.99-106), run in float32 (l.108, l.192-193). It reads the **last hidden state** (after the final norm) at the
  position of the special token ``<|Reward|>`` (``reward_token: "special"``, l.229-241), which
  ``hpsv3/train.py`` l.60-65 adds to the tokenizer, resizing the embeddings to the new tokenizer length (l.82-83:
  fewer rows than the base model's padded 152064).
* **Positions**: that ``forward`` (l.115-189) calls the decoder with ``position_ids=None``, so transformers 4.45.2
  (the package's pin; ``modeling_qwen2_vl.py`` l.1204-1205) uses plain sequential positions ``0..L-1`` for all three
  M-RoPE sections, not Qwen2-VL's 3D image positions (``get_rope_index`` only runs inside ``generate``). The
  checkpoint was trained that way, so this reward passes the same sequential positions explicitly (transformers
  5 would otherwise compute the 3D ones).
* **Output**: ``(mu, log_sigma)`` per image (the ``"uncertainty"`` loss, ``qwen2vl_trainer.py`` l.706-719, uses
  ``sigma = exp(output[:, 1])``); the score is ``mu`` (``hpsv3/inference.py`` l.166, README: "Extract mu values").
* **Input** (``hpsv3/inference.py`` l.97-137): one user turn of the base model's chat template, the image first,
  then the text ``INSTRUCTION.format(text_prompt=prompt) + prompt_with_special_token``
  (``hpsv3/dataset/data_collator_qwen.py`` l.11-42; this module's :data:`INSTRUCTION` and
  :data:`RATING_SUFFIX` are those strings character for character, since the checkpoint was trained on exactly
  that text), the generation prompt appended, the batch padded on the right (``train.py`` l.52-54).
* **Image** (``hpsv3/dataset/utils.py`` l.55-81 and l.84-176, a copy of qwen-vl-utils ``fetch_image``): the RGB
  PIL image is resized with PIL bicubic to ``smart_resize(h, w, factor=28, min_pixels=max_pixels=256*28*28)``
  (about 448 x 448 = 200704 pixels, both sides multiples of 28, aspect ratio kept; 256 visual tokens), then the
  base model's ``Qwen2VLImageProcessor`` (whose own resize leaves those sizes unchanged) rescales, normalises with
  the OpenAI CLIP mean/std and cuts 14 px patches.
* **Dtype**: the reference runs the backbone in bfloat16 (``train.py`` l.85-86, after ``from_pretrained`` in the
  same dtype) and the head in float32.

Scores are unbounded. The README's benchmark of text-to-image models averages (mu, on the HPDv3 prompts) 10.55
for Kolors, 10.43 for FLUX.1-dev, 8.20 for SDXL, 5.31 for SD3 Medium and -0.24 for SD2. Compare scores of the
same prompt.

Checkpoint: hub repository ``MizzenAI/HPSv3`` (licence apache-2.0 on its model card), file ``HPSv3.safetensors``:
the full state dict of that model (8.3 G parameters). The reference loads it with ``strict=True`` into its
transformers 4.45 model (``hpsv3/inference.py`` l.40-48), so its keys are that version's names (``visual.*``,
``model.*``, ``lm_head.weight``) and ``rm_head.{0,3,5}.{weight,bias}``; the transformers >= 4.52 names
(``model.visual.*``, ``model.language_model.*``) load too. The base model ``Qwen/Qwen2-VL-7B-Instruct``
(Apache-2.0) provides only the configuration, the tokenizer, the chat template and the image processor (its
weights are not needed: the checkpoint holds all of them). This reward loads the backbone into
``transformers.Qwen2VLModel`` (no ``lm_head``, whose 0.5 G parameters do not enter the score) and the head into
:class:`RewardHead`, whose state-dict names are the reference's.

Deviations from the reference (``HPSv3RewardInferencer.reward``):

* The model runs in ``dtype`` (float32 by default, as every diffrl reward; pass ``dtype="bfloat16"`` for the
  reference's setting, where the whole backbone, rotary buffers included, is cast as the reference casts it).
  The head always runs in float32 on the float32 hidden state, as the reference's CUDA autocast does (on a CPU
  the reference cannot run in bfloat16 at all).
* Images are float tensors in [0, 1], rounded to 8 bits (what a PNG holds) before the PIL resize; the reference
  opens image files. Attention uses PyTorch SDPA (the reference prefers FlashAttention-2 when installed).

Parity: ``benchmarks/parity_hpsv3.py`` runs the reference package (with its transformers 4.45.2) and this reward on
the same tiny random checkpoint in the real layout (:mod:`diffrl.rewards.tiny.hpsv3`) and PNG images of 8 sizes,
in float32 on a CPU: the largest difference of ``mu`` and ``log sigma`` is 2.4e-6, token ids and pixel patches are
identical.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Reward
from .weights import HubFile, WeightsNotFoundError, fetch_hint, resolve_file, resolve_snapshot

__all__ = [
    "HPSv3",
    "RewardHead",
    "HPSV3_REPO",
    "HPSV3_FILE",
    "BASE_MODEL",
    "BASE_FILES",
    "BASE_OPTIONAL_FILES",
    "REWARD_TOKEN",
    "IMAGE_PIXELS",
    "INSTRUCTION",
    "RATING_SUFFIX",
    "user_text",
    "resize_shape",
    "split_checkpoint",
]

HPSV3_REPO = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
#: Files of the base model repository the reward reads (configuration, tokenizer, image processor).
BASE_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
)
BASE_OPTIONAL_FILES = ("chat_template.json", "chat_template.jinja")
REWARD_TOKEN = "<|Reward|>"
#: The reference's image size: min_pixels = max_pixels = 256 * 28 * 28 (``hpsv3/inference.py`` l.98-99).
IMAGE_PIXELS = 256 * 28 * 28
_FACTOR = 28  # patch 14 x merge 2
_MAX_RATIO = 200

# The text the checkpoint was trained on (``hpsv3/dataset/data_collator_qwen.py`` l.11-32 and l.38-42), kept
# character for character: trailing spaces included, ``{text_prompt}`` where the prompt goes.
_INSTRUCTION_LINES = (
    "",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the "
    "worst and 10 being the best. ",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense "
    "of harmony and balance.",
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, "
    "or adult material. If such content is present, the image quality and satisfaction score should be the "
    "lowest possible. ",
    "",
    "**Text Alignment:**  ",
    "Assess how well the image matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well "
    "the image adheres to this style.",
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.",
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.",
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.",
    "Textual prompt - {text_prompt}",
    "",
    "",
    "",
)
INSTRUCTION = "\n".join(_INSTRUCTION_LINES)
RATING_SUFFIX = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
_TEMPLATE_DIGEST = hashlib.sha256((INSTRUCTION + "\x00" + RATING_SUFFIX).encode()).hexdigest()

_WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin"}


def user_text(prompt: str) -> str:
    """The text of the user turn for ``prompt`` (what the reference's ``INSTRUCTION.format(text_prompt=prompt)
    + prompt_with_special_token`` gives; braces in the prompt are kept as they are)."""
    return INSTRUCTION.replace("{text_prompt}", prompt) + RATING_SUFFIX


def resize_shape(
    height: int, width: int, pixels: int = IMAGE_PIXELS, factor: int = _FACTOR
) -> tuple[int, int]:
    """``(height, width)`` the reference resizes an image to: qwen-vl-utils' ``smart_resize`` with
    ``min_pixels = max_pixels = pixels`` (``hpsv3/dataset/utils.py`` l.55-81), the same float operations."""
    if min(height, width) < 1:
        raise ValueError(
            f"reward 'hpsv3' got an image of {height}x{width} pixels; pass images of at least 1x1."
        )
    if max(height, width) / min(height, width) > _MAX_RATIO:
        raise ValueError(
            f"reward 'hpsv3' got a {height}x{width} image, whose aspect ratio exceeds {_MAX_RATIO} (the limit of "
            "Qwen2-VL's resizing); crop or pad it first."
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > pixels:
        beta = math.sqrt((height * width) / pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < pixels:
        beta = math.sqrt(pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class RewardHead(torch.nn.Sequential):
    """HPSv3's reward head (``rm_head_type="ranknet"`` without ``rm_head_kwargs``): ``Linear(hidden, width)``,
    ReLU, Dropout(0.05), ``Linear(width, bottleneck)``, ReLU, ``Linear(bottleneck, outputs)``, so its weights are
    ``{0,3,5}.{weight,bias}`` as in the checkpoint's ``rm_head.*`` (HPSv3: 3584 -> 1024 -> 16 -> 2)."""

    def __init__(self, hidden_size: int, width: int = 1024, bottleneck: int = 16, outputs: int = 2):
        super().__init__(
            torch.nn.Linear(hidden_size, width),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.05),
            torch.nn.Linear(width, bottleneck),
            torch.nn.ReLU(),
            torch.nn.Linear(bottleneck, outputs),
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> RewardHead:
        """A float32 head with the weights of ``state`` (keys ``0.weight`` ... ``5.bias``), sizes read off them."""
        expected = {f"{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias")}
        if set(state) != expected:
            raise ValueError(
                f"reward 'hpsv3': the rm_head of {source} has keys {sorted(state)}, not those of HPSv3's ranknet head "
                f"({sorted(expected)}); only that head (HPSv3_7B.yaml) is implemented, so pass an HPSv3 checkpoint."
            )
        width, hidden = state["0.weight"].shape
        bottleneck = state["3.weight"].shape[0]
        outputs = state["5.weight"].shape[0]
        head = cls(hidden, width, bottleneck, outputs)
        try:
            head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"reward 'hpsv3': the rm_head of {source} has inconsistent shapes ({err})."
            ) from err
        return head.float()


def split_checkpoint(
    state: dict[str, torch.Tensor], source: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(backbone, head)`` state dicts of an HPSv3 checkpoint: the backbone with ``transformers.Qwen2VLModel``'s
    names (``visual.*``, ``language_model.*``), the head with :class:`RewardHead`'s; ``lm_head.weight`` is dropped.

    Takes the transformers 4.45 names of ``HPSv3.safetensors`` (``visual.*``, ``model.*``) and the later ones
    (``model.visual.*``, ``model.language_model.*``), with or without a ``module.`` prefix (DDP)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    backbone: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key[len("rm_head.") :]] = value
        elif key.startswith("lm_head."):
            continue
        elif key.startswith("visual."):
            backbone[key] = value
        elif key.startswith("model.visual."):
            backbone[key[len("model.") :]] = value
        elif key.startswith("model.language_model."):
            backbone[key[len("model.") :]] = value
        elif key.startswith("model."):
            backbone["language_model." + key[len("model.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"reward 'hpsv3': {source} holds keys that are not HPSv3's ({unknown[:3]}...); pass an HPSv3 checkpoint "
            f"such as {HPSV3_REPO}/{HPSV3_FILE}."
        )
    if not head:
        raise ValueError(
            f"reward 'hpsv3': {source} has no rm_head.* weights, so it is not an HPSv3 reward checkpoint (a plain "
            f"Qwen2-VL?); pass {HPSV3_REPO}/{HPSV3_FILE} or a file in its layout."
        )
    return backbone, head


def _looks_local(spec: str | Path) -> bool:
    path = Path(spec).expanduser()
    return path.exists() or str(spec).startswith((".", "/", "~")) or path.suffix in _WEIGHT_SUFFIXES


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded (what a saved PNG holds)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(arr.permute(0, 2, 3, 1).cpu().numpy())


class HPSv3(Reward):
    """HPSv3 score: ``mu`` of the Qwen2-VL reward model at the ``<|Reward|>`` token (see the module docstring).

    Args:
        checkpoint: ``None`` (``HPSv3.safetensors`` of ``MizzenAI/HPSv3`` from the Hugging Face cache or hub), a
            local ``.safetensors`` (or ``.pt``/``.pth`` state dict) file, a directory holding ``HPSv3.safetensors``,
            or another hub repository id holding that file.
        base_model: hub id (default ``Qwen/Qwen2-VL-7B-Instruct``) or local directory of the base model's
            ``config.json``, tokenizer, chat template and ``preprocessor_config.json`` (no weights are read).
        batch_size, device, dtype: see :class:`diffrl.rewards.Reward` (the reference runs in bfloat16).
    """

    name = "hpsv3"
    differentiable = False

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        base_model: str | Path = BASE_MODEL,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
            raise TypeError(
                f"checkpoint={checkpoint!r} must be None ({HPSV3_REPO}), a path to {HPSV3_FILE} (or a directory "
                "holding it) or a hub repository id."
            )
        if checkpoint is not None and _looks_local(checkpoint) and not Path(checkpoint).expanduser().exists():
            raise FileNotFoundError(
                f"checkpoint={str(checkpoint)!r} does not exist; pass an existing {HPSV3_FILE} file, a directory "
                f"holding it, a hub repository id, or None for {HPSV3_REPO}."
            )
        if not isinstance(base_model, (str, Path)) or not str(base_model):
            raise TypeError(
                f"base_model={base_model!r} must be a hub id such as {BASE_MODEL!r} or a local directory."
            )
        base_path = Path(base_model).expanduser()
        if base_path.is_file() or (str(base_model).startswith((".", "/", "~")) and not base_path.is_dir()):
            raise FileNotFoundError(
                f"base_model={str(base_model)!r} is not a directory; pass the directory of {BASE_MODEL}'s config, "
                f"tokenizer and preprocessor files, or its hub id {BASE_MODEL!r}."
            )
        self.checkpoint = checkpoint
        self.base_model = str(base_model)
        self.model = None
        self.head = None
        self.processor = None
        self.reward_token_id: int | None = None

    # ------------------------------------------------------------------ metadata
    @classmethod
    def hub_files(
        cls, checkpoint: str | Path | None = None, base_model: str | Path = BASE_MODEL, **kwargs
    ) -> list[HubFile]:
        files = []
        if checkpoint is None:
            files.append(HubFile(HPSV3_REPO, HPSV3_FILE))
        elif not _looks_local(checkpoint):
            files.append(HubFile(str(checkpoint), HPSV3_FILE))
        base = str(base_model)
        if not _looks_local(base):
            files += [HubFile(base, f) for f in BASE_FILES]
            files += [HubFile(base, f, optional=True) for f in BASE_OPTIONAL_FILES]
        return files

    def settings(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint)
            if self.checkpoint is not None
            else f"{HPSV3_REPO}/{HPSV3_FILE}",
            "base_model": self.base_model,
            "pixels": IMAGE_PIXELS,
            "template": _TEMPLATE_DIGEST,
            "positions": "sequential",
            "score": "mu",
            "dtype": str(self.dtype),
        }

    # ------------------------------------------------------------------ loading
    def _resolve(self) -> tuple[Path, Path]:
        """The checkpoint file and the base model directory; offline with files missing, one error naming all."""
        missing = False
        checkpoint = base = None
        try:
            checkpoint = resolve_file(self.checkpoint, HubFile(HPSV3_REPO, HPSV3_FILE), self.name)
        except WeightsNotFoundError:
            missing = True
        base_files = [*BASE_FILES, *(HubFile(self.base_model, f, optional=True) for f in BASE_OPTIONAL_FILES)]
        try:
            base = resolve_snapshot(self.base_model, base_files, self.name)
        except WeightsNotFoundError:
            missing = True
        if missing:
            required = [f for f in self.hub_files(self.checkpoint, self.base_model) if not f.optional]
            raise WeightsNotFoundError(fetch_hint(self.name, required))
        return checkpoint, base

    def _read_checkpoint(self, path: Path) -> dict[str, torch.Tensor]:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # as the reference accepts
        if (
            not isinstance(state, dict)
            or not state
            or not all(isinstance(v, torch.Tensor) for v in state.values())
        ):
            raise ValueError(
                f"reward {self.name!r}: {path} holds no state dict of tensors; pass {HPSV3_FILE} or a file in its layout."
            )
        return state

    def _load(self) -> None:
        # Find every file first: offline with weights absent this fails at once, before reading anything.
        checkpoint_path, base_dir = self._resolve()
        from accelerate import init_empty_weights
        from transformers import AutoImageProcessor, AutoProcessor, Qwen2VLConfig, Qwen2VLModel

        processor = AutoProcessor.from_pretrained(base_dir)
        # The numpy/PIL image processor, as the reference's transformers 4.45 has (not the torchvision one).
        processor.image_processor = AutoImageProcessor.from_pretrained(base_dir, backend="pil")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or not hasattr(processor, "image_processor"):
            raise ValueError(
                f"reward {self.name!r}: {self.base_model} has no Qwen2-VL processor (tokenizer + image processor); "
                f"pass the base model {BASE_MODEL} or a directory with its processor files."
            )
        if getattr(processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None):
            # an older layout of the base model: the template in tokenizer_config.json only
            processor.chat_template = tokenizer.chat_template
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"reward {self.name!r}: the processor of {self.base_model} has no chat template; pass a base model "
                f"directory holding chat_template.json as {BASE_MODEL} does."
            )
        # As hpsv3/train.py l.60-65: <|Reward|> is appended to the vocabulary, the last embedding row.
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        tokenizer.padding_side = "right"
        self.reward_token_id = int(tokenizer.convert_tokens_to_ids(REWARD_TOKEN))

        state = self._read_checkpoint(checkpoint_path)
        backbone, head_state = split_checkpoint(state, str(checkpoint_path))
        del state
        config = Qwen2VLConfig.from_pretrained(base_dir)
        text_config = config.get_text_config()
        embed = backbone.get("language_model.embed_tokens.weight")
        if embed is None:
            raise ValueError(
                f"reward {self.name!r}: {checkpoint_path} has no embedding (model.embed_tokens.weight); pass a full "
                f"HPSv3 checkpoint such as {HPSV3_REPO}/{HPSV3_FILE}."
            )
        rows, width = embed.shape
        if width != text_config.hidden_size:
            raise ValueError(
                f"reward {self.name!r}: {checkpoint_path} has width {width} but {self.base_model} has hidden size "
                f"{text_config.hidden_size}; pass the base model the checkpoint was trained from ({BASE_MODEL})."
            )
        if self.reward_token_id >= rows:
            raise ValueError(
                f"reward {self.name!r}: {REWARD_TOKEN} gets id {self.reward_token_id} from the tokenizer of "
                f"{self.base_model}, beyond the {rows} embedding rows of {checkpoint_path}; pass the base model the "
                f"checkpoint was trained from ({BASE_MODEL})."
            )
        text_config.vocab_size = rows  # the reference resized the embeddings to the tokenizer with <|Reward|>
        head = RewardHead.from_state_dict(head_state, f"{checkpoint_path}")
        if head[0].in_features != width:
            raise ValueError(
                f"reward {self.name!r}: the rm_head of {checkpoint_path} takes width {head[0].in_features}, the "
                f"backbone gives {width}; the checkpoint is inconsistent."
            )
        with init_empty_weights():  # parameters on the meta device: the checkpoint supplies every one of them
            model = Qwen2VLModel(config)
        missing, unexpected = model.load_state_dict(backbone, strict=False, assign=True)
        # The model holds the tensors now: without other references, casting it below frees them one by one.
        del backbone, head_state, embed
        if missing or unexpected:
            raise ValueError(
                f"reward {self.name!r}: {checkpoint_path} does not fit the Qwen2-VL of {self.base_model} (missing "
                f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}); pass the base model the checkpoint was "
                f"trained from ({BASE_MODEL})."
            )
        # Cast everything, rotary buffers included, as the reference's model.to(torch.bfloat16) does.
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.head = head.to(self.device).eval().requires_grad_(False)
        self.processor = processor

    # ------------------------------------------------------------------ scoring
    def chat_texts(self, prompts: list[str]) -> list[str]:
        """The model input text for each prompt: the chat template around the image and :func:`user_text`."""
        if self.processor is None:
            self.load()
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(p)}]}]
            for p in prompts
        ]
        texts = self.processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        return [texts] if isinstance(texts, str) else list(texts)

    def pil_images(self, images: torch.Tensor) -> list:
        """The PIL images the processor gets: 8-bit, resized with PIL bicubic to :func:`resize_shape`."""
        from PIL import Image

        out = []
        for arr in _to_uint8(images):
            height, width = arr.shape[:2]
            new_h, new_w = resize_shape(height, width)
            out.append(Image.fromarray(arr).resize((new_w, new_h), Image.BICUBIC))
        return out

    def model_inputs(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The processor's batch (right padded), on the reward's device."""
        if self.processor is None:
            self.load()
        batch = self.processor(
            text=self.chat_texts(prompts),
            images=self.pil_images(images),
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        counts = (batch["input_ids"] == self.reward_token_id).sum(dim=1)
        if not bool((counts == 1).all()):
            bad = [p for p, c in zip(prompts, counts.tolist(), strict=True) if c != 1]
            raise ValueError(
                f"reward {self.name!r}: prompt {bad[0]!r} contains {REWARD_TOKEN} or another special token of the "
                "chat format, which the score is read at; remove it from the prompt."
            )
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        out = {k: batch[k].to(self.device) for k in keys}
        out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def outputs(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The head's float32 outputs ``(b, 2)``: ``mu`` (the score) and ``log sigma`` (its uncertainty)."""
        if self.model is None:
            self.load()
        inputs = self.model_inputs(images.to(self.device), list(prompts))
        ids = inputs["input_ids"]
        batch, length = ids.shape
        # The reference's positions: 0..L-1 in every M-RoPE section (see the module docstring).
        positions = torch.arange(length, device=self.device).view(1, 1, length).expand(3, batch, length)
        with torch.no_grad():
            hidden = self.model(
                input_ids=ids,
                attention_mask=inputs["attention_mask"],
                position_ids=positions,
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                use_cache=False,
            ).last_hidden_state
            at_token = hidden[ids == self.reward_token_id].float()  # (b, D), one row per image, in order
            return self.head(at_token)

    def mu_sigma(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` per image: the score and the model's uncertainty ``sigma = exp(output[:, 1])``."""
        out = self.outputs(images, prompts)
        return out[:, 0], out[:, 1].exp()

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        return self.outputs(images, prompts)[:, 0]
