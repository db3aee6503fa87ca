"""The one embedder interface every backend implements, and the tokenizer wrapper chunking measures with."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

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


class Embedder(Protocol):
    """What ingest, search and the service need from a backend."""

    info: ModelInfo
    backend: str

    @property
    def model_name(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def tokens(self) -> TokenCounter: ...

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """float32 [n, dim], L2-normalised, in input order."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """float32 [dim], L2-normalised; the model's query prefix applied."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
