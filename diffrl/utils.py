"""Small helpers shared by every layer (no imports of models, rewards or trainers)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = [
    "resolve_dtype",
    "DTYPES",
    "apply_umask",
    "canonical_safetensors_header",
    "set_cpu_threads",
    "SHIPPED_ROOT",
    "SHIPPED_CHECKPOINTS",
    "shipped_checkpoint",
    "SHIPPED_CONFIGS",
    "shipped_config_path",
]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or its name (``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"float32"``...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)} or a torch dtype.")


def apply_umask(path: str | Path) -> None:
    """Give the files under ``path`` (a file or a directory) the permissions the umask allows, as ``open`` would:
    safetensors writes its files owner-only (0600), which colleagues on a shared cluster cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        os.chmod(f, 0o666 & ~mask)


def canonical_safetensors_header(path: str | Path) -> None:
    """Rewrite a ``.safetensors`` file's JSON header with its keys sorted, in place, so the same tensors and metadata
    always give the same bytes (safetensors writes its ``__metadata__`` entries in a hash-map order that changes from
    process to process). The header keeps its length (padded with spaces, which the format allows), so the tensor
    data are not touched; a header that would grow is left as it is."""
    import json
    import struct

    path = Path(path)
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def set_cpu_threads(threads: int | None = None) -> int | None:
    """The torch CPU thread count of a command-line entry point (``diffrl train``, ``sample``, ``eval``, ``demo``):
    ``threads`` when given; else 1 on a machine without CUDA unless ``OMP_NUM_THREADS`` says otherwise; else torch's
    own choice. Why one: a fixed count makes a CPU run's numbers independent of the machine's cores and load (float
    reductions split over threads round differently), and torch's default of one thread per core collapses when
    another process wants a core, its threads waiting for each other at every operation. Measured side by side on 2
    cores (``benchmarks/bench_threads.py``, toy DiffusionNFT steps): idle, the default took 0.56x the time of one
    thread; with one busy process, 2.41x (20x was seen with a heavier neighbour). ``--threads`` / ``OMP_NUM_THREADS``
    choose otherwise. GPU runs keep torch's default (the CPU only feeds the GPU). Returns the count set, or None when
    left to torch."""
    import os

    if threads is None:
        if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
            return None
        threads = 1
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} must be a positive integer.")
    torch.set_num_threads(threads)
    return threads


#: The folder of the checkpoints shipped inside the package.
SHIPPED_ROOT = Path(__file__).resolve().parent / "toy" / "assets"

#: Checkpoints shipped inside the package (:data:`SHIPPED_ROOT`), by spec: (folder, a file that must be there,
#: what it is, how to re-create it). Kept here, below every layer, so that a reward can load ``"toy:clip"`` without
#: importing the toy world; :mod:`diffrl.toy.assets` is the toy world's view of the same folders.
SHIPPED_CHECKPOINTS = {
    "toy": (
        "sd3",
        "model_index.json",
        "toy text-to-image model",
        "python scripts/train_toy_model.py --out runs/toy-model && cp -r runs/toy-model/ckpt-7000 diffrl/toy/assets/sd3",
    ),
    "toy:cliptext": (
        "sd3_cliptext",
        "model_index.json",
        "toy text-to-image model conditioned on the toy CLIP's text tower (the demo's base)",
        "python benchmarks/toy_base_clip_text.py --out runs/toy-clip-text --steps 8000 --lr 5e-4 --stop-after 5000"
        " && cp -r runs/toy-clip-text/ckpt-5000 diffrl/toy/assets/sd3_cliptext",
    ),
    "toy:clip": (
        "clip",
        "config.json",
        "toy CLIP",
        "python scripts/train_toy_clip.py --out diffrl/toy/assets/clip",
    ),
}


#: The shipped checkpoints that are text-to-image pipelines: ``model.path`` (and ``diffrl sample --model``) accepts
#: these names for their folders.
SHIPPED_PIPELINES = ("toy", "toy:cliptext")


def shipped_checkpoint(spec: str) -> Path:
    """The directory of a checkpoint shipped with diffrl (a key of :data:`SHIPPED_CHECKPOINTS`); a FileNotFoundError
    that says how to re-create it when this checkout lacks it."""
    if spec not in SHIPPED_CHECKPOINTS:
        raise KeyError(f"{spec!r} is not a shipped checkpoint; shipped: {', '.join(SHIPPED_CHECKPOINTS)}.")
    folder, marker, what, command = SHIPPED_CHECKPOINTS[spec]
    path = SHIPPED_ROOT / folder
    if not (path / marker).is_file():
        raise FileNotFoundError(
            f"the {what} is not in this checkout ({path} has no {marker}); re-create it with: {command}"
        )
    return path


#: The presets and the toy prompt files: the copy an installed wheel ships inside the package (``diffrl/configs``),
#: or the checkout's ``configs/`` (an editable install or a plain checkout).
_PACKAGE = Path(__file__).resolve().parent
SHIPPED_CONFIGS = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"


def shipped_config_path(value: str | Path) -> str:
    """``value`` unchanged, unless it is a relative path ``configs/...`` (how the README and the presets name the
    presets and prompt files) that does not exist from the working directory but does in :data:`SHIPPED_CONFIGS`:
    then that file, so that the presets work from any directory and from an installed wheel."""
    text = str(value)
    path = Path(text)
    if path.is_absolute() or path.parts[:1] != ("configs",) or path.exists():
        return text
    shipped = SHIPPED_CONFIGS.joinpath(*path.parts[1:])
    return str(shipped) if shipped.exists() else text
