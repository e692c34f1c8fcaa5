"""Thin servicers: proto -> domain -> router -> proto. They raise domain errors and never touch
the context; `GatewayInterceptor` maps errors and sets the request id."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

from pluggably.api.convert import (
    MODALITY_FROM_PB,
    ResponseAccumulator,
    generation_request_from_pb,
    model_to_pb,
    parameter_to_pb,
    stream_chunk_to_pb,
)
from pluggably.api.interceptors import current_request_id
from pluggably.core.errors import FieldViolation, InvalidArgument, Unimplemented
from pluggably.core.router import Router
from pluggably.v1 import (
    generate_service_pb2,
    generate_service_pb2_grpc,
    generation_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    storage_service_pb2_grpc,
    stream_service_pb2,
    stream_service_pb2_grpc,
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class GenerateServicer(generate_service_pb2_grpc.GenerateServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def Generate(self, request: generation_pb2.GenerateRequest, context: Any) -> generate_service_pb2.GenerateResponse:
        request_id = current_request_id()
        domain, modality = generation_request_from_pb(request, request_id)
        result = ResponseAccumulator(request_id)
        async for model, chunk in self._router.generate(domain, request.model, request.fallback_models, modality):
            result.add(model, chunk)
        return result.result()


class StreamServicer(stream_service_pb2_grpc.StreamServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def StreamGenerate(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[stream_service_pb2.StreamGenerateResponse]:
        request_id = current_request_id()
        domain, modality = generation_request_from_pb(request, request_id)
        async for model, chunk in self._router.generate(domain, request.model, request.fallback_models, modality):
            yield stream_chunk_to_pb(request_id, model, chunk)


def _not_yet(what: str, *, streaming: bool = False) -> Callable[..., Any]:
    """A handler for an RPC of the contract that a later issue implements: UNIMPLEMENTED with a
    message that says so (the generated base class would answer without details)."""
    def fail() -> NoReturn:
        raise Unimplemented(f"{what} is part of the v1 contract but not implemented by this server yet")

    async def unary(self: Any, request: Any, context: Any) -> NoReturn:
        fail()

    async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        fail()
        yield  # pragma: no cover - makes this a server-streaming handler

    return stream if streaming else unary


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def ListModels(self, request: model_service_pb2.ListModelsRequest, context: Any) -> model_service_pb2.ListModelsResponse:
        violations = []
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be in [0, {MAX_PAGE_SIZE}], got {request.page_size}"))
        if request.modality and request.modality not in MODALITY_FROM_PB:
            violations.append(FieldViolation("modality", f"unknown modality {request.modality}"))
        filter_key = f"{request.provider}|{request.modality}"
        after = ""
        if request.page_token:
            after = _decode_page_token(request.page_token, filter_key, violations)
        if violations:
            raise InvalidArgument(violations)

        modality = MODALITY_FROM_PB.get(request.modality)
        models = [
            m for m in await self._router.list_models()
            if (not request.provider or m.provider == request.provider)
            and (modality is None or m.modality is modality)
            and m.id > after
        ]
        size = request.page_size or DEFAULT_PAGE_SIZE
        page = models[:size]
        response = model_service_pb2.ListModelsResponse(models=[model_to_pb(m) for m in page])
        if len(models) > size:
            response.next_page_token = _encode_page_token(page[-1].id, filter_key)
        return response

    async def GetModel(self, request: model_service_pb2.GetModelRequest, context: Any):  # type: ignore[no-untyped-def]
        _require(request.id, "id")
        return model_to_pb(await self._router.get_model(request.id))

    async def GetModelParameters(self, request: model_service_pb2.GetModelParametersRequest, context: Any):  # type: ignore[no-untyped-def]
        _require(request.id, "id")
        model_id, specs = await self._router.parameters(request.id)
        return model_service_pb2.GetModelParametersResponse(
            model=model_id, parameters=[parameter_to_pb(s) for s in specs])

    DownloadModel = _not_yet("DownloadModel (model downloads)")
    GetDownload = _not_yet("GetDownload (model downloads)")
    WatchDownload = _not_yet("WatchDownload (model downloads)", streaming=True)
    CancelDownload = _not_yet("CancelDownload (model downloads)")
    DeleteModel = _not_yet("DeleteModel (local model storage)")
    RescanModels = _not_yet("RescanModels (model discovery)")


class StorageServicer(storage_service_pb2_grpc.StorageServiceServicer):
    GetStorageUsage = _not_yet("GetStorageUsage (storage manager)")
    PruneStorage = _not_yet("PruneStorage (storage manager)")
    ListArtifacts = _not_yet("ListArtifacts (artifact store)")
    GetArtifact = _not_yet("GetArtifact (artifact store)")
    ReadArtifact = _not_yet("ReadArtifact (artifact store)", streaming=True)
    DeleteArtifact = _not_yet("DeleteArtifact (artifact store)")


def _require(value: str, field: str) -> None:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])


def _encode_page_token(after: str, filter_key: str) -> str:
    raw = json.dumps({"after": after, "filter": filter_key}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, filter_key: str, violations: list[FieldViolation]) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after, used_filter = data["after"], data["filter"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        violations.append(FieldViolation("page_token", "not a token returned by ListModels"))
        return ""
    if used_filter != filter_key:
        violations.append(FieldViolation("page_token", "was issued for other filters; use the same provider and modality"))
    return str(after)
