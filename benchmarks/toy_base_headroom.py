"""Does a stronger base model let the demo gain more? Continue pre-training the shipped toy model and measure each
checkpoint's held-out accuracy with and without CFG and its pass@8 (issues 15 and 17: the demo's +30 points).

The shipped toy model (``diffrl/toy/assets/sd3``) is the 7 000-step checkpoint of a run planned for 12 000 steps.
This script loads it (or another pipeline directory, ``--from``), trains its transformer further with the same
flow-matching recipe (:func:`diffrl.toy.pretrain.train_transformer`: the same 20 000 training scenes, rendered
from seed 0 as the shipped model's were, a fresh AdamW with ``--lr`` and a 50-step warm-up then cosine decay to
a tenth, 10% empty-prompt dropout, EMA 0.999; ``--seed`` draws the batches and noise) and writes a pipeline every
1 000 steps to ``OUT/ckpt-{step}``. Each checkpoint is evaluated on ``configs/toy/eval.jsonl`` (96 held-out
prompts x 2 seeds, 8 Euler steps) without CFG (what the demo measures) and with CFG 4; ``log.txt`` has the lines.

    python benchmarks/toy_base_headroom.py --out runs/toy-continued --steps 5000 --lr 4e-4 --seed 1
    python benchmarks/toy_base_headroom.py --pass-at 8 runs/toy-continued/ckpt-5000 toy

``--pass-at K DIR...`` only evaluates: per pipeline, the strict accuracy of K images per held-out prompt without
CFG (pass@1, the mean) and the fraction of prompts with at least one right image (pass@K: what sharpening the
model's own samples could reach), overall and per category. Then train the demo from a checkpoint with
``benchmarks/demo_sweep.py 'name:model.path=DIR'``. Results: docs/benchmarks.md, "The demo's gain".
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "configs" / "toy" / "eval.jsonl"
DATA_SEED = 0  # the shipped model's training scenes


def _eval_rows() -> list[dict]:
    with open(EVAL) as f:
        return [json.loads(line) for line in f if line.strip()]


def _strict(model, rows: list[dict], guidance_scale: float, seed: int, k: int = 1):
    """The verifier's strict 0/1 score of ``k`` images per held-out prompt (8 Euler steps), shape ``(prompts, k)``."""
    import torch

    from diffrl.sampling import sample_images
    from diffrl.toy.rewards import ShapesVerifier

    with torch.no_grad():
        images = sample_images(
            model,
            [r["prompt"] for r in rows],
            num_steps=8,
            guidance_scale=guidance_scale,
            height=64,
            width=64,
            seed=seed,
            images_per_prompt=k,
            batch_size=96,
        )
    scenes = [r["scene"] for r in rows for _ in range(k)]
    return ShapesVerifier().verify(images, scenes)[1].float().view(len(rows), k)


def held_out_accuracy(model, guidance_scale: float, seeds=(100, 101)) -> float:
    """Strict accuracy on the held-out prompts, one image per prompt and seed (8 Euler steps)."""
    rows = _eval_rows()
    acc = [_strict(model, rows, guidance_scale, seed).mean().item() for seed in seeds]
    return sum(acc) / len(acc)


def pass_at(model, k: int, seed: int = 500) -> dict:
    """pass@1 and pass@k (no CFG) overall and per category of the held-out prompts."""
    rows = _eval_rows()
    ok = _strict(model, rows, 1.0, seed, k)
    cats = [r["scene"]["category"] for r in rows]
    out = {"all": (ok.mean().item(), ok.max(1).values.mean().item())}
    for c in sorted(set(cats)):
        idx = [i for i, x in enumerate(cats) if x == c]
        out[c] = (ok[idx].mean().item(), ok[idx].max(1).values.mean().item())
    return out


def run_logger(out: Path):
    """A ``log(msg)`` that prints a time-stamped line and appends it to ``out/log.txt`` (``out`` is created)."""
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return log


def continue_pretraining(out: Path, src: str, steps: int, lr: float, seed: int) -> None:
    import torch
    from diffusers import StableDiffusion3Pipeline

    from diffrl.models import load_model
    from diffrl.toy.pretrain import ToyModelConfig, encode_latents, save_pipeline, train_transformer
    from diffrl.toy.scenes import generate_dataset

    log = run_logger(out)

    pipe = StableDiffusion3Pipeline.from_pretrained(src)
    pipe.text_encoder_3 = None  # the null T5 the directory carries: pre-training skips it
    pipe.tokenizer_3 = None
    cfg = ToyModelConfig(steps=steps, lr=lr, warmup=50, ckpt_every=1000, seed=seed)
    data = generate_dataset(cfg.n_train, seed=DATA_SEED, image_size=cfg.image_size, split="train")
    mean, std = encode_latents(
        pipe.vae, data["images"]
    )  # the directory's VAE and latent statistics, unchanged
    del data["images"]
    log(f"continuing {src} for {steps} steps, lr {lr}, seed {seed}")

    def on_checkpoint(step: int, ema: torch.nn.Module) -> None:
        live = pipe.transformer
        pipe.transformer = ema
        try:
            path = save_pipeline(pipe, out / f"ckpt-{step}", cfg, {"step": step, "continued_from": src})
        finally:
            pipe.transformer = live
        model = load_model(str(path))
        cfg1, cfg4 = held_out_accuracy(model, 1.0), held_out_accuracy(model, 4.0)
        log(f"ckpt {step}: eval.jsonl strict cfg1 {cfg1:.3f} cfg4 {cfg4:.3f}")

    train_transformer(
        pipe, mean, std, data["prompts"], cfg=cfg, on_checkpoint=on_checkpoint, log=log, log_every=200
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="output directory (continue pre-training)")
    p.add_argument(
        "--from", dest="src", default=None, help="pipeline directory to continue (default: the shipped)"
    )
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--pass-at", type=int, default=0, metavar="K", help="only evaluate pass@1 / pass@K of DIRs"
    )
    p.add_argument("dirs", nargs="*", help="with --pass-at: pipeline directories (or toy)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.pass_at:
        from diffrl.models import load_model

        for d in a.dirs:
            res = pass_at(load_model(d), a.pass_at)
            print(f"{d}: " + "  ".join(f"{c} {p1:.3f}/{pk:.3f}" for c, (p1, pk) in res.items()), flush=True)
        return
    if a.out is None:
        p.error("--out is required (or --pass-at K DIR...)")
    from diffrl.toy.assets import toy_model_dir

    continue_pretraining(a.out, a.src or str(toy_model_dir()), a.steps, a.lr, a.seed)


if __name__ == "__main__":
    main()
