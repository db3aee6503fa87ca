"""The backend router: which local backend runs a model here (`pick_backend`), and loading it (`load_embedder`)."""

from __future__ import annotations

import platform
import sys

from woolocal_ingest.embedders.base import BackendChoice, Embedder
from woolocal_ingest.embedders.registry import ModelInfo, resolve_model
from woolocal_ingest.errors import ConfigError

BACKENDS = ("auto", "sentence-transformers", "onnx", "openvino", "mlx", "openai-compatible")
LOCAL_BACKENDS = ("sentence-transformers", "onnx", "openvino", "mlx")
INT8_BACKENDS = ("onnx", "openvino")  # int8 runs on ONNX Runtime or OpenVINO (both gated against float32)
# `auto` on a CPU without Metal runs the timed probe (embedders/probe.py). Without it (WOOLOCAL_PROBE=off, or no ONNX
# Runtime) the static default below holds, from bench/README.md (engine benchmark, 768 conda-docs chunks, 2 cores):
# token-budget batching gives sentence-transformers 40.95 chunks/s and ONNX Runtime 41.05 - a tie - while ONNX costs
# a one-time export (~6 s, +90 MB for MiniLM). So torch stays the default; ONNX is one flag away.
DEFAULT_CPU_BACKEND = "sentence-transformers"
DEFAULT_CPU_REASON = "torch is the CPU default (ONNX Runtime measured level with it)"


def _apple_metal() -> bool:
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return False
    try:
        from woolocal_ingest.embedders.mlx import metal_available

        return metal_available()
    except ImportError:
        return False


def _onnx_ok(info: ModelInfo) -> bool:
    try:
        from woolocal_ingest.embedders.onnx import ONNX_MODEL_TYPES, onnx_available
    except ImportError:
        return False
    return onnx_available() and info.model_type in ONNX_MODEL_TYPES


def openvino_ok(info: ModelInfo) -> bool:
    try:
        from woolocal_ingest.embedders.openvino import can_run
    except ImportError:
        return False
    return can_run(info)


def _mlx_ok(info: ModelInfo) -> bool:
    try:
        from woolocal_ingest.embedders.mlx import mlx_available, mlx_supports
    except ImportError:
        return False
    return mlx_available() and mlx_supports(info)


def backends_for(info: ModelInfo) -> list[str]:
    """The local backends that can run this model on this machine."""
    out = ["sentence-transformers"]
    if _onnx_ok(info):
        out.append("onnx")
    if openvino_ok(info):
        out.append("openvino")
    if _mlx_ok(info):
        out.append("mlx")
    return out


def pick_backend(info: ModelInfo, requested: str = "auto", quantization: str | None = None) -> BackendChoice:
    """Resolve `auto`: MLX on Apple Silicon with Metal (when mlx-embeddings has the architecture), else - on a CPU -
    the fastest backend a timed probe measured on this machine (cached; `embedders.probe`; int8 is a candidate only
    when `quantization` allows it), else the measured CPU default. An explicit backend is returned as asked (its
    own loader refuses what it cannot run). The choice carries `quantization` (None: float32)."""
    from woolocal_ingest.embedders.quantize import parse_quantization

    if requested not in BACKENDS:
        raise ConfigError(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    quant = parse_quantization(quantization)
    if quant == "int8" and requested not in ("auto", *INT8_BACKENDS):
        raise ConfigError(f"quantization int8 runs on the onnx or openvino backend (or auto), not backend {requested!r}")
    if requested != "auto":
        return BackendChoice(requested, "configured", quant)
    if _apple_metal():
        if _mlx_ok(info):
            return BackendChoice("mlx", "Apple Silicon with Metal")
        return BackendChoice("sentence-transformers",
                             f"mlx-embeddings cannot run model type {info.model_type!r}: routed to sentence-transformers")
    if _onnx_ok(info):
        from woolocal_ingest.embedders.probe import probe_enabled, probed_choice

        if probe_enabled():
            return probed_choice(info, allow_int8=quant == "int8")
    if quant == "int8":
        if not _onnx_ok(info):
            raise ConfigError(f"quantization int8 needs the onnx backend, which cannot run model {info.name} here "
                              "(onnxruntime, onnx and torch installed; a BERT-family model)")
        return BackendChoice("onnx", "auto with quantization int8: ONNX Runtime int8", quant)
    if DEFAULT_CPU_BACKEND == "onnx" and _onnx_ok(info):
        return BackendChoice("onnx", DEFAULT_CPU_REASON)
    return BackendChoice("sentence-transformers", "auto, no Metal here; " + DEFAULT_CPU_REASON)


def load_embedder(model: str | None = None, backend: str = "auto", batch_size: int = 32,
                  token_budget: int | None = None, quantization: str | None = None,
                  on_gate_failure: str = "refuse") -> Embedder:
    """A local embedder for `model` (a name or folder; None = the default) on `backend` (`auto` picks).
    `quantization`: None/"none" (float32; OpenVINO: its default precision) or "int8" (ONNX Runtime or OpenVINO, gated against float32: `embedders.quantize`);
    `on_gate_failure`: "refuse" or "fp32"."""
    info = resolve_model(model)
    choice = pick_backend(info, backend, quantization)
    if choice.backend == "openai-compatible":
        raise ConfigError("backend openai-compatible needs an endpoint: use embedder_for_purpose() with flows.yaml")
    emb: Embedder
    if choice.backend == "onnx":
        from woolocal_ingest.embedders.onnx import OnnxEmbedder

        emb = OnnxEmbedder(info, token_budget=token_budget, max_batch=batch_size, quantization=choice.quantization,
                           on_gate_failure=on_gate_failure)
    elif choice.backend == "openvino":
        from woolocal_ingest.embedders.openvino import OpenVinoEmbedder

        if not openvino_ok(info):
            raise ConfigError(f"backend openvino cannot run model {info.name} here (openvino, onnx and torch "
                              f"installed; a BERT-family model, not {info.model_type!r})")
        # `auto` picked it (the probe measured it in f32): f32, so a float store stays float32. Asked for by name:
        # OpenVINO's default precision (bf16 on CPUs with avx512_bf16 / AMX), which the store's identity records.
        emb = OpenVinoEmbedder(info, token_budget=token_budget, max_batch=batch_size,
                               quantization=choice.quantization, on_gate_failure=on_gate_failure,
                               precision="f32" if backend == "auto" else None)
    elif choice.backend == "mlx":
        from woolocal_ingest.embedders.mlx import MLXEmbedder

        emb = MLXEmbedder(info, token_budget=token_budget, max_batch=batch_size)
    else:
        from woolocal_ingest.embedders.sentence_transformers import SentenceTransformerEmbedder

        emb = SentenceTransformerEmbedder(info, batch_size=batch_size, token_budget=token_budget)
    emb.choice = choice  # type: ignore[attr-defined]
    return emb


def purpose_loader(model: str | None, backend: str, purpose) -> Embedder:
    """A local embedder for `model` on `backend` with a flows.yaml purpose's batch settings and precision (int8 runs
    on ONNX Runtime or OpenVINO only: a fallback backend without it runs float32). The one way purposes load local models."""
    quant = purpose.quantization if backend in ("auto", *INT8_BACKENDS) else None
    return load_embedder(model, backend=backend, batch_size=purpose.batch_size, token_budget=purpose.token_budget,
                         quantization=quant, on_gate_failure=purpose.on_gate_failure)
