"""Text generation end to end over native gRPC: the real server, stubs and the tiny local model."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import rich_error
from pluggably.v1 import generate_service_pb2_grpc, generation_pb2, stream_service_pb2_grpc

Message = generation_pb2.ChatMessage
CHAT = [
    Message(role="system", content="You are terse."),
    Message(role="user", content="Say something."),
]


def chat_request(model: str = "local/tiny", **text) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        model=model, messages=CHAT, text=generation_pb2.TextOptions(**text)
    )


def no_eos(request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateRequest:
    """The random model may end early; vLLM-style ignore_eos keeps token counts exact."""
    request.provider_options["ignore_eos"].bool_value = True
    return request


@pytest.fixture(scope="module")
def generate(tiny_channel):
    return generate_service_pb2_grpc.GenerateServiceStub(tiny_channel).Generate


@pytest.fixture(scope="module")
def stream(tiny_channel):
    return stream_service_pb2_grpc.StreamServiceStub(tiny_channel).StreamGenerate


async def test_unary_chat_honours_max_tokens(generate) -> None:
    response = await generate(no_eos(chat_request(max_tokens=7, seed=1)))
    assert response.model == "local/tiny" and response.id
    assert response.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert response.usage.completion_tokens == 7 == len(response.token_ids)
    assert response.usage.prompt_tokens > 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


async def test_default_max_tokens_comes_from_config(generate) -> None:
    response = await generate(no_eos(chat_request(seed=2)))
    assert response.usage.completion_tokens == 16  # default_max_tokens of the test config


async def test_plain_prompt_without_chat_template(generate) -> None:
    chat = await generate(no_eos(chat_request(max_tokens=3, seed=3)))
    request = no_eos(
        generation_pb2.GenerateRequest(
            model="local/tiny",
            prompt="Say something.",
            text=generation_pb2.TextOptions(max_tokens=3, seed=3),
        )
    )
    plain = await generate(request)
    assert plain.usage.completion_tokens == 3
    assert plain.usage.prompt_tokens < chat.usage.prompt_tokens  # no template around it


async def test_stream_yields_deltas_then_one_final_chunk(stream, generate) -> None:
    request = no_eos(chat_request(max_tokens=20, seed=5))
    chunks = [c async for c in stream(request)]
    events = [c.WhichOneof("event") for c in chunks]
    assert events[-1] == "done" and set(events[:-1]) == {"text_delta"} and len(events) >= 2
    assert len({c.id for c in chunks}) == 1 and {c.model for c in chunks} == {"local/tiny"}
    ids = [t for c in chunks[:-1] for t in c.text_delta.token_ids]
    done = chunks[-1].done
    assert done.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert done.usage.completion_tokens == 20 == len(ids)
    unary = await generate(request)
    assert list(unary.token_ids) == ids
    assert unary.text == "".join(c.text_delta.text for c in chunks[:-1])


async def test_seed_reproducibility_by_token_ids(generate) -> None:
    first = await generate(no_eos(chat_request(max_tokens=24, seed=11, temperature=1.0)))
    again = await generate(no_eos(chat_request(max_tokens=24, seed=11, temperature=1.0)))
    other = await generate(no_eos(chat_request(max_tokens=24, seed=12, temperature=1.0)))
    assert list(first.token_ids) == list(again.token_ids)
    assert list(first.token_ids) != list(other.token_ids)


async def test_concurrent_seeded_requests_stay_reproducible(generate) -> None:
    requests = [no_eos(chat_request(max_tokens=16, seed=s)) for s in (21, 22, 21)]
    a, b, c = await asyncio.gather(*(generate(r) for r in requests))
    assert list(a.token_ids) == list(c.token_ids) != list(b.token_ids)


async def test_greedy_is_deterministic_without_seed(generate) -> None:
    first = await generate(no_eos(chat_request(max_tokens=12, temperature=0)))
    second = await generate(no_eos(chat_request(max_tokens=12, temperature=0)))
    assert list(first.token_ids) == list(second.token_ids)


async def test_stop_sequence_ends_generation_and_is_not_returned(generate) -> None:
    base = await generate(no_eos(chat_request(max_tokens=60, seed=8, temperature=0.8)))
    text = base.text
    # A short stop sequence taken from the middle of the text, free of replacement characters.
    start = next(
        i
        for i in range(len(text) // 3, len(text) - 3)
        if "\ufffd" not in text[i : i + 3] and text[i : i + 3].strip()
    )
    stop = text[start : start + 3]
    stopped = await generate(
        no_eos(chat_request(max_tokens=60, seed=8, temperature=0.8, stop=[stop]))
    )
    assert stopped.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert stopped.stop_sequence == stop
    assert stopped.text == text[: text.index(stop)]
    assert stopped.usage.completion_tokens < base.usage.completion_tokens
    assert list(stopped.token_ids) == list(base.token_ids[: len(stopped.token_ids)])


async def test_end_of_sequence_finishes_with_stop(generate) -> None:
    for seed in range(40):
        response = await generate(chat_request(max_tokens=60, seed=seed, temperature=1.5))
        if response.usage.completion_tokens < 60:
            assert response.finish_reason == generation_pb2.FINISH_REASON_STOP
            assert not response.stop_sequence
            return
    pytest.fail("the tiny model never produced an end-of-sequence token in 40 seeds")


async def test_penalties_change_the_output(generate) -> None:
    # Greedy decoding of a random model loops over a few tokens; penalties must break the loop.
    plain = await generate(no_eos(chat_request(max_tokens=30, temperature=0)))
    assert len(set(plain.token_ids)) < 30
    for penalty in ({"presence_penalty": 2}, {"frequency_penalty": 2}, {"repetition_penalty": 5}):
        penalised = await generate(no_eos(chat_request(max_tokens=30, temperature=0, **penalty)))
        assert len(set(penalised.token_ids)) > len(set(plain.token_ids)), penalty


async def test_alias_resolves_to_the_model(generate) -> None:
    response = await generate(no_eos(chat_request("tiny-alias", max_tokens=2)))
    assert response.model == "local/tiny"


async def test_max_tokens_above_context_names_the_field(generate) -> None:
    for max_tokens in (100_000, 505):  # above the context; the prompt no longer fits beside it
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(chat_request(max_tokens=max_tokens))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == ["text.max_tokens"]


async def test_unknown_provider_option_is_rejected(generate) -> None:
    request = chat_request(max_tokens=2)
    request.provider_options["logit_bias"].string_value = "x"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(request)
    assert rich_error(caught.value).fields == ["provider_options.logit_bias"]


async def test_client_cancel_stops_the_generation_thread(tiny_gateway, stream) -> None:
    backend = tiny_gateway.backends[0]
    before = backend.tokens_generated()
    call = stream(no_eos(chat_request(max_tokens=450, seed=1)))
    first = await call.read()
    assert first.WhichOneof("event") == "text_delta"
    assert backend.active_generations() == 1
    call.cancel()
    for _ in range(100):
        if backend.active_generations() == 0:
            break
        await asyncio.sleep(0.02)
    assert backend.active_generations() == 0, "the generation thread kept running after the cancel"
    produced = backend.tokens_generated() - before
    assert produced < 450, "the thread generated every token despite the cancel"
    await asyncio.sleep(0.1)
    assert backend.tokens_generated() - before == produced
    assert call.cancelled()


async def test_unary_deadline_stops_the_generation(tiny_gateway, generate) -> None:
    backend = tiny_gateway.backends[0]
    before = backend.tokens_generated()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(no_eos(chat_request(max_tokens=450, seed=1)), timeout=0.1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if backend.active_generations() == 0:
            break
        await asyncio.sleep(0.02)
    assert backend.active_generations() == 0
    assert backend.tokens_generated() - before < 450


async def test_cancel_while_queued_frees_the_queue_slot(tiny_model_dir, config_for) -> None:
    from pluggably.server import GatewayServer

    config = config_for(
        [{"name": "one", "path": str(tiny_model_dir), "max_concurrency": 1, "max_queue": 1}]
    )
    server = GatewayServer(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate
            running = stub(no_eos(chat_request("local/one", max_tokens=450, seed=1)))
            await running.read()
            queued = stub(no_eos(chat_request("local/one", max_tokens=2)))
            await asyncio.sleep(0.05)
            queued.cancel()
            await asyncio.sleep(0.05)
            # The cancelled waiter left the queue: a new request may wait in its place.
            replacement = stub(no_eos(chat_request("local/one", max_tokens=2)))
            running.cancel()
            chunks = [c async for c in replacement]
            assert chunks[-1].done.usage.completion_tokens == 2
    finally:
        await server.stop(grace=0)


async def test_near_zero_temperature_decodes_greedily(generate) -> None:
    greedy = await generate(no_eos(chat_request(max_tokens=8, temperature=0)))
    tiny = await generate(no_eos(chat_request(max_tokens=8, temperature=1e-30)))
    assert list(tiny.token_ids) == list(greedy.token_ids)


async def test_health_answers_during_a_long_generation(tiny_gateway, tiny_channel, stream) -> None:
    backend = tiny_gateway.backends[0]
    health = health_pb2_grpc.HealthStub(tiny_channel)
    call = stream(no_eos(chat_request(max_tokens=450, seed=1)))
    await call.read()
    answered_while_generating = 0
    for _ in range(10):
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        answered_while_generating += backend.active_generations() == 1
    call.cancel()
    assert answered_while_generating == 10
