"""The on-policy probe: the configured model samples a short SDE rollout and the log-probs of its transitions are
recomputed as the Flow-GRPO trainer recomputes them for its ratio (and with batch size 1); with a KL term, its
scale in the reference code's and the exact units."""

from __future__ import annotations

import contextlib

from .findings import Finding
from .model_files import ModelLocation

__all__ = ["ONPOLICY_ROWS", "ONPOLICY_STEPS", "check_onpolicy"]

#: The on-policy probe: at most this many samples and this many stochastic steps.
ONPOLICY_ROWS = 8
ONPOLICY_STEPS = 2
#: Scale of the random LoRA B matrices of the probe (B = 0 at init would hide the adapter path).
_PROBE_LORA_STD = 1e-3


def _load_policy(cfg, path: str, device: str):
    """The model as the trainer builds it: loaded at the configured dtype on ``device``, with its LoRA (or full
    fine-tuning) set up by the trainer's own code; the LoRA's B matrices get small random values so the adapter
    path contributes to the velocity as it does after a few updates."""
    import dataclasses

    import torch

    from ..models import load_model_from_config
    from ..trainers.engine import setup_training_mode

    model = load_model_from_config(dataclasses.replace(cfg.model, path=path), device=device)
    setup_training_mode(model, cfg)
    if model.has_lora:
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            for name, p in model.transformer.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * _PROBE_LORA_STD)
    return model


def _probe_prompts(cfg, n: int):
    """``n`` prompt rows (a :class:`~diffrl.data.PromptSet`, with their metadata, e.g. an edit model's source
    images) from the training prompts, or two stock prompts."""
    from ..data import PromptSet, load_prompts

    found = PromptSet([])
    if not cfg.data.train.startswith("hf:"):
        with contextlib.suppress(Exception):
            found = load_prompts(cfg.data.train, cfg.data.prompt_key)
    if not len(found):
        found = PromptSet(["a photo of a cat on a red chair", "a watercolor painting of a lighthouse"])
    return found.take([i % len(found) for i in range(n)])


def _autocast(cfg, device: str):
    import torch

    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _recompute(model, cfg, device, latents, sigmas, cond, steps, batch, step_fn, noise_level, guidance):
    """Log-probs ``(n, len(steps))`` of the stored transitions recomputed in micro-batches of ``batch`` rows, with
    gradients enabled as in the trainer's update."""
    import torch

    n = latents.shape[0]
    out = torch.empty(n, len(steps), dtype=torch.float32, device=latents.device)
    for j, k in enumerate(steps):
        for i in range(0, n, batch):
            rows = list(range(i, min(n, i + batch)))
            x, x_next = latents[rows, k], latents[rows, k + 1]
            with torch.enable_grad(), _autocast(cfg, device):
                v = model.velocity(x, sigmas[k].expand(len(rows)), cond.select(rows), guidance)
            step = step_fn(x, v, sigmas[k], sigmas[k + 1], noise_level, prev_sample=x_next)
            out[rows, j] = step.log_prob.detach()
    return out


def _probe_window(cfg, num_steps: int) -> tuple[str, float, int, int]:
    """``(sampler, noise_level, start, end)``: the configured stochastic window, cut to ONPOLICY_STEPS steps."""
    g = cfg.flow_grpo  # the defaults of FlowGRPOConfig for the other algorithms
    sampler = g.sampler
    last = num_steps - 1 if sampler == "cps" else num_steps
    if g.sde_window == 0:
        lo, hi = 0, last
    else:
        lo = g.sde_window_range[0] if g.sde_window_range else 0
        lo = max(0, min(lo, last - g.sde_window))
        hi = lo + g.sde_window
    return sampler, g.noise_level, lo, max(lo + 1, min(hi, lo + ONPOLICY_STEPS))


def _graded(
    name: str, dev: float, tol: float, worst: str, msg: str, bad: str, bad_fix: str, near_fix: str
) -> Finding:
    """``worst`` at or above ``tol``, WARN within a factor 10 of it, OK below."""
    if dev >= tol:
        return Finding(name, worst, msg + bad, bad_fix)
    if dev >= tol / 10:
        return Finding(name, "WARN", msg + ": within tolerance but close to it", near_fix)
    return Finding(name, "OK", msg)


def _trained_steps(cfg, num_steps: int) -> list[int]:
    """The steps Flow-GRPO trains with this config (every step a window may cover when there is a window)."""
    g = cfg.flow_grpo
    last = num_steps - 1 if g.sampler == "cps" else num_steps
    if g.sde_window:
        lo, hi = g.sde_window_range or [0, max(1, num_steps // 2)]
        return list(range(lo, min(last, hi + g.sde_window - 1)))
    return list(range(last))[: max(1, int(last * g.timestep_fraction))]


def _kl_scale_finding(cfg, sigmas) -> Finding:
    """``kl-scale``: the KL weight in the reference code's units (the papers' betas) and in the exact ones, over the
    trained steps of the configured schedule; the two differ by the step size ``|dt|``."""
    g = cfg.flow_grpo
    steps = _trained_steps(cfg, len(sigmas) - 1)
    if g.sampler == "cps":
        return Finding(
            "kl-scale", "OK", f"kl_beta={g.kl_beta:g}: with the CPS sampler the reference and exact KL agree"
        )
    dts = [float(sigmas[k] - sigmas[k + 1]) for k in steps]
    where = f"over the {len(steps)} trained step(s) of the {len(sigmas) - 1}-step schedule"
    if g.kl_scale == "reference":
        exact = [g.kl_beta * dt for dt in dts]
        return Finding(
            "kl-scale",
            "OK",
            f"kl_beta={g.kl_beta:g} in reference units (the papers': 0.04 GenEval/OCR, 0.01 PickScore); in exact units "
            f"(kl_scale=exact) the same weight is kl_beta x |dt| = {sum(exact) / len(exact):.3g} on average "
            f"({min(exact):.3g}..{max(exact):.3g}) {where}",
        )
    ref = [g.kl_beta / dt for dt in dts]
    mean = sum(ref) / len(ref)
    return Finding(
        "kl-scale",
        "WARN",
        f"kl_scale=exact: kl_beta={g.kl_beta:g} weighs the KL like a reference-units beta of {mean:.3g} on average "
        f"({min(ref):.3g}..{max(ref):.3g}, kl_beta / |dt|) {where}, {mean / g.kl_beta:.1f}x the same number in the "
        "papers' units",
        "Set flow_grpo.kl_scale=reference to use a paper's beta as given (the default), or keep exact on purpose "
        "with a beta about that factor smaller.",
    )


def check_onpolicy(cfg, location: ModelLocation, device: str) -> list[Finding]:
    import torch

    from ..samplers import cps_step, rollout, sde_step
    from ..trainers.engine import seeded_generator

    s, o = cfg.sample, cfg.optim
    flow_grpo = cfg.algorithm == "flow_grpo"
    tol = cfg.flow_grpo.clip_range if flow_grpo else 1e-4
    tol_text = f"tolerance {tol:.0e}" + (" = flow_grpo.clip_range" if flow_grpo else "")
    worst = "FAIL" if flow_grpo else "WARN"
    note = "" if flow_grpo else f" ({cfg.algorithm} does not use this ratio; it measures determinism)"
    if cfg.algorithm == "awm" and cfg.awm.rollout_policy == "ema":
        note = (
            " (awm's off-policy ratio is to its EMA adapter's matching loss, not this SDE ratio; it measures"
            " determinism)"
        )
    if s.num_steps < 2 and cfg.flow_grpo.sampler == "cps":
        return [
            Finding(
                "ratio", "WARN", "skipped: a 1-step CPS rollout has no stochastic step", "Use more steps."
            )
        ]
    try:
        path = location.spec if location.kind == "tiny" else str(location.directory())
        model = _load_policy(cfg, path, device)  # loads without progress bars, as every load_model does
        sampler, noise_level, lo, hi = _probe_window(cfg, s.num_steps)
        step_fn = sde_step if sampler == "sde" else cps_step
        n = max(1, min(max(s.batch_size, o.train_batch_size), ONPOLICY_ROWS))
        prompts = _probe_prompts(cfg, n)
        sigmas = model.schedule(s.num_steps, s.height, s.width)[: hi + 1]
        cond = model.encode_rows(prompts.prompts, prompts.batch_metadata())
        trajectories, old = [], []
        chunk = max(1, min(s.batch_size, n))
        for i in range(0, n, chunk):  # sampled in chunks of sample.batch_size, as the trainer does
            rows = list(range(i, min(n, i + chunk)))
            with torch.no_grad(), _autocast(cfg, device):
                noise = model.sample_noise(
                    len(rows), s.height, s.width, [seeded_generator(cfg.seed, 0, 1, r) for r in rows]
                )
                out = rollout(
                    model,
                    cond.select(rows),
                    sigmas,
                    noise,
                    guidance_scale=s.guidance_scale,
                    sampler=sampler,
                    noise_level=noise_level,
                    sde_window=(lo, hi),
                    generator=[seeded_generator(cfg.seed, 0, 2, r) for r in rows],
                )
            trajectories.append(out.latents)
            old.append(out.log_probs[:, lo:hi])
        latents, old_logp = torch.cat(trajectories), torch.cat(old)
        steps = list(range(lo, hi))
        args = (cfg, device, latents, sigmas, cond, steps)
        kw = {"step_fn": step_fn, "noise_level": noise_level, "guidance": s.guidance_scale}
        train_bs = max(1, min(o.train_batch_size, n))
        new_logp = _recompute(model, *args, batch=train_bs, **kw)
        single_logp = _recompute(model, *args, batch=1, **kw) if train_bs > 1 else new_logp
        dtype = str(next(model.transformer.parameters()).dtype).removeprefix("torch.")
        full_sigmas = model.schedule(s.num_steps, s.height, s.width).float().cpu()
    except Exception as err:  # noqa: BLE001 - report any failure of the probe as a finding
        first_line = (str(err).splitlines() or [""])[0]
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [
            Finding(
                "ratio",
                "FAIL",
                f"the on-policy probe could not run: {err.__class__.__name__}: {first_line}",
                "Fix that error first (it is what the trainer would hit when it loads and samples this model).",
            )
        ]
    del model
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()

    setting = (
        f"{n} samples x {len(steps)} {sampler.upper()} step(s) {lo}..{hi - 1} of {s.num_steps}, {s.height}x{s.width}, "
        f"{dtype} weights, mixed_precision={cfg.mixed_precision} on {device}"
    )
    findings = []
    if not (torch.isfinite(old_logp).all() and torch.isfinite(new_logp).all()):
        return [
            Finding(
                "ratio",
                "FAIL",
                f"log-probs are not finite (NaN or inf) over {setting}",
                "Use model.dtype=bfloat16 or float32 (float16 overflows in large models) and check the weights.",
            )
        ]
    ratio_dev = float((new_logp - old_logp).exp().sub(1).abs().max())
    msg = (
        f"max |exp(logp_new - logp_old) - 1| = {ratio_dev:.2e} ({tol_text}) over "
        f"{setting}; rollout batch {chunk}, recompute batch {train_bs}{note}"
    )
    if flow_grpo and cfg.flow_grpo.old_logp == "recompute":
        findings.append(
            Finding(
                "ratio",
                "OK",
                msg
                + "; flow_grpo.old_logp=recompute takes the old log-probs from the training shapes, so the "
                "first ratio is exactly 1 whatever this drift",
            )
        )
    else:
        findings.append(
            _graded(
                "ratio",
                ratio_dev,
                tol,
                worst,
                msg,
                ": fresh samples are off-policy",
                "Set flow_grpo.old_logp=recompute (one no-grad forward per trained step recomputes the old log-probs "
                "in the training shapes), or make the recompute match the rollout: deterministic kernels "
                "(torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8), no dropout, the same dtype "
                "and mixed_precision in sampling and training, and sample.batch_size equal to "
                "optim.train_batch_size.",
                "Prefer float32 sampler maths and equal sample.batch_size and optim.train_batch_size, or set "
                "flow_grpo.old_logp=recompute.",
            )
        )
    if flow_grpo and cfg.flow_grpo.kl_beta > 0:
        findings.append(_kl_scale_finding(cfg, full_sigmas))

    if train_bs == 1:
        findings.append(
            Finding("batch-invariance", "OK", "optim.train_batch_size is 1: the recompute is batch size 1")
        )
        return findings
    batch_dev = float((single_logp - new_logp).exp().sub(1).abs().max())
    msg = (
        f"max |exp(logp_bs1 - logp_bs{train_bs}) - 1| = {batch_dev:.2e} ({tol_text}) over {n} samples "
        f"x {len(steps)} step(s){note}"
    )
    findings.append(
        _graded(
            "batch-invariance",
            batch_dev,
            tol,
            worst,
            msg,
            ": log-probs depend on the batch size",
            "Set optim.train_batch_size equal to sample.batch_size so the rollout and the ratio's recompute "
            "use the same batch, or sample in float32 (model.dtype=float32, mixed_precision=no).",
            "Set optim.train_batch_size equal to sample.batch_size.",
        )
    )
    return findings
