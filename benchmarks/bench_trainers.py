"""Time one Flow-GRPO training step against one DiffusionNFT step on the same model, images and reward.

A step (an "epoch" of online RL) is ``trainer.train_step(step)``: the step's rollouts, decoding and rewards, the
advantages and one optimiser update. Both trainers get the same prompts per step, group size, resolution,
sampling steps, micro-batch sizes and a weight-free reward (``saturation`` by default), each on its own copy of
the model (each adds its LoRA; DiffusionNFT a second "old" adapter). After a warm-up step each, the steps are
timed side by side in one run, interleaved in ABBA order so that drifts in machine speed hit both alike; the
table gives the median seconds per step, samples per second, the ratio of NFT to GRPO time per sample, and how
many samples went through the transformer's forward pass per step (CFG doubles them, reference and old-policy
passes add to them; backward passes are not counted).

Evaluation, checkpoints and logging are excluded: ``report_to=none``, ``data.eval_size=0``,
``checkpointing_steps=0``, an output directory in a temporary directory, and ``train_step`` is called directly.
Every training prompt is encoded once before timing (the steady state of a run whose prompts repeat), so the text
encoders are not timed.

The other settings come from presets (``--preset``): ``configs/tiny/*.yaml`` for tiny and mid (float32, no
gradient checkpointing) and ``configs/sd35m_flow_grpo_pickscore.yaml`` / ``configs/sd35m_diffusion_nft_multireward.yaml``
for full (bf16 autocast, gradient checkpointing, LoRA 32, EMA). Flow-GRPO: SDE on every step with CFG, a KL pass
through the base model; DiffusionNFT: CFG-free Euler rollouts, all levels but one trained, old-policy and base-model
passes. ``--set key=value`` overrides both configs (e.g. ``--set flow_grpo.kl_beta=0``).

Examples::

    python benchmarks/bench_trainers.py --quick                      # tiny SD3 only, under a minute on a CPU
    python benchmarks/bench_trainers.py                              # tiny and mid-size SD3 on the CPU
    python benchmarks/bench_trainers.py --arch mid --mid-layers 6 --json out.json
    python benchmarks/bench_trainers.py --arch full --device cuda --dtype bfloat16 \\
        --group-size 8 --prompts 2 --json full.json    # SD3.5-Medium-sized, random weights, 512 px, 10 steps

``--arch tiny`` is ``tiny:sd3``; ``--arch mid`` a few-million-parameter SD3 built with
:func:`diffrl.models.tiny.build_tiny_sd3` into a temporary directory and loaded with ``load_model`` (tiny text
encoders and VAE); ``--arch full`` the SD3.5-Medium transformer with random weights from ``bench_rollout.py``
(its small VAE, no text encoders: each prompt gets random embeddings of the real shapes). With CUDA the table
also gives the peak GPU memory during each trainer's steps (both trainers' models stay resident throughout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PRESETS = {
    "tiny": {
        "flow_grpo": REPO / "configs" / "tiny" / "flow_grpo.yaml",
        "diffusion_nft": REPO / "configs" / "tiny" / "diffusion_nft.yaml",
    },
    "sd35m": {
        "flow_grpo": REPO / "configs" / "sd35m_flow_grpo_pickscore.yaml",
        "diffusion_nft": REPO / "configs" / "sd35m_diffusion_nft_multireward.yaml",
    },
}
PROMPTS = REPO / "configs" / "tiny" / "prompts.txt"
LABELS = {"flow_grpo": "Flow-GRPO", "diffusion_nft": "DiffusionNFT"}
# per-architecture defaults: (height, width, sampling steps)
ARCH_DEFAULTS = {"tiny": (32, 32, 4), "mid": (64, 64, 6), "full": (512, 512, 10)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fake_text_encoder(model) -> None:
    """Give a model without text encoders (``--arch full``) random per-prompt embeddings of the real shapes.

    They go through the model's own prompt cache and CFG assembly, as real encodings would; each prompt string
    always gets the same embeddings (seeded by its CRC32)."""
    from bench_rollout import TEXT_TOKENS

    cfg = model.transformer.config
    tokens = TEXT_TOKENS[model.family]

    def encode(prompts):
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            embeds = torch.randn(tokens, cfg.joint_attention_dim, generator=g)
            pooled = torch.randn(cfg.pooled_projection_dim, generator=g)
            rows.append((embeds.to(model.device, model.dtype), pooled.to(model.device, model.dtype)))
        return rows

    model._encode_uncached = encode


def _load(arch: str, args, tmp: Path):
    """A fresh model (each trainer adds its own adapters) and a label for ``model.path``."""
    from diffrl.models import load_model
    from diffrl.models.tiny import build_tiny_sd3

    if arch == "tiny":
        return load_model("tiny:sd3", dtype=args.dtype, device=args.device), "tiny:sd3"
    if arch == "mid":
        path = tmp / "mid-sd3"
        if not (path / "model_index.json").is_file():
            build_tiny_sd3(
                path,
                num_layers=args.mid_layers,
                num_attention_heads=args.mid_heads,
                attention_head_dim=args.mid_head_dim,
            )
        return load_model(path, dtype=args.dtype, device=args.device), str(path)
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    from bench_rollout import _full_size_model

    from diffrl.models.loading import resolve_dtype

    model = _full_size_model("sd3", args.device, resolve_dtype(args.dtype))
    _fake_text_encoder(model)
    return model, "random-weights:sd3.5-medium"


def _overrides(algorithm: str, arch: str, model_path: str, out: Path, args) -> list[str]:
    h, w, steps = _size(arch, args)
    total = args.warmup + args.repeats
    return [
        f"output_dir={json.dumps(str(out / algorithm))}",
        "report_to=none",
        "data.eval_size=0",
        f"data.train={json.dumps(str(PROMPTS))}",
        "checkpointing_steps=0",
        f"max_steps={total}",
        f"seed={args.seed}",
        'data.eval=""',
        "eval_reward={}",
        f"model.path={json.dumps(model_path)}",
        f"model.dtype={json.dumps(args.dtype)}",
        f"sample.height={h}",
        f"sample.width={w}",
        f"sample.num_steps={steps}",
        f"sample.guidance_scale={args.guidance}",
        f"sample.batch_size={args.sample_batch}",
        f"optim.train_batch_size={args.train_batch}",
        f"{algorithm}.group_size={args.group_size}",
        f"{algorithm}.prompts_per_step={args.prompts}",
        f"reward={json.dumps({args.reward: 1.0})}",
        "reward_kwargs={}",  # the preset's options belong to its own rewards (e.g. hpsv2's version)
        *([f"mixed_precision={json.dumps(args.mixed_precision)}"] if args.mixed_precision else []),
        *(
            [f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"]
            if args.gradient_checkpointing is not None
            else []
        ),
        *args.set,
    ]


def _preset(arch: str, args) -> str:
    return args.preset or ("sd35m" if arch == "full" else "tiny")


def _size(arch: str, args) -> tuple[int, int, int]:
    h, w, steps = ARCH_DEFAULTS[arch]
    return args.height or h, args.width or w, args.steps or steps


class _ForwardCounter:
    """Counts the samples that go through the transformer's forward pass (CFG doubles them)."""

    def __init__(self, transformer):
        self.samples = 0
        self.handle = transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.samples += int(x.shape[0])

    def remove(self) -> None:
        self.handle.remove()


def _run_step(trainer, device: str) -> tuple[float, dict]:
    _sync(device)
    t0 = time.perf_counter()
    metrics = trainer.train_step(trainer.step)
    _sync(device)
    seconds = time.perf_counter() - t0
    trainer.step += 1
    if metrics.get("train/skipped", 0.0) > 0:
        raise RuntimeError(
            f"{trainer.algorithm} skipped step {trainer.step - 1} (non-finite reward or loss): a skipped step "
            "does no update, so its time would not be a training step's."
        )
    return seconds, metrics


def bench(arch: str, args) -> dict:
    from diffrl.train import build_trainer

    h, w, steps = _size(arch, args)
    images = args.group_size * args.prompts
    trainers, params, settings = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-trainers-") as tmp:
        tmp = Path(tmp)
        for algorithm in ("flow_grpo", "diffusion_nft"):
            model, model_path = _load(arch, args, tmp)
            params[algorithm] = sum(p.numel() for p in model.transformer.parameters())
            overrides = _overrides(algorithm, arch, model_path, tmp / "runs", args)
            trainer = build_trainer(str(PRESETS[_preset(arch, args)][algorithm]), overrides, model=model)
            if trainer.device.type != torch.device(args.device).type:
                raise RuntimeError(
                    f"the trainer runs on {trainer.device} but the model is on {args.device}; "
                    "pass --device to match (on a GPU machine, --device cuda)."
                )
            trainers[algorithm] = trainer
            c = trainer.cfg
            settings[algorithm] = {
                "mixed_precision": c.mixed_precision,
                "gradient_checkpointing": c.model.gradient_checkpointing,
                "lora_rank": c.model.lora_rank,
                "ema_decay": c.ema_decay,
                algorithm: dataclasses.asdict(getattr(c, algorithm)),
            }
        for trainer in trainers.values():  # text encodings cached up front: the text encoders are not timed
            trainer.model.encode(list(trainer.train_set.prompts))
        order = list(trainers)
        counts, peak = {}, {a: 0.0 for a in order}
        for i in range(args.warmup):
            for algorithm in order:
                trainer = trainers[algorithm]
                counter = _ForwardCounter(trainer.model.transformer) if i == 0 else None
                _run_step(trainer, args.device)
                if counter is not None:
                    counts[algorithm] = counter.samples
                    counter.remove()
        times: dict[str, list[float]] = {a: [] for a in order}
        for r in range(args.repeats):
            for algorithm in order if r % 2 == 0 else order[::-1]:  # ABBA: drifts hit both alike
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                seconds, _ = _run_step(trainers[algorithm], args.device)
                times[algorithm].append(seconds)
                if args.device.startswith("cuda"):
                    peak[algorithm] = max(peak[algorithm], torch.cuda.max_memory_allocated() / 2**30)
        trained = {a: sum(p.numel() for p in t.params) for a, t in trainers.items()}
        del trainers, trainer, model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    results = {}
    for algorithm in order:
        med = statistics.median(times[algorithm])
        results[algorithm] = {
            "seconds_per_step": med,
            "seconds_per_step_min": min(times[algorithm]),
            "seconds_all": times[algorithm],
            "samples_per_second": images / med,
            "transformer_forward_samples_per_step": counts.get(algorithm),
            "trained_parameters": trained[algorithm],
            "settings": settings[algorithm],
        }
        if args.device.startswith("cuda"):
            results[algorithm]["peak_memory_gib"] = peak[algorithm]
    grpo, nft = results["flow_grpo"]["seconds_per_step"], results["diffusion_nft"]["seconds_per_step"]
    return {
        "arch": arch,
        "transformer_parameters": params["flow_grpo"],
        "device": args.device,
        "dtype": args.dtype,
        "preset": _preset(arch, args),
        "height": h,
        "width": w,
        "sampling_steps": steps,
        "group_size": args.group_size,
        "prompts_per_step": args.prompts,
        "images_per_step": images,
        "sample_batch": args.sample_batch,
        "train_batch": args.train_batch,
        "guidance": args.guidance,
        "reward": args.reward,
        "overrides": list(args.set),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "trainers": results,
        "ratio_nft_over_grpo_time_per_sample": nft / grpo,
        "ratio_of_min_times": results["diffusion_nft"]["seconds_per_step_min"]
        / results["flow_grpo"]["seconds_per_step_min"],
        # the two steps of a repeat ran back to back, so their ratio is the least touched by drifts in machine speed
        "ratio_paired_median": statistics.median(
            b / a for a, b in zip(times["flow_grpo"], times["diffusion_nft"], strict=True)
        ),
        "torch_threads": torch.get_num_threads(),
    }


def _table(rows: list[dict]) -> str:
    head = (
        f"{'arch':5s} {'params':>8s} {'trainer':13s} {'HxW':>9s} {'T':>3s} {'imgs':>4s} "
        f"{'s/step':>8s} {'min s':>8s} {'samples/s':>9s} {'fwd samples':>11s} {'NFT/GRPO':>8s}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        for algorithm, res in row["trainers"].items():
            ratio = (
                f"{row['ratio_nft_over_grpo_time_per_sample']:.3f}" if algorithm == "diffusion_nft" else ""
            )
            fwd = res["transformer_forward_samples_per_step"]
            line = (
                f"{row['arch']:5s} {row['transformer_parameters'] / 1e6:7.2f}M {LABELS[algorithm]:13s} "
                f"{row['height']:>4d}x{row['width']:<4d} {row['sampling_steps']:3d} {row['images_per_step']:4d} "
                f"{res['seconds_per_step']:8.3f} {res['seconds_per_step_min']:8.3f} {res['samples_per_second']:9.2f} {fwd if fwd else '-':>11} "
                f"{ratio:>8s}"
            )
            if "peak_memory_gib" in res:
                line += f"  peak {res['peak_memory_gib']:.1f} GiB"
            lines.append(line)
    return "\n".join(lines)


def _quiet() -> None:
    """No loading progress bars; no warning about DiffusionNFT's second ("old") adapter, which is intended."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--arch",
        nargs="+",
        choices=["tiny", "mid", "full"],
        default=["tiny", "mid"],
        help="tiny:sd3, a mid-size SD3 (few M params) and/or the full SD3.5-Medium architecture (GPU only)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny only, 1 warm-up step and 3 timed steps each (1 CPU thread unless --threads)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="frozen weights: float32, bfloat16 or float16")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="base configs (algorithm settings, mixed precision, checkpointing, EMA): configs/tiny/*.yaml or "
        "configs/sd35m_*.yaml; default tiny for tiny/mid, sd35m for full",
    )
    p.add_argument(
        "--mixed-precision", default=None, choices=["no", "bf16", "fp16"], help="default: the preset's"
    )
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: the preset's (tiny: off, sd35m: on)",
    )
    p.add_argument("--height", type=int, default=None, help="default per arch: tiny 32, mid 64, full 512")
    p.add_argument("--width", type=int, default=None, help="default per arch: tiny 32, mid 64, full 512")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; default tiny 4, mid 6, full 10")
    p.add_argument("--group-size", type=int, default=4, help="images per prompt (G), both trainers")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step, both trainers")
    p.add_argument("--sample-batch", type=int, default=8, help="sample.batch_size (sampling chunk)")
    p.add_argument("--train-batch", type=int, default=4, help="optim.train_batch_size (micro-batch)")
    p.add_argument("--guidance", type=float, default=4.5, help="CFG scale of Flow-GRPO (NFT is CFG-free)")
    p.add_argument("--reward", default="saturation", help="a weight-free reward")
    p.add_argument("--mid-layers", type=int, default=4)
    p.add_argument("--mid-heads", type=int, default=6)
    p.add_argument("--mid-head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads; on a shared CPU 1 gives steadier numbers (default: torch's)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.repeats, args.warmup = ["tiny"], 3, 1
        args.threads = args.threads or (1 if args.device == "cpu" else None)  # steadier on a shared CPU
    if "full" in args.arch and not args.device.startswith("cuda"):
        p.error(
            "--arch full needs a GPU: pass --device cuda (a full-size transformer is far too slow on a CPU)."
        )
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be at least 1.")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the trainers' Accelerator must agree with the model
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet()
    results = []
    for arch in args.arch:
        res = bench(arch, args)
        results.append(res)
        print(
            f"[bench_trainers] {arch}: NFT/GRPO time per sample {res['ratio_nft_over_grpo_time_per_sample']:.3f} "
            f"(median of the per-repeat ratios {res['ratio_paired_median']:.3f})",
            file=sys.stderr,
            flush=True,
        )
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
