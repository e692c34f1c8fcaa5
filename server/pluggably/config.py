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
    return dict[ProviderName, Annotated[union, Field(discriminator="kind")]]


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
            origin = _origin(loc, sources) or (f"file {path}" if path else "defaults")
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
