"""The dataplane and router without a transport: per-model validation (supported parameters,
ranges, provider_options, capabilities) for the model and its fallbacks, config fallbacks and the
first-chunk timeout. Fake backends implement the real Backend interface."""

from __future__ import annotations

import asyncio

import pytest

from fakes import FakeBackend
from pluggably.core.errors import InvalidArgument, ModelNotFound, Unavailable
from pluggably.core.params import ProviderOptionsPolicy
from pluggably.core.types import (
    Capabilities,
    ChatMessage,
    FunctionTool,
    GenerationRequest,
    ImagePart,
    Modality,
    ResponseFormat,
    ResponseFormatType,
    TextChunk,
    TextParams,
    ToolCall,
)
from pluggably.generation.dataplane import Dataplane
from pluggably.generation.router import Router

FULL = Capabilities(
    tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=100
)


def dataplane(*backends: FakeBackend, **router_kwargs) -> Dataplane:
    return Dataplane(Router(backends, **router_kwargs))


def chat(**kwargs) -> GenerationRequest:
    messages = kwargs.pop("messages", (ChatMessage("user", "hi"),))
    return GenerationRequest("req", "", messages=messages, **kwargs)


async def run(
    plane: Dataplane, request: GenerationRequest, model: str, fallbacks=(), modality=None
):
    return [item async for item in await plane.generate(request, model, fallbacks, modality)]


async def violations(
    plane: Dataplane, request: GenerationRequest, model: str, fallbacks=()
) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        await run(plane, request, model, fallbacks)
    return {v.field: v.description for v in caught.value.violations}


async def test_a_valid_request_runs() -> None:
    backend = FakeBackend("p", capabilities=FULL)
    out = await run(dataplane(backend), chat(text=TextParams(temperature=0.5)), "p/echo")
    assert [m for m, _ in out] == ["p/echo"] * 4 and isinstance(out[0][1], TextChunk)


async def test_unsupported_parameters_are_rejected_not_dropped() -> None:
    backend = FakeBackend("p", supported=["max_tokens", "temperature"])
    found = await violations(
        dataplane(backend), chat(text=TextParams(top_k=5, seed=1, temperature=1)), "p/echo"
    )
    assert set(found) == {"text.top_k", "text.seed"}
    assert found["text.top_k"] == "not supported by model 'p/echo'"
    assert backend.requests == []  # rejected before the backend ran


async def test_model_specific_ranges() -> None:
    backend = FakeBackend("p", ranges={"temperature": (None, 1.0)})
    found = await violations(dataplane(backend), chat(text=TextParams(temperature=1.5)), "p/echo")
    assert "must be in [0, 1], got 1.5" in found["text.temperature"]
    assert "'p/echo'" in found["text.temperature"]
    await run(dataplane(backend), chat(text=TextParams(temperature=1.0)), "p/echo")


async def test_provider_options_rules() -> None:
    closed = FakeBackend("p")
    found = await violations(dataplane(closed), chat(provider_options={"logit_bias": {}}), "p/echo")
    assert found == {
        "provider_options.logit_bias": "not supported by model 'p/echo' (accepted keys: none)"
    }

    typed = FakeBackend("p", options=ProviderOptionsPolicy(allowed={"ignore_eos": bool, "n": int}))
    found = await violations(
        dataplane(typed), chat(provider_options={"ignore_eos": 1.0, "n": 1.5}), "p/echo"
    )
    assert found == {
        "provider_options.ignore_eos": "must be a boolean",
        "provider_options.n": "must be an integer",
    }
    await run(dataplane(typed), chat(provider_options={"ignore_eos": True, "n": 2.0}), "p/echo")

    open_ = FakeBackend(
        "p", options=ProviderOptionsPolicy(allowed=None, reserved=frozenset({"temperature"}))
    )
    found = await violations(
        dataplane(open_), chat(provider_options={"temperature": 2.0, "user": "u"}), "p/echo"
    )
    assert list(found) == ["provider_options.temperature"]
    await run(
        dataplane(open_),
        chat(provider_options={"user": "u", "logit_bias": {"1": -100.0}}),
        "p/echo",
    )


async def test_capabilities_are_enforced() -> None:
    bare = FakeBackend("p", capabilities=Capabilities(max_output_tokens=50))
    request = chat(
        messages=(
            ChatMessage("user", "look", parts=(ImagePart(url="https://example.com/cat.png"),)),
            ChatMessage("assistant", tool_calls=(ToolCall("c1", "f", "{}"),)),
            ChatMessage("tool", "42", tool_call_id="c1"),
        ),
        tools=(FunctionTool("f"),),
        text=TextParams(
            max_tokens=60, response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema={})
        ),
    )
    found = await violations(dataplane(bare), request, "p/echo")
    assert found == {
        "tools": "model 'p/echo' does not support tool calling",
        "messages[0].parts[0].image": "model 'p/echo' does not take image input",
        "messages[1].tool_calls": "model 'p/echo' does not support tool calling",
        "messages[2].role": "model 'p/echo' does not support tool calling",
        "text.response_format.json_schema": "model 'p/echo' does not support JSON schema output",
        "text.max_tokens": "model 'p/echo' generates at most 50 tokens, got 60",
    }
    await run(dataplane(FakeBackend("p", capabilities=FULL)), request, "p/echo")

    json_only = FakeBackend("p", capabilities=Capabilities(json_object=True))
    ok = chat(text=TextParams(response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT)))
    await run(dataplane(json_only), ok, "p/echo")
    found = await violations(dataplane(FakeBackend("p")), ok, "p/echo")
    assert found == {"text.response_format": "model 'p/echo' does not support JSON output"}


async def test_fallback_models_are_checked_too() -> None:
    capable = FakeBackend("a", capabilities=FULL)
    limited = FakeBackend("b", supported=["max_tokens"])
    request = chat(tools=(FunctionTool("f"),), text=TextParams(top_p=0.5))
    found = await violations(dataplane(capable, limited), request, "a/echo", ["b/echo"])
    assert found == {
        "text.top_p": "not supported by fallback model 'b/echo'",
        "tools": "fallback model 'b/echo' does not support tool calling",
    }


async def test_unknown_models() -> None:
    plane = dataplane(FakeBackend("a"))
    with pytest.raises(ModelNotFound):
        await run(plane, chat(), "a/none")
    found = await violations(plane, chat(), "a/echo", ["a/echo", "z/none"])
    assert found == {"fallback_models[1]": "unknown model 'z/none'"}


async def test_modality_must_match() -> None:
    plane = dataplane(FakeBackend("a", {"painter": Modality.IMAGE, "echo": Modality.TEXT}))
    with pytest.raises(InvalidArgument) as caught:
        await run(plane, chat(), "a/echo", ["a/painter"], Modality.TEXT)
    assert [v.field for v in caught.value.violations] == ["fallback_models[0]"]


async def test_config_fallbacks_apply_unless_the_request_names_its_own() -> None:
    a, b, c = FakeBackend("a"), FakeBackend("b"), FakeBackend("c")
    a.behaviours["echo"] = lambda _r: Unavailable("down")
    plane = dataplane(
        a, b, c, aliases={"best": "a/echo"}, fallbacks={"best": ["b/echo"], "a/echo": ["c/echo"]}
    )
    assert {m for m, _ in await run(plane, chat(), "best")} == {"b/echo"}  # by the name used
    assert {m for m, _ in await run(plane, chat(), "a/echo")} == {"c/echo"}  # by the resolved id
    assert {m for m, _ in await run(plane, chat(), "best", ["c/echo"])} == {
        "c/echo"
    }  # request wins


async def test_first_chunk_timeout_moves_on_and_stops_the_slow_model() -> None:
    slow, fast = FakeBackend("slow"), FakeBackend("fast")
    slow.first_delay_s["echo"] = 5.0
    plane = dataplane(slow, fast, first_chunk_timeout_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    out = await run(plane, chat(), "slow/echo", ["fast/echo"])
    assert {m for m, _ in out} == {"fast/echo"}
    assert loop.time() - started < 2
    assert slow.cancelled.is_set(), "the abandoned model must be cancelled"
    # The attempt that was timed asked the backend to stream, so a first chunk could come early.
    assert slow.requests[-1].stream and not fast.requests[-1].stream


async def test_the_last_model_gets_no_first_chunk_timeout() -> None:
    slow = FakeBackend("slow")
    slow.first_delay_s["echo"] = 0.4
    plane = dataplane(slow, first_chunk_timeout_s=0.1)
    out = await run(plane, chat(), "slow/echo")
    assert {m for m, _ in out} == {"slow/echo"}
