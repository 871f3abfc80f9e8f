"""Checkpoints that survive kills and corruption: the completion marker and checksums, the safe swap of a re-saved
step (faults injected at every point of the write), ``latest`` falling back to the newest checkpoint that verifies,
pruning that keeps a good one, metrics after resuming a finished run, and byte-reproducible outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffrl.train import build_trainer
from diffrl.trainers import checkpoints as ckpt_files

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "diffusion_nft.yaml"
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")


pytestmark = pytest.mark.usefixtures("private_tiny_cache", "one_thread")


def _overrides(out: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train={PROMPTS}",
        "data.eval_size=0",
        "checkpointing_steps=1",
        "checkpoints_total_limit=3",
        *extra,
    ]


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_files.checkpoints(out)[-1] / "trainable.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 3-step run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("full") / "run"
    build_trainer(PRESET, _overrides(out, "max_steps=3")).train()
    return _final(out)


def _resume_to_end(out: Path) -> dict[str, torch.Tensor]:
    build_trainer(PRESET, _overrides(out, "max_steps=3", "resume_from_checkpoint=latest")).train()
    return _final(out)


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_checkpoint_is_marked_complete_and_verifies(tmp_path):
    build_trainer(PRESET, _overrides(tmp_path, "max_steps=1")).train()
    (ckpt,) = ckpt_files.checkpoints(tmp_path)
    table = json.loads((ckpt / "checksums.json").read_text())
    assert {"trainable.safetensors", "optim.pt", "state.json", "extra.safetensors"} <= table.keys()
    assert ckpt_files.verify(ckpt) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "finished"


class _Killed(BaseException):
    """Stands for a kill -9: not an Exception, so nothing on the way catches it."""


# every point where a kill can land while step 2 is written again over an existing checkpoint-000002
FAULTS = ["trainable", "checksums", "move_old_aside", "rename_new", "remove_old"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_kill_at_any_point_of_a_checkpoint_write_leaves_a_resumable_run(
    fault, tmp_path, monkeypatch, uninterrupted
):
    trainer = build_trainer(PRESET, _overrides(tmp_path, "max_steps=2"))
    trainer.train()  # checkpoint-000001 and checkpoint-000002 on disk
    # write step 2 again, as a run ending on a checkpointing step did before
    trainer.checkpoints.saved_step = -1

    real_replace, real_rmtree = os.replace, ckpt_files.shutil.rmtree
    calls = {"replace": 0}

    def replace(src, dst):
        calls["replace"] += 1
        if (fault == "move_old_aside" and calls["replace"] == 2) or (
            fault == "rename_new" and calls["replace"] == 3
        ):
            raise _Killed()  # call 1 is the checksum file's own rename
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if fault == "remove_old" and Path(path).name.startswith(".old-"):
            real_rmtree(Path(path) / "trainable.safetensors", ignore_errors=True)  # killed half-way through
            raise _Killed()
        return real_rmtree(path, *args, **kwargs)

    def save_file(*args, **kwargs):
        raise _Killed()

    monkeypatch.setattr(ckpt_files.os, "replace", replace)
    monkeypatch.setattr(ckpt_files.shutil, "rmtree", rmtree)
    if fault == "trainable":
        monkeypatch.setattr("safetensors.torch.save_file", save_file)
    if fault == "checksums":
        monkeypatch.setattr(ckpt_files, "_sha256", lambda path: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        trainer.save_checkpoint()
    monkeypatch.undo()

    latest, skipped = ckpt_files.find_latest(tmp_path)
    assert latest is not None and ckpt_files.verify(latest) is None and not skipped
    assert latest.name in ("checkpoint-000001", "checkpoint-000002")
    _assert_equal(_resume_to_end(tmp_path), uninterrupted)


def test_a_corrupted_checkpoint_is_skipped_by_latest_and_refused_by_name(tmp_path, uninterrupted, capsys):
    build_trainer(PRESET, _overrides(tmp_path, "max_steps=2")).train()
    damaged = tmp_path / "checkpoint-000002"
    data = bytearray((damaged / "trainable.safetensors").read_bytes())
    data[-3] ^= 0x10  # one flipped bit in a weight
    (damaged / "trainable.safetensors").write_bytes(bytes(data))
    assert "does not match its checksum" in ckpt_files.verify(damaged)

    with pytest.raises(
        ValueError, match=r"checkpoint .*checkpoint-000002 is damaged \(trainable.safetensors"
    ):
        build_trainer(
            PRESET, _overrides(tmp_path / "other", "max_steps=3", f"resume_from_checkpoint={damaged}")
        )
    # latest falls back to checkpoint-000001 with a warning, and the run ends as the uninterrupted one
    _assert_equal(_resume_to_end(tmp_path), uninterrupted)
    out = capsys.readouterr().out
    assert "warning: skipping checkpoint-000002: trainable.safetensors does not match its checksum" in out
    assert "resumed from" in out and "checkpoint-000001 at step 1" in out


def test_an_unreadable_checkpoint_without_checksums_is_one_line(tmp_path):
    build_trainer(PRESET, _overrides(tmp_path, "max_steps=1")).train()
    ckpt = tmp_path / "checkpoint-000001"
    (ckpt / "checksums.json").unlink()  # as written by an older diffrl
    (ckpt / "optim.pt").write_bytes((ckpt / "optim.pt").read_bytes()[:100])  # truncated copy
    trainer = build_trainer(PRESET, _overrides(tmp_path, "max_steps=2", "resume_from_checkpoint=latest"))
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-000001 cannot be read \(RuntimeError"):
        trainer.load_checkpoint("latest")
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.params, strict=True))  # nothing half-loaded


def test_pruning_never_deletes_the_newest_good_checkpoint(tmp_path):
    for step in (1, 2, 3):
        d = tmp_path / f"checkpoint-{step:06d}"
        d.mkdir()
        for name in ("trainable.safetensors", "optim.pt", "state.json"):
            (d / name).write_text(f"{name} {step}")
        ckpt_files.write_checksums(d)
    for step in (2, 3):  # the two newest are damaged
        (tmp_path / f"checkpoint-{step:06d}" / "optim.pt").write_text("changed")
    removed = ckpt_files.prune(tmp_path, limit=2)
    assert removed == []  # checkpoint-000001 would go, but it is the newest that verifies
    assert [p.name for p in ckpt_files.checkpoints(tmp_path)] == [
        "checkpoint-000001",
        "checkpoint-000002",
        "checkpoint-000003",
    ]
    ckpt_files.write_checksums(tmp_path / "checkpoint-000003")  # now the newest verifies again
    assert [p.name for p in ckpt_files.prune(tmp_path, limit=2)] == ["checkpoint-000001"]


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path):
    overrides = [
        f"output_dir={tmp_path}",
        f"data.train={PROMPTS}",
        "data.eval_size=2",
        "max_steps=2",
        "checkpointing_steps=2",
    ]
    build_trainer(PRESET, overrides).train()
    rows = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(r)["step"] for r in rows.splitlines() if "eval/" in r] == [0, 2]
    build_trainer(PRESET, [*overrides, "resume_from_checkpoint=latest"]).train()
    assert (tmp_path / "metrics.jsonl").read_text() == rows  # row for row what the uninterrupted run wrote


def _train_in_a_fresh_process(out: Path, hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "diffrl.train", str(PRESET), *_overrides(out, "max_steps=1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_same_run_writes_the_same_bytes(tmp_path):
    # the LoRA metadata listed target_modules in set order, which changes with the hash seed
    _train_in_a_fresh_process(tmp_path / "a", "1")
    _train_in_a_fresh_process(tmp_path / "b", "2")
    for rel in ("lora/pytorch_lora_weights.safetensors", "checkpoint-000001/trainable.safetensors"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_a_state_json_that_is_not_json_is_one_line(tmp_path):
    build_trainer(PRESET, _overrides(tmp_path, "max_steps=1")).train()
    ckpt = tmp_path / "checkpoint-000001"
    (ckpt / "checksums.json").unlink()  # an older checkpoint: nothing to verify against
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(
        ValueError, match=r"checkpoint .*checkpoint-000001 cannot be read \(state.json: JSONDecodeError"
    ):
        build_trainer(PRESET, _overrides(tmp_path, "max_steps=2", "resume_from_checkpoint=latest"))


def test_a_prompt_file_that_is_not_utf8_names_the_file_and_the_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\na blue \xff square\n")
    with pytest.raises(
        ValueError, match=r"prompt file .*prompts.txt is not UTF-8 text \(byte 0xff on line 2\)"
    ):
        build_trainer(PRESET, [f"output_dir={tmp_path / 'run'}", f"data.train={prompts}", "data.eval_size=0"])


def test_a_full_disk_while_checkpointing_is_one_error_and_keeps_what_was_written(tmp_path, monkeypatch):
    trainer = build_trainer(PRESET, _overrides(tmp_path, "max_steps=3"))
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's optimiser state
            raise OSError(28, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        OSError,
        match=r"checkpoint-000002 failed \(OSError: No space left on device\); the "
        r"checkpoints already on disk are intact \(checkpoint-000001\)",
    ):
        trainer.train()
    monkeypatch.undo()
    assert [p.name for p in ckpt_files.checkpoints(tmp_path)] == ["checkpoint-000001"]
    assert ckpt_files.verify(tmp_path / "checkpoint-000001") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_reward_that_raises_is_named_with_the_step_and_the_cli_says_it_in_one_line(tmp_path):
    from diffrl.trainers.engine import RewardError

    calls = {"n": 0}

    def fragile(images, prompts, **metadata):
        calls["n"] += 1
        if calls["n"] > 1:
            raise ZeroDivisionError("division by zero")
        return images.mean(dim=(1, 2, 3))

    trainer = build_trainer(PRESET, _overrides(tmp_path, "max_steps=3"), reward=fragile)
    with pytest.raises(
        RewardError, match=r"reward 'fragile' failed at step 1: ZeroDivisionError: division by zero"
    ):
        trainer.train()
    # through the command line: exit 1 and one line, no traceback
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "diffrl.train",
        str(PRESET),
        *_overrides(tmp_path / "cli", "max_steps=1", "reward={tests.launch_rewards:raises_reward: 1.0}"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: reward 'raises_reward' failed at step 0: KeyError" in proc.stderr
