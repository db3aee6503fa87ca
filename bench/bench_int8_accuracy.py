"""int8 vs float32 retrieval quality on the labelled conda set, question by question.

Three stores of conda-docs are ingested from the same chunks (a copy of the packaged all-MiniLM-L6-v2, ONNX Runtime):
float32, int8 with every MatMul quantized, int8 as shipped (mixed precision: `quantize.plan_mixed` leaves the
widest-ranged MatMuls in float32), and OpenVINO's NNCF int8 (when OpenVINO and NNCF are installed). Each is scored with `woolocal_ingest.eval` on `bench/conda/queries.tsv` (every
mode); the int8 arms are compared with float32 per question (paired: mean difference of nDCG@10 in points with a 95%
bootstrap interval, and how many questions differ) and vector by vector over every chunk of the store (cosine to
float32, top-10 neighbour agreement), besides the same figures on the packaged calibration texts.

    PYTHONPATH=. .venv/bin/python bench/bench_int8_accuracy.py [--json bench/results/int8_accuracy.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpora" / "conda-docs"
QUESTIONS = REPO / "bench" / "conda" / "queries.tsv"


def paired(ref: dict[str, float], got: dict[str, float], rounds: int = 10000, seed: int = 0) -> dict:
    """Mean of got - ref over the questions in nDCG points (x100), its 95% bootstrap interval, and how many
    questions differ (better / worse)."""
    q = sorted(ref)
    d = np.array([got[k] - ref[k] for k in q]) * 100
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(rounds, len(d)))].mean(1)
    return {"delta_points": round(float(d.mean()), 3),
            "ci95": [round(float(np.percentile(means, 2.5)), 3), round(float(np.percentile(means, 97.5)), 3)],
            "differ": int(np.count_nonzero(np.abs(d) > 1e-9)), "better": int((d > 1e-9).sum()),
            "worse": int((d < -1e-9).sum()), "questions": len(d)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/woolocal-bench-minilm",
                    help="a copy of the packaged MiniLM (made if missing): export and int8 files are written there")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "int8_accuracy.json"))
    ap.add_argument("--no-openvino", action="store_true", help="leave out the OpenVINO int8 arm")
    args = ap.parse_args()
    os.environ.setdefault("WOOLOCAL_PROBE", "off")

    from woolocal_ingest.api import open_store
    from woolocal_ingest.chunking import ChunkSettings
    from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from woolocal_ingest.embedders import resolve_model
    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.embedders.quantize import Int8Settings, calibration_texts, top_k_agreement
    from woolocal_ingest.eval import evaluate, load_eval_set
    from woolocal_ingest.ingest import run_ingest

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        shutil.copytree(resolve_model(None).path, model_dir, ignore=shutil.ignore_patterns(".onnx-cache"))
    info = resolve_model(str(model_dir))
    shipped = Int8Settings.for_this_cpu()
    arms = {
        "fp32": lambda: OnnxEmbedder(info),
        "int8, every MatMul": lambda: OnnxEmbedder(info, quantization="int8",
                                                   int8_settings=dataclasses.replace(shipped, target_min_cos=0.0)),
        "int8, shipped (mixed)": lambda: OnnxEmbedder(info, quantization="int8"),
    }
    if not args.no_openvino:
        from woolocal_ingest.embedders.openvino import nncf_available, openvino_available

        if openvino_available() and nncf_available():
            from woolocal_ingest.embedders.openvino import OpenVinoEmbedder

            arms["OpenVINO int8 (NNCF)"] = lambda: OpenVinoEmbedder(info, quantization="int8")
    data = load_eval_set(QUESTIONS)
    cal = calibration_texts()
    work = Path(tempfile.mkdtemp(prefix="int8-accuracy-"))
    out: dict = {"questions": len(data.judged), "load_avg_start": os.getloadavg(), "arms": {}}
    ref = None
    try:
        for n, (name, make) in enumerate(arms.items()):
            t = time.perf_counter()
            emb = make().load()
            load_s = time.perf_counter() - t
            t = time.perf_counter()
            s = run_ingest("conda", CORPUS, work / f"arm{n}", emb, ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
            ingest_s = time.perf_counter() - t
            store = open_store(s.store, embedder=emb)
            rep = evaluate(store, data)
            arm = {"load_s": round(load_s, 1), "ingest_s": round(ingest_s, 1), "chunks": s.count,
                   "ndcg_10": {m: v.ndcg_10 for m, v in rep.modes.items()},
                   "mrr_10": {m: v.mrr_10 for m, v in rep.modes.items()}}
            if getattr(emb, "gate_report", None) is not None:
                arm["gate"] = emb.gate_report.to_dict()
            cal_vecs = emb.embed_documents(cal)
            ids, vecs = [r[0] for r in store.rows], store.vectors()
            if ref is None:
                ref = {"cal": cal_vecs, "ids": ids, "vecs": vecs,
                       "scores": {m: v.ndcg_by_question for m, v in rep.modes.items()}}
            else:
                order = {rid: i for i, rid in enumerate(ids)}
                mine = vecs[[order[r] for r in ref["ids"]]]
                cos, ccos = (ref["vecs"] * mine).sum(1), (ref["cal"] * cal_vecs).sum(1)
                arm["chunks_vs_fp32"] = {"cos_min": round(float(cos.min()), 4), "cos_mean": round(float(cos.mean()), 4),
                                         "cos_p1": round(float(np.percentile(cos, 1)), 4),
                                         "top10": round(top_k_agreement(ref["vecs"], mine), 4)}
                arm["calibration_vs_fp32"] = {"cos_min": round(float(ccos.min()), 4),
                                              "cos_mean": round(float(ccos.mean()), 4),
                                              "top10": round(top_k_agreement(ref["cal"], cal_vecs), 4)}
                arm["paired_vs_fp32"] = {m: paired(ref["scores"][m], v.ndcg_by_question) for m, v in rep.modes.items()}
            out["arms"][name] = arm
            print(json.dumps({name: arm}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["load_avg_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
