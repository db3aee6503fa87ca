"""The chat proxy of /v1/chat/completions: the request forwarded to the upstream OpenAI-compatible chat server that
flows.yaml names (`service.chat`), its answer relayed (JSON, or SSE as it streams) with the RAG `sources` added, and
upstream failures answered as OpenAI-shaped errors (502, 503, 504)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, AsyncIterator, Mapping

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from woolocal_ingest.config import ChatConfig
from woolocal_ingest.service.errors import APIError
from woolocal_ingest.service.prompt import sources_of, text_of
from woolocal_ingest.stores import SearchHit

log = logging.getLogger("woolocal.service.rag")

# Fields of a chat request that are ours; they are not forwarded upstream.
_OUR_CHAT_FIELDS = ("store", "k", "filter", "mode", "extra_body")


def _env_number(name: str, kind: type) -> Any:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return kind(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a %s", name, raw, kind.__name__)
        return None


def _upstream_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


def _upstream_payload(body: Mapping[str, Any], chat: ChatConfig, alias_model: bool) -> dict:
    payload = {k: v for k, v in body.items() if k not in _OUR_CHAT_FIELDS}
    if chat.model:
        payload["model"] = chat.model
    elif alias_model:
        payload.pop("model", None)  # an alias means nothing upstream: let the server use its loaded model
    if payload.get("max_tokens") is None and payload.get("max_completion_tokens") is None:
        mt = chat.max_tokens if chat.max_tokens is not None else _env_number("LOCALMLX_MAX_TOKENS", int)
        if mt is not None:
            payload["max_tokens"] = mt
    if payload.get("temperature") is None:
        temp = chat.temperature if chat.temperature is not None else _env_number("LOCALMLX_TEMPERATURE", float)
        if temp is not None:
            payload["temperature"] = temp
    return payload


def _upstream_message(resp_body: bytes) -> str:
    try:
        data = json.loads(resp_body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(data, dict) and data.get("detail"):
            return str(data["detail"])
    except (ValueError, UnicodeDecodeError):
        pass
    text = resp_body.decode("utf-8", "replace").strip()
    return text[:500] or "(empty body)"


def _transport_error(e: Exception, url: str, timeout_s: float) -> APIError:
    import httpx

    if isinstance(e, httpx.TimeoutException):
        return APIError(504, f"the upstream chat server at {url} did not answer within {timeout_s:g} s "
                             "(service.chat.timeout_s)", code="upstream_timeout")
    return APIError(503, f"the upstream chat server at {url} is unreachable ({type(e).__name__}: {e}); "
                         "check that it runs, or service.chat.upstream in flows.yaml", code="upstream_unavailable")


def _timeout(chat: ChatConfig):
    import httpx

    return httpx.Timeout(chat.timeout_s, connect=min(5.0, chat.timeout_s))


def check_upstream(chat: ChatConfig) -> None:
    """503 `upstream_not_configured` unless flows.yaml names an upstream chat server (`service.chat.upstream`)."""
    if not chat.upstream:
        raise APIError(503, "no upstream chat server is configured: set service.chat.upstream in flows.yaml "
                            "(e.g. http://127.0.0.1:8080/v1 for mlx_lm.server or llama.cpp, "
                            "http://127.0.0.1:11434/v1 for Ollama)", param="service.chat.upstream",
                       code="upstream_not_configured")


async def forward(body: Mapping[str, Any], chat: ChatConfig, hits: list[SearchHit] | None,
                  alias_model: bool) -> Response:
    """Send the chat request upstream (our fields removed, flows.yaml's model, max_tokens and temperature applied)
    and relay the answer: JSON with `sources` added when `hits` were retrieved, or (`stream`) the upstream SSE
    events as they arrive, then a `sources` chunk."""
    import httpx

    payload = _upstream_payload(body, chat, alias_model)
    url = _upstream_url(chat.upstream)
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(chat.api_key_env) if chat.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    client = httpx.AsyncClient(timeout=_timeout(chat), trust_env=False)
    if payload.get("stream"):
        try:
            req = client.build_request("POST", url, json=payload, headers={**headers, "Accept": "text/event-stream"})
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            await client.aclose()
            raise _transport_error(e, url, chat.timeout_s) from None
        if resp.status_code >= 400:
            try:
                raw = await resp.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await resp.aclose()
                await client.aclose()
            raise _upstream_status_error(resp.status_code, raw, url)
        return StreamingResponse(_relay_stream(resp, hits, url, chat.timeout_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(_close, resp, client))
    try:
        resp = await client.post(url, json=payload, headers=headers)
    except httpx.HTTPError as e:
        raise _transport_error(e, url, chat.timeout_s) from None
    finally:
        await client.aclose()
    if resp.status_code >= 400:
        raise _upstream_status_error(resp.status_code, resp.content, url)
    try:
        data = resp.json()
    except ValueError:
        raise APIError(502, f"the upstream chat server at {url} answered with something that is not JSON: "
                            f"{resp.text[:200]!r}", code="upstream_bad_response") from None
    if not isinstance(data, dict):
        raise APIError(502, f"the upstream chat server at {url} answered JSON that is not an object",
                       code="upstream_bad_response")
    if hits is not None:
        answer = " ".join(text_of((c.get("message") or {}).get("content")) for c in data.get("choices") or []
                          if isinstance(c, dict))
        data["sources"] = sources_of(hits, answer)
    return JSONResponse(data)


def _upstream_status_error(status: int, raw: bytes, url: str) -> APIError:
    return APIError(502, f"the upstream chat server at {url} answered {status}: {_upstream_message(raw)}",
                    code=f"upstream_{status}")


async def _close(resp, client) -> None:
    await resp.aclose()
    await client.aclose()


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _lines(resp) -> AsyncIterator[str]:
    try:
        async for line in resp.aiter_lines():
            yield line
    finally:
        await resp.aclose()  # also when the client went away mid-stream


async def _relay_stream(resp, hits: list[SearchHit] | None, url: str, timeout_s: float) -> AsyncIterator[bytes]:
    """Relay upstream SSE `data:` events as they arrive; then our `sources` chunk, then `data: [DONE]`."""
    import httpx

    answer: list[str] = []
    meta: dict[str, Any] = {}
    try:
        async for line in _lines(resp):
            if not line.startswith("data:"):
                continue  # comments (keep-alives), event names, blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                obj = json.loads(data)
            except ValueError:
                continue  # not JSON: nothing a client could parse either
            if isinstance(obj, dict):
                for key in ("id", "created", "model", "system_fingerprint"):
                    if key in obj and key not in meta:
                        meta[key] = obj[key]
                for c in obj.get("choices") or []:
                    if isinstance(c, dict):
                        answer.append(text_of((c.get("delta") or {}).get("content")))
            yield f"data: {data}\n\n".encode()
    except httpx.HTTPError as e:
        err = _transport_error(e, url, timeout_s)
        if not isinstance(e, httpx.TimeoutException):
            err = APIError(502, f"the upstream chat server at {url} broke off the stream ({type(e).__name__}: {e})",
                           code="upstream_stream_broken")
        yield _sse(err.body())
        yield b"data: [DONE]\n\n"
        return
    if hits is not None:
        yield _sse({"id": meta.get("id", "chatcmpl-woolocal"), "object": "chat.completion.chunk",
                    "created": meta.get("created", int(time.time())), "model": meta.get("model", ""),
                    "choices": [], "sources": sources_of(hits, "".join(answer))})
    yield b"data: [DONE]\n\n"
