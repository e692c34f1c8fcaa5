"""Domain errors: named after the condition, raised anywhere below the servicers.

The API layer maps each class to a gRPC status with `google.rpc` details in one table
(`pluggably.api.errors`). Messages are written for the client: they must never contain secrets,
file-system internals or the text of an unexpected exception.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class PluggablyError(Exception):
    """Base of every error the gateway reports deliberately.

    `reason` is the stable, machine-readable `ErrorInfo.reason` (UPPER_SNAKE_CASE); `metadata`
    goes to `ErrorInfo.metadata` and must hold no secrets.
    """

    reason: str = "ERROR"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: `field` is its path, e.g. `text.temperature` or `messages[2].role`."""

    field: str
    description: str


class InvalidArgument(PluggablyError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""

    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Iterable[FieldViolation],
        *,
        message: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.violations = list(violations)
        if message is None:
            message = "invalid request: " + "; ".join(
                f"{v.field}: {v.description}" for v in self.violations
            )
        super().__init__(message, reason=reason)


class NotFound(PluggablyError):
    """A named resource does not exist."""

    reason = "NOT_FOUND"

    def __init__(
        self, message: str, *, resource_type: str, resource_name: str, reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason, metadata={resource_type: resource_name})
        self.resource_type = resource_type
        self.resource_name = resource_name


class ModelNotFound(NotFound):
    reason = "MODEL_NOT_FOUND"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} is not known to this gateway",
            resource_type="model",
            resource_name=model,
        )


class Unauthenticated(PluggablyError):
    """The call carries no valid credentials (missing, malformed, unknown or revoked key)."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(PluggablyError):
    """The caller is known but may not do this (a scope it lacks, a model outside its list)."""

    reason = "PERMISSION_DENIED"


class FailedPrecondition(PluggablyError):
    """The system is not in a state that allows the operation (e.g. a model that cannot load)."""

    reason = "FAILED_PRECONDITION"


class ResourceExhausted(PluggablyError):
    """A limit was hit (a full queue, a quota); the client may retry after `retry_after_s`."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        subject: str,
        retry_after_s: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.subject = subject
        self.retry_after_s = retry_after_s


class Unavailable(PluggablyError):
    """The backend cannot serve now (down, shutting down); retrying later may succeed.

    The router tries fallback models on this error when it happens before any output.
    """

    reason = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_s = retry_after_s


class Unimplemented(PluggablyError):
    """The operation is part of the contract but not served by this build."""

    reason = "NOT_IMPLEMENTED"


class DeadlineExceeded(PluggablyError):
    reason = "DEADLINE_EXCEEDED"


class Cancelled(PluggablyError):
    reason = "CANCELLED"
