"""The service state: the models one running service serves (loaded in the background), by every name a request
may give them, and the batcher their embedding requests go through.

Models. `service.models` in flows.yaml (purpose names or model names) or, by default, every purpose; purposes
that name the same model share one loaded copy. A request's `model` may be a purpose (`projects`), the canonical
name (`sentence-transformers/all-MiniLM-L6-v2`), its last part (`all-MiniLM-L6-v2`), its slug (`all-minilm-l6-v2`)
or the configured string (a path), case-insensitively; none means the `projects` purpose. `service.model_aliases` adds
drop-in names (by default OpenAI's `text-embedding-3-small`, `-3-large`, `text-embedding-ada-002` -> `projects`); an
alias marked `query: true` embeds its inputs as queries (the model's query prefix), for clients such as LangChain's
`embedQuery`, which send no hint.

The dynamic batcher in front of the models is service/batcher.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from woolocal_ingest.config import FlowsConfig, PurposeConfig
from woolocal_ingest.embedders.base import Embedder
from woolocal_ingest.embedders.registry import ModelInfo, slugify
from woolocal_ingest.service.batcher import DynamicBatcher, EmbedJob
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
    quantization: str | None = None  # "int8": a precision variant of a served model (`ensure_precision`)


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
            "purposes": list(self.purposes), "backend": emb.backend if emb else self.spec.backend,
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
          if spec.purpose_cfg is not None
          else embedders.EmbedderSpec(spec.model, backend=spec.backend, quantization=spec.quantization))
    with _shared_lock:
        emb = embedders.get(es)
        if es not in _warm:
            emb.ensure_ready()
            emb.embed_documents(["warm up"])  # loads the weights and the tokenizer now, not on the first request
            _ = emb.tokens
            _warm.add(es)
        return emb


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
        slot.info = emb.info
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

    async def ensure_precision(self, key: str, store_model: Mapping) -> str:
        """The key of served model `key` at the precision a store was embedded with (`identity.precision_of` of
        its manifest's `model`: the quantization and the engine that made it): `key` itself when its embedder
        makes such vectors, else a variant such as `<key> (int8/onnx)` or `<key> (fp32)` of the same model files,
        loaded on first use (the request waits for it once). So an int8 store is queried with the int8 model of its
        engine and a float32 store with float32, whatever `serve --quantization` says. APIError 409 for a precision
        this service cannot make (an MLX bit width)."""
        from woolocal_ingest.embedders.identity import precision_of

        slot = self.slot(key)
        emb = self.embedder(slot.key)
        want = precision_of(store_model)
        if precision_of({"quantization": emb.quantization, "backend": emb.backend}) == want:
            return slot.key
        quant, backend = want
        if quant not in (None, "int8", "bf16"):
            raise APIError(409, f"model {slot.key} runs at precision {emb.quantization or 'fp32'} here but the store "
                                f"was embedded at {quant} ({backend}); query it where that precision runs, or migrate "
                                "it", param="store", code="model_mismatch")
        vkey = f"{slot.key} ({quant}/{backend})" if quant else f"{slot.key} (fp32)"
        with self._lock:
            variant = next((s for s in self.slots if s.key == vkey), None)
            if variant is None:
                model = str(slot.info.path) if slot.info is not None else slot.spec.model
                spec = ModelSpec(model=model, backend=backend or ("onnx" if emb.backend == "openvino" else "auto"),
                                 quantization="int8" if quant == "int8" else None)
                variant = ModelSlot(key=vkey, spec=spec, info=slot.info, on_demand=True)
                self.slots.append(variant)
                self._index(variant, {vkey})
        if variant.status == "loading":
            await asyncio.to_thread(self._load_once, variant)
        self.embedder(variant.key)  # 503 when it failed (an int8 model that fails the accuracy gate, say)
        return variant.key

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
        job = EmbedJob(slot.key, emb, query, texts, list(lengths), asyncio.get_running_loop())
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
