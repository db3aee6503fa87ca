"""MLX backend: the model's transformer run by MLX (mlx-embeddings loads the HF safetensors folder as it is).

On Apple Silicon MLX runs on Metal: that is what this backend is for, and `backend=auto` picks it only there
(`metal_available()`). On Linux the `mlx-cpu` wheel bundles a reference BLAS (~1.7 GFLOPS, single thread), so the
backend is *correct but slow* (~0.3 chunks/s vs 2-6 for sentence-transformers on a loaded 2-core box, ~45x slower on
a quiet one; see bench/mlx_notes.md): a parity and portability backend there, chosen only on request
(`--backend mlx`), never by auto. No BLAS is swapped in (no relinking, no LD_PRELOAD): that would hijack numpy's
and torch's BLAS in the same process.

mlx-embeddings up to 0.1.0 mean-pools every BERT itself, whatever the model's sentence-transformers config says, so
this backend takes the last hidden states and lets `TransformerEmbedder` pool (MiniLM mean, BGE CLS), normalise and
batch. Only architectures whose mlx-embeddings model returns per-token hidden states for an encoder are run here
(`bert`, `xlm-roberta`); anything else (mpnet, which mlx-embeddings lacks, or a folder with a Dense head) raises
`UnsupportedArchitectureError` before any weight is read, naming the sentence-transformers backend that can run it.

Threads: every MLX call (load, quantize, forward) runs on one worker thread owned by the embedder, under a lock.
MLX streams are thread-local since mlx 0.31.2 (a stream made on one thread cannot be used from another), so a
service calling from many threads still drives MLX from exactly one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, lru_cache

import numpy as np

from woolocal_ingest.embedders.base import TransformerEmbedder
from woolocal_ingest.embedders.registry import ModelInfo
from woolocal_ingest.errors import ConfigError, WoolocalError

QUANTIZATION_ENV = "LOCALMLX_QUANTIZATION"
QUANTIZATION_BITS = (4, 8)
# Weights per scale/bias group. 4 bits needs the smaller groups: on all-MiniLM-L6-v2, cosine to the float vectors is
# ~0.97 with 32 vs ~0.96 with 64 (8 bits: ~0.9999 either way). Expect 4-bit vectors not to mix with float ones.
QUANTIZATION_GROUP_SIZE = {4: 32, 8: 64}

# Every `model_type` mlx-embeddings 0.1.0 ships a model for (mlx_embeddings/models/*), for messages.
MLX_EMBEDDINGS_ARCHITECTURES = frozenset({
    "bert", "xlm-roberta", "modernbert", "qwen3", "gemma3_text", "lfm2", "llama_bidirec", "siglip", "qwen3_vl",
    "colqwen2_5", "colidefics3", "llama_nemotron_vl",
})
# The ones this backend runs: encoders whose mlx-embeddings model returns last hidden states [b, s, h] and takes
# (input_ids, attention_mask, token_type_ids). ModernBERT's "last_hidden_state" is already pooled; the decoders
# (qwen3, gemma3_text, lfm2, llama_bidirec) carry their own pooling/Dense heads; the rest are multimodal.
SUPPORTED_ARCHITECTURES = frozenset({"bert", "xlm-roberta"})
# sentence-transformers modules TransformerEmbedder reproduces; any other module (Dense, ...) is not applied here.
_HANDLED_MODULES = ("Transformer", "Pooling", "Normalize")


class UnsupportedArchitectureError(WoolocalError):
    """The model's architecture (or a module of its pipeline) cannot run on the MLX backend."""

    exit_code = 2


class MLXNotAvailableError(WoolocalError):
    """mlx / mlx-embeddings are not installed (or do not import) in this environment."""

    exit_code = 2


def _normal_model_type(model_type: str) -> str:
    return (model_type or "unknown").strip().lower().replace("_", "-")


def mlx_unsupported_reason(info: ModelInfo) -> str | None:
    """Why `info` cannot run on the MLX backend, or None if it can. Reads only small JSON files, never weights."""
    mt = _normal_model_type(info.model_type)
    if mt not in SUPPORTED_ARCHITECTURES:
        if mt.replace("-", "_") in {a.replace("-", "_") for a in MLX_EMBEDDINGS_ARCHITECTURES}:
            why = "mlx-embeddings 0.1.0 has it but returns no per-token hidden states this backend can pool"
        else:
            why = "mlx-embeddings 0.1.0 has no such architecture"
        return (f"model type {info.model_type!r} of model {info.name} ({info.path}) is not supported by the MLX "
                f"backend: {why} (MLX runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}). "
                "Use the sentence-transformers backend (--backend sentence-transformers), which can run it.")
    try:
        modules = json.loads((info.path / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        modules = []
    extra = [m.get("type", "?") for m in modules if isinstance(m, dict)
             and not str(m.get("type", "")).endswith(_HANDLED_MODULES)]
    if extra:
        return (f"model {info.name} ({info.path}) has sentence-transformers modules the MLX backend does not apply "
                f"({', '.join(extra)}). Use the sentence-transformers backend (--backend sentence-transformers), "
                "which can run it.")
    return None


def mlx_supports(info: ModelInfo) -> bool:
    """True if the MLX backend can run this model (architecture and sentence-transformers modules)."""
    return mlx_unsupported_reason(info) is None


@lru_cache(maxsize=1)
def mlx_available() -> bool:
    """True if `mlx.core` imports and `mlx_embeddings` is installed (both are needed to run this backend)."""
    try:
        import mlx.core  # noqa: F401
    except Exception:  # not installed, or its native library does not load
        return False
    return importlib.util.find_spec("mlx_embeddings") is not None


@lru_cache(maxsize=1)
def metal_available() -> bool:
    """True if MLX can use a Metal GPU (Apple Silicon); False on Linux, or when MLX is missing."""
    try:
        import mlx.core as mx
    except Exception:
        return False
    metal = getattr(mx, "metal", None)
    is_available = getattr(metal, "is_available", None)
    try:
        return bool(is_available()) if callable(is_available) else False
    except Exception:
        return False


def parse_quantization(value: str | int | None) -> int | None:
    """None (float weights) or the bit width from LOCALMLX_QUANTIZATION's value; ConfigError for anything else."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "none", "off", "no", "false", "0"):
        return None
    text = text.removesuffix("bits").removesuffix("bit").removeprefix("q").strip()
    if text.isdigit() and int(text) in QUANTIZATION_BITS:
        return int(text)
    raise ConfigError(
        f"{QUANTIZATION_ENV}={value!r} is not a valid MLX quantization: use "
        f"{' or '.join(map(str, QUANTIZATION_BITS))} (bits), or leave it unset for full-precision weights")


class MLXEmbedder(TransformerEmbedder):
    """Embeds with MLX (Metal on Apple Silicon; the slow reference-BLAS CPU build on Linux); offline only."""

    backend = "mlx"

    def __init__(self, info: ModelInfo, token_budget: int | None = None, max_batch: int | None = None,
                 quantization: int | str | None = None):
        """`quantization`: 4 or 8 bits, or None to read $LOCALMLX_QUANTIZATION (unset = float weights).

        Raises UnsupportedArchitectureError (before touching weights), ConfigError for a bad quantization,
        MLXNotAvailableError when mlx / mlx-embeddings are not installed.
        """
        super().__init__(info, token_budget=token_budget, max_batch=max_batch)
        reason = mlx_unsupported_reason(info)
        if reason:
            raise UnsupportedArchitectureError(reason)
        self.quantization: int | None = parse_quantization(
            quantization if quantization is not None else os.environ.get(QUANTIZATION_ENV))
        if not mlx_available():
            raise MLXNotAvailableError(
                "the MLX backend needs `mlx` and `mlx-embeddings` (pip install mlx mlx-embeddings on Apple Silicon; "
                "mlx[cpu] on Linux): not importable here. Use --backend sentence-transformers.")
        self._lock = threading.Lock()  # one forward at a time
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="woolocal-mlx")
        self._stream = None  # created on the worker thread, used only there

    @property
    def device(self) -> str:
        """Where MLX runs this model: "gpu" (Metal) or "cpu"."""
        return "gpu" if metal_available() else "cpu"

    def describe(self) -> dict:
        return {"backend": self.backend, "model": self.model_name, "device": self.device,
                "quantization": self.quantization}

    # -- everything below that touches MLX runs on the worker thread --------------------------------------------

    def _on_worker(self, fn, *args):
        return self._worker.submit(fn, *args).result()

    def _worker_stream(self):
        import mlx.core as mx

        if self._stream is None:
            self._stream = mx.new_stream(mx.default_device())
        return self._stream

    def _load(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import mlx.core as mx
        import mlx.nn as nn
        from mlx_embeddings.utils import load_model  # a local folder: no hub call (load() would snapshot_download)

        with mx.stream(self._worker_stream()):
            model = load_model(self.info.path)  # evaluates the weights (lazy=False), sets eval mode
            if self.quantization:
                group = QUANTIZATION_GROUP_SIZE[self.quantization]

                def quantizable(_path, module):  # Linear and Embedding layers whose rows split into groups
                    w = getattr(module, "weight", None)
                    return (hasattr(module, "to_quantized") and w is not None and w.ndim == 2
                            and w.shape[-1] % group == 0)

                nn.quantize(model, group_size=group, bits=self.quantization, class_predicate=quantizable)
                mx.eval(model.parameters())
        return model

    @cached_property
    def model(self):
        """The mlx-embeddings model, loaded on first use (quantized if asked)."""
        with self._lock:
            return self._on_worker(self._load)

    def load(self) -> "MLXEmbedder":
        """Load the weights now rather than on the first embedding."""
        _ = self.model
        return self

    def _run(self, model, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        with mx.stream(self._worker_stream()):
            out = model(
                mx.array(input_ids.astype(np.int32)),
                attention_mask=mx.array(attention_mask.astype(np.float32)),
                token_type_ids=mx.array(token_type_ids.astype(np.int32)),
            )
            hidden = out.last_hidden_state.astype(mx.float32)  # only this is evaluated (MLX is lazy)
            return np.array(hidden, copy=True)

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        model = self.model
        with self._lock:
            hidden = self._on_worker(self._run, model, input_ids, attention_mask, token_type_ids)
        if hidden.ndim != 3:
            raise UnsupportedArchitectureError(
                f"model {self.model_name}: mlx-embeddings returned hidden states of shape {hidden.shape}, not "
                "[batch, seq, hidden]. Use the sentence-transformers backend.")
        return hidden

    def close(self) -> None:
        """Stop the worker thread (the embedder cannot be used afterwards)."""
        self._worker.shutdown(wait=True)


__all__ = [
    "MLXEmbedder", "MLXNotAvailableError", "MLX_EMBEDDINGS_ARCHITECTURES", "QUANTIZATION_ENV",
    "SUPPORTED_ARCHITECTURES", "UnsupportedArchitectureError", "metal_available", "mlx_available", "mlx_supports",
    "mlx_unsupported_reason", "parse_quantization",
]
