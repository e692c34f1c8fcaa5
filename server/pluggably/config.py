"""Configuration: one YAML file plus environment overrides, validated at start.

Precedence: embedded defaults < YAML file (`--config` or `PLUGGABLY_CONFIG`) < environment
variables `PLUGGABLY_<SECTION>__<FIELD>` (double underscore between levels). Values are strings
converted by the field's type (`PLUGGABLY_SERVER__PORT=6000`); a value starting with `[` or `{`
is parsed as YAML (`PLUGGABLY_LOCAL__MODELS='[{name: m, path: /models/m}]'`).
Invalid configuration fails at start with the path of every bad field.

The root model is assembled from the backend kinds registered in `pluggably.core.plugins`: the
`local:` section is the local kind's model, and every entry of `providers:` is validated against
the model of its kind (named by `kind:`, or implied by the provider's name: `openai:`, or a
preset such as `groq:`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

# Registers the backend kinds (cheap: config models and presets only).
import pluggably.providers
import pluggably.runners
from pluggably.core import plugins
from pluggably.core.configmodel import StrictModel
from pluggably.runners.config import LocalConfig
from pluggably.storage.budget import StorageLimitsConfig

ENV_PREFIX = "PLUGGABLY_"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad field and where it came from."""


_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


class TlsConfig(StrictModel):
    """Server-side TLS of the gRPC listener (Envoy's listener has its own, in envoy/)."""

    # PEM files. Both or neither: with both, the listener speaks only TLS.
    cert_file: Path | None = None
    key_file: Path | None = None
    # PEM bundle of the CAs whose client certificates are required (mutual TLS).
    client_ca_file: Path | None = None
    # Must be true with `client_ca_file`: gRPC for Python cannot verify a client certificate
    # that is optional (it would accept any), so client certificates are all or nothing.
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file needs cert_file and key_file (TLS) as well")
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("require_client_cert needs client_ca_file")
        if self.client_ca_file is not None and not self.require_client_cert:
            raise ValueError(
                "client_ca_file needs require_client_cert: true (gRPC for Python cannot verify "
                "an optional client certificate)"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class ServerConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # In-flight RPCs get this long to finish after SIGTERM/SIGINT before they are cancelled.
    grace_period_s: float = Field(10.0, ge=0)
    # Largest request or response message. Envoy's REST body limit is rendered from this.
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Largest request header block (metadata). Envoy's limit is rendered from this, so REST and
    # native gRPC callers hit the same limit (431 / RESOURCE_EXHAUSTED) instead of a random one.
    max_metadata_bytes: int = Field(8 * 1024, ge=1024, le=64 * 1024)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    # Plaintext is served on loopback only; listening in the clear on any other address needs
    # this, said on purpose (e.g. behind a TLS-terminating proxy on a private network).
    allow_plaintext_remote: bool = False
    # Streams served at once by this process; one more gets RESOURCE_EXHAUSTED.
    max_concurrent_streams: int = Field(256, ge=1)
    # A stream still running after this long is ended with DEADLINE_EXCEEDED.
    max_stream_duration_s: float = Field(600.0, gt=0)
    # Listen on this Unix socket instead of host:port (local runner processes do).
    unix_socket: Path | None = None

    @model_validator(mode="after")
    def _plaintext_on_loopback(self) -> ServerConfig:
        if (
            not self.tls.enabled
            and self.host not in _LOOPBACK_HOSTS
            and not self.allow_plaintext_remote
        ):
            raise ValueError(
                f"host {self.host!r} is not loopback and TLS is off: configure server.tls "
                "(cert_file, key_file) or set server.allow_plaintext_remote: true"
            )
        return self


class LoggingConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # JSON lines (one object per event) for machines; text for a person at a terminal.
    format: Literal["text", "json"] = "json"
    # One `pluggably.access` event per RPC.
    access_log: bool = True
    # Prompt and output text are never logged unless this is on (DEBUG events then carry them).
    log_prompts: bool = False


class AuthConfig(StrictModel):
    """API keys: `authorization: Bearer <key>` on every RPC (the same header over REST)."""

    # Off only when said explicitly; with auth on and no active key, the server will not start.
    enabled: bool = True
    # SQLite file of keys (hashes only). Several server processes may share it; a revocation
    # takes effect on the next call in all of them.
    store: Path = Path("var/keys.db")
    # Health checks and reflection need no key unless these are turned off.
    public_health: bool = True
    public_reflection: bool = True


class KeyLimitsConfig(StrictModel):
    """Default rate limits of every API key (a key may carry its own). None: unlimited."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    concurrent_streams: int | None = Field(None, ge=1)


class ModelLimitsConfig(StrictModel):
    # Requests asking for more are rejected; requests that do not say get this as their limit.
    max_tokens: int | None = Field(None, ge=1)


class LimitsConfig(StrictModel):
    # Where per-key counters live: this process, or a Redis shared by several gateways.
    backend: Literal["memory", "redis"] = "memory"
    # redis://[:password@]host:port/db (the password is never logged).
    redis_url: str = "redis://127.0.0.1:6379/0"
    per_key: KeyLimitsConfig = Field(default_factory=KeyLimitsConfig)
    # Characters of prompt text (all messages) a request may carry, checked before any model
    # work; a model's context length is checked after tokenizing, within this bound.
    max_prompt_chars: int = Field(1_000_000, ge=1)
    # Per model id (or alias); "*" applies to every model without its own entry.
    models: dict[str, ModelLimitsConfig] = Field(default_factory=dict)


class MetricsConfig(StrictModel):
    """Prometheus exposition on its own port (set PROMETHEUS_MULTIPROC_DIR for several
    processes)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class TracingConfig(StrictModel):
    """OpenTelemetry traces (`pip install 'pluggably[tracing]'`). Off: nothing is imported."""

    enabled: bool = False
    exporter: Literal["otlp", "console"] = "otlp"
    # OTLP/HTTP endpoint; None: OTEL_EXPORTER_OTLP_ENDPOINT or http://localhost:4318.
    endpoint: str | None = None
    service_name: str = "pluggably"
    sample_ratio: float = Field(1.0, ge=0, le=1)


def default_hf_cache() -> Path:
    """The Hugging Face cache other tools use, as huggingface_hub finds it (HF_HUB_CACHE, then
    HF_HOME/hub, then ~/.cache/huggingface/hub), without importing huggingface_hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


class HubConfig(StrictModel):
    """The Hugging Face Hub (or a mirror) that DownloadModel fetches from."""

    # Default: $HF_ENDPOINT, else the public Hub.
    endpoint: str = Field(
        default_factory=lambda: os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    )
    # The environment variable holding the Hub token (gated and private repos). The token is
    # read from the environment only, never from the config file, and never logged.
    token_env: str = "HF_TOKEN"
    # Seconds for each metadata request (repository info, file listing).
    timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    # Downloads transferring at once; more wait in the QUEUED state.
    max_concurrent: int = Field(2, ge=1)


class StorageConfig(StrictModel):
    """Local models and generated files on disk: where they live, and how they are found."""

    # The registry of local models (registry.db), the artifact store and temporary files.
    root: Path = Path("var/storage")
    # The Hugging Face cache: downloads go there (shared with the user's other tools, no second
    # copy) and it is scanned for models. Default: where huggingface_hub puts it.
    hf_cache: Path = Field(default_factory=default_hf_cache)
    # Download into this folder instead (`<folder>/<repo id>`), outside the Hugging Face cache.
    downloads_dir: Path | None = None
    # Folders scanned for models (transformers folders, diffusers pipelines, GGUF and
    # safetensors files). The gateway may delete what it finds there.
    model_folders: list[Path] = Field(default_factory=list)
    # Whether the Hugging Face cache is scanned for models (what other tools downloaded).
    scan_hf_cache: bool = True
    # Seconds between scans of the folders and the cache; 0: only at start and on request.
    rescan_interval_s: float = Field(300.0, ge=0, allow_inf_nan=False)
    # Whether DeleteModel may remove files the gateway did not download and that are outside
    # `model_folders` (for example models another tool put in the Hugging Face cache).
    delete_unowned: bool = False
    # Disk limits per category and in all, space always left free, and eviction of idle models.
    limits: StorageLimitsConfig = Field(default_factory=StorageLimitsConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    # How long generated files are kept (seconds); None: until pruned or deleted.
    artifact_ttl_s: float | None = Field(7 * 24 * 3600.0, gt=0, allow_inf_nan=False)


class RoutingConfig(StrictModel):
    # model id or alias -> models tried in order when it fails before producing output. A
    # request's own `fallback_models` replace these.
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    # With a fallback left to try, a model that has produced no output after this long is
    # abandoned for the next one. None: wait as long as the model's own timeouts allow.
    first_chunk_timeout_s: float | None = Field(20.0, gt=0)


def _check_provider_name(name: str) -> str:
    if not _PROVIDER_NAME.match(name):
        raise ValueError(f"provider name {name!r}: use lower-case letters, digits, '-' and '_'")
    if name == pluggably.runners.LOCAL_PROVIDER:
        raise ValueError("'local' is the provider of the `local:` section; choose another name")
    return name


# Checked as the key, so an error is reported at `providers.<name>`, not at `providers`.
ProviderName = Annotated[str, AfterValidator(_check_provider_name)]


def _provider_kinds() -> dict[str, plugins.BackendKind]:
    """The kinds a `providers:` entry may name (the local kind has its own section)."""
    return {
        name: kind
        for name, kind in plugins.kinds().items()
        if "kind" in getattr(kind.config_model, "model_fields", {})
    }


def _provider_sections() -> Any:
    models = tuple(kind.config_model for kind in _provider_kinds().values())
    if not models:
        return dict[ProviderName, Any]
    union = models[0] if len(models) == 1 else Union[models]  # noqa: UP007 - a runtime tuple
    # A union built at run time from the registered kinds is no static type; pydantic reads it.
    return dict[ProviderName, Annotated[union, Field(discriminator="kind")]]  # type: ignore[valid-type]


class Config(StrictModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    # provider name -> its section; the name is the `provider` part of its model ids.
    providers: _provider_sections() = Field(default_factory=dict)  # type: ignore[valid-type]
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    # alias -> model id, e.g. {"tiny": "local/tiny-random-llama"}
    aliases: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _infer_provider_kinds(cls, data: Any) -> Any:
        """`providers: {openai: {}}` and `{groq: {}}` need no `kind:`: the name implies it, and
        the preset of that name. A section that names the implied kind itself (`groq: {kind:
        openai}`) still gets the preset: otherwise Groq would be sent to OpenAI with OpenAI's key."""
        if not isinstance(data, dict) or not isinstance(data.get("providers"), dict):
            return data
        providers = {}
        for name, section in data["providers"].items():
            section = {} if section is None else section
            implied = plugins.kind_for_provider_name(str(name))
            if (
                isinstance(section, dict)
                and implied is not None
                and implied[0].name in _provider_kinds()
            ):
                kind, preset = implied
                if section.get("kind", kind.name) == kind.name:
                    defaults = kind.presets.get(preset, {}) if preset else {}
                    section = {"kind": kind.name, **defaults, **section}
            providers[name] = section
        return {**data, "providers": providers}

    @field_validator("aliases")
    @classmethod
    def _aliases_name_models(cls, aliases: dict[str, str]) -> dict[str, str]:
        for alias, target in aliases.items():
            if "/" not in target:
                raise ValueError(f"alias {alias!r}: target {target!r} is not a 'provider/model' id")
        return aliases


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    environ = os.environ if environ is None else environ
    path = path or environ.get("PLUGGABLY_CONFIG") or None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        data = loaded or {}
    sources = _apply_env(data, environ)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        errors = exc.errors()
        # A provider whose name is refused needs no further word on its section's kind.
        bad_names = {
            e["loc"][:2]
            for e in errors
            if e["loc"][:1] == ("providers",) and e["loc"][2:] == ("[key]",)
        }
        for err in errors:
            if err["type"].startswith("union_tag_") and err["loc"][:2] in bad_names:
                continue
            loc, message = _describe(err)
            variable = _origin(loc, sources)
            if variable is not None:
                raw = environ[variable.rsplit(" ", 1)[-1]]
                message = _redact(message, raw)
                loc = _redact(loc, raw)
            origin = variable or (f"file {path}" if path else "defaults")
            lines.append(f"  {loc or '<root>'}: {message} (from {origin})")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def _describe(err: Any) -> tuple[str, str]:
    """(field path, message) of one validation error. Pydantic's words for a provider section
    whose kind is unknown or missing ("Unable to extract tag using discriminator") say nothing
    to someone writing a config file: say which kinds and presets exist instead."""
    loc = _field_path(err["loc"])
    message = err["msg"]
    if len(loc) == 2 and loc[0] == "providers" and err["type"].startswith("union_tag_"):
        kinds = ", ".join(sorted(_provider_kinds()))
        presets = ", ".join(sorted(p for k in _provider_kinds().values() for p in k.presets))
        loc = (*loc, "kind")
        if err["type"] == "union_tag_invalid":
            tag = (err.get("ctx") or {}).get("tag")
            message = f"unknown kind {tag!r}; known kinds: {kinds}"
        else:
            message = (
                f"{loc[1]!r} is neither a kind ({kinds}) nor a preset ({presets}), so "
                f"the section must say its `kind:` (an OpenAI-compatible endpoint: "
                f"`kind: openai` with its `base_url`)"
            )
    return ".".join(str(p) for p in loc), message


def _redact(message: str, raw: str) -> str:
    """`message` without any part of an environment value: a variable may hold a secret (an API
    key set in the wrong variable), and errors go to the console and logs."""
    pieces = {raw}
    try:
        parsed = yaml.safe_load(raw) if raw.lstrip().startswith(("[", "{")) else None
    except yaml.YAMLError:
        parsed = None
    stack: list[Any] = [parsed]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            # Keys shaped like field names are names (`path`, an alias); anything else in a key
            # position may be a value pasted in the wrong place.
            stack.extend(k for k in item if not _IDENTIFIER.match(str(k)))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif item is not None and not isinstance(item, bool):
            pieces.add(str(item))
    for piece in sorted(pieces, key=len, reverse=True):
        if len(piece) >= 3:
            message = message.replace(repr(piece), "<value hidden>").replace(
                piece, "<value hidden>"
            )
    return message


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drops the union tag pydantic puts after a provider's name (`providers.x.openai.f`) and
    the marker of an invalid mapping key (`providers.x.[key]`)."""
    if len(loc) >= 3 and loc[0] == "providers" and loc[2] in plugins.kinds():
        return (*loc[:2], *loc[3:])
    if len(loc) == 3 and loc[0] == "providers" and loc[2] == "[key]":
        return loc[:2]
    return loc


def _origin(loc: str, sources: dict[str, str]) -> str | None:
    """The environment variable that set `loc`, a field below it, or a section above it."""
    for field, variable in sources.items():
        if loc == field or loc.startswith(field + ".") or field.startswith(loc + "."):
            return variable
    return None


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Merges PLUGGABLY_A__B=value into data; returns field path -> variable name."""
    sources: dict[str, str] = {}
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or key == "PLUGGABLY_CONFIG":
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        raw = environ[key]
        value: Any = raw
        # Only lists and mappings are parsed; scalars stay strings for pydantic to convert by
        # the field's type, so a secret such as an API key is never reinterpreted as YAML.
        if raw.lstrip().startswith(("[", "{")):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                # Never the parser's text: it quotes the value, which may be a secret.
                mark = getattr(exc, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                raise ConfigError(f"environment variable {key} is not valid YAML{where}") from None
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
        sources[".".join(parts)] = f"environment variable {key}"
    return sources
