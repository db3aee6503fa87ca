"""Fallback embedding: when the configured backend cannot load or fails mid-run, embed with the configured fallback,
but only where configuration allows it.

Privacy first. `purposes.<p>.fallbackToCloud: false` (the default) means text never leaves this machine for a
fallback: before the fallback is built (so before any socket is opened, any DNS name looked up, any client created),
every base URL of a fallback endpoint must have a loopback host (`localhost`, 127.0.0.0/8, ::1), or the run fails with
`RemoteNotAllowedError` naming the endpoint and the setting. The fallback embedder itself is then built with
`loopback_only=True`, a second lock on the same door. The primary backend is the user's explicit choice and is not
restricted by this setting.

One model per store. Once the primary fails, the fallback embeds everything from then on (the switch is sticky) and
the call that failed is re-embedded in full by the fallback, so no call ever returns vectors of two models. Vectors
the primary returned in *earlier* calls are another model's: the ingest layer must treat a switch as "re-embed
everything" -- snapshot `generation` (or `model_name`/`dim`/`backend`) when it plans, and when it differs after
embedding, plan again (the target folder is named for the active model and dim) and embed all texts again.
`info`, `model_name`, `dim`, `max_tokens`, `backend` and `tokens` are always those of the embedder that actually
embedded (the active one), so the manifest names the right model. `ensure_ready()` loads the primary (a first,
one-text embedding) before planning, so a primary that cannot load is replaced before anything is planned with it.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np

from woolocal_ingest.config import EndpointConfig, PurposeConfig
from woolocal_ingest.embedders.base import Embedder, EmbedderBase, Progress
from woolocal_ingest.embedders.router import purpose_loader
from woolocal_ingest.embedders.openai_compat import (
    OpenAICompatibleEmbedder, RemoteEndpointRefusedError, is_loopback_url, redact_url,
)
from woolocal_ingest.errors import DimensionMismatchError, WoolocalError

log = logging.getLogger(__name__)

__all__ = [
    "EmbeddingFailedError", "FallbackEmbedder", "RemoteNotAllowedError", "build_embedder", "check_fallback_allowed",
    "embedder_for_purpose",
]


class RemoteNotAllowedError(RemoteEndpointRefusedError):
    """The fallback would send text to an endpoint off this machine and `fallbackToCloud` is false (config: exit 2)."""


class EmbeddingFailedError(WoolocalError):
    """Both the primary embedder and its fallback failed."""


def check_fallback_allowed(urls: Sequence[str], allow_remote: bool, setting: str) -> None:
    """Raise RemoteNotAllowedError when any of `urls` is not loopback and `allow_remote` is false. Pure: no I/O."""
    if allow_remote:
        return
    remote = [redact_url(u) for u in urls if not is_loopback_url(u)]
    if remote:
        raise RemoteNotAllowedError(
            f"fallback endpoint {', '.join(remote)} is not on this machine (loopback: localhost, 127.0.0.0/8, ::1) "
            f"and {setting} is false, so no connection was attempted to it. Set {setting}: true to let text leave "
            "this machine, or point the fallback at a loopback server.")


def _label(e: Any) -> str:
    try:
        return f"{e.backend} model {e.model_name}"
    except Exception:
        return type(e).__name__


class _ProgressGuard:
    """Progress over retries of one call: a re-embedding reports only texts beyond those already reported."""

    def __init__(self, cb: Progress | None):
        self.cb = cb
        self.reported = 0

    def attempt(self) -> Progress | None:
        if self.cb is None:
            return None
        done = 0

        def report(n: int) -> None:
            nonlocal done
            done += n
            if done > self.reported:
                self.cb(done - self.reported)  # type: ignore[misc]
                self.reported = done

        return report


class FallbackEmbedder(EmbedderBase):
    """An Embedder that is the primary until it fails, then the fallback for good.

    `primary_factory` / `fallback_factory` build the embedders (the fallback's is only called when needed, after the
    privacy check). `fallback_urls` are the base URLs the fallback would send text to (empty for a local fallback);
    with `allow_remote` false, any non-loopback one refuses the switch. `purpose` names the purpose in messages
    (`purposes.<purpose>.fallbackToCloud`). `on_switch(self)` is called once, after the switch.
    """

    def __init__(
        self,
        primary_factory: Callable[[], Embedder],
        fallback_factory: Callable[[], Embedder],
        allow_remote: bool,
        *,
        fallback_urls: Sequence[str] = (),
        purpose: str = "projects",
        primary_label: str | None = None,
        fallback_label: str | None = None,
        on_switch: Callable[["FallbackEmbedder"], None] | None = None,
    ):
        self._primary_factory = primary_factory
        self._fallback_factory = fallback_factory
        self.allow_remote = bool(allow_remote)
        self.fallback_urls = tuple(str(u) for u in fallback_urls)
        self.purpose = purpose
        self.setting = f"purposes.{purpose}.fallbackToCloud"
        self.primary_label = primary_label
        self.fallback_label = fallback_label or "fallback"
        self.on_switch = on_switch
        self._lock = threading.RLock()
        self.primary: Embedder | None = None
        self.fallback: Embedder | None = None
        self.switched = False
        self.switch_reason: str | None = None
        self.generation = 0  # 0: the primary embeds; 1: the fallback does
        self.primary_texts_served = 0  # texts the primary embedded and returned before any switch
        if not self.allow_remote and any(not is_loopback_url(u) for u in self.fallback_urls):
            log.warning("the fallback for purpose %r is off this machine and %s is false: it will not be used",
                        purpose, self.setting)
        try:
            self.primary = primary_factory()
        except Exception as e:
            self._switch(e, "could not load")
        if self.primary_label is None and self.primary is not None:
            self.primary_label = _label(self.primary)

    # -- state -------------------------------------------------------------------------------------------------
    @property
    def active(self) -> Embedder:
        """The embedder that embeds now (and embedded everything since the switch)."""
        return self.fallback if self.switched else self.primary  # type: ignore[return-value]

    @property
    def active_role(self) -> str:
        return "fallback" if self.switched else "primary"

    def _switch(self, exc: BaseException, when: str) -> None:
        with self._lock:
            if self.switched:
                return
            what = self.primary_label or "primary embedder"
            reason = f"{what} {when}: {type(exc).__name__}: {exc}"
            try:
                check_fallback_allowed(self.fallback_urls, self.allow_remote, self.setting)
            except RemoteNotAllowedError as refused:
                raise RemoteNotAllowedError(
                    f"{reason}. Not falling back to {self.fallback_label}: {refused}") from exc
            log.warning("%s; switching to %s (every text is embedded again by it)", reason, self.fallback_label)
            try:
                fb = self._fallback_factory()
            except Exception as e2:
                raise EmbeddingFailedError(
                    f"{reason}; its fallback ({self.fallback_label}) could not load either: "
                    f"{type(e2).__name__}: {e2}") from e2
            self.fallback = fb
            if self.fallback_label == "fallback":
                self.fallback_label = _label(fb)
            self.switch_reason = reason
            self.switched = True
            self.generation += 1
        if self.on_switch is not None:
            self.on_switch(self)

    def _run(self, fn: Callable[[Embedder], Any], what: str, count: int = 0) -> Any:
        if not self.switched:
            gen = self.generation
            try:
                out = fn(self.primary)  # type: ignore[arg-type]
            except RemoteEndpointRefusedError:
                raise
            except Exception as e:
                self._switch(e, f"failed ({what})")
            else:
                if self.generation == gen:  # no other thread switched meanwhile: one model for this whole call
                    self.primary_texts_served += count
                    return out
        try:
            return fn(self.fallback)  # type: ignore[arg-type]
        except Exception as e:
            if self.switch_reason:
                e.add_note(f"(the fallback {self.fallback_label} is in use because {self.switch_reason})")
            raise

    # -- Embedder interface (always the active embedder's) -------------------------------------------------------
    @property
    def info(self):
        return self._run(lambda e: e.info, "info")

    @property
    def model_name(self) -> str:
        return self._run(lambda e: e.model_name, "model_name")

    @property
    def dim(self) -> int:
        return self._run(lambda e: e.dim, "dim")

    @property
    def max_tokens(self) -> int:
        return self._run(lambda e: e.max_tokens, "max_tokens")

    @property
    def backend(self) -> str:
        return self._run(lambda e: e.backend, "backend")

    @property
    def tokens(self):
        return self._run(lambda e: e.tokens, "tokenizer")

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """All of `texts` embedded by one model: when the primary fails during this call, the fallback embeds every
        text of the call again (progress counts each text once)."""
        texts = list(texts)
        guard = _ProgressGuard(progress)
        return self._run(lambda e: e.embed_documents(texts, guard.attempt()), "embed_documents", len(texts))

    def embed_query(self, text: str) -> np.ndarray:
        return self._run(lambda e: e.embed_query(text), "embed_query")

    def ensure_ready(self) -> "FallbackEmbedder":
        """Make the active embedder embed one text now (loads a lazily loaded model, probes a server), so a primary
        that cannot work is replaced before the ingest layer plans with it."""
        self._run(lambda e: (e.embed_query("ready"), e.dim), "first use")
        return self

    def load(self) -> "FallbackEmbedder":
        self.active.load()
        return self

    # The active embedder's batch counters (padding waste). Its precision, gate report and backend choice are not
    # passed through: as before this seam, a purpose with a fallback records quantization None in its manifest.
    @property
    def real_tokens(self) -> int:  # type: ignore[override]
        return self.active.real_tokens

    @property
    def padded_tokens(self) -> int:  # type: ignore[override]
        return self.active.padded_tokens

    def __repr__(self) -> str:
        return (f"FallbackEmbedder(active={self.active_role}, primary={self.primary_label!r}, "
                f"fallback={self.fallback_label!r}, switched={self.switched})")


# -- from configuration ------------------------------------------------------------------------------------------


def build_embedder(
    backend: str,
    model: str | None,
    endpoint: EndpointConfig | None,
    purpose: PurposeConfig,
    *,
    dim: int | None,
    key: str,
    loopback_only: bool = False,
    load_local: Callable[[str | None, str, PurposeConfig], Embedder] | None = None,
    **remote_options: Any,
) -> Embedder:
    """One embedder from configuration: `key` is its YAML path (`purposes.projects` or `purposes.projects.fallback`)
    for messages; `dim` the expected dim (None: whatever the model has)."""
    if backend == "openai-compatible":
        if endpoint is None:
            raise WoolocalError(f"{key}.endpoint: required when backend is openai-compatible")
        return OpenAICompatibleEmbedder(endpoint, model, dim, loopback_only=loopback_only, setting=f"{key}.endpoint",
                                        dims_setting=f"{key.split('.fallback')[0]}.dimensions", **remote_options)
    emb = (load_local or purpose_loader)(model, backend, purpose)
    if dim is not None and emb.dim != dim:
        raise DimensionMismatchError(f"{key}: model {emb.model_name} has {emb.dim} dims, but "
                                     f"{key.split('.fallback')[0]}.dimensions is {dim}")
    return emb


def embedder_for_purpose(
    purpose: PurposeConfig,
    name: str = "projects",
    *,
    load_local: Callable[[str | None, str, PurposeConfig], Embedder] | None = None,
    on_switch: Callable[[FallbackEmbedder], None] | None = None,
    **remote_options: Any,
) -> Embedder:
    """The embedder for `purposes.<name>`: its backend, wrapped in a FallbackEmbedder when a fallback is configured.

    `load_local(model, backend, purpose)` builds a local embedder (default: `load_embedder(model, backend,
    batch_size=purpose.batch_size)`). The fallback's model defaults to the purpose's model; the purpose's
    `dimensions` is expected of the fallback only when it is the same model. `remote_options` go to every
    OpenAICompatibleEmbedder built (e.g. `health_cooldown_s`, `sleep` in tests).
    """
    key = f"purposes.{name}"
    primary = partial(build_embedder, purpose.backend, purpose.model, purpose.endpoint, purpose,
                      dim=purpose.dimensions, key=key, load_local=load_local, **remote_options)
    fb = purpose.fallback
    if fb is None:
        return primary()
    fb_model = fb.model or purpose.model
    fb_dim = purpose.dimensions if fb_model == purpose.model else None
    fallback = partial(build_embedder, fb.backend, fb_model, fb.endpoint, purpose, dim=fb_dim, key=f"{key}.fallback",
                       loopback_only=not purpose.fallbackToCloud, load_local=load_local, **remote_options)
    urls = list(fb.endpoint.urls) if fb.backend == "openai-compatible" and fb.endpoint is not None else []
    where = f" at {', '.join(redact_url(u) for u in urls)}" if urls else ""
    fb_name = fb.endpoint.model if fb.endpoint is not None and fb.endpoint.model else fb_model
    return FallbackEmbedder(
        primary, fallback, allow_remote=purpose.fallbackToCloud, fallback_urls=urls, purpose=name,
        primary_label=f"{purpose.backend} model {purpose.model}",
        fallback_label=f"{fb.backend} model {fb_name}{where}",
        on_switch=on_switch,
    )
