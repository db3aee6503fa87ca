"""The one embedder interface every backend implements, the tokenizer wrapper chunking measures with, and the
backend a model was given to (`BackendChoice`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from woolocal_ingest.embedders.registry import ModelInfo

Progress = Callable[[int], None]  # called with the number of texts just embedded


class TokenCounter:
    """The model's own tokenizer, used to measure and cut text in tokens (special tokens not counted)."""

    def __init__(self, info: ModelInfo):
        from tokenizers import Tokenizer

        tok_file = info.path / "tokenizer.json"
        if tok_file.is_file():
            self._tok = Tokenizer.from_file(str(tok_file))
        else:  # slow-tokenizer-only folder: let transformers build the fast one
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(info.path)).backend_tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self.special_tokens = self._tok.num_special_tokens_to_add(False)
        self._counts: dict[str, int] = {}

    def count(self, text: str) -> int:
        # The recursive splitter measures the same pieces several times: remember recent answers.
        n = self._counts.get(text)
        if n is None:
            n = len(self._tok.encode(text, add_special_tokens=False).ids)
            if len(self._counts) > 50_000:
                self._counts.clear()
            self._counts[text] = n
        return n

    def count_many(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def split(self, text: str, max_tokens: int) -> list[str]:
        """Cut `text` into consecutive pieces of at most `max_tokens` tokens, at token boundaries, losing nothing."""
        offsets = self._tok.encode(text, add_special_tokens=False).offsets
        if len(offsets) <= max_tokens:
            return [text]
        pieces, start = [], 0
        for i in range(max_tokens, len(offsets), max_tokens):
            cut = offsets[i][0]
            if cut > start:
                pieces.append(text[start:cut])
                start = cut
        pieces.append(text[start:])
        return pieces

    def ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_starts(self, text: str) -> list[int]:
        """The character offset where each token of `text` starts (for cutting text at token boundaries)."""
        return [o[0] for o in self._tok.encode(text, add_special_tokens=False).offsets]


class Embedder(Protocol):
    """What ingest, migrate, search and the service need from a backend (`EmbedderBase` gives the defaults of the
    members most backends do not vary; the wrappers - fallback, embedding cache - delegate)."""

    info: ModelInfo
    backend: str
    generation: int  # 0; a FallbackEmbedder counts its switch (vectors of two generations are two models')
    quantization: str | int | None  # "int8" (ONNX Runtime), 4/8 bits (MLX) or None: float weights
    gate_report: Any  # quantize.GateReport once an int8 model was gated, else None
    choice: "BackendChoice | None"  # which backend `load_embedder` picked and why (None: not picked by it)
    hits: int  # texts an embedding cache served instead of the model (0 without one)
    real_tokens: int  # tokens embedded so far, and the padded tokens they took (padding waste)
    padded_tokens: int

    @property
    def model_name(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def tokens(self) -> TokenCounter: ...
    @property
    def uncached(self) -> "Embedder":
        """This embedder without an embedding cache in front (what really embeds)."""
        ...

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """float32 [n, dim], L2-normalised, in input order."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """float32 [dim], L2-normalised; the model's query prefix applied."""
        ...

    def ensure_ready(self) -> "Embedder":
        """Make sure the embedder can embed before anything is planned with it (a fallback whose primary cannot
        load switches now); returns itself."""
        ...

    def load(self) -> "Embedder":
        """Load the model now (weights, session; an int8 model is gated) rather than on the first embedding."""
        ...

    def check_sample(self, texts: list[str]) -> None:
        """An int8 model gated on a store's own texts too (nothing for other precisions)."""
        ...


class EmbedderBase:
    """The defaults of the Embedder members most backends do not vary."""

    generation = 0
    quantization: str | int | None = None
    gate_report: Any = None
    choice: "BackendChoice | None" = None
    hits = 0
    real_tokens = 0
    padded_tokens = 0

    @property
    def uncached(self) -> "Embedder":
        return self  # type: ignore[return-value]

    def ensure_ready(self) -> "Embedder":
        return self  # type: ignore[return-value]

    def load(self) -> "Embedder":
        return self  # type: ignore[return-value]

    def check_sample(self, texts: list[str]) -> None:
        return None


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Sentence vectors from token states [b, s, h] as the model's pooling config says (mean, cls, max, lasttoken)."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask[..., None].astype(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    if mode == "max":
        return np.where(m > 0, hidden, -1e9).max(axis=1)
    if mode == "lasttoken":
        last = mask.sum(axis=1).astype(int) - 1
        return hidden[np.arange(hidden.shape[0]), last]
    raise ValueError(f"pooling mode {mode!r} is not supported (mean, cls, max, lasttoken)")


class LocalModel(EmbedderBase):
    """The model facts every local backend exposes, read from its ModelInfo (`self.info`)."""

    info: ModelInfo

    @property
    def model_name(self) -> str:
        return self.info.name

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def max_tokens(self) -> int:
        return self.info.max_tokens

    @cached_property
    def tokens(self) -> TokenCounter:
        return TokenCounter(self.info)


class TransformerEmbedder(LocalModel):
    """Shared machinery for backends that run the bare transformer and pool themselves (ONNX Runtime, MLX):
    tokenise with the model's own tokenizer (truncation at max_tokens), token-budget batches, pooling from the
    model's config, L2 normalisation, results in input order. Subclasses implement `_forward`."""

    backend = "transformer"

    def __init__(self, info: ModelInfo, token_budget: int | None = None, max_batch: int | None = None):
        from woolocal_ingest.embedders.batching import DEFAULT_MAX_BATCH, DEFAULT_TOKEN_BUDGET

        self.info = info
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET
        self.max_batch = max_batch or DEFAULT_MAX_BATCH
        self.batching = "token-budget"  # or "fixed": max_batch texts in input order (the benchmark's baseline)
        self.last_plan = None  # BatchPlan of the last embed_documents call (padding waste)
        self.real_tokens = self.padded_tokens = 0  # over every call: padding waste of this embedder's work

    @cached_property
    def _tokenizer(self):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.tokens._tok.to_str())
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_tokens)
        return tok

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """Last hidden states, float32 [batch, seq, hidden]."""
        raise NotImplementedError

    def _embed(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        from woolocal_ingest.embedders.batching import fixed_batches, padded_inputs, token_budget_batches

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        enc = self._tokenizer.encode_batch(list(texts))
        lengths = [len(e.ids) for e in enc]
        plan = (fixed_batches(lengths, self.max_batch) if self.batching == "fixed"
                else token_budget_batches(lengths, self.token_budget, self.max_batch))
        self.last_plan = plan
        self.real_tokens += plan.real_tokens
        self.padded_tokens += plan.padded_tokens
        for batch in plan.batches:
            ids, mask, types = padded_inputs(enc, batch)
            hidden = np.asarray(self._forward(ids, mask, types), dtype=np.float32)
            vecs = pool(hidden, mask, self.info.pooling)
            if vecs.shape[1] != self.dim:
                from woolocal_ingest.errors import DimensionMismatchError

                raise DimensionMismatchError(
                    f"model {self.model_name} on {self.backend} returned {vecs.shape[1]} dims, its files say {self.dim}")
            out[batch] = l2_normalise(vecs)
            if progress:
                progress(len(batch))
        return out

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        return self._embed([self.info.doc_prefix + t for t in texts], progress)

    def embed_query(self, text: str) -> np.ndarray:
        return self._embed([self.info.query_prefix + text])[0]


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a model, and why (the CLI says it when `auto` chose)."""

    backend: str
    reason: str
    quantization: str | None = None  # "int8", or None: float32
