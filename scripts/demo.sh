#!/usr/bin/env bash
# Set up .venv if needed and run the embedded demo: `diffrl demo` (RL fine-tuning of the toy-world model on a CPU,
# about 10 minutes). Extra arguments go to `diffrl demo`, e.g. ./scripts/demo.sh max_steps=10 output_dir=runs/demo2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/diffrl demo "$@"
