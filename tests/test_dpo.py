"""Diffusion-DPO (``algorithm: dpo``): the loss against hand-computed values and the paper's form, the start at
log 2 with the analytic gradient, online pairs from hand-made rewards, the offline data (JSONL, Pick-a-Pic rows,
the latent cache), the config checks, and a slow learning run on the toy world."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrl.config import ConfigError, load_config, validate
from diffrl.train import build_trainer
from diffrl.trainers.objectives import flow_dpo_loss, preference_pairs
from diffrl.trainers.preferences import pickapic_rows, read_preference_rows

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "dpo.yaml"
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")


pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")


def _overrides(out, *extra):
    return [f"output_dir={out}", f"data.train={PROMPTS}", "data.eval_size=0", *extra]


# ---------------------------------------------------------------------------------------------- the loss


def test_flow_dpo_loss_matches_a_hand_computed_pair():
    # eps = (1, 1). Chosen x0 = (0, 0): target (1, 1); the model predicts (1, 0): error mean(0, 1) = 0.5; the
    # reference predicts (1, 1): error 0. Rejected x0 = (1, 1): target (0, 0); model (0, 0): 0; reference (1, 0): 0.5.
    # z = -(beta / 2) * ((0.5 - 0) - (0 - 0.5)) = -beta / 2 = -0.25 for beta = 0.5; loss = log(1 + e^0.25).
    eps = torch.tensor([[1.0, 1.0]])
    stats = flow_dpo_loss(
        v_chosen=torch.tensor([[1.0, 0.0]]),
        v_rejected=torch.tensor([[0.0, 0.0]]),
        ref_chosen=torch.tensor([[1.0, 1.0]]),
        ref_rejected=torch.tensor([[1.0, 0.0]]),
        x0_chosen=torch.tensor([[0.0, 0.0]]),
        x0_rejected=torch.tensor([[1.0, 1.0]]),
        eps=eps,
        beta=0.5,
    )
    assert stats.z.item() == -0.25
    assert stats.loss.item() == pytest.approx(math.log(1 + math.exp(0.25)), rel=1e-7)  # 0.8259394
    assert stats.model_err_chosen.item() == 0.5 and stats.ref_err_rejected.item() == 0.5
    assert stats.model_err_rejected.item() == 0.0 and stats.ref_err_chosen.item() == 0.0


def test_flow_dpo_loss_is_the_papers_form_with_summed_errors():
    # Wallace et al. eq. 14: -log sigmoid(-c * (||t_w - v_w||^2 - ||t_w - r_w||^2 - (||t_l - v_l||^2 - ||t_l - r_l||^2)))
    # with c = beta T w(lambda_t) and squared norms summed; diffrl's means over D dimensions are c = beta / (2 D).
    g = torch.Generator().manual_seed(0)
    shape = (5, 4, 3, 3)
    v_w, v_l, r_w, r_l, x_w, x_l, eps = (
        torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(7)
    )
    beta = 7.0
    stats = flow_dpo_loss(v_w, v_l, r_w, r_l, x_w, x_l, eps, beta)
    D = 4 * 3 * 3

    def sq(a, b):
        return ((a - b) ** 2).sum(dim=(1, 2, 3))

    t_w, t_l = eps - x_w, eps - x_l
    inner = sq(t_w, v_w) - sq(t_w, r_w) - (sq(t_l, v_l) - sq(t_l, r_l))
    paper = -torch.nn.functional.logsigmoid(-(beta / (2 * D)) * inner)
    torch.testing.assert_close(stats.loss.double(), paper, rtol=1e-5, atol=1e-6)
    # the DPO form: z is the chosen implicit reward minus the rejected one, r = -(beta / 2) (e_theta - e_ref)
    r_chosen = -beta / 2 * (stats.model_err_chosen - stats.ref_err_chosen)
    r_rejected = -beta / 2 * (stats.model_err_rejected - stats.ref_err_rejected)
    torch.testing.assert_close(stats.z, r_chosen - r_rejected)
    assert stats.loss.dtype == torch.float32  # float32 whatever the inputs


def test_at_the_reference_the_loss_is_log2_and_the_gradient_is_analytic():
    # v_theta = v_ref: z = 0, loss = log 2 exactly; dL/dz = -1/2, so dL/dv_w = (beta / (2 D)) (v_w - t_w) and
    # dL/dv_l = -(beta / (2 D)) (v_l - t_l) per pair (divided by P for the mean over P pairs)
    g = torch.Generator().manual_seed(1)
    shape = (3, 4, 2, 2)
    x_w, x_l, eps, ref_w, ref_l = (torch.randn(shape, generator=g) for _ in range(5))
    v_w, v_l = ref_w.clone().requires_grad_(True), ref_l.clone().requires_grad_(True)
    beta, D, P = 100.0, 16, 3
    stats = flow_dpo_loss(v_w, v_l, ref_w, ref_l, x_w, x_l, eps, beta)
    assert torch.equal(stats.z, torch.zeros(P))
    assert torch.equal(stats.loss, torch.full((P,), math.log(2), dtype=torch.float32))
    stats.loss.mean().backward()
    torch.testing.assert_close(v_w.grad, beta / (2 * D) * (ref_w - (eps - x_w)) / P)
    torch.testing.assert_close(v_l.grad, -beta / (2 * D) * (ref_l - (eps - x_l)) / P)


def test_flow_dpo_loss_refuses_mismatched_shapes_and_bad_beta():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must share one shape"):
        flow_dpo_loss(a, a, a, a, a, a, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="beta=0.0 must be positive"):
        flow_dpo_loss(a, a, a, a, a, a, a, 0.0)


# ---------------------------------------------------------------------------------------------- encoding


def test_encode_images_inverts_decode_on_the_toy_model():
    # the shipped toy VAE is trained: decode(encode(x)) reconstructs a rendered scene to about 1% per pixel, where the
    # image's own mean deviation from grey is about 0.44
    from diffrl.models import load_model
    from diffrl.toy.scenes import sample_scene

    model = load_model("toy")
    x = torch.stack([sample_scene(np.random.default_rng(i), image_size=64)["image"] for i in range(2)])
    z = model.encode_images(x)
    assert z.shape == (2, *model.latent_shape(64, 64)) and z.dtype == torch.float32
    with torch.no_grad():
        assert float((model.decode(z) - x).abs().mean()) < 0.03


def test_an_adapter_with_its_own_decode_must_encode_its_own_way():
    from diffrl.models.base import FlowModel

    class OtherVAE(FlowModel):
        def __init__(self):  # no pipeline needed to reach the check
            pass

        def decode(self, latents):
            return latents

    with pytest.raises(
        NotImplementedError, match="OtherVAE decodes latents its own way and has no encode_images"
    ):
        OtherVAE().encode_images(torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- online pairs


def test_preference_pairs_from_hand_made_rewards():
    rewards = torch.tensor([0.1, 0.5, 0.3, 0.2, 0.2, 0.2])
    groups = torch.tensor([4, 4, 4, 9, 9, 9])
    chosen, rejected, valid = preference_pairs(rewards, groups)
    assert chosen.tolist() == [1, 3] and rejected.tolist() == [0, 3]
    assert valid.tolist() == [True, False]  # the second group is all ties: no preference
    chosen, rejected, valid = preference_pairs(rewards, groups, mode="all", min_margin=0.15)
    assert list(zip(chosen.tolist(), rejected.tolist(), strict=True)) == [
        (1, 0),
        (2, 0),
        (1, 2),
        (3, 4),
        (3, 5),
        (4, 5),
    ]
    assert valid.tolist() == [True, True, True, False, False, False]  # gaps 0.4, 0.2, 0.2; ties
    _, _, valid = preference_pairs(rewards, groups, mode="all", min_margin=0.25)
    assert valid.tolist() == [True, False, False, False, False, False]
    with pytest.raises(ValueError, match="mode='best' is not known"):
        preference_pairs(rewards, groups, mode="best")


def test_online_step_pairs_the_best_and_worst_image_of_each_group_and_starts_at_log2(tmp_path):
    # 2 prompts x 4 images; hand-made rewards: the first group's best is row 1 and worst row 0, the second is a tie
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2])
    seen = []

    def reward(images, prompts, **metadata):
        seen.append(images.detach().clone())
        return scores[: images.shape[0]].clone()

    trainer = build_trainer(PRESET, _overrides(tmp_path, "max_steps=1"), reward=reward)
    metrics = trainer.train_step(0)
    prompts, x_w, x_l, valid, metadata = trainer.buffer
    assert valid.tolist() == [True, False] and len(prompts) == 2 and metadata == {}
    images = seen[0]
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.decode(x_w[:1]), images[1:2], rtol=0, atol=1e-5)
        torch.testing.assert_close(trainer.model.decode(x_l[:1]), images[0:1], rtol=0, atol=1e-5)
    # the adapter starts as the reference: the loss is exactly log 2, the margin 0, on the one valid pair
    assert metrics["train/loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["train/reward_margin"] == 0.0 and metrics["train/implicit_acc"] == 0.0
    assert metrics["train/num_pairs"] == 1.0 and metrics["sample/pair_frac"] == 0.5
    assert metrics["sample/pair_reward_gap"] == pytest.approx(0.8, rel=1e-6)
    assert metrics["train/model_err_chosen"] == metrics["train/ref_err_chosen"] > 0


def test_online_rollouts_from_the_reference_with_sde_steps_as_the_flow_grpo_script(tmp_path, monkeypatch):
    """dpo.rollout_policy=reference samples with the LoRA adapter off (the Flow-GRPO DPO script samples with its
    never-updated reference adapter), and dpo.sampler=sde with Flow-GRPO's SDE step on every step, each image's
    noise from its own generator (one image at a time gives the same images as the whole batch)."""
    import diffrl.trainers.dpo as dpo_module

    seen = []
    real = dpo_module.rollout

    def recording(model, cond, sigmas, noise, **kw):
        out = real(model, cond, sigmas, noise, **kw)
        seen.append(dict(kw=kw, cond=cond, sigmas=sigmas, noise=noise, final=out.final))
        return out

    monkeypatch.setattr(dpo_module, "rollout", recording)

    def scores(images, prompts, **metadata):
        return images.float().mean(dim=(1, 2, 3))

    def first_round(name, *extra):
        seen.clear()
        trainer = build_trainer(PRESET, _overrides(tmp_path / name, "max_steps=1", *extra), reward=scores)
        with torch.no_grad():  # a LoRA that changes the images (B != 0)
            for p in trainer.params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trainer.online_round({})
        return trainer, torch.cat([c["final"] for c in seen]), list(seen)

    _, current, calls = first_round("current")
    assert "sampler" not in calls[0]["kw"]
    trainer, reference, calls = first_round("reference", "dpo.rollout_policy=reference")
    # the same images as the base model's, sampled by hand with the adapter switched off
    with torch.no_grad(), trainer.model.disable_adapter():
        base = torch.cat(
            [
                real(
                    trainer.model,
                    c["cond"],
                    c["sigmas"],
                    c["noise"],
                    guidance_scale=c["kw"]["guidance_scale"],
                ).final
                for c in calls
            ]
        )
    torch.testing.assert_close(reference, base, rtol=1e-5, atol=1e-5)
    assert (reference - current).abs().max() > 1e-3
    _, sde, calls = first_round("sde", "dpo.rollout_policy=reference", "dpo.sampler=sde")
    kw = calls[0]["kw"]
    assert kw["sampler"] == "sde" and kw["noise_level"] == 0.7 and isinstance(kw["generator"], list)
    assert (sde - reference).abs().max() > 1e-2
    _, again, _ = first_round("again", "dpo.rollout_policy=reference", "dpo.sampler=sde")
    assert torch.equal(again, sde)
    _, one_by_one, calls = first_round(
        "one", "dpo.rollout_policy=reference", "dpo.sampler=sde", "sample.batch_size=1"
    )
    assert len(calls) == len(sde)
    torch.testing.assert_close(one_by_one, sde, rtol=1e-4, atol=1e-4)


def test_the_reference_catches_up_with_the_policy_every_ref_update_every_steps(tmp_path):
    """dpo.ref_update_every=2 (the Flow-GRPO script's ref_update_step): at steps 0 and 2 the reference is a copy of
    the trained adapter, so the loss is exactly log 2 and the margin 0; at steps 1 and 3, and at step 2 without the
    copy, the policy has moved away from its reference."""

    def reward(images, prompts, **metadata):
        return images.float().mean(dim=(1, 2, 3))

    def losses(name, *extra):
        trainer = build_trainer(PRESET, _overrides(tmp_path / name, "max_steps=4", *extra), reward=reward)
        out = []
        for step in range(4):
            trainer.step = step
            out.append(trainer.train_step(step))
        return trainer, out

    trainer, with_copy = losses("copy", "dpo.ref_update_every=2")
    assert [m.get("train/ref_updated", 0.0) for m in with_copy] == [0.0, 0.0, 1.0, 0.0]
    for step in (0, 2):
        assert with_copy[step]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert with_copy[step]["train/reward_margin"] == pytest.approx(0.0, abs=1e-6)
    for step in (1, 3):
        assert abs(with_copy[step]["train/loss"] - math.log(2)) > 1e-4
    # the reference adapter holds the weights of the start of step 2, not the trained ones after step 3
    assert any(not torch.equal(r, p) for r, p in zip(trainer.ref_params, trainer.params, strict=True))
    _, without = losses("base")
    assert abs(without[2]["train/loss"] - math.log(2)) > 1e-4
    # until the first copy the reference is the base model (the LoRA starts at B = 0)
    assert without[0]["train/loss"] == with_copy[0]["train/loss"]
    assert without[1]["train/loss"] == pytest.approx(with_copy[1]["train/loss"], rel=1e-6)


def test_a_resume_between_two_copies_trains_against_the_saved_reference(tmp_path):
    """ref_update_every=2, a checkpoint after 3 steps (the reference copied at step 2), resumed to 4: step 3 trains
    against the checkpoint's reference adapter, and the weights and the reference equal a 4-step run's bit for bit."""
    from safetensors.torch import load_file

    def reward(images, prompts, **metadata):
        return images.float().mean(dim=(1, 2, 3))

    base = ["dpo.ref_update_every=2", "checkpointing_steps=3"]
    build_trainer(PRESET, _overrides(tmp_path / "full", *base, "max_steps=4"), reward=reward).train()
    build_trainer(PRESET, _overrides(tmp_path / "half", *base, "max_steps=3"), reward=reward).train()
    resumed = build_trainer(
        PRESET,
        _overrides(tmp_path / "half", *base, "max_steps=4", "resume_from_checkpoint=latest"),
        reward=reward,
    )
    resumed.train()
    # no copy at step 3: the reference is still the checkpoint's (the copy of step 2)
    saved = load_file(str(tmp_path / "half" / "checkpoint-000003" / "extra.safetensors"))
    assert len([k for k in saved if k.startswith("dpo_ref.")]) == len(resumed.ref_params) > 0
    for name, r in zip(resumed.param_names, resumed.ref_params, strict=True):
        assert torch.equal(r, saved[f"dpo_ref.{name}"]), name
    full = build_trainer(PRESET, _overrides(tmp_path / "again", *base, "max_steps=4"), reward=reward)
    full.train()
    for name, a, b in zip(full.param_names, full.ref_params, resumed.ref_params, strict=True):
        assert torch.equal(a, b), name
    a, b = (
        load_file(str(tmp_path / run / "lora" / "pytorch_lora_weights.safetensors"))
        for run in ("full", "half")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_without_any_preference_makes_no_update(tmp_path):
    def flat(images, prompts, **metadata):
        return torch.zeros(images.shape[0])

    trainer = build_trainer(PRESET, _overrides(tmp_path, "max_steps=1"), reward=flat)
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step(0)
    assert metrics["train/num_pairs"] == 0.0 and metrics["train/skipped"] == 0.0
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))


# ---------------------------------------------------------------------------------------------- offline data


def _png(path: Path, color, size=(40, 48)) -> Path:
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


def _jpeg_bytes(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG")
    return buf.getvalue()


def _preference_file(folder: Path) -> Path:
    """Three pairs: images of two sizes, and one pair given as latents (a .safetensors and a .pt file)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _png(folder / "red.png", (230, 20, 20))
    _png(folder / "blue.png", (20, 20, 230), size=(64, 32))
    _png(folder / "green.png", (20, 200, 20))
    g = torch.Generator().manual_seed(3)
    save_file({"latents": torch.randn(4, 4, 4, generator=g)}, str(folder / "a.safetensors"))
    torch.save(torch.randn(4, 4, 4, generator=g), folder / "b.pt")
    rows = [
        {"prompt": "a red square", "chosen": "red.png", "rejected": "blue.png"},
        {"prompt": "a blue square", "chosen": "blue.png", "rejected": "green.png"},
        {"prompt": "a green square", "chosen": "a.safetensors", "rejected": "b.pt"},
    ]
    path = folder / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_offline_pairs_are_encoded_once_and_read_from_the_cache(tmp_path, monkeypatch):
    data = _preference_file(tmp_path / "data")
    base = ["dpo.mode=offline", f"dpo.dataset={data}", "dpo.pairs_per_step=2"]
    extra = [*base, "sample.height=16", "sample.width=16"]
    first = build_trainer(PRESET, _overrides(tmp_path / "run", *extra, "max_steps=2"))
    pairs = first.pairs
    assert not pairs.from_cache and pairs.cache_path.parent == tmp_path / "run" and pairs.cache_path.is_file()
    assert pairs.chosen.shape == (3, 4, 4, 4) and pairs.prompts[0] == "a red square"
    # the image rows are the VAE encoding of the resized, centre-cropped images; latent files are taken as they are
    from safetensors.torch import load_file

    from diffrl.trainers.preferences import _load_image

    expected = first.model.encode_images(torch.stack([_load_image(data.parent / "blue.png", 16, 16)]))
    torch.testing.assert_close(pairs.rejected[0:1], expected.cpu())
    torch.testing.assert_close(pairs.chosen[2], load_file(str(data.parent / "a.safetensors"))["latents"])
    torch.testing.assert_close(pairs.rejected[2], torch.load(data.parent / "b.pt"))
    first.train()
    # a resumed run (and any run with the same cache) reads the cache: encoding would fail here
    import diffrl.models.base as models_base

    def no_encoding(self, images):
        raise AssertionError("the preference images were encoded again")

    monkeypatch.setattr(models_base.FlowModel, "encode_images", no_encoding)
    resumed = build_trainer(
        PRESET, _overrides(tmp_path / "run", *extra, "max_steps=3", "resume_from_checkpoint=latest")
    )
    assert resumed.pairs.from_cache and resumed.pairs.cache_path == pairs.cache_path
    assert torch.equal(resumed.pairs.chosen, pairs.chosen) and torch.equal(
        resumed.pairs.rejected, pairs.rejected
    )
    resumed.train()  # a second epoch (slots 4-5 of 3 pairs): no encoding
    # another image size is another fingerprint (and latent files must have the model's latent shape)
    from diffrl.trainers.preferences import preference_fingerprint

    rows = read_preference_rows(str(data))
    assert preference_fingerprint(rows, 16, 16, first.model.vae) != preference_fingerprint(
        rows, 32, 32, first.model.vae
    )
    with pytest.raises(
        ValueError, match=r"a.safetensors holds latents of shape \(4, 4, 4\), and this model makes"
    ):
        build_trainer(PRESET, _overrides(tmp_path / "other", *base, f"dpo.cache_dir={tmp_path / 'run'}"))


def test_offline_epochs_visit_every_pair_once_in_a_new_order(tmp_path):
    data = _preference_file(tmp_path / "data")
    trainer = build_trainer(
        PRESET,
        _overrides(tmp_path / "run", "dpo.mode=offline", f"dpo.dataset={data}", "dpo.pairs_per_step=1")
        + ["sample.height=16", "sample.width=16"],
    )
    seen = [trainer.offline_batch(step)[0][0] for step in range(6)]
    assert sorted(seen[:3]) == sorted(seen[3:]) == ["a blue square", "a green square", "a red square"]


def test_offline_resume_is_bitwise_identical(tmp_path):
    """Offline DPO over 3 pairs, 2 a step: 4 steps in one go against 2 steps, then a resume to 4 (the resume lands
    in the second epoch's order, and reads the latent cache): the same trained weights, bit for bit."""
    from safetensors.torch import load_file

    data = _preference_file(tmp_path / "data")
    base = [
        "dpo.mode=offline",
        f"dpo.dataset={data}",
        "dpo.pairs_per_step=2",
        "sample.height=16",
        "sample.width=16",
        "checkpointing_steps=2",
    ]
    build_trainer(PRESET, _overrides(tmp_path / "full", *base, "max_steps=4")).train()
    build_trainer(PRESET, _overrides(tmp_path / "half", *base, "max_steps=2")).train()
    resumed = build_trainer(
        PRESET, _overrides(tmp_path / "half", *base, "max_steps=4", "resume_from_checkpoint=latest")
    )
    assert resumed.pairs.from_cache
    resumed.train()
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]  # the resumed run continued from step 2
    a, b = (
        load_file(str(tmp_path / run / "checkpoint-000004" / "trainable.safetensors"))
        for run in ("full", "half")
    )
    two = load_file(str(tmp_path / "half" / "checkpoint-000002" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], two[k]) for k in a)  # steps 3-4 trained
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_preference_jsonl_errors_name_the_line_and_the_fix(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x", "chosen": "missing.png", "rejected": "missing.png"}\n')
    with pytest.raises(
        FileNotFoundError, match=r"line 1: chosen=missing.png is not a file \(paths are relative"
    ):
        read_preference_rows(str(path))
    path.write_text('{"prompt": "x", "chosen": "a.png"}\n')
    with pytest.raises(ValueError, match="line 1 has no rejected field"):
        read_preference_rows(str(path))
    with pytest.raises(FileNotFoundError, match="dpo.dataset=.*nope.jsonl does not exist"):
        read_preference_rows(str(tmp_path / "nope.jsonl"))


def test_pickapic_rows_follow_label_0_and_skip_ties():
    red, blue, green = (_jpeg_bytes(c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    rows = [
        {"caption": "one", "jpg_0": red, "jpg_1": blue, "label_0": 1},
        {"caption": "tie", "jpg_0": red, "jpg_1": green, "label_0": 0.5},
        {"caption": "two", "jpg_0": {"bytes": green, "path": None}, "jpg_1": blue, "label_0": 0.0},
    ]
    pairs = pickapic_rows(rows)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("one", red, blue), ("two", blue, green)]
    with pytest.raises(ValueError, match="row 0 has no label_0 column"):
        pickapic_rows([{"caption": "x", "jpg_0": red, "jpg_1": blue}])
    with pytest.raises(ValueError, match="every label_0 is a tie"):
        pickapic_rows([rows[1]])


def test_a_pickapic_dataset_directory_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    red, blue = _jpeg_bytes((255, 0, 0)), _jpeg_bytes((0, 0, 255))
    ds = datasets.Dataset.from_dict(
        {
            "caption": ["a", "b", "c"],
            "jpg_0": [red, red, blue],
            "jpg_1": [blue, blue, red],
            "label_0": [1, 0.5, 0],
        }
    )
    ds.save_to_disk(str(tmp_path / "pick"))
    pairs = read_preference_rows(str(tmp_path / "pick"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("a", red, blue), ("c", red, blue)]


def _png_bytes(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def test_a_pickapic_parquet_file_trains_one_offline_step_with_pairs_in_label_0_order(tmp_path):
    """Pick-a-Pic's columns in a local .parquet file (PNG bytes): label_0 = 1 keeps jpg_0 as the chosen image, 0
    swaps the two, the 0.5 tie is dropped; the pairs' latents are the VAE encodings of the chosen and rejected images
    in that order, and one offline step trains on all three pairs."""
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from diffrl.trainers.preferences import _load_image

    red, blue, green, white = (
        _png_bytes(c) for c in ((230, 20, 20), (20, 20, 230), (20, 200, 20), (250,) * 3)
    )
    table = pa.table(
        {
            "caption": ["red", "green", "tie", "white"],
            "jpg_0": [red, blue, red, white],
            "jpg_1": [blue, green, green, red],
            "label_0": [1.0, 0.0, 0.5, 1.0],
        }
    )
    path = tmp_path / "pick.parquet"
    pq.write_table(table, path)
    out = tmp_path / "run"
    trainer = build_trainer(
        PRESET,
        _overrides(
            out,
            "dpo.mode=offline",
            f"dpo.dataset={path}",
            "dpo.pairs_per_step=3",
            "max_steps=1",
            "checkpointing_steps=0",
            "sample.height=16",
            "sample.width=16",
        ),
    )
    pairs = trainer.pairs
    assert pairs.prompts == ["red", "green", "white"]

    def encoded(items):
        return trainer.model.encode_images(torch.stack([_load_image(b, 16, 16) for b in items])).cpu()

    torch.testing.assert_close(pairs.chosen, encoded([red, green, white]))
    torch.testing.assert_close(pairs.rejected, encoded([blue, blue, red]))
    assert (pairs.chosen - pairs.rejected).abs().amax(dim=(1, 2, 3)).min() > 0.1  # the order is visible
    before = [p.detach().clone() for p in trainer.params]
    trainer.train()
    row = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line
    ][-1]
    assert row["train/num_pairs"] == 3.0 and math.isfinite(row["train/loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))


def test_without_datasets_a_dataset_directory_says_how_to_install_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    (tmp_path / "pick").mkdir()
    with pytest.raises(ImportError, match="pip install datasets"):
        read_preference_rows(str(tmp_path / "pick"))


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "extra, message",
    [
        (["dpo.mode=replay"], "dpo.mode='replay' must be online or offline"),
        (["dpo.mode=offline"], "dpo.mode=offline needs dpo.dataset"),
        (["dpo.group_size=1"], r"dpo.group_size=1 must be at least 2 \(a pair compares"),
        (["dpo.pairs=best"], "dpo.pairs='best' must be best_worst or all"),
        (["dpo.timesteps=cosine"], "dpo.timesteps='cosine' must be logit_normal or uniform"),
        (["dpo.beta=0"], r"dpo.beta=0.0 must be positive and finite"),
        (["dpo.beta=inf"], r"dpo.beta=inf must be positive and finite"),
        (["model.lora_rank=0"], r"lora_rank=0 .* no base model .*\(dpo always needs its reference"),
        (["dpo.rollout_policy=base"], "dpo.rollout_policy='base' must be current or reference"),
        (["dpo.sampler=cps"], "dpo.sampler='cps' must be ode or sde"),
        (
            ["dpo.sampler=sde", "dpo.solver=dpm2"],
            r"dpo.solver=dpm2 has no step to solve with dpo.sampler=sde",
        ),
        (
            ["dpo.noise_level=0"],
            r"dpo.noise_level=0.0 must be positive \(dpo.sampler=ode is the deterministic",
        ),
        (["dpo.ref_update_every=-1"], r"dpo.ref_update_every=-1 must be at least 0 \(0: the reference stays"),
    ],
)
def test_bad_dpo_config_values_raise_one_sentence(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESET, [f"data.train={PROMPTS}", *extra])


def test_kept_pairs_between_rounds_need_one_process():
    cfg = load_config(PRESET, [f"data.train={PROMPTS}", "dpo.online_every=2"])
    validate(cfg, 1)
    with pytest.raises(ConfigError, match=r"dpo.online_every=2 keeps each process's pairs .* has 2; set"):
        validate(cfg, 2)
