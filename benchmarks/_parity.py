"""What the parity scripts (parity_flow_grpo.py, parity_diffusion_nft.py, parity_awm.py, parity_dpo.py) share:
measures of the gap between two tensors, the stand-ins for sampling and scoring on stored rollouts, the
``--reference-override KEY=VALUE`` parser, and the value-by-value comparison of a shipped preset with what the
reference configuration says it must hold (their check 0)."""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

import torch

__all__ = [
    "compare",
    "git_commit",
    "parse_override",
    "preset_differences",
    "preset_value",
    "quiet_libraries",
    "rel",
    "same_value",
    "short",
    "stored_reward",
    "stored_rollouts",
]


def quiet_libraries() -> None:
    """No progress bars from diffusers and transformers, and only diffusers' errors: a parity run prints its checks."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def git_commit(root: Path) -> str:
    """The short commit of the clone at ``root`` ("" when it is not a git checkout)."""
    done = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip()


def rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(max|a - b|, max|a - b| / max|b|)``."""
    diff = float((a.detach().double() - b.detach().double()).abs().max())
    return diff, diff / max(float(b.detach().double().abs().max()), 1e-30)


def compare(pairs) -> tuple[float, float, str]:
    """The largest :func:`rel` gaps over ``(name, a, b)`` triples: ``(max abs, max rel, the name of the worst)``."""
    worst_abs, worst_rel, where = 0.0, 0.0, ""
    for name, a, b in pairs:
        d, r = rel(a, b)
        worst_abs = max(worst_abs, d)
        if r >= worst_rel:
            worst_rel, where = r, name
    return worst_abs, worst_rel, where


def short(name: str) -> str:
    """A LoRA parameter's name without the noise: ``block 0.attn.to_q.lora_A``."""
    return name.replace("transformer_blocks.", "block ").replace(".default.weight", "")


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value read as a Python literal when it is one (else the string)."""
    key, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def stored_rollouts(x0, scored, given):
    """Stands in for ``Trainer.sample_and_score``: the stored latents and rewards; records the prompts."""

    def sample_and_score(count, sample_chunk, prompts, metadata):
        given["prompts"] = list(prompts)
        return x0.clone(), scored

    return sample_and_score


def stored_reward(images, prompts, **metadata):  # never called: sampling and scoring are replaced
    raise AssertionError("the rollouts are stored")


def preset_value(preset, key: str):
    """The preset's value of the dotted ``key`` (a mapping as a plain dict)."""
    value = preset
    for part in key.split("."):
        value = getattr(value, part)
    return dict(value) if isinstance(value, dict) else value


def same_value(have, want) -> bool:
    """Equal as a preset value: booleans exactly, numbers to 1e-12 relative, mappings key by key."""
    if isinstance(have, bool) or isinstance(want, bool):
        return have is want
    if isinstance(have, (int, float)) and isinstance(want, (int, float)):
        return abs(float(have) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
    if isinstance(have, dict) and isinstance(want, dict):
        return have.keys() == want.keys() and all(same_value(have[k], v) for k, v in want.items())
    return have == want


def preset_differences(preset, expected: dict, value=preset_value) -> list[str]:
    """``"key: preset X, reference Y"`` for every ``expected`` key whose preset value (read with ``value``) differs."""
    wrong = []
    for key, want in expected.items():
        have = value(preset, key)
        if not same_value(have, want):
            wrong.append(f"{key}: preset {have!r}, reference {want!r}")
    return wrong
