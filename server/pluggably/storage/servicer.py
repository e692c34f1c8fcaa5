"""StorageService: disk use against the budget, pruning, and the artifact store."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from google.api import httpbody_pb2

from pluggably.core.errors import FieldViolation, InvalidArgument, Unimplemented
from pluggably.storage.artifacts import ARTIFACT_KINDS, ArtifactInfo
from pluggably.storage.budget import Category
from pluggably.v1 import artifact_pb2, storage_service_pb2, storage_service_pb2_grpc

if TYPE_CHECKING:
    from pluggably.storage.manager import StorageManager

_CATEGORY_TO_PB = {
    Category.MODELS: storage_service_pb2.STORAGE_CATEGORY_MODELS,
    Category.ARTIFACTS: storage_service_pb2.STORAGE_CATEGORY_ARTIFACTS,
    Category.CACHE: storage_service_pb2.STORAGE_CATEGORY_CACHE,
    Category.TEMPORARY: storage_service_pb2.STORAGE_CATEGORY_TEMPORARY,
}
_CATEGORY_FROM_PB = {v: k for k, v in _CATEGORY_TO_PB.items()}
# Bytes per ReadArtifact message: well under grpc's message limit, few messages per file.
READ_CHUNK_BYTES = 256 * 1024


class StorageServicer(storage_service_pb2_grpc.StorageServiceServicer):
    def __init__(self, storage: StorageManager | None = None) -> None:
        self._storage = storage

    def _manager(self) -> StorageManager:
        if self._storage is None:
            raise Unimplemented("this server keeps no local storage")
        return self._storage

    async def GetStorageUsage(
        self, request: storage_service_pb2.GetStorageUsageRequest, context: Any
    ) -> storage_service_pb2.GetStorageUsageResponse:
        manager = self._manager()
        report = await manager.usage()
        usage = report.usage
        response = storage_service_pb2.GetStorageUsageResponse(
            used_bytes=usage.used_bytes,
            limit_bytes=usage.total_limit_bytes or 0,
            disk_free_bytes=usage.disk_free_bytes,
        )
        for category, pb in _CATEGORY_TO_PB.items():
            part = usage.categories[category]
            response.categories.append(
                storage_service_pb2.CategoryUsage(
                    category=pb,
                    used_bytes=part.used_bytes,
                    limit_bytes=part.limit_bytes or 0,
                    item_count=report.item_counts.get(category, 0),
                )
            )
        for eviction in reversed(manager.budget.evictions()):
            item = response.recent_evictions.add(
                id=eviction.id,
                category=_CATEGORY_TO_PB[eviction.category],
                freed_bytes=eviction.freed_bytes,
                reason=eviction.reason,
            )
            item.time.FromNanoseconds(int(eviction.at * 1e9))
        return response

    async def PruneStorage(
        self, request: storage_service_pb2.PruneStorageRequest, context: Any
    ) -> storage_service_pb2.PruneStorageResponse:
        violations: list[FieldViolation] = []
        categories = []
        for index, value in enumerate(request.categories):
            if value not in _CATEGORY_FROM_PB:
                violations.append(
                    FieldViolation(f"categories[{index}]", f"unknown category {value}")
                )
            else:
                categories.append(_CATEGORY_FROM_PB[value])
        if request.target_free_bytes < 0:
            violations.append(FieldViolation("target_free_bytes", "must be >= 0"))
        older_than_s = None
        if request.HasField("older_than"):
            older_than_s = request.older_than.ToTimedelta().total_seconds()
            if older_than_s < 0:
                violations.append(FieldViolation("older_than", "must not be negative"))
        if violations:
            raise InvalidArgument(violations)
        result = await self._manager().prune(
            categories,
            target_free_bytes=request.target_free_bytes,
            older_than_s=older_than_s,
            dry_run=request.dry_run,
        )
        return storage_service_pb2.PruneStorageResponse(
            freed_bytes=result.freed_bytes, removed=result.removed
        )

    async def ListArtifacts(
        self, request: storage_service_pb2.ListArtifactsRequest, context: Any
    ) -> storage_service_pb2.ListArtifactsResponse:
        if request.kind and request.kind not in ARTIFACT_KINDS:
            raise InvalidArgument([FieldViolation("kind", f"one of {', '.join(ARTIFACT_KINDS)}")])
        artifacts, token = await self._manager().artifacts.list(
            page_size=request.page_size,
            page_token=request.page_token,
            model=request.model or None,
            kind=request.kind or None,
        )
        return storage_service_pb2.ListArtifactsResponse(
            artifacts=[artifact_to_pb(a) for a in artifacts], next_page_token=token
        )

    async def GetArtifact(
        self, request: storage_service_pb2.GetArtifactRequest, context: Any
    ) -> artifact_pb2.Artifact:
        return artifact_to_pb(await self._manager().artifacts.get(request.id))

    async def ReadArtifact(
        self, request: storage_service_pb2.ReadArtifactRequest, context: Any
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        store = self._manager().artifacts
        info = await store.get(request.id)
        violations = []
        if request.offset < 0:
            violations.append(FieldViolation("offset", "must be >= 0"))
        if request.length < 0:
            violations.append(FieldViolation("length", "must be >= 0 (0: to the end)"))
        if violations:
            raise InvalidArgument(violations)
        read = store.read(
            info.id,
            offset=request.offset,
            length=request.length or None,
            chunk_size=READ_CHUNK_BYTES,
        )
        async with contextlib.aclosing(read) as chunks:
            first = True
            async for data in chunks:
                # The content type on the first message is what Envoy sends as Content-Type.
                yield httpbody_pb2.HttpBody(content_type=info.mime_type if first else "", data=data)
                first = False
            if first:  # an empty file still answers with its content type
                yield httpbody_pb2.HttpBody(content_type=info.mime_type)

    async def DeleteArtifact(
        self, request: storage_service_pb2.DeleteArtifactRequest, context: Any
    ) -> storage_service_pb2.DeleteArtifactResponse:
        freed = await self._manager().artifacts.delete(request.id)
        return storage_service_pb2.DeleteArtifactResponse(freed_bytes=freed)


def artifact_to_pb(info: ArtifactInfo) -> artifact_pb2.Artifact:
    artifact = artifact_pb2.Artifact(
        id=info.id,
        mime_type=info.mime_type,
        size_bytes=info.size_bytes,
        model=info.model,
        request_id=info.request_id,
        content_path=f"/v1/artifacts/{info.id}:content",
        kind=info.kind,
    )
    artifact.create_time.FromNanoseconds(int(info.created * 1e9))
    if info.expires is not None:
        artifact.expire_time.FromNanoseconds(int(info.expires * 1e9))
    return artifact
