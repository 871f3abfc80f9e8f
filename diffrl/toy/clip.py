"""A small CLIP trained on the toy world: a differentiable, prompt-aware reward for ReFL on toy scenes.

The model is a genuine ``transformers.CLIPModel`` saved as a standard checkpoint directory (``config.json``,
``model.safetensors``, ``preprocessor_config.json`` of a ``CLIPImageProcessor``, and the CLIP BPE tokenizer files
``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``, ``merges.txt``), so the ``clipscore`` reward loads
it through its real loading path::

    from diffrl.rewards import load_reward
    reward = load_reward("clipscore", model="toy:clip")  # the shipped diffrl/toy/assets/clip
    reward = load_reward("clipscore", model="/path/to/dir")  # a directory written by train_toy_clip

Architecture (:class:`ToyCLIPConfig`, :func:`build_toy_clip`): a ViT with 8x8 patches on 64x64 images (64 patches
and a class token), width 64, 3 layers, 4 heads; a causal text transformer of width 64, 2 layers, 4 heads, over
:func:`diffrl.tiny_tokenizers.tiny_clip_tokenizer` (every toy-world word is one token; 16 positions, the longest
toy prompt is 12 words + 2 special tokens); 64-d projections; quick-GELU as in OpenAI's CLIP. About 0.32 M
parameters, 1.3 MB in float32. The patch position embeddings start from a 2-D sine-cosine pattern (then trained):
from transformers' small random ones the relations ("left of") were not learned at all in the same budget.

Preprocessing (``preprocessor_config.json``): shorter side 64 (bicubic), centre crop 64, so 64x64 images pass
unchanged and other sizes are resized as CLIP does; normalisation with mean ``(0.5, 0.5, 0.5)`` and std
``(0.5, 0.5, 0.5)`` (pixels in [-1, 1]; the toy images are mostly the near-white background, and the vision
tower's pre-LayerNorm makes the exact choice unimportant).

Training (:func:`train_toy_clip`, :class:`ToyCLIPTrainConfig`): CLIP's symmetric InfoNCE with a learnable logit
scale (initialised at ``log(1 / 0.07)``, clamped to at most 100) on scenes rendered on the fly from the *train*
split only (:func:`diffrl.toy.scenes.sample_scene`); no held-out description is ever shown, as image or as text.
Two kinds of hard negatives teach what the verifier (``diffrl.toy.rewards``) checks, built with the scenes
module's own functions (:func:`~diffrl.toy.scenes.prompt_for` on a modified description, :func:`corruptions`):

* *Minimal pairs* (image-side and text-side): each scene comes with a partner scene, the same objects with one
  requirement broken (:func:`corrupt_scene`): another colour or shape for one group, a colour swap between the
  two groups, the two objects exchanged (or the scene mirrored / rotated) so that the relation changes, or a
  new layout with another count.
  Both are positives of their own prompts, and each is in the batch of the other, so the loss has to tell
  them apart in both directions (for a fixed prompt, which is what a reward sees: the correct image must score
  higher than its near miss).
* *Corrupted prompts* (text-side): ``text_negatives`` per image, drawn from every corruption of its description
  (:data:`CORRUPTION_KINDS`: ``color``, ``shape``, ``count`` (another count of 2 to 4; never 1, which a
  non-exact "a red circle" allows), ``relation`` (any other relation; ``swap``, the opposite one only, is drawn
  on its own too), ``attribution`` (the colours of the two groups swapped)) that stays in the train split; they
  join the in-batch prompts in the image-to-text softmax.

What is hardest to learn is drawn more often: the kinds of near misses and corrupted prompts by ``kind_weights``
(the opposite relation 4, attribution 2, shape 1.5, others 1), the scenes by ``category_weights`` (half of them
``position`` scenes), and a curriculum: the pool starts with, and for the first ``warmup_category_steps`` steps
is refreshed with, ``position`` scenes only, then turns over to the mix (relations need position features that nothing else asks for; mixed from the start, they
were learned late or not at all).

In-batch pairs that are not wrong are not used as negatives: a text is masked for an image (other than its own)
when the image strictly satisfies the text's description (:func:`~diffrl.toy.scenes.score_objects`), e.g. "a red
circle" for the image of "a red circle and a blue square". Scenes live in a pool of ``pool_pairs`` minimal pairs,
``refresh`` of which are replaced by new renders every step (rendering at 4x4 supersampling costs ~2.6 ms a scene
on one core, more than the model's step would allow for fully fresh batches). Light augmentation (random Gaussian
blur, sigma up to ``blur_max``, and pixel noise up to ``noise_max``) makes the scores robust to the soft images a
small generator produces; no flips or crops (they would change relations).

:func:`evaluate_toy_clip` loads a directory through ``load_reward("clipscore", model=dir)`` and measures, on
held-out (eval split) scenes, how often the true prompt beats each kind of corrupted prompt, retrieval in batches
of 32, and the agreement with the verifier on correct renders vs renders of corrupted descriptions.
``scripts/train_toy_clip.py`` re-creates the shipped weights.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes as S

__all__ = [
    "CORRUPTION_KINDS",
    "TOY_CLIP_MEAN",
    "TOY_CLIP_STD",
    "TOY_CLIP_MAX_TOKENS",
    "ToyCLIPConfig",
    "ToyCLIPTrainConfig",
    "toy_clip_tokenizer",
    "build_toy_clip",
    "save_toy_clip",
    "corruptions",
    "corrupt_scene",
    "clip_loss",
    "train_toy_clip",
    "evaluate_toy_clip",
    "num_params",
]

#: The kinds of corrupted descriptions (:func:`corruptions`); ``"swap"`` (the opposite relation only, i.e. the
#: two objects exchanged) is also accepted, a subset of ``"relation"`` that training draws on its own.
CORRUPTION_KINDS: tuple[str, ...] = ("color", "shape", "count", "relation", "attribution")
_ALL_KINDS: tuple[str, ...] = (*CORRUPTION_KINDS, "swap")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TOY_CLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
TOY_CLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
#: Text positions: the longest toy prompt ("an orange triangle to the right of a blue triangle") is 12 tokens
#: with the start and end tokens.
TOY_CLIP_MAX_TOKENS = 16
_MAX_OBJECTS = 4  # corrupted descriptions keep at most this many objects (the toy world's largest scene)

LogFn = Callable[[str], None]


# ----------------------------------------------------------------------------------------------- model
@dataclass
class ToyCLIPConfig:
    """Architecture of the toy CLIP (defaults: the shipped model)."""

    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    patch_size: int = 8
    image_size: int = S.BASE_SIZE
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    mlp_ratio: int = 4
    projection_dim: int = 64
    max_tokens: int = TOY_CLIP_MAX_TOKENS
    #: initial patch position embeddings: "sincos" (a fixed 2-D sine-cosine pattern of std ``pos_scale``, still
    #: trained; relations are hardly learned from transformers' small random ones) or "random"
    pos_init: str = "sincos"
    pos_scale: float = 0.25


def toy_clip_tokenizer(max_tokens: int = TOY_CLIP_MAX_TOKENS):
    """The offline CLIP BPE tokenizer of the toy world (:func:`diffrl.tiny_tokenizers.tiny_clip_tokenizer`)."""
    from diffrl.tiny_tokenizers import tiny_clip_tokenizer

    return tiny_clip_tokenizer(model_max_length=max_tokens)


def build_toy_clip(config: ToyCLIPConfig | None = None, tokenizer=None, seed: int = 0):
    """A freshly initialised ``transformers.CLIPModel`` of ``config`` whose text tower fits ``tokenizer``
    (default :func:`toy_clip_tokenizer`); the weights depend only on ``seed`` (the global RNG is untouched)."""
    from transformers import CLIPConfig, CLIPModel

    config = config or ToyCLIPConfig()
    tokenizer = tokenizer if tokenizer is not None else toy_clip_tokenizer(config.max_tokens)
    text = dict(
        hidden_size=config.text_hidden,
        intermediate_size=config.mlp_ratio * config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        hidden_act="quick_gelu",
        vocab_size=len(tokenizer),
        max_position_embeddings=config.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooling reads the first end token
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=config.vision_hidden,
        intermediate_size=config.mlp_ratio * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        hidden_act="quick_gelu",
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    clip_config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(clip_config)
    if config.pos_init == "sincos":
        grid = config.image_size // config.patch_size
        table = _sincos_2d(grid, config.vision_hidden)
        table = table * (config.pos_scale / table.std())
        with torch.no_grad():
            weight = model.vision_model.embeddings.position_embedding.weight
            weight[0].zero_()  # the class token
            weight[1:] = table
    elif config.pos_init != "random":
        raise ValueError(f"pos_init={config.pos_init!r}; use 'sincos' or 'random'.")
    return model


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """``(grid * grid, dim)`` 2-D sine-cosine position codes (row-major patches, as ViT's): the first half of the
    channels encode the column, the second half the row, each with ``dim // 4`` frequencies from a period of 4
    patches to one of 64 (smooth across the grid: nearly linear in the position)."""
    if dim % 4:
        raise ValueError(f"the vision width {dim} must be a multiple of 4 for sine-cosine positions.")
    freqs = 16.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / max(1, dim // 4 - 1))
    pos = torch.arange(grid, dtype=torch.float64)
    angles = pos[:, None] * freqs[None] * (math.pi / 2)  # (grid, dim // 4)
    code = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim // 2)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([code[cols.reshape(-1)], code[rows.reshape(-1)]], dim=1).float()


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_toy_clip(model, tokenizer, out_dir: str | Path, image_size: int = S.BASE_SIZE) -> Path:
    """Write ``model`` (float32 safetensors), its ``CLIPImageProcessor`` settings and ``tokenizer`` to ``out_dir``
    in the layout of a hub CLIP repository; returns the directory."""
    from transformers import CLIPImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.float().save_pretrained(out)
    tokenizer.save_pretrained(out)  # tokenizer.json + tokenizer_config.json
    tokenizer.backend_tokenizer.model.save(str(out))  # vocab.json + merges.txt, as in the hub repositories
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(TOY_CLIP_MEAN),
        image_std=list(TOY_CLIP_STD),
    ).save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- corruptions
def _distinct_groups(groups: Sequence[dict]) -> bool:
    keys = [(g["shape"], g["color"]) for g in groups]
    return len(set(keys)) == len(keys)


def _group_slices(desc: dict) -> list[slice]:
    """The objects of each group in a :func:`~diffrl.toy.scenes.layout` (groups in order, ``count`` each)."""
    out, start = [], 0
    for g in desc["objects"]:
        out.append(slice(start, start + g["count"]))
        start += g["count"]
    return out


@functools.cache
def _corruptions_json(desc_json: str, kind: str) -> tuple[str, ...]:
    desc = json.loads(desc_json)
    groups, rel = desc["objects"], desc["relation"]
    out: list[dict] = []

    def add(new_groups: list[dict], new_rel: dict | None) -> None:
        if _distinct_groups(new_groups):
            out.append({"category": desc["category"], "objects": new_groups, "relation": new_rel})

    if kind in ("color", "shape"):
        key, values = ("color", list(S.PALETTE)) if kind == "color" else ("shape", list(S.SHAPES))
        for gi, g in enumerate(groups):
            if g[key] is None:
                continue
            for v in values:
                if v != g[key]:
                    new = copy.deepcopy(groups)
                    new[gi][key] = v
                    add(new, rel)
    elif kind == "count":
        total = sum(g["count"] for g in groups)
        for gi, g in enumerate(groups):
            for n in (2, 3, 4):
                if n != g["count"] and total - g["count"] + n <= _MAX_OBJECTS:
                    new = copy.deepcopy(groups)
                    new[gi].update(count=n, exact=True)
                    add(new, rel)
    elif kind in ("relation", "swap"):
        if rel is not None:
            for t in S.RELATIONS:
                if t != rel["type"] and (kind == "relation" or t == _OPPOSITE[rel["type"]]):
                    add(copy.deepcopy(groups), {**rel, "type": t})
    elif kind == "attribution":
        if len(groups) == 2:
            (g0, g1) = groups
            if (
                g0["color"] != g1["color"]
                and g0["shape"] != g1["shape"]
                and None not in (g0["color"], g1["color"])
            ):
                new = copy.deepcopy(groups)
                new[0]["color"], new[1]["color"] = g1["color"], g0["color"]
                add(new, rel)
    else:
        raise ValueError(f"unknown corruption kind {kind!r}; use one of {list(_ALL_KINDS)}.")
    return tuple(json.dumps(d, sort_keys=True) for d in out)


def corruptions(desc: dict | str, kind: str, split: str = "all") -> list[dict]:
    """Every description that breaks one requirement of ``desc`` in the way ``kind`` says (in a fixed order):

    * ``"color"`` / ``"shape"``: one group gets another colour / shape;
    * ``"count"``: one group gets another count of 2 to 4, exact (never 1: "a red circle" is not exact, so a
      scene with more red circles satisfies it), the scene keeping at most 4 objects;
    * ``"relation"``: any other relation between the same groups; ``"swap"``: only the opposite one (the same
      as the two objects exchanged);
    * ``"attribution"``: the colours of two groups of different shapes and colours swapped.

    Results whose groups coincide (two "red circle" groups) are left out; ``split`` keeps only descriptions of
    that split (``"train"``, ``"eval"``, ``"all"``). Prompts are ``prompt_for(d)``."""
    desc = S.normalize_description(desc)
    out = [json.loads(s) for s in _corruptions_json(json.dumps(desc, sort_keys=True), kind)]
    return out if split == "all" else [d for d in out if _split_of(json.dumps(d, sort_keys=True)) == split]


@functools.cache
def _split_of(desc_json: str) -> str:
    return S.split_of(json.loads(desc_json))


@functools.cache
def _prompt_of(desc_json: str) -> str:
    return S.prompt_for(json.loads(desc_json))


def _as_objects(objects: Sequence[dict | S.SceneObject]) -> list[dict]:
    return [dict(o) if isinstance(o, dict) else o.to_dict() for o in objects]


_TRANSFORMS = ("mirror_x", "mirror_y", "rot_cw", "rot_ccw")


def _exchange(objs: list[dict], a: int, b: int, image_size: int) -> list[dict] | None:
    """Objects ``a`` and ``b`` with their centres exchanged (the opposite relation, every other pixel of the
    layout in place), or ``None`` when that leaves an object outside the border or too close to another."""
    out = [dict(o) for o in objs]
    for i, j in ((a, b), (b, a)):
        out[i]["cx"], out[i]["cy"] = objs[j]["cx"], objs[j]["cy"]
    scale = image_size / S.BASE_SIZE
    boxes = [S.SceneObject(**o) for o in out]
    for i in (a, b):
        x0, y0, x1, y1 = boxes[i].box()
        if min(x0, y0) < S.BORDER * scale or max(x1, y1) > image_size - S.BORDER * scale:
            return None
        if not all(S._separated(boxes[i], o, S.GAP * scale) for j, o in enumerate(boxes) if j != i):
            return None
    return out


def _transform(objs: list[dict], how: str, size: float) -> list[dict]:
    """Mirror or rotate the centres by 90 degrees (shapes stay upright; boxes stay inside and apart)."""
    out = []
    for o in objs:
        x, y = o["cx"], o["cy"]
        x, y = {
            "mirror_x": (size - x, y),
            "mirror_y": (x, size - y),
            "rot_cw": (size - y, x),
            "rot_ccw": (y, size - x),
        }[how]
        out.append({**o, "cx": x, "cy": y})
    return out


def corrupt_scene(
    desc: dict | str,
    objects: Sequence[dict | S.SceneObject],
    kind: str,
    rng: np.random.Generator,
    image_size: int = S.BASE_SIZE,
    split: str = "all",
) -> tuple[dict, list[dict]] | None:
    """A near miss of a scene: ``(corrupted description, its objects)`` with one corruption of ``kind`` drawn
    from :func:`corruptions` (of ``split``), or ``None`` when there is none.

    The objects are those of the scene (in :func:`~diffrl.toy.scenes.layout`'s group order) changed as little as
    possible: a colour or shape changed, colours swapped, the two objects exchanged or the positions mirrored
    (the opposite relation) or rotated by 90 degrees (the perpendicular ones); another count gets a new layout. The result satisfies the corrupted
    description and not the original (strictly, :func:`~diffrl.toy.scenes.score_objects`). With
    ``split="train"`` no object of the result is of a held-out colour-shape combination."""
    desc = S.normalize_description(desc)
    options = corruptions(desc, kind, split)
    if not options:
        return None
    new = options[int(rng.integers(len(options)))]
    objs = _as_objects(objects)
    slices = _group_slices(desc)
    if kind in ("color", "shape", "attribution"):
        for gi, sl in enumerate(slices):
            for o in objs[sl]:
                for key in ("color", "shape"):
                    if new["objects"][gi][key] is not None:
                        o[key] = new["objects"][gi][key]
    elif kind in ("relation", "swap"):
        rel, scale = new["relation"], image_size / S.BASE_SIZE
        a, b = slices[rel["a"]].start, slices[rel["b"]].start
        candidates = []
        if rel["type"] == _OPPOSITE[desc["relation"]["type"]]:
            candidates.append(_exchange(objs, a, b, image_size))
        candidates += [_transform(objs, how, float(image_size)) for how in _TRANSFORMS]
        for moved in candidates:
            if moved is not None and S._relation_clear(
                S.SceneObject(**moved[a]), S.SceneObject(**moved[b]), rel["type"], scale
            ):
                objs = moved
                break
        else:
            objs = [o.to_dict() for o in S.layout(new, rng, image_size)]
    else:  # count
        objs = [o.to_dict() for o in S.layout(new, rng, image_size)]
    margin = S.RELATION_MARGIN * image_size / S.BASE_SIZE
    if (
        not S.score_objects(objs, new, relation_margin=margin)[1]
        or S.score_objects(objs, desc, relation_margin=margin)[1]
    ):
        objs = [o.to_dict() for o in S.layout(new, rng, image_size)]
        if S.score_objects(objs, desc, relation_margin=margin)[1]:
            return None
    if split == "train" and any((o["shape"], o["color"]) in S.HELD_OUT_COMBOS for o in objs):
        return None  # a layout drew a colour of a held-out combination for a group without one
    return new, objs


# ----------------------------------------------------------------------------------------------- training
@dataclass
class ToyCLIPTrainConfig:
    """Training settings (defaults: the shipped model, ``scripts/train_toy_clip.py``)."""

    steps: int = 2000
    batch: int = 64  # images per step: batch // 2 minimal pairs
    text_negatives: int = 3  # corrupted prompts per image
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    pool_pairs: int = 2048  # minimal pairs kept rendered
    refresh: int = 8  # pairs replaced by new renders each step
    #: curriculum: the pool starts with, and is refreshed for ``warmup_category_steps`` steps with, scenes of these
    #: categories only; relations, which need position features nothing else needs, are learned there first
    warmup_categories: dict[str, float] = field(default_factory=lambda: {"position": 1.0})
    warmup_category_steps: int = 400
    blur_max: float = 1.0  # augmentation: Gaussian blur sigma in [0, blur_max] on half the images
    noise_max: float = 0.02  # augmentation: pixel noise std in [0, noise_max]
    #: how often each corruption kind is picked for a near miss and for a corrupted prompt (among those a
    #: scene has): relations and colour attribution, the hardest to learn, more often
    kind_weights: dict[str, float] = field(
        default_factory=lambda: {
            "color": 1.0,
            "shape": 1.5,
            "count": 1.0,
            "relation": 1.0,
            "swap": 4.0,
            "attribution": 2.0,
        }
    )
    #: prompt categories of the training scenes (more position scenes than the toy world's default)
    category_weights: dict[str, float] = field(
        default_factory=lambda: {
            "single_object": 0.08,
            "two_object": 0.10,
            "counting": 0.15,
            "colors": 0.04,
            "position": 0.50,
            "color_attr": 0.13,
        }
    )
    seed: int = 0
    log_every: int = 50
    eval_every: int = 250  # quick held-out check (pairwise accuracy by kind on 128 scenes); 0: never
    model: ToyCLIPConfig = field(default_factory=ToyCLIPConfig)


@dataclass
class _Pair:
    images: torch.Tensor  # (2, 3, H, W): the scene, its near miss
    prompts: tuple[str, str]
    descs: tuple[dict, dict]
    objects: tuple[list[dict], list[dict]]
    negatives: tuple[list[str], list[str]]  # corrupted prompts of each (train split)


def _weighted_choice(options: Sequence[str], weights: dict[str, float], rng: np.random.Generator) -> str:
    p = np.asarray([weights.get(o, 1.0) for o in options], dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _negative_pool(desc: dict, objects: list[dict]) -> dict[str, list[str]]:
    """Train-split corrupted prompts of ``desc`` by kind (kinds without any left out), none satisfied by
    ``objects``."""
    out = {}
    for kind in _ALL_KINDS:
        prompts = [
            S.prompt_for(d) for d in corruptions(desc, kind, "train") if not S.score_objects(objects, d)[1]
        ]
        if prompts:
            out[kind] = prompts
    return out


def _draw_negatives(
    pool: dict[str, list[str]], k: int, weights: dict[str, float], rng: np.random.Generator
) -> list[str]:
    """``k`` prompts: a kind by ``weights``, then a prompt of it uniformly (repeats possible when few exist)."""
    if not pool:
        return []
    out = []
    for _ in range(k):
        options = pool[_weighted_choice(list(pool), weights, rng)]
        out.append(options[int(rng.integers(len(options)))])
    return out


def _make_pair(
    rng: np.random.Generator, cfg: ToyCLIPTrainConfig, image_size: int, categories: dict[str, float]
) -> _Pair:
    while True:
        item = S.sample_scene(rng, None, "train", image_size, categories)
        desc = S.normalize_description(item["scene"])
        kinds = [k for k in _ALL_KINDS if corruptions(desc, k, "train")]
        kind = _weighted_choice(kinds, cfg.kind_weights, rng)
        near = corrupt_scene(desc, item["objects"], kind, rng, image_size, split="train")
        if near is None:
            continue
        desc2, objs2 = near
        objs = [dict(o) for o in item["objects"]]
        negs = tuple(
            _draw_negatives(_negative_pool(d, o), cfg.text_negatives, cfg.kind_weights, rng)
            for d, o in ((desc, objs), (desc2, objs2))
        )
        return _Pair(
            images=torch.stack([item["image"], S.render(objs2, image_size)]),
            prompts=(item["prompt"], S.prompt_for(desc2)),
            descs=(desc, desc2),
            objects=(objs, objs2),
            negatives=negs,  # type: ignore[arg-type]
        )


def _might_satisfy(desc: dict, objects: list[dict]) -> bool:
    """A cheap necessary condition for ``objects`` satisfying ``desc``: every named shape and colour is there."""
    shapes, colors = {o["shape"] for o in objects}, {o["color"] for o in objects}
    return all(
        (g["shape"] is None or g["shape"] in shapes) and (g["color"] is None or g["color"] in colors)
        for g in desc["objects"]
    )


def _false_negative_mask(descs: list[dict], objects: list[list[dict]], prompts: list[str]) -> torch.Tensor:
    """``(N_text, N_image)`` True where text ``i`` is not a negative of image ``j != i``: the same prompt, or the
    image satisfies the text's description strictly."""
    n = len(descs)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if prompts[i] == prompts[j] or (
                _might_satisfy(descs[i], objects[j]) and S.score_objects(objects[j], descs[i])[1]
            ):
                mask[i, j] = True
    return mask


def _augment(images: torch.Tensor, gen: torch.Generator, blur_max: float, noise_max: float) -> torch.Tensor:
    """Random Gaussian blur (half the images, sigma up to ``blur_max``) and pixel noise, clamped to [0, 1]."""
    b = images.shape[0]
    if blur_max > 0:
        sigma = torch.rand(b, generator=gen) * blur_max * (torch.rand(b, generator=gen) < 0.5)
        radius = 3
        t = torch.arange(-radius, radius + 1, dtype=images.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)  # (b, 7); sigma ~ 0 gives the identity kernel
        k = k.repeat_interleave(3, 0)  # one kernel per channel
        x = images.reshape(1, b * 3, *images.shape[-2:])
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(x, k[:, None, None, :], groups=b * 3)
        x = F.conv2d(x, k[:, None, :, None], groups=b * 3)
        images = x.reshape_as(images)
    if noise_max > 0:
        std = torch.rand(b, 1, 1, 1, generator=gen) * noise_max
        images = images + std * torch.randn(images.shape, generator=gen)
    return images.clamp(0, 1)


def _encode_texts(model, tokenizer, prompts: list[str], max_tokens: int) -> torch.Tensor:
    from diffrl.rewards.clip_common import text_embeddings

    return F.normalize(text_embeddings(model, tokenizer, prompts, max_tokens), dim=-1)


def _encode_images(model, pixels: torch.Tensor) -> torch.Tensor:
    from diffrl.rewards.clip_common import image_embeddings

    return F.normalize(image_embeddings(model.vision_model, model.visual_projection, pixels), dim=-1)


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    mask: torch.Tensor | None = None,
    neg_emb: torch.Tensor | None = None,
    neg_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CLIP's symmetric InfoNCE on normalised embeddings (image ``i`` goes with text ``i``), plus per-image hard
    negative texts in the image-to-text softmax.

    Args:
        image_emb, text_emb: ``(N, D)``.
        logit_scale: the log of the temperature's inverse (CLIP's parameter; the scale is clamped to 100).
        mask: ``(N_text, N_image)`` True where a text is not a negative of an image (never on the diagonal).
        neg_emb: ``(N, K, D)`` hard negative texts of each image; ``neg_valid`` ``(N, K)`` marks real ones.
    Returns:
        the loss and statistics (image-to-text / text-to-image top-1 accuracy, hard-negative accuracy).
    """
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * text_emb @ image_emb.T  # (text, image)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(len(image_emb))
    i2t = logits.T
    stats: dict[str, float] = {}
    if neg_emb is not None:
        neg = scale * torch.einsum("nd,nkd->nk", image_emb, neg_emb)
        if neg_valid is not None:
            neg = neg.masked_fill(~neg_valid, float("-inf"))
        with torch.no_grad():
            own = i2t.diagonal()[:, None]
            beaten = (own > neg) | (neg == float("-inf"))
            stats["hard_neg_acc"] = beaten.all(1).float().mean().item()
        i2t = torch.cat([i2t, neg], dim=1)
    loss = 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(logits, target))
    with torch.no_grad():
        stats["i2t_acc"] = (i2t.argmax(1) == target).float().mean().item()
        stats["t2i_acc"] = (logits.argmax(1) == target).float().mean().item()
    return loss, stats


class _QuickEval:
    """Pairwise held-out accuracy by corruption kind on a fixed small set of eval-split scenes (for the log)."""

    def __init__(self, n: int = 128, seed: int = 12345):
        data = S.generate_dataset(n, seed=seed, split="eval")
        self.images = data["images"]
        self.true = list(data["prompts"])
        self.cases = [
            (i, kind, S.prompt_for(d))
            for i, desc in enumerate(data["scenes"])
            for kind in _ALL_KINDS
            for d in corruptions(desc, kind)
        ]

    @torch.no_grad()
    def __call__(self, model, tokenizer, max_tokens: int) -> dict[str, float]:
        from diffrl.rewards.preprocess import normalize

        was_training = model.training
        model.eval()
        img = _encode_images(model, normalize(self.images, TOY_CLIP_MEAN, TOY_CLIP_STD))
        prompts = list(dict.fromkeys(self.true + [p for _, _, p in self.cases]))
        where = {p: i for i, p in enumerate(prompts)}
        txt = _encode_texts(model, tokenizer, prompts, max_tokens)
        sims = img @ txt.T
        true = sims[torch.arange(len(self.true)), torch.tensor([where[p] for p in self.true])]
        idx = torch.tensor([i for i, _, _ in self.cases])
        wrong = sims[idx, torch.tensor([where[p] for _, _, p in self.cases])]
        wins = (true[idx] > wrong).float()
        kinds = np.array([k for _, k, _ in self.cases])
        model.train(was_training)
        return {k: wins[torch.from_numpy(kinds == k)].mean().item() for k in _ALL_KINDS if (kinds == k).any()}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "embedding" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, cfg: ToyCLIPTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _config_from(cfg: ToyCLIPTrainConfig | None, overrides: dict[str, Any]) -> ToyCLIPTrainConfig:
    cfg = copy.deepcopy(cfg) if cfg is not None else ToyCLIPTrainConfig()
    names = {f.name for f in fields(ToyCLIPTrainConfig)}
    for key, value in overrides.items():
        if key not in names:
            raise TypeError(f"unknown training setting {key!r}; use one of {sorted(names)}.")
        if value is not None:
            setattr(cfg, key, value)
    if cfg.batch < 2 or cfg.batch % 2:
        raise ValueError(
            f"batch={cfg.batch} must be an even number >= 2 (pairs of a scene and its near miss)."
        )
    return cfg


def train_toy_clip(
    out_dir: str | Path | None,
    steps: int | None = None,
    batch: int | None = None,
    seed: int | None = None,
    *,
    config: ToyCLIPTrainConfig | None = None,
    log: LogFn | None = print,
    evaluate: bool = True,
    eval_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the toy CLIP and save it to ``out_dir`` (skipped when ``None``); deterministic for the settings.

    Args:
        out_dir: output directory (the checkpoint of :func:`save_toy_clip` and ``toy_clip.json``).
        steps, batch, seed: shortcuts for the fields of :class:`ToyCLIPTrainConfig` (``None``: ``config``'s).
        config: all settings (default :class:`ToyCLIPTrainConfig`); ``overrides`` set any of its fields.
        log: called with one line of progress at a time (``None``: silent).
        evaluate: run :func:`evaluate_toy_clip` on the saved directory (with ``eval_kwargs``) and add it to
            ``toy_clip.json``.
    Returns:
        a summary: the settings, ``losses`` (the loss of every step), ``train_seconds``, ``num_params``,
        the evaluation (when run), and the ``model`` itself under ``"model"`` (not written to the json).
    """
    cfg = _config_from(config, {"steps": steps, "batch": batch, "seed": seed, **overrides})
    say = log or (lambda _msg: None)
    from diffrl.rewards.preprocess import normalize

    t_start = time.time()
    tokenizer = toy_clip_tokenizer(cfg.model.max_tokens)
    model = build_toy_clip(cfg.model, tokenizer, seed=cfg.seed)
    model.train()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    image_size = cfg.model.image_size
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))

    pairs_per_step = cfg.batch // 2
    pool_size = max(cfg.pool_pairs, pairs_per_step)
    say(
        f"toy CLIP: {num_params(model) / 1e6:.3f} M parameters; rendering a pool of {pool_size} minimal pairs"
    )
    first = cfg.warmup_categories if cfg.warmup_category_steps > 0 else cfg.category_weights
    pool = [_make_pair(rng, cfg, image_size, first) for _ in range(pool_size)]
    t_pool = time.time() - t_start
    say(f"pool rendered in {t_pool:.1f} s")
    quick_eval = _QuickEval() if cfg.eval_every else None
    next_slot = 0
    losses: list[float] = []
    window: dict[str, list[float]] = {}
    t_train = time.time()
    for step in range(cfg.steps):
        for _ in range(cfg.refresh if step else 0):  # replace the oldest pairs
            categories = first if step < cfg.warmup_category_steps else cfg.category_weights
            pool[next_slot] = _make_pair(rng, cfg, image_size, categories)
            next_slot = (next_slot + 1) % pool_size
        picked = [pool[int(i)] for i in rng.choice(pool_size, size=pairs_per_step, replace=False)]
        images = torch.cat([p.images for p in picked])
        prompts = [t for p in picked for t in p.prompts]
        descs = [d for p in picked for d in p.descs]
        objects = [o for p in picked for o in p.objects]
        negatives = [n for p in picked for n in p.negatives]
        k = max((len(n) for n in negatives), default=0)

        unique = list(dict.fromkeys(prompts + [t for n in negatives for t in n]))
        index = {t: i for i, t in enumerate(unique)}
        pixels = normalize(_augment(images, gen, cfg.blur_max, cfg.noise_max), TOY_CLIP_MEAN, TOY_CLIP_STD)
        image_emb = _encode_images(model, pixels)
        text_all = _encode_texts(model, tokenizer, unique, cfg.model.max_tokens)
        text_emb = text_all[torch.tensor([index[t] for t in prompts])]
        neg_emb = neg_valid = None
        if k:
            ids = torch.tensor([[index[t] for t in n] + [0] * (k - len(n)) for n in negatives])
            neg_valid = torch.tensor([[True] * len(n) + [False] * (k - len(n)) for n in negatives])
            neg_emb = text_all[ids]
        mask = _false_negative_mask(descs, objects, prompts)
        loss, stats = clip_loss(image_emb, text_emb, model.logit_scale, mask, neg_emb, neg_valid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        losses.append(loss.item())
        for key, v in {"loss": loss.item(), **stats}.items():
            window.setdefault(key, []).append(v)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.time() - t_train
            means = " ".join(f"{key} {np.mean(v):.3f}" for key, v in window.items())
            say(
                f"step {step + 1}/{cfg.steps} {means} scale {model.logit_scale.exp().item():.1f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} ({elapsed / (step + 1):.3f} s/step, {elapsed:.0f} s)"
            )
            window = {}
        if quick_eval is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            acc = quick_eval(model, tokenizer, cfg.model.max_tokens)
            say(f"step {step + 1} held-out pairwise: " + " ".join(f"{n} {v:.3f}" for n, v in acc.items()))
    train_seconds = time.time() - t_start
    model.eval().requires_grad_(False)
    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "num_params": num_params(model),
        "pool_seconds": round(t_pool, 1),
        "train_seconds": round(train_seconds, 1),
        "final_loss": float(np.mean(losses[-cfg.log_every :])) if losses else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preprocessing": {"size": image_size, "crop": image_size, "mean": TOY_CLIP_MEAN, "std": TOY_CLIP_STD},
    }
    say(f"trained in {train_seconds:.0f} s ({t_pool:.0f} s rendering the pool)")
    if out_dir is not None:
        out = save_toy_clip(model, tokenizer, out_dir, image_size)
        if evaluate:
            t_eval = time.time()
            summary["eval"] = evaluate_toy_clip(out, log=say, **(eval_kwargs or {}))
            summary["eval_seconds"] = round(time.time() - t_eval, 1)
        (out / "toy_clip.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"saved to {out}")
    summary["losses"] = losses
    summary["model"] = model
    return summary


# ----------------------------------------------------------------------------------------------- evaluation
def _embedder(reward):
    """Normalised image / text embeddings under a loaded ``clipscore`` reward (the same math as its cosine)."""
    from diffrl.rewards.clip_common import image_embeddings, text_embeddings

    @torch.no_grad()
    def images(x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(x), chunk):
            pixels = reward.transform(x[i : i + chunk]).to(reward.dtype)
            out.append(image_embeddings(reward.model.vision_model, reward.model.visual_projection, pixels))
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def texts(prompts: list[str], chunk: int = 512) -> torch.Tensor:
        out = [
            text_embeddings(reward.model, reward.tokenizer, prompts[i : i + chunk], reward.max_length)
            for i in range(0, len(prompts), chunk)
        ]
        return F.normalize(torch.cat(out).float(), dim=-1)

    return images, texts


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):  # average ranks of ties
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def evaluate_toy_clip(
    model_dir: str | Path,
    n_images: int = 1024,
    n_prompts: int = 256,
    seed: int = 1,
    retrieval_batch: int = 32,
    log: LogFn | None = print,
) -> dict[str, Any]:
    """Held-out accuracy of a toy CLIP directory, loaded with ``load_reward("clipscore", model=model_dir)``.

    * ``hard_negatives``: on ``n_images`` eval-split scenes (``generate_dataset(n_images, seed, split="eval")``),
      per corruption kind: ``pairwise``, the fraction of (image, corrupted prompt) pairs, over every corruption
      of that kind (:func:`corruptions`), where the true prompt scores higher; ``all``, the fraction of images
      whose true prompt beats every corruption of that kind; ``n``, the images that have that kind. ``swap``
      is the ``relation`` kind with only the opposite relation (the two objects swapped); ``any`` the images
      whose true prompt beats all their corruptions.
    * ``retrieval``: top-1 image-to-text and text-to-image accuracy within consecutive batches of
      ``retrieval_batch`` of those scenes (a prompt text repeated in a batch counts as correct).
    * ``verifier``: for ``n_prompts`` distinct held-out prompts (``make_prompt_sets(0, n_prompts, seed)``), a
      correct render and, per corruption kind, a near miss (:func:`corrupt_scene`, a render of a corrupted
      description); both scored with the clipscore reward and ``shapes_verifier`` against the held-out prompt.
      ``clip_prefers_correct`` per kind and overall; ``agreement``: among pairs the verifier ranks (partial credit
      differs), how often clipscore ranks them the same way; the verifier's strict accuracy on the correct and
      near-miss renders; Pearson and Spearman correlation of clipscore and verifier partial credit over all
      renders, and ``within_prompt_spearman`` (the mean over prompts of the rank correlation between the two
      across that prompt's renders).
    """
    from diffrl.rewards import load_reward

    say = log or (lambda _msg: None)
    reward = load_reward("clipscore", model=str(model_dir)).load("cpu")
    embed_images, embed_texts = _embedder(reward)
    out: dict[str, Any] = {"model_dir": str(model_dir), "n_images": n_images, "seed": seed}

    # --- hard negatives on held-out scenes
    data = S.generate_dataset(n_images, seed=seed, split="eval")
    img = embed_images(data["images"])
    per_image: list[dict[str, list[str]]] = []
    all_prompts: list[str] = list(data["prompts"])
    for desc in data["scenes"]:
        entry = {k: [S.prompt_for(d) for d in corruptions(desc, k)] for k in CORRUPTION_KINDS}
        entry["swap"] = [S.prompt_for(d) for d in corruptions(desc, "swap")]
        per_image.append(entry)
        all_prompts += [p for v in entry.values() for p in v]
    unique = list(dict.fromkeys(all_prompts))
    txt = embed_texts(unique)
    where = {p: i for i, p in enumerate(unique)}

    def cos(i: int, prompts: list[str]) -> torch.Tensor:
        return txt[[where[p] for p in prompts]] @ img[i]

    kinds = [*CORRUPTION_KINDS, "swap"]
    pair_hits: dict[str, list[float]] = {k: [] for k in kinds}
    all_hits: dict[str, list[float]] = {k: [] for k in kinds}
    any_hits, by_category = [], {}
    for i, entry in enumerate(per_image):
        true = cos(i, [data["prompts"][i]])[0]
        beat_all = True
        for kind in kinds:
            if not entry.get(kind):
                continue
            wins = (true > cos(i, entry[kind])).float()
            pair_hits[kind] += wins.tolist()
            all_hits[kind].append(float(wins.min()))
            if kind != "swap":
                beat_all &= bool(wins.min() > 0)
        any_hits.append(float(beat_all))
        by_category.setdefault(data["scenes"][i]["category"], []).append(float(beat_all))
    out["hard_negatives"] = {
        k: {
            "pairwise": float(np.mean(pair_hits[k])),
            "all": float(np.mean(all_hits[k])),
            "n": len(all_hits[k]),
        }
        for k in kinds
        if all_hits[k]
    }
    out["hard_negatives"]["any"] = {"all": float(np.mean(any_hits)), "n": len(any_hits)}
    out["hard_negatives_by_category"] = {c: float(np.mean(v)) for c, v in sorted(by_category.items())}

    # --- retrieval in batches
    i2t, t2i = [], []
    prompts = data["prompts"]
    own = txt[[where[p] for p in prompts]]
    for s in range(0, n_images - retrieval_batch + 1, retrieval_batch):
        sims = img[s : s + retrieval_batch] @ own[s : s + retrieval_batch].T
        names = prompts[s : s + retrieval_batch]
        i2t += [float(names[int(j)] == names[r]) for r, j in enumerate(sims.argmax(1))]
        t2i += [float(names[int(j)] == names[r]) for r, j in enumerate(sims.argmax(0))]
    out["retrieval"] = {
        "batch": retrieval_batch,
        "image_to_text": float(np.mean(i2t)),
        "text_to_image": float(np.mean(t2i)),
    }

    # --- agreement with the verifier: correct renders vs near misses, scored against the held-out prompt
    from diffrl.toy.rewards import ShapesVerifier

    verifier = ShapesVerifier()
    rng = np.random.default_rng(seed)
    _, eval_set = S.make_prompt_sets(0, n_prompts, seed=seed)
    images, prompts_v, scenes_v, kind_of, owner = [], [], [], [], []
    for pi, item in enumerate(eval_set):
        desc = S.normalize_description(item["scene"])
        objs = [o.to_dict() for o in S.layout(desc, rng)]
        images.append(S.render(objs))
        kind_of.append("correct")
        owner.append(pi)
        for kind in _ALL_KINDS:
            near = corrupt_scene(desc, objs, kind, rng)
            if near is not None:
                images.append(S.render(near[1]))
                kind_of.append(kind)
                owner.append(pi)
        prompts_v += [item["prompt"]] * (len(images) - len(prompts_v))
        scenes_v += [desc] * (len(images) - len(scenes_v))
    batch_images = torch.stack(images)
    with torch.no_grad():
        clip_scores = reward(batch_images, prompts_v).numpy()
    partial, strict = (t.numpy() for t in verifier.verify(batch_images, scenes_v))
    kind_arr, owner_arr = np.array(kind_of), np.array(owner)
    correct_idx = {int(owner_arr[i]): i for i in np.flatnonzero(kind_arr == "correct")}
    prefers: dict[str, list[float]] = {}
    agree = []
    for i in np.flatnonzero(kind_arr != "correct"):
        c = correct_idx[int(owner_arr[i])]
        prefers.setdefault(str(kind_arr[i]), []).append(float(clip_scores[c] > clip_scores[i]))
        if partial[c] != partial[i]:
            agree.append(float((clip_scores[c] > clip_scores[i]) == (partial[c] > partial[i])))
    within = []
    for pi in range(len(eval_set)):
        sel = owner_arr == pi
        if sel.sum() > 2 and partial[sel].std() > 0:
            within.append(_corr(_rank(clip_scores[sel]), _rank(partial[sel])))
    is_correct = kind_arr == "correct"
    out["verifier"] = {
        "n_prompts": len(eval_set),
        "n_near_misses": int((~is_correct).sum()),
        "clip_prefers_correct": {k: float(np.mean(v)) for k, v in prefers.items()},
        "clip_prefers_correct_overall": float(np.mean([x for v in prefers.values() for x in v])),
        "agreement": float(np.mean(agree)) if agree else float("nan"),
        "verifier_strict_correct": float(strict[is_correct].mean()),
        "verifier_strict_near_miss": float(strict[~is_correct].mean()),
        "verifier_partial_correct": float(partial[is_correct].mean()),
        "verifier_partial_near_miss": float(partial[~is_correct].mean()),
        "clip_mean_correct": float(clip_scores[is_correct].mean()),
        "clip_mean_near_miss": float(clip_scores[~is_correct].mean()),
        "pearson": _corr(clip_scores, partial),
        "spearman": _corr(_rank(clip_scores), _rank(partial)),
        "within_prompt_spearman": float(np.nanmean(within)) if within else float("nan"),
    }
    hn = out["hard_negatives"]
    say(
        "held-out hard negatives (all / pairwise): "
        + ", ".join(f"{k} {v['all']:.3f}/{v['pairwise']:.3f}" for k, v in hn.items() if k != "any")
        + f"; all kinds at once {hn['any']['all']:.3f}"
    )
    say(
        f"retrieval@{retrieval_batch}: i2t {out['retrieval']['image_to_text']:.3f} t2i {out['retrieval']['text_to_image']:.3f}"
    )
    v = out["verifier"]
    say(
        f"verifier: clip prefers correct {v['clip_prefers_correct_overall']:.3f} "
        f"({', '.join(f'{k} {x:.3f}' for k, x in v['clip_prefers_correct'].items())}); agreement {v['agreement']:.3f}; "
        f"spearman {v['spearman']:.3f}, within-prompt {v['within_prompt_spearman']:.3f}"
    )
    return out
