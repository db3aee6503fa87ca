"""What one running service holds: the models it serves (loaded in the background) and the dynamic batcher that
embeds every request's texts together.

Models. `service.models` in flows.yaml (purpose names or model names) or, by default, every purpose; purposes
that name the same model share one loaded copy. A request's `model` may be a purpose (`projects`), the canonical
name (`sentence-transformers/all-MiniLM-L6-v2`), its last part (`all-MiniLM-L6-v2`), its slug (`all-minilm-l6-v2`)
or the configured string (a path), case-insensitively; none means the `projects` purpose. `service.model_aliases` adds
drop-in names (by default OpenAI's `text-embedding-3-small`, `-3-large`, `text-embedding-ada-002` -> `projects`); an
alias marked `query: true` embeds its inputs as queries (the model's query prefix), for clients such as LangChain's
`embedQuery`, which send no hint.

Dynamic batching (as TEI and infinity do). Requests put their texts on one bounded queue (`service.queue_size`
texts); a single worker thread waits `service.batch_wait_ms` after the first arrival, takes every waiting text of
the head request's model, cuts them into token-budget batches (`embedders.batching.token_budget_batches`, at most
`service.max_batch_tokens` padded tokens) and answers each request as soon as its last text is embedded. A request
that does not fit the queue gets 429 with Retry-After (an empty queue admits any one request, so a 2048-input
request is never refused for size alone). Requests whose client went away are skipped. Nothing grows with traffic:
the queue is bounded, finished jobs are dropped, metrics keep bounded windows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from woolocal_ingest.config import FlowsConfig, PurposeConfig
from woolocal_ingest.embedders.base import Embedder
from woolocal_ingest.embedders.registry import ModelInfo, slugify
from woolocal_ingest.service.errors import APIError
from woolocal_ingest.service.metrics import ServiceMetrics

log = logging.getLogger("woolocal.service")

DEFAULT_PURPOSE = "projects"


@dataclass
class ModelSpec:
    """One model to load: from a purpose of flows.yaml, or a bare model name/path."""

    model: str  # the configured model string (name or path)
    backend: str = "auto"
    purpose: str | None = None
    purpose_cfg: PurposeConfig | None = None


@dataclass
class ModelSlot:
    """A served model: its names, load state and (once loaded) its embedder."""

    key: str  # canonical name (ModelInfo.name): the `id` in /v1/models and the `model` of replies
    spec: ModelSpec
    purposes: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    info: ModelInfo | None = None
    status: str = "loading"  # loading | ready | failed
    error: str | None = None
    embedder: Embedder | None = None
    load_seconds: float | None = None
    loaded_at: float | None = None
    on_demand: bool = False  # added by ensure_model (a store's model the configuration does not list)
    load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def dim(self) -> int | None:
        if self.embedder is not None:
            return self.embedder.dim
        return self.info.dim if self.info is not None else None

    @property
    def memory_bytes(self) -> int | None:
        info = self.embedder.info if self.embedder is not None else self.info
        try:
            return int(info.memory_bytes) if info is not None else None
        except Exception:  # a remote model (openai-compatible backend) has no weights here
            return None

    def describe(self) -> dict:
        emb = self.embedder
        return {
            "id": self.key, "object": "model", "created": int(self.loaded_at or 0), "owned_by": "woolocal",
            "dim": self.dim, "max_tokens": emb.max_tokens if emb is not None else (self.info.max_tokens
                                                                                 if self.info else None),
            "purposes": list(self.purposes), "backend": getattr(emb, "backend", None) if emb else self.spec.backend,
            "status": self.status, "error": self.error, "memory_bytes": self.memory_bytes,
            "query_prefix": (emb.info.query_prefix if emb is not None else
                             (self.info.query_prefix if self.info else None)),
        }


Loader = Callable[[ModelSpec], Embedder]

# Embedders come from the process's one cache (`embedders.get`), shared by every app of this process (tests build
# many apps; `woolocal serve` builds one); these are the ones warmed up already.
_shared_lock = threading.Lock()
_warm: set = set()


def default_loader(spec: ModelSpec) -> Embedder:
    """Build the embedder a spec names (a purpose: its backend, endpoint and fallback) and load its weights."""
    from woolocal_ingest import embedders

    es = (embedders.EmbedderSpec.resolve(spec.purpose_cfg, spec.purpose or DEFAULT_PURPOSE)
          if spec.purpose_cfg is not None else embedders.EmbedderSpec(spec.model, backend=spec.backend))
    with _shared_lock:
        emb = embedders.get(es)
        if es not in _warm:
            emb.ensure_ready()
            emb.embed_documents(["warm up"])  # loads the weights and the tokenizer now, not on the first request
            _ = emb.tokens
            _warm.add(es)
        return emb


class _Job:
    __slots__ = ("slot", "query", "texts", "lengths", "loop", "future", "out", "remaining", "cancelled")

    def __init__(self, slot: ModelSlot, query: bool, texts: list[str], lengths: list[int],
                 loop: asyncio.AbstractEventLoop):
        self.slot = slot
        self.query = query
        self.texts = texts
        self.lengths = lengths  # model tokens incl. special tokens, capped at max_tokens (what a batch pads to)
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.out: np.ndarray | None = None
        self.remaining = len(texts)
        self.cancelled = False


def _resolve(fut: asyncio.Future, value=None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class DynamicBatcher:
    """One worker thread; a bounded queue of texts; token-budget batches across concurrent requests."""

    def __init__(self, *, queue_size: int, max_batch_tokens: int, wait_ms: float, metrics: ServiceMetrics):
        self.queue_size = queue_size
        self.max_batch_tokens = max_batch_tokens
        self.wait_s = wait_ms / 1000.0
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._pending_texts = 0
        self._in_flight = 0
        self._first_arrival = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # forward batches run (tests check that concurrent requests shared them)
        metrics.bind_queue(lambda: self._pending_texts, lambda: self._in_flight, queue_size)

    @property
    def depth(self) -> int:
        """Texts waiting (not yet taken by the worker)."""
        return self._pending_texts

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def jobs_waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: _Job) -> None:
        n = len(job.texts)
        with self._cond:
            if self._closed:
                raise APIError(503, "The service is shutting down.", code="shutting_down")
            if self._pending_texts and self._pending_texts + n > self.queue_size:
                self.metrics.rejected.labels("queue_full").inc()
                raise APIError(429, f"The embedding queue is full ({self._pending_texts} texts waiting, room for "
                                    f"{self.queue_size}); retry shortly.", code="queue_full",
                               headers={"Retry-After": "1"})
            if not self._pending:
                self._first_arrival = time.monotonic()
            self._pending.append(job)
            self._pending_texts += n
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="woolocal-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        """Stop the worker (waiting requests get 503); a later submit starts a new one."""
        with self._cond:
            self._closed = True
            jobs = list(self._pending)
            self._pending.clear()
            self._pending_texts = 0
            self._cond.notify_all()
        for job in jobs:
            job.loop.call_soon_threadsafe(_resolve, job.future, None,
                                          APIError(503, "The service is shutting down.", code="shutting_down"))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        with self._cond:  # reusable: an app served again (a second TestClient lifespan) starts a new worker
            if thread is None or not thread.is_alive():
                self._thread = None
                self._closed = False

    # -- worker ------------------------------------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # Gather window: let concurrent requests join the batch (the budget of a batch is the cap anyway).
            while not self._closed:
                left = self._first_arrival + self.wait_s - time.monotonic()
                if left <= 0 or self._pending_texts >= self.queue_size:
                    break
                self._cond.wait(left)
            if self._closed or not self._pending:
                return None if self._closed else []
            head = self._pending[0]
            group = (head.slot.key, head.query)
            take, rest = [], deque()
            for job in self._pending:
                (take if (job.slot.key, job.query) == group else rest).append(job)
            self._pending = rest
            n = sum(len(j.texts) for j in take)
            self._pending_texts -= n
            self._in_flight = n
            if rest:
                self._first_arrival = time.monotonic() - self.wait_s  # the rest waited already: no new window
            return take

    def _run(self) -> None:
        while True:
            take = self._take()
            if take is None:
                return
            if not take:
                continue
            try:
                self._process(take)
            except BaseException as e:  # noqa: BLE001 - every waiting request must get an answer
                log.exception("embedding failed")
                err = e if isinstance(e, APIError) else APIError(
                    500, f"Embedding failed: {type(e).__name__}: {e}", code="embedding_failed", type="server_error")
                for job in take:
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, err)
            finally:
                with self._cond:
                    self._in_flight = 0
                take = None  # drop references: memory stays flat

    def _process(self, jobs: list[_Job]) -> None:
        from woolocal_ingest.embedders.batching import token_budget_batches

        slot = jobs[0].slot
        emb = slot.embedder
        query = jobs[0].query
        if emb is None:
            raise APIError(503, f"Model {slot.key} is not loaded.", code="model_not_loaded")
        items: list[tuple[_Job, int]] = []
        lengths: list[int] = []
        for job in jobs:
            if job.cancelled:
                continue
            for i, n in enumerate(job.lengths):
                items.append((job, i))
                lengths.append(n)
        max_batch = int(getattr(emb, "batch_size", None) or getattr(emb, "max_batch", None) or 128)
        plan = token_budget_batches(lengths, self.max_batch_tokens, max_batch)
        prefix = emb.info.query_prefix if query else ""
        per_text = query and bool(emb.info.doc_prefix)  # embed_documents would add the document prefix
        for batch in plan.batches:
            batch = [k for k in batch if not items[k][0].cancelled]
            if not batch:
                continue
            texts = [items[k][0].texts[items[k][1]] for k in batch]
            t0 = time.perf_counter()
            if per_text:
                vecs = np.stack([emb.embed_query(t) for t in texts])
            else:
                vecs = emb.embed_documents([prefix + t for t in texts] if prefix else texts)
            vecs = np.asarray(vecs, dtype=np.float32)
            self.batches += 1
            self.metrics.observe_batch(slot.key, len(texts), sum(lengths[k] for k in batch),
                                       time.perf_counter() - t0)
            done: list[_Job] = []
            for row, k in enumerate(batch):
                job, i = items[k]
                if job.out is None:
                    job.out = np.empty((len(job.texts), vecs.shape[1]), dtype=np.float32)
                job.out[i] = vecs[row]
                job.remaining -= 1
                if job.remaining == 0:
                    done.append(job)
            for job in done:
                out, job.out = job.out, None
                job.loop.call_soon_threadsafe(_resolve, job.future, out)
            with self._cond:
                self._in_flight -= len(batch)


class ServiceState:
    """The models one app serves and the batcher in front of them (`app.state.service`)."""

    def __init__(self, config: FlowsConfig, stores_root: Path | None = None, *, loader: Loader | None = None,
                 metrics: ServiceMetrics | None = None):
        self.config = config
        self.stores_root = Path(stores_root).resolve() if stores_root is not None else config.stores_root()
        self.metrics = metrics or ServiceMetrics()
        self.loader: Loader = loader or default_loader
        svc = config.service
        self.batcher = DynamicBatcher(queue_size=svc.queue_size, max_batch_tokens=svc.max_batch_tokens,
                                      wait_ms=svc.batch_wait_ms, metrics=self.metrics)
        self.slots: list[ModelSlot] = []
        self._names: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()
        self._load_thread: threading.Thread | None = None
        self.started = time.time()
        for spec in self._specs():
            self._add_slot(spec)
        # Drop-in names (service.model_aliases): OpenAI's model names by default, so a client switches by its base
        # URL alone. An alias of a purpose not served here is not indexed (a request for it gets the usual 404).
        self.aliases = {name: a for name, a in config.model_aliases().items() if self._names.get(a.purpose)}
        self._query_names = {n.casefold() for n, a in self.aliases.items() if a.query}
        for name, a in self.aliases.items():
            self._index(self._names[a.purpose], {name})

    # -- models ------------------------------------------------------------------------------------------------
    def _specs(self) -> list[ModelSpec]:
        cfg = self.config
        wanted = list(cfg.service.models) or list(cfg.purposes)
        out = []
        for name in wanted:
            p = cfg.purposes.get(name)
            if p is not None:
                out.append(ModelSpec(model=p.model, backend=p.backend, purpose=name, purpose_cfg=p))
            else:
                out.append(ModelSpec(model=name))
        return out

    def _canonical(self, spec: ModelSpec) -> tuple[str, ModelInfo | None, str | None]:
        from woolocal_ingest.embedders.registry import resolve_model

        if spec.backend == "openai-compatible":
            ep = spec.purpose_cfg.endpoint if spec.purpose_cfg else None
            return (ep.model if ep and ep.model else spec.model), None, None
        try:
            info = resolve_model(spec.model)
            return info.name, info, None
        except Exception as e:  # noqa: BLE001 - reported in /health and /v1/models, the others still serve
            return spec.model, None, f"{type(e).__name__}: {e}"

    def _add_slot(self, spec: ModelSpec, on_demand: bool = False) -> ModelSlot:
        key, info, error = self._canonical(spec)
        with self._lock:
            slot = next((s for s in self.slots if s.key == key), None)
            if slot is None:
                slot = ModelSlot(key=key, spec=spec, info=info, on_demand=on_demand)
                if error:
                    slot.status, slot.error = "failed", error
                self.slots.append(slot)
                self.metrics.set_model_state(key, slot.status, dim=slot.dim)
            elif spec.backend != slot.spec.backend:
                log.warning("purpose %s names model %s like %s; it is served once (backend %s)", spec.purpose, key,
                            ", ".join(slot.purposes) or slot.spec.model, slot.spec.backend)
            if spec.purpose and spec.purpose not in slot.purposes:
                slot.purposes.append(spec.purpose)
            names = {key, key.rstrip("/").split("/")[-1], slugify(key), spec.model}
            if spec.purpose:
                names.add(spec.purpose)
            if info is not None:
                names.update(info.aliases)
            self._index(slot, names)
            return slot

    def _index(self, slot: ModelSlot, names: set[str]) -> None:
        slot.names.update(n for n in names if n)
        for n in names:
            if n:
                self._names.setdefault(n, slot)
                self._names.setdefault(n.casefold(), slot)

    def start_loading(self, background: bool = True) -> None:
        """Load every model: in a daemon thread (`/health` says 503 loading until done) or right here."""
        if background:
            self._load_thread = threading.Thread(target=self._load_all, name="woolocal-model-load", daemon=True)
            self._load_thread.start()
        else:
            self._load_all()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._load_thread is not None:
            self._load_thread.join(timeout)
        return self.loaded

    def _load_all(self) -> None:
        for slot in list(self.slots):
            self._load_once(slot)

    def _load(self, slot: ModelSlot) -> None:
        t0 = time.perf_counter()
        try:
            emb = self.loader(slot.spec)
            name, dim = emb.model_name, emb.dim
        except Exception as e:  # noqa: BLE001 - reported in /health, /v1/models and the metrics
            log.exception("model %s failed to load", slot.key)
            slot.error = f"{type(e).__name__}: {e}"
            slot.status = "failed"
            self.metrics.set_model_state(slot.key, "failed")
            return
        slot.load_seconds = time.perf_counter() - t0
        slot.loaded_at = time.time()
        slot.embedder = emb
        slot.info = getattr(emb, "info", slot.info)
        with self._lock:
            self._index(slot, {name, name.rstrip("/").split("/")[-1], slugify(name)})
        slot.status = "ready"
        self.metrics.set_model_state(slot.key, "ready", memory_bytes=slot.memory_bytes, dim=dim,
                                     load_seconds=slot.load_seconds)
        log.info("model %s ready (%sd, %.1fs)", slot.key, dim, slot.load_seconds)

    @property
    def loaded(self) -> bool:
        """Every served model is loaded."""
        return bool(self.slots) and all(s.status == "ready" for s in self.slots)

    @property
    def status(self) -> str:
        """ok (all loaded) | loading | error (a model failed to load)."""
        if any(s.status == "failed" for s in self.slots) or not self.slots:
            return "error"
        return "ok" if self.loaded else "loading"

    def default_slot(self) -> ModelSlot:
        slot = self._names.get(DEFAULT_PURPOSE)
        purpose = self.config.purposes.get(DEFAULT_PURPOSE)
        if slot is None and purpose is not None:  # the purpose is not listed, but its model may be
            slot = self._names.get(purpose.model) or self._names.get(purpose.model.casefold())
        if slot is None:
            if not self.slots:
                raise APIError(503, "No model is configured to serve (service.models in flows.yaml).",
                               code="no_models")
            slot = self.slots[0]
        return slot

    def is_query_alias(self, name: str | None) -> bool:
        """`name` is a model alias marked `query: true`: its inputs are queries (the model's query prefix)."""
        return bool(name) and name.casefold() in self._query_names

    def list_models(self) -> list[dict]:
        """/v1/models: every served model, then every alias (with `alias_of`, `purpose` and `query`)."""
        return [s.describe() for s in self.slots] + [self.describe(name) for name in self.aliases]

    def describe(self, name: str) -> dict:
        """/v1/models/{name}: a served model, or an alias of one."""
        slot = self.slot(name)
        alias = self.aliases.get(name) or next((a for n, a in self.aliases.items() if n.casefold() == name.casefold()),
                                               None)
        if alias is None:
            return slot.describe()
        return {**slot.describe(), "id": name, "alias_of": slot.key, "purpose": alias.purpose, "query": alias.query}

    def slot(self, name: str | None) -> ModelSlot:
        if name is None or name == "":
            return self.default_slot()
        slot = self._names.get(name) or self._names.get(name.casefold())
        if slot is None:
            served = ", ".join(s.key for s in self.slots) or "none"
            purposes = ", ".join(p for s in self.slots for p in s.purposes)
            raise APIError(404, f"The model `{name}` does not exist or is not served here. Served: {served}"
                                + (f" (purposes: {purposes})" if purposes else "") + ".",
                           param="model", code="model_not_found")
        return slot

    def resolve_model(self, name: str | None) -> str:
        """A request's model (purpose, model name, its last part or slug; None = `projects`) -> canonical key.
        APIError 404 (param `model`, code `model_not_found`) when nothing served answers to it."""
        return self.slot(name).key

    def embedder(self, name: str | None) -> Embedder:
        """The loaded embedder for `name`; APIError 503 while it loads or when it failed to load."""
        slot = self.slot(name)
        if slot.status == "loading":
            self.metrics.rejected.labels("loading").inc()
            raise APIError(503, f"Model {slot.key} is still loading; retry shortly (GET /health says ok when "
                                "ready).", code="model_loading", headers={"Retry-After": "2"})
        if slot.status == "failed" or slot.embedder is None:
            raise APIError(503, f"Model {slot.key} failed to load: {slot.error}", code="model_load_failed")
        return slot.embedder

    async def ensure_model(self, name: str) -> str:
        """The key of a model a store needs (e.g. the model in a store's manifest). Served already: its key (503
        while it loads). Not configured: resolved offline by the registry, loaded now in a worker thread (the
        request waits for it once), then served like the others. APIError 404 when it cannot be found offline."""
        try:
            slot = self.slot(name)
        except APIError:
            from woolocal_ingest.embedders.registry import resolve_model

            try:
                info = await asyncio.to_thread(resolve_model, name)
            except Exception as e:  # noqa: BLE001
                raise APIError(404, f"The model `{name}` is not served here and cannot be found offline: {e}",
                               param="model", code="model_not_found") from None
            slot = self._names.get(info.name) or self._add_slot(ModelSpec(model=name), on_demand=True)
        if slot.on_demand and slot.status == "loading":
            await asyncio.to_thread(self._load_once, slot)
        self.embedder(slot.key)  # 503 while loading or when it failed
        return slot.key

    def _load_once(self, slot: ModelSlot) -> None:
        with slot.load_lock:
            if slot.status == "loading" and slot.embedder is None:
                self._load(slot)

    # -- embedding ---------------------------------------------------------------------------------------------
    async def embed(self, name: str | None, texts: Sequence[str], *, query: bool = False,
                    lengths: Sequence[int] | None = None) -> np.ndarray:
        """float32 [n, dim], L2-normalised, through the dynamic batcher. `query=True` applies the model's query
        prefix (BGE's). `lengths`: model tokens per text incl. special tokens (computed when not given).
        APIError 404 unknown model, 503 loading, 429 queue full."""
        slot = self.slot(name)
        emb = self.embedder(slot.key)
        texts = list(texts)
        if not texts:
            return np.zeros((0, emb.dim), dtype=np.float32)
        if lengths is None:
            lengths = await asyncio.to_thread(self.token_lengths, emb, texts)
        job = _Job(slot, query, texts, list(lengths), asyncio.get_running_loop())
        self.batcher.submit(job)
        try:
            return await job.future
        finally:
            job.cancelled = True  # a client that went away: the worker skips what it has not embedded yet

    @staticmethod
    def token_lengths(emb: Embedder, texts: Sequence[str]) -> list[int]:
        """What each text costs a batch: its model tokens plus special tokens, capped at the model's max."""
        special = emb.tokens.special_tokens
        return [min(n + special, emb.max_tokens) for n in emb.tokens.count_many(list(texts))]

    @property
    def queue_depth(self) -> int:
        return self.batcher.depth

    def close(self) -> None:
        self.batcher.close()
