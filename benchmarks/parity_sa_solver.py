"""Parity of diffrl's SA-Solver (``diffrl.samplers.sa_solver_rollout``) with the AWM reference's sampler, side by side.

The AWM reference (scxue/advantage_weighted_matching) samples its GenEval and OCR rollouts with its own
``flow_grpo/diffusers_patch/sa_solver.py`` (``SASolver.sample``, called from ``sd3_pipeline_with_logprob.py`` with
``predictor_order=2, corrector_order=2, pc_mode='PEC'``, ``tau(t) = noise_level if 0.3 <= t <= 0.9 else 0``, on the
scheduler's sigmas with ``t[0] = 1 - 1e-3`` and ``t[-2] = t[-3] / 2``). This script (run by hand, not part of the test
suite) loads that file from the clone given with ``--reference`` and runs both samplers on:

* a velocity model: ``--model toy`` (default) the demo's toy flow transformer (``toy:cliptext``) on real prompts, or
  ``--model fn`` a fixed nonlinear function of ``(x, t)``;
* the same initial noise and the same per-step noise: the reference draws its noise with ``torch.randn_like`` at
  every step, which is replaced here by a function handing out the noise diffrl draws from its per-sample generators
  (diffrl draws only for the stochastic steps; the reference's other draws are multiplied by 0);
* the reference's grid made from the SD3 schedule (shift 3) of ``--steps`` steps, and several (predictor, corrector,
  noise level) settings, the reference's own (2, 2) first.

It prints, per setting, the largest difference of the final samples and of the whole trajectory, relative to the
largest entry, and the same for the reference run in float64 against itself in float32: the part of the difference
that is the reference's own float32 rounding (it computes its coefficients in float32, diffrl in float64).

    python benchmarks/parity_sa_solver.py --reference /path/to/advantage_weighted_matching
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference_code import load_module  # noqa: E402

from diffrl.samplers import sa_solver_levels, sa_solver_rollout  # noqa: E402

SETTINGS = [
    (2, 2, 0.7),
    (2, 2, 0.4),
    (2, 2, 0.0),
    (1, 0, 0.7),
    (1, 1, 0.7),
    (2, 1, 0.7),
    (3, 3, 0.7),
    (4, 4, 1.0),
]


def schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    s = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


class FnModel:
    """A fixed nonlinear velocity field (no learned weights)."""

    def __init__(self, width: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(width, width, generator=g) * 0.3

    def velocity(self, x, sigma, cond, guidance_scale=1.0):
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x @ self.w.to(x.dtype)) * (1 + s) - x * s + cond.to(x.dtype)


def run_reference(ref, model, cond, x, levels, tau, po, co, dtype):
    """The reference's ``SASolver.sample`` on ``x`` in ``dtype``, its noise draws replaced by diffrl's (the same
    per-sample generators, drawn for the stochastic steps only); returns the final samples and the trajectory."""
    shape, t_list = x.shape, [float(v) for v in levels]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(shape[0])]
    draws = [torch.zeros(shape)]  # the draw before the loop, never used
    for k in range(1, len(t_list)):
        if k < len(t_list) - 1 and tau(t_list[k]) > 0:
            draws.append(torch.stack([torch.randn(shape[1:], generator=g) for g in gens]))
        else:
            draws.append(torch.zeros(shape))
    draws = iter(draws)

    def randn_like(a):
        return next(draws).to(a.dtype)

    def model_fn(xx, tt):
        return model.velocity(xx.float(), tt.float().expand(xx.shape[0]), cond, 1.0).to(dtype)

    saved = ref.torch.randn_like
    ref.torch.randn_like = randn_like
    try:
        solver = ref.SASolver(model_fn, ref.NoiseScheduleFlowMatching())
        with torch.no_grad():
            return solver.sample(
                x.to(dtype),
                tau,
                levels.to(dtype),
                predictor_order=po,
                corrector_order=co,
                pc_mode="PEC",
                return_intermediate=True,
            )
    finally:
        ref.torch.randn_like = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--reference", required=True, type=Path, help="clone of scxue/advantage_weighted_matching"
    )
    ap.add_argument("--model", choices=["toy", "fn"], default="toy")
    ap.add_argument(
        "--steps", type=int, default=14, help="rollout steps (the reference's GenEval config: 14)"
    )
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    path = args.reference / "advantage_weighted_matching/flow_grpo/diffusers_patch/sa_solver.py"
    if not path.exists():
        path = args.reference / "flow_grpo/diffusers_patch/sa_solver.py"
    if not path.exists():
        raise SystemExit(
            f"no flow_grpo/diffusers_patch/sa_solver.py under {args.reference}; pass the reference's clone"
        )
    ref = load_module(path, "reference_sa_solver")
    torch.manual_seed(0)

    if args.model == "toy":
        from diffrl.models import load_model

        model = load_model("toy:cliptext")
        prompts = [
            "a red circle to the left of a blue square",
            "two green triangles",
            "a yellow star",
            "a purple cat",
        ]
        cond = model.encode((prompts * args.batch)[: args.batch])
        shape = (args.batch, *model.latent_shape(64, 64))
        levels = sa_solver_levels(model.schedule(args.steps, 64, 64))
    else:
        model = FnModel(16)
        cond = torch.randn(args.batch, 1, 1, 16) * 0.2
        shape = (args.batch, 3, 16, 16)
        levels = sa_solver_levels(schedule(args.steps))
    x = torch.randn(shape)
    t_list = [float(v) for v in levels]
    print(f"model {args.model}, {args.steps} steps, batch {args.batch}, grid {[round(v, 4) for v in t_list]}")

    for po, co, noise_level in SETTINGS:

        def tau(t, nl=noise_level):
            return nl if 0.3 <= t <= 0.9 else 0.0

        ours = sa_solver_rollout(
            model,
            cond,
            levels,
            x,
            tau=tau,
            predictor_order=po,
            corrector_order=co,
            generator=[torch.Generator().manual_seed(100 + i) for i in range(args.batch)],
        )

        r32, i32 = run_reference(ref, model, cond, x, levels, tau, po, co, torch.float32)
        r64, _ = run_reference(ref, model, cond, x, levels, tau, po, co, torch.float64)
        scale = r64.abs().max().item()
        final_d = (ours.final - r32).abs().max().item() / scale
        traj_d = (
            max((a - b).abs().max().item() for a, b in zip(ours.latents.unbind(1), i32, strict=True)) / scale
        )
        own = (r32.double() - r64).abs().max().item() / scale
        ours64 = (ours.final.double() - r64).abs().max().item() / scale
        steps = ",".join(str(i) for i in ours.stochastic_steps().tolist()) or "none"
        print(
            f"predictor {po} corrector {co} noise {noise_level}: stochastic steps {steps}; diffrl vs reference (float32) "
            f"final {final_d:.1e}, trajectory {traj_d:.1e}; vs reference in float64 {ours64:.1e}; "
            f"reference float32 vs float64 {own:.1e}"
        )


if __name__ == "__main__":
    main()
