"""Serve a reward over HTTP, so that a reward needing its own environment or GPUs runs elsewhere.

``diffrl serve-reward NAME [key=value ...] --port N`` (:mod:`diffrl.cli.serve`) runs :func:`serve`; the training side
uses the reward ``remote`` (:class:`diffrl.rewards.remote.RemoteReward`) with ``url=http://host:N``. This module is the
library part: the wire format (:func:`encode_request`, :func:`parse_request`), the request batcher
(:class:`BatchingScorer`), the app factory (:func:`create_app`) and :func:`serve`.

Why FastAPI + uvicorn rather than Ray Serve: the server is one small process (one reward, one worker thread, one
port) that starts with a plain ``python`` from the reward's own virtualenv (e.g. one with mmdet for GenEval) and
needs no cluster runtime on either side; the client needs only ``httpx``. Ray Serve would add a Ray cluster (head
node, object store, its own scheduling of replicas) and the same Ray version in the training environment, for
features one reward process does not use. fastapi and uvicorn are imported inside the functions that need them
(``pip install 'diffrl[serve]'``), so importing this module (the client does, for the wire format) stays light.

Endpoints:

* ``GET /health``: the reward's ``name``, ``spec``, ``options``, ``device``, ``loaded`` (its weights load in a
  background thread as soon as the server listens), ``error`` (why loading failed, else null), ``per_sample``,
  ``required_metadata``, ``differentiable`` (for information: scores come back as numbers, without gradients),
  ``components`` (the component names of ``evaluate``), ``fingerprint`` (the reward's
  :attr:`~diffrl.rewards.Reward.fingerprint` once loaded), ``max_batch``, ``batch_wait_ms`` and ``wire``.
* ``GET /stats``: requests, images, batches, errors, ``split_batches`` (merged batches that failed and were scored
  again request by request), ``scoring_seconds`` (the time spent in the reward), and
  histograms of the merged batches (``batch_images``: images per scored batch; ``batch_requests``: requests per
  scored batch).
* ``POST /score``: a binary body (``application/octet-stream``): one line of JSON, ``{"shape": [B, 3, H, W],
  "dtype": "uint8", "prompts": [B strings], "metadata": {field: [B values]}, "shared": {field: value}}``
  (``metadata``: per-sample fields; ``shared``: fields passed to every chunk unchanged), a newline, then the
  ``B * 3 * H * W`` image bytes; the answer (JSON) ``{"name", "scores": [B], "components": {name: [B]},
  "batch_images", "batch_requests", "seconds"}`` (the merged batch this request was scored in, and how long the
  reward took for it). Errors answer ``{"error": "one sentence"}`` with 400 (a request the server
  cannot read), 503 (the reward failed to load) or 500 (the reward raised).

The wire format. Images travel as raw uint8 ``(B, 3, H, W)`` bytes in C order after a one-line JSON header (compact
JSON never holds a raw newline, so the first newline ends it). Lossless: no codec, so the server scores exactly the
pixels the client quantised, and the scores equal in-process scoring of ``quantize_images(images).float() / 255``
bit for bit (the tests check it); a quarter of float32's bytes. No encoding cost: PNG's deflate costs milliseconds
per image on both ends, and JPEG, which flow_grpo's remote GenEval and DeQA rewards send (``flow_grpo/rewards.py``),
changes the pixels and so the scores. Not base64 in JSON: that adds a third to the bytes, and decoding it took 33 ms
per 8 x 512 x 512 batch here (binascii, one core), about as long as the whole HTTP round trip of the raw bytes. The
server reads the bytes in place (``numpy.frombuffer``) and builds the float images as ``uint8 -> float32, / 255``,
the same operations. Scores go back as JSON numbers: Python writes the shortest decimal that reads back as the
same float64, and float32 -> float64 -> float32 is exact, so no score changes on the way; non-finite scores are
written as the tokens ``NaN`` / ``Infinity`` that Python's json reads. Nothing is pickled (a pickled answer runs code
on the reader). Any HTTP client can speak it (see ``docs/rewards.md`` for a curl example).

Batching. Requests go to one worker thread (the reward runs in one thread, as on a trainer). It takes the oldest
waiting request and, for a per-sample reward, merges the requests that arrive within ``batch_wait_ms`` (or are
already waiting) into one batch of at most ``max_batch`` images, scores it with one ``evaluate`` call and splits the
answers back. Only requests with images of the same size and the same metadata fields merge (a request with
``shared`` metadata is scored alone, as is every request of a reward with ``per_sample=False``, whose scores depend
on the batch); a request larger than ``max_batch`` is scored alone (the reward chunks it by its ``batch_size``).
When a merged batch fails, each of its requests is scored again on its own, so one bad request does not fail the
others.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run time, and
# ``Request`` is imported inside create_app (fastapi is an optional dependency), where a string could not resolve it.
import asyncio
import concurrent.futures
import json
import math
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .base import Reward
from .registry import load_reward

__all__ = [
    "WIRE",
    "quantize_images",
    "encode_request",
    "parse_request",
    "ScoreJob",
    "BatchingScorer",
    "create_app",
    "serve",
    "dumps",
]

#: What ``/health`` says about the wire format (the client checks it).
WIRE = {"version": 1, "images": "json-line+uint8"}


def dumps(obj: Any) -> bytes:
    """JSON bytes of an answer; non-finite floats as ``NaN`` / ``Infinity`` (Python's json reads them back)."""
    return json.dumps(obj, allow_nan=True, separators=(",", ":"), default=str).encode()


# ------------------------------------------------------------------------------------------------ wire format


def quantize_images(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 ``(B, 3, H, W)`` on the CPU (``round(clamp(x, 0, 1) * 255)``): what travels."""
    return images.detach().float().clamp(0, 1).mul_(255).round_().to(torch.uint8).cpu()


def _plain(value: Any) -> Any:
    """``value`` with tensors and arrays as (nested) lists and numpy scalars as numbers, for JSON."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode_request(images_uint8: torch.Tensor, prompts: Sequence[str], metadata: Mapping[str, Any]) -> bytes:
    """The body of ``POST /score`` (the JSON header line, then the image bytes). Per-sample metadata (a list, tuple, array or tensor of B values, the rule
    of :func:`diffrl.rewards.base.split_metadata`) goes to ``metadata``, any other value to ``shared``; a value that
    is not JSON (after tensors and arrays become lists) raises a ValueError naming the field."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(
            f"encode_request needs uint8 images (B, 3, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}; "
            "quantize them with quantize_images first."
        )
    batch = images_uint8.shape[0]
    per_sample, shared = {}, {}
    for key, value in metadata.items():
        if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and len(value) == batch:
            per_sample[str(key)] = _plain(list(value) if isinstance(value, tuple) else value)
        else:
            shared[str(key)] = _plain(value)
    header = {
        "shape": list(images_uint8.shape),
        "dtype": "uint8",
        "prompts": list(prompts),
        "metadata": per_sample,
        "shared": shared,
    }
    try:
        line = json.dumps(header, allow_nan=True, separators=(",", ":")).encode()
    except TypeError as err:
        bad = next(
            (k for k, v in {**per_sample, **shared}.items() if not _is_json(v)),
            "?",
        )
        raise ValueError(
            f"metadata field {bad!r} cannot be sent to a remote reward ({err}); give it JSON values (numbers, "
            "strings, lists, dicts), arrays or tensors."
        ) from None
    return b"".join((line, b"\n", images_uint8.contiguous().numpy().tobytes()))


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class ScoreJob:
    """One ``/score`` request, read: float32 images ``(B, 3, H, W)`` = uint8 / 255, its prompts and metadata."""

    images: torch.Tensor
    prompts: list[str]
    metadata: dict[str, list]
    shared: dict[str, Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def size(self) -> int:
        return self.images.shape[0]

    @property
    def key(self) -> tuple:
        """Requests with the same key can be scored in one batch; one with shared metadata only alone."""
        return (tuple(self.images.shape[1:]), tuple(sorted(self.metadata)), id(self) if self.shared else None)


def parse_request(body: bytes) -> ScoreJob:
    """Read a ``POST /score`` body; a ValueError says in one sentence what is wrong with it."""
    end = body.find(b"\n")
    if end < 0:
        raise ValueError("the body has no header line; send a JSON line, a newline, then the image bytes.")
    try:
        doc = json.loads(body[:end])
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the header line is not JSON; send the body encode_request writes.") from None
    if not isinstance(doc, dict):
        raise ValueError(
            f"the header line is a JSON {type(doc).__name__}, not an object with shape and prompts."
        )
    shape = doc.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        or shape[1] != 3
    ):
        raise ValueError(f'"shape" is {shape!r}; send [B, 3, H, W] with non-negative integers.')
    if doc.get("dtype") != "uint8":
        raise ValueError(f'"dtype" is {doc.get("dtype")!r}; this server reads "uint8" only.')
    raw = memoryview(body)[end + 1 :]
    if len(raw) != math.prod(shape):
        raise ValueError(f"the body holds {len(raw)} image bytes; shape {shape} needs {math.prod(shape)}.")
    batch = shape[0]
    prompts = doc.get("prompts")
    if not isinstance(prompts, list) or len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f'"prompts" must be a list of {batch} strings, one per image.')
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError('"metadata" must be an object of per-sample lists.')
    for key, value in metadata.items():
        if not isinstance(value, list) or len(value) != batch:
            raise ValueError(f"metadata field {key!r} must be a list of {batch} values, one per image.")
    shared = doc.get("shared", {})
    if not isinstance(shared, dict):
        raise ValueError('"shared" must be an object.')
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(
        shape
    )  # a read-only view of the body: converted, not copied
    images = torch.from_numpy(arr.astype(np.float32)) / 255  # integers 0-255 are exact in float32
    return ScoreJob(images=images, prompts=prompts, metadata=metadata, shared=shared)


# ------------------------------------------------------------------------------------------------ batching


def _component_names(reward: Reward) -> list[str]:
    """The component names of ``reward.evaluate``: a combination's parts, else the reward itself."""
    parts = getattr(reward, "parts", None)
    if isinstance(parts, list) and all(isinstance(p, tuple) and len(p) == 2 for p in parts):
        return [r.name for r, _ in parts]
    return [reward.name]


class BatchingScorer:
    """Scores :class:`ScoreJob` s in one worker thread, merging concurrent ones (see the module docstring).

    Args:
        reward: the reward (built, not necessarily loaded).
        device: where it runs (``None``: the reward's own ``device`` option, else CUDA when available, else the
            CPU).
        max_batch: most images merged into one batch (a larger request is scored alone).
        batch_wait_ms: how long the worker waits for more requests to merge after the first one arrives. 0 (the
            default) merges only those already waiting, i.e. those that arrived while the previous batch was scored:
            a busy server still merges, and a lone client (one training process) pays no wait on every request.
        spec, options: what ``/health`` reports the reward was built from.
    """

    def __init__(
        self,
        reward: Reward,
        *,
        device: torch.device | str | None = None,
        max_batch: int = 32,
        batch_wait_ms: float = 0.0,
        spec: str | None = None,
        options: Mapping[str, Any] | None = None,
    ):
        if not isinstance(reward, Reward):
            raise TypeError(
                f"BatchingScorer needs a Reward, got {type(reward).__name__}; build it with load_reward."
            )
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(
                f"max_batch={max_batch!r} must be a positive integer (most images per scored batch)."
            )
        if (
            isinstance(batch_wait_ms, bool)
            or not isinstance(batch_wait_ms, (int, float))
            or not math.isfinite(batch_wait_ms)
            or batch_wait_ms < 0
        ):
            raise ValueError(
                f"batch_wait_ms={batch_wait_ms!r} must be a number of milliseconds >= 0 (0: merge only waiting requests)."
            )
        if device is None:  # the reward's own device option, else a GPU when there is one
            device = reward.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.reward = reward
        self.max_batch = max_batch
        self.batch_wait_ms = float(batch_wait_ms)
        self.spec = spec if spec is not None else reward.name
        self.options = dict(options or {})
        self.components = _component_names(reward)
        self.error: str | None = None  # why loading failed
        self.fingerprint: str | None = None
        self._queue: queue.Queue[ScoreJob | None] = queue.Queue()
        self._pending: list[ScoreJob] = []  # taken from the queue, not yet scored (could not merge)
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._stats = {
            "requests": 0,
            "images": 0,
            "batches": 0,
            "errors": 0,
            "split_batches": 0,
            "scoring_seconds": 0.0,
        }
        self._batch_images: Counter[int] = Counter()
        self._batch_requests: Counter[int] = Counter()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "BatchingScorer":
        """Start the worker: it loads the reward, then scores requests as they come."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reward-scorer", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the worker after the batch in progress; waiting requests get an error."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """True once the reward loaded (False on timeout); raises RuntimeError when loading failed."""
        ok = self._loaded.wait(timeout)
        if self.error is not None:
            raise RuntimeError(self.error)
        return ok

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set() and self.error is None

    # ------------------------------------------------------------------ reports
    def health(self) -> dict[str, Any]:
        r = self.reward
        return {
            "name": r.name,
            "spec": self.spec,
            "options": self.options,
            "device": str(self.device),
            "loaded": self.loaded,
            "error": self.error,
            "per_sample": bool(getattr(r, "per_sample", True)),
            "required_metadata": list(getattr(r, "required_metadata", ())),
            "differentiable": bool(r.differentiable),
            "components": list(self.components),
            "fingerprint": self.fingerprint,
            "max_batch": self.max_batch,
            "batch_wait_ms": self.batch_wait_ms,
            "wire": dict(WIRE),
        }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self._stats,
                "waiting": self._queue.qsize() + len(self._pending),
                "batch_images": {str(k): v for k, v in sorted(self._batch_images.items())},
                "batch_requests": {str(k): v for k, v in sorted(self._batch_requests.items())},
            }

    # ------------------------------------------------------------------ scoring
    def submit(self, job: ScoreJob) -> concurrent.futures.Future:
        """Queue a job; its future's result is ``(scores list, {component: list}, batch images, batch requests,
        seconds the batch took to score)``."""
        with self._lock:
            self._stats["requests"] += 1
            self._stats["images"] += job.size
        if job.size == 0:
            job.future.set_result(([], {c: [] for c in self.components}, 0, 1, 0.0))
        elif self.error is not None:
            job.future.set_exception(RuntimeError(self.error))
        else:
            self._queue.put(job)
        return job.future

    def _run(self) -> None:
        try:
            self.reward.load(self.device)
            self.fingerprint = self.reward.fingerprint
        except Exception as err:  # noqa: BLE001 - reported by /health and every /score answer
            first = (str(err).splitlines() or [""])[0]
            self.error = (
                f"reward {self.reward.name!r} could not load on {self.device}: {type(err).__name__}: {first}"
            )
            print(f"diffrl serve-reward: {self.error}", file=sys.stderr, flush=True)
        self._loaded.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            if self.error is not None:
                for job in batch:
                    job.future.set_exception(RuntimeError(self.error))
                continue
            self._score(batch)
        for job in self._pending + self._drain():
            job.future.set_exception(RuntimeError("the reward server is shutting down"))

    def _drain(self) -> list[ScoreJob]:
        out = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return out
            if job is not None:
                out.append(job)

    def _next_batch(self) -> list[ScoreJob] | None:
        """The oldest waiting job and those that merge with it (None: stop)."""
        if not self._pending:
            job = self._queue.get()
            if job is None:
                return None
            self._pending.append(job)
        first = self._pending[0]
        if getattr(self.reward, "per_sample", True) and first.size < self.max_batch:
            deadline = time.monotonic() + self.batch_wait_ms / 1000
            while sum(j.size for j in self._pending if j.key == first.key) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:  # stop after this batch
                    self._queue.put(None)
                    break
                self._pending.append(job)
            batch, n, rest = [], 0, []
            for job in self._pending:
                if job.key == first.key and (not batch or n + job.size <= self.max_batch):
                    batch.append(job)
                    n += job.size
                else:
                    rest.append(job)
            self._pending = rest
            return batch
        return [self._pending.pop(0)]

    def _evaluate(self, jobs: list[ScoreJob]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = (jobs[0].images if len(jobs) == 1 else torch.cat([j.images for j in jobs])).to(self.device)
        prompts = [p for j in jobs for p in j.prompts]
        metadata = {k: [v for j in jobs for v in j.metadata[k]] for k in jobs[0].metadata}
        with torch.no_grad():
            out = self.reward.evaluate(images, prompts, **metadata, **jobs[0].shared)
        total = out.total.detach().to("cpu", torch.float32)
        components = {k: v.detach().to("cpu", torch.float32) for k, v in out.components.items()}
        return total, components

    def _score(self, jobs: list[ScoreJob]) -> None:
        n = sum(j.size for j in jobs)
        t0 = time.perf_counter()
        try:
            total, components = self._evaluate(jobs)
        except Exception as err:  # noqa: BLE001 - sent back to the client that asked
            if len(jobs) > 1:  # find the request that fails; the others get their scores
                with self._lock:
                    self._stats["split_batches"] += 1
                for job in jobs:
                    self._score([job])
                return
            with self._lock:
                self._stats["errors"] += 1
            first = (str(err).splitlines() or [""])[0][:500]
            jobs[0].future.set_exception(RuntimeError(f"{type(err).__name__}: {first}"))
            return
        seconds = time.perf_counter() - t0
        with self._lock:
            self._stats["batches"] += 1
            self._stats["scoring_seconds"] += seconds
            self._batch_images[n] += 1
            self._batch_requests[len(jobs)] += 1
        start = 0
        for job in jobs:
            stop = start + job.size
            job.future.set_result(
                (
                    total[start:stop].tolist(),
                    {k: v[start:stop].tolist() for k, v in components.items()},
                    n,
                    len(jobs),
                    seconds,
                )
            )
            start = stop


# ------------------------------------------------------------------------------------------------ the app


def create_app(
    reward: str | Reward | Callable[..., Any],
    *,
    options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    max_batch: int = 32,
    batch_wait_ms: float = 0.0,
):
    """A FastAPI app serving ``reward`` (a registry name, a ``"module:attr"``, a :class:`Reward` or a function; built
    with ``options`` by :func:`diffrl.rewards.load_reward`). The reward loads in a background thread when the app
    starts (``GET /health`` says when it is ready); ``app.state.scorer`` is its :class:`BatchingScorer`."""
    import contextlib

    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import Response
    except ImportError as err:
        raise ImportError(
            f"the reward server needs fastapi and uvicorn ({err}); pip install 'diffrl[serve]'."
        ) from None

    built = load_reward(reward, **dict(options or {}))
    spec = reward if isinstance(reward, str) else built.name
    scorer = BatchingScorer(
        built, device=device, max_batch=max_batch, batch_wait_ms=batch_wait_ms, spec=spec, options=options
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scorer.start()
        yield
        scorer.stop()

    app = FastAPI(title=f"diffrl reward server: {built.name}", lifespan=lifespan)
    app.state.scorer = scorer

    def answer(obj: dict, status: int = 200) -> Response:
        return Response(dumps(obj), status_code=status, media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return answer(scorer.health())

    @app.get("/stats")
    async def stats() -> Response:
        return answer(scorer.stats())

    @app.post("/score")
    async def score(request: Request) -> Response:
        body = await request.body()
        try:
            job = await asyncio.to_thread(parse_request, body)
        except ValueError as err:
            return answer({"error": f"bad request: {err}"}, 400)
        if scorer.error is not None:
            return answer({"error": scorer.error}, 503)
        try:
            scores, components, batch_images, batch_requests, seconds = await asyncio.wrap_future(
                scorer.submit(job)
            )
        except RuntimeError as err:
            return answer({"error": str(err)}, 503 if scorer.error is not None else 500)
        return answer(
            {
                "name": built.name,
                "scores": scores,
                "components": components,
                "batch_images": batch_images,
                "batch_requests": batch_requests,
                "seconds": seconds,
            }
        )

    return app


def serve(
    reward: str | Reward | Callable[..., Any],
    *,
    options: Mapping[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    device: torch.device | str | None = None,
    max_batch: int = 32,
    batch_wait_ms: float = 0.0,
    on_listening: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Serve ``reward`` on ``host:port`` until interrupted (Ctrl-C or SIGTERM).

    Bad options, an unknown reward or a port that cannot be bound raise before anything is served (``port=0``
    picks a free port). Once the socket listens, :func:`log` prints ``serving reward NAME at http://HOST:PORT ...``
    (the real port) and ``on_listening`` is called; the weights then load in the background.
    """
    import socket

    try:
        import uvicorn
    except ImportError as err:
        raise ImportError(f"the reward server needs uvicorn ({err}); pip install 'diffrl[serve]'.") from None

    if log is None:

        def log(line: str) -> None:
            print(line, flush=True)

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} must be an integer from 0 to 65535 (0: a free port).")
    app = create_app(reward, options=options, device=device, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    scorer = app.state.scorer
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(
            f"host={host!r} is not an address of this machine ({err}); use 127.0.0.1 or 0.0.0.0."
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(
            err.errno,
            f"cannot listen on {host}:{port} ({err.strerror}); choose another --port (0 picks a free one) or stop "
            "what uses it",
        ) from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log(
        f"serving reward {scorer.reward.name!r} at http://{shown}:{bound} (device {scorer.device}, max_batch "
        f"{scorer.max_batch}, batch_wait_ms {scorer.batch_wait_ms:g}); Ctrl-C stops"
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(
            "note: the server has no authentication; anyone who can reach this address can use it. Prefer "
            "127.0.0.1 and an SSH tunnel (docs/rewards.md)."
        )
    if on_listening is not None:
        on_listening()
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
