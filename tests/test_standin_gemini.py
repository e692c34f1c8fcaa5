"""The Gemini stand-in speaks the generativelanguage v1beta wire format: the official google-genai
SDK parses everything it serves, and raw HTTP checks what an SDK never sends."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import orjson
import pytest
from google import genai
from google.genai import errors, types

from pluggably.devtools.standins import Fault, Reply, ToolCallSpec
from pluggably.devtools.standins.gemini import IMAGE_TOKENS, GeminiStandIn

API_KEY = "gk-test"
MODEL = "gemini-2.5-flash"
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
WEATHER_TOOL = types.Tool(
    function_declarations=[
        types.FunctionDeclaration(
            name="get_weather",
            description="Current weather for a city.",
            parameters={
                "type": "object",
                "required": ["city"],
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer"},
                    "detailed": {"type": "boolean"},
                    "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
            },
        ),
        types.FunctionDeclaration(
            name="get_time",
            description="Current time.",
            parameters_json_schema={
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            },
        ),
    ]
)
WEATHER_ARGS = {
    "city": "stand-in",
    "unit": "celsius",
    "days": 1,
    "detailed": True,
    "where": {"lat": 1},
    "tags": [],
}


@pytest.fixture(scope="module")
async def standin():
    async with GeminiStandIn(api_key=API_KEY) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(standin):
    standin.reset()


def make_client(
    standin: GeminiStandIn, *, timeout_ms: int | None = None, api_key: str = API_KEY
) -> genai.client.AsyncClient:
    # attempts=1 also turns off the SDK's implicit reconnect-and-retry on connection errors.
    options = types.HttpOptions(
        base_url=standin.base_url,
        api_version="v1beta",
        timeout=timeout_ms,
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    return genai.Client(api_key=api_key, http_options=options).aio


@pytest.fixture
async def client(standin):
    async with make_client(standin) as aio:
        yield aio


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    standin: GeminiStandIn,
    body: Any,
    *,
    model: str = MODEL,
    method: str = "generateContent",
    query: str = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, bytes]:
    """A raw request; returns the status, the parsed JSON (None if not JSON) and the bytes."""
    url = f"{standin.base_url}/v1beta/models/{model}:{method}{query}"
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(
        url,
        data=data,
        headers={"x-goog-api-key": API_KEY, "Content-Type": "application/json", **(headers or {})},
    ) as response:
        raw = await response.read()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    return response.status, parsed, raw


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


def error_of(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    return body["error"]


async def collect(stream) -> list[types.GenerateContentResponse]:
    return [chunk async for chunk in stream]


# ---- text --------------------------------------------------------------------------------


async def test_unary_text(standin, client):
    response = await client.models.generate_content(
        model=MODEL,
        contents="Hello there, stand-in",
        config=types.GenerateContentConfig(system_instruction="Be brief.", temperature=0.3),
    )
    assert response.text == "Hello from the gemini stand-in. You said: Hello there, stand-in"
    candidate = response.candidates[0]
    assert candidate.finish_reason == types.FinishReason.STOP
    assert candidate.content.role == "model"
    usage = response.usage_metadata
    assert usage.prompt_token_count == 5  # 3 user words + 2 system words
    assert usage.candidates_token_count == 10
    assert usage.total_token_count == 15
    assert response.model_version == MODEL
    assert response.response_id
    sent = standin.requests[-1]
    assert sent.headers["x-goog-api-key"] == API_KEY
    assert sent.body["systemInstruction"]["parts"][0]["text"] == "Be brief."


async def test_stream_joins_to_unary_text_with_usage_on_every_chunk(standin, client):
    unary = await client.models.generate_content(model=MODEL, contents="stream these words")
    chunks = await collect(
        await client.models.generate_content_stream(model=MODEL, contents="stream these words")
    )
    assert len(chunks) == len(unary.text.split())
    assert "".join(c.text for c in chunks) == unary.text
    reasons = [c.candidates[0].finish_reason for c in chunks]
    assert reasons[:-1] == [None] * (len(chunks) - 1)
    assert reasons[-1] == types.FinishReason.STOP
    running = [c.usage_metadata.candidates_token_count for c in chunks]
    assert running == sorted(running) and running[0] == 1
    last = chunks[-1].usage_metadata
    assert (last.prompt_token_count, last.candidates_token_count, last.total_token_count) == (
        unary.usage_metadata.prompt_token_count,
        unary.usage_metadata.candidates_token_count,
        unary.usage_metadata.total_token_count,
    )
    assert len({c.response_id for c in chunks}) == 1


async def test_stream_is_crlf_framed_sse_of_whole_responses(standin, http):
    status, _, raw = await post(
        http,
        standin,
        {"contents": [user("one two")]},
        method="streamGenerateContent",
        query="?alt=sse",
    )
    assert status == 200
    events = raw.split(b"\r\n\r\n")
    assert events[-1] == b""
    payloads = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert all(e.startswith(b"data: {") and b"\n" not in e for e in events[:-1])
    assert all("candidates" in p and "usageMetadata" in p for p in payloads)
    assert "finishReason" in payloads[-1]["candidates"][0]
    assert all("finishReason" not in p["candidates"][0] for p in payloads[:-1])


async def test_scripted_reply_sets_chunks_usage_model_and_reason(standin, client):
    standin.script(
        Reply(
            text="alpha beta gamma delta",
            chunks=2,
            prompt_tokens=7,
            completion_tokens=11,
            model="gemini-2.5-flash-001",
            finish_reason="MAX_TOKENS",
        )
    )
    chunks = await collect(await client.models.generate_content_stream(model=MODEL, contents="x"))
    assert [c.text for c in chunks] == ["alpha beta ", "gamma delta"]
    usage = chunks[-1].usage_metadata
    assert (usage.prompt_token_count, usage.candidates_token_count, usage.total_token_count) == (
        7,
        11,
        18,
    )
    assert chunks[-1].model_version == "gemini-2.5-flash-001"
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.MAX_TOKENS


async def test_max_output_tokens_truncates_with_max_tokens_reason(standin, client):
    config = types.GenerateContentConfig(max_output_tokens=4)
    response = await client.models.generate_content(model=MODEL, contents="hi", config=config)
    assert response.text == "Hello from the gemini"
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.usage_metadata.candidates_token_count == 4
    chunks = await collect(
        await client.models.generate_content_stream(model=MODEL, contents="hi", config=config)
    )
    assert "".join(c.text for c in chunks) == "Hello from the gemini"
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.MAX_TOKENS


# ---- tools -------------------------------------------------------------------------------


async def test_function_call_unary_from_schema(standin, client):
    response = await client.models.generate_content(
        model=MODEL,
        contents="Weather in Paris?",
        config=types.GenerateContentConfig(tools=[WEATHER_TOOL]),
    )
    (call,) = response.function_calls
    assert call.name == "get_weather"
    assert call.args == WEATHER_ARGS
    assert call.id is None  # Gemini ids are optional; the default call has none
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    args_tokens = len(orjson.dumps(WEATHER_ARGS).split())
    assert response.usage_metadata.candidates_token_count == args_tokens


async def test_forced_function_and_json_schema_parameters(standin, client):
    config = types.GenerateContentConfig(
        tools=[WEATHER_TOOL],
        tool_config=types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(
                mode="ANY", allowed_function_names=["get_time"]
            )
        ),
    )
    response = await client.models.generate_content(model=MODEL, contents="time?", config=config)
    (call,) = response.function_calls
    assert (call.name, call.args) == ("get_time", {"zone": "stand-in"})


async def test_function_calling_mode_none_answers_text(standin, client):
    config = types.GenerateContentConfig(
        tools=[WEATHER_TOOL],
        tool_config=types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(mode="NONE")
        ),
    )
    response = await client.models.generate_content(model=MODEL, contents="hi", config=config)
    assert response.function_calls is None
    assert response.text.startswith("Hello from the gemini stand-in.")


async def test_function_call_streams_whole_in_last_chunk_with_scripted_id(standin, client):
    standin.script(
        Reply(
            text="Let me check.",
            tool_calls=[
                ToolCallSpec("get_weather", {"city": "Oslo"}, id="call-7"),
                ToolCallSpec("get_time", {"zone": "CET"}),
            ],
        )
    )
    chunks = await collect(
        await client.models.generate_content_stream(
            model=MODEL,
            contents="Weather?",
            config=types.GenerateContentConfig(tools=[WEATHER_TOOL]),
        )
    )
    assert "".join(c.text or "" for c in chunks[:-1]) == "Let me check."
    assert all(c.function_calls is None for c in chunks[:-1])
    calls = chunks[-1].function_calls
    assert [(c.id, c.name, c.args) for c in calls] == [
        ("call-7", "get_weather", {"city": "Oslo"}),
        (None, "get_time", {"zone": "CET"}),
    ]
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP


async def test_function_result_turn_answers_with_the_result(standin, client):
    contents = [
        types.Content(role="user", parts=[types.Part.from_text(text="Weather in Oslo?")]),
        types.Content(
            role="model",
            parts=[types.Part.from_function_call(name="get_weather", args={"city": "Oslo"})],
        ),
        types.Content(
            role="user",
            parts=[
                types.Part.from_function_response(
                    name="get_weather", response={"output": "18C and sunny"}
                )
            ],
        ),
    ]
    response = await client.models.generate_content(
        model=MODEL, contents=contents, config=types.GenerateContentConfig(tools=[WEATHER_TOOL])
    )
    assert response.function_calls is None
    assert response.text == "Tool result received: 18C and sunny"


# ---- JSON output, images, safety ---------------------------------------------------------


async def test_json_modes(standin, client):
    plain = await client.models.generate_content(
        model=MODEL,
        contents="json please",
        config=types.GenerateContentConfig(response_mime_type="application/json"),
    )
    assert orjson.loads(plain.text) == {
        "reply": "Hello from the gemini stand-in. You said: json please"
    }
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    }
    openapi = await client.models.generate_content(
        model=MODEL,
        contents="x",
        config=types.GenerateContentConfig(
            response_mime_type="application/json", response_schema=schema
        ),
    )
    assert openapi.parsed == {"name": "stand-in", "age": 1}
    assert standin.requests[-1].body["generationConfig"]["responseSchema"]["type"] == "OBJECT"
    json_schema = await client.models.generate_content(
        model=MODEL,
        contents="x",
        config=types.GenerateContentConfig(
            response_mime_type="application/json",
            response_json_schema={
                "type": "object",
                "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
            },
        ),
    )
    assert orjson.loads(json_schema.text) == {"ok": True, "kind": "a"}
    enum = await client.models.generate_content(
        model=MODEL,
        contents="x",
        config=types.GenerateContentConfig(
            response_mime_type="text/x.enum",
            response_schema={"type": "string", "enum": ["red", "green"]},
        ),
    )
    assert enum.text == "red"


async def test_image_input_is_seen_and_counted(standin, client):
    response = await client.models.generate_content(
        model=MODEL,
        contents=[
            "Describe this picture",
            types.Part.from_bytes(data=PNG_1PX, mime_type="image/png"),
        ],
    )
    assert response.text.endswith("You said: Describe this picture (saw 1 image(s))")
    usage = response.usage_metadata
    assert usage.prompt_token_count == 3 + IMAGE_TOKENS
    modalities = {d.modality: d.token_count for d in usage.prompt_tokens_details}
    assert modalities == {types.MediaModality.TEXT: 3, types.MediaModality.IMAGE: IMAGE_TOKENS}


async def test_blocked_output_has_no_content(standin, client):
    standin.script(Reply(finish_reason="SAFETY"))
    response = await client.models.generate_content(model=MODEL, contents="x")
    candidate = response.candidates[0]
    assert candidate.finish_reason == types.FinishReason.SAFETY
    assert candidate.content is None
    assert response.text is None
    blocked = [r for r in candidate.safety_ratings if r.blocked]
    assert [(r.category, r.probability) for r in blocked] == [
        (types.HarmCategory.HARM_CATEGORY_DANGEROUS_CONTENT, types.HarmProbability.HIGH)
    ]
    # Streamed, what was scripted arrives first; the verdict comes in a content-less last chunk.
    standin.script(Reply(text="quoted lyrics", finish_reason="RECITATION"))
    chunks = await collect(await client.models.generate_content_stream(model=MODEL, contents="x"))
    assert "".join(c.text or "" for c in chunks) == "quoted lyrics"
    assert chunks[-1].candidates[0].content is None
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.RECITATION


async def test_blocked_prompt_has_prompt_feedback_and_no_candidates(standin, client):
    standin.script(
        Reply(finish_reason="PROMPT_BLOCKED:SAFETY"),
        Reply(finish_reason="PROMPT_BLOCKED:PROHIBITED_CONTENT"),
    )
    response = await client.models.generate_content(model=MODEL, contents="bad words")
    assert response.candidates is None
    assert response.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    assert response.usage_metadata.prompt_token_count == 2
    chunks = await collect(await client.models.generate_content_stream(model=MODEL, contents="x"))
    assert len(chunks) == 1 and chunks[0].candidates is None
    assert chunks[0].prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT


# ---- models ------------------------------------------------------------------------------


async def test_model_list_pages(standin, client):
    pager = await client.models.list(config={"page_size": 2})
    models = [m async for m in pager]
    assert [m.name for m in models] == [m["name"] for m in standin.models]
    assert [r.query.get("pageSize") for r in standin.requests] == ["2", "2", "2"]
    assert "pageToken" not in standin.requests[0].query
    by_name = {m.name: m for m in models}
    assert "embedContent" in by_name["models/gemini-embedding-001"].supported_actions
    assert "generateContent" not in by_name["models/gemini-embedding-001"].supported_actions
    assert by_name["models/gemini-standin-tiny"].input_token_limit == 64
    assert by_name[f"models/{MODEL}"].output_token_limit == 65_536


async def test_model_list_last_page_has_no_token(standin, http):
    url = f"{standin.base_url}/v1beta/models?pageSize=4&key={API_KEY}"
    async with http.get(url) as response:
        first = await response.json()
    assert len(first["models"]) == 4 and first["nextPageToken"]
    async with http.get(url + f"&pageToken={first['nextPageToken']}") as response:
        second = await response.json()
    assert len(second["models"]) == len(standin.models) - 4
    assert "nextPageToken" not in second


async def test_get_model_and_unknown_model(standin, client):
    model = await client.models.get(model="gemini-standin-tiny")
    assert (model.name, model.input_token_limit) == ("models/gemini-standin-tiny", 64)
    with pytest.raises(errors.ClientError) as caught:
        await client.models.generate_content(model="gemini-9-ultra", contents="x")
    assert (caught.value.code, caught.value.status) == (404, "NOT_FOUND")
    assert caught.value.message.startswith("models/gemini-9-ultra is not found for API version")
    with pytest.raises(errors.ClientError) as caught:
        await client.models.generate_content(model="gemini-embedding-001", contents="x")
    assert "not supported for generateContent" in caught.value.message


# ---- errors the SDK sees -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "status_name", "exception"),
    [
        (400, "INVALID_ARGUMENT", errors.ClientError),
        (403, "PERMISSION_DENIED", errors.ClientError),
        (404, "NOT_FOUND", errors.ClientError),
        (429, "RESOURCE_EXHAUSTED", errors.ClientError),
        (500, "INTERNAL", errors.ServerError),
        (503, "UNAVAILABLE", errors.ServerError),
        (504, "DEADLINE_EXCEEDED", errors.ServerError),
    ],
)
async def test_status_faults_raise_the_sdk_class(standin, client, status, status_name, exception):
    standin.inject(Fault("status", status=status, message=f"injected {status}"))
    with pytest.raises(exception) as caught:
        await client.models.generate_content(model=MODEL, contents="x")
    assert (caught.value.code, caught.value.status, caught.value.message) == (
        status,
        status_name,
        f"injected {status}",
    )


async def test_rate_limit_carries_retry_info_not_a_header(standin, http):
    standin.inject(Fault("status", status=429, retry_after=2))
    async with http.post(
        f"{standin.base_url}/v1beta/models/{MODEL}:generateContent", json={"contents": [user("x")]}
    ) as response:
        body = await response.json()
        assert response.status == 429 and "Retry-After" not in response.headers
    error = error_of(body)
    assert error["status"] == "RESOURCE_EXHAUSTED"
    assert error["message"].startswith("You exceeded your current quota")
    retry = [d for d in error["details"] if d["@type"].endswith("google.rpc.RetryInfo")]
    assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}]


async def test_error_type_overrides_status_name(standin, client):
    standin.inject(
        Fault(
            "status",
            status=400,
            error_type="FAILED_PRECONDITION",
            message="User location is not supported for the API use.",
        )
    )
    with pytest.raises(errors.ClientError) as caught:
        await client.models.generate_content(model=MODEL, contents="x")
    assert (caught.value.code, caught.value.status) == (400, "FAILED_PRECONDITION")


async def test_wrong_key_is_api_key_invalid(standin):
    async with make_client(standin, api_key="wrong") as aio:
        with pytest.raises(errors.ClientError) as caught:
            await aio.models.generate_content(model=MODEL, contents="x")
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert caught.value.message == "API key not valid. Please pass a valid API key."
    reasons = [d.get("reason") for d in caught.value.details["error"]["details"]]
    assert "API_KEY_INVALID" in reasons


async def test_in_stream_error_raises_after_the_chunks_before_it(standin, client):
    standin.inject(Fault("stream_error", after_chunks=2))
    seen = []
    with pytest.raises(errors.ServerError) as caught:
        async for chunk in await client.models.generate_content_stream(
            model=MODEL, contents="a b c d e"
        ):
            seen.append(chunk.text)
    assert len(seen) == 2
    assert (caught.value.code, caught.value.status) == (503, "UNAVAILABLE")
    assert caught.value.message == "The model is overloaded. Please try again later."
    standin.inject(Fault("stream_error", error_type="RESOURCE_EXHAUSTED", message="slow down"))
    with pytest.raises(errors.ClientError) as caught:
        await collect(await client.models.generate_content_stream(model=MODEL, contents="x"))
    assert (caught.value.code, caught.value.message) == (429, "slow down")


# ---- what an SDK cannot send -------------------------------------------------------------


async def test_auth_missing_query_key_and_open_standin(standin, http):
    url = f"{standin.base_url}/v1beta/models/{MODEL}:generateContent"
    async with http.post(url, json={"contents": [user("x")]}) as response:
        assert response.status == 403
        error = error_of(await response.json())
    assert error["status"] == "PERMISSION_DENIED"
    assert error["message"].startswith("Method doesn't allow unregistered callers")
    async with http.post(f"{url}?key={API_KEY}", json={"contents": [user("x")]}) as response:
        assert response.status == 200
    async with (
        GeminiStandIn(api_key=None) as open_standin,
        http.post(
            f"{open_standin.base_url}/v1beta/models/{MODEL}:generateContent",
            json={"contents": [user("x")]},
        ) as response,
    ):
        assert response.status == 200


async def test_unknown_fields_are_rejected_with_esf_wording(standin, http):
    status, body, _ = await post(
        http,
        standin,
        {
            "contents": [user("x")],
            "max_tokens": 5,
            "generationConfig": {"maxTokens": 5, "temperature": 0.2},
        },
    )
    assert status == 400
    error = error_of(body)
    assert error["message"] == (
        'Invalid JSON payload received. Unknown name "max_tokens": Cannot find field.\n'
        "Invalid JSON payload received. Unknown name \"maxTokens\" at 'generation_config': "
        "Cannot find field."
    )
    violations = error["details"][0]["fieldViolations"]
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert "field" not in violations[0] and violations[1]["field"] == "generation_config"


async def test_snake_case_names_are_accepted(standin, http):
    status, body, _ = await post(
        http,
        standin,
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "hi"},
                        {
                            "inline_data": {
                                "mime_type": "image/png",
                                "data": base64.b64encode(PNG_1PX).decode(),
                            }
                        },
                    ],
                }
            ],
            "generation_config": {"max_output_tokens": 50, "top_p": 0.5},
            "system_instruction": {"parts": [{"text": "Be nice."}]},
        },
    )
    assert status == 200, body
    assert body["candidates"][0]["content"]["parts"][0]["text"].endswith("(saw 1 image(s))")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"contents": [user("x")], "generationConfig": {"temperature": "hot"}},
            "Invalid value at 'generation_config.temperature' (TYPE_FLOAT), \"hot\"",
        ),
        (
            {"contents": [{"role": "user", "parts": [{"text": 5}]}]},
            "Invalid value at 'contents[0].parts[0].text' (TYPE_STRING), 5",
        ),
        (
            {
                "contents": [user("x")],
                "toolConfig": {"functionCallingConfig": {"mode": "REQUIRED"}},
            },
            "Invalid value at 'tool_config.function_calling_config.mode' (type.googleapis.com/"
            'google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode), "REQUIRED"',
        ),
        (
            {
                "contents": [user("x")],
                "tools": [
                    {
                        "functionDeclarations": [
                            {
                                "name": "f",
                                "parameters": {
                                    "type": "object",
                                    "properties": {"a": {"type": "STRING"}},
                                },
                            }
                        ]
                    }
                ],
            },
            "Invalid value at 'tools[0].function_declarations[0].parameters.type' (type.googleapis.com/"
            'google.ai.generativelanguage.v1beta.Type), "object"',
        ),
        (
            {"contents": [user("x")], "generationConfig": {"stopSequences": "END"}},
            "Invalid value at 'generation_config.stop_sequences' (TYPE_STRING), \"END\"",
        ),
        (
            {"contents": {"parts": [{"text": "x"}]}},
            "Invalid value at 'contents' (type.googleapis.com/google.ai.generativelanguage.v1beta."
            'Content), {"parts":[{"text":"x"}]}',
        ),
        (
            {"contents": [user("x")], "systemInstruction": [{"parts": [{"text": "x"}]}]},
            'Invalid JSON payload received. Unknown name "systemInstruction": Proto field is not '
            "repeating, cannot start list.",
        ),
        (
            [{"contents": []}],
            'Invalid JSON payload received. Unknown name "": Root element must be a message.',
        ),
    ],
)
async def test_wrong_types_are_rejected(standin, http, body, message):
    status, response, _ = await post(http, standin, body)
    assert (status, error_of(response)["message"]) == (400, message)
    assert error_of(response)["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize("role", ["assistant", "system", "function", "tool"])
async def test_only_user_and_model_roles(standin, http, role):
    status, body, _ = await post(
        http,
        standin,
        {"contents": [user("hi"), {"role": role, "parts": [{"text": "hello"}]}, user("again")]},
    )
    assert (status, error_of(body)["message"]) == (400, "Please use a valid role: user, model.")


async def test_images_are_checked(standin, http):
    def with_image(mime: str, data: str) -> dict[str, Any]:
        return {
            "contents": [
                {
                    "role": "user",
                    "parts": [{"text": "look"}, {"inlineData": {"mimeType": mime, "data": data}}],
                }
            ]
        }

    png = base64.b64encode(PNG_1PX).decode()
    status, body, _ = await post(
        http, standin, with_image("image/png", "data:image/png;base64," + png)
    )
    assert status == 400
    assert error_of(body)["message"].startswith(
        "Invalid value at 'contents[0].parts[1].inline_data.data' (TYPE_BYTES), Base64 decoding "
        'failed for "data:image/png;base64,'
    )
    status, body, _ = await post(
        http, standin, with_image("image/png", base64.b64encode(JPEG_HEAD).decode())
    )
    assert (status, error_of(body)["message"]) == (
        400,
        (
            "Unable to process input image. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting"
        ),
    )
    status, body, _ = await post(http, standin, with_image("image/bmp", png))
    assert (status, error_of(body)["message"]) == (400, "Unsupported MIME type: image/bmp")
    url_safe = base64.urlsafe_b64encode(PNG_1PX).decode().rstrip("=")
    status, _, _ = await post(http, standin, with_image("image/png", url_safe))
    assert status == 200


async def test_token_limits(standin, http):
    status, body, _ = await post(
        http, standin, {"contents": [user("word " * 70)]}, model="gemini-standin-tiny"
    )
    assert (status, error_of(body)["message"]) == (
        400,
        ("The input token count (70) exceeds the maximum number of tokens allowed (64)."),
    )
    assert error_of(body)["status"] == "INVALID_ARGUMENT"
    status, body, _ = await post(
        http, standin, {"contents": [user("word " * 60)]}, model="gemini-standin-tiny"
    )
    assert status == 200
    status, body, _ = await post(
        http,
        standin,
        {"contents": [user("x")], "generationConfig": {"maxOutputTokens": 100}},
        model="gemini-standin-tiny",
    )
    assert (status, error_of(body)["message"]) == (
        400,
        (
            "Unable to submit request because it has a maxOutputTokens value of 100 but the "
            "supported range is from 1 (inclusive) to 65 (exclusive). Update the value and try "
            "again."
        ),
    )


async def test_function_turn_rules(standin, http):
    call = {
        "role": "model",
        "parts": [
            {"functionCall": {"name": "f", "args": {}}},
            {"functionCall": {"name": "f", "args": {"x": 1}}},
        ],
    }
    one_result = {
        "role": "user",
        "parts": [{"functionResponse": {"name": "f", "response": {"output": "ok"}}}],
    }
    tools = [{"functionDeclarations": [{"name": "f"}]}]
    status, body, _ = await post(http, standin, {"contents": [call, one_result], "tools": tools})
    assert (status, error_of(body)["message"]) == (
        400,
        (
            "Please ensure that function call turn comes immediately after a user turn or after a "
            "function response turn."
        ),
    )
    status, body, _ = await post(
        http, standin, {"contents": [user("go"), call, one_result], "tools": tools}
    )
    assert (status, error_of(body)["message"]) == (
        400,
        (
            "Please ensure that the number of function response parts is equal to the number of "
            "function call parts of the function call turn."
        ),
    )
    two_results = {"role": "user", "parts": one_result["parts"] * 2}
    status, body, _ = await post(
        http, standin, {"contents": [user("go"), call, two_results], "tools": tools}
    )
    assert status == 200
    assert body["candidates"][0]["content"]["parts"][0]["text"] == ("Tool result received: ok; ok")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"contents": []}, "* GenerateContentRequest.contents: contents is not specified\n"),
        (
            {"contents": [{"role": "user", "parts": []}]},
            "* GenerateContentRequest.contents[0].parts: contents.parts must not be empty.\n",
        ),
        (
            {"contents": [user("x"), {"role": "model", "parts": [{"text": ""}]}, user("y")]},
            "* GenerateContentRequest.contents[1].parts[0].data: required oneof field 'data' must have "
            "one initialized field\n",
        ),
        (
            {"contents": [user("x")], "generationConfig": {"temperature": 2.5}},
            "* GenerateContentRequest.generation_config.temperature: temperature must be in the range "
            "[0.0, 2.0]\n",
        ),
        (
            {"contents": [user("x")], "generationConfig": {"stopSequences": list("abcdef")}},
            "* GenerateContentRequest.generation_config.stop_sequences: the number of stop_sequences "
            "must not exceed 5\n",
        ),
        (
            {"contents": [user("x")], "generationConfig": {"responseSchema": {"type": "STRING"}}},
            "* GenerateContentRequest.generation_config.response_schema: response_schema requires "
            "response_mime_type to be `application/json` or `text/x.enum`.\n",
        ),
        (
            {"contents": [user("x")], "generationConfig": {"responseMimeType": "text/html"}},
            "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are "
            "`text/plain`, `application/json`, `application/xml`, `application/yaml` and "
            "`text/x.enum`.\n",
        ),
        (
            {
                "contents": [user("x")],
                "tools": [
                    {
                        "functionDeclarations": [
                            {
                                "name": "f",
                                "parameters": {
                                    "type": "OBJECT",
                                    "properties": {"a": {"type": "STRING"}},
                                },
                                "parametersJsonSchema": {"type": "object"},
                            }
                        ]
                    }
                ],
            },
            "* GenerateContentRequest.tools[0].function_declarations[0].parameters: parameters and "
            "parameters_json_schema cannot both be set.\n",
        ),
        (
            {
                "contents": [user("x")],
                "tools": [
                    {
                        "functionDeclarations": [
                            {
                                "name": "f",
                                "parameters": {
                                    "type": "OBJECT",
                                    "required": ["b"],
                                    "properties": {"a": {"type": "STRING"}},
                                },
                            }
                        ]
                    }
                ],
            },
            "* GenerateContentRequest.tools[0].function_declarations[0].parameters.required[0]: "
            "property is not defined\n",
        ),
        (
            {
                "contents": [user("x")],
                "tools": [{"functionDeclarations": [{"name": "get weather"}]}],
            },
            "* GenerateContentRequest.tools[0].function_declarations[0].name: Invalid function name. "
            "Must start with a letter or an underscore. Must be alphameric (a-z, A-Z, 0-9), underscores "
            "(_), dots (.), colons (:), or dashes (-), with a maximum length of 64.\n",
        ),
        (
            {"contents": [user("x")], "generationConfig": {"candidateCount": 2}},
            f"Multiple candidates is not enabled for models/{MODEL}",
        ),
    ],
)
async def test_request_rules(standin, http, body, message):
    status, response, _ = await post(http, standin, body)
    assert (status, error_of(response)["message"]) == (400, message)


async def test_rejected_request_keeps_the_scripted_reply(standin, client, http):
    standin.script(Reply(text="scripted"))
    await post(http, standin, {"contents": []})
    response = await client.models.generate_content(model=MODEL, contents="x")
    assert response.text == "scripted"


async def test_json_array_stream_without_alt_sse(standin, http):
    status, body, raw = await post(
        http, standin, {"contents": [user("a b c")]}, method="streamGenerateContent"
    )
    assert status == 200 and isinstance(body, list)
    assert raw.startswith(b"[{") and b"\n,\r\n" in raw and raw.endswith(b"\n]")
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in body) == (
        "Hello from the gemini stand-in. You said: a b c"
    )
    assert body[-1]["candidates"][0]["finishReason"] == "STOP"
    status, body, _ = await post(
        http,
        standin,
        {"contents": [{"role": "bot", "parts": [{"text": "x"}]}]},
        method="streamGenerateContent",
    )
    assert status == 400 and isinstance(body, list)
    assert error_of(body[0])["message"] == "Please use a valid role: user, model."
    standin.inject(Fault("status", status=503))
    status, body, _ = await post(
        http, standin, {"contents": [user("x")]}, method="streamGenerateContent"
    )
    assert status == 503 and error_of(body[0])["status"] == "UNAVAILABLE"
    standin.inject(Fault("stream_error", after_chunks=1))
    status, body, _ = await post(
        http, standin, {"contents": [user("x")]}, method="streamGenerateContent"
    )
    assert status == 200 and len(body) == 2 and "candidates" in body[0]
    assert error_of(body[1]) == {
        "code": 503,
        "status": "UNAVAILABLE",
        "message": "The model is overloaded. Please try again later.",
    }


# ---- stream faults -----------------------------------------------------------------------


async def test_no_terminator_drops_the_finish_reason(standin, client, http):
    standin.inject(Fault("no_terminator"))
    chunks = await collect(await client.models.generate_content_stream(model=MODEL, contents="a b"))
    # The SDK raises nothing: every chunk simply lacks a finish reason.
    assert "".join(c.text for c in chunks).endswith("You said: a b")
    assert all(c.candidates[0].finish_reason is None for c in chunks)
    assert chunks[-1].usage_metadata.candidates_token_count == 9
    standin.inject(Fault("no_terminator"))
    _, body, raw = await post(
        http, standin, {"contents": [user("x")]}, method="streamGenerateContent"
    )
    assert body is None and raw.rstrip().endswith(b"}")  # the array is never closed


async def test_drop_mid_stream(standin, client):
    standin.inject(Fault("drop_mid_stream", after_chunks=3))
    seen = []
    with pytest.raises(aiohttp.ClientError):
        async for chunk in await client.models.generate_content_stream(
            model=MODEL, contents="a b c d e f"
        ):
            seen.append(chunk.text)
    assert len(seen) == 3


async def test_malformed_chunk(standin, client, http):
    standin.inject(Fault("malformed_chunk", after_chunks=1))
    with pytest.raises(errors.UnknownApiResponseError):
        await collect(await client.models.generate_content_stream(model=MODEL, contents="a b"))
    standin.inject(Fault("malformed_chunk", after_chunks=1))
    _, _, raw = await post(
        http, standin, {"contents": [user("x")]}, method="streamGenerateContent", query="?alt=sse"
    )
    assert raw.split(b"\r\n\r\n")[1] == b'data: {"truncated": tr'


async def test_reset_is_a_connection_error(standin, client):
    standin.inject(Fault("reset"))
    with pytest.raises(aiohttp.ClientError):
        await client.models.generate_content(model=MODEL, contents="x")


async def wait_for_disconnects(standin: GeminiStandIn, count: int) -> None:
    for _ in range(100):
        if standin.disconnects >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"disconnects={standin.disconnects}, expected {count}")


async def test_hang_before_headers_counts_the_client_that_gave_up(standin):
    standin.inject(Fault("hang_before_headers", seconds=5))
    async with make_client(standin, timeout_ms=300) as aio:
        with pytest.raises(TimeoutError):
            await aio.models.generate_content(model=MODEL, contents="x")
    await wait_for_disconnects(standin, 1)


async def test_hang_mid_stream_counts_the_client_that_gave_up(standin):
    standin.inject(Fault("hang_mid_stream", after_chunks=2, seconds=5))
    seen = []
    async with make_client(standin, timeout_ms=400) as aio:
        with pytest.raises(TimeoutError):
            async for chunk in await aio.models.generate_content_stream(
                model=MODEL, contents="a b c"
            ):
                seen.append(chunk.text)
    assert len(seen) == 2
    await wait_for_disconnects(standin, 1)
