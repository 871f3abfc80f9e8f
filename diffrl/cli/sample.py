"""``diffrl sample`` and ``diffrl eval``: one module for both, as their parsers share most options (the model,
``--lora``, the sampling options, ``--dtype``, ``--device``, ...). They call :func:`diffrl.sampling.run_sample` and
:func:`diffrl.sampling.run_eval`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .errors import CommandErrors

__all__ = ["sample_parser", "eval_parser", "main", "eval_main"]

#: the ``tiny:FAMILY`` models (:data:`diffrl.models.loading.TINY_BUILDERS`, named here so that ``--help`` does not
#: import the model adapters; a test keeps the two lists equal)
TINY_FAMILIES = (
    "sd3",
    "flux",
    "flux2",
    "flux2_klein",
    "qwen_image",
    "qwen_image_edit",
    "qwen_image_edit_plus",
    "z_image",
    "wan",
    "wan22",
    "wan22_ti2v",
    "wan_i2v",
    "wan22_i2v",
)


def _add_common(p) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="hub id, local diffusers pipeline dir, toy or toy:cliptext (the shipped toy models: 64x64, the second "
        "is the demo's), or tiny:FAMILY, a tiny "
        f"random pipeline for tests ({', '.join(TINY_FAMILIES)})",
    )
    p.add_argument(
        "--lora",
        metavar="DIR",
        help="trained weights: a diffusers LoRA dir (<run>/lora) or .safetensors file, a run dir, or a training "
        "checkpoint <run>/checkpoint-N (its adapter is rebuilt from its state.json; EMA weights when kept)",
    )
    p.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="ODE (Euler) steps (default: the model's, see sampling_defaults: toy 8, SD3 40, FLUX 28)",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="CFG (SD3) or guidance-embedding (FLUX) scale (default: the model's: toy 1.0, no CFG as its presets; "
        "SD3 4.5; FLUX 3.5)",
    )
    p.add_argument(
        "--height", type=int, default=None, help="image height in pixels (default: the model's native size)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="image width in pixels (default: the model's native size)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="run seed; image j of prompt i uses a seed from (seed, i, j) (default 0)",
    )
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument(
        "--batch-size", type=int, default=4, help="images sampled at once (never changes an image)"
    )
    p.add_argument(
        "--dtype", default="float32", help="weights' dtype: float32, bf16 or fp16 (default float32)"
    )
    p.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="video models (Wan): frames per video, 1 more than a multiple of 4 (default: the model's, Wan 81)",
    )
    p.add_argument(
        "--fps",
        type=int,
        default=16,
        help="video models: frames per second of the written .webp files (default 16)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--prompt-key", default="prompt", help="the prompt field of .jsonl prompt files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 without a GPU unless OMP_NUM_THREADS is set)",
    )


def sample_parser() -> argparse.ArgumentParser:
    sp = argparse.ArgumentParser(
        prog="diffrl sample",
        description="Generate images with diffrl's ODE sampler, one fixed seed per (prompt, image): PNGs named by "
        "index, samples.jsonl (file, prompt, seed) and grid.png in --out.",
    )
    _add_common(sp)
    sp.add_argument(
        "--prompts",
        "--prompt",
        dest="prompts",
        nargs="+",
        required=True,
        metavar="FILE_OR_TEXT",
        help="prompt files (.txt one a line, .jsonl with a prompt field, hf:<dataset>) or prompt texts (--prompt is "
        "the same option)",
    )
    sp.add_argument("--out", required=True, metavar="DIR", help="output directory")
    return sp


def eval_parser() -> argparse.ArgumentParser:
    ev = argparse.ArgumentParser(
        prog="diffrl eval",
        description="Sample the prompt set as diffrl sample does and score it with one or more rewards; prints each "
        "reward's mean and, with --out, writes the images and eval.json (per-image scores and means).",
    )
    _add_common(ev)
    ev.add_argument(
        "--prompts",
        "--prompt",
        dest="prompts",
        nargs="+",
        required=True,
        metavar="FILE_OR_TEXT",
        help="prompt files (.txt one a line, .jsonl with a prompt field and the rewards' metadata, hf:<dataset>) or "
        "prompt texts, as diffrl sample takes them (--prompt is the same option)",
    )
    ev.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[=WEIGHT]",
        help="a reward by registry name or package.module:attr, with an optional weight for the total; repeat it",
    )
    ev.add_argument(
        "--reward-kwargs",
        default="",
        metavar="JSON",
        help='options per reward, e.g. \'{"hpsv2": {"version": "v2.1"}}\'',
    )
    ev.add_argument(
        "--out", metavar="DIR", help="write the images, samples.jsonl, grid.png and eval.json here"
    )
    return ev


def _options(args) -> dict[str, Any]:
    """The keyword arguments that ``run_sample`` and ``run_eval`` share."""
    return {
        "lora": args.lora,
        "dtype": args.dtype,
        "device": args.device,
        "num_steps": args.num_steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "images_per_prompt": args.images_per_prompt,
        "batch_size": args.batch_size,
        "prompt_key": args.prompt_key,
        "progress": not args.no_progress,
        "num_frames": args.num_frames,
        "fps": args.fps,
    }


def _reward_kwargs(text: str) -> dict:
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--reward-kwargs is not valid JSON ({err.msg}); pass e.g. '{{\"hpsv2\": {{}}}}'."
        ) from None


def main(argv: list[str] | None = None) -> int:
    """``diffrl sample``."""
    args = sample_parser().parse_args(argv)
    from diffrl.sampling import run_sample
    from diffrl.utils import set_cpu_threads

    with CommandErrors() as errors:
        set_cpu_threads(args.threads)
        run_sample(args.model, args.prompts, args.out, **_options(args))
    return errors.code


def eval_main(argv: list[str] | None = None) -> int:
    """``diffrl eval``."""
    args = eval_parser().parse_args(argv)
    from diffrl.sampling import run_eval
    from diffrl.utils import set_cpu_threads

    with CommandErrors() as errors:
        set_cpu_threads(args.threads)
        kwargs = _reward_kwargs(args.reward_kwargs)
        run_eval(args.model, args.prompts, args.reward, reward_kwargs=kwargs, out=args.out, **_options(args))
    return errors.code
