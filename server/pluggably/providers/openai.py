"""OpenAI Chat Completions, and every endpoint that copies it (presets: OpenRouter, Groq, Together,
Mistral, DeepSeek, Fireworks, the Hugging Face router, Ollama, vLLM, LM Studio, llama.cpp).

Wire notes the adapter relies on (checked against the official SDK through the stand-in):
usage on streams only with `stream_options.include_usage`, in a last chunk whose `choices` is
empty (every other chunk then carries `usage: null`); tool-call arguments arrive in fragments,
the first fragment of a call carrying its id and name; a stream ends with `data: [DONE]`, and a
stream without it is a failure, not a success; errors inside a stream arrive as an `error` chunk
under HTTP 200; a forced named tool call ends with finish_reason `stop`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
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
from pluggably.providers.config import OpenAIConfig
from pluggably.providers.presets import PRESETS, Preset

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}

# Listed ids that are not chat models (OpenAI lists embeddings, audio and image models too).
_NOT_CHAT = (
    "embedding",
    "embed",
    "tts",
    "whisper",
    "dall-e",
    "moderation",
    "davinci",
    "babbage",
    "transcribe",
    "realtime",
    "audio",
    "image",
    "sora",
    "search",
    "rerank",
)

# What OpenAI's own model families take; first matching prefix wins.
_REASONING = ("max_tokens", "seed")
_OPENAI_MODELS: tuple[tuple[str, Capabilities, int, tuple[str, ...] | None], ...] = (
    (
        "gpt-5-chat",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=16384
        ),
        128000,
        None,
    ),
    (
        "gpt-5",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=128000
        ),
        400000,
        _REASONING,
    ),
    (
        "gpt-4.1",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=32768
        ),
        1047576,
        None,
    ),
    (
        "gpt-4o",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=16384
        ),
        128000,
        None,
    ),
    (
        "gpt-4-turbo",
        Capabilities(tools=True, vision=True, json_object=True, max_output_tokens=4096),
        128000,
        None,
    ),
    ("gpt-4", Capabilities(tools=True, max_output_tokens=8192), 8192, None),
    (
        "gpt-3.5-turbo",
        Capabilities(tools=True, json_object=True, max_output_tokens=4096),
        16385,
        None,
    ),
    ("o1-mini", Capabilities(max_output_tokens=65536), 128000, _REASONING),
    (
        "o1",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=100000
        ),
        200000,
        _REASONING,
    ),
    (
        "o3",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=100000
        ),
        200000,
        _REASONING,
    ),
    (
        "o4",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=100000
        ),
        200000,
        _REASONING,
    ),
)

# The typed request fields' keys: provider_options may not set them.
_RESERVED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "random_seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "repeat_penalty",
        "tools",
        "tool_choice",
        "response_format",
        "n",
    }
)


class OpenAIBackend(HostedBackend):
    RESERVED_OPTIONS = _RESERVED

    def __init__(self, provider: str, config: OpenAIConfig) -> None:
        # A provider named after a preset gets it (also `openai:` with its own base_url, e.g. a
        # proxy in front of OpenAI), unless its section names another.
        name = config.preset or (provider if provider in PRESETS else config.preset_name())
        self.preset: Preset = PRESETS[name]
        preset = self.preset
        self.max_tokens_field = config.max_tokens_field or preset.max_tokens_field
        self.stream_usage = (
            preset.stream_usage if config.stream_usage is None else config.stream_usage
        )
        self.supported = tuple(
            config.supported_parameters
            if config.supported_parameters is not None
            else preset.supported_parameters
        )
        self.default_caps = config.default_capabilities.apply(preset.default_capabilities)
        self.is_openai = preset.name == "openai"
        requires_key = preset.requires_key if config.requires_key is None else config.requires_key
        if config.api_key is not None or config.api_key_env is not None:
            requires_key = True if config.requires_key is None else config.requires_key
        super().__init__(
            provider,
            config,
            base_url=preset.base_url,
            key_env=preset.api_key_env,
            requires_key=requires_key,
        )

    # ---- models --------------------------------------------------------------------------

    def _family(self, name: str) -> tuple[Capabilities, int, tuple[str, ...] | None] | None:
        if not self.is_openai:
            return None
        base = name.removeprefix("ft:")
        for prefix, caps, context, params in _OPENAI_MODELS:
            if base.startswith(prefix):
                return caps, context, params
        return None

    def traits(self, name: str) -> ModelTraits:
        family = self._family(name)
        if family is None:
            return ModelTraits(self.default_caps)
        caps, context, _ = family
        return ModelTraits(caps, context)

    def supported_parameters(self, model: ModelInfo) -> Iterable[str]:
        family = self._family(model.name)
        if family is not None and family[2] is not None:
            return family[2]
        return ("max_tokens", *self.supported)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def fetch_models(self) -> list[ModelInfo]:
        body = await self.get_json("/models")
        entries = body if isinstance(body, list) else body.get("data")  # Together: a bare array
        models = []
        for entry in entries or ():
            name = entry.get("id") if isinstance(entry, dict) else None
            if (
                not isinstance(name, str)
                or not name
                or any(word in name.lower() for word in _NOT_CHAT)
            ):
                continue
            context = (
                entry.get("context_length") or entry.get("max_model_len") or 0
            )  # OpenRouter, vLLM
            models.append(
                self.model_info(
                    name,
                    context_length=context if isinstance(context, int) else 0,
                    description=str(entry.get("name") or entry.get("description") or "")[:200],
                )
            )
        return models

    # ---- requests ------------------------------------------------------------------------

    def build_request(
        self, request: GenerationRequest, model: ModelInfo, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        self._check_preset_limits(request, model)
        body: dict[str, Any] = {"model": model.name, "messages": self._messages(request)}
        if stream:
            body["stream"] = True
            if self.stream_usage:
                body["stream_options"] = {"include_usage": True}
        text = request.text
        max_tokens = text.max_tokens or self.default_max_tokens(model)
        if max_tokens is not None:
            body[self.max_tokens_field] = max_tokens
        names = self.preset.parameter_names
        for short in (
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(text, short)
            if value is not None:
                body[names.get(short, short)] = value
        if text.stop:
            body["stop"] = list(text.stop)
        if request.tools:
            body["tools"] = [_tool(t) for t in request.tools]
            choice = request.tool_choice
            if choice is not None:
                body["tool_choice"] = (
                    {"type": "function", "function": {"name": choice.function}}
                    if choice.mode is ToolChoiceMode.FUNCTION
                    else choice.mode.value
                )
        fmt = text.response_format
        if fmt is not None:
            if fmt.type is ResponseFormatType.JSON_OBJECT:
                body["response_format"] = {"type": "json_object"}
            elif fmt.type is ResponseFormatType.JSON_SCHEMA:
                schema: dict[str, Any] = {
                    "name": fmt.name,
                    "schema": fmt.schema or {},
                    "strict": fmt.strict,
                }
                if fmt.description:
                    schema["description"] = fmt.description
                body["response_format"] = {"type": "json_schema", "json_schema": schema}
        return "/chat/completions", body

    def _messages(self, request: GenerationRequest) -> list[dict[str, Any]]:
        if not request.is_chat:
            return [{"role": "user", "content": request.prompt or ""}]
        messages = [_message(m) for m in request.messages]
        if not self.preset.message_names:
            for message in messages:
                message.pop("name", None)
        return messages

    def _check_preset_limits(self, request: GenerationRequest, model: ModelInfo) -> None:
        """Rejects what this endpoint would silently ignore (see Preset)."""
        violations = []
        choice = request.tool_choice
        if (
            choice is not None
            and choice.mode is not ToolChoiceMode.AUTO
            and not self.preset.tool_choice
        ):
            violations.append(
                FieldViolation(
                    "tool_choice",
                    f"{self.preset.title} ignores tool_choice, so {model.id!r} cannot honour it",
                )
            )
        if not self.preset.image_urls:
            for i, message in enumerate(request.messages):
                for j, part in enumerate(message.parts):
                    if isinstance(part, ImagePart) and part.url:
                        violations.append(
                            FieldViolation(
                                f"messages[{i}].parts[{j}].image.url",
                                f"{self.preset.title} takes inline images only: send the bytes (data)",
                            )
                        )
        if violations:
            raise InvalidArgument(violations)

    # ---- responses -----------------------------------------------------------------------

    def decode_response(self, body: Any, request: GenerationRequest) -> list[Chunk]:
        if isinstance(body, dict) and body.get("error"):
            raise self.failure(
                self._error_from(200, body["error"], ""), f"{self.provider}/{request.model}"
            )
        choice = body["choices"][0]
        message = choice.get("message") or {}
        chunks: list[Chunk] = []
        text = message.get("content") or ""
        refusal = message.get("refusal") or ""
        if text or refusal:
            chunks.append(TextChunk(text or refusal))
        calls = message.get("tool_calls") or ()
        for index, call in enumerate(calls):
            fn = call.get("function") or {}
            chunks.append(
                ToolCallChunk(
                    index,
                    id=call.get("id") or f"call_{index}",
                    name=fn.get("name") or "",
                    arguments=fn.get("arguments") or "",
                )
            )
        finish = _finish(choice.get("finish_reason"), bool(calls), bool(refusal))
        if finish is None:
            raise bad_response(
                self.provider, f"{self.provider}/{request.model}", "no finish_reason"
            )
        chunks.append(
            DoneChunk(finish, _usage(body.get("usage")), model_version=body.get("model") or "")
        )
        return chunks

    def stream_decoder(self, request: GenerationRequest) -> _StreamDecoder:
        return _StreamDecoder(self, f"{self.provider}/{request.model}")

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            data = {}
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, str):  # some compatible servers: {"error": "message"}
            error = {"message": error}
        if not isinstance(error, dict):
            message = data.get("message") or data.get("detail") if isinstance(data, dict) else ""
            error = {
                "message": message
                if isinstance(message, str)
                else body[:200].decode("utf-8", "replace")
            }
        return self._error_from(status, error, headers.get("x-request-id", ""))

    def _error_from(self, status: int, error: dict[str, Any], request_id: str) -> UpstreamError:
        code = str(error.get("code") or "").lower()
        kind_ = str(error.get("type") or "").lower()
        kind = ""
        if code == "context_length_exceeded" or "context_length" in code:
            kind = "context_length"
        elif code in ("content_filter", "content_policy_violation") or kind_ == "content_filter":
            kind = "content_filter"
        elif code == "insufficient_quota" or kind_ == "insufficient_quota":
            kind = "quota"
        elif status == 200:  # an error chunk inside a stream: classify by its type
            kind = {
                "rate_limit_exceeded": "rate_limit",
                "requests": "rate_limit",
                "tokens": "rate_limit",
                "invalid_request_error": "",
                "server_error": "overloaded",
            }.get(code or kind_, "overloaded")
        return UpstreamError(
            status=status,
            message=str(error.get("message") or ""),
            type=code or kind_,
            param=str(error.get("param") or ""),
            request_id=request_id,
            kind=kind,
        )


class _StreamDecoder:
    def __init__(self, backend: OpenAIBackend, model_id: str) -> None:
        self._backend = backend
        self._model_id = model_id
        self._finish: str | None = None
        self._usage: Any = None
        self._model = ""
        self._calls: set[int] = set()
        self._refusal = False
        self._done = False

    def feed(self, event: SSEEvent) -> list[Chunk]:
        data = event.data
        if data == b"[DONE]":
            return self._end()
        if self._done:
            return []
        obj = orjson.loads(data)
        if obj.get("error"):
            raise self._backend.failure(
                self._backend._error_from(200, obj["error"], ""), self._model_id
            )
        if obj.get("model"):
            self._model = obj["model"]
        if obj.get("usage"):
            self._usage = obj["usage"]
        out: list[Chunk] = []
        for choice in obj.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                out.append(TextChunk(content))
            refusal = delta.get("refusal")
            if refusal:
                self._refusal = True
                out.append(TextChunk(refusal))
            for call in delta.get("tool_calls") or ():
                index = call.get("index", 0)
                fn = call.get("function") or {}
                first = index not in self._calls
                self._calls.add(index)
                out.append(
                    ToolCallChunk(
                        index,
                        id=call.get("id") or (f"call_{index}" if first else ""),
                        name=fn.get("name") or "",
                        arguments=fn.get("arguments") or "",
                    )
                )
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def _end(self) -> list[Chunk]:
        if self._done:
            return []
        self._done = True
        finish = _finish(self._finish, bool(self._calls), self._refusal)
        if finish is None:
            raise bad_response(
                self._backend.provider, self._model_id, "the stream ended without a finish_reason"
            )
        return [DoneChunk(finish, _usage(self._usage), model_version=self._model)]

    def finish(self) -> list[Chunk]:
        if not self._done:
            raise bad_response(
                self._backend.provider,
                self._model_id,
                "the stream ended without its end marker ([DONE])",
            )
        return []


def _finish(reason: str | None, has_calls: bool, refused: bool) -> FinishReason | None:
    if reason is None:
        return None
    finish = _FINISH.get(reason, FinishReason.STOP)
    if has_calls and finish is FinishReason.STOP:
        finish = FinishReason.TOOL_CALLS  # a forced named tool call ends with "stop"
    if refused and finish is FinishReason.STOP:
        finish = FinishReason.CONTENT_FILTER
    return finish


def _usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_prompt_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def _tool(tool: Any) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = (
        tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
    )
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        out["content"] = message.text()
        return out
    parts = message.content_parts()
    if any(isinstance(p, ImagePart) for p in parts):
        out["content"] = [_part(p) for p in parts]
    else:
        out["content"] = "".join(p.text for p in parts if isinstance(p, TextPart))
    if message.role == "assistant" and message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
        if not out["content"]:
            out["content"] = None
    if message.name and message.role in ("system", "user", "assistant"):
        out["name"] = message.name
    return out


def _part(part: TextPart | ImagePart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    url = part.url or f"data:{part.mime_type};base64,{base64.b64encode(part.data).decode()}"
    image: dict[str, Any] = {"url": url}
    if part.detail:
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


def build(provider: str, section: OpenAIConfig) -> OpenAIBackend:
    return OpenAIBackend(provider, section)
