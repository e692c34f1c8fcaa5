"""The one table that turns domain errors into `google.rpc.Status` with details.

Every row is tested (tests/test_errors.py). Anything not in the table becomes INTERNAL with a fixed
message and the request id: the exception text never reaches the client.
"""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pluggably.core import errors

ERROR_DOMAIN = "pluggably.dev"

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


def to_status(exc: BaseException, request_id: str) -> status_pb2.Status:
    if not isinstance(exc, errors.PluggablyError):
        return internal_status(request_id)
    code = next((c for cls, c in STATUS_TABLE if isinstance(exc, cls)), None)
    if code is None:
        return internal_status(request_id)

    metadata = {**exc.metadata, "request_id": request_id}
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
                            field=v.field, description=v.description
                        )
                        for v in exc.violations
                    ]
                )
            )
        )
    elif isinstance(exc, errors.NotFound):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=exc.resource_type,
                    resource_name=exc.resource_name,
                    description=exc.message,
                )
            )
        )
    elif isinstance(exc, errors.ResourceExhausted):
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=exc.subject, description=exc.message
                        )
                    ]
                )
            )
        )
        if exc.retry_after_s is not None:
            details.append(_pack(_retry_info(exc.retry_after_s)))
    elif isinstance(exc, errors.Unavailable) and exc.retry_after_s is not None:
        details.append(_pack(_retry_info(exc.retry_after_s)))
    return status_pb2.Status(code=code, message=exc.message, details=details)


def internal_status(request_id: str) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(
        reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"request_id": request_id}
    )
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error; quote request id {request_id} when reporting it",
        details=[_pack(info)],
    )
