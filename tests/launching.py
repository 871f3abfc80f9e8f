"""The two-process CPU launch the tests use: ``accelerate launch --multi_gpu`` (torchrun) with gloo on the CPU.

``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate 1.15 (``--cpu`` takes the simple
launcher); ``--multi_gpu`` with ``ACCELERATE_USE_CPU=true`` in the environment starts two CPU processes
(tests/test_distributed.py's docstring)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_command() -> list[str]:
    """``accelerate launch`` of ``-m diffrl.train`` on two processes; the preset and overrides follow."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "diffrl.train",
    ]


def two_process_env(**extra: str) -> dict[str, str]:
    """The environment of such a launch: gloo on the CPU even where GPUs are visible, one thread a process, the
    checkout importable."""
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **extra,
    }
