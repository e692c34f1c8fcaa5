"""StorageService: answered UNIMPLEMENTED until the storage manager lands."""

from __future__ import annotations

from pluggably.api.unimplemented import not_yet
from pluggably.v1 import storage_service_pb2_grpc


class StorageServicer(storage_service_pb2_grpc.StorageServiceServicer):
    GetStorageUsage = not_yet("GetStorageUsage (storage manager)")
    PruneStorage = not_yet("PruneStorage (storage manager)")
    ListArtifacts = not_yet("ListArtifacts (artifact store)")
    GetArtifact = not_yet("GetArtifact (artifact store)")
    ReadArtifact = not_yet("ReadArtifact (artifact store)", streaming=True)
    DeleteArtifact = not_yet("DeleteArtifact (artifact store)")
