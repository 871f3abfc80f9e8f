"""OCR reward (Flow-GRPO's text-rendering task): the formula (quoted text, normalisation, clipped edit distance),
and the real PP-OCRv4 models of the rapidocr-onnxruntime wheel on text rendered with PIL in the fonts found here.

The engine loads once for the module (about 0.2 s) and reads 256x256 images (about 0.1 s each on one core)."""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont, features
from reward_contract import check_reward_contract

from diffrl.rewards import load_reward
from diffrl.rewards.ocr import (
    OCRReward,
    RapidOCRRecognizer,
    TextRecognizer,
    images_to_uint8,
    levenshtein,
    normalize_text,
    ocr_score,
    quoted_text,
)

pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra is not installed (pip install diffrl[ocr])")

CANVAS = 256
PROMPT = 'A storefront with a sign that says "Hello World"'


# ------------------------------------------------------------------------------------------------ fonts, images
def _font_dirs() -> list[Path]:
    dirs = [
        Path("/usr/share/fonts/truetype/dejavu"),
        Path("/usr/share/fonts/dejavu"),
        Path("/usr/share/fonts/TTF"),
    ]
    spec = importlib.util.find_spec("matplotlib")  # matplotlib ships DejaVu fonts of its own
    if spec is not None and spec.origin is not None:
        dirs.append(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf")
    return dirs


FONTS = ["PIL default", "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf"]


def load_font(name: str, size: int):
    """The named font at ``size`` pixels; skips the test when it is not installed here."""
    if name == "PIL default":
        if not features.check("freetype2"):
            pytest.skip("PIL was built without FreeType: no scalable default font")
        return ImageFont.load_default(size=size)
    for folder in _font_dirs():
        if (folder / name).is_file():
            return ImageFont.truetype(str(folder / name), size)
    pytest.skip(f"font {name} is not installed")


def render(text: str, font, canvas: int = CANVAS, fg=(0, 0, 0), bg=(255, 255, 255)) -> torch.Tensor:
    """``text`` centred on a ``canvas`` x ``canvas`` image, as (3, H, W) in [0, 1]."""
    img = Image.new("RGB", (canvas, canvas), bg)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    assert right - left < canvas - 8, f"{text!r} does not fit the canvas"
    draw.text(
        ((canvas - (right - left)) / 2 - left, (canvas - (bottom - top)) / 2 - top), text, fill=fg, font=font
    )
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reward():
    return load_reward("ocr", num_threads=1).load()


@lru_cache(maxsize=1)
def _sans(size: int = 28):
    for folder in _font_dirs():
        if (folder / "DejaVuSans.ttf").is_file():
            return ImageFont.truetype(str(folder / "DejaVuSans.ttf"), size)
    return ImageFont.load_default(size=size)


# ------------------------------------------------------------------------------------------------ the formula
def _levenshtein_by_definition(a: str, b: str) -> int:
    """The recursive definition (first characters), memoised: an independent check of the DP."""

    @cache
    def d(i: int, j: int) -> int:
        if i == len(a):
            return len(b) - j
        if j == len(b):
            return len(a) - i
        if a[i] == b[j]:
            return d(i + 1, j + 1)
        return 1 + min(d(i + 1, j), d(i, j + 1), d(i + 1, j + 1))

    return d(0, 0)


def test_levenshtein_known_values_and_definition():
    known = {
        ("kitten", "sitting"): 3,
        ("flaw", "lawn"): 2,
        ("", "abc"): 3,
        ("abc", ""): 3,
        ("", ""): 0,
        ("intention", "execution"): 5,
        ("abc", "abc"): 0,
        ("helloworld", "hallowelt"): 4,
        ("ab", "ba"): 2,
    }
    for (a, b), want in known.items():
        assert levenshtein(a, b) == want == levenshtein(b, a), (a, b)
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choices("abcé", k=rng.randint(0, 7)))
        b = "".join(rng.choices("abcé", k=rng.randint(0, 7)))
        assert levenshtein(a, b) == _levenshtein_by_definition(a, b), (a, b)


def test_quoted_text_follows_the_reference_split():
    assert quoted_text('a sign that says "Hello World" in red') == "Hello World"
    assert quoted_text('"A" and "B"') == "A"  # the first quoted span
    assert quoted_text('a sign that says "OPEN') == "OPEN"  # one quote: to the end, as split('"')[1]
    assert quoted_text('say "" twice') == ""
    with pytest.raises(ValueError, match="between double quotes.*'a plain prompt'"):
        quoted_text("a plain prompt")
    with pytest.raises(ValueError, match="between double quotes"):
        quoted_text("typographic \u201cquotes\u201d do not count")


def test_ocr_score_formula():
    assert normalize_text(" Hello  World ") == "helloworld"
    assert ocr_score("Hello World", "Hello World") == 1.0
    assert ocr_score("HELLOWORLD", "hello world") == 1.0  # case and spaces are ignored
    assert ocr_score("Welcome! Hello World, friends", "Hello World") == 1.0  # a substring scores 1
    assert ocr_score("Hello Wrld", "Hello World") == pytest.approx(1 - 1 / 10)  # n counts no spaces
    assert ocr_score("Hallo Welt", "Hello World") == pytest.approx(1 - 4 / 10)
    assert ocr_score("", "Hello World") == 0.0  # nothing read
    assert ocr_score("x" * 50, "abc") == 0.0  # the distance is clipped at n
    assert ocr_score("Hello\tWorld", "Hello World") == pytest.approx(1 - 1 / 10)  # only " " is removed
    with pytest.raises(ValueError, match="empty once spaces are removed"):
        ocr_score("anything", "   ")


def test_images_to_uint8_rounds_then_clamps():
    x = torch.tensor([-0.1, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.2]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    (arr,) = images_to_uint8(x)
    assert arr.shape == (1, 7, 3) and arr.dtype == np.uint8 and arr.flags["C_CONTIGUOUS"]
    assert arr[0, :, 0].tolist() == [0, 0, 0, 2, 128, 255, 255]  # round half to even, as torch.round


# ------------------------------------------------------------------------------------------------ real weights
@pytest.mark.parametrize("font_name", FONTS)
def test_clean_render_scores_near_one(reward, font_name):
    texts = ["Hello World", "OPEN", "diffrl 2025"]
    images, prompts = [], []
    for size, text in itertools.product((14, 28), texts):
        images.append(render(text, load_font(font_name, size)))
        prompts.append(f'a poster with the words "{text}" in the middle')
    scores = reward(torch.stack(images), prompts)
    assert scores.dtype == torch.float32 and scores.shape == (len(images),)
    assert (scores >= 0.9).all(), (font_name, scores.tolist(), reward.read_text(torch.stack(images)))


@pytest.mark.parametrize("font_name", FONTS)
def test_wrong_text_scores_lower(reward, font_name):
    font = load_font(font_name, 24)
    images = torch.stack([render(t, font) for t in ("Hello World", "Hello Wrold", "Goodbye")])
    clean, typo, wrong = reward(images, [PROMPT] * 3).tolist()
    assert clean >= 0.9 and wrong < 0.5 and wrong < typo < clean, (clean, typo, wrong)
    # the score is the formula applied to what the engine read
    read = reward.read_text(images)
    assert [ocr_score(r, "Hello World") for r in read] == pytest.approx([clean, typo, wrong])


def test_images_without_text_score_zero(reward):
    blank = torch.ones(2, 3, CANVAS, CANVAS)
    blank[1] = 0.0  # white and black
    assert reward.read_text(blank) == ["", ""]
    assert reward(blank, [PROMPT, PROMPT]).tolist() == [0.0, 0.0]


def test_toy_world_images_score_zero(reward):
    from diffrl.toy import generate_dataset

    toy = generate_dataset(6, seed=0)
    prompts = [f'{p}, with the word "{p.split()[-1]}" written below' for p in toy["prompts"]]
    assert reward(toy["images"], prompts).tolist() == [0.0] * 6


def test_prompt_without_quotes_fails_before_reading(reward):
    class Counting:
        """The module's engine, counting what it reads."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def recognize(self, images):
            self.calls += 1
            return self.inner.recognize(images)

    counting = Counting(reward.recognizer)
    wrapped = OCRReward(recognizer=counting)
    image = render("Hello World", _sans())[None].expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match="between double quotes.*'a storefront'"):
        wrapped(image, [PROMPT, "a storefront"])
    with pytest.raises(ValueError, match="empty once spaces are removed"):
        wrapped(image, [PROMPT, 'a sign that says " "'])
    assert counting.calls == 0
    assert wrapped(image, [PROMPT, PROMPT]).tolist() == [1.0, 1.0] and counting.calls == 1


def test_contract_and_batch_split_invariance(reward):
    font = _sans(20)
    texts = ["Hello World", "OPEN", "Goodbye", "STOP"]
    images = torch.stack([render(t, font, canvas=160) for t in texts])
    prompts = [f'a sign that says "{t}"' for t in ("Hello World", "OPEN", "Hello World", "stop")]
    scores = check_reward_contract(reward, images, prompts)
    assert not reward.differentiable and reward.per_sample and reward.name == "ocr"
    assert scores[0] == scores[1] == scores[3] == 1.0 and scores[2] < 0.5
    # a score depends only on its own image: reversed batch, reversed scores; one by one, the same
    flipped = reward(images.flip(0), prompts[::-1])
    assert torch.equal(flipped, scores.flip(0))
    alone = torch.cat([reward(images[i : i + 1], prompts[i : i + 1]) for i in range(4)])
    assert torch.equal(alone, scores)


def test_colours_and_non_square_images(reward):
    font = _sans(24)
    white_on_blue = render("Hello World", font, fg=(255, 255, 255), bg=(20, 40, 160))
    wide = render("Hello World", font, canvas=CANVAS)[:, 96:160, :]  # a 64x256 strip
    assert reward(white_on_blue[None], [PROMPT]).item() >= 0.9
    assert reward(wide[None], [PROMPT]).item() >= 0.9


# ------------------------------------------------------------------------------------------------ options, errors
def test_registry_and_no_hub_files(capsys):
    from diffrl.cli import main
    from diffrl.hub import reward_hub_files

    assert isinstance(load_reward("ocr"), OCRReward)
    assert reward_hub_files("ocr", {}) == [] and OCRReward.hub_files(provider="cuda") == []
    assert main(["download", "ocr", "--dry-run"]) == 0
    assert "reward ocr: 0 hub file(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"provider": "tpu"}, ValueError, "provider='tpu'.*'cpu' or 'cuda'"),
        ({"num_threads": 0}, ValueError, "num_threads=0"),
        ({"min_confidence": 2}, ValueError, "min_confidence=2"),
        ({"det_model": "/no/such/det.onnx"}, FileNotFoundError, "det_model='/no/such/det.onnx'"),
        ({"rec_keys": "/no/such/keys.txt"}, FileNotFoundError, "rec_keys="),
        ({"engine_options": {"det_box_tresh": 0.5}}, ValueError, "unknown key 'det_box_tresh'"),
        ({"engine_options": {"text_score": 0.1}}, ValueError, "unknown key 'text_score'"),
        ({"dtype": "bf16"}, ValueError, "float32"),
        ({"recognizer": object()}, TypeError, "no recognize method"),
        (
            {"recognizer": "test_reward_ocr:ReadsNothing", "min_confidence": 0.9},
            ValueError,
            "'min_confidence'",
        ),
        ({"colour": "red"}, ValueError, "has no option 'colour'"),
    ],
)
def test_bad_options_fail_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        load_reward("ocr", **options)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install diffrl\[ocr\]"):
        load_reward("ocr")


def test_too_old_rapidocr_is_refused(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "1.3.25" if name == "rapidocr-onnxruntime" else real(name)
    )
    with pytest.raises(ImportError, match=r"needs rapidocr-onnxruntime >= 1\.4\.4.*1\.3\.25 is installed"):
        load_reward("ocr")


def test_cuda_provider_fails_clearly_without_cuda_onnxruntime():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    reward = load_reward("ocr", provider="cuda")  # constructing is fine; loading says what is missing
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        reward.load()


class ReadsNothing:
    """An engine that never reads anything (to test swapping the engine by name)."""

    def recognize(self, images):
        return [""] * len(images)


def test_engine_swapped_by_object_or_name(reward):
    assert isinstance(reward.recognizer, RapidOCRRecognizer) and isinstance(reward.recognizer, TextRecognizer)
    image = render("Hello World", _sans())[None]
    by_name = load_reward("ocr", recognizer="test_reward_ocr:ReadsNothing")
    assert isinstance(by_name.recognizer, ReadsNothing)
    assert by_name(image, [PROMPT]).item() == 0.0 and reward(image, [PROMPT]).item() == 1.0

    class Wrong:
        def recognize(self, images):
            return ["a", "b"]

    with pytest.raises(TypeError, match="one string per image"):
        OCRReward(recognizer=Wrong())(image, [PROMPT])


def test_engine_runs_with_paddleocr_settings(reward):
    """rapidocr ignores keyword options it does not know, so check that the loaded engine took ours."""
    engine = reward.recognizer.engine
    det = engine.text_det
    assert (det.limit_side_len, det.limit_type) == (960, "max")
    assert list(det.mean) == [0.485, 0.456, 0.406] and list(det.std) == [0.229, 0.224, 0.225]
    post = det.postprocess_op
    assert (post.thresh, post.box_thresh, post.unclip_ratio, post.dilation_kernel) == (0.3, 0.6, 1.5, None)
    assert engine.use_cls is False and engine.text_score == 0.5
    assert det.infer.session.get_providers()[0] == "CPUExecutionProvider"
    assert det.infer.session.get_session_options().intra_op_num_threads == 1


def test_fingerprint_follows_settings(reward):
    same = load_reward("ocr", num_threads=1)
    assert same.fingerprint == reward.fingerprint  # threads do not change what is read
    stricter = load_reward("ocr", min_confidence=0.9)
    other_det = load_reward("ocr", engine_options={"det_box_thresh": 0.5})
    assert len({reward.fingerprint, stricter.fingerprint, other_det.fingerprint}) == 3
    digests = reward.settings()["recognizer_settings"]["sha256"]
    assert set(digests) == {"det", "rec"} and all(len(d) == 64 for d in digests.values())
