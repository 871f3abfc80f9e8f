"""The options that reproduce the Flow-GRPO and DiffusionNFT reference codes (issue: reference fidelity): each one
checked against its formula or an invariant on the tiny SD3 pipeline. Parity with the reference code itself is run
by hand: benchmarks/parity_flow_grpo.py and benchmarks/parity_diffusion_nft.py."""

import json
import math
from pathlib import Path

import pytest
import torch

from diffrl.config import TrainConfig, config_to_dict, load_config, resume_mismatch
from diffrl.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
PRESET = {a: ROOT / "configs" / "tiny" / f"{a}.yaml" for a in ("flow_grpo", "diffusion_nft", "refl")}
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")


pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")


def _trainer(algo: str, out: Path, *extra: str, **parts):
    return build_trainer(
        PRESET[algo], [f"output_dir={out}", f"data.train={PROMPTS}", "data.eval_size=0", *extra], **parts
    )


def _randomise_lora(trainer, seed: int = 0, std: float = 0.05) -> None:
    """Non-zero LoRA B matrices: the adapted policy then differs from the base (a fresh LoRA is a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in zip(trainer.param_names, trainer.params, strict=True):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# ---------------------------------------------------------------------------------------------- DiffusionNFT


def test_nft_old_adapter_is_float32_in_a_bf16_model_and_its_soft_update_is_exact(tmp_path):
    # d = 0.999 at the first update: in bf16 the old weights would not move at all (the step is below bf16's
    # resolution); in float32 they move by exactly (1 - d) * (new - old).
    trainer = _trainer(
        "diffusion_nft",
        tmp_path,
        "model.dtype=bfloat16",
        "diffusion_nft.decay_rate=0.999",
        "diffusion_nft.decay_cap=0.999",
    )
    assert all(o.dtype == torch.float32 for o in trainer.old_params)
    assert all(p.dtype == torch.float32 for p in trainer.params)
    old_before = [o.detach().clone() for o in trainer.old_params]
    metrics = trainer.train_step(0)
    assert metrics["train/old_decay"] == pytest.approx(0.999)
    moved = 0
    for before, old, new in zip(old_before, trainer.old_params, trainer.params, strict=True):
        expected = 0.999 * before + 0.001 * new.detach()
        torch.testing.assert_close(old, expected, rtol=0, atol=1e-9)
        moved += int(not torch.equal(old, before))
    assert moved == len(trainer.old_params)  # every old tensor moved (the LoRA B were zero, now are not)


@pytest.mark.parametrize("minibatches, expected", [(1, 0.001), (2, 0.002)])
def test_nft_old_policy_decay_counts_optimiser_updates(minibatches, expected, tmp_path):
    # the reference computes the decay from its global step after the epoch's updates: 1 (or 2) after the first
    trainer = _trainer("diffusion_nft", tmp_path, f"diffusion_nft.num_minibatches={minibatches}")
    metrics = trainer.train_step(0)
    assert metrics["train/old_decay"] == pytest.approx(expected)
    assert trainer.scheduler.last_epoch == minibatches  # one scheduler step per optimiser update
    assert trainer.optimizer.state[trainer.params[0]]["step"] == minibatches


def test_nft_per_sample_levels_give_each_sample_its_own_levels(tmp_path, monkeypatch):
    levels_seen = {}
    for mode in ("false", "true"):
        trainer = _trainer("diffusion_nft", tmp_path / mode, f"diffusion_nft.per_sample_levels={mode}")
        calls = []
        original = type(trainer.model).velocity

        def spy(
            self, x, sigma, cond, guidance_scale=1.0, *, detach_uncond=False, _orig=original, _calls=calls
        ):
            if torch.is_grad_enabled():
                _calls.append(torch.as_tensor(sigma).detach().clone())
            return _orig(self, x, sigma, cond, guidance_scale, detach_uncond=detach_uncond)

        monkeypatch.setattr(type(trainer.model), "velocity", spy)
        trainer.train_step(0)
        monkeypatch.setattr(type(trainer.model), "velocity", original)
        levels_seen[mode] = calls
    shared = levels_seen["false"]
    # shared: every call trains one level for the whole micro-batch; all levels but one appear
    assert all(bool((c == c[0]).all()) for c in shared)
    per_sample = levels_seen["true"]
    assert any(not bool((c == c[0]).all()) for c in per_sample)
    # per sample: each sample still trains k distinct levels (a permutation's prefix)
    n_levels = len(shared) // 2  # two micro-batches of 4 (8 samples, train_batch_size 4)
    by_sample = torch.stack(per_sample[:n_levels], 1)  # (4, k) first micro-batch
    for row in by_sample:
        assert row.unique().numel() == n_levels


# ---------------------------------------------------------------------------------------------- Flow-GRPO


def test_reference_kl_is_the_step_kl_times_dt_with_the_reference_sigma(tmp_path):
    from diffrl.samplers import sde_step
    from diffrl.trainers.objectives import flow_grpo_reference_kl, gaussian_kl

    trainer = _trainer("flow_grpo", tmp_path, "flow_grpo.kl_scale=reference")
    sigmas = trainer.model.schedule(4, 32, 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 4, 4, generator=gen)
    for k in range(3):
        v, v_ref = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
        out = sde_step(x, v, sigmas[k], sigmas[k + 1], 0.7, prev_sample=x)
        ref = sde_step(x, v_ref, sigmas[k], sigmas[k + 1], 0.7, prev_sample=x)
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        sigma_t = 0.7 * math.sqrt(s / (1 - (s_next if s >= 1 else s)))  # the reference's std_dev_t
        by_hand = ((out.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * sigma_t**2)
        torch.testing.assert_close(trainer._kl(out, ref, sigmas, k), by_hand, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            flow_grpo_reference_kl(out.mean, ref.mean, torch.tensor(sigma_t)),
            gaussian_kl(out.mean, ref.mean, out.std) * (s - s_next),
            rtol=1e-5,
            atol=0,
        )
    exact = _trainer("flow_grpo", tmp_path / "exact", "flow_grpo.kl_scale=exact")
    torch.testing.assert_close(exact._kl(out, ref, sigmas, 2), gaussian_kl(out.mean, ref.mean, out.std))


def test_cfg_grad_cond_trains_only_the_conditional_branch(tmp_path):
    # v = u + w (c - u): with the unconditional prediction u detached the gradient is w * dc; the value is the same
    trainer = _trainer("flow_grpo", tmp_path)
    _randomise_lora(trainer)
    model, w = trainer.model, 3.0
    cond = model.encode(["a red square", "two circles"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *model.latent_shape(32, 32), generator=gen)
    probe = torch.randn(x.shape, generator=gen)
    sig = torch.tensor([0.7, 0.4])

    def grads(fn):
        for p in trainer.params:
            p.grad = None
        out = fn()
        (out.float() * probe).sum().backward()
        return out.detach(), [p.grad.clone() for p in trainer.params]

    v_det, g_det = grads(lambda: model.velocity(x, sig, cond, w, detach_uncond=True))
    v_full, g_full = grads(lambda: model.velocity(x, sig, cond, w))
    _, g_cond = grads(lambda: model.velocity(x, sig, cond, 1.0))  # the conditional prediction alone
    torch.testing.assert_close(v_det, v_full, rtol=0, atol=0)
    for a, c in zip(g_det, g_cond, strict=True):
        # one batched CFG forward against one conditional forward: equal up to float32 rounding of the sums
        torch.testing.assert_close(a, w * c, rtol=1e-4, atol=1e-5 * float((w * c).abs().max()))
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(g_det, g_full, strict=True))


def test_two_minibatches_make_two_updates_the_second_off_policy(tmp_path):
    trainer = _trainer(
        "flow_grpo",
        tmp_path,
        "flow_grpo.num_minibatches=2",
        "flow_grpo.kl_beta=0.0",
        "flow_grpo.clip_range=1e-6",
    )
    metrics = trainer.train_step(0)
    assert metrics["train/updates"] == 2.0
    assert trainer.scheduler.last_epoch == 2 and trainer.optimizer.state[trainer.params[0]]["step"] == 2
    # the first half's ratios are exactly 1; the second half is sampled by the policy before the first update
    assert metrics["train/ratio_mean"] != 1.0 and metrics["train/approx_kl"] > 0
    assert metrics["train/clipfrac"] > 0


def test_the_lr_schedule_counts_minibatch_updates(tmp_path):
    trainer = _trainer(
        "flow_grpo",
        tmp_path,
        "max_steps=2",
        "flow_grpo.num_minibatches=2",
        "optim.lr_scheduler=linear",
        "optim.lr=1e-3",
    )
    assert trainer.train_step(0)["train/lr"] == pytest.approx(5e-4)  # 2 of 4 updates done


def _group_constant_reward(images, prompts, **_):
    """Equal rewards for every image of the first tiny prompt's group, distinct ones elsewhere."""
    scores = images.float().mean(dim=(1, 2, 3))
    first = prompts[0]
    return torch.where(torch.tensor([p == first for p in prompts]), torch.zeros_like(scores), scores)


def test_drop_zero_advantage_leaves_out_exactly_the_zero_advantage_samples(tmp_path):
    # with one group of equal rewards, the samples with advantage exactly 0 are that group's: dropping them is
    # the same update as dropping the group (dynamic sampling), and unlike keeping them
    weights, logged = {}, {}
    for name, extra in {
        "drop": ["flow_grpo.drop_zero_advantage=true"],
        "dynamic": ["flow_grpo.dynamic_sampling=true"],
        "keep": [],
    }.items():
        trainer = _trainer(
            "flow_grpo", tmp_path / name, "flow_grpo.kl_beta=0.0", *extra, reward=_group_constant_reward
        )
        logged[name] = trainer.train_step(0)
        weights[name] = [p.detach().clone() for p in trainer.params]
    assert logged["keep"]["sample/zero_adv_frac"] == 0.5
    for a, b in zip(weights["drop"], weights["dynamic"], strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(weights["drop"], weights["keep"], strict=True))


def test_recomputed_old_logp_makes_the_first_ratio_exactly_one_in_bf16(tmp_path):
    # rollout chunks of 8 and training micro-batches of 3: bf16 forwards of other shapes differ in the last bits;
    # the recomputed old log-probs come from the training shapes, so the first update is exactly on-policy
    trainer = _trainer(
        "flow_grpo",
        tmp_path,
        "model.dtype=bfloat16",
        "optim.train_batch_size=3",
        "flow_grpo.old_logp=recompute",
        "flow_grpo.kl_beta=0.0",
    )
    _randomise_lora(trainer)
    metrics = trainer.train_step(0)
    assert metrics["train/ratio_mean"] == 1.0 and metrics["train/clipfrac"] == 0.0
    assert metrics["train/approx_kl"] == 0.0
    assert math.isfinite(metrics["train/old_logp_max_diff"])


def test_recompute_in_float32_agrees_with_the_rollout(tmp_path):
    trainer = _trainer("flow_grpo", tmp_path, "flow_grpo.old_logp=recompute")
    metrics = trainer.train_step(0)
    assert metrics["train/old_logp_max_diff"] < 1e-5
    assert metrics["train/ratio_mean"] == 1.0


def test_old_checkpoints_without_the_kl_scale_field_are_not_resumed_under_the_new_default():
    saved = config_to_dict(load_config(PRESET["flow_grpo"], [f"data.train={PROMPTS}"]))
    del saved["flow_grpo"]["kl_scale"]  # written before the field existed: it ran with the exact KL
    current = load_config(PRESET["flow_grpo"], [f"data.train={PROMPTS}"])
    assert resume_mismatch(saved, current) == ("flow_grpo.kl_scale", '"exact"', '"reference"')
    current = load_config(PRESET["flow_grpo"], [f"data.train={PROMPTS}", "flow_grpo.kl_scale=exact"])
    del saved["flow_grpo"]["cfg_grad"]
    assert resume_mismatch(saved, current) == ("flow_grpo.cfg_grad", '"full"', '"cond"')
    assert TrainConfig().flow_grpo.kl_scale == "reference"


# ---------------------------------------------------------------------------------------------- shared options


def test_ema_warmup_and_interval_follow_the_reference_formula(tmp_path):
    trainer = _trainer(
        "diffusion_nft",
        tmp_path,
        "ema_decay=0.9",
        "ema_warmup=true",
        "ema_every=2",
        "diffusion_nft.num_minibatches=2",
        "optim.lr=1e-30",  # the updates leave the trained weights as they are: only the EMA moves
    )
    init = [e.clone() for e in trainer.ema]
    with torch.no_grad():  # trained weights away from the EMA, so an EMA update is visible
        for p in trainer.params:
            p.add_(1.0)
    targets = [p.detach().clone() for p in trainer.params]
    trainer.train_step(0)  # updates u = 1 (applied: (1 + 1) % 2 == 0, d = 2/11) and u = 2 (skipped)
    d = min(0.9, 2 / 11)
    for e, i, t in zip(trainer.ema, init, targets, strict=True):
        torch.testing.assert_close(e, d * i + (1 - d) * t, rtol=1e-6, atol=1e-7)


def test_vae_decodes_in_float32_by_default_and_in_the_model_dtype_on_request(tmp_path):
    assert _trainer("diffusion_nft", tmp_path / "a", "model.dtype=bfloat16").model.vae.dtype == torch.float32
    model_dtype = _trainer("diffusion_nft", tmp_path / "b", "model.dtype=bfloat16", "model.vae_dtype=model")
    assert model_dtype.model.vae.dtype == torch.bfloat16


def test_max_sequence_length_sets_the_t5_tokens(tmp_path):
    default = _trainer("flow_grpo", tmp_path / "a")
    short = _trainer("flow_grpo", tmp_path / "b", "model.max_sequence_length=128")
    assert default.model.max_sequence_length == 256 and short.model.max_sequence_length == 128
    n_default = default.model.encode(["a red square"]).prompt_embeds.shape[1]
    n_short = short.model.encode(["a red square"]).prompt_embeds.shape[1]
    assert n_default - n_short == 128


def test_refl_grad_guidance_scale_sets_the_cfg_of_the_grad_steps(tmp_path, monkeypatch):
    trainer = _trainer("refl", tmp_path, "refl.grad_guidance_scale=1.0", "sample.guidance_scale=3.0")
    seen = []
    original = type(trainer.model).velocity

    def spy(self, x, sigma, cond, guidance_scale=1.0, *, detach_uncond=False):
        seen.append((torch.is_grad_enabled(), guidance_scale))
        return original(self, x, sigma, cond, guidance_scale, detach_uncond=detach_uncond)

    monkeypatch.setattr(type(trainer.model), "velocity", spy)
    trainer.train_step(0)
    assert {g for grad, g in seen if grad} == {1.0}
    assert {g for grad, g in seen if not grad} == {3.0}


def test_new_options_are_refused_with_one_sentence():
    from diffrl.config import ConfigError

    cases = [
        (["flow_grpo.kl_scale=paper"], "flow_grpo.kl_scale='paper' must be reference or exact"),
        (["flow_grpo.cfg_grad=both"], "flow_grpo.cfg_grad='both' must be cond or full"),
        (["flow_grpo.old_logp=fresh"], "flow_grpo.old_logp='fresh' must be rollout or recompute"),
        (["flow_grpo.num_minibatches=0"], "flow_grpo.num_minibatches=0 must be between 1 and the 8 images"),
        (["model.vae_dtype=bf16"], "model.vae_dtype='bf16' must be float32 or model"),
        (["ema_every=0"], "ema_every=0 must be at least 1"),
        (["fsdp=true", "flow_grpo.drop_zero_advantage=true"], "drop_zero_advantage=true gives the processes"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(PRESET["flow_grpo"], [f"data.train={PROMPTS}", *overrides])


def test_resolved_config_records_the_new_fields(tmp_path):
    trainer = _trainer("flow_grpo", tmp_path, "max_steps=1")
    trainer.train()
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert saved["flow_grpo"]["kl_scale"] == "reference" and saved["model"]["vae_dtype"] == "float32"


def test_gaussian_lora_init_draws_a_from_the_reference_normal(tmp_path):
    trainer = _trainer(
        "flow_grpo", tmp_path, "model.lora_init=gaussian", "model.lora_rank=8", "model.lora_alpha=16"
    )
    a = torch.cat(
        [
            p.detach().flatten()
            for n, p in zip(trainer.param_names, trainer.params, strict=True)
            if "lora_A" in n
        ]
    )
    b = [p for n, p in zip(trainer.param_names, trainer.params, strict=True) if "lora_B" in n]
    assert all(bool((p == 0).all()) for p in b)  # the adapted model starts as the base model
    assert a.std().item() == pytest.approx(1 / 8, rel=0.05)  # PEFT's "gaussian": N(0, 1/r)


def test_the_evaluation_picture_captions_every_image_and_marks_pass_fail(tmp_path):
    from PIL import Image

    from diffrl.trainers.eval_grid import _pass_fail, save_eval_grid

    images = torch.rand(5, 3, 16, 16)
    comps = {
        "verifier": torch.tensor([0.5, 1.0, 0.2, 0.7, 0.0]),
        "accuracy": torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]),
    }
    assert _pass_fail(comps)[0] == "accuracy"  # the first 0/1 component decides the frames
    assert _pass_fail({"verifier": comps["verifier"]}) is None
    path = save_eval_grid(
        images, [f"prompt {i}" for i in range(5)], comps, tmp_path / "eval" / "step.png", "title"
    )
    with Image.open(path) as picture:
        assert picture.size[0] > 300 and picture.size[1] > 200
        colours = dict((c, k) for k, c in picture.convert("RGB").getcolors(1 << 20))
    # two passes framed green, three fails framed red: frames of equal size, so the pixel counts are 2 : 3
    green, red = colours[(44, 160, 44)], colours[(214, 39, 40)]
    assert green > 0 and green * 3 == red * 2
