#!/usr/bin/env python3
"""Generate the OpenAPI 3.0.3 document of Pluggably's REST API from the protobuf descriptor set.

The REST API is not written by hand: Envoy's ``grpc_json_transcoder`` serves the ``pluggably.v1``
gRPC services over HTTP/JSON according to their ``google.api.http`` annotations. This tool reads
the same descriptor set Envoy loads (``envoy/pluggably.pb``, built with imports and source info)
and describes exactly what the transcoder serves:

* one operation per HTTP binding (``additional_bindings`` included), with ``{var=pattern}`` path
  variables turned into ``{var}`` and custom verbs (``:stream``) kept literally in the path;
* proto3 JSON mapping: lowerCamelCase ``json_name`` properties, 64-bit integers as strings,
  enums as their value names, maps as objects, and the well-known types by their JSON form
  (Timestamp, Duration, Struct, Value, ListValue, Any, FieldMask, wrappers, Empty);
* ``google.api.HttpBody`` responses as the raw body, server-streaming methods as Server-Sent
  Events (Envoy runs with ``stream_sse_style_delimited``: one JSON chunk per ``data:`` event);
* errors as ``google.rpc.Status`` JSON (Envoy runs with ``convert_grpc_status``);
* descriptions from the proto comments; a field whose comment starts with ``Required.`` is listed
  in its schema's ``required``, one whose comment starts with ``Output only.`` is ``readOnly``.

Every message and enum reachable from the services (plus ``google.rpc.Status`` and the standard
error details of ``google/rpc/error_details.proto``) becomes a component schema named by its full
proto name, for example ``pluggably.v1.GenerateRequest``. Well-known types are inlined.

Request bodies: with ``body: "*"`` and no path variables the body schema is the request message
itself; when path variables are bound too, the body is an inline copy of the message schema
without the path fields. ``body: "field"`` uses that field's schema. Fields bound to neither the
path nor the body become query parameters (nested message fields flattened to dotted names).

Output is deterministic: map-like objects (paths, components, responses, schema keywords) have
sorted keys, message properties and parameters keep proto declaration order, 2-space indent and a
trailing newline, no timestamps. Only the standard library and ``protobuf`` are used.

Usage: python -m pluggably.devtools.openapi_gen envoy/pluggably.pb -o envoy/openapi.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "pluggably.v1"
OPENAPI_VERSION = "3.0.3"
TITLE = "Pluggably API"
API_VERSION = "v1"
SERVER_URL = "http://localhost:8080"

DESCRIPTION = """\
Pluggably is a gRPC-first gateway for generative AI: one typed API for text, image and 3D \
generation that routes each request to a local model run by Pluggably itself or to a remote \
provider, plus the model catalog, model downloads and the storage of generated files.

This REST API is the gRPC API (package `pluggably.v1`) transcoded by Envoy's gRPC-JSON \
transcoder, and this document is generated from the same protobuf descriptors. The JSON is the \
standard proto3 JSON mapping: field names are lowerCamelCase (the proto snake_case names are \
accepted on input too, in bodies and query parameters), 64-bit integers are strings, `bytes` are \
base64, enums are their value names. Responses print scalar, enum, list and map fields even when \
they hold their default value; unset message fields, unset `optional` fields and unset oneof \
members are omitted. Unknown query parameters are rejected. Errors are `google.rpc.Status` JSON \
with the HTTP status mapped from the gRPC code. Streaming methods answer with Server-Sent Events \
(`text/event-stream`), one JSON message per `data:` event."""

# Field numbers in descriptor.proto / http.proto.
HTTP_EXTENSION_NUMBER = 72295728  # google.api.http on google.protobuf.MethodOptions
HTTP_RULE = "google.api.HttpRule"
HTTP_BODY = "google.api.HttpBody"
STATUS = "google.rpc.Status"
ANY = "google.protobuf.Any"
ERROR_DETAILS_FILE = "google/rpc/error_details.proto"

# SourceCodeInfo path components.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MSG_FIELD, MSG_NESTED, MSG_ENUM, MSG_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

FDP = descriptor_pb2.FieldDescriptorProto
SCALARS: dict[int, dict[str, Any]] = {
    FDP.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FDP.TYPE_FLOAT: {"type": "number", "format": "float"},
    FDP.TYPE_INT64: {"type": "string", "format": "int64"},
    FDP.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FDP.TYPE_SINT64: {"type": "string", "format": "int64"},
    FDP.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FDP.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FDP.TYPE_INT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FDP.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FDP.TYPE_BOOL: {"type": "boolean"},
    FDP.TYPE_STRING: {"type": "string"},
    FDP.TYPE_BYTES: {"type": "string", "format": "byte"},
}

_WRAPPER_SCALARS = {
    "DoubleValue": FDP.TYPE_DOUBLE,
    "FloatValue": FDP.TYPE_FLOAT,
    "Int64Value": FDP.TYPE_INT64,
    "UInt64Value": FDP.TYPE_UINT64,
    "Int32Value": FDP.TYPE_INT32,
    "UInt32Value": FDP.TYPE_UINT32,
    "BoolValue": FDP.TYPE_BOOL,
    "StringValue": FDP.TYPE_STRING,
    "BytesValue": FDP.TYPE_BYTES,
}

# Well-known types with a special JSON form, inlined wherever they are used. `query` says whether
# the transcoder can take the type from a single query parameter.
WELL_KNOWN: dict[str, tuple[dict[str, Any], bool]] = {
    "google.protobuf.Timestamp": (
        {
            "type": "string",
            "format": "date-time",
            "description": "An RFC 3339 timestamp in UTC, for example `2026-01-02T03:04:05.678Z`.",
        },
        True,
    ),
    "google.protobuf.Duration": (
        {
            "type": "string",
            "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
            "example": "1.5s",
            "description": "A duration in seconds with up to nine fractional digits and the "
            "suffix `s`, for example `1.5s`.",
        },
        True,
    ),
    "google.protobuf.FieldMask": (
        {
            "type": "string",
            "description": "A field mask: comma-separated lowerCamelCase field paths.",
        },
        True,
    ),
    "google.protobuf.Struct": (
        {"type": "object", "additionalProperties": True, "description": "Any JSON object."},
        False,
    ),
    "google.protobuf.Value": ({"description": "Any JSON value."}, False),
    "google.protobuf.ListValue": (
        {"type": "array", "items": {}, "description": "A JSON array of any values."},
        False,
    ),
    "google.protobuf.Empty": ({"type": "object", "description": "An empty JSON object."}, False),
}
for _name, _scalar in _WRAPPER_SCALARS.items():
    WELL_KNOWN[f"google.protobuf.{_name}"] = (
        {**SCALARS[_scalar], "nullable": True, "description": "A wrapped scalar; may be null."},
        True,
    )

ANY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A message of any type: the JSON form of that message plus an `@type` member "
    "naming it, for example `type.googleapis.com/google.rpc.BadRequest`. Well-known types with a "
    "special JSON form carry it in a `value` member instead. In `google.rpc.Status.details` the "
    "type is one of the error details of `google/rpc/error_details.proto`, whose schemas are "
    "listed under their full names (`google.rpc.ErrorInfo`, `google.rpc.BadRequest`, "
    "`google.rpc.RetryInfo`, ...).",
    "properties": {
        "@type": {
            "type": "string",
            "description": "The type URL, `type.googleapis.com/` followed by the full message name.",
        }
    },
    "required": ["@type"],
    "additionalProperties": True,
}

# gRPC status codes and the HTTP statuses Envoy maps them to (convert_grpc_status).
GRPC_TO_HTTP = {
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
_ERROR_RESPONSES = {
    400: (
        "BadRequest",
        "INVALID_ARGUMENT, FAILED_PRECONDITION or OUT_OF_RANGE: the request is "
        "malformed or not allowed in the current state. Field problems are listed in a "
        "`google.rpc.BadRequest` detail.",
    ),
    401: ("Unauthenticated", "UNAUTHENTICATED: the request carries no valid credentials."),
    403: ("PermissionDenied", "PERMISSION_DENIED: the caller may not do this."),
    404: (
        "NotFound",
        "NOT_FOUND: the named resource does not exist, or no route matches the path and method.",
    ),
    409: ("Conflict", "ALREADY_EXISTS or ABORTED: the request conflicts with the current state."),
    429: (
        "ResourceExhausted",
        "RESOURCE_EXHAUSTED: a queue, quota or storage limit is full. A "
        "`google.rpc.RetryInfo` detail may say when to retry.",
    ),
    499: ("Cancelled", "CANCELLED: the request was cancelled, usually by the client."),
    500: ("Internal", "INTERNAL, UNKNOWN or DATA_LOSS: the server failed."),
    501: ("Unimplemented", "UNIMPLEMENTED: the method or option is not supported."),
    503: (
        "Unavailable",
        "UNAVAILABLE: no backend can serve the request now; retrying later may succeed.",
    ),
    504: ("DeadlineExceeded", "DEADLINE_EXCEEDED: the request did not finish in time."),
}
ALWAYS_ERRORS = (400, 404)
# Errors Envoy's transcoder answers itself, before the gRPC service sees the request.
TRANSCODER_ERRORS = {
    400: "The body is a `google.rpc.Status` when the service rejected the request, and plain text "
    "when Envoy's transcoder did (malformed JSON, an unknown query parameter, a value of the "
    "wrong type).",
    404: "The body is a `google.rpc.Status` when the service reported NOT_FOUND, and plain text "
    "when no route matches.",
}
DEFAULT_ERROR = (
    "An error: the gRPC status as `google.rpc.Status` JSON, with the HTTP status mapped from the "
    "gRPC code (INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE -> 400; UNAUTHENTICATED -> "
    "401; PERMISSION_DENIED -> 403; NOT_FOUND -> 404; ALREADY_EXISTS, ABORTED -> 409; "
    "RESOURCE_EXHAUSTED -> 429; CANCELLED -> 499; UNKNOWN, INTERNAL, DATA_LOSS -> 500; "
    "UNIMPLEMENTED -> 501; UNAVAILABLE -> 503; DEADLINE_EXCEEDED -> 504). `details` may hold "
    "`google.rpc.ErrorInfo`, `google.rpc.BadRequest` (field violations), `google.rpc.RetryInfo` "
    "and the other standard error details."
)
HTTP_METHODS = ("get", "put", "post", "delete", "patch")


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response_ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{name}"}


def clean_comment(text: str) -> str:
    """Comment text with the common indentation removed, lint directives and `(-- --)` dropped."""
    text = re.sub(r"\(--.*?--\)", "", text, flags=re.S)
    # Cross references `[text][google.rpc.Code]` -> `text` in code style.
    text = re.sub(r"\[`?([^\]`]+)`?\]\[([a-z]\w*(\.\w+)+)?\]", r"`\1`", text)
    lines = [line.rstrip() for line in text.split("\n")]
    lines = [line for line in lines if not line.strip().startswith(("buf:lint:", "@exclude"))]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        return ""
    indent = min(len(line) - len(line.lstrip(" ")) for line in lines if line)
    out: list[str] = []
    for line in lines:
        line = line[indent:]
        if line or (out and out[-1]):  # collapse runs of blank lines
            out.append(line)
    return "\n".join(out)


def first_sentence(text: str) -> str:
    paragraph = " ".join(text.split("\n\n", 1)[0].split())
    match = re.match(r"(.+?\.)(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def extension_payload(message_bytes: bytes, number: int) -> bytes:
    """The concatenated payloads of length-delimited field `number` in a serialized message."""
    out = bytearray()
    pos = 0
    while pos < len(message_bytes):
        key, pos = _varint(message_bytes, pos)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(message_bytes, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            size, pos = _varint(message_bytes, pos)
            if field_number == number:
                out += message_bytes[pos : pos + size]
            pos += size
        elif wire_type == 5:
            pos += 4
        elif wire_type not in (3, 4):  # group start/end carry no payload of their own
            raise ValueError(f"bad wire type {wire_type} in options")
    return bytes(out)


@dataclass
class MessageInfo:
    name: str
    proto: descriptor_pb2.DescriptorProto
    file: str
    path: tuple[int, ...]


@dataclass
class EnumInfo:
    name: str
    proto: descriptor_pb2.EnumDescriptorProto
    file: str
    path: tuple[int, ...]


@dataclass
class Binding:
    method: str
    path: str
    body: str
    response_body: str


@dataclass
class PathVar:
    field_path: str  # proto field path, as written in the template
    pattern: str  # "*" for a plain `{var}`


@dataclass
class Generator:
    fds: descriptor_pb2.FileDescriptorSet
    messages: dict[str, MessageInfo] = field(default_factory=dict)
    enums: dict[str, EnumInfo] = field(default_factory=dict)
    comments: dict[tuple[str, tuple[int, ...]], descriptor_pb2.SourceCodeInfo.Location] = field(
        default_factory=dict
    )
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    used_responses: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        for f in self.fds.file:
            prefix = f".{f.package}" if f.package else ""
            for i, m in enumerate(f.message_type):
                self._index_message(m, prefix, f.name, (FILE_MESSAGE, i))
            for i, e in enumerate(f.enum_type):
                self._index_enum(e, prefix, f.name, (FILE_ENUM, i))
            for loc in f.source_code_info.location:
                self.comments[(f.name, tuple(loc.path))] = loc
        self.http_rule_class = self._http_rule_class()

    # ----- indexing -------------------------------------------------------------------------

    def _index_message(self, m, prefix: str, file: str, path: tuple[int, ...]) -> None:
        name = f"{prefix}.{m.name}"
        self.messages[name] = MessageInfo(name[1:], m, file, path)
        for i, nested in enumerate(m.nested_type):
            self._index_message(nested, name, file, (*path, MSG_NESTED, i))
        for i, e in enumerate(m.enum_type):
            self._index_enum(e, name, file, (*path, MSG_ENUM, i))

    def _index_enum(self, e, prefix: str, file: str, path: tuple[int, ...]) -> None:
        name = f"{prefix}.{e.name}"
        self.enums[name] = EnumInfo(name[1:], e, file, path)

    def _http_rule_class(self):
        pool = descriptor_pool.DescriptorPool()
        for f in self.fds.file:
            if any(f".{f.package}.{m.name}" == f".{HTTP_RULE}" for m in f.message_type):
                pool.Add(f)
                return message_factory.GetMessageClass(pool.FindMessageTypeByName(HTTP_RULE))
        raise SystemExit(f"{HTTP_RULE} is not in the descriptor set (build it with imports)")

    def comment(self, file: str, path: tuple[int, ...]) -> str:
        loc = self.comments.get((file, path))
        if loc is None:
            return ""
        return clean_comment(loc.leading_comments or loc.trailing_comments)

    def message(self, type_name: str) -> MessageInfo:
        try:
            return self.messages[type_name if type_name.startswith(".") else f".{type_name}"]
        except KeyError:
            raise SystemExit(f"message {type_name} is not in the descriptor set") from None

    # ----- schemas --------------------------------------------------------------------------

    def type_ref(self, type_name: str) -> dict[str, Any]:
        """Schema of a message or enum type used by a field: inline well-known or a $ref."""
        name = type_name.lstrip(".")
        if name in WELL_KNOWN:
            return dict(WELL_KNOWN[name][0])
        if name == "google.protobuf.NullValue":
            return {"nullable": True, "description": "JSON `null`."}
        if name not in self.schemas and name not in self.pending:
            self.pending.append(name)
        return _ref(name)

    def map_entry(self, f: descriptor_pb2.FieldDescriptorProto) -> MessageInfo | None:
        if f.type != FDP.TYPE_MESSAGE or f.label != FDP.LABEL_REPEATED:
            return None
        info = self.message(f.type_name)
        return info if info.proto.options.map_entry else None

    def value_schema(self, f: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if f.type in (FDP.TYPE_MESSAGE, FDP.TYPE_GROUP, FDP.TYPE_ENUM):
            return self.type_ref(f.type_name)
        return dict(SCALARS[f.type])

    def field_schema(self, f: descriptor_pb2.FieldDescriptorProto, description: str) -> dict:
        entry = self.map_entry(f)
        if entry is not None:
            key, value = entry.proto.field[0], entry.proto.field[1]
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self.value_schema(value),
            }
            if key.type != FDP.TYPE_STRING:
                note = f"Keys are {FDP.Type.Name(key.type)[5:].lower()} values written as strings."
                description = f"{description}\n\n{note}" if description else note
        elif f.label == FDP.LABEL_REPEATED:
            schema = {"type": "array", "items": self.value_schema(f)}
        else:
            schema = self.value_schema(f)
        return with_annotations(schema, description, f.options.deprecated)

    def message_schema(self, info: MessageInfo) -> dict[str, Any]:
        m = info.proto
        properties: dict[str, Any] = {}
        required: list[str] = []
        oneofs: dict[int, list[str]] = {}
        for f in m.field:
            if f.HasField("oneof_index") and not f.proto3_optional:
                oneofs.setdefault(f.oneof_index, []).append(json_name(f))
        for i, f in enumerate(m.field):
            text = self.comment(info.file, (*info.path, MSG_FIELD, i))
            if f.HasField("oneof_index") and not f.proto3_optional:
                members = ", ".join(f"`{n}`" for n in oneofs[f.oneof_index])
                oneof = m.oneof_decl[f.oneof_index].name
                note = f"Only one of {members} may be set (oneof `{oneof}`)."
                text = f"{text}\n\n{note}" if text else note
            schema = self.field_schema(f, text)
            if text.startswith("Output only."):
                schema["readOnly"] = True
            if text.startswith("Required."):
                required.append(json_name(f))
            properties[json_name(f)] = schema
        out: dict[str, Any] = {"type": "object", "properties": properties}
        description = self.comment(info.file, info.path)
        notes = []
        for index, oneof_fields in sorted(oneofs.items()):
            oneof_text = self.comment(info.file, (*info.path, MSG_ONEOF, index))
            names = ", ".join(f"`{n}`" for n in oneof_fields)
            note = f"Only one of {names} may be set (oneof `{m.oneof_decl[index].name}`)."
            notes.append(f"{note} {oneof_text}".strip())
        description = "\n\n".join([d for d in (description, *notes) if d])
        if description:
            out["description"] = description
        if required:
            out["required"] = required
        if m.options.deprecated:
            out["deprecated"] = True
        return out

    def enum_schema(self, info: EnumInfo) -> dict[str, Any]:
        e = info.proto
        lines = []
        for i, v in enumerate(e.value):
            text = " ".join(self.comment(info.file, (*info.path, ENUM_VALUE, i)).split())
            lines.append(f"- `{v.name}`: {text}" if text else f"- `{v.name}`")
        description = self.comment(info.file, info.path)
        description = "\n\n".join(
            d
            for d in (description, "\n".join(lines), "The numeric values are accepted on input.")
            if d
        )
        out: dict[str, Any] = {
            "type": "string",
            "enum": [v.name for v in e.value],
            "description": description,
        }
        if e.options.deprecated:
            out["deprecated"] = True
        return out

    def resolve_pending(self) -> None:
        while self.pending:
            name = self.pending.pop(0)
            if name in self.schemas:
                continue
            if name == ANY:
                self.schemas[name] = json.loads(json.dumps(ANY_SCHEMA))
            elif f".{name}" in self.enums:
                self.schemas[name] = self.enum_schema(self.enums[f".{name}"])
            else:
                self.schemas[name] = self.message_schema(self.message(name))

    # ----- operations -----------------------------------------------------------------------

    def bindings(self, method: descriptor_pb2.MethodDescriptorProto) -> list[Binding]:
        payload = extension_payload(method.options.SerializeToString(), HTTP_EXTENSION_NUMBER)
        if not payload:
            return []
        rule = self.http_rule_class.FromString(payload)
        out = []
        for r in [rule, *rule.additional_bindings]:
            kind = r.WhichOneof("pattern")
            if kind is None:
                continue
            if kind == "custom":
                verb, path = r.custom.kind.lower(), r.custom.path
            else:
                verb, path = kind, getattr(r, kind)
            out.append(Binding(verb, path, r.body, r.response_body))
        return out

    def field_by_path(self, msg: MessageInfo, field_path: str):
        """(field, its comment, its message) for a dotted proto field path."""
        info = msg
        parts = field_path.split(".")
        for depth, part in enumerate(parts):
            for i, f in enumerate(info.proto.field):
                if f.name == part or f.json_name == part:
                    if depth == len(parts) - 1:
                        return f, self.comment(info.file, (*info.path, MSG_FIELD, i)), info
                    if f.type != FDP.TYPE_MESSAGE:
                        raise SystemExit(f"{field_path}: {part} is not a message field")
                    info = self.message(f.type_name)
                    break
            else:
                raise SystemExit(f"{msg.name} has no field {field_path}")
        raise AssertionError("unreachable")

    def scalar_param_schema(self, f: descriptor_pb2.FieldDescriptorProto) -> dict | None:
        """Schema of a field as one query/path parameter value, or None if it cannot be one."""
        if self.map_entry(f) is not None:
            return None
        if f.type in (FDP.TYPE_MESSAGE, FDP.TYPE_GROUP):
            name = f.type_name.lstrip(".")
            if name not in WELL_KNOWN or not WELL_KNOWN[name][1]:
                return None
        schema = self.value_schema(f)
        if f.label == FDP.LABEL_REPEATED:
            schema = {"type": "array", "items": schema}
        return schema

    def query_params(
        self,
        info: MessageInfo,
        bound: set[str],
        prefix: str = "",
        json_prefix: str = "",
        seen: tuple[str, ...] = (),
    ) -> list[dict[str, Any]]:
        params: list[dict[str, Any]] = []
        for i, f in enumerate(info.proto.field):
            proto_path = f"{prefix}{f.name}"
            if proto_path in bound:
                continue
            text = self.comment(info.file, (*info.path, MSG_FIELD, i))
            name = f"{json_prefix}{json_name(f)}"
            schema = self.scalar_param_schema(f)
            if schema is not None:
                param: dict[str, Any] = {"name": name, "in": "query", "schema": schema}
                if text:
                    param["description"] = text
                if text.startswith("Required."):
                    param["required"] = True
                if f.options.deprecated:
                    param["deprecated"] = True
                params.append(param)
            elif (
                f.type == FDP.TYPE_MESSAGE
                and f.label != FDP.LABEL_REPEATED
                and f.type_name not in seen
                and f.type_name.lstrip(".") not in WELL_KNOWN
            ):
                nested = self.message(f.type_name)
                params += self.query_params(
                    nested, bound, f"{proto_path}.", f"{name}.", (*seen, f.type_name)
                )
        return params

    def path_params(self, template: str) -> tuple[str, list[PathVar]]:
        variables: list[PathVar] = []

        def replace(match: re.Match[str]) -> str:
            variables.append(PathVar(match.group(1).strip(), (match.group(2) or "*").strip()))
            return "{" + match.group(1).strip() + "}"

        path = re.sub(r"\{([^}=]+)(?:=([^}]*))?\}", replace, template)
        outside = re.sub(r"\{[^}]*\}", "", path)
        if re.search(r"(^|/)\*{1,2}(/|:|$)", outside):
            raise SystemExit(f"{template}: anonymous wildcards cannot be described in OpenAPI")
        return path, variables

    def body_schema(self, info: MessageInfo, body: str, bound: set[str]) -> tuple[dict, bool]:
        """The request body schema and whether the body is required."""
        if body == "*":
            top_bound = {p for p in bound if "." not in p}
            if not top_bound:
                schema = self.type_ref(info.name)
                self.resolve_pending()
                return schema, bool(self.schemas[info.name].get("required"))
            full = self.message_schema(info)
            drop = {json_name(f) for f in info.proto.field if f.name in top_bound}
            props = {k: v for k, v in full["properties"].items() if k not in drop}
            required = [r for r in full.get("required", []) if r not in drop]
            schema = {
                "type": "object",
                "properties": props,
                "description": f"`{info.name}` without the fields bound to the path ("
                + ", ".join(f"`{d}`" for d in sorted(drop))
                + ").",
            }
            if required:
                schema["required"] = required
            return schema, bool(required)
        f, text, _ = self.field_by_path(info, body)
        return self.field_schema(f, text), True

    def operation(self, service, method, binding: Binding, index: int, where: tuple):
        file, method_path = where
        info = self.message(method.input_type)
        out_info = self.message(method.output_type)
        path, variables = self.path_params(binding.path)
        bound = {v.field_path for v in variables}
        text = self.comment(file, method_path)
        op_id = f"{service.name}_{method.name}" + (f"_{index}" if index else "")
        op: dict[str, Any] = {
            "operationId": op_id,
            "tags": [service.name],
            "x-grpc-method": f"/{PACKAGE}.{service.name}/{method.name}",
        }
        if text:
            op["summary"] = first_sentence(text)
            op["description"] = text
        if method.options.deprecated:
            op["deprecated"] = True

        params: list[dict[str, Any]] = []
        for var in variables:
            f, ftext, _ = self.field_by_path(info, var.field_path)
            schema = self.scalar_param_schema(f)
            if schema is None or f.label == FDP.LABEL_REPEATED:
                raise SystemExit(f"{binding.path}: {var.field_path} cannot be a path variable")
            notes = []
            if var.pattern != "*":
                notes.append(
                    f"Matches the path pattern `{var.pattern}`: the value may contain `/` and span "
                    "several path segments, sent as they are or percent-encoded as `%2F`."
                )
            if "." in var.field_path:
                notes.append(f"Sets the request field `{var.field_path}`.")
            description = "\n\n".join(d for d in (ftext, *notes) if d)
            param = {"name": var.field_path, "in": "path", "required": True, "schema": schema}
            if description:
                param["description"] = description
            params.append(param)
        if binding.body != "*":
            body_bound = set(bound)
            if binding.body:
                body_bound.add(binding.body)
            params += self.query_params(info, body_bound)
        if params:
            op["parameters"] = params

        if binding.body:
            if info.name == HTTP_BODY or (
                binding.body != "*"
                and self.field_by_path(info, binding.body)[0].type_name.lstrip(".") == HTTP_BODY
            ):
                content = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
                required = True
            else:
                schema, required = self.body_schema(info, binding.body, bound)
                if method.client_streaming:
                    schema = {
                        "type": "array",
                        "items": schema,
                        "description": "The client stream: a JSON array of request messages.",
                    }
                content = {"application/json": {"schema": schema}}
            op["requestBody"] = {"required": required, "content": content}

        op["responses"] = self.responses(method, out_info, binding, text)
        return path, op

    def responses(self, method, out_info: MessageInfo, binding: Binding, text: str) -> dict:
        if binding.response_body:
            f, ftext, _ = self.field_by_path(out_info, binding.response_body)
            response_type = f.type_name.lstrip(".") if f.type == FDP.TYPE_MESSAGE else ""
            schema = self.field_schema(f, ftext)
        else:
            response_type = out_info.name
            schema = {} if response_type == HTTP_BODY else self.type_ref(out_info.name)
        if response_type == HTTP_BODY:
            ok = {
                "description": "The raw body, with the media type the method set in its "
                "`Content-Type` header."
                + (
                    " Streamed: the body is the concatenation of the streamed messages' data."
                    if method.server_streaming
                    else ""
                ),
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            }
        elif method.server_streaming:
            ok = {
                "description": "A stream of Server-Sent Events. Each event is one `data:` line "
                "holding one JSON-encoded message of this schema, followed by a blank line, sent "
                "as soon as the server produces the message. Errors detected before the first "
                "message end the call with an error status instead. An error after the first "
                "message cannot change the HTTP status any more.",
                "content": {"text/event-stream": {"schema": schema}},
            }
        else:
            ok = {"description": "OK.", "content": {"application/json": {"schema": schema}}}
        responses: dict[str, Any] = {"200": ok, "default": _response_ref("Error")}
        codes = set(ALWAYS_ERRORS)
        for code in re.findall(r"\b[A-Z][A-Z_]+[A-Z]\b", text):
            if code in GRPC_TO_HTTP:
                codes.add(GRPC_TO_HTTP[code])
        for http in sorted(codes):
            responses[str(http)] = _response_ref(_ERROR_RESPONSES[http][0])
            self.used_responses.add(http)
        return responses

    # ----- document -------------------------------------------------------------------------

    def services(self) -> Iterable[tuple[descriptor_pb2.FileDescriptorProto, int, Any]]:
        for f in self.fds.file:
            if f.package != PACKAGE:
                continue
            for i, s in enumerate(f.service):
                yield f, i, s

    def document(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        tags = []
        operation_ids: set[str] = set()
        for f, si, service in self.services():
            description = self.comment(f.name, (FILE_SERVICE, si))
            tag: dict[str, Any] = {"name": service.name}
            if description:
                tag["description"] = description
            tags.append(tag)
            for mi, method in enumerate(service.method):
                where = (f.name, (FILE_SERVICE, si, SERVICE_METHOD, mi))
                # Every request and response message gets a component, bound to REST or not.
                for type_name in (method.input_type, method.output_type):
                    if type_name.lstrip(".") != HTTP_BODY:
                        self.type_ref(type_name)
                for index, binding in enumerate(self.bindings(method)):
                    path, op = self.operation(service, method, binding, index, where)
                    if binding.method not in HTTP_METHODS:
                        raise SystemExit(f"{path}: HTTP method {binding.method} not supported")
                    if binding.method in paths.get(path, {}):
                        raise SystemExit(f"{binding.method.upper()} {path} is bound twice")
                    if op["operationId"] in operation_ids:
                        raise SystemExit(f"duplicate operationId {op['operationId']}")
                    operation_ids.add(op["operationId"])
                    paths.setdefault(path, {})[binding.method] = op

        # Errors: google.rpc.Status and the standard details it may carry.
        if f".{STATUS}" not in self.messages:
            raise SystemExit(
                f"{STATUS} is not in the descriptor set: include google/rpc/status.proto "
                "(and google/rpc/error_details.proto), as Envoy needs them for error details"
            )
        self.type_ref(STATUS)
        for f in self.fds.file:
            if f.name == ERROR_DETAILS_FILE:
                for m in f.message_type:
                    self.type_ref(f"{f.package}.{m.name}")
        self.resolve_pending()

        responses: dict[str, Any] = {
            "Error": {
                "description": DEFAULT_ERROR,
                "content": {"application/json": {"schema": _ref(STATUS)}},
            }
        }
        for http in sorted(self.used_responses):
            name, description = _ERROR_RESPONSES[http]
            content: dict[str, Any] = {"application/json": {"schema": _ref(STATUS)}}
            if http in TRANSCODER_ERRORS:
                description = f"{description} {TRANSCODER_ERRORS[http]}"
                content["text/plain"] = {"schema": {"type": "string"}}
            else:
                description = f"{description} The body is a `google.rpc.Status`."
            responses[name] = {"description": description, "content": content}

        return {
            "openapi": OPENAPI_VERSION,
            "info": {"title": TITLE, "version": API_VERSION, "description": DESCRIPTION},
            "servers": [{"url": SERVER_URL}],
            "tags": sorted(tags, key=lambda t: t["name"]),
            "paths": paths,
            "components": {"schemas": self.schemas, "responses": responses},
        }


def json_name(f: descriptor_pb2.FieldDescriptorProto) -> str:
    if f.json_name:
        return f.json_name
    head, *rest = f.name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def with_annotations(schema: dict[str, Any], description: str, deprecated: bool) -> dict:
    """Adds a description to a schema; a bare $ref is wrapped in allOf (siblings of $ref are
    ignored in OpenAPI 3.0)."""
    if not description and not deprecated:
        return schema
    if "$ref" in schema:
        schema = {"allOf": [schema]}
    if description:
        existing = schema.get("description")
        schema["description"] = f"{description}\n\n{existing}" if existing else description
    if deprecated:
        schema["deprecated"] = True
    return schema


def _canonical(value: Any, parent: str = "") -> Any:
    """Sorts the keys of every object except property lists (declaration order is meaningful)."""
    if isinstance(value, dict):
        keys = value.keys() if parent == "properties" else sorted(value)
        return {k: _canonical(value[k], k if parent != "properties" else "") for k in keys}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def generate(descriptor_set: bytes) -> dict[str, Any]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    doc = Generator(fds).document()
    top = ("openapi", "info", "servers", "tags", "paths", "components")
    return {k: _canonical(doc[k], k) for k in top}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("descriptor_set", type=Path, help="FileDescriptorSet (with imports)")
    parser.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    args = parser.parse_args(argv)
    text = render(generate(args.descriptor_set.read_bytes()))
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
