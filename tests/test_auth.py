"""API keys, scopes, model allow-lists, per-key and per-process limits, as the server applies them
to real RPCs (native gRPC here; REST through Envoy at the end)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fakes import FakeBackend
from helpers import rich_error
from pluggably.app import StartupError
from pluggably.core.context import KeyLimits
from pluggably.core.types import Modality
from pluggably.devtools.envoy import Envoy
from pluggably.security.keys import KeyStore
from pluggably.server import GatewayServer
from pluggably.v1 import (
    generate_service_pb2_grpc,
    generation_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    storage_service_pb2,
    storage_service_pb2_grpc,
    stream_service_pb2_grpc,
)


def _request(model: str = "fake/echo", **kw) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(model=model, prompt="hi", **kw)


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
async def secured(config_for, tmp_path_factory):
    """A gateway with auth on over a fresh key store, and keys of several kinds."""
    store_path = tmp_path_factory.mktemp("keys") / "keys.db"
    store = KeyStore(store_path)
    keys = {
        "admin": store.create("admin", ["admin"])[0],
        "user": store.create("user", ["generate", "models:read"])[0],
        "reader": store.create("reader", ["models:read"])[0],
        "echo-only": store.create("echo-only", ["generate", "models:read"], models=["fake/echo"])[
            0
        ],
        "limited": store.create("limited", ["generate"], limits=KeyLimits(requests_per_minute=2))[
            0
        ],
        "tokens": store.create("tokens", ["generate"], limits=KeyLimits(tokens_per_minute=5))[0],
    }
    backend = FakeBackend(models={"echo": Modality.TEXT, "other": Modality.TEXT})
    server = GatewayServer(
        config_for(
            [],
            auth={"enabled": True, "store": str(store_path), "public_reflection": True},
            server={
                "host": "127.0.0.1",
                "port": 0,
                "grace_period_s": 1,
                "max_concurrent_streams": 2,
                "max_stream_duration_s": 1.0,
            },
        ),
        backends=[backend],
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, backend, channel, keys, store
    await server.stop(grace=0)
    store.close()


@pytest.fixture
def stack(secured):
    _server, backend, channel, keys, store = secured
    backend.behaviours.clear()
    backend.first_delay_s.clear()
    backend.delay_s = 0.0
    return backend, channel, keys, store


async def _generate(channel, key: str | None, model: str = "fake/echo"):
    metadata = _bearer(key) if key else None
    return await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
        _request(model), metadata=metadata
    )


async def _refusal(call) -> object:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return rich_error(caught.value)


async def test_a_valid_key_generates(stack) -> None:
    _, channel, keys, _ = stack
    reply = await _generate(channel, keys["user"])
    assert reply.model == "fake/echo"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "API_KEY_MISSING"),
        ("Basic dXNlcjpwYXNz", "API_KEY_MALFORMED"),
        ("Bearer pk_0000000000aa_notarealsecretnotarealsecretnotarealsecret", "API_KEY_INVALID"),
        ("Bearer garbage", "API_KEY_INVALID"),
    ],
)
async def test_no_valid_key_is_unauthenticated(stack, header, reason) -> None:
    _, channel, _, _ = stack
    metadata = (("authorization", header),) if header else None
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    err = await _refusal(stub.Generate(_request(), metadata=metadata))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    assert err.info.reason == reason
    assert header is None or header.split()[-1] not in err.message


async def test_a_stream_without_a_key_is_refused_before_it_starts(stack) -> None:
    backend, channel, _, _ = stack
    before = len(backend.requests)
    stub = stream_service_pb2_grpc.StreamServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [c async for c in stub.StreamGenerate(_request())]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(backend.requests) == before


async def test_a_key_without_the_scope_is_denied(stack) -> None:
    _, channel, keys, _ = stack
    err = await _refusal(_generate(channel, keys["reader"]))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.info.reason == "SCOPE_MISSING"
    assert err.info.metadata["scope"] == "generate"
    # ...but it may read models
    models = await model_service_pb2_grpc.ModelServiceStub(channel).ListModels(
        model_service_pb2.ListModelsRequest(), metadata=_bearer(keys["reader"])
    )
    assert {m.id for m in models.models} == {"fake/echo", "fake/other"}
    # and storage needs its own scope
    storage = storage_service_pb2_grpc.StorageServiceStub(channel)
    err = await _refusal(
        storage.GetStorageUsage(
            storage_service_pb2.GetStorageUsageRequest(), metadata=_bearer(keys["user"])
        )
    )
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.info.metadata["scope"] == "storage:read"


async def test_admin_may_call_everything(stack) -> None:
    _, channel, keys, _ = stack
    await _generate(channel, keys["admin"])
    storage = storage_service_pb2_grpc.StorageServiceStub(channel)
    usage = await storage.GetStorageUsage(
        storage_service_pb2.GetStorageUsageRequest(), metadata=_bearer(keys["admin"])
    )
    assert len(usage.categories) == 4


async def test_model_allow_list(stack) -> None:
    _, channel, keys, _ = stack
    await _generate(channel, keys["echo-only"], "fake/echo")
    err = await _refusal(_generate(channel, keys["echo-only"], "fake/other"))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.info.reason == "MODEL_NOT_ALLOWED"
    # A fallback outside the list is refused too: it could end up serving.
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    err = await _refusal(
        stub.Generate(
            _request("fake/echo", fallback_models=["fake/other"]),
            metadata=_bearer(keys["echo-only"]),
        )
    )
    assert err.info.reason == "MODEL_NOT_ALLOWED"
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    listed = await models.ListModels(
        model_service_pb2.ListModelsRequest(), metadata=_bearer(keys["echo-only"])
    )
    assert [m.id for m in listed.models] == ["fake/echo"]
    err = await _refusal(
        models.GetModel(
            model_service_pb2.GetModelRequest(id="fake/other"), metadata=_bearer(keys["echo-only"])
        )
    )
    assert err.code == grpc.StatusCode.PERMISSION_DENIED


async def test_health_and_reflection_are_open_and_reject_garbage_clearly(stack) -> None:
    _, channel, _, _ = stack
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await call.read()
    await call.done_writing()
    assert any(s.name == "grpc.health.v1.Health" for s in answer.list_services_response.service)

    # Undecodable requests: INVALID_ARGUMENT with details, never UNKNOWN with parser text.
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    err = await _refusal(check(b"\xff\xff\xff"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.info.reason == "MALFORMED_REQUEST"
    bidi = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    call = bidi()
    await call.write(b"\xff\xff\xff")
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_revocation_takes_effect_on_the_next_call(stack, tmp_path) -> None:
    _, channel, _, store = stack
    key, record = store.create("short-lived", ["generate"])
    await _generate(channel, key)
    # Revoked through another handle on the same file, as the CLI or another server would.
    other = KeyStore(store.path)
    try:
        assert other.revoke(record.key_id)
    finally:
        other.close()
    err = await _refusal(_generate(channel, key))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


async def test_requests_per_minute_per_key(stack) -> None:
    _, channel, keys, _ = stack
    await _generate(channel, keys["limited"])
    await _generate(channel, keys["limited"])
    err = await _refusal(_generate(channel, keys["limited"]))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = err.details["google.rpc.QuotaFailure"]
    assert keys["limited"].split("_")[1] in quota.violations[0].subject
    assert err.details["google.rpc.RetryInfo"].retry_delay.ToNanoseconds() > 0
    # Other keys are not affected.
    await _generate(channel, keys["user"])


async def test_tokens_per_minute_are_charged_from_usage(stack) -> None:
    _, channel, keys, _ = stack
    # The fake reports 3 prompt + 3 completion tokens: the first call spends the budget of 5.
    await _generate(channel, keys["tokens"])
    err = await _refusal(_generate(channel, keys["tokens"]))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.info.reason == "RATE_LIMIT_TOKENS"


async def test_streams_per_process_are_capped(stack) -> None:
    backend, channel, keys, _ = stack
    backend.first_delay_s["echo"] = 0.5
    stub = stream_service_pb2_grpc.StreamServiceStub(channel)
    calls = [stub.StreamGenerate(_request(), metadata=_bearer(keys["user"])) for _ in range(2)]
    await asyncio.sleep(0.15)  # both are past admission and waiting on the fake's delay
    third = stub.StreamGenerate(_request(), metadata=_bearer(keys["user"]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [c async for c in third]
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_error(caught.value).info.reason == "SERVER_STREAMS_EXHAUSTED"
    for call in calls:
        assert [c async for c in call][-1].HasField("done")
    # The slots came back.
    assert [c async for c in stub.StreamGenerate(_request(), metadata=_bearer(keys["user"]))]


async def test_a_stream_longer_than_allowed_ends_with_deadline_exceeded(stack) -> None:
    backend, channel, keys, _ = stack
    backend.delay_s = 0.4  # three words: 1.2 s against max_stream_duration_s = 1
    stub = stream_service_pb2_grpc.StreamServiceStub(channel)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in stub.StreamGenerate(_request(), metadata=_bearer(keys["user"])):
            received.append(chunk)
    assert received, "the stream produced output before it was cut"
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.info.reason == "MAX_STREAM_DURATION"
    await asyncio.wait_for(backend.cancelled.wait(), 2)


async def test_no_active_key_refuses_to_start(config_for, tmp_path) -> None:
    store_path = tmp_path / "empty.db"
    server = GatewayServer(
        config_for([], auth={"enabled": True, "store": str(store_path)}),
        backends=[FakeBackend()],
    )
    with pytest.raises(StartupError, match="no active API key"):
        await server.start()


async def test_health_can_require_a_key(config_for, tmp_path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    key = store.create("k", ["models:read"])[0]
    server = GatewayServer(
        config_for([], auth={"enabled": True, "store": str(store.path), "public_health": False}),
        backends=[FakeBackend()],
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            err = await _refusal(health.Check(health_pb2.HealthCheckRequest()))
            assert err.code == grpc.StatusCode.UNAUTHENTICATED
            reply = await health.Check(health_pb2.HealthCheckRequest(), metadata=_bearer(key))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=0)
        store.close()


async def test_rest_through_envoy_maps_auth_and_limits_to_http(secured, tmp_path) -> None:
    server, backend, _, keys, _ = secured
    backend.behaviours.clear()
    backend.delay_s = 0.0
    backend.first_delay_s.clear()
    envoy = Envoy(server.port, tmp_path)
    await asyncio.to_thread(envoy.start)
    body = json.dumps({"model": "fake/echo", "prompt": "hi"})
    try:
        async with aiohttp.ClientSession() as http:

            async def post(key: str | None) -> tuple[int, dict, dict]:
                headers = {"content-type": "application/json"}
                if key:
                    headers["authorization"] = f"Bearer {key}"
                async with http.post(f"{envoy.url}/v1/generate", data=body, headers=headers) as r:
                    return (
                        r.status,
                        {k.lower(): v for k, v in r.headers.items()},
                        await r.json(content_type=None),
                    )

            status, _, payload = await post(None)
            assert status == 401
            assert payload["details"][0]["reason"] == "API_KEY_MISSING"
            status, _, payload = await post(keys["reader"])
            assert status == 403
            status, _, payload = await post(keys["admin"])
            assert status == 200 and payload["model"] == "fake/echo"

            limited = KeyStore(server.config.auth.store)
            try:
                key = limited.create("rest-limited", ["generate"], limits=KeyLimits(1))[0]
            finally:
                limited.close()
            assert (await post(key))[0] == 200
            status, headers, payload = await post(key)
            assert status == 429
            assert int(headers["retry-after"]) >= 1
            assert payload["details"][0]["reason"] == "RATE_LIMIT_REQUESTS"
    finally:
        envoy.stop()
