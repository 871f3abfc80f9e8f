"""The Hugging Face hub files a run needs: which ones (rewards and models named by words or configs), whether they
are in the local cache (no network call), and fetching them.

``diffrl download`` fetches what :func:`collect_targets` finds; ``diffrl doctor`` looks the same files up in the cache
(:mod:`diffrl.doctor.rewards`). Both read a config with :func:`config_targets`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "DownloadError",
    "config_targets",
    "collect_targets",
    "reward_hub_files",
    "list_hub_files",
    "fetch",
    "hf_cache_dir",
    "cached_file",
]

#: Config keys that name rewards (a name, a list of names or dicts, or a ``{name: weight | options}`` map) and models.
REWARD_KEYS = ("reward", "rewards", "eval_reward", "eval_rewards")
MODEL_KEYS = ("model", "pretrained_model")


class DownloadError(RuntimeError):
    """A required hub file could not be fetched."""


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _rewards_from_value(value: Any) -> list[tuple[str, dict]]:
    """Reward specs from a config value: a name, a list of names/dicts, or a {name: weight | options} map."""
    if value is None:
        return []
    if isinstance(value, str):
        return [(value, {})]
    if isinstance(value, list):
        out = []
        for item in value:
            out.extend(_rewards_from_value(item))
        return out
    if isinstance(value, dict):
        if "name" in value:
            kwargs = dict(value.get("kwargs", value.get("options", {})) or {})
            return [(value["name"], kwargs)]
        out = []
        for name, spec in value.items():
            kwargs = {}
            if isinstance(spec, dict):
                kwargs = dict(spec.get("kwargs", spec.get("options", {})) or {})
            out.append((str(name), kwargs))
        return out
    raise ValueError(
        f"cannot read reward specs from {value!r}; use a name, a list or a {{name: weight}} map."
    )


def _scan(node: Any, rewards: list, models: list) -> None:
    if isinstance(node, dict):
        options = node.get("reward_kwargs") if isinstance(node.get("reward_kwargs"), dict) else {}
        for key, value in node.items():
            if key in REWARD_KEYS:
                rewards.extend(
                    (name, kw or dict(options.get(name) or {})) for name, kw in _rewards_from_value(value)
                )
            elif key in MODEL_KEYS and isinstance(value, str):
                models.append(value)
            elif key in MODEL_KEYS and isinstance(value, dict) and isinstance(value.get("path"), str):
                models.append(value["path"])  # a diffrl train config: model: {path: ...}
            elif key != "reward_kwargs":
                _scan(value, rewards, models)
    elif isinstance(node, list):
        for item in node:
            _scan(item, rewards, models)


def config_targets(config: Any) -> tuple[list[tuple[str, dict]], list[str]]:
    """``(rewards, models)`` a config names: ``(name, options)`` of every reward (options from the reward's own
    entry, else from ``reward_kwargs`` beside it) and every model path, at any depth of the (YAML-loaded) dict, in
    order, repeats included. A diffrl train config (``diffrl.config.config_to_dict``) reads the same way."""
    rewards: list[tuple[str, dict]] = []
    models: list[str] = []
    _scan(config, rewards, models)
    return rewards, models


def collect_targets(words: list[str]) -> tuple[list[tuple[str, dict]], list[str]]:
    """``(rewards, models)`` named by command-line words: reward names with ``key=value`` options, YAML configs."""
    rewards: list[tuple[str, dict]] = []
    models: list[str] = []
    for word in words:
        if "=" in word and not word.endswith((".yaml", ".yml")):
            if not rewards:
                raise ValueError(f"option {word!r} comes before any reward; write it after the reward name.")
            key, _, value = word.partition("=")
            rewards[-1][1][key] = _parse_value(value)
        elif word.endswith((".yaml", ".yml")):
            import yaml

            path = Path(word)
            if not path.is_file():
                raise FileNotFoundError(
                    f"config {word} does not exist; pass a YAML config path or a reward name."
                )
            found_rewards, found_models = config_targets(yaml.safe_load(path.read_text()) or {})
            rewards.extend(found_rewards)
            models.extend(found_models)
        else:
            rewards.append((word, {}))
    return rewards, models


def reward_hub_files(name: str, kwargs: dict) -> list:
    """The :class:`~diffrl.rewards.HubFile` list a reward (registry name or ``module:attr``) with these options
    loads; raises for an unknown name, a module that does not import, or options it does not take."""
    from diffrl.rewards.registry import reward_class

    hub_files = getattr(reward_class(name), "hub_files", None)
    return hub_files(**kwargs) if hub_files is not None else []


def list_hub_files(
    rewards: Iterable[tuple[str, dict]], models: Iterable[str], log: Callable[[str], None] = print
) -> list:
    """Every hub file of ``rewards``, each reward's listed with :func:`log`; the models are listed as whole
    pipelines (their files are known once ``model_index.json`` is read)."""
    files = []
    for name, kwargs in rewards:
        found = reward_hub_files(name, kwargs)
        log(f"reward {name}{' ' + str(kwargs) if kwargs else ''}: {len(found)} hub file(s)")
        for f in found:
            log(f"  {f.repo_id} {f.filename}{' (optional)' if f.optional else ''}")
        files.extend(found)
    for model in models:
        log(f"model {model}: the diffusers pipeline files (model_index.json and every component it names)")
    return files


def fetch(files: Iterable, models: Iterable[str], log: Callable[[str], None] = print) -> None:
    """Fetch ``files`` (each once) and the pipelines of ``models`` into the Hugging Face cache; an optional file
    that cannot be fetched is skipped, a required one raises :class:`DownloadError`."""
    from huggingface_hub import hf_hub_download

    for f in dict.fromkeys(files):
        try:
            path = hf_hub_download(f.repo_id, f.filename, revision=f.revision)
        except Exception as err:  # noqa: BLE001 - report and go on with the other files
            if f.optional:
                log(f"  skipped optional {f}: {err.__class__.__name__}")
                continue
            raise DownloadError(f"could not fetch {f}: {err}") from err
        log(f"  fetched {f} -> {path}")
    for model in models:
        if Path(model).is_dir():
            log(f"  model {model} is a local directory; nothing to fetch")
            continue
        from diffusers import DiffusionPipeline

        path = DiffusionPipeline.download(model)
        log(f"  fetched model {model} -> {path}")


# ---------------------------------------------------------------------------------------------- the local cache


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The file's path in the Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir(), revision=revision)
    except Exception:  # noqa: BLE001 - e.g. a repo id that is not valid: not in the cache either
        return None
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    return None
