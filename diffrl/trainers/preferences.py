"""Offline preference data for Diffusion-DPO: reading pairs, encoding their images once, and the latent cache.

Two sources, both made of ``(prompt, chosen, rejected)`` rows:

* a ``.jsonl`` file, one ``{"prompt", "chosen", "rejected"}`` object a line, where ``chosen`` and ``rejected`` are
  paths relative to the file: images (anything PIL opens) or latents already encoded (``.safetensors`` holding one
  tensor or a ``latents`` tensor, or ``.pt``), each ``(C, h, w)`` of the model's latent shape;
* a Hugging Face ``datasets`` dataset of Pick-a-Pic's columns (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``: 1 when
  image 0 is preferred, 0 when image 1 is, 0.5 for a tie, which is skipped), from a directory written by
  ``save_to_disk`` or from local data files (``.parquet``, ``.arrow``, ``.json``); ``datasets`` is imported only here
  and only then, and nothing is downloaded.

Images are resized so they cover ``height x width`` (bicubic) and centre-cropped, as the Diffusion-DPO training script
of diffusers prepares Pick-a-Pic (``examples/research_projects/diffusion_dpo``), then encoded with the model's VAE
(:meth:`~diffrl.models.FlowModel.encode_images`, the posterior mean). The latents of the whole dataset are written
once to ``<cache_dir>/dpo-latents-<fingerprint>.safetensors``; the fingerprint covers the rows (prompts and the
bytes of every image or latent file), the size and the VAE's weights, so a resumed run, a second epoch or another run
on the same data finds them, and any change to the data, size or VAE encodes again.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PreferenceRow",
    "PreferencePairs",
    "read_preference_rows",
    "pickapic_rows",
    "preference_fingerprint",
    "encode_preference_rows",
    "load_preference_pairs",
]

LATENT_SUFFIXES = (".safetensors", ".pt")
_CACHE_VERSION = "dpo-latents-v1"


@dataclass
class PreferenceRow:
    """One preference: the prompt and the chosen and rejected items, each a file path or encoded image bytes."""

    prompt: str
    chosen: Path | bytes
    rejected: Path | bytes


@dataclass
class PreferencePairs:
    """The encoded dataset: latents in float32 on the CPU."""

    prompts: list[str]  # (N,)
    chosen: torch.Tensor  # (N, C, h, w)
    rejected: torch.Tensor  # (N, C, h, w)
    cache_path: Path  # where the latents are cached
    from_cache: bool  # True when they were read from the cache, not encoded

    def __len__(self) -> int:
        return len(self.prompts)


def read_preference_rows(spec: str) -> list[PreferenceRow]:
    """The rows of a ``.jsonl`` file or of a Pick-a-Pic style dataset (see the module docstring)."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"dpo.dataset={spec} does not exist; give a preference .jsonl file, a save_to_disk directory or data files."
        )
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    return pickapic_rows(_open_dataset(path))


def _jsonl_rows(path: Path) -> list[PreferenceRow]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} line {number} is not JSON ({err.msg}); write one object a line."
            ) from None
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise ValueError(
                f"{path} line {number} has no {', '.join(missing)} field; every line needs prompt, chosen and rejected."
            )
        items = []
        for key in ("chosen", "rejected"):
            item = path.parent / str(row[key])
            if not item.is_file():
                raise FileNotFoundError(
                    f"{path} line {number}: {key}={row[key]} is not a file (paths are relative to the .jsonl file)."
                )
            items.append(item)
        rows.append(PreferenceRow(str(row["prompt"]), items[0], items[1]))
    if not rows:
        raise ValueError(
            f"{path} holds no preference pairs; write one {{prompt, chosen, rejected}} object a line."
        )
    return rows


def _open_dataset(path: Path):
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"dpo.dataset={path} is read with the datasets package: pip install datasets (or give a .jsonl file)."
        ) from err
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return ds
    kinds = {".parquet": "parquet", ".arrow": "arrow", ".json": "json"}
    if path.suffix not in kinds:
        raise ValueError(
            f"dpo.dataset={path} is neither .jsonl, a save_to_disk directory nor a .parquet/.arrow/.json data file."
        )
    return datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")


def _image_bytes(value: Any) -> bytes:
    """An image column's value as encoded bytes: bytes, a ``{"bytes": ...}`` dict or a PIL image."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        return bytes(value["bytes"])
    if hasattr(value, "save"):  # a PIL image (a datasets Image feature decoded it)
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(f"an image column holds a {type(value).__name__}; expected bytes or an image.")


def pickapic_rows(rows) -> list[PreferenceRow]:
    """Pairs from Pick-a-Pic style rows (an iterable of dicts, e.g. a ``datasets.Dataset``): ``label_0 = 1`` makes
    ``jpg_0`` the chosen image, ``label_0 = 0`` makes ``jpg_1`` chosen, and a tie (0.5) is skipped."""
    out = []
    for number, row in enumerate(rows):
        missing = [k for k in ("caption", "jpg_0", "jpg_1", "label_0") if k not in row]
        if missing:
            raise ValueError(
                f"preference row {number} has no {', '.join(missing)} column; Pick-a-Pic style data needs caption, "
                "jpg_0, jpg_1 and label_0."
            )
        label = float(row["label_0"])
        if label == 0.5:
            continue
        if label not in (0.0, 1.0):
            raise ValueError(f"preference row {number} has label_0={label}; it must be 1, 0 or 0.5 (a tie).")
        a, b = _image_bytes(row["jpg_0"]), _image_bytes(row["jpg_1"])
        chosen, rejected = (a, b) if label == 1.0 else (b, a)
        out.append(PreferenceRow(str(row["caption"]), chosen, rejected))
    if not out:
        raise ValueError("the preference dataset holds no pair with a preference (every label_0 is a tie).")
    return out


def _item_bytes(item: Path | bytes) -> bytes:
    return item if isinstance(item, bytes) else Path(item).read_bytes()


def preference_fingerprint(rows: list[PreferenceRow], height: int, width: int, vae: torch.nn.Module) -> str:
    """sha256 of the rows (prompts, and the bytes of every item), the image size and the VAE's weights."""
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_VERSION, height, width]).encode())
    for row in rows:
        h.update(row.prompt.encode() + b"\0")
        for item in (row.chosen, row.rejected):
            data = _item_bytes(item)
            suffix = Path(item).suffix if isinstance(item, Path) else ""
            h.update(f"{suffix}:{len(data)}:".encode())
            h.update(data)
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_latent(item: Path) -> torch.Tensor:
    if item.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(item))
        if "latents" in tensors:
            return tensors["latents"]
        if len(tensors) != 1:
            raise ValueError(f"{item} holds {len(tensors)} tensors; store one, or name it 'latents'.")
        return next(iter(tensors.values()))
    value = torch.load(item, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{item} holds a {type(value).__name__}; save one latent tensor (C, h, w).")
    return value


def _load_image(item: Path | bytes, height: int, width: int) -> torch.Tensor:
    """``(3, height, width)`` in [0, 1]: resized to cover the size (bicubic), centre-cropped."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(item) if isinstance(item, bytes) else item).convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def encode_preference_rows(
    rows: list[PreferenceRow], model, height: int, width: int, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` latents ``(N, C, h, w)``, float32 on the CPU: images through the VAE in batches of
    ``batch_size``, latent files as they are (their shape checked against the model's)."""
    shape = tuple(model.latent_shape(height, width))
    items = [item for row in rows for item in (row.chosen, row.rejected)]
    latents: list[torch.Tensor | None] = [None] * len(items)
    images = []
    for i, item in enumerate(items):
        if isinstance(item, Path) and item.suffix in LATENT_SUFFIXES:
            z = _load_latent(item).float()
            if tuple(z.shape) != shape:
                raise ValueError(
                    f"{item} holds latents of shape {tuple(z.shape)}, and this model makes {shape} at "
                    f"{height} x {width}; encode them at sample.height/width or give the images."
                )
            latents[i] = z
        else:
            images.append(i)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = torch.stack([_load_image(items[i], height, width) for i in chunk])
        encoded = model.encode_images(pixels).cpu()
        for i, z in zip(chunk, encoded, strict=True):
            latents[i] = z
    stacked = torch.stack([z for z in latents if z is not None])
    return stacked[0::2].contiguous(), stacked[1::2].contiguous()


def load_preference_pairs(
    spec: str,
    model,
    height: int,
    width: int,
    cache_dir: str | Path,
    *,
    write: bool = True,
    batch_size: int = 8,
) -> PreferencePairs:
    """The dataset ``spec``'s pairs as latents, read from the cache in ``cache_dir`` when it holds them, else encoded
    and (``write``) cached there."""
    from safetensors.torch import load_file, save_file

    rows = read_preference_rows(spec)
    fingerprint = preference_fingerprint(rows, height, width, model.vae)
    cache_path = Path(cache_dir) / f"dpo-latents-{fingerprint[:20]}.safetensors"
    prompts = [r.prompt for r in rows]
    if cache_path.is_file():
        cached = load_file(str(cache_path))
        return PreferencePairs(prompts, cached["chosen"], cached["rejected"], cache_path, True)
    chosen, rejected = encode_preference_rows(rows, model, height, width, batch_size)
    if write:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        save_file(
            {"chosen": chosen, "rejected": rejected},
            str(tmp),
            metadata={"fingerprint": fingerprint, "spec": spec},
        )
        tmp.replace(cache_path)  # whole or absent: a killed run never leaves half a cache
    return PreferencePairs(prompts, chosen, rejected, cache_path, False)
