import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import error_details_pb2 as _error_details_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FORMAT_UNSPECIFIED: _ClassVar[ModelFormat]
    MODEL_FORMAT_TRANSFORMERS: _ClassVar[ModelFormat]
    MODEL_FORMAT_DIFFUSERS: _ClassVar[ModelFormat]
    MODEL_FORMAT_GGUF: _ClassVar[ModelFormat]
    MODEL_FORMAT_SAFETENSORS: _ClassVar[ModelFormat]

class ModelSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_SOURCE_UNSPECIFIED: _ClassVar[ModelSource]
    MODEL_SOURCE_CONFIG: _ClassVar[ModelSource]
    MODEL_SOURCE_DOWNLOAD: _ClassVar[ModelSource]
    MODEL_SOURCE_DISCOVERY: _ClassVar[ModelSource]

class CircuitState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CIRCUIT_STATE_UNSPECIFIED: _ClassVar[CircuitState]
    CIRCUIT_STATE_CLOSED: _ClassVar[CircuitState]
    CIRCUIT_STATE_OPEN: _ClassVar[CircuitState]
    CIRCUIT_STATE_HALF_OPEN: _ClassVar[CircuitState]

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_TEXT: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_MESH: _ClassVar[Modality]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_AVAILABLE: _ClassVar[ModelState]
    MODEL_STATE_DOWNLOADING: _ClassVar[ModelState]
    MODEL_STATE_NOT_DOWNLOADED: _ClassVar[ModelState]
    MODEL_STATE_ERROR: _ClassVar[ModelState]
    MODEL_STATE_UNAVAILABLE: _ClassVar[ModelState]
    MODEL_STATE_DELETING: _ClassVar[ModelState]
    MODEL_STATE_UNSERVABLE: _ClassVar[ModelState]

class ParameterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAMETER_TYPE_UNSPECIFIED: _ClassVar[ParameterType]
    PARAMETER_TYPE_INTEGER: _ClassVar[ParameterType]
    PARAMETER_TYPE_NUMBER: _ClassVar[ParameterType]
    PARAMETER_TYPE_STRING: _ClassVar[ParameterType]
    PARAMETER_TYPE_BOOLEAN: _ClassVar[ParameterType]
    PARAMETER_TYPE_STRING_LIST: _ClassVar[ParameterType]

class DownloadState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DOWNLOAD_STATE_UNSPECIFIED: _ClassVar[DownloadState]
    DOWNLOAD_STATE_QUEUED: _ClassVar[DownloadState]
    DOWNLOAD_STATE_RUNNING: _ClassVar[DownloadState]
    DOWNLOAD_STATE_SUCCEEDED: _ClassVar[DownloadState]
    DOWNLOAD_STATE_FAILED: _ClassVar[DownloadState]
    DOWNLOAD_STATE_CANCELLED: _ClassVar[DownloadState]
MODEL_FORMAT_UNSPECIFIED: ModelFormat
MODEL_FORMAT_TRANSFORMERS: ModelFormat
MODEL_FORMAT_DIFFUSERS: ModelFormat
MODEL_FORMAT_GGUF: ModelFormat
MODEL_FORMAT_SAFETENSORS: ModelFormat
MODEL_SOURCE_UNSPECIFIED: ModelSource
MODEL_SOURCE_CONFIG: ModelSource
MODEL_SOURCE_DOWNLOAD: ModelSource
MODEL_SOURCE_DISCOVERY: ModelSource
CIRCUIT_STATE_UNSPECIFIED: CircuitState
CIRCUIT_STATE_CLOSED: CircuitState
CIRCUIT_STATE_OPEN: CircuitState
CIRCUIT_STATE_HALF_OPEN: CircuitState
MODALITY_UNSPECIFIED: Modality
MODALITY_TEXT: Modality
MODALITY_IMAGE: Modality
MODALITY_MESH: Modality
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_AVAILABLE: ModelState
MODEL_STATE_DOWNLOADING: ModelState
MODEL_STATE_NOT_DOWNLOADED: ModelState
MODEL_STATE_ERROR: ModelState
MODEL_STATE_UNAVAILABLE: ModelState
MODEL_STATE_DELETING: ModelState
MODEL_STATE_UNSERVABLE: ModelState
PARAMETER_TYPE_UNSPECIFIED: ParameterType
PARAMETER_TYPE_INTEGER: ParameterType
PARAMETER_TYPE_NUMBER: ParameterType
PARAMETER_TYPE_STRING: ParameterType
PARAMETER_TYPE_BOOLEAN: ParameterType
PARAMETER_TYPE_STRING_LIST: ParameterType
DOWNLOAD_STATE_UNSPECIFIED: DownloadState
DOWNLOAD_STATE_QUEUED: DownloadState
DOWNLOAD_STATE_RUNNING: DownloadState
DOWNLOAD_STATE_SUCCEEDED: DownloadState
DOWNLOAD_STATE_FAILED: DownloadState
DOWNLOAD_STATE_CANCELLED: DownloadState

class Model(_message.Message):
    __slots__ = ("id", "provider", "name", "description", "modality", "state", "aliases", "context_length", "size_bytes", "loaded", "capabilities", "state_reason", "circuit_state", "format", "source", "source_repo", "source_revision", "resolved_revision", "local_path", "pinned", "last_use_time", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_STATE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REPO_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REVISION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PATH_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LAST_USE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    provider: str
    name: str
    description: str
    modality: Modality
    state: ModelState
    aliases: _containers.RepeatedScalarFieldContainer[str]
    context_length: int
    size_bytes: int
    loaded: bool
    capabilities: ModelCapabilities
    state_reason: str
    circuit_state: CircuitState
    format: ModelFormat
    source: ModelSource
    source_repo: str
    source_revision: str
    resolved_revision: str
    local_path: str
    pinned: bool
    last_use_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., provider: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., state: _Optional[_Union[ModelState, str]] = ..., aliases: _Optional[_Iterable[str]] = ..., context_length: _Optional[int] = ..., size_bytes: _Optional[int] = ..., loaded: _Optional[bool] = ..., capabilities: _Optional[_Union[ModelCapabilities, _Mapping]] = ..., state_reason: _Optional[str] = ..., circuit_state: _Optional[_Union[CircuitState, str]] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., source: _Optional[_Union[ModelSource, str]] = ..., source_repo: _Optional[str] = ..., source_revision: _Optional[str] = ..., resolved_revision: _Optional[str] = ..., local_path: _Optional[str] = ..., pinned: _Optional[bool] = ..., last_use_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelCapabilities(_message.Message):
    __slots__ = ("streaming", "tools", "image_input", "json_object", "json_schema", "max_output_tokens")
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INPUT_FIELD_NUMBER: _ClassVar[int]
    JSON_OBJECT_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    streaming: bool
    tools: bool
    image_input: bool
    json_object: bool
    json_schema: bool
    max_output_tokens: int
    def __init__(self, streaming: _Optional[bool] = ..., tools: _Optional[bool] = ..., image_input: _Optional[bool] = ..., json_object: _Optional[bool] = ..., json_schema: _Optional[bool] = ..., max_output_tokens: _Optional[int] = ...) -> None: ...

class ParameterSpec(_message.Message):
    __slots__ = ("name", "type", "description", "supported", "default_value", "minimum", "exclusive_minimum", "maximum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ParameterType
    description: str
    supported: bool
    default_value: _struct_pb2.Value
    minimum: float
    exclusive_minimum: bool
    maximum: float
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ParameterType, str]] = ..., description: _Optional[str] = ..., supported: _Optional[bool] = ..., default_value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., minimum: _Optional[float] = ..., exclusive_minimum: _Optional[bool] = ..., maximum: _Optional[float] = ...) -> None: ...

class Download(_message.Message):
    __slots__ = ("id", "model", "repo_id", "revision", "state", "downloaded_bytes", "total_bytes", "error", "create_time", "update_time", "downloaded_files", "total_files", "bytes_per_second", "eta", "requested_revision", "allow_patterns", "ignore_patterns")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPO_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DOWNLOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DOWNLOADED_FILES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PATTERNS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_PATTERNS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    repo_id: str
    revision: str
    state: DownloadState
    downloaded_bytes: int
    total_bytes: int
    error: _status_pb2.Status
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    downloaded_files: int
    total_files: int
    bytes_per_second: float
    eta: _duration_pb2.Duration
    requested_revision: str
    allow_patterns: _containers.RepeatedScalarFieldContainer[str]
    ignore_patterns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., repo_id: _Optional[str] = ..., revision: _Optional[str] = ..., state: _Optional[_Union[DownloadState, str]] = ..., downloaded_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., downloaded_files: _Optional[int] = ..., total_files: _Optional[int] = ..., bytes_per_second: _Optional[float] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., requested_revision: _Optional[str] = ..., allow_patterns: _Optional[_Iterable[str]] = ..., ignore_patterns: _Optional[_Iterable[str]] = ...) -> None: ...
