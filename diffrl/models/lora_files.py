"""Trained weights for a loaded model: a diffusers LoRA or a diffrl training checkpoint (``diffrl sample --lora``).

:func:`resolve_lora` finds the weights behind a path with file checks only (no model): a diffusers LoRA (a directory
holding ``pytorch_lora_weights.safetensors``, e.g. a run's ``<run>/lora``, or the ``.safetensors`` file itself),
loaded with the pipeline's own ``load_lora_weights``; a run directory (its ``lora`` folder is used); or a training
checkpoint ``<run>/checkpoint-N``: the adapter is rebuilt from the rank, alpha and targets in the checkpoint's
``state.json`` and filled with the checkpoint's weights (the EMA weights when the run kept them, as the run's own
evaluation and final LoRA use). A checkpoint of a full fine-tuning run loads its transformer weights the same way.
:func:`load_lora` loads them into a :class:`~diffrl.models.FlowModel`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LORA_WEIGHT_NAMES", "LoraSource", "resolve_lora", "load_lora", "lora_shape", "start_lora_from"]

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")


@dataclass
class LoraSource:
    """Where trained weights come from: a diffusers LoRA file or a diffrl training checkpoint."""

    kind: str  # "diffusers" or "checkpoint"
    path: Path  # the weights file
    given: str  # what the user passed
    state: dict | None = None  # a checkpoint's state.json

    def describe(self) -> str:
        if self.kind == "diffusers":
            return f"diffusers LoRA {self.path}"
        step = (self.state or {}).get("step", "?")
        return f"training checkpoint {self.path.parent} (step {step}, weights {self.path.name})"


def _lora_file_in(directory: Path) -> Path | None:
    for name in LORA_WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    if len(found) > 1:
        raise ValueError(
            f"LoRA dir {directory} holds several .safetensors files ({', '.join(f.name for f in found[:3])}); "
            "pass the one to load as a file path."
        )
    return found[0] if found else None


def resolve_lora(path: str | Path, *, use_ema: bool = True) -> LoraSource:
    """Find the weights behind ``path`` (file checks only, no model): see the module docstring for the forms."""
    given = str(path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA {given} does not exist; pass a LoRA dir such as <run>/lora.")
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin"):
            raise ValueError(
                f"LoRA file {given} is not a .safetensors or .bin file; pass the LoRA's weights."
            )
        return LoraSource("diffusers", path, given)
    if (path / "trainable.safetensors").is_file():
        state_file = path / "state.json"
        if not state_file.is_file():
            raise FileNotFoundError(
                f"checkpoint {given} has no state.json, so its adapter cannot be rebuilt; pass <run>/lora instead."
            )
        state = json.loads(state_file.read_text())
        weights = path / "ema.safetensors" if use_ema and (path / "ema.safetensors").is_file() else None
        return LoraSource("checkpoint", weights or path / "trainable.safetensors", given, state)
    found = _lora_file_in(path)
    if found is not None:
        return LoraSource("diffusers", found, given)
    if (path / "lora").is_dir() and _lora_file_in(path / "lora") is not None:
        return resolve_lora(path / "lora", use_ema=use_ema)
    if (path / "pipeline" / "model_index.json").is_file():
        raise ValueError(
            f"{given} is a full fine-tuning run; pass {path / 'pipeline'} as the model instead of a LoRA."
        )
    checkpoints = sorted(path.glob("checkpoint-*"))
    hint = f" or a checkpoint such as {checkpoints[-1]}" if checkpoints else ""
    raise FileNotFoundError(
        f"LoRA dir {given} holds no LoRA weights (pytorch_lora_weights.safetensors); pass a diffusers LoRA dir "
        f"such as <run>/lora{hint}."
    )


def _load_diffusers_lora(model, source: LoraSource) -> str:
    from diffusers.utils import logging as diffusers_logging
    from safetensors import safe_open

    marker = source.path.parent / "diffrl_wan_expert.json"  # a LoRA of one of Wan 2.2's experts
    if marker.is_file():
        expert = json.loads(marker.read_text()).get("expert")
        if not hasattr(model, "set_training_expert"):
            raise ValueError(
                f"{source.given} is a LoRA of Wan 2.2's {expert}-noise expert(s), but the model is a {model.family} "
                "model; load it onto the Wan 2.2 checkpoint it was trained on."
            )
        if getattr(model, "expert", None) != expert:
            model.set_training_expert(expert)
    transformer = model.transformer
    # a LoRA of both of Wan 2.2's experts: the low-noise expert's file in a folder next to the high-noise one's
    second = source.path.parent / "transformer_2" / source.path.name if marker.is_file() else None
    if expert_is_both := (second is not None and json.loads(marker.read_text()).get("expert") == "both"):
        if not second.is_file():
            raise FileNotFoundError(
                f"{source.given} is a LoRA of both Wan 2.2 experts but {second} (the low-noise expert's) is missing; "
                "pass the whole LoRA directory diffrl saved."
            )
    existing = set(getattr(transformer, "peft_config", {}) or {})
    adapter = next(f"lora_{k}" for k in range(len(existing) + 1) if f"lora_{k}" not in existing)
    before = {n for n, _ in transformer.named_parameters()}
    verbosity = diffusers_logging.get_verbosity()
    # diffusers logs "no LoRA keys for the text encoders" (expected) and, on failure, the error we raise below
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # diffrl's LoRAs carry exclude_modules in their metadata; PEFT warns when nothing matched it on loading
            warnings.filterwarnings("ignore", message=".*exclude_modules.*", category=UserWarning)
            # a model whose trained transformer is the pipeline's second one (Wan 2.2's low-noise expert)
            into_second = getattr(model.pipe, "transformer_2", None) is transformer
            model.pipe.load_lora_weights(
                str(source.path.parent),
                weight_name=source.path.name,
                adapter_name=adapter,
                **({"load_into_transformer_2": True} if into_second else {}),
            )
            if expert_is_both:
                model.pipe.load_lora_weights(
                    str(second.parent),
                    weight_name=second.name,
                    adapter_name=adapter,
                    load_into_transformer_2=True,
                )
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [
            type(err).__name__
        ]
        detail = (
            lines[1] if len(lines) > 1 else lines[0]
        )  # torch's first line only says "Error(s) in loading"
        raise ValueError(
            f"LoRA {source.given} does not fit this {model.family} model ({detail.rstrip('.:')}); "
            "pass the base model it was trained from."
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    added = [n for n, _ in transformer.named_parameters() if n not in before and f".{adapter}." in n]
    if not added:
        raise ValueError(f"LoRA {source.given} holds no weights for this {model.family} model's transformer.")
    if source.path.suffix == ".safetensors":
        keys = []
        for file in (source.path, second) if expert_is_both else (source.path,):
            with safe_open(str(file), "pt") as f:
                keys += [k for k in f.keys() if k.startswith("transformer.") and ".lora_" in k]
        if keys and len(added) < len(keys):
            raise ValueError(
                f"LoRA {source.given} has {len(keys) - len(added)} of {len(keys)} transformer weights that match no "
                f"module of this {model.family} model; it was trained for another model."
            )
    return f"{source.describe()} as adapter {adapter!r} ({len(added)} tensors)"


def _load_checkpoint(model, source: LoraSource) -> str:
    from safetensors.torch import load_file

    weights = load_file(str(source.path))
    mcfg = ((source.state or {}).get("config") or {}).get("model") or {}
    if mcfg.get("expert"):  # Wan 2.2: the checkpoint trained one of the two experts
        model.set_training_expert(mcfg["expert"])
    rank = int(mcfg.get("lora_rank", -1))
    if rank != 0:
        alpha = float(mcfg.get("lora_alpha", -1))
        try:
            # the adapter's random init is overwritten below; leave the global RNG alone
            with torch.random.fork_rng(devices=[]):
                model.add_lora(
                    rank=None if rank < 0 else rank,
                    alpha=None if alpha < 0 else alpha,
                    target_modules=mcfg.get("lora_targets") or None,
                )
        except ValueError as err:
            raise ValueError(f"cannot rebuild the adapter of checkpoint {source.given}: {err}") from None
        params = {n: p for n, p in model.transformer.named_parameters() if p.requires_grad}
    else:
        params = dict(model.transformer.named_parameters())
    missing = [n for n in params if n not in weights]
    unknown = [n for n in weights if n not in params]
    if (rank != 0 and missing) or unknown:
        example = (missing or unknown)[0]
        raise ValueError(
            f"checkpoint {source.given} does not match this {model.family} model ({len(missing)} tensors missing, "
            f"{len(unknown)} unknown, e.g. {example}); pass the model it was trained from."
        )
    for n, w in weights.items():
        if tuple(w.shape) != tuple(params[n].shape):
            raise ValueError(
                f"checkpoint {source.given} does not match this {model.family} model ({n} has shape "
                f"{tuple(w.shape)}, the model {tuple(params[n].shape)}); pass the model it was trained from."
            )
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(device=params[n].device, dtype=params[n].dtype))
    for p in params.values():
        p.requires_grad_(False)
    trained_from = mcfg.get("path")
    what = "LoRA" if rank != 0 else "fully fine-tuned transformer"
    return f"{source.describe()}: {what}, {len(weights)} tensors" + (
        f", trained from {trained_from}" if trained_from else ""
    )


def load_lora(model, lora: str | Path | LoraSource) -> str:
    """Load trained weights into ``model`` (a :class:`diffrl.models.FlowModel`); returns a one-line description."""
    source = lora if isinstance(lora, LoraSource) else resolve_lora(lora)
    if source.kind == "checkpoint":
        return _load_checkpoint(model, source)
    return _load_diffusers_lora(model, source)


def lora_shape(source: LoraSource) -> tuple[int | None, float | None]:
    """``(rank, alpha)`` of a LoRA from its file header or its checkpoint's ``state.json``, without a model: ``None``
    where the file does not say (a LoRA saved without adapter metadata, a ``.bin`` file)."""
    if source.kind == "checkpoint":
        mcfg = ((source.state or {}).get("config") or {}).get("model") or {}
        rank, alpha = int(mcfg.get("lora_rank", -1)), float(mcfg.get("lora_alpha", -1))
        return (None if rank < 0 else rank), (None if alpha < 0 else alpha)
    if source.path.suffix != ".safetensors":
        return None, None
    from safetensors import safe_open

    with safe_open(str(source.path), "pt") as f:
        meta = (f.metadata() or {}).get("lora_adapter_metadata")
    if not meta:
        return None, None
    meta = json.loads(meta)
    rank, alpha = meta.get("transformer.r"), meta.get("transformer.lora_alpha")
    return (None if rank is None else int(rank)), (None if alpha is None else float(alpha))


def check_lora_from(source: LoraSource, rank: int, alpha: float) -> None:
    """Refuse, before any model loads, a ``model.lora_from`` whose rank or alpha (as far as its files say) differs
    from a ``model.lora_rank`` / ``model.lora_alpha`` that is not left at -1."""
    if source.kind == "checkpoint":
        saved = int((((source.state or {}).get("config") or {}).get("model") or {}).get("lora_rank", -1))
        if saved == 0:
            raise ValueError(
                f"model.lora_from={source.given} is a checkpoint of a full fine-tuning run, not a LoRA; start from it "
                "with resume_from_checkpoint in a new output_dir instead."
            )
    have_rank, have_alpha = lora_shape(source)
    for key, asked, have in (("lora_rank", rank, have_rank), ("lora_alpha", alpha, have_alpha)):
        if asked != -1 and have is not None and asked != have:
            raise ValueError(
                f"model.{key}={asked:g} but the LoRA model.lora_from={source.given} has {have:g}; leave model.{key} "
                f"at -1 (the LoRA's own) or set it to {have:g}."
            )


def start_lora_from(model, lora: str | Path | LoraSource, *, rank: int = -1, alpha: float = -1.0) -> str:
    """Give ``model`` a trainable LoRA adapter (``default``) that starts as the LoRA at ``lora`` (a diffusers LoRA
    or a training checkpoint, :func:`resolve_lora`), with that LoRA's rank, alpha and adapted modules, instead of
    the usual no-op start (``model.lora_from``). ``rank`` / ``alpha`` other than -1 must agree with the LoRA's. The
    base model (the adapter switched off) is unchanged, so the reference policy stays the base. Returns a one-line
    description."""
    source = lora if isinstance(lora, LoraSource) else resolve_lora(lora)
    check_lora_from(source, rank, alpha)
    transformer = model.transformer
    if getattr(transformer, "peft_config", None):
        raise ValueError(
            f"model.lora_from={source.given} needs a model without LoRA adapters, and this one holds "
            f"{', '.join(sorted(transformer.peft_config))}; pass the base model."
        )
    described = load_lora(model, source)
    if source.kind == "diffusers":  # loaded as its own adapter: make it the trained one, named default
        if not hasattr(transformer, "delete_adapters"):
            raise NotImplementedError(
                f"model.lora_from with a diffusers LoRA is not implemented for this {model.family} model's "
                "transformer; start from a diffrl checkpoint-N directory instead."
            )
        import copy

        (name,) = list(transformer.peft_config)
        config = copy.deepcopy(transformer.peft_config[name])
        weights = {
            n.replace(f".{name}.", ".default."): p.detach().clone()
            for n, p in transformer.named_parameters()
            if f".{name}." in n
        }
        transformer.delete_adapters(name)
        model.add_lora_config(config)
        params = {n: p for n, p in transformer.named_parameters() if ".default." in n}
        if set(params) != set(weights):
            raise ValueError(
                f"LoRA {source.given} could not be rebuilt as the trained adapter ({len(weights)} tensors loaded, "
                f"{len(params)} made); pass a LoRA saved by diffrl or diffusers."
            )
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        described = f"{source.describe()} ({len(weights)} tensors)"
    for n, p in transformer.named_parameters():
        p.requires_grad_(".default." in n)  # as add_lora leaves it: only the adapter trains
    r = transformer.peft_config["default"].r
    a = transformer.peft_config["default"].lora_alpha
    if rank not in (-1, r) or alpha not in (-1, a):
        raise ValueError(
            f"model.lora_rank={rank} / model.lora_alpha={alpha:g} but the LoRA model.lora_from={source.given} has "
            f"rank {r} and alpha {a:g}; leave them at -1 (the LoRA's own) or set them to those."
        )
    return f"{described}; training starts from it (rank {r}, alpha {a:g})"
