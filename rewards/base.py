"""The reward contract: ``reward(images, prompts, **metadata) -> (B,) float32``.

* ``images``: a float tensor ``(B, 3, H, W)`` in [0, 1] on any device; ``prompts``: a list of B strings;
  ``metadata``: per-sample fields from the prompt dataset (lists, tuples, arrays or tensors of length B; other
  values are passed to every chunk unchanged).
* Every reward has a ``name`` (the metric key, ``reward/<name>/mean``) and a ``differentiable`` flag. A
  differentiable reward lets gradients reach ``images``; a score-only reward runs under ``torch.no_grad()``.
* Rewards run in chunks of at most ``batch_size`` images (chunking never changes the result), on a chosen
  ``device`` (default: the images' device) with model weights in ``dtype``, and load their weights lazily on the
  first call.

A plain Python function is a reward too: :func:`as_reward` wraps any callable returning a tensor, a list or an
array of B numbers. :meth:`Reward.evaluate` returns the total and every component (for logging); the
combination of several rewards is :class:`diffrl.rewards.CombinedReward`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffrl.utils import resolve_dtype

__all__ = [
    "LoadsWeights",
    "Reward",
    "RewardOutput",
    "FunctionReward",
    "as_reward",
    "split_metadata",
    "to_score_tensor",
    "check_inputs",
]


@dataclass
class RewardOutput:
    """A reward's result with its parts, for logging (all float32, shape ``(B,)``)."""

    total: torch.Tensor  # (B,) the reward a trainer optimises
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) raw score of each part


def to_score_tensor(values: Any, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """Turn a tensor, list or array of ``batch`` numbers into a float32 ``(batch,)`` tensor on ``device``."""
    if isinstance(values, torch.Tensor):
        out = values.to(device=device, dtype=torch.float32)
    else:
        try:
            out = torch.as_tensor(np.asarray(values, dtype=np.float32), device=device)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"reward {name!r} returned {type(values).__name__}, which is not numbers; return a tensor, a list or an "
                f"array of {batch} floats."
            ) from err
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (batch,):
        raise ValueError(
            f"reward {name!r} returned shape {tuple(out.shape)} for {batch} images; return one score per image, shape ({batch},)."
        )
    return out


def split_metadata(metadata: dict[str, Any], batch: int, start: int, stop: int) -> dict[str, Any]:
    """The per-sample metadata of rows ``start:stop``; values that are not per-sample pass through unchanged."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and len(value) == batch:
            out[key] = value[start:stop]
        else:
            out[key] = value
    return out


def check_inputs(images: torch.Tensor, prompts: Sequence[str], name: str) -> list[str]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward {name!r} got images {shape}; pass a float tensor (B, 3, H, W) in [0, 1].")
    if not images.is_floating_point():
        raise ValueError(
            f"reward {name!r} got {images.dtype} images; pass floats in [0, 1] (e.g. images.float() / 255)."
        )
    if isinstance(prompts, str):
        prompts = [prompts] * images.shape[0]
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"reward {name!r} got {len(prompts)} prompts for {images.shape[0]} images; pass one prompt per image."
        )
    return prompts


class LoadsWeights:
    """What rewards and pairwise judges share: options checked at construction, weights loaded once on first use
    (:meth:`load`, :meth:`_load`), the hub files they need (:meth:`hub_files`) and a :attr:`fingerprint` of class,
    name, settings and weight bytes (what caches key on).

    Args:
        batch_size: most items scored at once (``None``: all at once).
        device: where to run (``None``: the device of the images of the first call).
        dtype: dtype of the model weights (scores are always float32).
    """

    name: str = "reward"

    def __init__(
        self, *, batch_size: int | None = None, device: torch.device | str | None = None, dtype=torch.float32
    ):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None (all at once).")
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.dtype = resolve_dtype(dtype)
        self._loaded = False
        self._weights_id: str | None = None

    def _load(self) -> None:
        """Load models and weights onto ``self.device`` (called once, on first use)."""

    def settings(self) -> dict[str, Any]:
        """The options that change scores (part of the cache fingerprint); extend in subclasses."""
        return {}

    @classmethod
    def hub_files(cls, **kwargs) -> list:
        """The exact hub files (:class:`diffrl.rewards.weights.HubFile`) needed when built with ``kwargs``;
        ``diffrl download`` fetches them. Empty without weights or with local paths."""
        return []

    def weight_modules(self) -> list[torch.nn.Module]:
        """The modules whose weights define the scores (hashed into the cache fingerprint)."""
        return [m for m in vars(self).values() if isinstance(m, torch.nn.Module)]

    def load(self, device: torch.device | str | None = None):
        """Load the weights now (otherwise done on the first call)."""
        if device is not None:
            self.device = torch.device(device)
        if self.device is None:
            self.device = torch.device("cpu")
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    @property
    def fingerprint(self) -> str:
        """A digest of what determines the scores: class, name, settings and the loaded weights' bytes.

        Two objects with the same fingerprint give the same scores; the caches key on it.
        """
        if not self._loaded:
            self.load()
        if self._weights_id is None:
            h = hashlib.sha256()
            for module in self.weight_modules():
                for key, tensor in module.state_dict().items():
                    h.update(key.encode())
                    t = tensor.detach().to("cpu").contiguous()
                    h.update(str(t.dtype).encode())
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_id = h.hexdigest()
        head = json.dumps(
            {
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "name": self.name,
                "settings": self.settings(),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256((head + self._weights_id).encode()).hexdigest()


class Reward(LoadsWeights):
    """Base class of rewards. Subclasses set ``name`` and ``differentiable`` and implement :meth:`score`
    (one chunk, images already on the reward's device); models are loaded in :meth:`_load`.

    Args:
        batch_size: most images scored at once (``None``: all at once).
        device: where to run (``None``: the device of the images of the first call).
        dtype: dtype of the model weights (scores are always float32).
    """

    name: str = "reward"
    differentiable: bool = False
    # Each score depends only on its own image, prompt and metadata (the contract), so images may be scored in any
    # chunks, e.g. chunk by chunk in a background thread while sampling goes on. False for batch-normalised sums.
    per_sample: bool = True
    # metadata fields every prompt must carry for this reward (checked before a run loads its model)
    required_metadata: tuple[str, ...] = ()

    # -------------------------------------------------------------- to implement
    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        """Scores ``(b,)`` of one chunk; ``images`` ``(b, 3, H, W)`` in [0, 1] on ``self.device``."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(images, prompts, **metadata).")

    def training_state(self) -> dict[str, Any]:
        """State that changes between calls and belongs in a training checkpoint (JSON-serialisable); most rewards
        have none (:class:`diffrl.rewards.CombinedReward` keeps its running statistics here)."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned."""

    # -------------------------------------------------------------- machinery
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> torch.Tensor:
        prompts = check_inputs(images, prompts, self.name)
        if not self._loaded:
            self.load(self.device if self.device is not None else images.device)
        batch = images.shape[0]
        step = self.batch_size or batch
        out_device = images.device
        context = torch.enable_grad() if self.differentiable and torch.is_grad_enabled() else torch.no_grad()
        chunks = []
        with context:
            for start in range(0, batch, step):
                stop = min(start + step, batch)
                meta = split_metadata(metadata, batch, start, stop)
                part = self.score(images[start:stop].to(self.device), prompts[start:stop], **meta)
                chunks.append(to_score_tensor(part, stop - start, self.device, self.name).to(out_device))
        scores = torch.cat(chunks) if chunks else torch.zeros(0, device=out_device)
        return scores if self.differentiable else scores.detach()

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> RewardOutput:
        """The total and its components (a single reward's only component is itself)."""
        total = self(images, prompts, **metadata)
        return RewardOutput(total=total, components={self.name: total.detach()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


class FunctionReward(Reward):
    """A reward from a plain callable ``fn(images, prompts, **metadata)`` returning B numbers."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        differentiable: bool = False,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        version: str = "",
    ):
        if not callable(fn):
            raise TypeError(
                f"as_reward needs a callable, got {type(fn).__name__}; pass a function (images, prompts, **metadata)."
            )
        super().__init__(batch_size=batch_size, device=device)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.differentiable = differentiable
        self.version = version

    def score(self, images, prompts, **metadata):
        return self.fn(images, prompts, **metadata)

    def settings(self) -> dict[str, Any]:
        try:
            source = inspect.getsource(self.fn)
        except (OSError, TypeError):
            source = repr(self.fn)
        fn_id = f"{getattr(self.fn, '__module__', '')}.{getattr(self.fn, '__qualname__', '')}"
        return {"fn": fn_id, "source": hashlib.sha256(source.encode()).hexdigest(), "version": self.version}

    def weight_modules(self) -> list[torch.nn.Module]:
        return [self.fn] if isinstance(self.fn, torch.nn.Module) else []


def as_reward(
    fn: Callable[..., Any] | Reward,
    *,
    name: str | None = None,
    differentiable: bool = False,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    version: str = "",
) -> Reward:
    """Make any callable ``fn(images, prompts, **metadata) -> B numbers`` a reward (a :class:`Reward` is returned as is).

    ``name`` defaults to the function's name (the metric key); set ``differentiable=True`` only when the function
    is written in torch so that gradients reach ``images``. ``version`` lets you invalidate cached scores when the
    function depends on something its source does not show (a file, a global).
    """
    if isinstance(fn, Reward):
        return fn
    return FunctionReward(
        fn, name=name, differentiable=differentiable, batch_size=batch_size, device=device, version=version
    )
