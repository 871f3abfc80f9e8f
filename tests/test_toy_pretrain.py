"""The toy-model pre-training script (``scripts/train_toy_model.py``) for a few iterations on a very small
configuration: the saved directory is a loadable SD3 pipeline and the flow-matching loss goes down."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_toy_model.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_toy_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_toy_model_script_tiny(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from diffrl.models import load_model

    out = tmp_path / "run"
    # fmt: off
    summary = _script().main([
        "--out", str(out), "--n-train", "64", "--vae-channels", "8", "16", "16", "--vae-steps", "4",
        "--vae-batch", "4", "--num-layers", "1", "--heads", "2", "--head-dim", "16", "--steps", "40",
        "--batch", "16", "--lr", "3e-3", "--warmup", "1", "--ema", "0.5", "--ckpt-every", "20", "--n-eval", "4",
        "--eval-steps", "2", "--threads", "1",
    ])
    # fmt: on
    final = out / "final"
    assert (final / "model_index.json").is_file()
    assert (out / "ckpt-20" / "model_index.json").is_file()
    assert sorted(summary["checkpoints"]) == [20, 40]
    assert 0.0 <= summary["checkpoints"][40]["eval"]["strict"] <= 1.0
    assert json.loads((out / "summary.json").read_text())["final"]["size_mb"] < 20
    loss = summary["dit_loss"]
    assert loss["last"] < loss["first"], loss

    pipe = StableDiffusion3Pipeline.from_pretrained(final, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    assert pipe.vae.config.scaling_factor != 1.0  # set from the latent statistics
    images = pipe(
        prompt="a red circle",
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 64, 64)

    model = load_model(final)
    cond = model.encode(["a red circle", "two blue squares"])
    x = model.sample_noise(2, 64, 64, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 16, 16)
    v = model.velocity(x, 0.5, cond, guidance_scale=3.0)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert model.decode(x).shape == (2, 3, 64, 64)
