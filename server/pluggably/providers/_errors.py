"""Upstream failures -> domain errors, one table for every provider.

Each adapter extracts what its provider's error body says (a message, a type or code, the
parameter at fault, a retry hint); `upstream_failure` decides the domain error, whether a retry
may help and whether the failure counts against the model's circuit breaker. Provider messages
reach clients, so they pass through `scrub` first: no key, token or credential-looking string
survives, whatever the provider chose to echo back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pluggably.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PluggablyError,
    ResourceExhausted,
    Unavailable,
)

MAX_MESSAGE_CHARS = 400

# Credential shapes of the providers we talk to and of generic bearer/basic/query credentials.
_SECRET_PATTERNS = re.compile(
    r"\b(?:sk|pk|rk|gsk|xai|nvapi|hf|fw|r8|ak|api|key)[-_][A-Za-z0-9_\-*.]{8,}"  # sk-..., gsk_..., hf_...
    r"|AIza[0-9A-Za-z_\-]{20,}"  # Google API keys
    # A token has a digit, a symbol or an inner capital: "Basic authentication" is prose.
    r"|(?i:bearer|basic)\s+(?=[A-Za-z0-9._~+/=\-*]*?(?:[0-9._~+/=\-*]|[A-Za-z0-9][A-Z]))[A-Za-z0-9._~+/=\-*]{6,}"
    r"|(?<![A-Za-z0-9])(?i:(?:api[_-]?key|key|token|access_token|secret)=)[^&\s\"']+"
    r"|eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]*",  # JWTs
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without `secrets` or anything shaped like a credential, and not too long."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    text = _SECRET_PATTERNS.sub("[redacted]", text)
    text = " ".join(text.split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


@dataclass
class UpstreamFailure(Exception):
    """One failed upstream exchange. `error` is what the client gets if no retry or fallback
    rescues the request; `retryable` says another attempt may succeed; `breaker` says the failure
    says something about the model's health (server errors, timeouts, garbage), unlike errors
    caused by the request or by quotas."""

    error: PluggablyError
    retryable: bool = False
    breaker: bool = False
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.error.message)


@dataclass(frozen=True)
class UpstreamError:
    """What a provider's error body says, normalised by its adapter."""

    status: int  # HTTP status (200 for errors inside a stream)
    message: str = ""
    type: str = ""  # the provider's error type / code / status name, lower-case
    param: str = ""  # the request parameter at fault, when the provider names one
    retry_after_s: float | None = None
    request_id: str = ""
    # Classification by the adapter, for errors whose HTTP status alone does not tell
    # (an in-stream error, a 400 that is a context-length error, a 429 that is a spent quota).
    kind: str = ""  # "" | "context_length" | "content_filter" | "quota" | "overloaded" | "rate_limit" | "auth"
    extra: dict[str, str] = field(default_factory=dict)


_CONTEXT_HINTS = re.compile(
    r"context[ _-]length|context[ _-]window|maximum context|prompt is too long|too many tokens"
    r"|input token count .* exceeds|exceeds the maximum number of tokens|reduce the length",
    re.I,
)


def upstream_failure(
    err: UpstreamError, *, provider: str, model_id: str, secrets: Iterable[str] = ()
) -> UpstreamFailure:
    """The domain error for an upstream error, with retry and breaker decisions."""
    message = scrub(err.message, secrets) or f"HTTP {err.status}"
    metadata = {"provider": provider, "model": model_id}
    if err.status:
        metadata["upstream_status"] = str(err.status)
    if err.type:
        metadata["upstream_error"] = scrub(err.type, secrets)[:64]
    if err.request_id:
        metadata["upstream_request_id"] = err.request_id[:128]
    kind = err.kind
    status = err.status
    if not kind:
        if status in (400, 413, 422) and _CONTEXT_HINTS.search(err.message):
            kind = "context_length"
        elif status in (401, 403):
            kind = "auth"
        elif status == 429:
            kind = "rate_limit"
        elif status == 529:
            kind = "overloaded"

    if kind == "context_length":
        field_name = "text.max_tokens" if "max_tokens" in err.param else "messages"
        return UpstreamFailure(
            InvalidArgument(
                [FieldViolation(field_name, f"{model_id!r}: {message}")],
                message=f"the request does not fit the context window of {model_id!r}: {message}",
                reason="CONTEXT_LENGTH_EXCEEDED",
            )
        )
    if kind == "content_filter":
        return UpstreamFailure(
            InvalidArgument(
                [FieldViolation("messages", f"{provider} refused the content: {message}")],
                message=f"{provider} refused the request under its content policy: {message}",
                reason="CONTENT_FILTERED",
            )
        )
    if kind == "auth":
        return UpstreamFailure(
            FailedPrecondition(
                f"{provider} rejected the gateway's credentials ({status}): {message}",
                reason="PROVIDER_AUTH_FAILED",
                metadata=metadata,
            )
        )
    if kind == "quota":
        return UpstreamFailure(
            ResourceExhausted(
                f"{provider} quota exhausted: {message}",
                subject=f"provider:{provider}",
                reason="PROVIDER_QUOTA_EXCEEDED",
                metadata=metadata,
            )
        )
    if kind == "rate_limit":
        retry = err.retry_after_s if err.retry_after_s is not None else 1.0
        return UpstreamFailure(
            ResourceExhausted(
                f"{provider} rate-limited the request: {message}",
                subject=f"provider:{provider}",
                reason="PROVIDER_RATE_LIMITED",
                retry_after_s=retry,
                metadata=metadata,
            ),
            retryable=True,
            retry_after_s=err.retry_after_s,
        )
    if kind == "overloaded" or status >= 500 or status in (408, 409):
        return UpstreamFailure(
            Unavailable(
                f"{provider} could not serve {model_id!r} ({status or 'in-stream error'}): {message}",
                reason="PROVIDER_UNAVAILABLE",
                retry_after_s=err.retry_after_s,
                metadata=metadata,
            ),
            retryable=True,
            breaker=True,
            retry_after_s=err.retry_after_s,
        )
    if status == 404:
        error: PluggablyError = NotFound(
            f"{provider} does not know model {model_id!r}: {message}",
            resource_type="model",
            resource_name=model_id,
            reason="PROVIDER_MODEL_NOT_FOUND",
        )
        error.metadata.update(metadata)
        return UpstreamFailure(error)
    violations = (
        [FieldViolation(_field_for(err.param), f"{provider}: {message}")] if err.param else []
    )
    return UpstreamFailure(
        InvalidArgument(
            violations,
            message=f"{provider} rejected the request ({status}): {message}",
            reason="PROVIDER_REJECTED_REQUEST",
        )
    )


def _field_for(param: str) -> str:
    """A provider's parameter name as the field of our request, where they correspond."""
    param = param.strip()
    mapping = {
        "max_tokens": "text.max_tokens",
        "max_completion_tokens": "text.max_tokens",
        "maxOutputTokens": "text.max_tokens",
        "temperature": "text.temperature",
        "top_p": "text.top_p",
        "top_k": "text.top_k",
        "stop": "text.stop",
        "stop_sequences": "text.stop",
        "response_format": "text.response_format",
        "seed": "text.seed",
    }
    head = re.split(r"[.\[]", param, maxsplit=1)[0]
    if head in mapping:
        return mapping[head]
    if head in ("messages", "tools", "tool_choice", "contents", "system"):
        return {"contents": "messages", "system": "messages"}.get(head, head) + param[len(head) :]
    return f"provider_options.{head}" if head else "provider_options"


def connection_failure(provider: str, model_id: str, what: str) -> UpstreamFailure:
    return UpstreamFailure(
        Unavailable(
            f"{provider} is unreachable for {model_id!r}: {what}",
            reason="PROVIDER_UNAVAILABLE",
            metadata={"provider": provider, "model": model_id},
        ),
        retryable=True,
        breaker=True,
    )


def timeout_failure(provider: str, model_id: str, what: str, seconds: float) -> UpstreamFailure:
    return UpstreamFailure(
        Unavailable(
            f"{provider} did not answer for {model_id!r} in time ({what}, {seconds:g}s)",
            reason="PROVIDER_TIMEOUT",
            metadata={"provider": provider, "model": model_id},
        ),
        retryable=True,
        breaker=True,
    )


def bad_response(provider: str, model_id: str, what: str) -> UpstreamFailure:
    return UpstreamFailure(
        Unavailable(
            f"{provider} sent a response the gateway cannot use for {model_id!r}: {what}",
            reason="PROVIDER_BAD_RESPONSE",
            metadata={"provider": provider, "model": model_id},
        ),
        retryable=True,
        breaker=True,
    )
