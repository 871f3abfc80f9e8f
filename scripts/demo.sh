#!/usr/bin/env bash
# Set up .venv if needed and run the demo (extra arguments go to the demo script).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python benchmarks/bench_rollout.py "$@"
