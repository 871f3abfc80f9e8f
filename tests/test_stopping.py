"""A run stops cleanly on SIGTERM or SIGUSR1 (``diffrl.trainers.stopping``): after the current step, with a checkpoint
of it, ``status.json`` ``stopped`` and no final LoRA; resuming continues bit for bit; more signals change nothing;
``diffrl train`` exits with 128 + the signal's number and a one-line message, also under ``accelerate launch``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import two_process_command, two_process_env
from safetensors.torch import load_file

from diffrl.cli.errors import CommandErrors, exit_code
from diffrl.train import build_trainer
from diffrl.trainers.common import TrainingStopped
from diffrl.trainers.stopping import StopSignals

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "tiny" / "awm.yaml"
PROMPTS = str(ROOT / "configs" / "tiny" / "prompts.txt")

pytestmark = pytest.mark.usefixtures("private_tiny_cache")


def _trainer(out: Path, *extra: str):
    return build_trainer(
        PRESET,
        [f"output_dir={out}", f"data.train={PROMPTS}", "data.eval_size=0", "checkpointing_steps=0", *extra],
    )


def _signal_during_step(trainer, index: int, signum: int) -> None:
    """Make the trainer's step ``index`` send ``signum`` to this process while it runs."""
    step = trainer.train_step

    def signalling(i):
        if i == index:
            os.kill(os.getpid(), signum)
        return step(i)

    trainer.train_step = signalling


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_bitwise(signum, tmp_path):
    before = signal.getsignal(signum)
    full = _trainer(tmp_path / "full", "max_steps=4")
    full.train()

    out = tmp_path / "stopped"
    stopped = _trainer(out, "max_steps=4")
    _signal_during_step(stopped, 1, signum)
    name = signal.Signals(signum).name
    with pytest.raises(TrainingStopped, match=f"stopped by {name} at step 2 of 4; checkpoint written to .*"):
        stopped.train()
    assert signal.getsignal(signum) == before  # the handler is back
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-000002"]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "stopped" and status["step"] == 2 and name in status["reason"]
    assert not (out / "lora").exists()  # no final LoRA for a stopped run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2

    resumed = _trainer(out, "max_steps=4", "resume_from_checkpoint=latest")
    resumed.train()
    a = load_file(str(tmp_path / "full" / "checkpoint-000004" / "trainable.safetensors"))
    b = load_file(str(out / "checkpoint-000004" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def test_a_signal_in_the_last_step_lets_the_run_finish(tmp_path):
    trainer = _trainer(tmp_path, "max_steps=2")
    _signal_during_step(trainer, 1, signal.SIGTERM)
    trainer.train()
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "finished"
    assert (tmp_path / "lora").is_dir()


def test_the_first_signal_is_recorded_later_ones_ignored_and_the_handler_restored():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals() as stop:
            assert stop.signum is None and stop.name == ""
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.signum == signal.SIGUSR1 and stop.name == "SIGUSR1"
            os.kill(os.getpid(), signal.SIGTERM)  # a second one (a launcher passing it on) changes nothing
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.signum == signal.SIGUSR1 and seen == []
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler from before is back
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_clean_stop_exits_with_128_plus_the_signal_and_one_line(capsys):
    assert exit_code(TrainingStopped("stopped", signal.SIGTERM), started=True) == 143
    assert exit_code(TrainingStopped("stopped", signal.SIGUSR1), started=True) == 128 + signal.SIGUSR1
    assert exit_code(TrainingStopped("another process's", None), started=True) == 143
    with CommandErrors() as errors:
        raise TrainingStopped("stopped by SIGTERM at step 2 of 4; checkpoint written to x.", signal.SIGTERM)
    assert errors.code == 143
    assert capsys.readouterr().err == "stopped by SIGTERM at step 2 of 4; checkpoint written to x.\n"


def _stop_from_outside(launcher: list[str], out: Path, signum: int, env: dict | None = None):
    """Start ``launcher + [diffrl.train's arguments]``, send ``signum`` once the run has logged a step, and return
    ``(exit code, stderr, the step status.json names)``."""
    cmd = [
        *launcher,
        str(PRESET),
        f"output_dir={out}",
        f"data.train={PROMPTS}",
        "data.eval_size=0",
        "checkpointing_steps=0",
        "max_steps=1000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and '"step": 1' in metrics.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "stopped", err[-3000:]
    step = status["step"]
    assert 1 <= step < 1000 and (out / f"checkpoint-{step:06d}" / "checksums.json").is_file()
    return proc.returncode, err, step


def test_diffrl_train_stops_on_sigterm_from_outside(tmp_path):
    """The real thing: ``diffrl train`` in its own process, SIGTERM sent once it has logged a step."""
    code, err, step = _stop_from_outside(
        [sys.executable, "-m", "diffrl", "train"], tmp_path / "run", signal.SIGTERM
    )
    assert code == 143, err[-2000:]
    assert f"stopped by SIGTERM at step {step} of 1000" in err and "error:" not in err


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_stop_together_on_sigterm(tmp_path):
    """SIGTERM to ``accelerate launch`` (a scheduler's stop): its torchrun agent passes it on to both processes, which
    stop after the same step; the main one writes the checkpoint, and the launcher exits with 143."""
    from diffrl.models.loading import tiny_model_dir

    tiny_model_dir("tiny:sd3")  # built before the launch: two processes building it at once would race
    launcher, env = two_process_command(), two_process_env()
    out = tmp_path / "run"
    code, err, step = _stop_from_outside(launcher, out, signal.SIGTERM, env)
    assert code == 143, err[-3000:]
    assert err.count(f"stopped by SIGTERM at step {step} of 1000") == 2, err[-3000:]
    assert json.loads((out / "config.json").read_text())["derived"]["num_processes"] == 2
