"""OCR reward: Flow-GRPO's text-rendering task (score-only).

The prompt carries the text to render between double quotes (``A neon sign that says "OPEN 24 HOURS"``); an OCR
engine reads the image, and the score is ``1 - d / n``, where ``n`` is the length of the wanted text and ``d`` its
edit distance to the recognised text, clipped at ``n``. So the score lies in [0, 1]: 1 when the wanted text
appears in what was read, 0 when nothing (or nothing alike) was read.

The formula matches ``OcrScorer.__call__`` in ``flow_grpo/ocr.py`` of yifan123/flow_grpo (commit ``ac4c86e``),
with the image conversion of ``ocr_score`` in ``flow_grpo/rewards.py``:

* the wanted text is ``prompt.split('"')[1]``: what follows the first ``"`` up to the next one (or to the end of
  the prompt when there is only one); only the ASCII double quote counts, not typographic quotes;
* the recognised text is the concatenation, with no separator, of the text lines the engine keeps (confidence at
  least ``min_confidence``, PaddleOCR's ``drop_score`` of 0.5, and above 0), in the engine's reading order (top to
  bottom, then left to right);
* both texts lose every space character (``" "`` only) and are lower-cased;
* ``d = 0`` if the wanted text is a substring of the recognised text, else the Levenshtein distance (unit-cost
  insertions, deletions and substitutions, on code points, as ``Levenshtein.distance``), then ``d = min(d, n)``;
* images ``(B, 3, H, W)`` in [0, 1] become ``(images * 255).round().clamp(0, 255)`` 8-bit arrays ``(H, W, 3)``,
  passed to the engine in RGB order as the reference passes them to PaddleOCR (both engines take arrays as BGR,
  so the channel swap is the same in both).

The engine sits behind :class:`TextRecognizer` (``recognize(list of (H, W, 3) uint8 arrays) -> list of str``);
the default, :class:`RapidOCRRecognizer`, runs the PP-OCRv4 models that ship in the ``rapidocr-onnxruntime``
wheel (``ch_PP-OCRv4_det_infer.onnx`` 4.7 MB, ``ch_PP-OCRv4_rec_infer.onnx`` 10.9 MB, Apache-2.0, PaddleOCR's
models converted to ONNX): real weights, offline, nothing to download (``pip install diffrl[ocr]``). The angle
classifier is off (the reference calls ``PaddleOCR(use_angle_cls=False)`` and ``ocr(img, cls=False)``) and the
detector uses PaddleOCR's inference defaults (longer side limited to 960, ImageNet mean/std, DB thresholds
0.3 / 0.6, unclip ratio 1.5, no dilation) instead of rapidocr's own.

Differences from the reference:

* Models: the reference runs PaddleOCR 2.9.1 with ``lang="en"``, i.e. ``en_PP-OCRv3_det`` and ``en_PP-OCRv4_rec``
  (English character set); the wheel ships the Chinese-English ``ch_PP-OCRv4_det`` and ``ch_PP-OCRv4_rec``
  (6623 characters). Same family and input pipeline, but not the same weights: the recognised strings can
  differ, e.g. on hard images the Chinese-English model may read a CJK character or full-width punctuation. The
  English models, converted to ONNX, can be passed as ``det_model`` / ``rec_model``.
* Detector resizing: with ``limit_type="max"`` rapidocr raises the limit to 1500 for images whose longer side is
  between 960 and 1500, and to 2000 above; PaddleOCR shrinks every longer side above 960 to 960 (so 512x512
  images see the same resizing, 1024x1024 ones do not). Rapidocr also pads images 30 pixels high or less, or
  wider than 8:1, and enlarges images with a side under 30 pixels, which PaddleOCR does not.
* Errors: the reference turns any failure of the OCR call into a score of 0 (printing a message); here the error
  propagates, so a broken engine cannot pass for images without text. A prompt without a double quote makes the
  reference raise ``IndexError`` and an empty (or all-space) quoted text a ``ZeroDivisionError``; here both raise
  a ``ValueError`` naming the prompt, before any image is read.

Scores are computed in Python floats and returned as float32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .base import Reward
from .registry import import_attr
from .weights import HubFile

__all__ = [
    "OCRReward",
    "TextRecognizer",
    "RapidOCRRecognizer",
    "quoted_text",
    "normalize_text",
    "levenshtein",
    "ocr_score",
    "images_to_uint8",
    "PADDLEOCR_DET_SETTINGS",
    "ENGINE_OPTIONS",
]

INSTALL_HINT = "pip install diffrl[ocr]"
#: the first rapidocr-onnxruntime whose detector takes a mean and std (1.4.4; PaddleOCR normalises with ImageNet's)
MIN_RAPIDOCR = (1, 4, 4)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

#: PaddleOCR's text-detection inference defaults (``tools/infer/utility.py`` and ``predict_det.py``), in
#: rapidocr-onnxruntime's keyword names; they replace rapidocr's own (limit 736 "min", mean/std 0.5, box 0.5,
#: unclip 1.6, dilation on).
PADDLEOCR_DET_SETTINGS: dict[str, Any] = {
    "det_limit_side_len": 960,
    "det_limit_type": "max",
    "det_mean": [0.485, 0.456, 0.406],
    "det_std": [0.229, 0.224, 0.225],
    "det_thresh": 0.3,
    "det_box_thresh": 0.6,
    "det_unclip_ratio": 1.5,
    "det_use_dilation": False,
    "det_score_mode": "fast",
}

#: The rapidocr-onnxruntime (1.4.4) keyword options that ``engine_options`` may set; the model files, the
#: execution provider, the threads and the confidence threshold have options of their own.
ENGINE_OPTIONS = frozenset(
    {
        "use_cls",
        "min_height",
        "width_height_ratio",
        "max_side_len",
        "min_side_len",
        "det_limit_side_len",
        "det_limit_type",
        "det_mean",
        "det_std",
        "det_thresh",
        "det_box_thresh",
        "det_unclip_ratio",
        "det_use_dilation",
        "det_score_mode",
        "det_max_candidates",
        "cls_model_path",
        "cls_image_shape",
        "cls_batch_num",
        "cls_thresh",
        "rec_img_shape",
        "rec_batch_num",
    }
)


# ----------------------------------------------------------------------------------------------- the formula
def quoted_text(prompt: str) -> str:
    """The text the prompt asks for: what follows its first ``"`` up to the next ``"`` (or the end), as
    ``prompt.split('"')[1]`` in Flow-GRPO; raises ``ValueError`` when the prompt has no ``"``."""
    parts = str(prompt).split('"')
    if len(parts) < 2:
        raise ValueError(
            f"reward 'ocr' needs the text to render between double quotes in every prompt, and {prompt!r} has none; "
            'write it as in: a sign that says "OPEN".'
        )
    return parts[1]


def normalize_text(text: str) -> str:
    """Flow-GRPO's normalisation: every space character (``" "``) removed, then lower-cased."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance between ``a`` and ``b``: the fewest single-character insertions, deletions and
    substitutions (each costs 1) turning one into the other, on code points (``Levenshtein.distance``)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(recognized: str, wanted: str) -> float:
    """``1 - min(d, n) / n`` for the recognised text against the wanted one (both as given; they are normalised
    here), with ``d = 0`` when the wanted text is a substring of the recognised one, as Flow-GRPO scores."""
    target = normalize_text(wanted)
    if not target:
        raise ValueError(
            f"reward 'ocr': the quoted text {wanted!r} is empty once spaces are removed, so there is nothing to "
            'score; put the text to render between the quotes, e.g. "OPEN".'
        )
    read = normalize_text(recognized)
    distance = 0 if target in read else min(levenshtein(read, target), len(target))
    return 1.0 - distance / len(target)


def images_to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """``(B, 3, H, W)`` in [0, 1] -> B contiguous ``(H, W, 3)`` uint8 arrays, as Flow-GRPO's ``ocr_score``
    converts them: ``(images * 255).round().clamp(0, 255)``."""
    arr = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(a) for a in arr]


# ----------------------------------------------------------------------------------------------- the engines
@runtime_checkable
class TextRecognizer(Protocol):
    """An OCR engine: the text read in each image.

    ``recognize`` takes ``(H, W, 3)`` uint8 arrays (RGB) and returns one string per image: every text line it
    keeps, joined in reading order without a separator (``""`` when it reads nothing). Each image is read on its
    own, so a string never depends on the other images of the call. Optional methods: ``load()`` (called once
    before the first ``recognize``) and ``settings() -> dict`` (what changes its output; keys the score cache,
    see :attr:`~diffrl.rewards.Reward.fingerprint`).
    """

    def recognize(self, images: list[np.ndarray]) -> list[str]: ...


def _rapidocr_root() -> Path:
    """The installed rapidocr_onnxruntime package folder, checked to be recent enough (without importing it)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"reward 'ocr' needs rapidocr-onnxruntime (the OCR engine and its PP-OCRv4 models); {INSTALL_HINT}."
        )
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("rapidocr-onnxruntime")
    except PackageNotFoundError:
        installed = None  # e.g. a source checkout on the path: trust it
    if installed is not None and _version_tuple(installed) < MIN_RAPIDOCR:
        raise ImportError(
            f"reward 'ocr' needs rapidocr-onnxruntime >= {'.'.join(map(str, MIN_RAPIDOCR))} (older ones ignore the "
            f"detector's mean/std options), and {installed} is installed; pip install -U 'diffrl[ocr]'."
        )
    return Path(spec.origin).parent


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
    return tuple(parts)


def _wheel_models(root: Path) -> tuple[Path, Path]:
    """The detection and recognition models rapidocr's own config.yaml names (in its wheel)."""
    import yaml

    config = yaml.safe_load((root / "config.yaml").read_text())
    return root / config["Det"]["model_path"], root / config["Rec"]["model_path"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _local_file(value: str | Path | None, option: str, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{option}={str(value)!r} is not an existing file; pass the local path of {what}, or None for the "
            "model in the rapidocr-onnxruntime wheel."
        )
    return path


class RapidOCRRecognizer:
    """PP-OCRv4 text detection + recognition through ``rapidocr-onnxruntime`` (models in its wheel by default).

    Args:
        provider: onnxruntime execution provider, ``"cpu"`` or ``"cuda"`` (needs ``onnxruntime-gpu``; checked when
            the models load, which fails rather than fall back to the CPU).
        num_threads: threads of each onnxruntime session (``None``: onnxruntime's default, all cores).
        min_confidence: text lines recognised with a lower confidence are dropped (PaddleOCR's ``drop_score``).
        det_model, rec_model: local ONNX files replacing the wheel's ``ch_PP-OCRv4_det_infer.onnx`` /
            ``ch_PP-OCRv4_rec_infer.onnx`` (e.g. PaddleOCR's English models converted to ONNX).
        rec_keys: the recognition model's character list (one per line) when its ONNX file does not embed one.
        engine_options: other rapidocr keyword options (names in :data:`ENGINE_OPTIONS`), applied over
            :data:`PADDLEOCR_DET_SETTINGS` and ``use_cls=False``.
    """

    def __init__(
        self,
        provider: str = "cpu",
        num_threads: int | None = None,
        min_confidence: float = 0.5,
        det_model: str | Path | None = None,
        rec_model: str | Path | None = None,
        rec_keys: str | Path | None = None,
        engine_options: dict[str, Any] | None = None,
    ):
        if provider not in PROVIDERS:
            raise ValueError(f"provider={provider!r} is not supported; use 'cpu' or 'cuda'.")
        if num_threads is not None and (
            not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1
        ):
            raise ValueError(
                f"num_threads={num_threads!r} must be a positive integer, or None for onnxruntime's default."
            )
        if not isinstance(min_confidence, (int, float)) or not 0.0 <= min_confidence <= 1.0:
            raise ValueError(
                f"min_confidence={min_confidence!r} must be a number in [0, 1] (PaddleOCR drops lines below 0.5)."
            )
        engine_options = dict(engine_options or {})
        unknown = sorted(set(engine_options) - ENGINE_OPTIONS)
        if unknown:
            raise ValueError(
                f"engine_options has unknown key {unknown[0]!r}; use rapidocr option names among "
                f"{', '.join(sorted(ENGINE_OPTIONS))} (models, provider, threads and min_confidence have options "
                "of their own)."
            )
        self.root = _rapidocr_root()  # the package must be there, even with other model files
        wheel_det, wheel_rec = _wheel_models(self.root)
        self.provider = provider
        self.num_threads = num_threads
        self.min_confidence = float(min_confidence)
        self.det_model = _local_file(det_model, "det_model", "a text-detection ONNX model") or wheel_det
        self.rec_model = _local_file(rec_model, "rec_model", "a text-recognition ONNX model") or wheel_rec
        self.rec_keys = _local_file(rec_keys, "rec_keys", "a character list (one per line)")
        self.engine_options = engine_options
        self.engine = None
        self._digests: dict[str, str] | None = None

    def options(self) -> dict[str, Any]:
        """The keyword arguments given to ``rapidocr_onnxruntime.RapidOCR``."""
        opts: dict[str, Any] = {"use_cls": False, **PADDLEOCR_DET_SETTINGS, **self.engine_options}
        opts["text_score"] = self.min_confidence
        opts["det_model_path"] = str(self.det_model)
        opts["rec_model_path"] = str(self.rec_model)
        if self.rec_keys is not None:
            opts["rec_keys_path"] = str(self.rec_keys)
        use_cuda = self.provider == "cuda"
        opts.update(det_use_cuda=use_cuda, rec_use_cuda=use_cuda, cls_use_cuda=use_cuda)
        if self.num_threads is not None:
            opts.update(intra_op_num_threads=self.num_threads, inter_op_num_threads=1)
        return opts

    def load(self) -> None:
        if self.engine is not None:
            return
        try:
            import onnxruntime
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as err:
            raise ImportError(
                f"reward 'ocr' needs rapidocr-onnxruntime and onnxruntime ({err}); {INSTALL_HINT}."
            ) from err
        wanted = PROVIDERS[self.provider]
        available = onnxruntime.get_available_providers()
        if wanted not in available:
            raise RuntimeError(
                f"provider={self.provider!r} needs onnxruntime's {wanted}, and this onnxruntime has only "
                f"{', '.join(available)}; install onnxruntime-gpu (matching your CUDA) or use provider='cpu'."
            )
        engine = RapidOCR(**self.options())
        # rapidocr falls back to the CPU with a warning when CUDA cannot be used: refuse that slow path
        sessions = {
            "detection": getattr(getattr(engine.text_det, "infer", None), "session", None),
            "recognition": getattr(getattr(engine.text_rec, "session", None), "session", None),
        }
        for stage, session in sessions.items():
            used = session.get_providers() if session is not None else [wanted]
            if used[0] != wanted:
                raise RuntimeError(
                    f"provider={self.provider!r}: onnxruntime runs the OCR {stage} model on {used[0]}, not "
                    f"{wanted}; check that onnxruntime-gpu sees a GPU, or use provider='cpu'."
                )
        self.engine = engine

    def recognize(self, images: list[np.ndarray]) -> list[str]:
        self.load()
        texts = []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"RapidOCRRecognizer.recognize got an array {image.shape} {image.dtype}; pass (H, W, 3) uint8."
                )
            result, _ = self.engine(image)
            # each line: [box, text, confidence]; the engine already dropped lines below min_confidence
            texts.append("".join(line[1] for line in (result or []) if float(line[2]) > 0))
        return texts

    def settings(self) -> dict[str, Any]:
        if self._digests is None:
            files = {"det": self.det_model, "rec": self.rec_model}
            if self.rec_keys is not None:
                files["rec_keys"] = self.rec_keys
            self._digests = {k: _sha256(p) for k, p in files.items()}
        from importlib.metadata import PackageNotFoundError, version

        try:
            engine_version = version("rapidocr-onnxruntime")
        except PackageNotFoundError:
            engine_version = "unknown"
        opts = {k: v for k, v in self.options().items() if not k.endswith(("_model_path", "_keys_path"))}
        opts = {k: v for k, v in opts.items() if k not in ("intra_op_num_threads", "inter_op_num_threads")}
        return {"engine": f"rapidocr-onnxruntime {engine_version}", "options": opts, "sha256": self._digests}

    def __repr__(self) -> str:
        return f"RapidOCRRecognizer(provider={self.provider!r}, rec_model={self.rec_model.name!r})"


# ----------------------------------------------------------------------------------------------- the reward
class OCRReward(Reward):
    """Flow-GRPO's OCR reward: ``1 - min(edit distance, n) / n`` between the quoted text of the prompt (``n``
    characters without spaces) and the text read in the image; in [0, 1]. See the module docstring.

    Args:
        recognizer: the OCR engine: ``None`` (default) for :class:`RapidOCRRecognizer` built from the options
            below, an object with ``recognize(images) -> texts`` (:class:`TextRecognizer`), or a
            ``"package.module:attr"`` string naming such an object or a class / factory called without arguments.
        provider, num_threads, min_confidence, det_model, rec_model, rec_keys, engine_options: options of the
            default engine (see :class:`RapidOCRRecognizer`); only with ``recognizer=None``.
        batch_size, device: see :class:`~diffrl.rewards.Reward` (the engine runs where ``provider`` says, on
            8-bit copies of the images; ``device`` only decides where the images are before that).
        dtype: float32 only (the ONNX models run in float32).
    """

    name = "ocr"
    differentiable = False
    per_sample = True

    def __init__(
        self,
        recognizer: TextRecognizer | str | None = None,
        provider: str = "cpu",
        num_threads: int | None = None,
        min_confidence: float = 0.5,
        det_model: str | Path | None = None,
        rec_model: str | Path | None = None,
        rec_keys: str | Path | None = None,
        engine_options: dict[str, Any] | None = None,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if self.dtype != torch.float32:
            raise ValueError(
                f"dtype={dtype!r} is not supported by reward 'ocr': its ONNX models run in float32; drop the option."
            )
        if recognizer is None:
            self.recognizer = RapidOCRRecognizer(
                provider=provider,
                num_threads=num_threads,
                min_confidence=min_confidence,
                det_model=det_model,
                rec_model=rec_model,
                rec_keys=rec_keys,
                engine_options=engine_options,
            )
            return
        given = {
            "provider": provider != "cpu",
            "num_threads": num_threads is not None,
            "min_confidence": min_confidence != 0.5,
            "det_model": det_model is not None,
            "rec_model": rec_model is not None,
            "rec_keys": rec_keys is not None,
            "engine_options": bool(engine_options),
        }
        clash = [k for k, v in given.items() if v]
        if clash:
            raise ValueError(
                f"option {clash[0]!r} configures the default rapidocr engine, and recognizer={recognizer!r} replaces "
                "it; set that option on your recognizer instead, or drop recognizer."
            )
        if isinstance(recognizer, str):
            obj = import_attr(recognizer)
            recognizer = obj() if isinstance(obj, type) or not hasattr(obj, "recognize") else obj
        if not callable(getattr(recognizer, "recognize", None)):
            raise TypeError(
                f"recognizer {recognizer!r} has no recognize method; pass an object with "
                "recognize(list of (H, W, 3) uint8 arrays) -> list of str, or None for the rapidocr engine."
            )
        self.recognizer = recognizer

    @classmethod
    def hub_files(cls, **kwargs) -> list[HubFile]:
        """None: the default models ship in the rapidocr-onnxruntime wheel, other ones are local files."""
        return []

    def _load(self) -> None:
        load = getattr(self.recognizer, "load", None)
        if callable(load):
            load()

    def weight_modules(self) -> list[torch.nn.Module]:
        return []  # the engine's model files are hashed in settings()

    def settings(self) -> dict[str, Any]:
        engine_settings = getattr(self.recognizer, "settings", None)
        engine = type(self.recognizer)
        return {
            "score": "flow_grpo ocr: 1 - min(levenshtein, n) / n, substring -> 1",
            "recognizer": f"{engine.__module__}.{engine.__qualname__}",
            "recognizer_settings": engine_settings() if callable(engine_settings) else None,
        }

    def wanted_texts(self, prompts: Sequence[str]) -> list[str]:
        """The quoted text of each prompt, checked (a ``"`` present, something left once spaces are removed)."""
        wanted = [quoted_text(p) for p in prompts]
        for prompt, text in zip(prompts, wanted, strict=True):
            if not normalize_text(text):
                raise ValueError(
                    f"reward 'ocr': the quoted text of {prompt!r} is empty once spaces are removed; put the text to "
                    'render between the quotes, e.g. a sign that says "OPEN".'
                )
        return wanted

    def read_text(self, images: torch.Tensor) -> list[str]:
        """The text the engine reads in each image ``(B, 3, H, W)`` in [0, 1] (before normalisation)."""
        if not self._loaded:
            self.load()
        arrays = images_to_uint8(images)
        texts = self.recognizer.recognize(arrays)
        if len(texts) != len(arrays) or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"recognizer {self.recognizer!r} returned {type(texts).__name__} of {len(texts)} items for "
                f"{len(arrays)} images; return one string per image."
            )
        return list(texts)

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        wanted = self.wanted_texts(prompts)  # bad prompts fail before any image is read
        texts = self.read_text(images)
        scores = [ocr_score(read, text) for read, text in zip(texts, wanted, strict=True)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def __repr__(self) -> str:
        return f"OCRReward(recognizer={self.recognizer!r})"
