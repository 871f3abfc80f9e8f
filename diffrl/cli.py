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

__all__ = ["main"]


def _download(args) -> int:
    from diffrl.hub import DownloadError, collect_targets, fetch, list_hub_files

    rewards, models = collect_targets(args.targets)
    if not rewards and not models:
        print("nothing to download: name a reward or a config.", file=sys.stderr)
        return 2
    files = list_hub_files(rewards, models)
    if args.dry_run:
        return 0
    try:
        fetch(files, models)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
