"""The interceptor stack: one interceptor that runs every RPC through a chain of small hooks.

For each call it makes a `RequestContext` current (request id, method, peer), runs the hooks'
`start` in order (auth, limits: any may refuse the call), runs the handler, maps the outcome to a
status (domain errors through the one table in `api.status`; anything else INTERNAL with a fixed
message and the request id), then runs the hooks' `finish` in reverse order (release, metrics,
access log, tracing). Unary and server-streaming handlers alike: an async interceptor that only
awaited its continuation would break streams (the handler is an async generator), so handlers
are rebuilt through `_rewrap`, once per method.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from pluggably.api.hooks import CallHook, CallObservers, overrides
from pluggably.api.status import to_status
from pluggably.core import context as request_context
from pluggably.core.errors import DeadlineExceeded, FieldViolation, InvalidArgument

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Clients that cannot read a gRPC status sent after streamed data (HTTP/1.1 REST through Envoy,
# browsers) ask for the error as the stream's last message instead. Envoy sets it on REST routes.
STREAM_ERRORS_HEADER = "x-pluggably-stream-errors"

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_CODE_NAMES = {value: name for name, value in code_pb2.Code.items()}

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any, None]]
BidiBehavior = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncGenerator[Any, None]]

_MALFORMED = object()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Lets an undecodable request reach the wrapped handler as `_MALFORMED`, so it gets
    INVALID_ARGUMENT with details instead of grpc's UNKNOWN carrying the parser's text."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, RecursionError, ValueError):
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


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    """Runs every RPC of the gateway through `hooks` (see the module docstring).

    `public` methods (health, reflection by default) skip the hooks whose `public_exempt` is
    true (auth, stream cap, rate limits) but still get error mapping, logs and metrics.
    `max_stream_duration_s` ends a stream that runs longer with DEADLINE_EXCEEDED.
    """

    def __init__(
        self,
        hooks: Sequence[CallHook] = (),
        *,
        public_methods: Callable[[str], bool] = lambda _method: False,
        max_stream_duration_s: float | None = None,
    ) -> None:
        self._hooks = _Chain(hooks)
        public = [h for h in hooks if not getattr(h, "public_exempt", False)]
        self._public_hooks = (
            self._hooks if len(public) == len(hooks) else _Chain(public, like=self._hooks)
        )
        self._is_public = public_methods
        self._max_stream_s = max_stream_duration_s
        # Wrapped handlers by method: the registered handler of a method never changes, so it is
        # wrapped once, not on every call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        hooks = self._public_hooks if self._is_public(method) else self._hooks
        wrapped = self._rewrap(method, handler, hooks)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _rewrap(
        self, method: str, handler: grpc.RpcMethodHandler, hooks: _Chain
    ) -> grpc.RpcMethodHandler:
        deserializer = _tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, hooks, handler.unary_unary), deserializer, serializer
            )
        if handler.unary_stream:
            # A streaming handler either yields its messages or writes them with
            # `context.write` and returns (grpc's own health Watch does): one wrapper each.
            behavior = (
                self._stream(method, hooks, handler.unary_stream)
                if inspect.isasyncgenfunction(handler.unary_stream)
                else self._unary(method, hooks, handler.unary_stream, streaming=True)
            )
            return grpc.unary_stream_rpc_method_handler(behavior, deserializer, serializer)
        if handler.stream_stream:  # reflection
            return grpc.stream_stream_rpc_method_handler(
                self._bidi(method, hooks, handler.stream_stream), deserializer, serializer
            )
        return handler  # client-streaming methods: none in the contract

    def _unary(
        self,
        method: str,
        hooks: _Chain,
        behavior: UnaryBehavior,
        *,
        streaming: bool = False,
    ) -> UnaryBehavior:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, context, hooks, streaming=streaming)
            try:
                await call.begin()
                _check_decoded(request)
                response = await behavior(request, context)
                if not streaming:  # a writer has sent its headers with its first write
                    await call.send_headers()
                    call.ctx.messages = 1
                return response
            except asyncio.CancelledError:
                call.cancelled()
                raise
            except Exception as exc:
                await call.fail(exc)
                raise
            finally:
                await call.end()

        return wrapped

    def _stream(self, method: str, hooks: _Chain, behavior: StreamBehavior) -> StreamBehavior:
        max_s = self._max_stream_s

        async def wrapped(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncGenerator[Any, None]:
            call = _Call(method, context, hooks, streaming=True)
            ctx = call.ctx
            first: Message | None = None
            try:
                await call.begin()
                _check_decoded(request)
                loop = asyncio.get_running_loop()
                ends_at = None if max_s is None else loop.time() + max_s
                # aclosing: a cancelled call closes the servicer's generator (and the backend's
                # below it) here and now, not whenever the garbage collector finalizes it.
                async with contextlib.aclosing(behavior(request, context)) as messages:
                    while True:
                        # The timeout covers the wait for the next message only, never a
                        # `yield`: a cancel scope open across a yield would cancel grpc's task.
                        try:
                            if ends_at is None:
                                message = await anext(messages)
                            else:
                                async with asyncio.timeout_at(ends_at):
                                    message = await anext(messages)
                        except StopAsyncIteration:
                            break
                        except TimeoutError:
                            raise DeadlineExceeded(
                                f"the stream ran longer than this server allows ({max_s:g} s, "
                                "server.max_stream_duration_s)",
                                reason="MAX_STREAM_DURATION",
                            ) from None
                        if first is None:
                            await call.send_headers()
                            first = message
                        ctx.messages += 1
                        yield message
            except (asyncio.CancelledError, GeneratorExit):
                call.cancelled()
                raise
            except Exception as exc:
                if (
                    call.wants_inline_errors
                    and first is not None
                    and _has_error_event(first)
                    and not isinstance(exc, grpc.aio.AbortError)
                ):
                    yield type(first)(
                        id=ctx.request_id, model=first.model, error=call.status_for(exc)
                    )
                    return
                await call.fail(exc)
                raise
            finally:
                await call.end()

        return wrapped

    def _bidi(self, method: str, hooks: _Chain, behavior: BidiBehavior) -> BidiBehavior:
        async def wrapped(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncGenerator[Any, None]:
            call = _Call(method, context, hooks, streaming=True)

            async def checked() -> AsyncGenerator[Any, None]:
                async for request in requests:
                    if request is _MALFORMED:
                        # Raised into the handler's loop; the handler ends and the error
                        # surfaces below, mapped like any other.
                        _check_decoded(request)
                    yield request

            try:
                await call.begin()
                async with contextlib.aclosing(behavior(checked(), context)) as messages:
                    async for message in messages:
                        if call.ctx.messages == 0:
                            await call.send_headers()
                        call.ctx.messages += 1
                        yield message
            except (asyncio.CancelledError, GeneratorExit):
                call.cancelled()
                raise
            except Exception as exc:
                await call.fail(exc)
                raise
            finally:
                await call.end()

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


class _HookPhases:
    """A hook and the phases it implements: awaiting an inherited no-op still costs a
    coroutine per call, so phases a hook leaves to `CallHook` are skipped."""

    __slots__ = ("finish", "hook", "start")

    def __init__(self, hook: CallHook, *, with_start: bool = True) -> None:
        self.hook = hook
        self.start = hook.start if with_start and overrides(hook, "start") else None
        self.finish = hook.finish if overrides(hook, "finish") else None


class _Chain(tuple[_HookPhases, ...]):
    """The hooks of a call, in order, and the observers among them (see `CallObservers`)."""

    observers: CallObservers | None
    # The same hooks for unary calls: without the `start` of hooks that only act on streams.
    unary: tuple[_HookPhases, ...]

    def __new__(cls, hooks: Sequence[CallHook], *, like: _Chain | None = None) -> _Chain:
        chain = super().__new__(cls, (_HookPhases(h) for h in hooks))
        chain.unary = tuple(_HookPhases(h, with_start=not h.starts_streams_only) for h in hooks)
        observers = CallObservers(hooks)
        if (
            like is not None
            and like.observers is not None
            and like.observers.hooks == observers.hooks
        ):
            chain.observers = like.observers  # one queue (and one timer) for both chains
        else:
            chain.observers = observers if observers else None
        return chain


class _Call:
    """One RPC: its context, its hooks, and the mapping of its outcome to a status."""

    __slots__ = (
        "_started_hooks",
        "_token",
        "context",
        "ctx",
        "hooks",
        "metadata",
        "observers",
        "wants_inline_errors",
    )

    def __init__(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        hooks: _Chain,
        *,
        streaming: bool,
    ) -> None:
        self.context = context
        self.hooks = hooks if streaming else hooks.unary
        self.observers = hooks.observers
        self.metadata: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if isinstance(value, str):  # binary (-bin) metadata is nobody's business here
                self.metadata[key] = value
        supplied = self.metadata.get(REQUEST_ID_HEADER, "")
        request_id = supplied if _VALID_REQUEST_ID.match(supplied) else uuid.uuid4().hex
        self.wants_inline_errors = self.metadata.get(STREAM_ERRORS_HEADER, "").lower() == "inline"
        self.ctx = request_context.RequestContext(
            request_id=request_id, method=method, peer=context.peer() or "", streaming=streaming
        )
        self._token: Any = None
        self._started_hooks = 0

    async def begin(self) -> None:
        self._token = request_context.activate(self.ctx)
        for phases in self.hooks:
            if phases.start is not None:
                pending = phases.start(self.ctx, self.metadata)
                if pending is not None:
                    await pending
            self._started_hooks += 1

    async def send_headers(self) -> None:
        # Only together with the first response message: an error before it must leave the
        # response trailers-only, which is what lets Envoy turn it into a 4xx/5xx HTTP status.
        await self.context.send_initial_metadata(((REQUEST_ID_HEADER, self.ctx.request_id),))

    def status_for(self, exc: BaseException) -> status_pb2.Status:
        status = to_status(exc, self.ctx.request_id)
        self.ctx.code = _CODE_NAMES.get(status.code, "UNKNOWN")
        self.ctx.reason = (
            getattr(exc, "reason", "") if status.code != code_pb2.INTERNAL else "INTERNAL"
        )
        if status.code == code_pb2.INTERNAL:
            log.error(
                "unexpected error in %s (request id %s)",
                self.ctx.method,
                self.ctx.request_id,
                exc_info=exc,
            )
        return status

    def cancelled(self) -> None:
        # grpc cancels the handler both when the client goes away and when the deadline passes;
        # only the clock tells them apart.
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.ctx.code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"

    async def fail(self, exc: BaseException) -> None:
        """Aborts the RPC with the mapped status; returns only for errors grpc handles itself."""
        if isinstance(exc, grpc.aio.AbortError):
            if self.ctx.code == "OK":
                self.ctx.code = "UNKNOWN"
            return
        status = rpc_status.to_status(self.status_for(exc))
        trailers: tuple[tuple[str, str | bytes], ...] = (
            *status.trailing_metadata,
            (REQUEST_ID_HEADER, self.ctx.request_id),
        )
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            # RetryInfo says it to gRPC clients; HTTP clients read Retry-After, which Envoy
            # passes on from a trailers-only response (whole seconds, rounded up).
            trailers = (*trailers, ("retry-after", str(max(1, math.ceil(retry_after)))))
        await self.context.abort(status.code, status.details, trailers)

    async def end(self) -> None:
        for phases in reversed(self.hooks[: self._started_hooks]):
            if phases.finish is None:
                continue
            try:
                pending = phases.finish(self.ctx)
                if pending is not None:
                    await pending
            except Exception:  # a broken hook must not turn a served call into an error
                log.exception("hook %s failed to finish", type(phases.hook).__name__)
        self.ctx.ended = time.perf_counter()
        if self.observers is not None:
            self.observers.submit(self.ctx)
        # A refused call still reaches hooks that saw its start, so the counts they keep
        # (streams, started RPCs) balance; hooks after the refusing one never saw it.
        if self._token is not None:
            # A stream cancelled under back-pressure is finalized in another context, where
            # the token cannot be reset (and the variable dies with its context anyway).
            with contextlib.suppress(ValueError):
                request_context.deactivate(self._token)
