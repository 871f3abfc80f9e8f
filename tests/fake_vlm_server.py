"""An OpenAI-compatible ``/v1/chat/completions`` server (standard-library HTTP server in a thread) answering with a
tiny VLM, and the one-request reference computations of that VLM; shared by the tests of ``vlm_yes_prob`` and of the
VLM judges.

A request with ``logprobs`` gets the top logprobs of the first answer token, computed by the tiny VLM on the request's
images (in order) and text; any other request gets a generated answer: ``server.reply(images, text)`` when a test
sets it, else the tiny VLM's greedy answer of at most ``max_tokens`` tokens.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image


def chat_text(processor, n_images: int, text: str) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def reference_logprobs(processor, model, images: list[Image.Image], text: str) -> torch.Tensor:
    """log softmax over the vocabulary of the first answer token, one request, no padding."""
    batch = processor(text=[chat_text(processor, len(images), text)], images=images, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


def reference_answer(processor, model, images: list[Image.Image], text: str, max_new_tokens: int) -> str:
    """The greedy answer of one request, no padding, special tokens removed."""
    batch = processor(text=[chat_text(processor, len(images), text)], images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    return processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) image in [0, 1] as the 8-bit PIL image the rewards send."""
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


class FakeVLMServer:
    """``/v1/chat/completions`` answered by a tiny VLM; ``mode`` ``"ok"``, ``"500"``, ``"404"`` or ``"no_answer"``
    (the yes/no tokens removed from the logprobs), every request kept in ``requests`` as ``(body, headers)``."""

    def __init__(self, processor, model):
        self.processor, self.model = processor, model
        self.mode = "ok"
        self.reply: Callable[[list[Image.Image], str], str] | None = None
        self.requests: list[tuple[dict, dict]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((body, dict(self.headers)))
                if outer.mode == "500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b'{"error": "busy"}')
                    return
                if self.path != "/v1/chat/completions" or outer.mode == "404":
                    self.send_response(404)
                    self.end_headers()
                    self.wfile.write(b'{"error": "model not found"}')
                    return
                reply = outer.answer(body)
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def parts(body: dict) -> tuple[list[Image.Image], str]:
        """The request's images (decoded, in order) and text."""
        content = body["messages"][0]["content"]
        images = []
        for part in content:
            if part["type"] == "image_url":
                head, b64 = part["image_url"]["url"].split(",", 1)
                assert head == "data:image/png;base64"
                images.append(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
        text = next(p["text"] for p in content if p["type"] == "text")
        return images, text

    def answer(self, body: dict) -> dict:
        images, text = self.parts(body)
        choice = {"index": 0, "finish_reason": "stop"}
        if body.get("logprobs"):
            tok = self.processor.tokenizer
            with self.lock:
                logp = reference_logprobs(self.processor, self.model, images, text)
            if self.mode == "no_answer":  # drop the yes/no tokens: a model that starts with something else
                answer_ids = [
                    tok.convert_tokens_to_ids(t) for t in ("Yes", "yes", "ĠYes", "Ġyes", "No", "no")
                ]
                answer_ids += [tok.convert_tokens_to_ids(t) for t in ("ĠNo", "Ġno")]
                logp[answer_ids] = -float("inf")
            values, ids = logp.topk(body["top_logprobs"])
            top = [
                {"token": tok.decode([i]), "logprob": float(v), "bytes": list(tok.decode([i]).encode())}
                for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            ]
            first = dict(top[0], top_logprobs=top)
            choice.update(
                message={"role": "assistant", "content": first["token"]},
                logprobs={"content": [first]},
                finish_reason="length",
            )
        else:
            if self.reply is not None:
                content = self.reply(images, text)
            else:
                with self.lock:
                    content = reference_answer(self.processor, self.model, images, text, body["max_tokens"])
            choice.update(message={"role": "assistant", "content": content})
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [choice],
        }

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
