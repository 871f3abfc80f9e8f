"""The toy world's rewards: ``shapes_verifier``, a programmatic verifier of the toy world (:mod:`diffrl.toy`), score-only
and weight-free, ``shapes_accuracy`` (its strict 0/1 form) and ``shapes_soft`` (its differentiable relaxation). They
live with the world they check and are registered by name in :mod:`diffrl.rewards.registry`.

The verifier finds the objects in an image and checks them against the prompt's structured description, which it reads
from ``metadata["scene"]`` (one dict, or its JSON string, per image). Perception, batched in torch (any device):

1. *Colour segmentation*. Every pixel is projected on the chroma plane (``a = r - (g + b) / 2``,
   ``b = sqrt(3) / 2 (g - b)``), where blending a colour with the grey background only shortens the vector, so the
   hue angle survives anti-aliasing and blur. A pixel takes the palette colour of nearest hue; it is background /
   "other" when its hue is more than ``max_hue_dev`` degrees from every palette colour, its chroma is below
   ``min_chroma``, or its estimated coverage (chroma along the colour / the colour's own chroma) is below
   ``min_coverage`` (so the mask edge sits near the 50 % blend of the true edge).
2. *Connected components* of same-colour pixels (4-connectivity; label propagation with pointer jumping, in
   torch); components smaller than ``min_area`` pixels (at 64x64, scaled with the image area) are noise.
3. *Shape* from coverage-weighted moments of each component (not from its bounding box, which a stray pixel or
   a rounded corner moves): the vertical skewness ``mu03 / mu02^1.5`` (an apex-up
   triangle ~ -0.57, circle and square 0) and the fourth-moment anisotropy ``(E[u^4 + v^4] - E[x^4 + y^4]) /
   (mu20 + mu02)^2`` with ``u, v`` the diagonals (square ~0.3, circle 0). A Gaussian blur leaves the third and the
   anisotropic part of the fourth cumulants unchanged, which is why these survive blur where the bounding box's
   fill ratio does not. Too elongated (ratio of the principal axes above ``max_elongation``) or too ragged
   (``(mu20 + mu02) / area`` above 0.26; circle 0.16, square 0.17, triangle 0.19) components, and skews or
   anisotropies of the wrong sign, are ``"other"``. The position is the centre of the ideal shape's bounding box
   (the centroid, moved up by a sixth of the size for a triangle), as the generator defines it.

Scoring (:func:`diffrl.toy.scenes.score_objects`): partial credit is the mean of the requirements met (each
required object present with the right shape and colour, half credit for a left-over object with one of them; the
exact count for counting prompts; the relation), strict correctness (GenEval-style) is all of them met. ``score``
returns the partial credit, or the 0/1 strict correctness with ``strict=True``; :func:`verify` returns both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffrl.rewards.base import Reward

from .scenes import (
    BASE_SIZE,
    PALETTE,
    RELATION_MARGIN,
    along_across,
    normalize_description,
    score_objects,
)

__all__ = [
    "ShapesVerifier",
    "ShapesAccuracy",
    "ShapesExtraObjects",
    "ShapesSoft",
    "verify",
    "soft_verify",
    "detect_objects",
]

_COLORS = list(PALETTE)
_SHAPE_NAMES = ("square", "circle", "triangle")
# Shape rules on blur-robust moment features (ideal values: circle skew 0, aniso 0; square skew 0, aniso 0.3;
# triangle skew -0.57; Gaussian blur leaves the third and the anisotropic fourth cumulants unchanged).
_SKEW_TRIANGLE = 0.22  # |vertical skewness| above this: a triangle (apex up) when negative, else "other"
_ANISO_SQUARE = 0.13  # 4th-moment anisotropy (axes vs diagonals) above this: a square
_MAX_COMPACTNESS = 0.26  # (mu20 + mu02) / area; circle 0.159, square 0.167, triangle 0.194; larger is ragged


def _chroma_plane(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r, g, b = rgb.unbind(-3)
    return r - (g + b) / 2, (math.sqrt(3) / 2) * (g - b)


def _label_components(src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """Connected components of a graph of ``n`` nodes and edges ``src -> dst`` (both directions): each node's label
    is the largest node index of its component (label propagation along edges, with pointer jumping)."""
    lab = torch.arange(n, device=src.device)
    for _ in range(n + 1):
        new = lab.clone()
        new.scatter_reduce_(0, src, lab[dst], reduce="amax")
        new.scatter_reduce_(0, dst, lab[src], reduce="amax")
        new = new[new]  # pointer jumping: a label is a node of the same component whose label is >= it
        new = new[new]
        if torch.equal(new, lab):
            break
        lab = new
    return lab


def _palette_directions(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit hue directions ``(ua, ub)`` of the palette colours in the chroma plane and their chroma ``pnorm``."""
    pal = torch.tensor([PALETTE[c] for c in _COLORS], dtype=torch.float32, device=device)  # (K, 3)
    pa, pb = _chroma_plane(pal.view(len(_COLORS), 3, 1, 1))
    pa, pb = pa.view(-1), pb.view(-1)
    pnorm = torch.sqrt(pa**2 + pb**2)
    return pa / pnorm, pb / pnorm, pnorm


@dataclass
class _Segments:
    """Same-colour connected components of a batch (flat pixel indices over ``B * H * W``)."""

    g: torch.Tensor  # (n,) flat index of every coloured pixel
    k: torch.Tensor  # (n,) its palette colour
    wt: torch.Tensor  # (n,) its estimated coverage, in [0, 1]
    xs: torch.Tensor  # (n,) column
    ys: torch.Tensor  # (n,) row
    inv: torch.Tensor  # (n,) its component, in [0, m)
    rep: torch.Tensor  # (m,) flat index of each component's representative pixel
    area: torch.Tensor  # (m,) pixels per component


def _segment(
    x: torch.Tensor, *, min_chroma: float, min_coverage: float, max_hue_dev: float
) -> _Segments | None:
    """Steps 1 and 2 of the module docstring on images ``x`` (B, 3, H, W) in [0, 1] (no gradient); ``None`` when
    no pixel is coloured."""
    B, _, H, W = x.shape
    HW = H * W
    dev = x.device
    ua, ub, pnorm = _palette_directions(dev)

    # 1. colour of every chromatic pixel (sparse: only pixels with some chroma are looked at)
    a, b = _chroma_plane(x)  # (B, H, W)
    chroma = torch.sqrt(a**2 + b**2).view(-1)
    g = (chroma >= min_chroma).nonzero(as_tuple=True)[0]  # flat pixel indices over the batch
    a, b, chroma = a.view(-1)[g], b.view(-1)[g], chroma[g]
    proj = a[:, None] * ua + b[:, None] * ub  # (N, K): chroma * cos(hue difference)
    best, k = proj.max(dim=1)
    ok = (best >= math.cos(math.radians(max_hue_dev)) * chroma) & (best >= min_coverage * pnorm[k])
    g, k = g[ok], k[ok]
    n = g.numel()
    if n == 0:
        return None

    # 2. connected components of same-colour pixels (4-connectivity)
    node = torch.full((B * HW,), -1, dtype=torch.long, device=dev)
    node[g] = torch.arange(n, device=dev)
    cls = torch.full((B * HW,), -1, dtype=torch.long, device=dev)
    cls[g] = k
    xs = g % W
    ys = torch.div(g % HW, W, rounding_mode="floor")
    right = g[xs < W - 1] + 1
    right_src = node[right - 1][cls[right] == cls[right - 1]]
    right_dst = node[right][cls[right] == cls[right - 1]]
    down = g[ys < H - 1] + W
    down_src = node[down - W][cls[down] == cls[down - W]]
    down_dst = node[down][cls[down] == cls[down - W]]
    labels = _label_components(torch.cat([right_src, down_src]), torch.cat([right_dst, down_dst]), n)
    is_rep = labels == torch.arange(n, device=dev)  # a component's label is one of its own nodes
    uniq = is_rep.nonzero(as_tuple=True)[0]
    inv = (torch.cumsum(is_rep, 0) - 1)[labels]
    area = torch.bincount(inv, minlength=uniq.numel())
    wt = (best[ok] / pnorm[k]).clamp(0, 1)
    return _Segments(g=g, k=k, wt=wt, xs=xs, ys=ys, inv=inv, rep=g[uniq], area=area)


def _moments(wt: torch.Tensor, seg: _Segments) -> dict[str, torch.Tensor]:
    """Step 3's coverage-weighted moment features of every component, from per-pixel weights ``wt`` (n,) (the
    segmentation's own, or a differentiable recomputation of them)."""
    m = seg.area.numel()
    inv = seg.inv
    xf, yf = seg.xs.float() + 0.5, seg.ys.float() + 0.5
    first = torch.zeros(m, 3, device=wt.device, dtype=wt.dtype).index_add(
        0, inv, torch.stack([wt, wt * xf, wt * yf], dim=1)
    )
    mass = first[:, 0].clamp(min=1e-6)
    cx, cy = first[:, 1] / mass, first[:, 2] / mass
    dx, dy = xf - cx[inv], yf - cy[inv]
    du, dv = (dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)
    cols = [dx * dx, dy * dy, dx * dy, dy**3, dx**4 + dy**4, du**4 + dv**4]
    mom = torch.zeros(m, len(cols), device=wt.device, dtype=wt.dtype).index_add(
        0, inv, torch.stack(cols, dim=1) * wt[:, None]
    )
    mom = mom / mass[:, None]
    mu20, mu02, mu11, mu03, axis4, diag4 = mom.unbind(1)
    m2 = (mu20 + mu02).clamp(min=1e-6)
    root = torch.sqrt((mu20 - mu02) ** 2 + 4 * mu11**2 + 1e-12)
    return {
        "cx": cx,
        "cy": cy,
        "elongation": torch.sqrt((m2 + root) / (m2 - root).clamp(min=1e-6)),
        "compactness": m2
        / seg.area.to(wt.dtype),  # pixel area, not mass: a washed-out colour has the same shape
        "skew": mu03 / mu02.clamp(min=1e-6) ** 1.5,
        "aniso": (diag4 - axis4) / m2**2,
    }


def detect_objects(
    images: torch.Tensor,
    *,
    min_area: float = 20.0,
    min_chroma: float = 0.12,
    min_coverage: float = 0.4,
    max_hue_dev: float = 30.0,
    max_elongation: float = 1.6,
) -> list[list[dict[str, Any]]]:
    """The objects of each image (B, 3, H, W) in [0, 1]: per image a list of dicts with ``shape`` (or ``"other"``),
    ``color``, ``cx``, ``cy`` (centre of the shape's box, pixels), ``size`` (side of that box, from the area),
    ``area`` (pixels), ``centroid`` and ``features`` (the moment features). ``min_area`` is in pixels at 64x64
    and scales with the image area."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"detect_objects needs images (B, 3, H, W), got {tuple(images.shape)}.")
    x = images.detach().float().clamp(0, 1)
    B, _, H, W = x.shape
    HW = H * W
    out: list[list[dict[str, Any]]] = [[] for _ in range(B)]
    seg = _segment(x, min_chroma=min_chroma, min_coverage=min_coverage, max_hue_dev=max_hue_dev)
    if seg is None:
        return out

    # 3. geometry: coverage-weighted moments of each component (see the module docstring)
    f = _moments(seg.wt, seg)
    cx, cy, skew, aniso = f["cx"], f["cy"], f["skew"], f["aniso"]
    elongation, compactness = f["elongation"], f["compactness"]
    is_tri = skew <= -_SKEW_TRIANGLE
    is_square = ~is_tri & (aniso >= _ANISO_SQUARE)
    is_circle = ~is_tri & (aniso.abs() < _ANISO_SQUARE) & (skew.abs() < _SKEW_TRIANGLE)
    plausible = (elongation <= max_elongation) & (compactness <= _MAX_COMPACTNESS)
    shape_idx = torch.where(is_tri, 2, torch.where(is_square, 0, torch.where(is_circle, 1, -1)))
    shape_idx = torch.where(plausible, shape_idx, torch.full_like(shape_idx, -1))
    # size of the square box of the ideal shape with this mass; a triangle's box centre is above its centroid
    af = seg.area.float()
    size = torch.stack([af.sqrt(), 2 * (af / math.pi).sqrt(), (2 * af).sqrt()], dim=1)
    size = size.gather(1, shape_idx.clamp(min=0)[:, None])[:, 0]
    cy_box = torch.where(shape_idx == 2, cy - size / 6, cy)
    comp_b = torch.div(seg.rep, HW, rounding_mode="floor")
    comp_k = torch.zeros_like(seg.area).index_put_((seg.inv,), seg.k)
    keep = af >= min_area * HW / (BASE_SIZE * BASE_SIZE)

    rows = torch.stack(
        [comp_b.float(), comp_k.float(), shape_idx.float(), af, cx, cy_box, size, cx, cy]
        + [elongation, compactness, skew, aniso],
        dim=1,
    )[keep]
    for row in rows.tolist():
        bidx, c, s, ar, bcx, bcy, sz, mcx, mcy, elong, comp, sk, an = row
        out[int(bidx)].append(
            {
                "shape": _SHAPE_NAMES[int(s)] if s >= 0 else "other",
                "color": _COLORS[int(c)],
                "cx": bcx,
                "cy": bcy,
                "size": sz,
                "area": int(ar),
                "centroid": (mcx, mcy),
                "features": {"elongation": elong, "compactness": comp, "skew": sk, "aniso": an},
            }
        )
    return out


def _perception(
    min_area: float, min_chroma: float, min_coverage: float, max_hue_dev: float, max_elongation: float
) -> dict[str, float]:
    """The perception thresholds of :func:`detect_objects` as keyword arguments (shared by the rewards)."""
    return {
        "min_area": float(min_area),
        "min_chroma": float(min_chroma),
        "min_coverage": float(min_coverage),
        "max_hue_dev": float(max_hue_dev),
        "max_elongation": float(max_elongation),
    }


def _scenes_from(metadata: dict[str, Any], batch: int, name: str) -> list[dict]:
    if "scene" not in metadata or metadata["scene"] is None:
        raise ValueError(
            f"reward {name!r} needs metadata field 'scene' (one structured description per image, e.g. from a "
            "toy-world prompt file written by diffrl.toy.write_prompt_sets); the prompts came without it."
        )
    return _as_scene_list(metadata["scene"], batch, name)


def _as_scene_list(scenes: Any, batch: int, name: str) -> list[dict]:
    if isinstance(scenes, (dict, str, bytes)):
        scenes = [scenes] * batch  # one description for every image
    scenes = list(scenes)
    if len(scenes) != batch:
        raise ValueError(f"reward {name!r} got {len(scenes)} scene descriptions for {batch} images.")
    out = []
    for i, s in enumerate(scenes):
        if s is None:
            raise ValueError(
                f"reward {name!r}, image {i}: its prompt row has no 'scene' (other rows do); give every prompt of "
                "a toy-world prompt file its structured description."
            )
        try:
            out.append(normalize_description(json.loads(s) if isinstance(s, (str, bytes)) else s))
        except ValueError as err:
            raise ValueError(f"reward {name!r}, image {i}: {err}") from None
    return out


class ShapesVerifier(Reward):
    """The toy world's verifier (see the module docstring). Options: ``strict`` (score = 0/1 strict correctness
    instead of partial credit), ``exact_scene`` (also require no objects beyond the described ones), and the
    perception thresholds of :func:`detect_objects`."""

    name = "shapes_verifier"
    differentiable = False
    required_metadata = ("scene",)

    def __init__(
        self,
        *,
        strict: bool = False,
        exact_scene: bool = False,
        min_area: float = 20.0,
        min_chroma: float = 0.12,
        min_coverage: float = 0.4,
        max_hue_dev: float = 30.0,
        max_elongation: float = 1.6,
        relation_margin: float = RELATION_MARGIN,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.strict = bool(strict)
        self.exact_scene = bool(exact_scene)
        self.detect_kwargs = _perception(min_area, min_chroma, min_coverage, max_hue_dev, max_elongation)
        self.relation_margin = float(relation_margin)

    def settings(self) -> dict[str, Any]:
        return {
            "strict": self.strict,
            "exact_scene": self.exact_scene,
            "relation_margin": self.relation_margin,
            **self.detect_kwargs,
        }

    def detect(self, images: torch.Tensor) -> list[list[dict[str, Any]]]:
        """The detected objects of each image (see :func:`detect_objects`)."""
        with torch.no_grad():
            return detect_objects(images, **self.detect_kwargs)

    def verify(
        self, images: torch.Tensor, scenes: Sequence[dict | str] | dict | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(partial, strict)``, float32 ``(B,)`` tensors on the images' device (strict is 0. or 1.)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("verify needs images as a float tensor (B, 3, H, W) in [0, 1].")
        batch = images.shape[0]
        descs = _as_scene_list(scenes, batch, self.name)
        scale = images.shape[-1] / BASE_SIZE
        partial, strict = [], []
        for objs, desc in zip(self.detect(images), descs, strict=True):
            p, s = score_objects(objs, desc, self.exact_scene, self.relation_margin * scale)
            partial.append(p)
            strict.append(float(s))
        dev = images.device
        return (
            torch.tensor(partial, dtype=torch.float32, device=dev),
            torch.tensor(strict, dtype=torch.float32, device=dev),
        )

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        scenes = _scenes_from(metadata, images.shape[0], self.name)
        partial, strict = self.verify(images, scenes)
        return strict if self.strict else partial


def verify(
    images: torch.Tensor, scenes: Sequence[dict | str] | dict | str, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, strict)`` of images against their descriptions with a :class:`ShapesVerifier` built with
    ``kwargs`` (e.g. to log the strict accuracy ``strict.mean()`` next to the trained partial credit)."""
    return ShapesVerifier(**kwargs).verify(images, scenes)


class ShapesAccuracy(ShapesVerifier):
    """:class:`ShapesVerifier` scoring the 0/1 strict correctness (GenEval-style accuracy) under its own name, so an
    evaluation reward ``{shapes_verifier: 1.0, shapes_accuracy: 0.0}`` logs the partial credit and the accuracy
    side by side (a zero weight is logged, not summed)."""

    name = "shapes_accuracy"

    def __init__(self, *, strict: bool = True, **kwargs):
        if not strict:
            raise ValueError("shapes_accuracy is the strict score; use shapes_verifier for partial credit.")
        super().__init__(strict=True, **kwargs)


class ShapesExtraObjects(ShapesVerifier):
    """Minus the number of detected objects beyond the ones the prompt describes, ``-max(0, n_detected -
    sum_g count_g)`` (0 for a clean scene, -2 for two extra shapes): a gold signal for the reward-hacking monitor
    that the default verifier ignores (its partial credit does not penalise extras, ``exact_scene=False``). Negative
    so that, like every reward, higher is better. Same perception thresholds as :class:`ShapesVerifier`."""

    name = "shapes_extra_objects"

    def __init__(self, **kwargs):
        if kwargs.get("strict") or kwargs.get("exact_scene"):
            raise ValueError(
                "shapes_extra_objects counts objects; its strict and exact_scene options do not apply."
            )
        super().__init__(**kwargs)

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        descs = _scenes_from(metadata, images.shape[0], self.name)
        extras = [
            max(0, len(objs) - sum(g["count"] for g in desc["objects"]))
            for objs, desc in zip(self.detect(images), descs, strict=True)
        ]
        return -torch.tensor(extras, dtype=torch.float32, device=images.device)


# ----------------------------------------------------------------------------------------------- soft verifier
# Widths of the sigmoids that stand in for the verifier's thresholds (feature units; pixels at 64x64 for positions).
_SOFT_SKEW = 0.07
_SOFT_ANISO = 0.03
_SOFT_ELONGATION = 0.1
_SOFT_COMPACTNESS = 0.02
_SOFT_COVERAGE = 0.1
_SOFT_HUE = 0.03
_SOFT_POSITION = 3.0


def _soft_shape_scores(f: dict[str, torch.Tensor], max_elongation: float) -> torch.Tensor:
    """``(m, 4)`` soft scores of every component: square, circle, triangle (:data:`_SHAPE_NAMES` order) and
    plausible (any shape), each in (0, 1) and differentiable in the features."""
    sig = torch.sigmoid
    skew, aniso = f["skew"], f["aniso"]
    tri = sig((-skew - _SKEW_TRIANGLE) / _SOFT_SKEW)
    sym = sig((_SKEW_TRIANGLE - skew.abs()) / _SOFT_SKEW)
    square = sym * sig((aniso - _ANISO_SQUARE) / _SOFT_ANISO)
    circle = sym * sig((_ANISO_SQUARE - aniso.abs()) / _SOFT_ANISO)
    plausible = sig((max_elongation - f["elongation"]) / _SOFT_ELONGATION) * sig(
        (_MAX_COMPACTNESS - f["compactness"]) / _SOFT_COMPACTNESS
    )
    return torch.stack([square, circle, tri, torch.ones_like(tri)], dim=1) * plausible[:, None]


def soft_verify(
    images: torch.Tensor,
    scenes: Sequence[dict | str] | dict | str,
    *,
    blob_size: float = 12.0,
    min_area: float = 20.0,
    min_chroma: float = 0.12,
    min_coverage: float = 0.4,
    max_hue_dev: float = 30.0,
    max_elongation: float = 1.6,
    relation_margin: float = RELATION_MARGIN,
) -> torch.Tensor:
    """A differentiable relaxation of the verifier's partial credit, ``(B,)`` float32 with gradients to ``images``.

    The objects are found as :func:`detect_objects` finds them (the segmentation itself has no gradient); every
    score that the verifier thresholds is replaced by a sigmoid of the same feature, recomputed from the pixels:

    * *presence* of each required object: ``(1 + s) / 2`` on the best unused component of its colour, with ``s`` the
      soft score of the required shape (a sigmoid of the skewness / anisotropy margins, times a plausibility gate on
      elongation and compactness), so the right colour alone earns half credit as in the verifier; a required
      object with no component of its colour gets up to half credit from the mean soft weight of that colour in the
      best ``blob_size`` x ``blob_size`` window (pixels at 64x64) outside the found objects, so the gradient says
      "draw a blob of this colour there" where the verifier only says "missing" (a faint tint over the whole image
      earns little); or, when larger, half the soft shape score of a left-over object of another colour (the
      verifier's half credit for the right shape);
    * *count* (``exact`` groups): ``1 - |n_soft - count| / count`` with ``n_soft`` the sum of the soft shape scores
      of the components of that colour;
    * *relation*: the best pair's product of shape scores and two sigmoids of the position margins (the verifier's
      rule on box centres, with a width of 3 pixels at 64x64).

    Descriptions with an unnamed colour (``color: None``) get no credit from the soft area. The score tracks the
    verifier's partial credit (equal up to the sigmoids on clean renders) and is what gradient-based trainers
    (ReFL) can follow; evaluate with ``shapes_verifier`` / ``shapes_accuracy``.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError("soft_verify needs images as a float tensor (B, 3, H, W) in [0, 1].")
    x = images.float().clamp(0, 1)
    B, _, H, W = x.shape
    HW = H * W
    dev = x.device
    descs = _as_scene_list(scenes, B, "shapes_soft")
    scale = W / BASE_SIZE
    area_scale = HW / (BASE_SIZE * BASE_SIZE)
    K = len(_COLORS)
    ua, ub, pnorm = _palette_directions(dev)

    a, b = _chroma_plane(x)  # (B, H, W), differentiable
    proj = a[..., None] * ua + b[..., None] * ub  # (B, H, W, K)
    chroma = torch.sqrt(a**2 + b**2 + 1e-8)[..., None]
    soft = torch.sigmoid((proj / pnorm - min_coverage) / _SOFT_COVERAGE) * torch.sigmoid(
        (proj - math.cos(math.radians(max_hue_dev)) * chroma) / _SOFT_HUE
    )

    with torch.no_grad():
        seg = _segment(x.detach(), min_chroma=min_chroma, min_coverage=min_coverage, max_hue_dev=max_hue_dev)
        free = torch.ones(B * HW, device=dev)  # pixels outside every found object
        if seg is not None:
            free[seg.g[(seg.area[seg.inv].float() / area_scale) >= min_area]] = 0.0
    # the best blob-sized window of each colour outside the found objects: the mean soft weight in it
    side = max(int(round(blob_size * scale)), 1)
    spare = soft.permute(0, 3, 1, 2) * free.view(B, 1, H, W)
    blob = torch.nn.functional.avg_pool2d(spare, side, stride=1).amax(dim=(2, 3))  # (B, K)
    comps: list[dict[int, list[int]]] = [{} for _ in range(B)]  # image -> colour -> kept components
    if seg is not None:
        wt = (proj.reshape(-1, K)[seg.g, seg.k] / pnorm[seg.k]).clamp(
            0, 1
        )  # the verifier's weights, with grad
        f = _moments(wt, seg)
        shape_scores = _soft_shape_scores(f, max_elongation)
        hard_area = seg.area.float() / area_scale
        comp_b = torch.div(seg.rep, HW, rounding_mode="floor").tolist()
        comp_k = torch.zeros_like(seg.area).index_put_((seg.inv,), seg.k).tolist()
        for j, keep in enumerate((hard_area >= min_area).tolist()):
            if keep:
                comps[comp_b[j]].setdefault(comp_k[j], []).append(j)
    zero = blob.new_zeros(())
    sig = torch.sigmoid
    out = []
    for i, desc in enumerate(descs):
        groups = desc["objects"]
        order = sorted(
            range(len(groups)), key=lambda gi: (groups[gi]["shape"] is None) + (groups[gi]["color"] is None)
        )
        used: set[int] = set()
        terms: list[torch.Tensor] = [zero] * len(groups)
        counts: list[torch.Tensor] = []
        cand: list[tuple[list[int], int]] = []  # per group: its colour's components and its shape column
        for gi in range(len(groups)):
            g = groups[gi]
            col = _SHAPE_NAMES.index(g["shape"]) if g["shape"] is not None else 3
            ks = [_COLORS.index(g["color"])] if g["color"] is not None else range(K)
            cand.append(([j for kk in ks for j in comps[i].get(kk, [])], col))
        missing: dict[int, int] = {}
        for (
            gi
        ) in order:  # right colour first (full credit for the right shape, half otherwise, as the verifier)
            g = groups[gi]
            js, col = cand[gi]
            free = sorted(
                (j for j in js if j not in used), key=lambda j: -float(shape_scores[j, col].detach())
            )
            take = free[: g["count"]]
            used.update(take)
            terms[gi] = sum((0.5 + 0.5 * shape_scores[j, col] for j in take), zero)
            missing[gi] = g["count"] - len(take)
            if g["exact"]:
                n_soft = sum((shape_scores[j, col] for j in js), zero)
                counts.append((1 - (n_soft - g["count"]).abs() / g["count"]).clamp(min=0))
        for (
            gi
        ) in order:  # then each missing object: half credit for the right shape in another colour, or for
            g, short = groups[gi], missing[gi]  # the spare area of its colour, whichever is larger
            if short:
                col = cand[gi][1]
                others = [j for js in comps[i].values() for j in js if j not in used]
                others.sort(key=lambda j: -float(shape_scores[j, col].detach()))
                if g["shape"] is None:
                    others = []  # any shape: "right shape" means nothing without the colour
                take = others[:short]
                used.update(take)
                by_shape = sum((0.5 * shape_scores[j, col] for j in take), zero)
                by_area = zero
                if g["color"] is not None:
                    by_area = 0.5 * short * blob[i, _COLORS.index(g["color"])]
                terms[gi] = terms[gi] + torch.maximum(by_shape, by_area)
            terms[gi] = terms[gi] / g["count"]
        terms = terms + counts
        rel = desc["relation"]
        if rel is not None:
            (ja, ca), (jb, cb) = cand[rel["a"]], cand[rel["b"]]
            best = zero
            for p in ja:
                for q in jb:
                    if p == q:
                        continue
                    pos = []
                    for j, c in (
                        (p, ca),
                        (q, cb),
                    ):  # the centre of the box: above the centroid for a triangle
                        lift = (2 * hard_area[j]).sqrt() / 6 if c == 2 else 0.0
                        pos.append((f["cx"][j], f["cy"][j] - lift))
                    dx, dy = pos[1][0] - pos[0][0], pos[1][1] - pos[0][1]
                    along, across = along_across(dx, dy, rel["type"])
                    width = _SOFT_POSITION * scale
                    holds = sig((along - relation_margin * scale) / width) * sig(
                        (along - across.abs()) / width
                    )
                    pair = shape_scores[p, ca] * shape_scores[q, cb] * holds
                    best = torch.maximum(best, pair)
            terms.append(best)
        out.append(torch.stack(terms).mean())
    return torch.stack(out)


class ShapesSoft(Reward):
    """``shapes_soft``: the differentiable relaxation of :class:`ShapesVerifier`'s partial credit
    (:func:`soft_verify`), for trainers that backpropagate through the reward (ReFL). Options: ``blob_size``
    and the perception thresholds of :func:`detect_objects`."""

    name = "shapes_soft"
    differentiable = True
    required_metadata = ("scene",)

    def __init__(
        self,
        *,
        blob_size: float = 12.0,
        min_area: float = 20.0,
        min_chroma: float = 0.12,
        min_coverage: float = 0.4,
        max_hue_dev: float = 30.0,
        max_elongation: float = 1.6,
        relation_margin: float = RELATION_MARGIN,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if not blob_size >= 1:
            raise ValueError(f"blob_size={blob_size!r} must be at least 1 pixel (at 64x64).")
        self.kwargs = {
            "blob_size": float(blob_size),
            **_perception(min_area, min_chroma, min_coverage, max_hue_dev, max_elongation),
            "relation_margin": float(relation_margin),
        }

    def settings(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        scenes = _scenes_from(metadata, images.shape[0], self.name)
        return soft_verify(images, scenes, **self.kwargs)
