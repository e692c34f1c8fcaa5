"""Request limits applied before any backend runs (prompt size, per-model output caps), and
per-key budgets shared through Redis by several gateways."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from fakes import FakeBackend
from helpers import rich_error
from pluggably.core.context import KeyLimits
from pluggably.core.types import Modality
from pluggably.security.keys import KeyStore
from pluggably.server import GatewayServer
from pluggably.v1 import generate_service_pb2_grpc, generation_pb2
from redis_util import RedisServer


@pytest.fixture(scope="module")
async def limited(config_for):
    backend = FakeBackend(models={"echo": Modality.TEXT, "big": Modality.TEXT})
    server = GatewayServer(
        config_for(
            [],
            limits={
                "max_prompt_chars": 1000,
                "models": {"fake/echo": {"max_tokens": 64}, "*": {"max_tokens": 512}},
            },
            aliases={"short": "fake/big"},
        ),
        backends=[backend],
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield backend, generate_service_pb2_grpc.GenerateServiceStub(channel)
    await server.stop(grace=0)


async def _refused(call) -> object:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return rich_error(caught.value)


async def test_a_prompt_over_the_limit_is_refused_before_any_backend(limited) -> None:
    backend, stub = limited
    before = len(backend.requests)
    err = await _refused(
        stub.Generate(generation_pb2.GenerateRequest(model="fake/echo", prompt="x" * 1001))
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.info.reason == "PROMPT_TOO_LONG"
    assert err.fields == ["prompt"]
    chat = generation_pb2.GenerateRequest(
        model="fake/echo",
        messages=[
            generation_pb2.ChatMessage(role="user", content="x" * 600),
            generation_pb2.ChatMessage(
                role="user", parts=[generation_pb2.ContentPart(text="y" * 600)]
            ),
        ],
    )
    err = await _refused(stub.Generate(chat))
    assert err.fields == ["messages"]
    assert len(backend.requests) == before
    await stub.Generate(generation_pb2.GenerateRequest(model="fake/echo", prompt="x" * 1000))


async def test_max_tokens_is_capped_per_model(limited) -> None:
    backend, stub = limited
    err = await _refused(
        stub.Generate(
            generation_pb2.GenerateRequest(
                model="fake/echo", prompt="hi", text=generation_pb2.TextOptions(max_tokens=65)
            )
        )
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.fields == ["text.max_tokens"]
    assert "64" in err.message
    # Unset: the cap becomes the request's limit.
    await stub.Generate(generation_pb2.GenerateRequest(model="fake/echo", prompt="hi"))
    assert backend.requests[-1].text.max_tokens == 64
    # "*" covers models without their own entry, also when named by an alias.
    await stub.Generate(generation_pb2.GenerateRequest(model="short", prompt="hi"))
    assert backend.requests[-1].text.max_tokens == 512
    err = await _refused(
        stub.Generate(
            generation_pb2.GenerateRequest(
                model="fake/big", prompt="hi", text=generation_pb2.TextOptions(max_tokens=513)
            )
        )
    )
    assert err.fields == ["text.max_tokens"]


async def test_a_fallback_with_a_lower_cap_lowers_the_limit(limited) -> None:
    backend, stub = limited
    await stub.Generate(
        generation_pb2.GenerateRequest(model="fake/big", prompt="hi", fallback_models=["fake/echo"])
    )
    assert backend.requests[-1].text.max_tokens == 64


async def test_gateways_sharing_redis_share_one_budget(config_for, tmp_path) -> None:
    """Two gateway processes' worth of servers, one key store, one Redis: a key allowed 4
    requests per minute gets 4 in all, however the calls are spread and however concurrent."""
    store = KeyStore(tmp_path / "keys.db")
    key = store.create("shared", ["generate"], limits=KeyLimits(requests_per_minute=4))[0]
    store.close()
    with RedisServer() as redis:
        servers = [
            GatewayServer(
                config_for(
                    [],
                    auth={"enabled": True, "store": str(tmp_path / "keys.db")},
                    limits={"backend": "redis", "redis_url": redis.url},
                ),
                backends=[FakeBackend()],
            )
            for _ in range(2)
        ]
        for server in servers:
            await server.start()
        try:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for s in servers]
            stubs = [generate_service_pb2_grpc.GenerateServiceStub(c) for c in channels]
            request = generation_pb2.GenerateRequest(model="fake/echo", prompt="hi")
            metadata = (("authorization", f"Bearer {key}"),)

            async def call(i: int) -> grpc.StatusCode:
                try:
                    await stubs[i % 2].Generate(request, metadata=metadata)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            codes = await asyncio.gather(*(call(i) for i in range(12)))
            assert codes.count(grpc.StatusCode.OK) == 4
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8
            for channel in channels:
                await channel.close()
        finally:
            for server in servers:
                await server.stop(grace=0)


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_prompt_text_is_logged_only_when_switched_on(config_for, caplog, log_prompts) -> None:
    server = GatewayServer(
        config_for([], logging={"level": "DEBUG", "log_prompts": log_prompts}),
        backends=[FakeBackend()],
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
            with caplog.at_level("DEBUG"):
                await stub.Generate(
                    generation_pb2.GenerateRequest(
                        model="fake/echo",
                        messages=[
                            generation_pb2.ChatMessage(role="user", content="my secret diary")
                        ],
                    )
                )
    finally:
        await server.stop(grace=0)
    logged = [r for r in caplog.records if "my secret diary" in str(r.__dict__)]
    assert bool(logged) is log_prompts
    if log_prompts:
        assert logged[0].name == "pluggably.prompts" and logged[0].levelname == "DEBUG"
