"""The reward-hacking monitor logged at each evaluation (:mod:`diffrl.trainers.evaluation`); pure functions and a
small state, no model or process group.

At an evaluation with images ``x_{p,r}`` (prompt ``p``, image ``r`` of ``R``) the monitor logs:

* ``monitor/proxy``: the mean over the evaluation images of the *training* reward (its un-normalised weighted sum
  ``sum_i w_i r_i(x)``), the signal the policy is optimised on;
* ``monitor/gold``: the mean of the held-out signal on the same images: the evaluation reward's un-normalised
  weighted sum, or its component named by ``monitor.gold``;
* ``monitor/gap``: ``(proxy - proxy_0) - (gold - gold_0)``, with ``_0`` the run's first evaluation: how much more
  the proxy has risen than the gold signal (the two need not share a scale, so their difference is taken from
  where each started). A growing gap is the overoptimisation picture of Gao, Schulman and Hilton, "Scaling Laws
  for Reward Model Overoptimization" (ICML 2023, arXiv:2210.10760), Fig. 1: proxy up, gold flat then down;
* ``monitor/diversity``: within-prompt diversity, ``mean_p  2 / (R (R - 1)) sum_{r < s} d(f(x_{p,r}), f(x_{p,s}))``
  over the prompts with at least two images, with ``f`` and ``d`` from :func:`image_features` /
  :func:`feature_distance` (both in [0, 1]; 0 for identical images), or with ``f`` the unit-length image
  embedding of a CLIP or DINOv2 model (:class:`EmbeddingFeatures`) and ``d = (1 - cos) / 2``. Collapsing within-prompt variety is the mode
  collapse RL fine-tuning is known for (DDPO, Black et al. 2023, arXiv:2305.13301, Sec. 6 and App. A, on
  overoptimised aesthetic scores);
* ``monitor/warnings``: how many warnings this evaluation printed (:func:`monitor_warnings`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "FEATURES",
    "EMBEDDINGS",
    "DEFAULT_FEATURE_MODELS",
    "EmbeddingFeatures",
    "feature_hub_files",
    "image_features",
    "feature_distance",
    "within_prompt_diversity",
    "monitor_warnings",
    "MonitorState",
]

EMBEDDINGS = ("clip", "dino")  # model embeddings, loaded lazily by EmbeddingFeatures
FEATURES = ("pixels", "histogram", *EMBEDDINGS)
#: The feature model each embedding kind loads when ``monitor.feature_model`` is empty.
DEFAULT_FEATURE_MODELS = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dinov2-small"}
_GRID = 8  # pixels: RGB means over an 8 x 8 grid of cells (192 numbers)
_BINS = 8  # histogram: 8 bins of [0, 1] per channel (24 numbers)


def image_features(images: torch.Tensor, kind: str = "pixels") -> torch.Tensor:
    """Float32 ``(B, D)`` features of images ``(B, 3, H, W)`` in [0, 1]: ``pixels``, the RGB means over an 8 x 8
    grid of equal cells (a thumbnail: layout and colour), or ``histogram``, each channel's fraction of pixels in 8
    equal bins of [0, 1] (colour only, blind to where things are). Videos ``(B, F, 3, H, W)``: their middle frame."""
    if images.ndim == 5:  # videos (B, F, 3, H, W): the middle frame
        images = images[:, images.shape[1] // 2]
    if images.ndim != 4:
        raise ValueError(f"image_features needs images (B, C, H, W), got {tuple(images.shape)}.")
    x = images.detach().float().clamp(0, 1)
    if kind == "pixels":
        return torch.nn.functional.adaptive_avg_pool2d(x, _GRID).flatten(1)
    if kind == "histogram":
        b, c = x.shape[:2]
        idx = (x * _BINS).long().clamp(max=_BINS - 1).flatten(2)  # (B, C, HW)
        counts = torch.zeros(b, c, _BINS, dtype=torch.float32, device=x.device)
        counts.scatter_add_(2, idx, torch.ones_like(idx, dtype=torch.float32))
        return (counts / idx.shape[-1]).flatten(1)
    if kind in EMBEDDINGS:
        raise ValueError(
            f"image_features computes pixel statistics; {kind!r} features come from a model: use "
            f"EmbeddingFeatures({kind!r}, model) or MonitorState.image_features."
        )
    raise ValueError(f"monitor.features={kind!r} is not implemented; use one of {', '.join(FEATURES)}.")


def feature_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "pixels") -> torch.Tensor:
    """Distance in [0, 1] between feature rows (broadcasting over leading dimensions): ``pixels``, the root mean
    square difference (a black and a white image: 1); ``histogram``, the total variation distance of each
    channel's histogram, ``0.5 sum_k |h_k - h'_k|``, averaged over the channels; ``clip`` / ``dino``, the cosine
    distance ``(1 - cos(a, b)) / 2`` of the embeddings (opposite directions: 1)."""
    a, b = a.float(), b.float()
    if kind in EMBEDDINGS:
        return ((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)) / 2).clamp(0, 1)
    if kind == "pixels":
        return (a - b).pow(2).mean(-1).sqrt()
    if kind == "histogram":
        diff = (a - b).abs().unflatten(-1, (-1, _BINS))  # (..., C, bins)
        return 0.5 * diff.sum(-1).mean(-1)
    raise ValueError(f"monitor.features={kind!r} is not implemented; use one of {', '.join(FEATURES)}.")


def feature_hub_files(kind: str, spec: str) -> list:
    """The hub files (:class:`diffrl.rewards.HubFile`) the ``kind`` embedding model ``spec`` needs; none for a
    local directory or a checkpoint shipped with diffrl (``toy:clip``)."""
    from diffrl.rewards import HubFile
    from diffrl.rewards.clip_common import clip_hub_files, is_local

    if kind == "clip":
        return clip_hub_files(spec, model=True, image_processor=True)
    if kind == "dino":
        if is_local(spec):
            return []
        return [
            HubFile(spec, name) for name in ("config.json", "model.safetensors", "preprocessor_config.json")
        ]
    raise ValueError(f"monitor.features={kind!r} has no feature model; use one of {', '.join(EMBEDDINGS)}.")


class EmbeddingFeatures:
    """Unit-length float32 image embeddings ``(B, D)`` of images ``(B, 3, H, W)`` in [0, 1], from a model loaded on
    first use and kept (frozen, in eval mode) on the images' device:

    * ``clip``: a transformers ``CLIPModel``'s projected image embedding (``get_image_features``) after its
      processor's transform (:class:`diffrl.rewards.clip_common.CLIPImageTransform`); ``spec`` may be a hub id, a
      directory or ``toy:clip``, the toy world's shipped CLIP;
    * ``dino``: a transformers DINOv2 model's (``AutoModel``) pooled class token after its processor's resize of
      the shorter side (bicubic), centre crop and normalisation, read from ``preprocessor_config.json``.

    DINO features see layout and objects where CLIP's lean to what a caption would say; both are what diversity
    metrics of generated images are commonly computed on, and both tell apart images that pixel statistics call
    alike (the same colours in another arrangement).
    """

    def __init__(self, kind: str, spec: str = ""):
        if kind not in EMBEDDINGS:
            raise ValueError(
                f"monitor.features={kind!r} has no feature model; use one of {', '.join(EMBEDDINGS)}."
            )
        self.kind = kind
        self.spec = spec or DEFAULT_FEATURE_MODELS[kind]
        self._model = None
        self._transform = None

    def _load(self):
        from diffrl.rewards.clip_common import CLIPImageTransform, builtin_dir
        from diffrl.rewards.weights import WeightsNotFoundError, resolve_snapshot

        files = feature_hub_files(self.kind, self.spec)
        label = f"monitor.features={self.kind}"
        try:
            shipped = builtin_dir(self.spec)
            directory = shipped if shipped is not None else resolve_snapshot(self.spec, files, label)
        except WeightsNotFoundError as err:
            fetch = "; ".join(f"hf download {f.repo_id} {f.filename}" for f in files)
            raise WeightsNotFoundError(
                f"monitor.features={self.kind} needs the model {self.spec}, which is not in the Hugging Face cache "
                f"(offline?); fetch it where there is network ({fetch}), set monitor.feature_model to a local "
                "directory, or use monitor.features=pixels."
            ) from err
        if self.kind == "clip":
            from diffrl.rewards.clip_common import load_clip_model

            self._model = load_clip_model(directory, label)
            self._transform = CLIPImageTransform.from_pretrained(directory)
        else:
            import json

            from transformers import AutoModel

            self._model = AutoModel.from_pretrained(directory).eval().requires_grad_(False)
            proc = json.loads((Path(directory) / "preprocessor_config.json").read_text())
            size, crop = proc.get("size") or {}, proc.get("crop_size") or {}
            if isinstance(size, int):
                size = {"shortest_edge": size}
            if isinstance(crop, int):
                crop = {"height": crop, "width": crop}
            if int(proc.get("resample", 3)) != 3 or set(size) - {"shortest_edge"}:
                raise ValueError(
                    f"{directory}/preprocessor_config.json: only a bicubic resize of the shorter side is supported "
                    f"(resample=3, size={{'shortest_edge': n}}), got resample={proc.get('resample')}, size={size}."
                )
            self._transform = CLIPImageTransform(
                shortest_edge=int(size.get("shortest_edge", 256)),
                crop_size=(int(crop.get("height", 224)), int(crop.get("width", 224))),
                mean=tuple(float(m) for m in proc.get("image_mean", (0.485, 0.456, 0.406))),
                std=tuple(float(v) for v in proc.get("image_std", (0.229, 0.224, 0.225))),
                do_resize=bool(proc.get("do_resize", True)),
                do_center_crop=bool(proc.get("do_center_crop", True)),
                do_normalize=bool(proc.get("do_normalize", True)),
            )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"image_features needs images (B, C, H, W), got {tuple(images.shape)}.")
        if self._model is None:
            self._load()
        model = self._model.to(images.device)
        dtype = next(model.parameters()).dtype
        pixels = self._transform(images.detach().float().clamp(0, 1)).to(dtype)
        if self.kind == "clip":
            from diffrl.rewards.clip_common import image_embeddings

            emb = image_embeddings(model.vision_model, model.visual_projection, pixels)
        else:
            out = model(pixel_values=pixels)
            pooled = getattr(out, "pooler_output", None)
            emb = out.last_hidden_state[:, 0] if pooled is None else pooled
        return torch.nn.functional.normalize(emb.float(), dim=-1)


def within_prompt_diversity(features: torch.Tensor, groups: list[int], kind: str = "pixels") -> float | None:
    """The mean over groups (prompts) with at least two rows of the mean pairwise :func:`feature_distance` of
    their rows; ``groups[i]`` is row ``i``'s prompt. ``None`` when no prompt has two images."""
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(int(g), []).append(i)
    means = []
    for rows in by_group.values():
        if len(rows) < 2:
            continue
        f = features[rows].float()
        d = feature_distance(f[:, None, :], f[None, :, :], kind)  # (R, R), zero diagonal
        r = len(rows)
        means.append(float(d.sum()) / (r * (r - 1)))
    return sum(means) / len(means) if means else None


def monitor_warnings(
    previous: dict[str, float] | None,
    current: dict[str, float],
    first: dict[str, float],
    *,
    min_change: float = 0.0,
    diversity_collapse: float = 0.5,
) -> list[str]:
    """One line per warning for the evaluation ``current`` after ``previous`` (``None``: the first one), each a
    dict of ``step`` and the measured ``proxy``, ``gold``, ``diversity`` (any of them may be missing); ``first``
    holds each value's first measurement. Two warnings:

    * the proxy rose by more than ``min_change`` while the gold signal fell by more than ``min_change``;
    * the diversity fell below ``diversity_collapse`` times its first value (only when it crosses: the previous
      evaluation was above that line, or there was none); ``diversity_collapse=0`` turns it off.
    """
    out = []
    prev = previous or {}
    step = current.get("step")
    if all(k in prev and k in current for k in ("proxy", "gold")):
        up = current["proxy"] - prev["proxy"]
        down = prev["gold"] - current["gold"]
        if up > min_change and down > min_change:
            out.append(
                f"reward hacking? between steps {prev.get('step')} and {step} the training reward (proxy) rose "
                f"{prev['proxy']:.4g} -> {current['proxy']:.4g} while the held-out gold signal fell "
                f"{prev['gold']:.4g} -> {current['gold']:.4g}; see docs/troubleshooting.md#reward-hacking."
            )
    if diversity_collapse > 0 and "diversity" in current and first.get("diversity", 0.0) > 0:
        line = diversity_collapse * first["diversity"]
        was_above = "diversity" not in prev or prev["diversity"] >= line
        if current["diversity"] < line and was_above:
            out.append(
                f"diversity collapse? at step {step} within-prompt diversity is {current['diversity']:.4g}, below "
                f"{diversity_collapse:g} x its first value {first['diversity']:.4g}; see "
                "docs/troubleshooting.md#reward-hacking."
            )
    return out


@dataclass
class MonitorState:
    """The monitor's memory between evaluations: each value's first measurement and the last evaluation. A
    resumed run rebuilds it with :meth:`replay` from the rows it had logged, so it logs what an uninterrupted run
    would."""

    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] | None = None
    embedder: EmbeddingFeatures | None = field(default=None, repr=False, compare=False)

    def image_features(self, images: torch.Tensor, kind: str = "pixels", model: str = "") -> torch.Tensor:
        """:func:`image_features` for the pixel statistics; for ``clip``/``dino`` the embeddings of ``model`` (its
        default when empty), the model loaded on first use and kept for the next evaluations."""
        if kind not in EMBEDDINGS:
            return image_features(images, kind)
        spec = model or DEFAULT_FEATURE_MODELS[kind]
        if self.embedder is None or (self.embedder.kind, self.embedder.spec) != (kind, spec):
            self.embedder = EmbeddingFeatures(kind, spec)
        return self.embedder(images)

    def update(
        self, step: int, values: dict[str, float], *, min_change: float = 0.0, diversity_collapse: float = 0.5
    ) -> tuple[dict[str, float], list[str]]:
        """``(metrics, warnings)`` of the evaluation at ``step`` with the measured ``values`` (``proxy``, ``gold``,
        ``diversity``, any subset); remembers them."""
        current = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
        for k, v in current.items():
            self.first.setdefault(k, v)
        current["step"] = step
        metrics = {f"monitor/{k}": v for k, v in current.items() if k != "step"}
        if "proxy" in current and "gold" in current:
            metrics["monitor/gap"] = (current["proxy"] - self.first["proxy"]) - (
                current["gold"] - self.first["gold"]
            )
        warnings = monitor_warnings(
            self.last, current, self.first, min_change=min_change, diversity_collapse=diversity_collapse
        )
        metrics["monitor/warnings"] = float(len(warnings))
        self.last = current
        return metrics, warnings

    def replay(self, rows: list[dict], up_to: int) -> None:
        """Rebuild the state from logged metric rows (``metrics.jsonl``) with ``step <= up_to``."""
        for row in sorted(rows, key=lambda r: r.get("step", -1)):
            step = row.get("step")
            if not isinstance(step, int) or step > up_to:
                continue
            values = {k: row[f"monitor/{k}"] for k in ("proxy", "gold", "diversity") if f"monitor/{k}" in row}
            if values:
                self.update(step, values)
