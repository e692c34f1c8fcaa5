"""REST, SSE and native gRPC through the real Envoy with the shipped configuration."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess

import aiohttp
import grpc
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2

from fakes import FakeBackend
from pluggably.core import errors
from pluggably.core.types import Modality
from pluggably.devtools.envoy import REPO_ROOT, SHIPPED_CONFIG, Envoy, envoy_binary
from pluggably.server import GatewayServer
from pluggably.v1 import model_service_pb2, model_service_pb2_grpc

TINY_CHAT = {"model": "local/tiny", "messages": [{"role": "user", "content": "Hello there"}]}


@pytest.fixture(scope="module")
async def tiny_envoy(tiny_gateway, tmp_path_factory):
    envoy = Envoy(tiny_gateway.port, tmp_path_factory.mktemp("envoy-tiny"))
    await asyncio.to_thread(envoy.start)
    yield envoy
    envoy.stop()


@pytest.fixture(scope="module")
async def fake_stack(config_for, tmp_path_factory):
    backend = FakeBackend(models={"echo": Modality.TEXT})
    server = GatewayServer(config_for([]), backends=[backend])
    await server.start()
    envoy = Envoy(server.port, tmp_path_factory.mktemp("envoy-fake"))
    await asyncio.to_thread(envoy.start)
    yield backend, envoy
    envoy.stop()
    await server.stop(grace=0)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def read_sse(response: aiohttp.ClientResponse) -> list[dict]:
    """Parses a text/event-stream body event by event."""
    events, buffer = [], b""
    async for data in response.content.iter_any():
        buffer += data
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            lines = [
                line[len(b"data:") :].strip()
                for line in raw.split(b"\n")
                if line.startswith(b"data:")
            ]
            if lines:
                events.append(json.loads(b"\n".join(lines)))
    assert not buffer.strip(), f"trailing partial event: {buffer!r}"
    return events


def test_shipped_config_validates() -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(SHIPPED_CONFIG)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


async def test_rest_unary_generate(tiny_envoy, http) -> None:
    body = {**TINY_CHAT, "text": {"maxTokens": 5, "seed": 3}}
    async with http.post(
        f"{tiny_envoy.url}/v1/generate", json=body, headers={"x-request-id": "rest-1"}
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers["x-request-id"] == "rest-1"
        result = await r.json()
    assert result["id"] == "rest-1" and result["model"] == "local/tiny"
    assert result["finishReason"] == "FINISH_REASON_LENGTH"
    assert result["usage"]["completionTokens"] == 5 == len(result["tokenIds"])
    assert result["usage"]["totalTokens"] == result["usage"]["promptTokens"] + 5


async def test_rest_accepts_snake_case_fields(tiny_envoy, http) -> None:
    body = {**TINY_CHAT, "text": {"max_tokens": 3, "seed": 3}}
    async with http.post(f"{tiny_envoy.url}/v1/generate", json=body) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["usage"]["completionTokens"] == 3


async def test_sse_stream_event_by_event(tiny_envoy, http) -> None:
    body = {**TINY_CHAT, "text": {"maxTokens": 12, "seed": 7}}
    async with http.post(f"{tiny_envoy.url}/v1/generate:stream", json=body) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = await read_sse(r)
    kinds = [next(k for k in ("textDelta", "progress", "done", "error") if k in e) for e in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"textDelta"}
    assert len({e["id"] for e in events}) == 1
    token_ids = [t for e in events[:-1] for t in e["textDelta"].get("tokenIds", [])]
    done = events[-1]["done"]
    assert done["finishReason"] == "FINISH_REASON_LENGTH"
    assert done["usage"]["completionTokens"] == 12 == len(token_ids)
    # Same seed through unary REST: the same tokens.
    async with http.post(f"{tiny_envoy.url}/v1/generate", json=body) as r:
        assert (await r.json())["tokenIds"] == token_ids


async def test_sse_stream_is_incremental(fake_stack, http) -> None:
    backend, envoy = fake_stack
    backend.delay_s = 0.3
    try:
        loop = asyncio.get_running_loop()
        arrivals = []
        async with http.post(
            f"{envoy.url}/v1/generate:stream", json={"model": "fake/echo", "prompt": "x"}
        ) as r:
            async for _line in r.content:
                if _line.startswith(b"data:"):
                    arrivals.append(loop.time())
        assert len(arrivals) == 4  # three deltas and done
        assert arrivals[2] - arrivals[0] > 0.45, "events were buffered instead of streamed"
    finally:
        backend.delay_s = 0


async def test_bad_parameters_are_400_with_details(tiny_envoy, http) -> None:
    body = {**TINY_CHAT, "text": {"temperature": -1, "topP": 1.5}}
    async with http.post(f"{tiny_envoy.url}/v1/generate", json=body) as r:
        assert r.status == 400
        status = await r.json()
    assert status["code"] == code_pb2.INVALID_ARGUMENT
    by_type = {d["@type"].rsplit("/", 1)[1]: d for d in status["details"]}
    assert by_type["google.rpc.ErrorInfo"]["reason"] == "INVALID_ARGUMENT"
    fields = [v["field"] for v in by_type["google.rpc.BadRequest"]["fieldViolations"]]
    assert fields == ["text.temperature", "text.top_p"]


async def test_max_tokens_above_the_model_limit_is_400(tiny_envoy, http) -> None:
    body = {**TINY_CHAT, "text": {"maxTokens": 100000}}
    async with http.post(f"{tiny_envoy.url}/v1/generate:stream", json=body) as r:
        assert r.status == 400
        status = await r.json()
    violations = next(d for d in status["details"] if d["@type"].endswith("BadRequest"))[
        "fieldViolations"
    ]
    assert [v["field"] for v in violations] == ["text.max_tokens"]


async def test_unknown_model_is_404_with_details(tiny_envoy, http) -> None:
    async with http.post(
        f"{tiny_envoy.url}/v1/generate", json={"model": "local/nope", "prompt": "x"}
    ) as r:
        assert r.status == 404
        status = await r.json()
    assert status["code"] == code_pb2.NOT_FOUND
    info = next(d for d in status["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "MODEL_NOT_FOUND" and info["metadata"]["model"] == "local/nope"
    async with http.get(f"{tiny_envoy.url}/v1/models/local/nope") as r:
        assert r.status == 404


async def test_unknown_query_parameter_is_400(tiny_envoy, http) -> None:
    async with http.get(f"{tiny_envoy.url}/v1/models?pageSize=1") as r:
        assert r.status == 200
    async with http.get(f"{tiny_envoy.url}/v1/models?bogus=1") as r:
        assert r.status == 400


async def test_unknown_method_is_404(tiny_envoy, http) -> None:
    async with http.get(f"{tiny_envoy.url}/v1/nothing-here") as r:
        assert r.status == 404
    async with http.post(f"{tiny_envoy.url}/v2/generate", json={}) as r:
        assert r.status == 404


async def test_malformed_json_is_400(tiny_envoy, http) -> None:
    async with http.post(
        f"{tiny_envoy.url}/v1/generate",
        data=b"{not json",
        headers={"content-type": "application/json"},
    ) as r:
        assert r.status == 400


async def test_openapi_document_is_served(tiny_envoy, http) -> None:
    async with http.get(f"{tiny_envoy.url}/openapi.json") as r:
        assert r.status == 200
        assert r.headers["content-type"] == "application/json"
        served = json.loads(await r.read())
    assert served == json.loads((REPO_ROOT / "envoy" / "openapi.json").read_text())


async def test_models_over_rest(tiny_envoy, http) -> None:
    async with http.get(f"{tiny_envoy.url}/v1/models") as r:
        models = (await r.json())["models"]
    assert [m["id"] for m in models] == ["local/tiny"]
    assert models[0]["aliases"] == ["tiny-alias"] and models[0]["modality"] == "MODALITY_TEXT"
    async with http.get(f"{tiny_envoy.url}/v1/models/local%2Ftiny") as r:
        assert (await r.json())["id"] == "local/tiny"
    async with http.get(f"{tiny_envoy.url}/v1/models/tiny-alias") as r:
        assert (await r.json())["id"] == "local/tiny"
    async with http.get(f"{tiny_envoy.url}/v1/models/local/tiny:parameters") as r:
        params = await r.json()
    assert params["model"] == "local/tiny"
    assert {p["name"] for p in params["parameters"]} >= {
        "text.temperature",
        "text.max_tokens",
        "text.stop",
    }


async def test_native_grpc_through_envoy(tiny_envoy) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_envoy.http_port}") as channel:
        response = await model_service_pb2_grpc.ModelServiceStub(channel).ListModels(
            model_service_pb2.ListModelsRequest()
        )
    assert [m.id for m in response.models] == ["local/tiny"]


async def test_mid_stream_error_ends_the_sse_stream_with_an_error_event(fake_stack, http) -> None:
    backend, envoy = fake_stack
    backend.error_after["echo"] = (2, errors.Unavailable("backend went away"))
    try:
        async with http.post(
            f"{envoy.url}/v1/generate:stream", json={"model": "fake/echo", "prompt": "x"}
        ) as r:
            assert r.status == 200
            events = await read_sse(r)
    finally:
        backend.error_after.clear()
    assert [next(iter(k for k in e if k not in ("id", "model"))) for e in events] == [
        "textDelta",
        "textDelta",
        "error",
    ]
    assert events[-1]["error"]["code"] == code_pb2.UNAVAILABLE
    assert events[-1]["error"]["message"] == "backend went away"


async def test_native_grpc_through_envoy_gets_errors_as_status(fake_stack) -> None:
    """The inline-error header is only added on REST routes."""
    from pluggably.v1 import generation_pb2, stream_service_pb2_grpc

    backend, envoy = fake_stack
    backend.error_after["echo"] = (2, errors.Unavailable("backend went away"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.http_port}") as channel:
            call = stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(
                generation_pb2.GenerateRequest(model="fake/echo", prompt="x")
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [c async for c in call]
    finally:
        backend.error_after.clear()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_disconnect_cancels_the_generation(fake_stack, http) -> None:
    backend, envoy = fake_stack
    backend.words = ["w"] * 200
    backend.delay_s = 0.05
    backend.cancelled.clear()
    try:
        async with http.post(
            f"{envoy.url}/v1/generate:stream", json={"model": "fake/echo", "prompt": "x"}
        ) as r:
            await r.content.readline()
            r.close()
        await asyncio.wait_for(backend.cancelled.wait(), 5)
    finally:
        backend.words = ["hello", " ", "world"]
        backend.delay_s = 0


def _http_rules():
    fds = descriptor_pb2.FileDescriptorSet.FromString(
        (REPO_ROOT / "envoy" / "pluggably.pb").read_bytes()
    )
    for file in fds.file:
        if not file.package.startswith("pluggably."):
            continue
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                yield f"{service.name}.{method.name}", verb, getattr(rule, verb)


@pytest.mark.parametrize(("method", "verb", "template"), list(_http_rules()), ids=lambda v: str(v))
async def test_every_http_mapping_reaches_the_server(
    fake_stack, http, method, verb, template
) -> None:
    _backend, envoy = fake_stack
    path = re.sub(r"\{(\w+)(=[^}]*)?\}", lambda m: "fake/echo" if m.group(2) else "abc", template)
    body = {"model": "fake/echo", "prompt": "x"} if "Generate" in method else {}
    kwargs = {"json": body} if verb in ("post", "patch", "put") else {}
    async with http.request(verb.upper(), f"{envoy.url}{path}", **kwargs) as r:
        text = await r.text()
        grpc_status = r.headers.get("grpc-status")
        # Only answers that came from upstream carry this: Envoy's own replies (an unmatched
        # route, a rejected request) do not.
        reached = "x-envoy-upstream-service-time" in r.headers
    assert reached, f"{method}: Envoy answered itself: {r.status} {text}"
    # Placeholder ids are refused or not found by the server (this server has no local models
    # or downloads); nothing may fail inside it.
    assert r.status in (200, 400, 404, 501), f"{method}: {r.status} {text}"
    if r.status == 200:
        assert grpc_status in (None, "0")
    else:
        assert json.loads(text)["details"][0]["domain"] == "pluggably.dev"


async def test_rest_errors_carry_the_request_id(tiny_envoy, http) -> None:
    async with http.post(
        f"{tiny_envoy.url}/v1/generate:stream",
        json={"model": "local/nope", "prompt": "x"},
        headers={"x-request-id": "err-7"},
    ) as r:
        assert r.status == 404
        assert r.headers["x-request-id"] == "err-7"
        info = next(d for d in (await r.json())["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["metadata"]["request_id"] == "err-7"
