"""Reward checks: every reward of a config has its hub files in the Hugging Face cache (the files ``diffrl
download --dry-run`` lists, from :mod:`diffrl.hub`), looked up without any network call to the hub; a ``remote``
reward's server is asked ``GET /health`` once (no retries, a 5-second timeout)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..hub import cached_file, config_targets, hf_cache_dir, reward_hub_files
from .findings import Finding, gib, split_fix

__all__ = ["RewardStatus", "reward_status", "config_rewards", "remote_finding"]


@dataclass
class RewardStatus:
    """A reward's finding, with the size of its cached weight files (for the memory estimate)."""

    name: str
    kwargs: dict
    finding: Finding
    nbytes: int = 0  # size of its cached weight files
    cached: bool = True


def config_rewards(cfg) -> list[tuple[str, dict]]:
    """The rewards of a validated config with their options, read as ``diffrl download`` reads a config."""
    from ..config import config_to_dict

    rewards, _ = config_targets(config_to_dict(cfg))
    unique: dict[str, tuple[str, dict]] = {}
    for name, kwargs in rewards:
        unique.setdefault(f"{name} {json.dumps(kwargs, sort_keys=True, default=str)}", (name, kwargs))
    return list(unique.values())


def reward_status(name: str, kwargs: dict, label: str) -> RewardStatus:
    """Whether the reward's hub files are in the cache (and its local paths exist); ``label`` names the config in
    the fix (``diffrl download <label>``)."""
    options = "".join(f" {k}={v}" for k, v in kwargs.items())
    try:
        files = reward_hub_files(name, dict(kwargs))
    except Exception as err:  # noqa: BLE001 - unknown name, bad module path, bad options
        what, fix = split_fix(str(err), "Fix the reward's name or options in the config.")
        return RewardStatus(name, kwargs, Finding(f"reward {name}", "FAIL", what, fix), cached=False)
    missing_local = [
        f"{k}={v}"
        for k, v in kwargs.items()
        if isinstance(v, str) and v.startswith(("/", ".", "~")) and not Path(v).expanduser().exists()
    ]
    if missing_local:
        return RewardStatus(
            name,
            kwargs,
            Finding(
                f"reward {name}",
                "FAIL",
                f"local path {missing_local[0]} does not exist",
                "Point the option at an existing file or directory, or drop it to use the default hub weights.",
            ),
            cached=False,
        )
    if name == "remote":
        return RewardStatus(name, kwargs, remote_finding(kwargs), cached=True)
    required = [f for f in files if not f.optional]
    present = {f: cached_file(f.repo_id, f.filename, f.revision) for f in files}
    absent = [f for f in required if present[f] is None]
    nbytes = sum(p.stat().st_size for p in present.values() if p is not None)
    if absent:
        listed = ", ".join(str(f) for f in absent[:4]) + (
            f" and {len(absent) - 4} more" if len(absent) > 4 else ""
        )
        return RewardStatus(
            name,
            kwargs,
            Finding(
                f"reward {name}",
                "FAIL",
                f"weights not present offline: {listed} (not in the HF cache {hf_cache_dir()})",
                f"Run `diffrl download {name}{options}` (or `diffrl download {label}`) where there is network, "
                "into the same HF cache, or pass a local path in reward_kwargs.",
            ),
            nbytes,
            cached=False,
        )
    if not files:
        return RewardStatus(name, kwargs, Finding(f"reward {name}", "OK", "needs no hub weights"))
    return RewardStatus(
        name,
        kwargs,
        Finding(f"reward {name}", "OK", f"{len(required)} hub file(s) in the HF cache ({gib(nbytes)})"),
        nbytes,
    )


def remote_finding(kwargs: dict) -> Finding:
    """A ``remote`` reward's server, asked ``GET /health`` once: OK with what it serves and whether its weights are
    loaded, FAIL with the cause when it does not answer, answers an error, or is not a diffrl reward server."""
    from diffrl.rewards.remote import RemoteReward

    options = {**kwargs, "retries": 0, "timeout": min(float(kwargs.get("timeout", 5.0)), 5.0)}
    try:
        health = RemoteReward(**options).health
    except Exception as err:  # noqa: BLE001 - any failure is the finding
        return Finding(
            "reward remote",
            "FAIL",
            str(err).rstrip("."),
            "Start the server (`diffrl serve-reward <reward> --port PORT` on the scoring machine) or fix "
            "reward_kwargs.remote.url.",
        )
    url = options.get("url")
    if health.get("error"):
        return Finding(
            "reward remote",
            "FAIL",
            f"the server at {url} failed to load {health.get('name')!r}: {health['error']}",
            "Fix the served reward (see the server's log) and restart it.",
        )
    state = "loaded" if health.get("loaded") else "still loading its weights"
    needs = ", ".join(health.get("required_metadata") or []) or "no metadata"
    return Finding(
        "reward remote",
        "OK",
        f"the server at {url} serves {health.get('name')!r} ({state}; needs {needs}; device "
        f"{health.get('device', '?')})",
    )
