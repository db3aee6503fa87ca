"""A test double for an OpenAI-compatible embeddings server (TEI, infinity, Ollama, OpenAI): a small real HTTP server
on 127.0.0.1 (a free port) in a background thread, speaking the protocol over real sockets.

    with OpenAIDouble(dim=8) as srv:
        srv.base_url                       # http://127.0.0.1:<port>/v1
        srv.fail(503, times=2, retry_after=1)
        ...
        srv.embedding_requests()           # the recorded POST /v1/embeddings requests (inputs, headers, body)

Routes: POST /v1/embeddings, GET /v1/models, GET /health. Vectors are deterministic (seeded by the text's sha256)
and deliberately not normalised: `vector(text)` is what the server sends, `expected(text)` what a client should
hand back after L2 normalisation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections import deque
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np

from http_double import HTTPDouble
from http_double import err as _err


class OpenAIDouble(HTTPDouble):
    """Configurable: `dim`; `reply` "auto" (honour the request's encoding_format, float by default, like OpenAI),
    "float" (always float lists: a server that ignores the field) or "base64"; `shuffle` the order of `data`;
    `api_key` required as Bearer (401 otherwise); `max_inputs` (more: `too_many_status`, 400 like OpenAI);
    `reject_base64` (400 naming encoding_format); `healthy` False = /v1/models and /health answer 503;
    `models_route` False = /v1/models is 404 (a server with only /health); `zero_vectors` answers zeros."""

    name = "openai-double"

    def __init__(self, dim: int = 8, *, model: str = "double-embed", reply: str = "auto", shuffle: bool = False,
                 api_key: str | None = None, max_inputs: int = 2048, too_many_status: int = 400,
                 reject_base64: bool = False, healthy: bool = True, models_route: bool = True,
                 zero_vectors: bool = False, seed: int = 0):
        self.dim = dim
        self.model = model
        self.reply = reply
        self.shuffle = shuffle
        self.api_key = api_key
        self.max_inputs = max_inputs
        self.too_many_status = too_many_status
        self.reject_base64 = reject_base64
        self.healthy = healthy
        self.models_route = models_route
        self.zero_vectors = zero_vectors
        self._rng = random.Random(seed)
        self._failures: deque[tuple[int, float | None, str]] = deque()
        super().__init__()

    # -- vectors -----------------------------------------------------------------------------------------------
    def vector(self, text: Any) -> np.ndarray:
        """The raw (unnormalised) float32 vector this server answers for `text`."""
        key = text if isinstance(text, str) else json.dumps(text)
        seed = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32) * 3.0
        return np.zeros(self.dim, np.float32) if self.zero_vectors else v

    def expected(self, text: Any) -> np.ndarray:
        v = self.vector(text)
        return (v / np.linalg.norm(v)).astype(np.float32)

    # -- scripting ---------------------------------------------------------------------------------------------
    def fail(self, status: int, times: int = 1, retry_after: float | None = None, message: str | None = None) -> None:
        """The next `times` POST /v1/embeddings answer `status` in OpenAI's error shape (Retry-After when given)."""
        with self._lock:
            for _ in range(times):
                self._failures.append((status, retry_after, message or f"injected {status}"))

    def embedding_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["method"] == "POST" and r["path"] == "/v1/embeddings"]

    def batch_sizes(self) -> list[int]:
        return [len(r["inputs"]) for r in self.embedding_requests()]

    def health_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["method"] == "GET"]

    # -- routes ------------------------------------------------------------------------------------------------
    def _get(self, h: BaseHTTPRequestHandler, path: str) -> None:
        if path == "/v1/models" and self.models_route:
            if not self.healthy:
                return self._send(h, 503, _err("model is loading", "server_error"))
            return self._send(h, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "owned_by": "double"}]})
        if path == "/health":
            if not self.healthy:
                return self._send(h, 503, {"status": "loading"})
            return self._send(h, 200, {"status": "ok"})
        self._send(h, 404, _err(f"no route {path}", "invalid_request_error", code="not_found"))

    def _post(self, h: BaseHTTPRequestHandler, path: str, body: Any) -> None:
        if path != "/v1/embeddings":
            return self._send(h, 404, _err("no such route", "invalid_request_error"))
        self._embeddings(h, body)

    # -- internals ---------------------------------------------------------------------------------------------
    def _record(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        inputs = None
        if isinstance(body, dict):
            inp = body.get("input")
            inputs = _as_list(inp)
        with self._lock:
            self.requests.append({"method": h.command, "path": h.path.split("?", 1)[0],
                                  "headers": {k.lower(): v for k, v in h.headers.items()},
                                  "body": body, "inputs": inputs})

    def _embeddings(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        with self._lock:
            failure = self._failures.popleft() if self._failures else None
        if failure is not None:
            status, retry_after, message = failure
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            return self._send(h, status, _err(message, kind), headers)
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(h, 401, _err("Incorrect API key provided", "invalid_request_error",
                                           code="invalid_api_key"))
        if not isinstance(body, dict) or "input" not in body:
            return self._send(h, 400, _err("'input' is required", "invalid_request_error", param="input"))
        inp = body["input"]
        inputs = _as_list(inp)
        if not isinstance(inputs, list) or not inputs:
            return self._send(h, 400, _err("'input' must be a non-empty string or array", "invalid_request_error",
                                           param="input"))
        if len(inputs) > self.max_inputs:
            return self._send(h, self.too_many_status, _err(
                f"'input' has {len(inputs)} items; at most {self.max_inputs} are allowed", "invalid_request_error",
                param="input"))
        fmt = body.get("encoding_format", "float")
        if fmt == "base64" and self.reject_base64:
            return self._send(h, 400, _err("encoding_format: unknown variant `base64`", "invalid_request_error",
                                           param="encoding_format"))
        as_b64 = {"auto": fmt == "base64", "float": False, "base64": True}[self.reply]
        data = []
        for i, text in enumerate(inputs):
            v = self.vector(text)
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if as_b64 else [float(x) for x in v]
            data.append({"object": "embedding", "index": i, "embedding": emb})
        if self.shuffle:
            with self._lock:
                self._rng.shuffle(data)
        n = sum(len(t) // 4 + 1 if isinstance(t, str) else len(t) for t in inputs)
        self._send(h, 200, {"object": "list", "data": data, "model": body.get("model", self.model),
                            "usage": {"prompt_tokens": n, "total_tokens": n}})


def _as_list(inp: Any) -> Any:
    """`input` as a list of items: one string or one token-id array is a single input."""
    if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
        return [inp]
    return inp

