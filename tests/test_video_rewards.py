"""The video reward contract (``diffrl.rewards.video``): frame choice, image rewards on frames combined by mean or min,
clip rewards on whole videos, and the config checks of ``sample.num_frames`` and the ``video`` section; all on
hand-made videos with toy rewards whose scores are computed by hand."""

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.rewards import (
    CombinedReward,
    FrameCombinedReward,
    FrameReward,
    VideoReward,
    as_reward,
    for_video,
    select_frames,
    video_reward,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _video(levels: list[list[float]], size: int = 4) -> torch.Tensor:
    """Videos ``(B, F, 3, size, size)`` whose frame f of video b is the constant grey ``levels[b][f]``."""
    t = torch.tensor(levels, dtype=torch.float32)
    return t[:, :, None, None, None].expand(*t.shape, 3, size, size).clone()


def mean_level(images, prompts, **_):
    return images.mean(dim=(1, 2, 3))


def distance_to_target(images, prompts, target):
    return -(images.mean(dim=(1, 2, 3)) - torch.as_tensor(target, dtype=torch.float32)).abs()


@pytest.mark.parametrize(
    "num_frames,kwargs,expected",
    [
        (5, {}, [0, 1, 2, 3, 4]),
        (5, {"frames": [0, -1]}, [0, 4]),
        (5, {"frames": [-1, 4, 0]}, [0, 4]),  # distinct and sorted
        (9, {"every": 4}, [0, 4, 8]),
        (10, {"every": 4}, [0, 4, 8]),
        (5, {"num": 3}, [0, 2, 4]),
        (10, {"num": 4}, [0, 3, 6, 9]),
        (81, {"num": 2}, [0, 80]),
        (81, {"num": 1}, [40]),  # the middle frame
        (3, {"num": 8}, [0, 1, 2]),  # more asked than there are: each frame once
    ],
)
def test_select_frames(num_frames, kwargs, expected):
    assert select_frames(num_frames, **kwargs) == expected


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"frames": [0], "num": 2}, "frames and num are all set"),
        ({"frames": [5]}, r"frame index 5 is outside a 5-frame video; use indices in -5..4"),
        ({"frames": [-6]}, "outside a 5-frame video"),
        ({"every": -1}, "every=-1 must be a positive integer"),
        ({"num": 1.5}, "num=1.5 must be a positive integer"),
    ],
)
def test_select_frames_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_frames(5, **kwargs)


def test_frame_reward_mean_and_min_by_hand():
    videos = _video([[0.1, 0.5, 0.9, 0.3, 0.7], [0.2, 0.2, 0.4, 0.8, 0.6]])
    r = FrameReward(as_reward(mean_level), frames=[0, -1])
    assert r.name == "mean_level"
    torch.testing.assert_close(r(videos, ["a", "b"]), torch.tensor([0.4, 0.4]))
    r = FrameReward(as_reward(mean_level), every=2, combine="min")
    torch.testing.assert_close(r(videos, ["a", "b"]), torch.tensor([0.1, 0.2]))
    r = FrameReward(as_reward(mean_level), num=3, combine="mean")  # frames 0, 2, 4
    out = r.evaluate(videos, ["a", "b"])
    torch.testing.assert_close(out.total, torch.tensor([(0.1 + 0.9 + 0.7) / 3, (0.2 + 0.4 + 0.6) / 3]))
    torch.testing.assert_close(out.components["mean_level"], out.total)
    # an image (B, 3, H, W) is a one-frame video
    torch.testing.assert_close(r(videos[:, 1], ["a", "b"]), torch.tensor([0.5, 0.2]))
    assert "frames [0, 2, 4] of 5" in r.describe(5)
    assert "every frame of 3" in r.describe(3)


def test_frame_reward_metadata_follows_its_video():
    """Each frame is scored with its own video's prompt and metadata (repeated per frame, video-major)."""
    seen = []

    def record(images, prompts, target):
        seen.append((list(prompts), list(target)))
        return distance_to_target(images, prompts, target)

    videos = _video([[0.2, 0.4, 0.6], [0.9, 0.5, 0.1]])
    r = FrameReward(as_reward(record), frames=[0, 2], combine="min")
    out = r(videos, ["p", "q"], target=[0.3, 0.5])
    assert seen == [(["p", "p", "q", "q"], [0.3, 0.3, 0.5, 0.5])]
    torch.testing.assert_close(
        out, torch.tensor([-0.3, -0.4])
    )  # worst of |0.2-0.3|, |0.6-0.3|; |0.9-.5|, |0.1-.5|
    tensor_meta = r(videos, ["p", "q"], target=torch.tensor([0.3, 0.5]))
    torch.testing.assert_close(tensor_meta, out)


def test_frame_reward_gradient_reaches_only_scored_frames():
    videos = _video([[0.1, 0.5, 0.9, 0.3, 0.7]]).requires_grad_(True)
    r = FrameReward(as_reward(mean_level, differentiable=True), frames=[1, 3])
    assert r.differentiable
    r(videos, ["a"]).sum().backward()
    per_frame = videos.grad.sum(dim=(2, 3, 4))[0]
    # d/dx of mean over 2 frames of each frame's pixel mean: 1/2 spread over the frame's 48 values
    torch.testing.assert_close(per_frame, torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0]))


def test_frame_reward_wraps_a_combination():
    combined = CombinedReward(
        [(as_reward(mean_level), 2.0), (as_reward(lambda i, p: 1 - mean_level(i, p), name="dark"), 1.0)]
    )
    videos = _video([[0.2, 0.6]])
    out = FrameReward(combined).evaluate(videos, ["a"])
    # per frame 2 m + (1 - m) = 1 + m; mean over frames 1 + 0.4
    torch.testing.assert_close(out.total, torch.tensor([1.4]))
    torch.testing.assert_close(out.components["dark"], torch.tensor([0.6]))


def test_normalised_combination_scores_frames_per_part_then_normalises_videos():
    """A batch-normalised sum in a video run: each part's frame scores are averaged per video, then z-scored across
    the videos (population std + 1e-8, as for images), by hand; a FrameReward around the whole sum z-scored the
    frames instead. The trainers see a CombinedReward (ReFL and the Flow-GRPO gather take its whole-step
    statistics over micro-batches and processes), with the frame choice of its parts."""
    dark = as_reward(lambda i, p: 1 - mean_level(i, p), name="dark")
    combined = CombinedReward([(as_reward(mean_level), 2.0), (dark, 1.0)], normalize="batch", name="sum")
    wrapped = for_video(combined, frames=[0, -1])
    assert isinstance(wrapped, FrameCombinedReward) and isinstance(wrapped, CombinedReward)
    assert (wrapped.name, wrapped.normalize, wrapped.indices(5)) == ("sum", "batch", [0, 4])
    assert for_video(wrapped) is wrapped
    videos = _video([[0.2, 0.0, 0.0, 0.0, 0.6], [0.1, 0.0, 0.0, 0.0, 0.1], [0.9, 0.0, 0.0, 0.0, 0.5]])
    out = wrapped.evaluate(videos, ["a", "b", "c"])
    m = torch.tensor([0.4, 0.1, 0.7])  # the mean level of frames 0 and 4 per video

    def z(x):
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-8)

    torch.testing.assert_close(out.total, 2 * z(m) + z(1 - m))
    torch.testing.assert_close(out.components["mean_level"], m)
    torch.testing.assert_close(out.components["dark"], 1 - m)
    line = wrapped.describe(5)
    assert line == (
        "rewards 'mean_level', 'dark' each score frames [0, 4] of 5 per video, combined by their mean, "
        "then batch-normalised across videos"
    )
    # an unnormalised sum stays one FrameReward (its mean over frames is the same sum of per-part means)
    plain = for_video(CombinedReward([(as_reward(mean_level), 2.0), (dark, 1.0)]))
    assert type(plain) is FrameReward


def test_clip_reward_sees_whole_videos():
    @video_reward
    def smoothness(videos, prompts):
        # minus the mean absolute change between consecutive frames
        return -(videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))

    assert isinstance(smoothness, VideoReward) and smoothness.name == "smoothness"
    videos = _video([[0.0, 0.5, 0.5], [0.2, 0.2, 0.2]])
    torch.testing.assert_close(smoothness(videos, ["a", "b"]), torch.tensor([-0.25, 0.0]))
    chunked = VideoReward(smoothness.fn, batch_size=1)
    torch.testing.assert_close(chunked(videos, ["a", "b"]), torch.tensor([-0.25, 0.0]))
    with pytest.raises(ValueError, match=r"pass videos \(B, F, 3, H, W\)"):
        smoothness(videos[:, 0], ["a", "b"])
    assert for_video(smoothness) is smoothness
    image = as_reward(mean_level)
    wrapped = for_video(image, num=1, combine="min")
    assert isinstance(wrapped, FrameReward) and wrapped.inner is image and wrapped.indices(5) == [2]
    with pytest.raises(NotImplementedError, match="combining the clip reward 'smoothness'"):
        for_video(CombinedReward([(smoothness, 0.5)]))
    with pytest.raises(ValueError, match="already scores whole clips"):
        FrameReward(smoothness)
    with pytest.raises(ValueError, match="combine='max' is not known"):
        FrameReward(image, combine="max")


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "sample.num_frames=6",
            r"sample.num_frames=6 must be 1 more than a multiple of 4 for Wan's VAE; use 5 or 9",
        ),
        ("sample.num_frames=-1", "sample.num_frames=-1 must be 0"),
        ("video.combine=max", "video.combine='max' must be mean or min"),
        ("video.every=0", None),
        ("video.num=-2", "video.num=-2 must be at least 0"),
        ("video.fps=0", "video.fps=0 must be at least 1"),
    ],
)
def test_config_checks(override, message):
    extra = [override, "video.frames=[0,-1]"] if override == "video.every=0" else [override]
    if message is None:
        load_config(ROOT / "configs" / "tiny" / "flow_grpo.yaml", extra)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny" / "flow_grpo.yaml", extra)


def test_config_refuses_two_frame_choices_and_out_of_range_frames():
    cfg = ROOT / "configs" / "tiny" / "flow_grpo.yaml"
    with pytest.raises(ConfigError, match="video.frames and video.num are all set"):
        load_config(cfg, ["video.frames=[0]", "video.num=3"])
    with pytest.raises(ConfigError, match="video.frames has index 9 outside a 5-frame video"):
        load_config(cfg, ["sample.num_frames=5", "video.frames=[0,9]"])
