"""A score cache keyed by the reward's fingerprint, the prompt, the metadata and the image's exact content.

Re-scoring the same images (evaluation reruns, comparing checkpoints on fixed seeds) then costs nothing. The
key includes :attr:`Reward.fingerprint` (class, settings and a digest of the loaded weights), so a reward with
other weights or options never gets another one's scores. Stored in SQLite (one file, safe to share between
runs; writes are committed per call, so a killed run loses at most the batch in flight).

:class:`CachedPairwiseReward` does the same for a pairwise judge (:mod:`diffrl.rewards.pairwise`): its key is one
*ordered* pair, ``(judge fingerprint, prompt, metadata, image a, image b)``, so comparing the same two images again
costs nothing, while ``(b, a)`` is another key (a judge's answer may depend on the order, and P(b better) is
``1 - P(a better)`` only for judges that average both orders). Both kinds of keys can share one :class:`ScoreCache`.

A reward whose score depends on the rest of its batch (``per_sample = False``: win rates within a group,
batch-normalised sums) cannot be cached per image: :class:`CachedReward` refuses it; cache a group scorer's
comparisons instead.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Reward, RewardOutput, check_inputs, split_metadata
from .pairwise import PairwiseReward

__all__ = ["ScoreCache", "CachedReward", "CachedPairwiseReward"]


def _image_digest(image: torch.Tensor) -> bytes:
    t = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.digest()


def _meta_repr(meta: dict[str, Any]) -> str:
    def plain(v):
        if isinstance(v, torch.Tensor):
            return v.detach().cpu().tolist()
        if isinstance(v, np.ndarray):
            return v.tolist()
        return v

    return json.dumps({k: plain(v) for k, v in sorted(meta.items())}, sort_keys=True, default=str)


class ScoreCache:
    """Scores by key, in memory (``path=None``) or in an SQLite file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(self.path) if self.path is not None else ":memory:", check_same_thread=False
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL NOT NULL)")
        self._db.commit()
        self.hits = 0
        self.misses = 0

    def get_many(self, keys: list[str]) -> dict[str, float]:
        found = {}
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            rows = self._db.execute(
                f"SELECT key, score FROM scores WHERE key IN ({','.join('?' * len(part))})", part
            )
            found.update(dict(rows.fetchall()))
        return found

    def put_many(self, items: dict[str, float]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO scores (key, score) VALUES (?, ?)", list(items.items())
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class CachedReward(Reward):
    """``reward`` with a :class:`ScoreCache` in front: only images not seen before (for this reward, prompt and
    metadata) are scored. When the images require grad the cache is bypassed, so gradients still flow."""

    def __init__(self, reward: Reward, cache: ScoreCache | str | Path | None = None):
        super().__init__()
        if not getattr(reward, "per_sample", True):
            raise ValueError(
                f"reward {reward.name!r} scores each image against the rest of its batch (per_sample=False), so its "
                "scores cannot be cached per image; cache its parts instead (a pairwise judge with "
                "CachedPairwiseReward, a combination's rewards each with CachedReward)."
            )
        self.reward = reward
        self.cache = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
        self.name = reward.name
        self.differentiable = reward.differentiable
        self._loaded = True

    @property
    def fingerprint(self) -> str:
        return self.reward.fingerprint

    def _keys(self, images, prompts, metadata) -> list[str]:
        fp = self.reward.fingerprint
        batch = images.shape[0]
        keys = []
        for i in range(batch):
            meta = _meta_repr(split_metadata(metadata, batch, i, i + 1))
            h = hashlib.sha256(fp.encode())
            h.update(prompts[i].encode())
            h.update(meta.encode())
            h.update(_image_digest(images[i]))
            keys.append(h.hexdigest())
        return keys

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> torch.Tensor:
        prompts = check_inputs(images, prompts, self.name)
        if self.differentiable and images.requires_grad and torch.is_grad_enabled():
            return self.reward(images, prompts, **metadata)
        keys = self._keys(images, prompts, metadata)
        found = self.cache.get_many(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.cache.hits += len(keys) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            idx = torch.tensor(missing, device=images.device)
            meta = {
                k: (_take(v, missing) if _per_sample(v, images.shape[0]) else v) for k, v in metadata.items()
            }
            with torch.no_grad():
                fresh = self.reward(images[idx], [prompts[i] for i in missing], **meta)
            new = {keys[i]: float(s) for i, s in zip(missing, fresh.tolist(), strict=True)}
            self.cache.put_many(new)
            found.update(new)
        return torch.tensor([found[k] for k in keys], dtype=torch.float32, device=images.device)

    def evaluate(self, images, prompts, **metadata) -> RewardOutput:
        total = self(images, prompts, **metadata)
        return RewardOutput(total=total, components={self.name: total})


class CachedPairwiseReward(PairwiseReward):
    """``judge`` with a :class:`ScoreCache` in front, keyed per ordered pair: only pairs not compared before (for
    this judge, prompt and metadata, in this order) reach the judge."""

    def __init__(self, judge: PairwiseReward, cache: ScoreCache | str | Path | None = None):
        super().__init__()
        if not isinstance(judge, PairwiseReward):
            raise TypeError(
                f"CachedPairwiseReward needs a PairwiseReward, got {type(judge).__name__}; cache a pointwise reward "
                "with CachedReward."
            )
        self.judge = judge
        self.cache = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
        self.name = judge.name
        self.required_metadata = tuple(judge.required_metadata)
        self._loaded = True  # the judge loads itself on its first comparison

    def load(self, device: torch.device | str | None = None) -> CachedPairwiseReward:
        self.judge.load(device)
        return self

    @property
    def fingerprint(self) -> str:
        return self.judge.fingerprint

    def pair_keys(
        self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str], metadata
    ) -> list[str]:
        """The cache key of each ordered pair ``(images_a[i], images_b[i])``."""
        fp = self.judge.fingerprint
        batch = images_a.shape[0]
        keys = []
        for i in range(batch):
            meta = _meta_repr(split_metadata(metadata, batch, i, i + 1))
            h = hashlib.sha256(b"pair\0" + fp.encode())
            h.update(prompts[i].encode())
            h.update(meta.encode())
            h.update(_image_digest(images_a[i]))  # a, then b: the order is part of the key
            h.update(_image_digest(images_b[i]))
            keys.append(h.hexdigest())
        return keys

    def compare(
        self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str], **metadata
    ) -> torch.Tensor:
        prompts = self.check_pair_inputs(images_a, images_b, prompts)
        keys = self.pair_keys(images_a, images_b, prompts, metadata)
        found = self.cache.get_many(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.cache.hits += len(keys) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            batch = images_a.shape[0]
            idx = torch.tensor(missing, device=images_a.device)
            meta = {k: (_take(v, missing) if _per_sample(v, batch) else v) for k, v in metadata.items()}
            fresh = self.judge.compare(
                images_a[idx], images_b[idx.to(images_b.device)], [prompts[i] for i in missing], **meta
            )
            new = {keys[i]: float(p) for i, p in zip(missing, fresh.tolist(), strict=True)}
            self.cache.put_many(new)
            found.update(new)
        return torch.tensor([found[k] for k in keys], dtype=torch.float32, device=images_a.device)

    def __repr__(self) -> str:
        return f"CachedPairwiseReward({self.judge!r})"


def _per_sample(value, batch: int) -> bool:
    return isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and len(value) == batch


def _take(value, index: list[int]):
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(index, device=value.device)]
    if isinstance(value, np.ndarray):
        return value[index]
    return type(value)(value[i] for i in index) if isinstance(value, tuple) else [value[i] for i in index]
