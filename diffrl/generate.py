"""Sampling and evaluation of a base model plus an optional trained LoRA: ``diffrl sample`` and ``diffrl eval``.

Python API (the commands are thin wrappers)::

    from diffrl.generate import load_for_sampling, sample_images, evaluate_model

    model = load_for_sampling("stabilityai/stable-diffusion-3.5-medium", lora="runs/pickscore/lora", dtype="bf16")
    images = sample_images(model, ["a red circle", "a cat"], num_steps=40, height=512, width=512)  # (2, 3, H, W)
    result = evaluate_model(model, "prompts.txt", {"pickscore": 1.0, "aesthetic": 0.5})
    result["means"]  # {"pickscore": ..., "aesthetic": ...}; result["images"][i]["scores"] per image

Every image is sampled with diffrl's ODE rollout (the one evaluation uses during training) from its own initial
noise, drawn from a seed derived from ``(seed, prompt index, image index)`` alone (:func:`image_seed`). An image
therefore never depends on the batch it is sampled in, nor on how many prompts or images come after it; batched
matrix products of different batch sizes only change the last bits of the floats.

``--lora`` takes a diffusers LoRA (a directory holding ``pytorch_lora_weights.safetensors``, e.g. a run's
``<run>/lora``, or the ``.safetensors`` file itself), loaded with the pipeline's own ``load_lora_weights``; a run
directory (its ``lora`` folder is used); or a training checkpoint ``<run>/checkpoint-N``: the adapter is rebuilt
from the rank, alpha and targets in the checkpoint's ``state.json`` and filled with the checkpoint's weights (the
EMA weights when the run kept them, as the run's own evaluation and final LoRA use). A checkpoint of a full
fine-tuning run loads its transformer weights the same way.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import PromptSet, load_prompts
from .utils import resolve_dtype

__all__ = [
    "SampleInfo",
    "LoraSource",
    "image_seed",
    "sample_plan",
    "check_sampling_options",
    "resolve_prompts",
    "resolve_device",
    "resolve_lora",
    "load_lora",
    "load_for_sampling",
    "iter_samples",
    "sample_images",
    "build_reward",
    "evaluate_images",
    "evaluate_model",
    "SampleWriter",
    "to_uint8",
    "add_parsers",
    "run_command",
]

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
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
    no CFG: ``configs/toy``), FLUX.1's pipeline defaults (28 steps, guidance embedding 3.5) and, for SD3/SD3.5,
    40 steps with CFG 4.5 (the Flow-GRPO evaluation setting the SD3.5 presets use)."""
    directory = Path(getattr(model.pipe, "name_or_path", "") or "")
    if str(spec) == "toy" or (directory / "toy_model.json").is_file():
        return 8, 1.0
    if model.family == "flux":
        return 28, 3.5
    return 40, 4.5


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


# ---------------------------------------------------------------------------------------------- LoRA


@dataclass
class LoraSource:
    """Where trained weights come from: a diffusers LoRA file or a diffrl training checkpoint."""

    kind: str  # "diffusers" or "checkpoint"
    path: Path  # the weights file
    given: str  # what the user passed
    state: dict | None = None  # a checkpoint's state.json

    def describe(self) -> str:
        if self.kind == "diffusers":
            return f"diffusers LoRA {self.path}"
        step = (self.state or {}).get("step", "?")
        return f"training checkpoint {self.path.parent} (step {step}, weights {self.path.name})"


def _lora_file_in(directory: Path) -> Path | None:
    for name in LORA_WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    if len(found) > 1:
        raise ValueError(
            f"LoRA dir {directory} holds several .safetensors files ({', '.join(f.name for f in found[:3])}); "
            "pass the one to load as a file path."
        )
    return found[0] if found else None


def resolve_lora(path: str | Path, *, use_ema: bool = True) -> LoraSource:
    """Find the weights behind ``--lora`` (file checks only, no model): see the module docstring for the forms."""
    given = str(path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA {given} does not exist; pass a LoRA dir such as <run>/lora.")
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin"):
            raise ValueError(
                f"LoRA file {given} is not a .safetensors or .bin file; pass the LoRA's weights."
            )
        return LoraSource("diffusers", path, given)
    if (path / "trainable.safetensors").is_file():
        state_file = path / "state.json"
        if not state_file.is_file():
            raise FileNotFoundError(
                f"checkpoint {given} has no state.json, so its adapter cannot be rebuilt; pass <run>/lora instead."
            )
        state = json.loads(state_file.read_text())
        weights = path / "ema.safetensors" if use_ema and (path / "ema.safetensors").is_file() else None
        return LoraSource("checkpoint", weights or path / "trainable.safetensors", given, state)
    found = _lora_file_in(path)
    if found is not None:
        return LoraSource("diffusers", found, given)
    if (path / "lora").is_dir() and _lora_file_in(path / "lora") is not None:
        return resolve_lora(path / "lora", use_ema=use_ema)
    if (path / "pipeline" / "model_index.json").is_file():
        raise ValueError(
            f"{given} is a full fine-tuning run; pass {path / 'pipeline'} as the model instead of a LoRA."
        )
    checkpoints = sorted(path.glob("checkpoint-*"))
    hint = f" or a checkpoint such as {checkpoints[-1]}" if checkpoints else ""
    raise FileNotFoundError(
        f"LoRA dir {given} holds no LoRA weights (pytorch_lora_weights.safetensors); pass a diffusers LoRA dir "
        f"such as <run>/lora{hint}."
    )


def _load_diffusers_lora(model, source: LoraSource) -> str:
    from diffusers.utils import logging as diffusers_logging
    from safetensors import safe_open

    transformer = model.transformer
    existing = set(getattr(transformer, "peft_config", {}) or {})
    adapter = next(f"lora_{k}" for k in range(len(existing) + 1) if f"lora_{k}" not in existing)
    before = {n for n, _ in transformer.named_parameters()}
    verbosity = diffusers_logging.get_verbosity()
    # diffusers logs "no LoRA keys for the text encoders" (expected) and, on failure, the error we raise below
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # diffrl's LoRAs carry exclude_modules in their metadata; PEFT warns when nothing matched it on loading
            warnings.filterwarnings("ignore", message=".*exclude_modules.*", category=UserWarning)
            model.pipe.load_lora_weights(
                str(source.path.parent), weight_name=source.path.name, adapter_name=adapter
            )
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [
            type(err).__name__
        ]
        detail = (
            lines[1] if len(lines) > 1 else lines[0]
        )  # torch's first line only says "Error(s) in loading"
        raise ValueError(
            f"LoRA {source.given} does not fit this {model.family} model ({detail.rstrip('.:')}); "
            "pass the base model it was trained from."
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    added = [n for n, _ in transformer.named_parameters() if n not in before and f".{adapter}." in n]
    if not added:
        raise ValueError(f"LoRA {source.given} holds no weights for this {model.family} model's transformer.")
    if source.path.suffix == ".safetensors":
        with safe_open(str(source.path), "pt") as f:
            keys = [k for k in f.keys() if k.startswith("transformer.") and ".lora_" in k]
        if keys and len(added) < len(keys):
            raise ValueError(
                f"LoRA {source.given} has {len(keys) - len(added)} of {len(keys)} transformer weights that match no "
                f"module of this {model.family} model; it was trained for another model."
            )
    return f"{source.describe()} as adapter {adapter!r} ({len(added)} tensors)"


def _load_checkpoint(model, source: LoraSource) -> str:
    from safetensors.torch import load_file

    weights = load_file(str(source.path))
    mcfg = ((source.state or {}).get("config") or {}).get("model") or {}
    rank = int(mcfg.get("lora_rank", -1))
    if rank != 0:
        alpha = float(mcfg.get("lora_alpha", -1))
        try:
            # the adapter's random init is overwritten below; leave the global RNG alone
            with torch.random.fork_rng(devices=[]):
                model.add_lora(
                    rank=None if rank < 0 else rank,
                    alpha=None if alpha < 0 else alpha,
                    target_modules=mcfg.get("lora_targets") or None,
                )
        except ValueError as err:
            raise ValueError(f"cannot rebuild the adapter of checkpoint {source.given}: {err}") from None
        params = {n: p for n, p in model.transformer.named_parameters() if p.requires_grad}
    else:
        params = dict(model.transformer.named_parameters())
    missing = [n for n in params if n not in weights]
    unknown = [n for n in weights if n not in params]
    if (rank != 0 and missing) or unknown:
        example = (missing or unknown)[0]
        raise ValueError(
            f"checkpoint {source.given} does not match this {model.family} model ({len(missing)} tensors missing, "
            f"{len(unknown)} unknown, e.g. {example}); pass the model it was trained from."
        )
    for n, w in weights.items():
        if tuple(w.shape) != tuple(params[n].shape):
            raise ValueError(
                f"checkpoint {source.given} does not match this {model.family} model ({n} has shape "
                f"{tuple(w.shape)}, the model {tuple(params[n].shape)}); pass the model it was trained from."
            )
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(device=params[n].device, dtype=params[n].dtype))
    for p in params.values():
        p.requires_grad_(False)
    trained_from = mcfg.get("path")
    what = "LoRA" if rank != 0 else "fully fine-tuned transformer"
    return f"{source.describe()}: {what}, {len(weights)} tensors" + (
        f", trained from {trained_from}" if trained_from else ""
    )


def load_lora(model, lora: str | Path | LoraSource) -> str:
    """Load trained weights into ``model`` (a :class:`diffrl.models.FlowModel`); returns a one-line description."""
    source = lora if isinstance(lora, LoraSource) else resolve_lora(lora)
    if source.kind == "checkpoint":
        return _load_checkpoint(model, source)
    return _load_diffusers_lora(model, source)


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
    """Sample batch by batch: yields ``(infos, images)`` with images ``(b, 3, H, W)`` in [0, 1], float32, on the
    model's device. Options as in :func:`sample_images`."""
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
                cond = model.encode([i.prompt for i in infos])
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
    per_sample = getattr(reward, "per_sample", True)
    infos_all: list[SampleInfo] = []
    results, kept = [], []

    def score(infos, images):
        rows = [i.prompt_index for i in infos]
        batch_meta = {k: [v[r] for r in rows] for k, v in meta.items()}
        with torch.no_grad():
            return reward.evaluate(images, [i.prompt for i in infos], **batch_meta)

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
    :meth:`close` writes ``grid.png`` (the first :data:`GRID_MAX` images; a row per prompt when it has several)."""

    def __init__(self, out_dir: str | Path, total: int, images_per_prompt: int = 1, grid_max: int = GRID_MAX):
        self.out_dir = Path(out_dir)
        self.digits = max(5, len(str(max(total - 1, 0))))
        self.images_per_prompt = images_per_prompt
        self.grid_limit = max(images_per_prompt, (grid_max // images_per_prompt) * images_per_prompt)
        self.rows: list[dict] = []
        self.grid: list[torch.Tensor] = []
        (self.out_dir / "samples.jsonl").write_text("")  # one line per image as it is written

    def file_name(self, index: int) -> str:
        return f"{index:0{self.digits}d}.png"

    def __call__(self, infos: list[SampleInfo], images: torch.Tensor) -> None:
        from PIL import Image

        pixels = to_uint8(images)
        rows = []
        for info, img in zip(infos, pixels, strict=True):
            name = self.file_name(info.index)
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


def _prepare_out_dir(out: str | Path) -> Path:
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


# ---------------------------------------------------------------------------------------------- command line


def _add_common(p) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="hub id, local diffusers pipeline dir, toy (the shipped toy model: 64x64), "
        "or tiny:sd3 / tiny:flux",
    )
    p.add_argument(
        "--lora",
        metavar="DIR",
        help="trained weights: a diffusers LoRA dir (<run>/lora) or .safetensors file, a run dir, or a training "
        "checkpoint <run>/checkpoint-N (its adapter is rebuilt from its state.json; EMA weights when kept)",
    )
    p.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="ODE (Euler) steps (default: the model's, see sampling_defaults: toy 8, SD3 40, FLUX 28)",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="CFG (SD3) or guidance-embedding (FLUX) scale (default: the model's: toy 1.0, no CFG as its presets; "
        "SD3 4.5; FLUX 3.5)",
    )
    p.add_argument(
        "--height", type=int, default=None, help="image height in pixels (default: the model's native size)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="image width in pixels (default: the model's native size)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="run seed; image j of prompt i uses a seed from (seed, i, j) (default 0)",
    )
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument(
        "--batch-size", type=int, default=4, help="images sampled at once (never changes an image)"
    )
    p.add_argument(
        "--dtype", default="float32", help="weights' dtype: float32, bf16 or fp16 (default float32)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--prompt-key", default="prompt", help="the prompt field of .jsonl prompt files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 without a GPU unless OMP_NUM_THREADS is set)",
    )


def add_parsers(sub) -> None:
    """Add the ``sample`` and ``eval`` subcommands to the ``diffrl`` command's subparsers."""
    sp = sub.add_parser(
        "sample",
        help="generate images from a model plus an optional trained LoRA",
        description="Generate images with diffrl's ODE sampler, one fixed seed per (prompt, image): PNGs named by "
        "index, samples.jsonl (file, prompt, seed) and grid.png in --out.",
    )
    _add_common(sp)
    sp.add_argument(
        "--prompts",
        nargs="+",
        required=True,
        metavar="FILE_OR_TEXT",
        help="prompt files (.txt one a line, .jsonl with a prompt field, hf:<dataset>) or prompt texts",
    )
    sp.add_argument("--out", required=True, metavar="DIR", help="output directory")
    ev = sub.add_parser(
        "eval",
        help="sample a prompt set and score it with rewards",
        description="Sample the prompt set as diffrl sample does and score it with one or more rewards; prints each "
        "reward's mean and, with --out, writes the images and eval.json (per-image scores and means).",
    )
    _add_common(ev)
    ev.add_argument(
        "--prompts",
        nargs="+",
        required=True,
        metavar="FILE_OR_TEXT",
        help="prompt files (.txt one a line, .jsonl with a prompt field and the rewards' metadata, hf:<dataset>) or "
        "prompt texts, as diffrl sample takes them",
    )
    ev.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[=WEIGHT]",
        help="a reward by registry name or package.module:attr, with an optional weight for the total; repeat it",
    )
    ev.add_argument(
        "--reward-kwargs",
        default="",
        metavar="JSON",
        help='options per reward, e.g. \'{"hpsv2": {"version": "v2.1"}}\'',
    )
    ev.add_argument(
        "--out", metavar="DIR", help="write the images, samples.jsonl, grid.png and eval.json here"
    )


def _options(args) -> dict[str, Any]:
    return {
        "num_steps": args.num_steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "images_per_prompt": args.images_per_prompt,
        "batch_size": args.batch_size,
    }


def _log(message: str) -> None:
    print(f"[diffrl] {message}", file=sys.stderr, flush=True)


def _run(args) -> int:
    from .models import load_model

    # everything that needs no model first: threads, options, prompts, LoRA files, rewards, the output directory
    from .utils import set_cpu_threads

    set_cpu_threads(args.threads)
    options = _options(args)
    check_sampling_options(
        **{
            **options,
            "height": options["height"] or 8,
            "width": options["width"] or 8,
            "num_steps": 1 if options["num_steps"] is None else options["num_steps"],
            "guidance_scale": 1.0 if options["guidance_scale"] is None else options["guidance_scale"],
        }
    )
    dtype = resolve_dtype(args.dtype)
    device = resolve_device(args.device)
    prompt_set = resolve_prompts(args.prompts, allow_text=True, prompt_key=args.prompt_key)
    source = resolve_lora(args.lora) if args.lora else None
    reward = None
    if args.command == "eval":
        try:
            kwargs = json.loads(args.reward_kwargs) if args.reward_kwargs.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(
                f"--reward-kwargs is not valid JSON ({err.msg}); pass e.g. '{{\"hpsv2\": {{}}}}'."
            ) from None
        reward = build_reward(args.reward, kwargs)
        if (
            os.environ.get("HF_HUB_OFFLINE") == "1"
        ):  # weights missing from the cache: say so before the model loads
            from .doctor.rewards import reward_status

            for spec, _ in _parse_reward_specs(args.reward):
                if isinstance(spec, str):
                    finding = reward_status(spec, dict(kwargs.get(spec, {})), spec).finding
                    if finding.status == "FAIL":
                        raise ValueError(
                            f"reward {spec}: {finding.message}; run `diffrl download {spec}` where there is network "
                            "(into the same cache), or pass a local path with --reward-kwargs."
                        )
    out = _prepare_out_dir(args.out) if args.out else None

    t0 = time.perf_counter()
    model = load_model(args.model, dtype=dtype, device=device)
    args.height = args.height or model.native_size
    args.width = args.width or model.native_size
    steps, guidance = sampling_defaults(args.model, model)
    args.num_steps = steps if args.num_steps is None else args.num_steps
    args.guidance_scale = guidance if args.guidance_scale is None else args.guidance_scale
    options = _options(args)
    model.latent_shape(args.height, args.width)  # the model's own size check
    _log(
        f"loaded {args.model} ({model.family}, {str(dtype).removeprefix('torch.')}, {device}) in "
        f"{time.perf_counter() - t0:.1f}s; images {args.width}x{args.height}, {args.num_steps} steps, guidance "
        f"{args.guidance_scale:g}"
    )
    if source is not None:
        _log(f"LoRA: {load_lora(model, source)}")
    n = len(prompt_set) * args.images_per_prompt
    writer = SampleWriter(out, n, args.images_per_prompt) if out is not None else None
    t0 = time.perf_counter()
    if reward is None:
        for infos, images in iter_samples(model, prompt_set, progress=not args.no_progress, **options):
            writer(infos, images)
        writer.close()
        _log(f"{n} image{'s' * (n != 1)} in {time.perf_counter() - t0:.1f}s -> {out}")
        return 0
    result = evaluate_model(
        model, prompt_set, reward, progress=not args.no_progress, on_batch=writer, **options
    )
    _log(f"{n} image{'s' * (n != 1)} sampled and scored in {time.perf_counter() - t0:.1f}s")
    width = max(len(k) for k in [*result["means"], "total"])
    for name, mean in result["means"].items():
        print(f"{name:<{width}}  mean {mean:.6g}  std {result['stds'][name]:.6g}  (n={result['num_images']})")
    weights = result["weights"]
    if len(weights) > 1 or any(w != 1.0 for w in weights.values()):
        parts = " + ".join(f"{w:g}*{k}" for k, w in weights.items())
        print(
            f"{'total':<{width}}  mean {result['total_mean']:.6g}  std {result['total_std']:.6g}  ({parts})"
        )
    if writer is not None:
        writer.close()
        for rec in result["images"]:
            rec["file"] = writer.file_name(rec["index"])
        settings = {
            "model": args.model,
            "lora": args.lora,
            "prompts": args.prompts,
            "dtype": str(dtype).removeprefix("torch."),
            "rewards": args.reward,
            "reward_kwargs": json.loads(args.reward_kwargs) if args.reward_kwargs.strip() else {},
            **options,
        }
        (out / "eval.json").write_text(json.dumps({"settings": settings, **result}, indent=2))
        _log(f"wrote {out / 'eval.json'}")
    return 0


def run_command(args) -> int:
    """Run ``diffrl sample`` / ``diffrl eval`` from parsed arguments; usage errors print ``error: ...`` and return 2."""
    try:
        return _run(args)
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
