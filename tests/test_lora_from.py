"""``model.lora_from``: a run whose trained LoRA starts from another LoRA (a diffusers file or a checkpoint), on the tiny
SD3 pipeline. The adapter starts as exactly that LoRA, the reference policy stays the base model, and bad inputs fail
before any model loads."""

import copy
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import diffrl.models
from diffrl.config import ConfigError
from diffrl.models.lora_files import load_lora
from diffrl.sampling import sample_images
from diffrl.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(num_steps=3, guidance_scale=4.5, height=32, width=32, seed=0)
PROMPTS = ["a red circle", "a blue square"]
TINY = [f"data.train={ROOT / 'configs/tiny/prompts.txt'}", "data.eval_size=0", "max_steps=1"]


@pytest.fixture(scope="module", autouse=True)
def setting(tmp_path_factory):
    os.environ.setdefault("DIFFRL_CACHE", str(tmp_path_factory.mktemp("diffrl-cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    return diffrl.models.load_model("tiny:sd3")


@pytest.fixture(scope="module")
def first_run(base, tmp_path_factory):
    """A one-step Flow-GRPO run with a rank-4 LoRA whose B matrices were made non-zero: its lora/ and checkpoint."""
    run = tmp_path_factory.mktemp("first")
    trainer = build_trainer(
        ROOT / "configs/tiny/flow_grpo.yaml",
        [f"output_dir={run}", *TINY, "checkpointing_steps=1", "model.lora_rank=4", "model.lora_alpha=8"],
        model=copy.deepcopy(base),
    )
    with torch.no_grad():  # a LoRA that visibly changes the images (one step at lr 1e-3 hardly does)
        gen = torch.Generator().manual_seed(0)
        for name, p in trainer.model.transformer.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    trainer.train()
    return run


def _loaded(base, lora) -> torch.Tensor:
    model = copy.deepcopy(base)
    load_lora(model, lora)
    return sample_images(model, PROMPTS, batch_size=2, **OPTS)


@pytest.mark.parametrize("source", ["lora", "checkpoint-000001"])
def test_the_trained_adapter_starts_as_the_given_lora(base, first_run, tmp_path, source):
    trainer = build_trainer(
        ROOT / "configs/tiny/diffusion_nft.yaml",
        [f"output_dir={tmp_path / 'run'}", *TINY, f"model.lora_from={first_run / source}"],
        model=copy.deepcopy(base),
    )
    model = trainer.model
    assert list(model.transformer.peft_config) == [
        "default",
        "old",
    ]  # the loaded adapter became the trained one
    cfg = model.transformer.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    expected = _loaded(base, first_run / source)
    plain = sample_images(base, PROMPTS, batch_size=2, **OPTS)
    assert (expected - plain).abs().max() > 1e-2  # the LoRA changes the images: the comparison is not vacuous
    torch.testing.assert_close(
        sample_images(model, PROMPTS, batch_size=2, **OPTS), expected, rtol=0, atol=1e-5
    )
    with model.disable_adapter():  # the reference policy is still the base model
        torch.testing.assert_close(
            sample_images(model, PROMPTS, batch_size=2, **OPTS), plain, rtol=0, atol=1e-5
        )
    # only the adapter trains, in float32; DiffusionNFT's old policy starts as the same LoRA
    names = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert names and all(".default." in n for n in names)
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert all(torch.equal(o, p) for o, p in zip(trainer.old_params, trainer.params, strict=True))
    trainer.train()
    # the run's LoRA adapts the same modules as the one it started from
    keys = []
    for lora in (first_run / "lora", tmp_path / "run" / "lora"):
        with safe_open(str(lora / "pytorch_lora_weights.safetensors"), "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1]


def test_bad_lora_from_fails_before_the_model_loads(first_run, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(diffrl.models, "load_model", refuse)
    import diffrl.models.loading as loading

    monkeypatch.setattr(loading, "load_model", refuse)
    config = ROOT / "configs/tiny/diffusion_nft.yaml"
    cases = [
        ([f"model.lora_from={tmp_path / 'nope'}"], FileNotFoundError, "does not exist"),
        (
            [f"model.lora_from={first_run / 'lora'}", "model.lora_rank=8"],
            ValueError,
            r"model.lora_rank=8 but the LoRA model.lora_from=.* has 4; leave model.lora_rank at -1",
        ),
        (
            [f"model.lora_from={first_run / 'checkpoint-000001'}", "model.lora_alpha=16"],
            ValueError,
            "model.lora_alpha=16 but the LoRA",
        ),
        (
            [f"model.lora_from={first_run / 'lora'}", "model.lora_rank=0"],
            ConfigError,
            "model.lora_rank=0 trains",
        ),
        (
            [f"model.lora_from={first_run / 'lora'}", "model.lora_targets=[to_q]"],
            ConfigError,
            "leave model.lora_targets empty",
        ),
    ]
    for overrides, error, match in cases:
        with pytest.raises(error, match=match):
            build_trainer(config, [f"output_dir={tmp_path / 'run'}", *TINY, *overrides])


def test_a_run_started_from_a_lora_resumes_bit_identically(base, first_run, tmp_path):
    from safetensors.torch import load_file

    config = ROOT / "configs/tiny/diffusion_nft.yaml"
    common = [
        f"data.train={ROOT / 'configs/tiny/prompts.txt'}",
        "data.eval_size=0",
        "checkpointing_steps=1",
        f"model.lora_from={first_run / 'lora'}",
    ]
    whole = tmp_path / "whole"
    build_trainer(config, [f"output_dir={whole}", *common, "max_steps=2"], model=copy.deepcopy(base)).train()
    split = tmp_path / "split"
    build_trainer(config, [f"output_dir={split}", *common, "max_steps=1"], model=copy.deepcopy(base)).train()
    resumed = [f"output_dir={split}", *common, "max_steps=2", "resume_from_checkpoint=latest"]
    build_trainer(config, resumed, model=copy.deepcopy(base)).train()
    a = load_file(str(whole / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "lora" / "pytorch_lora_weights.safetensors"))
    start = load_file(str(first_run / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() == start.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(
        not torch.equal(a[k], start[k]) for k in a
    )  # it trained: the comparison is not of untouched weights
