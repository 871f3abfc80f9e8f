"""VLM judges and the pairwise contract: UnifiedReward's pointwise score, the pairwise judges (RewardDance-style
P(yes) and UnifiedReward's ranking), the group win-rate rewards and the ordered pair cache.

The VLM is the tiny random Qwen2.5-VL of ``diffrl.rewards.tiny.vlm`` through the real loading path, and the
OpenAI-compatible test server of ``fake_vlm_server`` (the tiny VLM's logprobs, or canned answers a test sets, for
the parsing of real-looking answers, which a random model does not write).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_vlm_server import FakeVLMServer, pil, reference_answer, reference_logprobs
from reward_contract import check_reward_contract, make_images

from diffrl.hub import reward_hub_files
from diffrl.rewards import (
    CachedPairwiseReward,
    CachedReward,
    GroupWinRate,
    PairwiseReward,
    ScoreCache,
    WeightsNotFoundError,
    load_reward,
)
from diffrl.rewards.pairwise import all_pairs, group_rows, tournament_pairs, win_rates
from diffrl.rewards.tiny.vlm import build_tiny_vlm
from diffrl.rewards.vlm import DEFAULT_MODEL, VLMYesProb
from diffrl.rewards.vlm_judge import (
    PAIR_QUESTION,
    UNIFIEDREWARD_MODEL,
    UNIFIEDREWARD_PAIR_TEMPLATE,
    UNIFIEDREWARD_POINT_TEMPLATE,
    UnifiedRewardPairwiseJudge,
    UnifiedRewardPairwiseWinRate,
    UnifiedRewardScore,
    VLMPairwiseJudge,
    VLMPairwiseWinRate,
    parse_final_score,
    parse_pair_answer,
)

PROMPTS = ["a cat", "a red dog riding a bicycle", "x", "two birds over a lake at dawn"]

# The published prompts, transcribed line by line from github.com/CodeGoat24/UnifiedReward
# (inference_qwen/image_generation/qwen_point_score_image_generation.py and qwen_pair_rank_image_generation.py).
PUBLISHED_POINT = "\n".join(
    [
        "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
        "based on two key criteria:",
        "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the "
        "accuracy of depicted objects, their relationships, and attributes as described in the caption.",
        "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail preservation, "
        "color accuracy, and overall aesthetic appeal.",
        "Extract key elements from the provided text caption, evaluate their presence in the generated image using the "
        "format: 'element (type): value' (where value=0 means not generated, and value=1 means generated), and assign "
        "a score from 1 to 5 after 'Final Score:'.",
        "Your task is provided as follows:",
        "Text Caption: [{prompt}]",
    ]
)
PUBLISHED_PAIR = "\n".join(
    [
        "You are given a text caption and two generated images based on that caption. Your task is to evaluate and "
        "compare these images based on two key criteria:",
        "1. Alignment with the Caption: Assess how well each image aligns with the provided caption. Consider the "
        "accuracy of depicted objects, their relationships, and attributes as described in the caption.",
        "2. Overall Image Quality: Examine the visual quality of each image, including clarity, detail preservation, "
        "color accuracy, and overall aesthetic appeal.",
        "Compare both images using the above criteria and select the one that better aligns with the caption while "
        "exhibiting superior visual quality.",
        'Provide a clear conclusion such as "Image 1 is better.", "Image 2 is better." and "Both images are equally '
        'good."',
        "Your task is provided as follows:",
        "Text Caption: [{prompt}]",
    ]
)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_path)
    model = AutoModelForImageTextToText.from_pretrained(tiny_path).eval()
    return processor, model


@pytest.fixture(scope="module")
def server(tiny_model):
    s = FakeVLMServer(*tiny_model)
    yield s
    s.close()


@pytest.fixture
def fresh_server(server):
    server.mode, server.reply = "ok", None
    server.requests.clear()
    yield server
    server.mode, server.reply = "ok", None


def _ratio(logp: torch.Tensor, tok) -> float:
    yes = [tok.convert_tokens_to_ids(t) for t in ("Yes", "yes", "ĠYes", "Ġyes")]
    no = [tok.convert_tokens_to_ids(t) for t in ("No", "no", "ĠNo", "Ġno")]
    p = logp.exp()
    return float(p[yes].sum() / (p[yes].sum() + p[no].sum()))


def _flat(values) -> torch.Tensor:
    """Images of one colour each, (B, 3, 16, 16): the colour is the image's identity for the matrix judge."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 16, 16).contiguous()


# ---------------------------------------------------------------------------------------------- templates, parsing


def test_templates_are_the_published_ones():
    assert UNIFIEDREWARD_POINT_TEMPLATE == PUBLISHED_POINT
    assert UNIFIEDREWARD_PAIR_TEMPLATE == PUBLISHED_PAIR
    point = UnifiedRewardScore("m", backend="openai", base_url="http://127.0.0.1:1/v1")
    assert point.questions(["a {b} c"]) == [PUBLISHED_POINT.replace("{prompt}", "a {b} c")]
    assert point.questions(["a cat"])[0].endswith("\nText Caption: [a cat]")
    pair = UnifiedRewardPairwiseJudge("m", backend="openai", base_url="http://127.0.0.1:1/v1")
    assert pair.questions(["a cat"]) == [PUBLISHED_PAIR.replace("{prompt}", "a cat")]
    judge = VLMPairwiseJudge("m", backend="openai", base_url="http://127.0.0.1:1/v1")
    assert judge.questions(["a cat"]) == [PAIR_QUESTION.replace("{prompt}", "a cat")]
    assert '"a cat"' in judge.questions(["a cat"])[0] and "yes or no" in PAIR_QUESTION


def test_parse_final_score_as_the_reference():
    assert parse_final_score("cat (object): 1\nred (attribute): 0\nFinal Score: 4") == (4, True)
    assert parse_final_score("Final Score: 3.5") == (3, True)  # the reference reads \d+: the integer part
    assert parse_final_score("Final Score: **5**/5") == (5, True)
    # the last marker counts
    assert parse_final_score("Final Score: 2 ... on reflection, Final Score: 4") == (4, True)
    assert parse_final_score("cat (object): 1, and I stop") == (1, False)  # no marker: the whole answer
    assert parse_final_score("Final Score: none") == (None, True)
    assert parse_final_score("I cannot rate this.") == (None, False)
    assert parse_final_score("") == (None, False)
    assert parse_final_score(None) == (None, False)

    r = UnifiedRewardScore("m", backend="openai", base_url="http://127.0.0.1:1/v1")
    answers = [
        "a (object): 1\nFinal Score: 4",
        "garbage",
        "Final Score: 2024",
        "a (object): 1",
        "Final Score: 1",
    ]
    assert r.score_answers(answers) == pytest.approx([0.8, 0.0, 0.0, 0.2, 0.2])
    assert r.stats == {"answers": 5, "unparsed": 1, "no_marker": 2, "out_of_range": 1}
    strict = UnifiedRewardScore("m", backend="openai", base_url="http://127.0.0.1:1/v1", unparsed="raise")
    with pytest.raises(RuntimeError, match="2 of 3 answers hold no score"):
        strict.score_answers(["Final Score: 3", "x", "Final Score: 99"])


def test_parse_pair_answer():
    assert parse_pair_answer("Image 1 is better.") == 1.0
    assert parse_pair_answer("After comparing ... Image 2 is better than Image 1.") == 0.0
    assert parse_pair_answer("Both images are equally good.") == 0.5
    assert parse_pair_answer("image 1 is better") is None  # the reference matches the phrase as written
    assert parse_pair_answer("The first one.") is None
    assert parse_pair_answer("") is None and parse_pair_answer(None) is None
    judge = UnifiedRewardPairwiseJudge("m", backend="openai", base_url="http://127.0.0.1:1/v1")
    got = judge.read_answers(
        ["Image 2 is better.", "no idea", "Image 1 is better.", "Both images are equally good."]
    )
    assert got.tolist() == [0.0, 0.5, 1.0, 0.5]
    assert judge.stats == {"answers": 4, "unparsed": 1}
    strict = UnifiedRewardPairwiseJudge(
        "m", backend="openai", base_url="http://127.0.0.1:1/v1", unparsed="raise"
    )
    with pytest.raises(RuntimeError, match="1 of 2 answers name no better image"):
        strict.read_answers(["Image 1 is better.", "hmm"])


# ---------------------------------------------------------------------------------------------- win-rate maths

# P(row beats column) of four images; M + M.T = 1 off the diagonal
M = np.array(
    [
        [0.5, 0.9, 0.6, 1.0],
        [0.1, 0.5, 0.3, 0.8],
        [0.4, 0.7, 0.5, 0.5],
        [0.0, 0.2, 0.5, 0.5],
    ]
)


def test_win_rates_all_pairs_by_hand():
    pairs = all_pairs(4)
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    rates = win_rates(4, pairs, [M[i, j] for i, j in pairs])
    # by hand: (0.9 + 0.6 + 1.0) / 3, (0.1 + 0.3 + 0.8) / 3, (0.4 + 0.7 + 0.5) / 3, (0.0 + 0.2 + 0.5) / 3
    expected = torch.tensor([2.5 / 3, 1.2 / 3, 1.6 / 3, 0.7 / 3])
    torch.testing.assert_close(rates, expected)
    assert rates.dtype == torch.float32 and abs(rates.sum().item() - 2.0) < 1e-6  # n / 2
    # Pref-GRPO's counting: decisive answers win 1, ties half each: 0 beats 1, 0 ties 2, 2 beats 1
    torch.testing.assert_close(
        win_rates(3, [(0, 1), (0, 2), (1, 2)], [1.0, 0.5, 0.0]), torch.tensor([0.75, 0.0, 0.75])
    )
    # an image in no pair: 0.5
    assert win_rates(3, [(0, 1)], [1.0]).tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="one per pair"):
        win_rates(3, [(0, 1)], [1.0, 0.0])


def test_tournament_pairs():
    for n, k in [(8, 2), (8, 3), (8, 1), (7, 2), (7, 4), (10, 5)]:
        pairs = tournament_pairs(n, k, np.random.default_rng(0))
        assert len(pairs) == n * k // 2
        assert len({frozenset(p) for p in pairs}) == len(pairs) and all(i != j for i, j in pairs)
        degree = np.bincount(np.array(pairs).reshape(-1), minlength=n)
        assert (degree == k).all(), (n, k, degree)
    assert tournament_pairs(5, 4, np.random.default_rng(0)) == all_pairs(5)  # k >= n - 1: all pairs
    assert tournament_pairs(5, 9, np.random.default_rng(0)) == all_pairs(5)
    a = tournament_pairs(8, 2, np.random.default_rng(1))
    assert a == tournament_pairs(8, 2, np.random.default_rng(1))
    assert any(tournament_pairs(8, 2, np.random.default_rng(s)) != a for s in range(2, 6))
    with pytest.raises(ValueError, match="odd"):
        tournament_pairs(7, 3, np.random.default_rng(0))


def test_tournament_win_rates_on_the_matrix():
    big = np.random.default_rng(3).random((8, 8))
    big = np.triu(big, 1) + np.tril(1 - big.T, -1) + 0.5 * np.eye(8)  # P(i beats j) + P(j beats i) = 1
    pairs = tournament_pairs(8, 3, np.random.default_rng(0))
    rates = win_rates(8, pairs, [big[i, j] for i, j in pairs])
    for i in range(8):
        opponents = [j for a, b in pairs for j in (a, b) if i in (a, b) and j != i]
        assert len(opponents) == 3
        assert abs(rates[i].item() - np.mean([big[i, j] for j in opponents])) < 1e-6


# ---------------------------------------------------------------------------------------------- the group scorer


class MatrixJudge(PairwiseReward):
    """P(a beats b) read from a matrix; an image's colour (0.0, 0.1, 0.2, ...) is its index. Records its calls."""

    name = "matrix"

    def __init__(self, matrix, **kwargs):
        super().__init__(**kwargs)
        self.matrix = torch.as_tensor(matrix, dtype=torch.float32)
        self.calls: list[list[tuple[int, int]]] = []

    def settings(self):
        return {"matrix": self.matrix.tolist()}

    def compare_chunk(self, images_a, images_b, prompts, **metadata):
        ia = (images_a[:, 0, 0, 0] * 10).round().long().cpu()
        ib = (images_b[:, 0, 0, 0] * 10).round().long().cpu()
        self.calls.append(list(zip(ia.tolist(), ib.tolist(), strict=True)))
        return self.matrix[ia, ib]


def _matrix(n: int, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).random((n, n))
    return np.triu(m, 1) + np.tril(1 - m.T, -1) + 0.5 * np.eye(n)


def test_group_winrate_groups_rows_by_prompt_and_metadata():
    m = _matrix(8)
    reward = GroupWinRate(MatrixJudge(m))
    assert reward.name == "matrix_winrate" and reward.per_sample is False and reward.differentiable is False
    images = _flat([i / 10 for i in range(8)])
    prompts = ["a"] * 4 + ["b"] * 4  # two groups of four, as expand_groups lays them out
    got = reward(images, prompts)
    expected = [
        np.mean([m[i, j] for j in range(g, g + 4) if j != i]) for g in (0, 4) for i in range(g, g + 4)
    ]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    assert reward.comparisons == 12  # 2 groups x 6 pairs, never across groups
    # interleaved rows group the same way
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    torch.testing.assert_close(reward(images[order], [prompts[i] for i in order]), got[order])
    # equal prompts with other metadata are other groups
    assert group_rows(["a"] * 4, {"tag": [1, 1, 2, 2]}, 4) == [[0, 1], [2, 3]]
    split = reward(images[:4], ["a"] * 4, tag=[1, 1, 2, 2])
    torch.testing.assert_close(split, torch.tensor([m[0, 1], m[1, 0], m[2, 3], m[3, 2]], dtype=torch.float32))
    # a lone image: 0.5
    assert reward(images[:3], ["a", "b", "c"]).tolist() == [0.5, 0.5, 0.5]


def test_group_winrate_contract_and_tournament():
    m = _matrix(8, seed=1)
    images = _flat([i / 10 for i in range(8)])
    prompts = ["p"] * 8
    everyone = GroupWinRate(MatrixJudge(m))
    scores = check_reward_contract(everyone, images, prompts)
    assert abs(scores.sum().item() - 4.0) < 1e-5  # all pairs, symmetric judge: the rates sum to n / 2

    judge = MatrixJudge(m)
    tour = GroupWinRate(judge, opponents=3, seed=5)
    # deterministic, and chunking (batch_size=1) changes nothing
    scores = check_reward_contract(tour, images, prompts)
    judge.calls.clear()
    again = tour(images, prompts)
    assert torch.equal(again, scores)
    pairs = [p for call in judge.calls for p in call]
    assert len(pairs) == 12 and (np.bincount(np.array(pairs).reshape(-1), minlength=8) == 3).all()
    for i in range(8):
        opponents = [
            (j, p) for (a, b) in pairs for j, p in ((b, m[a, b]), (a, m[b, a])) if i in (a, b) and j != i
        ]
        mine = [m[i, j] for j, _ in opponents]
        assert abs(scores[i].item() - np.mean(mine)) < 1e-6
    other_seed = GroupWinRate(MatrixJudge(m), opponents=3, seed=6)(images, prompts)
    assert not torch.equal(other_seed, scores)  # another draw
    with pytest.raises(ValueError, match="odd"):
        tour(images[:7], prompts[:7])


def test_group_winrate_bad_input_and_no_per_image_cache():
    with pytest.raises(TypeError, match="PairwiseReward"):
        GroupWinRate(load_reward("brightness"))
    with pytest.raises(ValueError, match="opponents=0"):
        GroupWinRate(MatrixJudge(M), opponents=0)
    with pytest.raises(ValueError, match="seed"):
        GroupWinRate(MatrixJudge(M), seed="x")
    with pytest.raises(ValueError, match="per_sample=False"):
        CachedReward(GroupWinRate(MatrixJudge(M)))

    class Broken(MatrixJudge):
        def compare_chunk(self, images_a, images_b, prompts, **metadata):
            return super().compare_chunk(images_a, images_b, prompts) * 2

    with pytest.raises(ValueError, match="not probabilities"):
        Broken(M * 2).compare(_flat([0.0]), _flat([0.1]), ["a"])
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        MatrixJudge(M).compare(_flat([0.0]), _flat([0.1]), ["a", "b"])


class BrighterJudge(PairwiseReward):
    """P(a beats b) = sigmoid(20 * (mean(a) - mean(b))): a judge that likes bright images; records the prompts."""

    name = "brighter"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.prompts: list[list[str]] = []

    def compare_chunk(self, images_a, images_b, prompts, **metadata):
        self.prompts.append(list(prompts))
        return torch.sigmoid(20 * (images_a.mean((1, 2, 3)) - images_b.mean((1, 2, 3))))


def test_group_winrate_trains_with_flow_grpo(tmp_path, monkeypatch):
    """One Flow-GRPO step on the tiny SD3 pipeline: the engine scores the whole batch in one call, the groups are
    the consecutive rows of each prompt, and a group's win rates average 0.5."""
    import json
    from pathlib import Path

    from diffrl.train import build_trainer

    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path / "cache"))
    root = Path(__file__).resolve().parents[1]
    batches = []

    class Spy(GroupWinRate):
        def __call__(self, images, prompts, **metadata):
            batches.append(list(prompts))
            return super().__call__(images, prompts, **metadata)

    reward = Spy(BrighterJudge())
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "max_steps=1",
        f"data.train={root / 'configs/tiny/prompts.txt'}",
    ]
    build_trainer(root / "configs" / "tiny" / "flow_grpo.yaml", overrides, reward=reward).train()
    # 2 prompts x group_size 4 in one call (evaluation scores one image per prompt: lone images)
    train = [b for b in batches if len(b) == 8]
    assert len(train) == 1 and [len(g) for g in group_rows(train[0], {}, 8)] == [4, 4]
    assert group_rows(train[0], {}, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert reward.comparisons == 12  # 2 groups x 6 pairs
    assert [len(p) for p in reward.judge.prompts] == [
        12
    ]  # in one call of the judge; lone images cost nothing
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "reward/brighter_winrate/mean" in m)
    assert abs(step["reward/brighter_winrate/mean"] - 0.5) < 1e-6 and step["reward/brighter_winrate/std"] > 0


# ---------------------------------------------------------------------------------------------- the pair cache


def test_pair_cache_is_ordered_and_skips_the_judge(tmp_path):
    judge = MatrixJudge(M)
    cached = CachedPairwiseReward(judge, tmp_path / "pairs.sqlite")
    a, b = _flat([0.0, 0.1]), _flat([0.2, 0.3])
    first = cached.compare(a, b, ["x", "y"])
    torch.testing.assert_close(first, torch.tensor([M[0, 2], M[1, 3]], dtype=torch.float32))
    assert len(judge.calls) == 1 and (cached.cache.hits, cached.cache.misses) == (0, 2)
    assert torch.equal(cached.compare(a, b, ["x", "y"]), first)
    assert len(judge.calls) == 1 and cached.cache.hits == 2  # served: the judge was not called
    assert cached.pair_keys(a, b, ["x", "y"], {}) != cached.pair_keys(b, a, ["x", "y"], {})
    swapped = cached.compare(b, a, ["x", "y"])  # (b, a) is another key: judged
    assert len(judge.calls) == 2 and judge.calls[-1] == [(2, 0), (3, 1)]
    torch.testing.assert_close(swapped, torch.tensor([M[2, 0], M[3, 1]], dtype=torch.float32))
    cached.compare(a, b, ["x", "other prompt"])  # another prompt: judged
    assert judge.calls[-1] == [(1, 3)]
    # the cache is a file: a new judge with the same matrix gets the answers without being called
    cached.cache.close()
    fresh = MatrixJudge(M)
    again = CachedPairwiseReward(fresh, ScoreCache(tmp_path / "pairs.sqlite"))
    assert torch.equal(again.compare(a, b, ["x", "y"]), first) and fresh.calls == []
    # another matrix is another fingerprint: never served these answers
    other = MatrixJudge(M.T)
    CachedPairwiseReward(other, ScoreCache(tmp_path / "pairs.sqlite")).compare(a, b, ["x", "y"])
    assert len(other.calls) == 1


# ---------------------------------------------------------------------------------------------- VLM pairwise judge


def test_vlm_pairwise_matches_the_model_and_averages_both_orders(tiny_path, tiny_model):
    processor, model = tiny_model
    a, b = make_images(3, 64, seed=3), make_images(3, 64, seed=4)
    prompts = PROMPTS[:3]
    single = VLMPairwiseJudge(str(tiny_path), both_orders=False)
    p_ab = single.compare(a, b, prompts)
    p_ba = single.compare(b, a, prompts)
    for i in range(3):  # one request, no padding, softmax over the whole vocabulary
        logp = reference_logprobs(
            processor, model, [pil(a[i]), pil(b[i])], PAIR_QUESTION.replace("{prompt}", prompts[i])
        )
        assert abs(p_ab[i].item() - _ratio(logp, processor.tokenizer)) < 1e-5
    assert (p_ab + p_ba - 1).abs().max() > 0.01  # the tiny VLM has a position bias, as real ones do
    both = VLMPairwiseJudge(str(tiny_path))
    got = both.compare(a, b, prompts)
    torch.testing.assert_close(got, (p_ab + 1 - p_ba) / 2, rtol=0, atol=1e-5)
    torch.testing.assert_close(got + both.compare(b, a, prompts), torch.ones(3), rtol=0, atol=1e-5)
    both.batch_size = 1  # chunking changes nothing
    torch.testing.assert_close(both.compare(a, b, prompts), got, rtol=0, atol=1e-5)


def test_vlm_pairwise_server_matches_local(tiny_path, fresh_server):
    a, b = make_images(2, 64, seed=5), make_images(2, 64, seed=6)
    local = VLMPairwiseJudge(str(tiny_path)).compare(a, b, PROMPTS[:2])
    remote = VLMPairwiseJudge("tiny-vlm", backend="openai", base_url=fresh_server.url, max_concurrency=2)
    torch.testing.assert_close(remote.compare(a, b, PROMPTS[:2]), local, rtol=0, atol=1e-5)
    bodies = [body for body, _ in fresh_server.requests]
    assert len(bodies) == 4 and all(body["max_tokens"] == 1 and body["logprobs"] for body in bodies)
    sent = {}
    for body in bodies:
        images, text = FakeVLMServer.parts(body)
        assert len(images) == 2
        sent.setdefault(text, []).append([np.asarray(im) for im in images])
    for i, prompt in enumerate(PROMPTS[:2]):  # (a, b) and (b, a), losslessly
        asked = sent[PAIR_QUESTION.replace("{prompt}", prompt)]
        expected = [np.asarray(pil(a[i])), np.asarray(pil(b[i]))]
        assert any(all((x == y).all() for x, y in zip(req, expected, strict=True)) for req in asked)
        assert any(all((x == y).all() for x, y in zip(req, expected[::-1], strict=True)) for req in asked)


def test_vlm_pairwise_winrate_reward(tiny_path, tmp_path):
    reward = load_reward("vlm_pairwise_winrate", model=str(tiny_path), cache=str(tmp_path / "pairs.sqlite"))
    assert isinstance(reward, VLMPairwiseWinRate) and reward.name == "vlm_pairwise_winrate"
    images = make_images(6, 64, seed=7)
    prompts = ["a cat"] * 3 + ["two birds"] * 3
    calls = []
    scores = check_reward_contract(reward, images, prompts)
    judge = reward.judge.judge  # inside the pair cache
    handle = judge.vlm.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert torch.equal(reward(images, prompts), scores) and calls == []  # every pair from the cache
    finally:
        handle.remove()
    for group in (scores[:3], scores[3:]):
        assert abs(group.sum().item() - 1.5) < 1e-5  # both orders averaged: each group's rates sum to n / 2
    # the win rates of the judge's own comparisons, group by group (the tiny VLM's preferences are weak but real)
    direct = VLMPairwiseJudge(str(tiny_path))
    expected = []
    for g in (0, 3):
        pairs = all_pairs(3)
        probs = direct.compare(
            images[[g + i for i, _ in pairs]], images[[g + j for _, j in pairs]], [prompts[g]] * 3
        )
        expected.append(win_rates(3, pairs, probs))
    torch.testing.assert_close(scores, torch.cat(expected), rtol=0, atol=1e-5)
    assert scores.std() > 1e-3


# ---------------------------------------------------------------------------------------------- UnifiedReward


def test_unifiedreward_local_generates_and_parses(tiny_path, tiny_model):
    processor, model = tiny_model
    reward = load_reward("unifiedreward", model=str(tiny_path), max_new_tokens=6)
    images = make_images(3, 64, seed=8)
    scores = check_reward_contract(reward, images, PROMPTS[:3])
    answers = reward.answers(images, PROMPTS[:3])  # batched, left padded
    for i in range(3):
        ref = reference_answer(
            processor, model, [pil(images[i])], PUBLISHED_POINT.replace("{prompt}", PROMPTS[i]), 6
        )
        assert answers[i] == ref
    # a random model writes no score: every answer is unparsed, scored 0 and counted (as the reference does)
    values = [parse_final_score(a)[0] for a in answers]
    assert scores.tolist() == [v / 5 if v is not None and v <= 5 else 0.0 for v in values]
    assert reward.stats["answers"] >= 3 and reward.stats["unparsed"] == reward.stats["answers"]


def test_unifiedreward_server_parses_answers(fresh_server):
    def reply(images, text):
        assert len(images) == 1 and text.startswith("You are given a text caption and a generated image")
        level = round(float(np.asarray(images[0]).mean()) / 255 * 10)
        if level >= 9:
            return "I cannot judge this image."  # garbage
        return f"cat (object): 1\nred (attribute): 0\nFinal Score: {1 + level % 5}"

    fresh_server.reply = reply
    reward = UnifiedRewardScore(
        "UnifiedReward", backend="openai", base_url=fresh_server.url, max_new_tokens=300
    )
    images = _flat([0.0, 0.1, 0.3, 0.95]).repeat(1, 1, 4, 4)
    scores = check_reward_contract(reward, images, PROMPTS)
    torch.testing.assert_close(scores, torch.tensor([1 / 5, 2 / 5, 4 / 5, 0.0]))
    assert (
        reward.stats["unparsed"] == reward.stats["answers"] // 4
        and reward.last_answers[-1] == "I cannot judge this image."
    )
    body = fresh_server.requests[0][0]
    assert body["model"] == "UnifiedReward" and body["max_tokens"] == 300 and body["temperature"] == 0
    assert "logprobs" not in body
    texts = {FakeVLMServer.parts(b)[1] for b, _ in fresh_server.requests}
    assert texts == {PUBLISHED_POINT.replace("{prompt}", p) for p in PROMPTS}


def test_unifiedreward_pairwise_winrate_from_server_answers(fresh_server):
    def reply(images, text):  # a judge that prefers the brighter image, and says nothing for near-equal ones
        assert len(images) == 2 and text == PUBLISHED_PAIR.replace("{prompt}", "a lamp")
        first, second = (float(np.asarray(im).mean()) for im in images)
        if abs(first - second) < 10:
            return "Hard to say."
        return "Image 1 is better." if first > second else "Image 2 is better than Image 1."

    fresh_server.reply = reply
    reward = load_reward(
        "unifiedreward_pairwise_winrate", model="UnifiedReward", backend="openai", base_url=fresh_server.url
    )
    assert isinstance(reward, UnifiedRewardPairwiseWinRate) and reward.per_sample is False
    images = _flat([0.2, 0.8, 0.5, 0.52])
    scores = reward(images, ["a lamp"] * 4)
    # 0.8 beats all; 0.5 and 0.52 tie (unparsed -> half each) and beat 0.2; 0.2 loses all
    torch.testing.assert_close(scores, torch.tensor([0.0, 1.0, 0.5, 0.5]))
    assert reward.judge.stats == {"answers": 6, "unparsed": 1} and len(fresh_server.requests) == 6
    both = UnifiedRewardPairwiseJudge(
        "UnifiedReward", backend="openai", base_url=fresh_server.url, both_orders=True
    )
    torch.testing.assert_close(both.compare(images[:2], images[2:], ["a lamp"] * 2), torch.tensor([0.0, 1.0]))


def test_unifiedreward_pairwise_local(tiny_path, tiny_model):
    processor, model = tiny_model
    judge = UnifiedRewardPairwiseJudge(str(tiny_path), max_new_tokens=5)
    a, b = make_images(2, 64, seed=9), make_images(2, 64, seed=10)
    got = judge.compare(a, b, PROMPTS[:2])
    for i in range(2):
        text = PUBLISHED_PAIR.replace("{prompt}", PROMPTS[i])
        assert judge.last_answers[i] == reference_answer(processor, model, [pil(a[i]), pil(b[i])], text, 5)
    values = [parse_pair_answer(t) for t in judge.last_answers]
    assert got.tolist() == [v if v is not None else 0.5 for v in values]
    assert judge.stats["answers"] == 2


# ---------------------------------------------------------------------------------------------- options, files


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        VLMPairwiseJudge(question="Is the first one better? yes or no")
    with pytest.raises(ValueError, match="both_orders"):
        VLMPairwiseJudge(both_orders="yes")
    with pytest.raises(ValueError, match="missing_answer"):
        VLMPairwiseJudge(missing_answer="zero")
    with pytest.raises(ValueError, match="backend"):
        UnifiedRewardScore(backend="vllm")
    with pytest.raises(ValueError, match="base_url"):
        UnifiedRewardPairwiseJudge(backend="openai")
    with pytest.raises(ValueError, match="max_new_tokens"):
        UnifiedRewardScore(max_new_tokens=0)
    with pytest.raises(ValueError, match="max_score"):
        UnifiedRewardScore(max_score=0)
    with pytest.raises(ValueError, match="unparsed"):
        UnifiedRewardScore(unparsed="skip")
    with pytest.raises(ValueError, match="unparsed"):
        UnifiedRewardPairwiseJudge(unparsed="zero")
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        UnifiedRewardScore(template="Rate this image from 1 to 5.")
    with pytest.raises(ValueError, match="has no option 'questoin'"):
        load_reward("vlm_pairwise_winrate", questoin="x")
    with pytest.raises(ValueError, match="opponents"):
        load_reward("unifiedreward_pairwise_winrate", opponents=-1)


def test_hub_files_and_offline_error():
    point = UnifiedRewardScore.hub_files()
    assert {f.repo_id for f in point} == {UNIFIEDREWARD_MODEL}
    assert {f.filename for f in point if not f.optional} == {"config.json", "tokenizer_config.json"}
    assert UnifiedRewardScore.hub_files(backend="openai") == []
    assert reward_hub_files("vlm_pairwise_winrate", {}) == VLMYesProb.hub_files()
    assert {f.repo_id for f in reward_hub_files("vlm_pairwise_winrate", {"opponents": 2})} == {DEFAULT_MODEL}
    pair = reward_hub_files(
        "unifiedreward_pairwise_winrate", {"opponents": 2, "model": "me/judge", "revision": "r1"}
    )
    assert {(f.repo_id, f.revision) for f in pair} == {("me/judge", "r1")}
    with pytest.raises(WeightsNotFoundError, match="diffrl download unifiedreward"):
        UnifiedRewardScore().load()
    with pytest.raises(WeightsNotFoundError, match="diffrl download unifiedreward_pairwise_winrate") as info:
        load_reward("unifiedreward_pairwise_winrate").load()
    assert f"{UNIFIEDREWARD_MODEL}/config.json" in str(info.value)


def _disc_and_square(size: int = 448) -> torch.Tensor:
    """A red disc on white and a blue square on black, (2, 3, size, size)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = ((xs - 0.5) ** 2 + (ys - 0.5) ** 2 < 0.09).float()
    square = (((xs - 0.5).abs() < 0.25) & ((ys - 0.5).abs() < 0.25)).float()
    red_disc = torch.stack([torch.ones_like(disc), 1 - disc, 1 - disc])
    blue_square = torch.stack([torch.zeros_like(square), torch.zeros_like(square), square])
    return torch.stack([red_disc, blue_square])


@pytest.mark.weights
def test_real_unifiedreward_scores_the_matching_image_higher():
    """UnifiedReward-qwen-7b writes a parseable score, and rates the image that shows the prompt above the one
    that does not."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reward = UnifiedRewardScore(device=device, dtype=dtype)
    scores = reward(_disc_and_square(), ["a red circle on a white background"] * 2)
    assert reward.stats["unparsed"] == 0 and reward.stats["no_marker"] == 0, reward.last_answers
    assert scores[0] > scores[1], (scores, reward.last_answers)


@pytest.mark.weights
def test_real_pairwise_judges_prefer_the_matching_image():
    """Qwen2.5-VL-7B (P(yes), both orders) and UnifiedReward-qwen-7b (its ranking) prefer the red disc for a red
    circle prompt, in either position."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    images = _disc_and_square()
    prompt = ["a red circle on a white background"]
    yes = VLMPairwiseJudge(device=device, dtype=dtype)
    assert yes.compare(images[:1], images[1:], prompt).item() > 0.7
    ranking = UnifiedRewardPairwiseJudge(device=device, dtype=dtype, both_orders=True)
    assert ranking.compare(images[:1], images[1:], prompt).item() == 1.0, ranking.last_answers
