"""The ``diffrl`` command line.

``diffrl download <reward|config.yaml> [key=value ...] [--dry-run]`` pre-fetches into the Hugging Face cache every
hub file that rewards (and the model of a config) need, for clusters whose compute nodes are offline: run it on a
login node with network, then train with ``HF_HUB_OFFLINE=1``. ``key=value`` words after a reward name are its
options (``diffrl download hpsv2 version=v2``). ``--dry-run`` lists the exact files without fetching them.

``diffrl sample MODEL [--lora DIR] --prompts FILE_OR_TEXT... --out DIR`` generates images (one fixed seed per prompt
and image) and ``diffrl eval MODEL [--lora DIR] --prompts FILE --reward NAME[=WEIGHT]...`` scores them with rewards;
see :mod:`diffrl.generate`.

``diffrl doctor [CONFIG.yaml] [key=value ...]`` checks the environment (and a config) before a long run; see
:mod:`diffrl.doctor`. ``diffrl demo [key=value ...]`` runs the embedded toy-world demo; see :mod:`diffrl.demo`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "collect_targets"]

_REWARD_KEYS = ("reward", "rewards", "eval_reward", "eval_rewards")
_MODEL_KEYS = ("model", "pretrained_model")


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


def _scan_config(node: Any, rewards: list, models: list) -> None:
    if isinstance(node, dict):
        options = node.get("reward_kwargs") if isinstance(node.get("reward_kwargs"), dict) else {}
        for key, value in node.items():
            if key in _REWARD_KEYS:
                rewards.extend(
                    (name, kw or dict(options.get(name) or {})) for name, kw in _rewards_from_value(value)
                )
            elif key in _MODEL_KEYS and isinstance(value, str):
                models.append(value)
            elif key in _MODEL_KEYS and isinstance(value, dict) and isinstance(value.get("path"), str):
                models.append(value["path"])  # a diffrl train config: model: {path: ...}
            elif key != "reward_kwargs":
                _scan_config(value, rewards, models)
    elif isinstance(node, list):
        for item in node:
            _scan_config(item, rewards, models)


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
            _scan_config(yaml.safe_load(path.read_text()) or {}, rewards, models)
        else:
            rewards.append((word, {}))
    return rewards, models


def _reward_files(name: str, kwargs: dict):
    from diffrl.rewards.registry import reward_class

    cls = reward_class(name) if ":" not in name else None
    if cls is None:
        from diffrl.rewards.registry import import_attr

        cls = import_attr(name)
    hub_files = getattr(cls, "hub_files", None)
    return hub_files(**kwargs) if hub_files is not None else []


def _download(args) -> int:
    rewards, models = collect_targets(args.targets)
    if not rewards and not models:
        print("nothing to download: name a reward or a config.", file=sys.stderr)
        return 2
    files = []
    for name, kwargs in rewards:
        found = _reward_files(name, kwargs)
        print(f"reward {name}{' ' + str(kwargs) if kwargs else ''}: {len(found)} hub file(s)")
        for f in found:
            print(f"  {f.repo_id} {f.filename}{' (optional)' if f.optional else ''}")
        files.extend(found)
    for model in models:
        print(f"model {model}: the diffusers pipeline files (model_index.json and every component it names)")
    if args.dry_run:
        return 0
    from huggingface_hub import hf_hub_download

    for f in dict.fromkeys(files):
        try:
            path = hf_hub_download(f.repo_id, f.filename, revision=f.revision)
        except Exception as err:  # noqa: BLE001 - report and go on with the other files
            if f.optional:
                print(f"  skipped optional {f}: {err.__class__.__name__}")
                continue
            print(f"error: could not fetch {f}: {err}", file=sys.stderr)
            return 1
        print(f"  fetched {f} -> {path}")
    for model in models:
        if Path(model).is_dir():
            print(f"  model {model} is a local directory; nothing to fetch")
            continue
        from diffusers import DiffusionPipeline

        path = DiffusionPipeline.download(model)
        print(f"  fetched model {model} -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["doctor"]:  # its own parser, so options may come first (argparse.REMAINDER refuses them)
        from diffrl.doctor import main as doctor_main

        return doctor_main(words[1:])
    if words[:1] == ["demo"]:
        from diffrl.demo import main as demo_main

        return demo_main(words[1:])
    if words[:1] == ["train"]:  # likewise: `diffrl train --help` is the train parser's
        from diffrl.train import main as train_main

        return train_main(words[1:])
    parser = argparse.ArgumentParser(
        prog="diffrl", description="RL fine-tuning of flow-matching text-to-image models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser(
        "train", help="train with a YAML config (same as python -m diffrl.train)", add_help=False
    )
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    dl = sub.add_parser(
        "download", help="pre-fetch the hub files that rewards or a config need into the HF cache"
    )
    dl.add_argument(
        "targets", nargs="+", help="reward names (with key=value options after them) or YAML configs"
    )
    dl.add_argument("--dry-run", action="store_true", help="list the files without fetching them")
    dr = sub.add_parser(
        "doctor", help="check the environment (and a config) before a long run", add_help=False
    )
    dr.add_argument("rest", nargs=argparse.REMAINDER, help="see diffrl doctor --help")
    de = sub.add_parser(
        "demo", help="fine-tune the toy-world model on a CPU and draw before/after pictures", add_help=False
    )
    de.add_argument("rest", nargs=argparse.REMAINDER, help="see diffrl demo --help")
    from diffrl.generate import add_parsers

    add_parsers(sub)  # sample, eval
    args = parser.parse_args(argv)
    if args.command == "train":
        from diffrl.train import main as train_main

        return train_main(args.rest)
    if args.command in ("sample", "eval"):
        from diffrl.generate import run_command

        return run_command(args)
    try:
        if args.command == "download":
            return _download(args)
    except (ValueError, FileNotFoundError, ImportError, AttributeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
