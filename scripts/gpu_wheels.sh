#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels that a GPU machine without one needs for
# scripts/gpu_check.sh: the pure-Python packages diffrl needs that a stock CUDA + PyTorch image usually lacks or
# holds in another version (diffusers, peft, open_clip and its text cleaner), and a wheel of diffrl itself (its
# subpackages diffrl.rewards and diffrl.samplers live in rewards/ and samplers/, so the checkout alone does not
# import without an install). torch, transformers, accelerate,
# safetensors, numpy and the rest are taken from the GPU machine's own Python. The wheels go to .whl/ (keep it out
# of git); copy it next to the checkout on the GPU machine and run
#     DIFFRL_PYTHON=python3 bash scripts/gpu_check.sh
# which installs them into a private folder (nothing of the machine's Python is changed).
# Usage: bash scripts/gpu_wheels.sh [python version of the GPU machine, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 peft==0.21.2 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# diffrl itself, built with the local .venv's setuptools (the GPU machine's may be older than pyproject asks for)
"${PYTHON:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
ls .whl
