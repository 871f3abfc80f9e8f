"""Measure one LoRA training step's GPU memory on a full-size, randomly initialised transformer and compare it with
``diffrl doctor``'s estimate, term by term, for every model family.

The transformer is built from a published row of :mod:`diffrl.doctor.memory` (the checkpoint's ``config.json``):
first on the ``meta`` device to count its parameters, then allocated on the GPU in bfloat16 (random weights: memory
does not depend on their values). It gets the family's default LoRA (float32 weights, as the trainers keep them),
gradient checkpointing, and one AdamW step; then a second forward/backward under bf16 autocast is measured with
``torch.cuda.max_memory_allocated``. Text encoders and the VAE are not built (their weights are a plain sum in the
estimate); the prompt embeddings are random tensors of the family's shapes (``memory_text_tokens`` tokens). Printed,
each with the estimate's matching term and the ratio measured / estimated:

* ``transformer weights``: allocated after the build (estimate: the checkpoint's tensors x 2 bytes, persistent
  buffers such as SD3's position table included, as the estimate reads them from the safetensors headers);
* ``LoRA + grads + AdamW``: allocated after the AdamW step, less the weights (estimate: ``trained``);
* ``training activations``: the peak of the measured pass less what was allocated before it and the LoRA's
  gradients (estimate: ``train_activations``, with ``sample.guidance_scale=1`` so that one pass holds the batch
  without a CFG copy);
* ``peak``: the measured peak against the sum of the three estimated terms.

Families (``--families``, comma-separated, or ``all``; ``--model`` measures one published row instead):

=============  ==========================================  ========================================
name           published row                               default size
=============  ==========================================  ========================================
sd35m          stabilityai/stable-diffusion-3.5-medium     512 x 512
flux1          black-forest-labs/FLUX.1-dev                512 x 512
qwen_image     Qwen/Qwen-Image                             512 x 512
z_image        Tongyi-MAI/Z-Image-Turbo                    512 x 512
flux2_dev      black-forest-labs/FLUX.2-dev                512 x 512
flux2_klein    black-forest-labs/FLUX.2-klein-4B           512 x 512
wan21_1.3b     Wan-AI/Wan2.1-T2V-1.3B-Diffusers            17 frames of 480 x 832 (5 latent frames)
wan21_14b      Wan-AI/Wan2.1-T2V-14B-Diffusers             17 frames of 480 x 832
wan22_a14b     Wan-AI/Wan2.2-T2V-A14B-Diffusers            17 frames of 480 x 832, one expert
=============  ==========================================  ========================================

Sizes: 512 x 512 images (1,024 image tokens) and 17-frame videos (7,800 video tokens, a quarter of Wan's default 81
frames) keep one run of all nine families, one after the other in one process, within about 4 minutes on one H200
(the largest, FLUX.2 [dev], is 32B parameters: 64 GB of bf16 weights); ``--height``, ``--width`` and ``--frames``
override them. Wan 2.2 A14B is measured on one expert (the trained one): the estimate's ``weights`` term also holds
the frozen second expert, which the table's ``transformer weights`` row leaves out on both sides. Each family's
figures are printed, and written to ``--json`` (a list), as soon as it is measured, so a run cut short keeps them.

Examples (a CUDA GPU is needed; without one the script says so and exits 1)::

    python benchmarks/bench_memory.py --families all --json runs/bench_memory.json
    python benchmarks/bench_memory.py --families sd35m,qwen_image
    python benchmarks/bench_memory.py --model Qwen/Qwen-Image --height 1024 --width 1024 --batch 1

Not measured here: the edit rows' source-image tokens and FLUX.2's reference-image tokens (their transformers are
measured as the text-to-image ones).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

GIB = 1024**3
#: The families ``--families`` names, each a published row of diffrl.doctor.memory.
FAMILIES = {
    "sd35m": "stabilityai/stable-diffusion-3.5-medium",
    "flux1": "black-forest-labs/FLUX.1-dev",
    "qwen_image": "Qwen/Qwen-Image",
    "z_image": "Tongyi-MAI/Z-Image-Turbo",
    "flux2_dev": "black-forest-labs/FLUX.2-dev",
    "flux2_klein": "black-forest-labs/FLUX.2-klein-4B",
    "wan21_1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "wan21_14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "wan22_a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
}
#: Transformer classes whose forward inputs this script builds (see :func:`inputs`).
SUPPORTED = (
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
    "QwenImageTransformer2DModel",
    "ZImageTransformer2DModel",
    "Flux2Transformer2DModel",
    "WanTransformer3DModel",
)
IMAGE_SIZE = (512, 512)
VIDEO_SIZE = (480, 832)
VIDEO_FRAMES = 17


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, checked: ``args.models`` is the list of published rows to measure, in order."""
    from diffrl.doctor import memory
    from diffrl.models import ADAPTERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="one published hub id (instead of --families)")
    parser.add_argument(
        "--families",
        default=None,
        help=f"comma-separated family names or 'all' ({', '.join(FAMILIES)}); default: sd35m",
    )
    parser.add_argument("--height", type=int, default=None, help="pixels (default 512; videos 480)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 512; videos 832)")
    parser.add_argument("--frames", type=int, default=VIDEO_FRAMES, help="video frames (Wan), 4k + 1")
    parser.add_argument("--batch", type=int, default=1, help="samples in the measured training pass")
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the figures to this file (a list)"
    )
    args = parser.parse_args(argv)
    if args.model is not None and args.families is not None:
        parser.error("give --model or --families, not both.")
    if args.model is not None:
        if args.model not in memory._PUBLISHED:
            parser.error(
                f"--model {args.model!r} is not a published row; use one of: {', '.join(memory._PUBLISHED)}."
            )
        args.models = [args.model]
    else:
        names = [n.strip() for n in (args.families or "sd35m").split(",") if n.strip()]
        if names == ["all"]:
            names = list(FAMILIES)
        unknown = [n for n in names if n not in FAMILIES]
        if unknown or not names:
            parser.error(
                f"--families {args.families!r}: unknown family {', '.join(unknown) or '(none given)'}; use 'all' or "
                f"some of: {', '.join(FAMILIES)}."
            )
        args.models = [FAMILIES[n] for n in dict.fromkeys(names)]
    for model in args.models:
        row = memory._PUBLISHED[model]
        if row.transformer["_class_name"] not in SUPPORTED:
            parser.error(
                f"--model {model}: measuring a {row.transformer['_class_name']} is not implemented in this "
                f"benchmark (it builds the inputs of {', '.join(SUPPORTED)} only); choose one of those families."
            )
    if args.batch < 1:
        parser.error(f"--batch {args.batch} must be a positive number of samples, e.g. 1.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is None:
            continue
        for model in args.models:
            row = memory._PUBLISHED[model]
            adapter = ADAPTERS[row.pipeline]
            step = adapter.vae_geometry(row.vae)[0] * adapter.token_patch_size(row.transformer)
            if value < step or value % step:
                parser.error(f"--{name} {value} must be a positive multiple of {step} pixels, e.g. 512.")
    if args.frames < 1 or (args.frames - 1) % 4:
        parser.error(f"--frames {args.frames} must be 4k + 1 frames (Wan's VAE), e.g. 17 or 81.")
    return args


def workload(model: str, args) -> tuple[int, int, int]:
    """``(height, width, frames)`` measured for ``model``: the arguments, else the family's default size."""
    from diffrl.doctor import memory
    from diffrl.models import ADAPTERS

    video = getattr(ADAPTERS[memory._PUBLISHED[model].pipeline], "is_video", False)
    h, w = VIDEO_SIZE if video else IMAGE_SIZE
    return args.height or h, args.width or w, args.frames if video else 1


def estimate(args, model: str | None = None):
    """The estimate of the same workload: bf16, autocast, checkpointing, the default LoRA, no CFG copy."""
    from diffrl.config import load_config
    from diffrl.doctor import estimate_memory

    model = model or args.models[0]
    height, width, frames = workload(model, args)
    cfg = load_config(
        {
            "algorithm": "flow_grpo",
            "mixed_precision": "bf16",
            "model": {
                "path": model,
                "dtype": "bfloat16",
                "lora_rank": -1,
                "gradient_checkpointing": True,
            },
            "data": {"train": str(ROOT / "configs" / "tiny" / "prompts.txt")},
            "sample": {
                "height": height,
                "width": width,
                "num_frames": frames,
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


def shrink(config: dict) -> dict:
    """A one-block, one-head copy of a transformer config (the same class, head width and text width) for the CPU
    test of this script's input builders; never measured."""
    c = dict(config)
    for key in ("num_layers", "num_single_layers", "n_layers", "n_refiner_layers"):
        if key in c:
            c[key] = 1
    if "num_attention_heads" in c:
        c["num_attention_heads"] = 1
    if c["_class_name"] == "SD3Transformer2DModel":
        c["caption_projection_dim"] = c["attention_head_dim"]
        c["dual_attention_layers"] = [0] if c.get("dual_attention_layers") else ()
        c["pos_embed_max_size"] = 16
    if c["_class_name"] == "ZImageTransformer2DModel":
        c["dim"] = c["dim"] // c["n_heads"]
        c["n_heads"] = c["n_kv_heads"] = 1
    if "ffn_dim" in c:
        c["ffn_dim"] = 256
    return c


def inputs(row, adapter, transformer: dict, size: tuple[int, int, int], batch: int, device) -> dict:
    """Random forward inputs of ``transformer``'s shapes (as the family's adapter calls it) for ``size = (height,
    width, frames)`` and ``memory_text_tokens`` prompt tokens, in bfloat16 on ``device``."""
    import torch

    from diffrl.models.flux import latent_image_ids

    t, cls = transformer, transformer["_class_name"]
    f, _, c_lat = adapter.vae_geometry(row.vae)
    p = adapter.token_patch_size(t)
    height, width, frames = size
    h, w, b, n_txt = height // f, width // f, batch, adapter.memory_text_tokens
    text_width = adapter.transformer_geometry(t)[2]
    bf16 = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=bf16)

    def time_(scale=1.0):
        return torch.full((b,), 0.5 * scale, device=device)

    if cls == "SD3Transformer2DModel":
        return {
            "hidden_states": randn(b, c_lat, h, w),
            "encoder_hidden_states": randn(b, n_txt, t.get("joint_attention_dim", 4096)),
            "pooled_projections": randn(b, t.get("pooled_projection_dim", 2048)),
            "timestep": time_(1000),
            "return_dict": False,
        }
    if cls == "QwenImageTransformer2DModel":
        return {
            "hidden_states": randn(b, (h // p) * (w // p), c_lat * p * p),
            "encoder_hidden_states": randn(b, n_txt, text_width),
            "encoder_hidden_states_mask": torch.ones(b, n_txt, dtype=torch.long, device=device),
            "timestep": time_(),
            "img_shapes": [[(1, h // p, w // p)]] * b,
            "return_dict": False,
        }
    if cls == "FluxTransformer2DModel":  # FLUX.1: packed tokens, (0, row, col) image ids, zero text ids
        return {
            "hidden_states": randn(b, (h // 2) * (w // 2), c_lat * 4),
            "encoder_hidden_states": randn(b, n_txt, text_width),
            "pooled_projections": randn(b, t.get("pooled_projection_dim", 768)),
            "timestep": time_(),
            "guidance": time_(7) if t.get("guidance_embeds") else None,
            "img_ids": latent_image_ids(h, w, device=device, dtype=bf16),
            "txt_ids": torch.zeros(n_txt, 3, device=device, dtype=bf16),
            "return_dict": False,
        }
    if cls == "Flux2Transformer2DModel":  # FLUX.2: patchified tokens, 4-axis ids (t, h, w, l)
        one = torch.arange(1)
        img_ids = torch.cartesian_prod(one, torch.arange(h // 2), torch.arange(w // 2), one)
        txt_ids = torch.cartesian_prod(one, one, one, torch.arange(n_txt))
        return {
            "hidden_states": randn(b, (h // 2) * (w // 2), c_lat * 4),
            "encoder_hidden_states": randn(b, n_txt, text_width),
            "timestep": time_(),
            "guidance": time_(8) if t.get("guidance_embeds") else None,
            "img_ids": img_ids.expand(b, -1, -1).to(device),
            "txt_ids": txt_ids.expand(b, -1, -1).to(device),
            "return_dict": False,
        }
    if cls == "ZImageTransformer2DModel":  # lists of (C, 1, h, w) latents and (L, D) prompt features
        return {
            "x": [randn(c_lat, 1, h, w) for _ in range(b)],
            "t": time_(),
            "cap_feats": [randn(n_txt, text_width) for _ in range(b)],
            "return_dict": False,
        }
    if cls == "WanTransformer3DModel":
        latent_frames = adapter.memory_frames(frames, row.vae)[0]
        return {
            "hidden_states": randn(b, c_lat, latent_frames, h, w),
            "timestep": time_(1000),
            "encoder_hidden_states": randn(b, n_txt, text_width),
            "return_dict": False,
        }
    raise NotImplementedError(f"building the inputs of a {cls} is not implemented in this benchmark.")


def build(row, adapter, transformer: dict, device):
    """The transformer of config ``transformer`` in bfloat16 on ``device`` (random weights), frozen, with the
    family's default LoRA in float32 and gradient checkpointing: ``(model, trainable parameters)``."""
    import diffusers
    import torch
    from peft import LoraConfig

    cls = getattr(diffusers, transformer["_class_name"])
    config = {k: v for k, v in transformer.items() if k != "_class_name"}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate the weights in bf16 directly (no float32 copy)
    try:
        with torch.device(device):
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(default)
    # buffers registered as float32 (SD3's 384 x 384 x 1536 position table: 0.84 GiB) become bf16, as they do when
    # a checkpoint is loaded in bf16
    model.to(torch.bfloat16)
    model.requires_grad_(False)
    exclude = adapter.unused_lora_modules_in(transformer)
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
    model.enable_gradient_checkpointing()
    model.train()
    return model, trainable


def train_pass(model, x: dict, device_type: str):
    """One forward and backward under bf16 autocast (a mean square of the output as the loss); returns the output."""
    import torch

    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = model(**x)[0]
    if isinstance(out, (list, tuple)):  # Z-Image returns one tensor per sample
        out = torch.stack(list(out))
    out.float().square().mean().backward()
    return out


def measure(args, model_id: str | None = None) -> dict:
    import torch

    from diffrl.doctor import memory
    from diffrl.models import ADAPTERS

    model_id = model_id or args.models[0]
    row = memory._PUBLISHED[model_id]
    adapter = ADAPTERS[row.pipeline]
    size = workload(model_id, args)
    est = estimate(args, model_id)
    cls = row.transformer["_class_name"]
    with torch.device("meta"):
        import diffusers

        config = {k: v for k, v in row.transformer.items() if k != "_class_name"}
        n_params = sum(p.numel() for p in getattr(diffusers, cls).from_config(config).parameters())
    # what the estimate counts: the checkpoint's tensors, persistent buffers (SD3's position table) included
    n_state = sum(math.prod(s) for s in memory._transformer_on_meta(row.transformer).values())
    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    model, trainable = build(row, adapter, row.transformer, device)
    n_lora = sum(p.numel() for p in trainable)
    weights = torch.cuda.memory_allocated(device) - base - 4 * n_lora  # less the float32 LoRA weights
    optim = torch.optim.AdamW(trainable, lr=1e-5)
    x = inputs(row, adapter, row.transformer, size, args.batch, device)
    train_pass(model, x, "cuda")
    optim.step()
    trained = torch.cuda.memory_allocated(device) - base - weights
    optim.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_pass(model, x, "cuda")
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    activations = peak - before - 4 * n_lora  # less the LoRA's float32 gradients
    seconds = round(time.perf_counter() - t0, 1)
    del model, trainable, optim, x
    gc.collect()
    torch.cuda.empty_cache()
    rows = {
        "transformer weights": (weights, n_state * 2),
        "LoRA + grads + AdamW": (trained, est.trained),
        "training activations": (activations, est.train_activations),
        "peak": (peak - base, n_state * 2 + est.trained + est.train_activations),
    }
    return {
        "model": model_id,
        "height": size[0],
        "width": size[1],
        "frames": size[2],
        "batch": args.batch,
        "transformer_params": n_params,
        "lora_params": n_lora,
        "estimated_lora_params": est.trainable_params,
        "seconds": seconds,
        "gpu": torch.cuda.get_device_name(device),
        "terms": {
            k: {"measured": m, "estimated": e, "ratio": m / e if e else None} for k, (m, e) in rows.items()
        },
    }


def report(result: dict) -> None:
    frames = f"{result['frames']} frames of " if result["frames"] > 1 else ""
    print(
        f"{result['model']} at {frames}{result['height']}x{result['width']}, batch {result['batch']}, on "
        f"{result['gpu']}: {result['transformer_params'] / 1e9:.2f}B transformer parameters, "
        f"{result['lora_params'] / 1e6:.1f}M LoRA (estimate {result['estimated_lora_params'] / 1e6:.1f}M), "
        f"{result['seconds']} s"
    )
    print(f"{'term':<22} {'measured GiB':>13} {'estimated GiB':>14} {'ratio':>7}")
    for name, term in result["terms"].items():
        ratio = f"{term['ratio']:.2f}" if term["ratio"] is not None else "-"
        print(f"{name:<22} {term['measured'] / GIB:>13.2f} {term['estimated'] / GIB:>14.2f} {ratio:>7}")
    sys.stdout.flush()


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
    results = []
    for model_id in args.models:
        results.append(measure(args, model_id))
        report(results[-1])
        if args.json is not None:  # after each family, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
