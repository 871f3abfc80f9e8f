"""VLM yes-probability reward: a tiny random Qwen2.5-VL through the real loading path, and an OpenAI-compatible
server (standard-library HTTP server in a thread, ``fake_vlm_server``) answering with the same tiny VLM's logprobs."""

from __future__ import annotations

import base64
import io
import socket
import time

import numpy as np
import pytest
import torch
from fake_vlm_server import FakeVLMServer, pil, reference_logprobs
from PIL import Image
from reward_contract import check_reward_contract, make_images

from diffrl.rewards import WeightsNotFoundError, load_reward
from diffrl.rewards.tiny.vlm import build_tiny_vlm
from diffrl.rewards.vlm import DEFAULT_MODEL, DEFAULT_QUESTION, VLMYesProb, yes_prob_from_top

PROMPTS = ["a cat", "a red dog riding a bicycle", "x", "two birds over a lake at dawn"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), seed=0)


@pytest.fixture(scope="module")
def reward(tiny_path):
    return load_reward("vlm_yes_prob", model=str(tiny_path))


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    """The tiny VLM loaded independently of the reward (for the reference computations and the test server)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_path).eval()
    return processor, model


def _reference_logprobs(processor, model, image: Image.Image, question: str) -> torch.Tensor:
    """log softmax over the vocabulary of the first answer token, one image, no padding."""
    return reference_logprobs(processor, model, [image], question)


_pil = pil


# ---------------------------------------------------------------------------------------------- local backend
def test_contract(reward):
    images = make_images(4, 64)
    scores = check_reward_contract(reward, images, PROMPTS)
    assert reward.differentiable is False and reward.name == "vlm_yes_prob"
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores.std() > 0.02, scores  # the tiny VLM's answers depend on image and prompt
    other = reward(images, PROMPTS[::-1])
    assert not torch.allclose(other, scores, atol=1e-3)  # prompts matter


def test_left_padding_and_one_by_one(reward):
    images = make_images(4, 64, seed=1)
    batch = reward.model_inputs(images, PROMPTS)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all(), "batch must be left padded"
    together = reward(images, PROMPTS)
    alone = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_matches_softmax_over_vocabulary(reward, tiny_model):
    processor, model = tiny_model
    image = make_images(2, 64, seed=2)[1]
    prompt = "a small house"
    logp = _reference_logprobs(processor, model, _pil(image), DEFAULT_QUESTION.replace("{prompt}", prompt))
    tok = processor.tokenizer
    yes_ids = [tok.convert_tokens_to_ids(t) for t in ("Yes", "yes", "ĠYes", "Ġyes")]
    no_ids = [tok.convert_tokens_to_ids(t) for t in ("No", "no", "ĠNo", "Ġno")]
    probs = logp.exp()
    expected = probs[yes_ids].sum() / (probs[yes_ids].sum() + probs[no_ids].sum())
    got = reward(image[None], [prompt])
    assert abs(got.item() - expected.item()) < 1e-5, (got.item(), expected.item())
    assert sorted(reward.yes_ids) == sorted(yes_ids) and sorted(reward.no_ids) == sorted(no_ids)


def test_question_template(tiny_path):
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        VLMYesProb(str(tiny_path), question="Is this a good picture? Answer yes or no.")
    r = VLMYesProb(str(tiny_path), question='Is {"x": 1} like "{prompt}"? yes or no')
    assert r.questions(["a {b} c"]) == ['Is {"x": 1} like "a {b} c"? yes or no']
    assert r.settings()["question"] == 'Is {"x": 1} like "{prompt}"? yes or no'


def test_bad_options():
    with pytest.raises(ValueError, match="backend"):
        VLMYesProb(backend="vllm")
    with pytest.raises(ValueError, match="base_url"):
        VLMYesProb(backend="openai")
    with pytest.raises(ValueError, match="max_concurrency"):
        VLMYesProb(backend="openai", base_url="http://127.0.0.1:1/v1", max_concurrency=0)
    with pytest.raises(ValueError, match="missing_answer"):
        VLMYesProb(missing_answer="zero")


def test_dtype_respected(tiny_path):
    r = VLMYesProb(str(tiny_path), dtype=torch.bfloat16).load()
    assert next(r.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in r.model.parameters())
    images = make_images(2, 64)
    scores = r(images, PROMPTS[:2])
    ref = VLMYesProb(str(tiny_path))(images, PROMPTS[:2])
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref, rtol=0, atol=0.05)


def test_processor_kwargs(tiny_path):
    big = make_images(2, 128)
    r = VLMYesProb(
        str(tiny_path), processor_kwargs={"size": {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}}
    )
    assert r.load().model_inputs(big, PROMPTS[:2])["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert r.settings()["processor_kwargs"]["size"]["longest_edge"] == 56 * 56
    assert VLMYesProb(str(tiny_path)).load().model_inputs(big, PROMPTS[:2])["image_grid_thw"][0, 1] == 8


def test_missing_yes_no_tokens(tiny_path):
    r = VLMYesProb(str(tiny_path)).load()
    vocab = {"a": 0, "b": 1}

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [vocab.get(c, 0) for c in text]

    with pytest.raises(ValueError, match="single token"):
        r._single_token_ids(Tok(), ("Yes", "yes", " Yes", " yes"))


# ---------------------------------------------------------------------------------------------- weights
def test_weights_absent_offline_fail_fast():
    r = VLMYesProb()
    start = time.time()
    with pytest.raises(WeightsNotFoundError) as info:
        r.load()
    assert time.time() - start < 10
    message = str(info.value)
    assert f"{DEFAULT_MODEL}/config.json" in message
    assert "model-00001-of-00005.safetensors" in message and "diffrl download vlm_yes_prob" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VLMYesProb("/nonexistent/vlm_dir").load()


def test_hub_files(tiny_path):
    files = VLMYesProb.hub_files()
    names = {f.filename for f in files if not f.optional}
    assert {f.repo_id for f in files} == {DEFAULT_MODEL}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "preprocessor_config.json",
        "tokenizer.json",
    } <= names
    assert {f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)} <= names
    assert "chat_template.json" in {f.filename for f in files if f.optional}
    assert VLMYesProb.hub_files(backend="openai", base_url="http://x/v1") == []
    assert VLMYesProb.hub_files(model=str(tiny_path)) == []
    other = VLMYesProb.hub_files(model="someone/other-vlm", revision="abc")
    assert {f.repo_id for f in other} == {"someone/other-vlm"} and {f.revision for f in other} == {"abc"}
    assert {f.filename for f in other if not f.optional} == {"config.json", "tokenizer_config.json"}


@pytest.mark.weights
def test_real_qwen25vl_answers():
    """Qwen2.5-VL-7B-Instruct on drawn images: the matching prompt scores high, the wrong one low, and the score
    agrees with the model's greedy one-token answer."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    r = VLMYesProb(device=device, dtype=dtype)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 448), torch.linspace(0, 1, 448), indexing="ij")
    disc = ((xs - 0.5) ** 2 + (ys - 0.5) ** 2 < 0.09).float()
    red_disc = torch.stack([torch.ones_like(disc), 1 - disc, 1 - disc])  # red disc on white
    images = torch.stack([red_disc, red_disc])
    scores = r(images, ["a red circle on a white background", "a blue square on a black background"])
    assert scores[0] > 0.9 and scores[1] < 0.1, scores
    batch = r.model_inputs(images[:1], ["a red circle on a white background"])
    with torch.no_grad():
        answer = r.model.generate(**batch, max_new_tokens=1, do_sample=False)[0, -1].item()
    assert answer in r.yes_ids


# ---------------------------------------------------------------------------------------------- server backend
@pytest.fixture(scope="module")
def server(tiny_model):
    s = FakeVLMServer(*tiny_model)
    yield s
    s.close()


def test_server_matches_local(server, reward):
    server.mode = "ok"
    server.requests.clear()
    remote = VLMYesProb(
        "tiny-vlm", backend="openai", base_url=server.url, api_key="sk-test", max_concurrency=3
    )
    images = make_images(4, 64, seed=5)
    scores = check_reward_contract(remote, images, PROMPTS)
    local = reward(images, PROMPTS)
    torch.testing.assert_close(scores, local, rtol=0, atol=1e-5)
    assert remote.differentiable is False
    body, headers = server.requests[0]
    assert body["model"] == "tiny-vlm" and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert headers["Authorization"] == "Bearer sk-test"
    # the image arrives losslessly as the reward's 8-bit image
    sent = {}
    for body, _ in server.requests[:4]:
        parts = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        text = next(p["text"] for p in parts if p["type"] == "text")
        sent[text] = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    for i, prompt in enumerate(PROMPTS):
        expected = np.asarray(_pil(images[i]))
        np.testing.assert_array_equal(sent[DEFAULT_QUESTION.replace("{prompt}", prompt)], expected)


def test_server_api_key_from_env(server, monkeypatch):
    server.mode = "ok"
    server.requests.clear()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    VLMYesProb("m", backend="openai", base_url=server.url)(make_images(1, 64), ["a"])
    assert server.requests[0][1]["Authorization"] == "Bearer sk-env"
    monkeypatch.delenv("OPENAI_API_KEY")
    server.requests.clear()
    VLMYesProb("m", backend="openai", base_url=server.url)(make_images(1, 64), ["a"])
    assert "Authorization" not in server.requests[0][1]


def test_server_no_yes_no_in_top_logprobs(server):
    server.mode = "no_answer"
    try:
        strict = VLMYesProb("tiny-vlm", backend="openai", base_url=server.url)
        with pytest.raises(RuntimeError, match="neither yes nor no"):
            strict(make_images(2, 64), PROMPTS[:2])
        lenient = VLMYesProb("tiny-vlm", backend="openai", base_url=server.url, missing_answer="neutral")
        assert torch.equal(lenient(make_images(2, 64), PROMPTS[:2]), torch.full((2,), 0.5))
    finally:
        server.mode = "ok"


def test_server_http_error(server):
    server.mode = "404"
    try:
        r = VLMYesProb("wrong-name", backend="openai", base_url=server.url, max_retries=3)
        start = time.time()
        with pytest.raises(RuntimeError, match="HTTP 404"):
            r(make_images(1, 64), ["a"])
        assert time.time() - start < 1.0  # a 4xx is not retried
    finally:
        server.mode = "ok"


def test_server_5xx_retried_then_fails(server):
    server.mode = "500"
    server.requests.clear()
    try:
        r = VLMYesProb("m", backend="openai", base_url=server.url, max_retries=1)
        with pytest.raises(ConnectionError, match="HTTP 500"):
            r(make_images(1, 64), ["a"])
        assert len(server.requests) == 2  # one retry, then the error
    finally:
        server.mode = "ok"


def test_server_unreachable_fails_fast():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    r = VLMYesProb("m", backend="openai", base_url=url, max_retries=1, timeout=2)
    start = time.time()
    with pytest.raises(ConnectionError) as info:
        r(make_images(3, 64), PROMPTS[:3])
    assert time.time() - start < 5
    assert f"{url}/chat/completions" in str(info.value) and "unreachable" in str(info.value)


def test_yes_prob_from_top():
    assert yes_prob_from_top([("Yes", -0.1), ("The", -3.0)]) == 1.0
    assert yes_prob_from_top([(" no", -0.1)]) == 0.0
    assert yes_prob_from_top([("The", -0.1), ("A", -2.0)]) is None
    p = yes_prob_from_top(
        [(" YES ", np.log(0.3)), ("yes", np.log(0.1)), ("No", np.log(0.2)), ("x", np.log(0.4))]
    )
    assert abs(p - 0.4 / 0.6) < 1e-12
