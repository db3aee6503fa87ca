"""A real uvicorn server for an ASGI app in a thread of the test process, on 127.0.0.1 and a free port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx


def free_port() -> int:
    """A loopback port nothing listens on (a refused connection, for upstream-down tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, *, wait_healthy: bool = False, timeout: float = 120.0) -> Iterator[str]:
    """Serve `app` with uvicorn; yield its base URL. `wait_healthy`: also wait until GET /health is 200 (models
    loaded). The server stops (graceful, 2 s at most) when the block ends."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        assert thread.is_alive(), "uvicorn stopped while starting"
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    while wait_healthy:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the service's models did not load"
        time.sleep(0.1)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
