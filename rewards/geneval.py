"""GenEval: compositional correctness of an image against a structured prompt (object presence, counting, colours,
relative positions, two objects), checked with an instance segmenter and a CLIP colour classifier; score-only.

The prompt's requirements come from the metadata in GenEval's own format, one row of its ``metadata.jsonl``
(Ghosh et al., NeurIPS 2023, https://github.com/djghosh13/geneval, ``prompts/evaluation_metadata.jsonl``)::

    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"}

``tag`` is one of ``single_object``, ``two_object``, ``counting``, ``colors``, ``position``, ``color_attr``;
``include`` lists the required objects (``class`` among GenEval's 80 COCO names, ``count``, an optional ``color``
among GenEval's 10 colours, an optional ``position`` ``[relation, index of an earlier include]``); ``exclude``
(counting rows) lists ``{class, count}`` that must *not* be reached. The reward reads the fields ``tag``,
``include`` and ``exclude`` (the prompt file's per-prompt metadata); see "Metadata" below.

Pipeline (matched to ``evaluation/evaluate_images.py`` of djghosh13/geneval):

1. *Detection*: images are rounded to 8 bits (what a saved PNG holds, which GenEval's evaluator reads) and run
   through a Mask2Former COCO instance segmenter. The post-processing is mmdetection's ``MaskFormerFusionHead``
   ``instance_postprocess`` (``mmdet/models/seg_heads/panoptic_fusion_heads/maskformer_fusion_head.py``), which
   GenEval's mmdet detector runs: class probabilities are the softmax without the no-object column; the top 100
   (query, class) pairs are kept; each query's mask logits are upsampled bilinearly to the network input, the
   padding is cropped off and they are upsampled again to the image size; the mask is ``logit > 0``; the
   detection score is the class probability times the mean sigmoid inside the mask; the box is the mask's tight
   box ``[x0, y0, x_last + 1, y_last + 1]`` (mmdet's ``mask2bbox``).
2. *Selection* (:func:`select_objects`), per class: detections with score above 0.3 (``threshold``; 0.9,
   ``counting_threshold``, for ``counting`` prompts), highest first, at most 16 (``max_objects``), then a greedy
   overlap filter that drops a box whose IoU with a kept one reaches ``max_overlap`` (1.0 by default: off, as in
   GenEval; IoU with GenEval's ``+1`` pixel convention).
3. *Colour* of the objects a colour requirement looks at (the ``count`` highest-scoring of the class): the image
   is composited on a grey ``#999`` background through the object's mask, cropped to its box (PIL rounds the box
   to whole pixels), preprocessed with open_clip's transform (shorter side to 224 bicubic, centre crop, OpenAI
   mean/std) and classified by CLIP ViT-L-14 (OpenAI weights) zero-shot among ``red, orange, yellow, green, blue,
   purple, pink, brown, black, white``: each colour's text embedding is the renormalised mean of the normalised
   embeddings of ``"a photo of a {color} {object}"``, ``"a photo of a {color}-colored {object}"`` and
   ``"a photo of a {color} object"``, and the colour is the argmax of ``100 * cosine`` (clip_benchmark's
   ``zero_shot_classifier`` / ``run_classification``).
4. *Position* (:func:`relative_position`): with centres ``c``, box sizes ``d`` and ``offset = c_a - c_b``, each
   axis's offset is shrunk by ``0.1 * (d_a + d_b)`` (``position_threshold``, the margin) towards 0; no relation
   when both shrunk offsets are below 1e-3; otherwise, divided by ``|offset|``, ``dx < -0.5`` is "left of",
   ``dx > 0.5`` "right of", ``dy < -0.5`` "above", ``dy > 0.5`` "below" (image y points down).

Scores (:func:`score_objects` returns all three, the reward one of them):

* ``strict`` (``strict=True``): GenEval's correctness, 0 or 1, what the benchmark averages. Every include needs at
  least ``count`` detections of its class; its colour must be that of all of the ``count`` best; its relation
  must hold between each of them and each object of the target include (which must itself have passed);
  every exclude needs fewer than ``count`` detections.
* ``partial`` (default): partial credit per requirement, as flow_grpo trains with (yifan123/reward-server,
  ``reward_server/gen_eval.py``, ``evaluate_reward``): the mean over the include requirements of a count credit
  ``max(0, 1 - |n - count| / count)`` (``n``: all selected detections of the class), a colour credit ``k / count``
  (``k`` of the objects of that colour; 0 unless ``n == count``) and a position credit (1 when ``n == count``,
  the colour held, the target include passed and the relation holds for every pair; else 0). Excludes do not
  enter the partial credit (as in flow_grpo), the count credit covers the counting prompts' excess objects.
* ``exact`` (``strict=True, exact_counts=True``): flow_grpo's ``strict_correct``: every include needs exactly
  ``count`` detections, all of its colour, and its relation; the excludes are checked too (on GenEval's rows
  this changes nothing: their excludes are ``count + 1`` of the included class).

Differences from the official evaluator (djghosh13/geneval):

* Detector: GenEval runs mmdetection 2.x's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`` checkpoint; diffrl
  uses transformers' ``Mask2FormerForUniversalSegmentation`` (no mmcv / mmdet to build) with, by default,
  ``facebook/mask2former-swin-small-coco-instance``: the same architecture, backbone (Swin-S), queries (100),
  task (COCO instance segmentation, 80 classes) and training recipe family (LSJ, 50 epochs), but weights trained
  by Mask2Former's authors rather than by mmdetection, so individual detections and hence scores differ somewhat.
  Swin-S is what GenEval uses; larger checkpoints (``...-swin-large-coco-instance``) are more accurate but no
  longer GenEval's detector.
* Detector input: resized keeping the aspect ratio to fit 1333 x 800 (shorter side 800; mmdet's test scale,
  ``detector_size``), normalised with ImageNet's mean/std, through the checkpoint's ``Mask2FormerImageProcessor``
  (torchvision's bilinear resize instead of OpenCV's). The processor rounds each side *up* to a multiple of 32
  by resizing, where mmdet pads: identical for square images whose side is a multiple of 32 at 800 px (512,
  1024), a slight stretch otherwise. The hub repository's own ``preprocessor_config.json`` resizes to a
  384 x 384 square instead; ``detector_size=None`` uses it.
* Post-processing: transformers' ``post_process_instance_segmentation`` (fixed 384 x 384 masks, nearest
  upsampling, no boxes) is not used; mmdet's (above) is reimplemented in torch, in float32. Detections whose
  class probability is not above the threshold are skipped before their masks are upsampled (the detection
  score is at most the class probability, so none of them could pass).
* Colour classifier: the same model (open_clip ViT-L-14, OpenAI weights, QuickGELU), loaded from the open_clip
  file on the hub (``timm/vit_large_patch14_clip_224.openai``, ``open_clip_model.safetensors``), in ``dtype``
  without autocast (GenEval runs it under CUDA float16 autocast).
* Images are float tensors rounded to 8 bits, not PNG files; flow_grpo's client JPEG-compresses them (PIL's
  default quality) before its server scores them, which this reward does not.
* flow_grpo's partial credit differs in two places: its count credit is not clamped (three dogs for "a photo of
  a dog" score 1 - 2 = -1 there, 0 here), and after a failed position check it records a 0 and then a 1 (so
  a failed relation scores 0.75 on a two-object position prompt there, 2/3 here).
* Ties between equal detection scores keep the detector's order (GenEval's reversed ``argsort`` may order them
  differently).

Metadata: the fields ``tag`` and ``include`` (required on every prompt) and ``exclude`` (per prompt; ``None`` or
absent means none). diffrl hands a reward a metadata field only when every prompt of the batch has it, and GenEval's
file has ``exclude`` on its counting rows only, so a counting row in a mixed batch would lose it: a counting row
without ``exclude`` therefore raises an error. Give every row an ``exclude`` list (``[]`` where GenEval has none),
e.g. with :func:`prompt_rows` on GenEval's ``evaluation_metadata.jsonl``.

Checkpoints and licences: detector ``facebook/mask2former-swin-small-coco-instance`` (``config.json``,
``model.safetensors``, ``preprocessor_config.json``; about 270 MB; the hub card says "other", the Mask2Former
release is MIT); CLIP ``timm/vit_large_patch14_clip_224.openai`` (``open_clip_model.safetensors``, about 1.7 GB;
OpenAI CLIP weights, MIT; the repository is tagged Apache-2.0). GenEval's code is MIT. transformers'
Mask2Former needs ``scipy`` to be built (the ``geneval`` extra).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Reward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .weights import HubFile, WeightsNotFoundError, fetch_hint, resolve_file, resolve_snapshot

__all__ = [
    "GenEval",
    "Detection",
    "Requirement",
    "GenEvalSpec",
    "GenEvalResult",
    "GENEVAL_CLASSES",
    "GENEVAL_COLORS",
    "GENEVAL_TAGS",
    "RELATIONS",
    "COLOR_TEMPLATES",
    "DEFAULT_DETECTOR",
    "DEFAULT_CLIP",
    "CLIP_FILE",
    "DETECTOR_FILES",
    "parse_metadata",
    "metadata_rows",
    "detector_labels",
    "prompt_rows",
    "box_iou",
    "relative_position",
    "select_objects",
    "color_queries",
    "score_objects",
    "mask_boxes",
    "instance_detections",
]

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DETECTOR_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
DEFAULT_CLIP = "timm/vit_large_patch14_clip_224.openai"
CLIP_FILE = "open_clip_model.safetensors"
#: mmdet's test scale for Mask2Former on COCO: keep the aspect ratio, fit 1333 x 800.
DEFAULT_DETECTOR_SIZE = {"shortest_edge": 800, "longest_edge": 1333}

#: GenEval's class names (``evaluation/object_names.txt``): COCO's 80 things in COCO order, with GenEval's spelling.
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
COLOR_TEMPLATES = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
# Other spellings of COCO's class names in detector configs (Detectron2 / transformers / mmdet use the short ones).
_LABEL_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "hair dryer": "hair drier",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
}


# ---------------------------------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class Requirement:
    """One ``include`` (or ``exclude``) clause: ``count`` objects of ``cls``, optionally of ``color`` and in
    ``position = (relation, index of the target include)``."""

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None


@dataclass(frozen=True)
class GenEvalSpec:
    """A validated GenEval metadata row."""

    tag: str
    include: tuple[Requirement, ...]
    exclude: tuple[Requirement, ...] = ()


def _loads(value: Any, what: str) -> Any:
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                f"geneval metadata: {what}={value!r} is not valid JSON; pass a list or its JSON text."
            ) from None
    return value


def _class_name(value: Any, where: str) -> str:
    if isinstance(value, str) and value in GENEVAL_CLASSES:
        return value
    close = difflib.get_close_matches(str(value), GENEVAL_CLASSES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"geneval metadata: {where} class {value!r} is not one of GenEval's 80 COCO class names{hint}; spell it as "
        "GenEval's object_names.txt does (diffrl.rewards.geneval.GENEVAL_CLASSES)."
    )


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"geneval metadata: {where} count={value!r} must be a positive integer.")
    return int(value)


def _requirement(clause: Any, where: str, index: int, exclude: bool) -> Requirement:
    if not isinstance(clause, Mapping) or "class" not in clause or "count" not in clause:
        raise ValueError(
            f"geneval metadata: {where}[{index}]={clause!r} must be a dict with 'class' and 'count', e.g. "
            "{'class': 'dog', 'count': 2}."
        )
    cls = _class_name(clause["class"], f"{where}[{index}]")
    count = _count(clause["count"], f"{where}[{index}]")
    color = clause.get("color")
    position = clause.get("position")
    if exclude and (color is not None or position is not None):
        raise ValueError(
            f"geneval metadata: {where}[{index}]={dict(clause)!r} has a color or position, which GenEval's excludes "
            "do not take; give excludes only 'class' and 'count'."
        )
    if color is not None and color not in GENEVAL_COLORS:
        raise ValueError(
            f"geneval metadata: {where}[{index}] color {color!r} is not one of GenEval's colours; use one of "
            f"{', '.join(GENEVAL_COLORS)}."
        )
    if position is not None:
        ok = (
            isinstance(position, (list, tuple))
            and len(position) == 2
            and position[0] in RELATIONS
            and isinstance(position[1], (int, np.integer))
            and not isinstance(position[1], bool)
            and 0 <= position[1] < index
        )
        if not ok:
            raise ValueError(
                f"geneval metadata: {where}[{index}] position={position!r} must be [relation, index] with a "
                f"relation among {', '.join(map(repr, RELATIONS))} and the index of an earlier include "
                f"(0..{index - 1}), e.g. ['right of', 0]."
            )
        position = (str(position[0]), int(position[1]))
    return Requirement(cls=cls, count=count, color=color, position=position)


def parse_metadata(row: Mapping[str, Any]) -> GenEvalSpec:
    """Validate one GenEval metadata row (``tag``, ``include``, optional ``exclude``; other keys such as ``prompt``
    are ignored) into a :class:`GenEvalSpec`; a bad value raises a one-sentence ``ValueError`` naming it.

    A ``counting`` row must carry ``exclude`` (GenEval's counting rows do): without it "two clocks" would pass with
    three; see the module docstring on why the field may go missing in a batch."""
    if not isinstance(row, Mapping):
        raise ValueError(
            f"geneval metadata: row {row!r} must be a dict with 'tag' and 'include' (a line of GenEval's metadata.jsonl)."
        )
    tag = row.get("tag")
    if tag not in GENEVAL_TAGS:
        raise ValueError(
            f"geneval metadata: tag={tag!r} is not a GenEval tag; use one of {', '.join(GENEVAL_TAGS)}."
        )
    include = _loads(row.get("include"), "include")
    if not isinstance(include, (list, tuple)) or not include:
        raise ValueError(
            f"geneval metadata: include={include!r} must be a non-empty list of requirements such as "
            "[{'class': 'dog', 'count': 1}], as in GenEval's metadata.jsonl."
        )
    exclude = _loads(row.get("exclude"), "exclude")
    if exclude is None:
        if tag == "counting":
            raise ValueError(
                "geneval metadata: a 'counting' row has no 'exclude' (GenEval's counting rows list the counts that "
                "fail); give every counting prompt an 'exclude' list, e.g. with diffrl.rewards.geneval.prompt_rows."
            )
        exclude = []
    if not isinstance(exclude, (list, tuple)):
        raise ValueError(
            f"geneval metadata: exclude={exclude!r} must be a list such as [{{'class': 'dog', 'count': 3}}] or []."
        )
    return GenEvalSpec(
        tag=str(tag),
        include=tuple(_requirement(c, "include", i, False) for i, c in enumerate(include)),
        exclude=tuple(_requirement(c, "exclude", i, True) for i, c in enumerate(exclude)),
    )


def prompt_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """GenEval metadata rows (e.g. the lines of ``evaluation_metadata.jsonl``) ready for a diffrl ``.jsonl`` prompt
    file: each validated and given an ``exclude`` list (``[]`` where it has none), so that no batch drops the field::

        rows = [json.loads(line) for line in open("evaluation_metadata.jsonl")]
        Path("geneval.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in prompt_rows(rows)))
    """
    out = []
    for i, row in enumerate(rows):
        try:
            parse_metadata(row)
        except ValueError as err:
            raise ValueError(f"row {i}: {err}") from None
        new = dict(row)
        if new.get("exclude") is None:
            new["exclude"] = []
        out.append(new)
    return out


# ---------------------------------------------------------------------------------------------- scoring logic
@dataclass(frozen=True, eq=False)
class Detection:
    """One detected object: GenEval class name, detection score, box ``(x0, y0, x1, y1)`` in pixels, optionally
    its boolean mask ``(H, W)`` (a tensor or array; used for the colour crop) and its classified colour."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: Any = None
    color: str | None = None


@dataclass(frozen=True)
class GenEvalResult:
    """The three scores of one image (see the module docstring) and GenEval-style reasons for failures."""

    strict: bool
    partial: float
    exact: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes with GenEval's convention (``+1`` on widths and heights)."""

    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(
        max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    )
    union = area(*box_a[:4]) + area(*box_b[:4]) - inter
    return float(inter / union) if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.1) -> set[str]:
    """The relations (subset of :data:`RELATIONS`) of box A to box B: the centre offset ``A - B`` is shrunk on each
    axis by ``margin * (size_A + size_B)`` towards 0; none when both shrunk offsets are below 1e-3; otherwise a
    relation holds when its axis carries more than half of the (unshrunk) offset's length."""
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)  # (box, corner, xy)
    centre = boxes.mean(axis=1)
    size = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre[0] - centre[1]
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin * (size[0] + size[1]), 0.0)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def select_objects(
    detections: Sequence[Detection],
    tag: str,
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    max_overlap: float = 1.0,
) -> dict[str, list[Detection]]:
    """GenEval's per-class selection: scores above ``threshold`` (``counting_threshold`` for ``counting``), best
    first, at most ``max_objects``, then greedy removal of boxes whose IoU with a kept one reaches ``max_overlap``
    (1.0: none removed). Returns ``{class: [detections, best first]}`` without empty classes."""
    limit = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    out = {}
    for label, dets in by_class.items():
        ranked = sorted((d for d in dets if d.score > limit), key=lambda d: -d.score)[:max_objects]
        kept = []
        while ranked:
            best = ranked.pop(0)
            kept.append(best)
            if max_overlap < 1.0:
                ranked = [d for d in ranked if box_iou(best.box, d.box) < max_overlap]
        if kept:
            out[label] = kept
    return out


def color_queries(
    objects: Mapping[str, Sequence[Detection]], spec: GenEvalSpec
) -> list[tuple[str, list[Detection]]]:
    """The detections whose colour the scores look at: for each include with a colour whose class has at least
    ``count`` detections, its ``count`` best. Classify them and set their ``color`` before :func:`score_objects`."""
    out = []
    for req in spec.include:
        found = list(objects.get(req.cls, []))
        if req.color is not None and len(found) >= req.count:
            out.append((req.cls, found[: req.count]))
    return out


def _colors_of(dets: Sequence[Detection], cls: str) -> list[str]:
    colors = [d.color for d in dets]
    if any(c is None for c in colors):
        raise ValueError(
            f"a colour requirement on {cls!r} needs the colour of its detections, and some have none; classify the "
            "detections color_queries() returns and set their color first."
        )
    return colors


def score_objects(
    objects: Mapping[str, Sequence[Detection]], spec: GenEvalSpec, position_threshold: float = 0.1
) -> GenEvalResult:
    """``strict`` (GenEval's correctness), ``partial`` (per-requirement credit) and ``exact`` (flow_grpo's strict
    correctness) of the selected objects (:func:`select_objects`, colours set on those :func:`color_queries`
    names) against the metadata ``spec``; see the module docstring for the rules."""
    # GenEval's correctness: at least `count`, judged on the `count` best detections.
    strict = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in spec.include:
        found = list(objects.get(req.cls, []))[: req.count]
        ok = len(found) >= req.count
        if not ok:
            reasons.append(f"{req.cls}: {len(found)} found, at least {req.count} wanted")
        else:
            if req.color is not None:
                colors = _colors_of(found, req.cls)
                if colors.count(req.color) < req.count:
                    ok = False
                    reasons.append(f"{req.cls}: colours {colors}, {req.count} {req.color} wanted")
            if req.position is not None and ok:
                relation, target = req.position
                if groups[target] is None:
                    ok = False
                    reasons.append(
                        f"{req.cls}: its target {spec.include[target].cls} was not found as required"
                    )
                else:
                    for a in found:
                        for b in groups[target]:
                            rels = relative_position(a.box, b.box, position_threshold)
                            if relation not in rels:
                                ok = False
                                reasons.append(
                                    f"{req.cls}: {sorted(rels) or 'no relation'} to {b.label}, {relation!r} wanted"
                                )
                                break
                        if not ok:
                            break
        strict &= ok
        groups.append(found if ok else None)
    for req in spec.exclude:
        n = len(objects.get(req.cls, []))
        if n >= req.count:
            strict = False
            reasons.append(f"{req.cls}: {n} found, fewer than {req.count} wanted")

    # Partial credit and exact correctness (flow_grpo's rules, see the module docstring): exactly `count`.
    credits: list[float] = []
    exact = True
    exact_groups: list[list[Detection] | None] = []
    for req in spec.include:
        found = list(objects.get(req.cls, []))
        n = len(found)
        credits.append(max(0.0, 1.0 - abs(n - req.count) / req.count))
        ok = n == req.count
        if req.color is not None:
            if ok:
                k = _colors_of(found, req.cls).count(req.color)
                credits.append(k / req.count)
                ok = k == req.count
            else:
                credits.append(0.0)
        if req.position is not None:
            relation, target = req.position
            ok = (
                ok
                and exact_groups[target] is not None
                and all(
                    relation in relative_position(a.box, b.box, position_threshold)
                    for a in found
                    for b in exact_groups[target]
                )
            )
            credits.append(1.0 if ok else 0.0)
        exact &= ok
        exact_groups.append(found if ok else None)
    exact &= all(len(objects.get(req.cls, [])) < req.count for req in spec.exclude)
    return GenEvalResult(
        strict=bool(strict), partial=float(np.mean(credits)), exact=bool(exact), reasons=tuple(reasons)
    )


# --------------------------------------------------------------------------------------- detector post-processing
def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes ``(N, 4)`` float32 ``[x0, y0, x_last + 1, y_last + 1]`` of boolean masks ``(N, H, W)``; zeros
    for an empty mask (mmdet's ``mask2bbox``)."""
    n, h, w = masks.shape
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    big = max(h, w) + 1
    x0 = torch.where(cols, xs, big).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ys, big).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~cols.any(dim=1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)


def instance_detections(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    input_size: tuple[int, int],
    valid_size: tuple[int, int],
    image_size: tuple[int, int],
    labels: Sequence[str] = GENEVAL_CLASSES,
    max_per_image: int = 100,
    min_class_score: float = 0.0,
) -> list[Detection]:
    """mmdet's Mask2Former instance post-processing of one image (see the module docstring), in float32.

    Args:
        class_logits: ``(Q, C + 1)`` class logits of the queries (the last column is "no object").
        mask_logits: ``(Q, h, w)`` mask logits at a stride of the network input.
        input_size: ``(H_in, W_in)`` of the network input (padding included); masks are first upsampled to it.
        valid_size: ``(H_r, W_r)`` of the resized image inside the input (the rest is padding, cropped off).
        image_size: ``(H, W)`` of the original image; masks and boxes are returned at this size.
        labels: the C class names, in the detector's order.
        max_per_image: how many (query, class) pairs of highest probability are kept (mmdet: 100).
        min_class_score: pairs whose class probability is not above it are dropped before their masks are
            computed (their detection score could not exceed it).
    """
    probs = torch.softmax(class_logits.float(), dim=-1)[:, :-1]
    num_queries, num_classes = probs.shape
    if num_classes != len(labels):
        raise ValueError(f"the detector predicts {num_classes} classes but {len(labels)} labels were given.")
    k = min(max_per_image, num_queries * num_classes)
    top, index = probs.flatten().topk(k)
    keep = top > min_class_score
    top, index = top[keep], index[keep]
    if top.numel() == 0:
        return []
    query = torch.div(index, num_classes, rounding_mode="floor")
    cls = index % num_classes
    used, inverse = torch.unique(query, return_inverse=True)
    masks = mask_logits[used].float()[None]
    masks = F.interpolate(masks, size=tuple(input_size), mode="bilinear", align_corners=False)
    masks = masks[..., : valid_size[0], : valid_size[1]]
    masks = F.interpolate(masks, size=tuple(image_size), mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    area = binary.flatten(1).sum(1).float()
    mask_score = (masks.sigmoid() * binary).flatten(1).sum(1) / (area + 1e-6)
    boxes = mask_boxes(binary)
    scores = top * mask_score[inverse]
    out = []
    for j in range(top.numel()):
        q = int(inverse[j])
        out.append(
            Detection(
                label=labels[int(cls[j])],
                score=float(scores[j]),
                box=tuple(float(v) for v in boxes[q].tolist()),
                mask=binary[q],
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------- reward
def _is_local(spec: str | Path) -> bool:
    path = Path(str(spec)).expanduser()
    return path.exists() or str(spec).startswith((".", "/", "~"))


def _normalise_label(name: str) -> str:
    name = " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())
    return _LABEL_ALIASES.get(name, name)


def detector_labels(id2label: Mapping[Any, str], source: str) -> tuple[str, ...]:
    """GenEval's names for a detector's ``id2label`` (COCO's 80 classes in COCO order, any common spelling)."""
    names = [id2label.get(i, id2label.get(str(i))) for i in range(len(id2label))]
    got = tuple(_normalise_label(n) for n in names)
    if len(got) != len(GENEVAL_CLASSES):
        raise ValueError(
            f"{source} predicts {len(got)} classes; GenEval needs a COCO instance-segmentation detector with 80 "
            f"classes, such as {DEFAULT_DETECTOR!r}."
        )
    for i, (name, want) in enumerate(zip(got, GENEVAL_CLASSES, strict=True)):
        if name != want:
            raise ValueError(
                f"{source} calls class {i} {names[i]!r} where COCO has {want!r}; GenEval needs a detector with COCO's "
                f"80 classes in COCO order, such as {DEFAULT_DETECTOR!r}."
            )
    return GENEVAL_CLASSES


class _DropRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_open_clip():
    """Hide open_clip's 'initialized randomly' warning: the weights are loaded right after creation."""
    root = logging.getLogger()
    flt = _DropRandomInit()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _check_size(size: Any) -> dict[str, int] | None:
    if size is None:
        return None
    if isinstance(size, Mapping):
        keys = set(size)
        if keys in ({"shortest_edge", "longest_edge"}, {"height", "width"}) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 32 for v in size.values()
        ):
            return {k: int(v) for k, v in size.items()}
    raise ValueError(
        f"detector_size={size!r} must be {{'shortest_edge': S, 'longest_edge': L}} or {{'height': H, 'width': W}} "
        "with integers >= 32 (default: mmdet's {'shortest_edge': 800, 'longest_edge': 1333}), or None for the "
        "checkpoint's preprocessor_config.json."
    )


def _unit(value: Any, name: str, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}={value!r} must be a number in {interval}.")
    return float(value)


def _per_sample(value: Any, batch: int, key: str) -> list[Any]:
    if isinstance(value, str) and key == "tag":
        return [value] * batch
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != batch:
        got = f"{len(value)} values" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(
            f"reward 'geneval' got metadata {key!r} as {got} for {batch} images; pass one value per image "
            f"(e.g. {key}=[row[{key!r}] for row in rows])."
        )
    return list(value)


def metadata_rows(metadata: Mapping[str, Any], batch: int) -> list[GenEvalSpec]:
    """The validated GenEval rows of a reward call's ``**metadata`` (per-sample ``tag``, ``include`` and optional
    ``exclude``); errors name the image."""
    missing = [k for k in ("tag", "include") if k not in metadata]
    if missing:
        raise ValueError(
            f"reward 'geneval' needs the metadata fields 'tag' and 'include' (and 'exclude') of GenEval's "
            f"metadata.jsonl, and {missing[0]!r} is missing; use a .jsonl prompt file of GenEval rows."
        )
    tags = _per_sample(metadata["tag"], batch, "tag")
    includes = _per_sample(metadata["include"], batch, "include")
    excludes = (
        _per_sample(metadata["exclude"], batch, "exclude") if metadata.get("exclude") is not None else None
    )
    out = []
    for i in range(batch):
        row = {"tag": tags[i], "include": includes[i]}
        if excludes is not None:
            row["exclude"] = excludes[i]
        try:
            out.append(parse_metadata(row))
        except ValueError as err:
            raise ValueError(f"reward 'geneval', image {i}: {err}") from None
    return out


class GenEval(Reward):
    """GenEval's compositional check as a reward (see the module docstring): partial credit by default, GenEval's
    0/1 correctness with ``strict=True`` (flow_grpo's exact-count variant with ``exact_counts=True`` too).

    Args:
        strict: score 0/1 correctness instead of partial credit.
        exact_counts: with ``strict``, require exactly ``count`` objects (flow_grpo's ``strict_correct``) instead of
            GenEval's "at least ``count``, fewer than the excludes".
        detector: hub id or local directory of a transformers Mask2Former COCO instance-segmentation checkpoint
            (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).
        clip_checkpoint: ``None`` (``open_clip_model.safetensors`` of ``timm/vit_large_patch14_clip_224.openai``), a
            local open_clip weights file, a directory holding ``open_clip_model.safetensors``, or another hub repo id.
        clip_arch: the open_clip architecture of those weights (``"ViT-L-14"``; tests pass a tiny one).
        clip_quick_gelu: build the CLIP with QuickGELU (OpenAI's weights need it; open_clip sets it for them).
        detector_size: the detector's resize (default mmdet's ``{"shortest_edge": 800, "longest_edge": 1333}``;
            ``None``: the checkpoint's ``preprocessor_config.json``).
        threshold, counting_threshold, max_objects, max_overlap, position_threshold: GenEval's options of the same
            names (0.3, 0.9, 16, 1.0, 0.1).
        crop_background: the colour behind a masked object for the colour classifier (GenEval's ``"#999"``, any PIL
            colour), or ``"original"`` for the unmasked image.
        batch_size, device, dtype: see :class:`~diffrl.rewards.Reward` (``dtype`` applies to both models).
    """

    name = "geneval"
    differentiable = False
    required_metadata = ("tag", "include")

    def __init__(
        self,
        strict: bool = False,
        exact_counts: bool = False,
        detector: str | Path = DEFAULT_DETECTOR,
        clip_checkpoint: str | Path | None = None,
        clip_arch: str = "ViT-L-14",
        clip_quick_gelu: bool = True,
        detector_size: Mapping[str, int] | None = DEFAULT_DETECTOR_SIZE,
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        max_overlap: float = 1.0,
        position_threshold: float = 0.1,
        crop_background: str = "#999",
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if not isinstance(strict, bool) or not isinstance(exact_counts, bool):
            raise ValueError(f"strict={strict!r} and exact_counts={exact_counts!r} must be True or False.")
        if exact_counts and not strict:
            raise ValueError(
                "exact_counts=True only changes the strict 0/1 score (the partial credit already counts exactly); "
                "set strict=True as well, or drop exact_counts."
            )
        if not isinstance(detector, (str, Path)) or not str(detector):
            raise ValueError(
                f"detector={detector!r} must be a hub id such as {DEFAULT_DETECTOR!r} or a local directory."
            )
        if clip_checkpoint is not None and (
            not isinstance(clip_checkpoint, (str, Path)) or not str(clip_checkpoint)
        ):
            raise ValueError(
                f"clip_checkpoint={clip_checkpoint!r} must be None, an open_clip weights file, a directory or a hub id."
            )
        if not isinstance(clip_arch, str) or not clip_arch:
            raise ValueError(f"clip_arch={clip_arch!r} must be an open_clip model name such as 'ViT-L-14'.")
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
            raise ValueError(f"max_objects={max_objects!r} must be a positive integer (GenEval: 16).")
        ok = isinstance(position_threshold, (int, float)) and not isinstance(position_threshold, bool)
        if not ok or not (math.isfinite(position_threshold) and position_threshold >= 0.0):
            raise ValueError(
                f"position_threshold={position_threshold!r} must be a number >= 0 (GenEval: 0.1)."
            )
        if crop_background != "original":
            from PIL import ImageColor

            try:
                ImageColor.getrgb(crop_background)
            except (ValueError, AttributeError, TypeError):
                raise ValueError(
                    f"crop_background={crop_background!r} is not a PIL colour; use e.g. '#999' (GenEval) or 'original'."
                ) from None
        self.strict = strict
        self.exact_counts = exact_counts
        self.detector_spec = detector
        self.clip_checkpoint = clip_checkpoint
        self.clip_arch = clip_arch
        self.clip_quick_gelu = bool(clip_quick_gelu)
        self.detector_size = _check_size(detector_size)
        self.threshold = _unit(threshold, "threshold")
        self.counting_threshold = _unit(counting_threshold, "counting_threshold")
        self.max_objects = max_objects
        self.max_overlap = _unit(max_overlap, "max_overlap", low_open=True)
        self.position_threshold = float(position_threshold)
        self.crop_background = crop_background
        self.detector = None
        self.processor = None
        self.clip = None
        self._labels: tuple[str, ...] = GENEVAL_CLASSES
        self._classifiers: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ options and files
    def settings(self) -> dict[str, Any]:
        return {
            "score": ("exact" if self.exact_counts else "strict") if self.strict else "partial",
            "detector_size": self.detector_size,
            "threshold": self.threshold,
            "counting_threshold": self.counting_threshold,
            "max_objects": self.max_objects,
            "max_overlap": self.max_overlap,
            "position_threshold": self.position_threshold,
            "crop_background": self.crop_background,
            "clip_arch": self.clip_arch,
            "clip_quick_gelu": self.clip_quick_gelu,
            "templates": COLOR_TEMPLATES,
            "colors": GENEVAL_COLORS,
            "postprocess": "mmdet-maskformer-instance-top100",
            "dtype": str(self.dtype),
        }

    @classmethod
    def hub_files(
        cls, detector: str | Path = DEFAULT_DETECTOR, clip_checkpoint: str | Path | None = None, **kwargs
    ) -> list[HubFile]:
        files = [] if _is_local(detector) else [HubFile(str(detector), f) for f in DETECTOR_FILES]
        if clip_checkpoint is None:
            files.append(HubFile(DEFAULT_CLIP, CLIP_FILE))
        elif not _is_local(clip_checkpoint) and Path(str(clip_checkpoint)).suffix not in {
            ".pt", ".pth", ".bin", ".safetensors"
        }:  # fmt: skip
            files.append(HubFile(str(clip_checkpoint), CLIP_FILE))
        return files

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        files = self.hub_files(detector=self.detector_spec, clip_checkpoint=self.clip_checkpoint)
        try:  # both resolved first, so that one message names every missing file
            detector_dir = resolve_snapshot(self.detector_spec, list(DETECTOR_FILES), self.name)
            clip_path = resolve_file(self.clip_checkpoint, HubFile(DEFAULT_CLIP, CLIP_FILE), self.name)
        except WeightsNotFoundError as err:
            raise WeightsNotFoundError(fetch_hint(self.name, files)) from err
        self._load_detector(Path(detector_dir))
        self._load_clip(Path(clip_path))

    def _load_detector(self, directory: Path) -> None:
        from transformers import (
            Mask2FormerConfig,
            Mask2FormerForUniversalSegmentation,
            Mask2FormerImageProcessor,
        )

        weights = ("model.safetensors", "pytorch_model.bin")
        for name in ("config.json", "preprocessor_config.json", weights):
            names = name if isinstance(name, tuple) else (name,)
            if not any((directory / n).is_file() for n in names):
                raise FileNotFoundError(
                    f"reward {self.name!r}: {directory} has no {' or '.join(names)}; pass a transformers Mask2Former "
                    "checkpoint directory (config.json, model.safetensors, preprocessor_config.json) or a hub id."
                )
        config = Mask2FormerConfig.from_pretrained(directory)  # checked before the weights are read
        self._labels = detector_labels(config.id2label, f"detector {self.detector_spec}")
        try:
            import scipy  # noqa: F401  (transformers builds Mask2Former's training loss with it)
        except ImportError as err:
            raise ImportError(
                "reward 'geneval' needs scipy to build transformers' Mask2Former; install it with "
                "pip install 'diffrl[geneval]' (or pip install scipy)."
            ) from err
        model, info = Mask2FormerForUniversalSegmentation.from_pretrained(directory, output_loading_info=True)
        missing = list(info.get("missing_keys", ())) + [str(m) for m in info.get("mismatched_keys", ())]
        if missing:
            raise ValueError(
                f"reward {self.name!r}: {directory} is not a complete Mask2Former checkpoint (missing or mismatched "
                f"weights such as {missing[:3]}); pass a transformers Mask2FormerForUniversalSegmentation checkpoint."
            )
        kwargs = {} if self.detector_size is None else {"size": dict(self.detector_size)}
        self.processor = Mask2FormerImageProcessor.from_pretrained(directory, **kwargs)
        self.detector = model.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)

    def _load_clip(self, path: Path) -> None:
        import open_clip

        if self.clip_arch not in open_clip.list_models():
            raise ValueError(
                f"clip_arch={self.clip_arch!r} is not an open_clip model name; pass one of open_clip.list_models() "
                "(GenEval uses 'ViT-L-14') or register it with open_clip.add_model_config first."
            )
        with _quiet_open_clip():
            model = open_clip.create_model(
                self.clip_arch, pretrained=None, force_quick_gelu=self.clip_quick_gelu
            )
        try:
            open_clip.load_checkpoint(model, str(path))
        except (RuntimeError, KeyError, ValueError, AssertionError) as err:
            raise ValueError(
                f"reward {self.name!r}: {path} does not fit open_clip arch {self.clip_arch!r} ({str(err)[:200]}); "
                "pass the arch of the weights (GenEval: 'ViT-L-14' with OpenAI's weights)."
            ) from err
        size = model.visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.clip_transform = open_clip.image_transform(
            size, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic",
            resize_mode="shortest",
        )  # fmt: skip
        self.tokenizer = open_clip.get_tokenizer(self.clip_arch)
        self.clip = model.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)
        self._classifiers = {}

    # ------------------------------------------------------------------ the pipeline
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            metadata_rows(metadata, images.shape[0])  # bad metadata fails before the weights load
        return super().__call__(images, prompts, **metadata)

    @torch.no_grad()
    def detect(
        self, pixels: torch.Tensor, min_class_score: float | Sequence[float] = 0.0
    ) -> list[list[Detection]]:
        """Candidate detections of each image (``pixels``: uint8 ``(B, 3, H, W)``): the detector's top 100
        (query, class) pairs with class probability above ``min_class_score`` (one number, or one per image), with
        masks and boxes at image size."""
        if not self._loaded:
            self.load(self.device if self.device is not None else pixels.device)
        inputs = self.processor(images=list(pixels.cpu()), return_tensors="pt")
        values = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
        valid = inputs["pixel_mask"]
        out = self.detector(pixel_values=values, pixel_mask=valid.to(self.device))
        thresholds = (
            [float(min_class_score)] * pixels.shape[0]
            if not isinstance(min_class_score, (list, tuple))
            else list(min_class_score)
        )
        result = []
        for i in range(pixels.shape[0]):
            rows = int(valid[i].any(dim=1).sum())
            cols = int(valid[i].any(dim=0).sum())
            result.append(
                instance_detections(
                    out.class_queries_logits[i],
                    out.masks_queries_logits[i],
                    input_size=tuple(values.shape[-2:]),
                    valid_size=(rows, cols),
                    image_size=tuple(pixels.shape[-2:]),
                    labels=self._labels,
                    min_class_score=thresholds[i],
                )
            )
        return result

    def _color_classifier(self, classname: str) -> torch.Tensor:
        """``(D, 10)`` float32 text embeddings of GenEval's colour prompts for ``classname`` (cached)."""
        if classname not in self._classifiers:
            columns = []
            for color in GENEVAL_COLORS:
                texts = [t.format(color=color, object=classname) for t in COLOR_TEMPLATES]
                tokens = self.tokenizer(texts).to(self.device)
                emb = F.normalize(self.clip.encode_text(tokens).float(), dim=-1).mean(dim=0)
                columns.append(emb / emb.norm())
            self._classifiers[classname] = torch.stack(columns, dim=1)
        return self._classifiers[classname]

    def crops(self, image: np.ndarray, detections: Sequence[Detection]) -> torch.Tensor:
        """The colour classifier's inputs ``(n, 3, S, S)`` for detections of ``image`` (uint8 ``(H, W, 3)``): the
        object through its mask on ``crop_background``, cropped to its box, through open_clip's transform."""
        from PIL import Image

        pil = Image.fromarray(image)
        blank = (
            pil.copy()
            if self.crop_background == "original"
            else Image.new("RGB", pil.size, self.crop_background)
        )
        out = []
        for det in detections:
            if det.mask is not None:
                mask = det.mask.cpu().numpy() if isinstance(det.mask, torch.Tensor) else np.asarray(det.mask)
                crop = Image.composite(pil, blank, Image.fromarray(mask.astype(bool)))
            else:
                crop = pil
            out.append(self.clip_transform(crop.crop(tuple(det.box))))
        return torch.stack(out)

    @torch.no_grad()
    def classify_colors(
        self, image: np.ndarray, detections: Sequence[Detection], classname: str
    ) -> list[str]:
        """GenEval's colour of each detection (one of :data:`GENEVAL_COLORS`)."""
        if not detections:
            return []
        pixels = self.crops(image, detections).to(device=self.device, dtype=self.dtype)
        features = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)
        logits = 100.0 * features @ self._color_classifier(classname)
        return [GENEVAL_COLORS[i] for i in logits.argmax(dim=1).tolist()]

    def results(self, images: torch.Tensor, specs: Sequence[GenEvalSpec]) -> list[GenEvalResult]:
        """The :class:`GenEvalResult` of each image (float ``(B, 3, H, W)`` in [0, 1]) against its spec."""
        if not self._loaded:
            self.load(self.device if self.device is not None else images.device)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        limits = [self.counting_threshold if s.tag == "counting" else self.threshold for s in specs]
        candidates = self.detect(pixels, min_class_score=limits)
        array = None
        out = []
        for i, (dets, spec) in enumerate(zip(candidates, specs, strict=True)):
            objects = select_objects(
                dets,
                spec.tag,
                threshold=self.threshold,
                counting_threshold=self.counting_threshold,
                max_objects=self.max_objects,
                max_overlap=self.max_overlap,
            )
            for cls, chosen in color_queries(objects, spec):
                if array is None:
                    array = np.ascontiguousarray(pixels.permute(0, 2, 3, 1).cpu().numpy())
                colors = self.classify_colors(array[i], chosen, cls)
                colored = [replace(d, color=c) for d, c in zip(chosen, colors, strict=True)]
                objects[cls] = colored + list(objects[cls][len(colored) :])
            out.append(score_objects(objects, spec, self.position_threshold))
        return out

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        specs = metadata_rows(metadata, images.shape[0])
        results = self.results(images, specs)
        if self.strict:
            values = [float(r.exact if self.exact_counts else r.strict) for r in results]
        else:
            values = [r.partial for r in results]
        return torch.tensor(values, dtype=torch.float32, device=images.device)
