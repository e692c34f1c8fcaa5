"""Thin servicers: proto -> domain -> dataplane -> proto. They raise domain errors and never
touch the context beyond reading the caller's deadline; the interceptor maps errors and sets the
request id."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pluggably.core.context import RequestContext, current
from pluggably.core.types import Chunk, DoneChunk, ProgressChunk
from pluggably.generation.convert import (
    ResponseAccumulator,
    generation_request_from_pb,
    stream_chunk_to_pb,
)
from pluggably.generation.dataplane import Dataplane
from pluggably.v1 import (
    generate_service_pb2,
    generate_service_pb2_grpc,
    generation_pb2,
    stream_service_pb2,
    stream_service_pb2_grpc,
)


def _deadline(context: Any) -> float | None:
    """The caller's deadline on the event loop's clock, or None."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def _note(ctx: RequestContext, model: str, chunk: Chunk) -> None:
    """Records on the request context what served it: the model, when output began, and the
    usage the backend reported (for the access log, metrics and token limits)."""
    if isinstance(chunk, DoneChunk):
        ctx.served_by(model)
        ctx.input_tokens = chunk.usage.prompt_tokens
        ctx.output_tokens = chunk.usage.completion_tokens
    elif ctx.first_output_at is None and not isinstance(chunk, ProgressChunk):
        ctx.served_by(model)
        ctx.output_started()


class GenerateServicer(generate_service_pb2_grpc.GenerateServiceServicer):
    def __init__(self, dataplane: Dataplane) -> None:
        self._dataplane = dataplane

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> generate_service_pb2.GenerateResponse:
        ctx = current()
        request_id = ctx.request_id if ctx is not None else ""
        if ctx is not None:
            ctx.requested_model = request.model
            ctx.operation = "chat" if request.messages else "text_completion"
        domain, modality = generation_request_from_pb(
            request, request_id, stream=False, deadline=_deadline(context)
        )
        result = ResponseAccumulator(request_id)
        stream = await self._dataplane.generate(
            domain, request.model, request.fallback_models, modality
        )
        async with contextlib.aclosing(stream):
            async for model, chunk in stream:
                if ctx is not None:
                    _note(ctx, model, chunk)
                result.add(model, chunk)
        return result.result()


class StreamServicer(stream_service_pb2_grpc.StreamServiceServicer):
    def __init__(self, dataplane: Dataplane) -> None:
        self._dataplane = dataplane

    async def StreamGenerate(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[stream_service_pb2.StreamGenerateResponse]:
        ctx = current()
        request_id = ctx.request_id if ctx is not None else ""
        if ctx is not None:
            ctx.requested_model = request.model
            ctx.operation = "chat" if request.messages else "text_completion"
        domain, modality = generation_request_from_pb(
            request, request_id, stream=True, deadline=_deadline(context)
        )
        stream = await self._dataplane.generate(
            domain, request.model, request.fallback_models, modality
        )
        async with contextlib.aclosing(stream):
            async for model, chunk in stream:
                if ctx is not None:
                    _note(ctx, model, chunk)
                yield stream_chunk_to_pb(request_id, model, chunk)
