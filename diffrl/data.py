"""Prompt sources: a .txt file (one prompt a line), a .jsonl file (a prompt field plus metadata), or a Hugging Face
``datasets`` dataset (``hf:<name>[:<split>]``); with a held-out evaluation split. A .jsonl row's ``image`` field (the
source image of an edit model, Qwen-Image-Edit; a list of them for Qwen-Image-Edit-2509) is a path relative to the
prompt file, made absolute on reading."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PromptSet", "load_prompts", "train_eval_prompts", "check_reward_metadata"]


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict[str, Any]] = field(default_factory=list)  # one dict per prompt (may be empty dicts)

    def __post_init__(self):
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, index) -> PromptSet:
        return PromptSet([self.prompts[i] for i in index], [self.metadata[i] for i in index])

    def batch_metadata(self) -> dict[str, list]:
        """Metadata as per-sample lists (the reward call's ``**metadata``): every key some row has, ``None`` in the
        rows without it (a reward that needs the field then names the image that lacks it)."""
        if not self.metadata:
            return {}
        keys = sorted({k for row in self.metadata for k in row})
        return {k: [row.get(k) for row in self.metadata] for k in keys}


def load_prompts(spec: str, prompt_key: str = "prompt") -> PromptSet:
    """Read prompts from ``spec`` (see the module docstring); raises a one-sentence error when absent or empty."""
    if spec.startswith("hf:"):
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                f"prompt source {spec!r} needs the datasets package: pip install datasets."
            ) from err
        name, _, split = spec[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        if prompt_key not in ds.column_names:
            raise ValueError(
                f"dataset {name} has no {prompt_key!r} column (columns: {ds.column_names}); set data.prompt_key."
            )
        rows = [dict(r) for r in ds]
        prompts = [str(r.pop(prompt_key)) for r in rows]
        out = PromptSet(prompts, rows)
    else:
        path = Path(spec)
        if not path.is_file():
            where = (
                ""
                if path.is_absolute()
                else f" (relative paths are read from the current directory, {Path.cwd()})"
            )
            raise FileNotFoundError(
                f"prompt file {spec} does not exist{where}; pass a .txt or .jsonl file or hf:<dataset>."
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise ValueError(
                f"prompt file {spec} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}); save it "
                "as UTF-8."
            ) from None
        if path.suffix == ".jsonl":
            prompts, meta = [], []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(
                        f"{spec} line {n} is not valid JSON; write one JSON object per line."
                    ) from None
                if prompt_key not in row:
                    raise ValueError(
                        f"{spec} line {n} has no {prompt_key!r} field; add it or set data.prompt_key."
                    )
                prompts.append(str(row.pop(prompt_key)))
                # a source image (Qwen-Image-Edit; a list for Qwen-Image-Edit-2509): paths relative to the file
                image = row.get("image")
                if isinstance(image, str):
                    row["image"] = str(path.parent / image)
                elif isinstance(image, list) and all(isinstance(i, str) for i in image):
                    row["image"] = [str(path.parent / i) for i in image]
                meta.append(row)
            out = PromptSet(prompts, meta)
        else:
            out = PromptSet([line.strip() for line in text.splitlines() if line.strip()])
    if not len(out):
        raise ValueError(f"prompt source {spec} holds no prompts; add some.")
    return out


def train_eval_prompts(
    train: str, eval_spec: str = "", eval_size: int = 16, seed: int = 0, prompt_key: str = "prompt"
):
    """``(train_set, eval_set)``: the eval file when given (first ``eval_size`` prompts), else ``eval_size`` prompts
    held out of the training set at random (fixed by ``seed``)."""
    train_set = load_prompts(train, prompt_key)
    if eval_spec:
        eval_set = load_prompts(eval_spec, prompt_key)
        return train_set, eval_set.take(range(min(eval_size, len(eval_set))))
    if eval_size <= 0:
        return train_set, PromptSet([])
    if eval_size >= len(train_set):
        raise ValueError(
            f"data.eval_size={eval_size} leaves no training prompts out of {len(train_set)}; lower it or give data.eval."
        )
    order = np.random.default_rng(seed).permutation(len(train_set))
    return train_set.take(order[eval_size:]), train_set.take(order[:eval_size])


def check_reward_metadata(reward, prompts: PromptSet, source: str) -> None:
    """Every prompt of ``prompts`` carries the metadata fields ``reward`` needs (its ``required_metadata``, e.g.
    ``scene`` for ``shapes_verifier``); raises a one-sentence error naming ``source`` otherwise. Called before the
    model loads, so a missing field does not fail at the first scoring, minutes later."""
    for key in getattr(reward, "required_metadata", ()):
        rows = [i for i, row in enumerate(prompts.metadata) if key not in row]
        if rows:
            raise ValueError(
                f"reward {reward.name!r} needs the metadata field {key!r} on every prompt, and {source} has "
                f"none on {len(rows)} of {len(prompts)} prompts (e.g. row {rows[0] + 1}); use a .jsonl prompt "
                f"file with a {key!r} field per line (such as configs/toy/train.jsonl) or another reward."
            )
