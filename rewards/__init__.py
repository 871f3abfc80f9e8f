"""diffrl.rewards: the reward zoo.

A reward is called as ``reward(images, prompts, **metadata) -> (B,) float32`` with images ``(B, 3, H, W)`` in
[0, 1]. Built-ins load by name (``load_reward("hpsv2")``); any function becomes a reward with :func:`as_reward`;
:class:`CombinedReward` sums several with weights; :class:`CachedReward` skips images already scored. A
:class:`PairwiseReward` judges two images of one prompt; :class:`GroupWinRate` turns it into a reward (win rates
within groups of equal prompts) and :class:`CachedPairwiseReward` skips pairs already judged.
"""

from .base import FunctionReward, Reward, RewardOutput, as_reward
from .cache import CachedPairwiseReward, CachedReward, ScoreCache
from .combine import CombinedReward
from .pairwise import GroupWinRate, PairwiseReward
from .registry import REWARDS, available_rewards, load_reward, register_reward
from .video import FrameCombinedReward, FrameReward, VideoReward, for_video, select_frames, video_reward
from .weights import HubFile, WeightsNotFoundError

__all__ = [
    "REWARDS",
    "CachedPairwiseReward",
    "CachedReward",
    "CombinedReward",
    "FrameCombinedReward",
    "FrameReward",
    "FunctionReward",
    "GroupWinRate",
    "HubFile",
    "PairwiseReward",
    "Reward",
    "RewardOutput",
    "ScoreCache",
    "VideoReward",
    "WeightsNotFoundError",
    "as_reward",
    "available_rewards",
    "for_video",
    "load_reward",
    "register_reward",
    "select_frames",
    "video_reward",
]
