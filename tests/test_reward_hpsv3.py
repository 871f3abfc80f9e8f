"""HPSv3 reward: a tiny random Qwen2-VL + reward head in the real checkpoint layout, loaded through the real path.

The reference package itself (``hpsv3`` 1.0.0, transformers 4.45.2) cannot be installed next to diffrl; its
parity on the same tiny weights is ``benchmarks/parity_hpsv3.py`` (max |mu diff| 2.4e-6 in float32 on a CPU,
token ids and pixel patches identical). Here the scores are checked against a straight-line re-derivation of the
reference's computation with the raw transformers model and the head's tensors (``test_matches_rederivation``).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reward_contract import check_reward_contract, make_images

from diffrl.rewards import WeightsNotFoundError, load_reward
from diffrl.rewards.hpsv3 import (
    BASE_MODEL,
    HPSV3_FILE,
    HPSV3_REPO,
    INSTRUCTION,
    RATING_SUFFIX,
    REWARD_TOKEN,
    HPSv3,
    resize_shape,
    user_text,
)
from diffrl.rewards.tiny.hpsv3 import build_tiny_hpsv3

PROMPTS = ["a cat", "a red dog riding a bicycle", "x", "two birds over a lake at dawn"]

# sha256 of the reference strings, computed from the hpsv3 1.0.0 wheel (hpsv3/dataset/data_collator_qwen.py):
# INSTRUCTION + "\0" + prompt_with_special_token, and INSTRUCTION.format(text_prompt="a cat") + prompt_with_special_token
REFERENCE_TEMPLATE_SHA = "18957b68f6dbfb1d9862e970e084c1093656df0dfe2b4468253879198cc4d064"
REFERENCE_A_CAT_SHA = "58f765b8739946ac474c741df3766ebc3df8c43e966cea2edbdce196c41a2bd4"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_hpsv3(tmp_path_factory.mktemp("tiny_hpsv3"), seed=0)


@pytest.fixture(scope="module")
def reward(tiny_path):
    return load_reward("hpsv3", checkpoint=str(tiny_path), base_model=str(tiny_path))


# ---------------------------------------------------------------------------------------------- contract
def test_contract(reward):
    images = make_images(4, 64)
    scores = check_reward_contract(reward, images, PROMPTS)
    assert reward.name == "hpsv3" and reward.differentiable is False
    assert scores.std() > 0.1, scores  # the tiny model's mu depends on image and prompt
    same_prompt = reward(images, ["a cat"] * 4)
    assert same_prompt.std() > 0.1, same_prompt  # images matter
    assert not torch.allclose(reward(images, PROMPTS[::-1]), scores, atol=1e-3)  # prompts matter


def test_batch_split_invariance(reward):
    """Right padding (the reward token is read before the pads) and chunking leave every score unchanged."""
    images = make_images(4, 96, seed=1)
    inputs = reward.model_inputs(images, PROMPTS)
    mask = inputs["attention_mask"]
    assert mask[:, 0].all() and not mask[:, -1].all(), (
        "the batch must be right padded (prompt lengths differ)"
    )
    together = reward(images, PROMPTS)
    alone = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    mu, sigma = reward.mu_sigma(images, PROMPTS)
    torch.testing.assert_close(mu, together, rtol=0, atol=1e-5)
    assert (sigma > 0).all()


# ---------------------------------------------------------------------------------------------- parity
def _rederive(
    tiny_path, image: torch.Tensor, prompt: str, size: tuple[int, int], positions: str = "sequential"
):
    """The reference computation written out with the raw transformers classes and the checkpoint's tensors:
    ``hpsv3/inference.py`` (8-bit PIL image, bicubic resize, chat template, processor), ``qwen2vl_trainer.py``
    l.115-247 (decoder with positions 0..L-1, last hidden state at <|Reward|>, float32 head), ``mu`` = output 0."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    state = load_file(str(tiny_path / HPSV3_FILE))
    head = {k: v.float() for k, v in state.items() if k.startswith("rm_head.")}
    renamed = {}
    for key, value in state.items():
        if key.startswith("visual."):
            renamed["model." + key] = value
        elif key.startswith("model."):
            renamed["model.language_model." + key[len("model.") :]] = value
        elif key == "lm_head.weight":
            renamed[key] = value
    config = Qwen2VLConfig.from_pretrained(tiny_path)
    config.get_text_config().vocab_size = state["model.embed_tokens.weight"].shape[0]
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.load_state_dict(renamed, strict=True)

    processor = AutoProcessor.from_pretrained(tiny_path)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    reward_id = processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr).resize((size[1], size[0]), Image.BICUBIC)
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>"
        + user_text(prompt)
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    batch = processor(text=[text], images=[pil], return_tensors="pt")
    ids = batch["input_ids"]
    kwargs = {}
    if positions == "sequential":
        kwargs["position_ids"] = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    else:  # Qwen2-VL's own 3D positions (what transformers 5 computes when none are given)
        kwargs["mm_token_type_ids"] = batch["mm_token_type_ids"]
    with torch.no_grad():
        hidden = model.model(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            **kwargs,
        ).last_hidden_state
        (position,) = (ids[0] == reward_id).nonzero()[:, 0].tolist()
        h = hidden[0, position].float()
        h = F.relu(F.linear(h, head["rm_head.0.weight"], head["rm_head.0.bias"]))
        h = F.relu(F.linear(h, head["rm_head.3.weight"], head["rm_head.3.bias"]))
        return F.linear(h, head["rm_head.5.weight"], head["rm_head.5.bias"])


def test_matches_rederivation(reward, tiny_path):
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 100, 80, generator=g), make_images(1, 64, seed=4)[0]]
    prompts = ["a small house with {braces}", "two birds"]
    sizes = [(504, 420), (448, 448)]  # the reference's resize of 100x80 and 64x64 (see test_resize_shape)
    for image, prompt, size in zip(images, prompts, sizes, strict=True):
        expected = _rederive(tiny_path, image, prompt, size)
        got = reward.outputs(image[None], [prompt])[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    # the positions are a real choice: Qwen2-VL's 3D positions give another score
    three_d = _rederive(tiny_path, images[1], prompts[1], sizes[1], positions="3d")
    assert (three_d[0] - got[0]).abs() > 1e-3, (three_d, got)


@pytest.mark.parametrize(
    "height,width,expected",
    # (H, W) -> the sizes the reference package resized PNGs of these sizes to (benchmarks/parity_hpsv3.py run:
    # the image grids it returned, times 14)
    [
        (512, 512, (448, 448)),
        (180, 320, (336, 616)),
        (300, 150, (644, 336)),
        (64, 64, (448, 448)),
        (768, 1024, (364, 504)),
        (500, 700, (364, 504)),
        (1000, 90, (1512, 140)),
        (100, 80, (504, 420)),
    ],
)
def test_resize_shape(height, width, expected):
    assert resize_shape(height, width) == expected


# ---------------------------------------------------------------------------------------------- the template
def test_prompt_template(reward):
    assert (
        hashlib.sha256((INSTRUCTION + "\x00" + RATING_SUFFIX).encode()).hexdigest() == REFERENCE_TEMPLATE_SHA
    )
    assert hashlib.sha256(user_text("a cat").encode()).hexdigest() == REFERENCE_A_CAT_SHA
    assert user_text("a {b} c").endswith(
        "Textual prompt - a {b} c\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
    )
    texts = reward.chat_texts(["a cat", "x"])
    assert texts[0] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>"
        + user_text("a cat")
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = reward.model_inputs(make_images(2, 64), ["a cat", "x"])["input_ids"]
    assert ((ids == reward.reward_token_id).sum(dim=1) == 1).all()
    assert reward.processor.tokenizer.convert_ids_to_tokens(reward.reward_token_id) == REWARD_TOKEN
    # <|Reward|> is appended to the tokenizer: its id is the last embedding row, as hpsv3/train.py resizes them
    assert reward.reward_token_id == reward.model.language_model.embed_tokens.weight.shape[0] - 1


# ---------------------------------------------------------------------------------------------- loading
def test_checkpoint_layouts_and_dtypes(reward, tiny_path, tmp_path):
    """transformers >= 4.52 key names, a .pt file wrapped in {"model": ...} and a bfloat16 backbone all load."""
    from safetensors.torch import load_file, save_file

    images, prompts = make_images(2, 64, seed=5), PROMPTS[:2]
    expected = reward(images, prompts)
    state = load_file(str(tiny_path / HPSV3_FILE))
    new_names = {}
    for key, value in state.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key[len("model.") :]
        new_names[key] = value
    torch.save({"model": new_names}, tmp_path / "hpsv3_new_names.pt")
    from_pt = HPSv3(checkpoint=tmp_path / "hpsv3_new_names.pt", base_model=tiny_path)
    torch.testing.assert_close(from_pt(images, prompts), expected, rtol=0, atol=1e-6)

    bf16 = {k: v if k.startswith("rm_head.") else v.to(torch.bfloat16) for k, v in state.items()}
    (tmp_path / "bf16").mkdir()
    save_file(bf16, str(tmp_path / "bf16" / HPSV3_FILE))
    r = HPSv3(checkpoint=tmp_path / "bf16", base_model=tiny_path, dtype="bf16").load()
    assert next(r.model.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in r.head.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in r.model.parameters())
    scores = r(images, prompts)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=0, atol=0.1)  # bfloat16 round-off of the tiny model


def test_fingerprint_depends_on_weights(reward, tiny_path, tmp_path):
    other = build_tiny_hpsv3(tmp_path / "other", seed=1)
    assert HPSv3(checkpoint=other, base_model=other).fingerprint != reward.fingerprint
    assert HPSv3(checkpoint=tiny_path, base_model=tiny_path).fingerprint == reward.fingerprint


def test_hub_files():
    files = HPSv3.hub_files()
    required = {(f.repo_id, f.filename) for f in files if not f.optional}
    assert (HPSV3_REPO, HPSV3_FILE) in required
    assert {
        (BASE_MODEL, n) for n in ("config.json", "preprocessor_config.json", "tokenizer.json")
    } <= required
    assert not any("model-0000" in f.filename for f in files)  # the base model's weights are not needed
    assert (BASE_MODEL, "chat_template.json") in {(f.repo_id, f.filename) for f in files if f.optional}
    assert [f.repo_id for f in HPSv3.hub_files(checkpoint="me/my-hpsv3") if f.filename == HPSV3_FILE] == [
        "me/my-hpsv3"
    ]
    assert HPSv3.hub_files(checkpoint="/local/HPSv3.safetensors", base_model="/local/qwen2-vl") == []
    from diffrl.hub import reward_hub_files

    assert reward_hub_files("hpsv3", {}) == files


def test_weights_absent_offline_fail_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        HPSv3()(make_images(1, 32), ["x"])
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert f"{HPSV3_REPO}/{HPSV3_FILE}" in message and f"{BASE_MODEL}/config.json" in message
    assert "diffrl download hpsv3" in message


# ---------------------------------------------------------------------------------------------- errors
def test_bad_options_rejected_at_construction(tmp_path):
    with pytest.raises(TypeError, match="checkpoint=123"):
        HPSv3(checkpoint=123)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HPSv3(checkpoint=tmp_path / "missing" / HPSV3_FILE)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        HPSv3(base_model=tmp_path / "no_such_dir")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        HPSv3(base_model=tmp_path / "config.json")
    with pytest.raises(ValueError, match="batch_size"):
        HPSv3(batch_size=0)


def test_bad_checkpoints(tiny_path, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_path / HPSV3_FILE))
    no_head = {k: v for k, v in state.items() if not k.startswith("rm_head.")}
    save_file(no_head, str(tmp_path / "no_head.safetensors"))
    with pytest.raises(ValueError, match="no rm_head"):
        HPSv3(checkpoint=tmp_path / "no_head.safetensors", base_model=tiny_path).load()
    other_head = {**no_head, "rm_head.weight": torch.zeros(2, 32)}
    save_file(other_head, str(tmp_path / "other_head.safetensors"))
    with pytest.raises(ValueError, match="ranknet head"):
        HPSv3(checkpoint=tmp_path / "other_head.safetensors", base_model=tiny_path).load()
    strange = {**state, "text_projection.weight": torch.zeros(2, 2)}
    save_file(strange, str(tmp_path / "strange.safetensors"))
    with pytest.raises(ValueError, match="not HPSv3's"):
        HPSv3(checkpoint=tmp_path / "strange.safetensors", base_model=tiny_path).load()
    missing_layer = {k: v for k, v in state.items() if "layers.1." not in k}
    save_file(missing_layer, str(tmp_path / "missing_layer.safetensors"))
    with pytest.raises(ValueError, match="does not fit the Qwen2-VL"):
        HPSv3(checkpoint=tmp_path / "missing_layer.safetensors", base_model=tiny_path).load()


def test_chat_template_sources(reward, tiny_path, tmp_path):
    """chat_template.json, else the template in tokenizer_config.json, else an error naming the fix."""
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_path, base, ignore=shutil.ignore_patterns("*.safetensors", "chat_template.json"))
    with pytest.raises(ValueError, match="no chat template"):
        HPSv3(checkpoint=tiny_path, base_model=base).load()
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = json.loads((tiny_path / "chat_template.json").read_text())["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    older = HPSv3(checkpoint=tiny_path, base_model=base).load()
    assert older.chat_texts(PROMPTS) == reward.chat_texts(PROMPTS)


def test_bad_inputs(reward):
    with pytest.raises(ValueError, match="remove it from the prompt"):
        reward(make_images(1, 64), [f"a cat {REWARD_TOKEN}"])
    with pytest.raises(ValueError, match="aspect ratio"):
        reward(torch.rand(1, 3, 2, 500), ["a cat"])


# ---------------------------------------------------------------------------------------------- real weights
@pytest.mark.weights
def test_real_checkpoint():
    """The released checkpoint (16 GB): a drawn picture scores higher with its own prompt than with another."""
    from PIL import ImageDraw

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reward = HPSv3(device=device, dtype="bf16" if device == "cuda" else "float32").load()
    img = Image.new("RGB", (512, 384), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((156, 92, 356, 292), fill=(220, 20, 30))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div(255).to(device)
    scores = reward(
        x.expand(2, -1, -1, -1), ["a red circle on a white background", "a photo of a dog in a park"]
    )
    assert torch.isfinite(scores).all() and -20 < scores.min() and scores.max() < 20, scores
    assert scores[0] > scores[1], scores
