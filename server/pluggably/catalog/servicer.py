"""ModelService: the models every backend serves, by id or alias, and their parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pluggably.api.pagination import check_page_size, decode_page_token, encode_page_token
from pluggably.catalog.convert import (
    DOWNLOAD_STATE_FROM_PB,
    MODALITY_FROM_PB,
    STATE_FROM_PB,
    check_model_id,
    download_to_pb,
    model_to_pb,
    parameter_to_pb,
)
from pluggably.core.context import current_principal
from pluggably.core.errors import FieldViolation, InvalidArgument, PermissionDenied, Unimplemented
from pluggably.core.types import ModelInfo
from pluggably.generation.router import Router
from pluggably.v1 import model_pb2, model_service_pb2, model_service_pb2_grpc

if TYPE_CHECKING:
    from pluggably.catalog.downloads import DownloadJob, DownloadManager
    from pluggably.catalog.manager import ModelManager


# Longest `ListModelsRequest.query`: a search text, not a document.
MAX_QUERY_CHARS = 256


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(
        self,
        router: Router,
        manager: ModelManager | None = None,
        downloads: DownloadManager | None = None,
    ) -> None:
        self._router = router
        self._manager = manager
        self._downloads = downloads

    def _jobs(self) -> DownloadManager:
        if self._downloads is None:
            raise Unimplemented("this server downloads no models")
        return self._downloads

    def _models(self) -> ModelManager:
        if self._manager is None:
            raise Unimplemented("this server manages no local models")
        return self._manager

    async def ListModels(
        self, request: model_service_pb2.ListModelsRequest, context: Any
    ) -> model_service_pb2.ListModelsResponse:
        violations: list[FieldViolation] = []
        size = check_page_size(request.page_size, violations)
        if request.modality and request.modality not in MODALITY_FROM_PB:
            violations.append(FieldViolation("modality", f"unknown modality {request.modality}"))
        if request.state and request.state not in STATE_FROM_PB:
            violations.append(FieldViolation("state", f"unknown state {request.state}"))
        if len(request.query) > MAX_QUERY_CHARS:
            violations.append(FieldViolation("query", f"at most {MAX_QUERY_CHARS} characters"))
        elif not request.query.isprintable():
            violations.append(FieldViolation("query", "must be printable"))
        # Filters are part of the token: a token used with other filters is refused.
        filter_key = f"{request.provider}|{request.modality}|{request.state}|{request.query}"
        after = ""
        if request.page_token:
            after = decode_page_token(request.page_token, filter_key, violations, "ListModels")
        if violations:
            raise InvalidArgument(violations)

        modality = MODALITY_FROM_PB.get(request.modality)
        state = STATE_FROM_PB.get(request.state)
        query = request.query.casefold()
        principal = current_principal()
        models = [
            m
            for m in await self._router.list_models()
            if (principal is None or principal.may_use(m.id))
            and (not request.provider or m.provider == request.provider)
            and (modality is None or m.modality is modality)
            and (state is None or m.state is state)
            and (not query or _matches(m, query))
            and m.id > after
        ]
        page = models[:size]
        response = model_service_pb2.ListModelsResponse(models=[model_to_pb(m) for m in page])
        if len(models) > size:
            response.next_page_token = encode_page_token(page[-1].id, filter_key)
        return response

    async def GetModel(
        self, request: model_service_pb2.GetModelRequest, context: Any
    ) -> model_pb2.Model:
        _require(request.id, "id")
        model = await self._router.get_model(request.id)
        _check_allowed(model.id)
        return model_to_pb(model)

    async def GetModelParameters(
        self, request: model_service_pb2.GetModelParametersRequest, context: Any
    ) -> model_service_pb2.GetModelParametersResponse:
        _require(request.id, "id")
        model_id, specs = await self._router.parameters(request.id)
        _check_allowed(model_id)
        return model_service_pb2.GetModelParametersResponse(
            model=model_id, parameters=[parameter_to_pb(s) for s in specs]
        )

    async def DownloadModel(
        self, request: model_service_pb2.DownloadModelRequest, context: Any
    ) -> model_pb2.Download:
        name = request.name or request.repo_id
        _check_allowed(f"local/{name}")
        job = await self._jobs().download(
            request.repo_id,
            revision=request.revision,
            name=request.name,
            allow_patterns=list(request.allow_patterns),
            ignore_patterns=list(request.ignore_patterns),
            pinned=request.pinned,
        )
        return download_to_pb(job)

    async def GetDownload(
        self, request: model_service_pb2.GetDownloadRequest, context: Any
    ) -> model_pb2.Download:
        return download_to_pb(self._jobs().get(request.id))

    async def WatchDownload(
        self, request: model_service_pb2.WatchDownloadRequest, context: Any
    ) -> AsyncIterator[model_pb2.Download]:
        async for job in self._jobs().watch(request.id):
            yield download_to_pb(job)

    async def CancelDownload(
        self, request: model_service_pb2.CancelDownloadRequest, context: Any
    ) -> model_pb2.Download:
        return download_to_pb(await self._jobs().cancel(request.id))

    async def ListDownloads(
        self, request: model_service_pb2.ListDownloadsRequest, context: Any
    ) -> model_service_pb2.ListDownloadsResponse:
        violations: list[FieldViolation] = []
        size = check_page_size(request.page_size, violations)
        if request.state and request.state not in DOWNLOAD_STATE_FROM_PB:
            violations.append(FieldViolation("state", f"unknown state {request.state}"))
        filter_key = f"downloads|{request.state}"
        after = ""
        if request.page_token:
            after = decode_page_token(request.page_token, filter_key, violations, "ListDownloads")
        if violations:
            raise InvalidArgument(violations)
        jobs = self._jobs().list(DOWNLOAD_STATE_FROM_PB.get(request.state))
        if after:  # newest first: continue after the position (creation time, id)
            jobs = [j for j in jobs if _position(j) < after]
        page = jobs[:size]
        response = model_service_pb2.ListDownloadsResponse(
            downloads=[download_to_pb(j) for j in page]
        )
        if len(jobs) > size:
            response.next_page_token = encode_page_token(_position(page[-1]), filter_key)
        return response

    async def RescanModels(
        self, request: model_service_pb2.RescanModelsRequest, context: Any
    ) -> model_service_pb2.RescanModelsResponse:
        added, removed = await self._models().rescan()
        return model_service_pb2.RescanModelsResponse(added=added, removed=removed)

    async def DeleteModel(
        self, request: model_service_pb2.DeleteModelRequest, context: Any
    ) -> model_service_pb2.DeleteModelResponse:
        _require(request.id, "id")
        _check_allowed(request.id)
        freed = await self._models().delete(request.id)
        return model_service_pb2.DeleteModelResponse(freed_bytes=freed)

    async def PinModel(
        self, request: model_service_pb2.PinModelRequest, context: Any
    ) -> model_pb2.Model:
        _require(request.id, "id")
        _check_allowed(request.id)
        return model_to_pb(await self._models().set_pinned(request.id, True))

    async def UnpinModel(
        self, request: model_service_pb2.UnpinModelRequest, context: Any
    ) -> model_pb2.Model:
        _require(request.id, "id")
        _check_allowed(request.id)
        return model_to_pb(await self._models().set_pinned(request.id, False))


def _position(job: DownloadJob) -> str:
    # Sorts like (created_at, id): fixed-width time, then the id.
    return f"{job.created_at:020.6f}|{job.id}"


def _matches(model: ModelInfo, query: str) -> bool:
    local = model.local
    texts = (model.id, model.description, local.source_repo if local is not None else "")
    return any(query in text.casefold() for text in texts)


def _require(value: str, field: str) -> None:
    """A model id or alias: bounded and printable before anything quotes it in an error."""
    violations: list[FieldViolation] = []
    check_model_id(value, field, violations)
    if violations:
        raise InvalidArgument(violations)


def _check_allowed(model_id: str) -> None:
    principal = current_principal()
    if principal is not None and not principal.may_use(model_id):
        raise PermissionDenied(
            f"API key {principal.key_id} may not use model {model_id}",
            reason="MODEL_NOT_ALLOWED",
            metadata={"key_id": principal.key_id, "model": model_id},
        )
