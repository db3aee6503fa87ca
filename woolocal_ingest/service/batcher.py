"""The dynamic batcher (as TEI and infinity do) that embeds every request's texts together.

Requests put their texts on one bounded queue (`service.queue_size` texts); a single worker thread waits
`service.batch_wait_ms` after the first arrival, takes every waiting text of the head request's model, cuts them
into token-budget batches (`embedders.batching.token_budget_batches`, at most `service.max_batch_tokens` padded
tokens) and answers each request as soon as its last text is embedded. A request that does not fit the queue gets
429 with Retry-After (an empty queue admits any one request, so a 2048-input request is never refused for size
alone). Requests whose client went away are skipped. Nothing grows with traffic: the queue is bounded, finished
jobs are dropped, metrics keep bounded windows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

import numpy as np

from woolocal_ingest.embedders.base import Embedder
from woolocal_ingest.service.errors import APIError
from woolocal_ingest.service.metrics import ServiceMetrics

log = logging.getLogger("woolocal.service")


class EmbedJob:
    """One request's texts for one model (as documents, or as queries), answered through `future`."""

    __slots__ = ("model", "embedder", "query", "texts", "lengths", "loop", "future", "out", "remaining", "cancelled")

    def __init__(self, model: str, embedder: Embedder, query: bool, texts: list[str], lengths: list[int],
                 loop: asyncio.AbstractEventLoop):
        self.model = model  # the served model's key: jobs of one key (and kind) share batches
        self.embedder = embedder
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
        self._pending: deque[EmbedJob] = deque()
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

    def submit(self, job: EmbedJob) -> None:
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
    def _take(self) -> list[EmbedJob] | None:
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
            group = (head.model, head.query)
            take, rest = [], deque()
            for job in self._pending:
                (take if (job.model, job.query) == group else rest).append(job)
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

    def _process(self, jobs: list[EmbedJob]) -> None:
        from woolocal_ingest.embedders.batching import token_budget_batches

        model = jobs[0].model
        emb = jobs[0].embedder
        query = jobs[0].query
        items: list[tuple[EmbedJob, int]] = []
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
            self.metrics.observe_batch(model, len(texts), sum(lengths[k] for k in batch),
                                       time.perf_counter() - t0)
            done: list[EmbedJob] = []
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
