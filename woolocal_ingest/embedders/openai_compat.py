"""Embeddings from an OpenAI-compatible server the user already runs (this project's service, TEI, infinity, Ollama,
OpenAI itself), through `POST {base}/embeddings`.

What this client does, so that a store written with it is as trustworthy as one written locally:

* batches of at most 2048 inputs (the API's limit) and at most `max_request_chars` characters per request; a 413
  reply splits the batch in two and tries again;
* asks for `encoding_format: "base64"` (raw little-endian float32, what the OpenAI clients ask for) and also accepts
  float lists (a server that ignores the field); a server that rejects the field gets `float` from then on;
* puts the reply back in input order by each item's `index`, checks every vector (count, dim, finite, non-zero) and
  L2-normalises it;
* retries 429, 5xx and connection errors with exponential backoff and jitter, honouring `Retry-After`
  (and `retry-after-ms`), at most `max_retries` times per request, then fails with the last error;
* takes several base URLs round-robin; a URL is health-checked before its first use (`GET {base}/models`, and when
  the server has no such route, `GET <root>/health`); a URL that fails the check or a connection is skipped and
  re-checked after a cooldown;
* raises `DimensionMismatchError` naming both dims when the server's dim differs from the expected one (or, with no
  expected dim, from the dim it answered first);
* sends the API key from the environment variable named by `api_key_env` as `Authorization: Bearer`;
* surfaces errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` (and TEI/FastAPI shapes) with
  their message;
* with `loopback_only=True` (privacy-first fallback), refuses every base URL whose host is not loopback before any
  socket is opened, and ignores proxy settings from the environment.

Chunking measures text in tokens of the model's own tokenizer, so `tokens` needs the model (or `tokenizer_model`) on
this machine; embedding does not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Sequence

import httpx
import numpy as np

from woolocal_ingest.config import EndpointConfig
from woolocal_ingest.embedders.base import EmbedderBase, Progress, TokenCounter, l2_normalise
from woolocal_ingest.embedders.registry import (
    KNOWN_DOC_PREFIXES, KNOWN_QUERY_PREFIXES, ModelInfo, resolve_model, slugify,
)
from woolocal_ingest.errors import ConfigError, DimensionMismatchError, ModelNotFoundError, WoolocalError

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # the OpenAI embeddings API's limit on inputs per request
DEFAULT_MAX_TOKENS = 8191  # OpenAI's per-input limit; used when the model is not on this machine
DEFAULT_MAX_REQUEST_CHARS = 1_000_000  # ~250k tokens: below OpenAI's 300k tokens per request
PROBE_TEXT = "dimension probe"


class EmbeddingServiceError(WoolocalError):
    """An OpenAI-compatible server refused or failed a request (the message carries the server's own message)."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None, attempts: int = 0):
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class RemoteEndpointRefusedError(ConfigError):
    """An endpoint is not on loopback while configuration allows loopback only; nothing was sent to it."""


# -- loopback ----------------------------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (also written as IPv4-mapped IPv6). No DNS lookup is made: any
    other name, however local it looks, is not loopback."""
    h = (host or "").strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback_url(url: str) -> bool:
    """True when `url` is http(s) to a loopback host (parsed as httpx will connect: userinfo is not the host)."""
    try:
        u = httpx.URL(str(url))
    except Exception:
        return False
    return u.scheme in ("http", "https") and is_loopback_host(u.host)


def redact_url(url: str) -> str:
    """`url` without user, password, query or fragment: safe for messages and manifests."""
    try:
        u = httpx.URL(str(url))
    except Exception:
        return "<unparseable url>"
    host = f"[{u.host}]" if ":" in u.host else u.host
    port = f":{u.port}" if u.port is not None else ""
    return f"{u.scheme}://{host}{port}{u.path.rstrip('/')}"


# -- the model record --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteModelInfo(ModelInfo):
    """A ModelInfo for a model served over HTTP: no local folder (`path` None), pooling "remote".

    `files_sha256` (the identity ingest uses to decide whether old vectors can be reused) is a hash of the backend,
    the model name sent to the server, the dim and the endpoints: the files behind a server cannot be seen from here,
    so a different server or model name means the store is re-embedded rather than mixed.
    """

    remote_model: str = ""
    endpoints: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        return 0

    def files_sha256(self) -> str:
        key = "\0".join(["openai-compatible", self.remote_model, str(self.dim), *sorted(self.endpoints)])
        return hashlib.sha256(key.encode()).hexdigest()

    def to_manifest(self) -> dict:
        d = asdict(self)
        d.pop("aliases")
        d["path"] = None
        d["endpoints"] = list(self.endpoints)
        d["slug"] = self.slug
        return d


# -- helpers -----------------------------------------------------------------------------------------------------


class _Url:
    """One base URL and what we know of its health."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        u = httpx.URL(self.base)
        self.embeddings = self.base + "/embeddings"
        self.models = self.base + "/models"
        self.health = str(u.copy_with(path="/health", query=None, fragment=None))
        self.label = redact_url(self.base)
        self.loopback = is_loopback_host(u.host)
        self.checked = False
        self.down_until: float | None = None
        self.last_error = ""

    def needs_check(self, now: float) -> bool:
        return not self.checked or (self.down_until is not None and now >= self.down_until)

    def cooling(self, now: float) -> bool:
        return self.down_until is not None and now < self.down_until


class _NoHealthyEndpoint(Exception):
    pass


def error_message(resp: httpx.Response) -> str:
    """The server's own error message: OpenAI `{"error": {...}}`, TEI `{"error": "...", "error_type"}`, FastAPI
    `{"detail": ...}`, or the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        text = resp.text.strip()
        return text[:500] or resp.reason_phrase or "(empty reply)"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = str(err.get("message") or "(no message)")
            extra = [f"{k}={err[k]}" for k in ("type", "param", "code") if err.get(k) not in (None, "")]
            return msg + (f" ({', '.join(extra)})" if extra else "")
        if isinstance(err, str):
            kind = body.get("error_type") or body.get("type")
            return err + (f" ({kind})" if kind else "")
        if "detail" in body:
            return str(body["detail"])[:500]
        if "message" in body:
            return str(body["message"])[:500]
    return str(body)[:500]


def retry_after_s(resp: httpx.Response) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `Retry-After` as seconds or an HTTP date)."""
    ms = resp.headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = resp.headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def decode_embedding(emb: Any) -> np.ndarray:
    """A reply's `embedding`: base64 of little-endian float32, or a list of numbers."""
    if isinstance(emb, str):
        try:
            raw = base64.b64decode(emb, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"embedding is not valid base64: {e}") from None
        if len(raw) % 4:
            raise ValueError(f"base64 embedding is {len(raw)} bytes, not a whole number of float32 values")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if isinstance(emb, list):
        try:
            return np.asarray(emb, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"embedding is not a list of numbers: {e}") from None
    raise ValueError(f"embedding is a {type(emb).__name__}, expected a base64 string or a list of numbers")


# -- the embedder ------------------------------------------------------------------------------------------------


class OpenAICompatibleEmbedder(EmbedderBase):
    """The Embedder interface over `POST {base}/embeddings` of an OpenAI-compatible server.

    `model` is the model's name here (the manifest's model name, and the local tokenizer looked up for chunking);
    `endpoint.model`, when set, is the name sent to the server instead (e.g. Ollama's `nomic-embed-text`).
    `dim` None: learned from the first reply (reading `.dim` before any embedding sends one short probe).
    """

    backend = "openai-compatible"

    def __init__(
        self,
        endpoint: EndpointConfig,
        model: str | None = None,
        dim: int | None = None,
        *,
        max_batch: int = MAX_INPUTS,
        max_request_chars: int = DEFAULT_MAX_REQUEST_CHARS,
        max_tokens: int | None = None,
        tokenizer_model: str | None = None,
        query_prefix: str | None = None,
        doc_prefix: str | None = None,
        send_dimensions: bool = False,
        loopback_only: bool = False,
        setting: str = "endpoint",
        dims_setting: str | None = None,
        health_cooldown_s: float = 30.0,
        health_timeout_s: float = 5.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        max_retry_after_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ):
        name = model or endpoint.model
        if not name:
            raise ConfigError(f"{setting}.model: no model name to send to {', '.join(map(redact_url, endpoint.urls))}")
        if not 1 <= max_batch <= MAX_INPUTS:
            raise ConfigError(f"max_batch must be between 1 and {MAX_INPUTS}, got {max_batch}")
        if dim is not None and dim < 1:
            raise ConfigError(f"{dims_setting or 'dimensions'}: must be a positive integer, got {dim}")
        self.endpoint = endpoint
        self._name = name
        self.remote_model = endpoint.model or name
        self._expected_dim = dim
        self._learned_dim: int | None = None
        self.max_batch = max_batch
        self.max_request_chars = max(1, max_request_chars)
        self._max_tokens = max_tokens
        self._tokenizer_model = tokenizer_model
        self._query_prefix = query_prefix
        self._doc_prefix = doc_prefix
        self.send_dimensions = send_dimensions
        self.loopback_only = loopback_only
        self.setting = setting
        self.dims_setting = dims_setting
        self.max_retries = endpoint.max_retries
        self.timeout_s = endpoint.timeout_s
        self.health_cooldown_s = health_cooldown_s
        self.health_timeout_s = min(health_timeout_s, endpoint.timeout_s)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self._sleep, self._clock, self._rng = sleep, clock, rng
        self._encoding = "base64"
        self._lock = threading.Lock()
        self._rr = 0
        self._local: ModelInfo | None = None
        self._local_error: Exception | None = None
        self._local_done = False
        self._tokens: TokenCounter | None = None

        urls: list[_Url] = []
        for i, raw in enumerate(endpoint.urls):
            try:
                u = httpx.URL(str(raw))
            except Exception as e:
                raise ConfigError(f"{setting}.urls[{i}]: {raw!r} is not a URL ({e})") from None
            if u.scheme not in ("http", "https") or not u.host:
                raise ConfigError(f"{setting}.urls[{i}]: {redact_url(raw)!r} must be an http:// or https:// URL "
                                  "with a host, e.g. http://127.0.0.1:8001/v1")
            urls.append(_Url(str(raw)))
        if loopback_only:
            remote = [u.label for u in urls if not u.loopback]
            if remote:
                # Checked here, before any client or socket exists.
                raise RemoteEndpointRefusedError(
                    f"{setting}.urls: {', '.join(remote)} is not on this machine (loopback: localhost, 127.0.0.0/8, "
                    "::1) and only loopback endpoints are allowed here; no connection was attempted")
        self._urls = urls

        self._headers = {"User-Agent": "woolocal-ingest", "Accept": "application/json"}
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env, "").strip()
            if not key:
                raise ConfigError(f"{setting}.api_key_env: environment variable {endpoint.api_key_env} is not set "
                                  "(it should hold the server's API key)")
            self._headers["Authorization"] = f"Bearer {key}"
        self._clients: dict[bool, httpx.Client] = {}

    # -- Embedder interface ------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        d = self._expected_dim or self._learned_dim
        if d is None:
            self._embed_batch([PROBE_TEXT])
            d = self._expected_dim or self._learned_dim
        assert d is not None
        return d

    @property
    def max_tokens(self) -> int:
        if self._max_tokens is not None:
            return self._max_tokens
        local = self._local_info()
        return local.max_tokens if local is not None else DEFAULT_MAX_TOKENS

    @property
    def query_prefix(self) -> str:
        if self._query_prefix is not None:
            return self._query_prefix
        local = self._local_info()
        return local.query_prefix if local is not None else KNOWN_QUERY_PREFIXES.get(slugify(self._name), "")

    @property
    def doc_prefix(self) -> str:
        if self._doc_prefix is not None:
            return self._doc_prefix
        local = self._local_info()
        return local.doc_prefix if local is not None else KNOWN_DOC_PREFIXES.get(slugify(self._name), "")

    @property
    def info(self) -> RemoteModelInfo:
        local = self._local_info()
        return RemoteModelInfo(
            name=self._name, path=None, origin=f"openai-compatible:{self.remote_model}",  # type: ignore[arg-type]
            dim=self.dim, max_tokens=self.max_tokens, pooling="remote", normalize=True,
            model_type=local.model_type if local is not None else "remote",
            query_prefix=self.query_prefix, doc_prefix=self.doc_prefix,
            remote_model=self.remote_model, endpoints=tuple(u.label for u in self._urls),
        )

    @property
    def tokens(self) -> TokenCounter:
        if self._tokens is None:
            local = self._local_info()
            if local is None:
                want = self._tokenizer_model or self._name
                raise ModelNotFoundError(
                    f"chunking needs the tokenizer of model {want!r} on this machine: the openai-compatible backend "
                    f"embeds on {', '.join(u.label for u in self._urls)}, but chunk sizes are counted in the model's "
                    f"own tokens. Put the model's folder in $LOCALMLX_MODELS_DIR or the Hugging Face cache, or name "
                    f"a local model with the same tokenizer (tokenizer_model). ({self._local_error})")
            self._tokens = TokenCounter(local)
        return self._tokens

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed_documents takes a sequence of texts, not one string")
        prefix = self.doc_prefix
        texts = [prefix + t for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = []
        for batch in self.batches(texts):
            parts.append(self._embed_batch(batch))
            if progress:
                progress(len(batch))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        return self._embed_batch([self.query_prefix + text])[0]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def __enter__(self) -> "OpenAICompatibleEmbedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- batching ----------------------------------------------------------------------------------------------
    def batches(self, texts: Sequence[str]) -> list[list[str]]:
        """Consecutive batches in input order: at most `max_batch` inputs and `max_request_chars` characters each
        (a single longer text goes alone)."""
        out: list[list[str]] = []
        batch: list[str] = []
        chars = 0
        for t in texts:
            if batch and (len(batch) >= self.max_batch or chars + len(t) > self.max_request_chars):
                out.append(batch)
                batch, chars = [], 0
            batch.append(t)
            chars += len(t)
        if batch:
            out.append(batch)
        return out

    # -- local facts (tokenizer, prefixes, max tokens) ----------------------------------------------------------
    def _local_info(self) -> ModelInfo | None:
        if not self._local_done:
            if self._tokenizer_model:
                names = [self._tokenizer_model]
            else:
                names = list(dict.fromkeys([self._name, self.remote_model]))
            for n in names:
                try:
                    self._local = resolve_model(n)
                    break
                except ModelNotFoundError as e:
                    self._local_error = e
                except Exception as e:  # an unreadable folder: no local facts, but embedding still works
                    self._local_error = e
            self._local_done = True
        return self._local

    # -- HTTP --------------------------------------------------------------------------------------------------
    def _client(self, loopback: bool) -> httpx.Client:
        with self._lock:
            c = self._clients.get(loopback)
            if c is None:
                # Loopback traffic never goes through a proxy from the environment (it could relay text off this
                # machine); nor does any traffic when only loopback is allowed.
                c = httpx.Client(
                    timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
                    trust_env=not (loopback or self.loopback_only), follow_redirects=False, headers=self._headers,
                )
                self._clients[loopback] = c
            return c

    def _guard(self, u: _Url) -> None:
        if self.loopback_only and not u.loopback:  # defence in depth: __init__ already refused it
            raise RemoteEndpointRefusedError(f"{u.label}: not loopback; no connection attempted")

    def _mark_down(self, u: _Url, why: str) -> None:
        u.down_until = self._clock() + self.health_cooldown_s
        u.last_error = why
        log.warning("embeddings endpoint %s is down (%s); skipping it for %.0f s", u.label, why, self.health_cooldown_s)

    def _health(self, u: _Url) -> tuple[bool, str]:
        """Up unless it definitely is not: `GET {base}/models` 2xx/401/403 = up; 5xx or no connection = down; any
        other reply (no such route) = ask `GET <root>/health`, where 2xx = up, 5xx or no connection = down, and no
        such route either = up (nothing to tell it by; the request itself will say)."""
        self._guard(u)
        client = self._client(u.loopback)
        try:
            r = client.get(u.models, timeout=self.health_timeout_s)
        except httpx.HTTPError as e:
            return False, f"GET {u.label}/models: {type(e).__name__}: {e}"
        if r.is_success or r.status_code in (401, 403):
            return True, ""
        if r.status_code >= 500:
            return False, f"GET {u.label}/models: HTTP {r.status_code}: {error_message(r)}"
        try:
            h = client.get(u.health, timeout=self.health_timeout_s)
        except httpx.HTTPError as e:
            return False, f"GET {redact_url(u.health)}: {type(e).__name__}: {e}"
        if h.is_success or h.status_code in (401, 403, 404, 405):
            return True, ""
        return False, f"GET {redact_url(u.health)}: HTTP {h.status_code}: {error_message(h)}"

    def _pick(self) -> _Url:
        """The next URL round-robin that is up; URLs in their cooldown are skipped; when every URL is down, all are
        re-checked at once (a single restarted server should not wait out a cooldown)."""
        with self._lock:
            n = len(self._urls)
            start = self._rr
            self._rr = (self._rr + 1) % n
        order = [self._urls[(start + i) % n] for i in range(n)]
        now = self._clock()
        checked: set[int] = set()
        for u in order:
            if u.cooling(now):
                continue
            if u.needs_check(now):
                ok, why = self._health(u)
                checked.add(id(u))
                if not ok:
                    self._mark_down(u, why)
                    continue
                u.checked, u.down_until = True, None
            return u
        for u in order:
            if id(u) in checked:
                continue
            ok, why = self._health(u)
            if ok:
                u.checked, u.down_until = True, None
                return u
            self._mark_down(u, why)
        raise _NoHealthyEndpoint("no endpoint is up: " + "; ".join(f"{u.label}: {u.last_error}" for u in order))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt)) * (0.5 + self._rng())
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after_s))
        return backoff

    def _payload(self, inputs: list[str]) -> dict:
        body: dict[str, Any] = {"model": self.remote_model, "input": inputs, "encoding_format": self._encoding}
        if self.send_dimensions and self._expected_dim:
            body["dimensions"] = self._expected_dim
        return body

    def _embed_batch(self, inputs: list[str]) -> np.ndarray:
        """One request's worth of texts -> float32 [n, dim], normalised, in input order (retries, failover)."""
        failures = 0
        last = ""
        while True:
            retry_after: float | None = None
            skip_sleep = False
            try:
                u = self._pick()
            except _NoHealthyEndpoint as e:
                last = str(e)
                url_label = None
            else:
                url_label = u.label
                self._guard(u)
                try:
                    resp = self._client(u.loopback).post(u.embeddings, json=self._payload(inputs))
                except httpx.TransportError as e:
                    last = f"{u.label}/embeddings: {type(e).__name__}: {e or 'connection failed'}"
                    self._mark_down(u, last)
                    skip_sleep = any(not x.cooling(self._clock()) for x in self._urls)  # fail over at once
                else:
                    status = resp.status_code
                    if status == 200:
                        return self._parse(resp, u, len(inputs))
                    msg = error_message(resp)
                    if status == 413 and len(inputs) > 1:
                        half = len(inputs) // 2
                        log.info("%s: request of %d inputs too large (413); splitting", u.label, len(inputs))
                        return np.concatenate([self._embed_batch(inputs[:half]), self._embed_batch(inputs[half:])])
                    if status in (400, 422) and self._encoding == "base64" and "encoding_format" in msg:
                        log.info("%s does not take encoding_format=base64 (%s); asking for floats", u.label, msg)
                        self._encoding = "float"
                        continue
                    if status != 429 and status < 500:
                        raise EmbeddingServiceError(
                            f"{u.label}/embeddings (model {self.remote_model!r}): HTTP {status}: {msg}",
                            url=u.label, status=status, attempts=failures + 1)
                    last = f"{u.label}/embeddings: HTTP {status}: {msg}"
                    retry_after = retry_after_s(resp)
            failures += 1
            if failures > self.max_retries:
                raise EmbeddingServiceError(
                    f"embeddings from {', '.join(x.label for x in self._urls)} (model {self.remote_model!r}): gave up "
                    f"after {failures} attempt(s) (endpoint.max_retries = {self.max_retries}); last error: {last}",
                    url=url_label, attempts=failures)
            if not skip_sleep:
                delay = self._delay(failures - 1, retry_after)
                log.warning("embeddings request failed (%s); retry %d/%d in %.2f s", last, failures,
                            self.max_retries, delay)
                self._sleep(delay)

    def _parse(self, resp: httpx.Response, u: _Url, n: int) -> np.ndarray:
        where = f"{u.label}/embeddings (model {self.remote_model!r})"
        try:
            body = resp.json()
        except ValueError:
            raise EmbeddingServiceError(f"{where}: reply is not JSON: {resp.text[:200]!r}", url=u.label) from None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise EmbeddingServiceError(f"{where}: reply has no `data` list", url=u.label)
        if len(data) != n:
            raise EmbeddingServiceError(f"{where}: sent {n} inputs, got {len(data)} embeddings back", url=u.label)
        rows: list[np.ndarray | None] = [None] * n
        for pos, item in enumerate(data):
            if not isinstance(item, dict):
                raise EmbeddingServiceError(f"{where}: data[{pos}] is not an object", url=u.label)
            idx = item.get("index", pos)
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n or rows[idx] is not None:
                raise EmbeddingServiceError(f"{where}: data[{pos}].index {idx!r} is out of range or repeated",
                                            url=u.label)
            try:
                rows[idx] = decode_embedding(item.get("embedding"))
            except ValueError as e:
                raise EmbeddingServiceError(f"{where}: data[{pos}]: {e}", url=u.label) from None
        dims = {len(r) for r in rows}  # type: ignore[arg-type]
        if len(dims) != 1:
            raise EmbeddingServiceError(f"{where}: embeddings of different lengths in one reply: {sorted(dims)}",
                                        url=u.label)
        self._check_dim(dims.pop(), u)
        vecs = np.stack(rows).astype(np.float32, copy=False)  # type: ignore[arg-type]
        if not np.isfinite(vecs).all():
            bad = int(np.where(~np.isfinite(vecs).all(axis=1))[0][0])
            raise EmbeddingServiceError(f"{where}: embedding for input {bad} holds NaN or infinity", url=u.label)
        zero = np.where(~vecs.any(axis=1))[0]
        if len(zero):
            raise EmbeddingServiceError(f"{where}: embedding for input {int(zero[0])} is all zeros (a float reply "
                                        "read as base64, or a broken server)", url=u.label)
        return l2_normalise(vecs)

    def _check_dim(self, d: int, u: _Url) -> None:
        with self._lock:
            if self._expected_dim is not None:
                want, why = self._expected_dim, (f"expected by {self.dims_setting}" if self.dims_setting
                                                 else "expected")
            elif self._learned_dim is not None:
                want, why = self._learned_dim, "the dim this endpoint answered with first"
            else:
                self._learned_dim = d
                return
        if d != want:
            raise DimensionMismatchError(
                f"{u.label}: model {self.remote_model!r} returned {d}-dim embeddings, but {want} dims are "
                f"{why}; a store never mixes dimensions (check the server's model and the configured dimensions)")

    def __repr__(self) -> str:
        return (f"OpenAICompatibleEmbedder(model={self._name!r}, remote_model={self.remote_model!r}, "
                f"urls={[u.label for u in self._urls]!r})")
