"""A model's identity as a store's manifest records it: what decides an embedder's vectors."""

from __future__ import annotations

from typing import Mapping

from woolocal_ingest.embedders.base import Embedder


def model_identity(embedder: Embedder) -> dict:
    """What decides an embedder's vectors, as a store's manifest records it (`model`): the model's facts, the sha256
    of its files, the backend and the precision (with the int8 gate's figures). Ingest and migrate use this one."""
    info = embedder.info
    if embedder.quantization == "int8":
        embedder.load()  # int8 is what it is only once gated (a failed gate may fall back to fp32)
    quant = embedder.quantization
    out = {**info.to_manifest(), "backend": embedder.backend, "files_sha256": info.files_sha256(),
           "quantization": str(quant) if quant else None}
    report = embedder.gate_report
    if report is not None:  # int8: how close it came to float32 (or that it failed and float32 was used)
        out["quantization_gate"] = report.to_dict()
    return out


def precision_of(model: Mapping) -> tuple[str | None, str | None]:
    """A store's vectors' precision, from a manifest's `model` (or a `model_identity`): the quantization and, when
    there is one (int8, bf16, MLX bits), the backend that made it - ONNX Runtime's int8 and OpenVINO's int8 are two
    different models' vectors. Vectors of one model's files mix in a store only when this agrees too."""
    q = model.get("quantization")
    return (str(q), model.get("backend")) if q else (None, None)


def precision_label(model: Mapping) -> str:
    """How a precision reads in messages: fp32, or e.g. int8 (onnx), bf16 (openvino), 4 (mlx)."""
    q, backend = precision_of(model)
    return f"{q} ({backend})" if q else "fp32"
