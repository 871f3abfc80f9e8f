"""Pre-train diffrl's tiny toy-world text-to-image model (a real diffusers SD3 pipeline, no T5) and evaluate it.

Re-create the weights (CPU; writes ``OUT/final``, ``OUT/ckpt-{step}`` pipelines, ``OUT/summary.json``, ``OUT/log.txt``)::

    HF_HUB_OFFLINE=1 python scripts/train_toy_model.py --out /work/toy_runs/toy-v1

(all other flags at their defaults: VAE channels (16, 32, 32) -> 16x16x4 latents, 500 VAE steps at batch 16;
SD3 transformer 3 layers x 3 heads x 32 (width 96, 0.96 M params); 20 000 train-split scenes; 6000 flow-matching
steps at batch 32, lr 5e-4 cosine, 10 % empty-prompt dropout, EMA 0.999; a checkpoint every 500 steps, each
evaluated on 128 held-out prompts, ``make_prompt_sets(0, 128, seed=0)``, 8 ODE steps, CFG 4, seed 0, with
``ShapesVerifier``; results in ``summary.json`` and in each checkpoint's ``toy_model.json``, so a less accurate
earlier checkpoint can be picked). ``--threads 1`` (the default) matters: on the shared 2-core CPU two torch
threads were ~4x slower than one.

Reference run (2026-11-23, shared 2-core CPU): rendering 26 s, VAE 222 s (0.44 s/it; its reconstructions pass
the verifier on 256/256 train scenes), transformer 0.24-0.29 s/it (~27 min for 6000 steps), 20 s per checkpoint
evaluation. Held-out strict / partial accuracy (n = 128): step 500 0.016 / 0.41, 1000 0.008 / 0.39,
1500 0.031 / 0.37, 2000 0.023 / 0.34, 2500 0.016 / 0.34: far below the 20-60% the demo needs; later steps
were not measured in that session, and a larger model or longer run is the next thing to try. Each pipeline
directory is about 5 MB.

Evaluate an existing directory only::

    python scripts/train_toy_model.py --eval-only /work/toy_runs/toy-v1/ckpt-3000 --n-eval 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from diffrl.toy.pretrain import ToyModelConfig, evaluate, pretrain  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    d = ToyModelConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="output directory (created)")
    p.add_argument("--eval-only", type=Path, default=None, help="only evaluate this pipeline directory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vae-channels", type=int, nargs="+", default=list(d.vae_channels))
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--heads", type=int, default=d.num_attention_heads)
    p.add_argument("--head-dim", type=int, default=d.attention_head_dim)
    p.add_argument("--shift", type=float, default=d.shift, help="the scheduler's shift saved with the pipeline")
    p.add_argument("--clip-max-length", type=int, default=d.clip_max_length, help="CLIP tokenizer length")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--cfg-dropout", type=float, default=d.cfg_dropout)
    p.add_argument("--ema", type=float, default=d.ema)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--n-eval", type=int, default=d.n_eval)
    p.add_argument("--eval-steps", type=int, default=d.eval_steps)
    p.add_argument("--eval-guidance", type=float, default=d.eval_guidance)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default); 1 is ~4x faster than 2 on the shared 2-core CPU (oversubscription)",
    )
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> ToyModelConfig:
    return ToyModelConfig(
        vae_channels=tuple(a.vae_channels),
        num_layers=a.num_layers,
        num_attention_heads=a.heads,
        attention_head_dim=a.head_dim,
        seed=a.seed,
        shift=a.shift,
        clip_max_length=a.clip_max_length,
        vae_steps=a.vae_steps,
        vae_batch=a.vae_batch,
        vae_lr=a.vae_lr,
        n_train=a.n_train,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        warmup=a.warmup,
        cfg_dropout=a.cfg_dropout,
        ema=a.ema,
        ckpt_every=a.ckpt_every,
        n_eval=a.n_eval,
        eval_steps=a.eval_steps,
        eval_guidance=a.eval_guidance,
    )


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.eval_only is not None:
        res = evaluate(a.eval_only, n_eval=a.n_eval, num_steps=a.eval_steps, guidance_scale=a.eval_guidance)
        print(json.dumps(res, indent=2))
        return res
    if a.out is None:
        sys.exit("--out is required (unless --eval-only)")
    cfg = config_from_args(a)
    a.out.mkdir(parents=True, exist_ok=True)
    log_file = open(a.out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"config {json.dumps(cfg.__dict__, default=str)}")
    t = time.time()
    summary = pretrain(cfg, a.out, log=log)
    log(f"done in {time.time() - t:.0f}s; final {summary['final']}")
    return summary


if __name__ == "__main__":
    main()
