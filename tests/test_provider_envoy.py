"""Hosted providers through the real Envoy: REST JSON and SSE in, provider wire formats out, and
upstream failures as HTTP statuses (before the first chunk) or the terminal `error` event."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest

from pluggably.devtools.envoy import Envoy
from pluggably.devtools.standins import Fault, Reply, ToolCallSpec
from providers_util import MODELS, provider_stack

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER = {
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
}


@pytest.fixture(scope="module")
async def rest(tmp_path_factory):
    async with provider_stack() as stack:
        envoy = Envoy(stack.server.port, tmp_path_factory.mktemp("envoy-providers"))
        await asyncio.to_thread(envoy.start)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                yield stack, envoy, http
        finally:
            envoy.stop()


@pytest.fixture
def api(rest):
    stack, envoy, http = rest
    stack.reset()
    return stack, envoy.url, http


def body(provider: str, **extra) -> dict:
    return {
        "model": f"{provider}/{MODELS[provider]}",
        "messages": [{"role": "user", "content": "Hi there"}],
        **extra,
    }


async def sse_events(response: aiohttp.ClientResponse) -> list[dict]:
    events, buffer = [], b""
    async for data in response.content.iter_any():
        buffer += data
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            lines = [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]
            if lines:
                events.append(json.loads(b"\n".join(lines)))
    return events


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_rest_unary_with_an_image(api, provider) -> None:
    _stack, url, http = api
    message = {
        "role": "user",
        "content": "What is this?",
        "parts": [{"image": {"data": base64.b64encode(PNG).decode(), "mimeType": "image/png"}}],
    }
    async with http.post(f"{url}/v1/generate", json=body(provider, messages=[message])) as r:
        assert r.status == 200, await r.text()
        result = await r.json()
    assert result["text"].endswith("(saw 1 image(s))")
    assert result["finishReason"] == "FINISH_REASON_STOP" and result["modelVersion"]
    assert result["usage"]["promptTokens"] > 0


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_sse_streams_tool_call_deltas(api, provider) -> None:
    stack, url, http = api
    stack.standin(provider).script(
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Oslo"}, id="call_9")])
    )
    async with http.post(f"{url}/v1/generate:stream", json=body(provider, tools=[WEATHER])) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = await sse_events(r)
    deltas = [e["toolCallDelta"] for e in events if "toolCallDelta" in e]
    assert deltas[0]["id"] == "call_9" and deltas[0]["name"] == "get_weather"
    assert json.loads("".join(d.get("arguments", "") for d in deltas)) == {"city": "Oslo"}
    assert events[-1]["done"]["finishReason"] == "FINISH_REASON_TOOL_CALLS"


async def test_rate_limit_is_http_429_with_retry_info(api) -> None:
    stack, url, http = api
    stack.standin("openai").inject(Fault("status", status=429, retry_after=1, times=10))
    async with http.post(f"{url}/v1/generate", json=body("openai")) as r:
        assert r.status == 429
        status = await r.json()
    info = next(d for d in status["details"] if d["@type"].endswith("ErrorInfo"))
    retry = next(d for d in status["details"] if d["@type"].endswith("RetryInfo"))
    assert info["reason"] == "PROVIDER_RATE_LIMITED" and retry["retryDelay"] == "1s"
    assert len(stack.standin("openai").requests) == 3  # max_attempts of the test config


async def test_upstream_failure_mid_stream_is_the_terminal_error_event(api) -> None:
    stack, url, http = api
    stack.standin("anthropic").inject(Fault("drop_mid_stream", after_chunks=4))
    async with http.post(f"{url}/v1/generate:stream", json=body("anthropic")) as r:
        assert r.status == 200
        events = await sse_events(r)
    assert any("textDelta" in e for e in events[:-1])
    error = events[-1]["error"]
    assert error["code"] == 14  # UNAVAILABLE
    info = next(d for d in error["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "PROVIDER_UNAVAILABLE" and info["metadata"]["provider"] == "anthropic"


async def test_bad_request_to_a_provider_is_400_naming_the_field(api) -> None:
    stack, url, http = api
    async with http.post(
        f"{url}/v1/generate", json=body("anthropic", text={"temperature": 1.5})
    ) as r:
        assert r.status == 400
        status = await r.json()
    violations = next(d for d in status["details"] if d["@type"].endswith("BadRequest"))[
        "fieldViolations"
    ]
    assert violations[0]["field"] == "text.temperature"
    assert stack.standin("anthropic").requests == []


async def test_rest_client_disconnect_reaches_the_provider(api) -> None:
    stack, url, http = api
    standin = stack.standin("gemini")
    standin.script(Reply(text=" ".join(f"w{i}" for i in range(200)), chunks=200))
    standin.chunk_delay_s = 0.02
    try:
        async with http.post(f"{url}/v1/generate:stream", json=body("gemini")) as r:
            async for _ in r.content.iter_any():
                break  # the first bytes arrived: hang up
        for _ in range(100):
            if standin.disconnects:
                break
            await asyncio.sleep(0.05)
        assert standin.disconnects == 1
    finally:
        standin.chunk_delay_s = 0.0


async def test_models_list_capabilities_over_rest(api) -> None:
    _stack, url, http = api
    async with http.get(f"{url}/v1/models/openai/gpt-4o-mini") as r:
        assert r.status == 200
        model = await r.json()
    assert model["capabilities"]["tools"] is True and model["capabilities"]["imageInput"] is True
    assert model["circuitState"] == "CIRCUIT_STATE_CLOSED"
    async with http.get(f"{url}/v1/models/anthropic/claude-sonnet-4-6:parameters") as r:
        params = {p["name"]: p for p in (await r.json())["parameters"]}
    assert params["text.temperature"]["maximum"] == 1 and not params["text.seed"]["supported"]
