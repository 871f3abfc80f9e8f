"""``diffrl doctor [CONFIG.yaml] [key=value ...]``: check the environment (and a config) before a long run.

Every check prints one line, ``OK``, ``WARN`` or ``FAIL``, with what it found and, when not OK, the fix in one
sentence. The checks, by group (``--check GROUP`` runs only some):

* ``env``: python, torch, diffusers, transformers, accelerate and peft against the minimums of ``pyproject.toml``;
  CUDA, the devices and their bf16 / fp16 support (CPU-only warns that real models will be slow).
* ``config``: the config validates (:func:`diffrl.config.load_config` with the overrides), its prompts read, and
  its dtype / mixed precision suit the device.
* ``model``: the model's files are present offline: a local diffusers directory with ``model_index.json`` and every
  component it names, or a hub id whose files are in the Hugging Face cache (``tiny:*`` models always are).
* ``rewards``: every reward's weights are present offline: the exact hub files that ``diffrl download --dry-run``
  lists (the same functions of :mod:`diffrl.hub`) are looked up in the cache without any network call.
* ``memory``: an estimate (not a measurement) of the peak memory of one process, from the safetensors headers when
  the weights are present (:func:`estimate_memory`), compared with the GPU's total memory when CUDA is there.
* ``onpolicy``: when the model is available offline, it is loaded as the trainer loads it (configured dtype,
  device and LoRA; the LoRA's B matrices are made non-zero so the adapter path counts), a short SDE rollout is
  sampled with the configured sampler settings, and the log-probs of its stored transitions are recomputed with
  the same model as the Flow-GRPO trainer does for its ratio: ``max |exp(new - old) - 1|`` FAILs at
  ``flow_grpo.clip_range`` (fresh samples would already be clipped) and WARNs at a tenth of it, unless
  ``flow_grpo.old_logp=recompute`` (then the drift is reported, OK). The recomputed log-probs with batch size 1 and
  with the configured ``optim.train_batch_size`` must agree the same way. With a Flow-GRPO KL term, ``kl-scale``
  reports ``kl_beta`` in the reference code's units and in the exact ones over the schedule's trained steps (WARN
  with ``kl_scale=exact``, whose beta is about 13x a paper's on 10 SD3.5 steps).

Exit code: 0 when no check FAILs, 1 otherwise, 2 for bad input (a config path that does not exist, an override
that is not ``key=value``), which is reported as one sentence naming the value and the fix.

Python: ``run_doctor("configs/tiny/flow_grpo.yaml", ["optim.lr=1e-4"]) -> list[Finding]``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hub import cached_file, config_targets, hf_cache_dir, reward_hub_files

__all__ = ["CHECKS", "Finding", "MemoryEstimate", "UnknownModelSize", "estimate_memory", "run_doctor", "main"]

CHECKS = ("env", "config", "model", "rewards", "memory", "onpolicy")
STATUSES = ("OK", "WARN", "FAIL")

#: Packages checked against the minimums of pyproject.toml (used when neither pyproject nor metadata is found).
_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft")
_FALLBACK_MINIMUMS = {
    "python": ">=3.10",
    "torch": ">=2.4",
    "diffusers": ">=0.42",
    "transformers": ">=5.0",
    "accelerate": ">=1.0",
    "peft": ">=0.15",
}

#: The on-policy probe: at most this many samples and this many stochastic steps.
ONPOLICY_ROWS = 8
ONPOLICY_STEPS = 2
#: Scale of the random LoRA B matrices of the probe (B = 0 at init would hide the adapter path).
_PROBE_LORA_STD = 1e-3

_GiB = 1024**3


class UnknownModelSize(LookupError):
    """The model's weights are not present offline and it is not one of the checkpoints of known size."""


@dataclass
class Finding:
    """One line of the report: ``status`` is OK, WARN or FAIL; ``fix`` says what to do when it is not OK."""

    name: str
    status: str
    message: str
    fix: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status={self.status!r} must be one of {', '.join(STATUSES)}.")

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.message}"
        if self.status != "OK" and self.fix:
            text += f"  Fix: {self.fix}"
        return text

    def __str__(self) -> str:
        return self.line()


def _split_fix(message: str, default_fix: str) -> tuple[str, str]:
    """Project errors read "what is wrong; what to do": split them into a finding's message and fix."""
    message = message.strip()
    if "; " in message:
        what, fix = message.split("; ", 1)
        return what, fix[:1].upper() + fix[1:]
    return message.rstrip("."), default_fix


def _gib(nbytes: float) -> str:
    if nbytes >= 0.1 * _GiB:
        return f"{nbytes / _GiB:.1f} GiB"
    if nbytes >= 1024**2:
        return f"{nbytes / 1024**2:.1f} MiB"
    return f"{nbytes / 1024:.1f} KiB"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if size > 1e3 else 1}f}{unit}"
    return str(int(n))


# ---------------------------------------------------------------------------------------------- environment


def _minimums() -> dict[str, str]:
    """``{package: specifier}`` from the checkout's pyproject.toml, else the installed metadata, else built-ins."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    requirements: list[str] = []
    python = ""
    try:
        import tomllib

        project = tomllib.loads(pyproject.read_text())["project"]
        requirements, python = list(project.get("dependencies", [])), project.get("requires-python", "")
    except Exception:  # noqa: BLE001 - no checkout (installed package) or python 3.10 without tomllib
        try:
            from importlib import metadata

            requirements = list(metadata.requires("diffrl") or [])
            python = metadata.metadata("diffrl").get("Requires-Python", "")
        except Exception:  # noqa: BLE001
            pass
    for text in requirements:
        try:
            req = Requirement(text)
        except Exception:  # noqa: BLE001
            continue
        if req.marker is None and req.name in _PACKAGES:
            found[req.name] = str(req.specifier)
    if python:
        found["python"] = python
    return {**_FALLBACK_MINIMUMS, **found}


def _installed_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _version_finding(name: str, installed: str | None, spec: str) -> Finding:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if installed is None:
        return Finding(name, "FAIL", f"not installed (needs {spec})", f"Run `pip install '{name}{spec}'`.")
    try:
        ok = SpecifierSet(spec).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        return Finding(
            name, "WARN", f"{installed} (cannot compare with {spec})", f"Run `pip install -U '{name}{spec}'`."
        )
    if ok:
        return Finding(name, "OK", f"{installed} (needs {spec})")
    return Finding(
        name,
        "FAIL",
        f"{installed} does not satisfy {spec}",
        f"Run `pip install -U '{name}{spec}'` in this environment.",
    )


def check_env(device: str | None = None) -> list[Finding]:
    """Python and package versions, CUDA and its devices."""
    import platform

    mins = _minimums()
    python = _version_finding("python", platform.python_version(), mins["python"])
    if python.status != "OK":
        python.fix = f"Use a Python {mins['python']} virtual environment."
    out = [python]
    for package in _PACKAGES:
        out.append(_version_finding(package, _installed_version(package), mins[package]))
    try:
        import torch
    except ImportError:
        return out
    if torch.cuda.is_available():
        names = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cap = torch.cuda.get_device_capability(i)
            bf16 = cap >= (8, 0)
            names.append(
                f"cuda:{i} {props.name} {props.total_memory / _GiB:.0f} GiB sm{cap[0]}{cap[1]} "
                f"bf16 {'yes' if bf16 else 'no'}, fp16 {'yes' if cap >= (7, 0) else 'slow'}"
            )
        line = f"CUDA {torch.version.cuda}, {len(names)} device(s): " + "; ".join(names)
        if torch.cuda.is_bf16_supported():
            out.append(Finding("cuda", "OK", line))
        else:
            out.append(
                Finding(
                    "cuda",
                    "WARN",
                    line + " (no native bfloat16)",
                    "Use model.dtype=float16 with mixed_precision=fp16 (or float32) on this GPU, or a GPU with "
                    "compute capability 8.0+.",
                )
            )
    else:
        why = (
            f"torch is built with CUDA {torch.version.cuda} but sees no GPU"
            if torch.version.cuda
            else f"torch {torch.__version__} is a CPU-only build"
        )
        out.append(
            Finding(
                "cuda",
                "WARN",
                f"CUDA is not available ({why}): real SD3/FLUX models will be very slow on the CPU "
                "(tiny:* test models are fine)",
                "Run on a machine with an NVIDIA GPU and a CUDA build of torch (check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES).",
            )
        )
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        out.append(
            Finding(
                "device",
                "FAIL",
                f"device {device} was asked for but CUDA is not available",
                "Pass --device cpu or run where a GPU is visible.",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------- config


def _read_config(config, overrides: list[str]):
    """The validated config, or ``(None, Finding)`` when it does not validate; bad input raises ConfigError."""
    import yaml

    from .config import ConfigError, _parse_override, load_config

    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(
                f"config file {config} does not exist; pass a YAML preset such as configs/tiny/flow_grpo.yaml."
            )
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(
                f"config file {config} is not valid YAML{where}; fix its syntax (key: value, one per line)."
            ) from None
    for text in overrides:
        _parse_override(text)  # raises ConfigError naming the override when it is not key=value
    try:
        return load_config(config, overrides), None
    except ConfigError as err:
        what, fix = _split_fix(str(err), "Change that value in the config file or with a key=value override.")
        return None, Finding("config", "FAIL", what, fix)


def _config_label(config) -> str:
    return str(config) if isinstance(config, (str, Path)) else "the config"


def _check_data(cfg) -> Finding:
    from .data import train_eval_prompts

    d = cfg.data
    if d.train.startswith("hf:"):
        return Finding("data", "OK", f"data.train={d.train} is a datasets dataset (not opened by doctor)")
    try:
        train, evals = train_eval_prompts(d.train, d.eval, d.eval_size, cfg.seed, d.prompt_key)
    except (OSError, ValueError, ImportError) as err:
        what, fix = _split_fix(str(err), "Point data.train at a .txt or .jsonl prompt file.")
        return Finding("data", "FAIL", what, fix)
    return Finding("data", "OK", f"{len(train)} training and {len(evals)} evaluation prompts from {d.train}")


def _check_deepspeed(cfg) -> Finding:
    """``zero_stage`` needs deepspeed with unmanaged gradient accumulation (read from the package metadata)."""
    from .trainers.zero import TESTED_VERSION

    installed = _installed_version("deepspeed")
    finding = _version_finding("deepspeed", installed, f">={TESTED_VERSION}")
    if finding.status != "OK":
        finding.status = "FAIL"
        finding.message = (
            f"zero_stage={cfg.zero_stage} needs deepspeed>={TESTED_VERSION}; found {installed or 'none'}"
        )
        finding.fix = "Run `pip install 'diffrl[deepspeed]'` in this environment."
    else:
        finding.message = f"zero_stage={cfg.zero_stage}: deepspeed {installed}"
    return finding


def _check_precision(cfg, device: str) -> Finding:
    import torch

    dtype, mp = cfg.model.dtype, cfg.mixed_precision
    where = f"model.dtype={dtype}, mixed_precision={mp} on {device}"
    if device.startswith("cuda") and torch.cuda.is_available():
        if (dtype == "bfloat16" or mp == "bf16") and not torch.cuda.is_bf16_supported():
            return Finding(
                "precision",
                "FAIL",
                f"{where}: this GPU has no bfloat16 support",
                "Use model.dtype=float16 and mixed_precision=fp16 (or float32 and no).",
            )
        if dtype == "float32" and mp == "no" and not cfg.model.path.startswith("tiny:"):
            return Finding(
                "precision",
                "WARN",
                f"{where}: float32 weights and no autocast use twice the memory of bfloat16 and are slow",
                "Set model.dtype=bfloat16 and mixed_precision=bf16 for real models.",
            )
        return Finding("precision", "OK", where)
    if dtype == "float16" or mp == "fp16":
        return Finding(
            "precision",
            "WARN",
            f"{where}: float16 on the CPU is slow and some kernels lack it",
            "Use float32 (or bfloat16) on the CPU; float16 is for GPUs.",
        )
    return Finding("precision", "OK", where)


# ---------------------------------------------------------------------------------------------- model files


def _looks_local(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def _weight_files(directory: Path) -> list[Path]:
    """The weight files a component loads: the shards of its (non-variant) index, else its plain weight file."""
    if not directory.is_dir():
        return []
    for ext in ("safetensors", "bin"):
        indexes = sorted(directory.glob(f"*.{ext}.index.json"))
        if indexes:
            plain = [p for p in indexes if p.name.count(".") == 3]
            index = plain[0] if plain else indexes[0]
            try:
                shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            except (OSError, ValueError):
                shards = []
            return [directory / s for s in shards]
        files = sorted(p for p in directory.glob(f"*.{ext}") if p.exists())
        if files:
            plain = [p for p in files if p.name.count(".") == 1]
            return plain or files[:1]
    return []


def _pipeline_problems(root: Path) -> tuple[dict, list[str]]:
    """``(model_index, problems)``: what a diffusers pipeline directory lacks to load."""
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        return {}, [f"model_index.json cannot be read ({err.__class__.__name__})"]
    problems = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        cls = str(value[1])
        comp = root / name
        if not comp.is_dir():
            problems.append(f"{name}/ is missing")
        elif "Scheduler" in cls:
            if not (comp / "scheduler_config.json").is_file():
                problems.append(f"{name}/scheduler_config.json is missing")
        elif any(word in cls for word in ("Tokenizer", "Processor", "FeatureExtractor")):
            if not any(p.is_file() for p in comp.iterdir()):
                problems.append(f"{name}/ holds no files")
        else:
            if not (comp / "config.json").is_file():
                problems.append(f"{name}/config.json is missing")
            weights = _weight_files(comp)
            missing = [w for w in weights if not w.is_file()]
            if not weights:
                problems.append(f"{name}/ has no weights (*.safetensors)")
            elif missing:
                problems.append(
                    f"{name}/{missing[0].name} is missing ({len(missing)} of {len(weights)} shards)"
                )
    return index, problems


@dataclass
class _ModelLocation:
    spec: str
    kind: str  # "tiny", "local", "hub"
    root: Path | None  # a pipeline directory that loads offline, once known (tiny: built on demand)
    finding: Finding

    @property
    def available(self) -> bool:
        return self.finding.status != "FAIL"

    def directory(self) -> Path | None:
        if self.kind == "tiny" and self.root is None and self.available:
            from .models.loading import tiny_model_dir

            self.root = tiny_model_dir(self.spec)
        return self.root


def _supported_pipelines() -> dict[str, str]:
    from .models.loading import ADAPTERS

    return {name: cls.family for name, cls in ADAPTERS.items()}


def _locate_model(cfg, label: str) -> _ModelLocation:
    spec = cfg.model.path
    download = (
        f"Run `diffrl download {label}` where there is network (into the same HF cache), then run offline."
        if label != "the config"
        else "Run `diffrl download <your config.yaml>` where there is network (into the same HF cache)."
    )
    if spec == "toy":  # the toy-world model shipped in the package
        from diffrl.toy.assets import toy_model_dir

        try:
            spec = str(toy_model_dir())
        except FileNotFoundError as err:
            return _ModelLocation(
                "toy", "local", None, Finding("model", "FAIL", str(err), "Re-create it with that command.")
            )
    if spec.startswith("tiny:"):
        family = spec.split(":", 1)[1]
        if family not in ("sd3", "flux"):
            return _ModelLocation(
                spec,
                "tiny",
                None,
                Finding("model", "FAIL", f"{spec} is not a tiny model", "Use tiny:sd3 or tiny:flux."),
            )
        return _ModelLocation(
            spec,
            "tiny",
            None,
            Finding("model", "OK", f"{spec}: a tiny offline test pipeline (always available)"),
        )
    if _looks_local(spec):
        root = Path(spec).expanduser()
        if not root.is_dir():
            return _ModelLocation(
                spec,
                "local",
                None,
                Finding(
                    "model",
                    "FAIL",
                    f"model.path={spec}: the local directory does not exist",
                    "Point model.path at a diffusers pipeline directory (one holding model_index.json) or at a "
                    "hub id that is in the Hugging Face cache.",
                ),
            )
        if not (root / "model_index.json").is_file():
            return _ModelLocation(
                spec,
                "local",
                None,
                Finding(
                    "model",
                    "FAIL",
                    f"model.path={spec} has no model_index.json",
                    "Point model.path at a diffusers pipeline directory (saved with save_pretrained).",
                ),
            )
        where, fix = f"model.path={spec}", "Save the complete pipeline there again with save_pretrained."
    else:
        index = cached_file(spec, "model_index.json")
        if index is None:
            return _ModelLocation(
                spec,
                "hub",
                None,
                Finding(
                    "model",
                    "FAIL",
                    f"model.path={spec}: its model_index.json is not in the Hugging Face cache ({hf_cache_dir()})",
                    download,
                ),
            )
        root = index.parent
        where, fix = f"model.path={spec} (HF cache {root})", download
    kind = "hub" if not _looks_local(spec) else "local"
    index, problems = _pipeline_problems(root)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        return _ModelLocation(spec, kind, None, Finding("model", "FAIL", f"{where}: {shown}", fix))
    cls = index.get("_class_name")
    supported = _supported_pipelines()
    if cls not in supported:
        return _ModelLocation(
            spec,
            kind,
            None,
            Finding(
                "model",
                "FAIL",
                f"{where} is a {cls} pipeline, which diffrl does not train",
                f"Use a {' or '.join(sorted(supported))} checkpoint.",
            ),
        )
    comps = [
        k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
    ]
    return _ModelLocation(
        spec,
        kind,
        root,
        Finding("model", "OK", f"{where}: {cls}, {len(comps)} components present offline"),
    )


# ---------------------------------------------------------------------------------------------- rewards


@dataclass
class _RewardStatus:
    name: str
    kwargs: dict
    finding: Finding
    nbytes: int = 0  # size of its cached weight files
    cached: bool = True


def _config_rewards(cfg) -> list[tuple[str, dict]]:
    """The rewards of a validated config with their options, read as ``diffrl download`` reads a config."""
    from .config import config_to_dict

    rewards, _ = config_targets(config_to_dict(cfg))
    unique: dict[str, tuple[str, dict]] = {}
    for name, kwargs in rewards:
        unique.setdefault(f"{name} {json.dumps(kwargs, sort_keys=True, default=str)}", (name, kwargs))
    return list(unique.values())


def _reward_status(name: str, kwargs: dict, label: str) -> _RewardStatus:
    options = "".join(f" {k}={v}" for k, v in kwargs.items())
    try:
        files = reward_hub_files(name, dict(kwargs))
    except Exception as err:  # noqa: BLE001 - unknown name, bad module path, bad options
        what, fix = _split_fix(str(err), "Fix the reward's name or options in the config.")
        return _RewardStatus(name, kwargs, Finding(f"reward {name}", "FAIL", what, fix), cached=False)
    missing_local = [
        f"{k}={v}"
        for k, v in kwargs.items()
        if isinstance(v, str) and v.startswith(("/", ".", "~")) and not Path(v).expanduser().exists()
    ]
    if missing_local:
        return _RewardStatus(
            name,
            kwargs,
            Finding(
                f"reward {name}",
                "FAIL",
                f"local path {missing_local[0]} does not exist",
                "Point the option at an existing file or directory, or drop it to use the default hub weights.",
            ),
            cached=False,
        )
    required = [f for f in files if not f.optional]
    present = {f: cached_file(f.repo_id, f.filename, f.revision) for f in files}
    absent = [f for f in required if present[f] is None]
    nbytes = sum(p.stat().st_size for p in present.values() if p is not None)
    if absent:
        listed = ", ".join(str(f) for f in absent[:4]) + (
            f" and {len(absent) - 4} more" if len(absent) > 4 else ""
        )
        return _RewardStatus(
            name,
            kwargs,
            Finding(
                f"reward {name}",
                "FAIL",
                f"weights not present offline: {listed} (not in the HF cache {hf_cache_dir()})",
                f"Run `diffrl download {name}{options}` (or `diffrl download {label}`) where there is network, "
                "into the same HF cache, or pass a local path in reward_kwargs.",
            ),
            nbytes,
            cached=False,
        )
    if not files:
        return _RewardStatus(name, kwargs, Finding(f"reward {name}", "OK", "needs no hub weights"))
    return _RewardStatus(
        name,
        kwargs,
        Finding(f"reward {name}", "OK", f"{len(required)} hub file(s) in the HF cache ({_gib(nbytes)})"),
        nbytes,
    )


# ---------------------------------------------------------------------------------------------- memory

#: Published sizes of well-known checkpoints (approximate), used when their weights are not present offline:
#: transformer parameters, the other components' parameters, width, blocks, and LoRA units per rank and width.
_PUBLISHED = {
    "stabilityai/stable-diffusion-3.5-medium": ("sd3", 2.47e9, 5.66e9, 1536, 24),
    "stabilityai/stable-diffusion-3.5-large": ("sd3", 8.06e9, 5.66e9, 2432, 38),
    "stabilityai/stable-diffusion-3.5-large-turbo": ("sd3", 8.06e9, 5.66e9, 2432, 38),
    "stabilityai/stable-diffusion-3-medium-diffusers": ("sd3", 2.03e9, 5.66e9, 1536, 24),
    "black-forest-labs/FLUX.1-dev": ("flux", 11.9e9, 4.97e9, 3072, 57),
    "black-forest-labs/FLUX.1-schnell": ("flux", 11.9e9, 4.97e9, 3072, 57),
}
#: Text tokens the transformer attends to: SD3 CLIP 77 + T5 256, FLUX T5 512.
_TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512}
#: Activation elements stored per token and width unit in one transformer block for backward (Korthikanti et al.
#: 2022, 34 s b h bytes at 16 bit, without the attention matrix that fused attention does not store).
_ACT_PER_BLOCK = 16
#: Activation elements per pixel and first VAE decoder channel live at once while decoding (no grad).
_VAE_PER_PIXEL = 3


@dataclass
class MemoryEstimate:
    """Bytes per process by term (see :func:`estimate_memory`); ``total`` is their sum."""

    weights: int
    trained: int
    buffers: int
    activations: int
    rewards: int
    overhead: int
    params: int
    trainable_params: int
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.trained + self.buffers + self.activations + self.rewards + self.overhead


def _tensor_shapes(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], int]:
    """``({name: shape}, approx_numel)``: shapes read from safetensors headers (no tensor is loaded); ``.bin``
    files, which have no header, count as float32 by size."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    approx = 0
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        elif path.is_file():
            approx += path.stat().st_size // 4
    return shapes, approx


def _peft_match(module: str, targets) -> bool:
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _model_facts(cfg, model_dir: Path | None) -> dict[str, Any]:
    """Family, parameter counts, architecture and LoRA size, from the pipeline directory or published sizes."""
    from .models.loading import ADAPTERS

    m = cfg.model
    if model_dir is not None:
        index = json.loads((Path(model_dir) / "model_index.json").read_text())
        family = _supported_pipelines().get(index.get("_class_name"), "sd3")
        adapter = next(c for c in ADAPTERS.values() if c.family == family)
        params: dict[str, int] = {}
        transformer_shapes: dict[str, tuple[int, ...]] = {}
        approx = False
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, list) or value[0] is None:
                continue
            shapes, extra = _tensor_shapes(_weight_files(Path(model_dir) / name))
            approx = approx or extra > 0
            params[name] = sum(math.prod(s) for s in shapes.values()) + extra
            if name == "transformer":
                transformer_shapes = shapes
        tcfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
        vcfg = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
        width = int(tcfg["num_attention_heads"]) * int(tcfg["attention_head_dim"])
        blocks = int(tcfg.get("num_layers", 0)) + int(tcfg.get("num_single_layers", 0))
        rank = m.lora_rank if m.lora_rank > 0 else adapter.default_lora_rank
        targets = m.lora_targets or adapter.default_lora_targets
        exclude = set()
        if family == "sd3" and not m.lora_targets:  # the context-pre-only last block (see SD3Model)
            exclude.add(f"transformer_blocks.{int(tcfg['num_layers']) - 1}.attn.add_q_proj")
        lora = 0
        for key, shape in transformer_shapes.items():
            module = key.removesuffix(".weight")
            if (
                key.endswith(".weight")
                and len(shape) == 2
                and module not in exclude
                and _peft_match(module, targets)
            ):
                lora += rank * (shape[0] + shape[1])
        source = "safetensors headers" + (" and .bin sizes" if approx else "")
        return {
            "family": family,
            "params": sum(params.values()),
            "transformer": params.get("transformer", 0),
            "width": width,
            "blocks": blocks,
            "patch": int(tcfg.get("patch_size", 1)) if family == "sd3" else 2,
            "vae_factor": 2 ** (len(vcfg["block_out_channels"]) - 1),
            "vae_channels": int(vcfg["block_out_channels"][0]),
            "latent_channels": int(vcfg.get("latent_channels", 16)),
            "text_width": int(tcfg.get("joint_attention_dim", width)),
            "lora": lora,
            "source": source,
        }
    if m.path not in _PUBLISHED:
        raise UnknownModelSize(f"{m.path} is not present offline and its size is not known")
    family, transformer, others, width, blocks = _PUBLISHED[m.path]
    adapter = next(c for c in ADAPTERS.values() if c.family == family)
    rank = m.lora_rank if m.lora_rank > 0 else adapter.default_lora_rank
    # LoRA r (in + out) per adapted linear: SD3 8 width x width projections a block; FLUX 19 double blocks
    # (8 projections + 2 feed-forwards of 5 units each for image and text) and 38 single blocks (17 units).
    units = 16 * blocks if family == "sd3" else 36 * 19 + 17 * 38
    return {
        "family": family,
        "params": int(transformer + others),
        "transformer": int(transformer),
        "width": width,
        "blocks": blocks,
        "patch": 2,
        "vae_factor": 8,
        "vae_channels": 128,
        "latent_channels": 16,
        "text_width": 4096,
        "lora": int(rank * width * units),
        "source": "published sizes (the weights are not present offline)",
    }


def estimate_memory(
    cfg,
    model_dir: str | Path | None = None,
    *,
    reward_bytes: int = 0,
    cuda: bool = False,
    num_processes: int = 1,
) -> MemoryEstimate:
    """A rough *estimate* of the peak memory of one training process: nothing is measured, and the constants below
    have not been calibrated against measured peaks, so read it as an order of magnitude with its breakdown.

    ``model_dir`` is the pipeline directory: parameter counts are read from its safetensors headers without
    loading any tensor; without it, the published sizes of a few well-known checkpoints are used
    (:class:`UnknownModelSize` for others). With ``b_w`` the bytes of ``model.dtype``, ``a`` the bytes of an
    activation (2 when the weights are 16-bit or ``mixed_precision`` is set, else 4)::

        total       = weights + trained + buffers + activations + rewards + overhead
        weights     = P_all * b_w              (every pipeline component stays on the device; a full fine-tune
                                                keeps the transformer in float32: + P_transformer * (4 - b_w))
        trained     = P_train * (4 [LoRA weights, float32; 0 for full fine-tuning] + 4 [grads] + 8 [AdamW m, v;
                      2 for 8-bit Adam] + 4 [EMA, when ema_decay > 0] + 4 [DiffusionNFT's old-policy adapter])
        sharding    (several processes) ``zero_stage: 1`` divides the AdamW term by their number, ``2`` the grads
                    too; ``fsdp: true`` divides the transformer's weights and the whole trained term
        buffers     = n_local * (L_txt * D_txt * b_w * g + stored latents * 4)   (the step's text embeddings,
                      g = 2 with CFG negatives, and Flow-GRPO's (T + 1) trajectory latents / the final latents)
        activations = max(train, sample)
        train       = k * c * B_t * N * d * a * (16 * blocks)     without gradient checkpointing
                    = k * c * B_t * N * d * a * (blocks + 16)     with it (block inputs + one recomputed block)
        sample      = c * B_s * N * d * a * 16 + B_s * H * W * C_vae * a * 3   (a block without grad + VAE decode)
        overhead    = 1 GiB on CUDA (context, allocator), 0 on the CPU

    where ``P_all`` / ``P_transformer`` / ``P_train`` are all / transformer / trained parameters (LoRA:
    ``r (in + out)`` per adapted linear), ``N = H W / (f p)^2 + L_txt`` tokens (VAE factor f, patch p, text tokens
    ``L_txt``: SD3 333, FLUX 512), ``d`` the transformer width, ``c = 2`` for SD3 with CFG (a doubled batch),
    ``B_t = optim.train_batch_size``, ``B_s = sample.batch_size``, ``k`` = ReFL's ``grad_steps`` (else 1),
    ``n_local`` the samples of one step on one of ``num_processes`` processes, ``D_txt`` the text embedding width,
    and ``rewards`` the size of the rewards' cached weight files (``reward_bytes``).
    """
    import torch

    from .utils import resolve_dtype

    facts = _model_facts(cfg, Path(model_dir) if model_dir is not None else None)
    m, s, o = cfg.model, cfg.sample, cfg.optim
    b_w = torch.empty((), dtype=resolve_dtype(m.dtype)).element_size()
    a = 2 if (b_w == 2 or cfg.mixed_precision != "no") else 4
    full = m.lora_rank == 0
    p_train = facts["transformer"] if full else facts["lora"]

    world = max(1, int(num_processes))
    fsdp = world if cfg.fsdp and world > 1 else 1
    zero = cfg.zero_stage if world > 1 else 0
    transformer = facts["transformer"] * (4 if full else b_w)
    weights = facts["params"] * b_w - facts["transformer"] * b_w + transformer / fsdp
    adam = (2 if o.use_8bit_adam else 8) / (world if zero >= 1 else 1)
    grads = 4 / (world if zero >= 2 else 1)
    per_param = (0 if full else 4) + grads + adam
    per_param += 4 if cfg.ema_decay > 0 else 0
    per_param += 4 if cfg.algorithm == "diffusion_nft" else 0
    trained = p_train * per_param / fsdp

    f, p = facts["vae_factor"], facts["patch"]
    n_img = (s.height // (f * p)) * (s.width // (f * p))
    l_txt = _TEXT_TOKENS[facts["family"]]
    tokens = n_img + l_txt
    d = facts["width"]
    cfg_sd3 = facts["family"] == "sd3" and cfg.algorithm != "diffusion_nft" and s.guidance_scale > 1
    c = 2 if cfg_sd3 else 1
    k = cfg.refl.grad_steps if cfg.algorithm == "refl" else 1
    per_sample = c * tokens * d * a
    if m.gradient_checkpointing:
        train_act = k * o.train_batch_size * per_sample * (facts["blocks"] + _ACT_PER_BLOCK)
    else:
        train_act = k * o.train_batch_size * per_sample * _ACT_PER_BLOCK * facts["blocks"]
    sample_act = s.batch_size * per_sample * _ACT_PER_BLOCK
    sample_act += s.batch_size * s.height * s.width * facts["vae_channels"] * a * _VAE_PER_PIXEL

    latent = facts["latent_channels"] * (s.height // f) * (s.width // f) * 4
    if cfg.algorithm == "flow_grpo":
        g = cfg.flow_grpo
        n_local, stored = g.prompts_per_step // world * g.group_size, (s.num_steps + 1) * latent
    elif cfg.algorithm == "diffusion_nft":
        n = cfg.diffusion_nft
        n_local, stored = n.prompts_per_step // world * n.group_size, latent
    else:
        n_local, stored = cfg.refl.prompts_per_step // world, latent
    buffers = n_local * (l_txt * facts["text_width"] * b_w * (2 if cfg_sd3 else 1) + stored)

    notes = [f"{n_local} samples a step on each of {world} process(es)"]
    if fsdp > 1:
        notes.append(f"FSDP: transformer and trained tensors / {world}")
    elif zero:
        notes.append(f"ZeRO-{zero}: AdamW states{' and grads' if zero == 2 else ''} / {world}")
    return MemoryEstimate(
        weights=int(weights),
        trained=int(trained),
        buffers=int(buffers),
        activations=int(max(train_act, sample_act)),
        rewards=int(reward_bytes),
        overhead=_GiB if cuda else 0,
        params=int(facts["params"]),
        trainable_params=int(p_train),
        source=facts["source"],
        notes=notes,
    )


def _device_capacity(device: str) -> tuple[int, str] | None:
    """``(bytes, name)`` of the GPU's total memory, or None on the CPU (nothing to compare with)."""
    import torch

    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return None
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return int(props.total_memory), f"{props.name} (cuda:{index})"


def _memory_fix(cfg) -> str:
    m, o = cfg.model, cfg.optim
    steps = []
    if not m.gradient_checkpointing:
        steps.append("set model.gradient_checkpointing=true")
    if m.dtype == "float32":
        steps.append("use model.dtype=bfloat16")
    if m.lora_rank == 0:
        steps.append("train a LoRA (model.lora_rank=32)")
        if cfg.zero_stage < 2 and not cfg.fsdp:
            steps.append(
                "shard it over several GPUs (fsdp=true, or zero_stage=2 for the gradients and AdamW states)"
            )
    if o.train_batch_size > 1 or cfg.sample.batch_size > 1:
        steps.append("lower optim.train_batch_size and sample.batch_size")
    steps.append("or use a GPU with more memory")
    return ", ".join(steps[:-1]).capitalize() + (", " if len(steps) > 1 else "") + steps[-1] + "."


def _check_memory(
    cfg, location: _ModelLocation | None, reward_bytes: int, uncached: list[str], device: str
) -> Finding:
    try:
        root = location.directory() if location is not None and location.available else None
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        est = estimate_memory(
            cfg, root, reward_bytes=reward_bytes, cuda=device.startswith("cuda"), num_processes=world
        )
    except UnknownModelSize:
        return Finding(
            "memory",
            "WARN",
            f"cannot estimate: the weights of {cfg.model.path} are not present offline and its size is not known",
            "Download the model first (see the model check), then run doctor again.",
        )
    except (OSError, ValueError, KeyError) as err:
        return Finding(
            "memory",
            "WARN",
            f"cannot estimate: {err.__class__.__name__}: {err}",
            "Check that the model directory holds complete config.json and safetensors files.",
        )
    train_kind = "full fine-tuning" if cfg.model.lora_rank == 0 else "LoRA"
    parts = [
        f"weights {_gib(est.weights)} ({_count(est.params)} params at {cfg.model.dtype})",
        f"trained {_gib(est.trained)} ({_count(est.trainable_params)} {train_kind} params, grads, AdamW)",
        f"buffers {_gib(est.buffers)}",
        f"activations {_gib(est.activations)}",
    ]
    if est.rewards:
        parts.append(f"rewards {_gib(est.rewards)}")
    if est.overhead:
        parts.append(f"CUDA overhead {_gib(est.overhead)}")
    notes = list(est.notes)
    if uncached:
        notes.append(f"not counted: the weights of {', '.join(uncached)} (not cached)")
    msg = (
        f"estimated peak ~{_gib(est.total)} a process = {' + '.join(parts)}; {'; '.join(notes)}; "
        f"from {est.source}; an estimate, not a measurement"
    )
    capacity = _device_capacity(device)
    if capacity is None:
        return Finding("memory", "OK", msg + f"; no GPU on {device} to compare with")
    total, what = capacity
    share = est.total / total
    msg += f"; {share:.0%} of {_gib(total)} on {what}"
    if share > 1.0:
        return Finding("memory", "FAIL", msg, _memory_fix(cfg))
    if share > 0.85:
        return Finding("memory", "WARN", msg + " (little headroom)", _memory_fix(cfg))
    return Finding("memory", "OK", msg)


# ---------------------------------------------------------------------------------------------- on-policy


def _load_policy(cfg, path: str, device: str):
    """The model as the trainer builds it: loaded at the configured dtype on ``device``, with its LoRA (or full
    fine-tuning) set up by the trainer's own code; the LoRA's B matrices get small random values so the adapter
    path contributes to the velocity as it does after a few updates."""
    import dataclasses
    import types

    import torch

    from .models import load_model_from_config
    from .trainers.engine import Trainer

    model = load_model_from_config(dataclasses.replace(cfg.model, path=path), device=device)
    Trainer._setup_training_mode(types.SimpleNamespace(cfg=cfg, model=model))
    if model.has_lora:
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            for name, p in model.transformer.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * _PROBE_LORA_STD)
    return model


def _probe_prompts(cfg, n: int) -> list[str]:
    prompts: list[str] = []
    if not cfg.data.train.startswith("hf:"):
        with contextlib.suppress(Exception):
            from .data import load_prompts

            prompts = load_prompts(cfg.data.train, cfg.data.prompt_key).prompts[:n]
    prompts = prompts or ["a photo of a cat on a red chair", "a watercolor painting of a lighthouse"]
    return [prompts[i % len(prompts)] for i in range(n)]


def _autocast(cfg, device: str):
    import torch

    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _recompute(model, cfg, device, latents, sigmas, cond, steps, batch, step_fn, noise_level, guidance):
    """Log-probs ``(n, len(steps))`` of the stored transitions recomputed in micro-batches of ``batch`` rows, with
    gradients enabled as in the trainer's update."""
    import torch

    n = latents.shape[0]
    out = torch.empty(n, len(steps), dtype=torch.float32, device=latents.device)
    for j, k in enumerate(steps):
        for i in range(0, n, batch):
            rows = list(range(i, min(n, i + batch)))
            x, x_next = latents[rows, k], latents[rows, k + 1]
            with torch.enable_grad(), _autocast(cfg, device):
                v = model.velocity(x, sigmas[k].expand(len(rows)), cond.select(rows), guidance)
            step = step_fn(x, v, sigmas[k], sigmas[k + 1], noise_level, prev_sample=x_next)
            out[rows, j] = step.log_prob.detach()
    return out


def _probe_window(cfg, num_steps: int) -> tuple[str, float, int, int]:
    """``(sampler, noise_level, start, end)``: the configured stochastic window, cut to ONPOLICY_STEPS steps."""
    g = cfg.flow_grpo  # the defaults of FlowGRPOConfig for the other algorithms
    sampler = g.sampler
    last = num_steps - 1 if sampler == "cps" else num_steps
    if g.sde_window == 0:
        lo, hi = 0, last
    else:
        lo = g.sde_window_range[0] if g.sde_window_range else 0
        lo = max(0, min(lo, last - g.sde_window))
        hi = lo + g.sde_window
    return sampler, g.noise_level, lo, max(lo + 1, min(hi, lo + ONPOLICY_STEPS))


def _graded(
    name: str, dev: float, tol: float, worst: str, msg: str, bad: str, bad_fix: str, near_fix: str
) -> Finding:
    """``worst`` at or above ``tol``, WARN within a factor 10 of it, OK below."""
    if dev >= tol:
        return Finding(name, worst, msg + bad, bad_fix)
    if dev >= tol / 10:
        return Finding(name, "WARN", msg + ": within tolerance but close to it", near_fix)
    return Finding(name, "OK", msg)


def _trained_steps(cfg, num_steps: int) -> list[int]:
    """The steps Flow-GRPO trains with this config (every step a window may cover when there is a window)."""
    g = cfg.flow_grpo
    last = num_steps - 1 if g.sampler == "cps" else num_steps
    if g.sde_window:
        lo, hi = g.sde_window_range or [0, max(1, num_steps // 2)]
        return list(range(lo, min(last, hi + g.sde_window - 1)))
    return list(range(last))[: max(1, int(last * g.timestep_fraction))]


def _kl_scale_finding(cfg, sigmas) -> Finding:
    """``kl-scale``: the KL weight in the reference code's units (the papers' betas) and in the exact ones, over the
    trained steps of the configured schedule; the two differ by the step size ``|dt|``."""
    g = cfg.flow_grpo
    steps = _trained_steps(cfg, len(sigmas) - 1)
    if g.sampler == "cps":
        return Finding(
            "kl-scale", "OK", f"kl_beta={g.kl_beta:g}: with the CPS sampler the reference and exact KL agree"
        )
    dts = [float(sigmas[k] - sigmas[k + 1]) for k in steps]
    where = f"over the {len(steps)} trained step(s) of the {len(sigmas) - 1}-step schedule"
    if g.kl_scale == "reference":
        exact = [g.kl_beta * dt for dt in dts]
        return Finding(
            "kl-scale",
            "OK",
            f"kl_beta={g.kl_beta:g} in reference units (the papers': 0.04 GenEval/OCR, 0.01 PickScore); in exact units "
            f"(kl_scale=exact) the same weight is kl_beta x |dt| = {sum(exact) / len(exact):.3g} on average "
            f"({min(exact):.3g}..{max(exact):.3g}) {where}",
        )
    ref = [g.kl_beta / dt for dt in dts]
    mean = sum(ref) / len(ref)
    return Finding(
        "kl-scale",
        "WARN",
        f"kl_scale=exact: kl_beta={g.kl_beta:g} weighs the KL like a reference-units beta of {mean:.3g} on average "
        f"({min(ref):.3g}..{max(ref):.3g}, kl_beta / |dt|) {where}, {mean / g.kl_beta:.1f}x the same number in the "
        "papers' units",
        "Set flow_grpo.kl_scale=reference to use a paper's beta as given (the default), or keep exact on purpose "
        "with a beta about that factor smaller.",
    )


def _check_onpolicy(cfg, location: _ModelLocation, device: str) -> list[Finding]:
    import torch

    from .samplers import cps_step, rollout, sde_step
    from .trainers.engine import seeded_generator

    s, o = cfg.sample, cfg.optim
    flow_grpo = cfg.algorithm == "flow_grpo"
    tol = cfg.flow_grpo.clip_range if flow_grpo else 1e-4
    tol_text = f"tolerance {tol:.0e}" + (" = flow_grpo.clip_range" if flow_grpo else "")
    worst = "FAIL" if flow_grpo else "WARN"
    note = "" if flow_grpo else f" ({cfg.algorithm} does not use this ratio; it measures determinism)"
    if s.num_steps < 2 and cfg.flow_grpo.sampler == "cps":
        return [
            Finding(
                "ratio", "WARN", "skipped: a 1-step CPS rollout has no stochastic step", "Use more steps."
            )
        ]
    try:
        path = location.spec if location.kind == "tiny" else str(location.directory())
        model = _load_policy(cfg, path, device)  # loads without progress bars, as every load_model does
        sampler, noise_level, lo, hi = _probe_window(cfg, s.num_steps)
        step_fn = sde_step if sampler == "sde" else cps_step
        n = max(1, min(max(s.batch_size, o.train_batch_size), ONPOLICY_ROWS))
        prompts = _probe_prompts(cfg, n)
        sigmas = model.schedule(s.num_steps, s.height, s.width)[: hi + 1]
        cond = model.encode(prompts)
        trajectories, old = [], []
        chunk = max(1, min(s.batch_size, n))
        for i in range(0, n, chunk):  # sampled in chunks of sample.batch_size, as the trainer does
            rows = list(range(i, min(n, i + chunk)))
            with torch.no_grad(), _autocast(cfg, device):
                noise = model.sample_noise(
                    len(rows), s.height, s.width, [seeded_generator(cfg.seed, 0, 1, r) for r in rows]
                )
                out = rollout(
                    model,
                    cond.select(rows),
                    sigmas,
                    noise,
                    guidance_scale=s.guidance_scale,
                    sampler=sampler,
                    noise_level=noise_level,
                    sde_window=(lo, hi),
                    generator=[seeded_generator(cfg.seed, 0, 2, r) for r in rows],
                )
            trajectories.append(out.latents)
            old.append(out.log_probs[:, lo:hi])
        latents, old_logp = torch.cat(trajectories), torch.cat(old)
        steps = list(range(lo, hi))
        args = (cfg, device, latents, sigmas, cond, steps)
        kw = {"step_fn": step_fn, "noise_level": noise_level, "guidance": s.guidance_scale}
        train_bs = max(1, min(o.train_batch_size, n))
        new_logp = _recompute(model, *args, batch=train_bs, **kw)
        single_logp = _recompute(model, *args, batch=1, **kw) if train_bs > 1 else new_logp
        dtype = str(next(model.transformer.parameters()).dtype).removeprefix("torch.")
        full_sigmas = model.schedule(s.num_steps, s.height, s.width).float().cpu()
    except Exception as err:  # noqa: BLE001 - report any failure of the probe as a finding
        first_line = (str(err).splitlines() or [""])[0]
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [
            Finding(
                "ratio",
                "FAIL",
                f"the on-policy probe could not run: {err.__class__.__name__}: {first_line}",
                "Fix that error first (it is what the trainer would hit when it loads and samples this model).",
            )
        ]
    del model
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()

    setting = (
        f"{n} samples x {len(steps)} {sampler.upper()} step(s) {lo}..{hi - 1} of {s.num_steps}, {s.height}x{s.width}, "
        f"{dtype} weights, mixed_precision={cfg.mixed_precision} on {device}"
    )
    findings = []
    if not (torch.isfinite(old_logp).all() and torch.isfinite(new_logp).all()):
        return [
            Finding(
                "ratio",
                "FAIL",
                f"log-probs are not finite (NaN or inf) over {setting}",
                "Use model.dtype=bfloat16 or float32 (float16 overflows in large models) and check the weights.",
            )
        ]
    ratio_dev = float((new_logp - old_logp).exp().sub(1).abs().max())
    msg = (
        f"max |exp(logp_new - logp_old) - 1| = {ratio_dev:.2e} ({tol_text}) over "
        f"{setting}; rollout batch {chunk}, recompute batch {train_bs}{note}"
    )
    if flow_grpo and cfg.flow_grpo.old_logp == "recompute":
        findings.append(
            Finding(
                "ratio",
                "OK",
                msg
                + "; flow_grpo.old_logp=recompute takes the old log-probs from the training shapes, so the "
                "first ratio is exactly 1 whatever this drift",
            )
        )
    else:
        findings.append(
            _graded(
                "ratio",
                ratio_dev,
                tol,
                worst,
                msg,
                ": fresh samples are off-policy",
                "Set flow_grpo.old_logp=recompute (one no-grad forward per trained step recomputes the old log-probs "
                "in the training shapes), or make the recompute match the rollout: deterministic kernels "
                "(torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8), no dropout, the same dtype "
                "and mixed_precision in sampling and training, and sample.batch_size equal to "
                "optim.train_batch_size.",
                "Prefer float32 sampler maths and equal sample.batch_size and optim.train_batch_size, or set "
                "flow_grpo.old_logp=recompute.",
            )
        )
    if flow_grpo and cfg.flow_grpo.kl_beta > 0:
        findings.append(_kl_scale_finding(cfg, full_sigmas))

    if train_bs == 1:
        findings.append(
            Finding("batch-invariance", "OK", "optim.train_batch_size is 1: the recompute is batch size 1")
        )
        return findings
    batch_dev = float((single_logp - new_logp).exp().sub(1).abs().max())
    msg = (
        f"max |exp(logp_bs1 - logp_bs{train_bs}) - 1| = {batch_dev:.2e} ({tol_text}) over {n} samples "
        f"x {len(steps)} step(s){note}"
    )
    findings.append(
        _graded(
            "batch-invariance",
            batch_dev,
            tol,
            worst,
            msg,
            ": log-probs depend on the batch size",
            "Set optim.train_batch_size equal to sample.batch_size so the rollout and the ratio's recompute "
            "use the same batch, or sample in float32 (model.dtype=float32, mixed_precision=no).",
            "Set optim.train_batch_size equal to sample.batch_size.",
        )
    )
    return findings


# ---------------------------------------------------------------------------------------------- driver


def _resolve_device(device) -> str:
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_doctor(
    config=None,
    overrides: list[str] | None = None,
    *,
    checks: Iterable[str] | None = None,
    device: str | None = None,
    on_finding: Callable[[Finding], None] | None = None,
) -> list[Finding]:
    """Run the checks (all of :data:`CHECKS` by default; the config ones only with a config or overrides).

    Args:
        config: a YAML path, a dict or a :class:`~diffrl.config.TrainConfig`; None checks the environment only
            (unless ``overrides`` describe a whole config).
        overrides: dotted ``key=value`` overrides, as for ``diffrl train``.
        checks: groups to run, a subset of :data:`CHECKS`.
        device: where the on-policy probe runs and whose memory the estimate is compared with (default: ``cuda``
            when available, else ``cpu``).
        on_finding: called with each finding as soon as it is made (the command prints them as they come).

    Returns:
        The findings, in order. Raises :class:`~diffrl.config.ConfigError` for bad input: a config path that does
        not exist, a file that is not YAML, an override that is not ``key=value``, an unknown check.
    """
    from .config import ConfigError

    overrides = list(overrides or [])
    wanted = list(CHECKS) if checks is None else list(checks)
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown:
        raise ConfigError(f"check {unknown[0]!r} is not known; choose from {', '.join(CHECKS)}.")
    dev = _resolve_device(device)
    findings: list[Finding] = []

    def add(items: Finding | list[Finding]) -> None:
        for item in items if isinstance(items, list) else [items]:
            findings.append(item)
            if on_finding is not None:
                on_finding(item)

    with_config = (config is not None or bool(overrides)) and any(c in wanted for c in CHECKS[1:])
    if with_config:  # bad input raises here, before any check runs
        cfg, problem = _read_config(config, overrides)
    if "env" in wanted:
        add(check_env(device))
    if not with_config:
        return findings
    if cfg is None:
        add(problem)
        return findings
    label = _config_label(config)
    if "config" in wanted:
        rewards = ", ".join(sorted(set(cfg.reward) | set(cfg.eval_reward)))
        add(
            Finding(
                "config",
                "OK",
                f"{label} validates: {cfg.algorithm}, model {cfg.model.path} ({cfg.model.dtype}), rewards {rewards}, "
                f"{cfg.sample.height}x{cfg.sample.width}, {cfg.sample.num_steps} steps",
            )
        )
        add(_check_data(cfg))
        add(_check_precision(cfg, dev))
        if cfg.zero_stage:
            add(_check_deepspeed(cfg))
    location = None
    if any(c in wanted for c in ("model", "memory", "onpolicy")):
        location = _locate_model(cfg, label)
        if "model" in wanted:
            add(location.finding)
    reward_bytes, uncached = 0, []
    if any(c in wanted for c in ("rewards", "memory")):
        statuses = [_reward_status(name, kwargs, label) for name, kwargs in _config_rewards(cfg)]
        reward_bytes = sum(r.nbytes for r in statuses)
        uncached = [r.name for r in statuses if not r.cached]
        if "rewards" in wanted:
            add([r.finding for r in statuses])
    if "memory" in wanted:
        add(_check_memory(cfg, location, reward_bytes, uncached, dev))
    if "onpolicy" in wanted:
        if location is not None and location.available:
            add(_check_onpolicy(cfg, location, dev))
        else:
            add(
                Finding(
                    "ratio",
                    "WARN",
                    f"skipped: the model {cfg.model.path} is not available offline",
                    "Fix the model check, then run doctor again to check the on-policy ratio.",
                )
            )
    return findings


def _parse_words(words: list[str]) -> tuple[str | None, list[str]]:
    if words and "=" not in words[0]:
        return words[0], words[1:]
    return None, words


def main(argv: list[str] | None = None) -> int:
    """``diffrl doctor [CONFIG.yaml] [key=value ...] [--check GROUP] [--device DEV]``; exit 0, 1 (a FAIL) or 2."""
    import argparse

    from .config import ConfigError

    parser = argparse.ArgumentParser(
        prog="diffrl doctor",
        description="Check the environment (and a config) before a long run: one line per check with the fix.",
    )
    parser.add_argument(
        "words", nargs="*", help="a YAML config, then dotted key=value overrides (e.g. sample.batch_size=4)"
    )
    parser.add_argument(
        "--check", action="append", choices=CHECKS, help="run only this group of checks (repeatable)"
    )
    parser.add_argument(
        "--device", default=None, help="device of the on-policy probe (default: cuda if available)"
    )
    args = parser.parse_args(argv)
    config, overrides = _parse_words(args.words)
    try:
        findings = run_doctor(
            config,
            overrides,
            checks=args.check,
            device=args.device,
            on_finding=lambda f: print(f.line(), flush=True),
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = {s: sum(f.status == s for f in findings) for s in STATUSES}
    print(f"doctor: {counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
