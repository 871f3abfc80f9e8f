"""``python -m diffrl.train CONFIG [key=value ...]`` / ``accelerate launch -m diffrl.train ...``: the ``diffrl train``
command (:mod:`diffrl.cli.train`) under the module name launchers use.

Reads a YAML preset, applies dotted overrides, validates everything before any model is loaded, builds the
trainer named by ``algorithm`` and trains. :func:`build_trainer` (from :mod:`diffrl.trainers`) is the library part.
"""

from __future__ import annotations

import sys

from diffrl.trainers import TRAINERS, build_trainer, trainer_class

__all__ = ["build_trainer", "trainer_class", "TRAINERS"]

if __name__ == "__main__":
    from diffrl.cli.train import main

    sys.exit(main())
