"""Configuration: one YAML file plus environment overrides, validated at start.

Precedence: embedded defaults < YAML file (`--config` or `PLUGGABLY_CONFIG`) < environment
variables `PLUGGABLY_<SECTION>__<FIELD>` (double underscore between levels). Values are strings
converted by the field's type (`PLUGGABLY_SERVER__PORT=6000`); a value starting with `[` or `{`
is parsed as YAML (`PLUGGABLY_LOCAL__MODELS='[{name: m, path: /models/m}]'`).
Invalid configuration fails at start with the path of every bad field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "PLUGGABLY_"
DEFAULT_MODEL_NAME = "tiny-random-llama"
DEFAULT_MODEL_PATH = Path("var/models") / DEFAULT_MODEL_NAME


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad field and where it came from."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # In-flight RPCs get this long to finish after SIGTERM/SIGINT before they are cancelled.
    grace_period_s: float = Field(10.0, ge=0)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class LocalModelConfig(_Strict):
    name: str = Field(min_length=1)
    path: Path
    modality: Literal["text"] = "text"
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_concurrency: int = Field(1, ge=1)
    max_queue: int = Field(16, ge=0)
    default_max_tokens: int = Field(256, ge=1)
    context_length: int | None = Field(None, ge=1)
    description: str = ""

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'")


class LocalConfig(_Strict):
    models: list[LocalModelConfig] = Field(
        default_factory=lambda: [
            LocalModelConfig(
                name=DEFAULT_MODEL_NAME,
                path=DEFAULT_MODEL_PATH,
                description="Tiny random Llama built offline by `pluggably-make-tiny-model`; "
                "its output is gibberish.",
            )
        ]
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[LocalModelConfig]) -> list[LocalModelConfig]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate model names: {', '.join(duplicates)}")
        return models


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    # alias -> model id, e.g. {"tiny": "local/tiny-random-llama"}
    aliases: dict[str, str] = Field(default_factory=dict)

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
            loc = ".".join(str(p) for p in err["loc"])
            origin = _origin(loc, sources) or (f"file {path}" if path else "defaults")
            lines.append(f"  {loc or '<root>'}: {err['msg']} (from {origin})")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


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
