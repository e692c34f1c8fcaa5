import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from pluggably.v1 import artifact_pb2 as _artifact_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StorageCategory(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORAGE_CATEGORY_UNSPECIFIED: _ClassVar[StorageCategory]
    STORAGE_CATEGORY_MODELS: _ClassVar[StorageCategory]
    STORAGE_CATEGORY_ARTIFACTS: _ClassVar[StorageCategory]
    STORAGE_CATEGORY_CACHE: _ClassVar[StorageCategory]
    STORAGE_CATEGORY_TEMPORARY: _ClassVar[StorageCategory]
STORAGE_CATEGORY_UNSPECIFIED: StorageCategory
STORAGE_CATEGORY_MODELS: StorageCategory
STORAGE_CATEGORY_ARTIFACTS: StorageCategory
STORAGE_CATEGORY_CACHE: StorageCategory
STORAGE_CATEGORY_TEMPORARY: StorageCategory

class GetStorageUsageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStorageUsageResponse(_message.Message):
    __slots__ = ("categories", "used_bytes", "limit_bytes", "disk_free_bytes", "recent_evictions")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECENT_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedCompositeFieldContainer[CategoryUsage]
    used_bytes: int
    limit_bytes: int
    disk_free_bytes: int
    recent_evictions: _containers.RepeatedCompositeFieldContainer[StorageEviction]
    def __init__(self, categories: _Optional[_Iterable[_Union[CategoryUsage, _Mapping]]] = ..., used_bytes: _Optional[int] = ..., limit_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., recent_evictions: _Optional[_Iterable[_Union[StorageEviction, _Mapping]]] = ...) -> None: ...

class StorageEviction(_message.Message):
    __slots__ = ("id", "category", "freed_bytes", "reason", "time")
    ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    category: StorageCategory
    freed_bytes: int
    reason: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., category: _Optional[_Union[StorageCategory, str]] = ..., freed_bytes: _Optional[int] = ..., reason: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CategoryUsage(_message.Message):
    __slots__ = ("category", "used_bytes", "limit_bytes", "item_count")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    category: StorageCategory
    used_bytes: int
    limit_bytes: int
    item_count: int
    def __init__(self, category: _Optional[_Union[StorageCategory, str]] = ..., used_bytes: _Optional[int] = ..., limit_bytes: _Optional[int] = ..., item_count: _Optional[int] = ...) -> None: ...

class PruneStorageRequest(_message.Message):
    __slots__ = ("categories", "target_free_bytes", "older_than", "dry_run")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OLDER_THAN_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedScalarFieldContainer[StorageCategory]
    target_free_bytes: int
    older_than: _duration_pb2.Duration
    dry_run: bool
    def __init__(self, categories: _Optional[_Iterable[_Union[StorageCategory, str]]] = ..., target_free_bytes: _Optional[int] = ..., older_than: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class PruneStorageResponse(_message.Message):
    __slots__ = ("freed_bytes", "removed")
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, freed_bytes: _Optional[int] = ..., removed: _Optional[_Iterable[str]] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "model", "kind")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    model: str
    kind: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., model: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts", "next_page_token")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[_artifact_pb2.Artifact]
    next_page_token: str
    def __init__(self, artifacts: _Optional[_Iterable[_Union[_artifact_pb2.Artifact, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ReadArtifactRequest(_message.Message):
    __slots__ = ("id", "offset", "length")
    ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    id: str
    offset: int
    length: int
    def __init__(self, id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class DeleteArtifactRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteArtifactResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...
