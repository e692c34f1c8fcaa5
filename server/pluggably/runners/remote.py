"""A backend that forwards generations to another server of the same v1 contract.

The gateway reaches its local runner processes this way (over a Unix socket, see `pool.py`), and
a runner on another machine the same way at a TCP address: one transport for both. Requests go
out as the `GenerateRequest` they came in as (`generation_request_to_pb` reads back the same),
chunks come back as the domain chunks the remote produced, and the remote's errors come back as
the domain errors they were (code, reason, field violations, retry hints), so the caller sees
what it would have seen in process. A remote that cannot be reached is UNAVAILABLE with a reason,
never INTERNAL. Closing the stream cancels the remote call, which stops the remote generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from pluggably.core.backend import Backend
from pluggably.core.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PluggablyError,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from pluggably.core.types import Chunk, GenerationRequest, ModelInfo
from pluggably.generation.convert import chunk_from_stream_pb, generation_request_to_pb
from pluggably.v1 import stream_service_pb2_grpc

log = logging.getLogger(__name__)


class RemoteBackend(Backend):
    """Forwards to `target` (`unix:/path` or `host:port`). `request.model` is the model's id on
    the remote; `models` describe what this backend answers for in listings."""

    def __init__(
        self,
        provider: str,
        target: str,
        *,
        models: Sequence[ModelInfo] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        self.provider = provider
        self.target = target
        self._auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._models = list(models)
        self._channel_options = list(channel_options)
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> stream_service_pb2_grpc.StreamServiceStub:
        if self._channel is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._channel_options
                )
            else:
                self._channel = grpc.aio.insecure_channel(
                    self.target, options=self._channel_options
                )
        return stream_service_pb2_grpc.StreamServiceStub(self._channel)

    async def list_models(self) -> list[ModelInfo]:
        return list(self._models)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        pb = generation_request_to_pb(request)
        timeout = None
        if request.deadline is not None:
            timeout = max(0.001, request.deadline - asyncio.get_running_loop().time())
        metadata = self._auth
        if request.request_id:
            metadata = (*metadata, ("x-request-id", request.request_id))
        # No wait_for_ready: a remote that is not there is UNAVAILABLE at once (the router may
        # fall back), not a call that waits for it until the deadline.
        call = self._stub().StreamGenerate(pb, timeout=timeout, metadata=metadata)
        try:
            async for message in call:
                chunk = chunk_from_stream_pb(message)
                if chunk is None:  # an in-band error event
                    raise error_from_status(message.error, self.target)
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.target) from None
        finally:
            call.cancel()  # the caller went away or an error ended it: stop the remote work

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def error_from_rpc(exc: grpc.aio.AioRpcError, target: str) -> PluggablyError:
    """The domain error a failed remote call stands for."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is None:
        status = status_pb2.Status(code=exc.code().value[0], message=exc.details() or "")
    if status.code == code_pb2.UNAVAILABLE and not status.details:
        # grpc's own: the remote is not there (a runner that crashed or was never started).
        return Unavailable(
            f"the runner at {target} is not reachable ({status.message or 'no connection'})",
            reason="RUNNER_UNAVAILABLE",
        )
    return error_from_status(status, target)


def error_from_status(status: status_pb2.Status, target: str) -> PluggablyError:
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    retry = error_details_pb2.RetryInfo()
    quota = error_details_pb2.QuotaFailure()
    found = {}
    for detail in status.details:
        for name, message in (("info", info), ("bad", bad), ("retry", retry), ("quota", quota)):
            if detail.Is(message.DESCRIPTOR):
                detail.Unpack(message)
                found[name] = True
    reason = info.reason or None
    metadata: Mapping[str, str] = {k: v for k, v in info.metadata.items() if k != "request_id"}
    retry_after = retry.retry_delay.ToTimedelta().total_seconds() if "retry" in found else None
    message = status.message or f"the runner at {target} failed"
    code = status.code
    if code == code_pb2.INVALID_ARGUMENT:
        violations = [FieldViolation(v.field, v.description) for v in bad.field_violations] or [
            FieldViolation("request", message)
        ]
        return InvalidArgument(violations, message=message, reason=reason)
    if code == code_pb2.NOT_FOUND:
        kind, name = next(iter(metadata.items()), ("resource", ""))
        return NotFound(message, resource_type=kind, resource_name=name, reason=reason)
    if code == code_pb2.RESOURCE_EXHAUSTED:
        subject = quota.violations[0].subject if quota.violations else "runner"
        return ResourceExhausted(
            message, subject=subject, retry_after_s=retry_after, reason=reason, metadata=metadata
        )
    if code == code_pb2.FAILED_PRECONDITION:
        return FailedPrecondition(message, reason=reason, metadata=metadata)
    if code == code_pb2.PERMISSION_DENIED:
        return PermissionDenied(message, reason=reason, metadata=metadata)
    if code == code_pb2.UNAUTHENTICATED:
        # Our own credentials towards the runner, not the caller's: an operator matter.
        return Unavailable(
            f"the runner at {target} refused this gateway's credentials",
            reason="RUNNER_AUTH_FAILED",
        )
    if code == code_pb2.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message, reason=reason)
    if code == code_pb2.CANCELLED:
        return Cancelled(message, reason=reason)
    if code == code_pb2.UNIMPLEMENTED:
        return Unimplemented(message, reason=reason)
    if code == code_pb2.UNAVAILABLE:
        return Unavailable(message, retry_after_s=retry_after, reason=reason, metadata=metadata)
    # INTERNAL, UNKNOWN, anything else: the runner failed; the caller may retry or fall back.
    log.warning("the runner at %s failed: %s %s", target, code, status.message)
    return Unavailable(
        f"the runner at {target} failed (request id {info.metadata.get('request_id', '?')})",
        reason="RUNNER_FAILED",
    )
