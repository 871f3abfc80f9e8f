"""VLM yes-probability (VQAScore style): how sure an open vision-language model is that the image shows the prompt.

The VLM is asked a yes/no question about the image and the prompt, by default
``Does this figure show "{prompt}"? Please answer yes or no.`` (the VQAScore question), in one user turn of the
model's own chat template (image first, then the question, generation prompt appended). The score is the
probability of "yes" at the first answer token, normalised over the yes/no answers::

    score = (P(Yes) + P(yes) + P(" Yes") + P(" yes")) / (that + P(No) + P(no) + P(" No") + P(" no"))

summing, for each answer, over the variants that are single tokens of the tokenizer. It lies in [0, 1]; 0.5 means
undecided; a capable VLM gives images that clearly match the prompt scores near 1 and clearly wrong ones near 0.
Score-only (``differentiable = False``): the image goes through the VLM's own (PIL) processor.

Two backends give the same number:

* ``backend="local"`` (default): a transformers image-text-to-text model (``AutoModelForImageTextToText`` +
  ``AutoProcessor``), by default ``Qwen/Qwen2.5-VL-7B-Instruct`` (Apache-2.0; files ``config.json``,
  ``generation_config.json``, ``model.safetensors.index.json``, ``model-0000{1..5}-of-00005.safetensors``,
  ``preprocessor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``, ``merges.txt``,
  ``chat_template.json``), a hub id or a local directory. One forward pass per chunk, left padding, only the
  last position's logits; the ratio is computed as ``sigmoid(logsumexp(yes logits) - logsumexp(no logits))``,
  which equals the softmax ratio above without underflow.
* ``backend="openai"``: an OpenAI-compatible server (vLLM, SGLang, ...) at ``base_url``, one
  ``POST {base_url}/chat/completions`` per image (PNG data URL, ``max_tokens=1``, ``logprobs``,
  ``top_logprobs=20``, ``temperature=0``), run concurrently; the same ratio is computed from the top logprobs
  of the first generated token, counting every token equal to "yes" / "no" after stripping whitespace and
  ignoring case (so "YES" counts there, and variants outside the top 20 do not: a difference from the local
  backend of at most the probability mass outside the top logprobs).

If no yes/no token appears in the server's top logprobs the model did not answer the question (a reasoning
model opening with ``<think>``, a wrong chat template, a question it refuses); by default this raises an error
naming the tokens it saw, because a silent 0.5 would make the reward constant and hide the fault;
``missing_answer="neutral"`` scores such images 0.5 instead.

The two backends live in :class:`VLMBackend`, which the VLM judges of :mod:`diffrl.rewards.vlm_judge` share: a
request there is any number of images and one text, answered either with P(yes) as above or with a generated text.

Deviations from VQAScore (``t2v_metrics``): VQAScore uses CLIP-FlanT5 and reads P("Yes") of a single token; this
reward takes any chat VLM and normalises over the yes/no variants. Images are quantised to 8 bits (as in a saved
PNG) before the processor, in both backends.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Reward
from .weights import HubFile, resolve_snapshot

__all__ = [
    "VLMYesProb",
    "VLMBackend",
    "DEFAULT_MODEL",
    "DEFAULT_QUESTION",
    "YES_VARIANTS",
    "NO_VARIANTS",
    "yes_prob_from_top",
    "vlm_hub_files",
    "to_uint8",
]

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
YES_VARIANTS = ("Yes", "yes", " Yes", " yes")
NO_VARIANTS = ("No", "no", " No", " no")

_DEFAULT_FILES = (
    ["config.json", "model.safetensors.index.json"]
    + [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    + ["preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]
)
_DEFAULT_OPTIONAL = ["chat_template.json", "chat_template.jinja", "generation_config.json"]
# For another hub id: what a transformers VLM repository may hold (the weight shards come from the index).
_GENERIC_REQUIRED = ["config.json", "tokenizer_config.json"]
_GENERIC_OPTIONAL = [
    "model.safetensors.index.json",
    "model.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
]
_INDEX = "model.safetensors.index.json"

#: one request's images: a list of (H, W, 3) uint8 arrays, shown to the VLM in this order before the text
Images = Sequence[np.ndarray]


def _shards(index_file: Path) -> list[str]:
    weight_map = json.loads(Path(index_file).read_text())["weight_map"]
    return sorted(set(weight_map.values()))


def yes_prob_from_top(top: list[tuple[str, float]]) -> float | None:
    """Normalised P(yes) from ``(token, logprob)`` pairs (tokens compared stripped and lower-cased); ``None``
    when neither a yes nor a no token is among them."""
    yes = [lp for tok, lp in top if tok.strip().lower() == "yes"]
    no = [lp for tok, lp in top if tok.strip().lower() == "no"]
    if not yes and not no:
        return None
    if not no:
        return 1.0
    if not yes:
        return 0.0
    log_yes = torch.logsumexp(torch.tensor(yes, dtype=torch.float64), 0)
    log_no = torch.logsumexp(torch.tensor(no, dtype=torch.float64), 0)
    return float(torch.sigmoid(log_yes - log_no))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded (what a saved PNG holds)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(arr.permute(0, 2, 3, 1).cpu().numpy())


def vlm_hub_files(
    model: str | Path = DEFAULT_MODEL, revision: str | None = None, backend: str = "local"
) -> list[HubFile]:
    """The hub files of a transformers VLM: the exact list for ``Qwen/Qwen2.5-VL-7B-Instruct``; for another hub id
    the usual files (required: ``config.json``, ``tokenizer_config.json``) and, once its index is in the cache, its
    weight shards; nothing for a local directory or the server backend."""
    if backend != "local":
        return []
    model = str(model)
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        return []
    if model == DEFAULT_MODEL:
        return [HubFile(model, f, revision) for f in _DEFAULT_FILES] + [
            HubFile(model, f, revision, optional=True) for f in _DEFAULT_OPTIONAL
        ]
    files = [HubFile(model, f, revision) for f in _GENERIC_REQUIRED]
    files += [HubFile(model, f, revision, optional=True) for f in _GENERIC_OPTIONAL]
    try:  # the index is cached: list its shards too
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(model, _INDEX, revision=revision)
        if isinstance(index, str):
            files += [HubFile(model, s, revision) for s in _shards(Path(index))]
    except Exception:
        pass
    return files


class VLMBackend:
    """One chat VLM on one of two backends, shared by :class:`VLMYesProb` and the judges of
    :mod:`diffrl.rewards.vlm_judge`: a transformers model (``backend="local"``) or an OpenAI-compatible server
    (``backend="openai"``).

    Each request is one user turn: its images (``(H, W, 3)`` uint8 arrays, in order) then one text. Two things can be
    asked of it: :meth:`yes_prob` (the normalised P(yes) of the first answer token, see the module docstring of
    :mod:`diffrl.rewards.vlm`) and :meth:`generate` (the greedy answer, as text). ``owner`` is the reward's name, for
    the error messages. The options are those of :class:`VLMYesProb`, checked here at construction.
    """

    def __init__(
        self,
        owner: str,
        model: str | Path = DEFAULT_MODEL,
        backend: str = "local",
        revision: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_concurrency: int = 8,
        max_retries: int = 2,
        top_logprobs: int = 20,
    ):
        if backend not in ("local", "openai"):
            raise ValueError(f"backend={backend!r} is not supported; use 'local' (transformers) or 'openai'.")
        if processor_kwargs is not None and not isinstance(processor_kwargs, dict):
            raise ValueError(
                f"processor_kwargs={processor_kwargs!r} must be a dict of AutoProcessor.from_pretrained options."
            )
        if backend == "openai":
            if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"base_url={base_url!r} is not an http(s) URL; pass the server root with /v1, e.g. "
                    "'http://localhost:8000/v1'."
                )
            if not isinstance(max_concurrency, int) or max_concurrency < 1:
                raise ValueError(f"max_concurrency={max_concurrency!r} must be a positive integer.")
            if not isinstance(max_retries, int) or max_retries < 0:
                raise ValueError(f"max_retries={max_retries!r} must be a non-negative integer.")
            if not isinstance(top_logprobs, int) or top_logprobs < 1:
                raise ValueError(
                    f"top_logprobs={top_logprobs!r} must be a positive integer (20 is the usual cap)."
                )
            if not timeout or timeout <= 0:
                raise ValueError(f"timeout={timeout!r} must be a positive number of seconds.")
        self.owner = owner
        self.model_name = str(model)
        self.backend = backend
        self.revision = revision
        self.processor_kwargs = dict(processor_kwargs or {})
        self.base_url = base_url.rstrip("/") if base_url else None
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = float(timeout)
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.top_logprobs = top_logprobs
        self.model = None
        self.processor = None
        self.yes_ids: list[int] = []
        self.no_ids: list[int] = []
        self.device: torch.device | None = None
        self.dtype = torch.float32
        self._keep_last = False

    # ------------------------------------------------------------------ metadata
    def settings(self) -> dict[str, Any]:
        """The options that change answers (the owner's cache fingerprint)."""
        out: dict[str, Any] = {"backend": self.backend, "model": self.model_name}
        if self.backend == "local":
            out.update(revision=self.revision, processor_kwargs=self.processor_kwargs)
        else:
            out.update(base_url=self.base_url, top_logprobs=self.top_logprobs)
        return out

    def modules(self) -> list[torch.nn.Module]:
        """The loaded model (local backend), whose weights define the answers."""
        return [self.model] if isinstance(self.model, torch.nn.Module) else []

    # ------------------------------------------------------------------ loading
    def _resolve(self) -> Path:
        files = vlm_hub_files(self.model_name, self.revision)
        root = resolve_snapshot(self.model_name, files, self.owner, self.revision)
        if files and self.model_name != DEFAULT_MODEL and (root / _INDEX).is_file():
            shards = [s for s in _shards(root / _INDEX) if not (root / s).is_file()]
            if shards:
                resolve_snapshot(self.model_name, shards, self.owner, self.revision)
        return root

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        """Load the processor and the model onto ``device`` in ``dtype`` (local backend; nothing for a server)."""
        self.device, self.dtype = torch.device(device), dtype
        if self.backend != "local":
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        root = self._resolve()
        processor = AutoProcessor.from_pretrained(root, **self.processor_kwargs)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"reward {self.owner!r}: the processor of {self.model_name} has no tokenizer; pass an "
                "image-text-to-text model whose AutoProcessor bundles one."
            )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.yes_ids = self.single_token_ids(tokenizer, YES_VARIANTS)
        self.no_ids = self.single_token_ids(tokenizer, NO_VARIANTS)
        model = AutoModelForImageTextToText.from_pretrained(root, dtype=dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.processor = processor
        self._keep_last = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def single_token_ids(self, tokenizer, variants: tuple[str, ...]) -> list[int]:
        """The ids of the ``variants`` that are one token of ``tokenizer`` (an error when none is)."""
        ids: dict[int, None] = {}
        for text in variants:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids[int(encoded[0])] = None
        if not ids:
            raise ValueError(
                f"reward {self.owner!r}: none of {list(variants)} is a single token of the tokenizer of "
                f"{self.model_name}; use a VLM whose tokenizer answers yes/no in one token."
            )
        return list(ids)

    # ------------------------------------------------------------------ what is asked
    def yes_prob(
        self, images: Sequence[Images], texts: Sequence[str], missing_answer: str = "raise"
    ) -> torch.Tensor:
        """Normalised P(yes) of the first answer token for each request, float32 ``(n,)`` on the CPU.

        ``missing_answer`` (server backend): ``"raise"`` or ``"neutral"`` (0.5) when neither yes nor no is among the
        top logprobs."""
        if self.backend == "local":
            return self._yes_prob_local(images, texts).float().cpu()
        scores = self.map_requests(lambda im, t: self._yes_prob_server(im, t, missing_answer), images, texts)
        if not all(math.isfinite(s) for s in scores):
            raise RuntimeError(
                f"reward {self.owner!r}: the VLM server returned non-finite logprobs ({scores})."
            )
        return torch.tensor(scores, dtype=torch.float32)

    def generate(self, images: Sequence[Images], texts: Sequence[str], max_new_tokens: int) -> list[str]:
        """The greedy answer to each request (at most ``max_new_tokens`` tokens), special tokens removed."""
        if self.backend == "local":
            return self._generate_local(images, texts, max_new_tokens)
        return self.map_requests(lambda im, t: self._generate_server(im, t, max_new_tokens), images, texts)

    # ------------------------------------------------------------------ local backend
    def chat_texts(self, texts: Sequence[str], n_images: Sequence[int]) -> list[str]:
        """The model input text of each request: one user turn of the chat template (its images, then the text),
        generation prompt appended."""
        out = []
        for text, n in zip(texts, n_images, strict=True):
            content = [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": text}]
            messages = [{"role": "user", "content": content}]
            out.append(
                self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
        return out

    def model_inputs(self, images: Sequence[Images], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The processor's batch (left padded) for the requests, on the device, floats in the model's dtype."""
        from PIL import Image

        pil = [Image.fromarray(a) for request in images for a in request]
        batch = self.processor(
            text=self.chat_texts(texts, [len(r) for r in images]),
            images=pil,
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].all()):
            raise RuntimeError(
                f"reward {self.owner!r}: the processor of {self.model_name} padded on the right, so the last position "
                "is not the answer position; use a processor whose tokenizer supports padding_side='left'."
            )
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out

    def _yes_prob_local(self, images: Sequence[Images], texts: Sequence[str]) -> torch.Tensor:
        inputs = self.model_inputs(images, texts)
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        with torch.no_grad():
            logits = self.model(**inputs, use_cache=False, **extra).logits[:, -1, :].float()
        log_yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        log_no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.sigmoid(log_yes - log_no)

    def _generate_local(
        self, images: Sequence[Images], texts: Sequence[str], max_new_tokens: int
    ) -> list[str]:
        inputs = self.model_inputs(images, texts)
        tokenizer = self.processor.tokenizer
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ server backend
    def request_body(self, images: Images, text: str, **options) -> dict[str, Any]:
        """The ``/chat/completions`` body of one request (PNG data URLs, then the text); ``options`` are added."""
        from PIL import Image

        content: list[dict[str, Any]] = []
        for a in images:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": text})
        return {"model": self.model_name, "messages": [{"role": "user", "content": content}], **options}

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``{base_url}/chat/completions``: retried after a failed connection, a timeout, a 429 or
        a 5xx; any other HTTP error, or an answer that is not JSON, raises at once."""
        url = f"{self.base_url}/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read().decode(errors="replace")
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:500]
                if err.code == 429 or err.code >= 500:
                    last = RuntimeError(f"HTTP {err.code}: {detail}")
                    continue
                raise RuntimeError(
                    f"reward {self.owner!r}: the VLM server at {url} answered HTTP {err.code} ({detail}); check the "
                    f"served model name (model={self.model_name!r}), the API key and that it accepts images."
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = err
                continue
            try:
                return json.loads(raw)
            except ValueError:
                raise RuntimeError(
                    f"reward {self.owner!r}: the VLM server at {url} answered something that is not JSON "
                    f"({raw[:300]!r}); check that base_url points at an OpenAI-compatible API (ending in /v1)."
                ) from None
        reason = getattr(last, "reason", last)
        raise ConnectionError(
            f"reward {self.owner!r}: the VLM server at {url} is unreachable or failing after "
            f"{self.max_retries + 1} attempts ({reason}); start it (e.g. `vllm serve {self.model_name}`) or fix base_url."
        ) from last

    def _yes_prob_server(self, images: Images, text: str, missing_answer: str) -> float:
        body = self.request_body(
            images, text, max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs, temperature=0
        )
        reply = self.post(body)
        try:
            first = reply["choices"][0]["logprobs"]["content"][0]
            top = [(t["token"], float(t["logprob"])) for t in first.get("top_logprobs") or []]
            if not top:  # a server that returns only the chosen token
                top = [(first["token"], float(first["logprob"]))]
        except (KeyError, IndexError, TypeError) as err:
            raise RuntimeError(
                f"reward {self.owner!r}: the VLM server at {self.base_url} returned no logprobs of the first token "
                f"({str(reply)[:300]}); use a server that supports logprobs/top_logprobs (vLLM, SGLang)."
            ) from err
        p = yes_prob_from_top(top)
        if p is None:
            if missing_answer == "neutral":
                return 0.5
            seen = sorted({t for t, _ in top})
            raise RuntimeError(
                f"reward {self.owner!r}: neither yes nor no is among the top {self.top_logprobs} first tokens of "
                f"{self.model_name} (saw {seen}); fix the question or the chat template, or pass "
                "missing_answer='neutral' to score such images 0.5."
            )
        return p

    def _generate_server(self, images: Images, text: str, max_new_tokens: int) -> str:
        reply = self.post(self.request_body(images, text, max_tokens=max_new_tokens, temperature=0))
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise RuntimeError(
                f"reward {self.owner!r}: the VLM server at {self.base_url} returned no message "
                f"({str(reply)[:300]}); use an OpenAI-compatible chat completions API (vLLM, SGLang)."
            ) from err
        return content if isinstance(content, str) else ""

    def map_requests(
        self, fn: Callable[[Images, str], Any], images: Sequence[Images], texts: Sequence[str]
    ) -> list:
        """``fn(images, text)`` for every request, at most ``max_concurrency`` at once, in order; the first error
        cancels the requests not yet started and is raised."""
        requests = list(zip(images, texts, strict=True))
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            futures = [pool.submit(fn, im, t) for im, t in requests]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise f.exception()
            return [f.result() for f in futures]


class VLMYesProb(Reward):
    """P("yes") of a VLM asked whether the image shows the prompt (see the module docstring).

    Args:
        model: local backend: hub id or local directory of a transformers image-text-to-text model (default
            ``Qwen/Qwen2.5-VL-7B-Instruct``); server backend: the served model name (``"model"`` of the request).
        question: the question, with ``{prompt}`` where the prompt goes (replaced literally, so other braces are
            kept as they are).
        backend: ``"local"`` (transformers) or ``"openai"`` (an OpenAI-compatible server).
        revision: hub revision of ``model`` (local backend).
        processor_kwargs: extra arguments of ``AutoProcessor.from_pretrained``, e.g.
            ``{"size": {"shortest_edge": 56 * 56, "longest_edge": 512 * 28 * 28}}`` to bound the pixels (hence the
            visual tokens) of Qwen-VL models; they change the scores, so they are part of the settings.
        base_url: server root including ``/v1``, e.g. ``http://localhost:8000/v1`` (server backend).
        api_key: bearer token of the server (default: the ``OPENAI_API_KEY`` environment variable, else none).
        timeout: seconds to wait for one server answer.
        max_concurrency: server requests in flight at once.
        max_retries: extra attempts after a failed connection, a timeout, a 429 or a 5xx (then an error).
        top_logprobs: how many top logprobs to ask the server for (20 is the OpenAI API's maximum).
        missing_answer: what to do when neither yes nor no is among the server's top logprobs: ``"raise"`` (default)
            or ``"neutral"`` (score 0.5).
    """

    name = "vlm_yes_prob"
    differentiable = False

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        question: str = DEFAULT_QUESTION,
        backend: str = "local",
        revision: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_concurrency: int = 8,
        max_retries: int = 2,
        top_logprobs: int = 20,
        missing_answer: str = "raise",
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype=torch.float32,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if not isinstance(question, str) or "{prompt}" not in question:
            raise ValueError(
                f"question={question!r} has no {{prompt}} placeholder; write where the prompt goes, e.g. "
                f"{DEFAULT_QUESTION!r}."
            )
        if missing_answer not in ("raise", "neutral"):
            raise ValueError(f"missing_answer={missing_answer!r} must be 'raise' or 'neutral'.")
        self.vlm = VLMBackend(
            self.name,
            model,
            backend,
            revision,
            processor_kwargs,
            base_url,
            api_key,
            timeout,
            max_concurrency,
            max_retries,
            top_logprobs,
        )
        self.question = question
        self.missing_answer = missing_answer

    # the backend's state, under the names this reward has always had
    model_name = property(lambda self: self.vlm.model_name)
    backend = property(lambda self: self.vlm.backend)
    model = property(lambda self: self.vlm.model)
    processor = property(lambda self: self.vlm.processor)
    yes_ids = property(lambda self: self.vlm.yes_ids)
    no_ids = property(lambda self: self.vlm.no_ids)

    # ------------------------------------------------------------------ metadata
    def settings(self) -> dict[str, Any]:
        out = {**self.vlm.settings(), "question": self.question}
        if self.vlm.backend == "openai":
            out["missing_answer"] = self.missing_answer
        return out

    def weight_modules(self) -> list[torch.nn.Module]:
        return self.vlm.modules()

    @classmethod
    def hub_files(cls, **kwargs) -> list[HubFile]:
        return vlm_hub_files(
            kwargs.get("model", DEFAULT_MODEL), kwargs.get("revision"), kwargs.get("backend", "local")
        )

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        self.vlm.load(self.device, self.dtype)

    def _single_token_ids(self, tokenizer, variants: tuple[str, ...]) -> list[int]:
        return self.vlm.single_token_ids(tokenizer, variants)

    # ------------------------------------------------------------------ scoring
    def questions(self, prompts: list[str]) -> list[str]:
        """The question asked for each prompt."""
        return [self.question.replace("{prompt}", p) for p in prompts]

    def chat_texts(self, prompts: list[str]) -> list[str]:
        """The local backend's model input text for each prompt (chat template, generation prompt appended)."""
        return self.vlm.chat_texts(self.questions(prompts), [1] * len(prompts))

    def model_inputs(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The processor's batch (left padded) for images in [0, 1] and prompts, on the reward's device."""
        return self.vlm.model_inputs([[a] for a in to_uint8(images)], self.questions(prompts))

    def score(self, images, prompts, **metadata):
        requests = [[a] for a in to_uint8(images)]
        return self.vlm.yes_prob(requests, self.questions(prompts), self.missing_answer).to(images.device)
