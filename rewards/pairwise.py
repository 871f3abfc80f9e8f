"""Pairwise rewards: a judge of two images of one prompt, and the group scorer that makes it a normal reward.

**The contract.** A :class:`PairwiseReward` is called as ``judge.compare(images_a, images_b, prompts, **metadata)``
with two float tensors ``(B, 3, H, W)`` in [0, 1] (row ``i`` of ``images_a`` against row ``i`` of ``images_b``, both
made for ``prompts[i]``) and returns P(a is better than b), float32 ``(B,)`` in [0, 1]; 0.5 is a tie. Like a
:class:`~diffrl.rewards.Reward` it has a ``name``, loads its weights lazily (``load(device)``), runs in chunks of at
most ``batch_size`` pairs (chunking never changes the result), declares its hub files (``hub_files``) and has a
``fingerprint`` (class, ``settings()`` and weights) that the pair cache keys on
(:class:`diffrl.rewards.cache.CachedPairwiseReward`). It is score-only: no gradient reaches the images.

**The group scorer.** :class:`GroupWinRate` turns a judge into a :class:`~diffrl.rewards.Reward` that every trainer
can use: each image's score is its win rate against the other images of its group,

    win_rate(i) = (1 / |O(i)|) * sum over j in O(i) of P(i beats j),

where ``O(i)`` are the opponents of image ``i`` and P(i beats j) is ``compare`` of the pair in the order it was
asked (a pair is judged once; the other image gets ``1 - P``). ``opponents=None`` compares all pairs of a group
(``n (n - 1) / 2`` comparisons for ``n`` images); ``opponents=k`` draws a tournament in which every image meets
exactly ``k`` others (``n k / 2`` comparisons): the images in a random circular order, each matched with its ``k // 2``
neighbours on either side, and, for an odd ``k``, with the image opposite it (which needs an even group size). The
draw is seeded by ``seed`` and the group's content (prompt, metadata, image bytes), so scoring the same images
again gives the same scores. ``k >= n - 1`` is all pairs.

**Groups.** The trainers call the reward on a flat batch in which each prompt's ``group_size`` images are
consecutive rows (``expand_groups`` of the engine). :class:`GroupWinRate` groups the rows of *one call* by identical
prompt and metadata, so it needs a whole group in one call: it sets ``per_sample = False``, and the engine then
scores each process's whole batch at once instead of chunk by chunk. Two consequences: the same prompt drawn twice
in one step forms one larger group (the win rates are then over both draws' images), and an image alone in its
group (e.g. evaluation with one image per prompt) scores 0.5. Across a group with all pairs and a judge whose
``compare(a, b) + compare(b, a) = 1``, the win rates always sum to ``n / 2``: their mean is 0.5, so
``reward/<name>/mean`` is flat by construction and only the spread within groups carries the signal.

Reference: Pref-GRPO (``github.com/CodeGoat24/Pref-GRPO``, ``fastvideo/rewards/unifiedreward_think.py``,
``_pairwise_win_rate`` and ``cal_win_rate_images``): all pairs ``i < j`` of a group judged once each, an image's
win rate = its wins / its comparisons, a tie or an unreadable answer half a win for each. diffrl takes P(a better)
as a fractional win (a judge that answers 1 / 0 / 0.5 gives exactly the reference's numbers), adds the sampled
tournament, and scores a lone image 0.5 where the reference gives 0.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import LoadsWeights, Reward, check_inputs, split_metadata, to_score_tensor

__all__ = ["PairwiseReward", "GroupWinRate", "all_pairs", "tournament_pairs", "win_rates", "group_rows"]


class PairwiseReward(LoadsWeights):
    """Base class of pairwise judges (see the module docstring). Subclasses set ``name``, implement
    :meth:`compare_chunk` (one chunk, images already on the judge's device) and load models in :meth:`_load`.

    Args:
        batch_size: most pairs judged at once (``None``: all at once).
        device: where to run (``None``: the device of the images of the first call).
        dtype: dtype of the model weights (probabilities are always float32).
    """

    name: str = "pairwise"
    differentiable: bool = False
    required_metadata: tuple[str, ...] = ()

    # -------------------------------------------------------------- to implement
    def compare_chunk(
        self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str], **metadata
    ) -> torch.Tensor:
        """P(a better than b), ``(b,)``, of one chunk; images ``(b, 3, H, W)`` in [0, 1] on ``self.device``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement compare_chunk(images_a, images_b, prompts, **metadata)."
        )

    # -------------------------------------------------------------- machinery
    def check_pair_inputs(
        self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str]
    ) -> list[str]:
        """The prompts as a list, after checking both image batches (an error naming the bad input)."""
        prompts = check_inputs(images_a, prompts, self.name)
        check_inputs(images_b, prompts, self.name)
        return prompts

    def compare(
        self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str], **metadata
    ) -> torch.Tensor:
        """P(``images_a[i]`` is better than ``images_b[i]`` for ``prompts[i]``), float32 ``(B,)`` in [0, 1] on the
        images' device, without gradient."""
        prompts = self.check_pair_inputs(images_a, images_b, prompts)
        if not self._loaded:
            self.load(self.device if self.device is not None else images_a.device)
        batch = images_a.shape[0]
        step = self.batch_size or batch
        chunks = []
        with torch.no_grad():
            for start in range(0, batch, step):
                stop = min(start + step, batch)
                meta = split_metadata(metadata, batch, start, stop)
                a = images_a[start:stop].to(self.device)
                b = images_b[start:stop].to(self.device)
                part = self.compare_chunk(a, b, prompts[start:stop], **meta)
                chunks.append(to_score_tensor(part, stop - start, self.device, self.name).to(images_a.device))
        out = torch.cat(chunks) if chunks else torch.zeros(0, device=images_a.device)
        if not bool(torch.isfinite(out).all()) or bool((out < 0).any()) or bool((out > 1).any()):
            raise ValueError(
                f"pairwise reward {self.name!r} returned {out.tolist()}, not probabilities in [0, 1]; "
                "compare_chunk must return P(a better than b)."
            )
        return out.detach()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------------------------- the maths


def all_pairs(n: int) -> list[tuple[int, int]]:
    """Every pair ``(i, j)`` with ``i < j`` of ``n`` images."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def tournament_pairs(n: int, opponents: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pairs of ``n`` images in which every image meets exactly ``opponents`` others, each pair once (all pairs
    when ``opponents >= n - 1``): the images in the random circular order ``rng.permutation(n)``, each matched with
    its ``opponents // 2`` nearest neighbours on either side, plus, for an odd ``opponents``, with the image half a
    circle away (so an odd ``opponents`` needs an even ``n``). Which image of a pair comes first is drawn too."""
    if not isinstance(opponents, int) or opponents < 1:
        raise ValueError(f"opponents={opponents!r} must be a positive integer (or None for all pairs).")
    if opponents >= n - 1:
        return all_pairs(n)
    if opponents % 2 and n % 2:
        raise ValueError(
            f"opponents={opponents} is odd and a group has {n} images: every image cannot meet exactly {opponents} "
            "others in an odd group; use an even opponents or an even group size."
        )
    order = rng.permutation(n)
    pairs = [(int(order[i]), int(order[(i + d) % n])) for d in range(1, opponents // 2 + 1) for i in range(n)]
    if opponents % 2:
        pairs += [(int(order[i]), int(order[i + n // 2])) for i in range(n // 2)]
    flips = rng.random(len(pairs)) < 0.5
    return [(j, i) if flip else (i, j) for (i, j), flip in zip(pairs, flips, strict=True)]


def win_rates(
    n: int, pairs: Sequence[tuple[int, int]], probs: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """Each of ``n`` images' mean of P(it beats its opponent) over the ``pairs`` it is in; ``probs[k]`` is
    P(``pairs[k][0]`` beats ``pairs[k][1]``). An image in no pair gets 0.5. Float32 ``(n,)`` on the CPU."""
    probs = torch.as_tensor(probs, dtype=torch.float64).detach().cpu().reshape(-1)
    if probs.numel() != len(pairs):
        raise ValueError(f"{probs.numel()} probabilities for {len(pairs)} pairs; pass one per pair.")
    wins = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    if pairs:
        first = torch.tensor([i for i, _ in pairs])
        second = torch.tensor([j for _, j in pairs])
        wins.index_add_(0, first, probs)
        wins.index_add_(0, second, 1.0 - probs)
        ones = torch.ones(len(pairs), dtype=torch.float64)
        counts.index_add_(0, first, ones)
        counts.index_add_(0, second, ones)
    rates = torch.where(counts > 0, wins / counts.clamp_min(1), torch.full_like(wins, 0.5))
    return rates.float()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _row_metadata(metadata: dict[str, Any], batch: int, row: int) -> str:
    one = split_metadata(metadata, batch, row, row + 1)
    return json.dumps({k: _plain(v) for k, v in sorted(one.items())}, sort_keys=True, default=str)


def group_rows(prompts: Sequence[str], metadata: dict[str, Any], batch: int) -> list[list[int]]:
    """The rows of a batch grouped by identical prompt and metadata, each group in row order, groups in order of
    their first row."""
    groups: dict[tuple[str, str], list[int]] = {}
    for row in range(batch):
        groups.setdefault((prompts[row], _row_metadata(metadata, batch, row)), []).append(row)
    return list(groups.values())


def _take_rows(metadata: dict[str, Any], batch: int, rows: list[int]) -> dict[str, Any]:
    out = {}
    for key, value in metadata.items():
        if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and len(value) == batch:
            if isinstance(value, torch.Tensor):
                out[key] = value[torch.tensor(rows, device=value.device)]
            elif isinstance(value, np.ndarray):
                out[key] = value[rows]
            else:
                out[key] = [value[r] for r in rows]
        else:
            out[key] = value
    return out


class GroupWinRate(Reward):
    """A pairwise judge as a normal reward: each image's win rate within its group (see the module docstring).

    Args:
        judge: the :class:`PairwiseReward` (wrap it in :class:`diffrl.rewards.cache.CachedPairwiseReward` to cache
            the comparisons).
        opponents: ``None`` (all pairs of each group) or the number of opponents each image meets in a sampled
            tournament (an odd number needs even groups).
        seed: seed of the tournament draws (mixed with each group's content).
        name: the metric name (default: the judge's name + ``"_winrate"``).
        batch_size: most pairs per call of the judge (``None``: all pairs of the batch in one call, which the judge
            chunks with its own ``batch_size``). Whatever its value, a group is always scored whole.
    """

    differentiable = False
    per_sample = False  # a win rate depends on the rest of the group

    def __init__(
        self,
        judge: PairwiseReward,
        *,
        opponents: int | None = None,
        seed: int = 0,
        name: str | None = None,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__(batch_size=batch_size, device=device)
        if not isinstance(judge, PairwiseReward):
            raise TypeError(
                f"GroupWinRate needs a PairwiseReward judge, got {type(judge).__name__}; a pointwise Reward is "
                "used as a reward directly."
            )
        if opponents is not None and (
            isinstance(opponents, bool) or not isinstance(opponents, int) or opponents < 1
        ):
            raise ValueError(
                f"opponents={opponents!r} must be a positive integer (opponents per image) or None (all pairs)."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer.")
        self.judge = judge
        self.opponents = opponents
        self.seed = seed
        self.name = name or f"{judge.name}_winrate"
        self.required_metadata = tuple(judge.required_metadata)
        self.comparisons = 0  # pairs sent to the judge so far

    def _load(self) -> None:
        self.judge.load(self.device)

    def settings(self) -> dict[str, Any]:
        return {"judge": self.judge.fingerprint, "opponents": self.opponents, "seed": self.seed}

    def weight_modules(self) -> list[torch.nn.Module]:
        return []  # the judge's fingerprint (in the settings) covers its weights

    def group_pairs(
        self, rows: list[int], images: torch.Tensor, prompt: str, meta: str
    ) -> list[tuple[int, int]]:
        """The pairs (rows of the batch) judged within one group."""
        n = len(rows)
        if self.opponents is None or self.opponents >= n - 1:
            local = all_pairs(n)
        else:
            h = hashlib.sha256(f"{self.seed}\0{prompt}\0{meta}".encode())
            for r in rows:
                t = images[r].detach().to("cpu", torch.float32).contiguous()
                h.update(str(tuple(t.shape)).encode())
                h.update(t.numpy().tobytes())
            rng = np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))
            local = tournament_pairs(n, self.opponents, rng)
        return [(rows[i], rows[j]) for i, j in local]

    def pairs(
        self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]
    ) -> list[tuple[int, int]]:
        """Every pair (rows of the batch) that scoring this batch judges."""
        batch = images.shape[0]
        out = []
        for rows in group_rows(prompts, metadata, batch):
            out += self.group_pairs(rows, images, prompts[rows[0]], _row_metadata(metadata, batch, rows[0]))
        return out

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> torch.Tensor:
        prompts = check_inputs(images, prompts, self.name)
        if not self._loaded:
            self.load(self.device if self.device is not None else images.device)
        batch = images.shape[0]
        pairs = self.pairs(images, prompts, metadata)
        step = self.batch_size or max(len(pairs), 1)
        probs = []
        with torch.no_grad():
            for start in range(0, len(pairs), step):
                part = pairs[start : start + step]
                first = [i for i, _ in part]
                second = [j for _, j in part]
                a = images[torch.tensor(first, device=images.device)]
                b = images[torch.tensor(second, device=images.device)]
                meta = _take_rows(metadata, batch, first)
                probs.append(self.judge.compare(a, b, [prompts[i] for i in first], **meta).float().cpu())
        self.comparisons += len(pairs)
        rates = win_rates(batch, pairs, torch.cat(probs) if probs else torch.zeros(0))
        return rates.to(images.device)

    def __repr__(self) -> str:
        return f"GroupWinRate(judge={self.judge!r}, opponents={self.opponents!r}, name={self.name!r})"
