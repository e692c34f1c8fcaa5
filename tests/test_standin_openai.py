"""The OpenAI stand-in speaks Chat Completions exactly enough for the official SDK to parse all of
it, and refuses what the real API refuses with the real error shapes."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel

from pluggably.devtools.standins import Fault, Reply, ToolCallSpec
from pluggably.devtools.standins._base import count_tokens, echo_text
from pluggably.devtools.standins.openai import (
    DEFAULT_MODELS,
    OpenAIModel,
    OpenAIStandIn,
    sample_from_schema,
)

API_KEY = "sk-standin-test-0123456789"
MODEL = "gpt-4o-mini"
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
PNG_DATA_URL = "data:image/png;base64," + base64.b64encode(PNG_1X1).decode()

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "detailed": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
            },
            "required": ["city"],
        },
    },
}
WEATHER_ARGS = {
    "city": "stand-in",
    "unit": "celsius",
    "days": 1,
    "detailed": True,
    "tags": [],
    "where": {"lat": 1},
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
async def standin():
    async with OpenAIStandIn(api_key=API_KEY) as s:
        yield s


@pytest.fixture
def s(standin: OpenAIStandIn) -> OpenAIStandIn:
    standin.reset()
    return standin


@pytest.fixture
async def client(s: OpenAIStandIn):
    async with AsyncOpenAI(
        api_key=API_KEY, base_url=f"{s.base_url}/v1", max_retries=0, timeout=5
    ) as c:
        yield c


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def post(
    s: OpenAIStandIn, body: Any, *, key: str | None = API_KEY, path: str = "/v1/chat/completions"
) -> tuple[int, Any, Any]:
    """Raw POST: status, parsed JSON body (or raw bytes), headers."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as session:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with session.post(
            s.base_url + path, data=data, headers={**headers, "Content-Type": "application/json"}
        ) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw
            return resp.status, parsed, resp.headers


def sse_events(raw: bytes) -> list[str]:
    """Each SSE event's data (multi-line data joined with "\\n"), comments skipped."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = [line[len("data: ") :] for line in block.split("\n") if line.startswith("data: ")]
        if lines:
            events.append("\n".join(lines))
    return events


def assert_error(
    body: Any,
    *,
    message: str,
    code: str | None = None,
    type_: str = "invalid_request_error",
    param: str | None = None,
) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert message in body["error"]["message"]
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param


# ---- text ---------------------------------------------------------------------------------------


async def test_unary_text_echoes_with_usage_and_dated_model(s, client):
    messages = [{"role": "system", "content": "Be brief."}, *user("Hello there, stand-in")]
    raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
    assert raw.headers["x-request-id"].startswith("req_")
    completion = raw.parse()
    expected = echo_text("openai", "Hello there, stand-in")
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert completion.system_fingerprint.startswith("fp_")
    choice = completion.choices[0]
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "stop", None)
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.message.refusal is None and choice.message.tool_calls is None
    usage = completion.usage
    assert usage.prompt_tokens == count_tokens("Be brief. Hello there, stand-in") == 5
    assert usage.completion_tokens == count_tokens(expected)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details.reasoning_tokens == 0
    assert s.requests[-1].body["model"] == MODEL


async def test_streamed_text_matches_unary_with_usage_chunk(client):
    messages = user("Tell me something")
    unary = await client.chat.completions.create(model=MODEL, messages=messages)
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == "gpt-4o-mini-2024-07-18" for c in chunks)
    assert all(c.obfuscation for c in chunks)
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    final_choice = chunks[-2].choices[0]
    assert final_choice.finish_reason == "stop" and final_choice.delta.content is None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == unary.usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


async def stream_raw(s: OpenAIStandIn, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{s.base_url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["x-request-id"].startswith("req_")
            return await resp.read()


async def test_stream_usage_and_obfuscation_follow_stream_options(s):
    raw = await stream_raw(s, {"model": MODEL, "messages": user("hi"), "stream": True})
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert all("usage" not in c and "obfuscation" in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    raw = await stream_raw(
        s,
        {
            "model": MODEL,
            "messages": user("hi"),
            "stream": True,
            "stream_options": {"include_obfuscation": False},
        },
    )
    assert all("obfuscation" not in json.loads(e) for e in sse_events(raw)[:-1])


async def test_stream_raw_framing(s):
    raw = await stream_raw(
        s,
        {
            "model": MODEL,
            "messages": user("frame me"),
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert b"\n: keep-alive\n\n" in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    # One chunk's JSON is spread over two data: lines: only the joined text parses.
    lines = raw.split(b"\n")
    split_at = [
        i
        for i, line in enumerate(lines)
        if line.startswith(b"data: ") and lines[i + 1].startswith(b"data: ")
    ]
    assert split_at
    with pytest.raises(ValueError):
        json.loads(lines[split_at[0]][6:])
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(isinstance(c["obfuscation"], str) and c["obfuscation"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


async def test_max_tokens_truncates_with_length(client):
    messages = user("one two three four five")
    completion = await client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=4
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "Hello from the openai"
    assert completion.usage.completion_tokens == 4
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the openai"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_stop_sequence_cuts_default_text(client):
    completion = await client.chat.completions.create(
        model=MODEL, messages=user("x"), stop=["stand-in"]
    )
    assert completion.choices[0].message.content == "Hello from the openai "
    assert completion.choices[0].finish_reason == "stop"


async def test_scripted_reply_overrides_everything(s, client):
    s.script(
        Reply(
            text="alpha beta gamma delta",
            chunks=3,
            prompt_tokens=11,
            completion_tokens=7,
            model="gpt-4o-mini-2099-01-01",
        )
    )
    stream = await client.chat.completions.create(
        model=MODEL, messages=user("hi"), stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert deltas == ["alpha beta ", "gamma ", "delta"]
    assert chunks[-1].usage.prompt_tokens == 11 and chunks[-1].usage.completion_tokens == 7
    assert {c.model for c in chunks} == {"gpt-4o-mini-2099-01-01"}
    s.script(Reply(text="blocked words", finish_reason="content_filter"))
    completion = await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content == ""
    s.script(Reply(text="a b c", finish_reason="content_filter"))
    stream = await client.chat.completions.create(model=MODEL, messages=user("hi"), stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "content_filter"


# ---- tools --------------------------------------------------------------------------------------


async def test_tool_call_unary_from_schema(client):
    completion = await client.chat.completions.create(
        model=MODEL, messages=user("Weather in Paris?"), tools=[WEATHER_TOOL, TIME_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGS
    assert completion.usage.completion_tokens == count_tokens(call.function.arguments)


async def test_forced_tool_choice_calls_that_tool_and_finishes_with_stop(client):
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=user("What time is it?"),
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    choice = completion.choices[0]
    assert choice.message.tool_calls[0].function.name == "get_time"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"zone": "stand-in"}
    # The real API reports "stop" when the function was named in tool_choice.
    assert choice.finish_reason == "stop"
    none = await client.chat.completions.create(
        model=MODEL, messages=user("hi"), tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == echo_text("openai", "hi")


async def test_tool_call_streamed_and_accumulated_by_sdk(s, client):
    async with client.chat.completions.stream(
        model=MODEL,
        messages=user("Weather?"),
        tools=[WEATHER_TOOL],
        stream_options={"include_usage": True},
    ) as stream:
        final = await stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGS
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage.completion_tokens == count_tokens(call.function.arguments)

    s.script(
        Reply(
            tool_calls=[
                ToolCallSpec("get_weather", {"city": "Oslo"}, id="call_fixed1"),
                ToolCallSpec("get_time", {"zone": "CET"}),
            ]
        )
    )
    raw = await stream_raw(
        s,
        {
            "model": MODEL,
            "messages": user("both"),
            "stream": True,
            "tools": [WEATHER_TOOL, TIME_TOOL],
        },
    )
    deltas = [json.loads(e)["choices"][0]["delta"] for e in sse_events(raw)[:-1]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    heads = [c for c in calls if "id" in c]
    assert [(h["index"], h["id"], h["function"]) for h in heads[:1]] == [
        (0, "call_fixed1", {"name": "get_weather", "arguments": ""})
    ]
    assert heads[1]["index"] == 1 and heads[1]["id"].startswith("call_")
    for index, expected in ((0, {"city": "Oslo"}), (1, {"zone": "CET"})):
        fragments = [
            c["function"]["arguments"] for c in calls if c["index"] == index and "id" not in c
        ]
        assert len(fragments) >= 3
        assert all(set(c) == {"index", "function"} for c in calls if "id" not in c)
        assert json.loads("".join(fragments)) == expected


async def test_tool_result_gets_acknowledged(client):
    messages = [
        *user("Weather in Oslo?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "22C and sunny"},
    ]
    completion = await client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL]
    )
    assert completion.choices[0].message.content == "Tool result received: 22C and sunny"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == count_tokens(
        'Weather in Oslo? {"city":"Oslo"} 22C and sunny'
    )


# ---- JSON modes and images ----------------------------------------------------------------------


async def test_json_object_mode(client):
    completion = await client.chat.completions.create(
        model=MODEL, messages=user("Answer in JSON please"), response_format={"type": "json_object"}
    )
    assert json.loads(completion.choices[0].message.content) == {
        "reply": echo_text("openai", "Answer in JSON please")
    }
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL, messages=user("no keyword"), response_format={"type": "json_object"}
        )
    assert "must contain the word 'json'" in err.value.message
    assert err.value.param == "messages"


class City(BaseModel):
    name: str
    population: int
    coastal: bool
    districts: list[str]


class Answer(BaseModel):
    city: City
    kind: str


async def test_strict_json_schema_parses_with_sdk(client):
    completion = await client.chat.completions.parse(
        model=MODEL, messages=user("Describe a city"), response_format=Answer
    )
    parsed = completion.choices[0].message.parsed
    assert parsed == Answer(
        city=City(name="stand-in", population=1, coastal=True, districts=[]), kind="stand-in"
    )


async def test_image_input_is_mentioned_and_counted(client):
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": PNG_DATA_URL, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}]
    )
    assert completion.choices[0].message.content == (
        echo_text("openai", "What is in these?") + " (saw 2 image(s))"
    )
    assert completion.usage.prompt_tokens == 4 + 2 * 85


# ---- models -------------------------------------------------------------------------------------


async def test_models_list_and_retrieve(client):
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [m.id for m in DEFAULT_MODELS]
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models)
    assert "text-embedding-3-small" in {m.id for m in models}
    tiny = await client.models.retrieve("standin-tiny-context")
    assert tiny.id == "standin-tiny-context" and tiny.owned_by == "pluggably"
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("gpt-nope")
    assert err.value.code == "model_not_found"


async def test_custom_models_and_open_auth():
    async with OpenAIStandIn(api_key=None, models=[OpenAIModel("local-llm", owned_by="me")]) as s:
        async with AsyncOpenAI(api_key="anything", base_url=f"{s.base_url}/v1", max_retries=0) as c:
            assert [m.id async for m in c.models.list()] == ["local-llm"]
            completion = await c.chat.completions.create(model="local-llm", messages=user("hi"))
        assert completion.model == "local-llm"


async def test_unknown_and_non_chat_models_are_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="gpt-9", messages=user("hi"))
    assert err.value.code == "model_not_found"
    assert "The model `gpt-9` does not exist" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="text-embedding-3-small", messages=user("hi"))
    assert "not a chat model" in err.value.message


# ---- errors through the SDK ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc_class", "type_", "code"),
    [
        (400, openai.BadRequestError, "invalid_request_error", None),
        (401, openai.AuthenticationError, "invalid_request_error", "invalid_api_key"),
        (403, openai.PermissionDeniedError, "invalid_request_error", None),
        (404, openai.NotFoundError, "invalid_request_error", "model_not_found"),
        (409, openai.ConflictError, "invalid_request_error", None),
        (422, openai.UnprocessableEntityError, "invalid_request_error", None),
        (429, openai.RateLimitError, "requests", "rate_limit_exceeded"),
        (500, openai.InternalServerError, "server_error", None),
        (503, openai.InternalServerError, "server_error", None),
    ],
)
async def test_status_faults_map_to_sdk_exceptions(s, client, status, exc_class, type_, code):
    s.inject(Fault("status", status=status, message=f"boom {status}"))
    with pytest.raises(exc_class) as err:
        await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert err.value.status_code == status
    assert err.value.message == f"Error code: {status} - boom {status}"
    assert (err.value.type, err.value.code) == (type_, code)
    assert err.value.request_id.startswith("req_")


async def test_rate_limit_retry_hints_and_quota_type(s, client):
    s.inject(Fault("status", status=429, retry_after=1.5))
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert err.value.response.headers["retry-after"] == "2"
    assert err.value.response.headers["retry-after-ms"] == "1500"
    assert "Rate limit reached" in err.value.message
    s.inject(Fault("status", status=429, error_type="insufficient_quota"))
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert (err.value.type, err.value.code) == ("insufficient_quota", "insufficient_quota")
    assert "exceeded your current quota" in err.value.message
    assert "retry-after" not in err.value.response.headers


async def test_in_stream_error_raises_api_error(s, client):
    s.inject(
        Fault(
            "stream_error",
            after_chunks=2,
            message="The model is overloaded.",
            error_type="server_error",
        )
    )
    stream = await client.chat.completions.create(
        model=MODEL, messages=user("hi there"), stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as err:
        async for chunk in stream:
            seen.append(chunk)
    assert not isinstance(err.value, openai.APIStatusError)  # it came under HTTP 200
    assert err.value.message == "The model is overloaded."
    assert err.value.type == "server_error"
    assert len(seen) == 2


# ---- what an SDK cannot send: raw requests ------------------------------------------------------


async def test_auth_is_checked(s):
    status, body, headers = await post(s, {"model": MODEL, "messages": user("hi")}, key=None)
    assert status == 401
    assert_error(body, message="You didn't provide an API key")
    assert headers["x-request-id"].startswith("req_")
    status, body, _ = await post(s, {"model": MODEL, "messages": user("hi")}, key="sk-wrong-key-99")
    assert status == 401
    assert_error(
        body, message="Incorrect API key provided: sk-********y-99", code="invalid_api_key"
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{s.base_url}/v1/models") as resp:
            assert resp.status == 401


@pytest.mark.parametrize(
    ("body", "message", "code", "param"),
    [
        (
            {"model": MODEL, "messages": user("hi"), "foo": 1},
            "Unrecognized request argument supplied: foo",
            None,
            None,
        ),
        ({"messages": user("hi")}, "you must provide a model parameter", None, None),
        (
            {"model": MODEL},
            "Missing required parameter: 'messages'.",
            "missing_required_parameter",
            "messages",
        ),
        ({"model": MODEL, "messages": []}, "Invalid 'messages': empty array.", "empty_array", None),
        (
            {"model": MODEL, "messages": [{"role": "bot", "content": "hi"}]},
            "Invalid value: 'bot'. Supported values are: 'system', 'assistant', 'user', 'function', "
            "'tool', and 'developer'.",
            "invalid_value",
            "messages[0].role",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user"}]},
            "Missing required parameter: 'messages[0].content'.",
            "missing_required_parameter",
            None,
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi", "extra": 1}]},
            "Additional properties are not allowed ('extra' was unexpected)",
            None,
            None,
        ),
        (
            {"model": MODEL, "messages": user("hi"), "temperature": 3},
            "Invalid 'temperature': integer above maximum value. Expected a value <= 2, but got 3",
            "integer_above_max_value",
            "temperature",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "temperature": "hot"},
            "Invalid type for 'temperature': expected a decimal, but got a string instead.",
            "invalid_type",
            "temperature",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "top_p": 1.5},
            "decimal above maximum value",
            "decimal_above_max_value",
            "top_p",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "presence_penalty": -2.5},
            "decimal below minimum value",
            "decimal_below_min_value",
            "presence_penalty",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "n": 2},
            "'n' does not support 2",
            "unsupported_value",
            "n",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "max_tokens": 0},
            "integer below minimum value",
            "integer_below_min_value",
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "max_tokens": 5, "max_completion_tokens": 5},
            "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.",
            "invalid_parameter_combination",
            None,
        ),
        (
            {"model": MODEL, "messages": user("hi"), "max_tokens": 100000},
            "max_tokens is too large: 100000. This model supports at most 16384 completion tokens",
            "invalid_value",
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]},
            "Invalid 'stop': array too long. Expected an array with maximum length 4",
            "array_above_max_length",
            "stop",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "stream_options": {"include_usage": True}},
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            None,
            "stream_options",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "tool_choice": "auto"},
            "'tool_choice' is only allowed when 'tools' are specified.",
            None,
            "tool_choice",
        ),
        (
            {
                "model": MODEL,
                "messages": user("hi"),
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "function 'nope' is not one of the functions",
            "invalid_value",
            "tool_choice",
        ),
        (
            {"model": MODEL, "messages": user("hi"), "logit_bias": {"50256": 101}},
            "integer above maximum value",
            "integer_above_max_value",
            None,
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}],
            },
            "Invalid parameter: messages with role 'tool' must be a response to a preceeding message "
            "with 'tool_calls'.",
            None,
            "messages.[0].role",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    *user("hi"),
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_2", "content": "x"},
                ],
            },
            "Invalid parameter: 'tool_call_id' of 'call_2' not found in 'tool_calls' of previous "
            "message.",
            None,
            "messages.[2].tool_call_id",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    *user("hi"),
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    },
                    *user("and?"),
                ],
            },
            "An assistant message with 'tool_calls' must be followed by tool messages responding to "
            "each 'tool_call_id'. The following tool_call_ids did not have response messages: call_1",
            None,
            "messages.[1].role",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": PNG_DATA_URL}}],
                    },
                    *user("hi"),
                ],
            },
            "Image URLs are only allowed for messages with role 'user'",
            "invalid_value",
            None,
        ),
        (
            {
                "model": MODEL,
                "messages": user("hi"),
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "out",
                        "strict": True,
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "string"}},
                            "required": ["a"],
                        },
                    },
                },
            },
            "Invalid schema for response_format 'out': In context=(), 'additionalProperties' is "
            "required to be supplied and to be false.",
            None,
            "response_format",
        ),
        (
            {
                "model": MODEL,
                "messages": user("hi"),
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "out",
                        "strict": True,
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["a"],
                            "properties": {
                                "a": {"type": "string"},
                                "b": {
                                    "type": "object",
                                    "properties": {"c": {"type": "integer"}},
                                    "additionalProperties": False,
                                },
                            },
                        },
                    },
                },
            },
            "Invalid schema for response_format 'out': In context=(), 'required' is required to be "
            "supplied and to be an array including every key in properties. Missing 'b'.",
            None,
            None,
        ),
        (
            {
                "model": MODEL,
                "messages": user("hi"),
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "strict": True,
                            "parameters": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["b"],
                                "properties": {
                                    "b": {
                                        "type": "object",
                                        "properties": {"c": {"type": "integer"}},
                                        "required": ["c"],
                                    }
                                },
                            },
                        },
                    }
                ],
            },
            "Invalid schema for function 'f': In context=('properties', 'b'), 'additionalProperties' "
            "is required to be supplied and to be false.",
            "invalid_function_parameters",
            "tools[0].function.parameters",
        ),
        (
            {
                "model": MODEL,
                "messages": user("hi"),
                "tools": [{"type": "function", "function": {"name": "bad name"}}],
            },
            "string does not match pattern",
            "invalid_value",
            None,
        ),
    ],
)
async def test_request_rules(s, body, message, code, param):
    status, error, _ = await post(s, body)
    assert status == 400, error
    assert_error(error, message=message, code=code, param=param)


async def test_unparsable_body_and_unknown_path(s):
    status, body, _ = await post(s, b"{not json")
    assert status == 400
    assert_error(body, message="We could not parse the JSON body of your request.")
    status, body, _ = await post(s, {"model": MODEL}, path="/v1/completionz")
    assert status == 404
    assert_error(body, message="Invalid URL (POST /v1/completionz)")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,!!notbase64!!", "Please make sure your image is valid."),
        (
            "data:image/png;base64," + base64.b64encode(b"plain text, not a picture").decode(),
            "You uploaded an unsupported image.",
        ),
        (
            "data:image/bmp;base64," + base64.b64encode(PNG_1X1).decode(),
            "You uploaded an unsupported image.",
        ),
    ],
)
async def test_bad_images_are_rejected(s, url, message):
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]
    status, body, _ = await post(
        s, {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    )
    assert status == 400
    assert_error(body, message=message, code="invalid_image_format")


async def test_bad_image_detail_and_scheme(s):
    for image, param in (
        ({"url": PNG_DATA_URL, "detail": "max"}, ".detail"),
        ({"url": "ftp://example.com/x.png"}, ".url"),
    ):
        content = [{"type": "image_url", "image_url": image}]
        status, body, _ = await post(
            s, {"model": MODEL, "messages": [{"role": "user", "content": content}]}
        )
        assert status == 400
        assert body["error"]["code"] == "invalid_value"
        assert body["error"]["param"] == "messages[0].content[0].image_url" + param


async def test_context_window_overflow(s):
    sentence = " ".join(f"w{i}" for i in range(40))
    status, body, _ = await post(
        s, {"model": "standin-tiny-context", "messages": user(sentence), "max_tokens": 30}
    )
    assert status == 400
    assert_error(
        body,
        code="context_length_exceeded",
        param="messages",
        message=(
            "This model's maximum context length is 64 tokens. However, you requested 70 tokens "
            "(40 in the messages, 30 in the completion). Please reduce the length of the messages "
            "or completion."
        ),
    )
    status, body, _ = await post(
        s, {"model": "standin-tiny-context", "messages": user(sentence + " " + sentence)}
    )
    assert status == 400
    assert_error(
        body,
        code="context_length_exceeded",
        message=("However, your messages resulted in 80 tokens."),
    )
    status, body, _ = await post(
        s, {"model": "standin-tiny-context", "messages": user(sentence), "max_tokens": 24}
    )
    assert status == 200 and body["model"] == "standin-tiny-context-2025-01-01"


async def test_compatible_server_mode_ignores_unknown_fields():
    async with OpenAIStandIn(api_key=API_KEY, reject_unknown_fields=False) as s:
        status, body, _ = await post(
            s, {"model": MODEL, "messages": user("hi"), "top_k": 5, "repetition_penalty": 1.1}
        )
        assert status == 200 and body["choices"][0]["message"]["content"]


async def test_rejected_requests_do_not_consume_scripted_replies(s, client):
    s.script(Reply(text="kept"))
    status, _, _ = await post(s, {"model": MODEL, "messages": user("hi"), "bogus": True})
    assert status == 400
    completion = await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert completion.choices[0].message.content == "kept"


# ---- stream and connection faults ---------------------------------------------------------------


async def wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def test_drop_mid_stream_raises_connection_error(s, client):
    s.inject(Fault("drop_mid_stream", after_chunks=3))
    stream = await client.chat.completions.create(
        model=MODEL, messages=user("hi there"), stream=True
    )
    seen = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 3


async def test_malformed_chunk_breaks_the_sdk_decoder(s, client):
    s.inject(Fault("malformed_chunk", after_chunks=2))
    stream = await client.chat.completions.create(model=MODEL, messages=user("hi"), stream=True)
    with pytest.raises(json.JSONDecodeError):
        async for _ in stream:
            pass


async def test_missing_terminator_goes_unnoticed_by_the_sdk(s, client):
    s.inject(Fault("no_terminator"))
    raw = await stream_raw(s, {"model": MODEL, "messages": user("hi"), "stream": True})
    assert b"[DONE]" not in raw and b'"finish_reason":"stop"' in raw
    # The SDK ends the iteration quietly: a gateway must notice the missing [DONE] itself.
    s.inject(Fault("no_terminator"))
    stream = await client.chat.completions.create(model=MODEL, messages=user("hi"), stream=True)
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_hang_mid_stream_times_out_and_counts_disconnect(s):
    s.inject(Fault("hang_mid_stream", after_chunks=2, seconds=5))
    async with AsyncOpenAI(
        api_key=API_KEY, base_url=f"{s.base_url}/v1", max_retries=0, timeout=0.3
    ) as c:
        stream = await c.chat.completions.create(model=MODEL, messages=user("hi"), stream=True)
        seen = []
        with pytest.raises(openai.APITimeoutError):
            async for chunk in stream:
                seen.append(chunk)
    assert len(seen) == 2
    await wait_for(lambda: s.disconnects == 1)


async def test_hang_before_headers_times_out_and_counts_disconnect(s):
    s.inject(Fault("hang_before_headers", seconds=5))
    async with AsyncOpenAI(
        api_key=API_KEY, base_url=f"{s.base_url}/v1", max_retries=0, timeout=0.3
    ) as c:
        with pytest.raises(openai.APITimeoutError):
            await c.chat.completions.create(model=MODEL, messages=user("hi"))
    await wait_for(lambda: s.disconnects == 1)
    assert s.active == 0


async def test_reset_raises_connection_error(s, client):
    s.inject(Fault("reset"))
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model=MODEL, messages=user("hi"))
    completion = await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert completion.choices[0].finish_reason == "stop"


def test_sample_from_schema_follows_refs_and_combinators():
    schema = {
        "type": "object",
        "properties": {
            "item": {"$ref": "#/$defs/Item"},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
            "kind": {"type": ["null", "string"]},
            "fixed": {"const": "x"},
        },
        "$defs": {"Item": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
    }
    assert sample_from_schema(schema) == {
        "item": {"ok": True},
        "maybe": 1,
        "kind": "stand-in",
        "fixed": "x",
    }
