"""Environment checks: Python and package versions against pyproject.toml, CUDA and its devices, and whether this
machine suits a config (its dtype and mixed precision, deepspeed for ZeRO)."""

from __future__ import annotations

from pathlib import Path

from .findings import Finding, GiB

__all__ = ["check_env", "check_precision", "check_deepspeed"]

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


def _minimums() -> dict[str, str]:
    """``{package: specifier}`` from the checkout's pyproject.toml, else the installed metadata, else built-ins."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"  # diffrl/doctor/ -> the checkout
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
                f"cuda:{i} {props.name} {props.total_memory / GiB:.0f} GiB sm{cap[0]}{cap[1]} "
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


def check_deepspeed(cfg) -> Finding:
    """``zero_stage`` needs deepspeed with unmanaged gradient accumulation (read from the package metadata)."""
    from ..trainers.zero import TESTED_VERSION

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


def check_precision(cfg, device: str) -> Finding:
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
