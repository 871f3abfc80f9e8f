"""Sampling and evaluation of a base model plus optional trained weights: the library behind ``diffrl sample`` and
``diffrl eval`` (:mod:`diffrl.cli.sample`), which call :func:`run_sample` and :func:`run_eval`.

Python API::

    from diffrl.sampling import load_for_sampling, sample_images, evaluate_model

    model = load_for_sampling("stabilityai/stable-diffusion-3.5-medium", lora="runs/pickscore/lora", dtype="bf16")
    images = sample_images(model, ["a red circle", "a cat"], num_steps=40, height=512, width=512)  # (2, 3, H, W)
    result = evaluate_model(model, "prompts.txt", {"pickscore": 1.0, "aesthetic": 0.5})
    result["means"]  # {"pickscore": ..., "aesthetic": ...}; result["images"][i]["scores"] per image

Every image is sampled with diffrl's ODE rollout (the one evaluation uses during training) from its own initial
noise, drawn from a seed derived from ``(seed, prompt index, image index)`` alone (:func:`image_seed`). An image
therefore never depends on the batch it is sampled in, nor on how many prompts or images come after it; batched
matrix products of different batch sizes only change the last bits of the floats.

``lora`` takes a diffusers LoRA, a run directory or a training checkpoint ``<run>/checkpoint-N``; see
:mod:`diffrl.models.lora_files`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import PromptSet, check_reward_metadata, load_prompts
from .models.lora_files import LoraSource, load_lora, resolve_lora
from .utils import SHIPPED_PIPELINES, resolve_dtype

__all__ = [
    "SampleInfo",
    "image_seed",
    "sample_plan",
    "check_sampling_options",
    "resolve_prompts",
    "sampling_defaults",
    "resolve_device",
    "load_for_sampling",
    "iter_samples",
    "sample_images",
    "build_reward",
    "evaluate_images",
    "evaluate_model",
    "SampleWriter",
    "to_uint8",
    "prepare_out_dir",
    "run_sample",
    "run_eval",
]

_PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")
GRID_MAX = 64


# ---------------------------------------------------------------------------------------------- seeds and plans


@dataclass(frozen=True)
class SampleInfo:
    """One image to sample: its place in the output, its prompt and the seed of its initial noise."""

    index: int  # position in the output (prompt-major: prompt 0's images first)
    prompt_index: int  # which prompt of the list
    image_index: int  # which image of that prompt (0 .. images_per_prompt - 1)
    prompt: str
    seed: int  # torch.Generator().manual_seed(seed) draws this image's initial noise


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The 63-bit noise seed of image ``image_index`` of prompt ``prompt_index`` for the run seed ``seed``."""
    seq = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(prompt_index), int(image_index), 0x5A3D])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_plan(prompts: Sequence[str], images_per_prompt: int = 1, seed: int = 0) -> list[SampleInfo]:
    """Every image to sample for ``prompts``, prompt-major, with its seed."""
    plan = []
    for p, prompt in enumerate(prompts):
        for j in range(images_per_prompt):
            plan.append(SampleInfo(len(plan), p, j, prompt, image_seed(seed, p, j)))
    return plan


def check_sampling_options(
    *,
    num_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    seed: int,
    images_per_prompt: int,
    batch_size: int,
) -> None:
    """Checks that need no model (the model checks the image size against its own patch size)."""
    for name, value in (
        ("num_steps", num_steps),
        ("images_per_prompt", images_per_prompt),
        ("batch_size", batch_size),
        ("height", height),
        ("width", width),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer.")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number.")


# ---------------------------------------------------------------------------------------------- inputs


def _looks_like_path(item: str) -> bool:
    return item.endswith(_PROMPT_FILE_SUFFIXES) or (os.sep in item and not any(c.isspace() for c in item))


def resolve_prompts(
    items: str | Sequence[str] | PromptSet, *, allow_text: bool = True, prompt_key: str = "prompt"
):
    """A :class:`PromptSet` from prompt files (.txt, .jsonl), ``hf:<dataset>`` sources and, with ``allow_text``,
    literal prompts; a missing file (a word ending in .txt/.jsonl or a path) is an error, not a prompt."""
    if isinstance(items, PromptSet):
        return items
    if isinstance(items, str):
        items = [items]
    items = list(items)
    if not items:
        raise ValueError("no prompts given; pass a prompt file or prompt texts.")
    prompts: list[str] = []
    metadata: list[dict] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"prompt {item!r} is empty; pass a prompt file or a non-empty text.")
        if item.startswith("hf:") or Path(item).is_file() or not allow_text or _looks_like_path(item):
            part = load_prompts(item, prompt_key)
            prompts.extend(part.prompts)
            metadata.extend(part.metadata)
        else:
            prompts.append(item)
            metadata.append({})
    return PromptSet(prompts, metadata)


def _prompt_set(prompts) -> PromptSet:
    if isinstance(prompts, PromptSet):
        out = prompts
    elif isinstance(prompts, str):
        out = PromptSet([prompts])
    else:
        out = PromptSet(list(prompts))
    if not len(out) or not all(isinstance(p, str) for p in out.prompts):
        raise ValueError(f"prompts={out.prompts!r} must be a non-empty list of strings.")
    return out


def sampling_defaults(spec: str, model) -> tuple[int, float]:
    """``(num_steps, guidance_scale)`` a model samples with unless told otherwise: the toy model's presets (8 steps,
    no CFG: ``configs/toy``), else the adapter's ``default_num_steps``/``default_guidance_scale`` (FLUX.1's
    pipeline defaults 28 steps with guidance embedding 3.5; for SD3/SD3.5 40 steps with CFG 4.5, the Flow-GRPO
    evaluation setting the SD3.5 presets use; Qwen-Image's pipeline defaults 50 steps with true CFG 4)."""
    directory = Path(getattr(model.pipe, "name_or_path", "") or "")
    if str(spec) in SHIPPED_PIPELINES or (directory / "toy_model.json").is_file():
        return 8, 1.0
    return int(model.default_num_steps), float(model.default_guidance_scale)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if out.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use --device cpu or auto.")
    return out


def load_for_sampling(
    model: str | Path,
    lora: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
):
    """Load a base model (hub id, local pipeline dir or ``tiny:sd3``/``tiny:flux``) and the optional ``lora``."""
    from .models import load_model

    source = resolve_lora(lora) if lora is not None else None
    loaded = load_model(model, dtype=resolve_dtype(dtype), device=resolve_device(device))
    if source is not None:
        load_lora(loaded, source)
    return loaded


# ---------------------------------------------------------------------------------------------- sampling


def iter_samples(
    model,
    prompts: str | Sequence[str] | PromptSet,
    *,
    num_steps: int = 40,
    guidance_scale: float = 4.5,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 4,
    progress: bool = False,
) -> Iterator[tuple[list[SampleInfo], torch.Tensor]]:
    """Sample batch by batch: yields ``(infos, images)`` with images ``(b, 3, H, W)`` (a video model's videos
    ``(b, F, 3, H, W)``) in [0, 1], float32, on the model's device. Options as in :func:`sample_images`."""
    from tqdm.auto import tqdm

    from .samplers import rollout

    prompt_set = _prompt_set(prompts)
    check_sampling_options(
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        seed=seed,
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
    )
    model.latent_shape(height, width)  # the model's own size check, before any sampling
    plan = sample_plan(prompt_set.prompts, images_per_prompt, seed)
    sigmas = model.schedule(num_steps, height, width)
    with tqdm(total=len(plan), desc="sample", unit="img", disable=not progress) as bar:
        for start in range(0, len(plan), batch_size):
            infos = plan[start : start + batch_size]
            with torch.no_grad():
                rows = prompt_set.take([i.prompt_index for i in infos])
                cond = model.encode_rows(rows.prompts, rows.batch_metadata())
                noise = torch.cat(
                    [
                        model.sample_noise(1, height, width, torch.Generator().manual_seed(i.seed))
                        for i in infos
                    ]
                )
                out = rollout(model, cond, sigmas, noise, guidance_scale=guidance_scale)
                images = model.decode(out.final)
            yield infos, images
            bar.update(len(infos))


def sample_images(
    model,
    prompts: str | Sequence[str] | PromptSet,
    *,
    num_steps: int = 40,
    guidance_scale: float = 4.5,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """Images ``(len(prompts) * images_per_prompt, 3, height, width)`` in [0, 1], float32 on the CPU, prompt-major.

    Each image is an ODE rollout of ``num_steps`` Euler steps with ``guidance_scale`` (SD3: classifier-free
    guidance; FLUX.1-dev: the guidance embedding) from the noise of seed ``image_seed(seed, prompt, image)``, so
    it does not depend on ``batch_size`` (up to the last bits of batched matrix products).
    """
    chunks = [
        images.float().cpu()
        for _, images in iter_samples(
            model,
            prompts,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            seed=seed,
            images_per_prompt=images_per_prompt,
            batch_size=batch_size,
            progress=progress,
        )
    ]
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------- rewards


def _parse_reward_specs(rewards) -> list[tuple[Any, float]]:
    """``[(spec, weight)]`` from a name, ``"name=weight"``, a list of those or ``(spec, weight)`` pairs, a
    ``{spec: weight}`` map, a :class:`Reward` or a function."""
    if isinstance(rewards, Mapping):
        rewards = list(rewards.items())
    elif isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence):
        rewards = [rewards]
    out: list[tuple[Any, float]] = []
    for item in rewards:
        if isinstance(item, tuple):
            spec, weight = item
        elif isinstance(item, str) and "=" in item:
            spec, _, text = item.rpartition("=")
            try:
                weight = float(text)
            except ValueError:
                raise ValueError(
                    f"reward {item!r}: weight {text!r} is not a number; write NAME or NAME=WEIGHT."
                ) from None
        else:
            spec, weight = item, 1.0
        if isinstance(spec, str) and not spec.strip():
            raise ValueError(f"reward {item!r} has no name; write NAME or NAME=WEIGHT.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weight {weight!r} of reward {spec!r} must be a finite number.")
        out.append((spec, float(weight)))
    if not out:
        raise ValueError("no reward given; name at least one (e.g. --reward pickscore).")
    return out


def build_reward(rewards, reward_kwargs: Mapping[str, Mapping] | None = None):
    """A :class:`diffrl.rewards.CombinedReward` (raw components plus their weighted sum) from reward specs.

    ``rewards``: a registry name or ``module:attr`` (optionally ``"=WEIGHT"``), a list of those, a ``{spec:
    weight}`` map, ``(spec, weight)`` pairs, or reward objects; a :class:`CombinedReward` is returned as is.
    ``reward_kwargs``: ``{name: {option: value}}`` for the rewards' constructors. Weights load lazily.
    """
    from .rewards import CombinedReward, Reward, load_reward

    if isinstance(rewards, CombinedReward):
        if reward_kwargs:
            raise ValueError("reward_kwargs cannot be applied to an already built CombinedReward.")
        return rewards
    pairs = _parse_reward_specs(rewards)
    kwargs = dict(reward_kwargs or {})
    if not isinstance(reward_kwargs or {}, Mapping) or not all(
        isinstance(v, Mapping) for v in kwargs.values()
    ):
        raise ValueError(
            f'reward kwargs {reward_kwargs!r} must map reward names to option maps, e.g. {{"hpsv2": {{"version": "v2.1"}}}}.'
        )
    names = [s for s, _ in pairs if isinstance(s, str)]
    stray = [k for k in kwargs if k not in names]
    if stray:
        raise ValueError(f"reward kwargs name {stray[0]!r}, which is not among the rewards {names}.")
    parts = []
    for spec, weight in pairs:
        options = dict(kwargs.get(spec, {})) if isinstance(spec, str) else {}
        try:
            reward = load_reward(spec, **options)
        except AttributeError as err:  # "module:attr" naming a missing attribute
            raise ValueError(str(err)) from None
        except TypeError as err:
            if isinstance(spec, Reward) or not options:
                raise
            raise ValueError(
                f"reward {spec!r} does not take the options {sorted(options)} ({err})."
            ) from None
        parts.append((reward, weight))
    if len(parts) == 1 and parts[0][1] == 1.0:
        return CombinedReward(parts, name=parts[0][0].name)
    return CombinedReward(parts)


def _summary(components: dict[str, torch.Tensor], total: torch.Tensor, reward) -> dict[str, Any]:
    def stats(values: torch.Tensor) -> tuple[float, float]:
        values = values.double()
        std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
        return float(values.mean()), std

    means, stds = {}, {}
    for name, values in components.items():
        means[name], stds[name] = stats(values)
    total_mean, total_std = stats(total)
    return {
        "reward": reward.name,
        "weights": {r.name: w for r, w in reward.parts},
        "means": means,
        "stds": stds,
        "total_mean": total_mean,
        "total_std": total_std,
        "num_images": int(total.numel()),
    }


def _image_records(
    components: dict[str, torch.Tensor], total: torch.Tensor, prompts: Sequence[str]
) -> list[dict]:
    comps = {k: v.double().tolist() for k, v in components.items()}
    totals = total.double().tolist()
    return [
        {"index": i, "prompt": prompts[i], "scores": {k: v[i] for k, v in comps.items()}, "total": totals[i]}
        for i in range(len(totals))
    ]


def evaluate_images(
    images: torch.Tensor,
    prompts: Sequence[str],
    rewards,
    *,
    reward_kwargs: Mapping[str, Mapping] | None = None,
    metadata: Mapping[str, Sequence] | None = None,
) -> dict[str, Any]:
    """Score ``images`` ``(N, 3, H, W)`` in [0, 1] with ``rewards`` (see :func:`build_reward`).

    Returns ``{"means": {name: mean}, "stds": ..., "total_mean", "total_std", "weights", "reward", "num_images",
    "images": [{"index", "prompt", "scores": {name: score}, "total"}]}``; the means are of each reward's raw score,
    ``total`` is their weighted sum.
    """
    reward = build_reward(rewards, reward_kwargs)
    prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
    with torch.no_grad():
        out = reward.evaluate(images, prompts, **dict(metadata or {}))
    components = {k: v.detach().float().cpu() for k, v in out.components.items()}
    total = out.total.detach().float().cpu()
    return {**_summary(components, total, reward), "images": _image_records(components, total, prompts)}


def evaluate_model(
    model,
    prompts: str | Sequence[str] | PromptSet,
    rewards,
    *,
    reward_kwargs: Mapping[str, Mapping] | None = None,
    num_steps: int = 40,
    guidance_scale: float = 4.5,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 4,
    progress: bool = False,
    on_batch: Callable[[list[SampleInfo], torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Sample ``prompts`` as :func:`sample_images` does and score the images with ``rewards``.

    ``prompts`` may be a :class:`diffrl.data.PromptSet` (its metadata go to the rewards) or a prompt file name.
    Per-sample rewards score each batch as it comes (the images are not kept); ``on_batch(infos, images)`` sees
    every batch (e.g. to save it). Returns what :func:`evaluate_images` returns, with each image's ``prompt_index``,
    ``image_index`` and ``seed``.
    """
    if isinstance(prompts, str):
        prompts = resolve_prompts(prompts, allow_text=False)
    prompt_set = _prompt_set(prompts)
    reward = build_reward(rewards, reward_kwargs)
    for part, _ in reward.parts:  # missing reward weights fail here, before any sampling
        part.load(part.device if part.device is not None else model.device)
    meta = prompt_set.batch_metadata()
    scorer = reward
    if getattr(model, "is_video", False):  # videos: image rewards score every frame (the mean over frames)
        from .rewards import for_video

        scorer = for_video(reward)
    per_sample = getattr(reward, "per_sample", True)
    infos_all: list[SampleInfo] = []
    results, kept = [], []

    def score(infos, images):
        rows = [i.prompt_index for i in infos]
        batch_meta = {k: [v[r] for r in rows] for k, v in meta.items()}
        with torch.no_grad():
            return scorer.evaluate(images, [i.prompt for i in infos], **batch_meta)

    for infos, images in iter_samples(
        model,
        prompt_set,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        seed=seed,
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        progress=progress,
    ):
        infos_all.extend(infos)
        if on_batch is not None:
            on_batch(infos, images)
        if per_sample:
            results.append(score(infos, images))
        else:
            kept.append(images.cpu())
    if not per_sample:  # e.g. batch-normalised combinations: score everything at once
        results = [score(infos_all, torch.cat(kept).to(model.device))]
    components = {
        name: torch.cat([r.components[name].detach().float().cpu() for r in results])
        for name in results[0].components
    }
    total = torch.cat([r.total.detach().float().cpu() for r in results])
    records = _image_records(components, total, [i.prompt for i in infos_all])
    for rec, info in zip(records, infos_all, strict=True):
        rec.update(prompt_index=info.prompt_index, image_index=info.image_index, seed=info.seed)
    return {**_summary(components, total, reward), "images": records}


# ---------------------------------------------------------------------------------------------- writing


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` floats in [0, 1] -> ``(B, H, W, 3)`` uint8 on the CPU (rounded as torchvision saves)."""
    return images.detach().float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


class SampleWriter:
    """Writes each image as ``<index>.png`` with its line of ``samples.jsonl`` (file, prompt, seed, ...) as it comes;
    :meth:`close` writes ``grid.png`` (the first :data:`GRID_MAX` images; a row per prompt when it has several).

    Videos ``(b, F, 3, H, W)`` (``video=True``) are written as lossless animated WebP files ``<index>.webp`` at ``fps``
    frames per second (with PIL; no video codec needed), and ``grid.png`` shows their middle frames."""

    def __init__(
        self,
        out_dir: str | Path,
        total: int,
        images_per_prompt: int = 1,
        grid_max: int = GRID_MAX,
        *,
        video: bool = False,
        fps: int = 16,
    ):
        if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
            raise ValueError(f"fps={fps!r} must be a positive integer (Wan 2.1: 16).")
        self.video, self.fps = video, fps
        self.out_dir = Path(out_dir)
        self.digits = max(5, len(str(max(total - 1, 0))))
        self.images_per_prompt = images_per_prompt
        self.grid_limit = max(images_per_prompt, (grid_max // images_per_prompt) * images_per_prompt)
        self.rows: list[dict] = []
        self.grid: list[torch.Tensor] = []
        (self.out_dir / "samples.jsonl").write_text("")  # one line per image as it is written

    def file_name(self, index: int) -> str:
        return f"{index:0{self.digits}d}.{'webp' if self.video else 'png'}"

    def __call__(self, infos: list[SampleInfo], images: torch.Tensor) -> None:
        from PIL import Image

        if self.video != (images.ndim == 5):
            raise ValueError(
                f"this writer writes {'videos' if self.video else 'images'} but got a batch of shape "
                f"{tuple(images.shape)}; make it with video={images.ndim == 5}."
            )
        if self.video:
            frames = [to_uint8(v) for v in images]  # each (F, H, W, 3)
            pixels = [f[f.shape[0] // 2] for f in frames]  # the middle frame, for the grid
        else:
            pixels = to_uint8(images)
        rows = []
        for i, (info, img) in enumerate(zip(infos, pixels, strict=True)):
            name = self.file_name(info.index)
            if self.video:
                first, *rest = [Image.fromarray(f.numpy()) for f in frames[i]]
                first.save(
                    self.out_dir / name,
                    save_all=True,
                    append_images=rest,
                    duration=round(1000 / self.fps),
                    loop=0,
                    lossless=True,
                )
            else:
                Image.fromarray(img.numpy()).save(self.out_dir / name)
            rows.append({"file": name, **asdict(info)})
            if len(self.grid) < self.grid_limit:
                self.grid.append(img)
        with open(self.out_dir / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self.rows.extend(rows)

    def close(self) -> None:
        from PIL import Image
        from torchvision.utils import make_grid

        if self.grid:
            nrow = (
                self.images_per_prompt if self.images_per_prompt > 1 else math.ceil(math.sqrt(len(self.grid)))
            )
            grid = make_grid(torch.stack(self.grid).permute(0, 3, 1, 2), nrow=nrow, padding=2)
            Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(self.out_dir / "grid.png")


def prepare_out_dir(out: str | Path) -> Path:
    """Create the output directory ``out`` and check that it is writable (messages name ``--out``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory for the images.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"--out {out} is not writable ({err.strerror}); choose another directory."
        ) from None
    return out


# ---------------------------------------------------------------------------------------------- the commands


def log_line(message: str) -> None:
    """``[diffrl] message`` on stderr: the progress lines of :func:`run_sample` and :func:`run_eval`."""
    print(f"[diffrl] {message}", file=sys.stderr, flush=True)


def _prepare(options: dict[str, Any], dtype, device, prompts, prompt_key: str, lora):
    """Everything that needs no model, checked before it loads: ``(dtype, device, prompts, LoRA source)``."""
    check_sampling_options(  # the model's defaults are not known yet: placeholders that pass
        **{
            **{k: v for k, v in options.items() if k != "num_frames"},
            "height": options["height"] or 8,
            "width": options["width"] or 8,
            "num_steps": 1 if options["num_steps"] is None else options["num_steps"],
            "guidance_scale": 1.0 if options["guidance_scale"] is None else options["guidance_scale"],
        }
    )
    if options.get("num_frames") is not None:
        from .models.wan import check_num_frames

        check_num_frames(options["num_frames"])
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    prompt_set = resolve_prompts(prompts, allow_text=True, prompt_key=prompt_key)
    source = resolve_lora(lora) if lora else None
    return dtype, device, prompt_set, source


def _load(spec: str, dtype, device, source: LoraSource | None, options: dict[str, Any], log):
    """The model with its LoRA, and the options with the model's defaults filled in (size, steps, guidance)."""
    from .models import load_model

    t0 = time.perf_counter()
    model = load_model(spec, dtype=dtype, device=device)
    frames = options.pop("num_frames", None)
    if frames is not None:
        if not getattr(model, "is_video", False):
            raise ValueError(
                f"--num-frames {frames} is for video models, but {spec} makes images; leave it out."
            )
        model.num_frames = frames
    steps, guidance = sampling_defaults(spec, model)
    options = {
        **options,
        "num_steps": steps if options["num_steps"] is None else options["num_steps"],
        "guidance_scale": guidance if options["guidance_scale"] is None else options["guidance_scale"],
        "height": options["height"] or model.native_size,
        "width": options["width"] or model.native_size,
    }
    model.latent_shape(options["height"], options["width"])  # the model's own size check
    log(
        f"loaded {spec} ({model.family}, {str(dtype).removeprefix('torch.')}, {device}) in "
        f"{time.perf_counter() - t0:.1f}s; {'videos' if getattr(model, 'is_video', False) else 'images'} "
        f"{options['width']}x{options['height']}"
        f"{f' x {model.num_frames} frames' if getattr(model, 'is_video', False) else ''}, {options['num_steps']} "
        f"steps, guidance {options['guidance_scale']:g}"
    )
    if source is not None:
        log(f"LoRA: {load_lora(model, source)}")
    return model, options


def run_sample(
    model: str,
    prompts: str | Sequence[str] | PromptSet,
    out: str | Path,
    *,
    lora: str | Path | None = None,
    dtype: str = "float32",
    device: str = "auto",
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 4,
    prompt_key: str = "prompt",
    progress: bool = True,
    log: Callable[[str], None] = log_line,
    num_frames: int | None = None,
    fps: int = 16,
) -> Path:
    """``diffrl sample``: load ``model`` (and ``lora``), sample ``prompts`` (files, ``hf:`` sources or texts) and
    write each image, ``samples.jsonl`` and ``grid.png`` into ``out`` (:class:`SampleWriter`); returns ``out``.

    Options left None take the model's defaults (:func:`sampling_defaults`, its native size). Every input is
    checked before the model loads. A video model (Wan) makes ``num_frames``-frame videos (default: the model's),
    written as animated WebP files at ``fps``.
    """
    options = {
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "seed": seed,
        "images_per_prompt": images_per_prompt,
        "batch_size": batch_size,
        "num_frames": num_frames,
    }
    dtype, device, prompt_set, source = _prepare(options, dtype, device, prompts, prompt_key, lora)
    out = prepare_out_dir(out)
    loaded, options = _load(model, dtype, device, source, options, log)
    n = len(prompt_set) * images_per_prompt
    writer = SampleWriter(out, n, images_per_prompt, video=getattr(loaded, "is_video", False), fps=fps)
    t0 = time.perf_counter()
    for infos, images in iter_samples(loaded, prompt_set, progress=progress, **options):
        writer(infos, images)
    writer.close()
    kind = "video" if writer.video else "image"
    log(f"{n} {kind}{'s' * (n != 1)} in {time.perf_counter() - t0:.1f}s -> {out}")
    return out


def _check_offline_weights(rewards, reward_kwargs: Mapping[str, Mapping]) -> None:
    """With ``HF_HUB_OFFLINE=1``, a reward whose weights are not in the cache fails here, before the model loads."""
    from .doctor.rewards import reward_status

    for spec, _ in _parse_reward_specs(rewards):
        if isinstance(spec, str):
            finding = reward_status(spec, dict(reward_kwargs.get(spec, {})), spec).finding
            if finding.status == "FAIL":
                raise ValueError(
                    f"reward {spec}: {finding.message}; run `diffrl download {spec}` where there is network "
                    "(into the same cache), or pass a local path with --reward-kwargs."
                )


def _given(prompts) -> list[str]:
    """The prompts as given (files, sources or texts) for ``eval.json``."""
    if isinstance(prompts, str):
        return [prompts]
    return list(prompts.prompts if isinstance(prompts, PromptSet) else prompts)


def _result_lines(result: dict[str, Any]) -> list[str]:
    """Each reward's mean and std (and the weighted total when there is one), one line each."""
    width = max(len(k) for k in [*result["means"], "total"])
    lines = [
        f"{name:<{width}}  mean {mean:.6g}  std {result['stds'][name]:.6g}  (n={result['num_images']})"
        for name, mean in result["means"].items()
    ]
    weights = result["weights"]
    if len(weights) > 1 or any(w != 1.0 for w in weights.values()):
        parts = " + ".join(f"{w:g}*{k}" for k, w in weights.items())
        lines.append(
            f"{'total':<{width}}  mean {result['total_mean']:.6g}  std {result['total_std']:.6g}  ({parts})"
        )
    return lines


def run_eval(
    model: str,
    prompts: str | Sequence[str] | PromptSet,
    rewards,
    *,
    reward_kwargs: Mapping[str, Mapping] | None = None,
    out: str | Path | None = None,
    lora: str | Path | None = None,
    dtype: str = "float32",
    device: str = "auto",
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 4,
    prompt_key: str = "prompt",
    progress: bool = True,
    log: Callable[[str], None] = log_line,
    report: Callable[[str], None] = print,
    num_frames: int | None = None,
    fps: int = 16,
) -> dict[str, Any]:
    """``diffrl eval``: sample ``prompts`` as :func:`run_sample` does and score the images with ``rewards`` (see
    :func:`build_reward`); ``report`` gets each reward's mean, one line each. With ``out``, the images,
    ``samples.jsonl``, ``grid.png`` and ``eval.json`` (the settings, the means and every image's scores) are
    written there. Returns what :func:`evaluate_model` returns. A video model's image rewards score every frame
    (the mean over frames)."""
    options = {
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "seed": seed,
        "images_per_prompt": images_per_prompt,
        "batch_size": batch_size,
        "num_frames": num_frames,
    }
    dtype, device, prompt_set, source = _prepare(options, dtype, device, prompts, prompt_key, lora)
    reward_kwargs = dict(reward_kwargs or {})
    reward = build_reward(rewards, reward_kwargs)
    # before the model loads: the metadata the rewards need, named by the prompt file when there is one
    given = [prompts] if isinstance(prompts, str) else [] if isinstance(prompts, PromptSet) else list(prompts)
    named = len(given) == 1 and (given[0].startswith("hf:") or Path(given[0]).is_file())
    check_reward_metadata(reward, prompt_set, given[0] if named else "the prompt list")
    if (
        os.environ.get("HF_HUB_OFFLINE") == "1"
    ):  # weights missing from the cache: say so before the model loads
        _check_offline_weights(rewards, reward_kwargs)
    out = prepare_out_dir(out) if out else None
    loaded, options = _load(model, dtype, device, source, options, log)
    n = len(prompt_set) * images_per_prompt
    video = getattr(loaded, "is_video", False)
    writer = SampleWriter(out, n, images_per_prompt, video=video, fps=fps) if out is not None else None
    t0 = time.perf_counter()
    result = evaluate_model(loaded, prompt_set, reward, progress=progress, on_batch=writer, **options)
    kind = "video" if video else "image"
    log(f"{n} {kind}{'s' * (n != 1)} sampled and scored in {time.perf_counter() - t0:.1f}s")
    for line in _result_lines(result):
        report(line)
    if writer is not None:
        writer.close()
        for rec in result["images"]:
            rec["file"] = writer.file_name(rec["index"])
        settings = {
            "model": model,
            "lora": lora if lora is None else str(lora),
            "prompts": _given(prompts),
            "dtype": str(dtype).removeprefix("torch."),
            "rewards": rewards,
            "reward_kwargs": reward_kwargs,
            **options,
            **({"num_frames": loaded.num_frames, "fps": fps} if video else {}),
        }
        (out / "eval.json").write_text(json.dumps({"settings": settings, **result}, indent=2, default=str))
        log(f"wrote {out / 'eval.json'}")
    return result
