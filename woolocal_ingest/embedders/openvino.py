"""OpenVINO backend (CPU): the ONNX backend's export compiled by OpenVINO, or an NNCF int8 model of it.

The export is `OnnxEmbedder`'s (`<model>/.onnx-cache/<sha16>/model.onnx`, made on first use); tokenising, batches,
pooling and normalisation come from `TransformerEmbedder`. The model is compiled for the CPU with the LATENCY hint
and `INFERENCE_NUM_THREADS` = the cores this process may use; one infer request, batches in turn (a lock keeps
threads from sharing it at once).

Precision: without quantization OpenVINO runs its default inference precision - bf16 on CPUs with avx512_bf16 or
AMX, else f32 (measured: bf16 cosine >= 0.999 to ORT float32 at 2.8x less CPU; bench/README.md). bf16 vectors are
not float32 vectors, so the embedder's `quantization` says "bf16" then (a store's identity keys on it: a store never
mixes them with float32 vectors); with f32 it is None.

int8 (`quantization="int8"`): NNCF post-training quantization (`nncf.quantize`, model_type TRANSFORMER) calibrated on
the packaged calibration texts (one text per sample), saved once as IR beside the export,
`model.ov-int8-<key>.xml/.bin` (key: openvino + nncf versions and the settings), built in a temp folder and renamed
into place under the folder's lock. It must pass the same accuracy gate as ONNX Runtime int8 against the ORT float32
export (`gated.GatedInt8`); on failure it is refused, or - `on_gate_failure="fp32"` - the export runs in f32.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from woolocal_ingest.embedders.base import TransformerEmbedder
from woolocal_ingest.embedders.gated import GatedInt8
from woolocal_ingest.embedders.onnx import ONNX_MODEL_TYPES, TMP_SUFFIX, OnnxEmbedder, find_or_build, onnx_available
from woolocal_ingest.embedders.registry import ModelInfo
from woolocal_ingest.errors import ConfigError
from woolocal_ingest.fsutil import fsync_dir

PRECISIONS = {"bf16": "bf16", "f16": "f16", "f32": None}  # OpenVINO's name -> the embedder's `quantization`


@lru_cache(maxsize=1)
def can_run(info: ModelInfo) -> bool:
    """OpenVINO can run this model here: it is installed and the model's architecture exports to ONNX."""
    return openvino_available() and info.model_type in ONNX_MODEL_TYPES


def openvino_available() -> bool:
    """True when OpenVINO's CPU plugin loads and the ONNX backend can export (torch, onnx, onnxruntime)."""
    try:
        import openvino as ov

        if "CPU" not in ov.Core().available_devices:
            return False
    except Exception:
        return False
    return onnx_available()


@lru_cache(maxsize=1)
def nncf_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


def _precision_name(value) -> str:
    """OpenVINO's element type (`<Type: 'bfloat16'>`, "bf16", "f32") as bf16 / f16 / f32."""
    s = str(getattr(value, "type_name", None) or value).lower()
    if "bf16" in s or "bfloat16" in s:
        return "bf16"
    if "f16" in s or "float16" in s:
        return "f16"
    return "f32"


@lru_cache(maxsize=1)
def default_precision() -> str:
    """The inference precision OpenVINO's CPU plugin uses here when not told (bf16 where the CPU has it)."""
    import openvino as ov

    return _precision_name(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))


def int8_settings() -> dict:
    """How the OpenVINO int8 model is made (its key names the cached IR)."""
    import nncf
    import openvino as ov

    from woolocal_ingest.embedders.quantize import calibration_texts, texts_sha

    return {"method": "nncf.quantize", "model_type": "TRANSFORMER", "openvino": ov.__version__,
            "nncf": nncf.__version__, "calibration_sha": texts_sha(calibration_texts()), "samples": "one text each"}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class OpenVinoEmbedder(GatedInt8, TransformerEmbedder):
    """Embeds with OpenVINO on the CPU, from the ONNX backend's export of a local sentence-transformers folder."""

    backend = "openvino"

    def __init__(self, info: ModelInfo, token_budget: int | None = None, max_batch: int | None = None,
                 threads: int | None = None, quantization: str | None = None, on_gate_failure: str = "refuse",
                 precision: str | None = None, writable=None):
        """`quantization`: None (OpenVINO's default precision, or `precision`: "f32", "bf16") or "int8";
        `on_gate_failure`: "refuse" or "fp32" (the export in f32)."""
        from woolocal_ingest.embedders.quantize import ON_GATE_FAILURE, parse_quantization

        super().__init__(info, token_budget=token_budget, max_batch=max_batch)
        if on_gate_failure not in ON_GATE_FAILURE:
            raise ConfigError(f"on_gate_failure: {on_gate_failure!r} is not one of {', '.join(ON_GATE_FAILURE)}")
        if precision is not None and precision not in PRECISIONS:
            raise ConfigError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.on_gate_failure = on_gate_failure
        # the export, and the float32 reference of the int8 gate (ONNX Runtime)
        self._onnx = OnnxEmbedder(info, token_budget=token_budget, max_batch=max_batch, threads=threads,
                                  writable=writable)
        self.threads = self._onnx.threads
        self._writable = self._onnx._writable
        quant = parse_quantization(quantization)
        self.precision = precision or default_precision()  # of what runs in float (all of it without int8)
        self.quantization = quant if quant == "int8" else PRECISIONS[self.precision]
        self.gate_report = None
        self.quantized_path: Path | None = None
        self.int8_key: str | None = None
        self._compiled = None
        self._request = None
        self._input_names: list[str] = []
        self._init_lock = threading.Lock()
        self._infer_lock = threading.Lock()

    # -- compiled model ------------------------------------------------------------------------------------------

    def _compile(self, model, precision: str | None = None):
        import openvino as ov

        cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads}
        if precision:
            cfg["INFERENCE_PRECISION_HINT"] = precision
        return ov.Core().compile_model(model, "CPU", cfg)

    def _use(self, compiled) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._input_names = [i.get_any_name() for i in compiled.inputs]
        actual = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.precision = actual  # what OpenVINO actually runs (the identity carries it through `quantization`)
        if self.quantization != "int8":
            self.quantization = PRECISIONS[actual]

    @property
    def onnx_path(self) -> Path:
        if self._onnx.onnx_path is None:
            self._onnx.load()
        return self._onnx.onnx_path

    def load(self) -> "OpenVinoEmbedder":
        """Export (or find) the model, quantize it when asked, compile it now rather than on the first embed."""
        if self._compiled is None:
            with self._init_lock:
                if self._compiled is None:
                    if self.quantization == "int8":
                        self._load_int8()
                    else:
                        self._use(self._compile(str(self.onnx_path), self._hint()))
        return self

    def _hint(self) -> str | None:
        return self.precision if self.precision != default_precision() else None

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        self.load()
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {n: np.ascontiguousarray(given[n], dtype=np.int64) for n in self._input_names}
        with self._infer_lock:
            self._request.infer(feed)
            return np.array(self._request.get_output_tensor(0).data, dtype=np.float32)

    # -- int8 ----------------------------------------------------------------------------------------------------

    def _build_int8(self, folder: Path, name: str) -> Path:
        """nncf.quantize the export into `folder/name` (+ .bin): saved in a temp folder there, .bin then .xml renamed
        into place (the .xml last: a reader never finds an .xml without its .bin)."""
        import nncf
        import openvino as ov

        from woolocal_ingest.embedders.quantize import calibration_texts

        core = ov.Core()
        model = core.read_model(str(self.onnx_path))
        names = {i.get_any_name() for i in model.inputs}
        samples = []
        for e in self._tokenizer.encode_batch([self.info.doc_prefix + t for t in calibration_texts()]):
            one = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
            samples.append({k: np.asarray([v], dtype=np.int64) for k, v in one.items() if k in names})
        q = nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(samples))
        tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        tmp.mkdir()
        try:
            ov.save_model(q, str(tmp / name), compress_to_fp16=False)
            final = folder / name
            for src in (tmp / name).with_suffix(".bin"), tmp / name:
                with open(src, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(src, folder / src.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder)
        return final

    def _load_int8(self) -> None:
        if not nncf_available():
            raise ConfigError("quantization int8 on the openvino backend needs nncf (pip install nncf)")
        settings = int8_settings()
        self.int8_key = settings_key(settings)
        name = f"model.ov-int8-{self.int8_key}.xml"
        src = self.onnx_path
        folders = [src.parent] + [d for d in (self._onnx_cache_dirs()) if d != src.parent]
        path, compiled = find_or_build(folders, name, lambda p: self._compile(str(p), self._hint()),
                                       lambda d: self._build_int8(d, name), self._writable,
                                       f"the OpenVINO int8 model of {self.info.name}")
        self.quantized_path = path
        self._use(compiled)
        report = self._calibration_gate(path.with_name(f"model.ov-int8-{self.int8_key}.{self.precision}.gate.json"),
                                        {**settings, "float_precision": self.precision},
                                        companions=(path.with_suffix(".bin"),))
        if not self._verdict(report):
            self._use_fp32()

    def _onnx_cache_dirs(self) -> list[Path]:
        from woolocal_ingest.embedders.onnx import cache_dirs

        return cache_dirs(self.info)

    def _fp32_vectors(self, texts: list[str]) -> np.ndarray:
        """The gate's reference: ONNX Runtime float32 on the same export, same batching and pooling."""
        return self._onnx._embed(texts)

    def _int8_vectors(self, texts: list[str]) -> np.ndarray:
        saved = self.real_tokens, self.padded_tokens
        try:
            return self._embed(texts)
        finally:
            self.real_tokens, self.padded_tokens = saved

    def _use_fp32(self) -> None:
        self.quantization = None
        self._use(self._compile(str(self.onnx_path), "f32"))
        self.quantization = None


__all__ = ["OpenVinoEmbedder", "can_run", "default_precision", "nncf_available", "openvino_available"]
