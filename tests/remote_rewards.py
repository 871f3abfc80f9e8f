"""A reward the remote-reward tests serve (``diffrl serve-reward tests.remote_rewards:Scripted``): the server process
imports this module by name, so it imports nothing from the test modules.

``Scripted`` scores brightness (continuous float32 values, so exactness is a real check), and its prompts script
what goes wrong, so that one server process serves every failure the tests need:

* ``"slow:S"``: the call sleeps S seconds first (a slow server);
* ``"flaky:ID:N"``: the first N calls that carry this ID raise (a server that fails, then recovers);
* ``"nan"``: that image scores NaN (a reward with non-finite output).
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from diffrl.rewards import Reward

_CALLS: Counter[str] = Counter()


class Scripted(Reward):
    name = "scripted"
    differentiable = False

    def score(self, images, prompts, **metadata):
        for p in prompts:
            if p.startswith("flaky:"):
                _, key, n = p.split(":")
                _CALLS[key] += 1
                if _CALLS[key] <= int(n):
                    raise RuntimeError(f"scripted failure {_CALLS[key]} of {n} for {key}")
        delay = max((float(p.split(":")[1]) for p in prompts if p.startswith("slow:")), default=0.0)
        if delay:
            time.sleep(delay)
        w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        out = (images * w).sum(dim=1).mean(dim=(1, 2))
        nan = torch.tensor([p == "nan" for p in prompts])
        return torch.where(nan, torch.full_like(out, float("nan")), out)
