"""diffrl.toy: an embedded toy world (coloured shapes, GenEval-style prompts) so the whole RL loop runs offline.

:mod:`diffrl.toy.scenes` defines the world (palette, shapes, prompt categories, the train / held-out split, the
renderer and the meaning of a description); the matching verifier reward is ``diffrl.toy.rewards``.
"""

from .scenes import (
    BACKGROUND,
    CATEGORIES,
    CATEGORY_WEIGHTS,
    HELD_OUT_COMBOS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SceneObject,
    generate_dataset,
    layout,
    make_prompt_sets,
    normalize_description,
    prompt_for,
    prompt_pool,
    relation_holds,
    render,
    sample_description,
    sample_scene,
    score_objects,
    split_of,
    write_prompt_jsonl,
    write_prompt_sets,
)

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "CATEGORY_WEIGHTS",
    "HELD_OUT_COMBOS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "SceneObject",
    "generate_dataset",
    "layout",
    "make_prompt_sets",
    "normalize_description",
    "prompt_for",
    "prompt_pool",
    "relation_holds",
    "render",
    "sample_description",
    "sample_scene",
    "score_objects",
    "split_of",
    "write_prompt_jsonl",
    "write_prompt_sets",
]
