"""What the OpenAI-protocol test doubles share: a small real HTTP server on 127.0.0.1 (a free port) in a background
thread, JSON request parsing, request recording and OpenAI's error shape. A double says what its routes answer in
`_get(h, path)` and `_post(h, path, body)`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def err(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class HTTPDouble:
    """Start/stop (or `with`), `port`, `base_url` (…/v1); every request lands in `requests`."""

    name = "http-double"

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- what a double answers ---------------------------------------------------------------------------------
    def _get(self, h: BaseHTTPRequestHandler, path: str) -> None:
        raise NotImplementedError

    def _post(self, h: BaseHTTPRequestHandler, path: str, body: Any) -> None:
        raise NotImplementedError

    def _record(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        with self._lock:
            self.requests.append({"method": h.command, "path": h.path.split("?", 1)[0],
                                  "headers": {k.lower(): v for k, v in h.headers.items()}, "body": body})

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: Any,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    # -- server ------------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self):
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                double._record(self, None)
                double._get(self, self.path.split("?", 1)[0])

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    double._record(self, None)
                    return double._send(self, 400, err("body is not JSON", "invalid_request_error"))
                double._record(self, body)
                double._post(self, self.path.split("?", 1)[0], body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.name}-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
