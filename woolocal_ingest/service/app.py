"""The FastAPI app of `woolocal serve`: OpenAI-compatible embeddings, health, models, metrics, and the store search /
chat RAG routes of `service/rag.py`.

Every error, FastAPI's and Starlette's own included (unknown route, wrong method, invalid JSON, a body too large,
an unhandled exception), is answered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. Request
validation errors are 400 `invalid_request_error` as OpenAI answers them (not FastAPI's 422).

One ASGI guard in front of everything: Bearer API key on every route but `/health` when a key is set (compared in
constant time), the body size limit (`service.max_body_mb`: Content-Length, and counted while the body streams in),
and request metrics (count and latency by route template and status).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from woolocal_ingest.config import FlowsConfig
from woolocal_ingest.errors import ConfigError
from woolocal_ingest.service.errors import APIError
from woolocal_ingest.service.metrics import ServiceMetrics
from woolocal_ingest.service.state import Loader, ServiceState

log = logging.getLogger("woolocal.service")

OPEN_PATHS = frozenset({"/health"})


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def _loc_param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


class _Guard:
    """Pure ASGI middleware: auth, body size limit, metrics, and a last-resort OpenAI-shaped 500."""

    def __init__(self, app, *, fastapi_app: FastAPI, api_key: str | None, max_body: int, metrics: ServiceMetrics):
        self.app = app
        self.fastapi_app = fastapi_app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.metrics = metrics

    def _flat_routes(self):
        for candidate in self.fastapi_app.router.routes:
            contexts = getattr(candidate, "effective_route_contexts", None)  # FastAPI >= 0.150 included routers
            if callable(contexts):
                try:
                    for ctx in contexts():
                        yield getattr(ctx, "starlette_route", None) or getattr(ctx, "original_route")
                except Exception:  # noqa: BLE001 - a label is all this is for
                    continue
            else:
                yield candidate

    def _route(self, scope) -> str:
        """The matched route's template (`/v1/stores/{store}/search`), never the raw path: bounded label sets."""
        route = scope.get("route")  # set by the router when the request got that far
        if route is None:  # answered by the guard (401, 413): match it ourselves
            partial = None
            for candidate in self._flat_routes():
                try:
                    match, child = candidate.matches(dict(scope))
                except Exception:  # noqa: BLE001
                    continue
                if match == Match.FULL:
                    route = child.get("route", candidate)
                    break
                if match == Match.PARTIAL and partial is None:
                    partial = child.get("route", candidate)
            route = route or partial
        path = getattr(route, "path", None) if route is not None else None
        return path if isinstance(path, str) else "unmatched"

    def _authorized(self, scope) -> APIError | None:
        header = None
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                header = v
                break
        if header is None:
            return APIError(401, "You didn't provide an API key. Send it in an Authorization header using Bearer "
                                 "auth (Authorization: Bearer YOUR_KEY); the key is in the environment variable "
                                 "the service was started with (service.api_key_env).", code="missing_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.api_key or b""):
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = {"status": 500, "started": False, "ours": False}

        async def send_wrapped(message):
            if state["ours"]:
                return  # we answered already (413 mid-body): drop what the app still tries to send
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
            await send(message)

        async def answer(err: APIError):
            resp = _error_response(err)
            await resp(scope, receive, send_wrapped)
            state["ours"] = True

        try:
            if self.api_key is not None and scope["path"] not in OPEN_PATHS:
                err = self._authorized(scope)
                if err is not None:
                    self.metrics.rejected.labels("auth").inc()
                    return await answer(err)
            too_large = APIError(413, f"Request body too large: the limit is {self.max_body} bytes "
                                      "(service.max_body_mb in flows.yaml).", code="request_too_large")
            for k, v in scope.get("headers", ()):
                if k == b"content-length":
                    try:
                        declared = int(v)
                    except ValueError:
                        return await answer(APIError(400, "Invalid Content-Length header.", code="invalid_header"))
                    if declared > self.max_body:
                        self.metrics.rejected.labels("too_large").inc()
                        return await answer(too_large)
            seen = 0

            async def receive_limited():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        if not state["started"] and not state["ours"]:
                            self.metrics.rejected.labels("too_large").inc()
                            await answer(too_large)
                        return {"type": "http.disconnect"}
                return message

            await self.app(scope, receive_limited, send_wrapped)
        except ClientDisconnect:
            pass  # the client went away, or we cut its body off with a 413 already
        except Exception:  # noqa: BLE001 - the client gets OpenAI's shape, the log gets the traceback
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not state["started"] and not state["ours"]:
                await answer(APIError(500, "The server had an error while processing your request.",
                                      type="server_error", code="internal_error"))
        finally:
            self.metrics.observe_request(self._route(scope), scope.get("method", ""), state["status"],
                                         time.perf_counter() - t0)


def create_app(config: FlowsConfig, *, stores_root: Path | None = None, api_key: str | None = None,
               require_key: bool = False, load_in_background: bool = True, loader: Loader | None = None) -> FastAPI:
    """The service app. `api_key`: None reads the environment variable `service.api_key_env`; when a key is set,
    every route but /health requires `Authorization: Bearer <key>`. `require_key`: refuse (ConfigError) to build
    an app without one (a non-loopback bind). Models load in a background thread (`/health` is 503 until then)
    or, with `load_in_background=False`, before this returns. `loader`: how a ModelSpec becomes an Embedder
    (tests inject one)."""
    env = config.service.api_key_env
    key = api_key if api_key is not None else (os.environ.get(env) or None)
    if require_key and not key:
        raise ConfigError(f"an API key is required here (a non-loopback bind): set the environment variable {env}")
    metrics = ServiceMetrics()
    state = ServiceState(config, stores_root=stores_root, loader=loader, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()

    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("woolocal-ingest")
    except PackageNotFoundError:  # pragma: no cover
        ver = "0"
    app = FastAPI(title="woolocal serve", version=ver, lifespan=lifespan,
                  description="Local embeddings (OpenAI-compatible), store search and chat RAG for Wooster.")
    app.state.service = state
    app.state.metrics = metrics
    app.state.api_key = key

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _loc_param(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            msg = f"We could not parse the JSON body of your request: {first.get('ctx', {}).get('error', '')}."
            return _error_response(APIError(400, msg, code="invalid_json"))
        msgs = "; ".join(f"{_loc_param(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:5])
        return _error_response(APIError(400, f"Invalid request: {msgs}.", param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404 and exc.detail == "Not Found":
            msg = f"Invalid URL ({request.method} {request.url.path})"
            code = "unknown_url"
        elif exc.status_code == 405:
            msg = f"Method {request.method} is not allowed for {request.url.path}."
            code = "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        return _error_response(APIError(exc.status_code, msg, code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):  # pragma: no cover - the guard answers first
        log.exception("unhandled error")
        return _error_response(APIError(500, "The server had an error while processing your request.",
                                        type="server_error", code="internal_error"))

    @app.get("/health")
    async def health():
        body = {"status": state.status, "models": [
            {"id": s.key, "dim": s.dim, "status": s.status, "purposes": s.purposes,
             **({"error": s.error} if s.error else {})} for s in state.slots],
            "queue_depth": state.queue_depth, "uptime_s": round(time.time() - state.started, 1)}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503,
                            headers=None if body["status"] == "ok" else {"Retry-After": "2"})

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": state.list_models()}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        return state.describe(model)

    @app.get("/metrics")
    async def prometheus_metrics():
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    from woolocal_ingest.service import embeddings, rag

    app.include_router(embeddings.router)
    app.include_router(rag.router)

    max_body = int(config.service.max_body_mb * 1024 * 1024)
    app.add_middleware(_Guard, fastapi_app=app, api_key=key, max_body=max_body, metrics=metrics)
    state.start_loading(background=load_in_background)
    return app


__all__ = ["create_app", "ServiceState", "APIError"]
