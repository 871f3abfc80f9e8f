"""``diffrl serve-reward NAME_OR_MODULE:ATTR [key=value ...] [--host H] [--port N] [--device D] [--max-batch N]
[--batch-wait-ms M]``: serve a reward over HTTP (:func:`diffrl.rewards.server.serve`) for the ``remote`` reward of a
training run elsewhere (:mod:`diffrl.rewards.remote`). ``key=value`` words are the reward's options (values read as
YAML: ``version=v2.1``, ``strict=true``)."""

from __future__ import annotations

import argparse

from .errors import CommandErrors

__all__ = ["build_parser", "parse_options", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl serve-reward",
        description="Serve a reward over HTTP for the 'remote' reward (reward_kwargs: {remote: {url: ...}}).",
    )
    parser.add_argument("reward", help="a registered reward name or package.module:attr")
    parser.add_argument("options", nargs="*", help="the reward's options as key=value, e.g. version=v2.1")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; reach it from elsewhere through an SSH "
        "tunnel, or bind 0.0.0.0 on a trusted network: there is no authentication)",
    )
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free one, printed)")
    parser.add_argument(
        "--device", default=None, help="where the reward runs (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--max-batch", type=int, default=32, help="most images merged from concurrent requests (default 32)"
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="how long to wait for more requests to merge after the first one (default 0: merge the requests "
        "that queued while the previous batch was scored; a lone client then waits for nothing)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default as diffrl train; see set_cpu_threads)",
    )
    return parser


def parse_options(words: list[str]) -> dict:
    """``key=value`` words -> options (values read as YAML); a word without ``=`` is a ValueError."""
    import yaml

    options = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ValueError(
                f"option {word!r} is not key=value; write e.g. version=v2.1 after the reward name."
            )
        options[key] = yaml.safe_load(value)
    return options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    with CommandErrors() as errors:
        from diffrl.rewards.server import serve
        from diffrl.utils import set_cpu_threads

        set_cpu_threads(args.threads)
        serve(
            args.reward,
            options=parse_options(args.options),
            host=args.host,
            port=args.port,
            device=args.device,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            on_listening=errors.started,
        )
    return errors.code
