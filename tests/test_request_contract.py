"""The v1.1 request and response fields over the real server and stubs: content parts, tools, tool
choice, response formats, tool-call output (unary and streamed), capabilities on Model. A fake
backend implementing the real interface records what reaches it."""

from __future__ import annotations

import base64

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from fakes import FakeBackend
from helpers import rich_error
from pluggably.core.types import (
    Capabilities,
    FinishReason,
    ImagePart,
    Modality,
    ResponseFormatType,
    TextPart,
    ToolCallChunk,
    ToolChoiceMode,
)
from pluggably.server import GatewayServer
from pluggably.v1 import (
    generate_service_pb2_grpc,
    generation_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    stream_service_pb2_grpc,
)

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
FULL = Capabilities(
    tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=1000
)
P = generation_pb2


def struct(data: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(data)
    return out


@pytest.fixture(scope="module")
async def served(config_for):
    capable = FakeBackend("cap", {"all": Modality.TEXT}, capabilities=FULL)
    plain = FakeBackend("plain", {"text": Modality.TEXT})
    server = GatewayServer(config_for([]), backends=[capable, plain])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield capable, plain, channel
    await server.stop(grace=0)


@pytest.fixture
def stubs(served):
    capable, plain, channel = served
    for backend in (capable, plain):
        backend.requests.clear()
        backend.extra_chunks = []
        backend.finish = FinishReason.STOP
    return (
        capable,
        plain,
        generate_service_pb2_grpc.GenerateServiceStub(channel).Generate,
        stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate,
    )


WEATHER = P.Tool(
    function=P.FunctionDeclaration(
        name="get_weather",
        description="Weather for a city",
        parameters=struct(
            {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        ),
    )
)


async def test_parts_tools_and_formats_reach_the_backend(stubs) -> None:
    capable, _, generate, _ = stubs
    request = P.GenerateRequest(
        model="cap/all",
        messages=[
            P.ChatMessage(
                role="user",
                content="What is here?",
                parts=[
                    P.ContentPart(
                        image=P.ImageInput(
                            data=PNG, mime_type="image/png", detail=P.IMAGE_DETAIL_LOW
                        )
                    ),
                    P.ContentPart(
                        image=P.ImageInput(
                            url="data:image/png;base64," + base64.b64encode(PNG).decode()
                        )
                    ),
                    P.ContentPart(image=P.ImageInput(url="https://example.com/cat.jpg")),
                    P.ContentPart(text="And the weather?"),
                ],
            ),
            P.ChatMessage(
                role="assistant",
                tool_calls=[P.ToolCall(id="c1", name="get_weather", arguments='{"city":"Oslo"}')],
            ),
            P.ChatMessage(role="tool", content='{"temp": 3}', tool_call_id="c1"),
        ],
        tools=[WEATHER],
        tool_choice=P.ToolChoice(mode=P.TOOL_CHOICE_MODE_FUNCTION, function_name="get_weather"),
        text=P.TextOptions(
            response_format=P.ResponseFormat(
                type=P.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                json_schema=P.JsonSchema(schema=struct({"type": "object"}), strict=True),
            )
        ),
    )
    await generate(request)
    seen = capable.requests[-1]
    user, assistant, tool = seen.messages
    assert user.content == "What is here?"
    assert user.parts[0] == ImagePart(data=PNG, mime_type="image/png", detail="low")
    assert user.parts[1] == ImagePart(data=PNG, mime_type="image/png")  # data URL decoded
    assert user.parts[2] == ImagePart(url="https://example.com/cat.jpg")
    assert user.parts[3] == TextPart("And the weather?")
    assert user.text() == "What is here?And the weather?"
    assert assistant.tool_calls[0].arguments == '{"city":"Oslo"}'
    assert tool.tool_call_id == "c1"
    assert seen.tools[0].name == "get_weather" and seen.tools[0].parameters["required"] == ["city"]
    assert (seen.tool_choice.mode, seen.tool_choice.function) == (
        ToolChoiceMode.FUNCTION,
        "get_weather",
    )
    fmt = seen.text.response_format
    assert fmt.type is ResponseFormatType.JSON_SCHEMA and fmt.strict and fmt.name == "response"
    assert fmt.schema == {"type": "object"}


@pytest.mark.parametrize(
    ("request_kwargs", "fields"),
    [
        ({"messages": [P.ChatMessage(role="tool", content="x")]}, ["messages[0].tool_call_id"]),
        (
            {"messages": [P.ChatMessage(role="tool", content="x", tool_call_id="nope")]},
            ["messages[0].tool_call_id"],
        ),
        (
            {"messages": [P.ChatMessage(role="user", content="x", tool_call_id="c")]},
            ["messages[0].tool_call_id"],
        ),
        (
            {"messages": [P.ChatMessage(role="user", tool_calls=[P.ToolCall(id="c", name="f")])]},
            ["messages[0].tool_calls", "messages[0].content"],
        ),
        (
            {
                "messages": [
                    P.ChatMessage(
                        role="assistant", tool_calls=[P.ToolCall(name="f", arguments="[1]")]
                    )
                ]
            },
            ["messages[0].tool_calls[0].id", "messages[0].tool_calls[0].arguments"],
        ),
        (
            {"messages": [P.ChatMessage(role="user", parts=[P.ContentPart()])]},
            ["messages[0].parts[0]"],
        ),
        (
            {
                "messages": [
                    P.ChatMessage(role="user", parts=[P.ContentPart(image=P.ImageInput(data=PNG))])
                ]
            },
            ["messages[0].parts[0].image.mime_type"],
        ),
        (
            {
                "messages": [
                    P.ChatMessage(
                        role="user", parts=[P.ContentPart(image=P.ImageInput(url="ftp://x/y.png"))]
                    )
                ]
            },
            ["messages[0].parts[0].image.url"],
        ),
        (
            {
                "messages": [
                    P.ChatMessage(
                        role="user",
                        parts=[P.ContentPart(image=P.ImageInput(url="data:image/png;base64,@@@"))],
                    )
                ]
            },
            ["messages[0].parts[0].image.url"],
        ),
        (
            {
                "messages": [
                    P.ChatMessage(
                        role="user",
                        parts=[P.ContentPart(image=P.ImageInput(data=PNG, mime_type="image/tiff"))],
                    )
                ]
            },
            ["messages[0].parts[0].image.mime_type"],
        ),
        (
            {
                "messages": [
                    P.ChatMessage(
                        role="system",
                        parts=[P.ContentPart(image=P.ImageInput(data=PNG, mime_type="image/png"))],
                    )
                ]
            },
            ["messages[0].parts[0].image"],
        ),
        (
            {"tools": [P.Tool(function=P.FunctionDeclaration(name="9bad"))]},
            ["tools[0].function.name"],
        ),
        ({"tools": [WEATHER, WEATHER]}, ["tools[1].function.name"]),
        ({"tools": [P.Tool()]}, ["tools[0].function"]),
        (
            {
                "tools": [
                    P.Tool(
                        function=P.FunctionDeclaration(
                            name="f", parameters=struct({"type": "array"})
                        )
                    )
                ]
            },
            ["tools[0].function.parameters"],
        ),
        ({"tool_choice": P.ToolChoice(mode=P.TOOL_CHOICE_MODE_AUTO)}, ["tool_choice"]),
        (
            {"tools": [WEATHER], "tool_choice": P.ToolChoice(mode=P.TOOL_CHOICE_MODE_FUNCTION)},
            ["tool_choice.function_name"],
        ),
        (
            {
                "tools": [WEATHER],
                "tool_choice": P.ToolChoice(
                    mode=P.TOOL_CHOICE_MODE_FUNCTION, function_name="other"
                ),
            },
            ["tool_choice.function_name"],
        ),
        (
            {
                "tools": [WEATHER],
                "tool_choice": P.ToolChoice(
                    mode=P.TOOL_CHOICE_MODE_NONE, function_name="get_weather"
                ),
            },
            ["tool_choice.function_name"],
        ),
        (
            {
                "text": P.TextOptions(
                    response_format=P.ResponseFormat(type=P.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)
                )
            },
            ["text.response_format.json_schema.schema"],
        ),
        (
            {
                "text": P.TextOptions(
                    response_format=P.ResponseFormat(
                        type=P.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
                        json_schema=P.JsonSchema(schema=struct({})),
                    )
                )
            },
            ["text.response_format.json_schema"],
        ),
        (
            {
                "text": P.TextOptions(
                    response_format=P.ResponseFormat(
                        type=P.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                        json_schema=P.JsonSchema(name="a b", schema=struct({})),
                    )
                )
            },
            ["text.response_format.json_schema.name"],
        ),
    ],
)
async def test_bad_requests_name_every_field(stubs, request_kwargs, fields) -> None:
    capable, _, generate, _ = stubs
    kwargs = {"messages": [P.ChatMessage(role="user", content="hi")], **request_kwargs}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(P.GenerateRequest(model="cap/all", **kwargs))
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.fields == fields
    assert capable.requests == []


async def test_capabilities_missing_on_the_model(stubs) -> None:
    _, plain, generate, _ = stubs
    request = P.GenerateRequest(
        model="plain/text",
        tools=[WEATHER],
        messages=[
            P.ChatMessage(
                role="user",
                parts=[P.ContentPart(image=P.ImageInput(data=PNG, mime_type="image/png"))],
            )
        ],
        text=P.TextOptions(
            response_format=P.ResponseFormat(type=P.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
        ),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(request)
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.fields == ["tools", "messages[0].parts[0].image", "text.response_format"]
    assert "'plain/text' does not take image input" in err.message
    assert plain.requests == []


async def test_tool_calls_come_back_unary_and_streamed(stubs) -> None:
    capable, _, generate, stream = stubs
    capable.extra_chunks = [
        ToolCallChunk(0, id="call_a", name="get_weather", arguments='{"ci'),
        ToolCallChunk(0, arguments='ty": "Oslo"}'),
        ToolCallChunk(1, id="call_b", name="get_weather", arguments='{"city": "Rome"}'),
    ]
    capable.finish = FinishReason.TOOL_CALLS
    request = P.GenerateRequest(
        model="cap/all", messages=[P.ChatMessage(role="user", content="hi")], tools=[WEATHER]
    )
    response = await generate(request)
    assert response.finish_reason == P.FINISH_REASON_TOOL_CALLS
    assert response.model_version == "all-v1"
    assert [json_format.MessageToDict(c) for c in response.tool_calls] == [
        {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"id": "call_b", "name": "get_weather", "arguments": '{"city": "Rome"}'},
    ]
    chunks = [c async for c in stream(request)]
    deltas = [c.tool_call_delta for c in chunks if c.WhichOneof("event") == "tool_call_delta"]
    assert [(d.index, d.id, d.name, d.arguments) for d in deltas] == [
        (0, "call_a", "get_weather", '{"ci'),
        (0, "", "", 'ty": "Oslo"}'),
        (1, "call_b", "get_weather", '{"city": "Rome"}'),
    ]
    assert chunks[-1].done.finish_reason == P.FINISH_REASON_TOOL_CALLS
    assert chunks[-1].done.model_version == "all-v1"


async def test_model_reports_capabilities(served) -> None:
    _, _, channel = served
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    model = await models.GetModel(model_service_pb2.GetModelRequest(id="cap/all"))
    assert json_format.MessageToDict(model.capabilities) == {
        "streaming": True,
        "tools": True,
        "imageInput": True,
        "jsonObject": True,
        "jsonSchema": True,
        "maxOutputTokens": 1000,
    }
    assert model.circuit_state == model_pb2.CIRCUIT_STATE_UNSPECIFIED
    plain = await models.GetModel(model_service_pb2.GetModelRequest(id="plain/text"))
    assert not plain.capabilities.tools and plain.capabilities.streaming
