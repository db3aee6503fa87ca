"""OpenVINO vs ONNX Runtime on this CPU (issue 13: "ONNX Runtime dynamic int8 with the right kernels for the CPU, or
OpenVINO if it measures faster"): fp32, bf16 and int8 arms, in one run, arms alternating.

OpenVINO and NNCF are not dependencies of the project; they live in a side venv that sees the project's packages:

    python3 -m venv /tmp/ov-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/ov-venv/lib/python3.11/site-packages/woolocal-main.pth
    /tmp/ov-venv/bin/pip install openvino nncf          # measured with openvino 2026.4.1, nncf 3.4.0, ORT 1.32.0
    WOOLOCAL_PROBE=off PYTHONPATH=. /tmp/ov-venv/bin/python bench/bench_openvino.py --rebuild-int8   # the run quoted

Options (defaults in brackets are the paths used on the 2-core box):

    WOOLOCAL_PROBE=off PYTHONPATH=. /tmp/ov-venv/bin/python bench/bench_openvino.py [--rounds 3] [--threads 2]
        [--model-dir /tmp/woolocal-bench-minilm] [--onnx <model-dir>/.onnx-cache/<sha16>/model.onnx]
        [--ort-int8 /tmp/q/models/dyn.onnx] [--texts /tmp/q/conda512.jsonl] [--ov-int8 /tmp/q/models/ov-nncf-int8.xml]
        [--rebuild-int8] [--hint-texts 128] [--arms ort-fp32,ort-int8,...]

Every arm embeds the same texts the same way: tokenised once with the model's own tokenizer (truncation at the model's
max_tokens, the package's document prefix), token-budget batches (8192 padded tokens, <= 128 texts, sorted by length:
the package's default), mean pooling + L2 normalisation with the package's functions. What is timed per pass: the
forward passes of all batches plus pooling (tokenising is the same for every arm and is reported once).

Arms (all with `--threads` threads):
  ort-fp32     ONNX Runtime, the float32 export (session options as OnnxEmbedder's): the reference for accuracy
  ort-int8     ONNX Runtime, the shipped int8 model (quantize_dynamic, per-channel QInt8 MatMul weights)
  ort-*-2s     the same two ORT models run like OpenVINO's THROUGHPUT hint: 2 batches at a time, 1 thread each
  ov-f32       OpenVINO, the same model.onnx, INFERENCE_PRECISION_HINT=f32 (true float32)
  ov-default   OpenVINO, the same model.onnx, default precision (bf16 on CPUs with avx512_bf16/AMX: see the JSON)
  ov-int8      OpenVINO, NNCF post-training static quantization (nncf.quantize, model_type=TRANSFORMER, calibrated on
               the package's calibration texts), default precision for what stays in float (bf16 where supported)
  ov-int8-f32  the same int8 model with INFERENCE_PRECISION_HINT=f32
  ov-wc8       OpenVINO, nncf.compress_weights (int8 weights only, activations float), INFERENCE_PRECISION_HINT=f32

OpenVINO performance hint: before the main run, for every OpenVINO arm, LATENCY (1 stream, synchronous requests) and
THROUGHPUT (the plugin's streams, an AsyncInferQueue over the batches) alternate on `--hint-texts` texts; the faster
one is used in the main run (both figures are in the JSON).

Main run: one warm-up pass per arm (its vectors are the ones compared), then `--rounds` rounds, arms alternating
within every round; median seconds per arm, texts/s, ratio to ort-fp32. Accuracy vs ort-fp32: cosine min/mean and
top-10 self-retrieval agreement (woolocal_ingest.embedders.quantize.top_k_agreement) on the texts and on the
package's calibration texts (note: the NNCF int8 model is calibrated on those, so for it they are in-sample).
One-time cost of the OpenVINO int8 model (read + nncf.quantize + save) is measured when it is built (kept in a
sidecar .json next to the .xml; `--rebuild-int8` builds it again).
Writes bench/results/openvino.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODEL_DIR = "/tmp/woolocal-bench-minilm"
ORT_INT8 = "/tmp/q/models/dyn.onnx"
TEXTS = "/tmp/q/conda512.jsonl"
OV_INT8 = "/tmp/q/models/ov-nncf-int8.xml"
OV_WC8 = "/tmp/q/models/ov-wc-int8.xml"
ALL_ARMS = ("ort-fp32", "ort-int8", "ort-fp32-2s", "ort-int8-2s", "ov-f32", "ov-default", "ov-int8", "ov-int8-f32",
            "ov-wc8")


def cpu_flags() -> list[str]:
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in want if f in have]
    except OSError:
        pass
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class Batches:
    """The texts tokenised once, cut into the package's token-budget batches (numpy int64 arrays)."""

    def __init__(self, emb, texts: list[str]):
        from woolocal_ingest.embedders.batching import padded_inputs, token_budget_batches

        t = time.perf_counter()
        enc = emb._tokenizer.encode_batch([emb.info.doc_prefix + s for s in texts])
        self.tokenise_s = time.perf_counter() - t
        lengths = [len(e.ids) for e in enc]
        plan = token_budget_batches(lengths, emb.token_budget, emb.max_batch)
        self.plan, self.n, self.tokens = plan, len(texts), sum(lengths)
        self.items = []
        for batch in plan.batches:
            ids, mask, types = padded_inputs(enc, batch)
            self.items.append((batch, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}))


def pooled(hidden, mask, mode: str) -> np.ndarray:
    from woolocal_ingest.embedders.base import l2_normalise, pool

    return l2_normalise(pool(np.asarray(hidden, dtype=np.float32), mask, mode))


class OrtArm:
    """streams=1: one session with emb.threads intra-op threads, batches in turn (what OnnxEmbedder does);
    streams=N: one session with 1 intra-op thread, N batches at a time from N Python threads (ORT's counterpart of
    OpenVINO's THROUGHPUT streams)."""

    def __init__(self, emb, path: Path, streams: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        threads = emb.threads
        if streams > 1:
            emb.threads = 1
        try:
            self.sess = emb._new_session(path)  # OnnxEmbedder's session options
        finally:
            emb.threads = threads
        self.names = [i.name for i in self.sess.get_inputs()]
        self.out_name = self.sess.get_outputs()[0].name
        self.mode, self.dim = emb.info.pooling, emb.dim
        self.hint = "-" if streams == 1 else f"{streams} streams x 1 thread"
        self.pool = ThreadPoolExecutor(streams) if streams > 1 else None

    def run(self, b: Batches) -> np.ndarray:
        out = np.zeros((b.n, self.dim), dtype=np.float32)

        def one(item):
            idx, feed = item
            h = self.sess.run([self.out_name], {n: feed[n] for n in self.names})[0]
            out[idx] = pooled(h, feed["attention_mask"], self.mode)

        if self.pool:
            list(self.pool.map(one, b.items))
        else:
            for item in b.items:
                one(item)
        return out


class OvArm:
    """A compiled OpenVINO model; LATENCY: one synchronous request; THROUGHPUT: an AsyncInferQueue over the batches."""

    def __init__(self, core, model, emb, threads: int, hint: str, precision: str | None):
        import openvino as ov

        cfg = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads}
        if precision:
            cfg["INFERENCE_PRECISION_HINT"] = precision
        t = time.perf_counter()
        self.compiled = core.compile_model(model, "CPU", cfg)
        self.compile_s = time.perf_counter() - t
        self.hint = hint
        self.names = [i.get_any_name() for i in self.compiled.inputs]
        self.mode, self.dim = emb.info.pooling, emb.dim
        self.props = {k: str(self.compiled.get_property(k)) for k in
                      ("INFERENCE_PRECISION_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS",
                       "OPTIMAL_NUMBER_OF_INFER_REQUESTS")}
        if hint == "LATENCY":
            self.req = self.compiled.create_infer_request()
        else:
            self.queue = ov.AsyncInferQueue(self.compiled, int(self.compiled.get_property(
                "OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    def run(self, b: Batches) -> np.ndarray:
        out = np.zeros((b.n, self.dim), dtype=np.float32)
        if self.hint == "LATENCY":
            for idx, feed in b.items:
                self.req.infer({n: feed[n] for n in self.names})
                out[idx] = pooled(self.req.get_output_tensor(0).data, feed["attention_mask"], self.mode)
            return out

        def done(request, k):
            idx, feed = b.items[k]
            out[idx] = pooled(request.get_output_tensor(0).data, feed["attention_mask"], self.mode)

        self.queue.set_callback(done)
        for k, (_, feed) in enumerate(b.items):
            self.queue.start_async({n: feed[n] for n in self.names}, k)
        self.queue.wait_all()
        return out


def calibration_samples(emb, texts: list[str]) -> list[dict]:
    """One sample per calibration text (batch of 1, no padding), tokenised like the arms."""
    out = []
    for e in emb._tokenizer.encode_batch([emb.info.doc_prefix + s for s in texts]):
        ids = np.asarray([e.ids], dtype=np.int64)
        out.append({"input_ids": ids, "attention_mask": np.asarray([e.attention_mask], dtype=np.int64),
                    "token_type_ids": np.asarray([e.type_ids], dtype=np.int64)})
    return out


def build_ov_int8(core, onnx: Path, dest: Path, samples: list[dict], rebuild: bool, kind: str) -> dict:
    """NNCF int8 model of the float32 export (kind "ptq": nncf.quantize; "wc": nncf.compress_weights), saved as IR with
    float constants kept float32; returns its one-time cost (from the sidecar when reused)."""
    import nncf
    import openvino as ov

    side = dest.with_suffix(".json")
    if dest.is_file() and side.is_file() and not rebuild:
        return {**json.loads(side.read_text()), "reused": True}
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = core.read_model(str(onnx))
    t1 = time.perf_counter()
    if kind == "ptq":
        q = nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(samples))
    else:
        q = nncf.compress_weights(model)  # default: INT8_ASYM, weights only
    t2 = time.perf_counter()
    ov.save_model(q, str(dest), compress_to_fp16=False)
    t3 = time.perf_counter()
    cost = {"kind": kind, "method": ("nncf.quantize(model_type=TRANSFORMER, subset_size=%d calibration texts)"
                                     % len(samples)) if kind == "ptq" else "nncf.compress_weights (INT8_ASYM)",
            "read_s": round(t1 - t0, 2), "quantize_s": round(t2 - t1, 2), "save_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "bin_mb": round(dest.with_suffix(".bin").stat().st_size / 1e6, 1),
            "nncf": nncf.__version__, "openvino": ov.__version__}
    side.write_text(json.dumps(cost, indent=1))
    return {**cost, "reused": False}


def accuracy(ref: np.ndarray, got: np.ndarray) -> dict:
    from woolocal_ingest.embedders.quantize import top_k_agreement

    cos = np.sum(ref.astype(np.float64) * got.astype(np.float64), axis=1)
    return {"cos_min": round(float(cos.min()), 5), "cos_mean": round(float(cos.mean()), 5),
            "top10": round(top_k_agreement(ref, got), 4)}


def timed(arm, b: Batches) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    arm.run(b)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=MODEL_DIR, help="the packaged all-MiniLM-L6-v2 (HF folder)")
    ap.add_argument("--onnx", default=None,
                    help="its float32 ONNX export (default: <model-dir>/.onnx-cache/*/model.onnx)")
    ap.add_argument("--ort-int8", default=ORT_INT8,
                    help="an ORT int8 model (made if missing: quantize_dynamic of every MatMul, per-channel QInt8)")
    ap.add_argument("--texts", default=TEXTS,
                    help="texts, one JSON string per line (made if missing: 512 conda-docs chunks, a spread sample)")
    ap.add_argument("--ov-int8", default=OV_INT8, help="where the NNCF PTQ int8 IR is written / found")
    ap.add_argument("--ov-wc8", default=OV_WC8, help="where the NNCF weight-compressed IR is written / found")
    ap.add_argument("--rebuild-int8", action="store_true", help="build the NNCF models again even if present")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hint-texts", type=int, default=128, help="texts for choosing LATENCY vs THROUGHPUT (0: LATENCY)")
    ap.add_argument("--hint-rounds", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ALL_ARMS))
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    arms_wanted = [x for x in a.arms.split(",") if x]
    assert "ort-fp32" in arms_wanted, "ort-fp32 is the reference arm"

    import nncf
    import onnxruntime
    import openvino as ov

    from woolocal_ingest.embedders import resolve_model
    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.embedders.quantize import calibration_texts

    t_start = time.perf_counter()
    model_dir = Path(a.model_dir)
    onnx = Path(a.onnx) if a.onnx else next(iter(sorted(model_dir.glob(".onnx-cache/*/model.onnx"))))
    emb = OnnxEmbedder(resolve_model(str(model_dir)), threads=a.threads)
    if not Path(a.texts).is_file():  # a spread sample of the chunks `woolocal ingest` makes of conda-docs
        from bench_engine import corpus_chunks

        chunks = corpus_chunks(REPO.parent / "shared" / "corpora" / "conda-docs", emb)
        Path(a.texts).parent.mkdir(parents=True, exist_ok=True)
        Path(a.texts).write_text("".join(json.dumps(c) + "\n" for c in chunks[::max(1, len(chunks) // 512)][:512]),
                                 encoding="utf-8")
    if not Path(a.ort_int8).is_file():  # every MatMul int8 (what was shipped when the run below was made)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        Path(a.ort_int8).parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(onnx), a.ort_int8, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    texts = [json.loads(line) for line in Path(a.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    calib = calibration_texts()
    main_b, calib_b = Batches(emb, texts), Batches(emb, calib)
    core = ov.Core()
    res: dict = {
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": a.threads,
        "ov_optimization_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "versions": {"openvino": ov.__version__, "nncf": nncf.__version__, "onnxruntime": onnxruntime.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "paths": {"onnx": str(onnx), "ort_int8": a.ort_int8, "texts": a.texts, "ov_int8": a.ov_int8,
                  "ov_wc8": a.ov_wc8},
        "texts": main_b.n, "tokens": main_b.tokens, "calibration_texts": calib_b.n,
        "batching": {"token_budget": emb.token_budget, "max_batch": emb.max_batch, **main_b.plan.to_dict()},
        "tokenise_s": round(main_b.tokenise_s, 3), "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(res, indent=1), flush=True)

    # one-time: the NNCF models
    samples = calibration_samples(emb, calib)
    if "ov-int8" in arms_wanted or "ov-int8-f32" in arms_wanted:
        res["ov_int8_build"] = build_ov_int8(core, onnx, Path(a.ov_int8), samples, a.rebuild_int8, "ptq")
        print("ov int8 (NNCF PTQ):", res["ov_int8_build"], flush=True)
    if "ov-wc8" in arms_wanted:
        res["ov_wc8_build"] = build_ov_int8(core, onnx, Path(a.ov_wc8), samples, a.rebuild_int8, "wc")
        print("ov wc8 (NNCF weights):", res["ov_wc8_build"], flush=True)

    ov_cfg = {  # arm -> (model file, precision hint or None = the plugin's default)
        "ov-f32": (onnx, "f32"), "ov-default": (onnx, None), "ov-int8": (Path(a.ov_int8), None),
        "ov-int8-f32": (Path(a.ov_int8), "f32"), "ov-wc8": (Path(a.ov_wc8), "f32")}
    ov_models = {k: core.read_model(str(ov_cfg[k][0])) for k in arms_wanted if k in ov_cfg}

    # LATENCY vs THROUGHPUT per OpenVINO arm, alternating, on a spread subset
    hints = {k: "LATENCY" for k in ov_models}
    if a.hint_texts and ov_models:
        step = max(1, len(texts) // a.hint_texts)
        sub = Batches(emb, texts[::step][: a.hint_texts])
        cand = {(k, h): OvArm(core, m, emb, a.threads, h, ov_cfg[k][1]) for k, m in ov_models.items()
                for h in ("LATENCY", "THROUGHPUT")}
        for arm in cand.values():
            arm.run(sub)  # warm-up
        ht: dict = {c: [] for c in cand}
        for _ in range(a.hint_rounds):
            for c, arm in cand.items():
                ht[c].append(timed(arm, sub)[0])
        res["hint_choice"] = {"texts": sub.n, "rounds": a.hint_rounds, "median_s": {}, "streams": {}, "chosen": {}}
        for k in ov_models:
            lat, tput = statistics.median(ht[(k, "LATENCY")]), statistics.median(ht[(k, "THROUGHPUT")])
            hints[k] = "LATENCY" if lat <= tput else "THROUGHPUT"
            res["hint_choice"]["median_s"][k] = {"LATENCY": round(lat, 3), "THROUGHPUT": round(tput, 3),
                                                 "throughput_vs_latency": round(lat / tput, 3)}
            res["hint_choice"]["streams"][k] = {h: cand[(k, h)].props["NUM_STREAMS"] for h in ("LATENCY", "THROUGHPUT")}
            res["hint_choice"]["chosen"][k] = hints[k]
        del cand
        print(json.dumps(res["hint_choice"], indent=1), flush=True)

    arms: dict = {}
    for k in arms_wanted:
        if k == "ort-fp32":
            arms[k] = OrtArm(emb, onnx)
        elif k == "ort-int8":
            arms[k] = OrtArm(emb, Path(a.ort_int8))
        elif k == "ort-fp32-2s":
            arms[k] = OrtArm(emb, onnx, streams=2)
        elif k == "ort-int8-2s":
            arms[k] = OrtArm(emb, Path(a.ort_int8), streams=2)
        else:
            arms[k] = OvArm(core, ov_models[k], emb, a.threads, hints[k], ov_cfg[k][1])
    res["ov_compiled"] = {k: {"hint": v.hint, "compile_s": round(v.compile_s, 2), **v.props}
                          for k, v in arms.items() if isinstance(v, OvArm)}

    vecs = {k: arm.run(main_b) for k, arm in arms.items()}  # warm-up, and the vectors compared
    cvecs = {k: arm.run(calib_b) for k, arm in arms.items()}
    wall: dict = {k: [] for k in arms}
    cpu: dict = {k: [] for k in arms}
    for r in range(a.rounds):
        for k, arm in arms.items():
            w, c = timed(arm, main_b)
            wall[k].append(w)
            cpu[k].append(c)
        print(f"round {r + 1}:", {k: round(v[-1], 2) for k, v in wall.items()}, "load", os.getloadavg(), flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    ref = med["ort-fp32"]
    res["rounds"] = a.rounds
    res["arms"] = {}
    for k in arms:
        res["arms"][k] = {
            "hint": arms[k].hint, "median_s": round(med[k], 3), "runs_s": [round(x, 3) for x in wall[k]],
            "cpu_s_median": round(cmed[k], 2), "cpu_s_runs": [round(x, 2) for x in cpu[k]],
            "cpu_s_ratio_vs_ort_fp32": round(cmed["ort-fp32"] / cmed[k], 3), "texts_per_s": round(main_b.n / med[k], 2),
            "tokens_per_s": round(main_b.tokens / med[k]), "speed_vs_ort_fp32": round(ref / med[k], 3),
            "paired_speed_vs_ort_fp32": [round(x / y, 3) for x, y in zip(wall["ort-fp32"], wall[k])],
            "accuracy_texts": accuracy(vecs["ort-fp32"], vecs[k]),
            "accuracy_calibration": accuracy(cvecs["ort-fp32"], cvecs[k]),
        }
    res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["total_run_s"] = round(time.perf_counter() - t_start, 1)

    print("\n| arm | hint | median s (runs) | texts/s | vs ort-fp32 | CPU-s (vs ort-fp32) | cos min / mean (texts) "
          "| top-10 (texts) | cos min / mean (calib) | top-10 (calib) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k, v in res["arms"].items():
        at, ac = v["accuracy_texts"], v["accuracy_calibration"]
        runs = ", ".join(f"{x:.2f}" for x in v["runs_s"])
        print(f"| {k} | {v['hint']} | {v['median_s']:.2f} ({runs}) | {v['texts_per_s']:.1f} | "
              f"{v['speed_vs_ort_fp32']:.2f}x | {v['cpu_s_median']:.2f} ({v['cpu_s_ratio_vs_ort_fp32']:.2f}x) | "
              f"{at['cos_min']:.4f} / {at['cos_mean']:.4f} | {at['top10']:.3f} | "
              f"{ac['cos_min']:.4f} / {ac['cos_mean']:.4f} | {ac['top10']:.3f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "openvino.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nload average start/end: {res['load_avg_start']} / {res['load_avg_end']}; "
          f"total {res['total_run_s']} s; wrote {out / 'openvino.json'}")


if __name__ == "__main__":
    main()
