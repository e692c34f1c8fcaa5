"""Config sections of the hosted provider kinds (`providers.<name>:`).

Every hosted kind shares `HostedProviderConfig`: where the API is, its key, its models and what
they take, timeouts, retries and the circuit breaker. Each kind adds its own fields.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from pluggably.core.configmodel import StrictModel
from pluggably.core.params import IMAGE_PARAMETERS, IMAGE_SIDE_MULTIPLE
from pluggably.core.types import Capabilities


class Timeouts(StrictModel):
    # TCP (and TLS) connection set-up.
    connect_s: float = Field(10.0, gt=0)
    # Streams: from sending the request to the first byte of the response body. Unary calls wait
    # for the whole response instead, bounded by `total_s`.
    first_byte_s: float = Field(120.0, gt=0)
    # Streams: the longest gap between two reads of the body (keep-alive comments count).
    idle_s: float = Field(60.0, gt=0)
    # One whole attempt. Every timeout is also bounded by the client's gRPC deadline.
    total_s: float = Field(600.0, gt=0)


class RetryPolicy(StrictModel):
    # Attempts in all (1: no retries). Retries happen only on connection errors, timeouts,
    # 408, 429 and 5xx, and only while nothing has been sent to the client.
    max_attempts: int = Field(3, ge=1, le=10)
    initial_backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(8.0, ge=0)
    # A provider asking to wait longer than this (Retry-After) fails the attempt at once with
    # RESOURCE_EXHAUSTED and RetryInfo, instead of holding the client.
    max_retry_after_s: float = Field(20.0, ge=0)


class BreakerPolicy(StrictModel):
    # Consecutive failures (server errors, timeouts, unusable responses) that open a model's
    # circuit; 0 turns the breaker off.
    failure_threshold: int = Field(5, ge=0)
    # How long an open circuit refuses requests before one probe may go through.
    open_s: float = Field(30.0, gt=0)


class CapabilityOverrides(StrictModel):
    """Unset fields keep what the gateway knows of the model (or the provider's defaults)."""

    streaming: bool | None = None
    tools: bool | None = None
    vision: bool | None = None
    json_object: bool | None = None
    json_schema: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)

    def apply(self, base: Capabilities) -> Capabilities:
        values = {k: v for k, v in self.model_dump().items() if v is not None}
        return Capabilities(**{**base.__dict__, **values})


class HostedModelConfig(StrictModel):
    # The model's name at the provider; the gateway id is `<provider>/<name>`.
    name: str = Field(min_length=1)
    description: str = ""
    context_length: int | None = Field(None, ge=1)
    # `max_tokens` used when a request sets none (Anthropic requires one on every request).
    default_max_tokens: int | None = Field(None, ge=1)
    capabilities: CapabilityOverrides = Field(default_factory=CapabilityOverrides)


_SIZE = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")
_SIDE = next(spec for spec in IMAGE_PARAMETERS if spec.name == "image.width")


class ImageModelOverrides(StrictModel):
    """What an image model takes. Unset fields keep what the gateway knows of the model's family
    (OpenAI's GPT Image, DALL·E 3, DALL·E 2) or, for other models, the defaults: any size, up to 8
    images, PNG, `response_format: b64_json`."""

    # The sizes the model renders, "WIDTHxHEIGHT", or "any" (any size within the gateway's range,
    # sent as WIDTHxHEIGHT). A request for another size is refused with the list.
    sizes: list[str] | Literal["any"] | None = None
    # Images per request (`n`).
    max_count: int | None = Field(None, ge=1)
    # File formats the model returns; more than png means the endpoint takes `output_format`.
    formats: list[Literal["png", "jpeg", "webp"]] | None = Field(None, min_length=1)
    # What to send as `response_format`: b64_json (the image in the response), url (a link the
    # gateway downloads), or none (the endpoint takes no such field, as GPT Image models).
    response_format: Literal["b64_json", "url", "none"] | None = None
    # The longest prompt the model takes, in characters (checked before sending).
    max_prompt_chars: int | None = Field(None, ge=1)

    @field_validator("sizes")
    @classmethod
    def _valid_sizes(cls, sizes: list[str] | str | None) -> list[str] | str | None:
        if not isinstance(sizes, list):
            return sizes
        low, high = int(_SIDE.minimum or 1), int(_SIDE.maximum or 1 << 16)
        for size in sizes:
            match = _SIZE.match(size)
            if match is None:
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
            for side in map(int, match.groups()):
                # A size no request could ask for (the shared range and grid) is a config error.
                if not low <= side <= high or side % IMAGE_SIDE_MULTIPLE:
                    raise ValueError(
                        f"{size!r}: sides must be multiples of {IMAGE_SIDE_MULTIPLE} "
                        f"in [{low}, {high}]"
                    )
        if not sizes:
            raise ValueError('list at least one size, or "any"')
        return sizes


class OpenAIModelConfig(HostedModelConfig):
    # What the model produces: text (Chat Completions) or image (the Images API,
    # `POST /images/generations`).
    modality: Literal["text", "image"] = "text"
    # Image models only: what the model takes, where its family's defaults do not fit.
    image: ImageModelOverrides | None = None

    @model_validator(mode="after")
    def _image_fields_for_image_models(self) -> OpenAIModelConfig:
        if self.modality == "text" and self.image is not None:
            raise ValueError("`image` is for models with `modality: image`")
        if self.modality == "image" and (
            self.context_length is not None
            or self.default_max_tokens is not None
            or self.capabilities != CapabilityOverrides()
        ):
            raise ValueError(
                "context_length, default_max_tokens and capabilities are for text models; an "
                "image model takes `image:` settings"
            )
        return self


class HostedProviderConfig(StrictModel):
    kind: str
    # The API's base URL; each kind and preset has a default.
    base_url: str | None = None
    # The key itself (prefer `api_key_env`: a key in a config file ends up in backups and diffs).
    api_key: SecretStr | None = None
    # The environment variable holding the key; each kind and preset has a default.
    api_key_env: str | None = None
    # Extra request headers, e.g. OpenRouter's `HTTP-Referer`/`X-Title`. Never logged.
    headers: dict[str, str] = Field(default_factory=dict)
    # Models served under this provider, with what the gateway should know about them.
    models: list[HostedModelConfig] = Field(default_factory=list)
    # List the provider's models through its API (in the background, never on a request) and
    # serve those too.
    list_models: bool = True
    list_refresh_s: float = Field(600.0, ge=10)
    # Serve model names that are neither configured nor listed (new models work at once), with
    # `default_capabilities`.
    allow_unlisted_models: bool = True
    # What models the gateway knows nothing about can take (known families keep what they take;
    # override those per model under `models:`).
    default_capabilities: CapabilityOverrides = Field(default_factory=CapabilityOverrides)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    # Pooled keep-alive connections to the provider.
    max_connections: int = Field(256, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[HostedModelConfig]) -> list[HostedModelConfig]:
        # A field validator, so the error names `providers.<name>.models`.
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate names {', '.join(duplicates)}")
        return models

    def resolve_key(
        self, default_env: str | None, environ: dict[str, str] | None = None
    ) -> tuple[str | None, str]:
        """(key or None, where it was looked for), from `api_key`, else `api_key_env`, else the
        kind's default variable."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value(), "api_key"
        variable = self.api_key_env or default_env
        if not variable:
            return None, "no key configured"
        value = (environ if environ is not None else os.environ).get(variable, "")
        return (value or None), f"environment variable {variable}"


class OpenAIConfig(HostedProviderConfig):
    kind: Literal["openai"] = "openai"
    # Models served under this provider; `modality: image` declares an image model.
    models: list[OpenAIModelConfig] = Field(default_factory=list)  # type: ignore[assignment]
    # A preset of OpenAI-compatible endpoints (openai, openrouter, groq, ollama, ...: see
    # pluggably.providers.presets); it supplies the defaults of the fields below and above.
    # None: `openai`, or `generic` when `base_url` is set.
    preset: str | None = None
    # Whether the API needs a key (self-hosted servers usually do not). None: the preset's.
    requires_key: bool | None = None
    # The name of the output limit in requests. None: the preset's.
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] | None = None
    # Ask for usage on streams with `stream_options.include_usage`. None: the preset's.
    stream_usage: bool | None = None
    # Sampling parameters the endpoint honours (short names: temperature, top_p, top_k, seed,
    # stop, presence_penalty, frequency_penalty, repetition_penalty). None: the preset's.
    supported_parameters: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_list_models(cls, data: object) -> object:
        """`list_models` defaults to the preset's (Fireworks lists no chat models of yours)."""
        from pluggably.providers.presets import PRESETS

        if isinstance(data, dict) and "list_models" not in data:
            name = data.get("preset") or ("generic" if data.get("base_url") else "openai")
            preset = PRESETS.get(name) if isinstance(name, str) else None
            if preset is not None and not preset.list_models:
                return {**data, "list_models": False}
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        from pluggably.providers.presets import PRESETS

        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known: {', '.join(sorted(PRESETS))}")
        return value

    @field_validator("supported_parameters")
    @classmethod
    def _known_parameters(cls, value: list[str] | None) -> list[str] | None:
        known = {
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        }
        unknown = sorted(set(value or ()) - known)
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; known: {', '.join(sorted(known))}")
        return value

    def preset_name(self) -> str:
        return self.preset or ("generic" if self.base_url else "openai")


class AnthropicConfig(HostedProviderConfig):
    kind: Literal["anthropic"] = "anthropic"
    # The `anthropic-version` header: the documented API version.
    version: str = "2023-06-01"
    # `max_tokens` when a request sets none (the API requires it), unless the model says.
    default_max_tokens: int = Field(4096, ge=1)


class GeminiConfig(HostedProviderConfig):
    kind: Literal["gemini"] = "gemini"
    api_version: str = "v1beta"
