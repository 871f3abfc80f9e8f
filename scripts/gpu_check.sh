#!/usr/bin/env bash
# The checks that need a CUDA GPU, about 8 minutes after the set-up on one GPU (H100/H200 class; each part has its
# own timeout): the gpu-marked tests (mixed precision on every trainer, a bf16 Flow-GRPO step on every model family's
# tiny model, the reference preset's Flow-GRPO step on a full-size SD3.5-M block stack in bf16), the full-size rollout
# and trainer benchmarks and the memory benchmark (every family, one process each: measured peak
# against the doctor's estimate, gathered into one bench_memory.json).
# Output goes to stdout and to $OUT (or runs/gpu-check).
# Usage: bash scripts/gpu_check.sh        (sets up .venv on the first run, as scripts/test.sh does)
# On a GPU machine without a package registry, whose own Python already holds torch with CUDA: run
# `bash scripts/gpu_wheels.sh` where pip works, bring the checkout with its .whl/ folder, and run
#     DIFFRL_PYTHON=python3 bash scripts/gpu_check.sh
# (the wheels go to a private folder on PYTHONPATH; that Python's own packages are left as they are).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
py=${DIFFRL_PYTHON:-}
if [ -z "$py" ]; then
  bash scripts/setup.sh
  py=.venv/bin/python
else
  site=${TMPDIR:-/tmp}/diffrl-gpu-site
  if compgen -G ".whl/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
  fi
  # the installed diffrl (from the wheel) comes first; the checkout only after it, and Python is run with -P so
  # that the working directory's diffrl/ (without rewards/ and samplers/) does not shadow it
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}:$PWD:$PWD/benchmarks"
  py="$py -P"
fi
$py -c "import diffrl.samplers, torch, diffusers, transformers, peft, accelerate; print('diffrl', diffrl.__file__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" || exit 1
$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" || exit 1
status=0
timeout 170 $py -m pytest -q -s -p no:cacheprovider --durations=12 -m gpu tests/test_gpu.py tests/test_models.py 2>&1 | tee "$out/gpu_tests.txt" || status=1
# measured peak memory of one LoRA training step against the doctor's estimate (random full-size transformers of
# every family: 512 px images, 17-frame 480x832 videos), one process per family: in one process, FLUX.2 [klein]
# after FLUX.2 [dev] once failed in cuBLAS (an illegal memory access) although it measures cleanly alone
mkdir -p "$out/mem"
for family in sd35m flux1 qwen_image z_image flux2_dev flux2_klein wan21_1.3b wan21_14b wan22_a14b; do
  timeout 45 $py benchmarks/bench_memory.py --families "$family" --batch 1 --json "$out/mem/$family.json" \
      2>&1 | tee -a "$out/bench_memory.txt" | grep -v "^  File\|^    " || status=1
done
$py -c "import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); rows = [r for f in sorted(d.glob('*.json')) for r in json.loads(f.read_text())]; pathlib.Path(sys.argv[2]).write_text(json.dumps(rows, indent=2) + '\n'); [f.unlink() for f in d.glob('*.json')]; d.rmdir()" "$out/mem" "$out/bench_memory.json"
timeout 70 $py benchmarks/bench_rollout.py --arch full --family sd3 --device cuda --dtype bfloat16 \
    --height 512 --width 512 --steps 10 --batch 8 --repeats 4 --warmup 1 \
    --json "$out/bench_rollout_sd3.json" 2>&1 | grep -v "should be kept in float32" | tee "$out/bench_rollout_sd3.txt" || status=1
# one full-size Flow-GRPO step against one DiffusionNFT step (SD3.5-M presets, 16 images of 512 px, 10 steps)
timeout 200 $py benchmarks/bench_trainers.py --arch full --device cuda --dtype bfloat16 --group-size 8 --prompts 2 \
    --repeats 2 --warmup 1 --json "$out/bench_trainers_full.json" 2>&1 | grep -v "should be kept in float32" \
    | tee "$out/bench_trainers_full.txt" || status=1
exit $status
