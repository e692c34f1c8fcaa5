"""Server interceptors. They wrap unary and server-streaming handlers alike.

An async interceptor that only awaits its continuation would break streams (the handler is an
async generator), so every interceptor here rebuilds the method handler through `_rewrap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from pluggably.api.status import to_status
from pluggably.core import context as request_context
from pluggably.core.errors import FieldViolation, InvalidArgument

access_log = logging.getLogger("pluggably.access")
log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Clients that cannot read a gRPC status sent after streamed data (HTTP/1.1 REST through Envoy,
# browsers) ask for the error as the stream's last message instead. Envoy sets it on REST routes.
STREAM_ERRORS_HEADER = "x-pluggably-stream-errors"

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


_MALFORMED = object()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Lets an undecodable request reach the wrapped handler as `_MALFORMED`, so it gets
    INVALID_ARGUMENT with details instead of grpc's UNKNOWN carrying the parser's text."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _MALFORMED

    return deserialize


def _check_decoded(request: Any) -> None:
    if request is _MALFORMED:
        raise InvalidArgument(
            [
                FieldViolation(
                    "request", "not a valid protobuf message of the method's request type"
                )
            ],
            reason="MALFORMED_REQUEST",
        )


def _rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    stream: Callable[[StreamBehavior], StreamBehavior],
) -> grpc.RpcMethodHandler:
    deserializer = _tolerant(handler.request_deserializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream), deserializer, handler.response_serializer
        )
    return handler  # client-streaming methods: none in the contract yet


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    """Request id, access log and error mapping for every `pluggably.*` RPC.

    Domain errors become `google.rpc.Status` with details (`pluggably.api.status`); anything else
    becomes INTERNAL with a fixed message and the request id, and is logged with its traceback.
    """

    def __init__(self) -> None:
        # Wrapped handlers by method: the registered handler of a method never changes, so it is
        # wrapped once, not on every call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith("/pluggably."):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _rewrap(
            handler, lambda b: self._unary(method, b), lambda b: self._stream(method, b)
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, context)
            call.begin()
            try:
                _check_decoded(request)
                response = await behavior(request, context)
                await call.send_headers()
                return response
            except asyncio.CancelledError:
                call.code = code_pb2.CANCELLED
                raise
            except Exception as exc:
                await call.fail(exc)
                raise
            finally:
                call.end()

        return wrapped

    def _stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(method, context)
            call.begin()
            first: Message | None = None
            try:
                _check_decoded(request)
                # aclosing: a cancelled call closes the servicer's generator (and the backend's
                # below it) here and now, not whenever the garbage collector finalizes it.
                async with contextlib.aclosing(behavior(request, context)) as messages:
                    async for message in messages:
                        if first is None:
                            await call.send_headers()
                            first = message
                        call.messages += 1
                        yield message
            except (asyncio.CancelledError, GeneratorExit):
                call.code = code_pb2.CANCELLED
                raise
            except Exception as exc:
                if (
                    call.wants_inline_errors
                    and first is not None
                    and _has_error_event(first)
                    and not isinstance(exc, grpc.aio.AbortError)
                ):
                    yield type(first)(
                        id=call.request_id, model=first.model, error=call.status_for(exc)
                    )
                    return
                await call.fail(exc)
                raise
            finally:
                call.end()

        return wrapped


def _has_error_event(message: Message) -> bool:
    """Whether the stream's messages are chunks with an `error` event (a google.rpc.Status member
    of a oneof named `event`), like StreamGenerateResponse; resources such as Download that merely
    have an error field do not qualify."""
    event = message.DESCRIPTOR.oneofs_by_name.get("event")
    return (
        event is not None
        and any(
            f.name == "error"
            and f.message_type is not None
            and f.message_type.full_name == "google.rpc.Status"
            for f in event.fields
        )
        and all(name in message.DESCRIPTOR.fields_by_name for name in ("id", "model"))
    )


class _Call:
    """Book-keeping of one RPC for the access log and error mapping."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        metadata = dict(context.invocation_metadata() or ())
        supplied = metadata.get(REQUEST_ID_HEADER, "")
        self.request_id = supplied if _VALID_REQUEST_ID.match(supplied) else uuid.uuid4().hex
        self.wants_inline_errors = metadata.get(STREAM_ERRORS_HEADER, "").lower() == "inline"
        self.code = code_pb2.OK
        self.messages = 0
        self._token: Any = None
        self._start = time.perf_counter()

    def begin(self) -> None:
        self._token = request_context.set_request_id(self.request_id)

    async def send_headers(self) -> None:
        # Only together with the first response message: an error before it must leave the
        # response trailers-only, which is what lets Envoy turn it into a 4xx/5xx HTTP status.
        await self.context.send_initial_metadata(((REQUEST_ID_HEADER, self.request_id),))

    def status_for(self, exc: BaseException) -> status_pb2.Status:
        status = to_status(exc, self.request_id)
        self.code = status.code
        if status.code == code_pb2.INTERNAL:
            log.error(
                "unexpected error in %s (request id %s)", self.method, self.request_id, exc_info=exc
            )
        return status

    async def fail(self, exc: BaseException) -> None:
        """Aborts the RPC with the mapped status; returns only for errors grpc handles itself."""
        if isinstance(exc, grpc.aio.AbortError):
            return
        status = rpc_status.to_status(self.status_for(exc))
        await self.context.abort(
            status.code,
            status.details,
            (*status.trailing_metadata, (REQUEST_ID_HEADER, self.request_id)),
        )

    def end(self) -> None:
        elapsed_ms = (time.perf_counter() - self._start) * 1000
        access_log.info(
            "%s %s %.1fms request_id=%s messages=%d",
            self.method,
            code_pb2.Code.Name(self.code),
            elapsed_ms,
            self.request_id,
            self.messages,
        )
        if self._token is not None:
            # A stream cancelled under back-pressure is finalized in another context, where
            # the token cannot be reset (and the variable dies with its context anyway).
            with contextlib.suppress(ValueError):
                request_context.reset_request_id(self._token)
