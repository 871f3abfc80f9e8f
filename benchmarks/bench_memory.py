"""Measure one LoRA training step's GPU memory on a full-size, randomly initialised transformer and compare it with
``diffrl doctor``'s estimate, term by term.

The transformer is built from a published row of :mod:`diffrl.doctor.memory` (the checkpoint's ``config.json``):
first on the ``meta`` device to count its parameters, then allocated on the GPU in bfloat16 (random weights: memory
does not depend on their values). It gets the family's default LoRA (float32 weights, as the trainers keep them),
gradient checkpointing, and one AdamW step; then a second forward/backward under bf16 autocast is measured with
``torch.cuda.max_memory_allocated``. Text encoders and the VAE are not built (their weights are a plain sum in the
estimate); the prompt embeddings are random tensors of the family's shapes. Printed, each with the estimate's
matching term and the ratio measured / estimated:

* ``transformer weights``: allocated after the build (estimate: transformer parameters x 2 bytes);
* ``LoRA + grads + AdamW``: allocated after the AdamW step, less the weights (estimate: ``trained``);
* ``training activations``: the peak of the measured pass less what was allocated before it and the LoRA's
  gradients (estimate: ``train_activations``, with ``sample.guidance_scale=1`` so that one pass holds the batch
  without a CFG copy);
* ``peak``: the measured peak against the sum of the three estimated terms.

Examples (a CUDA GPU is needed; without one the script says so and exits 1)::

    python benchmarks/bench_memory.py --model stabilityai/stable-diffusion-3.5-medium --height 512 --width 512
    python benchmarks/bench_memory.py --model Qwen/Qwen-Image --height 512 --width 512 --batch 1

Families whose transformer inputs are built here: SD3 / SD3.5 and Qwen-Image (and its Edit rows, without the source
image's tokens); the others are refused with a "not implemented" message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

GIB = 1024**3
#: Transformer classes whose forward inputs this script builds.
SUPPORTED = ("SD3Transformer2DModel", "QwenImageTransformer2DModel")


def parse_args(argv=None) -> argparse.Namespace:
    from diffrl.doctor import memory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="stabilityai/stable-diffusion-3.5-medium", help="a published hub id"
    )
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="samples in the measured training pass")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.model not in memory._PUBLISHED:
        parser.error(
            f"--model {args.model!r} is not a published row; use one of: {', '.join(memory._PUBLISHED)}."
        )
    row = memory._PUBLISHED[args.model]
    if row.transformer["_class_name"] not in SUPPORTED:
        parser.error(
            f"--model {args.model}: measuring a {row.transformer['_class_name']} is not implemented in this "
            f"benchmark (it builds the inputs of {', '.join(SUPPORTED)} only); choose one of those families."
        )
    if args.batch < 1:
        parser.error(f"--batch {args.batch} must be a positive number of samples, e.g. 1.")
    step = 16  # the 8x VAE and 2x2 patches of the supported families
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < step or value % step:
            parser.error(f"--{name} {value} must be a positive multiple of {step} pixels, e.g. 512.")
    return args


def estimate(args):
    """The estimate of the same workload: bf16, autocast, checkpointing, the default LoRA, no CFG copy."""
    from diffrl.config import load_config
    from diffrl.doctor import estimate_memory

    cfg = load_config(
        {
            "algorithm": "flow_grpo",
            "mixed_precision": "bf16",
            "model": {
                "path": args.model,
                "dtype": "bfloat16",
                "lora_rank": -1,
                "gradient_checkpointing": True,
            },
            "data": {"train": str(ROOT / "configs" / "tiny" / "prompts.txt")},
            "sample": {
                "height": args.height,
                "width": args.width,
                "num_steps": 10,
                "guidance_scale": 1.0,
                "batch_size": 1,
            },
            "optim": {"train_batch_size": args.batch},
            "reward": {"pickscore": 1.0},
            "flow_grpo": {"group_size": 2, "prompts_per_step": 1, "kl_beta": 0.0},
        }
    )
    return estimate_memory(cfg, cuda=True)


def inputs(row, adapter, args, device):
    """Random forward inputs of the transformer's real shapes (``memory_text_tokens`` prompt tokens)."""
    import torch

    t = row.transformer
    f, _, c_lat = adapter.vae_geometry(row.vae)
    h, w, b, n_txt = args.height // f, args.width // f, args.batch, adapter.memory_text_tokens
    bf16 = torch.bfloat16
    if t["_class_name"] == "SD3Transformer2DModel":
        return {
            "hidden_states": torch.randn(b, c_lat, h, w, device=device, dtype=bf16),
            "encoder_hidden_states": torch.randn(
                b, n_txt, t.get("joint_attention_dim", 4096), device=device, dtype=bf16
            ),
            "pooled_projections": torch.randn(
                b, t.get("pooled_projection_dim", 2048), device=device, dtype=bf16
            ),
            "timestep": torch.full((b,), 500.0, device=device),
            "return_dict": False,
        }
    p = adapter.token_patch_size(t)
    return {
        "hidden_states": torch.randn(b, (h // p) * (w // p), c_lat * p * p, device=device, dtype=bf16),
        "encoder_hidden_states": torch.randn(b, n_txt, t["joint_attention_dim"], device=device, dtype=bf16),
        "encoder_hidden_states_mask": torch.ones(b, n_txt, dtype=torch.long, device=device),
        "timestep": torch.full((b,), 0.5, device=device),
        "img_shapes": [[(1, h // p, w // p)]] * b,
        "return_dict": False,
    }


def measure(args) -> dict:
    import diffusers
    import torch
    from peft import LoraConfig

    from diffrl.doctor import memory
    from diffrl.models import ADAPTERS

    row = memory._PUBLISHED[args.model]
    adapter = ADAPTERS[row.pipeline]
    est = estimate(args)
    cls = getattr(diffusers, row.transformer["_class_name"])
    config = {k: v for k, v in row.transformer.items() if k != "_class_name"}
    with torch.device("meta"):
        n_params = sum(p.numel() for p in cls.from_config(config).parameters())
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate the weights in bf16 directly (no float32 copy)
    try:
        with device:
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    weights = torch.cuda.memory_allocated(device) - base

    exclude = adapter.unused_lora_modules_in(row.transformer)
    lora = LoraConfig(
        r=adapter.default_lora_rank,
        lora_alpha=adapter.default_lora_alpha,
        target_modules=adapter.default_lora_targets,
        **({"exclude_modules": exclude} if exclude else {}),
    )
    model.add_adapter(lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # the trainers keep LoRA weights in float32
    n_lora = sum(p.numel() for p in trainable)
    model.enable_gradient_checkpointing()
    model.train()
    optim = torch.optim.AdamW(trainable, lr=1e-5)
    x = inputs(row, adapter, args, device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**x)[0]
        out.float().square().mean().backward()

    step()
    optim.step()
    trained = torch.cuda.memory_allocated(device) - base - weights
    optim.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    activations = peak - before - 4 * n_lora  # less the LoRA's float32 gradients
    rows = {
        "transformer weights": (weights, n_params * 2),
        "LoRA + grads + AdamW": (trained, est.trained),
        "training activations": (activations, est.train_activations),
        "peak": (peak - base, n_params * 2 + est.trained + est.train_activations),
    }
    return {
        "model": args.model,
        "height": args.height,
        "width": args.width,
        "batch": args.batch,
        "transformer_params": n_params,
        "lora_params": n_lora,
        "estimated_lora_params": est.trainable_params,
        "seconds": round(time.perf_counter() - t0, 1),
        "gpu": torch.cuda.get_device_name(device),
        "terms": {
            k: {"measured": m, "estimated": e, "ratio": m / e if e else None} for k, (m, e) in rows.items()
        },
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "bench_memory.py measures GPU memory and needs a CUDA GPU; none is available here, so nothing was "
            "measured (run it on a GPU machine, e.g. through scripts/gpu_check.sh).",
            file=sys.stderr,
        )
        return 1
    result = measure(args)
    print(
        f"{result['model']} at {args.height}x{args.width}, batch {args.batch}, on {result['gpu']}: "
        f"{result['transformer_params'] / 1e9:.2f}B transformer parameters, {result['lora_params'] / 1e6:.1f}M LoRA "
        f"(estimate {result['estimated_lora_params'] / 1e6:.1f}M), {result['seconds']} s"
    )
    print(f"{'term':<22} {'measured GiB':>13} {'estimated GiB':>14} {'ratio':>7}")
    for name, term in result["terms"].items():
        ratio = f"{term['ratio']:.2f}" if term["ratio"] is not None else "-"
        print(f"{name:<22} {term['measured'] / GIB:>13.2f} {term['estimated'] / GIB:>14.2f} {ratio:>7}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
