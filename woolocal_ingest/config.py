"""flows.yaml + environment -> typed settings; every error names the YAML key path and what was expected."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from woolocal_ingest.documents import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, SourceOptions
from woolocal_ingest.errors import ConfigError

CONFIG_FILE = "flows.yaml"
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
Backend = Literal["auto", "sentence-transformers", "onnx", "openvino", "mlx", "openai-compatible"]
Secrets = Literal["redact", "skip-file", "allow"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkingConfig(_Strict):
    """Chunk size and overlap, in tokens of the embedding model's own tokenizer."""

    chunk_tokens: int = Field(default=200, ge=16, le=8192)
    overlap_tokens: int = Field(default=32, ge=0, le=4096)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "ChunkingConfig":
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be smaller than chunk_tokens ({self.chunk_tokens})"
            )
        return self


class EndpointConfig(_Strict):
    """An OpenAI-compatible embeddings server the user already runs (this project's service, TEI, infinity, Ollama)."""

    urls: list[str] = Field(min_length=1, description="base URLs, e.g. http://127.0.0.1:8001/v1; taken round-robin")
    model: str | None = Field(default=None, description="model name sent to the server (default: the purpose's)")
    api_key_env: str | None = Field(default=None, description="environment variable holding the API key")
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)


class FallbackConfig(_Strict):
    """What embeds when the configured backend cannot load or fails mid-run (the whole store is then re-embedded)."""

    backend: Literal["sentence-transformers", "onnx", "openvino", "mlx", "openai-compatible"]
    model: str | None = None
    endpoint: EndpointConfig | None = None


class PurposeConfig(_Strict):
    """Which model embeds one purpose (Wooster's `projects`, `userProfile`)."""

    model: str = DEFAULT_MODEL
    backend: Backend = "auto"
    dimensions: int | None = Field(default=None, ge=1, description="expected dim; checked against the model")
    batch_size: int = Field(default=32, ge=1, le=4096)
    token_budget: int = Field(default=8192, ge=64, le=1_000_000, description="padded tokens per batch")
    endpoint: EndpointConfig | None = None  # for backend: openai-compatible
    fallback: FallbackConfig | None = None
    # Wooster's key: may text leave this machine for a fallback? Off = privacy-first, no connection is attempted
    # to any endpoint that is not on loopback.
    fallbackToCloud: bool = False
    # int8 (ONNX Runtime dynamic or OpenVINO NNCF quantization, gated against float32 on first use) or none (float32 weights)
    quantization: str = "none"
    on_gate_failure: str = Field(default="refuse", description="when int8 fails the accuracy gate: refuse | fp32")

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, v: str) -> str:
        from woolocal_ingest.embedders.quantize import QUANTIZATIONS

        if str(v).lower() not in QUANTIZATIONS:
            raise ValueError(f"{v!r} is not one of {', '.join(QUANTIZATIONS)}")
        return str(v).lower()

    @field_validator("on_gate_failure")
    @classmethod
    def _known_gate_failure(cls, v: str) -> str:
        from woolocal_ingest.embedders.quantize import ON_GATE_FAILURE

        if v not in ON_GATE_FAILURE:
            raise ValueError(f"{v!r} is not one of {', '.join(ON_GATE_FAILURE)}")
        return v

    @model_validator(mode="after")
    def _endpoint_when_remote(self) -> "PurposeConfig":
        if self.backend == "openai-compatible" and self.endpoint is None:
            raise ValueError("endpoint: required when backend is openai-compatible (urls: [http://...])")
        if self.fallback and self.fallback.backend == "openai-compatible" and self.fallback.endpoint is None:
            raise ValueError("fallback.endpoint: required when fallback.backend is openai-compatible")
        if self.quantization == "int8" and self.backend not in ("auto", "onnx", "openvino"):
            raise ValueError(f"quantization: int8 runs on the onnx or openvino backend (or auto), not backend "
                             f"{self.backend!r}")
        return self


def with_quantization(purpose: PurposeConfig, quantization: str, key: str = "--quantization") -> PurposeConfig:
    """`purpose` with its quantization overridden (a CLI flag); a bad value or backend is a ConfigError naming `key`."""
    try:
        return PurposeConfig(**{**purpose.model_dump(), "quantization": quantization})
    except ValidationError as e:
        msg = "; ".join(err["msg"].removeprefix("Value error, ").removeprefix("quantization: ") for err in e.errors())
        raise ConfigError(f"{key}.quantization: {msg}") from None


class TaskRunnerConfig(_Strict):
    """Where the flow's tasks run: threads in this process, or a Dask cluster (a LocalCluster when no address)."""

    type: Literal["thread", "dask"] = "thread"
    address: str | None = Field(default=None, description="tcp://host:port of a running Dask scheduler")
    workers: int = Field(default=2, ge=1, le=256, description="LocalCluster workers when no address is given")
    shard_chunks: int = Field(default=2000, ge=1, description="chunks per embedding task on Dask")


class CacheConfig(_Strict):
    """The embedding cache: identical texts are never embedded twice by the same model files."""

    enabled: bool = True
    path: Path | None = Field(default=None, description="SQLite file (default: <stores_root>/.cache/embeddings.sqlite)")
    max_mb: int = Field(default=2048, ge=1)


class ScheduleConfig(_Strict):
    """When a declared ingest or migration runs by itself (`woolocal schedule serve`)."""

    cron: str = Field(description="5-field cron expression, e.g. '0 3 * * *' (03:00 every night)")
    timezone: str = Field(default="UTC", description="IANA timezone the cron is read in, e.g. Europe/Berlin")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        from croniter import croniter

        if len(v.split()) != 5 or not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a valid 5-field cron expression (minute hour day month weekday)")
        return v

    @field_validator("timezone")
    @classmethod
    def _valid_tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not a known IANA timezone (e.g. UTC, Europe/Berlin)") from None
        return v


class ProjectConfig(_Strict):
    """One project folder to ingest into its own stores."""

    name: str
    path: Path
    purpose: str = "projects"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    stores_root: Path | None = None
    chunking: ChunkingConfig | None = None
    python_layout: bool | None = None
    schedule: ScheduleConfig | None = None
    # what is taken from the folder (default: `defaults`): .gitignore/.woolocalignore, secrets, size limit
    ignore_files: bool | None = None
    secrets: Secrets | None = None
    max_file_mb: float | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return _check_name(v, "project")


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _check_name(v: str, what: str) -> str:
    if not NAME_RE.fullmatch(v):
        raise ValueError(f"{v!r} is not a valid {what} name (letters, digits, '.', '_', '-'; no slashes)")
    return v


class MigrationConfig(_Strict):
    """One store to re-embed with a local model: on demand (`woolocal migrate --all`) or on its schedule."""

    name: str
    source: Path = Field(description="the store folder to migrate (LangChain JS/Python or a woolocal store)")
    to: str = Field(description="target: a purpose name from `purposes` or a model name/path")
    out: Path | None = Field(default=None, description="where the new store goes (default: beside stores_root)")
    in_place: bool = Field(default=False, description="replace the source (kept as a timestamped backup)")
    python_layout: bool | None = None
    schedule: ScheduleConfig | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return _check_name(v, "migration")

    @model_validator(mode="after")
    def _out_or_in_place(self) -> "MigrationConfig":
        if self.in_place and self.out is not None:
            raise ValueError("out: give either out or in_place: true, not both")
        return self


class WoosterConfig(_Strict):
    """A Wooster install to migrate in bulk (`woolocal migrate --all`): which purpose each kind of store goes to."""

    root: Path | None = Field(default=None, description="Wooster's folder (holds projects/ and vector_data/)")
    projects_purpose: str = "projects"          # projects/*/vectorStore
    user_profile_purpose: str = "userProfile"   # vector_data/*
    in_place: bool = True


class ChatConfig(_Strict):
    """The upstream OpenAI-compatible chat server the RAG endpoint forwards to (mlx_lm.server, Ollama, llama.cpp)."""

    upstream: str | None = Field(default=None, description="base URL, e.g. http://127.0.0.1:8080/v1")
    model: str | None = Field(default=None, description="model name sent upstream (default: the request's)")
    api_key_env: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, description="default; env LOCALMLX_MAX_TOKENS")
    temperature: float | None = Field(default=None, ge=0, le=2, description="default; env LOCALMLX_TEMPERATURE")
    timeout_s: float = Field(default=120.0, gt=0)
    k: int = Field(default=5, ge=1, le=100, description="chunks retrieved per question")


# OpenAI's embedding model names: what Wooster's (and most) OpenAI clients send. Served as the `projects` purpose by
# default, so a client switches to woolocal by changing only its base URL.
OPENAI_EMBEDDING_MODELS = ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002")


class ModelAlias(_Strict):
    """`service.model_aliases.<name>`: a model name clients send, served by a purpose's model."""

    purpose: str = Field(description="the purpose whose model answers to this name")
    query: bool = Field(default=False, description="embed inputs as queries (the model's query prefix, e.g. BGE's)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"purpose": v} if isinstance(v, str) else v


class ServiceConfig(_Strict):
    """`woolocal serve`: what it binds, which models it loads, its limits, and chat RAG."""

    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=1, le=65535)
    api_key_env: str = Field(default="WOOLOCAL_API_KEY", description="env var with the key (required off loopback)")
    models: list[str] = Field(default_factory=list, description="purposes or models to load (default: all purposes)")
    max_inputs: int = Field(default=2048, ge=1, le=2048)
    max_tokens_per_request: int = Field(default=300_000, ge=1)
    max_body_mb: float = Field(default=16.0, gt=0)
    queue_size: int = Field(default=1024, ge=1, description="texts waiting to embed; beyond it requests get 429")
    # CPU: small sorted batches pad least and keep both cores busy (bench/README.md: 1024 vs 8192 at 32 clients)
    max_batch_tokens: int = Field(default=1024, ge=64, description="padded tokens per dynamic batch (raise on a GPU)")
    batch_wait_ms: float = Field(default=2.0, ge=0)
    chat: ChatConfig = ChatConfig()
    aliases: dict[str, str] = Field(default_factory=dict, description="chat model alias -> store (project name/path)")
    model_aliases: dict[str, ModelAlias] | None = Field(
        default=None, description="embedding model name clients send -> purpose (+ query side); default: OpenAI's "
        "embedding model names -> projects; {} turns them off")


class Defaults(_Strict):
    """Values every project inherits unless it sets its own."""

    stores_root: Path = Path("stores")
    chunking: ChunkingConfig = ChunkingConfig()
    python_layout: bool = False
    ignore_files: bool = True  # .gitignore at every level, .git/info/exclude, .woolocalignore
    secrets: Secrets = "redact"  # redact | skip-file | allow
    max_file_mb: float = Field(default=20.0, gt=0)  # larger files are reported as too large, never read


class FlowsConfig(_Strict):
    """The whole of flows.yaml, with relative paths resolved against the file's folder."""

    version: Literal[1] = 1
    defaults: Defaults = Defaults()
    purposes: dict[str, PurposeConfig] = Field(
        default_factory=lambda: {"projects": PurposeConfig(), "userProfile": PurposeConfig()}
    )
    projects: list[ProjectConfig] = Field(default_factory=list)
    task_runner: TaskRunnerConfig = TaskRunnerConfig()
    cache: CacheConfig = CacheConfig()
    migrations: list[MigrationConfig] = Field(default_factory=list)
    wooster: WoosterConfig = WoosterConfig()
    service: ServiceConfig = ServiceConfig()
    base_dir: Path = Path(".")
    config_file: Path | None = None  # the flows.yaml read (None: built-in defaults); not a key of the file

    @model_validator(mode="after")
    def _check_refs(self) -> "FlowsConfig":
        seen: set[str] = set()
        for i, p in enumerate(self.projects):
            if p.name in seen:
                raise ValueError(f"projects[{i}].name: duplicate project name {p.name!r}")
            seen.add(p.name)
            if p.purpose not in self.purposes:
                raise ValueError(
                    f"projects[{i}].purpose: {p.purpose!r} is not one of the declared purposes "
                    f"{sorted(self.purposes)}"
                )
        mseen: set[str] = set()
        for i, m in enumerate(self.migrations):
            if m.name in mseen:
                raise ValueError(f"migrations[{i}].name: duplicate migration name {m.name!r}")
            mseen.add(m.name)
        for name, alias in (self.service.model_aliases or {}).items():
            if not name.strip():
                raise ValueError("service.model_aliases: an alias name must not be empty")
            if alias.purpose not in self.purposes:
                raise ValueError(f"service.model_aliases.{name}.purpose: {alias.purpose!r} is not one of the "
                                 f"declared purposes {sorted(self.purposes)}")
        for key in ("projects_purpose", "user_profile_purpose"):
            if self.wooster.root is not None and getattr(self.wooster, key) not in self.purposes:
                raise ValueError(f"wooster.{key}: {getattr(self.wooster, key)!r} is not one of the declared "
                                 f"purposes {sorted(self.purposes)}")
        return self

    # -- lookups -------------------------------------------------------------
    def project(self, name: str) -> ProjectConfig | None:
        """The declared project called `name`, or None."""
        return next((p for p in self.projects if p.name == name), None)

    def resolve_path(self, p: Path) -> Path:
        """A path from the file, made absolute against the folder flows.yaml lives in."""
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def project_root(self, project: ProjectConfig) -> Path:
        return self.resolve_path(project.path)

    def stores_root(self, project: ProjectConfig | None = None) -> Path:
        env = os.environ.get("WOOLOCAL_STORES")
        if project is not None and project.stores_root is not None:
            return self.resolve_path(project.stores_root)
        if env:
            return Path(env).expanduser().resolve()
        return self.resolve_path(self.defaults.stores_root)

    def chunking(self, project: ProjectConfig) -> ChunkingConfig:
        return project.chunking or self.defaults.chunking

    def python_layout(self, project: ProjectConfig) -> bool:
        return self.defaults.python_layout if project.python_layout is None else project.python_layout

    def sources(self, project: ProjectConfig, ignore_files: bool | None = None) -> SourceOptions:
        """What ingest takes from the project's folder; `ignore_files` False (`--no-ignore-files`) overrides."""
        d = self.defaults
        pick = lambda own, default: default if own is None else own  # noqa: E731
        return SourceOptions(
            ignore_files=pick(ignore_files, pick(project.ignore_files, d.ignore_files)),
            secrets=pick(project.secrets, d.secrets),
            max_file_mb=pick(project.max_file_mb, d.max_file_mb),
        )

    def purpose(self, name: str) -> PurposeConfig:
        return self.purposes[name]

    def cache_settings(self, disabled: bool = False) -> dict:
        """`cache` as the plain dict ingest and migrate take (its path made absolute against flows.yaml's folder)."""
        c = self.cache
        return {"enabled": c.enabled and not disabled, "path": str(self.resolve_path(c.path)) if c.path else None,
                "max_mb": c.max_mb}

    def migration(self, name: str) -> MigrationConfig | None:
        """The declared migration called `name`, or None."""
        return next((m for m in self.migrations if m.name == name), None)

    def model_aliases(self) -> dict[str, ModelAlias]:
        """`service.model_aliases`, or by default OpenAI's embedding model names -> the `projects` purpose (when
        one is declared)."""
        if self.service.model_aliases is not None:
            return dict(self.service.model_aliases)
        if "projects" not in self.purposes:
            return {}
        return {name: ModelAlias(purpose="projects") for name in OPENAI_EMBEDDING_MODELS}

    def prefect_home(self) -> Path:
        """Prefect's home for runs with this configuration (see `woolocal_ingest.state_dirs`)."""
        from woolocal_ingest.state_dirs import prefect_home

        return prefect_home(self.config_file)

    def adhoc_project(self, path: Path, name: str | None = None) -> ProjectConfig:
        """A project for a folder that flows.yaml does not declare (named `name`, else after the folder)."""
        if name is not None:
            try:
                _check_name(name, "project")
            except ValueError as e:
                raise ConfigError(f"--name: {e}") from None
        name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name).strip("-.") or "project"
        return ProjectConfig(name=name, path=path.resolve())


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _format_errors(path: Path, err: ValidationError, data: Any) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        loc = list(e["loc"])
        # pydantic reports a failing model validator at the model's own location; our message carries the key path.
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README 'Configuration')"
        got = ""
        if "input" in e and e["type"] not in ("missing", "extra_forbidden") and not isinstance(e["input"], dict):
            got = f" (got {e['input']!r})"
            if repr(e["input"]) in msg:  # the validator's own message already quotes the value
                got = ""
        if not loc and re.match(r"[A-Za-z_][\w.\[\]]*: ", msg):
            lines.append(f"  {msg}{got}")  # a top-level check whose message starts with the key path it is about
        else:
            lines.append(f"  {_loc(tuple(loc))}: {msg}{got}")
    return "\n".join(lines)


def quantized_config(cfg: FlowsConfig, quantization: str) -> FlowsConfig:
    """`cfg` with every purpose at `quantization` (`woolocal serve --quantization`); purposes on a remote backend keep
    theirs (their server decides), a backend that cannot run int8 is a ConfigError naming the purpose."""
    purposes = {name: (p if p.backend == "openai-compatible" else with_quantization(p, quantization, f"purposes.{name}"))
                for name, p in cfg.purposes.items()}
    return cfg.model_copy(update={"purposes": purposes})


def load_config(path: Path | str | None = None) -> FlowsConfig:
    """Read and validate flows.yaml.

    `path` None: $WOOLOCAL_CONFIG, else ./flows.yaml when it exists, else built-in defaults
    (relative paths then resolve against the current folder).
    """
    if path is None:
        env = os.environ.get("WOOLOCAL_CONFIG")
        if env:
            path = Path(env)
        elif Path(CONFIG_FILE).is_file():
            path = Path(CONFIG_FILE)
        else:
            return FlowsConfig(base_dir=Path.cwd())
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read configuration: {e}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    for internal in ("base_dir", "config_file"):
        if internal in data:
            raise ConfigError(f"{path}: {internal}: unknown key (paths are relative to the file's folder)")
    try:
        return FlowsConfig(**data, base_dir=path.resolve().parent, config_file=path.resolve())
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e, data)) from None
