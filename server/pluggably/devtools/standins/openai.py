"""Stand-in for OpenAI's Chat Completions and Images APIs (and the servers that copy them).

Serves `POST /v1/chat/completions` (unary and SSE), `POST /v1/images/generations`,
`GET /v1/models` and `GET /v1/models/{model}` with OpenAI's bodies, headers and error shapes, and
rejects requests the way the real API does (unrecognized arguments, role and tool-call ordering
rules, strict JSON-schema rules, `json_object` without the word "json", context-window overflow,
image sizes, counts and formats per model, ...).

Images are real files of the size asked for, made without an imaging library: PNG (a grey
ramp), baseline JPEG and lossless WebP (each one flat colour), a different image for every one
served (`images` keeps them, in order). GPT Image models answer `b64_json` always (with `usage`);
DALL·E answers `b64_json` or, with `response_format: url`, a signed link to `/files/...` on the
stand-in itself (or on `image_url_base`, to imitate a storage host of another origin).

What differs from the real API on purpose: prompt tokens are words (`count_tokens`) plus 85 per
image, http(s) image URLs are never fetched, chat `n` must be 1, `logprobs` is accepted but never
answered (`"logprobs": null`), and images are never streamed (`stream: true` is refused).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
import random
import re
import secrets
import string
import struct
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from pluggably.devtools.standins._base import (
    _DEFAULT_MESSAGES,
    JSON_BODY,
    Fault,
    Reply,
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
    "DALL_E_2",
    "DALL_E_3",
    "DEFAULT_MODELS",
    "GPT_IMAGE",
    "ImageRules",
    "OpenAIModel",
    "OpenAIStandIn",
    "image_file",
    "sample_from_schema",
]


@dataclass(frozen=True)
class ImageRules:
    """What an image model of the Images API takes. `family` decides the rest of the request
    rules: "gpt-image" (base64 always, `output_format`, usage), "dall-e-3" (n=1, style),
    "dall-e-2"."""

    family: str
    sizes: tuple[str, ...]
    default_size: str
    max_n: int
    max_prompt_chars: int
    qualities: tuple[str, ...]

    @property
    def gpt_image(self) -> bool:
        return self.family == "gpt-image"


GPT_IMAGE = ImageRules(
    "gpt-image",
    ("1024x1024", "1024x1536", "1536x1024"),
    "1024x1024",
    10,
    32000,
    ("low", "medium", "high", "auto"),
)
DALL_E_3 = ImageRules(
    "dall-e-3", ("1024x1024", "1792x1024", "1024x1792"), "1024x1024", 1, 4000, ("standard", "hd")
)
DALL_E_2 = ImageRules(
    "dall-e-2", ("256x256", "512x512", "1024x1024"), "1024x1024", 10, 1000, ("standard",)
)


@dataclass(frozen=True)
class OpenAIModel:
    """One entry of the stand-in's model list.

    `version` is the dated snapshot a chat completion reports in `model` (the real API answers
    `gpt-4o-mini` with `gpt-4o-mini-2024-07-18`); `chat=False` lists the model but makes
    `/v1/chat/completions` refuse it, as the real API refuses embedding and image models;
    `image` makes it an image model of `/v1/images/generations`.
    """

    id: str
    context_window: int = 128_000
    max_output_tokens: int = 16_384
    version: str | None = None
    chat: bool = True
    owned_by: str = "system"
    created: int = 1_700_000_000
    image: ImageRules | None = None


DEFAULT_MODELS: tuple[OpenAIModel, ...] = (
    OpenAIModel("gpt-4o-mini", version="gpt-4o-mini-2024-07-18", created=1721172741),
    OpenAIModel("gpt-4o", version="gpt-4o-2024-08-06", created=1715367049),
    OpenAIModel(
        "gpt-4.1-nano",
        context_window=1_047_576,
        max_output_tokens=32_768,
        version="gpt-4.1-nano-2025-04-14",
        created=1744321707,
    ),
    OpenAIModel(
        "text-embedding-3-small",
        context_window=8191,
        max_output_tokens=0,
        chat=False,
        created=1705948997,
    ),
    OpenAIModel(
        "dall-e-3",
        context_window=4000,
        max_output_tokens=0,
        chat=False,
        created=1698785189,
        image=DALL_E_3,
    ),
    OpenAIModel(
        "dall-e-2",
        context_window=1000,
        max_output_tokens=0,
        chat=False,
        created=1698798177,
        image=DALL_E_2,
    ),
    OpenAIModel(
        "gpt-image-1",
        context_window=32000,
        max_output_tokens=0,
        chat=False,
        created=1745517030,
        image=GPT_IMAGE,
    ),
    OpenAIModel(
        "gpt-image-1-mini",
        context_window=32000,
        max_output_tokens=0,
        chat=False,
        created=1758845821,
        image=GPT_IMAGE,
    ),
    # A window small enough that a test can overflow it with a sentence.
    OpenAIModel(
        "standin-tiny-context",
        context_window=64,
        max_output_tokens=64,
        version="standin-tiny-context-2025-01-01",
        owned_by="pluggably",
        created=1735689600,
    ),
)

# Every top-level argument the real endpoint knows; anything else is a 400.
KNOWN_ARGUMENTS = frozenset(
    {
        "model",
        "messages",
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "modalities",
        "moderation",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)

ROLES = ("system", "assistant", "user", "function", "tool", "developer")
_MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "refusal", "audio", "function_call"},
    "tool": {"role", "content", "tool_call_id"},
    "function": {"role", "content", "name"},
}
_PART_TYPES = {
    "user": ("text", "image_url"),
    "assistant": ("text", "refusal"),
    "system": ("text",),
    "developer": ("text",),
    "tool": ("text",),
    "function": ("text",),
}
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
IMAGE_TOKENS = 85  # what one low-detail image costs in the stand-in's usage
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_DATA_URL = re.compile(r"^data:([^;,]*)(;base64)?,(.*)$", re.DOTALL)
_ALNUM = string.ascii_letters + string.digits

_UNSUPPORTED_IMAGE = (
    "You uploaded an unsupported image. Please make sure your image has of one the following "
    "formats: ['png', 'jpeg', 'gif', 'webp']."
)
_NO_API_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with "
    "blank username) if you're accessing the API from your browser and are prompted for a "
    "username and password. You can obtain an API key from "
    "https://platform.openai.com/account/api-keys."
)
_UNPARSABLE_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
    "not valid JSON. If you have trouble figuring out how to fix this, please contact us through "
    "our help center at help.openai.com.)"
)

# OpenAI's own wording for the statuses a fault or the in-stream error usually carries.
_OPENAI_MESSAGES = {
    429: "Rate limit reached for requests. Please try again later.",
    500: "The server had an error while processing your request. Sorry about that!",
    503: "The server is overloaded or not ready yet.",
}
# error_type (a fault's, or derived from the status) -> the body's (type, code)
_ERROR_KINDS: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "invalid_api_key": ("invalid_request_error", "invalid_api_key"),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "model_not_found": ("invalid_request_error", "model_not_found"),
    "context_length_exceeded": ("invalid_request_error", "context_length_exceeded"),
    "rate_limit_exceeded": ("requests", "rate_limit_exceeded"),
    "tokens": ("tokens", "rate_limit_exceeded"),
    "requests": ("requests", "rate_limit_exceeded"),
    "insufficient_quota": ("insufficient_quota", "insufficient_quota"),
    "server_error": ("server_error", None),
    # Images: DALL·E's and GPT Image's refusals of a prompt or image under the content policy.
    "content_policy_violation": ("invalid_request_error", "content_policy_violation"),
    "moderation_blocked": ("image_generation_user_error", "moderation_blocked"),
}
# The real wording of errors whose text depends on their code, not their status.
_CODE_MESSAGES = {
    "content_policy_violation": (
        "Your request was rejected as a result of our safety system. Your prompt may contain "
        "text that is not allowed by our safety system."
    ),
    "moderation_blocked": (
        "Your request was rejected by the safety system. If you believe this is an error, "
        "contact us at help.openai.com and include the request ID {request_id}. "
        "safety_violations=[violence]."
    ),
}
_STATUS_KINDS = {
    401: "invalid_api_key",
    404: "model_not_found",
    429: "rate_limit_exceeded",
}


def _error_kind(status: int, error_type: str | None) -> tuple[str, str | None]:
    if error_type is not None:
        return _ERROR_KINDS.get(error_type, (error_type, None))
    if status >= 500:
        return _ERROR_KINDS["server_error"]
    return _ERROR_KINDS[_STATUS_KINDS.get(status, "invalid_request_error")]


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object, as both HTTP error bodies and in-stream error chunks carry it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class RequestRejected(Exception):
    """A request the real API would refuse: carries the status and error fields to answer."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type_


# ---- JSON-schema helpers -------------------------------------------------------------------


def strict_schema_problem(schema: Any) -> str | None:
    """Why OpenAI's strict mode would refuse `schema` (its wording after the colon), or None.

    Strict mode wants an object at the root, and at every object level
    `additionalProperties: false` plus every property listed in `required`.
    """
    if not isinstance(schema, dict) or _schema_type(schema) != "object":
        kind = schema.get("type") if isinstance(schema, dict) else type(schema).__name__
        return f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{kind}\"'."
    for path, node in _schema_nodes(schema, ()):
        if _schema_type(node) != "object":
            continue
        if node.get("additionalProperties") is not False:
            return (
                f"In context={path!r}, 'additionalProperties' is required to be supplied "
                "and to be false."
            )
        properties = node.get("properties") or {}
        required = node.get("required")
        missing = [
            name for name in properties if not isinstance(required, list) or name not in required
        ]
        if missing:
            return (
                f"In context={path!r}, 'required' is required to be supplied and to be an "
                f"array including every key in properties. Missing '{missing[0]}'."
            )
    return None


def _schema_type(node: dict[str, Any]) -> str | None:
    kind = node.get("type")
    if isinstance(kind, list):
        return "object" if "object" in kind else None
    if kind is None and "properties" in node:
        return "object"
    return kind if isinstance(kind, str) else None


def _schema_nodes(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], dict]]:
    if not isinstance(node, dict):
        return
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _schema_nodes(sub, (*path, "properties", name))
    for key in ("$defs", "definitions"):
        for name, sub in (node.get(key) or {}).items():
            yield from _schema_nodes(sub, (*path, key, name))
    if isinstance(node.get("items"), dict):
        yield from _schema_nodes(node["items"], (*path, "items"))
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(node.get(key) or ()):
            yield from _schema_nodes(sub, (*path, key, str(i)))


# ---- request validation --------------------------------------------------------------------

_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a decimal",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "object": dict, "array": list}[kind])


def _expect(value: Any, kind: str, param: str) -> None:
    if not _is(value, kind):
        raise RequestRejected(
            f"Invalid type for '{param}': expected {_TYPE_NAMES[kind]}, but got "
            f"{_describe(value)} instead.",
            param=param,
            code="invalid_type",
        )


def _expect_range(value: float, param: str, low: float | None, high: float | None) -> None:
    noun = "integer" if isinstance(value, int) else "decimal"
    if low is not None and value < low:
        raise RequestRejected(
            f"Invalid '{param}': {noun} below minimum value. Expected a value >= {low}, but "
            f"got {value} instead.",
            param=param,
            code=f"{noun}_below_min_value",
        )
    if high is not None and value > high:
        raise RequestRejected(
            f"Invalid '{param}': {noun} above maximum value. Expected a value <= {high}, but "
            f"got {value} instead.",
            param=param,
            code=f"{noun}_above_max_value",
        )


def _expect_choice(value: Any, allowed: Sequence[str], param: str) -> None:
    if value not in allowed:
        quoted = [f"'{a}'" for a in allowed]
        if len(quoted) <= 2:
            listed = " and ".join(quoted)
        else:
            listed = ", ".join(quoted[:-1]) + f", and {quoted[-1]}"
        raise RequestRejected(
            f"Invalid value: {value!r}. Supported values are: {listed}.",
            param=param,
            code="invalid_value",
        )


def _missing(param: str) -> RequestRejected:
    return RequestRejected(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def _empty_array(param: str) -> RequestRejected:
    return RequestRejected(
        f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an "
        "empty array instead.",
        param=param,
        code="empty_array",
    )


@dataclass
class ChatRequest:
    """A validated chat request, reduced to what the stand-in's answer depends on."""

    body: dict[str, Any]
    model: OpenAIModel
    stream: bool
    include_usage: bool
    include_obfuscation: bool
    max_tokens: int | None
    stop: list[str]
    tools: list[dict[str, Any]]
    tool_choice: Any
    response_format: dict[str, Any] | None
    prompt_texts: list[str] = field(default_factory=list)
    user_texts: list[str] = field(default_factory=list)
    images: int = 0
    trailing_tool_results: list[str] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(count_tokens(t) for t in self.prompt_texts) + IMAGE_TOKENS * self.images


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


class _RequestReader:
    """Validates a chat-completions body in the order the real API does, collecting the
    prompt's text and images on the way."""

    def __init__(self, models: Sequence[OpenAIModel], *, reject_unknown: bool) -> None:
        self.models = models
        self.reject_unknown = reject_unknown

    def read(self, body: Any) -> ChatRequest:
        if not isinstance(body, dict):
            raise RequestRejected(_UNPARSABLE_JSON)
        if self.reject_unknown:
            unknown = [k for k in body if k not in KNOWN_ARGUMENTS]
            if len(unknown) == 1:
                raise RequestRejected(f"Unrecognized request argument supplied: {unknown[0]}")
            if unknown:
                raise RequestRejected(
                    f"Unrecognized request arguments supplied: {', '.join(unknown)}"
                )
        if body.get("model") is None:
            raise RequestRejected("you must provide a model parameter")
        _expect(body["model"], "string", "model")
        if body.get("messages") is None:
            raise _missing("messages")
        _expect(body["messages"], "array", "messages")
        if not body["messages"]:
            raise _empty_array("messages")

        stream = self._read_stream(body)
        stream_options = body.get("stream_options")
        if stream_options is not None:
            if not stream:
                raise RequestRejected(
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    param="stream_options",
                )
            _expect(stream_options, "object", "stream_options")
            for key in ("include_usage", "include_obfuscation"):
                if stream_options.get(key) is not None:
                    _expect(stream_options[key], "boolean", f"stream_options.{key}")
        stream_options = stream_options or {}
        max_tokens = self._read_sampling(body)
        stop = self._read_stop(body.get("stop"))
        tools = self._read_tools(body.get("tools"))
        tool_choice = self._read_tool_choice(body, tools)
        response_format = self._read_response_format(body.get("response_format"))

        request = ChatRequest(
            body=body,
            model=OpenAIModel(body["model"]),
            stream=stream,
            include_usage=stream_options.get("include_usage") is True,
            include_obfuscation=stream_options.get("include_obfuscation") is not False,
            max_tokens=max_tokens,
            stop=stop,
            tools=tools,
            tool_choice=tool_choice,
            response_format=response_format,
        )
        self._read_messages(body["messages"], request)
        if (
            response_format
            and response_format["type"] == "json_object"
            and not any("json" in text.lower() for text in request.prompt_texts)
        ):
            raise RequestRejected(
                "'messages' must contain the word 'json' in some form, to use 'response_format' "
                "of type 'json_object'.",
                param="messages",
            )
        request.model = self._read_model(body["model"])
        self._check_budget(request)
        return request

    # -- top-level arguments --

    @staticmethod
    def _read_stream(body: dict[str, Any]) -> bool:
        if body.get("stream") is None:
            return False
        _expect(body["stream"], "boolean", "stream")
        return bool(body["stream"])

    @staticmethod
    def _read_sampling(body: dict[str, Any]) -> int | None:
        ranges = {
            "temperature": (0, 2),
            "top_p": (0, 1),
            "presence_penalty": (-2, 2),
            "frequency_penalty": (-2, 2),
        }
        for name, (low, high) in ranges.items():
            if body.get(name) is not None:
                _expect(body[name], "number", name)
                _expect_range(body[name], name, low, high)
        for name in ("seed", "top_logprobs"):
            if body.get(name) is not None:
                _expect(body[name], "integer", name)
        if body.get("top_logprobs") is not None:
            _expect_range(body["top_logprobs"], "top_logprobs", 0, 20)
        for name in ("logprobs", "parallel_tool_calls", "store"):
            if body.get(name) is not None:
                _expect(body[name], "boolean", name)
        for name in ("user", "safety_identifier", "prompt_cache_key"):
            if body.get(name) is not None:
                _expect(body[name], "string", name)
        if body.get("metadata") is not None:
            _expect(body["metadata"], "object", "metadata")
        if body.get("n") is not None:
            _expect(body["n"], "integer", "n")
            _expect_range(body["n"], "n", 1, 128)
            if body["n"] != 1:
                raise RequestRejected(
                    f"Unsupported value: 'n' does not support {body['n']} with this model. "
                    "Only the default (1) value is supported.",
                    param="n",
                    code="unsupported_value",
                )
        if body.get("logit_bias") is not None:
            _expect(body["logit_bias"], "object", "logit_bias")
            for token, bias in body["logit_bias"].items():
                if not token.isdigit():
                    raise RequestRejected(
                        f"Invalid key in 'logit_bias': {token}. You should only be submitting "
                        "non-negative integers.",
                        param="logit_bias",
                        code="invalid_value",
                    )
                _expect(bias, "number", f"logit_bias.{token}")
                _expect_range(bias, f"logit_bias.{token}", -100, 100)

        limits = [n for n in ("max_tokens", "max_completion_tokens") if body.get(n) is not None]
        if len(limits) == 2:
            raise RequestRejected(
                "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not "
                "supported.",
                param="max_tokens",
                code="invalid_parameter_combination",
            )
        if not limits:
            return None
        name = limits[0]
        _expect(body[name], "integer", name)
        _expect_range(body[name], name, 1, None)
        return int(body[name])

    @staticmethod
    def _read_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            return [stop]
        if not isinstance(stop, list):
            raise RequestRejected(
                f"Invalid type for 'stop': expected one of a string or array of strings, but got "
                f"{_describe(stop)} instead.",
                param="stop",
                code="invalid_type",
            )
        if len(stop) > 4:
            raise RequestRejected(
                "Invalid 'stop': array too long. Expected an array with maximum length 4, but "
                f"got an array with length {len(stop)} instead.",
                param="stop",
                code="array_above_max_length",
            )
        for i, item in enumerate(stop):
            _expect(item, "string", f"stop[{i}]")
        return [s for s in stop if s]

    @staticmethod
    def _read_tools(tools: Any) -> list[dict[str, Any]]:
        if tools is None:
            return []
        _expect(tools, "array", "tools")
        if len(tools) > 128:
            raise RequestRejected(
                "Invalid 'tools': array too long. Expected an array with maximum length 128, but "
                f"got an array with length {len(tools)} instead.",
                param="tools",
                code="array_above_max_length",
            )
        functions = []
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            _expect(tool, "object", where)
            if tool.get("type") is None:
                raise _missing(f"{where}.type")
            _expect_choice(tool["type"], ("function",), f"{where}.type")
            function = tool.get("function")
            if function is None:
                raise _missing(f"{where}.function")
            _expect(function, "object", f"{where}.function")
            name = function.get("name")
            if name is None:
                raise _missing(f"{where}.function.name")
            _expect(name, "string", f"{where}.function.name")
            if not _FUNCTION_NAME.match(name):
                raise RequestRejected(
                    f"Invalid '{where}.function.name': string does not match pattern. Expected a "
                    "string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                    param=f"{where}.function.name",
                    code="invalid_value",
                )
            parameters = function.get("parameters")
            if parameters is not None:
                _expect(parameters, "object", f"{where}.function.parameters")
            if function.get("strict") is True:
                problem = strict_schema_problem(parameters or {})
                if problem:
                    raise RequestRejected(
                        f"Invalid schema for function '{name}': {problem}",
                        param=f"{where}.function.parameters",
                        code="invalid_function_parameters",
                    )
            functions.append(function)
        return functions

    @staticmethod
    def _read_tool_choice(body: dict[str, Any], tools: list[dict[str, Any]]) -> Any:
        choice = body.get("tool_choice")
        if not tools:
            for key in ("tool_choice", "parallel_tool_calls"):
                if body.get(key) is not None:
                    raise RequestRejected(
                        f"Invalid value for '{key}': '{key}' is only allowed when 'tools' are "
                        "specified.",
                        param=key,
                    )
            return "none"
        if choice is None:
            return "auto"
        if isinstance(choice, str):
            _expect_choice(choice, ("none", "auto", "required"), "tool_choice")
            return choice
        _expect(choice, "object", "tool_choice")
        if choice.get("type") != "function":
            _expect_choice(choice.get("type"), ("function",), "tool_choice.type")
        name = (choice.get("function") or {}).get("name")
        if name is None:
            raise _missing("tool_choice.function.name")
        if not any(f["name"] == name for f in tools):
            raise RequestRejected(
                f"Invalid value for 'tool_choice': function '{name}' is not one of the functions "
                "in 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
        return choice

    @staticmethod
    def _read_response_format(response_format: Any) -> dict[str, Any] | None:
        if response_format is None:
            return None
        _expect(response_format, "object", "response_format")
        if response_format.get("type") is None:
            raise _missing("response_format.type")
        _expect_choice(
            response_format["type"], ("text", "json_object", "json_schema"), "response_format.type"
        )
        if response_format["type"] == "text":
            return None
        if response_format["type"] == "json_schema":
            spec = response_format.get("json_schema")
            if spec is None:
                raise _missing("response_format.json_schema")
            _expect(spec, "object", "response_format.json_schema")
            name = spec.get("name")
            if name is None:
                raise _missing("response_format.json_schema.name")
            _expect(name, "string", "response_format.json_schema.name")
            if not _FUNCTION_NAME.match(name):
                raise RequestRejected(
                    "Invalid 'response_format.json_schema.name': string does not match pattern. "
                    "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                    param="response_format.json_schema.name",
                    code="invalid_value",
                )
            if spec.get("schema") is not None:
                _expect(spec["schema"], "object", "response_format.json_schema.schema")
            if spec.get("strict") is True:
                problem = strict_schema_problem(spec.get("schema") or {})
                if problem:
                    raise RequestRejected(
                        f"Invalid schema for response_format '{name}': {problem}",
                        param="response_format",
                    )
        return response_format

    # -- messages --

    def _read_messages(self, messages: list[Any], request: ChatRequest) -> None:
        open_calls: tuple[int, list[str]] | None = None  # the assistant message awaiting results
        answered: set[str] = set()
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            _expect(message, "object", where)
            role = message.get("role")
            if role is None:
                raise _missing(f"{where}.role")
            _expect(role, "string", f"{where}.role")
            _expect_choice(role, ROLES, f"{where}.role")
            extra = [k for k in message if k not in _MESSAGE_KEYS[role]]
            if extra:
                raise RequestRejected(
                    f"Additional properties are not allowed ('{extra[0]}' was unexpected) - "
                    f"'messages.{i}'"
                )

            if role == "tool":
                if open_calls is None:
                    raise RequestRejected(
                        "Invalid parameter: messages with role 'tool' must be a response to a "
                        "preceeding message with 'tool_calls'.",
                        param=f"messages.[{i}].role",
                    )
                call_id = message.get("tool_call_id")
                if call_id is None:
                    raise _missing(f"{where}.tool_call_id")
                _expect(call_id, "string", f"{where}.tool_call_id")
                if call_id not in open_calls[1]:
                    raise RequestRejected(
                        f"Invalid parameter: 'tool_call_id' of '{call_id}' not found in "
                        "'tool_calls' of previous message.",
                        param=f"messages.[{i}].tool_call_id",
                    )
                answered.add(call_id)
            else:
                self._check_answered(open_calls, answered)
                open_calls, answered = None, set()

            calls = self._read_tool_calls(message, where) if role == "assistant" else []
            content = message.get("content")
            if content is None and not (
                role == "assistant" and (calls or "function_call" in message)
            ):
                raise _missing(f"{where}.content")
            if content is not None:
                self._read_content(content, role, where, request)
            for call in calls:
                request.prompt_texts.append(call["function"]["arguments"])
            if calls:
                open_calls = (i, [c["id"] for c in calls])
            if role == "user":
                request.user_texts.append(_text_of(content))
        self._check_answered(open_calls, answered)

        trailing = []
        for message in reversed(messages):
            if message["role"] != "tool":
                break
            trailing.append(_text_of(message.get("content")))
        request.trailing_tool_results = trailing[::-1]

    @staticmethod
    def _check_answered(open_calls: tuple[int, list[str]] | None, answered: set[str]) -> None:
        if open_calls is None:
            return
        missing = [c for c in open_calls[1] if c not in answered]
        if missing:
            raise RequestRejected(
                "An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(missing)}",
                param=f"messages.[{open_calls[0]}].role",
            )

    @staticmethod
    def _read_tool_calls(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
        calls = message.get("tool_calls")
        if calls is None:
            return []
        _expect(calls, "array", f"{where}.tool_calls")
        if not calls:
            raise _empty_array(f"{where}.tool_calls")
        for j, call in enumerate(calls):
            at = f"{where}.tool_calls[{j}]"
            _expect(call, "object", at)
            for key in ("id", "type", "function"):
                if call.get(key) is None:
                    raise _missing(f"{at}.{key}")
            _expect(call["id"], "string", f"{at}.id")
            _expect_choice(call["type"], ("function",), f"{at}.type")
            _expect(call["function"], "object", f"{at}.function")
            for key in ("name", "arguments"):
                if call["function"].get(key) is None:
                    raise _missing(f"{at}.function.{key}")
                _expect(call["function"][key], "string", f"{at}.function.{key}")
        return calls

    def _read_content(self, content: Any, role: str, where: str, request: ChatRequest) -> None:
        if isinstance(content, str):
            request.prompt_texts.append(content)
            return
        if not isinstance(content, list):
            raise RequestRejected(
                f"Invalid type for '{where}.content': expected one of a string or array of "
                f"objects, but got {_describe(content)} instead.",
                param=f"{where}.content",
                code="invalid_type",
            )
        if not content:
            raise _empty_array(f"{where}.content")
        for k, part in enumerate(content):
            at = f"{where}.content[{k}]"
            _expect(part, "object", at)
            kind = part.get("type")
            if kind is None:
                raise _missing(f"{at}.type")
            if kind == "image_url" and role != "user":
                raise RequestRejected(
                    f"Invalid '{where}'. Image URLs are only allowed for messages with role "
                    f"'user', but this message with role '{role}' contains an image URL.",
                    param=where,
                    code="invalid_value",
                )
            _expect_choice(kind, _PART_TYPES[role], f"{at}.type")
            if kind in ("text", "refusal"):
                if part.get(kind) is None:
                    raise _missing(f"{at}.{kind}")
                _expect(part[kind], "string", f"{at}.{kind}")
                request.prompt_texts.append(part[kind])
            else:
                self._read_image(part.get("image_url"), f"{at}.image_url")
                request.images += 1

    @staticmethod
    def _read_image(image: Any, at: str) -> None:
        if image is None:
            raise _missing(at)
        _expect(image, "object", at)
        url = image.get("url")
        if url is None:
            raise _missing(f"{at}.url")
        _expect(url, "string", f"{at}.url")
        if image.get("detail") is not None:
            _expect_choice(image["detail"], ("auto", "low", "high"), f"{at}.detail")
        if url.startswith(("http://", "https://")):
            return  # the real API fetches it; the stand-in stays offline
        match = _DATA_URL.match(url)
        if match is None:
            raise RequestRejected(
                f"Invalid '{at}.url': Expected a valid URL, but got a value with an invalid "
                "format.",
                param=f"{at}.url",
                code="invalid_value",
            )
        media_type, is_base64, data = match.groups()
        if media_type not in IMAGE_MEDIA_TYPES or not is_base64:
            raise RequestRejected(_UNSUPPORTED_IMAGE, code="invalid_image_format")
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestRejected(
                "You uploaded an unsupported image. Please make sure your image is valid.",
                code="invalid_image_format",
            ) from None
        if sniff_image(decoded) is None:
            raise RequestRejected(_UNSUPPORTED_IMAGE, code="invalid_image_format")

    # -- model and budget --

    def _read_model(self, name: str) -> OpenAIModel:
        model = next((m for m in self.models if m.id == name), None)
        if model is None:
            raise RequestRejected(
                f"The model `{name}` does not exist or you do not have access to it.",
                status=404,
                code="model_not_found",
            )
        if not model.chat:
            raise RequestRejected(
                "This is not a chat model and thus not supported in the v1/chat/completions "
                "endpoint. Did you mean to use v1/completions?",
                status=404,
                param="model",
            )
        return model

    @staticmethod
    def _check_budget(request: ChatRequest) -> None:
        model, wanted, prompt = request.model, request.max_tokens, request.prompt_tokens
        if wanted is not None and wanted > model.max_output_tokens:
            name = (
                "max_tokens"
                if request.body.get("max_tokens") is not None
                else "max_completion_tokens"
            )
            raise RequestRejected(
                f"{name} is too large: {wanted}. This model supports at most "
                f"{model.max_output_tokens} completion tokens, whereas you provided {wanted}.",
                param=name,
                code="invalid_value",
            )
        window = model.context_window
        if wanted is not None and prompt + wanted > window:
            raise RequestRejected(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt + wanted} tokens ({prompt} in the messages, {wanted} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        if prompt > window:
            raise RequestRejected(
                f"This model's maximum context length is {window} tokens. However, your messages "
                f"resulted in {prompt} tokens. Please reduce the length of the messages.",
                param="messages",
                code="context_length_exceeded",
            )


# ---- answers -------------------------------------------------------------------------------


@dataclass
class Completion:
    """What the stand-in's model says to one request, before it is framed unary or streamed."""

    content: str | None  # None: no text at all (a tool-call-only answer)
    tool_calls: list[dict[str, Any]]  # wire-shaped: {id, type, function: {name, arguments}}
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    chunks: int | None = None  # how many text deltas a stream uses (None: one per word)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


def _random_id(prefix: str, length: int) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


def _fragments(text: str, count: int = 3) -> list[str]:
    """`text` cut into `count` consecutive non-empty pieces (fewer only when it is shorter)."""
    count = max(1, min(count, len(text)))
    size, extra = divmod(len(text), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def _truncate(text: str, limit: int) -> str:
    return "".join(words(text)[:limit]).rstrip()


class OpenAIStandIn(StandIn):
    """OpenAI Chat Completions, Images (generations) and Models, as the official API serves them.

    `models` replaces `DEFAULT_MODELS` (an `image` rule set makes an image model);
    `reject_unknown_fields=False` imitates the OpenAI-compatible servers that ignore arguments
    they do not know instead of refusing them; `image_url_base` is where image links point.
    A `Reply`'s `finish_reason` is OpenAI's (`stop`, `length`, `tool_calls`, `content_filter`);
    `content_filter` empties the content. Fault `error_type`s: an OpenAI error code or type
    (`rate_limit_exceeded`, `insufficient_quota`, `tokens`, `server_error`, and for images
    `content_policy_violation` (DALL·E) and `moderation_blocked` (GPT Image), ...).
    """

    provider = "openai"
    system_fingerprint = "fp_0aa8d3e20b"

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        chunk_delay_s: float = 0.0,
        models: Iterable[OpenAIModel] | None = None,
        reject_unknown_fields: bool = True,
        image_url_base: str | None = None,
    ) -> None:
        super().__init__(api_key=api_key, chunk_delay_s=chunk_delay_s)
        self.models: list[OpenAIModel] = list(DEFAULT_MODELS if models is None else models)
        self.reject_unknown_fields = reject_unknown_fields
        # Where image links point (None: this stand-in's base_url), e.g. the same server under
        # another host name, to be another origin.
        self.image_url_base = image_url_base
        self.images: list[bytes] = []  # every image served, in order (while recording)
        self._image_numbers = itertools.count()  # each image differs from the ones before
        self._files: dict[str, tuple[str, bytes, str]] = {}  # name -> (signature, data, type)

    # ---- wiring ----------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = super().build_app()
        # The real API tags every answer, errors and streams included, with a request id.
        app.on_response_prepare.append(self._tag_response)
        return app

    @staticmethod
    async def _tag_response(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/_standin/"):
            return
        response.headers.setdefault("x-request-id", _random_id("req_", 32).lower())
        response.headers.setdefault("openai-version", "2020-10-01")
        response.headers.setdefault("openai-processing-ms", str(random.randint(80, 400)))

    def routes(self) -> Iterable[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self._chat_completions),
            web.post("/v1/images/generations", self._images_generations),
            web.get("/files/{name}", self._file),
            web.get("/v1/models", self._list_models),
            web.get("/v1/models/{model}", self._retrieve_model),
            web.route("*", "/{tail:.*}", self._invalid_url),
        ]

    # ---- errors ----------------------------------------------------------------------------

    def error_response(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        retry_after: float | None = None,
    ) -> web.Response:
        if message == _DEFAULT_MESSAGES.get(status) and status in _OPENAI_MESSAGES:
            message = _OPENAI_MESSAGES[status]
        type_, code = _error_kind(status, error_type)
        if code in _CODE_MESSAGES and message == _DEFAULT_MESSAGES.get(status):
            message = _CODE_MESSAGES[code].format(request_id=_random_id("", 32).lower())
        if code == "insufficient_quota" and message == _OPENAI_MESSAGES.get(429):
            message = (
                "You exceeded your current quota, please check your plan and billing "
                "details. For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors."
            )
        headers = {}
        if retry_after is not None:
            # The SDK prefers the millisecond header; plain HTTP clients read Retry-After.
            headers["Retry-After"] = str(max(0, math.ceil(retry_after)))
            headers["retry-after-ms"] = str(max(0, round(retry_after * 1000)))
        return self._error(status, message, type_=type_, code=code, headers=headers)

    def _error(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        return web.Response(
            body=orjson.dumps(error_body(message, type_, param, code), option=orjson.OPT_INDENT_2),
            status=status,
            content_type="application/json",
            headers=headers,
        )

    def _rejected(self, err: RequestRejected) -> web.Response:
        return self._error(err.status, err.message, type_=err.type, param=err.param, code=err.code)

    def _stream_error_event(self, fault: Fault) -> bytes:
        type_, code = _error_kind(fault.status, fault.error_type or "server_error")
        message = fault.message or _OPENAI_MESSAGES[500]
        return b"data: " + orjson.dumps(error_body(message, type_, None, code)) + b"\n\n"

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        scheme, _, key = request.headers.get("Authorization", "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return self._error(401, _NO_API_KEY)
        if key != self.api_key:
            shown = key if len(key) <= 8 else key[:3] + "*" * (len(key) - 7) + key[-4:]
            return self._error(
                401,
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return None

    async def _invalid_url(self, request: web.Request) -> web.Response:
        return self._error(404, f"Invalid URL ({request.method} {request.path})")

    # ---- models ----------------------------------------------------------------------------

    @staticmethod
    def _model_object(model: OpenAIModel) -> dict[str, Any]:
        return {
            "id": model.id,
            "object": "model",
            "created": model.created,
            "owned_by": model.owned_by,
        }

    async def _list_models(self, request: web.Request) -> web.Response:
        # The endpoint is not paginated: one page holds every model (the SDK's SyncPage says so).
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        return self._json({"object": "list", "data": [self._model_object(m) for m in self.models]})

    async def _retrieve_model(self, request: web.Request) -> web.Response:
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        name = request.match_info["model"]
        model = next((m for m in self.models if m.id == name), None)
        if model is None:
            return self._error(
                404, f"The model '{name}' does not exist", param="model", code="model_not_found"
            )
        return self._json(self._model_object(model))

    def _json(self, data: Any) -> web.Response:
        # The real API pretty-prints its unary bodies.
        return web.Response(
            body=orjson.dumps(data, option=orjson.OPT_INDENT_2), content_type="application/json"
        )

    # ---- chat completions ------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        reader = _RequestReader(self.models, reject_unknown=self.reject_unknown_fields)
        try:
            chat = reader.read(request[JSON_BODY])
        except RequestRejected as err:
            return self._rejected(err)
        completion = self.compose(chat, self.next_reply())
        if chat.stream:
            return await self._stream(request, chat, completion)
        return self._json(self._unary_body(completion))

    def compose(self, chat: ChatRequest, reply: Reply | None) -> Completion:
        """The answer to a validated request: the scripted `reply` where it says something,
        otherwise the deterministic default derived from the request."""
        reply = reply or Reply()
        forced = isinstance(chat.tool_choice, dict)
        if reply.tool_calls:
            content = reply.text
            calls = [self._wire_call(t.name, t.arguments, t.id) for t in reply.tool_calls]
        elif reply.text is not None:
            content, calls = reply.text, []
        else:
            content, calls = self._default_output(chat)

        finish = reply.finish_reason
        if finish == "content_filter":
            content, calls = "", []
        elif finish is None and calls:
            # A named tool_choice ends with "stop", not "tool_calls" (real API behaviour).
            finish = "stop" if forced else "tool_calls"
        elif finish is None:
            content, finish = self._limit(content or "", chat)

        completion_tokens = count_tokens(content or "") + sum(
            count_tokens(c["function"]["arguments"]) for c in calls
        )
        return Completion(
            content=content,
            tool_calls=calls,
            finish_reason=finish,
            prompt_tokens=chat.prompt_tokens
            if reply.prompt_tokens is None
            else reply.prompt_tokens,
            completion_tokens=completion_tokens
            if reply.completion_tokens is None
            else reply.completion_tokens,
            model=reply.model or chat.model.version or chat.model.id,
            chunks=reply.chunks,
        )

    def _default_output(self, chat: ChatRequest) -> tuple[str | None, list[dict[str, Any]]]:
        choice = chat.tool_choice
        wants_tool = (
            choice in ("required",)
            or isinstance(choice, dict)
            or (choice == "auto" and not chat.trailing_tool_results)
        )
        if chat.tools and wants_tool:
            name = choice["function"]["name"] if isinstance(choice, dict) else None
            tool = next((t for t in chat.tools if t["name"] == name), chat.tools[0])
            arguments = sample_from_schema(tool.get("parameters") or {"type": "object"})
            return None, [self._wire_call(tool["name"], arguments, None)]
        if chat.trailing_tool_results:
            return "Tool result received: " + "; ".join(chat.trailing_tool_results), []
        echo = echo_text(self.provider, last_user_text(chat.user_texts))
        if chat.images:
            echo += f" (saw {chat.images} image(s))"
        if chat.response_format is not None:
            if chat.response_format["type"] == "json_object":
                return orjson.dumps({"reply": echo}).decode(), []
            schema = chat.response_format["json_schema"].get("schema") or {"type": "object"}
            return orjson.dumps(sample_from_schema(schema)).decode(), []
        return echo, []

    @staticmethod
    def _limit(text: str, chat: ChatRequest) -> tuple[str, str]:
        cuts = [text.index(s) for s in chat.stop if s in text]
        if cuts:
            text = text[: min(cuts)]
        if chat.max_tokens is not None and count_tokens(text) > chat.max_tokens:
            return _truncate(text, chat.max_tokens), "length"
        return text, "stop"

    @staticmethod
    def _wire_call(name: str, arguments: Any, call_id: str | None) -> dict[str, Any]:
        return {
            "id": call_id or _random_id("call_", 24),
            "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
        }

    def _unary_body(self, completion: Completion) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": completion.content,
            "refusal": None,
            "annotations": [],
        }
        if completion.tool_calls:
            message["tool_calls"] = completion.tool_calls
        return {
            "id": _random_id("chatcmpl-", 29),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": completion.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": completion.usage(),
            "service_tier": "default",
            "system_fingerprint": self.system_fingerprint,
        }

    async def _stream(
        self, request: web.Request, chat: ChatRequest, completion: Completion
    ) -> web.StreamResponse:
        writer = await self.open_stream(request, error_event=self._stream_error_event)
        frame = _ChunkFramer(completion.model, self.system_fingerprint, chat)
        await writer.send(
            frame.choice({"role": "assistant", "content": "", "refusal": None}), split_json=True
        )
        await writer.comment("keep-alive")
        for piece in split_text(completion.content or "", completion.chunks):
            await writer.send(frame.choice({"content": piece}))
        for index, call in enumerate(completion.tool_calls):
            await writer.send(
                frame.choice(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        ]
                    }
                )
            )
            for piece in _fragments(call["function"]["arguments"]):
                await writer.send(
                    frame.choice(
                        {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                    )
                )
        await writer.send(frame.choice({}, completion.finish_reason))
        if chat.include_usage:
            await writer.send(frame.usage(completion.usage()))
        await writer.terminate(writer.frame(b"[DONE]"))
        return writer.response

    # ---- images ----------------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        self.images.clear()
        self._files.clear()

    async def _images_generations(self, request: web.Request) -> web.Response:
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        try:
            asked = _read_image_request(
                request[JSON_BODY], self.models, reject_unknown=self.reject_unknown_fields
            )
        except RequestRejected as err:
            return self._rejected(err)
        width, height = (int(side) for side in asked.size.split("x"))
        data = []
        for _ in range(asked.n):
            image = image_file(asked.output_format, width, height, next(self._image_numbers))
            if self.record:  # off in the bench, where nobody reads them
                self.images.append(image)
            entry: dict[str, Any] = (
                {"url": self._link(image, asked.output_format)}
                if asked.response_format == "url"
                else {"b64_json": base64.b64encode(image).decode()}
            )
            if asked.rules.family == "dall-e-3":
                entry["revised_prompt"] = asked.prompt  # the stand-in keeps the prompt as it is
            data.append(entry)
        body: dict[str, Any] = {"created": int(time.time()), "data": data}
        if asked.rules.gpt_image:
            body.update(
                background=asked.background,
                output_format=asked.output_format,
                quality=asked.quality,
                size=asked.size,
                usage=_image_usage(asked),
            )
        return self._json(body)

    def _link(self, image: bytes, file_format: str) -> str:
        """A signed link to `image`, the way DALL·E's storage URLs look (only the last 64)."""
        name = f"img-{_random_id('', 24)}.{file_format}"
        signature = secrets.token_urlsafe(24)
        self._files[name] = (signature, image, f"image/{file_format}")
        while len(self._files) > 64:
            del self._files[next(iter(self._files))]
        base = self.image_url_base or self.base_url
        return f"{base}/files/{name}?st=2026-01-01T00%3A00%3A00Z&sp=r&sig={signature}"

    async def _file(self, request: web.Request) -> web.Response:
        stored = self._files.get(request.match_info["name"])
        if stored is None or request.query.get("sig") != stored[0]:
            # What a storage host answers a wrong or expired signature: no JSON error body.
            return web.Response(
                status=403,
                body=b'<?xml version="1.0" encoding="utf-8"?><Error><Code>'
                b"AuthenticationFailed</Code></Error>",
                content_type="application/xml",
            )
        return web.Response(body=stored[1], content_type=stored[2])


class _ChunkFramer:
    """Builds `chat.completion.chunk` objects sharing one id, timestamp and model."""

    def __init__(self, model: str, fingerprint: str, chat: ChatRequest) -> None:
        self.base = {
            "id": _random_id("chatcmpl-", 29),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": fingerprint,
        }
        self.include_usage = chat.include_usage
        self.include_obfuscation = chat.include_obfuscation

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict:
        chunk: dict[str, Any] = {**self.base, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage  # null on every chunk but the last, as the real API sends
        if self.include_obfuscation:
            # Random padding that evens out chunk sizes; strict decoders must tolerate it.
            chunk["obfuscation"] = "".join(random.choices(_ALNUM, k=random.randint(1, 16)))
        return chunk

    def choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict:
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], None
        )

    def usage(self, usage: dict[str, Any]) -> dict:
        return self._chunk([], usage)


# ---- images --------------------------------------------------------------------------------

# Every argument of `/v1/images/generations`; anything else is refused by name.
IMAGE_ARGUMENTS = frozenset(
    {
        "model",
        "prompt",
        "background",
        "moderation",
        "n",
        "output_compression",
        "output_format",
        "partial_images",
        "quality",
        "response_format",
        "safety_identifier",
        "size",
        "stream",
        "style",
        "user",
    }
)
# What only GPT Image models take, and what only DALL·E takes (the others refuse it by name).
_GPT_IMAGE_ONLY = (
    "background",
    "moderation",
    "output_compression",
    "output_format",
    "partial_images",
    "stream",
)
_DALL_E_ONLY = ("response_format", "style")
# Every size DALL·E knows; one outside this list fails schema validation, another model's size
# fails the model's own check.
_DALL_E_SIZES = ("256x256", "512x512", "1024x1024", "1024x1792", "1792x1024")
# GPT Image output tokens per image, by quality and size (square, or the two portrait/landscape).
_GPT_IMAGE_TOKENS = {"low": (272, 408), "medium": (1056, 1584), "high": (4160, 6240)}


@dataclass
class ImageRequest:
    model: OpenAIModel
    rules: ImageRules
    prompt: str
    n: int
    size: str
    quality: str
    output_format: str
    response_format: str
    background: str


def _unknown_parameter(name: str) -> RequestRejected:
    return RequestRejected(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


def _read_image_request(
    body: Any, models: Sequence[OpenAIModel], *, reject_unknown: bool
) -> ImageRequest:
    """Validates an Images API body in the order the real API does."""
    if not isinstance(body, dict):
        raise RequestRejected(_UNPARSABLE_JSON)
    if reject_unknown:
        for name in body:
            if name not in IMAGE_ARGUMENTS:
                raise _unknown_parameter(name)
    if body.get("model") is None:
        raise _missing("model")
    _expect(body["model"], "string", "model")
    if body.get("prompt") is None:
        raise _missing("prompt")
    _expect(body["prompt"], "string", "prompt")
    model = next((m for m in models if m.id == body["model"]), None)
    if model is None:
        raise RequestRejected(
            f"The model `{body['model']}` does not exist or you do not have access to it.",
            status=404,
            code="model_not_found",
        )
    if model.image is None:
        _expect_choice(body["model"], [m.id for m in models if m.image is not None], "model")
    rules = model.image
    assert rules is not None
    for name in _GPT_IMAGE_ONLY if not rules.gpt_image else _DALL_E_ONLY:
        if body.get(name) is not None and not (name == "style" and rules.family == "dall-e-3"):
            raise _unknown_parameter(name)

    prompt = body["prompt"]
    if not prompt:
        raise RequestRejected(
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got "
            "an empty string instead.",
            param="prompt",
            code="empty_string",
        )
    if len(prompt) > rules.max_prompt_chars:
        raise RequestRejected(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{rules.max_prompt_chars}, but got a string with length {len(prompt)} instead.",
            param="prompt",
            code="string_above_max_length",
        )
    n = body.get("n")
    if n is None:
        n = 1
    _expect(n, "integer", "n")
    _expect_range(n, "n", 1, 10)
    if n > rules.max_n:
        raise RequestRejected("You must provide n=1 for this model.")

    size = body.get("size")
    if size is None or (size == "auto" and rules.gpt_image):
        size = rules.default_size
    _expect(size, "string", "size")
    if rules.gpt_image:
        _expect_choice(size, (*rules.sizes, "auto"), "size")
    elif size not in _DALL_E_SIZES:
        listed = ", ".join(f"'{s}'" for s in _DALL_E_SIZES)
        raise RequestRejected(f"'{size}' is not one of [{listed}] - 'size'", param="size")
    elif size not in rules.sizes:
        raise RequestRejected("The size is not supported by this model.", code="invalid_size")

    quality = body.get("quality")
    if quality is not None:
        _expect_choice(quality, rules.qualities, "quality")
    if rules.family == "dall-e-3" and body.get("style") is not None:
        _expect_choice(body["style"], ("vivid", "natural"), "style")
    response_format = body.get("response_format")
    if response_format is not None:
        _expect_choice(response_format, ("url", "b64_json"), "response_format")
    output_format = body.get("output_format")
    if output_format is not None:
        _expect_choice(output_format, ("png", "jpeg", "webp"), "output_format")
    if body.get("output_compression") is not None:
        _expect(body["output_compression"], "integer", "output_compression")
        _expect_range(body["output_compression"], "output_compression", 0, 100)
    background = body.get("background")
    if background is not None:
        _expect_choice(background, ("transparent", "opaque", "auto"), "background")
    if body.get("moderation") is not None:
        _expect_choice(body["moderation"], ("low", "auto"), "moderation")
    if body.get("partial_images") is not None:
        _expect(body["partial_images"], "integer", "partial_images")
        _expect_range(body["partial_images"], "partial_images", 0, 3)
    for name in ("user", "safety_identifier"):
        if body.get(name) is not None:
            _expect(body[name], "string", name)
    if body.get("stream") is not None:
        _expect(body["stream"], "boolean", "stream")
        if body["stream"]:
            raise RequestRejected("The stand-in does not stream images.", param="stream")
    if rules.gpt_image:
        # GPT Image answers base64 always and reports the quality it chose for "auto".
        quality = "medium" if quality in (None, "auto") else quality
        response_format = "b64_json"
    return ImageRequest(
        model=model,
        rules=rules,
        prompt=prompt,
        n=n,
        size=size,
        quality=quality or "standard",
        output_format=output_format or "png",
        response_format=response_format or "url",  # DALL·E's default is a link
        background="transparent" if background == "transparent" else "opaque",
    )


def _image_usage(asked: ImageRequest) -> dict[str, Any]:
    square, oblong = _GPT_IMAGE_TOKENS[asked.quality]
    width, height = asked.size.split("x")
    output = asked.n * (square if width == height else oblong)
    text = count_tokens(asked.prompt)
    return {
        "input_tokens": text,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": text},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": text + output,
    }


def image_file(file_format: str, width: int, height: int, index: int = 0) -> bytes:
    """A valid image of `width` x `height` in `file_format` (png, jpeg, webp), different for
    every `index`: a grey ramp (PNG) or one flat colour (JPEG, WebP)."""
    if file_format == "png":
        return _png(width, height, index)
    if file_format == "jpeg":
        return _jpeg(width, height, 16 + (index * 37) % 224)
    if file_format == "webp":
        return _webp(width, height, 0xFF000000 | ((index * 0x2F5D39 + 0x336699) & 0xFFFFFF))
    raise ValueError(f"unknown image format {file_format!r}")


def _png(width: int, height: int, seed: int) -> bytes:
    # Row y is the ramp 0..255 shifted by seed + y: cut from one long ramp, no per-pixel work.
    ramp = bytes(range(256)) * (width // 256 + 2)
    rows = b"".join(
        b"\x00" + ramp[(seed + y) % 256 : (seed + y) % 256 + width] for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 6))
        + chunk(b"IEND", b"")
    )


# The standard DC luminance Huffman table (ITU T.81 Annex K.3).
_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
_DC_VALUES = bytes(range(12))


def _huffman_codes(bits: Sequence[int], values: bytes) -> dict[int, str]:
    codes, code, k = {}, 0, 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            codes[values[k]] = format(code, f"0{length}b")
            code += 1
            k += 1
        code <<= 1
    return codes


def _jpeg(width: int, height: int, level: int) -> bytes:
    """A baseline greyscale JPEG of one grey `level`: every 8x8 block is its DC coefficient
    alone (quantised by 1), so the scan is the first block's DC, then "no change, end of block"
    for every other block."""

    def segment(marker: int, data: bytes) -> bytes:
        return bytes((0xFF, marker)) + struct.pack(">H", len(data) + 2) + data

    dc = 8 * (level - 128)  # the DCT's DC term of a flat block, after the level shift
    category = abs(dc).bit_length()
    extra = "" if dc == 0 else format(dc if dc > 0 else dc + (1 << category) - 1, f"0{category}b")
    dc_codes = _huffman_codes(_DC_BITS, _DC_VALUES)
    end_of_block = "00"  # the only symbol of the AC table below, two bits long
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    bits = dc_codes[category] + extra + end_of_block + (dc_codes[0] + end_of_block) * (blocks - 1)
    bits += "1" * (-len(bits) % 8)  # padding with 1-bits, as the standard says
    scan = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    return (
        b"\xff\xd8"
        + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + segment(0xDB, b"\x00" + b"\x01" * 64)
        + segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + segment(0xC4, b"\x00" + bytes(_DC_BITS) + _DC_VALUES)
        + segment(0xC4, b"\x10" + bytes((0, 1, *([0] * 14))) + b"\x00")
        + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + scan
        + b"\xff\xd9"
    )


def _webp(width: int, height: int, argb: int) -> bytes:
    """A lossless WebP (VP8L) of one colour: every prefix code is a single symbol, which takes
    zero bits per pixel, so the image data is the header and five one-symbol codes."""
    value, length = 0, 0

    def put(bits: int, count: int) -> None:
        nonlocal value, length
        value |= bits << length  # VP8L packs bits from the least significant end
        length += count

    put(width - 1, 14)
    put(height - 1, 14)
    put(0, 1)  # alpha is not used
    put(0, 3)  # version 0
    put(0, 1)  # no transform
    put(0, 1)  # no colour cache
    put(0, 1)  # no meta prefix codes
    alpha, red, green, blue = ((argb >> shift) & 0xFF for shift in (24, 16, 8, 0))
    for symbol in (green, red, blue, alpha, 0):  # the last: the (unused) distance code
        put(1, 1)  # a simple code
        put(0, 1)  # of one symbol
        put(1, 1)  # written in 8 bits
        put(symbol, 8)
    data = b"\x2f" + value.to_bytes((length + 7) // 8, "little")
    chunk = b"VP8L" + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) % 2)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk
