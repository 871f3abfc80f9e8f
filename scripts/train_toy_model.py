"""Pre-train diffrl's tiny toy-world text-to-image model (a real diffusers SD3 pipeline, no T5) and evaluate it.

Re-create the shipped weights (CPU; writes ``OUT/ckpt-{step}`` pipelines every 1000 steps, ``OUT/final``,
``OUT/summary.json`` and ``OUT/log.txt``)::

    HF_HUB_OFFLINE=1 python scripts/train_toy_model.py --out runs/toy-model
    cp -r runs/toy-model/ckpt-7000 diffrl/toy/assets/sd3        # the shipped checkpoint (the run may stop there)

All flags at their defaults (:class:`diffrl.toy.pretrain.ToyModelConfig`): VAE channels (16, 32, 32) -> 16x16x4
latents, 500 VAE steps at batch 16; SD3 transformer 4 layers x 4 heads x 32 (width 128, 2.28 M params), two frozen
random tiny CLIP text encoders (tokenizer length 16, every toy word one token), no T5 (saved with a null T5 of zero
output, so that plain diffusers loads the directory as is); 20 000 train-split scenes;
flow matching, 12 000 steps planned at batch 32, lr 1e-3 cosine, 10 % empty-prompt dropout, EMA 0.999; scheduler
shift 1. ``--threads 1`` (the default) matters: on a shared 2-core CPU two torch threads were several times slower.

Reference run (2026-11-23, 2-core CPU shared with other jobs): rendering 21 s, VAE 290 s (its reconstructions pass
the verifier on 256/256 train scenes), transformer 0.30-0.60 s/step (about 65 min to step 7000; the run was
stopped after checkpoint 7000, which is shipped). Held-out strict accuracy on ``configs/toy/eval.jsonl`` (96 prompts
x 3 seeds, n = 288, 8 Euler steps), CFG 4: step 4000 0.153, 5000 0.205, 6000 0.188, 7000 0.229 (+- 0.025);
without CFG, step 7000: 0.135 (+- 0.020). The pipeline directory is 11 MB.

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
    p.add_argument(
        "--shift", type=float, default=d.shift, help="the scheduler's shift saved with the pipeline"
    )
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
