"""int8 fast path (issue 13): the packaged MiniLM quantized once per session, the accuracy gate passes it and refuses
a deliberately broken quantization (a corrupt scale initializer) with the figures, falls back to fp32 when asked,
and a store never mixes precisions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from woolocal_ingest.embedders.onnx import onnx_available

pytestmark = pytest.mark.skipif(not onnx_available(), reason="onnxruntime / onnx not installed")

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample-project"


@pytest.fixture(scope="session")
def int8_model(tmp_path_factory, embedder):
    """A copy of the packaged MiniLM (so the export and int8 files land in a tmp dir), exported, quantized and
    gated once per session."""
    from woolocal_ingest.embedders import read_model_info
    from woolocal_ingest.embedders.onnx import OnnxEmbedder

    dest = tmp_path_factory.mktemp("int8-models") / "minilm"
    shutil.copytree(embedder.info.path, dest, ignore=shutil.ignore_patterns(".onnx-cache"))
    info = read_model_info(dest, name=embedder.info.name)
    emb = OnnxEmbedder(info, quantization="int8").load()
    return info, emb


def _broken_copy(info, tmp_path: Path):
    """A copy of the model folder with its export and int8 files, one int8 weight scale multiplied by 8."""
    import onnx
    from onnx import numpy_helper

    from woolocal_ingest.embedders import read_model_info

    dest = tmp_path / "broken-minilm"
    shutil.copytree(info.path, dest)
    (q,) = list(dest.glob(".onnx-cache/*/model.int8-*.onnx"))
    for gate_file in dest.glob(".onnx-cache/*/*.gate.json"):
        gate_file.unlink()
    model = onnx.load(str(q))
    scale = next(i for i in model.graph.initializer if i.name.endswith("_scale") and list(i.dims) == [1536])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 8, scale.name))
    onnx.save(model, str(q))
    return read_model_info(dest, name=info.name)


def test_int8_passes_the_gate_and_is_cached_beside_the_export(int8_model):
    from woolocal_ingest.embedders.quantize import Int8Settings, cpu_int8_features
    from woolocal_ingest.ingest import model_identity

    info, emb = int8_model
    rep = emb.gate_report
    assert rep.passed and not rep.fell_back and emb.quantization == "int8"
    assert rep.mean_cos >= 0.99 and rep.min_cos >= 0.98 and rep.top10_agreement >= 0.85 and rep.texts >= 100
    settings = Int8Settings.for_this_cpu()
    assert settings.reduce_range == (not cpu_int8_features())
    assert emb.quantized_path == emb.onnx_path.parent / f"model.int8-{settings.key}.onnx"
    assert emb.quantized_path.stat().st_size < emb.onnx_path.stat().st_size
    saved = json.loads((emb.onnx_path.parent / f"model.int8-{settings.key}.gate.json").read_text())
    assert saved["report"]["passed"] and saved["settings"]["per_channel"]
    m = model_identity(emb)
    assert m["quantization"] == "int8" and m["backend"] == "onnx" and m["quantization_gate"]["passed"]
    # int8 vectors are close to fp32 but not the same (else nothing was quantized)
    texts = ["conda create -n py311 python=3.11", "How do I water tomatoes in August?"]
    from woolocal_ingest.embedders.onnx import OnnxEmbedder

    ref = OnnxEmbedder(info).embed_documents(texts)
    got = emb.embed_documents(texts)
    cos = (ref * got).sum(1)
    assert np.all(cos > 0.97) and np.all(cos < 0.99999)


def test_cache_key_differs_from_fp32(int8_model, embedder):
    from woolocal_ingest.cache import model_key

    _, emb = int8_model
    assert model_key(emb) != model_key(embedder)


def test_broken_quantization_is_refused_with_figures(int8_model, tmp_path):
    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.embedders.quantize import QuantizationGateError

    broken = _broken_copy(int8_model[0], tmp_path)
    with pytest.raises(QuantizationGateError, match=r"failed the accuracy gate.*mean cosine 0\.\d+") as err:
        OnnxEmbedder(broken, quantization="int8").load()
    rep = err.value.report
    assert not rep.passed and rep.failures
    assert "on_gate_failure: fp32" in str(err.value)

    # asked to fall back: fp32, recorded as such
    from woolocal_ingest.ingest import model_identity

    fb = OnnxEmbedder(broken, quantization="int8", on_gate_failure="fp32").load()
    assert fb.quantization is None and fb.gate_report.fell_back and not fb.gate_report.passed
    m = model_identity(fb)
    assert m["quantization"] is None and m["quantization_gate"]["fell_back"]
    ref = OnnxEmbedder(broken).embed_documents(["compost heaps need air"])
    assert float((fb.embed_documents(["compost heaps need air"]) * ref).sum()) > 0.99999


def test_store_never_mixes_precisions(int8_model, embedder, tmp_path):
    from woolocal_ingest.chunking import ChunkSettings
    from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from woolocal_ingest.errors import ModelChangedError
    from woolocal_ingest.ingest import run_ingest

    _, emb = int8_model
    proj = tmp_path / "garden"
    shutil.copytree(SAMPLE, proj)
    stores = tmp_path / "stores"
    settings = ChunkSettings()
    s = run_ingest("garden", proj, stores, embedder, settings, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    assert s.count > 0
    with pytest.raises(ModelChangedError) as err:
        run_ingest("garden", proj, stores, emb, settings, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    msg = str(err.value)
    assert "fp32" in msg and "int8" in msg and "--rebuild" in msg and "never mixes precisions" in msg

    # --rebuild re-embeds the whole store as int8; the manifest says so, with the gate's figures (store sample too)
    s2 = run_ingest("garden", proj, stores, emb, settings, DEFAULT_INCLUDE, DEFAULT_EXCLUDE, rebuild=True)
    from woolocal_ingest.api import open_store

    store = open_store(Path(s2.store))
    model = store.manifest["model"]
    assert model["quantization"] == "int8" and model["quantization_gate"]["passed"]
    # a second int8 run gates the store's own sample too, and appends without re-embedding
    s3 = run_ingest("garden", proj, stores, emb, settings, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    assert s3.unchanged > 0 and emb.gate_report.store_texts > 0
    # and now fp32 is refused on the int8 store, naming both
    with pytest.raises(ModelChangedError, match=r"int8 \(onnx\) vectors.*fp32 vectors.*--rebuild"):
        run_ingest("garden", proj, stores, embedder, settings, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    # queries of an int8 store use the int8 model; fp32 when asked
    hits = store.search("how do I make compost", k=3)
    assert hits and getattr(store.embedder, "quantization", None) == "int8"
    fp = open_store(Path(s2.store), quantization="none")
    assert [h.id for h in fp.search("how do I make compost", k=3)][:1] == [hits[0].id]
    assert getattr(fp.embedder, "quantization", None) is None


def test_quantization_config_errors_name_the_key(tmp_path):
    from woolocal_ingest.config import load_config
    from woolocal_ingest.errors import ConfigError

    cfg = tmp_path / "flows.yaml"
    cfg.write_text("purposes:\n  projects:\n    quantization: int4\n")
    with pytest.raises(ConfigError, match=r"purposes\.projects\.quantization: 'int4' is not one of none, int8"):
        load_config(cfg)
    cfg.write_text("purposes:\n  projects:\n    backend: sentence-transformers\n    quantization: int8\n")
    with pytest.raises(ConfigError, match=r"purposes\.projects.*int8 runs on the onnx or openvino backend"):
        load_config(cfg)
    cfg.write_text("purposes:\n  projects:\n    quantization: int8\n    on_gate_failure: ignore\n")
    with pytest.raises(ConfigError, match=r"purposes\.projects\.on_gate_failure: 'ignore' is not one of refuse, fp32"):
        load_config(cfg)

    # `serve --quantization int8`: every local purpose at int8; one that cannot run it is named
    from woolocal_ingest.config import quantized_config

    cfg.write_text("purposes:\n  projects: {}\n  userProfile: {backend: onnx}\n")
    q = quantized_config(load_config(cfg), "int8")
    assert {p.quantization for p in q.purposes.values()} == {"int8"}
    cfg.write_text("purposes:\n  projects: {}\n  userProfile: {backend: mlx}\n")
    with pytest.raises(ConfigError,
                       match=r"purposes\.userProfile\.quantization: int8 runs on the onnx or openvino backend"):
        quantized_config(load_config(cfg), "int8")


def test_auto_probe_is_cached_per_model_and_machine(int8_model, tmp_path, monkeypatch):
    from woolocal_ingest.embedders import pick_backend, probe
    from woolocal_ingest.embedders.probe import ProbeResult

    info, _ = int8_model
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(probe.PROBE_ENV, "on")
    calls = []

    def fake(info_, allow_int8, texts=None):
        calls.append(allow_int8)
        rates = {"sentence-transformers": 10.0, "onnx": 14.0, **({"onnx-int8": 25.0} if allow_int8 else {})}
        best = max(rates, key=rates.get)
        return ProbeResult("onnx", "int8" if best == "onnx-int8" else None, rates)

    monkeypatch.setattr(probe, "run_probe", fake)
    c1 = pick_backend(info, "auto", "int8")
    c2 = pick_backend(info, "auto", "int8")
    c3 = pick_backend(info, "auto", None)
    assert (c1.backend, c1.quantization) == ("onnx", "int8") and c2 == c1 and "onnx-int8 25.0" in c1.reason
    assert (c3.backend, c3.quantization) == ("onnx", None)  # int8 only when the purpose allows it
    assert calls == [True, False]  # once per model, machine and int8 permission
    assert (tmp_path / "woolocal" / "probe.json").is_file()
    monkeypatch.setenv(probe.PROBE_ENV, "off")
    assert pick_backend(info, "auto", None).backend == "sentence-transformers"


def test_run_probe_measures_real_arms(int8_model):
    from woolocal_ingest.embedders.probe import run_probe

    info, _ = int8_model
    r = run_probe(info, allow_int8=True, texts=["a short text", "conda install numpy", "compost needs air"] * 4)
    from woolocal_ingest.embedders.router import openvino_ok

    ov = {"openvino"} if openvino_ok(info) else set()  # OpenVINO int8 is not an auto candidate (accuracy)
    assert set(r.rates) == {"sentence-transformers", "onnx", "onnx-int8", *ov} and not r.excluded
    assert r.backend in ("sentence-transformers", "onnx", "openvino") and all(v > 0 for v in r.rates.values())


def test_unloadable_cached_int8_file_is_quantized_again(int8_model, tmp_path):
    from woolocal_ingest.embedders import read_model_info
    from woolocal_ingest.embedders.onnx import OnnxEmbedder

    info = int8_model[0]
    dest = tmp_path / "minilm"
    shutil.copytree(info.path, dest)
    (q,) = list(dest.glob(".onnx-cache/*/model.int8-*.onnx"))
    q.write_bytes(b"\0not onnx" * 64)
    emb = OnnxEmbedder(read_model_info(dest, name=info.name), quantization="int8").load()
    assert emb.quantized_path == q and q.stat().st_size > 1_000_000 and emb.gate_report.passed


def test_plan_mixed_keeps_the_widest_ranged_inputs_in_fp32_until_the_target():
    """The planner's order and stopping rules, with a measure that records what it was asked to quantize."""
    from woolocal_ingest.embedders.quantize import GateReport, Int8Settings, MatMulGroup, plan_mixed

    groups = [MatMulGroup("a", ("qa", "ka", "va"), 300), MatMulGroup("b", ("down0",), 400),
              MatMulGroup("c", ("down1",), 200), MatMulGroup("d", ("up0",), 100)]
    ratios = {"a": 20.0, "b": 95.0, "c": 60.0, "d": 50.0}
    gains = {"down0": 0.004, "down1": 0.003, "up0": 0.001, "qa": 0.0005}
    asked = []

    def measure(nodes):
        asked.append(nodes)
        m = 0.985 + sum(gains.get(n, 0.0) for n in nodes)
        return GateReport(mean_cos=0.995, min_cos=m, top10_agreement=0.95, texts=10)

    plan = plan_mixed(groups, ratios, Int8Settings(target_min_cos=0.99, max_fp32_share=0.8), measure)
    assert asked == [(), ("down0",), ("down0", "down1")]  # widest range first; stops once the target is met
    assert plan.fp32_nodes == ("down0", "down1") and plan.fp32_share == pytest.approx(0.6)
    assert plan.report.min_cos >= 0.99 and [s["fp32_matmuls"] for s in plan.steps] == [0, 1, 2]

    # the budget stops it before a group that would pass the share; the best measured plan is returned
    asked.clear()
    plan = plan_mixed(groups, ratios, Int8Settings(target_min_cos=0.999, max_fp32_share=0.45), measure)
    assert asked == [(), ("down0",)] and plan.fp32_nodes == ("down0",)
    # a target already met: nothing stays float32
    asked.clear()
    plan = plan_mixed(groups, ratios, Int8Settings(target_min_cos=0.98), measure)
    assert asked == [()] and plan.fp32_nodes == () and plan.fp32_share == 0.0


def test_shipped_int8_keeps_the_ffn_down_projections_it_needs_in_fp32(int8_model):
    """On the real model the planner measures range/RMS through a probe model: the GELU outputs feeding the FFN
    down-projections rank first, and as many stay float32 as the target needs; the file and the report agree."""
    from woolocal_ingest.embedders.quantize import Int8Settings, matmul_groups

    info, emb = int8_model
    rep, settings = emb.gate_report, Int8Settings.for_this_cpu()
    saved = json.loads(emb.quantized_path.with_name(emb.quantized_path.stem + ".gate.json").read_text())
    steps = saved["mixed_precision_steps"]
    assert steps[0]["fp32_matmuls"] == 0 and steps[0]["min_cos"] < settings.target_min_cos  # all-int8 misses it
    assert all("intermediate_act_fn" in s["added"] for s in steps[1:])  # FFN down-projection inputs (GELU out)
    assert rep.min_cos >= settings.target_min_cos or rep.fp32_share > settings.max_fp32_share - 0.06
    assert rep.fp32_share <= settings.max_fp32_share and rep.fp32_matmuls == steps[-1]["fp32_matmuls"]
    kept = matmul_groups(emb.quantized_path)
    assert sum(len(g.nodes) for g in kept) == rep.fp32_matmuls
    assert all(n.endswith("output/dense/MatMul") and "attention" not in n for g in kept for n in g.nodes)
    assert not list(emb.quantized_path.parent.glob(".*.tmp"))  # no probe or candidate file left behind


def test_store_sample_gate_refuses_what_the_calibration_gate_passed(int8_model, tmp_path):
    """A broken int8 file whose cached calibration report says `passed` (the report was written for a good file of
    the same size and time) is still caught by the store's own sample, and refused or - when asked - replaced by
    float32."""
    import os

    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.embedders.quantize import QuantizationGateError

    info, good = int8_model
    broken = _broken_copy(info, tmp_path)
    (q,) = list(broken.path.glob(".onnx-cache/*/model.int8-*.onnx"))
    good_report = good.quantized_path.with_name(good.quantized_path.stem + ".gate.json")
    forged = json.loads(good_report.read_text())
    forged["int8_size"], forged["int8_mtime_ns"] = q.stat().st_size, q.stat().st_mtime_ns
    q.with_name(q.stem + ".gate.json").write_text(json.dumps(forged))
    texts = [p.read_text(encoding="utf-8")[:400] for p in sorted(SAMPLE.rglob("*.md"))] * 3

    emb = OnnxEmbedder(broken, quantization="int8").load()
    assert emb.gate_report.passed  # the calibration gate was answered from the (forged) cache
    with pytest.raises(QuantizationGateError, match=r"store sample: ") as err:
        emb.check_sample(texts)
    assert err.value.report.store_texts > 0 and not err.value.report.passed

    fb = OnnxEmbedder(broken, quantization="int8", on_gate_failure="fp32").load()
    fb.check_sample(texts)
    assert fb.quantization is None and fb.gate_report.fell_back
    ref = OnnxEmbedder(broken).embed_documents(texts[:2])
    assert np.allclose(fb.embed_documents(texts[:2]), ref, atol=1e-5)
    assert os.path.getsize(q) > 0


def test_quantization_flag_end_to_end_through_the_cli(int8_model, tmp_path):
    """`--quantization int8` on ingest, migrate and embed: int8 stores with the gate in the manifest, fp32 refused
    on them, int8 vectors close to fp32 but not equal."""
    from cli_project import cli_project
    from woolocal_ingest.api import open_store
    from woolocal_ingest.manifest import read_manifest

    info, emb = int8_model
    model = str(info.path)
    proj, cli = cli_project(tmp_path, model)

    out = json.loads(cli("ingest", str(proj), "--no-prefect", "--quantization", "int8", "--json").stdout)
    m = read_manifest(Path(out["store"]))["model"]
    assert m["quantization"] == "int8" and m["quantization_gate"]["passed"]
    assert m["quantization_gate"]["fp32_matmuls"] == emb.gate_report.fp32_matmuls
    r = cli("ingest", str(proj), "--no-prefect", "--quantization", "none", code=None)
    assert r.exit_code != 0 and "int8" in r.stderr and "fp32" in r.stderr and "--rebuild" in r.stderr
    inspect = cli("stores", "inspect", out["store"]).stdout
    assert "precision int8" in inspect and "mean cosine" in inspect

    src = tmp_path / "legacy"
    shutil.copytree(Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "legacy-stores" /
                    "js_openai1536_store", src)
    mig = json.loads(cli("migrate", str(src), "--to", "projects", "--quantization", "int8", "--out",
                         str(tmp_path / "migrated"), "--no-prefect", "--json").stdout)
    store = open_store(Path(mig["store"]))
    assert store.manifest["model"]["quantization"] == "int8" and store.count >= 219
    assert getattr(store.embedder, "quantization", None) == "int8"  # queried with the int8 model

    texts = "compost heaps need air\nconda create -n py311 python=3.11\n"
    v8, v32 = (np.array(json.loads(cli("embed", "--model", model, *flags, "--json", input=texts).stdout)["embeddings"])
               for flags in (("--quantization", "int8"), ("--backend", "onnx")))
    cos = (v8 * v32).sum(1)
    assert v8.shape == (2, 384) and np.all(cos > 0.98) and np.all(cos < 0.99999)


def test_service_queries_each_store_at_its_own_precision(int8_model, embedder, tmp_path):
    """A real server on 127.0.0.1 serving the model in float32: an int8 store's text queries are embedded by an
    int8 variant of the same files (loaded on first use), a float32 store's by the served float32 model; with
    `serve --quantization int8` it is the other way round."""
    import httpx

    from servers import running
    from woolocal_ingest.chunking import ChunkSettings
    from woolocal_ingest.config import FlowsConfig, PurposeConfig, ServiceConfig, quantized_config
    from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from woolocal_ingest.embedders.onnx import OnnxEmbedder
    from woolocal_ingest.ingest import run_ingest
    from woolocal_ingest.service.app import create_app

    from woolocal_ingest.embedders import read_model_info

    info = read_model_info(int8_model[0].path)  # named by its folder, as the service names a model given by path
    stores = tmp_path / "stores"
    proj = tmp_path / "garden"
    shutil.copytree(SAMPLE, proj)
    emb8, emb32 = OnnxEmbedder(info, quantization="int8").load(), OnnxEmbedder(info).load()
    run_ingest("garden8", proj, stores, emb8, ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    run_ingest("garden32", proj, stores, emb32, ChunkSettings(), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
    query = "how much water do tomatoes need in summer"
    cfg = FlowsConfig(base_dir=tmp_path,
                      purposes={"projects": PurposeConfig(model=str(info.path), backend="onnx")},
                      service=ServiceConfig(models=["projects"]))

    def dense_top(base: str, store: str) -> list[tuple[str, float]]:
        r = httpx.post(f"{base}/v1/stores/{store}/search", json={"query": query, "k": 5, "mode": "dense"},
                       timeout=300)
        assert r.status_code == 200, r.text
        return [(h["id"], h["score"]) for h in r.json()["data"]]

    def expected(store: str, emb) -> list[tuple[str, float]]:
        from woolocal_ingest.api import open_store

        s = open_store(next((stores / store).iterdir()), embedder=emb)
        return [(h.id, h.score) for h in s.search(query, k=5, mode="dense")]

    for config, served in ((cfg, None), (quantized_config(cfg, "int8"), "int8")):
        app = create_app(config, stores_root=stores, load_in_background=False)
        state = app.state.service
        assert getattr(state.slots[0].embedder, "quantization", None) == served
        with running(app, wait_healthy=True) as base:
            for store, emb in (("garden8", emb8), ("garden32", emb32)):
                got, want = dense_top(base, store), expected(store, emb)
                assert [i for i, _ in got] == [i for i, _ in want]
                assert np.allclose([x for _, x in got], [x for _, x in want], atol=2e-4), (store, served, got, want)
        keys = sorted(s.key for s in state.slots)
        other = "(fp32)" if served == "int8" else "(int8/onnx)"
        assert len(keys) == 2 and keys[1].endswith(other)  # one variant, loaded once, at the other precision
