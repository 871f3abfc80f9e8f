"""``group_by``: the advantages of flow_grpo, diffusion_nft and awm group a step's images by drawn slot (the default)
or by prompt text, as given or read back through the first tokenizer (the reference codes' per-prompt stat
trackers). A prompt file whose two rows hold the same text makes a step of two prompts draw that text twice: by slot
two groups of four, by text (or tokens) one group of eight."""

from pathlib import Path

import pytest
import torch
from step_spies import spy_step

from diffrl.config import ConfigError, load_config
from diffrl.models.loading import load_model
from diffrl.train import build_trainer
from diffrl.trainers.objectives import awm_weights, group_advantages, text_group_ids

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


pytestmark = pytest.mark.usefixtures("private_tiny_cache")


def _twice(tmp_path) -> str:
    path = tmp_path / "twice.txt"
    path.write_text("a red circle\na red circle\n")
    return str(path)


def test_bad_group_by_is_refused_in_one_sentence():
    prompts = str(TINY / "prompts.txt")
    with pytest.raises(ConfigError, match="group_by='prompt' must be slot, text or tokens"):
        load_config(TINY / "awm.yaml", [f"data.train={prompts}", "group_by=prompt"])
    with pytest.raises(ConfigError, match="group_by=text groups the advantages of .* algorithm=dpo has none"):
        load_config(TINY / "dpo.yaml", [f"data.train={prompts}", "group_by=text"])


def test_text_ids_are_equal_for_equal_texts_only(tmp_path):
    trainer = build_trainer(
        TINY / "awm.yaml",
        [f"output_dir={tmp_path}", f"data.train={TINY / 'prompts.txt'}", "data.eval_size=0", "group_by=text"],
    )
    slots = torch.tensor([0, 0, 1, 1, 2])
    ids = trainer.advantage_groups(["a", "a", "b", "b", "a"], slots)
    assert ids[0] == ids[1] == ids[4] and ids[2] == ids[3] and ids[0] != ids[2]
    assert (ids >= 0).all() and ids.dtype == torch.long
    # a pure function of the text: another call (another process) gives the same ids
    assert torch.equal(trainer.advantage_groups(["b", "a"], slots[:2]), ids[[2, 0]])
    trainer.cfg.group_by = "slot"
    assert torch.equal(trainer.advantage_groups(["a", "a", "b", "b", "a"], slots), slots)


def test_tokens_ids_group_the_texts_the_first_tokenizer_reads_alike(tmp_path):
    """group_by=tokens: the key is the text read back through the first tokenizer (the references'
    ``tokenizers[0](..., max_length=256, truncation=True)`` then ``batch_decode(..., skip_special_tokens=True)``);
    CLIP's lower-cases and normalises spacing, and cuts at 256 tokens."""
    trainer = build_trainer(
        TINY / "awm.yaml",
        [
            f"output_dir={tmp_path}",
            f"data.train={TINY / 'prompts.txt'}",
            "data.eval_size=0",
            "group_by=tokens",
        ],
    )
    long = "a " * 300  # 300 tokens: what follows is cut off
    texts = ["A Red  circle", "a red circle", "a blue circle", long + "red", long + "blue"]
    assert trainer.model.tokenizer_texts(texts[:3]) == ["a red circle", "a red circle", "a blue circle"]
    slots = torch.arange(5)
    ids = trainer.advantage_groups(texts, slots)
    assert ids[0] == ids[1] and ids[3] == ids[4] and len({int(i) for i in ids}) == 3
    torch.testing.assert_close(ids, text_group_ids(trainer.model.tokenizer_texts(texts)))
    # by text all five are groups of their own
    trainer.cfg.group_by = "text"
    assert len({int(i) for i in trainer.advantage_groups(texts, slots)}) == 5


def test_tokens_without_a_tokenizer_is_refused_before_training(tmp_path):
    model = load_model("tiny:sd3")
    model.pipe.tokenizer = None
    with pytest.raises(
        ValueError, match=r"group_by=tokens reads the prompts back .* has none; use group_by=text"
    ):
        build_trainer(
            TINY / "awm.yaml",
            [
                f"output_dir={tmp_path}",
                f"data.train={TINY / 'prompts.txt'}",
                "data.eval_size=0",
                "group_by=tokens",
            ],
            model=model,
        )


@pytest.mark.parametrize("group_by", ["slot", "text", "tokens"])
def test_awm_groups_a_text_drawn_twice_by_the_setting(group_by, tmp_path, monkeypatch):
    trainer = build_trainer(
        TINY / "awm.yaml",
        [
            f"output_dir={tmp_path}",
            f"data.train={_twice(tmp_path)}",
            "data.eval_size=0",
            "awm.adv_std=group",
            f"group_by={group_by}",
        ],
    )
    seen = spy_step(trainer, monkeypatch, "_accumulate")
    trainer.train_step(0)
    r = seen["rewards"]
    merged = group_by != "slot"
    groups = torch.zeros(8, dtype=torch.long) if merged else torch.arange(2).repeat_interleave(4)
    adv = group_advantages(r, groups, std="group")
    a = trainer.cfg.awm
    torch.testing.assert_close(
        seen["calls"][0][2], awm_weights(adv.values, clip=a.adv_clip, max_weight=a.adv_max)
    )
    # the other grouping gives other weights (the two slots' rewards differ), so the check above can fail
    other = torch.arange(2).repeat_interleave(4) if merged else torch.zeros(8, dtype=torch.long)
    assert not torch.allclose(group_advantages(r, other, std="group").values, adv.values)


@pytest.mark.parametrize("algo", ["flow_grpo", "diffusion_nft"])
def test_flow_grpo_and_nft_gather_text_groups(algo, tmp_path, monkeypatch):
    import diffrl.trainers.diffusion_nft as nft_module

    trainer = build_trainer(
        TINY / f"{algo}.yaml",
        [f"output_dir={tmp_path}", f"data.train={_twice(tmp_path)}", "data.eval_size=0", "group_by=text"],
    )
    seen = []
    if algo == "flow_grpo":
        advantages = trainer.advantages

        def spy(rewards, group_ids):
            seen.append(group_ids.clone())
            return advantages(rewards, group_ids)

        monkeypatch.setattr(trainer, "advantages", spy)
    else:
        original = nft_module.group_advantages

        def spy(rewards, group_ids, **kwargs):
            seen.append(group_ids.clone())
            return original(rewards, group_ids, **kwargs)

        monkeypatch.setattr(nft_module, "group_advantages", spy)
    trainer.train_step(0)
    (ids,) = seen
    assert ids.numel() == 8 and (ids == ids[0]).all()
