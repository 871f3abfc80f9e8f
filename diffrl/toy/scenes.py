"""The toy world: small images of simple coloured shapes, GenEval-style prompts and their structured descriptions.

A *scene* is a fixed near-white background with 1 to 4 non-overlapping objects; each object has a shape
(:data:`SHAPES`), a colour (:data:`PALETTE`), a centre and a size (the side of its square bounding box, 12 to 24 px
at 64x64, scaled with the image size). Images are anti-aliased (4x4 supersampling) float tensors ``(3, H, W)`` in
[0, 1].

A *description* is the JSON-serialisable dict a prompt is checked against (the verifier reward
``diffrl.toy.rewards.ShapesVerifier`` reads it from ``metadata["scene"]``)::

    {"category": "position",
     "objects": [{"shape": "circle", "color": "red", "count": 1, "exact": False},
                 {"shape": "square", "color": "blue", "count": 1, "exact": False}],
     "relation": {"type": "left of", "a": 0, "b": 1}}

``objects`` are groups: ``count`` objects of that shape and colour must be present (``None`` means any shape or
any colour); with ``exact`` the number must be exactly ``count`` (counting prompts, GenEval's exclusion rule).
``relation`` (or ``None``) says where some object of group ``a`` lies with respect to some object of group ``b``:
``"left of"``, ``"right of"``, ``"above"`` or ``"below"``, judged on the centres of the bounding boxes (the offset
along the axis must exceed a small margin and be larger than the offset across it). :func:`score_objects` is the
meaning of a description: it scores a list of objects (the generator's own, or those a verifier detected).

Prompt categories (GenEval's six, every object named with its colour; default frequencies in
:data:`CATEGORY_WEIGHTS`): ``single_object`` ("a red circle"), ``colors`` (same form, kept apart for per-category
accuracy), ``two_object`` ("a blue square and a yellow triangle": two different shapes), ``counting`` ("three green
circles": 2 to 4, exact), ``position`` ("a red circle to the left of a blue square") and ``color_attr`` ("a red
square and a green circle": different shapes *and* different colours, so swapping the colours breaks it).

Train / held-out split (fixed, independent of any seed, so the eval prompts of every seed are unseen by the train
prompts of every seed): a description is held out when it names one of the colour-shape combinations in
:data:`HELD_OUT_COMBOS` (never in training), or, for descriptions with more than one object, when a hash of its
canonical requirements falls in a fixed 1-in-10 bucket (unseen compositions of seen combinations). The canonical
requirements do not depend on word order ("A and B" == "B and A", "A left of B" == "B right of A"), so two prompts
with the same meaning are always on the same side.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "PALETTE",
    "SHAPES",
    "RELATIONS",
    "CATEGORIES",
    "CATEGORY_WEIGHTS",
    "HELD_OUT_COMBOS",
    "BACKGROUND",
    "SceneObject",
    "normalize_description",
    "prompt_for",
    "split_of",
    "prompt_pool",
    "sample_description",
    "layout",
    "render",
    "sample_scene",
    "generate_dataset",
    "score_objects",
    "relation_holds",
    "make_prompt_sets",
    "write_prompt_jsonl",
    "write_prompt_sets",
]

# Six colours whose hues (the direction in the chroma plane, unchanged by blending with the grey background) are at
# least ~27 degrees apart: red 0, orange ~30, yellow ~57, green 120, blue ~226, purple ~281.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.50, 0.00),
    "yellow": (0.95, 0.90, 0.00),
    "green": (0.05, 0.70, 0.05),
    "blue": (0.10, 0.30, 0.95),
    "purple": (0.62, 0.10, 0.85),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CATEGORY_WEIGHTS: dict[str, float] = {
    "single_object": 0.15,
    "two_object": 0.15,
    "counting": 0.20,
    "colors": 0.10,
    "position": 0.25,
    "color_attr": 0.15,
}
# One per shape, three different colours: never named by a training prompt.
HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "orange"), ("square", "purple"), ("triangle", "green")}
)
HELD_OUT_HASH_BUCKETS = 10  # 1 in 10 multi-object descriptions of seen combinations is held out too
BACKGROUND: tuple[float, float, float] = (0.96, 0.96, 0.96)

BASE_SIZE = 64  # sizes and margins below are in pixels at this image size and scale with it
SIZE_RANGE = (12.0, 24.0)
MAX_SIZE_BY_COUNT = {1: 24.0, 2: 22.0, 3: 20.0, 4: 18.0}  # keeps crowded scenes packable
GAP = 4.0  # min empty pixels between two objects' bounding boxes
BORDER = 2.0  # min pixels between an object and the image border
RELATION_MARGIN = 2.0  # verifier: the offset along the axis must exceed this (and the offset across it)
GEN_RELATION_MIN = 8.0  # generator: offset along the axis at least this ...
GEN_RELATION_ORTHO = 0.5  # ... and the offset across at most this fraction of it

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}


# ----------------------------------------------------------------------------------------------- descriptions
def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _fail(field: str, why: str) -> ValueError:
    return ValueError(f"scene description field {field!r} {why}")


def normalize_description(desc: dict | str) -> dict:
    """A validated copy of a description (a dict or its JSON string) with defaults filled in
    (``count`` 1, ``exact`` False, ``relation`` None); raises a ValueError naming the bad or missing field."""
    if isinstance(desc, (str, bytes)):
        try:
            desc = json.loads(desc)
        except json.JSONDecodeError as err:
            raise ValueError(f"scene description is not valid JSON ({err}).") from None
    if not isinstance(desc, dict):
        raise ValueError(f"scene description must be a dict or its JSON string, got {type(desc).__name__}.")
    if "objects" not in desc:
        raise _fail("objects", "is missing; give a list of {shape, color, count} groups.")
    groups = desc["objects"]
    if not isinstance(groups, (list, tuple)) or not groups:
        raise _fail("objects", "must be a non-empty list of {shape, color, count} groups.")
    out_groups = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict):
            raise _fail(f"objects[{i}]", "must be a dict with shape, color and count.")
        shape, color = g.get("shape"), g.get("color")
        if shape is not None and shape not in SHAPES:
            raise _fail(f"objects[{i}].shape", f"is {shape!r}; use one of {list(SHAPES)} or null.")
        if color is not None and color not in PALETTE:
            raise _fail(f"objects[{i}].color", f"is {color!r}; use one of {list(PALETTE)} or null.")
        count = g.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise _fail(f"objects[{i}].count", f"is {count!r}; use a positive integer.")
        out_groups.append(
            {"shape": shape, "color": color, "count": int(count), "exact": bool(g.get("exact", False))}
        )
    rel = desc.get("relation")
    if rel is not None:
        if not isinstance(rel, dict):
            raise _fail("relation", "must be null or a dict with type, a and b.")
        for key in ("type", "a", "b"):
            if key not in rel:
                raise _fail(f"relation.{key}", "is missing.")
        if rel["type"] not in RELATIONS:
            raise _fail("relation.type", f"is {rel['type']!r}; use one of {list(RELATIONS)}.")
        a, b = rel["a"], rel["b"]
        for key, v in (("a", a), ("b", b)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < len(out_groups):
                raise _fail(
                    f"relation.{key}", f"is {v!r}; use an index into objects (0..{len(out_groups) - 1})."
                )
        if a == b:
            raise _fail("relation", "relates a group to itself; a and b must differ.")
        rel = {"type": rel["type"], "a": int(a), "b": int(b)}
    return {"category": str(desc.get("category", "custom")), "objects": out_groups, "relation": rel}


def _noun(shape: str | None, plural: bool = False) -> str:
    word = shape if shape is not None else "shape"
    return word + "s" if plural else word


def _phrase(group: dict) -> str:
    words = ([group["color"]] if group["color"] else []) + [_noun(group["shape"], group["count"] > 1)]
    if group["count"] == 1:
        return f"{_article(words[0])} {' '.join(words)}"
    return f"{_NUMBER_WORDS.get(group['count'], str(group['count']))} {' '.join(words)}"


def prompt_for(desc: dict) -> str:
    """The prompt text of a description ("a red circle to the left of a blue square")."""
    desc = normalize_description(desc)
    groups, rel = desc["objects"], desc["relation"]
    if rel is not None and len(groups) == 2:
        return f"{_phrase(groups[rel['a']])} {_RELATION_PHRASES[rel['type']]} {_phrase(groups[rel['b']])}"
    text = " and ".join(_phrase(g) for g in groups)
    if rel is not None:
        a, b = _phrase(groups[rel["a"]]), _phrase(groups[rel["b"]])
        text += f", {a} {_RELATION_PHRASES[rel['type']]} {b}"
    return text


def _canonical_key(desc: dict) -> str:
    """The requirements without word order: sorted groups; relations turned into "left of" / "above"."""
    groups = [(g["shape"] or "*", g["color"] or "*", g["count"], g["exact"]) for g in desc["objects"]]
    rel = desc["relation"]
    if rel is None:
        return json.dumps(sorted(groups))
    a, b, kind = groups[rel["a"]], groups[rel["b"]], rel["type"]
    if kind in ("right of", "below"):
        a, b, kind = b, a, {"right of": "left of", "below": "above"}[kind]
    rest = sorted(g for i, g in enumerate(groups) if i not in (rel["a"], rel["b"]))
    return json.dumps([a, kind, b, rest])


def split_of(desc: dict) -> str:
    """``"eval"`` for held-out descriptions (see the module docstring), else ``"train"``."""
    desc = normalize_description(desc)
    if any((g["shape"], g["color"]) in HELD_OUT_COMBOS for g in desc["objects"]):
        return "eval"
    if sum(g["count"] for g in desc["objects"]) > 1:
        digest = hashlib.sha256(_canonical_key(desc).encode()).digest()
        if int.from_bytes(digest[:8], "big") % HELD_OUT_HASH_BUCKETS == 0:
            return "eval"
    return "train"


def _group(shape: str, color: str, count: int = 1, exact: bool = False) -> dict:
    return {"shape": shape, "color": color, "count": count, "exact": exact}


@functools.cache
def _pool(category: str) -> tuple[str, ...]:
    """Every description of a category, as JSON strings, in a fixed order."""
    combos = [(s, c) for s in SHAPES for c in PALETTE]
    out = []
    if category in ("single_object", "colors"):
        out = [{"objects": [_group(s, c)], "relation": None} for s, c in combos]
    elif category == "counting":
        out = [{"objects": [_group(s, c, n, True)], "relation": None} for s, c in combos for n in (2, 3, 4)]
    elif category in ("two_object", "color_attr"):
        for s1, c1 in combos:
            for s2, c2 in combos:
                if s1 == s2 or (category == "color_attr" and c1 == c2):
                    continue
                out.append({"objects": [_group(s1, c1), _group(s2, c2)], "relation": None})
    elif category == "position":
        for s1, c1 in combos:
            for s2, c2 in combos:
                if (s1, c1) == (s2, c2):
                    continue
                for kind in RELATIONS:
                    rel = {"type": kind, "a": 0, "b": 1}
                    out.append({"objects": [_group(s1, c1), _group(s2, c2)], "relation": rel})
    else:
        raise ValueError(f"unknown prompt category {category!r}; use one of {list(CATEGORIES)}.")
    return tuple(json.dumps({"category": category, **d}) for d in out)


SPLITS = ("train", "eval", "eval_seen", "eval_unseen", "all")


def _uses_unseen_combo(desc: dict) -> bool:
    return any((g["shape"], g["color"]) in HELD_OUT_COMBOS for g in normalize_description(desc)["objects"])


def prompt_pool(category: str, split: str = "all") -> list[dict]:
    """Every description of ``category`` in ``split``, in a fixed order: ``"train"``, ``"eval"`` (held out),
    ``"eval_seen"`` (held-out compositions of colour-shape combinations that training does show),
    ``"eval_unseen"`` (held-out descriptions naming a combination of :data:`HELD_OUT_COMBOS`) or ``"all"``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {', '.join(repr(x) for x in SPLITS)}.")
    descs = [json.loads(s) for s in _pool(category)]
    if split == "all":
        return descs
    if split == "train":
        return [d for d in descs if split_of(d) == "train"]
    held = [d for d in descs if split_of(d) == "eval"]
    if split == "eval":
        return held
    return [d for d in held if _uses_unseen_combo(d) == (split == "eval_unseen")]


@functools.cache
def _pool_split(category: str, split: str) -> tuple[str, ...]:
    return tuple(json.dumps(d) for d in prompt_pool(category, split))


def _pick_category(rng: np.random.Generator, weights: dict[str, float] | None) -> str:
    weights = weights or CATEGORY_WEIGHTS
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_description(
    rng: np.random.Generator, category: str | None = None, split: str = "all", weights: dict | None = None
) -> tuple[str, dict]:
    """``(prompt, description)``: a category drawn by ``weights`` (default :data:`CATEGORY_WEIGHTS`) unless given,
    then a description of it drawn uniformly from ``split``."""
    category = category or _pick_category(rng, weights)
    pool = _pool_split(category, split)
    desc = json.loads(pool[int(rng.integers(len(pool)))])
    return prompt_for(desc), desc


# ----------------------------------------------------------------------------------------------- scenes
@dataclass
class SceneObject:
    shape: str
    color: str
    cx: float  # centre of the bounding box, pixels from the left
    cy: float  # centre of the bounding box, pixels from the top
    size: float  # side of the square bounding box, pixels

    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h

    def to_dict(self) -> dict:
        return asdict(self)


def _separated(a: SceneObject, b: SceneObject, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def along_across(dx, dy, kind: str):
    """The offset of ``b`` from ``a`` (``dx``, ``dy``; y grows downwards) along the axis of relation ``kind`` (positive
    when it holds) and across it; floats or tensors."""
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[kind]


def relation_holds(a: dict | SceneObject, b: dict | SceneObject, kind: str, margin: float) -> bool:
    """Whether ``a`` is ``kind`` (``"left of"``, ...) ``b``: the offset of the centres along the relation's axis
    exceeds ``margin`` pixels and the offset across it (y grows downwards)."""
    a = a if isinstance(a, dict) else a.to_dict()
    b = b if isinstance(b, dict) else b.to_dict()
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]  # where b is, seen from a
    along, across = along_across(dx, dy, kind)
    return along > margin and along > abs(across)


def _relation_clear(a: SceneObject, b: SceneObject, kind: str, scale: float) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, across = along_across(dx, dy, kind)
    return along >= GEN_RELATION_MIN * scale and abs(across) <= GEN_RELATION_ORTHO * along


def layout(desc: dict, rng: np.random.Generator, image_size: int = BASE_SIZE) -> list[SceneObject]:
    """Objects that satisfy ``desc`` exactly (each group's count, no other objects, the relation with a clear
    margin), at random non-overlapping positions and sizes. ``None`` shapes / colours are drawn at random."""
    desc = normalize_description(desc)
    scale = image_size / BASE_SIZE
    specs = []
    for g in desc["objects"]:
        for _ in range(g["count"]):
            shape = g["shape"] or SHAPES[int(rng.integers(len(SHAPES)))]
            color = g["color"] or list(PALETTE)[int(rng.integers(len(PALETTE)))]
            specs.append((shape, color))
    first_of = np.cumsum([0] + [g["count"] for g in desc["objects"]])
    n = len(specs)
    lo = SIZE_RANGE[0] * scale
    hi = MAX_SIZE_BY_COUNT.get(n, SIZE_RANGE[0]) * scale
    gap, border = GAP * scale, BORDER * scale
    rel = desc["relation"]
    for _ in range(200):
        objs: list[SceneObject] = []
        for shape, color in specs:
            for _ in range(100):
                size = float(rng.uniform(lo, hi))
                half = size / 2 + border
                cx = float(rng.uniform(half, image_size - half))
                cy = float(rng.uniform(half, image_size - half))
                obj = SceneObject(shape, color, cx, cy, size)
                if all(_separated(obj, o, gap) for o in objs):
                    objs.append(obj)
                    break
            else:
                break
        if len(objs) < n:
            continue
        if rel is not None:
            a, b = objs[first_of[rel["a"]]], objs[first_of[rel["b"]]]
            if not _relation_clear(a, b, rel["type"], scale):
                continue
        return objs
    raise RuntimeError(f"could not lay out {prompt_for(desc)!r} in {image_size}x{image_size} pixels.")


def _coverage(obj: SceneObject, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    h = obj.size / 2
    if obj.shape == "circle":
        return (xs - obj.cx) ** 2 + (ys - obj.cy) ** 2 <= h * h
    if obj.shape == "square":
        return ((xs - obj.cx).abs() <= h) & ((ys - obj.cy).abs() <= h)
    if obj.shape == "triangle":  # apex up, base down, base = height = size
        return (ys <= obj.cy + h) & ((xs - obj.cx).abs() <= (ys - (obj.cy - h)) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}; use one of {list(SHAPES)}.")


def render(
    objects: Sequence[SceneObject | dict],
    image_size: int = BASE_SIZE,
    background: Sequence[float] = BACKGROUND,
    supersample: int = 4,
) -> torch.Tensor:
    """An anti-aliased image ``(3, image_size, image_size)`` in [0, 1] of ``objects`` on ``background``
    (``supersample``^2 samples per pixel, 1 renders hard edges); later objects are drawn over earlier ones."""
    s = max(int(supersample), 1)
    img = torch.tensor(background, dtype=torch.float32).view(3, 1, 1).repeat(1, image_size, image_size)
    for o in objects:
        if not isinstance(o, SceneObject):
            o = SceneObject(**{k: o[k] for k in ("shape", "color", "cx", "cy", "size")})
        if o.color not in PALETTE:
            raise ValueError(f"unknown colour {o.color!r}; use one of {list(PALETTE)}.")
        bx0, by0, bx1, by1 = o.box()
        px0, py0 = max(int(math.floor(bx0)), 0), max(int(math.floor(by0)), 0)
        px1, py1 = min(int(math.ceil(bx1)), image_size), min(int(math.ceil(by1)), image_size)
        if px1 <= px0 or py1 <= py0:
            continue
        sub_y = py0 + (torch.arange((py1 - py0) * s, dtype=torch.float32) + 0.5) / s
        sub_x = px0 + (torch.arange((px1 - px0) * s, dtype=torch.float32) + 0.5) / s
        ys, xs = torch.meshgrid(sub_y, sub_x, indexing="ij")
        inside = _coverage(o, ys, xs).float()
        cover = inside.view(py1 - py0, s, px1 - px0, s).mean(dim=(1, 3))
        color = torch.tensor(PALETTE[o.color], dtype=torch.float32).view(3, 1, 1)
        patch = img[:, py0:py1, px0:px1]
        img[:, py0:py1, px0:px1] = patch * (1 - cover) + color * cover
    return img.clamp(0, 1)


def sample_scene(
    rng: np.random.Generator,
    category: str | None = None,
    split: str = "all",
    image_size: int = BASE_SIZE,
    weights: dict | None = None,
) -> dict:
    """A random scene: ``{"prompt", "scene" (the description), "objects" (list of dicts), "image" (3, H, W)}``."""
    prompt, desc = sample_description(rng, category, split, weights)
    objs = layout(desc, rng, image_size)
    return {
        "prompt": prompt,
        "scene": desc,
        "objects": [o.to_dict() for o in objs],
        "image": render(objs, image_size),
    }


def generate_dataset(
    n: int, seed: int = 0, image_size: int = BASE_SIZE, split: str = "train", weights: dict | None = None
) -> dict:
    """``n`` rendered scenes for pre-training a text-to-image model: ``{"images": (n, 3, H, W), "prompts",
    "scenes", "objects"}`` (deterministic for ``seed``; ``split="train"`` never shows a held-out prompt)."""
    rng = np.random.default_rng(seed)
    items = [sample_scene(rng, None, split, image_size, weights) for _ in range(n)]
    return {
        "images": torch.stack([it["image"] for it in items])
        if items
        else torch.zeros(0, 3, image_size, image_size),
        "prompts": [it["prompt"] for it in items],
        "scenes": [it["scene"] for it in items],
        "objects": [it["objects"] for it in items],
    }


# ----------------------------------------------------------------------------------------------- semantics
def _matches(obj: dict, g: dict) -> bool:
    return (g["shape"] is None or obj["shape"] == g["shape"]) and (
        g["color"] is None or obj["color"] == g["color"]
    )


def score_objects(
    objects: Sequence[dict | SceneObject],
    desc: dict | str,
    exact_scene: bool = False,
    relation_margin: float = RELATION_MARGIN,
) -> tuple[float, bool]:
    """``(partial, strict)`` of a list of objects (dicts with shape, color, cx, cy) against a description.

    Requirements, each scored in [0, 1] (``partial`` is their mean, ``strict`` is all of them met):

    * one per group, *presence*: each of the ``count`` required objects is filled by a distinct object of the right
      shape and colour (credit 1) or, failing that, by a left-over object with the right shape or the right colour
      (credit 0.5; none for the strict score);
    * one per ``exact`` group, *count*: 1 when exactly ``count`` objects match, else ``1 - |found - count| / count``
      (at least 0);
    * the *relation*, when there is one: 1 when some object matching group ``a`` and another matching group ``b``
      stand in it;
    * with ``exact_scene``, *no extras*: 1 when every object is used by a group's presence, else
      ``1 - extras / required`` (at least 0). Off by default, as in GenEval (objects of other classes are allowed).
    """
    desc = normalize_description(desc)
    objs = [o if isinstance(o, dict) else o.to_dict() for o in objects]
    groups = desc["objects"]
    # Exact matches first, most specific groups first, each object used once.
    order = sorted(
        range(len(groups)), key=lambda i: (groups[i]["shape"] is None) + (groups[i]["color"] is None)
    )
    used = [False] * len(objs)
    exact = [0] * len(groups)
    for gi in order:
        for oi, o in enumerate(objs):
            if exact[gi] >= groups[gi]["count"]:
                break
            if not used[oi] and _matches(o, groups[gi]):
                used[oi] = True
                exact[gi] += 1
    half = [0] * len(groups)
    for gi in order:
        g = groups[gi]
        for oi, o in enumerate(objs):
            if exact[gi] + half[gi] >= g["count"]:
                break
            if not used[oi] and (o["shape"] == g["shape"] or o["color"] == g["color"]):
                used[oi] = True
                half[gi] += 1
    terms, strict = [], True
    for gi, g in enumerate(groups):
        terms.append((exact[gi] + 0.5 * half[gi]) / g["count"])
        strict &= exact[gi] == g["count"]
        if g["exact"]:
            found = sum(_matches(o, g) for o in objs)
            terms.append(1.0 if found == g["count"] else max(0.0, 1.0 - abs(found - g["count"]) / g["count"]))
            strict &= found == g["count"]
    rel = desc["relation"]
    if rel is not None:
        cand_a = [o for o in objs if _matches(o, groups[rel["a"]])]
        cand_b = [o for o in objs if _matches(o, groups[rel["b"]])]
        ok = any(
            a is not b and relation_holds(a, b, rel["type"], relation_margin) for a in cand_a for b in cand_b
        )
        terms.append(float(ok))
        strict &= ok
    if exact_scene:
        required = sum(g["count"] for g in groups)
        extras = len(objs) - sum(exact)
        terms.append(1.0 if extras == 0 else max(0.0, 1.0 - extras / required))
        strict &= extras == 0
    return float(sum(terms) / len(terms)), bool(strict)


# ----------------------------------------------------------------------------------------------- prompt sets
def _quotas(n: int, weights: dict[str, float]) -> dict[str, int]:
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    out = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: out[k] - raw[k])[: n - sum(out.values())]:
        out[k] += 1
    return out


def _draw(
    n: int, split: str, rng: np.random.Generator, weights: dict[str, float], repeats: bool
) -> list[dict[str, Any]]:
    """``n`` items of ``split`` with category quotas from ``weights``; a prompt text appears once unless
    ``repeats`` (then a category whose prompts are used up starts over); without ``repeats`` a category's unmet
    quota goes to the others, in order of weight."""
    quotas = _quotas(n, weights)
    taken: dict[
        str, dict
    ] = {}  # prompt -> item; shared across categories (single_object / colors share texts)
    items: list[dict] = []
    pools = {c: [json.loads(s) for s in _pool_split(c, split)] for c in weights}
    orders = {c: list(rng.permutation(len(pools[c]))) for c in weights}

    def take(category: str, k: int) -> int:
        got = 0
        pool, order = pools[category], orders[category]
        fresh = [i for i in order if prompt_for(pool[i]) not in taken]
        while got < k and fresh:
            desc = pool[fresh.pop(0)]
            item = {"prompt": prompt_for(desc), "scene": desc}
            taken[item["prompt"]] = item
            items.append(item)
            got += 1
        if repeats and got < k and pool:
            while got < k:
                for i in rng.permutation(len(pool)):
                    if got >= k:
                        break
                    desc = pool[int(i)]
                    items.append({"prompt": prompt_for(desc), "scene": desc})
                    got += 1
        return got

    short = 0
    for c in weights:
        short += quotas[c] - take(c, quotas[c])
    for c in sorted(weights, key=lambda c: -weights[c]):
        if short <= 0:
            break
        short -= take(c, short)
    if short > 0:
        raise ValueError(
            f"only {n - short} distinct {split} prompts exist for categories {list(weights)}; ask for fewer."
        )
    return [items[int(i)] for i in rng.permutation(len(items))]


def make_prompt_sets(
    n_train: int,
    n_eval: int,
    seed: int = 0,
    weights: dict[str, float] | None = None,
    train_repeats: bool = True,
    eval_repeats: bool = False,
    eval_split: str = "eval",
) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` lists of ``{"prompt": str, "scene": description}``, deterministic for ``seed``.

    Category quotas follow ``weights`` (default :data:`CATEGORY_WEIGHTS`); train prompts come from the train split
    and eval prompts from the held-out split (see the module docstring), so no prompt, and no prompt with the same
    meaning, is in both. Eval prompts are distinct (a category with too few gives its quota to the others). Train
    prompts are distinct while a category has unused ones, then (``train_repeats``) repeat to keep the category
    balance; with ``train_repeats=False`` they behave like the eval prompts. ``eval_repeats`` does the same for
    the eval prompts (few held-out single-object prompts exist, so a category-balanced eval set repeats them;
    repeated prompts are sampled with different seeds, as GenEval samples several images per prompt).
    ``eval_split="eval_seen"`` keeps only held-out compositions of colour-shape combinations seen in training
    (``"eval_unseen"``: only those naming a never-trained combination); see :func:`prompt_pool`.
    """
    weights = {k: float(v) for k, v in (weights or CATEGORY_WEIGHTS).items() if v > 0}
    for k in weights:
        if k not in CATEGORIES:
            raise ValueError(f"unknown prompt category {k!r}; use some of {list(CATEGORIES)}.")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train={n_train} and n_eval={n_eval} must be >= 0.")
    rng = np.random.default_rng(seed)
    train = _draw(n_train, "train", rng, weights, train_repeats)
    if eval_split not in ("eval", "eval_seen", "eval_unseen"):
        raise ValueError(f"eval_split={eval_split!r}; use 'eval', 'eval_seen' or 'eval_unseen'.")
    held = _draw(n_eval, eval_split, rng, weights, eval_repeats)
    return train, held


def write_prompt_jsonl(items: Iterable[dict], path: str | Path) -> Path:
    """Write ``{"prompt": ..., "scene": {...}}`` lines, the format ``diffrl.data.load_prompts`` reads (the
    description arrives at the reward as ``metadata["scene"]``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for it in items:
            f.write(json.dumps({"prompt": it["prompt"], "scene": it["scene"]}, sort_keys=True) + "\n")
    return path


def write_prompt_sets(
    out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0, **kwargs
) -> tuple[Path, Path]:
    """:func:`make_prompt_sets` written to ``out_dir/train.jsonl`` and ``out_dir/eval.jsonl``; returns both paths."""
    train, held = make_prompt_sets(n_train, n_eval, seed, **kwargs)
    out_dir = Path(out_dir)
    return write_prompt_jsonl(train, out_dir / "train.jsonl"), write_prompt_jsonl(
        held, out_dir / "eval.jsonl"
    )
