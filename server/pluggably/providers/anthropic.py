"""Anthropic Messages API.

Wire notes the adapter relies on (checked against the official SDK through the stand-in): the
system prompt is a top-level field, not a role; `max_tokens` is required; tool results are
`tool_result` blocks in the next user turn, and consecutive turns of one role are merged;
`temperature` is capped at 1; input tokens are reported only in `message_start` (plus cache
reads and writes, which `input_tokens` excludes); `message_delta.usage.output_tokens` is a
running total (take the last, never add); `ping` events and unknown event types are ignored;
errors inside a stream arrive as an `error` event under HTTP 200; a stream without
`message_stop` is a failure.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

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
from pluggably.providers.config import AnthropicConfig

BASE_URL = "https://api.anthropic.com/v1"
KEY_ENV = "ANTHROPIC_API_KEY"

_FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "pause_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}
_ERROR_KINDS = {
    "rate_limit_error": "rate_limit",
    "overloaded_error": "overloaded",
    "api_error": "overloaded",
    "timeout_error": "overloaded",
    "authentication_error": "auth",
    "permission_error": "auth",
    "billing_error": "quota",
}
_CLAUDE_4 = Capabilities(tools=True, vision=True, json_object=True, json_schema=True)
_CLAUDE_3 = Capabilities(tools=True, vision=True)
# Families by id prefix: (capabilities, max output tokens). Every current Claude has 200k context.
_MODELS: tuple[tuple[str, Capabilities, int], ...] = (
    ("claude-opus-4", _CLAUDE_4, 32000),
    ("claude-sonnet-4", _CLAUDE_4, 64000),
    ("claude-haiku-4", _CLAUDE_4, 64000),
    ("claude-3-7-sonnet", _CLAUDE_3, 64000),
    ("claude-3-5", _CLAUDE_3, 8192),
    ("claude-3", _CLAUDE_3, 4096),
)
# Text-completion-era ids the Messages API cannot serve.
_NOT_MESSAGES = ("claude-instant", "claude-1", "claude-2")
_RESERVED = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "tools",
        "tool_choice",
        "output_config",
    }
)


class AnthropicBackend(HostedBackend):
    SUPPORTED_PARAMETERS = ("temperature", "top_p", "top_k", "stop")
    PARAMETER_RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "temperature": (None, 1.0)
    }
    RESERVED_OPTIONS = _RESERVED

    def __init__(self, provider: str, config: AnthropicConfig) -> None:
        self.version = config.version
        self.kind_config = config
        self.default_caps = config.default_capabilities.apply(Capabilities(tools=True, vision=True))
        super().__init__(provider, config, base_url=BASE_URL, key_env=KEY_ENV, requires_key=True)

    def auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.version}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    # ---- models --------------------------------------------------------------------------

    def traits(self, name: str) -> ModelTraits:
        for prefix, caps, max_output in _MODELS:
            if name.startswith(prefix):
                return ModelTraits(
                    Capabilities(**{**caps.__dict__, "max_output_tokens": max_output}), 200000
                )
        return ModelTraits(self.default_caps, 0)

    def default_max_tokens(self, model: ModelInfo) -> int | None:
        configured = super().default_max_tokens(model)
        if configured:
            return configured
        limit = model.capabilities.max_output_tokens
        fallback = self.kind_config.default_max_tokens
        return min(fallback, limit) if limit else fallback

    async def fetch_models(self) -> list[ModelInfo]:
        models: list[ModelInfo] = []
        params = {"limit": "1000"}
        for _ in range(100):  # pages; a bound against a server that never says has_more=false
            body = await self.get_json("/models", params)
            for entry in body.get("data") or ():
                name = entry.get("id") if isinstance(entry, dict) else None
                if (
                    not isinstance(name, str)
                    or name.startswith(_NOT_MESSAGES)
                    or entry.get("lifecycle") == "retired"
                ):
                    continue
                models.append(
                    self.model_info(
                        name,
                        description=str(entry.get("display_name") or ""),
                        context_length=_int(entry.get("max_input_tokens")),
                        max_output_tokens=_int(entry.get("max_tokens")),
                    )
                )
            if not body.get("has_more") or not body.get("last_id"):
                break
            params = {"limit": "1000", "after_id": str(body["last_id"])}
        return models

    # ---- requests ------------------------------------------------------------------------

    def build_request(
        self, request: GenerationRequest, model: ModelInfo, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        text = request.text
        body: dict[str, Any] = {
            "model": model.name,
            "max_tokens": text.max_tokens or self.default_max_tokens(model),
        }
        system, messages = _conversation(request)
        body["messages"] = messages
        if system:
            body["system"] = system
        if stream:
            body["stream"] = True
        for short in ("temperature", "top_p", "top_k"):
            value = getattr(text, short)
            if value is not None:
                body[short] = value
        if text.stop:
            body["stop_sequences"] = list(text.stop)
        if request.tools:
            body["tools"] = [
                {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    "input_schema": t.parameters or {"type": "object", "properties": {}},
                }
                for t in request.tools
            ]
            choice = request.tool_choice
            if choice is not None:
                body["tool_choice"] = {
                    ToolChoiceMode.AUTO: {"type": "auto"},
                    ToolChoiceMode.NONE: {"type": "none"},
                    ToolChoiceMode.REQUIRED: {"type": "any"},
                    ToolChoiceMode.FUNCTION: {"type": "tool", "name": choice.function},
                }[choice.mode]
        fmt = text.response_format
        if fmt is not None and fmt.type is not ResponseFormatType.TEXT:
            schema = (
                fmt.schema if fmt.type is ResponseFormatType.JSON_SCHEMA else {"type": "object"}
            )
            body["output_config"] = {
                "format": {"type": "json_schema", "schema": schema or {"type": "object"}}
            }
        return "/messages", body

    # ---- responses -----------------------------------------------------------------------

    def decode_response(self, body: Any, request: GenerationRequest) -> list[Chunk]:
        if body.get("type") == "error":
            raise self.failure(
                self._error_from(200, body.get("error") or {}, ""),
                f"{self.provider}/{request.model}",
            )
        chunks: list[Chunk] = []
        calls = 0
        for block in body.get("content") or ():
            kind = block.get("type")
            if kind == "text" and block.get("text"):
                chunks.append(TextChunk(block["text"]))
            elif kind == "tool_use":
                chunks.append(
                    ToolCallChunk(
                        calls,
                        id=block.get("id") or f"toolu_{calls}",
                        name=block.get("name") or "",
                        arguments=orjson.dumps(block.get("input") or {}).decode(),
                    )
                )
                calls += 1
        reason = body.get("stop_reason")
        if reason is None:
            raise bad_response(self.provider, f"{self.provider}/{request.model}", "no stop_reason")
        chunks.append(
            DoneChunk(
                _FINISH.get(reason, FinishReason.STOP),
                _usage(body.get("usage") or {}, None),
                stop_sequence=body.get("stop_sequence") or "",
                model_version=body.get("model") or "",
            )
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
        if not isinstance(error, dict):
            error = {"message": body[:200].decode("utf-8", "replace")}
        request_id = headers.get("request-id", "") or (
            data.get("request_id") or "" if isinstance(data, dict) else ""
        )
        return self._error_from(status, error, request_id)

    def _error_from(self, status: int, error: dict[str, Any], request_id: str) -> UpstreamError:
        kind_name = str(error.get("type") or "")
        kind = _ERROR_KINDS.get(kind_name, "")
        if status == 200 and not kind and kind_name != "invalid_request_error":
            kind = "overloaded"  # an unknown error event mid-stream: the provider's fault
        return UpstreamError(
            status=status,
            message=str(error.get("message") or ""),
            type=kind_name,
            request_id=str(request_id),
            kind=kind,
        )


class _StreamDecoder:
    def __init__(self, backend: AnthropicBackend, model_id: str) -> None:
        self._backend = backend
        self._model_id = model_id
        self._start_usage: dict[str, Any] = {}
        self._delta_usage: dict[str, Any] | None = None
        self._reason: str | None = None
        self._stop_sequence = ""
        self._model = ""
        self._tool_index: dict[int, int] = {}  # content block index -> tool call index
        self._done = False

    def feed(self, event: SSEEvent) -> list[Chunk]:
        name = event.event
        if name == "ping" or self._done:
            return []
        data = orjson.loads(event.data)
        kind = name or data.get("type", "")
        if kind == "content_block_delta":
            delta = data["delta"]
            if delta.get("type") == "text_delta":
                return [TextChunk(delta["text"])] if delta.get("text") else []
            if delta.get("type") == "input_json_delta":
                index = self._tool_index.get(data.get("index", -1))
                if index is not None and delta.get("partial_json"):
                    return [ToolCallChunk(index, arguments=delta["partial_json"])]
            return []  # thinking, signature and citation deltas carry no output text
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = len(self._tool_index)
                self._tool_index[data.get("index", index)] = index
                out: list[Chunk] = [
                    ToolCallChunk(
                        index, id=block.get("id") or f"toolu_{index}", name=block.get("name") or ""
                    )
                ]
                if block.get("input"):  # a server that sends the input whole, not as deltas
                    out.append(
                        ToolCallChunk(index, arguments=orjson.dumps(block["input"]).decode())
                    )
                return out
            if block.get("type") == "text" and block.get("text"):
                return [TextChunk(block["text"])]
            return []
        if kind == "message_start":
            message = data.get("message") or {}
            self._start_usage = message.get("usage") or {}
            self._model = message.get("model") or ""
            return []
        if kind == "message_delta":
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                self._reason = delta["stop_reason"]
                self._stop_sequence = delta.get("stop_sequence") or ""
            if data.get("usage"):
                self._delta_usage = data["usage"]  # cumulative: the last one wins
            return []
        if kind == "message_stop":
            self._done = True
            if self._reason is None:
                raise bad_response(
                    self._backend.provider, self._model_id, "the stream ended without a stop_reason"
                )
            return [
                DoneChunk(
                    _FINISH.get(self._reason, FinishReason.STOP),
                    _usage(self._start_usage, self._delta_usage),
                    stop_sequence=self._stop_sequence,
                    model_version=self._model,
                )
            ]
        if kind == "error":
            raise self._backend.failure(
                self._backend._error_from(200, data.get("error") or {}, ""), self._model_id
            )
        return []  # content_block_stop and event types added later

    def finish(self) -> list[Chunk]:
        if not self._done:
            raise bad_response(
                self._backend.provider,
                self._model_id,
                "the stream ended without its end marker (message_stop)",
            )
        return []


def _usage(start: dict[str, Any], delta: dict[str, Any] | None) -> Usage:
    """Input tokens from message_start (cache reads and writes come on top of `input_tokens`),
    output tokens from the last message_delta."""
    merged = {**start, **(delta or {})}
    cache_read = _int(merged.get("cache_read_input_tokens"))
    prompt = (
        _int(merged.get("input_tokens"))
        + cache_read
        + _int(merged.get("cache_creation_input_tokens"))
    )
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=_int(merged.get("output_tokens")),
        cached_prompt_tokens=cache_read,
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _conversation(request: GenerationRequest) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, messages): system messages move to the top-level prompt, tool results into
    user turns, and consecutive turns of one role merge (the API wants them alternating)."""
    if not request.is_chat:
        return "", [{"role": "user", "content": [{"type": "text", "text": request.prompt or ""}]}]
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role == "system":
            system.append(message.text())
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(s for s in system if s), turns


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    if message.role == "tool":
        return [
            {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id,
                "content": message.text() or "(empty)",
            }
        ]
    blocks = [
        _block(p) for p in message.content_parts() if not (isinstance(p, TextPart) and not p.text)
    ]
    for call in message.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.name,
                "input": orjson.loads(call.arguments or "{}"),
            }
        )
    return blocks


def _block(part: TextPart | ImagePart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if part.url:
        return {"type": "image", "source": {"type": "url", "url": part.url}}
    return {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": part.mime_type,
            "data": base64.b64encode(part.data).decode(),
        },
    }


def build(provider: str, section: AnthropicConfig) -> AnthropicBackend:
    return AnthropicBackend(provider, section)
