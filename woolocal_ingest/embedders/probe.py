"""`backend: auto` on a CPU without Metal: a short timed probe, once per model and machine, picks the fastest backend.

Candidates: sentence-transformers (torch, float32), ONNX Runtime float32, OpenVINO f32 (when installed; f32, so that
`auto` keeps a float store float32) and - only when the purpose allows quantization (`quantization: int8`) - ONNX
Runtime int8 and OpenVINO int8, which must pass the accuracy gate first (`quantize`); a candidate that cannot load or
fails the gate is left out with its reason. Each embeds the same 48 texts of the packaged calibration set (after a
warm-up), the arms alternating, twice; the median rate decides. The result is cached in
`$XDG_CACHE_HOME/woolocal/probe.json` (default ~/.cache), keyed by the model's files, the machine (CPU model, cores
this process may use, onnxruntime, torch, openvino and nncf versions) and whether int8 was allowed (by its settings
key: how int8 is made), so later runs pay nothing. `WOOLOCAL_PROBE=off` skips the probe (the static CPU default, as
before; the test suite sets it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from woolocal_ingest.embedders.registry import ModelInfo
from woolocal_ingest.fsutil import write_text_atomic
from woolocal_ingest.state_dirs import user_cache_dir

log = logging.getLogger(__name__)

PROBE_ENV = "WOOLOCAL_PROBE"
PROBE_TEXTS = 48
ROUNDS = 2


@dataclass
class ProbeResult:
    """What the probe measured (texts/s per arm), what it picked, and why arms were left out."""

    backend: str
    quantization: str | None
    rates: dict[str, float] = field(default_factory=dict)  # arm -> texts/s
    excluded: dict[str, str] = field(default_factory=dict)  # arm -> why it was left out
    measured_at: float = 0.0

    @property
    def reason(self) -> str:
        rates = ", ".join(f"{k} {v:.1f}" for k, v in sorted(self.rates.items(), key=lambda kv: -kv[1]))
        out = f"auto probe on this machine (texts/s): {rates}"
        if self.excluded:
            out += "; left out: " + "; ".join(f"{k} ({v})" for k, v in self.excluded.items())
        return out


def probe_enabled() -> bool:
    return os.environ.get(PROBE_ENV, "on").strip().lower() not in ("0", "off", "false", "no")


def probe_cache_file() -> Path:
    return user_cache_dir() / "probe.json"


def machine_key() -> str:
    from woolocal_ingest.embedders.onnx import available_cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for dist in ("onnxruntime", "torch", "openvino", "nncf"):  # from the installed metadata: importing torch costs seconds
        try:
            versions.append(version(dist))
        except PackageNotFoundError:
            versions.append("-")
    raw = json.dumps([cpu, platform.machine(), available_cores(), *versions])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _cache_key(info: ModelInfo, allow_int8: bool) -> str:
    """The model's files, the machine and - when int8 competes - how int8 is made (another quantization setting,
    e.g. more float32 MatMuls, runs at another rate)."""
    if not allow_int8:
        return f"{info.files_sha256()[:16]}|{machine_key()}|int8=0"
    from woolocal_ingest.embedders.quantize import Int8Settings

    return f"{info.files_sha256()[:16]}|{machine_key()}|int8={Int8Settings.for_this_cpu().key}"


def _read_cache() -> dict:
    try:
        return json.loads(probe_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, result: ProbeResult) -> None:
    path = probe_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = asdict(result)
        write_text_atomic(path, json.dumps(data, indent=1))
    except OSError as e:  # a read-only home: the probe runs again next time
        log.warning("cannot cache the backend probe in %s: %s", path, e)


def run_probe(info: ModelInfo, allow_int8: bool, texts: list[str] | None = None) -> ProbeResult:
    """Time each candidate backend on `texts` (default: 48 calibration texts); the fastest wins."""
    from woolocal_ingest.embedders.openvino import can_run as openvino_ok
    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.embedders.quantize import calibration_texts
    from woolocal_ingest.embedders.sentence_transformers import SentenceTransformerEmbedder

    texts = texts or calibration_texts()[:PROBE_TEXTS]
    arms: dict[str, object] = {}
    excluded: dict[str, str] = {}
    makers = {"sentence-transformers": lambda: SentenceTransformerEmbedder(info),
              "onnx": lambda: OnnxEmbedder(info).load()}
    if openvino_ok(info):  # f32: `auto` keeps a float store float32 (bf16 only when openvino is asked for by name)
        makers["openvino"] = lambda: _openvino(info, precision="f32")
    if allow_int8:
        # ONNX Runtime's mixed-precision int8 only: OpenVINO's NNCF int8 is faster here (bench/README.md) but
        # measured -1.0 nDCG@10 points (dense, 95% interval excluding 0) and -0.44 (hybrid) against float32 on the
        # labelled conda set, outside the 0.3-point target; it runs only when asked for (`--backend openvino`)
        makers["onnx-int8"] = lambda: OnnxEmbedder(info, quantization="int8").load()
    for name, make in makers.items():
        try:
            emb = make()
            emb.embed_documents(texts[:8])  # warm-up: loads weights, builds sessions
            arms[name] = emb
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
            excluded[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not arms:
        raise RuntimeError(f"no backend could run {info.name}: {excluded}")
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(ROUNDS):  # alternating, so load from elsewhere hits every arm alike
        for name, emb in arms.items():
            t = time.perf_counter()
            emb.embed_documents(texts)
            times[name].append(time.perf_counter() - t)
    rates = {k: round(len(texts) / statistics.median(v), 2) for k, v in times.items()}
    best = max(rates, key=rates.get)
    backend, quant = (best.removesuffix("-int8"), "int8") if best.endswith("-int8") else (best, None)
    return ProbeResult(backend=backend, quantization=quant, rates=rates, excluded=excluded, measured_at=time.time())


def _openvino(info: ModelInfo, **kw):
    from woolocal_ingest.embedders.openvino import OpenVinoEmbedder

    return OpenVinoEmbedder(info, **kw).load()


def probed_choice(info: ModelInfo, allow_int8: bool):
    """The BackendChoice for `auto` here: the cached probe result for this model and machine, or a new probe."""
    from woolocal_ingest.embedders.base import BackendChoice

    key = _cache_key(info, allow_int8)
    cached = _read_cache().get(key)
    result = None
    if cached:
        try:
            result = ProbeResult(**cached)
        except TypeError:
            result = None
    if result is None:
        log.info("probing backends for %s on this machine (once)", info.name)
        result = run_probe(info, allow_int8)
        _write_cache(key, result)
    return BackendChoice(result.backend, result.reason, result.quantization)


__all__ = ["PROBE_ENV", "ProbeResult", "machine_key", "probe_cache_file", "probe_enabled", "probed_choice", "run_probe"]
