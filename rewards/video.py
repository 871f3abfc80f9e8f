"""Rewards for videos ``(B, F, 3, H, W)`` in [0, 1]: any image reward applied to chosen frames, or a function of the
whole clip.

* :class:`FrameReward` wraps an image reward (a built-in, a :class:`~diffrl.rewards.CombinedReward` of image rewards
  or a plain function): the chosen frames of every video are scored as a batch of images ``(B * K, 3, H, W)`` (each
  frame with its video's prompt and metadata), and the ``K`` scores of a video are combined by their ``mean`` or
  their ``min`` (the worst frame). Each component is combined the same way, so the logs keep their names.
* :class:`VideoReward` is a reward on the whole clip: ``fn(videos, prompts, **metadata) -> B numbers`` with
  ``videos`` ``(B, F, 3, H, W)``. Decorate a function with :func:`video_reward` (or wrap it) so a run named
  ``"my_module:my_fn"`` in ``reward`` knows it takes clips.
* :func:`for_video` is what a run does with its reward when the model makes videos: a clip reward stays as it is,
  a normalised combination becomes a :class:`FrameCombinedReward` (each part a :class:`FrameReward`, normalised
  across videos), anything else a :class:`FrameReward`.

Frames are chosen by :func:`select_frames`: explicit indices (``frames: [0, -1]``, negative from the end), every
``k``-th frame (``every: k``, from frame 0), or ``n`` evenly spaced frames from the first to the last (``num: n``);
with none of them, every frame. An image ``(B, 3, H, W)`` given to a :class:`FrameReward` is a one-frame video.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .base import Reward, RewardOutput, check_inputs, split_metadata, to_score_tensor
from .combine import CombinedReward

__all__ = [
    "FrameReward",
    "FrameCombinedReward",
    "VideoReward",
    "video_reward",
    "for_video",
    "select_frames",
    "COMBINE",
]

COMBINE = ("mean", "min")


def select_frames(
    num_frames: int, frames: Sequence[int] | None = None, every: int = 0, num: int = 0
) -> list[int]:
    """The sorted distinct frame indices to score in a ``num_frames``-frame video (at most one way of choosing).

    ``frames``: explicit indices, negative ones counted from the end; ``every``: frames ``0, k, 2k, ...``; ``num``:
    ``n`` frames evenly spaced from the first to the last, ``round(i * (F - 1) / (n - 1))`` (the middle frame for
    ``n = 1``); none: all frames."""
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r} must be a positive integer.")
    chosen = [name for name, v in (("frames", frames), ("every", every), ("num", num)) if v]
    if len(chosen) > 1:
        raise ValueError(
            f"frames, every and num are different ways of choosing frames, but {' and '.join(chosen)} are all set; "
            "set only one."
        )
    if frames:
        out = []
        for f in frames:
            if isinstance(f, bool) or not isinstance(f, int) or not -num_frames <= f < num_frames:
                raise ValueError(
                    f"frame index {f!r} is outside a {num_frames}-frame video; use indices in "
                    f"{-num_frames}..{num_frames - 1}."
                )
            out.append(f % num_frames)
        return sorted(set(out))
    if every:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be a positive integer (1: every frame).")
        return list(range(0, num_frames, every))
    if num:
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num={num!r} must be a positive integer (the number of frames to score).")
        if num == 1:
            return [(num_frames - 1) // 2]
        return sorted({round(i * (num_frames - 1) / (num - 1)) for i in range(num)})
    return list(range(num_frames))


def _as_video(videos: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(videos, torch.Tensor) and videos.ndim == 4 and videos.shape[1] == 3:
        return videos.unsqueeze(1)  # an image is a one-frame video
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"reward {name!r} got {shape}; pass videos (B, F, 3, H, W) in [0, 1].")
    return videos


class FrameReward(Reward):
    """An image reward applied to chosen frames of each video, the frames' scores combined by ``mean`` or ``min``.

    Args:
        reward: the image reward (anything :func:`~diffrl.rewards.load_reward` accepts, already built).
        frames, every, num: which frames (see :func:`select_frames`); none: all.
        combine: ``"mean"`` or ``"min"`` over the chosen frames.
    """

    def __init__(
        self,
        reward: Reward,
        *,
        frames: Sequence[int] | None = None,
        every: int = 0,
        num: int = 0,
        combine: str = "mean",
    ):
        if isinstance(reward, VideoReward):
            raise ValueError(
                f"reward {reward.name!r} already scores whole clips; use it without FrameReward."
            )
        if not isinstance(reward, Reward):
            raise TypeError(
                f"FrameReward needs a Reward, got {type(reward).__name__}; wrap a function with as_reward first."
            )
        if combine not in COMBINE:
            raise ValueError(f"combine={combine!r} is not known; use one of {', '.join(COMBINE)}.")
        select_frames(
            10**6, frames, every, num
        )  # the choice itself is checked now, its range on the first call
        super().__init__(batch_size=None, device=None)
        self.inner = reward
        self.frames = list(frames) if frames else None
        self.every, self.num, self.combine = every, num, combine
        self.name = reward.name
        self.differentiable = reward.differentiable
        self.per_sample = reward.per_sample
        self.required_metadata = tuple(getattr(reward, "required_metadata", ()))
        self._loaded = True  # the inner reward loads itself

    def indices(self, num_frames: int) -> list[int]:
        return select_frames(num_frames, self.frames, self.every, self.num)

    def describe(self, num_frames: int) -> str:
        """One line: which frames of a ``num_frames``-frame video are scored, and how they are combined."""
        idx = self.indices(num_frames)
        which = "every frame" if len(idx) == num_frames else f"frames {idx}"
        return (
            f"reward {self.name!r} scores {which} of {num_frames} per video, combined by their {self.combine}"
        )

    def settings(self) -> dict[str, Any]:
        return {
            "inner": self.inner.fingerprint,
            "frames": self.frames,
            "every": self.every,
            "num": self.num,
            "combine": self.combine,
        }

    def weight_modules(self) -> list[torch.nn.Module]:
        return []

    def training_state(self) -> dict[str, Any]:
        return self.inner.training_state()

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.inner.load_training_state(state)

    def _reduce(self, scores: torch.Tensor, batch: int, k: int) -> torch.Tensor:
        per_frame = scores.reshape(batch, k)
        return per_frame.mean(dim=1) if self.combine == "mean" else per_frame.min(dim=1).values

    def evaluate(self, videos: torch.Tensor, prompts: Sequence[str], **metadata) -> RewardOutput:
        videos = _as_video(videos, self.name)
        batch, num_frames = videos.shape[:2]
        prompts = check_inputs(videos[:, 0], prompts, self.name)
        idx = self.indices(num_frames)
        k = len(idx)
        frames = videos[:, idx].reshape(
            batch * k, *videos.shape[2:]
        )  # video-major: video i's frames in a row
        meta = {}
        for key, value in metadata.items():
            if isinstance(value, torch.Tensor) and len(value) == batch:
                meta[key] = value.repeat_interleave(k, dim=0)
            elif isinstance(value, (list, tuple)) and len(value) == batch:
                meta[key] = [v for v in value for _ in range(k)]
            else:
                meta[key] = value
        out = self.inner.evaluate(frames, [p for p in prompts for _ in range(k)], **meta)
        total = self._reduce(out.total, batch, k)
        components = {n: self._reduce(v, batch, k).detach() for n, v in out.components.items()}
        return RewardOutput(total=total if self.differentiable else total.detach(), components=components)

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], **metadata) -> torch.Tensor:
        return self.evaluate(videos, prompts, **metadata).total

    def __repr__(self) -> str:
        return f"FrameReward({self.inner!r}, frames={self.frames}, every={self.every}, num={self.num}, combine={self.combine!r})"


class VideoReward(Reward):
    """A reward on whole clips: ``fn(videos, prompts, **metadata)`` with ``videos`` ``(b, F, 3, H, W)`` in [0, 1],
    returning ``b`` numbers; chunked by ``batch_size`` videos like any reward."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        differentiable: bool = False,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ):
        if not callable(fn):
            raise TypeError(
                f"VideoReward needs a callable, got {type(fn).__name__}; pass fn(videos, prompts, **metadata)."
            )
        super().__init__(batch_size=batch_size, device=device)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.differentiable = differentiable

    def settings(self) -> dict[str, Any]:
        return {"fn": f"{getattr(self.fn, '__module__', '')}.{getattr(self.fn, '__qualname__', '')}"}

    def weight_modules(self) -> list[torch.nn.Module]:
        return [self.fn] if isinstance(self.fn, torch.nn.Module) else []

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], **metadata) -> torch.Tensor:
        if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
            shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
            raise ValueError(
                f"video reward {self.name!r} got {shape}; pass videos (B, F, 3, H, W) in [0, 1]."
            )
        prompts = check_inputs(videos[:, 0], prompts, self.name)
        if not self._loaded:
            self.load(self.device if self.device is not None else videos.device)
        batch = videos.shape[0]
        step = self.batch_size or batch
        context = torch.enable_grad() if self.differentiable and torch.is_grad_enabled() else torch.no_grad()
        chunks = []
        with context:
            for start in range(0, batch, step):
                stop = min(start + step, batch)
                meta = split_metadata(metadata, batch, start, stop)
                part = self.fn(videos[start:stop].to(self.device), prompts[start:stop], **meta)
                chunks.append(to_score_tensor(part, stop - start, self.device, self.name).to(videos.device))
        scores = torch.cat(chunks)
        return scores if self.differentiable else scores.detach()


def video_reward(
    fn=None, *, name: str | None = None, differentiable: bool = False, batch_size: int | None = None
):
    """Make ``fn(videos, prompts, **metadata)`` a :class:`VideoReward`; usable as ``@video_reward`` or
    ``@video_reward(differentiable=True)``."""

    def wrap(f):
        return VideoReward(f, name=name, differentiable=differentiable, batch_size=batch_size)

    return wrap(fn) if fn is not None else wrap


def for_video(
    reward: Reward,
    *,
    frames: Sequence[int] | None = None,
    every: int = 0,
    num: int = 0,
    combine: str = "mean",
) -> Reward:
    """The reward a video run uses: a :class:`VideoReward` as it is, an image reward as a :class:`FrameReward`, and a
    normalised :class:`~diffrl.rewards.CombinedReward` (``normalize`` batch, group or running) as a
    :class:`FrameCombinedReward`: each part scores frames and is combined per video first, then normalised across
    videos, so a video run's statistics are over videos as an image run's are over images (and ReFL and the trainers
    that gather a batch's statistics over processes see the combination they know)."""
    if isinstance(reward, (VideoReward, FrameReward, FrameCombinedReward)):
        return reward
    if isinstance(reward, CombinedReward):
        if (
            len(reward.parts) == 1
            and reward.parts[0][1] == 1.0
            and isinstance(reward.parts[0][0], VideoReward)
        ):
            return reward.parts[0][0]  # a clip reward alone with weight 1 is that reward
        clips = [r.name for r, _ in reward.parts if isinstance(r, VideoReward)]
        if clips:
            raise NotImplementedError(
                f"combining the clip reward {clips[0]!r} with weights or other rewards is not implemented; "
                "use it alone with weight 1, or combine inside your own clip function."
            )
        if reward.normalize is not None:
            return FrameCombinedReward(reward, frames=frames, every=every, num=num, combine=combine)
    return FrameReward(reward, frames=frames, every=every, num=num, combine=combine)


class FrameCombinedReward(CombinedReward):
    """A normalised combination of image rewards in a video run: the same parts, weights, normalisation and name as
    ``combined``, each part a :class:`FrameReward` with the given frame choice. A video's score of each part is the
    ``mean`` / ``min`` of its frames' scores, and the normalisation (``batch``, ``group``, ``running``) then works on
    those per-video scores exactly as on images' (a :class:`FrameReward` around the whole combination would z-score
    frames instead, and hide the combination from the trainers that compute a step's statistics over
    micro-batches and processes)."""

    def __init__(
        self,
        combined: CombinedReward,
        *,
        frames: Sequence[int] | None = None,
        every: int = 0,
        num: int = 0,
        combine: str = "mean",
    ):
        parts = [
            (FrameReward(r, frames=frames, every=every, num=num, combine=combine), w)
            for r, w in combined.parts
        ]
        super().__init__(parts, normalize=combined.normalize, momentum=combined.momentum, name=combined.name)
        self.load_training_state(combined.training_state())

    def _check_inputs(self, images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
        return check_inputs(_as_video(images, self.name)[:, 0], prompts, self.name)

    def indices(self, num_frames: int) -> list[int]:
        """The frames every part scores (they share one choice)."""
        return self.parts[0][0].indices(num_frames)

    def describe(self, num_frames: int) -> str:
        """One line: which frames each part scores, how they are combined, and the normalisation across videos."""
        part = self.parts[0][0]
        idx = part.indices(num_frames)
        which = "every frame" if len(idx) == num_frames else f"frames {idx}"
        names = ", ".join(repr(r.name) for r, _ in self.parts)
        return (
            f"rewards {names} each score {which} of {num_frames} per video, combined by their {part.combine}, "
            f"then {self.normalize}-normalised across videos"
        )
