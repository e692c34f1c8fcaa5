"""Local models in worker processes: the same answers as in process, errors and cancellation
across the process boundary, a crashed worker, the least recently used stopped when the pool is
full; and the request/chunk conversions the remote backend relies on."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from google.protobuf import json_format

from pluggably.generation.convert import generation_request_from_pb, generation_request_to_pb
from pluggably.v1 import generation_pb2 as G
from pluggably.v1 import stream_service_pb2_grpc

# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------

REQUESTS = [
    G.GenerateRequest(
        model="local/x",
        messages=[G.ChatMessage(role="user", content="hi")],
        text=G.TextOptions(max_tokens=5, temperature=0.3, stop=["a"], seed=3, top_k=4),
    ),
    G.GenerateRequest(
        model="fake/paint",
        prompt="p",
        image=G.ImageOptions(
            width=64,
            height=64,
            count=2,
            format=G.IMAGE_FORMAT_JPEG,
            inline_data=True,
            guidance_scale=7.5,
            negative_prompt="n",
        ),
    ),
    G.GenerateRequest(model="m", prompt="x"),
    G.GenerateRequest(
        model="local/shape",
        prompt="a chair",
        mesh=G.MeshOptions(
            steps=8, seed=2, grid_size=32, format=G.MESH_FORMAT_PLY, inline_data=True
        ),
    ),
    json_format.ParseDict(
        {
            "model": "a/b",
            "messages": [
                {
                    "role": "user",
                    "content": "q",
                    "parts": [{"image": {"url": "https://x/y.png"}}, {"text": "t"}],
                },
                {"role": "assistant", "toolCalls": [{"id": "c1", "name": "f", "arguments": "{}"}]},
                {"role": "tool", "toolCallId": "c1", "content": "r"},
            ],
            "tools": [
                {
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
                        "strict": True,
                    }
                }
            ],
            "toolChoice": {"mode": "TOOL_CHOICE_MODE_FUNCTION", "functionName": "f"},
            "providerOptions": {"k": [1, {"z": True}]},
            "text": {
                "responseFormat": {
                    "type": "RESPONSE_FORMAT_TYPE_JSON_SCHEMA",
                    "jsonSchema": {"name": "s", "schema": {"type": "object"}},
                }
            },
        },
        G.GenerateRequest(),
    ),
]


@pytest.mark.parametrize("pb", REQUESTS, ids=range(len(REQUESTS)))
def test_a_request_forwarded_reads_back_the_same(pb: G.GenerateRequest) -> None:
    first, modality = generation_request_from_pb(pb, "id")
    again, modality_again = generation_request_from_pb(generation_request_to_pb(first), "id")
    assert again == first and modality_again == modality


# --------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def gateways(tiny_model_dir, tmp_path_factory):
    """The tiny model in a worker process and in process, side by side."""
    from pluggably.config import Config
    from pluggably.server import GatewayServer

    def config(workers: bool) -> Config:
        return Config.model_validate(
            {
                "server": {"host": "127.0.0.1", "port": 0, "grace_period_s": 1},
                "auth": {"enabled": False},
                "metrics": {"enabled": False},
                "storage": {
                    "root": str(tmp_path_factory.mktemp("storage")),
                    "rescan_interval_s": 0,
                },
                "local": {
                    "models": [
                        {
                            "name": "tiny",
                            "path": str(tiny_model_dir),
                            "max_queue": 0,
                            "default_max_tokens": 16,
                        },
                        {"name": "tiny2", "path": str(tiny_model_dir), "max_queue": 0},
                    ],
                    "workers": {"enabled": workers, "max_workers": 1, "threads_per_worker": 1},
                },
            }
        )

    pooled, inproc = GatewayServer(config(True)), GatewayServer(config(False))
    await pooled.start()
    await inproc.start()
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for s in (pooled, inproc)]
    try:
        yield pooled, *(stream_service_pb2_grpc.StreamServiceStub(c) for c in channels), inproc
    finally:
        for channel in channels:
            await channel.close()
        await pooled.stop(grace=0)
        await inproc.stop(grace=0)


def chat(model: str = "local/tiny", **text: object) -> G.GenerateRequest:
    return G.GenerateRequest(
        model=model,
        messages=[G.ChatMessage(role="user", content="Hello there")],
        text=G.TextOptions(**text),
    )


async def tokens(stub, request) -> list[int]:
    ids: list[int] = []
    async for event in stub.StreamGenerate(request):
        ids.extend(event.text_delta.token_ids)
    return ids


def pool_of(server):
    return server.backends[0].pool


async def test_a_worker_gives_the_same_tokens_as_in_process(gateways) -> None:
    server, pooled, inproc, _ = gateways
    request = chat(max_tokens=12, seed=5, temperature=0.9)
    assert await tokens(pooled, request) == await tokens(inproc, request)
    pid = pool_of(server).pid("tiny")
    assert pid is not None and pid != os.getpid()


async def test_errors_cross_the_process_boundary_unchanged(gateways) -> None:
    _, pooled, inproc, _ = gateways
    request = chat(max_tokens=100_000)  # beyond the model's context
    errors = []
    for stub in (pooled, inproc):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tokens(stub, request)
        errors.append((caught.value.code(), caught.value.details()))
    assert errors[0] == errors[1]
    assert errors[0][0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_stops_the_generation_in_the_worker(gateways) -> None:
    """The model takes one request at a time and queues none: a second request succeeds only
    if the cancelled one really stopped in the worker."""
    _, pooled, _, _ = gateways
    long = chat(max_tokens=400)
    long.provider_options["ignore_eos"].bool_value = True
    call = pooled.StreamGenerate(long)
    await call.read()
    call.cancel()
    for _ in range(50):
        try:
            assert len(await tokens(pooled, chat(max_tokens=2))) == 2
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("the cancelled generation kept the worker busy")


async def test_a_crashed_worker_fails_its_calls_and_starts_again(gateways) -> None:
    server, pooled, _, _ = gateways
    await tokens(pooled, chat(max_tokens=2))
    pid = pool_of(server).pid("tiny")
    long = chat(max_tokens=400)
    long.provider_options["ignore_eos"].bool_value = True
    call = pooled.StreamGenerate(long)
    await call.read()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "exited" in caught.value.details()
    assert len(await tokens(pooled, chat(max_tokens=3))) == 3
    assert pool_of(server).pid("tiny") not in (None, pid)


async def test_a_full_pool_stops_the_least_recently_used_worker(gateways) -> None:
    server, pooled, _, _ = gateways
    await tokens(pooled, chat(max_tokens=2))
    first = pool_of(server).pid("tiny")
    await tokens(pooled, chat("local/tiny2", max_tokens=2))  # max_workers is 1
    assert pool_of(server).pid("tiny") is None and pool_of(server).pid("tiny2") is not None
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)


async def test_a_remote_provider_reaches_another_server(gateways, config_for) -> None:
    """The path past one machine: a `remote` provider forwards to any v1 server."""
    from pluggably.server import GatewayServer

    _, _, inproc, backend_server = gateways
    front = GatewayServer(
        config_for(
            [],
            providers={
                "gpu1": {
                    "kind": "remote",
                    "target": f"127.0.0.1:{backend_server.port}",
                    "models": [{"name": "local/tiny"}],
                },
                "gone": {"kind": "remote", "target": "127.0.0.1:9", "models": [{"name": "x/y"}]},
            },
        )
    )
    await front.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            stub = stream_service_pb2_grpc.StreamServiceStub(channel)
            request = chat(max_tokens=8, seed=3, temperature=0.8)
            direct = await tokens(inproc, request)
            request.model = "gpu1/local/tiny"
            assert await tokens(stub, request) == direct
            too_long = chat("gpu1/local/tiny", max_tokens=100_000)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await tokens(stub, too_long)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "text.max_tokens" in caught.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await tokens(stub, chat("gone/x/y"))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await front.stop(grace=0)


async def test_workers_over_the_memory_budget_stop_least_recently_used_first(
    tiny_model_dir, config_for
) -> None:
    from pluggably.server import GatewayServer

    server = GatewayServer(
        config_for(
            [
                {"name": "a", "path": str(tiny_model_dir)},
                {"name": "b", "path": str(tiny_model_dir)},
            ],
            local={
                "workers": {
                    "enabled": True,
                    "max_workers": 2,  # room for both by count...
                    "threads_per_worker": 1,
                    "max_memory_bytes": 1,  # ...but not by memory: one at a time
                }
            },
        )
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = stream_service_pb2_grpc.StreamServiceStub(channel)
            pool = pool_of(server)
            await tokens(stub, chat("local/a", max_tokens=2))
            assert pool.pid("a") is not None and pool.memory_bytes() > 1
            await tokens(stub, chat("local/b", max_tokens=2))
            assert pool.pid("a") is None and pool.pid("b") is not None
    finally:
        await server.stop(grace=0)
