"""The one table that turns domain errors into `google.rpc.Status` with details.

Every row is tested (tests/test_errors.py). Anything not in the table becomes INTERNAL with a fixed
message and the request id: the exception text never reaches the client.
"""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pluggably.core import errors

ERROR_DOMAIN = "pluggably.dev"

# A status travels in the response trailers, which gRPC clients accept up to 8 KiB by default
# (16 KiB hard): a larger one reaches the client as RESOURCE_EXHAUSTED without any details. Error
# texts quote requests, so whatever a request holds, the status is cut to fit: at most about
# 7 KiB on the wire even when every text is non-ASCII (the message is percent-encoded in
# `grpc-message`, the details base64-encoded in `grpc-status-details-bin`).
MAX_FIELD_VIOLATIONS = 10
_MESSAGE_BYTES = 512
_FIELD_BYTES = 128
_TEXT_BYTES = 256

# Most specific class first: the first matching row wins.
STATUS_TABLE: tuple[tuple[type[errors.PluggablyError], int], ...] = (
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
    (errors.Unimplemented, code_pb2.UNIMPLEMENTED),
    (errors.DeadlineExceeded, code_pb2.DEADLINE_EXCEEDED),
    (errors.Cancelled, code_pb2.CANCELLED),
)


def _pack(message) -> any_pb2.Any:  # type: ignore[no-untyped-def]
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _clip(text: str, limit: int = _TEXT_BYTES) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, marked when cut."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "..."


def _shown_violations(exc: errors.InvalidArgument) -> list[errors.FieldViolation]:
    violations = exc.violations
    if len(violations) <= MAX_FIELD_VIOLATIONS:
        return violations
    shown = violations[: MAX_FIELD_VIOLATIONS - 1]
    hidden = len(violations) - len(shown)
    return [
        *shown,
        errors.FieldViolation(
            violations[len(shown)].field, f"and {hidden} more problems in this request"
        ),
    ]


def to_status(exc: BaseException, request_id: str) -> status_pb2.Status:
    if not isinstance(exc, errors.PluggablyError):
        return internal_status(request_id)
    code = next((c for cls, c in STATUS_TABLE if isinstance(exc, cls)), None)
    if code is None:
        return internal_status(request_id)

    metadata = {key: _clip(value) for key, value in exc.metadata.items()}
    metadata["request_id"] = request_id
    message = _clip(exc.message, _MESSAGE_BYTES)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=metadata)
        )
    ]
    if isinstance(exc, errors.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=_clip(v.field, _FIELD_BYTES), description=_clip(v.description)
                        )
                        for v in _shown_violations(exc)
                    ]
                )
            )
        )
    elif isinstance(exc, errors.NotFound):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=exc.resource_type,
                    resource_name=_clip(exc.resource_name),
                    description=message,
                )
            )
        )
    elif isinstance(exc, errors.ResourceExhausted):
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=_clip(exc.subject), description=message
                        )
                    ]
                )
            )
        )
        if exc.retry_after_s is not None:
            details.append(_pack(_retry_info(exc.retry_after_s)))
    elif isinstance(exc, errors.Unavailable) and exc.retry_after_s is not None:
        details.append(_pack(_retry_info(exc.retry_after_s)))
    return status_pb2.Status(code=code, message=message, details=details)


def internal_status(request_id: str) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(
        reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"request_id": request_id}
    )
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error; quote request id {request_id} when reporting it",
        details=[_pack(info)],
    )
