"""OpenVINO backend (issue 13): the packaged MiniLM's ONNX export compiled by OpenVINO agrees with ONNX Runtime
float32, its NNCF int8 model passes the same accuracy gate as ORT int8 and is built once, a broken int8 IR is refused
with the figures (or replaced by f32 when asked), and a CLI ingest writes an openvino int8 store that fp32 never
joins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest.embedders.openvino import nncf_available, openvino_available

pytestmark = pytest.mark.skipif(not (openvino_available() and nncf_available()), reason="openvino / nncf not installed")

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample-project"
TEXTS = ["conda create -n py311 python=3.11", "How do I water tomatoes in August?",
         "def add(a, b):\n    return a + b", "Le compost a besoin d'air et d'humidité."]


@pytest.fixture(scope="module")
def ov_int8(tmp_path_factory):
    """A copy of the packaged MiniLM (exports land in tmp), its OpenVINO int8 model built and gated once."""
    from woolocal_ingest.embedders import read_model_info, resolve_model
    from woolocal_ingest.embedders.openvino import OpenVinoEmbedder

    src = resolve_model(None)
    dest = tmp_path_factory.mktemp("ov-models") / "minilm"
    shutil.copytree(src.path, dest, ignore=shutil.ignore_patterns(".onnx-cache"))
    info = read_model_info(dest, name=src.name)
    return info, OpenVinoEmbedder(info, quantization="int8").load()


def test_float_precisions_match_ort_fp32_and_the_identity_says_which(ov_int8):
    from woolocal_ingest.embedders.identity import model_identity
    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.embedders.openvino import PRECISIONS, OpenVinoEmbedder, default_precision

    info, _ = ov_int8
    ort = OnnxEmbedder(info)
    ref = ort.embed_documents(TEXTS)
    default = OpenVinoEmbedder(info)
    f32 = OpenVinoEmbedder(info, precision="f32")
    for emb in (default, f32):
        cos = (emb.embed_documents(TEXTS) * ref).sum(1)
        assert np.all(cos >= 0.999), (emb.precision, cos)
        q = emb.embed_query(TEXTS[1])
        assert float(q @ ort.embed_query(TEXTS[1])) >= 0.999
    assert default.precision == default_precision() and f32.precision == "f32"
    ident, ident32, ident_ort = model_identity(default), model_identity(f32), model_identity(ort)
    assert ident["backend"] == ident32["backend"] == "openvino" and ident_ort["backend"] == "onnx"
    assert ident32["quantization"] is None  # f32: float32 vectors, like ORT's
    # the default precision is what the store records: bf16 vectors are not fp32 vectors
    assert ident["quantization"] == PRECISIONS[default.precision]
    if default.precision != "f32":
        assert ident["quantization"] != ident_ort["quantization"]


def test_int8_passes_the_gate_and_is_built_once(ov_int8):
    from woolocal_ingest.embedders.identity import model_identity
    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.embedders.openvino import OpenVinoEmbedder

    info, emb = ov_int8
    rep = emb.gate_report
    assert emb.quantization == "int8" and rep.passed and not rep.fell_back and rep.texts >= 100
    xml = emb.quantized_path
    assert xml.parent == emb.onnx_path.parent and xml.name == f"model.ov-int8-{emb.int8_key}.xml"
    assert xml.with_suffix(".bin").stat().st_size < emb.onnx_path.stat().st_size / 2
    assert not list(xml.parent.glob(".*.tmp"))  # the temp folder is gone
    stamps = {p: p.stat().st_mtime_ns for p in (xml, xml.with_suffix(".bin"))}
    again = OpenVinoEmbedder(info, quantization="int8").load()
    assert again.quantized_path == xml and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.gate_report.to_dict() == rep.to_dict()  # from the cached report, not measured again
    m = model_identity(again)
    assert m["backend"] == "openvino" and m["quantization"] == "int8" and m["quantization_gate"]["passed"]
    cos = (again.embed_documents(TEXTS) * OnnxEmbedder(info).embed_documents(TEXTS)).sum(1)
    assert np.all(cos > 0.98) and np.all(cos < 0.99999)  # close to fp32, and quantized


def _broken_copy(info, tmp_path: Path):
    """The model folder with its export and int8 IR, one int8 weight's scales multiplied by 8."""
    import openvino as ov
    from openvino import opset13 as ops

    from woolocal_ingest.embedders import read_model_info

    dest = tmp_path / "broken-minilm"
    shutil.copytree(info.path, dest)
    (xml,) = list(dest.glob(".onnx-cache/*/model.ov-int8-*.xml"))
    model = ov.Core().read_model(str(xml))
    for op in model.get_ops():
        if op.get_type_name() != "Multiply":
            continue
        a, b = (i.get_source_output().get_node() for i in op.inputs())
        if (a.get_type_name() == "Convert" and b.get_type_name() == "Constant"
                and a.input(0).get_source_output().get_node().get_output_element_type(0) == ov.Type.i8
                and list(b.get_output_partial_shape(0).to_shape()) == [1, 1536]):  # an FFN up-projection's scales
            op.input(1).replace_source_output(ops.constant(b.get_data() * 8).output(0))
            break
    else:
        raise AssertionError("no int8 weight scale found in the IR")
    tmp = xml.with_name("rewritten.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    tmp.replace(xml)  # the cached gate report was written for the good files: their stamps no longer match
    return read_model_info(dest, name=info.name)


def test_broken_int8_ir_is_refused_with_figures(ov_int8, tmp_path):
    from woolocal_ingest.embedders.identity import model_identity
    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.embedders.openvino import OpenVinoEmbedder
    from woolocal_ingest.embedders.quantize import QuantizationGateError

    broken = _broken_copy(ov_int8[0], tmp_path)
    with pytest.raises(QuantizationGateError, match=r"failed the accuracy gate.*mean cosine 0\.\d+") as err:
        OpenVinoEmbedder(broken, quantization="int8").load()
    assert not err.value.report.passed and err.value.report.failures
    assert ".xml" in str(err.value)

    fb = OpenVinoEmbedder(broken, quantization="int8", on_gate_failure="fp32").load()
    assert fb.quantization is None and fb.precision == "f32" and fb.gate_report.fell_back
    m = model_identity(fb)
    assert m["quantization"] is None and m["quantization_gate"]["fell_back"]
    cos = (fb.embed_documents(TEXTS) * OnnxEmbedder(broken).embed_documents(TEXTS)).sum(1)
    assert np.all(cos > 0.9999)


def test_router_and_config_accept_openvino(ov_int8):
    from woolocal_ingest.config import PurposeConfig
    from woolocal_ingest.embedders import pick_backend
    from woolocal_ingest.embedders.router import backends_for
    from woolocal_ingest.errors import ConfigError

    info, _ = ov_int8
    assert "openvino" in backends_for(info)
    assert pick_backend(info, "openvino", "int8").quantization == "int8"
    with pytest.raises(ConfigError, match="onnx or openvino"):
        pick_backend(info, "sentence-transformers", "int8")
    assert PurposeConfig(backend="openvino", quantization="int8").backend == "openvino"


def test_cli_ingest_writes_an_openvino_int8_store_fp32_never_joins(ov_int8, tmp_path):
    from cli_project import cli_project
    from woolocal_ingest.manifest import read_manifest

    info, _ = ov_int8
    model = str(info.path)
    proj, cli = cli_project(tmp_path, model)

    out = json.loads(cli("ingest", str(proj), "--no-prefect", "--backend", "openvino", "--quantization", "int8",
                         "--json").stdout)
    m = read_manifest(Path(out["store"]))["model"]
    assert m["backend"] == "openvino" and m["quantization"] == "int8" and m["quantization_gate"]["passed"]
    assert m["quantization_gate"]["store_texts"] == 0 and out.get("count", 1) > 0
    # fp32 (ORT), bf16 (OpenVINO's default here) and ONNX Runtime's int8 - another engine's int8 vectors - all refused
    for flags in (("--backend", "onnx"), ("--backend", "openvino", "--quantization", "none"),
                  ("--backend", "onnx", "--quantization", "int8")):
        r = cli("ingest", str(proj), "--no-prefect", *flags, code=None)
        assert r.exit_code != 0 and "int8" in r.stderr and "never mixes precisions" in r.stderr, (flags, r.stderr)


def test_service_queries_openvino_stores_with_the_engine_that_made_them(ov_int8, tmp_path):
    """A real server serving the model on ONNX Runtime float32: an OpenVINO int8 store's and an OpenVINO
    default-precision store's text queries are embedded by OpenVINO variants of the same files (scores equal to
    searching in-process with the embedder that wrote each store), an ONNX Runtime float32 store's by the served
    model."""
    import httpx

    from servers import running
    from woolocal_ingest.api import open_store
    from woolocal_ingest.chunking import ChunkSettings
    from woolocal_ingest.config import FlowsConfig, PurposeConfig, ServiceConfig
    from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.embedders.openvino import OpenVinoEmbedder
    from woolocal_ingest.ingest import run_ingest
    from woolocal_ingest.service.app import create_app

    info, ov8 = ov_int8
    stores, proj = tmp_path / "stores", tmp_path / "garden"
    shutil.copytree(SAMPLE, proj)
    writers = {"ov8": ov8, "ovdefault": OpenVinoEmbedder(info).load(), "ort32": OnnxEmbedder(info).load()}
    for name, emb in writers.items():
        run_ingest(name, proj, stores, emb, ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    cfg = FlowsConfig(base_dir=tmp_path, purposes={"projects": PurposeConfig(model=str(info.path), backend="onnx")},
                      service=ServiceConfig(models=["projects"]))
    query = "how much water do tomatoes need in summer"
    app = create_app(cfg, stores_root=stores, load_in_background=False)
    with running(app, wait_healthy=True) as base:
        for name, emb in writers.items():
            r = httpx.post(f"{base}/v1/stores/{name}/search", json={"query": query, "k": 5, "mode": "dense"},
                           timeout=300)
            assert r.status_code == 200, r.text
            got = [(h["id"], h["score"]) for h in r.json()["data"]]
            store = open_store(next((stores / name).iterdir()), embedder=emb)
            want = [(h.id, h.score) for h in store.search(query, k=5, mode="dense")]
            assert [i for i, _ in got] == [i for i, _ in want], name
            assert np.allclose([x for _, x in got], [x for _, x in want], atol=2e-4), (name, got, want)
    keys = {s.key for s in app.state.service.slots}
    assert any(k.endswith("(int8/openvino)") for k in keys), keys  # loaded once, on first use
    bf16 = writers["ovdefault"].quantization  # "bf16" on CPUs with avx512_bf16/AMX, else None (float32)
    assert not bf16 or any(k.endswith(f"({bf16}/openvino)") for k in keys), keys
