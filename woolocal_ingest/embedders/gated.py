"""The int8 accuracy gate as a backend runs it (ONNX Runtime, OpenVINO): the calibration figures cached beside the
int8 file, the verdict (use int8, refuse, or fall back to float32) and the store-sample gate (`check_sample`).

A backend mixes `GatedInt8` in and provides `_fp32_vectors(texts)` (the float32 reference), `_int8_vectors(texts)`
(the quantized model) and `_use_fp32()` (switch to its float32 path); it sets `info`, `quantization`,
`on_gate_failure`, `gate_report` and `quantized_path`. Texts given to these hooks carry the document prefix already.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np

from woolocal_ingest.fsutil import write_text_atomic

log = logging.getLogger(__name__)


def file_stamp(path: Path, extra: tuple[Path, ...] = ()) -> dict:
    """Size and mtime of the int8 file (and of its companions, e.g. an OpenVINO .bin): a cached gate report is
    reused only for the very files it was measured on."""
    st = path.stat()
    out = {"int8_size": st.st_size, "int8_mtime_ns": st.st_mtime_ns}
    if extra:
        out["int8_companions"] = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in extra]
    return out


class GatedInt8:
    """Mixin: the accuracy gate of an int8 model against the backend's float32 reference."""

    def _fp32_vectors(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _int8_vectors(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _use_fp32(self) -> None:
        raise NotImplementedError

    def _annotate_gate(self, report) -> dict:
        """Backend figures added to a fresh calibration report; returns extra JSON for the cached report file."""
        return {}

    def _calibration_gate(self, report_file: Path, settings: dict, companions: tuple[Path, ...] = ()):
        """The gate figures of `self.quantized_path` on the packaged calibration texts: from `report_file` when it
        was written for these very files and texts, else measured now (and cached there)."""
        from woolocal_ingest.embedders.quantize import GateReport, calibration_texts, gate, texts_sha

        path = self.quantized_path
        texts = calibration_texts()
        stamp = file_stamp(path, companions)
        report = None
        try:
            saved = json.loads(report_file.read_text(encoding="utf-8"))
            if saved.get("calibration_sha") == texts_sha(texts) and all(saved.get(k) == v for k, v in stamp.items()):
                report = GateReport.from_dict(saved["report"])
        except (OSError, ValueError, KeyError, TypeError):
            report = None
        if report is None:  # first use of this int8 file: gate it against float32
            prefixed = [self.info.doc_prefix + t for t in texts]
            report = gate(self._fp32_vectors(prefixed), self._int8_vectors(prefixed), calibration=len(texts))
            extra = self._annotate_gate(report)
            with contextlib.suppress(OSError):
                write_text_atomic(report_file, json.dumps({
                    "calibration_sha": texts_sha(texts), **stamp, "settings": settings, "report": report.to_dict(),
                    **extra}))
        self.gate_report = report
        return report

    def _verdict(self, report, where: str = "") -> bool:
        """True: use int8. A failed gate raises QuantizationGateError, or - with on_gate_failure fp32 - marks the
        report as fallen back, sets `quantization` to None and returns False (the caller switches to float32)."""
        from woolocal_ingest.embedders.quantize import gate_error

        if report.passed:
            return True
        if self.on_gate_failure == "fp32":
            log.warning("int8 model of %s failed the accuracy gate%s (%s): falling back to float32",
                        self.info.name, where, "; ".join(report.failures))
            report.fell_back = True
            self.quantization = None
            return False
        raise gate_error(self.info.name, self.quantized_path, report)

    def check_sample(self, texts: list[str], limit: int = 128) -> None:
        """Gate the int8 model on a store's own texts too (up to `limit`, spread over the list); the figures join
        the calibration figures in `gate_report`. Raises QuantizationGateError (or falls back, as configured)."""
        from woolocal_ingest.embedders.quantize import gate

        self.load()
        if self.quantization != "int8" or not texts:
            return
        step = max(1, len(texts) // limit)
        sample = [self.info.doc_prefix + t for t in list(texts)[::step][:limit]]
        rep = gate(self._fp32_vectors(sample), self._int8_vectors(sample), calibration=0, store=len(sample))
        cal = self.gate_report
        if cal is not None:  # one report: the worse of the two sets for each figure
            rep.mean_cos = min(rep.mean_cos, cal.mean_cos)
            rep.min_cos = min(rep.min_cos, cal.min_cos)
            rep.top10_agreement = min(rep.top10_agreement, cal.top10_agreement)
            rep.texts = cal.texts
            rep.fp32_matmuls, rep.fp32_share = cal.fp32_matmuls, cal.fp32_share
            rep.failures = [f"calibration: {f}" for f in cal.failures] + [f"store sample: {f}" for f in rep.failures]
            rep.passed = not rep.failures
        self.gate_report = rep
        if not self._verdict(rep, " on the store's sample"):
            self._use_fp32()
