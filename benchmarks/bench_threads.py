"""Torch CPU threads for diffrl's entry points: one thread against torch's default, side by side, idle and busy.

``diffrl train``, ``sample``, ``eval`` and ``demo`` set one torch thread on a machine without CUDA unless
``OMP_NUM_THREADS`` (or ``--threads``) says otherwise (:func:`diffrl.utils.set_cpu_threads`). This script shows why:
it times toy training steps (the demo's DiffusionNFT preset on the shipped toy model) in fresh processes with
``--threads 1`` and with torch's default (one per core), first on an otherwise idle machine and then with one busy
process per extra core (what a notebook kernel, a data loader or a second job does to a small machine), and prints
the seconds per step and the ratios. The first step of each run (model and reward set-up) is not counted.

Usage: ``python benchmarks/bench_threads.py [--steps 4] [--no-busy]`` (about 2-4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh process: argv[1] = threads (0: torch's default), argv[2] = steps, argv[3] = output directory.
CHILD = r"""
import json, sys, time
import torch
threads, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if threads:
    torch.set_num_threads(threads)
from diffrl.train import build_trainer
trainer = build_trainer(
    "configs/toy/diffusion_nft.yaml",
    [f"output_dir={out}", "data.eval_size=0", "report_to=none", f"max_steps={steps + 1}", "checkpointing_steps=0"],
)
times = []
for step in range(steps + 1):
    t0 = time.perf_counter()
    trainer.train_step(step)
    trainer.step += 1
    times.append(time.perf_counter() - t0)
print(json.dumps({"threads": torch.get_num_threads(), "seconds": times[1:]}))
"""


def _burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def run(threads: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(threads), str(steps), str(Path(tmp) / "run")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=3600,
        )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=4, help="timed training steps per run (after one warm-up)"
    )
    parser.add_argument("--no-busy", action="store_true", help="skip the runs next to busy processes")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores; toy DiffusionNFT preset, {args.steps} timed steps per run")
    results = {}
    settings = [("idle", 0)] + ([] if args.no_busy else [("busy", max(1, cores - 1))])
    for label, busy in settings:
        workers = []
        if busy:
            stop_at = time.time() + 3600
            workers = [
                multiprocessing.Process(target=_burn, args=(stop_at,), daemon=True) for _ in range(busy)
            ]
            for w in workers:
                w.start()
        try:
            for threads in (1, 0):
                out = run(threads, args.steps)
                mean = sum(out["seconds"]) / len(out["seconds"])
                results[label, threads] = mean
                name = "1 thread" if threads == 1 else f"torch default ({out['threads']} threads)"
                print(
                    f"  {label:4s} ({busy} busy process{'es' * (busy != 1)}): {name:28s} {mean:7.2f} s/step"
                )
        finally:
            for w in workers:
                w.terminate()
    for label, _ in settings:
        ratio = results[label, 0] / results[label, 1]
        print(f"{label}: torch default / 1 thread = {ratio:.2f}x the time per step")


if __name__ == "__main__":
    main()
