"""Small helpers for asserting on gRPC errors with google.rpc details."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo | None
    bad_request: error_details_pb2.BadRequest | None
    details: dict[str, object]

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad_request.field_violations] if self.bad_request else []


_DETAIL_TYPES = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.ResourceInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.RetryInfo,
    )
}


def unpack_status(status: status_pb2.Status) -> dict[str, object]:
    out: dict[str, object] = {}
    for any_detail in status.details:
        name = any_detail.TypeName()
        message = _DETAIL_TYPES[name]()
        any_detail.Unpack(message)
        out[name] = message
    return out


def rich_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> RichError:
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status in trailers of {error!r}"
    details = unpack_status(status)
    return RichError(
        code=error.code(),
        message=error.details() or "",
        status=status,
        info=details.get("google.rpc.ErrorInfo"),  # type: ignore[arg-type]
        bad_request=details.get("google.rpc.BadRequest"),  # type: ignore[arg-type]
        details=details,
    )
