"""Long runs: does a trainer's process grow? Memory, open files and threads over many steps, for every trainer.

Each trainer runs its tiny preset (``configs/tiny/<algorithm>.yaml``, the random tiny SD3) in a fresh process for
``--steps`` steps the way a real run does: TensorBoard logging, an evaluation every ``--eval-every`` steps and a
checkpoint every ``--checkpoint-every`` (the newest 2 kept). After every step the child records its resident memory
(RSS), its open file descriptors, its threads (psutil) and the step's CPU seconds. The table gives them early (after
the first tenth of the steps, when the caches have filled) and at the end, and the RSS slope over the second half (a
least-squares fit, MiB per 100 steps): a leak shows as a slope that does not fall with more steps, as descriptors or
threads that climb with the evaluations and checkpoints, or as steps that get slower (the CPU seconds of the steps in
the second tenth against the last tenth).

Usage: ``python benchmarks/bench_long_run.py [--algorithms awm flow_grpo ...] [--steps 600]`` (one torch thread a
child, one child at a time; about a minute a trainer for 600 steps on the 2-core CPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["flow_grpo", "diffusion_nft", "awm", "refl", "dpo"]

# Runs in a fresh process: argv[1] = algorithm, argv[2] = steps, argv[3] = eval every, argv[4] = checkpoint every,
# argv[5] = output directory. Prints one JSON line.
CHILD = r"""
import json, sys, threading, time
import psutil
import torch
torch.set_num_threads(1)
from diffrl.train import build_trainer
algorithm, steps, eval_every, ckpt_every, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
trainer = build_trainer(
    f"configs/tiny/{algorithm}.yaml",
    [f"output_dir={out}", f"max_steps={steps}", f"eval_every={eval_every}", f"checkpointing_steps={ckpt_every}",
     "checkpoints_total_limit=2", "report_to=tensorboard", "data.eval_size=2"],
)
proc = psutil.Process()
rows = []
step_fn = trainer.train_step
def recorded(i):
    t0 = time.process_time()
    metrics = step_fn(i)
    seconds = time.process_time() - t0
    rows.append((proc.memory_info().rss, proc.num_fds(), proc.num_threads(), threading.active_count(), seconds))
    return metrics
trainer.train_step = recorded
trainer.train()
rows.append((proc.memory_info().rss, proc.num_fds(), proc.num_threads(), threading.active_count(), 0.0))
print(json.dumps({"rows": rows}))
"""


def run(algorithm: str, steps: int, eval_every: int, ckpt_every: int) -> list[tuple[int, int, int, int]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                algorithm,
                str(steps),
                str(eval_every),
                str(ckpt_every),
                f"{tmp}/run",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        raise SystemExit(f"{algorithm} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["rows"]


def summary(algorithm: str, rows: list) -> str:
    mib = np.array([r[0] for r in rows], dtype=np.float64) / 2**20
    steps = len(rows) - 1  # the last row is after train() returned
    early = max(0, steps // 10 - 1)
    half = np.arange(steps // 2, steps)
    slope = float(np.polyfit(half, mib[half], 1)[0]) * 100 if len(half) > 1 else float("nan")
    fds, threads = [r[1] for r in rows], [r[2] for r in rows]
    tenth = max(1, steps // 10)
    cpu = np.array([r[4] for r in rows[:steps]])
    first, last = cpu[tenth : 2 * tenth].mean(), cpu[steps - tenth : steps].mean()
    return (
        f"| {algorithm} | {steps} | {mib[early]:.0f} | {mib[steps - 1]:.0f} | {mib.max():.0f} | {slope:+.2f} | "
        f"{fds[early]} -> {fds[steps - 1]} (max {max(fds)}) | {threads[early]} -> {threads[steps - 1]} "
        f"(max {max(threads)}) | {first:.3f} -> {last:.3f} ({last / first:.2f}x) | {mib[-1]:.0f}, {fds[-1]}, "
        f"{threads[-1]} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    args = parser.parse_args()
    print(
        f"{args.steps} steps, an evaluation every {args.eval_every}, a checkpoint every {args.checkpoint_every} "
        "(2 kept), TensorBoard on; RSS in MiB"
    )
    print(
        "| trainer | steps | RSS early | RSS at the end | RSS max | RSS slope, 2nd half (MiB / 100 steps) | "
        "open files early -> end | threads early -> end | CPU s a step, 2nd tenth -> last tenth | after train(): "
        "RSS, files, threads |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for algorithm in args.algorithms:
        print(
            summary(algorithm, run(algorithm, args.steps, args.eval_every, args.checkpoint_every)), flush=True
        )


if __name__ == "__main__":
    main()
