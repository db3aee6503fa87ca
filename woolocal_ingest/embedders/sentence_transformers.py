"""sentence-transformers backend (torch, CPU here): batched, float32, L2-normalised embeddings."""

from __future__ import annotations

import os
import threading
from functools import cached_property
from typing import Sequence

import numpy as np

from woolocal_ingest.embedders.base import LocalModel, Progress, l2_normalise
from woolocal_ingest.embedders.registry import ModelInfo


class SentenceTransformerEmbedder(LocalModel):
    """Embeds with a local sentence-transformers folder; never reaches a hub."""

    backend = "sentence-transformers"

    def __init__(self, info: ModelInfo, batch_size: int = 32, device: str = "cpu", token_budget: int | None = None):
        from woolocal_ingest.embedders.batching import DEFAULT_TOKEN_BUDGET

        self.info = info
        self.batch_size = batch_size  # the most texts in one forward pass
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET
        self.device = device
        self.batching = "token-budget"  # or "fixed": batch_size texts in input order (the benchmark's baseline)
        self.last_plan = None  # BatchPlan of the last embed_documents call (padding waste)
        self.real_tokens = self.padded_tokens = 0  # over every call: padding waste of this embedder's work
        self._lock = threading.Lock()

    @cached_property
    def model(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        model = SentenceTransformer(str(self.info.path), device=self.device, local_files_only=True)
        model.max_seq_length = self.info.max_tokens
        return model

    def load(self) -> "SentenceTransformerEmbedder":
        """Load the weights now rather than on the first embedding."""
        _ = self.model
        return self

    def _encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        with self._lock:  # one torch forward at a time: it already uses every core
            out = self.model.encode(
                texts, batch_size=batch_size or self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
                show_progress_bar=False,
            )
        return l2_normalise(out)

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        from woolocal_ingest.embedders.batching import fixed_batches, token_budget_batches

        texts = [self.info.doc_prefix + t for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Sorted by token length, cut by padded tokens: short and long chunks do not pad each other.
        lengths = [min(n + self.tokens.special_tokens, self.max_tokens) for n in self.tokens.count_many(texts)]
        plan = (fixed_batches(lengths, self.batch_size) if self.batching == "fixed"
                else token_budget_batches(lengths, self.token_budget, self.batch_size))
        self.last_plan = plan
        self.real_tokens += plan.real_tokens
        self.padded_tokens += plan.padded_tokens
        for idx in plan.batches:
            part = self._encode([texts[i] for i in idx], batch_size=len(idx))
            if part.shape[1] != self.dim:
                from woolocal_ingest.errors import DimensionMismatchError

                raise DimensionMismatchError(
                    f"model {self.model_name} returned {part.shape[1]} dims, its files say {self.dim}")
            out[idx] = part
            if progress:
                progress(len(idx))
        return out

    def embed_query(self, text: str) -> np.ndarray:
        return self._encode([self.info.query_prefix + text])[0]
