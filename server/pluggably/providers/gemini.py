"""Google Gemini API: `generateContent` and `streamGenerateContent?alt=sse`.

Wire notes the adapter relies on (checked against the official SDK through the stand-in): roles
are `user` and `model` only, the system prompt is `systemInstruction`, tool results are
`functionResponse` parts that name the function (matched here by call id), and unknown fields are
rejected; a function call arrives whole in one part, its `id` is optional (the gateway makes one
up) and it ends with finishReason STOP (there is no tool-call reason); a blocked prompt is HTTP
200 with `promptFeedback.blockReason` and no candidates, blocked output a candidate with
finishReason SAFETY and no content; a stream has no end marker other than a finishReason, so a
stream without one is a failure; take the last chunk's `usageMetadata`; retry hints come as
`RetryInfo.retryDelay` inside the error body.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Mapping
from typing import Any

import orjson

from pluggably.core.errors import FieldViolation, InvalidArgument
from pluggably.core.types import (
    Capabilities,
    ChatMessage,
    Chunk,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    ImagePart,
    ModelInfo,
    ResponseFormatType,
    TextChunk,
    TextPart,
    ToolCallChunk,
    ToolChoiceMode,
    Usage,
)
from pluggably.providers._base import HostedBackend, ModelTraits
from pluggably.providers._errors import UpstreamError, bad_response
from pluggably.providers._sse import SSEEvent
from pluggably.providers.config import GeminiConfig

BASE_URL = "https://generativelanguage.googleapis.com"
KEY_ENV = "GEMINI_API_KEY"
MAX_STOP_SEQUENCES = 5

_BLOCKED = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "LANGUAGE"}
)
_ERROR_KINDS = {
    "RESOURCE_EXHAUSTED": "rate_limit",
    "UNAVAILABLE": "overloaded",
    "INTERNAL": "overloaded",
    "DEADLINE_EXCEEDED": "overloaded",
    "UNAUTHENTICATED": "auth",
    "PERMISSION_DENIED": "auth",
}
_ALL = Capabilities(tools=True, vision=True, json_object=True, json_schema=True)
_MODELS: tuple[tuple[str, int, int], ...] = (  # prefix, context, max output
    ("gemini-2.5", 1048576, 65536),
    ("gemini-3", 1048576, 65536),
    ("gemini-2.0", 1048576, 8192),
    ("gemini-1.5", 1048576, 8192),
)
_RESERVED = frozenset(
    {
        "contents",
        "systemInstruction",
        "system_instruction",
        "generationConfig",
        "generation_config",
        "tools",
        "toolConfig",
        "tool_config",
    }
)


class GeminiBackend(HostedBackend):
    SUPPORTED_PARAMETERS = (
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
    )
    RESERVED_OPTIONS = _RESERVED

    def __init__(self, provider: str, config: GeminiConfig) -> None:
        self.default_caps = config.default_capabilities.apply(_ALL)
        base = (config.base_url or BASE_URL).rstrip("/")
        super().__init__(
            provider,
            config.model_copy(update={"base_url": f"{base}/{config.api_version}"}),
            base_url=BASE_URL,
            key_env=KEY_ENV,
            requires_key=True,
        )
        self._call_ids = 0

    def auth_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.api_key} if self.api_key else {}

    # ---- models --------------------------------------------------------------------------

    def traits(self, name: str) -> ModelTraits:
        for prefix, context, max_output in _MODELS:
            if name.startswith(prefix):
                caps = Capabilities(**{**_ALL.__dict__, "max_output_tokens": max_output})
                return ModelTraits(caps, context)
        return ModelTraits(self.default_caps, 0)

    async def fetch_models(self) -> list[ModelInfo]:
        models: list[ModelInfo] = []
        params = {"pageSize": "1000"}
        for _ in range(100):
            body = await self.get_json("/models", params)
            for entry in body.get("models") or ():
                name = str(entry.get("name") or "")
                methods = entry.get("supportedGenerationMethods") or ()
                if not name.startswith("models/") or "generateContent" not in methods:
                    continue
                models.append(
                    self.model_info(
                        name.removeprefix("models/"),
                        description=str(entry.get("displayName") or ""),
                        context_length=_int(entry.get("inputTokenLimit")),
                        max_output_tokens=_int(entry.get("outputTokenLimit")),
                    )
                )
            token = body.get("nextPageToken")
            if not token:
                break
            params = {"pageSize": "1000", "pageToken": str(token)}
        return models

    # ---- requests ------------------------------------------------------------------------

    def stream_path(self, path: str) -> tuple[str, dict[str, str] | None]:
        return path.replace(":generateContent", ":streamGenerateContent"), {"alt": "sse"}

    def build_request(
        self, request: GenerationRequest, model: ModelInfo, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        text = request.text
        if len(text.stop) > MAX_STOP_SEQUENCES:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "text.stop",
                        f"{model.id!r} takes at most {MAX_STOP_SEQUENCES} stop sequences, got {len(text.stop)}",
                    )
                ]
            )
        system, contents = _contents(request)
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        config: dict[str, Any] = {}
        max_tokens = text.max_tokens or self.default_max_tokens(model)
        if max_tokens:
            config["maxOutputTokens"] = max_tokens
        for short, name in (
            ("temperature", "temperature"),
            ("top_p", "topP"),
            ("top_k", "topK"),
            ("seed", "seed"),
            ("presence_penalty", "presencePenalty"),
            ("frequency_penalty", "frequencyPenalty"),
        ):
            value = getattr(text, short)
            if value is not None:
                config[name] = value
        if text.stop:
            config["stopSequences"] = list(text.stop)
        fmt = text.response_format
        if fmt is not None and fmt.type is not ResponseFormatType.TEXT:
            config["responseMimeType"] = "application/json"
            if fmt.type is ResponseFormatType.JSON_SCHEMA and fmt.schema:
                config["responseJsonSchema"] = fmt.schema
        if config:
            body["generationConfig"] = config
        if request.tools:
            declarations = []
            for tool in request.tools:
                declaration: dict[str, Any] = {"name": tool.name}
                if tool.description:
                    declaration["description"] = tool.description
                if tool.parameters:
                    declaration["parametersJsonSchema"] = tool.parameters
                declarations.append(declaration)
            body["tools"] = [{"functionDeclarations": declarations}]
            choice = request.tool_choice
            if choice is not None:
                calling: dict[str, Any] = {
                    "mode": {
                        ToolChoiceMode.AUTO: "AUTO",
                        ToolChoiceMode.NONE: "NONE",
                        ToolChoiceMode.REQUIRED: "ANY",
                        ToolChoiceMode.FUNCTION: "ANY",
                    }[choice.mode]
                }
                if choice.mode is ToolChoiceMode.FUNCTION:
                    calling["allowedFunctionNames"] = [choice.function]
                body["toolConfig"] = {"functionCallingConfig": calling}
        return f"/models/{model.name}:generateContent", body

    # ---- responses -----------------------------------------------------------------------

    def new_call_id(self) -> str:
        self._call_ids += 1
        return f"call_{self._call_ids:08d}"

    def decode_response(self, body: Any, request: GenerationRequest) -> list[Chunk]:
        model_id = f"{self.provider}/{request.model}"
        if body.get("error"):
            raise self.failure(self._error_from(200, body["error"]), model_id)
        decoder = _StreamDecoder(self, model_id)
        chunks = decoder.take(body)
        return [*chunks, *decoder.finish()]

    def stream_decoder(self, request: GenerationRequest) -> _StreamDecoder:
        return _StreamDecoder(self, f"{self.provider}/{request.model}")

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            data = {}
        if isinstance(data, list) and data:  # the JSON-array stream wraps errors in [...]
            data = data[0]
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, dict):
            error = {"message": body[:200].decode("utf-8", "replace")}
        return self._error_from(status, error)

    def _error_from(self, status: int, error: dict[str, Any]) -> UpstreamError:
        status_name = str(error.get("status") or "")
        kind = _ERROR_KINDS.get(status_name, "")
        retry = None
        for detail in error.get("details") or ():
            if not isinstance(detail, dict):
                continue
            kind_of = str(detail.get("@type") or "")
            if kind_of.endswith("RetryInfo"):
                retry = _duration_s(detail.get("retryDelay"))
            elif kind_of.endswith("ErrorInfo") and detail.get("reason") in (
                "API_KEY_INVALID",
                "API_KEY_EXPIRED",
            ):
                kind = "auth"
        if status == 200 and not kind:
            kind = "overloaded"
        return UpstreamError(
            status=status or _int(error.get("code")),
            message=str(error.get("message") or ""),
            type=status_name.lower(),
            retry_after_s=retry,
            kind=kind,
        )


class _StreamDecoder:
    """Also decodes unary responses: a unary body is one chunk that carries a finishReason."""

    def __init__(self, backend: GeminiBackend, model_id: str) -> None:
        self._backend = backend
        self._model_id = model_id
        self._usage: dict[str, Any] = {}
        self._reason: str | None = None
        self._model = ""
        self._calls = 0

    def feed(self, event: SSEEvent) -> list[Chunk]:
        data = orjson.loads(event.data)
        if isinstance(data, dict) and data.get("error"):
            raise self._backend.failure(
                self._backend._error_from(200, data["error"]), self._model_id
            )
        return self.take(data)

    def take(self, data: dict[str, Any]) -> list[Chunk]:
        if data.get("usageMetadata"):
            self._usage = data["usageMetadata"]
        if data.get("modelVersion"):
            self._model = data["modelVersion"]
        candidates = data.get("candidates") or ()
        if not candidates:
            block = (data.get("promptFeedback") or {}).get("blockReason")
            if block:
                raise self._backend.failure(
                    UpstreamError(
                        status=200,
                        message=f"the prompt was blocked ({block})",
                        type=str(block).lower(),
                        kind="content_filter",
                    ),
                    self._model_id,
                )
            return []
        candidate = candidates[0]
        out: list[Chunk] = []
        for part in (candidate.get("content") or {}).get("parts") or ():
            if part.get("thought"):
                continue
            if part.get("text"):
                out.append(TextChunk(part["text"]))
            call = part.get("functionCall")
            if call:
                index = self._calls
                self._calls += 1
                out.append(
                    ToolCallChunk(
                        index,
                        id=call.get("id") or self._backend.new_call_id(),
                        name=call.get("name") or "",
                        arguments=orjson.dumps(call.get("args") or {}).decode(),
                    )
                )
        if candidate.get("finishReason"):
            self._reason = candidate["finishReason"]
        return out

    def finish(self) -> list[Chunk]:
        reason = self._reason
        if reason is None:
            raise bad_response(
                self._backend.provider, self._model_id, "the stream ended without a finishReason"
            )
        if reason in _BLOCKED:
            finish = FinishReason.CONTENT_FILTER
        elif reason == "MAX_TOKENS":
            finish = FinishReason.LENGTH
        elif self._calls:
            finish = FinishReason.TOOL_CALLS  # Gemini ends function calls with STOP
        elif reason == "MALFORMED_FUNCTION_CALL":
            raise bad_response(
                self._backend.provider,
                self._model_id,
                "the model produced a malformed function call",
            )
        else:
            finish = FinishReason.STOP
        usage = self._usage
        thoughts = _int(usage.get("thoughtsTokenCount"))
        return [
            DoneChunk(
                finish,
                Usage(
                    prompt_tokens=_int(usage.get("promptTokenCount")),
                    completion_tokens=_int(usage.get("candidatesTokenCount")) + thoughts,
                    cached_prompt_tokens=_int(usage.get("cachedContentTokenCount")),
                    reasoning_tokens=thoughts,
                ),
                model_version=self._model,
            )
        ]


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _duration_s(value: Any) -> float | None:
    """A google.protobuf.Duration in JSON ("1.5s")."""
    if isinstance(value, str) and value.endswith("s"):
        try:
            return float(value[:-1])
        except ValueError:
            return None
    return None


def _contents(request: GenerationRequest) -> tuple[str, list[dict[str, Any]]]:
    """(system instruction, contents): roles become user/model, tool results become
    functionResponse parts of a user turn, and consecutive turns of one role merge."""
    if not request.is_chat:
        return "", [{"role": "user", "parts": [{"text": request.prompt or ""}]}]
    names = {c.id: c.name for m in request.messages for c in m.tool_calls}
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        if message.role == "system":
            system.append(message.text())
            continue
        role = "model" if message.role == "assistant" else "user"
        parts = _parts(message, i, names)
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return "\n\n".join(s for s in system if s), contents


def _parts(message: ChatMessage, index: int, names: dict[str, str]) -> list[dict[str, Any]]:
    if message.role == "tool":
        try:
            result = orjson.loads(message.text())
        except orjson.JSONDecodeError:
            result = message.text()
        response = result if isinstance(result, dict) else {"result": result}
        return [
            {
                "functionResponse": {
                    "name": names.get(message.tool_call_id, message.name),
                    "response": response,
                }
            }
        ]
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(message.content_parts()):
        if isinstance(part, TextPart):
            if part.text:
                parts.append({"text": part.text})
        else:
            parts.append(
                _image(part, f"messages[{index}].parts[{j - (1 if message.content else 0)}].image")
            )
    for call in message.tool_calls:
        parts.append(
            {"functionCall": {"name": call.name, "args": orjson.loads(call.arguments or "{}")}}
        )
    return parts


def _image(part: ImagePart, field: str) -> dict[str, Any]:
    if part.data:
        return {
            "inlineData": {"mimeType": part.mime_type, "data": base64.b64encode(part.data).decode()}
        }
    mime = part.mime_type or (mimetypes.guess_type(part.url.split("?", 1)[0])[0] or "")
    if not mime.startswith("image/"):
        raise InvalidArgument(
            [
                FieldViolation(
                    f"{field}.mime_type",
                    "Gemini needs the media type of an image URL: set mime_type",
                )
            ]
        )
    return {"fileData": {"mimeType": mime, "fileUri": part.url}}


def build(provider: str, section: GeminiConfig) -> GeminiBackend:
    return GeminiBackend(provider, section)
