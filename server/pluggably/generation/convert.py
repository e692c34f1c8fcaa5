"""`from_pb`/`to_pb` converters between the wire contract and the domain types.

Request validation that needs no model (shapes, shared ranges, references between fields)
happens here, so every violation of a request is reported at once, each naming its field. What
depends on the model is checked by the dataplane.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Iterable
from typing import Any

import orjson
from google.protobuf import json_format, struct_pb2

from pluggably.catalog.convert import check_model_id
from pluggably.core.errors import FieldViolation, InvalidArgument
from pluggably.core.params import (
    validate_image_params,
    validate_mesh_params,
    validate_text_params,
)
from pluggably.core.types import (
    CHAT_ROLES,
    ArtifactChunk,
    ChatMessage,
    Chunk,
    ContentPart,
    DoneChunk,
    FinishReason,
    FunctionTool,
    GenerationRequest,
    ImageFormat,
    ImageParams,
    ImagePart,
    MeshFormat,
    MeshParams,
    Modality,
    ProgressChunk,
    ResponseFormat,
    ResponseFormatType,
    TextChunk,
    TextParams,
    TextPart,
    ToolCall,
    ToolCallChunk,
    ToolChoice,
    ToolChoiceMode,
    Usage,
)
from pluggably.v1 import (
    generate_service_pb2,
    generation_pb2,
    stream_service_pb2,
)

MAX_FALLBACKS = 8
MAX_TOOLS = 128
MAX_PARTS = 64
MAX_PROVIDER_OPTIONS = 64
# Provider parameter names are short identifiers; a longer key is a mistake, and every key may
# be quoted back in an error.
MAX_OPTION_KEY_CHARS = 128
# A client fixes the first problems and retries; listing thousands (one per message of a long
# conversation) would make a status larger than the 8 KiB of trailers a gRPC client accepts by
# default, and the client would get RESOURCE_EXHAUSTED without any details instead.
MAX_REPORTED_VIOLATIONS = 10
# Client-supplied text quoted in an error message is clipped to this many characters.
_ECHO_CHARS = 48
IMAGE_MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
_TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DATA_URL = re.compile(r"^data:(?P<mime>image/[a-z0-9.+-]+);base64,(?P<data>.*)$", re.S)
# Struct keys that read unambiguously after a dot in a field path; others are quoted in brackets.
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_FLOAT32 = struct.Struct("<f")

_FINISH_TO_PB = {
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
    FinishReason.CONTENT_FILTER: generation_pb2.FINISH_REASON_CONTENT_FILTER,
    FinishReason.TOOL_CALLS: generation_pb2.FINISH_REASON_TOOL_CALLS,
}
_OPTIONS_MODALITY = {"text": Modality.TEXT, "image": Modality.IMAGE, "mesh": Modality.MESH}
_TOOL_CHOICE = {
    generation_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode.AUTO,
    generation_pb2.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    generation_pb2.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    generation_pb2.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    generation_pb2.TOOL_CHOICE_MODE_FUNCTION: ToolChoiceMode.FUNCTION,
}
_RESPONSE_FORMAT = {
    generation_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED: ResponseFormatType.TEXT,
    generation_pb2.RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType.TEXT,
    generation_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType.JSON_OBJECT,
    generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType.JSON_SCHEMA,
}
_IMAGE_DETAIL = {
    generation_pb2.IMAGE_DETAIL_UNSPECIFIED: "",
    generation_pb2.IMAGE_DETAIL_AUTO: "auto",
    generation_pb2.IMAGE_DETAIL_LOW: "low",
    generation_pb2.IMAGE_DETAIL_HIGH: "high",
}


def generation_request_from_pb(
    pb: generation_pb2.GenerateRequest,
    request_id: str,
    *,
    stream: bool = False,
    deadline: float | None = None,
) -> tuple[GenerationRequest, Modality | None]:
    """Validates and converts; returns the request and the modality its options ask for."""
    violations: list[FieldViolation] = []
    check_model_id(pb.model, "model", violations)
    if len(pb.fallback_models) > MAX_FALLBACKS:
        violations.append(
            FieldViolation(
                "fallback_models", f"at most {MAX_FALLBACKS} models, got {len(pb.fallback_models)}"
            )
        )
    for i, fallback in enumerate(pb.fallback_models[:MAX_FALLBACKS]):
        check_model_id(fallback, f"fallback_models[{i}]", violations)

    has_prompt = bool(pb.prompt)
    if pb.messages and has_prompt:
        violations.append(FieldViolation("prompt", "set either messages or prompt, not both"))
    elif not pb.messages and not has_prompt:
        violations.append(FieldViolation("messages", "required: set messages (chat) or prompt"))
    messages = _messages_from_pb(pb.messages, violations)
    tools = _tools_from_pb(pb.tools, violations)
    tool_choice = _tool_choice_from_pb(pb, tools, violations)

    option_group = pb.WhichOneof("options")
    modality = _OPTIONS_MODALITY.get(option_group) if option_group else None
    text = TextParams()
    if option_group == "text":
        t = pb.text
        text = TextParams(
            max_tokens=t.max_tokens if t.HasField("max_tokens") else None,
            temperature=_float32(t.temperature) if t.HasField("temperature") else None,
            top_p=_float32(t.top_p) if t.HasField("top_p") else None,
            top_k=t.top_k if t.HasField("top_k") else None,
            seed=t.seed if t.HasField("seed") else None,
            stop=tuple(t.stop),
            repetition_penalty=(
                _float32(t.repetition_penalty) if t.HasField("repetition_penalty") else None
            ),
            presence_penalty=(
                _float32(t.presence_penalty) if t.HasField("presence_penalty") else None
            ),
            frequency_penalty=(
                _float32(t.frequency_penalty) if t.HasField("frequency_penalty") else None
            ),
            response_format=_response_format_from_pb(t, violations),
        )
        violations.extend(validate_text_params(text))
    image = ImageParams()
    if option_group == "image":
        image = _image_params_from_pb(pb.image, violations)
        violations.extend(validate_image_params(image))
    mesh = MeshParams()
    if option_group == "mesh":
        mesh = _mesh_params_from_pb(pb.mesh, violations)
        violations.extend(validate_mesh_params(mesh))
    provider_options = _provider_options_from_pb(pb.provider_options, violations)
    if violations:
        raise invalid_argument(violations)

    return (
        GenerationRequest(
            request_id=request_id,
            model=pb.model,
            messages=tuple(messages),
            prompt=pb.prompt if has_prompt else None,
            text=text,
            image=image,
            mesh=mesh,
            tools=tuple(tools),
            tool_choice=tool_choice,
            provider_options=provider_options,
            stream=stream,
            deadline=deadline,
        ),
        modality,
    )


_IMAGE_FORMATS = {
    generation_pb2.IMAGE_FORMAT_PNG: ImageFormat.PNG,
    generation_pb2.IMAGE_FORMAT_JPEG: ImageFormat.JPEG,
    generation_pb2.IMAGE_FORMAT_WEBP: ImageFormat.WEBP,
}


def _image_params_from_pb(
    pb: generation_pb2.ImageOptions, violations: list[FieldViolation]
) -> ImageParams:
    image_format = None
    if pb.format:
        image_format = _IMAGE_FORMATS.get(pb.format)
        if image_format is None:
            violations.append(FieldViolation("image.format", f"unknown format {pb.format}"))
    return ImageParams(
        width=pb.width if pb.HasField("width") else None,
        height=pb.height if pb.HasField("height") else None,
        steps=pb.steps if pb.HasField("steps") else None,
        guidance_scale=_float32(pb.guidance_scale) if pb.HasField("guidance_scale") else None,
        negative_prompt=pb.negative_prompt,
        seed=pb.seed if pb.HasField("seed") else None,
        count=pb.count if pb.HasField("count") else None,
        format=image_format,
        inline_data=pb.inline_data,
    )


_MESH_FORMATS = {
    generation_pb2.MESH_FORMAT_GLB: MeshFormat.GLB,
    generation_pb2.MESH_FORMAT_OBJ: MeshFormat.OBJ,
    generation_pb2.MESH_FORMAT_PLY: MeshFormat.PLY,
}


def _mesh_params_from_pb(
    pb: generation_pb2.MeshOptions, violations: list[FieldViolation]
) -> MeshParams:
    mesh_format = None
    if pb.format:
        mesh_format = _MESH_FORMATS.get(pb.format)
        if mesh_format is None:
            violations.append(FieldViolation("mesh.format", f"unknown format {pb.format}"))
    return MeshParams(
        steps=pb.steps if pb.HasField("steps") else None,
        guidance_scale=_float32(pb.guidance_scale) if pb.HasField("guidance_scale") else None,
        seed=pb.seed if pb.HasField("seed") else None,
        grid_size=pb.grid_size if pb.HasField("grid_size") else None,
        format=mesh_format,
        inline_data=pb.inline_data,
    )


def invalid_argument(violations: Iterable[FieldViolation]) -> InvalidArgument:
    """The error for `violations`, each listed once and at most `MAX_REPORTED_VIOLATIONS` of
    them: the status must stay small whatever the request holds."""
    unique = list(dict.fromkeys(violations))
    if len(unique) > MAX_REPORTED_VIOLATIONS:
        shown = unique[: MAX_REPORTED_VIOLATIONS - 1]
        hidden = len(unique) - len(shown)
        unique = [
            *shown,
            FieldViolation(unique[len(shown)].field, f"and {hidden} more problems in this request"),
        ]
    return InvalidArgument(unique)


def echo(value: str) -> str:
    """Client-supplied text quoted for an error message: escaped to ASCII (so control characters
    and odd code points stay visible and cost one byte each in the `grpc-message` header) and
    clipped, so that no input can inflate the status beyond what a client accepts."""
    quoted = ascii(value)
    return quoted if len(quoted) <= _ECHO_CHARS else quoted[: _ECHO_CHARS - 3] + "..."


def _float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 as `value`.

    Float fields arrive as float32 widened to double: a client's 0.01 becomes
    0.009999999776482582, which falls below an inclusive bound of 0.01 and would be passed on to
    providers as such. Checks and backends see what the client wrote instead.
    """
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if _FLOAT32.unpack(_FLOAT32.pack(candidate))[0] == value:
                return candidate
        except OverflowError:  # rounding up past the largest float32
            continue
    return value


def _provider_options_from_pb(pbs: Any, violations: list[FieldViolation]) -> dict[str, Any]:
    if not pbs:
        return {}
    if len(pbs) > MAX_PROVIDER_OPTIONS:
        violations.append(
            FieldViolation(
                "provider_options", f"at most {MAX_PROVIDER_OPTIONS} keys, got {len(pbs)}"
            )
        )
        return {}
    options = {}
    for key, value in pbs.items():
        field = _key_path("provider_options", key)
        if not key or len(key) > MAX_OPTION_KEY_CHARS or not key.isprintable():
            violations.append(
                FieldViolation(field, f"keys are 1 to {MAX_OPTION_KEY_CHARS} printable characters")
            )
            continue
        options[key] = _json_from_value(value, field, violations)
    return options


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _PLAIN_KEY.match(key) else f"{path}[{echo(key)}]"


def _json_from_struct(
    message: struct_pb2.Struct, path: str, violations: list[FieldViolation]
) -> dict[str, Any]:
    """A Struct as JSON data, like `json_format.MessageToDict`, except that a non-finite number
    is reported as a violation at its path instead of raising: JSON has no NaN or Infinity, and
    whatever serialised the value later would fail (or, like orjson, silently send null)."""
    return {
        key: _json_from_value(value, _key_path(path, key), violations)
        for key, value in message.fields.items()
    }


def _json_from_value(message: struct_pb2.Value, path: str, violations: list[FieldViolation]) -> Any:
    # Recursion is bounded: protobuf refuses to decode messages nested over 100 levels deep.
    kind = message.WhichOneof("kind")
    if kind == "number_value":
        number = message.number_value
        if not math.isfinite(number):
            violations.append(
                FieldViolation(path, "must be a finite number: JSON has no NaN or Infinity")
            )
        return number
    if kind == "string_value":
        return message.string_value
    if kind == "bool_value":
        return message.bool_value
    if kind == "struct_value":
        return _json_from_struct(message.struct_value, path, violations)
    if kind == "list_value":
        return [
            _json_from_value(item, f"{path}[{i}]", violations)
            for i, item in enumerate(message.list_value.values)
        ]
    return None


def _messages_from_pb(pbs: Any, violations: list[FieldViolation]) -> list[ChatMessage]:
    messages = []
    call_ids: set[str] = set()
    for i, m in enumerate(pbs):
        field = f"messages[{i}]"
        if m.role not in CHAT_ROLES:
            violations.append(
                FieldViolation(
                    f"{field}.role",
                    f"unknown role {echo(m.role)}; use one of {', '.join(sorted(CHAT_ROLES))}",
                )
            )
        if len(m.parts) > MAX_PARTS:
            violations.append(
                FieldViolation(f"{field}.parts", f"at most {MAX_PARTS} parts, got {len(m.parts)}")
            )
        parts = [
            _part_from_pb(p, f"{field}.parts[{j}]", m.role, violations)
            for j, p in enumerate(m.parts)
        ]
        calls = []
        if m.tool_calls and m.role != "assistant":
            violations.append(
                FieldViolation(f"{field}.tool_calls", "only assistant messages carry tool calls")
            )
        for j, call in enumerate(m.tool_calls):
            calls.append(_tool_call_from_pb(call, f"{field}.tool_calls[{j}]", violations))
        if m.role == "tool":
            if not m.tool_call_id:
                violations.append(
                    FieldViolation(f"{field}.tool_call_id", "required on tool messages")
                )
            elif m.tool_call_id not in call_ids:
                violations.append(
                    FieldViolation(
                        f"{field}.tool_call_id",
                        f"{echo(m.tool_call_id)} is not the id of a tool call of an earlier "
                        "assistant message",
                    )
                )
        elif m.tool_call_id:
            violations.append(
                FieldViolation(f"{field}.tool_call_id", "only tool messages answer a tool call")
            )
        if not m.content and not parts and m.role != "assistant":
            violations.append(FieldViolation(f"{field}.content", "must not be empty"))
        call_ids.update(c.id for c in calls)
        messages.append(
            ChatMessage(
                role=m.role,
                content=m.content,
                name=m.name,
                parts=tuple(p for p in parts if p is not None),
                tool_calls=tuple(calls),
                tool_call_id=m.tool_call_id,
            )
        )
    return messages


def _part_from_pb(
    pb: generation_pb2.ContentPart, field: str, role: str, violations: list[FieldViolation]
) -> ContentPart | None:
    kind = pb.WhichOneof("part")
    if kind == "text":
        if not pb.text:
            violations.append(FieldViolation(f"{field}.text", "must not be empty"))
        return TextPart(pb.text)
    if kind != "image":
        violations.append(FieldViolation(field, "set text or image"))
        return None
    if role != "user":
        violations.append(
            FieldViolation(f"{field}.image", "images are accepted in user messages only")
        )
    image = pb.image
    mime = image.mime_type.lower()
    if mime and mime not in IMAGE_MIME_TYPES:
        violations.append(
            FieldViolation(
                f"{field}.image.mime_type",
                f"unsupported image type {echo(image.mime_type)}; use one of "
                f"{', '.join(sorted(IMAGE_MIME_TYPES))}",
            )
        )
    source = image.WhichOneof("source")
    if source == "data":
        if not image.data:
            violations.append(FieldViolation(f"{field}.image.data", "must not be empty"))
        if not mime:
            violations.append(
                FieldViolation(f"{field}.image.mime_type", "required with inline data")
            )
        return ImagePart(
            data=image.data, mime_type=mime, detail=_IMAGE_DETAIL.get(image.detail, "")
        )
    if source != "url":
        violations.append(FieldViolation(f"{field}.image", "set url or data"))
        return None
    url = image.url.strip()
    match = _DATA_URL.match(url)
    if match:
        if match["mime"] not in IMAGE_MIME_TYPES:
            violations.append(
                FieldViolation(
                    f"{field}.image.url", f"unsupported image type {echo(match['mime'])}"
                )
            )
        try:
            data = base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            violations.append(
                FieldViolation(f"{field}.image.url", "the data URL is not valid base64")
            )
            data = b""
        # Inline bytes from here on: one form for every adapter to encode its own way.
        return ImagePart(
            data=data, mime_type=match["mime"], detail=_IMAGE_DETAIL.get(image.detail, "")
        )
    if not url.startswith(("https://", "http://")):
        violations.append(
            FieldViolation(
                f"{field}.image.url", "must be an http(s) URL or a data:image/...;base64, URL"
            )
        )
    return ImagePart(url=url, mime_type=mime, detail=_IMAGE_DETAIL.get(image.detail, ""))


def _tool_call_from_pb(
    pb: generation_pb2.ToolCall, field: str, violations: list[FieldViolation]
) -> ToolCall:
    if not pb.id:
        violations.append(FieldViolation(f"{field}.id", "required"))
    if not pb.name:
        violations.append(FieldViolation(f"{field}.name", "required"))
    arguments = pb.arguments or "{}"
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        violations.append(FieldViolation(f"{field}.arguments", "must be a JSON object"))
    return ToolCall(id=pb.id, name=pb.name, arguments=arguments)


def _tools_from_pb(pbs: Any, violations: list[FieldViolation]) -> list[FunctionTool]:
    if len(pbs) > MAX_TOOLS:
        violations.append(FieldViolation("tools", f"at most {MAX_TOOLS} tools, got {len(pbs)}"))
    tools, seen = [], set()
    for i, tool in enumerate(pbs):
        field = f"tools[{i}]"
        if tool.WhichOneof("kind") != "function":
            violations.append(FieldViolation(f"{field}.function", "required"))
            continue
        fn = tool.function
        if not _TOOL_NAME.match(fn.name):
            violations.append(
                FieldViolation(
                    f"{field}.function.name",
                    "letters, digits, '_' and '-', starting with a letter or '_', at most 64 characters",
                )
            )
        elif fn.name in seen:
            violations.append(
                FieldViolation(f"{field}.function.name", f"{echo(fn.name)} is declared twice")
            )
        seen.add(fn.name)
        parameters = (
            _json_from_struct(fn.parameters, f"{field}.function.parameters", violations)
            if fn.HasField("parameters")
            else None
        )
        if parameters is not None and parameters.get("type", "object") != "object":
            violations.append(
                FieldViolation(
                    f"{field}.function.parameters", "must be a JSON Schema of type 'object'"
                )
            )
        tools.append(
            FunctionTool(
                name=fn.name, description=fn.description, parameters=parameters, strict=fn.strict
            )
        )
    return tools


def _tool_choice_from_pb(
    pb: generation_pb2.GenerateRequest, tools: list[FunctionTool], violations: list[FieldViolation]
) -> ToolChoice | None:
    if not pb.HasField("tool_choice"):
        return None
    choice = pb.tool_choice
    mode = _TOOL_CHOICE.get(choice.mode)
    if mode is None:
        violations.append(FieldViolation("tool_choice.mode", f"unknown mode {choice.mode}"))
        return None
    if not tools:
        violations.append(FieldViolation("tool_choice", "requires tools"))
    if mode is ToolChoiceMode.FUNCTION:
        if not choice.function_name:
            violations.append(
                FieldViolation(
                    "tool_choice.function_name", "required with TOOL_CHOICE_MODE_FUNCTION"
                )
            )
        elif tools and choice.function_name not in {t.name for t in tools}:
            violations.append(
                FieldViolation(
                    "tool_choice.function_name",
                    f"{echo(choice.function_name)} is not one of the request's tools",
                )
            )
    elif choice.function_name:
        violations.append(
            FieldViolation("tool_choice.function_name", "only with TOOL_CHOICE_MODE_FUNCTION")
        )
    return ToolChoice(mode, choice.function_name)


def _response_format_from_pb(
    text: generation_pb2.TextOptions, violations: list[FieldViolation]
) -> ResponseFormat | None:
    if not text.HasField("response_format"):
        return None
    fmt = text.response_format
    kind = _RESPONSE_FORMAT.get(fmt.type)
    if kind is None:
        violations.append(FieldViolation("text.response_format.type", f"unknown type {fmt.type}"))
        return None
    if kind is not ResponseFormatType.JSON_SCHEMA:
        if fmt.HasField("json_schema"):
            violations.append(
                FieldViolation(
                    "text.response_format.json_schema", "only with RESPONSE_FORMAT_TYPE_JSON_SCHEMA"
                )
            )
        return None if kind is ResponseFormatType.TEXT else ResponseFormat(kind)
    schema = fmt.json_schema
    if not schema.HasField("schema"):
        violations.append(FieldViolation("text.response_format.json_schema.schema", "required"))
    if schema.name and not _SCHEMA_NAME.match(schema.name):
        violations.append(
            FieldViolation(
                "text.response_format.json_schema.name",
                "letters, digits, '_' and '-', at most 64 characters",
            )
        )
    return ResponseFormat(
        kind,
        schema=(
            _json_from_struct(schema.schema, "text.response_format.json_schema.schema", violations)
            if schema.HasField("schema")
            else None
        ),
        name=schema.name or "response",
        description=schema.description,
        strict=schema.strict,
    )


def usage_to_pb(usage: Usage) -> generation_pb2.Usage:
    return generation_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        steps=usage.steps,
        cached_prompt_tokens=usage.cached_prompt_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )


def _copy_done(
    chunk: DoneChunk, target: generation_pb2.StreamDone | generate_service_pb2.GenerateResponse
) -> None:
    """StreamDone and GenerateResponse name the end-of-generation fields alike."""
    target.finish_reason = _FINISH_TO_PB[chunk.finish_reason]
    target.usage.CopyFrom(usage_to_pb(chunk.usage))
    target.stop_sequence = chunk.stop_sequence
    target.model_version = chunk.model_version


def stream_chunk_to_pb(
    request_id: str, model: str, chunk: object
) -> stream_service_pb2.StreamGenerateResponse:
    out = stream_service_pb2.StreamGenerateResponse(id=request_id, model=model)
    if isinstance(chunk, TextChunk):
        out.text_delta.text = chunk.text
        out.text_delta.token_ids.extend(chunk.token_ids)
    elif isinstance(chunk, ToolCallChunk):
        delta = out.tool_call_delta
        delta.index = chunk.index
        delta.id = chunk.id
        delta.name = chunk.name
        delta.arguments = chunk.arguments
    elif isinstance(chunk, ProgressChunk):
        out.progress.stage = chunk.stage
        out.progress.step = chunk.step
        out.progress.total_steps = chunk.total_steps
    elif isinstance(chunk, DoneChunk):
        _copy_done(chunk, out.done)
    else:
        raise TypeError(f"unknown chunk type {type(chunk).__name__}")
    return out


class ResponseAccumulator:
    """Folds a chunk stream into one `GenerateResponse`."""

    def __init__(self, request_id: str) -> None:
        self.response = generate_service_pb2.GenerateResponse(id=request_id)
        self._text: list[str] = []
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments...]

    def add(self, model: str, chunk: object) -> None:
        self.response.model = model
        if isinstance(chunk, TextChunk):
            self._text.append(chunk.text)
            self.response.token_ids.extend(chunk.token_ids)
        elif isinstance(chunk, ToolCallChunk):
            call = self._calls.setdefault(chunk.index, ["", ""])
            if chunk.id:
                call[0] = chunk.id
            if chunk.name:
                call[1] = chunk.name
            call.append(chunk.arguments)
        elif isinstance(chunk, DoneChunk):
            _copy_done(chunk, self.response)

    def result(self) -> generate_service_pb2.GenerateResponse:
        self.response.text = "".join(self._text)
        for index in sorted(self._calls):
            call_id, name, *arguments = self._calls[index]
            self.response.tool_calls.add(id=call_id, name=name, arguments="".join(arguments))
        return self.response


# --- The other direction: for a backend that forwards to another v1 server (runners/remote.py) --


def generation_request_to_pb(request: GenerationRequest) -> generation_pb2.GenerateRequest:
    """`request` as the GenerateRequest that `generation_request_from_pb` reads back the same."""
    pb = generation_pb2.GenerateRequest(model=request.model)
    if request.prompt is not None:
        pb.prompt = request.prompt
    for message in request.messages:
        m = pb.messages.add(
            role=message.role,
            content=message.content,
            name=message.name,
            tool_call_id=message.tool_call_id,
        )
        for part in message.parts:
            if isinstance(part, TextPart):
                m.parts.add(text=part.text)
            else:
                image = m.parts.add().image
                if part.data:
                    image.data = part.data
                else:
                    image.url = part.url
                image.mime_type = part.mime_type
                image.detail = _IMAGE_DETAIL_TO_PB[part.detail]
        for call in message.tool_calls:
            m.tool_calls.add(id=call.id, name=call.name, arguments=call.arguments)
    for tool in request.tools:
        fn = pb.tools.add().function
        fn.name, fn.description, fn.strict = tool.name, tool.description, tool.strict
        if tool.parameters is not None:
            fn.parameters.update(tool.parameters)
    if request.tool_choice is not None:
        pb.tool_choice.mode = _TOOL_CHOICE_TO_PB[request.tool_choice.mode]
        pb.tool_choice.function_name = request.tool_choice.function
    for key, value in request.provider_options.items():
        pb.provider_options[key].CopyFrom(_value_to_pb(value))
    text, image = request.text, request.image
    if text != TextParams():
        t = pb.text
        for name in ("max_tokens", "top_k", "seed"):
            if getattr(text, name) is not None:
                setattr(t, name, getattr(text, name))
        for name in (
            "temperature",
            "top_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            if getattr(text, name) is not None:
                setattr(t, name, getattr(text, name))
        t.stop.extend(text.stop)
        fmt = text.response_format
        if fmt is not None:
            t.response_format.type = _RESPONSE_FORMAT_TO_PB[fmt.type]
            if fmt.type is ResponseFormatType.JSON_SCHEMA:
                schema = t.response_format.json_schema
                schema.name, schema.description, schema.strict = (
                    fmt.name,
                    fmt.description,
                    fmt.strict,
                )
                schema.schema.update(fmt.schema or {})
    mesh = request.mesh
    if mesh != MeshParams():
        m3 = pb.mesh
        for name in ("steps", "guidance_scale", "seed", "grid_size"):
            if getattr(mesh, name) is not None:
                setattr(m3, name, getattr(mesh, name))
        m3.inline_data = mesh.inline_data
        if mesh.format is not None:
            m3.format = _MESH_FORMAT_TO_PB[mesh.format]
    if image != ImageParams():
        i = pb.image
        for name in ("width", "height", "steps", "guidance_scale", "seed", "count"):
            if getattr(image, name) is not None:
                setattr(i, name, getattr(image, name))
        i.negative_prompt = image.negative_prompt
        i.inline_data = image.inline_data
        if image.format is not None:
            i.format = _IMAGE_FORMAT_TO_PB[image.format]
    return pb


def _value_to_pb(value: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(value, out)
    return out


def chunk_from_stream_pb(message: stream_service_pb2.StreamGenerateResponse) -> Chunk | None:
    """The domain chunk a stream message carries (None for an error event: the caller raises)."""
    kind = message.WhichOneof("event")
    if kind == "text_delta":
        return TextChunk(message.text_delta.text, tuple(message.text_delta.token_ids))
    if kind == "tool_call_delta":
        d = message.tool_call_delta
        return ToolCallChunk(index=d.index, id=d.id, name=d.name, arguments=d.arguments)
    if kind == "progress":
        p = message.progress
        return ProgressChunk(stage=p.stage, step=p.step, total_steps=p.total_steps)
    if kind == "artifact":
        a = message.artifact
        return ArtifactChunk(data=a.inline_data, mime_type=a.mime_type, kind=a.kind)
    if kind == "done":
        d = message.done
        u = d.usage
        return DoneChunk(
            finish_reason=_FINISH_FROM_PB.get(d.finish_reason, FinishReason.STOP),
            usage=Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                steps=u.steps,
                cached_prompt_tokens=u.cached_prompt_tokens,
                reasoning_tokens=u.reasoning_tokens,
            ),
            stop_sequence=d.stop_sequence,
            model_version=d.model_version,
        )
    return None


_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}
_TOOL_CHOICE_TO_PB = {
    ToolChoiceMode.AUTO: generation_pb2.TOOL_CHOICE_MODE_AUTO,
    ToolChoiceMode.NONE: generation_pb2.TOOL_CHOICE_MODE_NONE,
    ToolChoiceMode.REQUIRED: generation_pb2.TOOL_CHOICE_MODE_REQUIRED,
    ToolChoiceMode.FUNCTION: generation_pb2.TOOL_CHOICE_MODE_FUNCTION,
}
_RESPONSE_FORMAT_TO_PB = {
    ResponseFormatType.TEXT: generation_pb2.RESPONSE_FORMAT_TYPE_TEXT,
    ResponseFormatType.JSON_OBJECT: generation_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    ResponseFormatType.JSON_SCHEMA: generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
_IMAGE_DETAIL_TO_PB = {v: k for k, v in _IMAGE_DETAIL.items()}
_IMAGE_FORMAT_TO_PB = {v: k for k, v in _IMAGE_FORMATS.items()}
_MESH_FORMAT_TO_PB = {v: k for k, v in _MESH_FORMATS.items()}
