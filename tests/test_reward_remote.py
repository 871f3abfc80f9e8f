"""The ``remote`` reward against real reward servers (``python -m diffrl serve-reward ...`` subprocesses on 127.0.0.1,
port 0: the OS picks a free one and the server prints it): the same scores as in-process scoring of the
uint8-quantised images, bit for bit; concurrent clients get their own answers and the server merges them; a slow
server against the timeout; retries with exponential backoff (attempts counted on both sides); answers that are not
scores; a server killed mid-request (one-line error naming the URL, or NaN and a count under ``on_error="skip"``);
the engine's background scoring path; the command's one-line errors.

Two servers start once for the module, side by side: ``shapes_verifier`` (a built-in with required metadata, an
option given as key=value, merging window 150 ms) and ``tests.remote_rewards:Scripted`` (brightness whose prompts
script delays, failures and NaN; killed by the last test).
"""

from __future__ import annotations

import http.server
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reward_contract import check_reward_contract, make_images

from diffrl.cli import main
from diffrl.rewards import load_reward
from diffrl.rewards.remote import RemoteReward, RemoteRewardError
from diffrl.rewards.server import WIRE, encode_request, parse_request, quantize_images

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 60  # a cold start imports torch and fastapi: seconds on a busy 2-core machine


class Server:
    """A ``diffrl serve-reward`` subprocess; :meth:`url` waits for the line that names its port."""

    def __init__(self, *words: str, log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "diffrl", "serve-reward", *words, "--host", "127.0.0.1", "--port", "0"]
        self.log = log
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._url: str | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    @property
    def url(self) -> str:
        if self._url is None:
            try:
                line = self._lines.get(timeout=STARTUP_S)
            except queue.Empty:
                line = ""
            if "http://" not in line:
                pytest.fail(f"the server did not start: {line!r}; stderr: {self.log.read_text()[-2000:]}")
            self._url = line.split(" at ", 1)[1].split(" ", 1)[0]
        return self._url

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/stats", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("servers")
    started = {
        "shapes": Server(
            "shapes_verifier",
            "strict=false",
            "--max-batch",
            "16",
            "--batch-wait-ms",
            "150",
            log=logs / "shapes.log",
        ),
        "scripted": Server(
            "tests.remote_rewards:Scripted",
            "--batch-wait-ms",
            "0",
            "--max-batch",
            "8",
            log=logs / "scripted.log",
        ),
    }
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def shapes(servers):
    return RemoteReward(servers["shapes"].url).load()


@pytest.fixture(scope="module")
def scripted(servers):
    return RemoteReward(servers["scripted"].url, timeout=20).load()


def toy_batch(n: int, seed: int):
    """Rendered toy scenes; every other image is paired with the next scene's description (partial credit)."""
    from diffrl.toy.scenes import sample_scene

    rng = np.random.default_rng(seed)
    items = [sample_scene(rng) for _ in range(n)]
    images = torch.stack([it["image"] for it in items])
    scenes = [items[(i + i % 2) % n]["scene"] for i in range(n)]
    return images, [it["prompt"] for it in items], scenes


# ---------------------------------------------------------------------------------------------- scores


def test_health_gives_the_served_rewards_name_metadata_and_options(shapes, servers):
    assert shapes.name == "shapes_verifier" and not shapes.differentiable
    assert shapes.required_metadata == ("scene",) and shapes.per_sample
    health = shapes.health
    assert health["loaded"] and health["error"] is None and health["device"] == "cpu"
    assert health["options"] == {"strict": False} and health["spec"] == "shapes_verifier"
    assert health["max_batch"] == 16 and health["batch_wait_ms"] == 150
    # the fingerprint is the served reward's (weights and options), not the URL's
    assert health["fingerprint"] == load_reward("shapes_verifier", strict=False).fingerprint
    assert (
        RemoteReward(servers["shapes"].url.replace("127.0.0.1", "localhost")).fingerprint
        == shapes.fingerprint
    )


def test_scores_equal_in_process_scoring_of_the_quantised_images(shapes, scripted):
    images, prompts, scenes = toy_batch(6, seed=1)
    local = load_reward("shapes_verifier", strict=False)
    quantised = quantize_images(images).float() / 255
    out = shapes.evaluate(images, prompts, scene=scenes)
    assert torch.equal(out.total, local(quantised, prompts, scene=scenes))
    assert set(out.total.tolist()) - {0.0, 1.0}, "partial credit: the scores are not all 0 or 1"
    assert list(out.components) == ["shapes_verifier"]
    # continuous scores, bit for bit; chunked requests (batch_size) give the same; the reward contract holds
    from remote_rewards import Scripted

    smooth = make_images(5, size=48, seed=3)
    prompts = [f"p{i}" for i in range(5)]
    expected = Scripted()(quantize_images(smooth).float() / 255, prompts)
    assert torch.equal(scripted(smooth, prompts), expected)
    assert not torch.equal(expected, Scripted()(smooth, prompts)), (
        "quantisation is visible: the check is exact"
    )
    got = check_reward_contract(scripted, smooth, prompts)
    assert torch.equal(got, expected)


def test_concurrent_clients_get_their_own_scores_and_requests_merge(shapes, servers):
    before = servers["shapes"].stats()
    n_threads = 6
    batches = [toy_batch(2, seed=10 + k) for k in range(n_threads)]
    local = load_reward("shapes_verifier", strict=False)
    barrier = threading.Barrier(n_threads)
    results: dict[int, torch.Tensor] = {}

    def client(k: int) -> None:
        images, prompts, scenes = batches[k]
        barrier.wait()
        results[k] = shapes(images, prompts, scene=scenes)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k, (images, prompts, scenes) in enumerate(batches):
        assert torch.equal(results[k], local(quantize_images(images).float() / 255, prompts, scene=scenes)), k
    after = servers["shapes"].stats()
    assert after["requests"] - before["requests"] == n_threads
    merged = {int(k): v - before["batch_requests"].get(k, 0) for k, v in after["batch_requests"].items()}
    assert sum(k * v for k, v in merged.items()) == n_threads
    assert max(k for k, v in merged.items() if v) > 1, f"no request was merged: {after}"
    assert after["batches"] - before["batches"] < n_threads


def test_with_no_merging_window_requests_that_queue_behind_a_busy_batch_merge(scripted, servers):
    """``--batch-wait-ms 0`` (the default): nothing waits for stragglers, but the requests that arrive while a batch
    is scored are merged into the next one."""
    server = servers["scripted"]
    from remote_rewards import Scripted

    before = server.stats()
    busy = threading.Thread(target=scripted, args=(make_images(1, size=16), ["slow:1.0"]))
    busy.start()
    while server.stats()["requests"] == before["requests"]:
        time.sleep(0.01)
    batches = [make_images(2, size=16, seed=20 + k) for k in range(3)]
    results = {}

    def client(k):
        results[k] = scripted(batches[k], ["a", "b"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in [busy, *threads]:
        t.join(30)
    for k, images in enumerate(batches):
        assert torch.equal(results[k], Scripted()(quantize_images(images).float() / 255, ["a", "b"]))
    after = server.stats()
    merged = {int(k): v - before["batch_requests"].get(k, 0) for k, v in after["batch_requests"].items()}
    assert merged.get(3) == 1 and after["batch_images"].get("6", 0) > before["batch_images"].get("6", 0), (
        after
    )


def test_the_engine_scores_remote_chunks_in_its_background_thread(scripted, servers):
    """``Trainer.sample_and_score`` itself, on a stand-in for the model: each sampled chunk is scored in the engine's
    worker thread while the next one samples, one request per chunk."""
    from diffrl.trainers.engine import Trainer

    images = make_images(6, size=32, seed=5)
    prompts = [f"prompt {i}" for i in range(6)]
    sampling_threads, scoring_threads = set(), set()
    real_score = scripted._score_chunk

    def traced(*args):
        scoring_threads.add(threading.get_ident())
        return real_score(*args)

    engine = SimpleNamespace(
        cfg=SimpleNamespace(sample=SimpleNamespace(batch_size=2)),
        model=SimpleNamespace(decode=lambda latents: latents, vae_lock=threading.RLock()),
        reward=scripted,
        world=1,
        step=0,
    )
    engine.evaluate_reward = Trainer.evaluate_reward.__get__(engine)

    def sample_chunk(rows):
        sampling_threads.add(threading.get_ident())
        return images[rows]

    before = servers["scripted"].stats()["requests"]
    scripted._score_chunk = traced
    try:
        latents, scored = Trainer.sample_and_score(engine, 6, sample_chunk, prompts, {})
    finally:
        del scripted._score_chunk
    assert torch.equal(latents, images)
    from remote_rewards import Scripted

    assert torch.equal(scored.total, Scripted()(quantize_images(images).float() / 255, prompts))
    assert list(scored.components) == ["scripted"]
    assert servers["scripted"].stats()["requests"] - before == 3  # one per chunk of 2
    assert scoring_threads and not scoring_threads & sampling_threads


# ---------------------------------------------------------------------------------------------- failures


def test_a_slow_server_runs_into_the_timeout(servers):
    slow = RemoteReward(servers["scripted"].url, timeout=0.3, retries=0).load()
    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardError) as err:
        slow(make_images(1, size=16), ["slow:1.5"])
    assert time.perf_counter() - t0 < 1.2  # the server answers after 1.5 s
    msg = str(err.value)
    assert "\n" not in msg and servers["scripted"].url in msg and "no answer within timeout=0.3s" in msg


def test_retries_back_off_exponentially_until_the_server_recovers(servers):
    url = servers["scripted"].url
    before = servers["scripted"].stats()["errors"]
    client = RemoteReward(url, retries=3, backoff=0.1)
    client.load()
    key = uuid.uuid4().hex
    t0 = time.perf_counter()
    scores = client(make_images(2, size=16), [f"flaky:{key}:2", "ok"])
    elapsed = time.perf_counter() - t0
    assert torch.isfinite(scores).all()
    assert client.counts["requests"] == 1 and client.counts["retries"] == 2
    assert servers["scripted"].stats()["errors"] - before == 2  # the server saw the two failed attempts
    assert elapsed >= 0.1 + 0.2  # backoff 0.1 s, then 0.2 s
    # too few retries: the error names the URL, the server's cause and the attempts
    client = RemoteReward(url, retries=1, backoff=0.05)
    with pytest.raises(RemoteRewardError) as err:
        client(make_images(1, size=16), [f"flaky:{uuid.uuid4().hex}:5"])
    msg = str(err.value)
    assert "\n" not in msg and url in msg and "HTTP 500: RuntimeError: scripted failure 2 of 5" in msg
    assert "(after 2 attempts)" in msg and client.counts["attempts"] >= 3  # + the /health read


def test_nonfinite_scores_raise_skip_or_pass_as_asked(servers):
    url = servers["scripted"].url
    images = make_images(2, size=16)
    with pytest.raises(
        RemoteRewardError, match=r"returned non-finite scores for 1 of 2 images \(row 1: nan\)"
    ):
        RemoteReward(url)(images, ["ok", "nan"])
    passed = RemoteReward(url, allow_nonfinite=True)(images, ["ok", "nan"])
    assert torch.isfinite(passed[0]) and torch.isnan(passed[1])
    skip = RemoteReward(url, on_error="skip")
    assert torch.isnan(skip(images, ["ok", "nan"])).all() and skip.skipped == 1


class _Garbage(http.server.BaseHTTPRequestHandler):
    """A server that reads like a reward server at /health and answers /score with ``self.server.answer``."""

    def do_GET(self):
        body = json.dumps(
            {
                "name": "garbage",
                "per_sample": True,
                "required_metadata": [],
                "components": ["garbage"],
                "loaded": True,
                "fingerprint": "x",
                "wire": WIRE,
            }
        ).encode()
        self._send(200, body)

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.server.posts += 1
        self._send(*self.server.answer)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "answer, cause",
    [
        ((200, b"<html>hello</html>"), "answered what is not JSON"),
        (
            (200, b'{"name": "garbage", "scores": [1.0], "components": {"garbage": [1.0]}}'),
            "answered 1 values as scores for 2 images",
        ),
        (
            (200, b'{"name": "garbage", "scores": ["a", "b"], "components": {}}'),
            "scores that are not all numbers",
        ),
        ((200, b"[1, 2]"), "answered a JSON list"),
        ((502, b"bad gateway"), "HTTP 502: bad gateway"),
    ],
)
def test_answers_that_are_not_scores_are_retried_then_reported(answer, cause):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    server.answer, server.posts = answer, 0
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(RemoteRewardError) as err:
            RemoteReward(url, retries=1, backoff=0.01)(make_images(2, size=8), ["a", "b"])
        msg = str(err.value)
        assert "\n" not in msg and url in msg and cause in msg and server.posts == 2
        skip = RemoteReward(url, retries=0, on_error="skip")
        out = skip.evaluate(make_images(2, size=8), ["a", "b"])
        assert torch.isnan(out.total).all() and list(out.components) == ["garbage"] and skip.skipped == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_is_down_fails_with_one_line_naming_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    reward = load_reward("remote", url=url, retries=1, backoff=0.01)  # constructing needs no server
    with pytest.raises(RemoteRewardError) as err:
        reward.name  # noqa: B018 - the trainer reads it when it is built
    msg = str(err.value)
    assert "\n" not in msg and url in msg and "cannot connect" in msg and "(after 2 attempts)" in msg
    skip = RemoteReward(url, retries=0, on_error="skip")
    with pytest.raises(RemoteRewardError):  # without the server's answer there is no name to skip under
        skip(make_images(1, size=8), ["a"])


def test_the_one_line_config_change_validates_and_needs_no_hub_files(scripted):
    """``reward: {remote: 1.0}`` with ``reward_kwargs: {remote: {url: ...}}`` in a training config: it validates,
    builds the reward the trainer builds (by name, with its options), and ``diffrl download`` lists nothing."""
    from diffrl.config import load_config
    from diffrl.hub import config_targets, reward_hub_files

    cfg = load_config(
        ROOT / "configs" / "tiny" / "flow_grpo.yaml",
        [
            f"data.train={ROOT / 'configs' / 'tiny' / 'prompts.txt'}",
            "reward={remote: 1.0}",
            f'reward_kwargs={{remote: {{url: "{scripted.url}", timeout: 30}}}}',
        ],
    )
    assert cfg.reward == {"remote": 1.0} and cfg.reward_kwargs == {
        "remote": {"url": scripted.url, "timeout": 30}
    }
    reward = load_reward("remote", **cfg.reward_kwargs["remote"])
    assert reward.name == "scripted" and reward.timeout == 30
    from diffrl.config import config_to_dict

    rewards, _ = config_targets(config_to_dict(cfg))
    assert [reward_hub_files(name, kwargs) for name, kwargs in rewards] == [[]]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"url": "127.0.0.1:8765"}, "not an http(s) address"),
        ({"url": "http://127.0.0.1:99999"}, "bad port"),
        ({"url": "http://h:1", "on_error": "ignore"}, "on_error='ignore' is not known"),
        ({"url": "http://h:1", "timeout": 0}, "timeout=0 must be a positive number"),
        ({"url": "http://h:1", "retries": -1}, "retries=-1 must be an integer >= 0"),
        ({"url": "http://h:1", "urll": "x"}, "has no option 'urll'"),
    ],
)
def test_bad_options_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_reward("remote", **options)


def test_the_wire_format_round_trips_and_bad_bodies_are_refused_with_a_sentence():
    pixels = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    body = encode_request(pixels, ["a", "b"], {"k": torch.tensor([1, 2]), "s": 3, "t": ("x", "y")})
    line, _, raw = body.partition(b"\n")
    header = json.loads(line)
    assert header["metadata"] == {"k": [1, 2], "t": ["x", "y"]} and header["shared"] == {"s": 3}
    assert raw == pixels.numpy().tobytes()  # raw bytes after one JSON line
    job = parse_request(body)
    assert torch.equal(job.images, pixels.float() / 255) and job.prompts == ["a", "b"]

    def with_header(**change):
        return json.dumps({**header, **change}).encode() + b"\n" + raw

    for broken, message in (
        (b"no newline", "no header line"),
        (b"nope\n" + raw, "not JSON"),
        (with_header(prompts=["a"]), "list of 2 strings"),
        (with_header(shape=[2, 4, 5, 3]), "send [B, 3, H, W]"),
        (with_header(dtype="float32"), 'reads "uint8" only'),
        (body[:-3], "holds 117 image bytes; shape [2, 3, 4, 5] needs 120"),
        (with_header(metadata={"k": [1]}), "metadata field 'k' must be a list of 2 values"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_request(broken)
    with pytest.raises(ValueError, match="metadata field 'obj' cannot be sent"):
        encode_request(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), ["a"], {"obj": [object()]})


def test_the_batcher_merges_compatible_requests_and_isolates_a_failing_one():
    """In process, without HTTP: requests with the same image size and metadata fields merge; a request whose
    metadata breaks the reward fails alone (the merged batch is scored again request by request); a request with
    shared (not per-sample) metadata or another image size is scored apart."""
    from diffrl.rewards.server import BatchingScorer

    scorer = BatchingScorer(load_reward("shapes_verifier", device="cpu"), max_batch=16, batch_wait_ms=300)
    assert scorer.device == torch.device("cpu")
    local = load_reward("shapes_verifier")
    good = [toy_batch(2, seed=30 + k) for k in range(2)]
    bad_images, bad_prompts, _ = toy_batch(2, seed=40)
    jobs = [parse_request(encode_request(quantize_images(x), p, {"scene": sc})) for x, p, sc in good]
    jobs.insert(
        1, parse_request(encode_request(quantize_images(bad_images), bad_prompts, {"scene": ["?", "?"]}))
    )
    shared = parse_request(
        encode_request(quantize_images(good[0][0]), good[0][1], {"scene": good[0][2], "s": 1})
    )
    small = toy_batch(1, seed=50)
    other_size = parse_request(
        encode_request(quantize_images(small[0][:, :, :32, :32]), small[1], {"scene": small[2]})
    )
    futures = [scorer.submit(j) for j in [*jobs, shared, other_size]]  # all queued before the worker starts
    scorer.start()
    try:
        for k, i in enumerate((0, 2)):
            scores, components, *_ = futures[i].result(30)
            x, p, sc = good[k]
            assert torch.equal(torch.tensor(scores), local(quantize_images(x).float() / 255, p, scene=sc))
            assert components == {"shapes_verifier": scores}
        with pytest.raises(RuntimeError, match="ValueError"):
            futures[1].result(30)
        assert futures[3].result(30)[3] == 1 and futures[4].result(30)[3] == 1  # scored alone
    finally:
        scorer.stop()
    stats = scorer.stats()
    assert stats["errors"] == 1 and stats["requests"] == 5 and stats["split_batches"] == 1
    # the three same-shaped requests merged first (failed), then were scored one by one: 4 single batches in all
    assert stats["batch_requests"] == {"1": 4} and stats["batches"] == 4


def test_missing_metadata_fails_before_any_request_and_the_servers_own_errors_come_back(shapes, servers):
    images, prompts, scenes = toy_batch(2, seed=4)
    before = servers["shapes"].stats()["requests"]
    with pytest.raises(ValueError, match="needs the metadata field 'scene'"):
        RemoteReward(shapes.url, on_error="skip")(images, prompts)
    assert servers["shapes"].stats()["requests"] == before
    # a scene the served reward cannot read: its own error, in one line with the URL
    with pytest.raises(RemoteRewardError) as err:
        RemoteReward(shapes.url, retries=0)(images, prompts, scene=[{"objects": "?"}, scenes[1]])
    msg = str(err.value)
    assert "\n" not in msg and shapes.url in msg and "HTTP 500: ValueError: reward 'shapes_verifier'" in msg


# ---------------------------------------------------------------------------------------------- the command


def test_command_errors_are_one_line_before_anything_is_served(capsys):
    cases = [
        (["no_such_reward"], "unknown reward 'no_such_reward'"),
        (["brightness", "--max-batch", "0"], "max_batch=0 must be a positive integer"),
        (["brightness", "--batch-wait-ms", "-1"], "batch_wait_ms=-1.0 must be"),
        (["brightness", "quality"], "option 'quality' is not key=value"),
        (["jpeg_compressibility", "quality=101"], "quality=101 must be between 1 and 100"),
        (["brightness", "nonsense=1"], "has no option 'nonsense'"),
    ]
    for words, message in cases:
        assert main(["serve-reward", *words]) == 2, words
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (words, err)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve-reward", "brightness", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err


# ---------------------------------------------------------------------------------------------- last: kill a server


def test_a_server_killed_mid_request_raises_one_line_or_skips(servers, scripted):
    server = servers["scripted"]
    url = server.url
    raising = RemoteReward(url, retries=1, backoff=0.05).load()
    skipping = RemoteReward(url, retries=1, backoff=0.05, on_error="skip").load()
    unloaded = RemoteReward(
        url, retries=0, on_error="skip"
    )  # built and named (as by a trainer), never loaded
    assert unloaded.name == "scripted"
    images = make_images(2, size=16)
    outcome: dict[str, object] = {}

    def ask(name, reward):
        try:
            outcome[name] = reward.evaluate(images, ["slow:5", "x"])
        except Exception as err:  # noqa: BLE001 - checked below
            outcome[name] = err

    threads = [threading.Thread(target=ask, args=a) for a in (("raise", raising), ("skip", skipping))]
    before = server.stats()["requests"]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while server.stats()["requests"] < before + 2 and time.monotonic() < deadline:  # both requests arrived
        time.sleep(0.05)
    server.proc.kill()
    t0 = time.perf_counter()
    for t in threads:
        t.join(30)
    assert time.perf_counter() - t0 < 3, (
        "the clients noticed the dead server at once, not after the 5 s delay"
    )
    err = outcome["raise"]
    assert isinstance(err, RemoteRewardError), err
    msg = str(err)
    assert "\n" not in msg and url in msg and "(after 2 attempts)" in msg, msg
    assert "the server closed the connection without answering" in msg and "then cannot connect" in msg
    skipped = outcome["skip"]
    assert torch.isnan(skipped.total).all() and list(skipped.components) == ["scripted"]
    assert skipping.skipped == 1 and skipping.counts["skipped_images"] == 2
    # a reward that had not loaded yet skips too, and keeps the name the trainer logs under
    out = unloaded.evaluate(images, ["a", "b"])
    assert torch.isnan(out.total).all() and list(out.components) == ["scripted"] and unloaded.skipped == 1
    assert unloaded.name == "scripted"


def test_doctor_asks_a_remote_rewards_server_once(servers):
    from diffrl.doctor.rewards import reward_status

    ok = reward_status("remote", {"url": servers["shapes"].url}, "config.yaml")
    assert ok.finding.status == "OK", ok.finding
    assert "'shapes_verifier' (loaded; needs scene; device cpu)" in ok.finding.message
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    down = reward_status("remote", {"url": f"http://127.0.0.1:{port}", "retries": 5}, "config.yaml")
    assert down.finding.status == "FAIL" and "cannot connect" in down.finding.message
    # one attempt, the retries option ignored: doctor does not wait
    assert "(after" not in down.finding.message
    assert "diffrl serve-reward" in down.finding.fix
