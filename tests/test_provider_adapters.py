"""Every adapter x unary/stream x text/tools/vision/JSON against its provider's stand-in, through
the real gRPC server: what the client gets back, and what the provider received on the wire."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from helpers import rich_error
from pluggably.devtools.standins import Reply, ToolCallSpec
from pluggably.v1 import generation_pb2 as P
from providers_util import KEYS, MODELS, provider_stack

PROVIDERS = ["openai", "anthropic", "gemini"]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER = P.Tool(
    function=P.FunctionDeclaration(
        name="get_weather",
        description="Current weather for a city",
        parameters=json_format.ParseDict(
            {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            struct_pb2.Struct(),
        ),
    )
)


@pytest.fixture(scope="module")
async def stack():
    async with provider_stack() as s:
        yield s


@pytest.fixture
def gw(stack):
    stack.reset()
    return stack


def chat(provider: str, *messages: P.ChatMessage, **kwargs) -> P.GenerateRequest:
    if not messages:
        messages = (P.ChatMessage(role="user", content="Tell me about lighthouses"),)
    return P.GenerateRequest(
        model=f"{provider}/{MODELS[provider]}", messages=list(messages), **kwargs
    )


async def run(gw, request: P.GenerateRequest, streaming: bool) -> dict:
    """The outcome as one dict, the same shape for unary and streamed calls."""
    if not streaming:
        response = await gw.generate(request)
        return {
            "text": response.text,
            "finish": response.finish_reason,
            "usage": response.usage,
            "model": response.model,
            "version": response.model_version,
            "stop": response.stop_sequence,
            "calls": [(c.id, c.name, c.arguments) for c in response.tool_calls],
            "chunks": 1,
        }
    chunks = [c async for c in gw.stream(request)]
    assert chunks[-1].WhichOneof("event") == "done", chunks[-1]
    calls: dict[int, list[str]] = {}
    for c in chunks:
        if c.WhichOneof("event") == "tool_call_delta":
            d = c.tool_call_delta
            entry = calls.setdefault(d.index, ["", "", ""])
            entry[0] = entry[0] or d.id
            entry[1] = entry[1] or d.name
            entry[2] += d.arguments
    done = chunks[-1].done
    return {
        "text": "".join(c.text_delta.text for c in chunks if c.WhichOneof("event") == "text_delta"),
        "finish": done.finish_reason,
        "usage": done.usage,
        "model": chunks[-1].model,
        "version": done.model_version,
        "stop": done.stop_sequence,
        "calls": [tuple(calls[i]) for i in sorted(calls)],
        "chunks": len(chunks),
    }


def sent(gw, provider: str) -> dict:
    """The body of the last generation request the provider's stand-in received."""
    requests = [r for r in gw.standin(provider).requests if r.method == "POST"]
    assert requests, "the provider received no request"
    return requests[-1].body


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_text(gw, provider, streaming) -> None:
    request = chat(
        provider,
        P.ChatMessage(role="system", content="Be brief."),
        P.ChatMessage(role="user", content="Tell me about lighthouses"),
        text=P.TextOptions(max_tokens=50, temperature=0.5, top_p=0.9),
    )
    out = await run(gw, request, streaming)
    assert out["text"] == f"Hello from the {provider} stand-in. You said: Tell me about lighthouses"
    assert out["finish"] == P.FINISH_REASON_STOP
    assert out["model"] == f"{provider}/{MODELS[provider]}"
    assert out["version"] and out["version"].startswith(MODELS[provider].split("-20")[0])
    # The stand-ins count one token per word: 11 words out; the prompt holds the system text too.
    assert out["usage"].completion_tokens == 11
    assert out["usage"].prompt_tokens == 6 and out["usage"].total_tokens == 17
    if streaming:
        assert out["chunks"] > 3, "text must arrive in several deltas"
    body = sent(gw, provider)
    if provider == "openai":
        assert body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert (
            body["max_completion_tokens"] == 50
            and body["temperature"] == 0.5
            and body["top_p"] == pytest.approx(0.9)
        )
        assert body.get("stream", False) is streaming
        assert ("stream_options" in body) is streaming
    elif provider == "anthropic":
        assert body["system"] == "Be brief." and [m["role"] for m in body["messages"]] == ["user"]
        assert body["max_tokens"] == 50 and body["temperature"] == 0.5
    else:
        assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
        assert body["contents"] == [
            {"role": "user", "parts": [{"text": "Tell me about lighthouses"}]}
        ]
        assert body["generationConfig"]["maxOutputTokens"] == 50
        assert body["generationConfig"]["topP"] == pytest.approx(0.9)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_max_tokens_truncates_with_length(gw, provider, streaming) -> None:
    out = await run(gw, chat(provider, text=P.TextOptions(max_tokens=3)), streaming)
    assert out["finish"] == P.FINISH_REASON_LENGTH
    assert out["text"].split() == ["Hello", "from", "the"] and out["usage"].completion_tokens == 3


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_tool_call_and_result_round_trip(gw, provider, streaming) -> None:
    request = chat(
        provider,
        P.ChatMessage(role="user", content="Weather in Oslo?"),
        tools=[WEATHER],
        tool_choice=P.ToolChoice(mode=P.TOOL_CHOICE_MODE_REQUIRED),
    )
    out = await run(gw, request, streaming)
    assert out["finish"] == P.FINISH_REASON_TOOL_CALLS
    [(call_id, name, arguments)] = out["calls"]
    assert call_id and name == "get_weather"
    assert json.loads(arguments) == {"city": "stand-in", "unit": "c"}  # generated from the schema
    body = sent(gw, provider)
    if provider == "openai":
        assert (
            body["tools"][0]["function"]["name"] == "get_weather"
            and body["tool_choice"] == "required"
        )
    elif provider == "anthropic":
        assert body["tools"][0]["input_schema"]["required"] == ["city", "unit"]
        assert body["tool_choice"] == {"type": "any"}
    else:
        assert body["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"]["required"] == [
            "city",
            "unit",
        ]
        assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}

    # The client runs the tool and sends the result back with the call id.
    follow_up = chat(
        provider,
        P.ChatMessage(role="user", content="Weather in Oslo?"),
        P.ChatMessage(
            role="assistant", tool_calls=[P.ToolCall(id=call_id, name=name, arguments=arguments)]
        ),
        P.ChatMessage(role="tool", content='{"temperature": 3}', tool_call_id=call_id),
        tools=[WEATHER],
    )
    out = await run(gw, follow_up, streaming)
    assert out["finish"] == P.FINISH_REASON_STOP
    assert out["text"].startswith("Tool result received:") and "temperature" in out["text"]
    body = sent(gw, provider)
    if provider == "openai":
        assert body["messages"][1]["tool_calls"][0]["id"] == call_id
        assert body["messages"][2] == {
            "role": "tool",
            "tool_call_id": call_id,
            "content": '{"temperature": 3}',
        }
    elif provider == "anthropic":
        assert body["messages"][1]["content"][0] == {
            "type": "tool_use",
            "id": call_id,
            "name": "get_weather",
            "input": {"city": "stand-in", "unit": "c"},
        }
        assert body["messages"][2] == {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call_id, "content": '{"temperature": 3}'}
            ],
        }
    else:
        assert body["contents"][1] == {
            "role": "model",
            "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "stand-in", "unit": "c"}}}
            ],
        }
        assert body["contents"][2] == {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temperature": 3}}}
            ],
        }


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_parallel_tool_calls_and_text_keep_their_order(gw, provider, streaming) -> None:
    gw.standin(provider).script(
        Reply(
            text="Checking both.",
            tool_calls=[
                ToolCallSpec("get_weather", {"city": "Oslo", "unit": "c"}, id="call_one"),
                ToolCallSpec("get_weather", {"city": "Rome", "unit": "f"}, id="call_two"),
            ],
        )
    )
    out = await run(gw, chat(provider, tools=[WEATHER]), streaming)
    assert out["text"] == "Checking both."
    assert [(c[0], json.loads(c[2])["city"]) for c in out["calls"]] == [
        ("call_one", "Oslo"),
        ("call_two", "Rome"),
    ]
    assert out["finish"] == P.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_images_inline_and_by_url(gw, provider, streaming) -> None:
    message = P.ChatMessage(
        role="user",
        content="What do you see?",
        parts=[
            P.ContentPart(
                image=P.ImageInput(data=PNG, mime_type="image/png", detail=P.IMAGE_DETAIL_LOW)
            ),
            P.ContentPart(image=P.ImageInput(url="https://example.com/photo.png")),
        ],
    )
    out = await run(gw, chat(provider, message), streaming)
    assert out["text"].endswith("(saw 2 image(s))")
    body = sent(gw, provider)
    encoded = base64.b64encode(PNG).decode()
    if provider == "openai":
        content = body["messages"][0]["content"]
        assert content[0] == {"type": "text", "text": "What do you see?"}
        assert content[1] == {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{encoded}", "detail": "low"},
        }
        assert content[2] == {
            "type": "image_url",
            "image_url": {"url": "https://example.com/photo.png"},
        }
    elif provider == "anthropic":
        content = body["messages"][0]["content"]
        assert content[1] == {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": encoded},
        }
        assert content[2] == {
            "type": "image",
            "source": {"type": "url", "url": "https://example.com/photo.png"},
        }
    else:
        parts = body["contents"][0]["parts"]
        assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": encoded}}
        assert parts[2] == {
            "fileData": {"mimeType": "image/png", "fileUri": "https://example.com/photo.png"}
        }


async def test_gemini_needs_the_media_type_of_an_image_url(gw) -> None:
    message = P.ChatMessage(
        role="user",
        content="Look",
        parts=[P.ContentPart(image=P.ImageInput(url="https://example.com/picture"))],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.generate(chat("gemini", message))
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == [
        "messages[0].parts[0].image.mime_type"
    ]
    assert gw.standin("gemini").requests == []


SCHEMA = json_format.ParseDict(
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "age"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    },
    struct_pb2.Struct(),
)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_json_schema_output(gw, provider, streaming) -> None:
    fmt = P.ResponseFormat(
        type=P.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        json_schema=P.JsonSchema(name="person", schema=SCHEMA, strict=True),
    )
    out = await run(gw, chat(provider, text=P.TextOptions(response_format=fmt)), streaming)
    assert set(json.loads(out["text"])) == {"name", "age"}
    body = sent(gw, provider)
    if provider == "openai":
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["name"] == "person"
        assert body["response_format"]["json_schema"]["strict"] is True
    elif provider == "anthropic":
        assert body["output_config"]["format"]["type"] == "json_schema"
        assert body["output_config"]["format"]["schema"]["required"] == ["name", "age"]
    else:
        assert body["generationConfig"]["responseMimeType"] == "application/json"
        assert body["generationConfig"]["responseJsonSchema"]["required"] == ["name", "age"]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_json_object_output(gw, provider) -> None:
    fmt = P.ResponseFormat(type=P.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    # OpenAI's rule: JSON mode needs the word "JSON" in the messages.
    out = await run(
        gw,
        chat(
            provider,
            P.ChatMessage(role="user", content="Answer in JSON please"),
            text=P.TextOptions(response_format=fmt),
        ),
        False,
    )
    assert isinstance(json.loads(out["text"]), dict)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_openai_rule_on_json_mode_is_reported_not_hidden(gw, provider) -> None:
    fmt = P.ResponseFormat(type=P.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    request = chat(provider, text=P.TextOptions(response_format=fmt))
    if provider != "openai":
        await gw.generate(request)
        return
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.generate(request)
    err = rich_error(caught.value)
    assert (
        err.code == grpc.StatusCode.INVALID_ARGUMENT
        and err.info.reason == "PROVIDER_REJECTED_REQUEST"
    )
    assert "json" in err.message.lower()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_stop_sequences(gw, provider) -> None:
    out = await run(gw, chat(provider, text=P.TextOptions(stop=["stand-in"])), False)
    assert out["text"] == f"Hello from the {provider} "
    assert out["finish"] == P.FINISH_REASON_STOP
    if provider == "anthropic":
        assert out["stop"] == "stand-in"
    body = sent(gw, provider)
    assert body["stop" if provider == "openai" else "stop_sequences"] == ["stand-in"]


async def test_gemini_stop_sequences_beyond_its_limit_are_rejected(gw) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.generate(chat("gemini", text=P.TextOptions(stop=[f"s{i}" for i in range(6)])))
    assert rich_error(caught.value).fields == ["text.stop"]


@pytest.mark.parametrize(
    ("provider", "native", "expected"),
    [
        ("openai", "content_filter", P.FINISH_REASON_CONTENT_FILTER),
        ("anthropic", "refusal", P.FINISH_REASON_CONTENT_FILTER),
        ("gemini", "SAFETY", P.FINISH_REASON_CONTENT_FILTER),
        ("gemini", "RECITATION", P.FINISH_REASON_CONTENT_FILTER),
        ("anthropic", "max_tokens", P.FINISH_REASON_LENGTH),
        ("gemini", "MAX_TOKENS", P.FINISH_REASON_LENGTH),
    ],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_finish_reasons_are_normalised(gw, provider, native, expected, streaming) -> None:
    gw.standin(provider).script(Reply(text="", finish_reason=native))
    out = await run(gw, chat(provider), streaming)
    assert out["finish"] == expected


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_gemini_blocked_prompt_is_content_filtered(gw, streaming) -> None:
    gw.standin("gemini").script(Reply(finish_reason="PROMPT_BLOCKED:SAFETY"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(gw, chat("gemini"), streaming)
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.info.reason == "CONTENT_FILTERED"
    assert len(gw.standin("gemini").requests) == 1, "a blocked prompt is not retried"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_scripted_usage_and_cached_tokens(gw, provider) -> None:
    gw.standin(provider).script(Reply(text="ok", prompt_tokens=1234, completion_tokens=7))
    out = await run(gw, chat(provider), True)
    assert (out["usage"].prompt_tokens, out["usage"].completion_tokens) == (1234, 7)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_plain_prompt_is_one_user_message(gw, provider) -> None:
    request = P.GenerateRequest(model=f"{provider}/{MODELS[provider]}", prompt="Once upon a time")
    out = await run(gw, request, False)
    assert out["text"].endswith("You said: Once upon a time")


@pytest.mark.parametrize(
    ("provider", "option", "where"),
    [
        ("openai", {"logit_bias": {"50256": -100}}, lambda b: b["logit_bias"] == {"50256": -100}),
        (
            "anthropic",
            {"metadata": {"user_id": "u-1"}},
            lambda b: b["metadata"] == {"user_id": "u-1"},
        ),
        (
            "gemini",
            {
                "safetySettings": [
                    {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}
                ]
            },
            lambda b: b["safetySettings"][0]["threshold"] == "BLOCK_NONE",
        ),
    ],
)
async def test_provider_options_pass_through(gw, provider, option, where) -> None:
    request = chat(provider)
    for key, value in option.items():
        json_format.ParseDict(value, request.provider_options[key])
    await gw.generate(request)
    assert where(sent(gw, provider))


@pytest.mark.parametrize(
    ("provider", "key"),
    [
        ("openai", "temperature"),
        ("anthropic", "system"),
        ("gemini", "generationConfig"),
        ("openai", "stream"),
    ],
)
async def test_provider_options_cannot_override_typed_fields(gw, provider, key) -> None:
    request = chat(provider)
    request.provider_options[key].string_value = "x"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.generate(request)
    assert rich_error(caught.value).fields == [f"provider_options.{key}"]
    assert gw.standin(provider).requests == []


@pytest.mark.parametrize(
    ("provider", "header", "value"),
    [
        ("openai", "authorization", f"Bearer {KEYS['openai']}"),
        ("anthropic", "x-api-key", KEYS["anthropic"]),
        ("gemini", "x-goog-api-key", KEYS["gemini"]),
    ],
)
async def test_auth_and_version_headers(gw, provider, header, value) -> None:
    await gw.generate(chat(provider))
    headers = gw.standin(provider).requests[-1].headers
    assert headers[header] == value
    if provider == "anthropic":
        assert headers["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize(
    ("provider", "field", "value"),
    [
        ("anthropic", "temperature", 1.5),  # the 2023-06-01 API caps it at 1
        ("anthropic", "seed", 7),
        ("openai", "top_k", 5),
        ("openai", "repetition_penalty", 1.1),
    ],
)
async def test_parameters_a_provider_does_not_honour_are_rejected(
    gw, provider, field, value
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.generate(chat(provider, text=P.TextOptions(**{field: value})))
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == [f"text.{field}"]
    assert gw.standin(provider).requests == []
