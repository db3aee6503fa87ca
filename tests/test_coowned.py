"""Co-owned stores: Wooster (LangChain JS) and LangChain Python write into our stores between (and during) our runs;
every reader keeps working and says what changed, every writing run adopts their rows, nothing of theirs is lost.

Real writers: LangChain JS `FaissStore.load -> delete/addVectors -> save` through node (tests/coowned_writer.mjs, run
from the folder ../shared/tools/langchain-js/setup.sh builds) and LangChain Python `FAISS.load_local -> add_texts /
delete -> save_local`. The model is the packaged MiniLM (the session `embedder`)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from test_interop import assert_same_ranking, check_store, langchain_js  # noqa: F401  (fixture)
from woolocal_ingest import migrate, stores
from woolocal_ingest.api import open_store
from woolocal_ingest.chunking import ChunkSettings
from woolocal_cli import main
from woolocal_ingest.coowned import read_current
from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from woolocal_ingest.errors import StoreError
from woolocal_ingest.ingest import run_ingest
from woolocal_ingest.stores import Store, verify_store

HERE = Path(__file__).resolve().parent
MEMORY = "The user's bicycle is a green Brompton with a squeaky rear brake."
DOCS = {
    "tools.md": "# Tool shed\n\nThe key to the tool shed hangs on the hook behind the greenhouse door.\n\n"
                "## Wheelbarrows\n\nWe own two wheelbarrows; the red one has a flat tyre that needs a new tube.\n",
    "compost.md": "# Compost\n\nThe compost heap is turned every second Saturday by whoever is on the rota.\n\n"
                  "## Rules\n\nNo meat, no dairy, no cooked food. Coffee grounds are welcome.\n",
    "water.md": "# Watering\n\nThe rain barrels are emptied into the cans before the hose is used.\n",
}


def tree_hash(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def make_project(base: Path) -> Path:
    root = base / "garden"
    root.mkdir(parents=True)
    for name, text in DOCS.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def ingest(root: Path, stores_root: Path, embedder, python_layout: bool = False):
    return run_ingest("garden", root, stores_root, embedder, ChunkSettings(48, 8), DEFAULT_INCLUDE, DEFAULT_EXCLUDE,
                      python_layout=python_layout)


def js_write(tool: Path, store: Path, tmp_path: Path, add=(), delete=()) -> None:
    """One LangChain JS save into `store` (a separate node process, as Wooster is)."""
    ops = tmp_path / f"ops-{len(list(tmp_path.glob('ops-*')))}.json"
    ops.write_text(json.dumps({"add": list(add), "delete": list(delete)}), encoding="utf-8")
    shutil.copy2(HERE / "coowned_writer.mjs", tool / "coowned_writer.mjs")
    proc = subprocess.run(["node", str(tool / "coowned_writer.mjs"), str(store), str(ops)], cwd=tool,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def memory(embedder, id_: str = "wooster-memory-1", text: str = MEMORY) -> dict:
    return {"id": id_, "text": text, "metadata": {"source": "wooster:memory", "kind": "fact"},
            "vector": [float(x) for x in embedder.embed_documents([text])[0]]}


@pytest.fixture
def garden(tmp_path, embedder):
    root = make_project(tmp_path)
    s = ingest(root, tmp_path / "stores", embedder)
    return root, Path(s.store), s


def test_wooster_append_delete_rewrite_survive_every_command(tmp_path, embedder, garden, langchain_js):
    root, path, first = garden
    before = {c.id: c for c in Store(path).chunks()}
    tools = [c for c in before.values() if c.source == "tools.md"]
    compost = [c for c in before.values() if c.source == "compost.md"]
    gone, rewritten = tools[0].id, compost[-1].id
    new_text = "Compost rules changed: cooked vegetables are now allowed, meat still is not."
    js_write(langchain_js, path, tmp_path, delete=[gone, rewritten],
             add=[memory(embedder), {**memory(embedder, rewritten, new_text), "metadata": compost[-1].metadata}])

    # Readers: verify is sound and names the change; open/query/search serve what Wooster wrote.
    assert verify_store(path) == []
    st = open_store(path, embedder=embedder)
    assert st.count == first.count  # -2 deleted, +2 added (one of them the rewrite)
    assert (set(st.drift.added), set(st.drift.deleted), set(st.drift.rewritten)) == (
        {"wooster-memory-1"}, {gone}, {rewritten})
    assert st.search(MEMORY, k=1)[0].id == "wooster-memory-1"
    # BM25 covers what Wooster wrote (brought up to date in memory), never the text it replaced
    assert st.search("bicycle", k=1, mode="lexical")[0].id == "wooster-memory-1"
    assert rewritten in {h.id for h in st.search("cooked vegetables allowed", k=3, mode="lexical")}
    assert gone not in {h.id for h in st.search(tools[0].text, k=st.count, mode="lexical")}
    r = CliRunner().invoke(main, ["stores", "verify", str(path)])
    assert r.exit_code == 0, r.output
    assert "changed outside woolocal (langchain-js): +1 rows, \u22121 rows, 1 rewritten" in r.stdout
    r = CliRunner().invoke(main, ["query", str(path), "which bicycle does the user ride?", "--json", "-k", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["id"] == "wooster-memory-1"

    # The next ingest of the unchanged folder adopts: Wooster's memory kept (re-embedded with our model), its
    # rewrite kept, our row it deleted restored (the folder is the truth for its own files).
    s = ingest(root, tmp_path / "stores", embedder)
    assert s.written and s.count == first.count + 1
    assert (s.adoption["adopted"], s.adoption["restored"], s.adoption["kept"]) == (2, 1, 1)
    assert s.adoption["outside"][0]["added"] == 1 and s.added == 0 and s.deleted == 0
    after = Store(path)
    rows = {c.id: c for c in after.chunks()}
    assert rows["wooster-memory-1"].text == MEMORY and rows["wooster-memory-1"].metadata["kind"] == "fact"
    assert rows[rewritten].text == new_text and rows[gone].text == before[gone].text
    assert set(rows) == set(before) | {"wooster-memory-1"}
    assert verify_store(path) == [] and not after.drift.changed  # lexical.sqlite included: adopted rows indexed
    assert after.search("bicycle", k=1, mode="lexical")[0].id == "wooster-memory-1"
    assert after.lexical.counts.inserted == 0  # the written index already holds every row
    # our vector for Wooster's row is the model's own for its text
    v = after.vectors()[after.ids.index("wooster-memory-1")]
    assert float(v @ embedder.embed_documents([MEMORY])[0]) > 0.9999
    # Wooster's reader opens the result and ranks as we do.
    queries = np.stack([embedder.embed_query(q) for q in ("bicycle brake", "tool shed key", "compost rules")])
    assert_same_ranking(check_store(langchain_js, path, queries, tmp_path, k=5), after, queries)
    # A further run has nothing to do.
    again = ingest(root, tmp_path / "stores", embedder)
    assert not again.written and again.count == s.count

    # Editing the folder: the changed file's chunks come from the folder, Wooster's memory stays.
    (root / "compost.md").write_text(DOCS["compost.md"] + "\nLeaves go in the leaf-mould cage.\n", encoding="utf-8")
    s3 = ingest(root, tmp_path / "stores", embedder)
    rows3 = {c.id: c for c in Store(path).chunks()}
    assert "wooster-memory-1" in rows3 and s3.adoption["kept"] == 1
    assert any("leaf-mould" in c.text for c in rows3.values())


def test_langchain_python_writes_are_adopted(tmp_path, embedder):
    from langchain_community.vectorstores import FAISS

    from woolocal_ingest.langchain import WoolocalEmbeddings

    root = make_project(tmp_path)
    path = Path(ingest(root, tmp_path / "stores", embedder, python_layout=True).store)
    ids = Store(path).ids
    lc = FAISS.load_local(str(path), WoolocalEmbeddings(embedder=embedder), allow_dangerous_deserialization=True)
    lc.add_texts([MEMORY], metadatas=[{"source": "notebook"}], ids=["py-note-1"])
    lc.delete([ids[-1]])
    lc.save_local(str(path))
    assert verify_store(path) == []  # faiss.index + docstore.json are as we wrote them
    cur = read_current(path)
    assert [d.layout for d in cur.drifts] == ["langchain-python"]
    assert (cur.drifts[0].added, cur.drifts[0].deleted) == (("py-note-1",), (ids[-1],))
    r = CliRunner().invoke(main, ["stores", "verify", str(path)])
    assert r.exit_code == 0 and "(langchain-python): +1 rows, \u22121 rows" in r.stdout, r.output

    s = ingest(root, tmp_path / "stores", embedder, python_layout=True)
    assert s.written and s.adoption["adopted"] == 1 and s.adoption["restored"] == 1
    st = Store(path)
    assert set(st.ids) == set(ids) | {"py-note-1"} and verify_store(path) == []
    back = FAISS.load_local(str(path), WoolocalEmbeddings(embedder=embedder), allow_dangerous_deserialization=True)
    hit = back.similarity_search(MEMORY, k=1)[0]
    assert hit.id == "py-note-1" and hit.page_content == MEMORY


def test_in_place_migration_adopts_wooster_memories_and_rolls_back(tmp_path, embedder, langchain_js):
    from test_migrate import expected_rows, make_js_store, write_config
    from woolocal_ingest.config import load_config

    profile = make_js_store(tmp_path / "wooster" / "vector_data" / "user_profile_store", expected_rows()[:12])
    cfg = load_config(write_config(tmp_path, wooster={"root": "wooster"}))
    first = migrate.migrate_store(profile, "userProfile", config=cfg, in_place=True, embedder=embedder)
    assert first.status == "migrated"
    js_write(langchain_js, profile, tmp_path, add=[memory(embedder)])  # Wooster remembers a fact
    assert verify_store(profile) == []
    again = migrate.migrate_all(cfg)  # the nightly run: walks wooster.root, in place
    assert [m.status for m in again] == ["migrated"], [m.error for m in again]
    assert again[0].adoption["adopted"] == 1 and again[0].embedded == 1  # only Wooster's row was embedded
    st = Store(profile)
    assert st.count == first.count + 1 and "wooster-memory-1" in st.ids and verify_store(profile) == []
    assert not st.drift.changed
    assert [m.status for m in migrate.migrate_all(cfg)] == ["unchanged"]
    # Rollback puts the version Wooster wrote back (its memory included), the adopted one is kept aside.
    migrate.rollback(profile)
    assert "wooster-memory-1" in Store(profile).ids


@pytest.mark.parametrize("point", ["during-embedding", "at-swap"])
def test_a_write_racing_our_run_is_adopted(tmp_path, embedder, garden, langchain_js, monkeypatch, point):
    root, path, first = garden
    (root / "water.md").write_text(DOCS["water.md"] + "\nThe hose lives in the blue box.\n", encoding="utf-8")
    fired = []

    def write_once():
        if not fired:
            fired.append(True)
            js_write(langchain_js, path, tmp_path, add=[memory(embedder)])

    if point == "during-embedding":
        import woolocal_ingest.ingest as ing

        real = ing.embed_texts
        monkeypatch.setattr(ing, "embed_texts",
                            lambda emb, texts, *progress: (write_once(), real(emb, texts, *progress))[1])
    else:  # after the pre-swap check, before the rename: the swapped-out version holds Wooster's write
        real_swap = stores.swap_into_place
        monkeypatch.setattr(stores, "swap_into_place", lambda tmp, target: (write_once(), real_swap(tmp, target))[1])
    s = ingest(root, tmp_path / "stores", embedder)
    assert fired and s.written
    rows = {c.id: c.text for c in Store(path).chunks()}
    assert rows.get("wooster-memory-1") == MEMORY and any("blue box" in t for t in rows.values())
    assert verify_store(path) == [] and not Store(path).drift.changed
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp folders left behind"


def test_damaged_store_is_an_error_not_an_adoption(tmp_path, embedder, garden):
    root, path, _ = garden
    data = (path / "faiss.index").read_bytes()
    (path / "faiss.index").write_bytes(data[: len(data) - 100])  # a save cut short
    snap = tree_hash(path)
    with pytest.raises(StoreError, match="--rebuild") as ei:
        ingest(root, tmp_path / "stores", embedder)
    assert "faiss.index" in str(ei.value)
    assert tree_hash(path) == snap  # nothing touched
    r = CliRunner().invoke(main, ["stores", "verify", str(path)])
    assert r.exit_code == 1 and "faiss.index" in r.stdout
    s = run_ingest("garden", root, tmp_path / "stores", embedder, ChunkSettings(48, 8), DEFAULT_INCLUDE,
                   DEFAULT_EXCLUDE, rebuild=True)
    assert s.written and s.backup and Path(s.backup).name.startswith(path.name + ".bak-")
    assert tree_hash(Path(s.backup)) == snap and verify_store(path) == []


def test_service_search_sees_a_wooster_write_without_restart(tmp_path, embedder, garden, langchain_js):
    import httpx
    from servers import running

    from woolocal_ingest.config import FlowsConfig, ProjectConfig, ServiceConfig
    from woolocal_ingest.service.app import create_app

    root, path, _ = garden
    cfg = FlowsConfig(base_dir=tmp_path, projects=[ProjectConfig(name="garden", path=root)],
                      service=ServiceConfig(models=[]))
    app = create_app(cfg, stores_root=tmp_path / "stores", load_in_background=False)
    vec = [float(x) for x in embedder.embed_query("which bicycle does the user ride?")]
    with running(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        url = f"/v1/stores/garden/{path.name}/search"
        r = client.post(url, json={"vector": vec, "k": 1})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["id"] != "wooster-memory-1"
        js_write(langchain_js, path, tmp_path, add=[memory(embedder)])
        r = client.post(url, json={"vector": vec, "k": 1})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["id"] == "wooster-memory-1" and r.json()["data"][0]["text"] == MEMORY


def test_migration_out_target_keeps_rows_wooster_added_and_deleted(tmp_path, embedder, langchain_js):
    """A store migrated with --out that Wooster then uses: the nightly re-run (source unchanged) adopts its new
    memory and leaves the row it deleted deleted, instead of re-creating the store from the source."""
    from test_migrate import expected_rows, make_js_store, write_config

    from woolocal_ingest.config import load_config

    src = make_js_store(tmp_path / "legacy", expected_rows()[:8])
    out = tmp_path / "local" / "all-minilm-l6-v2-384d"
    cfg = load_config(write_config(tmp_path))
    first = migrate.migrate_store(src, "projects", config=cfg, out=out, embedder=embedder)
    assert first.status == "migrated"
    ids = Store(out).ids
    js_write(langchain_js, out, tmp_path, add=[memory(embedder)], delete=[ids[0]])
    again = migrate.migrate_store(src, "projects", config=cfg, out=out, embedder=embedder)
    assert again.status == "migrated" and again.adoption["adopted"] == 1 and again.adoption["stayed_deleted"] == 1
    assert again.embedded == 1  # only Wooster's row: every other vector is ours already
    st = Store(out)
    assert set(st.ids) == (set(ids) - {ids[0]}) | {"wooster-memory-1"}
    assert verify_store(out) == [] and not st.drift.changed
    assert migrate.migrate_store(src, "projects", config=cfg, out=out, embedder=embedder).status == "unchanged"
