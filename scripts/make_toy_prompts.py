"""Write the toy world's prompt files ``configs/toy/train.jsonl`` and ``configs/toy/eval.jsonl`` (deterministic).

    python scripts/make_toy_prompts.py            # re-creates both files exactly (a test checks they match)

Train: 2000 prompts of the train split, every category (``CATEGORY_WEIGHTS``). Eval: 96 held-out compositions
(``eval_split="eval_seen"``: prompts no training prompt has, made of colour-shape combinations training shows), in
the multi-object categories (two objects, counting, position, colour attribution), repeats allowed to keep the
category balance (a repeated prompt is sampled with another seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffrl.toy.scenes import CATEGORY_WEIGHTS, make_prompt_sets, write_prompt_jsonl

N_TRAIN, N_EVAL, SEED = 2000, 96, 0
EVAL_WEIGHTS = {k: CATEGORY_WEIGHTS[k] for k in ("two_object", "counting", "position", "color_attr")}


def toy_prompt_sets() -> tuple[list[dict], list[dict]]:
    train, _ = make_prompt_sets(N_TRAIN, 0, SEED)
    _, held = make_prompt_sets(
        0, N_EVAL, SEED, weights=EVAL_WEIGHTS, eval_repeats=True, eval_split="eval_seen"
    )
    return train, held


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "configs" / "toy")
    a = p.parse_args(argv)
    train, held = toy_prompt_sets()
    print(write_prompt_jsonl(train, a.out / "train.jsonl"), write_prompt_jsonl(held, a.out / "eval.jsonl"))


if __name__ == "__main__":
    main()
