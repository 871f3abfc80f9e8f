#!/usr/bin/env bash
# Set up .venv if needed, lint, and run the offline test suite (extra arguments go to pytest, e.g. --run-slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
