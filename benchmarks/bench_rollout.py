"""Time a plain diffusers pipeline call against diffrl's rollouts on the same model, steps and batch.

Three ways to make the same latents, measured side by side in one run (interleaved, median of repeats):

* ``pipeline``: ``pipe(prompt_embeds=..., latents=..., output_type="latent")`` (no text encoding, no decode);
* ``rollout_ode``: :func:`diffrl.samplers.rollout` with Euler steps (what DiffusionNFT samples with);
* ``rollout_sde``: the Flow-GRPO SDE on every step, keeping the trajectory and per-step log-probabilities.

It prints the milliseconds of each and the ratios to the pipeline call. Target: ``rollout_sde`` at most 1.05x.

Examples::

    python benchmarks/bench_rollout.py                                   # tiny SD3 and FLUX on the CPU
    python benchmarks/bench_rollout.py --arch full --family sd3 --device cuda --dtype bfloat16 \\
        --height 512 --width 512 --steps 10 --batch 8                      # SD3.5-Medium-sized, random weights
    python benchmarks/bench_rollout.py --arch full --family flux --device cuda --dtype bfloat16 \\
        --height 512 --width 512 --steps 16 --batch 4                      # FLUX.1-dev-sized, random weights

With ``--arch full`` the transformer has the real architecture (random weights, since no checkpoint is
needed to time it); the text encoders are skipped (prompt embeddings of the real shapes are given) and the
VAE is small (decoding is not timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffrl.models import Conditioning, FluxModel, SD3Model, load_model
from diffrl.models.flux import pack_latents
from diffrl.models.loading import resolve_dtype
from diffrl.models.tiny import build_tiny_flux, build_tiny_sd3
from diffrl.samplers import rollout

# Transformer configs of the released checkpoints (stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev).
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512}


def _full_size_model(family: str, device: str, dtype: torch.dtype):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        norm_num_groups=8,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if family == "sd3":
                transformer = SD3Transformer2DModel(**SD35_MEDIUM)
                scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
                pipe = StableDiffusion3Pipeline(
                    transformer, scheduler, vae, None, None, None, None, None, None
                )
            else:
                transformer = FluxTransformer2DModel(**FLUX_DEV)
                scheduler = FlowMatchEulerDiscreteScheduler(
                    use_dynamic_shifting=True,
                    base_shift=0.5,
                    max_shift=1.15,
                    base_image_seq_len=256,
                    max_image_seq_len=4096,
                    shift=3.0,
                )
                pipe = FluxPipeline(scheduler, vae, None, None, None, None, transformer)
    finally:
        torch.set_default_dtype(previous)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return (SD3Model if family == "sd3" else FluxModel)(pipe)


def _random_cond(model, batch: int) -> Conditioning:
    cfg = model.transformer.config
    tokens = TEXT_TOKENS[model.family]
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=g).to(model.device, model.dtype)

    cond = Conditioning(
        prompt_embeds=rand(batch, tokens, cfg.joint_attention_dim),
        pooled=rand(batch, cfg.pooled_projection_dim),
    )
    if model.family == "sd3":
        cond.negative_prompt_embeds = rand(batch, tokens, cfg.joint_attention_dim)
        cond.negative_pooled = rand(batch, cfg.pooled_projection_dim)
    else:
        cond.text_ids = torch.zeros(tokens, 3, device=model.device, dtype=model.dtype)
    return cond


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(model, args) -> dict:
    batch, steps, h, w, guidance = args.batch, args.steps, args.height, args.width, args.guidance
    cond = model.encode(["a photo of a cat"] * batch) if args.arch == "tiny" else _random_cond(model, batch)
    sigmas = model.schedule(steps, h, w)
    noise = model.sample_noise(batch, h, w, generator=torch.Generator(device="cpu").manual_seed(0))

    def run_pipeline():
        kwargs = dict(
            prompt_embeds=cond.prompt_embeds,
            pooled_prompt_embeds=cond.pooled,
            height=h,
            width=w,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="latent",
        )
        if model.family == "sd3":
            kwargs.update(
                negative_prompt_embeds=cond.negative_prompt_embeds,
                negative_pooled_prompt_embeds=cond.negative_pooled,
                latents=noise.to(model.dtype),
            )
        else:
            kwargs.update(latents=pack_latents(noise).to(model.dtype))
        return model.pipe(**kwargs).images

    def run_ode():
        return rollout(model, cond, sigmas, noise, guidance_scale=guidance).final

    def run_sde():
        gen = torch.Generator(device=model.device).manual_seed(1)
        return rollout(
            model, cond, sigmas, noise, guidance_scale=guidance, sampler="sde", generator=gen
        ).final

    runs = {"pipeline": run_pipeline, "rollout_ode": run_ode, "rollout_sde": run_sde}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():  # interleaved, so drifts in machine speed hit all three alike
                _sync(args.device)
                t0 = time.perf_counter()
                fn()
                _sync(args.device)
                times[name].append(time.perf_counter() - t0)
        # the same work: the ODE rollout reproduces the pipeline's latents
        ref, ours = run_pipeline().float(), run_ode()
        if model.family == "flux":
            ours = pack_latents(ours)
        max_diff = (ref - ours).abs().max().item()
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {
        "family": model.family,
        "arch": args.arch,
        "device": args.device,
        "dtype": str(model.dtype).replace("torch.", ""),
        "batch": batch,
        "steps": steps,
        "height": h,
        "width": w,
        "guidance": guidance,
        "repeats": args.repeats,
        "ms": med,
        "ratio_ode": med["rollout_ode"] / med["pipeline"],
        "ratio_sde": med["rollout_sde"] / med["pipeline"],
        "max_abs_diff_ode_vs_pipeline": max_diff,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=["sd3", "flux", "both"], default="both")
    p.add_argument(
        "--arch",
        choices=["tiny", "full"],
        default="tiny",
        help="tiny offline model or full-size random weights",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.arch == "full" and not args.device.startswith("cuda"):
        p.error(
            "--arch full needs a GPU: pass --device cuda (full-size transformers are far too slow on a CPU)."
        )
    dtype = resolve_dtype(args.dtype)
    families = ["sd3", "flux"] if args.family == "both" else [args.family]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            if args.arch == "tiny":
                builder = build_tiny_sd3 if family == "sd3" else build_tiny_flux
                model = load_model(builder(Path(tmp) / family, num_layers=2), dtype=dtype, device=args.device)
            else:
                model = _full_size_model(family, args.device, dtype)
            res = bench(model, args)
            results.append(res)
            ms = res["ms"]
            print(
                f"{family:4s} {args.arch} {res['dtype']} {args.device} B={args.batch} T={args.steps} {args.height}x{args.width}: "
                f"pipeline {ms['pipeline']:.1f} ms | rollout ODE {ms['rollout_ode']:.1f} ms ({res['ratio_ode']:.3f}x) | "
                f"rollout SDE+log-probs {ms['rollout_sde']:.1f} ms ({res['ratio_sde']:.3f}x) | "
                f"max |ODE - pipeline| {res['max_abs_diff_ode_vs_pipeline']:.1e}",
                flush=True,
            )
            del model
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
