"""The Anthropic stand-in speaks the Messages API wire format: the official SDK (anthropic 2.14)
parses everything it serves, and raw requests get the real API's rejections and stream framing."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import anthropic
import httpx2
import pydantic
import pytest

from pluggably.devtools.standins import Fault, Reply, ToolCallSpec
from pluggably.devtools.standins._base import count_tokens, echo_text
from pluggably.devtools.standins.anthropic import AnthropicStandIn, sample_from_schema

API_KEY = "sk-ant-test"
RAW_HEADERS = {
    "x-api-key": API_KEY,
    "anthropic-version": "2023-06-01",
    "content-type": "application/json",
}
# A real 1x1 PNG.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJ"
    "RU5ErkJggg=="
)
JPEG_B64 = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32).decode()
HELLO = [{"role": "user", "content": "Hello there, stand-in!"}]
WEATHER_TOOLS = [
    {
        "name": "lookup_time",
        "description": "Current time",
        "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "detailed": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}},
                    "required": ["lat"],
                },
            },
            "required": ["city"],
        },
    },
]
WEATHER_INPUT = {
    "city": "stand-in",
    "days": 1,
    "unit": "celsius",
    "detailed": True,
    "tags": [],
    "where": {"lat": 1},
}


@pytest.fixture(scope="module")
async def standin():
    async with AnthropicStandIn(api_key=API_KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(standin: AnthropicStandIn):
    standin.reset()
    yield


@pytest.fixture
async def client(standin: AnthropicStandIn):
    # Closed on teardown, so its pooled connections do not outlive the test.
    async with anthropic.AsyncAnthropic(
        api_key=API_KEY, base_url=standin.base_url, max_retries=0, timeout=5
    ) as sdk:
        yield sdk


async def raw_request(
    standin: AnthropicStandIn,
    body: Any = None,
    *,
    path: str = "/v1/messages",
    method: str = "POST",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request without an SDK in the way: status, headers, body bytes."""
    payload = (
        data if data is not None else (json.dumps(body).encode() if body is not None else None)
    )
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            standin.base_url + path,
            data=payload,
            headers=RAW_HEADERS if headers is None else headers,
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event, in order."""
    events = []
    for chunk in raw.decode().split("\n\n"):
        if not chunk.strip():
            continue
        name, data = None, []
        for line in chunk.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        events.append((name, "\n".join(data)))
    return events


def body_of(**overrides: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": HELLO, **overrides}


# ---- text ----------------------------------------------------------------------------------


async def test_unary_text_echoes_and_counts_usage(standin, client) -> None:
    raw = await client.messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=100, system="Be terse.", messages=HELLO
    )
    message = await raw.parse()
    expected = echo_text("anthropic", "Hello there, stand-in!")
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == expected
    assert message.model == "claude-haiku-4-5-20251001"  # the alias resolves to the dated id
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 2 + 3  # system + user words
    assert message.usage.output_tokens == count_tokens(expected)
    assert message.usage.cache_read_input_tokens == 0
    assert raw.headers["request-id"].startswith("req_")
    sent = standin.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["anthropic-version"] == "2026-10-21"


async def test_stream_deltas_join_to_the_unary_text(standin, client) -> None:
    unary = await client.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=HELLO)
    stream = await client.messages.create(
        model="claude-haiku-4-5", max_tokens=100, messages=HELLO, stream=True
    )
    events = [event async for event in stream]
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert types[1:3] == ["content_block_start", "content_block_delta"]  # pings are skipped
    start = events[0].message
    assert start.usage.input_tokens == unary.usage.input_tokens
    assert start.stop_reason is None and start.content == []
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert len(deltas) == count_tokens(unary.content[0].text)  # one delta per word by default
    assert "".join(deltas) == unary.content[0].text
    final_delta = next(e for e in events if e.type == "message_delta")
    assert final_delta.delta.stop_reason == "end_turn"
    assert final_delta.usage.output_tokens == unary.usage.output_tokens

    async with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=100, messages=HELLO
    ) as helper:
        text = "".join([piece async for piece in helper.text_stream])
        final = await helper.get_final_message()
    assert text == unary.content[0].text == final.content[0].text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        unary.usage.input_tokens,
        unary.usage.output_tokens,
    )


async def test_raw_stream_framing_has_pings_and_named_events(standin) -> None:
    standin.script(
        Reply(text="one two", tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"})])
    )
    status, headers, raw = await raw_request(standin, body_of(stream=True, tools=WEATHER_TOOLS))
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["request-id"].startswith("req_")
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    first_stop = names.index("content_block_stop")
    assert names[first_stop + 1] == "ping"  # between the text and the tool_use block
    for name, data in events:  # the event name always repeats the payload's type
        assert json.loads(data)["type"] == name
    assert raw.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


async def test_scripted_reply_sets_chunks_usage_model_and_stop_reason(standin, client) -> None:
    standin.script(
        Reply(
            text="alpha beta gamma delta",
            chunks=2,
            prompt_tokens=11,
            completion_tokens=7,
            model="claude-reported",
            finish_reason="refusal",
        )
    )
    async with client.messages.stream(
        model="claude-opus-4-6", max_tokens=50, messages=HELLO
    ) as helper:
        events = [e async for e in helper]
        final = await helper.get_final_message()
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert deltas == ["alpha beta ", "gamma delta"]
    assert final.model == "claude-reported"
    assert final.stop_reason == "refusal"
    assert final.stop_details is not None and final.stop_details.type == "refusal"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 7)


async def test_max_tokens_truncates_with_max_tokens_stop_reason(standin, client) -> None:
    unary = await client.messages.create(model="claude-sonnet-4-6", max_tokens=3, messages=HELLO)
    assert unary.content[0].text == "Hello from the"
    assert unary.stop_reason == "max_tokens"
    assert unary.usage.output_tokens == 3
    async with client.messages.stream(
        model="claude-sonnet-4-6", max_tokens=3, messages=HELLO
    ) as helper:
        final = await helper.get_final_message()
    assert final.content[0].text == "Hello from the"
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3


async def test_stop_sequences_cut_the_echo(standin, client) -> None:
    message = await client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        messages=HELLO,
        stop_sequences=["zzz", "stand-in"],
    )
    assert message.content[0].text == "Hello from the anthropic "
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "stand-in"
    assert message.usage.output_tokens == 4


async def test_prefill_and_temperature_one_are_accepted(standin, client) -> None:
    message = await client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=20,
        extra_body={"temperature": 1, "top_k": 5},
        messages=[*HELLO, {"role": "assistant", "content": "Sure:"}],
    )
    assert message.stop_reason == "end_turn"
    assert standin.requests[-1].body["temperature"] == 1


# ---- tools ---------------------------------------------------------------------------------


async def test_forced_tool_is_called_with_schema_arguments(standin, client) -> None:
    message = await client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        messages=HELLO,
        tools=WEATHER_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    [call] = message.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.id.startswith("toolu_")
    assert call.input == WEATHER_INPUT
    assert message.usage.output_tokens == count_tokens(
        json.dumps(WEATHER_INPUT, separators=(",", ":"))
    )


async def test_auto_tool_choice_calls_the_first_tool(standin, client) -> None:
    message = await client.messages.create(
        model="claude-sonnet-4-6", max_tokens=100, messages=HELLO, tools=WEATHER_TOOLS
    )
    assert [(b.type, b.name, b.input) for b in message.content] == [
        ("tool_use", "lookup_time", {"zone": "stand-in"})
    ]


async def test_tool_choice_none_answers_in_text(standin, client) -> None:
    message = await client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        messages=HELLO,
        tools=WEATHER_TOOLS,
        tool_choice={"type": "none"},
    )
    assert message.content[0].text == echo_text("anthropic", "Hello there, stand-in!")
    assert message.stop_reason == "end_turn"


async def test_streamed_text_then_tool_use_accumulates(standin, client) -> None:
    arguments = {"city": "Paris", "days": 3, "note": "ünïcode"}
    standin.script(
        Reply(
            text="Let me check.",
            tool_calls=[ToolCallSpec("get_weather", arguments, id="toolu_fixed")],
        )
    )
    stream = await client.messages.create(
        model="claude-sonnet-4-6", max_tokens=100, messages=HELLO, tools=WEATHER_TOOLS, stream=True
    )
    events = [e async for e in stream]
    fragments = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert fragments[0] == ""  # the real API opens with an empty fragment
    assert len([f for f in fragments if f]) >= 3
    assert json.loads("".join(fragments)) == arguments
    tool_start = next(e for e in events if e.type == "content_block_start" and e.index == 1)
    assert tool_start.content_block.input == {}

    standin.script(
        Reply(
            text="Let me check.",
            tool_calls=[ToolCallSpec("get_weather", arguments, id="toolu_fixed")],
        )
    )
    async with client.messages.stream(
        model="claude-sonnet-4-6", max_tokens=100, messages=HELLO, tools=WEATHER_TOOLS
    ) as helper:
        final = await helper.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Let me check."
    assert (final.content[1].id, final.content[1].name, final.content[1].input) == (
        "toolu_fixed",
        "get_weather",
        arguments,
    )
    assert final.stop_reason == "tool_use"


async def test_tool_result_gets_acknowledged(standin, client) -> None:
    message = await client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        tools=WEATHER_TOOLS,
        messages=[
            *HELLO,
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_a",
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_a",
                        "content": [{"type": "text", "text": "18 degrees"}],
                    }
                ],
            },
        ],
    )
    assert message.content[0].text == "Tool result received: 18 degrees"
    assert message.stop_reason == "end_turn"
    # Hello there, stand-in! (3) + {"city":"Oslo"} (1) + 18 degrees (2)
    assert message.usage.input_tokens == 6


# ---- structured output and images ----------------------------------------------------------


class Person(pydantic.BaseModel):
    name: str
    age: int
    admin: bool


async def test_json_schema_output(standin, client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string"},
            "score": {"type": "number"},
            "kind": {"enum": ["a", "b"]},
            "items": {"type": "array"},
            "extra": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
        },
        "required": ["answer"],
        "additionalProperties": False,
    }
    message = await client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        messages=HELLO,
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert json.loads(message.content[0].text) == {
        "answer": "stand-in",
        "score": 1,
        "kind": "a",
        "items": [],
        "extra": 1,
    }
    parsed = await client.messages.parse(
        model="claude-sonnet-4-6", max_tokens=100, messages=HELLO, output_format=Person
    )
    assert parsed.parsed_output == Person(name="stand-in", age=1, admin=True)


def test_sample_from_schema_resolves_refs() -> None:
    schema = {
        "$defs": {"Inner": {"type": "object", "properties": {"x": {"type": "boolean"}}}},
        "type": "object",
        "properties": {"inner": {"$ref": "#/$defs/Inner"}},
        "required": ["unlisted"],
    }
    assert sample_from_schema(schema) == {"inner": {"x": True}, "unlisted": "stand-in"}


async def test_images_are_accepted_counted_and_mentioned(standin, client) -> None:
    message = await client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.jpg"},
                    },
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    )
    assert message.content[0].text == (
        echo_text("anthropic", "What is this?") + " (saw 2 image(s))"
    )
    assert message.usage.input_tokens == 3 + 2 * 85


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"type": "base64", "media_type": "image/png", "data": JPEG_B64},
            "messages.0.content.0.image.source.base64.data: The image was specified using the "
            "image/png media type, but the image appears to be a image/jpeg image",
        ),
        (
            {"type": "base64", "media_type": "image/bmp", "data": PNG_B64},
            "messages.0.content.0.image.source.base64.media_type: Input should be 'image/jpeg', "
            "'image/png', 'image/gif' or 'image/webp'",
        ),
        (
            {"type": "base64", "media_type": "image/png", "data": "not base64!"},
            "messages.0.content.0.image.source.base64.data: invalid base64 data",
        ),
        (
            {
                "type": "base64",
                "media_type": "image/png",
                "data": base64.b64encode(b"hello").decode(),
            },
            "Could not process image",
        ),
        (
            {"type": "url", "url": "ftp://example.com/a.png"},
            "messages.0.content.0.image.source.url.url: Input should be a valid URL",
        ),
    ],
)
async def test_bad_images_are_rejected(standin, source, message) -> None:
    body = body_of(messages=[{"role": "user", "content": [{"type": "image", "source": source}]}])
    status, _, raw = await raw_request(standin, body)
    assert status == 400
    assert json.loads(raw)["error"] == {"type": "invalid_request_error", "message": message}


# ---- models --------------------------------------------------------------------------------


async def test_model_list_pages(standin, client) -> None:
    first = await client.models.list(limit=2)
    assert [m.id for m in first.data] == ["claude-sonnet-4-6", "claude-opus-4-6"]
    assert first.has_more is True and first.last_id == "claude-opus-4-6"
    assert first.data[0].display_name == "Claude Sonnet 4.6"
    assert first.data[0].created_at.year == 2026
    everything = [m async for m in await client.models.list(limit=2)]
    assert [m.id for m in everything] == [
        "claude-sonnet-4-6",
        "claude-opus-4-6",
        "claude-haiku-4-5-20251001",
        "claude-sonnet-4-5-20250929",
        "claude-standin-tiny",
        "claude-instant-1.2",
    ]
    assert len([r for r in standin.requests if r.path == "/v1/models"]) == 1 + 3
    tiny = next(m for m in everything if m.id == "claude-standin-tiny")
    assert (tiny.max_input_tokens, tiny.max_tokens) == (64, 32)
    assert [m.lifecycle for m in everything].count("deprecated") == 2

    backwards = await client.models.list(limit=2, before_id="claude-standin-tiny")
    assert [m.id for m in backwards.data] == [
        "claude-haiku-4-5-20251001",
        "claude-sonnet-4-5-20250929",
    ]
    assert backwards.has_more is True and backwards.first_id == "claude-haiku-4-5-20251001"
    retired = await client.models.list(lifecycle=["retired"])
    assert [m.id for m in retired.data] == ["claude-2.1"] and retired.has_more is False

    one = await client.models.retrieve("claude-haiku-4-5")
    assert one.id == "claude-haiku-4-5-20251001" and one.type == "model"
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("claude-2.1")
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="claude-2.1", max_tokens=10, messages=HELLO)


async def test_model_list_rejects_bad_limit(standin) -> None:
    status, _, raw = await raw_request(standin, path="/v1/models?limit=0", method="GET")
    assert status == 400
    assert (
        json.loads(raw)["error"]["message"] == "limit: Input should be greater than or equal to 1"
    )


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exception", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (402, anthropic.PaymentRequiredError, "billing_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (413, anthropic.ContentTooLargeError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (504, anthropic.GatewayTimeoutError, "timeout_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_status_faults_map_to_sdk_exceptions(
    standin, client, status, exception, error_type
) -> None:
    standin.inject(Fault("status", status=status, message=f"boom {status}"))
    with pytest.raises(exception) as caught:
        await client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HELLO)
    error = caught.value
    assert error.status_code == status
    assert error.type == error_type
    assert error.api_message == f"boom {status}"
    assert error.body["type"] == "error"
    assert error.request_id == error.body["request_id"]
    assert error.request_id.startswith("req_")


async def test_error_type_override_and_retry_after(standin, client) -> None:
    standin.inject(Fault("status", status=500, error_type="overloaded_error", retry_after=2))
    with pytest.raises(anthropic.InternalServerError) as caught:
        await client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HELLO)
    assert caught.value.type == "overloaded_error"
    assert caught.value.response.headers["retry-after"] == "2"


async def test_sdk_retries_after_the_retry_after_hint(standin) -> None:
    standin.inject(Fault("status", status=429, retry_after=0.3))
    async with anthropic.AsyncAnthropic(
        api_key=API_KEY, base_url=standin.base_url, max_retries=1, timeout=5
    ) as retrying:
        message = await retrying.messages.create(
            model="claude-sonnet-4-6", max_tokens=10, messages=HELLO
        )
    assert message.stop_reason in ("end_turn", "max_tokens")
    first, second = standin.requests
    assert second.at - first.at >= 0.28


async def test_faults_can_target_the_model_listing(standin, client) -> None:
    standin.inject(Fault("status", status=529, path="/v1/models"))
    with pytest.raises(anthropic.OverloadedError):
        await client.models.list()
    assert (await client.models.list()).data


async def test_unknown_and_unservable_models(standin, client) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        await client.messages.create(model="claude-nope", max_tokens=10, messages=HELLO)
    assert caught.value.api_message == "model: claude-nope"
    assert caught.value.type == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model="claude-instant-1.2", max_tokens=10, messages=HELLO)
    assert "not supported by the Messages API" in caught.value.api_message


async def test_context_window_and_output_limits(standin, client) -> None:
    def words(n: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": " ".join(["word"] * n)}]

    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model="claude-standin-tiny", max_tokens=32, messages=words(40))
    assert caught.value.api_message == (
        "input length and `max_tokens` exceed context limit: 40 + 32 > 64, decrease input "
        "length or `max_tokens` and try again"
    )
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model="claude-standin-tiny", max_tokens=1, messages=words(70))
    assert caught.value.api_message == "prompt is too long: 70 tokens > 64 maximum"
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model="claude-standin-tiny", max_tokens=33, messages=words(1))
    assert caught.value.api_message == (
        "max_tokens: 33 > 32, which is the maximum allowed number of output tokens for "
        "claude-standin-tiny"
    )
    ok = await client.messages.create(
        model="claude-standin-tiny", max_tokens=32, messages=words(32)
    )
    assert ok.usage.input_tokens == 32


async def test_count_tokens(standin, client) -> None:
    counted = await client.messages.count_tokens(
        model="claude-sonnet-4-6", messages=HELLO, system="Be terse."
    )
    assert counted.input_tokens == 5


TOOL_USE = {
    "role": "assistant",
    "content": [{"type": "tool_use", "id": "toolu_x", "name": "get_weather", "input": {}}],
}


@pytest.mark.parametrize(
    ("headers", "body", "status", "error_type", "message"),
    [
        (
            {"anthropic-version": "2023-06-01"},
            body_of(),
            401,
            "authentication_error",
            "x-api-key header is required",
        ),
        (
            {"x-api-key": "wrong", "anthropic-version": "2023-06-01"},
            body_of(),
            401,
            "authentication_error",
            "invalid x-api-key",
        ),
        (
            {"authorization": "Bearer wrong", "anthropic-version": "2023-06-01"},
            body_of(),
            401,
            "authentication_error",
            "invalid x-api-key",
        ),
        (
            {"x-api-key": API_KEY},
            body_of(),
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
        ),
        (
            {"x-api-key": API_KEY, "anthropic-version": "2099-01-01"},
            body_of(),
            400,
            "invalid_request_error",
            'anthropic-version: "2099-01-01" is not a valid version',
        ),
        (
            None,
            {"model": "claude-sonnet-4-6", "messages": HELLO},
            400,
            "invalid_request_error",
            "max_tokens: Field required",
        ),
        (
            None,
            body_of(max_tokens=0),
            400,
            "invalid_request_error",
            "max_tokens: Input should be greater than or equal to 1",
        ),
        (
            None,
            body_of(max_tokens="64"),
            400,
            "invalid_request_error",
            "max_tokens: Input should be a valid integer",
        ),
        (
            None,
            body_of(frequency_penalty=0.5),
            400,
            "invalid_request_error",
            "frequency_penalty: Extra inputs are not permitted",
        ),
        (
            None,
            body_of(temperature=1.5),
            400,
            "invalid_request_error",
            "temperature: Input should be less than or equal to 1",
        ),
        (
            None,
            body_of(top_p=-0.1),
            400,
            "invalid_request_error",
            "top_p: Input should be greater than or equal to 0",
        ),
        (
            None,
            body_of(messages=[{"role": "system", "content": "Be nice."}, *HELLO]),
            400,
            "invalid_request_error",
            'messages: Unexpected role "system". The Messages API accepts a '
            'top-level `system` parameter, not "system" as an input message role.',
        ),
        (
            None,
            body_of(messages=[{"role": "tool", "content": "x"}]),
            400,
            "invalid_request_error",
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
        (
            None,
            body_of(messages=[]),
            400,
            "invalid_request_error",
            "messages: at least one message is required",
        ),
        (
            None,
            body_of(messages=[{"role": "user", "content": ""}]),
            400,
            "invalid_request_error",
            "messages.0: all messages must have non-empty content except for the optional final "
            "assistant message",
        ),
        (
            None,
            body_of(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}]),
            400,
            "invalid_request_error",
            "messages: text content blocks must be non-empty",
        ),
        (
            None,
            body_of(messages=[*HELLO, {"role": "assistant", "content": "Sure: "}]),
            400,
            "invalid_request_error",
            "messages: final assistant content cannot end with trailing whitespace",
        ),
        (
            None,
            body_of(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_ghost", "content": "x"}
                        ],
                    }
                ]
            ),
            400,
            "invalid_request_error",
            "messages.0.content.0: unexpected `tool_use_id` found in "
            "`tool_result` blocks: toolu_ghost. Each `tool_result` block must have a corresponding "
            "`tool_use` block in the previous message.",
        ),
        (
            None,
            body_of(messages=[*HELLO, TOOL_USE, *HELLO]),
            400,
            "invalid_request_error",
            "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: "
            "toolu_x. Each `tool_use` block must have a corresponding `tool_result` block in the next "
            "message.",
        ),
        (
            None,
            body_of(messages=[{"role": "user", "content": [{"type": "video"}]}]),
            400,
            "invalid_request_error",
            "messages.0.content.0: Input tag 'video' found using 'type' does "
            "not match any of the expected tags: 'text', 'image', 'tool_use', 'tool_result', "
            "'thinking', 'redacted_thinking'",
        ),
        (
            None,
            body_of(tool_choice={"type": "any"}),
            400,
            "invalid_request_error",
            "tool_choice may only be specified while providing tools",
        ),
        (
            None,
            body_of(tools=[{"name": "bad name", "input_schema": {"type": "object"}}]),
            400,
            "invalid_request_error",
            "tools.0.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'",
        ),
        (
            None,
            body_of(tools=[{"name": "f"}]),
            400,
            "invalid_request_error",
            "tools.0.custom.input_schema: Field required",
        ),
        (
            None,
            body_of(tools=[{"name": "f", "parameters": {"type": "object"}}]),
            400,
            "invalid_request_error",
            "tools.0.custom.parameters: Extra inputs are not permitted",
        ),
        (
            None,
            body_of(stop_sequences=["  "]),
            400,
            "invalid_request_error",
            "stop_sequences: each stop sequence must contain non-whitespace",
        ),
        (
            None,
            body_of(metadata={"session": "x"}),
            400,
            "invalid_request_error",
            "metadata.session: Extra inputs are not permitted",
        ),
        (
            None,
            body_of(output_config={"format": {"type": "json_object"}}),
            400,
            "invalid_request_error",
            "output_config.format.type: Input should be 'json_schema'",
        ),
        (
            None,
            body_of(thinking={"type": "enabled", "budget_tokens": 2048}),
            400,
            "invalid_request_error",
            "`max_tokens` must be greater than `thinking.budget_tokens`",
        ),
    ],
)
async def test_request_rules(standin, headers, body, status, error_type, message) -> None:
    sent = {**(RAW_HEADERS if headers is None else headers), "content-type": "application/json"}
    got_status, got_headers, raw = await raw_request(standin, body, headers=sent)
    error = json.loads(raw)
    assert (got_status, error["error"]) == (status, {"type": error_type, "message": message})
    assert error["type"] == "error"
    assert error["request_id"] == got_headers["request-id"]
    assert standin.replies == []


async def test_both_auth_styles_are_accepted(standin) -> None:
    for auth in ({"x-api-key": API_KEY}, {"authorization": f"Bearer {API_KEY}"}):
        status, _, raw = await raw_request(
            standin, body_of(), headers={**auth, "anthropic-version": "2023-06-01"}
        )
        assert status == 200 and json.loads(raw)["type"] == "message"


async def test_no_api_key_accepts_anyone() -> None:
    async with AnthropicStandIn(api_key=None) as open_standin:
        status, _, raw = await raw_request(
            open_standin, body_of(), headers={"anthropic-version": "2023-06-01"}
        )
    assert status == 200 and json.loads(raw)["stop_reason"] == "end_turn"


async def test_non_json_body_oversize_body_and_unknown_path(standin) -> None:
    status, _, raw = await raw_request(standin, data=b"{not json")
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    standin.max_request_bytes = 100
    try:
        status, _, raw = await raw_request(standin, body_of(system="x " * 100))
    finally:
        standin.max_request_bytes = 32 * 1024 * 1024
    assert status == 413
    assert json.loads(raw)["error"]["type"] == "request_too_large"
    status, headers, raw = await raw_request(standin, path="/v1/completions-nope")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    assert headers["request-id"].startswith("req_")


# ---- stream faults -------------------------------------------------------------------------


async def stream_all(client: anthropic.AsyncAnthropic) -> list[Any]:
    stream = await client.messages.create(
        model="claude-sonnet-4-6", max_tokens=100, messages=HELLO, stream=True
    )
    return [event async for event in stream]


async def test_in_stream_error_raises_in_the_sdk(standin, client) -> None:
    standin.inject(Fault("stream_error", after_chunks=4))
    # The error arrives under HTTP 200, so the SDK raises the base APIStatusError (status 200),
    # not OverloadedError: the error type is only in the payload.
    with pytest.raises(anthropic.APIStatusError) as caught:
        await stream_all(client)
    assert not isinstance(caught.value, anthropic.OverloadedError)
    assert caught.value.status_code == 200
    assert caught.value.type == "overloaded_error"
    assert caught.value.api_message == "Overloaded"

    standin.inject(
        Fault(
            "stream_error", after_chunks=2, error_type="api_error", message="Internal server error"
        )
    )
    status, _, raw = await raw_request(standin, body_of(stream=True))
    assert status == 200
    events = sse_events(raw)
    assert len(events) == 3 and events[-1][0] == "error"
    assert json.loads(events[-1][1]) == {
        "type": "error",
        "error": {"type": "api_error", "message": "Internal server error"},
    }


async def test_drop_mid_stream(standin, client) -> None:
    standin.inject(Fault("drop_mid_stream", after_chunks=4))
    with pytest.raises(httpx2.RemoteProtocolError):  # the SDK does not wrap mid-stream errors
        await stream_all(client)
    standin.inject(Fault("drop_mid_stream", after_chunks=4))
    with pytest.raises(aiohttp.ClientPayloadError):
        await raw_request(standin, body_of(stream=True))


async def test_malformed_chunk_breaks_the_json_decoder(standin, client) -> None:
    standin.inject(Fault("malformed_chunk", after_chunks=3))
    with pytest.raises(json.JSONDecodeError):
        await stream_all(client)
    standin.inject(Fault("malformed_chunk", after_chunks=3))
    _, _, raw = await raw_request(standin, body_of(stream=True))
    name, data = sse_events(raw)[3]
    assert name == "content_block_delta"
    with pytest.raises(json.JSONDecodeError):
        json.loads(data)


async def test_missing_terminator_looks_complete_to_the_sdk(standin, client) -> None:
    standin.inject(Fault("no_terminator"))
    _, _, raw = await raw_request(standin, body_of(stream=True))
    assert b"message_stop" not in raw and b"event: message_delta" in raw
    standin.inject(Fault("no_terminator"))
    # The SDK raises nothing and the helper even has a stop_reason (message_delta came):
    # only the missing message_stop tells a gateway the stream did not finish.
    async with client.messages.stream(
        model="claude-sonnet-4-6", max_tokens=100, messages=HELLO
    ) as helper:
        events = [e async for e in helper]
        final = await helper.get_final_message()
    assert "message_stop" not in [e.type for e in events]
    assert final.stop_reason == "end_turn"


async def test_hang_mid_stream_pauses_then_finishes(standin, client) -> None:
    standin.inject(Fault("hang_mid_stream", after_chunks=3, seconds=0.3))
    began = time.monotonic()
    events = await stream_all(client)
    assert time.monotonic() - began >= 0.3
    assert events[-1].type == "message_stop"


async def test_clients_giving_up_during_hangs_count_as_disconnects(standin) -> None:
    async with anthropic.AsyncAnthropic(
        api_key=API_KEY, base_url=standin.base_url, max_retries=0, timeout=0.3
    ) as impatient:
        standin.inject(Fault("hang_before_headers", seconds=3))
        with pytest.raises(anthropic.APITimeoutError):
            await impatient.messages.create(
                model="claude-sonnet-4-6", max_tokens=10, messages=HELLO
            )
        standin.inject(Fault("hang_mid_stream", after_chunks=3, seconds=3))
        with pytest.raises(httpx2.ReadTimeout):  # mid-stream, the SDK lets httpx2's error through
            await stream_all(impatient)
    for _ in range(50):
        if standin.disconnects == 2:
            break
        await asyncio.sleep(0.02)
    assert standin.disconnects == 2
    assert standin.active == 0


async def test_reset_is_a_connection_error(standin, client) -> None:
    standin.inject(Fault("reset"))
    with pytest.raises(anthropic.APIConnectionError):
        await client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HELLO)
