"""``remote``: a reward scored by a reward server (``diffrl serve-reward``, :mod:`diffrl.rewards.server`) over HTTP.

A reward that needs its own virtualenv or its own GPUs runs in a server process there, and a training config uses
it by changing its reward entry (the served reward's own options go on the server's command line)::

    reward: {remote: 1.0}
    reward_kwargs: {remote: {url: "http://127.0.0.1:8765"}}

Its ``name`` (the metric key), ``per_sample`` and ``required_metadata`` are the served reward's, read from the
server's ``GET /health`` the first time one of them is asked for (the trainer asks when it is built, so a server
that is not running fails the run before any model loads); ``differentiable`` is always False (scores come back as
numbers). Images are quantised to uint8 (``round(clamp(x, 0, 1) * 255)``) and sent losslessly, so the scores are
those of in-process scoring of the quantised images, bit for bit (the wire format is described in
:mod:`diffrl.rewards.server`).

Failures. Every request has ``timeout`` seconds to be answered. A connection that fails or drops, a timeout, an
HTTP 5xx answer or an answer that is not what the server writes (not JSON, the wrong number of scores) is retried up
to ``retries`` times, after ``backoff``, ``2 * backoff``, ``4 * backoff``... seconds. When the attempts are spent, or
the scores are not finite (unless ``allow_nonfinite``), ``on_error`` decides:

* ``"raise"`` (default): a :class:`RemoteRewardError` whose one line names the URL and the cause; in training the
  step fails with it (the engine's ``RewardError`` names the reward and the step);
* ``"skip"``: a warning is logged, the batch gets NaN scores and :attr:`RemoteReward.skipped` counts it. The trainers
  skip the update of a step with a non-finite reward and stop after ``max_bad_steps`` such steps in a row, so a server
  that is down for a few steps costs those steps, and one that stays down stops the run with a checkpoint.

A batch without a metadata field the served reward requires (checked here, before any request), a request the
server refuses (HTTP 4xx: a body it cannot read, a wrong URL path) or a server whose reward failed to load (HTTP 503
with its error) always raises: retrying or skipping would not change it.

Threads. Scoring runs in the engine's background thread while the next rollout chunk samples
(``sample_and_score`` in :mod:`diffrl.trainers.engine`), and several threads or processes may share one server (it
merges their concurrent requests). Each thread gets its own ``httpx.Client`` (kept in a ``threading.local``), and the
counters are updated under a lock.

Fingerprint (the score cache's key): the reward's class and name, and the served reward's own fingerprint, which the
server reports once its weights are loaded, plus the quantisation; not the URL, so the same server behind another
tunnel or port keeps its cached scores.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from .base import Reward, RewardOutput, check_inputs, split_metadata
from .server import WIRE, encode_request, quantize_images

__all__ = ["RemoteReward", "RemoteRewardError"]

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


class RemoteRewardError(ConnectionError):
    """The reward server could not score a batch (or could not be reached); the message names the URL and the cause."""


class _Retryable(Exception):
    """A failed attempt that another attempt may fix (internal)."""


class _Final(Exception):
    """A failure that another attempt would repeat, subject to ``on_error`` (internal)."""


class RemoteReward(Reward):
    """A reward scored by a reward server at ``url`` (see the module docstring).

    Args:
        url: the server's base URL, ``http://HOST:PORT`` (``https://`` behind a proxy that terminates TLS).
        timeout: seconds a request may take to be answered (connecting: at most 10 of them).
        retries: attempts after the first one for a failure that may pass (0: none).
        backoff: seconds before the first retry; doubled before each next one.
        on_error: ``"raise"`` or ``"skip"`` (NaN scores, counted in :attr:`skipped`).
        allow_nonfinite: pass NaN / infinite scores from the server through (the trainers then skip the step)
            instead of treating them as a failure.
        load_timeout: seconds :meth:`load` waits for the server to finish loading its reward's weights.
        batch_size: most images per request (``None``: all images of a call in one request).
    """

    differentiable = False

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        on_error: str = "raise",
        allow_nonfinite: bool = False,
        load_timeout: float = 600.0,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if not isinstance(url, str) or not url.strip():
            raise ValueError(
                f"url={url!r} must be the reward server's address, e.g. url=http://127.0.0.1:8765."
            )
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(
                f"url={url!r} is not an http(s) address of a reward server; write http://HOST:PORT, e.g. "
                "url=http://127.0.0.1:8765."
            )
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number or out of range
        except ValueError as err:
            raise ValueError(f"url={url!r} has a bad port ({err}); write http://HOST:PORT.") from None
        for key, value, low in (("timeout", timeout, 0.0), ("load_timeout", load_timeout, 0.0)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value > low
                or value == math.inf
            ):
                raise ValueError(f"{key}={value!r} must be a positive number of seconds.")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries={retries!r} must be an integer >= 0 (attempts after the first one).")
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not 0 <= backoff < math.inf:
            raise ValueError(
                f"backoff={backoff!r} must be a number of seconds >= 0 (doubled before each retry)."
            )
        if on_error not in ON_ERROR:
            raise ValueError(
                f"on_error={on_error!r} is not known; use 'raise' (fail the step) or 'skip' (NaN scores)."
            )
        import importlib.util

        if importlib.util.find_spec("httpx") is None:
            raise ImportError("the remote reward needs httpx; pip install 'diffrl[serve]'.")
        self.url = url.strip().rstrip("/")
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.on_error = on_error
        self.allow_nonfinite = bool(allow_nonfinite)
        self.load_timeout = float(load_timeout)
        self._health: dict[str, Any] | None = None
        self._server_fingerprint: str | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list = []
        self.counts = {"requests": 0, "attempts": 0, "retries": 0, "skipped_batches": 0, "skipped_images": 0}
        self.last_error: str | None = None

    # -------------------------------------------------------------- what the server says
    @property
    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer (fetched once, with retries; raises :class:`RemoteRewardError`)."""
        if self._health is None:
            self._health = self._fetch_health()
        return self._health

    @property
    def name(self) -> str:
        return self.health["name"]

    @property
    def per_sample(self) -> bool:
        return self.health["per_sample"]

    @property
    def required_metadata(self) -> tuple[str, ...]:
        return tuple(self.health["required_metadata"])

    @property
    def components(self) -> list[str]:
        return list(self.health["components"])

    @property
    def skipped(self) -> int:
        """Batches skipped (NaN scores) under ``on_error="skip"``."""
        return self.counts["skipped_batches"]

    def _fetch_health(self) -> dict[str, Any]:
        doc, attempts, cause = self._attempts(
            lambda client: client.get(f"{self.url}/health"), self._read_health
        )
        if doc is None:
            raise RemoteRewardError(self._message(attempts, cause, "answer GET /health"))
        return doc

    def _read_health(self, response) -> dict[str, Any]:
        doc = self._json(response)
        wire = doc.get("wire")
        if wire != WIRE:
            raise _Final(
                f"speaks the wire format {wire!r}, this client {WIRE!r}; install the same diffrl on both sides"
            )
        need = {
            "name": str,
            "per_sample": bool,
            "required_metadata": list,
            "components": list,
            "loaded": bool,
        }
        bad = [k for k, kind in need.items() if not isinstance(doc.get(k), kind)]
        if bad or not doc["components"]:
            raise _Retryable(
                f"answered /health without {', '.join(bad) or 'components'}: {_clip(response.text)}"
            )
        return doc

    # -------------------------------------------------------------- loading = waiting for the server's weights
    def _load(self) -> None:
        deadline = time.monotonic() + self.load_timeout
        while True:
            doc = self._fetch_health()  # fresh each time; the cached answer keeps name etc. if this one fails
            self._health = doc
            if doc.get("error"):
                raise RemoteRewardError(f"reward server {self.url}: {doc['error']}")
            if doc["loaded"]:
                self._server_fingerprint = doc.get("fingerprint")
                return
            if time.monotonic() > deadline:
                raise RemoteRewardError(
                    f"reward server {self.url} has not loaded {doc['name']!r} after load_timeout={self.load_timeout:g}s; "
                    "wait for it (GET /health says loaded: true) or raise load_timeout."
                )
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())) or 0.05)

    def settings(self) -> dict[str, Any]:
        return {"server_fingerprint": self._server_fingerprint, "images": "uint8"}

    @classmethod
    def hub_files(cls, **kwargs) -> list:
        """None here: the server's machine holds the weights (run ``diffrl download`` there)."""
        return []

    # -------------------------------------------------------------- HTTP
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            httpx = _httpx()

            client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)))
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every thread's HTTP connections."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_local"], state["_lock"], state["_clients"] = None, None, []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local, self._lock = threading.local(), threading.Lock()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def _attempts(self, send, read) -> tuple[Any, int, str]:
        """``read(send(client))`` with retries and backoff: ``(result, attempts, "")``, or ``(None, attempts,
        causes)`` when the attempts are spent or the failure is final (also kept in :attr:`last_error`)."""
        httpx = _httpx()

        attempts, causes = 0, []
        while True:
            attempts += 1
            self._count("attempts")
            try:
                try:
                    response = send(self._client())
                except httpx.TimeoutException:
                    raise _Retryable(f"no answer within timeout={self.timeout:g}s") from None
                except httpx.TransportError as err:
                    raise _Retryable(_transport_cause(err)) from None
                if 400 <= response.status_code < 500 or (response.status_code == 503 and _error_of(response)):
                    cause = _error_of(response) or _clip(response.text) or response.reason_phrase
                    raise RemoteRewardError(f"reward server {self.url}: HTTP {response.status_code}: {cause}")
                if response.status_code != 200:
                    cause = _error_of(response) or _clip(response.text) or response.reason_phrase
                    raise _Retryable(f"HTTP {response.status_code}: {cause}")
                return read(response), attempts, ""
            except (_Final, _Retryable) as err:
                if str(err) not in causes:
                    causes.append(str(err))
                self.last_error = ", then ".join(causes)
                if isinstance(err, _Final) or attempts > self.retries:
                    return None, attempts, self.last_error
                self._count("retries")
                time.sleep(self.backoff * 2 ** (attempts - 1))

    def _message(self, attempts: int, cause: str, what: str = "score the batch") -> str:
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        fix = (
            "raise timeout or retries, or set on_error: skip"
            if what == "score the batch"
            else "check the url"
        )
        return (
            f"reward server {self.url} could not {what}: {cause}{tries}; check that diffrl serve-reward runs there "
            f"(and any SSH tunnel), or {fix}."
        )

    @staticmethod
    def _json(response) -> dict[str, Any]:
        try:
            doc = json.loads(response.content)
        except (UnicodeDecodeError, ValueError):
            raise _Retryable(f"answered what is not JSON: {_clip(response.text)!r}") from None
        if not isinstance(doc, dict):
            raise _Retryable(f"answered a JSON {type(doc).__name__}, not an object: {_clip(response.text)!r}")
        return doc

    # -------------------------------------------------------------- scoring
    def _read_scores(self, response, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        doc = self._json(response)
        if doc.get("name") != self.name:
            raise _Final(
                f"now serves {doc.get('name')!r}, not {self.name!r}; restart the run or the right server"
            )
        scores = _numbers(doc.get("scores"), batch, "scores")
        raw = doc.get("components")
        if not isinstance(raw, dict) or not raw:
            raise _Retryable(f"answered without components: {_clip(response.text)!r}")
        components = {str(k): _numbers(v, batch, f"components.{k}") for k, v in raw.items()}
        if not self.allow_nonfinite:
            bad = [i for i, s in enumerate(scores.tolist()) if not math.isfinite(s)]
            if bad:
                raise _Final(
                    f"returned non-finite scores for {len(bad)} of {batch} images (row {bad[0]}: "
                    f"{scores[bad[0]].item()}); fix the served reward or set allow_nonfinite: true"
                )
        return scores, components

    def _score_chunk(
        self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One request: float32 scores (B,) and components on the CPU; NaN when skipped."""
        batch = images.shape[0]
        body = encode_request(quantize_images(images), prompts, metadata)
        self._count("requests")
        result, attempts, cause = self._attempts(
            lambda client: client.post(
                f"{self.url}/score", content=body, headers={"content-type": "application/octet-stream"}
            ),
            lambda response: self._read_scores(response, batch),
        )
        if result is not None:
            return result
        message = self._message(attempts, cause)
        if self.on_error == "raise":
            raise RemoteRewardError(message)
        self._count("skipped_batches")
        self._count("skipped_images", batch)
        logger.warning("skipped a batch of %d images (NaN scores): %s", batch, message)
        nan = torch.full((batch,), math.nan, dtype=torch.float32)
        return nan, {name: nan.clone() for name in self.components}

    def score(self, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
        return self._score_chunk(images, prompts, metadata)[0]

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> RewardOutput:
        """The total and the served reward's components, one request per ``batch_size`` images."""
        prompts = check_inputs(images, prompts, self.name)
        missing = [k for k in self.required_metadata if k not in metadata]
        if missing:  # bad input: no request, whatever on_error says
            raise ValueError(
                f"reward {self.name!r} (served at {self.url}) needs the metadata field {missing[0]!r}; pass it with "
                "every batch (a .jsonl prompt file with that field per line)."
            )
        if not self._loaded:
            try:
                self.load(self.device if self.device is not None else images.device)
            except RemoteRewardError as err:
                if self.on_error == "raise":
                    raise
                # the server is down or still loading: skip this batch, try again at the next call
                self.last_error = str(err)
                self._count("skipped_batches")
                self._count("skipped_images", images.shape[0])
                logger.warning("skipped a batch of %d images (NaN scores): %s", images.shape[0], err)
                nan = torch.full((images.shape[0],), math.nan, dtype=torch.float32, device=images.device)
                return RewardOutput(total=nan, components={name: nan.clone() for name in self.components})
        batch = images.shape[0]
        step = self.batch_size or max(batch, 1)
        totals, parts = [], []
        for start in range(0, batch, step):
            stop = min(start + step, batch)
            meta = split_metadata(metadata, batch, start, stop)
            total, components = self._score_chunk(images[start:stop], prompts[start:stop], meta)
            totals.append(total)
            parts.append(components)
        device = images.device
        if not totals:
            empty = torch.zeros(0, dtype=torch.float32, device=device)
            return RewardOutput(total=empty, components={name: empty.clone() for name in self.components})
        names = list(parts[0])
        components = {
            k: torch.cat([p[k] for p in parts]).to(device) for k in names if all(k in p for p in parts)
        }
        return RewardOutput(total=torch.cat(totals).to(device), components=components)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> torch.Tensor:
        return self.evaluate(images, prompts, **metadata).total

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, on_error={self.on_error!r})"


# ---------------------------------------------------------------------------------------------- helpers


def _clip(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


def _error_of(response) -> str | None:
    """The ``error`` sentence of a server's JSON error answer, or None."""
    try:
        doc = json.loads(response.content)
    except (UnicodeDecodeError, ValueError):
        return None
    return str(doc["error"]) if isinstance(doc, dict) and "error" in doc else None


def _httpx():
    try:
        import httpx
    except ImportError as err:
        raise ImportError(f"the remote reward needs httpx ({err}); pip install 'diffrl[serve]'.") from None
    return httpx


def _transport_cause(err: Exception) -> str:
    httpx = _httpx()

    if isinstance(err, httpx.ConnectError):
        return f"cannot connect ({_clip(str(err), 120) or 'connection refused'})"
    if isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "the server closed the connection without answering"
    return f"{type(err).__name__}: {_clip(str(err), 120)}"


def _numbers(values: Any, batch: int, what: str) -> torch.Tensor:
    if not isinstance(values, list) or len(values) != batch:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise _Retryable(f"answered {got} as {what} for {batch} images")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise _Retryable(f"answered {what} that are not all numbers")
    return torch.from_numpy(np.asarray(values, dtype=np.float32))
