"""Spies on a trainer's step for the tests: what it sampled and scored, and what one of its update methods got."""

from __future__ import annotations


def spy_step(trainer, monkeypatch, method: str) -> dict:
    """Wrap ``trainer.sample_and_score`` and ``trainer.<method>`` (e.g. ``_accumulate``) for the next steps. The
    returned dict then holds ``x0`` and ``rewards`` (the sampled final latents and total rewards, cloned) and
    ``calls``: the positional arguments of every call of ``method``."""
    seen: dict = {"calls": []}
    sample_and_score, wrapped = trainer.sample_and_score, getattr(trainer, method)

    def spy_sample(n, *args):
        x0, scored = sample_and_score(n, *args)
        seen["x0"], seen["rewards"] = x0.clone(), scored.total.float().clone()
        return x0, scored

    def spy_method(*args):
        seen["calls"].append(tuple(a.clone() if hasattr(a, "clone") else a for a in args))
        return wrapped(*args)

    monkeypatch.setattr(trainer, "sample_and_score", spy_sample)
    monkeypatch.setattr(trainer, method, spy_method)
    return seen
