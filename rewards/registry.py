"""Reward registry: built-ins by name (imported lazily), user rewards by ``"package.module:attr"``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .base import Reward, as_reward

__all__ = ["REWARDS", "register_reward", "load_reward", "available_rewards", "reward_class", "import_attr"]

# name -> "module:Class" (imported on first use, so `import diffrl.rewards` stays light) or a class.
REWARDS: dict[str, str | type[Reward] | Callable[..., Reward]] = {
    "hpsv2": "diffrl.rewards.hpsv2:HPSv2",
    "pickscore": "diffrl.rewards.pickscore:PickScore",
    "clipscore": "diffrl.rewards.clipscore:CLIPScore",
    "aesthetic": "diffrl.rewards.aesthetic:AestheticScore",
    "imagereward": "diffrl.rewards.imagereward:ImageReward",
    "vlm_yes_prob": "diffrl.rewards.vlm:VLMYesProb",
    "ocr": "diffrl.rewards.ocr:OCRReward",
    "unifiedreward": "diffrl.rewards.vlm_judge:UnifiedRewardScore",
    "vlm_pairwise_winrate": "diffrl.rewards.vlm_judge:VLMPairwiseWinRate",
    "unifiedreward_pairwise_winrate": "diffrl.rewards.vlm_judge:UnifiedRewardPairwiseWinRate",
    "hpsv3": "diffrl.rewards.hpsv3:HPSv3",
    "geneval": "diffrl.rewards.geneval:GenEval",
    "shapes_verifier": "diffrl.toy.rewards:ShapesVerifier",
    "shapes_accuracy": "diffrl.toy.rewards:ShapesAccuracy",
    "shapes_extra_objects": "diffrl.toy.rewards:ShapesExtraObjects",
    "shapes_soft": "diffrl.toy.rewards:ShapesSoft",
    "brightness": "diffrl.rewards.simple:Brightness",
    "saturation": "diffrl.rewards.simple:Saturation",
    "jpeg_compressibility": "diffrl.rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "diffrl.rewards.jpeg:JpegIncompressibility",
    "remote": "diffrl.rewards.remote:RemoteReward",
}


def register_reward(name: str):
    """Decorator that makes ``load_reward(name)`` build a :class:`Reward` subclass, or wrap a plain reward function."""

    def deco(obj):
        REWARDS[name] = obj
        return obj

    return deco


def available_rewards() -> list[str]:
    return sorted(REWARDS)


def import_attr(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r} is not of the form 'package.module:attr'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"reward {spec!r}: cannot import module {module_name!r} ({err}); check the name and PYTHONPATH."
        ) from err
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise AttributeError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}.") from None
    return obj


def reward_class(name: str):
    """The class (or factory) registered under ``name``, or the object a ``"package.module:attr"`` name points at."""
    if ":" in name:
        return import_attr(name)
    if name not in REWARDS:
        import difflib

        close = difflib.get_close_matches(name, available_rewards(), n=1)
        raise ValueError(
            f"unknown reward {name!r}{f' (did you mean {close[0]}?)' if close else ''}; "
            f"available: {', '.join(available_rewards())}, "
            "or a 'package.module:attr' pointing at your own reward or function."
        )
    entry = REWARDS[name]
    if isinstance(entry, str):
        entry = import_attr(entry)
        REWARDS[name] = entry
    return entry


def load_reward(spec: str | Reward | Callable[..., Any], **kwargs) -> Reward:
    """Build a reward from a registry name (``"hpsv2"``), a ``"package.module:attr"`` string, a :class:`Reward`
    or any callable. ``kwargs`` go to the reward's constructor (or to :func:`as_reward` for a plain function)."""
    if isinstance(spec, Reward):
        if kwargs:
            raise ValueError(
                f"options {sorted(kwargs)} cannot be applied to an already built reward {spec.name!r}."
            )
        return spec
    if isinstance(spec, str):
        obj = reward_class(spec)
    else:
        obj = spec
    if isinstance(obj, Reward):
        if kwargs:
            raise ValueError(
                f"options {sorted(kwargs)} cannot be applied to an already built reward {obj.name!r}."
            )
        return obj
    if isinstance(obj, type) and issubclass(obj, Reward):
        _check_options(spec, obj.__init__, kwargs)
        return obj(**kwargs)
    if callable(obj):
        _check_options(spec, as_reward, kwargs, skip=("fn",))
        return as_reward(obj, **kwargs)
    raise ValueError(
        f"reward {spec!r} is a {type(obj).__name__}, not a reward; point at a Reward class, a Reward or a function "
        "(images, prompts, **metadata) -> scores."
    )


def _check_options(spec, fn, kwargs: dict, skip: tuple[str, ...] = ()) -> None:
    """One sentence for an option the reward does not take (instead of the constructor's TypeError)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [
        n
        for n, p in params.items()
        if n != "self" and n not in skip and p.kind is not inspect.Parameter.VAR_POSITIONAL
    ]
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        name = spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)
        raise ValueError(
            f"reward {name!r} has no option {unknown[0]!r}{hint}; its options are {', '.join(known) or 'none'}."
        )
