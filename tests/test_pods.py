"""PODS (Xu, Savani, Fang, Kolter, arXiv 2504.13818) in Flow-GRPO: ``flow_grpo.train_per_group`` trains on each
group's rollouts of most varied reward, with advantages among them (AWM's option: tests/test_awm.py)."""

from pathlib import Path

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.train import build_trainer
from diffrl.trainers.objectives import group_advantages, max_variance_subset

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
PROMPTS = str(TINY / "prompts.txt")


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    import os

    old = os.environ.get("DIFFRL_CACHE")
    os.environ["DIFFRL_CACHE"] = str(tmp_path_factory.mktemp("diffrl-cache"))
    yield
    if old is None:
        os.environ.pop("DIFFRL_CACHE")
    else:
        os.environ["DIFFRL_CACHE"] = old


def _trainer(tmp_path, *extra):
    return build_trainer(
        TINY / "flow_grpo.yaml",
        [f"output_dir={tmp_path}", f"data.train={PROMPTS}", "data.eval_size=0", *extra],
    )


@pytest.mark.parametrize("bad", [1, 5])
def test_bad_train_per_group_is_refused(bad):
    with pytest.raises(ConfigError, match=f"flow_grpo.train_per_group={bad} must be 0 .* or in 2..4"):
        load_config(TINY / "flow_grpo.yaml", [f"data.train={PROMPTS}", f"flow_grpo.train_per_group={bad}"])


def test_flow_grpo_trains_the_max_variance_rows_with_their_own_advantages(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "flow_grpo.train_per_group=2", "flow_grpo.adv_std=group")
    seen = {"parts": []}
    sample_and_score, accumulate = trainer.sample_and_score, trainer._accumulate_part

    def spy_sample(n, *args):
        x0, scored = sample_and_score(n, *args)
        seen["rewards"] = scored.total.float().clone()
        return x0, scored

    def spy_accumulate(part, per_process, latents, old, adv, *rest):
        seen["parts"].append(part.clone())
        seen["adv"] = adv.clone()
        return accumulate(part, per_process, latents, old, adv, *rest)

    monkeypatch.setattr(trainer, "sample_and_score", spy_sample)
    monkeypatch.setattr(trainer, "_accumulate_part", spy_accumulate)
    metrics = trainer.train_step(0)
    r = seen["rewards"]
    keep = [*max_variance_subset(r[:4], 2).tolist(), *(4 + max_variance_subset(r[4:], 2)).tolist()]
    (part,) = seen["parts"]
    assert sorted(part.tolist()) == keep
    # the kept pair of each group: its lowest and its highest reward
    for start in (0, 4):
        group = r[start : start + 4]
        assert {r[k].item() for k in keep if start <= k < start + 4} == {
            group.min().item(),
            group.max().item(),
        }
    expected = group_advantages(
        r[keep], torch.tensor([0, 0, 1, 1]), std="group", clip=trainer.cfg.flow_grpo.adv_clip
    )
    torch.testing.assert_close(seen["adv"][keep], expected.values)
    dropped = [i for i in range(8) if i not in keep]
    assert (seen["adv"][dropped] == 0).all()
    assert metrics["sample/kept_reward_std"] == pytest.approx(float(r[keep].std(unbiased=False)), rel=1e-5)
    assert metrics[f"reward/{trainer.reward.name}/mean"] == pytest.approx(float(r.mean()), rel=1e-6)


def test_flow_grpo_keeping_the_whole_group_is_the_full_update(tmp_path):
    runs = []
    for extra in ((), ("flow_grpo.train_per_group=4",)):
        trainer = _trainer(tmp_path / str(len(extra)), *extra)
        metrics = trainer.train_step(0)
        runs.append(([p.detach().clone() for p in trainer.params], metrics))
    (full, m_full), (same, m_same) = runs
    assert m_full["train/loss"] == m_same["train/loss"] and "sample/kept_reward_std" not in m_same
    assert all(torch.equal(a, b) for a, b in zip(full, same, strict=True))


def test_diffusion_nft_trains_the_max_variance_rows_with_their_own_optimality(tmp_path, monkeypatch):
    from diffrl.trainers.objectives import nft_optimality

    trainer = build_trainer(
        TINY / "diffusion_nft.yaml",
        [
            f"output_dir={tmp_path}",
            f"data.train={PROMPTS}",
            "data.eval_size=0",
            "diffusion_nft.train_per_group=2",
            "diffusion_nft.num_minibatches=2",
        ],
    )
    seen = {"parts": []}
    sample_and_score, accumulate = trainer.sample_and_score, trainer._accumulate_part

    def spy_sample(n, *args):
        x0, scored = sample_and_score(n, *args)
        seen["rewards"] = scored.total.float().clone()
        return x0, scored

    def spy_accumulate(part, per_process, x0, r, *rest):
        seen["parts"].append(part.clone())
        seen["r"] = r.clone()
        return accumulate(part, per_process, x0, r, *rest)

    monkeypatch.setattr(trainer, "sample_and_score", spy_sample)
    monkeypatch.setattr(trainer, "_accumulate_part", spy_accumulate)
    metrics = trainer.train_step(0)
    rew = seen["rewards"]
    keep = [*max_variance_subset(rew[:4], 2).tolist(), *(4 + max_variance_subset(rew[4:], 2)).tolist()]
    # two updates, on the kept rows only, each once
    assert len(seen["parts"]) == 2 and sorted(torch.cat(seen["parts"]).tolist()) == keep
    c = trainer.cfg.diffusion_nft
    adv = group_advantages(rew[keep], torch.tensor([0, 0, 1, 1]), std="global", clip=c.adv_clip)
    torch.testing.assert_close(seen["r"][keep], nft_optimality(adv.values, c.adv_clip))
    assert metrics["sample/kept_reward_std"] == pytest.approx(float(rew[keep].std(unbiased=False)), rel=1e-5)


def test_diffusion_nft_keeping_the_whole_group_is_the_full_update(tmp_path):
    runs = []
    for extra in ((), ("diffusion_nft.train_per_group=4",)):
        trainer = build_trainer(
            TINY / "diffusion_nft.yaml",
            [
                f"output_dir={tmp_path / str(len(extra))}",
                f"data.train={PROMPTS}",
                "data.eval_size=0",
                "diffusion_nft.num_minibatches=2",
                *extra,
            ],
        )
        metrics = trainer.train_step(0)
        runs.append(([p.detach().clone() for p in trainer.params], metrics))
    (full, m_full), (same, m_same) = runs
    assert m_full["train/loss"] == m_same["train/loss"] and "sample/kept_reward_std" not in m_same
    assert all(torch.equal(a, b) for a, b in zip(full, same, strict=True))


def test_diffusion_nft_bad_train_per_group_is_refused():
    with pytest.raises(ConfigError, match="diffusion_nft.train_per_group=1 must be 0 .* or in 2..4"):
        load_config(TINY / "diffusion_nft.yaml", [f"data.train={PROMPTS}", "diffusion_nft.train_per_group=1"])
