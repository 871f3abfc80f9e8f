#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels that a GPU machine without one needs for
# scripts/gpu_check.sh: the pure-Python packages diffrl needs that a stock CUDA + PyTorch image usually lacks or holds
# in another version (diffusers, peft, open_clip and its text cleaner), in the versions of the local .venv, and a
# wheel of diffrl itself (its subpackages diffrl.rewards and diffrl.samplers live in rewards/ and samplers/, so the
# checkout does not import without an install). torch, transformers, accelerate, safetensors, numpy and the rest
# come from the GPU machine's own Python. The wheels go to .whl/ (git ignores it); bring it with the checkout to the
# GPU machine and run
#     DIFFRL_PYTHON=python3 bash scripts/gpu_check.sh
# which installs them into a private folder (nothing of the machine's Python is changed).
# Usage: bash scripts/gpu_wheels.sh [python version of the GPU machine, default 3.12]   (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
local_py=${PYTHON:-.venv/bin/python}
# the versions the CPU suite runs with here (.venv), so that the GPU run tests the same library code
pins=$("$local_py" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("diffusers", "peft", "open_clip_torch", "ftfy", "wcwidth")))
PY
)
echo "[gpu_wheels] $pins"
rm -rf .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
# diffrl itself, built with the local .venv's setuptools (the GPU machine's may be older than pyproject asks for)
"$local_py" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
ls .whl
