"""Small helpers shared by every layer (no imports of models, rewards or trainers)."""

from __future__ import annotations

import torch

__all__ = ["resolve_dtype", "DTYPES"]

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
