"""Stand-in for the Google Gemini API (generativelanguage `v1beta`):
`POST /v1beta/models/{model}:generateContent`, `POST /v1beta/models/{model}:streamGenerateContent`
(SSE with `?alt=sse`, a streamed JSON array without it), `GET /v1beta/models` (`pageSize` /
`pageToken` pages) and `GET /v1beta/models/{model}`.

It answers the way the real API does on the wire: `x-goog-api-key` header or `?key=` query
(missing: 403 PERMISSION_DENIED, wrong: 400 API_KEY_INVALID), google.rpc error bodies
`{"error": {"code", "message", "status", "details"}}` (wrapped in a one-element array on the
JSON-array stream, as the real API does), proto-JSON request parsing (camelCase or snake_case
names; unknown names, wrong types and bad enum values rejected with ESF's exact wording and a
`BadRequest` detail), the request rules the real API enforces (roles `user`/`model` only, a
function call turn right after a user or function response turn, as many function responses as
calls, empty parts, base64 and image bytes, MIME types, schema dialects, generation ranges,
input and output token limits), and SSE frames `data: {...}\r\n\r\n` in which every event is a
whole `GenerateContentResponse`: usage on every chunk (take the last), `finishReason` on the last
chunk only (the stream has no other terminator), function calls whole in one chunk.

Scripted `Reply` fields mean, for this provider: `finish_reason` is the candidate's
`finishReason` (`STOP`, `MAX_TOKENS`, `SAFETY`, `RECITATION`, ...; a blocking reason drops the
candidate's content and `SAFETY` adds a blocked HIGH safety rating), or
`"PROMPT_BLOCKED:<blockReason>"` (e.g. `PROMPT_BLOCKED:SAFETY`) for a blocked prompt: HTTP 200,
`promptFeedback.blockReason` and no candidates; `tool_calls` become `functionCall` parts after
the text, with an `id` only when the `ToolCallSpec` has one (Gemini's ids are optional); `chunks`
is the number of text chunks a stream splits the text into; `model` is the `modelVersion`.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from pluggably.devtools.standins._base import (
    _DEFAULT_MESSAGES,
    FAULT,
    JSON_BODY,
    RESPONSE,
    Fault,
    Reply,
    SSEWriter,
    StandIn,
    ToolCallSpec,
    count_tokens,
    echo_text,
    last_user_text,
    sample_from_schema,
    sniff_image,
    split_text,
    words,
)

__all__ = [
    "CHAT_METHODS",
    "DEFAULT_MODELS",
    "IMAGE_TOKENS",
    "GeminiStandIn",
    "gemini_model",
    "sample_from_schema",
]

API_VERSION = "v1beta"
IMAGE_TOKENS = 85
"""Prompt tokens each input image counts for."""

CHAT_METHODS = ("generateContent", "countTokens", "createCachedContent", "batchGenerateContent")


def gemini_model(
    model_id: str,
    display_name: str,
    *,
    input_token_limit: int = 1_048_576,
    output_token_limit: int = 65_536,
    methods: Sequence[str] = CHAT_METHODS,
    description: str = "",
    version: str = "001",
    **extra: Any,
) -> dict[str, Any]:
    """One entry of `GeminiStandIn.models`, shaped like the API's `Model` resource."""
    return {
        "name": f"models/{model_id}",
        "version": version,
        "displayName": display_name,
        "description": description or display_name,
        "inputTokenLimit": input_token_limit,
        "outputTokenLimit": output_token_limit,
        "supportedGenerationMethods": list(methods),
        **extra,
    }


_SAMPLING: dict[str, Any] = {"temperature": 1, "topP": 0.95, "topK": 64, "maxTemperature": 2}

DEFAULT_MODELS: tuple[dict[str, Any], ...] = (
    gemini_model("gemini-2.5-flash", "Gemini 2.5 Flash", thinking=True, **_SAMPLING),
    gemini_model("gemini-2.5-pro", "Gemini 2.5 Pro", thinking=True, **_SAMPLING),
    gemini_model("gemini-2.5-flash-lite", "Gemini 2.5 Flash-Lite", thinking=True, **_SAMPLING),
    gemini_model(
        "gemini-2.0-flash",
        "Gemini 2.0 Flash",
        output_token_limit=8_192,
        **{**_SAMPLING, "topK": 40},
    ),
    # Listed but not servable by generateContent: the model a gateway must filter out.
    gemini_model(
        "gemini-embedding-001",
        "Gemini Embedding 001",
        input_token_limit=2_048,
        output_token_limit=1,
        methods=("embedContent", "countTextTokens", "countTokens", "asyncBatchEmbedContent"),
    ),
    # A tiny window so tests can provoke the input-token-limit error with a few words.
    gemini_model(
        "gemini-standin-tiny",
        "Gemini Stand-in Tiny (64-token window)",
        input_token_limit=64,
        output_token_limit=64,
        **_SAMPLING,
    ),
)
"""The default `GeminiStandIn.models`: `Model` resources as `GET /v1beta/models` returns them
(`name` is `models/<id>`; `inputTokenLimit`, `outputTokenLimit` and `supportedGenerationMethods`
are what the stand-in enforces)."""

# google.rpc codes as HTTP maps them, and back.
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
STATUS_CODES = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential.",
    403: "The caller does not have permission",
    404: "Requested entity was not found.",
    429: "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "Deadline expired before operation could complete.",
}
_NO_KEY = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
_BAD_KEY = "API key not valid. Please pass a valid API key."
_BAD_IMAGE = (
    "Unable to process input image. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting"
)
_TYPE_URL = "type.googleapis.com/google.ai.generativelanguage.v1beta."

# The request's proto messages, by JSON (camelCase) field name. A kind is a scalar (`string`,
# `int32`, `int64`, `float`, `double`, `bool`, `bytes`), `struct` (a JSON object of anything),
# `value` (any JSON), `enum:<Enum>`, a message name, or one of those after `repeated `/`map `.
_FIELDS: dict[str, dict[str, str]] = {
    "GenerateContentRequest": {
        "model": "string",
        "contents": "repeated Content",
        "tools": "repeated Tool",
        "toolConfig": "ToolConfig",
        "safetySettings": "repeated SafetySetting",
        "systemInstruction": "Content",
        "generationConfig": "GenerationConfig",
        "cachedContent": "string",
        "labels": "map string",
        "serviceTier": "string",
        "store": "bool",
    },
    "Content": {"parts": "repeated Part", "role": "string"},
    "Part": {
        "text": "string",
        "inlineData": "Blob",
        "functionCall": "FunctionCall",
        "functionResponse": "FunctionResponse",
        "fileData": "FileData",
        "executableCode": "ExecutableCode",
        "codeExecutionResult": "CodeExecutionResult",
        "toolCall": "struct",
        "toolResponse": "struct",
        "thought": "bool",
        "thoughtSignature": "bytes",
        "videoMetadata": "VideoMetadata",
        "partMetadata": "struct",
        "mediaResolution": "struct",
    },
    "Blob": {"mimeType": "string", "data": "bytes"},
    "FileData": {"mimeType": "string", "fileUri": "string"},
    "FunctionCall": {"id": "string", "name": "string", "args": "struct"},
    "FunctionResponse": {
        "id": "string",
        "name": "string",
        "response": "struct",
        "parts": "repeated struct",
        "willContinue": "bool",
        "scheduling": "enum:FunctionResponse.Scheduling",
    },
    "ExecutableCode": {
        "id": "string",
        "language": "enum:ExecutableCode.Language",
        "code": "string",
    },
    "CodeExecutionResult": {
        "id": "string",
        "outcome": "enum:CodeExecutionResult.Outcome",
        "output": "string",
    },
    "VideoMetadata": {"startOffset": "string", "endOffset": "string", "fps": "double"},
    "Tool": {
        "functionDeclarations": "repeated FunctionDeclaration",
        "googleSearchRetrieval": "struct",
        "codeExecution": "struct",
        "googleSearch": "struct",
        "urlContext": "struct",
        "computerUse": "struct",
        "fileSearch": "struct",
        "googleMaps": "struct",
        "mcpServers": "repeated struct",
    },
    "FunctionDeclaration": {
        "name": "string",
        "description": "string",
        "behavior": "enum:FunctionDeclaration.Behavior",
        "parameters": "Schema",
        "parametersJsonSchema": "value",
        "response": "Schema",
        "responseJsonSchema": "value",
    },
    "Schema": {
        "type": "enum:Type",
        "format": "string",
        "title": "string",
        "description": "string",
        "nullable": "bool",
        "enum": "repeated string",
        "maxItems": "int64",
        "minItems": "int64",
        "properties": "map Schema",
        "required": "repeated string",
        "minProperties": "int64",
        "maxProperties": "int64",
        "minLength": "int64",
        "maxLength": "int64",
        "pattern": "string",
        "example": "value",
        "anyOf": "repeated Schema",
        "propertyOrdering": "repeated string",
        "default": "value",
        "items": "Schema",
        "minimum": "double",
        "maximum": "double",
    },
    "ToolConfig": {
        "functionCallingConfig": "FunctionCallingConfig",
        "retrievalConfig": "struct",
        "includeServerSideToolInvocations": "bool",
    },
    "FunctionCallingConfig": {
        "mode": "enum:FunctionCallingConfig.Mode",
        "allowedFunctionNames": "repeated string",
    },
    "SafetySetting": {
        "category": "enum:HarmCategory",
        "threshold": "enum:SafetySetting.HarmBlockThreshold",
    },
    "GenerationConfig": {
        "stopSequences": "repeated string",
        "responseMimeType": "string",
        "responseSchema": "Schema",
        "responseJsonSchema": "value",
        "responseModalities": "repeated enum:GenerationConfig.Modality",
        "candidateCount": "int32",
        "maxOutputTokens": "int32",
        "temperature": "float",
        "topP": "float",
        "topK": "int32",
        "seed": "int32",
        "presencePenalty": "float",
        "frequencyPenalty": "float",
        "responseLogprobs": "bool",
        "logprobs": "int32",
        "enableEnhancedCivicAnswers": "bool",
        "speechConfig": "struct",
        "thinkingConfig": "ThinkingConfig",
        "imageConfig": "struct",
        "mediaResolution": "enum:GenerationConfig.MediaResolution",
    },
    "ThinkingConfig": {
        "includeThoughts": "bool",
        "thinkingBudget": "int32",
        "thinkingLevel": "string",
    },
}
_ENUMS: dict[str, tuple[str, ...]] = {
    "Type": (
        "TYPE_UNSPECIFIED",
        "STRING",
        "NUMBER",
        "INTEGER",
        "BOOLEAN",
        "ARRAY",
        "OBJECT",
        "NULL",
    ),
    "FunctionCallingConfig.Mode": ("MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"),
    "HarmCategory": (
        "HARM_CATEGORY_UNSPECIFIED",
        "HARM_CATEGORY_DEROGATORY",
        "HARM_CATEGORY_TOXICITY",
        "HARM_CATEGORY_VIOLENCE",
        "HARM_CATEGORY_SEXUAL",
        "HARM_CATEGORY_MEDICAL",
        "HARM_CATEGORY_DANGEROUS",
        "HARM_CATEGORY_HARASSMENT",
        "HARM_CATEGORY_HATE_SPEECH",
        "HARM_CATEGORY_SEXUALLY_EXPLICIT",
        "HARM_CATEGORY_DANGEROUS_CONTENT",
        "HARM_CATEGORY_CIVIC_INTEGRITY",
    ),
    "SafetySetting.HarmBlockThreshold": (
        "HARM_BLOCK_THRESHOLD_UNSPECIFIED",
        "BLOCK_LOW_AND_ABOVE",
        "BLOCK_MEDIUM_AND_ABOVE",
        "BLOCK_ONLY_HIGH",
        "BLOCK_NONE",
        "OFF",
    ),
    "GenerationConfig.Modality": ("MODALITY_UNSPECIFIED", "TEXT", "IMAGE", "AUDIO"),
    "GenerationConfig.MediaResolution": (
        "MEDIA_RESOLUTION_UNSPECIFIED",
        "MEDIA_RESOLUTION_LOW",
        "MEDIA_RESOLUTION_MEDIUM",
        "MEDIA_RESOLUTION_HIGH",
    ),
    "FunctionDeclaration.Behavior": ("UNSPECIFIED", "BLOCKING", "NON_BLOCKING"),
    "FunctionResponse.Scheduling": ("SCHEDULING_UNSPECIFIED", "SILENT", "WHEN_IDLE", "INTERRUPT"),
    "ExecutableCode.Language": ("LANGUAGE_UNSPECIFIED", "PYTHON"),
    "CodeExecutionResult.Outcome": (
        "OUTCOME_UNSPECIFIED",
        "OUTCOME_OK",
        "OUTCOME_FAILED",
        "OUTCOME_DEADLINE_EXCEEDED",
    ),
}
_SCALAR_TYPES = {
    "string": "TYPE_STRING",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float": "TYPE_FLOAT",
    "double": "TYPE_DOUBLE",
    "bool": "TYPE_BOOL",
    "bytes": "TYPE_BYTES",
}
# The Part fields of its `data` oneof; the rest (thought, thoughtSignature, ...) ride along.
_PART_DATA = (
    "text",
    "inlineData",
    "functionCall",
    "functionResponse",
    "fileData",
    "executableCode",
    "codeExecutionResult",
    "toolCall",
    "toolResponse",
)

_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})
_OTHER_INPUT_TYPES = frozenset(
    {
        "application/pdf",
        "application/json",
        "application/rtf",
        "application/x-javascript",
        "application/x-python-code",
        "application/x-typescript",
        "text/plain",
        "text/html",
        "text/css",
        "text/csv",
        "text/javascript",
        "text/markdown",
        "text/md",
        "text/rtf",
        "text/x-python",
        "text/x-typescript",
        "text/xml",
        "audio/wav",
        "audio/mp3",
        "audio/mpeg",
        "audio/aiff",
        "audio/aac",
        "audio/ogg",
        "audio/flac",
        "video/mp4",
        "video/mpeg",
        "video/mov",
        "video/quicktime",
        "video/avi",
        "video/x-flv",
        "video/mpg",
        "video/webm",
        "video/wmv",
        "video/3gpp",
    }
)
_SNIFFABLE = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
_RESPONSE_MIME_TYPES = (
    "text/plain",
    "application/json",
    "application/xml",
    "application/yaml",
    "text/x.enum",
)
_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,63}")
_BLOCKED_OUTPUT = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
_PROMPT_BLOCKED = "PROMPT_BLOCKED"

# Set per request by the outermost middleware: the streamed-JSON-array form of
# streamGenerateContent (no `alt=sse`) wraps even its error bodies in an array.
_JSON_ARRAY_MODE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "gemini_json_array", default=False
)


class _Rejected(Exception):
    """A request the real API would refuse; `response` is what it answers."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _camel(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _as_number(value: Any) -> float | None:
    """A proto-JSON number (numbers and numeric strings both parse); None when absent."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _decode_base64(text: str) -> bytes | None:
    """Proto-JSON bytes: standard or URL-safe base64, padding optional; None when invalid."""
    cleaned = text.replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        return None


class _ProtoJson:
    """Parses a request body the way Google's front end maps JSON onto the request proto.

    `parse` returns the body with every message field under its camelCase name (the real API
    accepts both spellings) and collects ESF's violations: unknown names, lists where a single
    value belongs, and values of the wrong type or outside an enum.
    """

    def __init__(self) -> None:
        self.violations: list[tuple[str, str]] = []  # (field path, description)

    def parse(self, kind: str, value: Any, path: str) -> Any:
        if value is None:
            return None
        if kind.startswith("repeated "):
            inner = kind.removeprefix("repeated ")
            if not isinstance(value, list):
                return self._invalid(path, inner, value)
            return [self.parse(inner, item, f"{path}[{i}]") for i, item in enumerate(value)]
        if kind.startswith("map "):
            inner = kind.removeprefix("map ")
            if not isinstance(value, dict):
                return self._invalid(path, kind, value)
            return {
                key: self.parse(inner, item, f"{path}[{i}].value")
                for i, (key, item) in enumerate(value.items())
            }
        if kind in _FIELDS:
            return self._message(kind, value, path)
        return self._scalar(kind, value, path)

    def _message(self, name: str, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            return self._invalid(path, name, value)
        fields = _FIELDS[name]
        out: dict[str, Any] = {}
        where = f" at '{path}'" if path else ""
        for key, item in value.items():
            json_name = key if key in fields else _camel(key)
            kind = fields.get(json_name)
            if kind is None:
                self.violations.append(
                    (
                        path,
                        f'Invalid JSON payload received. Unknown name "{key}"{where}: '
                        "Cannot find field.",
                    )
                )
            elif isinstance(item, list) and not kind.startswith("repeated ") and kind != "value":
                self.violations.append(
                    (
                        path,
                        f'Invalid JSON payload received. Unknown name "{key}"{where}: '
                        "Proto field is not repeating, cannot start list.",
                    )
                )
            else:
                out[json_name] = self.parse(kind, item, _join(path, _snake(json_name)))
        return out

    def _scalar(self, kind: str, value: Any, path: str) -> Any:
        ok = True
        if kind == "value":
            pass
        elif kind == "struct":
            ok = isinstance(value, dict)
        elif kind == "string":
            ok = isinstance(value, str)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind in ("int32", "int64"):
            ok = (
                (isinstance(value, int) and not isinstance(value, bool))
                or (isinstance(value, float) and value.is_integer())
                or (isinstance(value, str) and re.fullmatch(r"-?\d+", value) is not None)
            )
        elif kind in ("float", "double"):
            ok = _as_number(value) is not None
        elif kind == "bytes":
            if isinstance(value, str) and _decode_base64(value) is None:
                shown = value if len(value) <= 64 else value[:64] + "..."
                self.violations.append(
                    (
                        path,
                        f"Invalid value at '{path}' (TYPE_BYTES), Base64 decoding failed "
                        f'for "{shown}"',
                    )
                )
                return value
            ok = isinstance(value, str)
        elif kind.startswith("enum:"):
            enum = kind.removeprefix("enum:")
            ok = value in _ENUMS[enum] or (
                isinstance(value, int)
                and not isinstance(value, bool)
                and 0 <= value < len(_ENUMS[enum])
            )
            if ok and isinstance(value, int):
                value = _ENUMS[enum][value]
        if not ok:
            return self._invalid(path, kind, value)
        return value

    def _invalid(self, path: str, kind: str, value: Any) -> None:
        kind = kind.removeprefix("map ")
        if kind in _SCALAR_TYPES:
            type_name = _SCALAR_TYPES[kind]
        elif kind in ("struct", "value"):
            type_name = "type.googleapis.com/google.protobuf.Struct"
        else:
            type_name = _TYPE_URL + kind.removeprefix("enum:")
        self.violations.append(
            (path, f"Invalid value at '{path}' ({type_name}), {_json_text(value)}")
        )
        return None


@dataclass
class _Plan:
    """What one generation request answers, before it is framed unary or as a stream."""

    text: str | None
    calls: list[ToolCallSpec]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model_version: str
    response_id: str
    text_tokens: int = 0
    images: int = 0
    prompt_tokens_overridden: bool = False
    block_reason: str | None = None  # a blocked prompt: no candidates at all
    chunks: int | None = None
    stream_text: bool = True  # False: a blocked output streams no text either


class _JsonArrayWriter(SSEWriter):
    """streamGenerateContent without `alt=sse`: one JSON array, sent an element at a time."""

    def __init__(
        self, standin: GeminiStandIn, request: web.Request, response: web.StreamResponse
    ) -> None:
        super().__init__(standin, request, response, error_event=self._error_element)
        self._gemini = standin

    def _separator(self) -> bytes:
        return b"[" if self.events == 0 else b"\n,\r\n"

    def frame(
        self, data: bytes | str, event: str | None = None, *, split_json: bool = False
    ) -> bytes:
        pretty = orjson.dumps(orjson.loads(data), option=orjson.OPT_INDENT_2)
        return self._separator() + pretty

    def _error_element(self, fault: Fault) -> bytes:
        body = orjson.dumps(self._gemini.stream_error_payload(fault), option=orjson.OPT_INDENT_2)
        return self._separator() + body + b"\n]"


class GeminiStandIn(StandIn):
    """The Gemini API (generativelanguage v1beta) on 127.0.0.1.

    `models` is a list of `Model` resources (see `gemini_model` and `DEFAULT_MODELS`): a model
    without `generateContent` in `supportedGenerationMethods` is listed but answers 404, and
    `inputTokenLimit` / `outputTokenLimit` bound the prompt and `maxOutputTokens`.
    `api_key=None` accepts any key, or none.
    """

    provider = "gemini"

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        chunk_delay_s: float = 0.0,
        models: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(api_key=api_key, chunk_delay_s=chunk_delay_s)
        self.models: list[dict[str, Any]] = [
            dict(m) for m in (DEFAULT_MODELS if models is None else models)
        ]

    # ---- routes and errors -------------------------------------------------------------

    def routes(self) -> Iterable[web.RouteDef]:
        return [
            web.get(f"/{API_VERSION}/models", self._list_models),
            web.get(f"/{API_VERSION}/models/{{target}}", self._get_model),
            web.post(f"/{API_VERSION}/models/{{target}}", self._model_method),
        ]

    def build_app(self) -> web.Application:
        app = super().build_app()
        # Outermost, so even the base middleware's fault replies see the array mode.
        app.middlewares.insert(0, self._mark_json_array_mode)
        return app

    @web.middleware
    async def _mark_json_array_mode(self, request: web.Request, handler: Any) -> Any:
        token = _JSON_ARRAY_MODE.set(
            request.path.endswith(":streamGenerateContent") and request.query.get("alt") != "sse"
        )
        try:
            return await handler(request)
        finally:
            _JSON_ARRAY_MODE.reset(token)

    def error_response(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        retry_after: float | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> web.Response:
        """A google.rpc error body; `retry_after` becomes a `RetryInfo` detail (Gemini sends no
        Retry-After header), and a 429 carries the `QuotaFailure` and `Help` details."""
        if message == _DEFAULT_MESSAGES.get(status):
            message = _MESSAGES.get(status, message)
        details = list(details or ())
        if status == 429:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                            "quotaValue": "10",
                        }
                    ],
                }
            )
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {
                            "description": "Learn more about Gemini API quotas",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }
                    ],
                }
            )
        if retry_after is not None:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": _duration(retry_after),
                }
            )
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": error_type or STATUS_NAMES.get(status, "UNKNOWN"),
        }
        if details:
            error["details"] = details
        body: Any = {"error": error}
        if _JSON_ARRAY_MODE.get():
            body = [body]
        return web.Response(
            body=orjson.dumps(body), status=status, content_type="application/json", charset="UTF-8"
        )

    def stream_error_payload(self, fault: Fault) -> dict[str, Any]:
        """The error object a stream carries under HTTP 200 for the `stream_error` fault:
        `error_type` picks the status name (default UNAVAILABLE, "model is overloaded"), else a
        non-default `fault.status` picks the code."""
        if fault.error_type:
            status_name = fault.error_type
            code = STATUS_CODES.get(status_name, 500)
        elif fault.status != 500:
            code, status_name = fault.status, STATUS_NAMES.get(fault.status, "UNKNOWN")
        else:
            code, status_name = 503, "UNAVAILABLE"
        message = fault.message or _MESSAGES.get(code, _DEFAULT_MESSAGES.get(code, "error"))
        return {"error": {"code": code, "message": message, "status": status_name}}

    def _stream_error_event(self, fault: Fault) -> bytes:
        return b"data: " + orjson.dumps(self.stream_error_payload(fault)) + b"\r\n\r\n"

    def _invalid_argument(
        self, message: str, violations: Sequence[tuple[str, str]] = ()
    ) -> _Rejected:
        details = []
        if violations:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [
                        {"field": path, "description": text} if path else {"description": text}
                        for path, text in violations
                    ],
                }
            )
        return _Rejected(self.error_response(400, message, details=details))

    def _check_auth(self, request: web.Request) -> None:
        if self.api_key is None:
            return
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            raise _Rejected(self.error_response(403, _NO_KEY))
        if key != self.api_key:
            raise _Rejected(
                self.error_response(
                    400,
                    _BAD_KEY,
                    details=[
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID",
                            "domain": "googleapis.com",
                            "metadata": {"service": "generativelanguage.googleapis.com"},
                        },
                        {
                            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                            "locale": "en-US",
                            "message": _BAD_KEY,
                        },
                    ],
                )
            )

    def find_model(self, model_id: str) -> dict[str, Any] | None:
        """The `Model` resource named `models/<model_id>` (the prefix is optional)."""
        name = model_id if model_id.startswith("models/") else f"models/{model_id}"
        return next((m for m in self.models if m.get("name") == name), None)

    # ---- model listing -----------------------------------------------------------------

    async def _list_models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
            size_text = request.query.get("pageSize", "50")
            if not re.fullmatch(r"-?\d+", size_text):
                raise self._invalid_argument(
                    f"Invalid value at 'page_size' (TYPE_INT32), \"{size_text}\"",
                    [("page_size", f"Invalid value at 'page_size' (TYPE_INT32), \"{size_text}\"")],
                )
            size = int(size_text)
            if size < 0:
                raise _Rejected(
                    self.error_response(
                        400, "* ListModelsRequest.page_size: page_size must not be negative\n"
                    )
                )
            size = min(size or 50, 1000)  # the API's default page and its cap
            start = 0
            token = request.query.get("pageToken")
            if token:
                decoded = _decode_base64(token)
                match = re.fullmatch(rb"models-offset:(\d+)", decoded or b"")
                if match is None:
                    raise _Rejected(self.error_response(400, "Invalid page token."))
                start = int(match.group(1))
        except _Rejected as rejected:
            return rejected.response
        page = self.models[start : start + size]
        body: dict[str, Any] = {"models": page}
        if start + size < len(self.models):
            body["nextPageToken"] = base64.urlsafe_b64encode(
                f"models-offset:{start + size}".encode()
            ).decode()
        return self.json_response(body)

    async def _get_model(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except _Rejected as rejected:
            return rejected.response
        model_id = request.match_info["target"]
        model = self.find_model(model_id)
        if model is None:
            return self.error_response(
                404,
                f"models/{model_id} is not found for API version {API_VERSION}, or is not "
                "supported for get. Call ListModels to see the list of available models "
                "and their supported methods.",
            )
        return self.json_response(model)

    # ---- generation --------------------------------------------------------------------

    async def _model_method(self, request: web.Request) -> web.StreamResponse:
        model_id, _, method = request.match_info["target"].partition(":")
        try:
            self._check_auth(request)
            if method not in ("generateContent", "streamGenerateContent"):
                raise _Rejected(
                    self.error_response(404, f"Method not found: models/{model_id}:{method}")
                )
            body = await self._parse_body(request)
            model = self.find_model(model_id)
            if model is None or "generateContent" not in model.get(
                "supportedGenerationMethods", ()
            ):
                raise _Rejected(
                    self.error_response(
                        404,
                        f"models/{model_id} is not found for API version {API_VERSION}, or is "
                        f"not supported for {method}. Call ListModels to see the list of "
                        "available models and their supported methods.",
                    )
                )
            self._validate(body, model)
            plan = self._plan(body, model, self.next_reply())
        except _Rejected as rejected:
            return rejected.response
        if method == "generateContent":
            return self.json_response(self._unary_body(plan))
        return await self._stream(request, plan)

    async def _parse_body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()  # aiohttp keeps the bytes the base middleware read
        body = request.get(JSON_BODY)
        if body is None:
            if raw.strip():
                raise self._invalid_argument(
                    "Invalid JSON payload received. Unexpected token.",
                    [("", "Invalid JSON payload received. Unexpected token.")],
                )
            body = {}
        if not isinstance(body, dict):
            text = 'Invalid JSON payload received. Unknown name "": Root element must be a message.'
            raise self._invalid_argument(text, [("", text)])
        parser = _ProtoJson()
        parsed = parser.parse("GenerateContentRequest", body, "")
        if parser.violations:
            raise self._invalid_argument(
                "\n".join(text for _, text in parser.violations), parser.violations
            )
        return parsed

    def _validate(self, body: dict[str, Any], model: dict[str, Any]) -> None:
        """The semantic rules the real API checks after parsing (its `* Request.field: ...`
        messages and its standalone ones), then the model's token limits."""
        problems: list[str] = []
        contents = body.get("contents") or []
        if not contents:
            problems.append("* GenerateContentRequest.contents: contents is not specified\n")
        previous: dict[str, Any] | None = None
        for i, content in enumerate(contents):
            content = content or {}
            role = content.get("role") or ""
            if role not in ("", "user", "model"):
                raise _Rejected(self.error_response(400, "Please use a valid role: user, model."))
            parts = content.get("parts") or []
            if not parts:
                problems.append(
                    f"* GenerateContentRequest.contents[{i}].parts: contents.parts "
                    "must not be empty.\n"
                )
            for j, part in enumerate(parts):
                self._check_part(part or {}, f"contents[{i}].parts[{j}]", problems)
            calls = [p for p in parts if p and "functionCall" in p]
            if (
                calls
                and role == "model"
                and not (previous is not None and (previous.get("role") or "user") == "user")
            ):
                raise _Rejected(
                    self.error_response(
                        400,
                        "Please ensure that function call turn comes immediately after a user "
                        "turn or after a function response turn.",
                    )
                )
            responses = [p for p in parts if p and "functionResponse" in p]
            previous_calls = [
                p for p in (previous or {}).get("parts") or [] if p and "functionCall" in p
            ]
            if responses and previous_calls and len(responses) != len(previous_calls):
                raise _Rejected(
                    self.error_response(
                        400,
                        "Please ensure that the number of function response parts is equal to "
                        "the number of function call parts of the function call turn.",
                    )
                )
            previous = content
        system = body.get("systemInstruction")
        for j, part in enumerate((system or {}).get("parts") or []):
            self._check_part(part or {}, f"system_instruction.parts[{j}]", problems)
        declared = self._check_tools(body, problems)
        self._check_generation_config(body.get("generationConfig") or {}, model, problems)
        self._check_tool_config(body, declared, problems)
        if problems:
            raise _Rejected(self.error_response(400, "".join(problems)))
        texts, images = _input_texts(body)
        prompt_tokens = sum(count_tokens(t) for t in texts) + IMAGE_TOKENS * images
        limit = int(model.get("inputTokenLimit") or 0)
        if limit and prompt_tokens > limit:
            raise _Rejected(
                self.error_response(
                    400,
                    f"The input token count ({prompt_tokens}) exceeds the maximum number of "
                    f"tokens allowed ({limit}).",
                )
            )

    def _check_part(self, part: dict[str, Any], path: str, problems: list[str]) -> None:
        where = f"* GenerateContentRequest.{path}"
        data = [
            name
            for name in _PART_DATA
            if name in part and part[name] is not None and part[name] != ""
        ]
        if not data:
            # proto3: an empty text is no text, so `{"text": ""}` is a part with no data.
            problems.append(
                f"{where}.data: required oneof field 'data' must have one initialized field\n"
            )
            return
        if len(data) > 1:
            problems.append(
                f"{where}.data: oneof field 'data' is already set. Cannot set '{_snake(data[1])}'\n"
            )
        blob = part.get("inlineData") or part.get("fileData")
        if blob is not None:
            kind = "inline_data" if "inlineData" in part else "file_data"
            mime = (blob.get("mimeType") or "").lower()
            if not mime:
                problems.append(f"{where}.{kind}.mime_type: mime_type must not be empty\n")
            elif mime not in _IMAGE_TYPES and mime not in _OTHER_INPUT_TYPES:
                raise _Rejected(self.error_response(400, f"Unsupported MIME type: {mime}"))
            if kind == "file_data" and not blob.get("fileUri"):
                problems.append(f"{where}.file_data.file_uri: file_uri must not be empty\n")
            if kind == "inline_data":
                data_bytes = _decode_base64(blob.get("data") or "") or b""
                if not data_bytes:
                    problems.append(f"{where}.inline_data.data: data must not be empty\n")
                elif mime in _SNIFFABLE and sniff_image(data_bytes) != mime:
                    raise _Rejected(self.error_response(400, _BAD_IMAGE))
        for key, label in (
            ("functionCall", "function_call"),
            ("functionResponse", "function_response"),
        ):
            if key in part and not (part[key] or {}).get("name"):
                problems.append(f"{where}.{label}.name: Name cannot be empty.\n")

    def _check_tools(self, body: dict[str, Any], problems: list[str]) -> list[str]:
        declared: list[str] = []
        for t, tool in enumerate(body.get("tools") or []):
            for d, declaration in enumerate((tool or {}).get("functionDeclarations") or []):
                declaration = declaration or {}
                where = f"* GenerateContentRequest.tools[{t}].function_declarations[{d}]"
                name = declaration.get("name") or ""
                if not _FUNCTION_NAME.fullmatch(name):
                    problems.append(
                        f"{where}.name: Invalid function name. Must start with a letter or an "
                        "underscore. Must be alphameric (a-z, A-Z, 0-9), underscores (_), dots "
                        "(.), colons (:), or dashes (-), with a maximum length of 64.\n"
                    )
                declared.append(name)
                if (
                    declaration.get("parameters") is not None
                    and declaration.get("parametersJsonSchema") is not None
                ):
                    problems.append(
                        f"{where}.parameters: parameters and parameters_json_schema "
                        "cannot both be set.\n"
                    )
                if declaration.get("parameters") is not None:
                    _check_schema(declaration["parameters"], f"{where}.parameters", problems)
        return declared

    def _check_tool_config(
        self, body: dict[str, Any], declared: list[str], problems: list[str]
    ) -> None:
        config = ((body.get("toolConfig") or {}).get("functionCallingConfig")) or {}
        where = "* GenerateContentRequest.tool_config.function_calling_config"
        mode = config.get("mode") or "AUTO"
        allowed = config.get("allowedFunctionNames") or []
        if allowed and mode not in ("ANY", "VALIDATED"):
            problems.append(
                f"{where}.allowed_function_names: allowed_function_names is only "
                "allowed when mode is ANY or VALIDATED.\n"
            )
        for k, name in enumerate(allowed):
            if name not in declared:
                problems.append(
                    f'{where}.allowed_function_names[{k}]: function "{name}" is '
                    "not declared in tools.\n"
                )
        if mode in ("ANY", "VALIDATED") and not declared:
            problems.append(
                f"{where}.mode: function calling mode {mode} requires function "
                "declarations in tools.\n"
            )

    def _check_generation_config(
        self, config: dict[str, Any], model: dict[str, Any], problems: list[str]
    ) -> None:
        where = "* GenerateContentRequest.generation_config"
        ranges = {"temperature": (0.0, 2.0), "topP": (0.0, 1.0)}
        for name, (low, high) in ranges.items():
            value = _as_number(config.get(name))
            if value is not None and not low <= value <= high:
                problems.append(
                    f"{where}.{_snake(name)}: {_snake(name)} must be in the range [{low}, {high}]\n"
                )
        top_k = _as_number(config.get("topK"))
        if top_k is not None and top_k < 0:
            problems.append(f"{where}.top_k: top_k must be non-negative\n")
        candidates = _as_number(config.get("candidateCount"))
        if candidates is not None and candidates < 0:
            problems.append(f"{where}.candidate_count: candidate_count must be positive\n")
        elif candidates is not None and candidates > 1:
            raise _Rejected(
                self.error_response(400, f"Multiple candidates is not enabled for {model['name']}")
            )
        max_tokens = _as_number(config.get("maxOutputTokens"))
        limit = int(model.get("outputTokenLimit") or 0)
        if max_tokens is not None and max_tokens < 0:
            problems.append(f"{where}.max_output_tokens: max_output_tokens must be positive\n")
        elif max_tokens is not None and limit and max_tokens > limit:
            raise _Rejected(
                self.error_response(
                    400,
                    f"Unable to submit request because it has a maxOutputTokens value of "
                    f"{int(max_tokens)} but the supported range is from 1 (inclusive) to "
                    f"{limit + 1} (exclusive). Update the value and try again.",
                )
            )
        if len(config.get("stopSequences") or []) > 5:
            problems.append(
                f"{where}.stop_sequences: the number of stop_sequences must not exceed 5\n"
            )
        mime = config.get("responseMimeType")
        if mime and mime not in _RESPONSE_MIME_TYPES:
            problems.append(
                f"{where}.response_mime_type: allowed mimetypes are `text/plain`, "
                "`application/json`, `application/xml`, `application/yaml` and "
                "`text/x.enum`.\n"
            )
        has_schema = config.get("responseSchema") is not None
        has_json_schema = config.get("responseJsonSchema") is not None
        if has_schema and has_json_schema:
            problems.append(
                f"{where}.response_json_schema: response_schema and "
                "response_json_schema cannot both be set.\n"
            )
        if (has_schema or has_json_schema) and mime not in ("application/json", "text/x.enum"):
            field_name = "response_schema" if has_schema else "response_json_schema"
            problems.append(
                f"{where}.{field_name}: {field_name} requires response_mime_type to "
                "be `application/json` or `text/x.enum`.\n"
            )
        if has_schema:
            _check_schema(config["responseSchema"], f"{where}.response_schema", problems)

    # ---- answers -----------------------------------------------------------------------

    def _plan(self, body: dict[str, Any], model: dict[str, Any], reply: Reply | None) -> _Plan:
        texts, images = _input_texts(body)
        text_tokens = sum(count_tokens(t) for t in texts)
        prompt_tokens = text_tokens + IMAGE_TOKENS * images
        model_version = model["name"].removeprefix("models/")
        plan = _Plan(
            text=None,
            calls=[],
            finish_reason="STOP",
            prompt_tokens=prompt_tokens,
            completion_tokens=0,
            model_version=model_version,
            response_id=self.new_id("standin-gemini-"),
            text_tokens=text_tokens,
            images=images,
        )
        if reply is not None:
            plan.chunks = reply.chunks
            plan.model_version = reply.model or model_version
            if reply.prompt_tokens is not None:
                plan.prompt_tokens = reply.prompt_tokens
                plan.prompt_tokens_overridden = True
        scripted_reason = reply.finish_reason if reply is not None else None
        if scripted_reason and scripted_reason.startswith(_PROMPT_BLOCKED):
            plan.block_reason = scripted_reason.partition(":")[2] or "SAFETY"
            return plan
        if reply is not None and reply.tool_calls:
            plan.calls = list(reply.tool_calls)
            plan.text = reply.text
        elif reply is not None and reply.text is not None:
            plan.text = reply.text
        else:
            call = _default_call(body)
            if call is not None:
                plan.calls = [call]
            else:
                plan.text = _default_text(body, images)
        max_tokens = _as_number((body.get("generationConfig") or {}).get("maxOutputTokens"))
        truncated = False
        if plan.text and max_tokens and count_tokens(plan.text) > max_tokens:
            plan.text = "".join(words(plan.text)[: int(max_tokens)]).rstrip()
            truncated = True
        plan.finish_reason = scripted_reason or ("MAX_TOKENS" if truncated else "STOP")
        if plan.finish_reason in _BLOCKED_OUTPUT:
            # The real API withholds blocked output; a stream shows only what was scripted.
            plan.stream_text = reply is not None and reply.text is not None
            if not plan.stream_text:
                plan.text = None
        plan.completion_tokens = count_tokens(plan.text or "") + sum(
            count_tokens(_json_text(call.arguments)) for call in plan.calls
        )
        if reply is not None and reply.completion_tokens is not None:
            plan.completion_tokens = reply.completion_tokens
        return plan

    def _usage(self, plan: _Plan, completion_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {"promptTokenCount": plan.prompt_tokens}
        if completion_tokens:
            usage["candidatesTokenCount"] = completion_tokens
        usage["totalTokenCount"] = plan.prompt_tokens + completion_tokens
        if not plan.prompt_tokens_overridden:
            details = [{"modality": "TEXT", "tokenCount": plan.text_tokens}]
            if plan.images:
                details.append({"modality": "IMAGE", "tokenCount": IMAGE_TOKENS * plan.images})
            usage["promptTokensDetails"] = details
        return usage

    def _envelope(
        self, plan: _Plan, candidate: dict[str, Any] | None, completion_tokens: int
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if candidate is not None:
            body["candidates"] = [candidate]
        else:
            body["promptFeedback"] = {
                "blockReason": plan.block_reason,
                "safetyRatings": _safety_ratings(blocked=True),
            }
        body["usageMetadata"] = self._usage(plan, completion_tokens)
        body["modelVersion"] = plan.model_version
        body["responseId"] = plan.response_id
        return body

    def _unary_body(self, plan: _Plan) -> dict[str, Any]:
        if plan.block_reason is not None:
            return self._envelope(plan, None, 0)
        parts: list[dict[str, Any]] = []
        if plan.text and plan.finish_reason not in _BLOCKED_OUTPUT:
            parts.append({"text": plan.text})
        parts.extend(_call_part(call) for call in plan.calls)
        if not parts and plan.finish_reason not in _BLOCKED_OUTPUT:
            parts.append({"text": ""})
        return self._envelope(plan, _candidate(parts, plan.finish_reason), plan.completion_tokens)

    def _stream_chunks(self, plan: _Plan, *, finish: bool) -> list[dict[str, Any]]:
        """Every event of the stream: text split over chunks with running usage, function calls
        whole in the last one, `finishReason` only on the last (unless `finish` is False)."""
        if plan.block_reason is not None:
            return [self._envelope(plan, None, 0)]
        pieces = split_text(plan.text, plan.chunks) if plan.text and plan.stream_text else []
        events: list[tuple[list[dict[str, Any]], int]] = []
        sent = ""
        for piece in pieces:
            sent += piece
            events.append(([{"text": piece}], min(count_tokens(sent), plan.completion_tokens)))
        blocked = plan.finish_reason in _BLOCKED_OUTPUT
        if plan.calls or blocked or not events:
            call_parts = [_call_part(call) for call in plan.calls]
            events.append((call_parts or ([] if blocked else [{"text": ""}]), 0))
        out = []
        for index, (parts, running) in enumerate(events):
            last = index == len(events) - 1
            reason = plan.finish_reason if last and finish else None
            completion = plan.completion_tokens if last else running
            out.append(self._envelope(plan, _candidate(parts, reason), completion))
        return out

    async def _stream(self, request: web.Request, plan: _Plan) -> web.StreamResponse:
        fault = request.get(FAULT)
        # Gemini streams have no end marker but the last chunk's finishReason: that is what
        # the no_terminator fault drops.
        finish = not (fault is not None and fault.kind == "no_terminator")
        chunks = self._stream_chunks(plan, finish=finish)
        if request.query.get("alt") == "sse":
            writer = await self.open_stream(
                request, crlf=True, error_event=self._stream_error_event
            )
            end_marker = None
        else:
            response = web.StreamResponse(
                status=200, headers={"Content-Type": "application/json; charset=UTF-8"}
            )
            request[RESPONSE] = response
            await response.prepare(request)
            writer = _JsonArrayWriter(self, request, response)
            end_marker = b"\n]" if chunks else b"[]"
        for chunk in chunks:
            await writer.send(chunk)
        await writer.terminate(end_marker)
        return writer.response


def _duration(seconds: float) -> str:
    """A protobuf Duration in JSON: "1s", "0.5s"."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _check_schema(schema: dict[str, Any], where: str, problems: list[str]) -> None:
    """The OpenAPI-subset `Schema` rules: an OBJECT needs properties, `required` names them."""
    properties = schema.get("properties") or {}
    if schema.get("type") == "OBJECT" and not properties:
        problems.append(f"{where}.properties: should be non-empty for OBJECT type\n")
    for k, name in enumerate(schema.get("required") or []):
        if name not in properties:
            problems.append(f"{where}.required[{k}]: property is not defined\n")
    for i, sub in enumerate(properties.values()):
        if sub:
            _check_schema(sub, f"{where}.properties[{i}].value", problems)
    if schema.get("items"):
        _check_schema(schema["items"], f"{where}.items", problems)
    for i, sub in enumerate(schema.get("anyOf") or []):
        if sub:
            _check_schema(sub, f"{where}.any_of[{i}]", problems)


def _input_texts(body: dict[str, Any]) -> tuple[list[str], int]:
    """The request's text as the usage counts it (function call arguments and results by their
    JSON text), and how many images it holds."""
    texts: list[str] = []
    images = 0
    contents = [body.get("systemInstruction") or {}, *(body.get("contents") or [])]
    for content in contents:
        for part in (content or {}).get("parts") or []:
            part = part or {}
            if part.get("text"):
                texts.append(part["text"])
            if part.get("functionCall"):
                texts.append(_json_text(part["functionCall"].get("args") or {}))
            if part.get("functionResponse"):
                texts.append(_json_text(part["functionResponse"].get("response") or {}))
            blob = part.get("inlineData") or part.get("fileData") or {}
            if (blob.get("mimeType") or "").lower().startswith("image/"):
                images += 1
    return texts, images


def _last_turn_results(body: dict[str, Any]) -> list[str] | None:
    """The function results the conversation ends with, as text; None when it ends otherwise."""
    contents = body.get("contents") or []
    last = (contents[-1] or {}) if contents else {}
    responses = [(p or {}).get("functionResponse") for p in last.get("parts") or []]
    results = [r for r in responses if r]
    if not results:
        return None
    texts = []
    for result in results:
        response = result.get("response") or {}
        # The documented convention is {"output": ...} (or {"error": ...}); show that value.
        value = next(
            (
                response[k]
                for k in ("output", "result", "content", "error")
                if isinstance(response.get(k), str)
            ),
            None,
        )
        texts.append(value if value is not None else _json_text(response))
    return texts


def _default_call(body: dict[str, Any]) -> ToolCallSpec | None:
    """The function call the stand-in makes: the forced one, else the first declared, unless
    calling is off or the conversation ends with function results."""
    declarations = [
        d
        for tool in body.get("tools") or []
        for d in (tool or {}).get("functionDeclarations") or []
        if d
    ]
    config = ((body.get("toolConfig") or {}).get("functionCallingConfig")) or {}
    if not declarations or config.get("mode") == "NONE" or _last_turn_results(body) is not None:
        return None
    allowed = config.get("allowedFunctionNames") or []
    chosen = next((d for d in declarations if d.get("name") in allowed), declarations[0])
    schema = chosen.get("parametersJsonSchema")
    if schema is None:
        schema = chosen.get("parameters")
    arguments = sample_from_schema(schema) if schema is not None else {}
    return ToolCallSpec(
        name=chosen["name"], arguments=arguments if isinstance(arguments, dict) else {}
    )


def _default_text(body: dict[str, Any], images: int) -> str:
    results = _last_turn_results(body)
    if results is not None:
        text = "Tool result received: " + "; ".join(results)
    else:
        user_texts = [
            (p or {}).get("text") or ""
            for c in body.get("contents") or []
            if (c or {}).get("role") != "model"
            for p in (c or {}).get("parts") or []
        ]
        text = echo_text("gemini", last_user_text(user_texts))
        if images:
            text += f" (saw {images} image(s))"
    config = body.get("generationConfig") or {}
    schema = config.get("responseJsonSchema")
    if schema is None:
        schema = config.get("responseSchema")
    mime = config.get("responseMimeType")
    if mime == "text/x.enum" and schema is not None:
        return str(sample_from_schema(schema))
    if mime == "application/json":
        return _json_text(sample_from_schema(schema) if schema is not None else {"reply": text})
    return text


def _call_part(call: ToolCallSpec) -> dict[str, Any]:
    function_call: dict[str, Any] = {"name": call.name, "args": dict(call.arguments)}
    if call.id is not None:
        function_call = {"id": call.id, **function_call}
    return {"functionCall": function_call}


def _candidate(parts: list[dict[str, Any]], finish_reason: str | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {}
    if parts:
        candidate["content"] = {"parts": parts, "role": "model"}
    if finish_reason:
        candidate["finishReason"] = finish_reason
    if finish_reason == "SAFETY":
        candidate["safetyRatings"] = _safety_ratings(blocked=True)
    candidate["index"] = 0
    return candidate


def _safety_ratings(*, blocked: bool) -> list[dict[str, Any]]:
    ratings: list[dict[str, Any]] = [
        {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
        {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
        {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
    ]
    if blocked:
        ratings[-1] = {
            "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
            "probability": "HIGH",
            "blocked": True,
        }
    return ratings
