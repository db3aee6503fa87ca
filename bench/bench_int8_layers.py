"""Which MatMuls to leave in float32 when quantizing to int8: an exploration, not the shipped setting.

For each variant, the packaged MiniLM's ONNX export is quantized with ONNX Runtime dynamic int8 (per-channel QInt8,
MatMul weights only) leaving the named MatMuls in float32; the variant is compared with float32 on the package's
calibration texts (cosine, top-10 agreement, time of two passes) and conda-docs is ingested and scored with the
labelled questions (nDCG@10, dense and hybrid). The int8 file of each variant is cached under its own key.

    .venv/bin/python bench/bench_int8_layers.py all ffn_down ffn_down_attn_out ffn_down_layer0
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import woolocal_ingest.embedders.quantize as quantize  # noqa: E402

LAYERS = range(6)  # all-MiniLM-L6-v2
_P = "/inner/encoder/layer.{i}/{part}/MatMul"
VARIANTS = {
    "all": [],
    "ffn_down": [_P.format(i=i, part="output/dense") for i in LAYERS],
    "ffn_down_attn_out": [_P.format(i=i, part=p) for i in LAYERS for p in ("output/dense", "attention/output/dense")],
    "ffn_down_layer0": [_P.format(i=i, part="output/dense") for i in LAYERS]
    + [_P.format(i=0, part=p) for p in ("attention/self/query", "attention/self/key", "attention/self/value",
                                        "attention/output/dense", "intermediate/dense")],
}


def run(variant: str) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = VARIANTS[variant]
    base_key = quantize.Int8Settings.key

    quantize.Int8Settings.key = property(lambda self: base_key.fget(self) + "-" + variant)  # a file per variant

    def quantize_int8(src, dest, settings):
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=settings.reduce_range, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})

    quantize.quantize_int8 = quantize_int8
    from woolocal_ingest.api import open_store
    from woolocal_ingest.chunking import ChunkSettings
    from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from woolocal_ingest.embedders import load_embedder
    from woolocal_ingest.eval import evaluate, load_eval_set
    from woolocal_ingest.ingest import run_ingest

    emb = load_embedder(None, backend="onnx", quantization="int8")
    ref = load_embedder(None, backend="onnx")
    texts = quantize.calibration_texts()
    a, b = ref.embed_documents(texts), emb.embed_documents(texts)
    cos = (a * b).sum(1)
    t = time.perf_counter()
    emb.embed_documents(texts * 2)
    dt = time.perf_counter() - t
    work = Path(tempfile.mkdtemp(prefix="int8-layers-"))
    try:
        s = run_ingest("conda", REPO.parent / "shared" / "corpora" / "conda-docs", work, emb, ChunkSettings(),
                       DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
        rep = evaluate(open_store(s.store, embedder=emb), load_eval_set(REPO / "bench" / "conda" / "queries.tsv"),
                       modes=("dense", "hybrid")).to_dict()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"variant": variant, "fp32_matmuls": len(exclude), "cos_min": round(float(cos.min()), 4),
            "cos_mean": round(float(cos.mean()), 4), "top10": round(quantize.top_k_agreement(a, b), 4),
            "calibration_x2_s": round(dt, 2), "ndcg_10": {m: v["ndcg_10"] for m, v in rep["modes"].items()}}


if __name__ == "__main__":
    # one variant per process: the quantizer is patched per variant
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(run(sys.argv[2])))
    else:
        import subprocess

        for v in sys.argv[1:] or list(VARIANTS):
            out = subprocess.run([sys.executable, __file__, "--one", v], capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"{v}: failed\n{out.stderr[-2000:]}")
