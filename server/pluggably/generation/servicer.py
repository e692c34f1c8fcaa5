"""Thin servicers: proto -> domain -> dataplane -> proto. They raise domain errors and never
touch the context beyond reading the caller's deadline; the interceptor maps errors and sets the
request id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pluggably.core.context import RequestContext, current
from pluggably.core.errors import Unavailable
from pluggably.core.types import (
    ArtifactChunk,
    Chunk,
    DoneChunk,
    GenerationRequest,
    Modality,
    ProgressChunk,
)
from pluggably.generation.convert import (
    ResponseAccumulator,
    generation_request_from_pb,
    stream_chunk_to_pb,
)
from pluggably.generation.dataplane import Dataplane
from pluggably.storage.servicer import artifact_to_pb
from pluggably.v1 import (
    artifact_pb2,
    generate_service_pb2,
    generate_service_pb2_grpc,
    generation_pb2,
    stream_service_pb2,
    stream_service_pb2_grpc,
)

if TYPE_CHECKING:
    from pluggably.storage.artifacts import ArtifactStore

prompt_log = logging.getLogger("pluggably.prompts")


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


def _begin(
    request: generation_pb2.GenerateRequest,
    context: Any,
    ctx: RequestContext | None,
    *,
    stream: bool,
    log_prompt: bool,
) -> tuple[GenerationRequest, Modality | None]:
    request_id = ctx.request_id if ctx is not None else ""
    if ctx is not None:
        ctx.requested_model = request.model
        ctx.operation = "chat" if request.messages else "text_completion"
    domain, modality = generation_request_from_pb(
        request, request_id, stream=stream, deadline=_deadline(context)
    )
    if log_prompt and prompt_log.isEnabledFor(logging.DEBUG):
        # Only when the operator switched it on (logging.log_prompts): prompts are user data.
        prompt_log.debug(
            "prompt",
            extra={
                "request_id": request_id,
                "model": request.model,
                "prompt": domain.prompt,
                "messages": [{"role": m.role, "content": m.content} for m in domain.messages],
            },
        )
    return domain, modality


class ArtifactSink:
    """Stores the files a generation yields (`ArtifactChunk`) in the artifact store and turns
    them into `Artifact` references (with the bytes inline when the request asked)."""

    def __init__(self, store: ArtifactStore | None) -> None:
        self._store = store

    async def put(
        self, chunk: ArtifactChunk, model: str, request_id: str, *, inline: bool
    ) -> artifact_pb2.Artifact:
        if self._store is None:
            raise Unavailable(
                "this server keeps no artifact store for generated files",
                reason="NO_ARTIFACT_STORE",
            )
        info = await self._store.put(
            chunk.data,
            kind=chunk.kind,
            mime_type=chunk.mime_type,
            model=model,
            request_id=request_id,
        )
        artifact = artifact_to_pb(info)
        if inline:
            artifact.inline_data = chunk.data
        return artifact


def _inline(request: GenerationRequest) -> bool:
    return request.image.inline_data or request.mesh.inline_data


class GenerateServicer(generate_service_pb2_grpc.GenerateServiceServicer):
    def __init__(
        self,
        dataplane: Dataplane,
        *,
        log_prompts: bool = False,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._log_prompts = log_prompts
        self._artifacts = ArtifactSink(artifacts)

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> generate_service_pb2.GenerateResponse:
        ctx = current()
        request_id = ctx.request_id if ctx is not None else ""
        domain, modality = _begin(request, context, ctx, stream=False, log_prompt=self._log_prompts)
        result = ResponseAccumulator(request_id)
        stream = await self._dataplane.generate(
            domain, request.model, request.fallback_models, modality
        )
        async with contextlib.aclosing(stream):
            async for model, chunk in stream:
                if ctx is not None:
                    _note(ctx, model, chunk)
                if isinstance(chunk, ArtifactChunk):
                    result.response.artifacts.append(
                        await self._artifacts.put(chunk, model, request_id, inline=_inline(domain))
                    )
                    continue
                result.add(model, chunk)
        return result.result()


class StreamServicer(stream_service_pb2_grpc.StreamServiceServicer):
    def __init__(
        self,
        dataplane: Dataplane,
        *,
        log_prompts: bool = False,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._log_prompts = log_prompts
        self._artifacts = ArtifactSink(artifacts)

    async def StreamGenerate(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[stream_service_pb2.StreamGenerateResponse]:
        ctx = current()
        request_id = ctx.request_id if ctx is not None else ""
        domain, modality = _begin(request, context, ctx, stream=True, log_prompt=self._log_prompts)
        stream = await self._dataplane.generate(
            domain, request.model, request.fallback_models, modality
        )
        async with contextlib.aclosing(stream):
            async for model, chunk in stream:
                if ctx is not None:
                    _note(ctx, model, chunk)
                if isinstance(chunk, ArtifactChunk):
                    out = stream_service_pb2.StreamGenerateResponse(id=request_id, model=model)
                    out.artifact.CopyFrom(
                        await self._artifacts.put(chunk, model, request_id, inline=_inline(domain))
                    )
                    yield out
                    continue
                yield stream_chunk_to_pb(request_id, model, chunk)
