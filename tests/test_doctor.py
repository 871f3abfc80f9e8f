"""``diffrl doctor``: every check passes on the tiny preset and each one can fail, with a fix."""

import shutil
from pathlib import Path

import pytest
import torch

from diffrl.cli import main
from diffrl.config import ConfigError, load_config
from diffrl.doctor import (
    Finding,
    UnknownModelSize,
    environment,
    estimate_memory,
    memory,
    onpolicy,
    run_doctor,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "flow_grpo.yaml")
PACKAGES = ("python", "torch", "diffusers", "transformers", "accelerate", "peft")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def by_name(findings, name):
    found = [f for f in findings if f.name == name]
    assert len(found) == 1, [f.line() for f in findings]
    return found[0]


def fails(findings):
    return [f for f in findings if f.status == "FAIL"]


def tiny_dir() -> Path:
    from diffrl.models.loading import tiny_model_dir

    return tiny_model_dir("tiny:sd3")


def put_in_hf_cache(cache: Path, repo_id: str, filename: str = "", source: Path | None = None) -> Path:
    """A file (or a whole directory's tree) in the Hugging Face cache layout, as ``hf_hub_download`` leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    if source is not None and source.is_dir():
        shutil.copytree(source, snapshot, dirs_exist_ok=True)
        return snapshot
    target = snapshot / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"not really weights")
    return target


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------------------------- the tiny preset


def test_tiny_flow_grpo_passes_with_ratio_one():
    findings = run_doctor(TINY, device="cpu")
    assert not fails(findings), [f.line() for f in findings]
    for name in (*PACKAGES, "config", "data", "model"):
        assert by_name(findings, name).status == "OK"
    assert by_name(findings, "reward saturation").status == "OK"
    memory = by_name(findings, "memory")
    assert memory.status == "OK" and "estimate" in memory.message and "safetensors headers" in memory.message
    ratio = by_name(findings, "ratio")
    assert ratio.status == "OK" and "max |exp(logp_new - logp_old) - 1|" in ratio.message
    assert "SDE" in ratio.message and "tolerance 1e-03" in ratio.message
    assert by_name(findings, "batch-invariance").status == "OK"
    for f in findings:
        assert f.line().startswith(f.status) and "\n" not in f.line()


def test_line_format_and_statuses():
    ok = Finding("model", "OK", "present", "ignored when OK")
    assert ok.line() == "OK    model: present"
    bad = Finding("model", "FAIL", "missing", "Download it.")
    assert bad.line() == "FAIL  model: missing  Fix: Download it."
    with pytest.raises(ValueError, match="status='BAD'"):
        Finding("x", "BAD", "y")


# ---------------------------------------------------------------------------------------------- environment


def test_env_fails_on_old_or_missing_packages(monkeypatch):
    real = environment._installed_version
    versions = {"peft": "0.1.0", "accelerate": None}
    monkeypatch.setattr(
        environment, "_installed_version", lambda p: versions[p] if p in versions else real(p)
    )
    findings = run_doctor(checks=["env"])
    peft = by_name(findings, "peft")
    assert peft.status == "FAIL" and "0.1.0 does not satisfy >=0.15" in peft.message
    assert "pip install -U 'peft>=0.15'" in peft.fix
    acc = by_name(findings, "accelerate")
    assert acc.status == "FAIL" and "not installed" in acc.message and "pip install" in acc.fix
    assert by_name(findings, "torch").status == "OK"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_env_cpu_only_warns_and_cuda_device_fails():
    findings = run_doctor(checks=["env"], device="cuda")
    cuda = by_name(findings, "cuda")
    assert cuda.status == "WARN" and "slow" in cuda.message and cuda.fix
    assert by_name(findings, "device").status == "FAIL"


def test_gpu_without_bf16_warns_and_a_bf16_config_fails(monkeypatch):
    from types import SimpleNamespace

    props = SimpleNamespace(name="Old GPU", total_memory=16 * 1024**3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    findings = run_doctor(TINY, ["model.dtype=bfloat16"], checks=["env", "config"], device="cuda")
    cuda = by_name(findings, "cuda")
    assert cuda.status == "WARN" and "cuda:0 Old GPU 16 GiB sm75 bf16 no" in cuda.message
    precision = by_name(findings, "precision")
    assert precision.status == "FAIL" and "no bfloat16 support" in precision.message
    assert "model.dtype=float16" in precision.fix


# ---------------------------------------------------------------------------------------------- config


def test_bad_input_is_one_sentence_error():
    with pytest.raises(ConfigError, match="config file missing.yaml does not exist; pass a YAML preset"):
        run_doctor("missing.yaml")
    with pytest.raises(ConfigError, match="override 'optim.lr' is not key=value"):
        run_doctor(TINY, ["optim.lr"])
    with pytest.raises(ConfigError, match="check 'bogus' is not known"):
        run_doctor(TINY, checks=["bogus"])


def test_invalid_config_and_data_fail(tmp_path):
    findings = run_doctor(TINY, ["flow_grpo.group_size=1"], checks=["config", "model"])
    assert len(findings) == 1
    assert findings[0].status == "FAIL" and "flow_grpo.group_size=1 must be at least 2" in findings[0].message
    assert findings[0].fix
    missing = tmp_path / "prompts.txt"
    data = by_name(run_doctor(TINY, [f"data.train={missing}"], checks=["config"]), "data")
    assert data.status == "FAIL" and str(missing) in data.message and data.fix


def test_data_says_how_a_prompt_file_with_repeated_texts_is_grouped(tmp_path):
    twice = tmp_path / "twice.txt"
    twice.write_text("a red circle\na blue square\na red circle\n")
    data = by_name(run_doctor(TINY, [f"data.train={twice}", "data.eval_size=0"], checks=["config"]), "data")
    assert data.status == "OK" and "3 training and 0 evaluation prompts" in data.message
    assert (
        "2 distinct texts" in data.message and "group_by=slot keeps them two advantage groups" in data.message
    )
    data = by_name(
        run_doctor(TINY, [f"data.train={twice}", "data.eval_size=0", "group_by=text"], checks=["config"]),
        "data",
    )
    assert "group_by=text merges such draws into one advantage group" in data.message
    # distinct texts: nothing to say
    data = by_name(run_doctor(TINY, checks=["config"]), "data")
    assert "distinct" not in data.message


# ---------------------------------------------------------------------------------------------- model files


def test_missing_local_model_dir_fails_naming_it(tmp_path):
    missing = tmp_path / "no-such-pipeline"
    findings = run_doctor(TINY, [f"model.path={missing}"], checks=["model", "memory", "onpolicy"])
    model = by_name(findings, "model")
    assert model.status == "FAIL" and str(missing) in model.message and "model_index.json" in model.fix
    assert by_name(findings, "memory").status == "WARN"
    assert by_name(findings, "ratio").status == "WARN" and "skipped" in by_name(findings, "ratio").message


def test_incomplete_local_model_fails_naming_the_component(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    model = by_name(run_doctor(TINY, [f"model.path={empty}"], checks=["model"]), "model")
    assert model.status == "FAIL" and "has no model_index.json" in model.message

    copy = tmp_path / "pipeline"
    shutil.copytree(tiny_dir(), copy)
    findings = run_doctor(TINY, [f"model.path={copy}"], checks=["model", "memory"])
    assert by_name(findings, "model").status == "OK"
    assert "safetensors headers" in by_name(findings, "memory").message
    for weights in (copy / "transformer").glob("*.safetensors"):
        weights.unlink()
    model = by_name(run_doctor(TINY, [f"model.path={copy}"], checks=["model"]), "model")
    assert model.status == "FAIL" and "transformer/ has no weights" in model.message


def test_hub_model_is_looked_up_in_the_hf_cache(hf_cache):
    findings = run_doctor(TINY, ["model.path=someorg/tiny-sd3"], checks=["model"])
    model = by_name(findings, "model")
    assert model.status == "FAIL" and "not in the Hugging Face cache" in model.message
    assert f"diffrl download {TINY}" in model.fix

    put_in_hf_cache(hf_cache, "someorg/tiny-sd3", source=tiny_dir())
    findings = run_doctor(
        TINY, ["model.path=someorg/tiny-sd3"], checks=["model", "memory", "onpolicy"], device="cpu"
    )
    assert not fails(findings), [f.line() for f in findings]
    assert "HF cache" in by_name(findings, "model").message
    assert "safetensors headers" in by_name(findings, "memory").message
    assert by_name(findings, "ratio").status == "OK"  # loaded from the cached snapshot, no network


# ---------------------------------------------------------------------------------------------- rewards


def test_reward_weights_absent_offline_fail_with_download_hint(hf_cache):
    findings = run_doctor(TINY, ["reward={hpsv2: 1.0}", "eval_reward={saturation: 1.0}"], checks=["rewards"])
    hps = by_name(findings, "reward hpsv2")
    assert hps.status == "FAIL" and "xswu/HPSv2/HPS_v2.1_compressed.pt" in hps.message
    assert "`diffrl download hpsv2`" in hps.fix and f"diffrl download {TINY}" in hps.fix
    assert by_name(findings, "reward saturation").status == "OK"

    put_in_hf_cache(hf_cache, "xswu/HPSv2", "HPS_v2.1_compressed.pt")
    findings = run_doctor(TINY, ["reward={hpsv2: 1.0}"], checks=["rewards"])
    assert by_name(findings, "reward hpsv2").status == "OK"
    # the options of reward_kwargs choose the files, as for `diffrl download`
    findings = run_doctor(
        TINY, ["reward={hpsv2: 1.0}", "reward_kwargs={hpsv2: {version: v2}}"], checks=["rewards"]
    )
    hps = by_name(findings, "reward hpsv2")
    assert hps.status == "FAIL" and "HPS_v2_compressed.pt" in hps.message
    assert "diffrl download hpsv2 version=v2" in hps.fix


def test_unknown_reward_and_missing_local_weights_fail(tmp_path):
    findings = run_doctor(TINY, ["reward={no_such_reward: 1.0}"], checks=["rewards"])
    bad = by_name(findings, "reward no_such_reward")
    assert bad.status == "FAIL" and "unknown reward 'no_such_reward'" in bad.message and bad.fix
    local = tmp_path / "hps.pt"
    findings = run_doctor(
        TINY, ["reward={hpsv2: 1.0}", f"reward_kwargs={{hpsv2: {{checkpoint: {local}}}}}"], checks=["rewards"]
    )
    hps = by_name(findings, "reward hpsv2")
    assert hps.status == "FAIL" and str(local) in hps.message


# ---------------------------------------------------------------------------------------------- memory


def test_memory_estimate_counts_parameters_from_headers():
    cfg = load_config(TINY)
    est = estimate_memory(cfg, tiny_dir())
    model = onpolicy._load_policy(cfg, "tiny:sd3", "cpu")
    assert est.trainable_params == sum(p.numel() for p in model.trainable_parameters())
    modules = [m for m in model.pipe.components.values() if isinstance(m, torch.nn.Module)]
    actual = sum(p.numel() for m in modules for p in m.parameters())
    assert abs(est.params - actual) / actual < 0.05
    assert est.weights == est.params * 4
    assert est.trained == est.trainable_params * (4 + 4 + 8)
    assert est.total == est.weights + est.trained + est.buffers + est.activations + est.rewards + est.overhead
    half = estimate_memory(load_config(TINY, ["model.dtype=bfloat16"]), tiny_dir())
    assert half.weights * 2 == est.weights
    big = ["sample.height=512", "sample.width=512", "optim.train_batch_size=8"]
    plain = estimate_memory(load_config(TINY, big), tiny_dir())
    ckpt = estimate_memory(load_config(TINY, [*big, "model.gradient_checkpointing=true"]), tiny_dir())
    assert ckpt.activations <= plain.activations
    # published sizes when the weights are not present offline
    sd35 = estimate_memory(load_config(ROOT / "configs" / "sd35m_flow_grpo_pickscore.yaml"))
    assert "published" in sd35.source and 7e9 < sd35.params < 9e9
    with pytest.raises(UnknownModelSize):
        estimate_memory(load_config(TINY, ["model.path=someorg/unknown-model"]))


def test_memory_estimate_divides_what_zero_and_fsdp_partition():
    full = load_config(TINY, ["model.lora_rank=0", "flow_grpo.kl_beta=0"])
    base = estimate_memory(load_config(TINY), tiny_dir(), num_processes=4)
    zero1 = estimate_memory(load_config(TINY, ["zero_stage=1"]), tiny_dir(), num_processes=4)
    zero2 = estimate_memory(load_config(TINY, ["zero_stage=2"]), tiny_dir(), num_processes=4)
    p = base.trainable_params
    assert base.trained == p * (4 + 4 + 8)
    assert zero1.trained == int(p * (4 + 4 + 8 / 4)) and zero2.trained == int(p * (4 + 4 / 4 + 8 / 4))
    assert zero2.weights == base.weights and "ZeRO-2: AdamW states and grads / 4" in zero2.notes
    one = estimate_memory(load_config(TINY, ["zero_stage=2"]), tiny_dir(), num_processes=1)
    assert one.trained == base.trained  # nothing to partition with one process
    # full fine-tuning: the transformer in float32 (here every weight is float32 anyway), its grads and AdamW states
    f1 = estimate_memory(full, tiny_dir(), num_processes=1)
    t = f1.trainable_params  # the transformer's parameters
    assert f1.trained == t * (4 + 8) and f1.weights == base.weights
    f2 = estimate_memory(
        load_config(TINY, ["model.lora_rank=0", "flow_grpo.kl_beta=0", "zero_stage=2"]),
        tiny_dir(),
        num_processes=4,
    )
    assert f2.trained == int(t * (4 / 4 + 8 / 4))
    # FSDP: the transformer's (float32) weights and everything trained, divided by the processes
    fsdp = estimate_memory(load_config(TINY, ["fsdp=true"]), tiny_dir(), num_processes=4)
    assert fsdp.trained == int(p * 16 / 4) and fsdp.weights == int(base.weights - t * 4 * 3 / 4)


def test_memory_estimate_counts_awm_off_policy_adapter_and_held_levels():
    """AWM off-policy keeps the EMA adapter without the EMA pull, and with awm.ratio=sample a micro-batch holds the
    activations of its num_train_timesteps level passes at once."""
    awm = ROOT / "configs" / "tiny" / "awm.yaml"
    base = ["awm.ema_kl_weight=0", "awm.num_train_timesteps=3"]
    plain = estimate_memory(load_config(awm, base), tiny_dir())
    off = estimate_memory(load_config(awm, [*base, "awm.rollout_policy=ema"]), tiny_dir())
    held = estimate_memory(
        load_config(awm, [*base, "awm.rollout_policy=ema", "awm.ratio=sample"]), tiny_dir()
    )
    assert off.trained == plain.trained + off.trainable_params * 4
    assert off.train_activations == plain.train_activations
    assert held.train_activations == 3 * off.train_activations


def test_memory_fails_when_the_estimate_exceeds_the_gpu(monkeypatch):
    monkeypatch.setattr(memory, "_device_capacity", lambda device: (1024**2, "a 1 MiB GPU"))
    found = by_name(run_doctor(TINY, checks=["memory"]), "memory")
    assert found.status == "FAIL" and "of 1.0 MiB on a 1 MiB GPU" in found.message
    assert "model.gradient_checkpointing=true" in found.fix


# ---------------------------------------------------------------------------------------------- on-policy


def _patch_velocity(monkeypatch, change):
    """Make the probe's model compute ``change(v, x)`` instead of its velocity ``v``."""
    real = onpolicy._load_policy

    def load(cfg, path, device):
        model = real(cfg, path, device)
        velocity = model.velocity

        def patched(x, sigma, cond, guidance_scale=1.0):
            return change(velocity(x, sigma, cond, guidance_scale), x)

        model.velocity = patched
        return model

    monkeypatch.setattr(onpolicy, "_load_policy", load)


def test_ratio_check_fails_when_the_recompute_differs(monkeypatch):
    # the trainer recomputes with gradients on: a model that behaves differently then is off-policy
    _patch_velocity(monkeypatch, lambda v, x: v + 0.5 if torch.is_grad_enabled() else v)
    findings = run_doctor(TINY, checks=["onpolicy"], device="cpu")
    ratio = by_name(findings, "ratio")
    assert ratio.status == "FAIL" and "off-policy" in ratio.message and "deterministic" in ratio.fix
    assert by_name(findings, "batch-invariance").status == "OK"


def test_batch_invariance_fails_when_logprobs_depend_on_the_batch(monkeypatch):
    _patch_velocity(monkeypatch, lambda v, x: v + 0.2 * x.shape[0])
    findings = run_doctor(TINY, ["sample.batch_size=4"], checks=["onpolicy"], device="cpu")
    assert by_name(findings, "ratio").status == "OK"  # rollout and recompute both use batches of 4
    batch = by_name(findings, "batch-invariance")
    assert batch.status == "FAIL" and "logp_bs1 - logp_bs4" in batch.message
    assert "optim.train_batch_size" in batch.fix
    # the tiny preset samples in batches of 8 and recomputes in batches of 4: then the ratio is off too
    findings = run_doctor(TINY, checks=["onpolicy"], device="cpu")
    ratio = by_name(findings, "ratio")
    assert ratio.status == "FAIL" and "rollout batch 8, recompute batch 4" in ratio.message


@pytest.mark.parametrize(
    "extra, note",
    [
        ([], "awm does not use this ratio; it measures determinism"),
        (["awm.rollout_policy=ema"], "awm's off-policy ratio is to its EMA adapter's matching loss"),
    ],
)
def test_ratio_note_says_what_an_awm_run_uses(extra, note):
    awm = str(ROOT / "configs" / "tiny" / "awm.yaml")
    findings = run_doctor(
        awm,
        [f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}", *extra],
        checks=["onpolicy"],
        device="cpu",
    )
    ratio = by_name(findings, "ratio")
    assert ratio.status == "OK" and note in ratio.message


def test_probe_errors_are_reported(monkeypatch):
    def broken(cfg, path, device):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(onpolicy, "_load_policy", broken)
    ratio = by_name(run_doctor(TINY, checks=["onpolicy"]), "ratio")
    assert ratio.status == "FAIL" and "RuntimeError: CUDA out of memory" in ratio.message


# ---------------------------------------------------------------------------------------------- command line


def test_cli_exit_codes(capsys, tmp_path):
    assert main(["doctor", TINY, "--check", "config", "--check", "model", "--check", "rewards"]) == 0
    out = capsys.readouterr().out
    assert "OK    config:" in out and "doctor: " in out and "0 FAIL" in out

    assert main(["doctor", "--check", "model", TINY, f"model.path={tmp_path / 'nope'}"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  model:" in out and str(tmp_path / "nope") in out

    assert main(["doctor", "missing.yaml"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        "error: config file missing.yaml does not exist; pass a YAML preset such as configs/tiny/flow_grpo.yaml."
    )
    assert main(["doctor", TINY, "optim.lr"]) == 2
    assert "override 'optim.lr' is not key=value" in capsys.readouterr().err

    assert main(["doctor", TINY, "max_steps=0", "--check", "config"]) == 1
    assert "FAIL  config: max_steps=0 must be at least 1" in capsys.readouterr().out


def test_cli_env_only_matches_findings(capsys):
    code = main(["doctor"])
    out = capsys.readouterr().out
    assert "torch:" in out and "cuda:" in out
    assert code == (1 if "FAIL " in out else 0)


@pytest.mark.parametrize(
    "preset, folder", [("flow_grpo.yaml", "assets/sd3"), ("demo.yaml", "assets/sd3_cliptext")]
)
def test_toy_models_are_found_offline(preset, folder):
    findings = run_doctor(
        str(Path(__file__).resolve().parent.parent / "configs" / "toy" / preset), checks=["model"]
    )
    model = [f for f in findings if f.name == "model"]
    assert model and model[0].status == "OK" and folder in model[0].message


@pytest.mark.parametrize("installed, status", [(None, "FAIL"), ("0.18.0", "FAIL"), ("0.19.8", "OK")])
def test_zero_stage_checks_the_deepspeed_install(installed, status, monkeypatch):
    monkeypatch.setattr(
        environment, "_installed_version", lambda name: installed if name == "deepspeed" else "99"
    )
    found = by_name(run_doctor(TINY, ["zero_stage=2"], checks=["config"]), "deepspeed")
    assert found.status == status, found
    if status == "FAIL":
        assert "zero_stage=2 needs deepspeed>=0.19.8" in found.message and "diffrl[deepspeed]" in found.fix
    assert all(f.name != "deepspeed" for f in run_doctor(TINY, checks=["config"]))  # only asked for with ZeRO


def test_recomputed_old_logprobs_make_an_off_policy_drift_harmless(monkeypatch):
    _patch_velocity(monkeypatch, lambda v, x: v + 0.5 if torch.is_grad_enabled() else v)
    findings = run_doctor(TINY, ["flow_grpo.old_logp=recompute"], checks=["onpolicy"], device="cpu")
    ratio = by_name(findings, "ratio")
    assert ratio.status == "OK" and "old_logp=recompute" in ratio.message
    findings = run_doctor(TINY, checks=["onpolicy"], device="cpu")
    assert "flow_grpo.old_logp=recompute" in by_name(findings, "ratio").fix


def test_kl_scale_is_reported_in_reference_and_exact_units():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = by_name(run_doctor(TINY, checks=["onpolicy"], device="cpu"), "kl-scale")
    assert ref.status == "OK" and "kl_beta=0.04 in reference units" in ref.message
    exact = by_name(
        run_doctor(TINY, ["flow_grpo.kl_scale=exact"], checks=["onpolicy"], device="cpu"), "kl-scale"
    )
    assert exact.status == "WARN" and "flow_grpo.kl_scale=reference" in exact.fix
    # the factor on the SD3.5 schedule (static shift 3, 10 steps, the first 9 trained): mean 1/|dt| = 13.0
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    cfg = load_config(TINY, ["flow_grpo.kl_scale=exact", "flow_grpo.kl_beta=0.01", "sample.num_steps=10"])
    finding = onpolicy._kl_scale_finding(cfg, sched.sigmas)
    assert "13.0x the same number" in finding.message and "over the 9 trained step(s)" in finding.message
    assert "0.251" in finding.message  # 0.01 / |dt| at the first step: 25x
    no_kl = run_doctor(TINY, ["flow_grpo.kl_beta=0"], checks=["onpolicy"], device="cpu")
    assert not [f for f in no_kl if f.name == "kl-scale"]
