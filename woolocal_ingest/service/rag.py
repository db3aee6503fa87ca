"""Store search and chat RAG routes of `woolocal serve`.

    GET  /v1/stores                        every store under the stores root (model, dim, count, last update)
    POST /v1/stores/{store}/search         {query | vector, k, filter} -> ranked hits
    POST /v1/rag/context                   {query | messages, store, k, filter} -> hits + the assembled prompt
    POST /v1/chat/completions              OpenAI chat, with a store (extra field `store`, or a model alias bound to
                                           a store in flows.yaml): retrieve, prompt with numbered sources, forward
                                           upstream, relay (SSE when `stream`), plus `sources`

Here: request parsing, and retrieval (a store searched with its own model, embedded by the service). Store names
are resolved by service/store_names.py, opened stores cached by service/store_cache.py (one `StoreCache` per app),
the prompt built by service/prompt.py and the chat proxied by service/chat.py. The app (service/app.py) owns auth,
body limits and the OpenAI error shape for `APIError`; `request.app.state.service` is the `ServiceState`
(service/state.py).
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from woolocal_ingest.config import ChatConfig
from woolocal_ingest.errors import StoreError, StoreNotFoundError, WoolocalError
from woolocal_ingest.manifest import read_manifest
from woolocal_ingest.service.chat import check_upstream, forward
from woolocal_ingest.service.errors import APIError
from woolocal_ingest.service.prompt import build_messages, build_prompt, last_user_index, sources_of, text_of
from woolocal_ingest.service.state import ServiceState
from woolocal_ingest.service.store_cache import CachedStore, StoreCache
from woolocal_ingest.service.store_names import resolve_store, store_not_found, under_root, validate_store_name
from woolocal_ingest.stores import MANIFEST, SearchHit, Store, list_stores

router = APIRouter()

MAX_K = 1000


# ---------------------------------------------------------------------------------------------------------------
# the app's service state and its opened stores


def _cache(request: Request) -> StoreCache:
    st = request.app.state
    c = getattr(st, "woolocal_store_cache", None)
    if c is None:
        c = StoreCache()
        st.woolocal_store_cache = c
    return c


async def open_cached(request: Request, name: Any, *, trusted: bool = False) -> tuple[str, CachedStore]:
    state = _state(request)
    sid, path = resolve_store(state, name, trusted=trusted)
    try:
        entry = await run_in_threadpool(_cache(request).get, path)
    except StoreNotFoundError:
        raise store_not_found(sid) from None
    except WoolocalError as e:
        raise APIError(500, f"store {sid!r} cannot be opened: {e}", param="store", code="store_unreadable") from None
    return sid, entry


def _state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise APIError(503, "the service is starting", code="starting")
    return state


# ---------------------------------------------------------------------------------------------------------------
# request parsing


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_body")
    inner = body.get("extra_body")
    if isinstance(inner, dict):  # clients that send extra_body literally instead of merging it
        body = {**{k: v for k, v in body.items() if k != "extra_body"}, **inner}
    return body


def _parse_k(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise APIError(400, f"k must be an integer from 1 to {MAX_K}, got {value!r}", param="k")
    if not 1 <= value <= MAX_K:
        raise APIError(400, f"k must be from 1 to {MAX_K}, got {value}", param="k")
    return value


def _parse_mode(value: Any, text: bool) -> str:
    """The request's `mode` (hybrid | dense | lexical; default hybrid for text, dense for a vector): Store.search's."""
    from woolocal_ingest.retrieval import SearchModeError, check_mode

    if value is not None and not isinstance(value, str):
        raise APIError(400, f"mode must be a string (hybrid, dense or lexical), got {value!r}", param="mode")
    try:
        return check_mode(value, text)
    except SearchModeError as e:
        raise APIError(400, str(e), param="mode") from None


def _parse_filter(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "filter must be an object of metadata key -> value (or list of values)", param="filter")
    for key, v in value.items():
        if isinstance(v, dict):
            raise APIError(400, f"filter[{key!r}]: values are compared for equality: give a value or a list "
                                "(use dotted keys, e.g. 'loc.lines.from', for nested metadata)", param="filter")
    return value or None


def _parse_query(body: Mapping[str, Any]) -> tuple[str | None, np.ndarray | None]:
    query, vector = body.get("query"), body.get("vector")
    if (query is None) == (vector is None):
        raise APIError(400, "give exactly one of query (text) or vector (list of numbers)",
                       param="query" if query is None else "vector")
    if query is not None:
        if not isinstance(query, str) or not query.strip():
            raise APIError(400, "query must be a non-empty string", param="query")
        return query, None
    if (not isinstance(vector, list) or not vector
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector)):
        raise APIError(400, "vector must be a non-empty list of numbers", param="vector")
    vec = np.asarray(vector, dtype=np.float32)
    if not np.isfinite(vec).all():
        raise APIError(400, "vector holds NaN or infinite values", param="vector")
    return None, vec


# ---------------------------------------------------------------------------------------------------------------
# retrieval


def _manifest_model(store: Store) -> dict:
    return store.manifest.get("model") or {}


def _loaded_models(state: ServiceState) -> list[str]:
    return [f"{x.key} ({x.status})" for x in state.slots]


async def _store_model(state: ServiceState, sid: str, entry: CachedStore) -> str:
    """The service's name for the model that embedded the store (its manifest's), checked to make the same vectors.
    A model the configuration does not serve is loaded on first use when the state can (`ensure_model`: found
    offline by the registry); otherwise, or when it cannot be found, 409 naming the store's model and the served
    ones."""
    store = entry.store
    model = _manifest_model(store)
    wanted = [c for c in (model.get("name"), model.get("path")) if c]
    resolved = None
    for cand in wanted:
        try:
            resolved = await state.ensure_model(cand)
            break
        except APIError as e:
            if e.status != 404:
                raise
    if resolved is None:
        raise APIError(409, f"store {sid!r} was embedded with model {model.get('name')!r}, which this service does not "
                            f"serve and cannot load (it serves: {', '.join(_loaded_models(state)) or 'none'}); add "
                            "that model to service.models in flows.yaml (`woolocal models pull` it first if needed), "
                            "or migrate the store to a served model", param="store", code="model_not_served")
    if resolved in entry.checked_models:
        problem = entry.checked_models[resolved]
    else:
        problem = None
        emb = state.embedder(resolved)  # 503 while loading (not cached)
        if emb.dim != store.dim:
            problem = (f"store {sid!r} holds {store.dim}-dim vectors but the service's model {resolved!r} makes "
                       f"{emb.dim}-dim vectors")
        else:
            want_sha = model.get("files_sha256")
            try:
                have_sha = emb.info.files_sha256() if want_sha else None
            except Exception:  # a remote model (openai-compatible) has no files here
                have_sha = None
            if want_sha and have_sha and want_sha != have_sha:
                problem = (f"store {sid!r} was embedded by other files of model {model.get('name')!r} than the "
                           f"service has loaded (sha256 {want_sha[:12]} vs {have_sha[:12]}); re-ingest or migrate it")
        entry.checked_models[resolved] = problem
    if problem:
        raise APIError(409, problem, param="store", code="model_mismatch")
    return await state.ensure_precision(resolved, model)  # an int8 store: its engine's int8 queries


async def retrieve(request: Request, store_name: Any, *, query: str | None = None, vector: np.ndarray | None = None,
                   k: int = 10, flt: Mapping[str, Any] | None = None, trusted: bool = False, mode: str | None = None
                   ) -> tuple[str, CachedStore, list[SearchHit]]:
    """Resolve, open (cached) and search a store: text is embedded by the service with the store's own model.
    `mode` as Store.search takes it (hybrid for text by default)."""
    mode = _parse_mode(mode, vector is None)
    state = _state(request)
    sid, entry = await open_cached(request, store_name, trusted=trusted)
    store = entry.store
    if vector is not None:
        if vector.shape[0] != store.dim:
            raise APIError(400, f"vector has {vector.shape[0]} dimensions but store {sid!r} holds {store.dim}-dim "
                                f"vectors", param="vector", code="dimension_mismatch")
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            raise APIError(400, "vector is all zeros", param="vector")
        vec = vector / norm
        hits = await run_in_threadpool(store.search, vec, k, flt, mode)
        return sid, entry, hits
    vec = None
    if mode != "lexical":
        model = await _store_model(state, sid, entry)
        vecs = await state.embed(model, [query], query=True)
        vec = np.asarray(vecs, dtype=np.float32).reshape(-1)
    hits = await run_in_threadpool(store.search, query, k, flt, mode, vec)
    return sid, entry, hits


def _version(manifest: Mapping[str, Any]) -> str | None:
    """A short, content-derived version of a store: the sha256 of its canonical record."""
    sha = (manifest.get("files") or {}).get("chunks.parquet")
    return sha[:16] if isinstance(sha, str) else None


def _hit_dict(h: SearchHit, rank: int) -> dict:
    return {"rank": rank, "id": h.id, "text": h.text, "metadata": h.metadata, "score": h.score, "mode": h.mode,
            "scores": dict(h.scores)}


def _store_info(sid: str, store: Store) -> dict:
    m = store.manifest
    try:
        drift = store.drift
    except StoreError:  # our record unreadable: the rows served are the truth all the same
        drift = None
    return {"store": sid, "model": _manifest_model(store).get("name"), "dim": store.dim, "count": store.count,
            "version": _version(m), "changed_outside": drift.to_dict() if drift is not None and drift.changed else None}


# ---------------------------------------------------------------------------------------------------------------
# routes: stores


@router.get("/v1/stores")
async def stores_index(request: Request) -> dict:
    state = _state(request)
    root = Path(state.stores_root)
    aliases = dict(state.config.service.aliases)

    def scan() -> list[dict]:
        rows = []
        real_root = root.resolve()
        for p in list_stores(root):
            if not under_root(real_root, p):
                continue  # a symlink out of the stores root: not served, not listed
            sid = f"{p.parent.name}/{p.name}"
            row: dict[str, Any] = {"object": "store", "id": sid, "name": sid, "project": p.parent.name,
                                   "folder": p.name}
            try:
                m = read_manifest(p)
                mtime = os.stat(p / MANIFEST).st_mtime
                row.update(model=(m.get("model") or {}).get("name"), dim=m.get("dim"), count=m.get("count"),
                           created=m.get("created"),
                           updated=datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds"),
                           version=_version(m), migrated_from=(m.get("migrated_from") or {}).get("path")
                           if isinstance(m.get("migrated_from"), dict) else m.get("migrated_from"))
            except WoolocalError as e:
                row["error"] = str(e)
            row["aliases"] = sorted(a for a, target in aliases.items() if target in (sid, p.parent.name))
            rows.append(row)
        return rows

    return {"object": "list", "stores_root": str(root), "data": await run_in_threadpool(scan)}


@router.post("/v1/stores/{store:path}/search")
async def store_search(store: str, request: Request) -> dict:
    validate_store_name(store)
    body = await _json_body(request)
    query, vector = _parse_query(body)
    k = _parse_k(body.get("k"), 10)
    flt = _parse_filter(body.get("filter"))
    t = time.perf_counter()
    mode = _parse_mode(body.get("mode"), vector is None)
    sid, entry, hits = await retrieve(request, store, query=query, vector=vector, k=k, flt=flt, mode=mode)
    return {"object": "list", **_store_info(sid, entry.store), "query": query, "k": k, "mode": mode,
            "data": [_hit_dict(h, i) for i, h in enumerate(hits, 1)],
            "took_ms": round((time.perf_counter() - t) * 1000, 2)}


# ---------------------------------------------------------------------------------------------------------------
# routes: RAG


def _chat_cfg(request: Request) -> ChatConfig:
    return _state(request).config.service.chat


def _store_for_chat(request: Request, body: Mapping[str, Any]) -> tuple[Any, bool]:
    """(store name, trusted) the chat request names: its `store` field, or its model when that is an alias."""
    aliases = dict(_state(request).config.service.aliases)
    store = body.get("store")
    if store is not None:
        if isinstance(store, str) and store in aliases:
            return aliases[store], True
        return store, False
    model = body.get("model")
    if isinstance(model, str) and model in aliases:
        return aliases[model], True
    return None, False


@router.post("/v1/rag/context")
async def rag_context(request: Request) -> dict:
    body = await _json_body(request)
    store, trusted = _store_for_chat(request, body)
    if store is None:
        raise APIError(400, "store is required (a project name or <project>/<store folder>)", param="store")
    messages = body.get("messages")
    query = body.get("query")
    if messages is None:
        if not isinstance(query, str) or not query.strip():
            raise APIError(400, "give query (text) or messages (a chat conversation)", param="query")
        messages = [{"role": "user", "content": query}]
    else:
        query = text_of(messages[last_user_index(messages)].get("content"))
    chat = _chat_cfg(request)
    k = _parse_k(body.get("k"), chat.k)
    flt = _parse_filter(body.get("filter"))
    mode = _parse_mode(body.get("mode"), True)
    sid, entry, hits = await retrieve(request, store, query=query, k=k, flt=flt, trusted=trusted, mode=mode)
    out_messages = build_messages(messages, hits)
    return {"object": "rag.context", **_store_info(sid, entry.store), "query": query, "k": k, "mode": mode,
            "chunks": [{"n": i, **_hit_dict(h, i)} for i, h in enumerate(hits, 1)],
            "sources": sources_of(hits),
            "prompt": build_prompt(query, hits),
            "messages": out_messages}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """Retrieve from the store the request names (if any), prompt with numbered sources, and proxy to the upstream
    chat server (service/chat.py)."""
    body = await _json_body(request)
    chat = _chat_cfg(request)
    check_upstream(chat)
    store, trusted = _store_for_chat(request, body)
    alias_model = isinstance(body.get("model"), str) and body.get("store") is None and store is not None
    hits: list[SearchHit] | None = None
    if store is not None:
        messages = body.get("messages")
        query = text_of(messages[last_user_index(messages)].get("content"))
        k = _parse_k(body.get("k"), chat.k)
        flt = _parse_filter(body.get("filter"))
        _, _, hits = await retrieve(request, store, query=query, k=k, flt=flt, trusted=trusted,
                                    mode=_parse_mode(body.get("mode"), True))
        body = {**body, "messages": build_messages(messages, hits)}
    elif not isinstance(body.get("messages"), list) or not body.get("messages"):
        raise APIError(400, "messages must be a non-empty list", param="messages")
    return await forward(body, chat, hits, alias_model)
