"""Stand-in for Anthropic's Messages API: `POST /v1/messages` (unary and SSE),
`POST /v1/messages/count_tokens`, `GET /v1/models` (cursor pages) and `GET /v1/models/{id}`.

It answers the way the real API does on the wire: `x-api-key` or `Authorization: Bearer` auth,
a required `anthropic-version` header, the request rules the real API enforces (required
`max_tokens`, no `system` role, tool_use/tool_result pairing, temperature capped at 1, image
media types checked against the bytes, context window), error bodies
`{"type": "error", "error": {"type", "message"}, "request_id"}`, a `request-id` header on every
response, and streams framed as named events with `ping`s, tool input streamed as
`input_json_delta` fragments, a running `output_tokens` total in `message_delta` and
`message_stop` as the terminator.

Scripted `Reply` fields mean, for this provider: `finish_reason` is the `stop_reason`
(`end_turn`, `max_tokens`, `stop_sequence`, `tool_use`, `refusal`, ...); `text` and
`tool_calls` together give a text block followed by tool_use blocks; `chunks` is the number of
`text_delta` events; `model` is the model the response reports.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson
from aiohttp import web

from pluggably.devtools.standins._base import (
    JSON_BODY,
    Fault,
    Reply,
    SSEWriter,
    StandIn,
    count_tokens,
    echo_text,
    last_user_text,
    sample_from_schema,
    sniff_image,
    split_text,
    words,
)

__all__ = [
    "ANTHROPIC_VERSIONS",
    "DEFAULT_MODELS",
    "AnthropicStandIn",
    "sample_from_schema",
]

ANTHROPIC_VERSIONS = frozenset({"2023-01-01", "2023-06-01", "2026-10-21"})
"""`anthropic-version` values accepted: the documented ones and the one SDK 2.14 sends."""

DEFAULT_MODELS: tuple[dict[str, Any], ...] = (
    {
        "id": "claude-sonnet-4-6",
        "display_name": "Claude Sonnet 4.6",
        "created_at": "2026-02-17T00:00:00Z",
        "context_window": 200_000,
        "max_output_tokens": 64_000,
    },
    {
        "id": "claude-opus-4-6",
        "display_name": "Claude Opus 4.6",
        "created_at": "2026-02-05T00:00:00Z",
        "context_window": 200_000,
        "max_output_tokens": 128_000,
    },
    {
        "id": "claude-haiku-4-5-20251001",
        "display_name": "Claude Haiku 4.5",
        "created_at": "2025-10-01T00:00:00Z",
        "context_window": 200_000,
        "max_output_tokens": 64_000,
        "aliases": ["claude-haiku-4-5"],
    },
    # Deprecated but still callable (lifecycle is not a reason to hide a model).
    {
        "id": "claude-sonnet-4-5-20250929",
        "display_name": "Claude Sonnet 4.5",
        "created_at": "2025-09-29T00:00:00Z",
        "context_window": 200_000,
        "max_output_tokens": 64_000,
        "aliases": ["claude-sonnet-4-5"],
        "lifecycle": "deprecated",
    },
    # A tiny window so tests can provoke the context-length errors with a few words.
    {
        "id": "claude-standin-tiny",
        "display_name": "Stand-in Tiny (64-token window)",
        "created_at": "2024-01-01T00:00:00Z",
        "context_window": 64,
        "max_output_tokens": 32,
    },
    # A legacy Text Completions model: listed, but /v1/messages rejects it, so a gateway must
    # leave it out of its catalogue (the listing has no flag for it: go by the id).
    {
        "id": "claude-instant-1.2",
        "display_name": "Claude Instant 1.2",
        "created_at": "2023-08-09T00:00:00Z",
        "context_window": 100_000,
        "max_output_tokens": 4_096,
        "lifecycle": "deprecated",
        "messages": False,
    },
    # Retired: listed only when `lifecycle=retired` is asked for; requests naming it get 404.
    {
        "id": "claude-2.1",
        "display_name": "Claude 2.1",
        "created_at": "2023-11-21T00:00:00Z",
        "context_window": 200_000,
        "max_output_tokens": 4_096,
        "lifecycle": "retired",
    },
)
"""The default `AnthropicStandIn.models`. Keys: `id`, `display_name`, `created_at` (RFC 3339),
`context_window`, `max_output_tokens`, optional `aliases` (request names that resolve to `id`),
`lifecycle` (`active` by default) and `messages` (False: listed but rejected by /v1/messages)."""

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_STREAM_ERROR_MESSAGES = {
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
    "rate_limit_error": "Rate limited",
}

_MESSAGES_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "service_tier",
        "cache_control",
        "container",
        "diagnostics",
        "inference_geo",
        "speed",
    }
)
_COUNT_TOKENS_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "cache_control",
    }
)
_MESSAGE_KEYS = frozenset({"role", "content"})
_BLOCK_KEYS = {
    "text": frozenset({"type", "text", "cache_control", "citations"}),
    "image": frozenset({"type", "source", "cache_control"}),
    "tool_use": frozenset({"type", "id", "name", "input", "cache_control", "caller"}),
    "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"}),
    "thinking": frozenset({"type", "thinking", "signature"}),
    "redacted_thinking": frozenset({"type", "data"}),
}
_TOOL_KEYS = frozenset(
    {"type", "name", "description", "input_schema", "cache_control", "strict", "input_examples"}
)
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_MAX_IMAGE_BYTES = 5 * 1024 * 1024
_TOKENS_PER_IMAGE = 85


class _Rejection(Exception):
    """A request the real API refuses: answered with its status and error body."""

    def __init__(self, message: str, status: int = 400, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type


@dataclass
class _MessagesRequest:
    """What the stand-in needs from a validated Messages request."""

    model: dict[str, Any]
    max_tokens: int
    stream: bool
    input_tokens: int
    user_texts: list[str]
    images: int
    tool_result_text: str | None  # set when the conversation ends with a tool result
    tools: list[dict[str, Any]]
    tool_choice: dict[str, Any] | None
    json_schema: dict[str, Any] | None
    stop_sequences: list[str]


@dataclass
class _Outcome:
    """The message the stand-in answers with, before it is framed unary or as a stream."""

    model: str
    blocks: list[dict[str, Any]]
    stop_reason: str
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int
    chunks: int | None
    id: str = ""
    stop_details: dict[str, Any] | None = field(default=None)


def _json_fragments(text: str) -> list[str]:
    """Tool input as the real API streams it: an empty first fragment, then at least three
    pieces cut anywhere (mid-key, mid-string), so a client must buffer until the block stops."""
    count = max(3, math.ceil(len(text) / 12))
    size = max(1, math.ceil(len(text) / count))
    return [""] + [text[i : i + size] for i in range(0, len(text), size)]


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _extra_keys(data: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise _Rejection(f"{where}{key}: Extra inputs are not permitted")


class _AnthropicSSEWriter(SSEWriter):
    """SSEWriter whose malformed chunk carries an `event:` line.

    Anthropic's SDK (and any client following it) skips SSE events that have no `event:` name,
    so the base writer's bare broken `data:` line would pass unnoticed; a real truncated event
    arrives under its event name, where the JSON decoder does choke on it.
    """

    async def _before_event(self) -> None:
        fault = self.fault
        if (
            fault is not None
            and fault.kind == "malformed_chunk"
            and self.events == fault.after_chunks
        ):
            self.fault = None
            nl = self.newline
            await self._write(
                b"event: content_block_delta"
                + nl
                + b'data: {"type": "content_block_delta", "index": 0, "delta": {"ty'
                + nl
                + nl
            )
            return
        await super()._before_event()


class AnthropicStandIn(StandIn):
    """Anthropic Messages API stand-in.

    `models` is a list of dicts (see `DEFAULT_MODELS`); `versions` the accepted
    `anthropic-version` values; `max_request_bytes` the body size above which the API answers
    413 `request_too_large`. With `api_key=None` any credentials (or none) are accepted.
    """

    provider = "anthropic"

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        chunk_delay_s: float = 0.0,
        models: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(api_key=api_key, chunk_delay_s=chunk_delay_s)
        self.models: list[dict[str, Any]] = [dict(m) for m in (models or DEFAULT_MODELS)]
        self.versions: set[str] = set(ANTHROPIC_VERSIONS)
        self.max_request_bytes = 32 * 1024 * 1024

    # ---- wiring ----------------------------------------------------------------------

    def routes(self) -> Iterable[web.RouteDef]:
        return [
            web.post("/v1/messages", self._messages),
            web.post("/v1/messages/count_tokens", self._count_tokens),
            web.get("/v1/models", self._list_models),
            web.get("/v1/models/{model_id}", self._get_model),
            # The real API answers unknown paths with its JSON error body, not a text 404.
            web.route("*", "/{tail:.*}", self._unknown_path),
        ]

    def build_app(self) -> web.Application:
        app = super().build_app()
        app.on_response_prepare.append(self._stamp_request_id)
        return app

    async def _stamp_request_id(self, request: web.Request, response: web.StreamResponse) -> None:
        # Every real response carries one; error responses already set theirs to match the body.
        if "request-id" not in response.headers:
            response.headers["request-id"] = self.new_id("req_")

    def error_response(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        retry_after: float | None = None,
    ) -> web.Response:
        """The real error body, with a `request-id` header matching its `request_id`."""
        request_id = self.new_id("req_")
        kind = error_type or _ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        headers = {"request-id": request_id}
        if retry_after is not None:
            headers["retry-after"] = (
                str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)
            )
        return self.json_response(
            {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": request_id,
            },
            status=status,
            headers=headers,
        )

    def stream_error_event(self, fault: Fault) -> bytes:
        """The in-stream `event: error` (HTTP status stays 200); `overloaded_error` by default."""
        kind = fault.error_type or "overloaded_error"
        message = fault.message or _STREAM_ERROR_MESSAGES.get(kind, "Internal server error")
        data = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
        return b"event: error\n" + b"data: " + data + b"\n\n"

    async def open_stream(self, request: web.Request, **kwargs: Any) -> SSEWriter:
        """The base stream, written by `_AnthropicSSEWriter` (see its docstring)."""
        writer = await super().open_stream(request, **kwargs)
        return _AnthropicSSEWriter(
            self,
            request,
            writer.response,
            crlf=writer.newline == b"\r\n",
            error_event=kwargs.get("error_event"),
        )

    # ---- checks every endpoint shares --------------------------------------------------

    def _check_headers(self, request: web.Request) -> web.Response | None:
        if self.api_key is not None:
            key = request.headers.get("x-api-key")
            authorization = request.headers.get("authorization", "")
            bearer = (
                authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
            )
            if key is None and bearer is None:
                return self.error_response(401, "x-api-key header is required")
            if self.api_key not in (key, bearer):
                return self.error_response(401, "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if version is None:
            return self.error_response(400, "anthropic-version: header is required")
        if version not in self.versions:
            return self.error_response(
                400, f'anthropic-version: "{version}" is not a valid version'
            )
        return None

    def _find_model(self, name: Any) -> dict[str, Any]:
        for model in self.models:
            if name == model["id"] or name in model.get("aliases", ()):
                if model.get("lifecycle") == "retired":
                    break
                return model
        raise _Rejection(f"model: {name}", 404)

    async def _unknown_path(self, request: web.Request) -> web.Response:
        return self.error_response(404, "Not Found")

    # ---- models ------------------------------------------------------------------------

    @staticmethod
    def _model_info(model: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "model",
            "id": model["id"],
            "display_name": model["display_name"],
            "created_at": model["created_at"],
            "lifecycle": model.get("lifecycle", "active"),
            "max_input_tokens": model["context_window"],
            "max_tokens": model["max_output_tokens"],
        }

    async def _list_models(self, request: web.Request) -> web.Response:
        if (denied := self._check_headers(request)) is not None:
            return denied
        query = request.query
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            return self.error_response(400, "limit: Input should be a valid integer")
        if not 1 <= limit <= 1000:
            return self.error_response(
                400,
                f"limit: Input should be {'greater' if limit < 1 else 'less'} than or equal"
                f" to {1 if limit < 1 else 1000}",
            )
        # The SDK sends arrays as `lifecycle[]=...`; plain repeated keys work too.
        wanted = query.getall("lifecycle[]", []) + query.getall("lifecycle", [])
        for stage in wanted:
            if stage not in ("active", "deprecated", "retired"):
                return self.error_response(
                    400, "lifecycle: Input should be 'active', 'deprecated' or 'retired'"
                )
        stages = set(wanted or ("active", "deprecated"))
        # Newest first, as the real listing orders them.
        visible = sorted(
            (m for m in self.models if m.get("lifecycle", "active") in stages),
            key=lambda m: m["created_at"],
            reverse=True,
        )
        ids = [m["id"] for m in visible]
        after, before = query.get("after_id"), query.get("before_id")
        if after and before:
            return self.error_response(400, "Only one of before_id or after_id may be given")
        for cursor_name, cursor in (("after_id", after), ("before_id", before)):
            if cursor and cursor not in ids:
                return self.error_response(400, f"{cursor_name}: unknown id {cursor}")
        if after:
            start = ids.index(after) + 1
            page = visible[start : start + limit]
            has_more = start + limit < len(visible)
        elif before:
            end = ids.index(before)
            page = visible[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            page = visible[:limit]
            has_more = limit < len(visible)
        return self.json_response(
            {
                "data": [self._model_info(m) for m in page],
                "has_more": has_more,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )

    async def _get_model(self, request: web.Request) -> web.Response:
        if (denied := self._check_headers(request)) is not None:
            return denied
        try:
            model = self._find_model(request.match_info["model_id"])
        except _Rejection as rejection:
            return self.error_response(rejection.status, rejection.message)
        return self.json_response(self._model_info(model))

    # ---- request validation ------------------------------------------------------------

    async def _parse(self, request: web.Request, *, count_only: bool = False) -> _MessagesRequest:
        # The body is already read (and cached) by the base middleware.
        if len(await request.read()) > self.max_request_bytes:
            raise _Rejection("Request exceeds the maximum allowed number of bytes.", 413)
        body = request[JSON_BODY]
        if not isinstance(body, dict):
            raise _Rejection(
                "There was an error parsing the body of your request. "
                "Please check that it is valid JSON."
            )
        _extra_keys(body, _COUNT_TOKENS_FIELDS if count_only else _MESSAGES_FIELDS, "")
        required = ("model", "messages") if count_only else ("model", "max_tokens", "messages")
        for name in required:
            if name not in body:
                raise _Rejection(f"{name}: Field required")
        if not isinstance(body["model"], str):
            raise _Rejection("model: Input should be a valid string")
        max_tokens = body.get("max_tokens", 0)
        if not count_only:
            if not _is_int(max_tokens):
                raise _Rejection("max_tokens: Input should be a valid integer")
            if max_tokens < 1:
                raise _Rejection("max_tokens: Input should be greater than or equal to 1")
        self._check_sampling(body)
        stop_sequences = body.get("stop_sequences") or []
        if not isinstance(stop_sequences, list) or not all(
            isinstance(s, str) for s in stop_sequences
        ):
            raise _Rejection("stop_sequences: Input should be a valid list of strings")
        if any(not s.strip() for s in stop_sequences):
            raise _Rejection("stop_sequences: each stop sequence must contain non-whitespace")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _Rejection("stream: Input should be a valid boolean")
        metadata = body.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise _Rejection("metadata: Input should be a valid dictionary")
            _extra_keys(metadata, ("user_id",), "metadata.")
            if metadata.get("user_id") is not None and not isinstance(metadata["user_id"], str):
                raise _Rejection("metadata.user_id: Input should be a valid string")

        texts = self._system_texts(body.get("system"))
        images, user_texts, tool_result_text = self._check_messages(body["messages"], texts)
        tools = self._check_tools(body.get("tools"))
        tool_choice = self._check_tool_choice(body.get("tool_choice"), tools)
        json_schema = self._check_output_config(body.get("output_config"))
        self._check_thinking(body.get("thinking"), max_tokens, count_only)

        model = self._find_model(body["model"])
        if model.get("messages", True) is False:
            raise _Rejection(
                f"model: {model['id']} is a legacy Text Completions model and is "
                "not supported by the Messages API"
            )
        input_tokens = sum(count_tokens(t) for t in texts) + _TOKENS_PER_IMAGE * images
        window = model["context_window"]
        if not count_only:
            if max_tokens > model["max_output_tokens"]:
                raise _Rejection(
                    f"max_tokens: {max_tokens} > {model['max_output_tokens']}, which is the "
                    f"maximum allowed number of output tokens for {model['id']}"
                )
            if input_tokens > window:
                raise _Rejection(f"prompt is too long: {input_tokens} tokens > {window} maximum")
            if input_tokens + max_tokens > window:
                raise _Rejection(
                    f"input length and `max_tokens` exceed context limit: {input_tokens} + "
                    f"{max_tokens} > {window}, decrease input length or `max_tokens` and try again"
                )
        return _MessagesRequest(
            model=model,
            max_tokens=max_tokens,
            stream=stream,
            input_tokens=input_tokens,
            user_texts=user_texts,
            images=images,
            tool_result_text=tool_result_text,
            tools=tools,
            tool_choice=tool_choice,
            json_schema=json_schema,
            stop_sequences=stop_sequences,
        )

    @staticmethod
    def _check_sampling(body: dict[str, Any]) -> None:
        # The 2023-06-01 API caps temperature at 1 (other providers allow 2).
        for name, low, high in (("temperature", 0, 1), ("top_p", 0, 1)):
            if name in body:
                value = body[name]
                if not _is_number(value):
                    raise _Rejection(f"{name}: Input should be a valid number")
                if value < low:
                    raise _Rejection(f"{name}: Input should be greater than or equal to {low}")
                if value > high:
                    raise _Rejection(f"{name}: Input should be less than or equal to {high}")
        if "top_k" in body:
            if not _is_int(body["top_k"]):
                raise _Rejection("top_k: Input should be a valid integer")
            if body["top_k"] < 0:
                raise _Rejection("top_k: Input should be greater than or equal to 0")

    @staticmethod
    def _system_texts(system: Any) -> list[str]:
        if system is None:
            return []
        if isinstance(system, str):
            return [system]
        if not isinstance(system, list):
            raise _Rejection("system: Input should be a valid string or a list of text blocks")
        texts = []
        for i, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise _Rejection(f"system.{i}.type: Input should be 'text'")
            _extra_keys(block, _BLOCK_KEYS["text"], f"system.{i}.")
            if not isinstance(block.get("text"), str):
                raise _Rejection(f"system.{i}.text: Field required")
            if not block["text"]:
                raise _Rejection("system: text content blocks must be non-empty")
            texts.append(block["text"])
        return texts

    def _check_messages(self, messages: Any, texts: list[str]) -> tuple[int, list[str], str | None]:
        """Validates `messages`, appending every input text to `texts`; returns the image count,
        the user texts and the last tool result's text when the conversation ends with one."""
        if not isinstance(messages, list):
            raise _Rejection("messages: Input should be a valid list")
        if not messages:
            raise _Rejection("messages: at least one message is required")
        images = 0
        user_texts: list[str] = []
        pending_tool_uses: list[str] = []  # ids the next message must answer
        pending_from = 0
        last_tool_result: str | None = None
        for i, message in enumerate(messages):
            where = f"messages.{i}"
            if not isinstance(message, dict):
                raise _Rejection(f"{where}: Input should be a valid dictionary")
            _extra_keys(message, _MESSAGE_KEYS, f"{where}.")
            role = message.get("role")
            if role == "system":
                raise _Rejection(
                    'messages: Unexpected role "system". The Messages API accepts a '
                    'top-level `system` parameter, not "system" as an input message '
                    "role."
                )
            if role not in ("user", "assistant"):
                raise _Rejection(f"{where}.role: Input should be 'user' or 'assistant'")
            if "content" not in message:
                raise _Rejection(f"{where}.content: Field required")
            content = message["content"]
            final_assistant = role == "assistant" and i == len(messages) - 1
            if isinstance(content, str):
                blocks: list[Any] = [{"type": "text", "text": content}] if content else []
            elif isinstance(content, list):
                blocks = content
            else:
                raise _Rejection(
                    f"{where}.content: Input should be a valid string or a list of content blocks"
                )
            if not blocks and not final_assistant:
                raise _Rejection(
                    f"{where}: all messages must have non-empty content except for "
                    "the optional final assistant message"
                )
            answered: set[str] = set()
            tool_uses: list[str] = []
            last_tool_result = None
            for j, block in enumerate(blocks):
                at = f"{where}.content.{j}"
                if not isinstance(block, dict):
                    raise _Rejection(f"{at}: Input should be a valid dictionary")
                kind = block.get("type")
                if kind not in _BLOCK_KEYS:
                    raise _Rejection(
                        f"{at}: Input tag '{kind}' found using 'type' does not match any of the "
                        "expected tags: 'text', 'image', 'tool_use', 'tool_result', 'thinking', "
                        "'redacted_thinking'"
                    )
                _extra_keys(block, _BLOCK_KEYS[kind], f"{at}.{kind}.")
                if kind == "text":
                    text = self._check_text(block, at, final_assistant)
                    if final_assistant and j == len(blocks) - 1 and text != text.rstrip():
                        # A prefill the model continues from must not end in whitespace.
                        raise _Rejection(
                            "messages: final assistant content cannot end with trailing whitespace"
                        )
                    texts.append(text)
                    if role == "user":
                        user_texts.append(text)
                elif kind == "image":
                    self._check_image(block, at)
                    images += 1
                elif kind == "tool_use":
                    if role != "assistant":
                        raise _Rejection(
                            f"{at}: `tool_use` blocks are only allowed in `assistant` messages"
                        )
                    self._check_tool_use(block, at)
                    tool_uses.append(block["id"])
                    texts.append(orjson.dumps(block["input"]).decode())
                elif kind == "tool_result":
                    if role != "user":
                        raise _Rejection(
                            f"{at}: `tool_result` blocks are only allowed in `user` messages"
                        )
                    tool_use_id = block.get("tool_use_id")
                    if not isinstance(tool_use_id, str):
                        raise _Rejection(f"{at}.tool_result.tool_use_id: Field required")
                    if tool_use_id not in pending_tool_uses:
                        raise _Rejection(
                            f"{at}: unexpected `tool_use_id` found in `tool_result` blocks: "
                            f"{tool_use_id}. Each `tool_result` block must have a corresponding "
                            "`tool_use` block in the previous message."
                        )
                    if "is_error" in block and not isinstance(block["is_error"], bool):
                        raise _Rejection(
                            f"{at}.tool_result.is_error: Input should be a valid boolean"
                        )
                    answered.add(tool_use_id)
                    result_texts, result_images = self._tool_result_content(block, at)
                    texts.extend(result_texts)
                    images += result_images
                    last_tool_result = " ".join(result_texts)
            if pending_tool_uses:
                missing = [t for t in pending_tool_uses if t not in answered]
                if missing:
                    raise _Rejection(
                        f"messages.{pending_from}: `tool_use` ids were found without "
                        f"`tool_result` blocks immediately after: {', '.join(missing)}. Each "
                        "`tool_use` block must have a corresponding `tool_result` block in the "
                        "next message."
                    )
            pending_tool_uses, pending_from = tool_uses, i
        if pending_tool_uses:
            raise _Rejection(
                f"messages.{pending_from}: `tool_use` ids were found without `tool_result` "
                f"blocks immediately after: {', '.join(pending_tool_uses)}. Each `tool_use` "
                "block must have a corresponding `tool_result` block in the next message."
            )
        ends_with_result = messages[-1].get("role") == "user" and last_tool_result is not None
        return images, user_texts, last_tool_result if ends_with_result else None

    @staticmethod
    def _check_text(block: dict[str, Any], at: str, allow_empty: bool) -> str:
        text = block.get("text")
        if not isinstance(text, str):
            raise _Rejection(f"{at}.text.text: Input should be a valid string")
        if not text and not allow_empty:
            raise _Rejection("messages: text content blocks must be non-empty")
        return text

    @staticmethod
    def _check_image(block: dict[str, Any], at: str) -> None:
        source = block.get("source")
        if not isinstance(source, dict):
            raise _Rejection(f"{at}.image.source: Field required")
        kind = source.get("type")
        if kind == "base64":
            _extra_keys(source, ("type", "media_type", "data"), f"{at}.image.source.base64.")
            media_type = source.get("media_type")
            if media_type not in _IMAGE_MEDIA_TYPES:
                raise _Rejection(
                    f"{at}.image.source.base64.media_type: Input should be "
                    "'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
                )
            data = source.get("data")
            if not isinstance(data, str):
                raise _Rejection(f"{at}.image.source.base64.data: Field required")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise _Rejection(f"{at}.image.source.base64.data: invalid base64 data") from None
            if len(raw) > _MAX_IMAGE_BYTES:
                raise _Rejection(
                    f"{at}.image.source.base64.data: image exceeds 5 MB maximum: "
                    f"{len(raw)} bytes > {_MAX_IMAGE_BYTES} bytes"
                )
            actual = sniff_image(raw)
            if actual is None:
                raise _Rejection("Could not process image")
            if actual != media_type:
                raise _Rejection(
                    f"{at}.image.source.base64.data: The image was specified using the "
                    f"{media_type} media type, but the image appears to be a {actual} image"
                )
        elif kind == "url":
            _extra_keys(source, ("type", "url"), f"{at}.image.source.url.")
            url = source.get("url")
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                raise _Rejection(f"{at}.image.source.url.url: Input should be a valid URL")
        else:
            raise _Rejection(
                f"{at}.image.source: Input tag '{kind}' found using 'type' does not "
                "match any of the expected tags: 'base64', 'url'"
            )

    @staticmethod
    def _check_tool_use(block: dict[str, Any], at: str) -> None:
        for name in ("id", "name"):
            if not isinstance(block.get(name), str) or not block[name]:
                raise _Rejection(f"{at}.tool_use.{name}: Field required")
        if not isinstance(block.get("input"), dict):
            raise _Rejection(f"{at}.tool_use.input: Input should be a valid dictionary")

    def _tool_result_content(self, block: dict[str, Any], at: str) -> tuple[list[str], int]:
        content = block.get("content", "")
        if isinstance(content, str):
            return ([content] if content else []), 0
        if not isinstance(content, list):
            raise _Rejection(f"{at}.tool_result.content: Input should be a valid string or a list")
        texts, images = [], 0
        for k, inner in enumerate(content):
            inner_at = f"{at}.tool_result.content.{k}"
            kind = inner.get("type") if isinstance(inner, dict) else None
            if kind == "text":
                _extra_keys(inner, _BLOCK_KEYS["text"], f"{inner_at}.text.")
                texts.append(self._check_text(inner, inner_at, False))
            elif kind == "image":
                _extra_keys(inner, _BLOCK_KEYS["image"], f"{inner_at}.image.")
                self._check_image(inner, inner_at)
                images += 1
            else:
                raise _Rejection(
                    f"{inner_at}: Input tag '{kind}' found using 'type' does not "
                    "match any of the expected tags: 'text', 'image'"
                )
        return texts, images

    @staticmethod
    def _check_tools(tools: Any) -> list[dict[str, Any]]:
        if tools is None:
            return []
        if not isinstance(tools, list):
            raise _Rejection("tools: Input should be a valid list")
        names: set[str] = set()
        for i, tool in enumerate(tools):
            at = f"tools.{i}"
            if not isinstance(tool, dict):
                raise _Rejection(f"{at}: Input should be a valid dictionary")
            if tool.get("type", "custom") != "custom":
                raise _Rejection(
                    f"{at}: Input tag '{tool['type']}' found using 'type' does not "
                    "match any of the expected tags: 'custom'"
                )
            _extra_keys(tool, _TOOL_KEYS, f"{at}.custom.")
            name = tool.get("name")
            if not isinstance(name, str):
                raise _Rejection(f"{at}.custom.name: Field required")
            if not _TOOL_NAME.match(name):
                raise _Rejection(
                    f"{at}.custom.name: String should match pattern '{_TOOL_NAME.pattern}'"
                )
            if "description" in tool and not isinstance(tool["description"], str):
                raise _Rejection(f"{at}.custom.description: Input should be a valid string")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise _Rejection(f"{at}.custom.input_schema: Field required")
            if schema.get("type") != "object":
                raise _Rejection(f"{at}.custom.input_schema.type: Input should be 'object'")
            if name in names:
                raise _Rejection("tools: Tool names must be unique.")
            names.add(name)
        return tools

    @staticmethod
    def _check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
        if choice is None:
            return None
        if not isinstance(choice, dict) or choice.get("type") not in (
            "auto",
            "any",
            "tool",
            "none",
        ):
            raise _Rejection(
                "tool_choice: Input tag found using 'type' does not match any of the "
                "expected tags: 'auto', 'any', 'tool', 'none'"
            )
        kind = choice["type"]
        allowed = (
            {"type", "name", "disable_parallel_tool_use"}
            if kind == "tool"
            else ({"type"} if kind == "none" else {"type", "disable_parallel_tool_use"})
        )
        _extra_keys(choice, allowed, f"tool_choice.{kind}.")
        if kind != "none" and not tools:
            raise _Rejection("tool_choice may only be specified while providing tools")
        if kind == "tool":
            name = choice.get("name")
            if not isinstance(name, str):
                raise _Rejection("tool_choice.tool.name: Field required")
            if name not in {t["name"] for t in tools}:
                raise _Rejection(
                    f"tool_choice.tool.name: Tool '{name}' not found in the provided tools"
                )
        return choice

    @staticmethod
    def _check_output_config(config: Any) -> dict[str, Any] | None:
        if config is None:
            return None
        if not isinstance(config, dict):
            raise _Rejection("output_config: Input should be a valid dictionary")
        _extra_keys(config, ("format", "effort"), "output_config.")
        if config.get("effort") not in (None, "low", "medium", "high", "xhigh", "max"):
            raise _Rejection(
                "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'"
            )
        fmt = config.get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise _Rejection("output_config.format.type: Input should be 'json_schema'")
        _extra_keys(fmt, ("type", "schema"), "output_config.format.")
        if not isinstance(fmt.get("schema"), dict):
            raise _Rejection("output_config.format.schema: Field required")
        return fmt["schema"]

    @staticmethod
    def _check_thinking(thinking: Any, max_tokens: int, count_only: bool) -> None:
        if thinking is None:
            return
        if not isinstance(thinking, dict) or thinking.get("type") not in (
            "enabled",
            "disabled",
            "adaptive",
        ):
            raise _Rejection(
                "thinking: Input tag found using 'type' does not match any of the "
                "expected tags: 'enabled', 'disabled', 'adaptive'"
            )
        if thinking["type"] == "enabled":
            budget = thinking.get("budget_tokens")
            if not _is_int(budget):
                raise _Rejection("thinking.enabled.budget_tokens: Field required")
            if budget < 1024:
                raise _Rejection(
                    "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
                )
            if not count_only and budget >= max_tokens:
                raise _Rejection("`max_tokens` must be greater than `thinking.budget_tokens`")

    # ---- generation --------------------------------------------------------------------

    def _compose(self, req: _MessagesRequest, reply: Reply | None) -> _Outcome:
        """The reply: a scripted `Reply` where it sets something, else derived from the request."""
        reply = reply or Reply()
        stop_sequence = None
        if reply.text is not None or reply.tool_calls:
            text = reply.text or ""
            calls = [
                {
                    "type": "tool_use",
                    "id": c.id or self.new_id("toolu_"),
                    "name": c.name,
                    "input": dict(c.arguments),
                }
                for c in reply.tool_calls
            ]
            stop_reason = "tool_use" if calls else "end_turn"
        else:
            text, calls, stop_reason, stop_sequence = self._default_content(req)
        if reply.finish_reason is not None:
            stop_reason = reply.finish_reason
            if stop_reason == "stop_sequence" and stop_sequence is None and req.stop_sequences:
                stop_sequence = req.stop_sequences[0]
        blocks: list[dict[str, Any]] = []
        if text or not calls:
            blocks.append({"type": "text", "text": text})
        blocks.extend(calls)
        output_tokens = count_tokens(text) + sum(
            count_tokens(orjson.dumps(c["input"]).decode()) for c in calls
        )
        return _Outcome(
            id=self.new_id("msg_"),
            model=reply.model or req.model["id"],
            blocks=blocks,
            stop_reason=stop_reason,
            stop_sequence=stop_sequence if stop_reason == "stop_sequence" else None,
            input_tokens=req.input_tokens if reply.prompt_tokens is None else reply.prompt_tokens,
            output_tokens=(
                output_tokens if reply.completion_tokens is None else reply.completion_tokens
            ),
            chunks=reply.chunks,
            stop_details=(
                {"type": "refusal", "category": None, "explanation": None}
                if stop_reason == "refusal"
                else None
            ),
        )

    def _default_content(
        self,
        req: _MessagesRequest,
    ) -> tuple[str, list[dict[str, Any]], str, str | None]:
        choice = (req.tool_choice or {}).get("type", "auto")
        if req.tools and choice != "none" and req.tool_result_text is None:
            forced = req.tool_choice.get("name") if choice == "tool" and req.tool_choice else None
            tool = next((t for t in req.tools if t["name"] == forced), req.tools[0])
            call = {
                "type": "tool_use",
                "id": self.new_id("toolu_"),
                "name": tool["name"],
                "input": sample_from_schema(tool["input_schema"]),
            }
            return "", [call], "tool_use", None
        stop_sequence = None
        if req.json_schema is not None:
            text = orjson.dumps(sample_from_schema(req.json_schema)).decode()
        elif req.tool_result_text is not None:
            text = f"Tool result received: {req.tool_result_text}"
        else:
            text = echo_text(self.provider, last_user_text(req.user_texts))
            if req.images:
                text += f" (saw {req.images} image(s))"
            # Generation stops before the earliest stop sequence, which the text leaves out.
            hits = [(text.find(s), s) for s in req.stop_sequences if s in text]
            if hits:
                cut, stop_sequence = min(hits)
                text = text[:cut]
        if count_tokens(text) > req.max_tokens:
            return "".join(words(text)[: req.max_tokens]).rstrip(), [], "max_tokens", None
        return text, [], "stop_sequence" if stop_sequence else "end_turn", stop_sequence

    def _message(self, out: _Outcome, *, started: bool = False) -> dict[str, Any]:
        """The Message object; `started` gives the `message_start` form (no content yet)."""
        message: dict[str, Any] = {
            "id": out.id,
            "type": "message",
            "role": "assistant",
            "model": out.model,
            "content": [] if started else out.blocks,
            "stop_reason": None if started else out.stop_reason,
            "stop_sequence": None if started else out.stop_sequence,
            "usage": {
                "input_tokens": out.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": min(1, out.output_tokens) if started else out.output_tokens,
            },
        }
        if out.stop_details is not None and not started:
            message["stop_details"] = out.stop_details
        return message

    # ---- endpoints ---------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._check_headers(request)) is not None:
            return denied
        try:
            req = await self._parse(request)
        except _Rejection as rejection:
            return self.error_response(
                rejection.status, rejection.message, error_type=rejection.error_type
            )
        out = self._compose(req, self.next_reply())
        if not req.stream:
            return self.json_response(self._message(out))
        return await self._stream(request, out)

    async def _count_tokens(self, request: web.Request) -> web.Response:
        if (denied := self._check_headers(request)) is not None:
            return denied
        try:
            req = await self._parse(request, count_only=True)
        except _Rejection as rejection:
            return self.error_response(
                rejection.status, rejection.message, error_type=rejection.error_type
            )
        return self.json_response({"input_tokens": req.input_tokens})

    async def _stream(self, request: web.Request, out: _Outcome) -> web.StreamResponse:
        writer = await self.open_stream(request, error_event=self.stream_error_event)
        await writer.send(
            {"type": "message_start", "message": self._message(out, started=True)}, "message_start"
        )
        # Real streams carry pings: right after message_start and between content blocks.
        await writer.send({"type": "ping"}, "ping")
        for index, block in enumerate(out.blocks):
            if index:
                await writer.send({"type": "ping"}, "ping")
            if block["type"] == "text":
                await writer.send(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                    "content_block_start",
                )
                for piece in split_text(block["text"], out.chunks):
                    await writer.send(
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                        "content_block_delta",
                    )
            else:
                await writer.send(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {**block, "input": {}},
                    },
                    "content_block_start",
                )
                for fragment in _json_fragments(orjson.dumps(block["input"]).decode()):
                    await writer.send(
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": fragment},
                        },
                        "content_block_delta",
                    )
            await writer.send({"type": "content_block_stop", "index": index}, "content_block_stop")
        delta: dict[str, Any] = {"stop_reason": out.stop_reason, "stop_sequence": out.stop_sequence}
        if out.stop_details is not None:
            delta["stop_details"] = out.stop_details
        # output_tokens is the running total so far (here: all of it), never an increment.
        await writer.send(
            {
                "type": "message_delta",
                "delta": delta,
                "usage": {"output_tokens": out.output_tokens},
            },
            "message_delta",
        )
        await writer.terminate(writer.frame(orjson.dumps({"type": "message_stop"}), "message_stop"))
        return writer.response
