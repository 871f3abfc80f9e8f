"""``diffrl sample`` / ``diffrl eval`` and the diffrl.sampling API on the tiny SD3 pipeline: files written, images
independent of the batch size, LoRA dirs and training checkpoints, reward means, early one-sentence errors."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffrl.models
from diffrl.cli import main
from diffrl.models.lora_files import load_lora, resolve_lora
from diffrl.rewards import load_reward
from diffrl.sampling import evaluate_images, evaluate_model, image_seed, sample_images, to_uint8

ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(num_steps=3, guidance_scale=4.5, height=32, width=32, seed=0)
CLI_OPTS = ["--num-steps", "3", "--height", "32", "--width", "32", "--no-progress"]
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    os.environ["DIFFRL_CACHE"] = str(tmp_path_factory.mktemp("diffrl-cache"))
    yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy machine OpenMP's waiting threads make two ten
    times slower. Restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    return diffrl.models.load_model("tiny:sd3")


@pytest.fixture
def fresh(base):
    """A private copy of the base model (loading adapters into it leaves the shared one alone)."""
    return lambda: copy.deepcopy(base)


@pytest.fixture(scope="module")
def adapted(base, tmp_path_factory):
    """A model with a random (non-zero) LoRA in memory, and that LoRA saved in the diffusers format."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    model.add_lora(rank=4)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    lora_dir = model.save_lora(tmp_path_factory.mktemp("lora"))
    return model, lora_dir


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (the error must come before any long work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(diffrl.models, "load_model", refuse)


def _png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path)))


# ---------------------------------------------------------------------------------------------- sample


def test_sample_command_writes_images_jsonl_and_grid(base, prompt_file, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "diffrl", "sample", "tiny:sd3", "--prompts", str(prompt_file), "a green dog"]
    cmd += ["--out", str(out), "--images-per-prompt", "2", "--batch-size", "4", *CLI_OPTS]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    prompts = [*PROMPTS, "a green dog"]
    assert [r["file"] for r in rows] == [f"{i:05d}.png" for i in range(6)]
    assert [r["prompt"] for r in rows] == [p for p in prompts for _ in range(2)]
    assert [r["seed"] for r in rows] == [image_seed(0, i, j) for i in range(3) for j in range(2)]
    assert len({r["seed"] for r in rows}) == 6
    pngs = torch.stack([_png(out / r["file"]) for r in rows])
    assert pngs.shape == (6, 32, 32, 3) and pngs.dtype == torch.uint8
    # the files hold what the Python API samples
    expected = to_uint8(sample_images(base, prompts, images_per_prompt=2, batch_size=4, **OPTS))
    assert (pngs.int() - expected.int()).abs().max() <= 1
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 32 + 3 * 2, 3 * 32 + 4 * 2)  # one row per prompt, 2 px padding


def test_images_do_not_depend_on_batch_size_or_what_follows(base):
    one = sample_images(base, PROMPTS, images_per_prompt=2, batch_size=1, **OPTS)
    three = sample_images(base, PROMPTS, images_per_prompt=2, batch_size=3, **OPTS)
    assert one.shape == (4, 3, 32, 32) and one.dtype == torch.float32
    # batched matrix products of 1 vs 3 rows differ in the last bits only
    torch.testing.assert_close(one, three, rtol=0, atol=1e-5)
    assert (to_uint8(one).int() - to_uint8(three).int()).abs().max() <= 1
    # an image does not depend on the prompts after it either
    first = sample_images(base, PROMPTS[:1], images_per_prompt=1, batch_size=1, **OPTS)
    assert torch.equal(first[0], one[0])
    # images of one prompt differ (their own seeds), and another run seed gives other images
    assert (one[0] - one[1]).abs().max() > 1e-2
    other = sample_images(base, PROMPTS[:1], batch_size=1, **{**OPTS, "seed": 1})
    assert (other[0] - one[0]).abs().max() > 1e-2


def test_lora_changes_images_and_matches_the_adapter_in_memory(base, fresh, adapted):
    in_memory, lora_dir = adapted
    plain = sample_images(base, PROMPTS, batch_size=2, **OPTS)
    expected = sample_images(in_memory, PROMPTS, batch_size=2, **OPTS)
    assert (expected - plain).abs().max() > 1e-2
    for given in (lora_dir, lora_dir / "pytorch_lora_weights.safetensors"):
        model = fresh()
        assert "diffusers LoRA" in load_lora(model, given)
        torch.testing.assert_close(
            sample_images(model, PROMPTS, batch_size=2, **OPTS), expected, rtol=0, atol=1e-5
        )
        with model.disable_adapter():  # a loaded LoRA is switched off too: the base model's images
            torch.testing.assert_close(
                sample_images(model, PROMPTS, batch_size=2, **OPTS), plain, rtol=0, atol=1e-5
            )
        torch.testing.assert_close(
            sample_images(model, PROMPTS, batch_size=2, **OPTS), expected, rtol=0, atol=1e-5
        )


def test_a_new_lora_over_a_loaded_one_is_refused_and_the_fused_route_keeps_its_images(fresh, adapted):
    in_memory, lora_dir = adapted
    expected = sample_images(in_memory, PROMPTS, batch_size=2, **OPTS)
    model = fresh()
    load_lora(model, lora_dir)
    # a second adapter would become the only active one and silently switch the loaded LoRA off
    with pytest.raises(ValueError, match=r"already holds the LoRA adapter\(s\) lora_0.*fuse it first"):
        model.add_lora()
    # the route the message gives: fuse, unload, then a fresh (no-op) adapter trains on top of the same images
    model.pipe.fuse_lora()
    model.pipe.unload_lora_weights()
    model.add_lora()
    assert list(model.transformer.peft_config) == ["default"]
    torch.testing.assert_close(
        sample_images(model, PROMPTS, batch_size=2, **OPTS), expected, rtol=0, atol=1e-5
    )


def test_checkpoint_dir_rebuilds_the_adapter_and_matches_the_final_lora(base, fresh, tmp_path):
    from diffrl.train import build_trainer

    run = tmp_path / "run"
    overrides = [f"output_dir={run}", f"data.train={ROOT / 'configs/tiny/prompts.txt'}", "max_steps=1"]
    overrides += ["data.eval_size=0", "ema_decay=0.5"]
    build_trainer(ROOT / "configs/tiny/flow_grpo.yaml", overrides, model=fresh()).train()
    checkpoint = run / "checkpoint-000001"
    # the EMA weights, as the run's evaluation and its final LoRA use them
    assert resolve_lora(checkpoint).path == checkpoint / "ema.safetensors"
    assert resolve_lora(run).path == run / "lora" / "pytorch_lora_weights.safetensors"  # a run dir: its LoRA
    from_lora, from_checkpoint = fresh(), fresh()
    load_lora(from_lora, run / "lora")
    assert "training checkpoint" in load_lora(from_checkpoint, checkpoint)
    a = sample_images(from_lora, PROMPTS, batch_size=2, **OPTS)
    b = sample_images(from_checkpoint, PROMPTS, batch_size=2, **OPTS)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- eval


def test_eval_command_prints_the_rewards_of_the_sampled_images(base, prompt_file, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "tiny:sd3", "--prompts", str(prompt_file), "--reward", "saturation=2", "--reward"]
    argv += ["brightness", "--images-per-prompt", "2", "--batch-size", "3", "--out", str(out), *CLI_OPTS]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    means = {m[0]: float(m[1]) for m in re.findall(r"^(\w+)\s+mean (\S+)", printed, flags=re.M)}
    images = sample_images(base, PROMPTS, images_per_prompt=2, batch_size=3, **OPTS)
    prompts = [p for p in PROMPTS for _ in range(2)]
    sat = load_reward("saturation")(images, prompts)
    bright = load_reward("brightness")(images, prompts)
    assert means["saturation"] == pytest.approx(float(sat.mean()), rel=1e-5)
    assert means["brightness"] == pytest.approx(float(bright.mean()), rel=1e-5)
    assert means["total"] == pytest.approx(float((2 * sat + bright).mean()), rel=1e-5)
    result = json.loads((out / "eval.json").read_text())
    assert result["weights"] == {"saturation": 2.0, "brightness": 1.0}
    assert result["means"]["saturation"] == pytest.approx(float(sat.mean()), abs=1e-6)
    per_image = [r["scores"]["brightness"] for r in result["images"]]
    np.testing.assert_allclose(per_image, bright.numpy(), atol=1e-6)
    assert [r["file"] for r in result["images"]] == [f"{i:05d}.png" for i in range(4)]
    assert (out / "grid.png").is_file() and len((out / "samples.jsonl").read_text().splitlines()) == 4


def test_evaluate_model_equals_evaluate_images_on_sample_images(base):
    rewards = {"saturation": 1.0, "brightness": 0.5}
    from_model = evaluate_model(base, PROMPTS, rewards, batch_size=1, **OPTS)
    images = sample_images(base, PROMPTS, batch_size=2, **OPTS)
    from_images = evaluate_images(images, PROMPTS, rewards)
    for name in rewards:
        assert from_model["means"][name] == pytest.approx(from_images["means"][name], abs=1e-5)
    assert from_model["total_mean"] == pytest.approx(from_images["total_mean"], abs=1e-5)
    assert [r["seed"] for r in from_model["images"]] == [image_seed(0, i, 0) for i in range(2)]
    single = evaluate_images(images, PROMPTS, "saturation")
    assert single["weights"] == {"saturation": 1.0} and single["total_mean"] == single["means"]["saturation"]


# ---------------------------------------------------------------------------------------------- errors


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_errors_before_loading_the_model(no_model_load, prompt_file, tmp_path, capsys):
    sample = ["sample", "tiny:sd3", "--out", str(tmp_path / "o"), *CLI_OPTS]
    evaluate = ["eval", "tiny:sd3", *CLI_OPTS, "--prompts", str(prompt_file)]
    missing = str(tmp_path / "missing.txt")
    assert "prompt file" in _error([*sample, "--prompts", missing], capsys) and "does not exist" in _error(
        ["eval", "tiny:sd3", "--prompts", "nowhere.txt", "--reward", "saturation"], capsys
    )
    assert "unknown reward 'no_such_reward'" in _error([*evaluate, "--reward", "no_such_reward"], capsys)
    assert "cannot import module" in _error([*evaluate, "--reward", "no_such_module:fn"], capsys)
    assert "has no attribute 'nope'" in _error([*evaluate, "--reward", "diffrl.rewards:nope"], capsys)
    assert "is not a number" in _error([*evaluate, "--reward", "saturation=high"], capsys)
    assert "not valid JSON" in _error([*evaluate, "--reward", "saturation", "--reward-kwargs", "{x"], capsys)
    assert "not among the rewards" in _error(
        [*evaluate, "--reward", "saturation", "--reward-kwargs", '{"hpsv2": {}}'], capsys
    )
    if not any(Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).rglob("*hpsv2*")):
        # offline, without the reward's weights in the cache: said before the model loads, with the download command
        err = _error([*evaluate, "--reward", "hpsv2"], capsys)
        assert "weights not present offline" in err and "diffrl download hpsv2" in err
    # a reward that needs prompt metadata the prompts lack (the toy verifier's scene), named with the prompt file
    err = _error([*evaluate, "--reward", "shapes_verifier"], capsys)
    assert f"needs the metadata field 'scene' on every prompt, and {prompt_file} has none" in err
    err = _error(
        ["eval", "tiny:sd3", *CLI_OPTS, "--prompts", "a red circle", "--reward", "shapes_verifier"], capsys
    )
    assert "'scene' on every prompt, and the prompt list has none on 1 of 1" in err
    empty = tmp_path / "empty_lora"
    empty.mkdir()
    assert "holds no LoRA weights" in _error([*sample, "--prompts", "a cat", "--lora", str(empty)], capsys)
    assert "does not exist" in _error(
        [*sample, "--prompts", "a cat", "--lora", str(tmp_path / "nope")], capsys
    )
    assert "num_steps=0 must be a positive integer" in _error(
        [*sample, "--prompts", "a cat", "--num-steps", "0"], capsys
    )
    assert "dtype='float8'" in _error([*sample, "--prompts", "a cat", "--dtype", "float8"], capsys)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_size_is_refused_by_the_model_before_sampling(fresh, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(diffrl.models, "load_model", lambda *a, **k: fresh())
    out = tmp_path / "o"
    err = _error(
        ["sample", "tiny:sd3", "--prompts", "a cat", "--out", str(out), *CLI_OPTS, "--height", "36"], capsys
    )
    assert "height=36 must be a positive multiple of 8" in err
    assert not any(out.iterdir())
    # larger than the positional embedding covers: the limit and the native size, in pixels
    tiny = fresh()
    most = tiny.transformer.config.pos_embed_max_size * tiny.patch_size * tiny.vae_scale_factor
    err = _error(
        ["sample", "tiny:sd3", "--prompts", "a cat", "--out", str(out), "--height", str(2 * most)], capsys
    )
    assert f"height={2 * most} is larger than this SD3 model can make (at most {most} pixels" in err
    assert f"its native size is {tiny.native_size}" in err


def test_sample_size_defaults_to_the_models_native_size(fresh, monkeypatch, tmp_path):
    model = fresh()
    monkeypatch.setattr(diffrl.models, "load_model", lambda *a, **k: model)
    out = tmp_path / "o"
    assert main(["sample", "tiny:sd3", "--prompts", "a cat", "--out", str(out), "--num-steps", "2"]) == 0
    n = model.native_size
    assert n == model.transformer.config.sample_size * model.vae_scale_factor
    assert _png(out / "00000.png").shape == (n, n, 3)


def test_checkpoint_of_another_model_is_refused(fresh, tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint-000002"
    ckpt.mkdir()
    save_file(
        {"transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.zeros(4, 5)},
        ckpt / "trainable.safetensors",
    )
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "config": {"model": {"lora_rank": 4}}}))
    with pytest.raises(ValueError, match="does not match this sd3 model"):
        load_lora(fresh(), ckpt)


def test_eval_takes_prompt_text_as_sample_does(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "eval",
        "tiny:sd3",
        *CLI_OPTS,
        "--prompts",
        "a red circle",
        "--reward",
        "saturation",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    assert [row["prompt"] for row in result["images"]] == ["a red circle"]


@pytest.mark.parametrize(
    "spec, expected",
    [("toy", (8, 1.0)), ("tiny:sd3", (40, 4.5)), ("tiny:flux", (28, 3.5)), ("tiny:qwen_image", (50, 4.0))],
)
def test_sampling_defaults_are_the_models(spec, expected):
    from diffrl.models import load_model
    from diffrl.sampling import sampling_defaults

    assert sampling_defaults(spec, load_model(spec)) == expected
