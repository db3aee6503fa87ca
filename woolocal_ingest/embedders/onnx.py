"""ONNX Runtime backend (CPU): the model's transformer exported once to ONNX, cached next to the model.

The export (torch's TorchScript-based exporter, `dynamo=False`: it needs only the `onnx` package, not onnxscript)
takes the folder's transformer (`AutoModel`, eval, float32, eager attention) with dynamic batch and sequence axes and one output,
`last_hidden_state`. Tokenising, token-budget batches, pooling, normalisation and input order come from
`TransformerEmbedder`.

Cache: `<model folder>/.onnx-cache/<sha16>/model.onnx`, where sha16 = `ModelInfo.files_sha256()[:16]`; when the model
folder cannot be written (site-packages owned by another user, a read-only mount), `$XDG_CACHE_HOME/woolocal/onnx/
<sha16>/model.onnx` (default `~/.cache`). The export is written to a temp file in the same folder, fsynced and
renamed into place, under an exclusive lock on `<sha16>/.lock`: a killed export leaves at most a temp file (never
read, removed by the next exporter), and a second process waits for the first and then loads its file. A cached
file that ONNX Runtime cannot load is exported again.

int8 (`quantization="int8"`): the export is quantized once by `quantize.quantize_int8` into
`<sha16>/model.int8-<settings key>.onnx` beside it (same lock, temp file and rename), so other model files or other
quantization settings never reuse it. On first use the int8 model must pass the accuracy gate against the float32
export (`quantize.gate`); the packaged calibration figures are cached in `model.int8-<key>.gate.json` (keyed by the
calibration texts too), a store's own sample is gated by `check_sample`. A failed gate raises QuantizationGateError,
or falls back to float32 with `on_gate_failure="fp32"` (then `quantization` is None and `gate_report.fell_back`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import secrets
import threading
import warnings
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from woolocal_ingest.embedders.base import TransformerEmbedder
from woolocal_ingest.embedders.gated import GatedInt8
from woolocal_ingest.embedders.registry import ModelInfo
from woolocal_ingest.errors import ConfigError
from woolocal_ingest.fsutil import fsync_dir
from woolocal_ingest.state_dirs import user_cache_dir

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".onnx-cache"
MODEL_FILENAME = "model.onnx"
OPSET = 17  # LayerNormalization is a native op from 17 on: ORT fuses it
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
TMP_SUFFIX = ".tmp"
# Architectures torch.onnx.export handles through transformers' AutoModel here (BERT family, MPNet, XLM-R...).
ONNX_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "camembert"}


@lru_cache(maxsize=1)
def onnx_available() -> bool:
    """True when this machine can run this backend: onnxruntime with its CPU provider, and torch + onnx to export."""
    import importlib.util

    try:
        import onnxruntime as ort

        if "CPUExecutionProvider" not in ort.get_available_providers():
            return False
    except Exception:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "onnx", "transformers"))


def available_cores() -> int:
    """CPU cores this process may run on (affinity / cgroup cpusets respected where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def xdg_cache_root() -> Path:
    """Where exports go when the model's folder is read-only: the user's cache directory."""
    return user_cache_dir() / "onnx"


def dir_writable(path: Path) -> bool:
    """Whether `path` (or, if it does not exist yet, its nearest existing parent) can be written by this process."""
    p = Path(path)
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def cache_dirs(info: ModelInfo) -> list[Path]:
    """Where an export of this model may live, in the order they are tried: next to the model, then the XDG cache."""
    key = info.files_sha256()[:16]
    return [Path(info.path) / CACHE_DIRNAME / key, xdg_cache_root() / key]


def export_onnx(model_dir: Path, dest: Path, opset: int = OPSET) -> list[str]:
    """Export the folder's transformer to `dest` (written in place: callers give a temp path). Returns input names."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:  # plain attention ops: ORT fuses them better than the SDPA graph (about 10% less CPU for MiniLM here)
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    except (ValueError, TypeError):
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    model = model.float().eval()
    params = inspect.signature(model.forward).parameters
    names = [n for n in INPUT_NAMES if n in params]
    if "input_ids" not in names or "attention_mask" not in names:
        raise RuntimeError(f"{model_dir}: {type(model).__name__}.forward takes no input_ids/attention_mask")

    class LastHidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            out = self.inner(**dict(zip(names, args)))
            return out[0] if isinstance(out, tuple) else out.last_hidden_state

    # A dummy batch with padding in it, so that no "mask is all ones" shortcut is traced into the graph.
    seq = 16
    ids = torch.full((2, seq), 101, dtype=torch.long)
    mask = torch.ones((2, seq), dtype=torch.long)
    mask[1, seq // 2 :] = 0
    ids = ids * mask
    dummy = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, OUTPUT_NAME]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LastHidden(model), tuple(dummy[n] for n in names), str(dest), input_names=names,
            output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
            dynamo=False,
        )
    return names


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on `folder/.lock` (no-op where fcntl is missing); yields whether it is held."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename still keeps a half file out of model.onnx
        yield False
        return
    with open(folder / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_export_atomically(model_dir: Path, folder: Path, exporter=export_onnx, filename: str = MODEL_FILENAME) -> Path:
    """Export into a temp file in `folder`, fsync it, rename it to `folder/<filename>`. Returns the final path.
    `exporter(src, dest)` writes the file (the ONNX export of a model folder, or the int8 model of an export)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / filename
    tmp = folder / f".{filename}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        exporter(model_dir, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(folder)
    return final


def find_or_build(folders: list[Path], name: str, load, build, writable=dir_writable, what: str = "a derived model"):
    """`(path, load(path))` of a model file derived from an export (int8 ONNX, OpenVINO IR): the first of `folders`
    holding a `name` that loads, else built in the first writable folder by `build(folder) -> path` (atomic: a temp
    file renamed into place) under that folder's lock; temp files there are leftovers of killed builds and go."""
    for d in folders:
        if (d / name).is_file():
            try:
                return d / name, load(d / name)
            except Exception as e:  # truncated / corrupt file: build it again
                log.warning("cached %s %s cannot be loaded (%s): building it again", what, d / name,
                            str(e).splitlines()[0])
    errors = []
    for d in folders:
        if not writable(d):
            errors.append(f"{d}: not writable")
            continue
        try:
            d.mkdir(parents=True, exist_ok=True)
            with _locked(d) as held:
                final = d / name
                if final.is_file():  # another process built it while this one waited for the lock
                    with contextlib.suppress(Exception):
                        return final, load(final)
                if held:
                    for stale in d.glob(f".{name}.*{TMP_SUFFIX}"):
                        with contextlib.suppress(OSError):
                            if stale.is_dir():
                                import shutil

                                shutil.rmtree(stale)
                            else:
                                stale.unlink()
                log.info("building %s in %s", what, d)
                final = build(d)
        except OSError as e:
            errors.append(f"{d}: {e}")
            continue
        return final, load(final)
    raise OSError(f"no writable cache for {what}: " + "; ".join(errors))


class OnnxEmbedder(GatedInt8, TransformerEmbedder):
    """Embeds with ONNX Runtime on the CPU, from an ONNX export of a local sentence-transformers folder."""

    backend = "onnx"

    def __init__(self, info: ModelInfo, token_budget: int | None = None, max_batch: int | None = None,
                 threads: int | None = None, writable=None, exporter=None, quantization: str | None = None,
                 on_gate_failure: str = "refuse", int8_settings=None):
        """`threads`: intra-op threads (default: the cores this process may use). `writable(path) -> bool` and
        `exporter(model_dir, dest)` replace `dir_writable` and `export_onnx` (tests, tools). `quantization`: None
        (float32) or "int8"; `on_gate_failure`: "refuse" (raise QuantizationGateError) or "fp32" (fall back);
        `int8_settings`: a `quantize.Int8Settings` other than `Int8Settings.for_this_cpu()` (benchmarks, tests)."""
        from woolocal_ingest.embedders.quantize import ON_GATE_FAILURE, parse_quantization

        super().__init__(info, token_budget=token_budget, max_batch=max_batch)
        self.quantization = parse_quantization(quantization)
        if on_gate_failure not in ON_GATE_FAILURE:
            raise ConfigError(f"on_gate_failure: {on_gate_failure!r} is not one of {', '.join(ON_GATE_FAILURE)}")
        self.on_gate_failure = on_gate_failure
        self.gate_report = None  # quantize.GateReport once an int8 model was gated
        self.quantized_path: Path | None = None
        self._fp32_session = None
        self._int8_session = None  # the int8 session while it is gated
        self.threads = threads or available_cores()
        self._writable = writable or dir_writable
        self._exporter = exporter or export_onnx
        self._init_lock = threading.Lock()
        self.exported = False  # whether this instance ran the export (False: it loaded a cached one)
        self.onnx_path: Path | None = None
        self._session = None
        self._observe = None  # (tensor names, callback): extra outputs of a probe model (int8 planning)
        self.mixed_plan = None  # quantize.MixedPlan when this instance quantized the model
        self.int8_settings = int8_settings

    # -- session -------------------------------------------------------------------------------------------------

    def _new_session(self, path: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])

    def _try_load(self, path: Path):
        if not path.is_file():
            return None
        try:
            return self._new_session(path)
        except Exception as e:  # truncated / corrupt protobuf, wrong graph: not usable
            log.warning("cached ONNX export %s cannot be loaded (%s): exporting again", path, str(e).splitlines()[0])
            return None

    def _load_or_export(self):
        dirs = cache_dirs(self.info)
        for d in dirs:  # an export already there (the model folder may be read-only and still ship one)
            sess = self._try_load(d / MODEL_FILENAME)
            if sess is not None:
                self.onnx_path = d / MODEL_FILENAME
                return sess
        errors = []
        for d in dirs:
            if not self._writable(d):
                errors.append(f"{d}: not writable")
                continue
            try:
                d.mkdir(parents=True, exist_ok=True)
                with _locked(d) as held:
                    sess = self._try_load(d / MODEL_FILENAME)  # another process may have finished meanwhile
                    if sess is None:
                        if held:  # under the lock, temp files are leftovers of killed exports
                            for stale in d.glob(f".{MODEL_FILENAME}.*{TMP_SUFFIX}"):
                                with contextlib.suppress(OSError):
                                    stale.unlink()
                        log.info("exporting %s to ONNX in %s", self.info.name, d)
                        path = write_export_atomically(self.info.path, d, self._exporter)
                        self.exported = True
                        sess = self._new_session(path)
            except OSError as e:  # read-only mount, permissions the check could not see, disk full
                errors.append(f"{d}: {e}")
                continue
            self.onnx_path = d / MODEL_FILENAME
            return sess
        raise OSError(f"no writable ONNX cache for {self.info.name}: " + "; ".join(errors))

    @property
    def session(self):
        """The ONNX Runtime session (exported or found on first use; one export per instance, thread-safe)."""
        if self._session is None:
            with self._init_lock:
                if self._session is None:
                    sess = self._load_or_export()
                    if self.quantization == "int8":
                        self._fp32_session = sess
                        sess = self._load_int8()
                        self._fp32_session = None  # float32 is needed again only to gate a store's sample
                    self._session = sess
        return self._session

    @cached_property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def load(self) -> "OnnxEmbedder":
        """Export (or find) and load the model now rather than on the first embed."""
        _ = self.input_names
        return self

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {n: np.ascontiguousarray(given[n], dtype=np.int64) for n in self.input_names}
        if self._observe is not None:  # the int8 planner's probe: extra outputs, handed to its observer
            names, observe = self._observe
            outs = self.session.run([OUTPUT_NAME, *names], feed)
            observe(dict(zip(names, outs[1:])))
            return outs[0]
        return self.session.run([OUTPUT_NAME], feed)[0]

    # -- int8 ----------------------------------------------------------------------------------------------------

    def _quantize_into(self, settings):
        """The int8 model's path and session: found beside the export (or in the XDG cache when the export's folder
        is read-only), else quantized there now (also when a cached file does not load)."""
        name = f"model.int8-{settings.key}.onnx"
        src = self.onnx_path

        def build(d: Path) -> Path:
            return write_export_atomically(src, d, lambda s_, dest: self._quantize_mixed(s_, dest, settings),
                                           filename=name)

        return find_or_build([src.parent] + [d for d in cache_dirs(self.info) if d != src.parent], name,
                             self._new_session, build, self._writable, f"the int8 model of {self.info.name}")

    def _quantize_mixed(self, src: Path, dest: Path, settings) -> None:
        """Quantize `src` into `dest` with the widest-ranged MatMuls left in float32 as `quantize.plan_mixed`
        decides, measuring each candidate against float32 on the calibration texts."""
        from woolocal_ingest.embedders.quantize import (
            calibration_texts, gate, matmul_groups, plan_mixed, quantize_int8, write_probe,
        )

        texts = [self.info.doc_prefix + t for t in calibration_texts()]
        groups = matmul_groups(src)
        probe = dest.with_name(dest.name.removesuffix(TMP_SUFFIX) + ".probe" + TMP_SUFFIX)  # a temp file too
        try:
            write_probe(src, probe, groups)
            ratios = self._input_ranges(self._new_session(probe), [g.input for g in groups], texts)
        finally:
            with contextlib.suppress(FileNotFoundError):
                probe.unlink()
        ref = self._fp32_vectors(texts)
        measured: list[tuple] = []

        def measure(nodes):
            quantize_int8(src, dest, settings, nodes)
            measured.append(nodes)
            return gate(ref, self._with_session(self._new_session(dest), texts), calibration=len(texts))

        plan = plan_mixed(groups, ratios, settings, measure)
        if measured[-1] != plan.fp32_nodes:  # the best plan was not the last one measured
            quantize_int8(src, dest, settings, plan.fp32_nodes)
        self.mixed_plan = plan
        log.info("int8 model of %s: %d MatMuls (%.0f%% of the weights) kept in float32, calibration min cosine "
                 "%.4f", self.info.name, len(plan.fp32_nodes), 100 * plan.fp32_share, plan.report.min_cos)

    def _input_ranges(self, probe, names: list[str], texts: list[str]) -> dict[str, float]:
        """Median over the calibration batches of each tensor's range / RMS (`quantize.range_to_rms`), as the
        per-batch dynamic quantization sees it."""
        from woolocal_ingest.embedders.quantize import range_to_rms

        seen: dict[str, list[float]] = {n: [] for n in names}

        def observe(outputs: dict) -> None:
            for n in names:
                seen[n].append(range_to_rms(outputs[n]))

        self._observe = (names, observe)
        try:
            self._with_session(probe, texts)
        finally:
            self._observe = None
        return {n: float(np.median(v)) if v else 0.0 for n, v in seen.items()}

    def _fp32_vectors(self, texts: list[str]) -> np.ndarray:
        """Float32 vectors of `texts` through the float32 export (the gate's reference), same batching and pooling."""
        sess = self._fp32_session or self._new_session(self.onnx_path)
        return self._with_session(sess, texts)

    def _with_session(self, sess, texts: list[str]) -> np.ndarray:
        saved, real, padded = self._session, self.real_tokens, self.padded_tokens
        self._session = sess
        try:
            return self._embed(texts)
        finally:
            self._session, self.real_tokens, self.padded_tokens = saved, real, padded

    def _int8_vectors(self, texts: list[str]) -> np.ndarray:
        return self._with_session(self._session or self._int8_session, texts)

    def _use_fp32(self) -> None:
        self._session = self._fp32_session or self._new_session(self.onnx_path)

    def _annotate_gate(self, report) -> dict:
        from woolocal_ingest.embedders.quantize import matmul_groups

        kept, every = matmul_groups(self.quantized_path), matmul_groups(self.onnx_path)  # what stayed float32
        report.fp32_matmuls = sum(len(g.nodes) for g in kept)
        report.fp32_share = sum(g.weights for g in kept) / max(1, sum(g.weights for g in every))
        return {"mixed_precision_steps": self.mixed_plan.steps if self.mixed_plan is not None else None}

    def _load_int8(self):
        from woolocal_ingest.embedders.quantize import Int8Settings

        settings = self.int8_settings or Int8Settings.for_this_cpu()
        path, sess = self._quantize_into(settings)
        self.quantized_path = path
        self.quant_settings = settings
        self._int8_session = sess
        try:
            report = self._calibration_gate(path.parent / f"model.int8-{settings.key}.gate.json", settings.to_dict())
        finally:
            self._int8_session = None
        if self._verdict(report):
            return sess
        return self._fp32_session or self._new_session(self.onnx_path)
