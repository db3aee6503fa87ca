"""int8 quantization of an ONNX export, and the accuracy gate a quantized model must pass before it embeds anything.

Quantizer: ONNX Runtime's dynamic quantization (`onnxruntime.quantization.quantize_dynamic`): the weights of every
MatMul become per-channel signed int8 (QInt8), activations are quantized per batch at run time to uint8, and ORT's
CPU kernels (MLAS) run the U8S8 products with AVX-512 VNNI / AVX-VNNI / AMX where the CPU has them. Without VNNI the
AVX2 U8S8 path can saturate, so `reduce_range` (7-bit weights) is set there, as ORT's documentation advises. Only
MatMul is quantized: int8 Gather (the embedding tables) saves disk but not time and costs accuracy (measured on the
packaged MiniLM and calibration set: min cosine 0.984 with Gather, 0.987 without; top-10 agreement 0.918 vs 0.930).
OpenVINO was not measured (not installed here); see bench/README.md.

Mixed precision: dynamic int8 quantizes each MatMul's input activations per tensor, so one wide-ranged input (the
GELU output feeding a BERT layer's FFN down-projection holds channels ~100x its RMS) loses the most. The MatMuls are
ranked by that ratio (range / RMS of their input, measured on the calibration texts through float32), and the worst
are left in float32, one input at a time, until the calibration min cosine reaches `Int8Settings.target_min_cos`
(0.99, a margin above the gate's 0.98) or `max_fp32_share` of the MatMul weights are float32 (`plan_mixed`). For
the packaged MiniLM that is the FFN down-projections of layers 0-2: calibration min cosine 0.9855 -> 0.9916.

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
    target_min_cos: float = 0.99  # mixed precision: leave the widest-ranged MatMuls in float32 until this ...
    max_fp32_share: float = 0.25  # ... or until this share of the MatMul weights is float32

    @classmethod
    def for_this_cpu(cls) -> "Int8Settings":
        import onnxruntime

        return cls(reduce_range=not cpu_int8_features(), ort_version=onnxruntime.__version__)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {**asdict(self), "op_types": list(self.op_types), "method": "onnxruntime.quantize_dynamic"}


def quantize_int8(src: Path, dest: Path, settings: Int8Settings, fp32_nodes: Sequence[str] = ()) -> None:
    """Write the int8 model of the float32 export `src` to `dest` (callers give a temp path and rename it), leaving
    the MatMul nodes named in `fp32_nodes` in float32."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" warning on the root logger
    try:
        quantize_dynamic(str(src), str(dest), weight_type=getattr(QuantType, settings.weight_type),
                         per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                         op_types_to_quantize=list(settings.op_types), nodes_to_exclude=list(fp32_nodes),
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


@dataclass(frozen=True)
class MatMulGroup:
    """The MatMuls with constant weights that read one activation tensor (a layer's Q, K and V read the same one):
    dynamic quantization quantizes that tensor once for all of them, so they stay float32 together or not at all."""

    input: str
    nodes: tuple[str, ...]
    weights: int  # weight values of the group's MatMuls (their share of the work)


def matmul_groups(model_path: Path) -> list[MatMulGroup]:
    """The model's MatMuls with a constant 2-D weight, grouped by their input tensor, in graph order."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    groups: dict[str, list] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(dims.get(n.input[1], ())) == 2:
            groups.setdefault(n.input[0], []).append(n)
    return [MatMulGroup(x, tuple(n.name for n in nodes), sum(int(np.prod(dims[n.input[1]])) for n in nodes))
            for x, nodes in groups.items()]


def write_probe(src: Path, dest: Path, groups: Sequence[MatMulGroup]) -> None:
    """A copy of the float32 model `src` at `dest` that also outputs the groups' input tensors."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    for g in groups:
        model.graph.output.append(helper.make_tensor_value_info(g.input, TensorProto.FLOAT, None))
    onnx.save(model, str(dest))


def range_to_rms(x: np.ndarray) -> float:
    """The range a per-tensor uint8 quantization of `x` must cover (0 included), over the RMS of `x`: the larger,
    the fewer of the 256 levels typical values get."""
    x = np.asarray(x, np.float32)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / rms if rms > 0 else 0.0


@dataclass
class MixedPlan:
    """Which MatMuls stay float32, and the gate figures of each step that led there."""

    fp32_nodes: tuple[str, ...]
    fp32_share: float  # of the MatMul weights
    report: "GateReport"
    steps: list[dict] = field(default_factory=list)


def plan_mixed(groups: Sequence[MatMulGroup], ratios: dict[str, float], settings: Int8Settings,
               measure) -> MixedPlan:
    """Leave the groups with the widest input range (`ratios`: group input -> range/RMS) in float32, one at a time,
    until `measure(fp32_nodes) -> GateReport` (quantize with those nodes float32 and gate on the calibration texts)
    reaches `settings.target_min_cos`, or the next group would take the float32 share of the MatMul weights past
    `settings.max_fp32_share`. Returns the first plan that reaches the target, else the best min cosine measured
    (callers quantize that plan's nodes if it was not the last one measured)."""
    total = sum(g.weights for g in groups) or 1
    ranked = sorted(groups, key=lambda g: -ratios.get(g.input, 0.0))
    nodes: tuple[str, ...] = ()
    share = 0.0
    rep = measure(nodes)
    steps = [{"fp32_matmuls": 0, "fp32_share": 0.0, "min_cos": round(rep.min_cos, 5), "mean_cos": round(rep.mean_cos, 5)}]
    best = MixedPlan(nodes, share, rep, steps)
    for g in ranked:
        if rep.min_cos >= settings.target_min_cos:
            break
        if share + g.weights / total > settings.max_fp32_share + 1e-9:
            break
        nodes, share = nodes + g.nodes, share + g.weights / total
        rep = measure(nodes)
        steps.append({"fp32_matmuls": len(nodes), "fp32_share": round(share, 4), "min_cos": round(rep.min_cos, 5),
                      "mean_cos": round(rep.mean_cos, 5), "added": g.input})
        if rep.min_cos > best.report.min_cos or rep.min_cos >= settings.target_min_cos:
            best = MixedPlan(nodes, share, rep, steps)
    best.steps = steps
    return best


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
    fp32_matmuls: int = 0  # MatMuls left in float32 (mixed precision)
    fp32_share: float = 0.0  # their share of the MatMul weights

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("mean_cos", "min_cos", "top10_agreement", "fp32_share"):
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
    "GateReport", "GateThresholds", "Int8Settings", "MatMulGroup", "MixedPlan", "ON_GATE_FAILURE", "QUANTIZATIONS",
    "QuantizationGateError", "calibration_texts", "cpu_int8_features", "gate", "gate_error", "matmul_groups",
    "parse_quantization", "plan_mixed", "quantize_int8", "range_to_rms", "texts_sha", "top_k_agreement",
    "write_probe",
]
