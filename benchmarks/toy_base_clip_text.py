"""Does a text encoder that knows the toy world's relations give the demo a base it can gain +30 points from?
(issues 15 and 17: the demo's +30 points; docs/benchmarks.md, "Why the demo levels off").

The shipped toy model encodes prompts with two *frozen random* tiny CLIP text encoders, and it never learns the
relations: on position prompts whose two objects are both drawn, "left of" and its reverse hold about equally often,
even with CFG and after 10 000 more pre-training steps (``benchmarks/toy_failures.py``). The toy CLIP
(``diffrl/toy/assets/clip``, the ``clipscore`` reward's model) was trained contrastively on the train split with
relation and attribute-swap negatives, so its text tower tells "a red circle left of a blue square" from its
reverse. SD3 conditions on CLIP text encoders, so this script builds the pipeline SD3's way around it:

* ``text_encoder``: the toy CLIP's text tower with its projection (a ``CLIPTextModelWithProjection``, 64 wide),
  frozen; ``text_encoder_2``: the shipped model's second random encoder (32 wide), frozen; no T5 (a null one is
  saved, as for the shipped model). The tokenizers are the same tiny CLIP tokenizer.
* the transformer: the shipped one's weights, with ``context_embedder`` and the pooled-text embedder widened from
  64 to 96 inputs: the columns of the kept encoder are copied, those of the toy CLIP start at zero, so at step 0
  the model is the shipped model without its first encoder.
* then flow-matching training with :func:`diffrl.toy.pretrain.train_transformer` (the shipped recipe: the same
  20 000 train scenes, 10 % empty-prompt dropout, EMA 0.999; ``--lr`` with a 50-step warm-up and a cosine to a tenth),
  a pipeline every 1 000 steps to ``OUT/ckpt-{step}`` with its held-out strict accuracy without CFG and with CFG 4.

    python benchmarks/toy_base_clip_text.py --out runs/toy-clip-text --steps 8000 --lr 5e-4 --stop-after 5000

The 5 000-step checkpoint of that run (the learning-rate schedule is the 8 000-step one), about 25 CPU minutes on one
core, is the demo's base, shipped as ``toy:cliptext`` (``diffrl/toy/assets/sd3_cliptext``); rebuilt on two machines,
its held-out figures matched to the digit. Then ``benchmarks/toy_failures.py --model OUT/ckpt-N`` (do the relations
hold now?) and ``benchmarks/demo_sweep.py 'name:model.path=OUT/ckpt-N'`` (the demo from this base).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DATA_SEED = 0  # the shipped model's training scenes


def toy_clip_text_encoder(clip_dir: str):
    """The toy CLIP's text tower and projection as SD3's ``CLIPTextModelWithProjection``."""
    import torch
    from transformers import CLIPModel, CLIPTextModelWithProjection

    clip = CLIPModel.from_pretrained(clip_dir)
    text_cfg = clip.config.text_config
    text_cfg.projection_dim = clip.config.projection_dim
    enc = CLIPTextModelWithProjection(text_cfg)
    missing, unexpected = enc.load_state_dict(
        {
            **{f"text_model.{k}": v for k, v in clip.text_model.state_dict().items()},
            "text_projection.weight": clip.text_projection.weight,
        },
        strict=False,
    )
    if missing or unexpected:
        raise RuntimeError(f"toy CLIP text weights do not fit: missing {missing}, unexpected {unexpected}")
    return enc.eval().requires_grad_(False).to(torch.float32)


def build(src: str, clip_dir: str):
    """The pipeline described in the module docstring, from the toy pipeline ``src`` and the toy CLIP."""
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    base = StableDiffusion3Pipeline.from_pretrained(src, text_encoder_3=None, tokenizer_3=None)
    te1 = toy_clip_text_encoder(clip_dir)
    te2 = base.text_encoder_2
    d1, d2 = te1.config.hidden_size, te2.config.hidden_size
    old = base.transformer
    old_d = old.config.joint_attention_dim  # 32 + 32: the shipped encoders
    kept = slice(old_d - d2, old_d)  # the shipped text_encoder_2's columns
    new_cfg = dict(old.config)
    new_cfg.update(joint_attention_dim=d1 + d2, pooled_projection_dim=d1 + d2)
    new = SD3Transformer2DModel.from_config(new_cfg)
    state = old.state_dict()
    for key in ("context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"):
        w = torch.zeros(state[key].shape[0], d1 + d2)
        w[:, d1:] = state[key][:, kept]
        state[key] = w
    new.load_state_dict(state)
    pipe = StableDiffusion3Pipeline(
        transformer=new.eval().requires_grad_(False),
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=te1,
        tokenizer=base.tokenizer,
        text_encoder_2=te2,
        tokenizer_2=base.tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Stop(Exception):
    """Raised from the checkpoint callback to end training after ``--stop-after``."""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--from", dest="src", default=None, help="toy pipeline directory (default: the shipped)")
    p.add_argument("--clip", default=None, help="toy CLIP directory (default: the shipped)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop after this step's checkpoint (the schedule stays --steps')",
    )
    a = p.parse_args(argv)
    if a.stop_after and (a.stop_after % 1000 or not 0 < a.stop_after <= a.steps):
        p.error(
            f"--stop-after {a.stop_after} must be a checkpoint step: a multiple of 1000 up to --steps {a.steps}."
        )

    import torch

    torch.set_num_threads(a.threads)
    from toy_base_headroom import held_out_accuracy, run_logger

    from diffrl.models import load_model
    from diffrl.toy.assets import toy_clip_dir, toy_model_dir
    from diffrl.toy.pretrain import ToyModelConfig, encode_latents, save_pipeline, train_transformer
    from diffrl.toy.scenes import generate_dataset

    src = a.src or str(toy_model_dir())
    clip_dir = a.clip or str(toy_clip_dir())
    out = a.out
    log = run_logger(out)

    pipe = build(src, clip_dir)
    cfg = ToyModelConfig(steps=a.steps, lr=a.lr, warmup=50, ckpt_every=1000, seed=a.seed)
    data = generate_dataset(cfg.n_train, seed=DATA_SEED, image_size=cfg.image_size, split="train")
    mean, std = encode_latents(pipe.vae, data["images"])  # the shipped VAE and latent statistics
    del data["images"]
    log(f"toy CLIP text encoder from {clip_dir} on {src}: {a.steps} steps, lr {a.lr}, seed {a.seed}")

    def evaluate(step: int, path: Path) -> None:
        model = load_model(str(path))
        cfg1, cfg4 = held_out_accuracy(model, 1.0), held_out_accuracy(model, 4.0)
        log(f"ckpt {step}: eval.jsonl strict cfg1 {cfg1:.3f} cfg4 {cfg4:.3f}")

    def on_checkpoint(step: int, ema: torch.nn.Module) -> None:
        live = pipe.transformer
        pipe.transformer = ema
        try:
            path = save_pipeline(
                pipe, out / f"ckpt-{step}", cfg, {"step": step, "from": src, "text_encoder": clip_dir}
            )
        finally:
            pipe.transformer = live
        evaluate(step, path)
        if step == a.stop_after:
            raise _Stop

    path0 = save_pipeline(pipe, out / "ckpt-0", cfg, {"step": 0, "from": src, "text_encoder": clip_dir})
    evaluate(0, path0)
    try:
        train_transformer(
            pipe, mean, std, data["prompts"], cfg=cfg, on_checkpoint=on_checkpoint, log=log, log_every=200
        )
    except _Stop:
        log(f"stopped after the {a.stop_after}-step checkpoint ({out / f'ckpt-{a.stop_after}'})")


if __name__ == "__main__":
    main()
