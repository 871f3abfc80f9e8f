"""``diffrl download <reward|config.yaml> [key=value ...] [--dry-run]``: list the hub files that rewards (and the
model of a config) need, and fetch them into the Hugging Face cache (:mod:`diffrl.hub`)."""

from __future__ import annotations

import argparse
import sys

from .errors import USAGE, CommandErrors

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl download",
        description="Pre-fetch the hub files that rewards or a config need into the HF cache.",
    )
    parser.add_argument(
        "targets", nargs="+", help="reward names (with key=value options after them) or YAML configs"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the files without fetching them")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffrl.hub import collect_targets, fetch, list_hub_files

    with CommandErrors() as errors:
        rewards, models = collect_targets(args.targets)
        if not rewards and not models:
            print("nothing to download: name a reward or a config.", file=sys.stderr)
            return USAGE
        files = list_hub_files(rewards, models)
        if args.dry_run:
            return 0
        errors.started()
        fetch(files, models)
    return errors.code
