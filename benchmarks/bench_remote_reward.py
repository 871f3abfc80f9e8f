"""The remote reward's overhead per batch against in-process scoring: same reward, same batch, side by side in one run.

For each reward and batch shape, a ``diffrl serve-reward`` subprocess on 127.0.0.1 (port 0: a free one) serves the
reward on the CPU. It first checks that the remote scores equal the in-process scores of the uint8-quantised images
bit for bit, then times, alternating, (a) the in-process reward on the float images, as a trainer calls it, and (b)
``load_reward("remote", url=...)`` on the same images: quantising, the request body (a JSON line and the raw bytes),
HTTP over the loopback, the server's parsing, its worker thread, the answer. It prints the request's size and the
medians of (a), (b), their ratio, the per-repeat difference b - a, the time the server's reward took for each call
(from its ``/stats``) and b minus that: the transport's own cost, which is steadier than b - a on a machine whose
load varies (both reward runs then vary). Client and server share this machine's cores, as on a training node that
runs its reward server beside it.

Usage: ``python benchmarks/bench_remote_reward.py [--repeats 25] [--batch-wait-ms 0]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: (reward, batch, size): a cheap reward (the overhead alone) and a CPU-bound one (JPEG encoding), at a rollout
#: chunk of 512 x 512 images and at 1024 x 1024
CASES = [
    ("brightness", 8, 512),
    ("jpeg_compressibility", 8, 512),
    ("brightness", 4, 1024),
    ("jpeg_compressibility", 4, 1024),
]


def start_server(reward: str, batch_wait_ms: float) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "diffrl", "serve-reward", reward, "--port", "0", "--device", "cpu"]
    cmd += ["--batch-wait-ms", str(batch_wait_ms)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, line.split(" at ", 1)[1].split(" ", 1)[0]


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth images with some texture (JPEG sizes vary), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(batch):
        a, b, c = torch.rand(3, generator=g)
        noise = 0.05 * torch.rand(3, size, size, generator=g)
        base = torch.stack([xs * a, torch.sin(6.28 * (2 + 6 * b) * ys) * 0.5 + 0.5, (xs + ys) * c / 2])
        out.append((base + noise).clamp(0, 1))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0, help="the server's merging window")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import httpx

    from diffrl.rewards import load_reward
    from diffrl.rewards.server import encode_request, quantize_images

    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, batch_wait_ms={args.batch_wait_ms:g}, "
        f"medians of {args.repeats} repeats (ms)"
    )
    columns = [
        "reward",
        "batch",
        "MB",
        "in-process",
        "remote",
        "ratio",
        "remote-in",
        "server",
        "remote-server",
    ]
    widths = [22, 12, 6, 10, 8, 6, 9, 7, 13]
    print(
        " ".join(
            f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(columns, widths, strict=True))
        )
    )
    servers = {}
    med = statistics.median
    try:
        for reward_name, batch, size in CASES:
            if reward_name not in servers:
                servers[reward_name] = start_server(reward_name, args.batch_wait_ms)
            _, url = servers[reward_name]
            local = load_reward(reward_name)
            remote = load_reward("remote", url=url).load()
            x = images(batch, size)
            prompts = [f"image {i}" for i in range(batch)]
            mb = len(encode_request(quantize_images(x), prompts, {})) / 1e6

            def scoring_seconds() -> float:
                return httpx.get(f"{url}/stats", timeout=10).json()["scoring_seconds"]  # noqa: B023

            with torch.no_grad():
                q = quantize_images(x).float() / 255
                assert torch.equal(local(q, prompts), remote(x, prompts)), "remote scores differ"
                for _ in range(2):  # warm-up: first calls, connection, allocator
                    local(x, prompts)
                    remote(x, prompts)
                t_local, t_remote, t_server = [], [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    local(x, prompts)  # as a trainer calls it: the float images, nothing quantised
                    t_local.append(time.perf_counter() - t0)
                    before = scoring_seconds()
                    t0 = time.perf_counter()
                    remote(x, prompts)
                    t_remote.append(time.perf_counter() - t0)
                    t_server.append(scoring_seconds() - before)
            a, b = med(t_local) * 1e3, med(t_remote) * 1e3
            paired = med([r - lo for r, lo in zip(t_remote, t_local, strict=True)]) * 1e3
            outside = med([r - sv for r, sv in zip(t_remote, t_server, strict=True)]) * 1e3
            row = [reward_name, f"{batch}x{size}x{size}", f"{mb:.2f}", f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}"]
            row += [f"{paired:.1f}", f"{med(t_server) * 1e3:.1f}", f"{outside:.1f}"]
            print(
                " ".join(
                    f"{c:>{w}}" if i else f"{c:<{w}}"
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
            remote.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    print(
        "in-process: the reward on the float images here; remote: the same through the server; ratio: remote / "
        "in-process; remote-in: the median of the per-repeat differences; server: the time the server's reward took "
        "(its /stats); remote-server: everything outside the reward (quantising, request, HTTP, parsing, answer)."
    )


if __name__ == "__main__":
    main()
