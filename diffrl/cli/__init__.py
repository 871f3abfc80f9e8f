"""The ``diffrl`` command line: one module per command, each reading its arguments and calling the library.

* ``diffrl train CONFIG [key=value ...]`` (:mod:`diffrl.cli.train`; also ``python -m diffrl.train`` and
  ``accelerate launch -m diffrl.train``) trains with a YAML preset and dotted overrides (:mod:`diffrl.train`).
* ``diffrl download <reward|config.yaml> [key=value ...] [--dry-run]`` (:mod:`diffrl.cli.download`) pre-fetches into
  the Hugging Face cache every hub file that rewards (and the model of a config) need, for clusters whose compute
  nodes are offline: run it on a login node with network, then train with ``HF_HUB_OFFLINE=1``. ``key=value`` words
  after a reward name are its options (``diffrl download hpsv2 version=v2``). ``--dry-run`` lists the exact files
  without fetching them (:mod:`diffrl.hub`).
* ``diffrl sample MODEL [--lora DIR] --prompts FILE_OR_TEXT... --out DIR`` generates images (one fixed seed per
  prompt and image) and ``diffrl eval MODEL [--lora DIR] --prompts FILE --reward NAME[=WEIGHT]...`` scores them
  with rewards (:mod:`diffrl.cli.sample`, one module for both: their parsers share most options; the library is
  :mod:`diffrl.sampling`).
* ``diffrl doctor [CONFIG.yaml] [key=value ...]`` (:mod:`diffrl.cli.doctor`) checks the environment (and a config)
  before a long run (:mod:`diffrl.doctor`).
* ``diffrl serve-reward NAME [key=value ...] --port N`` (:mod:`diffrl.cli.serve`) serves a reward over HTTP, e.g.
  from the reward's own virtualenv or GPU machine, for the ``remote`` reward of a run (:mod:`diffrl.rewards.server`).
* ``diffrl demo [key=value ...]`` (:mod:`diffrl.cli.demo`) runs the embedded toy-world demo (:mod:`diffrl.demo`).

Every command reports the errors it knows the same way, one line on stderr and an exit code: see
:mod:`diffrl.cli.errors`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "main"]

#: Each command: the module of :mod:`diffrl.cli` and its function that reads the words after the command name, and
#: the line ``diffrl --help`` shows.
COMMANDS = {
    "train": ("train", "main", "train with a YAML config (same as python -m diffrl.train)"),
    "download": (
        "download",
        "main",
        "pre-fetch the hub files that rewards or a config need into the HF cache",
    ),
    "doctor": ("doctor", "main", "check the environment (and a config) before a long run"),
    "demo": ("demo", "main", "fine-tune the toy-world model on a CPU and draw before/after pictures"),
    "sample": ("sample", "main", "generate images from a model plus an optional trained LoRA"),
    "eval": ("sample", "eval_main", "sample a prompt set and score it with rewards"),
    "serve-reward": ("serve", "main", "serve a reward over HTTP for the 'remote' reward of a run elsewhere"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl", description="RL fine-tuning of flow-matching text-to-image models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (*_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``diffrl COMMAND ...``: the command's own parser reads the rest (so ``diffrl doctor --help`` is the
    doctor's, and options may come before positional words)."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in COMMANDS:
        module, function, _ = COMMANDS[words[0]]
        return getattr(importlib.import_module(f"diffrl.cli.{module}"), function)(words[1:])
    _parser().parse_args(words)  # --help, or a usage error that names the commands (exit 2)
    return 2
