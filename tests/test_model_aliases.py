"""Drop-in model names (`service.model_aliases`): a client that sends OpenAI's model names switches to woolocal by
its base URL alone, and an alias marked `query: true` applies the model's query prefix (LangChain's `embedQuery`
sends no hint)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from woolocal_ingest.config import Defaults, FlowsConfig, ServiceConfig, load_config
from woolocal_ingest.errors import ConfigError
from servers import running

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PREFIX = "Represent this sentence for searching relevant passages: "


class WithQueryPrefix:
    """The session's MiniLM, presenting a BGE-style query prefix (as bge-large's files would)."""

    def __init__(self, inner):
        self._inner = inner
        self.info = dataclasses.replace(inner.info, query_prefix=PREFIX)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def url(embedder, tmp_path_factory):
    from woolocal_ingest.service.app import create_app

    tmp = tmp_path_factory.mktemp("aliases")
    cfg = FlowsConfig(base_dir=tmp, defaults=Defaults(stores_root=tmp / "stores"), service=ServiceConfig(
        model_aliases={"text-embedding-3-small": "projects", "wooster-query": {"purpose": "projects", "query": True}}))
    app = create_app(cfg, api_key="", load_in_background=False, loader=lambda spec: WithQueryPrefix(embedder))
    with running(app) as url:
        yield url


def vectors(url: str, model: str, texts: list[str], **extra) -> np.ndarray:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    return np.array([d.embedding for d in client.embeddings.create(model=model, input=texts, **extra).data])


def test_openai_names_and_query_alias(url, embedder):
    texts = ["Who keeps the key to the tool shed?", "compost"]
    docs = embedder.embed_documents(texts)
    queries = embedder.embed_documents([PREFIX + t for t in texts])
    got = vectors(url, "text-embedding-3-small", texts)
    assert np.allclose(got, docs, atol=1e-5)
    got = vectors(url, "wooster-query", texts)
    assert np.allclose(got, queries, atol=1e-5) and not np.allclose(got, docs, atol=1e-3)
    # an explicit input_type still wins over the alias's side
    got = vectors(url, "wooster-query", texts, extra_body={"input_type": "document"})
    assert np.allclose(got, docs, atol=1e-5)


def test_models_lists_the_aliases(url):
    import httpx

    data = httpx.get(url + "/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) == {MODEL, "text-embedding-3-small", "wooster-query"}  # explicit aliases replace the defaults
    assert (by_id["wooster-query"]["alias_of"], by_id["wooster-query"]["query"]) == (MODEL, True)
    one = httpx.get(url + "/v1/models/wooster-query").json()
    assert one["id"] == "wooster-query" and one["purpose"] == "projects" and one["dim"] == 384


def test_bad_aliases_name_their_key(tmp_path):
    f = tmp_path / "flows.yaml"
    f.write_text("service:\n  model_aliases:\n    text-embedding-3-small: nope\n")
    with pytest.raises(ConfigError, match=r"service.model_aliases.text-embedding-3-small.purpose: 'nope'"):
        load_config(f)
    f.write_text("service:\n  model_aliases:\n    x: {purpose: projects, query: maybe}\n")
    with pytest.raises(ConfigError, match=r"service.model_aliases.x.query"):
        load_config(f)
    f.write_text("service:\n  model_aliases: {}\n")
    assert load_config(f).model_aliases() == {}
    f.write_text("purposes:\n  other: {}\n")
    assert load_config(f).model_aliases() == {}  # no `projects` purpose: no default aliases
