from google.api import annotations_pb2 as _annotations_pb2
from google.rpc import error_details_pb2 as _error_details_pb2
from google.rpc import status_pb2 as _status_pb2
from pluggably.v1 import artifact_pb2 as _artifact_pb2
from pluggably.v1 import generation_pb2 as _generation_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamGenerateResponse(_message.Message):
    __slots__ = ("id", "model", "text_delta", "progress", "artifact", "done", "tool_call_delta", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_DELTA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    text_delta: _generation_pb2.TextDelta
    progress: _generation_pb2.Progress
    artifact: _artifact_pb2.Artifact
    done: _generation_pb2.StreamDone
    tool_call_delta: _generation_pb2.ToolCallDelta
    error: _status_pb2.Status
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., text_delta: _Optional[_Union[_generation_pb2.TextDelta, _Mapping]] = ..., progress: _Optional[_Union[_generation_pb2.Progress, _Mapping]] = ..., artifact: _Optional[_Union[_artifact_pb2.Artifact, _Mapping]] = ..., done: _Optional[_Union[_generation_pb2.StreamDone, _Mapping]] = ..., tool_call_delta: _Optional[_Union[_generation_pb2.ToolCallDelta, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
