"""A test double for an OpenAI-compatible chat server (mlx_lm.server, Ollama, llama.cpp, OpenAI): a small real HTTP
server on 127.0.0.1 (a free port) in a background thread, speaking the chat completions protocol over real sockets,
non-streaming (one JSON object) and streaming (SSE `data: {chunk}` events over chunked transfer encoding, ending
with `data: [DONE]`).

    with ChatDouble(answer="The key is with Marguerite [1].") as srv:
        srv.base_url                       # http://127.0.0.1:<port>/v1
        srv.fail(500, "model exploded")    # the next chat request answers 500 in OpenAI's error shape
        srv.delay_s = 2.0                  # sleep before answering (timeouts)
        srv.chat_requests()                # the recorded POST /v1/chat/completions requests (body, headers)

Routes: POST /v1/chat/completions, GET /v1/models, GET /health.
"""

from __future__ import annotations

import json
import time
from collections import deque
from http.server import BaseHTTPRequestHandler
from typing import Any

from http_double import HTTPDouble
from http_double import err as _err


class ChatDouble(HTTPDouble):
    """`answer`: the assistant text every request gets (streamed word by word); `model`: the model it reports;
    `api_key`: required as Bearer when set (401 otherwise); `delay_s`: sleep before the first byte of an answer;
    `stall_after`: in a stream, sleep `stall_s` after that many chunks (a server that hangs mid-answer)."""

    name = "chat-double"

    def __init__(self, answer: str = "The spare key is held by Marguerite Oyelaran [1].", *,
                 model: str = "double-chat", api_key: str | None = None, delay_s: float = 0.0,
                 stall_after: int | None = None, stall_s: float = 0.0):
        self.answer = answer
        self.model = model
        self.api_key = api_key
        self.delay_s = delay_s
        self.stall_after = stall_after
        self.stall_s = stall_s
        self._failures: deque[tuple[int, str]] = deque()
        super().__init__()
        self._n = 0

    # -- scripting ---------------------------------------------------------------------------------------------
    def fail(self, status: int, message: str | None = None, times: int = 1) -> None:
        with self._lock:
            for _ in range(times):
                self._failures.append((status, message or f"injected {status}"))

    def chat_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["method"] == "POST" and r["path"] == "/v1/chat/completions"]

    def last_body(self) -> dict:
        reqs = self.chat_requests()
        assert reqs, "the chat double got no chat request"
        return reqs[-1]["body"]

    # -- routes ------------------------------------------------------------------------------------------------
    def _get(self, h: BaseHTTPRequestHandler, path: str) -> None:
        if path == "/v1/models":
            return self._send(h, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "owned_by": "double"}]})
        if path == "/health":
            return self._send(h, 200, {"status": "ok"})
        self._send(h, 404, _err(f"no route {path}", "invalid_request_error"))

    def _post(self, h: BaseHTTPRequestHandler, path: str, body: Any) -> None:
        if path != "/v1/chat/completions":
            return self._send(h, 404, _err("no such route", "invalid_request_error"))
        self._chat(h, body)

    def _chat(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        with self._lock:
            failure = self._failures.popleft() if self._failures else None
            self._n += 1
            n = self._n
        if self.delay_s:
            time.sleep(self.delay_s)
        if failure is not None:
            status, message = failure
            return self._send(h, status, _err(message, "server_error" if status >= 500 else "invalid_request_error"))
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(h, 401, _err("Incorrect API key provided", "invalid_request_error",
                                           code="invalid_api_key"))
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return self._send(h, 400, _err("'messages' is required", "invalid_request_error", param="messages"))
        model = body.get("model") or self.model
        cid, created = f"chatcmpl-double-{n}", int(time.time())
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"] if isinstance(m, dict))
        words = self.answer.split(" ")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        if not body.get("stream"):
            return self._send(h, 200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": usage})
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def event(obj: Any) -> None:
            data = obj if isinstance(obj, bytes) else f"data: {json.dumps(obj)}\n\n".encode()
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        try:
            event(b": keep-alive\n\n")  # a comment, as some servers send: clients ignore it
            event(chunk({"role": "assistant", "content": ""}))
            for i, w in enumerate(words):
                if self.stall_after is not None and i == self.stall_after:
                    time.sleep(self.stall_s)
                event(chunk({"content": w if i == 0 else " " + w}))
            event(chunk({}, "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage})
            event(b"data: [DONE]\n\n")
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

