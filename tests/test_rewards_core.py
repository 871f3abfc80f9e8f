"""The reward contract, custom rewards, the registry, combinations, the score cache, weights and JPEG rewards."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from reward_contract import check_reward_contract, finite_difference_check, make_images

from diffrl.rewards import (
    CachedReward,
    CombinedReward,
    HubFile,
    Reward,
    ScoreCache,
    WeightsNotFoundError,
    as_reward,
    available_rewards,
    load_reward,
    register_reward,
)
from diffrl.rewards.registry import REWARDS
from diffrl.rewards.weights import resolve_file, resolve_snapshot

PROMPTS = ["a red circle", "two blue squares", "a cat", "a green triangle"]


def brightness(images, prompts, **metadata):
    return images.mean(dim=(1, 2, 3))


def redness_list(images, prompts, **metadata):
    return [float(x) for x in images[:, 0].mean(dim=(1, 2))]


def count_match(images, prompts, count=None, **metadata):
    return np.asarray([float(c) for c in count])


class Weighted(Reward):
    """A tiny differentiable reward with weights (a linear layer on pooled pixels)."""

    name = "weighted"
    differentiable = True

    def __init__(self, seed=0, **kw):
        super().__init__(**kw)
        self.seed = seed
        self.loads = 0

    def _load(self):
        self.loads += 1
        torch.manual_seed(self.seed)
        self.head = torch.nn.Linear(3, 1).to(self.device)

    def score(self, images, prompts, **metadata):
        return self.head(images.mean(dim=(2, 3)))[:, 0]


def test_function_rewards_follow_the_contract():
    images = make_images(4)
    scores = check_reward_contract(as_reward(brightness, differentiable=True), images, PROMPTS)
    torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)))
    check_reward_contract(as_reward(redness_list), images, PROMPTS)
    finite_difference_check(as_reward(brightness, differentiable=True), images, PROMPTS)
    assert as_reward(brightness).name == "brightness"
    assert as_reward(brightness, name="bright").name == "bright"


def test_metadata_is_split_per_chunk():
    images = make_images(4)
    reward = as_reward(count_match, batch_size=3)
    torch.testing.assert_close(reward(images, PROMPTS, count=[1, 2, 3, 4]), torch.tensor([1.0, 2, 3, 4]))
    torch.testing.assert_close(
        reward(images, PROMPTS, count=torch.tensor([4, 3, 2, 1])), torch.tensor([4.0, 3, 2, 1])
    )


def test_weighted_reward_contract_lazy_load_and_device():
    reward = Weighted(batch_size=2)
    assert reward.loads == 0  # nothing loaded at construction
    check_reward_contract(reward, make_images(4), PROMPTS)
    assert reward.loads == 1
    assert reward.device == torch.device("cpu")


def test_score_only_reward_returns_detached_and_runs_under_no_grad():
    images = make_images(2).requires_grad_(True)
    out = as_reward(brightness)(images, PROMPTS[:2])
    assert not out.requires_grad
    with torch.no_grad():
        assert not as_reward(brightness, differentiable=True)(images, PROMPTS[:2]).requires_grad


def test_bad_inputs_and_outputs_raise():
    reward = as_reward(brightness)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(torch.rand(3, 32, 32), PROMPTS[:3])
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(make_images(2), PROMPTS[:3])
    with pytest.raises(ValueError, match="uint8"):
        reward((make_images(2) * 255).to(torch.uint8), PROMPTS[:2])
    with pytest.raises(ValueError, match="one score per image"):
        as_reward(lambda im, p, **k: [1.0])(make_images(2), PROMPTS[:2])
    with pytest.raises(TypeError, match="not numbers"):
        as_reward(lambda im, p, **k: ["a", "b"])(make_images(2), PROMPTS[:2])
    with pytest.raises(ValueError, match="batch_size"):
        as_reward(brightness, batch_size=0)
    with pytest.raises(TypeError, match="callable"):
        as_reward(3)


def test_registry_names_specs_and_errors():
    assert {"hpsv2", "pickscore", "imagereward", "aesthetic", "clipscore", "vlm_yes_prob"} <= set(
        available_rewards()
    )
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(available_rewards())
    with pytest.raises(ValueError, match="unknown reward 'nope'; available: .*hpsv2"):
        load_reward("nope")
    reward = load_reward("test_rewards_core:brightness", differentiable=True)
    assert reward.name == "brightness" and reward.differentiable
    assert isinstance(load_reward("test_rewards_core:Weighted", seed=1), Weighted)
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        load_reward("test_rewards_core:missing")
    with pytest.raises(ImportError, match="cannot import module"):
        load_reward("no_such_module_xyz:fn")
    # an option the reward does not take, or an attribute that is not a reward: one sentence, not a TypeError
    with pytest.raises(
        ValueError, match=r"reward 'saturation' has no option 'batchsize' \(did you mean batch_size\?\)"
    ):
        load_reward("saturation", batchsize=4)
    with pytest.raises(ValueError, match=r"has no option 'colour'; its options are name, differentiable"):
        load_reward("test_rewards_core:brightness", colour=1)
    with pytest.raises(ValueError, match=r"reward 'test_rewards_core:PROMPTS' is a list, not a reward"):
        load_reward("test_rewards_core:PROMPTS")
    built = Weighted()
    assert load_reward(built) is built
    with pytest.raises(ValueError, match="already built"):
        load_reward(built, seed=3)


def test_register_reward_decorator():
    @register_reward("unit_test_reward")
    def unit_test_reward(images, prompts, **metadata):
        return torch.ones(images.shape[0])

    try:
        assert load_reward("unit_test_reward")(make_images(2), PROMPTS[:2]).tolist() == [1.0, 1.0]
    finally:
        REWARDS.pop("unit_test_reward")


def test_combined_reward_sums_weights_and_logs_components():
    images = make_images(4)
    combo = CombinedReward({as_reward(brightness, differentiable=True): 2.0, Weighted(): -0.5})
    out = combo.evaluate(images, PROMPTS)
    b, w = brightness(images, PROMPTS), Weighted()(images, PROMPTS).detach()
    torch.testing.assert_close(out.total.detach(), 2 * b - 0.5 * w)
    assert set(out.components) == {"brightness", "weighted"}
    torch.testing.assert_close(out.components["weighted"], w)
    assert combo.differentiable
    check_reward_contract(combo, images, PROMPTS)
    # a score-only part makes the combination score-only, unless its weight is 0
    assert not CombinedReward(
        [(as_reward(brightness, differentiable=True), 1.0), (as_reward(redness_list), 1.0)]
    ).differentiable
    assert CombinedReward(
        [(as_reward(brightness, differentiable=True), 1.0), (as_reward(redness_list), 0.0)]
    ).differentiable


def test_combined_reward_batch_normalisation():
    images = make_images(4)
    combo = CombinedReward([(as_reward(brightness), 1.0), (as_reward(redness_list), 1.0)], normalize="batch")
    total = combo(images, PROMPTS)

    def z(x):
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-6)

    b = brightness(images, PROMPTS)
    r = torch.tensor(redness_list(images, PROMPTS))
    torch.testing.assert_close(total, z(b) + z(r))
    with pytest.raises(ValueError, match="normalize"):
        CombinedReward({"jpeg_compressibility": 1.0}, normalize="minmax")
    with pytest.raises(ValueError, match="repeat"):
        CombinedReward([(as_reward(brightness), 1.0), (as_reward(brightness), 1.0)])


def test_group_normalisation_z_scores_each_reward_within_its_prompts_images():
    """Two prompts of three images and a lone one (the metadata tells two same-text prompts apart): each part is
    z-scored with its group's mean and n - 1 std (+ 1e-8), by hand; the lone image scores 0."""
    a = torch.tensor([1.0, 2.0, 4.0, 10.0, 10.0, 13.0, 7.0])
    b = torch.tensor([0.5, 0.1, 0.3, -1.0, 2.0, 5.0, 3.0])
    prompts = ["p", "p", "p", "q", "q", "q", "p"]
    meta = {"seed": [0, 0, 0, 0, 0, 0, 1]}
    combo = CombinedReward(
        [
            (as_reward(lambda images, prompts, **m: a, name="a"), 0.4),
            (as_reward(lambda images, prompts, **m: b, name="b"), 0.6),
        ],
        normalize="group",
    )
    assert not combo.per_sample
    total = combo(make_images(7), prompts, **meta)

    def z(x):
        m = sum(x) / len(x)
        s = (sum((v - m) ** 2 for v in x) / (len(x) - 1)) ** 0.5
        return [(v - m) / (s + 1e-8) for v in x]

    expect = [
        0.4 * u + 0.6 * v
        for u, v in zip(z([1, 2, 4]) + z([10, 10, 13]), z([0.5, 0.1, 0.3]) + z([-1, 2, 5]), strict=True)
    ]
    torch.testing.assert_close(total, torch.tensor([*expect, 0.0]), rtol=1e-6, atol=1e-6)


def test_running_normalisation_updates_statistics():
    combo = CombinedReward([(as_reward(brightness), 1.0)], normalize="running", momentum=0.5)
    images = make_images(4)
    first = combo(images, PROMPTS)
    second = combo(images * 0.5, PROMPTS)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    mean, _ = combo._running["brightness"]
    b1, b2 = brightness(images, PROMPTS).mean().item(), brightness(images * 0.5, PROMPTS).mean().item()
    assert mean == pytest.approx(0.5 * (0.5 * b1 + 0.5 * b1) + 0.5 * b2, rel=1e-5)


def test_running_statistics_round_trip_through_training_state():
    import json

    parts = [(as_reward(brightness), 1.0), (as_reward(redness_list), 0.5)]
    combo = CombinedReward(parts, normalize="running", momentum=0.5)
    images = make_images(4)
    combo(images, PROMPTS)
    combo(images * 0.5, PROMPTS)
    state = json.loads(json.dumps(combo.training_state()))  # what a checkpoint's state.json holds
    assert set(state["running"]) == {"brightness", "redness_list"}
    restored = CombinedReward(parts, normalize="running", momentum=0.5)
    restored.load_training_state(state)
    assert restored._running == combo._running
    torch.testing.assert_close(restored(images, PROMPTS), combo(images, PROMPTS), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not match this reward's parts"):
        CombinedReward([(as_reward(brightness), 1.0)], normalize="running").load_training_state(state)
    assert as_reward(brightness).training_state() == {}  # a plain reward has no state


def test_running_statistics_frozen_for_evaluation_and_safe_from_non_finite_scores():
    combo = CombinedReward([(as_reward(brightness), 1.0)], normalize="running", momentum=0.5)
    images = make_images(4)
    combo(images, PROMPTS)
    stats = dict(combo._running)
    with combo.frozen_statistics():
        frozen = combo(images * 0.5, PROMPTS)
    assert combo._running == stats  # evaluation did not move them
    mean, var = stats["brightness"]
    expected = (brightness(images * 0.5, PROMPTS) - mean) / (var**0.5 + 1e-6)
    torch.testing.assert_close(frozen, expected)
    bad = images.clone()
    bad[0] = float("nan")
    out = combo(bad, PROMPTS)
    assert not torch.isfinite(out[0])  # the trainers see the bad score and skip the step ...
    assert combo._running == stats  # ... and the statistics stay finite and unchanged
    combo(images * 0.5, PROMPTS)
    b = brightness(images * 0.5, PROMPTS)
    assert combo._running["brightness"] == pytest.approx(
        (0.5 * mean + 0.5 * float(b.mean()), 0.5 * var + 0.5 * float(b.var(unbiased=False)))
    )


def test_fixed_batch_statistics_normalise_parts_as_the_whole_batch():
    # ReFL scores a step in micro-batches: statistics of the whole batch, applied to each part, give the totals of
    # the whole batch, and no gradient flows through the statistics
    bright = as_reward(brightness, differentiable=True)
    combo = CombinedReward([(bright, 1.0), (as_reward(redness_list), 0.0)], normalize="batch")
    images = make_images(4).requires_grad_(True)
    stats = combo.batch_statistics(combo.evaluate(images, PROMPTS).components)
    assert set(stats) == {"brightness"}  # weight-0 parts are not normalised
    with combo.fixed_statistics(stats):
        parts = [combo(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)]
    b = brightness(images, PROMPTS).detach()
    expected = (b - b.mean()) / (b.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(torch.cat(parts).detach(), expected)
    (grad,) = torch.autograd.grad(parts[0].sum(), images)
    std = stats["brightness"][1]
    (direct,) = torch.autograd.grad(brightness(images[:1], PROMPTS[:1]).sum() / (std + 1e-6), images)
    torch.testing.assert_close(grad, direct)
    assert combo._fixed is None  # only inside the context
    with pytest.raises(ValueError, match="normalize='batch'"):
        with CombinedReward([(bright, 1.0)], normalize="running").fixed_statistics(stats):
            pass


def test_total_from_split_batches_equals_the_whole_batch_total():
    # Flow-GRPO / DiffusionNFT over processes: each process scores its share, the raw components are gathered and
    # every share's total is z-scored with the whole batch's statistics
    combo = CombinedReward(
        [
            (as_reward(brightness), 1.0),
            (as_reward(redness_list), 0.5),
            (as_reward(brightness, name="b0"), 0.0),
        ],
        normalize="batch",
    )
    images = make_images(6)
    prompts = PROMPTS + PROMPTS[:2]
    whole = combo.evaluate(images, prompts)
    shares = [combo.evaluate(images[i : i + 3], prompts[i : i + 3]) for i in (0, 3)]
    gathered = {k: torch.cat([sh.components[k] for sh in shares]) for k in whole.components}
    stats = combo.batch_statistics(gathered)
    totals = torch.cat([combo.total_from(sh.components, stats) for sh in shares])
    torch.testing.assert_close(totals, whole.total, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shares[0].total, totals[:3])  # each share alone is normalised differently
    with pytest.raises(ValueError, match="normalize='batch'"):
        CombinedReward([(as_reward(brightness), 1.0)], normalize="running").total_from(gathered, stats)


def test_score_cache_hits_and_never_serves_stale_scores(tmp_path):
    images = make_images(4)
    cache = ScoreCache(tmp_path / "scores.sqlite")
    inner = Weighted(seed=0)
    reward = CachedReward(inner, cache)
    first = reward(images, PROMPTS)
    assert (cache.hits, cache.misses) == (0, 4)
    torch.testing.assert_close(first, inner(images, PROMPTS).detach())
    second = reward(images, PROMPTS)
    assert (cache.hits, cache.misses) == (4, 4) and torch.equal(first, second)
    # new images and new prompts are scored, the rest served
    mixed = torch.cat([images[:2], make_images(2, seed=9)])
    reward(mixed, PROMPTS[:2] + ["x", "y"])
    assert (cache.hits, cache.misses) == (6, 6)
    # other weights (another seed) or other settings never get these scores
    other = CachedReward(Weighted(seed=1), cache)
    torch.testing.assert_close(other(images, PROMPTS), Weighted(seed=1)(images, PROMPTS).detach())
    assert cache.misses == 10
    # weights changed in place are a different reward too
    changed = Weighted(seed=0)
    changed.load()
    with torch.no_grad():
        changed.head.bias += 1
    torch.testing.assert_close(CachedReward(changed, cache)(images, PROMPTS), first + 1)
    # the cache persists across processes (a file)
    cache.close()
    again = CachedReward(Weighted(seed=0), ScoreCache(tmp_path / "scores.sqlite"))
    torch.testing.assert_close(again(images, PROMPTS), first)
    assert again.cache.hits == 4


def test_cache_keys_include_metadata_and_bypass_for_gradients():
    reward = CachedReward(as_reward(count_match))
    images = make_images(2)
    assert reward(images, PROMPTS[:2], count=[1, 2]).tolist() == [1.0, 2.0]
    assert reward(images, PROMPTS[:2], count=[3, 4]).tolist() == [3.0, 4.0]
    diff = CachedReward(as_reward(brightness, differentiable=True))
    x = images.clone().requires_grad_(True)
    diff(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and diff.cache.misses == 0


def test_function_fingerprint_changes_with_source_and_version():
    a = as_reward(brightness).fingerprint
    assert a == as_reward(brightness).fingerprint
    assert a != as_reward(redness_list, name="brightness").fingerprint
    assert a != as_reward(brightness, version="2").fingerprint


def test_jpeg_rewards_match_pil_file_sizes():
    images = make_images(3)
    inc = load_reward("jpeg_incompressibility")
    comp = load_reward("jpeg_compressibility")
    scores = check_reward_contract(inc, images, PROMPTS[:3])
    torch.testing.assert_close(check_reward_contract(comp, images, PROMPTS[:3]), -scores)
    for img, s in zip(images, scores.tolist(), strict=True):
        arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        assert s == pytest.approx(len(buf.getvalue()) / 1000)
    # a flat image compresses far better than a noisy one
    flat, noisy = (
        torch.full((1, 3, 64, 64), 0.5),
        torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
    )
    assert comp(flat, ["x"]).item() > comp(noisy, ["x"]).item()
    with pytest.raises(ValueError, match="quality"):
        load_reward("jpeg_compressibility", quality=0)


def test_missing_weights_fail_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    file = HubFile("some-org/some-reward", "weights.pt")
    with pytest.raises(
        WeightsNotFoundError, match=r"some-org/some-reward/weights.pt.*diffrl download myreward"
    ):
        resolve_file(None, file, "myreward")
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        resolve_snapshot("some-org/some-model", ["config.json", "model.safetensors"], "myreward")
    local = tmp_path / "w.pt"
    local.write_bytes(b"x")
    assert resolve_file(local, file, "myreward") == local
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "weights.pt").write_bytes(b"x")
    assert resolve_file(tmp_path / "d", file, "myreward") == tmp_path / "d" / "weights.pt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_file(tmp_path / "nope.pt", file, "myreward")
    assert resolve_snapshot(tmp_path / "d", ["config.json"], "myreward") == tmp_path / "d"


def test_fingerprint_hashes_zero_dim_parameters():
    class Scalar(Reward):
        name = "scalar"

        def _load(self):
            self.m = torch.nn.Module()
            self.m.scale = torch.nn.Parameter(torch.tensor(2.0))

        def score(self, images, prompts, **metadata):
            return images.mean(dim=(1, 2, 3)) * self.m.scale

    a, b = Scalar(), Scalar()
    b.load()
    with torch.no_grad():
        b.m.scale.fill_(3.0)
    assert a.fingerprint != b.fingerprint
