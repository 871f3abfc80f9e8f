"""Weighted sums of rewards, with every component returned for logging and optional per-reward normalisation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .base import Reward, RewardOutput, check_inputs
from .pairwise import group_rows
from .registry import load_reward

__all__ = ["CombinedReward"]

NORMALISATIONS = (None, "batch", "running", "group")


class CombinedReward(Reward):
    """``total = sum_i w_i * norm_i(r_i(images, prompts))``; a trainer uses it like any reward.

    Args:
        rewards: ``{name_or_spec: weight}`` or a list of ``(reward, weight)`` pairs; a reward is a registry name,
            a ``"module:attr"`` string, a :class:`Reward` or a function.
        normalize: ``None`` (raw scores), ``"batch"`` (each component z-scored over the batch, so rewards on
            different scales weigh as their weights say) or ``"running"`` (z-scored with running statistics,
            updated with ``momentum`` on every call; use it when batches are small) or ``"group"`` (each
            component z-scored within each group of images that share a prompt and its metadata, std with n - 1
            plus 1e-8, a lone image 0: Pref-GRPO's ``compute_weighted_advantages`` with ``use_group``, which makes
            a pairwise judge's win rates and a pointwise score weigh as their weights say in every group).
        momentum: the running statistics' update rate.
        name: the metric name of the total.

    :meth:`evaluate` returns the total and each component's raw (un-normalised) score. The combination is
    differentiable when every component with a non-zero weight is. The running statistics are saved and restored
    with :meth:`training_state` / :meth:`load_training_state` (the trainers keep them in checkpoints). A caller that scores
    a batch in parts (ReFL's micro-batches) computes the whole batch's statistics with :meth:`batch_statistics`
    and applies them to each part under :meth:`fixed_statistics`.
    """

    def __init__(
        self,
        rewards: Mapping[Any, float] | Sequence[tuple[Any, float]],
        *,
        normalize: str | None = None,
        momentum: float = 0.01,
        name: str = "combined",
    ):
        super().__init__()
        if normalize not in NORMALISATIONS:
            raise ValueError(f"normalize={normalize!r} is not known; use one of {NORMALISATIONS}.")
        pairs = list(rewards.items()) if isinstance(rewards, Mapping) else list(rewards)
        if not pairs:
            raise ValueError("CombinedReward needs at least one (reward, weight) pair.")
        self.parts: list[tuple[Reward, float]] = []
        for spec, weight in pairs:
            reward = load_reward(spec)
            if not isinstance(weight, (int, float)):
                raise ValueError(f"weight {weight!r} of reward {reward.name!r} must be a number.")
            self.parts.append((reward, float(weight)))
        names = [r.name for r, _ in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(
                f"reward names {names} repeat; give each reward a distinct name (as_reward(fn, name=...))."
            )
        self.name = name
        self.normalize = normalize
        self.momentum = momentum
        self.differentiable = all(r.differentiable for r, w in self.parts if w != 0)
        self.required_metadata = tuple(
            dict.fromkeys(k for r, _ in self.parts for k in getattr(r, "required_metadata", ()))
        )
        # batch or running normalisation makes a score depend on the rest of the batch
        self.per_sample = normalize is None and all(r.per_sample for r, _ in self.parts)
        self._running: dict[str, tuple[float, float]] = {}
        self._fixed: dict[str, tuple[float, float]] | None = (
            None  # per part (mean, std), from fixed_statistics
        )
        self._frozen = False  # running statistics not updated (frozen_statistics)
        self._loaded = True  # components load themselves lazily

    def settings(self) -> dict[str, Any]:
        return {
            "parts": [(r.fingerprint, w) for r, w in self.parts],
            "normalize": self.normalize,
            "running": self._running if self.normalize == "running" else None,
        }

    def weight_modules(self) -> list[torch.nn.Module]:
        return []

    def training_state(self) -> dict[str, Any]:
        """The running statistics (``{"running": {part: [mean, var]}}``, JSON-serialisable; empty before the first
        call or without running normalisation)."""
        return {"running": {name: [mean, var] for name, (mean, var) in self._running.items()}}

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`training_state` returned."""
        running = state.get("running", {})
        names = {r.name for r, _ in self.parts}
        unknown = sorted(set(running) - names)
        if unknown:
            raise ValueError(
                f"saved running statistics for {unknown} do not match this reward's parts {sorted(names)}; "
                "load them into a CombinedReward with the same parts."
            )
        self._running = {name: (float(mean), float(var)) for name, (mean, var) in running.items()}

    def batch_statistics(self, components: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        """``{part: (mean, std)}`` of raw component scores (e.g. a whole step's, gathered over processes), for
        :meth:`fixed_statistics`; the population std, as ``normalize="batch"`` uses."""
        stats = {}
        for reward, weight in self.parts:
            if weight == 0:
                continue
            scores = components[reward.name].detach().float()
            std = float(scores.std(unbiased=False)) if scores.numel() > 1 else 0.0
            stats[reward.name] = (float(scores.mean()), std)
        return stats

    def total_from(
        self, components: Mapping[str, torch.Tensor], stats: Mapping[str, tuple[float, float]]
    ) -> torch.Tensor:
        """The ``normalize="batch"`` total of already scored raw ``components`` (no gradient), z-scored with the
        given :meth:`batch_statistics` instead of their own: how a batch split over processes is normalised as
        a whole without scoring it again."""
        if self.normalize != "batch":
            raise ValueError(
                f"total_from applies to normalize='batch', not normalize={self.normalize!r}; use evaluate()."
            )
        with self.fixed_statistics(stats):
            return sum(
                weight * self._normalise(reward.name, components[reward.name].detach().float())
                for reward, weight in self.parts
                if weight != 0
            )

    @contextlib.contextmanager
    def fixed_statistics(self, stats: Mapping[str, tuple[float, float]]) -> Iterator[None]:
        """With ``normalize="batch"``, z-score each part with the given ``(mean, std)`` instead of the statistics of
        the batch being scored (no gradient flows through them), so a batch scored in parts is normalised as a
        whole."""
        if self.normalize != "batch":
            raise ValueError(
                f"fixed_statistics applies to normalize='batch', not normalize={self.normalize!r}; score without it."
            )
        self._fixed = dict(stats)
        try:
            yield
        finally:
            self._fixed = None

    def _normalise(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        if self.normalize is None:
            return scores
        if self.normalize == "batch" and self._fixed is not None:
            mean, std = self._fixed[name]
            return (scores - mean) / (std + 1e-6)
        if self.normalize == "batch":
            std = scores.std(unbiased=False) if scores.numel() > 1 else scores.new_tensor(0.0)
            return (scores - scores.mean()) / (std.detach() + 1e-6)
        batch_mean, batch_var = scores.mean().item(), scores.var(unbiased=False).item()
        mean, var = self._running.get(name, (batch_mean, batch_var))
        if not self._frozen and math.isfinite(batch_mean) and math.isfinite(batch_var):
            # a batch with a non-finite score is skipped by the trainers; it must not poison the statistics
            m = self.momentum
            mean = (1 - m) * mean + m * batch_mean
            var = (1 - m) * var + m * batch_var
            self._running[name] = (mean, var)
        return (scores - mean) / (var**0.5 + 1e-6)

    @contextlib.contextmanager
    def frozen_statistics(self) -> Iterator[None]:
        """Score without updating the running statistics (evaluation must not change training); a part without
        statistics yet is normalised by its own batch."""
        before, self._frozen = self._frozen, True
        try:
            yield
        finally:
            self._frozen = before

    def _check_inputs(self, images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
        """The prompts, once ``images`` are checked (images ``(B, 3, H, W)``; a video combination takes clips)."""
        return check_inputs(images, prompts, self.name)

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> RewardOutput:
        prompts = self._check_inputs(images, prompts)
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        components = {}
        groups = group_rows(prompts, metadata, images.shape[0]) if self.normalize == "group" else None
        for reward, weight in self.parts:
            scores = reward(images, prompts, **metadata)
            components[reward.name] = scores.detach()
            if weight != 0:
                normalised = (
                    _group_z(scores, groups) if groups is not None else self._normalise(reward.name, scores)
                )
                total = total + weight * normalised
        return RewardOutput(total=total if self.differentiable else total.detach(), components=components)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> torch.Tensor:
        return self.evaluate(images, prompts, **metadata).total

    def __repr__(self) -> str:
        inner = ", ".join(f"{r.name}: {w:g}" for r, w in self.parts)
        return f"CombinedReward({{{inner}}}, normalize={self.normalize!r})"


def _group_z(scores: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Each group's scores z-scored with its own mean and std (n - 1, + 1e-8; the std detached), in float32; a
    group of one image scores 0."""
    scores = scores.float()
    out = torch.zeros_like(scores)
    for rows in groups:
        index = torch.tensor(rows, device=scores.device)
        x = scores[index]
        if len(rows) > 1:
            out = out.index_put((index,), (x - x.mean()) / (x.std().detach() + 1e-8))
    return out
