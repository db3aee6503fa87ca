"""Store search and chat RAG routes of `woolocal serve`.

    GET  /v1/stores                        every store under the stores root (model, dim, count, last update)
    POST /v1/stores/{store}/search         {query | vector, k, filter} -> ranked hits
    POST /v1/rag/context                   {query | messages, store, k, filter} -> hits + the assembled prompt
    POST /v1/chat/completions              OpenAI chat, with a store (extra field `store`, or a model alias bound to
                                           a store in flows.yaml): retrieve, prompt with numbered sources, forward
                                           upstream, relay (SSE when `stream`), plus `sources`

`{store}` is a project name (its store for the project's configured model) or `<project>/<store folder>`; it is
checked against a strict name pattern and must resolve under the stores root. Opened stores are cached per folder and
re-validated on every request by the identity of the folder and its manifest.json: a store that a migration or ingest
has swapped in (stores.write_store renames a complete new folder into place) is served from the next request on, and
a store is only ever read from one folder version (the folder is pinned by a file descriptor while its files load).

The app (service/app.py) owns auth, body limits and the OpenAI error shape for `APIError`; this module relies on
`request.app.state.service` (service/state.py: `config`, `stores_root`, `resolve_model`, `embedder`, `embed`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from woolocal_ingest.errors import StoreError, StoreNotFoundError, WoolocalError
from woolocal_ingest.service.errors import APIError
from woolocal_ingest.manifest import NAME_RE, read_manifest
from woolocal_ingest.stores import MANIFEST, TRUTH_FILES, SearchHit, Store, check_dims, is_store, list_stores

log = logging.getLogger("woolocal.service.rag")

router = APIRouter()

MAX_K = 1000
# One path segment of a store name: what project names allow (config.NAME_RE), and store folders are made of.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_CACHE_SIZE = 32
RAG_INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. Cite each source you use by its number in square "
    "brackets, like [1] or [2][3]. If the sources do not contain the answer, say that you do not know."
)
# Fields of a chat request that are ours; they are not forwarded upstream.
_OUR_CHAT_FIELDS = ("store", "k", "filter", "mode", "extra_body")


# ---------------------------------------------------------------------------------------------------------------
# store names -> folders (validated, never outside the stores root)


def _bad_name(name: Any, why: str) -> APIError:
    return APIError(400, f"invalid store name {name!r}: {why}; use a project name or <project>/<store folder> "
                         "(letters, digits, '.', '_', '-')", param="store", code="invalid_store_name")


def _not_found(name: str, detail: str = "") -> APIError:
    return APIError(404, f"store {name!r} not found{': ' + detail if detail else ''} (GET /v1/stores lists them)",
                    param="store", code="store_not_found")


def validate_store_name(name: Any) -> list[str]:
    """The segments of a store name from a request: one (project) or two (project/folder), each a plain name.
    Refuses path traversal in every spelling that reaches here decoded (`..`, absolute paths, backslashes, NUL,
    percent signs of double encoding, empty or hidden segments)."""
    if not isinstance(name, str) or not name:
        raise _bad_name(name, "must be a non-empty string")
    if len(name) > 401:
        raise _bad_name(name[:40] + "...", "too long")
    if "\x00" in name or "\\" in name or "%" in name:
        raise _bad_name(name, "NUL, backslashes and percent signs are not allowed")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise _bad_name(name, "absolute paths are not allowed")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise _bad_name(name, "empty, '.' or '..' path segments are not allowed")
    if len(parts) > 2:
        raise _bad_name(name, "at most two segments (<project>/<store folder>)")
    for p in parts:
        if not _SEGMENT_RE.fullmatch(p):
            raise _bad_name(name, f"segment {p!r} is not a plain name")
    return parts


def _under(root: Path, p: Path) -> bool:
    try:
        return p.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _project_default(state: Any, project: str, candidates: list[Path]) -> list[Path]:
    """Of a project's several stores, the one(s) for the model its purpose configures (as `woolocal ingest` writes)."""
    from woolocal_ingest.embedders.registry import slugify

    cfg = getattr(state, "config", None)
    if cfg is None:
        return candidates
    proj = cfg.project(project)
    purpose = cfg.purposes.get(proj.purpose if proj else "projects")
    if purpose is None:
        return candidates
    slug = slugify(purpose.model)
    out = []
    for d in candidates:
        m = NAME_RE.match(d.name)
        if m and m.group("slug") == slug and (purpose.dimensions is None or int(m.group("dim")) == purpose.dimensions):
            out.append(d)
    return out


def resolve_store(state: Any, name: Any, *, trusted: bool = False) -> tuple[str, Path]:
    """(`<project>/<folder>`, absolute folder) for a store name from a request (validated, confined to the stores
    root). `trusted` (names from flows.yaml aliases) also admits an absolute path to a store folder."""
    root = Path(state.stores_root).resolve()
    if trusted and isinstance(name, str) and os.path.isabs(os.path.expanduser(name)):
        p = Path(os.path.expanduser(name)).resolve()
        if not is_store(p):
            raise _not_found(name, "the alias names a folder that holds no store")
        return f"{p.parent.name}/{p.name}", p
    parts = validate_store_name(name)
    project_dir = root / parts[0]
    if not _under(root, project_dir):
        raise _bad_name(name, "resolves outside the stores root")
    if len(parts) == 2:
        p = project_dir / parts[1]
        if not _under(root, p):
            raise _bad_name(name, "resolves outside the stores root")
        if not is_store(p):
            raise _not_found(name)
        return f"{parts[0]}/{parts[1]}", p
    if not project_dir.is_dir():
        raise _not_found(name)
    stores = sorted(d for d in project_dir.iterdir() if not d.name.startswith(".") and is_store(d) and _under(root, d))
    if len(stores) > 1:
        stores = _project_default(state, parts[0], stores) or stores
    if not stores:
        raise _not_found(name, "the project holds no store")
    if len(stores) > 1:
        raise APIError(400, f"project {parts[0]!r} holds several stores ({', '.join(d.name for d in stores)}); "
                            f"name one as {parts[0]}/<store folder>", param="store", code="ambiguous_store")
    return f"{parts[0]}/{stores[0].name}", stores[0]


# ---------------------------------------------------------------------------------------------------------------
# opened stores: cached, re-validated per request, loaded from one folder version


def _identity(path: Path, dir_fd: int | None = None) -> tuple:
    """What changes when a store folder is replaced or written into: the folder's inode, and the inode, mtime and
    size of its manifest and of the files LangChain writers (Wooster) rewrite in place."""
    if dir_fd is not None:
        d = os.fstat(dir_fd)
        m = os.stat(MANIFEST, dir_fd=dir_fd)
    else:
        d = os.stat(path)
        m = os.stat(path / MANIFEST)
    files = []
    for name in TRUTH_FILES:
        try:
            st = os.stat(name, dir_fd=dir_fd) if dir_fd is not None else os.stat(path / name)
            files.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            files.append(None)
    return (d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns, m.st_size, *files)


_PROC_FD = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")


def _load_once(path: Path) -> tuple[tuple, Store]:
    """Open a store and read all of it (manifest, index, rows, metadata) from one folder version; `_Changed` when
    the folder was replaced while it was read (the caller reads the new version)."""
    fd = None
    if _PROC_FD:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise StoreNotFoundError(f"{path}: no such store folder") from None
    try:
        try:
            before = _identity(path, fd)
        except FileNotFoundError:
            raise _Changed() from None  # the pinned version lost its manifest: it was swapped out and is being deleted
        # Through /proc/self/fd/N every file is looked up in the pinned folder, even if it is renamed meanwhile.
        base = Path(f"/proc/self/fd/{fd}") if fd is not None else path
        try:
            store = Store(base)
            check_dims(path, store.manifest, store.index.d)
            store.lexical  # the BM25 index (and the rows' context it needs) from this same version, not lazily later
            after = _identity(path, fd)
        except (StoreError, FileNotFoundError) as e:
            if _path_identity(path) != before:
                raise _Changed() from None  # a version swapped out (and deleted) mid-read
            if isinstance(e, FileNotFoundError):
                raise StoreError(f"{path}: {e}") from None
            raise type(e)(str(e).replace(str(base), str(path))) from None
    finally:
        if fd is not None:
            os.close(fd)
    if before != after or (fd is None and _path_identity(path) != before):
        raise _Changed()
    store.path = path
    return before, store


def _path_identity(path: Path) -> tuple | None:
    try:
        return _identity(path)
    except FileNotFoundError:
        return None


class _Changed(Exception):
    """The folder changed while it was read."""


@dataclass
class _Entry:
    identity: tuple
    store: Store
    checked_models: dict = field(default_factory=dict)  # resolved model -> None (ok) or an APIError message


class StoreCache:
    """Open stores by folder; an entry is served while the folder's identity is unchanged, else re-opened."""

    def __init__(self, size: int = _CACHE_SIZE):
        self.size = size
        self._entries: OrderedDict[Path, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._path_locks: dict[Path, threading.Lock] = {}
        self.opens = 0  # how many times a store was (re)loaded: for tests and /metrics

    def _current(self, path: Path) -> _Entry | None:
        try:
            ident = _identity(path)
        except FileNotFoundError:
            return None
        with self._lock:
            e = self._entries.get(path)
            if e is not None and e.identity == ident:
                self._entries.move_to_end(path)
                return e
        return None

    def get(self, path: Path) -> _Entry:
        """The store at `path` as it is now (blocking: call from a worker thread)."""
        e = self._current(path)
        if e is not None:
            return e
        with self._lock:
            plock = self._path_locks.setdefault(path, threading.Lock())
        with plock:
            e = self._current(path)  # another thread may have loaded it meanwhile
            if e is not None:
                return e
            for _ in range(10):  # a swap during the load: read the new version
                try:
                    ident, store = _load_once(path)
                    break
                except _Changed:
                    time.sleep(0.005)
            else:
                raise StoreError(f"{path}: the store kept changing while it was opened; try again")
            entry = _Entry(ident, store)
            self.opens += 1
            with self._lock:
                self._entries[path] = entry
                self._entries.move_to_end(path)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            return entry


def _cache(request: Request) -> StoreCache:
    st = request.app.state
    c = getattr(st, "woolocal_store_cache", None)
    if c is None:
        c = StoreCache()
        st.woolocal_store_cache = c
    return c


async def open_cached(request: Request, name: Any, *, trusted: bool = False) -> tuple[str, _Entry]:
    state = _state(request)
    sid, path = resolve_store(state, name, trusted=trusted)
    try:
        entry = await run_in_threadpool(_cache(request).get, path)
    except StoreNotFoundError:
        raise _not_found(sid) from None
    except WoolocalError as e:
        raise APIError(500, f"store {sid!r} cannot be opened: {e}", param="store", code="store_unreadable") from None
    return sid, entry


def _state(request: Request) -> Any:
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


def _loaded_models(state: Any) -> list[str]:
    slots = getattr(state, "slots", None)
    if isinstance(slots, (list, tuple)):
        return [f"{getattr(x, 'key', x)} ({getattr(x, 'status', '?')})" for x in slots]
    cfg = getattr(state, "config", None)
    if cfg is not None:
        return list(cfg.service.models) or sorted(cfg.purposes)
    return []


async def _store_model(state: Any, sid: str, entry: _Entry) -> str:
    """The service's name for the model that embedded the store (its manifest's), checked to make the same vectors.
    A model the configuration does not serve is loaded on first use when the state can (`ensure_model`: found
    offline by the registry); otherwise, or when it cannot be found, 409 naming the store's model and the served
    ones."""
    store = entry.store
    model = _manifest_model(store)
    wanted = [c for c in (model.get("name"), model.get("path")) if c]
    resolved = None
    ensure = getattr(state, "ensure_model", None)
    for cand in wanted:
        try:
            resolved = await ensure(cand) if ensure is not None else state.resolve_model(cand)
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
            info = getattr(emb, "info", None)
            try:
                have_sha = info.files_sha256() if want_sha and info is not None else None
            except Exception:
                have_sha = None
            if want_sha and have_sha and want_sha != have_sha:
                problem = (f"store {sid!r} was embedded by other files of model {model.get('name')!r} than the "
                           f"service has loaded (sha256 {want_sha[:12]} vs {have_sha[:12]}); re-ingest or migrate it")
        entry.checked_models[resolved] = problem
    if problem:
        raise APIError(409, problem, param="store", code="model_mismatch")
    return resolved


async def retrieve(request: Request, store_name: Any, *, query: str | None = None, vector: np.ndarray | None = None,
                   k: int = 10, flt: Mapping[str, Any] | None = None, trusted: bool = False, mode: str | None = None
                   ) -> tuple[str, _Entry, list[SearchHit]]:
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
# the prompt (shared by /v1/chat/completions and /v1/rag/context)


def _hit_source(h: SearchHit) -> str:
    src = h.metadata.get("source") or h.id
    lines = (h.metadata.get("loc") or {}).get("lines") if isinstance(h.metadata.get("loc"), dict) else None
    if isinstance(lines, dict) and lines.get("from") is not None:
        src = f"{src}:{lines.get('from')}-{lines.get('to')}"
    return str(src)


def format_sources(hits: Sequence[SearchHit]) -> str:
    """`[1] notes/a.md:3-9: text` blocks, one per hit, in rank order."""
    if not hits:
        return "(no sources were found)"
    return "\n\n".join(f"[{n}] {_hit_source(h)}: {h.text.strip()}" for n, h in enumerate(hits, 1))


def build_prompt(question: str, hits: Sequence[SearchHit]) -> str:
    """The user turn the chat model gets: instructions to cite [n], the numbered sources, then the question."""
    return f"{RAG_INSTRUCTIONS}\n\nSources:\n{format_sources(hits)}\n\nQuestion: {question}"


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def last_user_index(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user" and _text_of(m.get("content")).strip():
            return i
    raise APIError(400, "messages hold no user message with text to search the store for", param="messages")


def build_messages(messages: list, hits: Sequence[SearchHit]) -> list:
    """The conversation with its last user message replaced by `build_prompt` (a user turn works with every chat
    template, including those that refuse a system role); other turns are kept as they are."""
    i = last_user_index(messages)
    msg = dict(messages[i])
    prompt = build_prompt(_text_of(msg.get("content")), hits)
    content = msg.get("content")
    if isinstance(content, list):  # keep non-text parts (images), one text part with the prompt
        msg["content"] = [{"type": "text", "text": prompt}] + [
            p for p in content if not (isinstance(p, dict) and p.get("type") == "text")]
    else:
        msg["content"] = prompt
    return [*messages[:i], msg, *messages[i + 1:]]


def sources_of(hits: Sequence[SearchHit], answer: str | None = None) -> list[dict]:
    """[{n, id, source, score}] for the hits the prompt numbered; with the answer, `cited` says if [n] is in it."""
    cited = {int(x) for x in re.findall(r"\[(\d{1,4})\]", answer)} if answer is not None else None
    out = []
    for n, h in enumerate(hits, 1):
        d = {"n": n, "id": h.id, "source": h.metadata.get("source"), "score": h.score}
        if cited is not None:
            d["cited"] = n in cited
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------------------------
# routes: stores


@router.get("/v1/stores")
async def stores_index(request: Request) -> dict:
    state = _state(request)
    root = Path(state.stores_root)
    cfg = getattr(state, "config", None)
    aliases = dict(cfg.service.aliases) if cfg is not None else {}

    def scan() -> list[dict]:
        rows = []
        real_root = root.resolve()
        for p in list_stores(root):
            if not _under(real_root, p):
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


def _chat_cfg(request: Request):
    cfg = getattr(_state(request), "config", None)
    return cfg.service.chat if cfg is not None else None


def _store_for_chat(request: Request, body: Mapping[str, Any]) -> tuple[Any, bool]:
    """(store name, trusted) the chat request names: its `store` field, or its model when that is an alias."""
    cfg = getattr(_state(request), "config", None)
    aliases = dict(cfg.service.aliases) if cfg is not None else {}
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
        query = _text_of(messages[last_user_index(messages)].get("content"))
    chat = _chat_cfg(request)
    k = _parse_k(body.get("k"), chat.k if chat is not None else 5)
    flt = _parse_filter(body.get("filter"))
    mode = _parse_mode(body.get("mode"), True)
    sid, entry, hits = await retrieve(request, store, query=query, k=k, flt=flt, trusted=trusted, mode=mode)
    out_messages = build_messages(messages, hits)
    return {"object": "rag.context", **_store_info(sid, entry.store), "query": query, "k": k, "mode": mode,
            "chunks": [{"n": i, **_hit_dict(h, i)} for i, h in enumerate(hits, 1)],
            "sources": sources_of(hits),
            "prompt": build_prompt(query, hits),
            "messages": out_messages}


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


def _upstream_payload(body: Mapping[str, Any], chat, alias_model: bool) -> dict:
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


def _timeout(chat):
    import httpx

    return httpx.Timeout(chat.timeout_s, connect=min(5.0, chat.timeout_s))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    import httpx

    body = await _json_body(request)
    chat = _chat_cfg(request)
    if chat is None or not chat.upstream:
        raise APIError(503, "no upstream chat server is configured: set service.chat.upstream in flows.yaml "
                            "(e.g. http://127.0.0.1:8080/v1 for mlx_lm.server or llama.cpp, "
                            "http://127.0.0.1:11434/v1 for Ollama)", param="service.chat.upstream",
                       code="upstream_not_configured")
    store, trusted = _store_for_chat(request, body)
    alias_model = isinstance(body.get("model"), str) and body.get("store") is None and store is not None
    hits: list[SearchHit] | None = None
    if store is not None:
        messages = body.get("messages")
        query = _text_of(messages[last_user_index(messages)].get("content"))
        k = _parse_k(body.get("k"), chat.k)
        flt = _parse_filter(body.get("filter"))
        _, _, hits = await retrieve(request, store, query=query, k=k, flt=flt, trusted=trusted,
                                    mode=_parse_mode(body.get("mode"), True))
        body = {**body, "messages": build_messages(messages, hits)}
    elif not isinstance(body.get("messages"), list) or not body.get("messages"):
        raise APIError(400, "messages must be a non-empty list", param="messages")
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

        async def close() -> None:
            await resp.aclose()
            await client.aclose()

        return StreamingResponse(_relay_stream(resp, hits, url, chat.timeout_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(close))
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
        answer = " ".join(_text_of((c.get("message") or {}).get("content")) for c in data.get("choices") or []
                          if isinstance(c, dict))
        data["sources"] = sources_of(hits, answer)
    return JSONResponse(data)


def _upstream_status_error(status: int, raw: bytes, url: str) -> APIError:
    return APIError(502, f"the upstream chat server at {url} answered {status}: {_upstream_message(raw)}",
                    code=f"upstream_{status}")


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
                        answer.append(_text_of((c.get("delta") or {}).get("content")))
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
