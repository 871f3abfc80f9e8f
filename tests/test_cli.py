import pytest

from diffrl.cli import main
from diffrl.hub import collect_targets
from diffrl.rewards import HubFile, Reward


class NeedsFiles(Reward):
    name = "needs_files"

    @classmethod
    def hub_files(cls, version="a", **kwargs):
        return [
            HubFile("org/repo", f"weights-{version}.pt"),
            HubFile("org/repo", "extra.json", optional=True),
        ]


def test_collect_targets_from_words_and_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: stabilityai/stable-diffusion-3.5-medium\n"
        "train:\n  reward: {hpsv2: 1.0, pickscore: {weight: 0.5, kwargs: {dtype: bf16}}}\n"
        "eval_rewards: [imagereward, {name: hpsv2, kwargs: {version: v2}}]\n"
    )
    rewards, models = collect_targets(["jpeg_compressibility", "quality=80", str(cfg)])
    assert rewards[0] == ("jpeg_compressibility", {"quality": 80})
    assert ("pickscore", {"dtype": "bf16"}) in rewards and ("hpsv2", {"version": "v2"}) in rewards
    assert ("imagereward", {}) in rewards
    assert models == ["stabilityai/stable-diffusion-3.5-medium"]
    with pytest.raises(ValueError, match="before any reward"):
        collect_targets(["version=v2"])


def test_download_dry_run_lists_exact_files(capsys):
    assert main(["download", "test_cli:NeedsFiles", "version=b", "jpeg_compressibility", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "org/repo weights-b.pt" in out and "org/repo extra.json (optional)" in out
    assert "reward jpeg_compressibility: 0 hub file(s)" in out


def test_download_errors_are_one_line(capsys):
    assert main(["download", "no_such_reward", "--dry-run"]) == 2
    assert "unknown reward 'no_such_reward'" in capsys.readouterr().err
    assert main(["download", "missing.yaml", "--dry-run"]) == 2


def test_download_offline_fails_clearly(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert main(["download", "test_cli:NeedsFiles"]) == 1
    assert "could not fetch org/repo/weights-a.pt" in capsys.readouterr().err


def test_download_reads_a_training_preset(capsys):
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "configs" / "sd35m_diffusion_nft_multireward.yaml"
    rewards, models = collect_targets([str(preset)])
    assert models == ["stabilityai/stable-diffusion-3.5-medium"]
    assert ("hpsv2", {"version": "v2.1"}) in rewards and ("pickscore", {}) in rewards
    assert main(["download", str(preset), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "xswu/HPSv2 HPS_v2.1_compressed.pt" in out and "model stabilityai/stable-diffusion-3.5-medium" in out
    )


def test_cpu_threads_policy(monkeypatch):
    import torch

    from diffrl.utils import set_cpu_threads

    saved = torch.get_num_threads()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_cpu_threads() == 1 and torch.get_num_threads() == 1  # CPU only: one thread by default
        assert set_cpu_threads(2) == 2 and torch.get_num_threads() == 2  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert set_cpu_threads() is None and torch.get_num_threads() == 2  # the user's OMP_NUM_THREADS is kept
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_cpu_threads() is None  # with a GPU torch's default stays
        with pytest.raises(ValueError, match="threads=0 must be a positive integer"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(saved)
