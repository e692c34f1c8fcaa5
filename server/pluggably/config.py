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
from pydantic import Field, ValidationError, field_validator, model_validator

# Registers the backend kinds (cheap: config models and presets only).
import pluggably.providers
import pluggably.runners
from pluggably.core import plugins
from pluggably.core.configmodel import StrictModel
from pluggably.runners.config import LocalConfig

ENV_PREFIX = "PLUGGABLY_"
_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad field and where it came from."""


class ServerConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # In-flight RPCs get this long to finish after SIGTERM/SIGINT before they are cancelled.
    grace_period_s: float = Field(10.0, ge=0)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)


class LoggingConfig(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class RoutingConfig(StrictModel):
    # model id or alias -> models tried in order when it fails before producing output. A
    # request's own `fallback_models` replace these.
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    # With a fallback left to try, a model that has produced no output after this long is
    # abandoned for the next one. None: wait as long as the model's own timeouts allow.
    first_chunk_timeout_s: float | None = Field(20.0, gt=0)


def _provider_sections() -> Any:
    models = tuple(kind.config_model for kind in plugins.kinds().values()
                   if "kind" in getattr(kind.config_model, "model_fields", {}))
    if not models:
        return dict[str, Any]
    union = models[0] if len(models) == 1 else Union[models]  # noqa: UP007 - a runtime tuple
    return dict[str, Annotated[union, Field(discriminator="kind")]]


class Config(StrictModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    # provider name -> its section; the name is the `provider` part of its model ids.
    providers: _provider_sections() = Field(default_factory=dict)  # type: ignore[valid-type]
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    # alias -> model id, e.g. {"tiny": "local/tiny-random-llama"}
    aliases: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _infer_provider_kinds(cls, data: Any) -> Any:
        """`providers: {openai: {}}` and `{groq: {}}` need no `kind:`: the name implies it."""
        if not isinstance(data, dict) or not isinstance(data.get("providers"), dict):
            return data
        providers = {}
        for name, section in data["providers"].items():
            section = {} if section is None else section
            if isinstance(section, dict) and "kind" not in section:
                implied = plugins.kind_for_provider_name(str(name))
                if implied is not None:
                    kind, preset = implied
                    section = {"kind": kind.name, **({"preset": preset} if preset else {}), **section}
            providers[name] = section
        return {**data, "providers": providers}

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, providers: dict[str, Any]) -> dict[str, Any]:
        for name in providers:
            if not _PROVIDER_NAME.match(name):
                raise ValueError(f"provider name {name!r}: use lower-case letters, digits, '-' and '_'")
            if name == pluggably.runners.LOCAL_PROVIDER:
                raise ValueError("'local' is the provider of the `local:` section; choose another name")
        return providers

    @field_validator("aliases")
    @classmethod
    def _aliases_name_models(cls, aliases: dict[str, str]) -> dict[str, str]:
        for alias, target in aliases.items():
            if "/" not in target:
                raise ValueError(f"alias {alias!r}: target {target!r} is not a 'provider/model' id")
        return aliases


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
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
        for err in exc.errors():
            loc = ".".join(str(p) for p in _field_path(err["loc"]))
            origin = _origin(loc, sources) or (f"file {path}" if path else "defaults")
            lines.append(f"  {loc or '<root>'}: {err['msg']} (from {origin})")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drops the union tag pydantic puts after a provider's name (`providers.x.openai.f`)."""
    if len(loc) >= 3 and loc[0] == "providers" and loc[2] in plugins.kinds():
        return (*loc[:2], *loc[3:])
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
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
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
                raise ConfigError(f"environment variable {key} is not valid YAML: {exc}") from None
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
        sources[".".join(parts)] = f"environment variable {key}"
    return sources
