#!/usr/bin/env bash
# Create .venv (once) and install diffrl with its test tools into it; re-installs when pyproject.toml changes.
# Override the torch install with DIFFRL_TORCH (default: "torch==2.14.1 torchvision==0.29.1").
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
torch_spec=${DIFFRL_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python_bin --version)"
  "$python_bin" -m venv .venv
fi
stamp=.venv/.diffrl-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $torch_spec"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $torch_spec"
  .venv/bin/python -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $torch_spec
  echo "[setup] installing diffrl (editable) with the dev extras"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
