"""int8 quantization of an ONNX export, and the accuracy gate a quantized model must pass before it embeds anything.

Quantizer: ONNX Runtime's dynamic quantization (`onnxruntime.quantization.quantize_dynamic`): the weights of every
MatMul become per-channel signed int8 (QInt8), activations are quantized per batch at run time to uint8, and ORT's
CPU kernels (MLAS) run the U8S8 products with AVX-512 VNNI / AVX-VNNI / AMX where the CPU has them. Without VNNI the
AVX2 U8S8 path can saturate, so `reduce_range` (7-bit weights) is set there, as ORT's documentation advises. Only
MatMul is quantized: int8 Gather (the embedding tables) saves disk but not time and costs accuracy (measured on the
packaged MiniLM and calibration set: min cosine 0.984 with Gather, 0.987 without; top-10 agreement 0.918 vs 0.930).
OpenVINO was not measured (not installed here); see bench/README.md.

Gate: the quantized model and the float32 export embed the same texts (the calibration set shipped in this package,
plus a store's own sample when there is one); the quantized model is used only if the mean cosine to float32 is at
least 0.99, the minimum at least 0.98, and the top-10 neighbours of every text among the others (self-retrieval)
agree on average at least 0.85 (the good quantization measures ~0.93; a broken one falls far below). A failure
raises `QuantizationGateError` with the figures, or - when asked (`on_gate_failure: fp32`) - the caller falls back
to float32. The figures go into the store's manifest (`model.quantization_gate`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from woolocal_ingest.errors import ConfigError, WoolocalError

QUANTIZATIONS = ("none", "int8")
ON_GATE_FAILURE = ("refuse", "fp32")
CALIBRATION_FILE = "calibration.jsonl"


class QuantizationGateError(WoolocalError):
    """The quantized model is too far from float32 on the calibration texts: it is not used."""

    def __init__(self, message: str, report: "GateReport"):
        super().__init__(message)
        self.report = report


def parse_quantization(value: str | None, key: str = "quantization") -> str | None:
    """`int8` -> "int8"; None, "", "none", "fp32" -> None (float weights). Anything else is a ConfigError naming `key`."""
    if value is None:
        return None
    v = str(value).strip().lower()
    if v in ("", "none", "fp32", "float32"):
        return None
    if v == "int8":
        return "int8"
    raise ConfigError(f"{key}: {value!r} is not one of {', '.join(QUANTIZATIONS)}")


@lru_cache(maxsize=1)
def cpu_int8_features() -> tuple[str, ...]:
    """The CPU's int8 dot-product extensions ORT's kernels use (Linux: from /proc/cpuinfo; elsewhere: none known)."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        return ()
    return tuple(f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags)


@dataclass(frozen=True)
class Int8Settings:
    """How a model is quantized; `key` names the cached file, so other settings never reuse a stale one."""

    weight_type: str = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul",)
    ort_version: str = ""

    @classmethod
    def for_this_cpu(cls) -> "Int8Settings":
        import onnxruntime

        return cls(reduce_range=not cpu_int8_features(), ort_version=onnxruntime.__version__)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {**asdict(self), "op_types": list(self.op_types), "method": "onnxruntime.quantize_dynamic"}


def quantize_int8(src: Path, dest: Path, settings: Int8Settings) -> None:
    """Write the int8 model of the float32 export `src` to `dest` (callers give a temp path and rename it)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" warning on the root logger
    try:
        quantize_dynamic(str(src), str(dest), weight_type=getattr(QuantType, settings.weight_type),
                         per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                         op_types_to_quantize=list(settings.op_types))
    finally:
        root.setLevel(level)


def calibration_texts() -> list[str]:
    """The calibration set shipped in this package (paragraphs of the sample project, queries, code, other languages)."""
    raw = resources.files("woolocal_ingest.embedders").joinpath(CALIBRATION_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def texts_sha(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class GateThresholds:
    mean_cos: float = 0.99
    min_cos: float = 0.98
    top10_agreement: float = 0.85


@dataclass
class GateReport:
    """How close the quantized model came to float32, and whether that is close enough."""

    mean_cos: float
    min_cos: float
    top10_agreement: float
    texts: int  # packaged calibration texts
    store_texts: int = 0  # texts of the store's own sample
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    fell_back: bool = False  # the gate failed and float32 was used instead (on_gate_failure: fp32)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("mean_cos", "min_cos", "top10_agreement"):
            d[k] = round(float(d[k]), 5)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GateReport":
        d = dict(d)
        d["thresholds"] = GateThresholds(**d.get("thresholds", {}))
        return cls(**d)

    def summary(self) -> str:
        return (f"mean cosine {self.mean_cos:.4f} (>= {self.thresholds.mean_cos}), min {self.min_cos:.4f} "
                f"(>= {self.thresholds.min_cos}), top-10 agreement {self.top10_agreement:.3f} "
                f"(>= {self.thresholds.top10_agreement}) on {self.texts} calibration + {self.store_texts} store texts")


def top_k_agreement(ref: np.ndarray, got: np.ndarray, k: int = 10) -> float:
    """Mean share of each text's k nearest other texts (by float32) that the quantized vectors also rank top k."""
    n = ref.shape[0]
    if n < 2:
        return 1.0
    k = min(k, n - 1)
    sa, sb = ref @ ref.T, got @ got.T
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    ta = np.argpartition(-sa, k - 1, axis=1)[:, :k]
    tb = np.argpartition(-sb, k - 1, axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ta, tb)]))


def gate(ref: np.ndarray, got: np.ndarray, calibration: int, store: int = 0,
         thresholds: GateThresholds = GateThresholds()) -> GateReport:
    """Compare quantized vectors `got` with float32 vectors `ref` (same texts, L2-normalised rows)."""
    cos = np.sum(np.asarray(ref, np.float64) * np.asarray(got, np.float64), axis=1)
    cos = np.nan_to_num(cos, nan=-1.0)  # a broken model that returns NaN fails, never passes
    rep = GateReport(mean_cos=float(cos.mean()), min_cos=float(cos.min()),
                     top10_agreement=top_k_agreement(ref, np.nan_to_num(got)), texts=calibration, store_texts=store,
                     thresholds=thresholds)
    if rep.mean_cos < thresholds.mean_cos:
        rep.failures.append(f"mean cosine {rep.mean_cos:.4f} < {thresholds.mean_cos}")
    if rep.min_cos < thresholds.min_cos:
        rep.failures.append(f"min cosine {rep.min_cos:.4f} < {thresholds.min_cos}")
    if rep.top10_agreement < thresholds.top10_agreement:
        rep.failures.append(f"top-10 agreement {rep.top10_agreement:.3f} < {thresholds.top10_agreement}")
    rep.passed = not rep.failures
    return rep


def gate_error(model: str, path: Path, rep: GateReport) -> QuantizationGateError:
    return QuantizationGateError(
        f"int8 model of {model} ({path}) failed the accuracy gate against float32: {'; '.join(rep.failures)} "
        f"({rep.summary()}). Refusing to embed with it: use quantization: none (--quantization none), or set "
        "on_gate_failure: fp32 on the purpose to fall back to float32.", rep)


__all__ = [
    "GateReport", "GateThresholds", "Int8Settings", "ON_GATE_FAILURE", "QUANTIZATIONS", "QuantizationGateError",
    "calibration_texts", "cpu_int8_features", "gate", "gate_error", "parse_quantization", "quantize_int8",
    "texts_sha", "top_k_agreement",
]
