"""OpenTelemetry traces: a SERVER span per RPC with RPC and GenAI attributes, the caller's W3C
trace context honoured (native gRPC and REST through the real Envoy) and passed on to the
provider in `traceparent`, a CLIENT span per provider call; and nothing imported when off."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pluggably.config import TracingConfig
from pluggably.core.context import Principal, RequestContext
from pluggably.devtools.envoy import Envoy
from pluggably.devtools.standins.openai import OpenAIStandIn
from pluggably.observability import tracing as tracing_module
from pluggably.observability.tracing import Tracing, TracingHook, setup_tracing
from pluggably.providers import _transport
from pluggably.providers._errors import UpstreamFailure
from pluggably.providers.config import Timeouts
from pluggably.v1 import generation_pb2 as P
from providers_util import KEYS, MODELS, provider_stack

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STREAM = "/pluggably.v1.StreamService/StreamGenerate"


def hex_trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def hex_span(span_id: int) -> str:
    return format(span_id, "016x")


def traceparent_of(span: ReadableSpan) -> str:
    flags = format(span.context.trace_flags, "02x")
    return f"00-{hex_trace(span)}-{hex_span(span.context.span_id)}-{flags}"


@pytest.fixture
def traced() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracing = setup_tracing(TracingConfig(enabled=True), exporter=exporter)
    assert tracing is not None
    try:
        yield tracing, exporter
    finally:
        tracing.shutdown()


def finished(tracing: Tracing, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    assert tracing.force_flush()
    return list(exporter.get_finished_spans())


# --- Off ------------------------------------------------------------------------------------


def test_tracing_off_imports_nothing_from_opentelemetry() -> None:
    code = textwrap.dedent(
        """
        import asyncio, sys
        import pluggably.server
        from pluggably.app import start_operations
        from pluggably.config import Config, TracingConfig
        from pluggably.observability.tracing import setup_tracing
        from pluggably.providers import _transport

        assert setup_tracing(TracingConfig()) is None
        config = Config.model_validate({"auth": {"enabled": False}, "metrics": {"enabled": False}})

        async def main():
            ops = await start_operations(config)
            await ops.aclose()

        asyncio.run(main())
        assert _transport.client_spans is None
        print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


# --- The hook, directly ---------------------------------------------------------------------


async def test_a_server_span_per_rpc_with_rpc_and_genai_attributes(traced) -> None:
    tracing, exporter = traced
    hook = TracingHook(tracing)
    ctx = RequestContext(
        request_id="req-1",
        method=STREAM,
        streaming=True,
        principal=Principal("0123456789ab"),
    )
    await hook.start(ctx, {"traceparent": TRACEPARENT, "tracestate": "vendor=x"})
    # The handler runs here: the span is current, so what it calls becomes its child.
    current = trace.get_current_span()
    assert current.get_span_context().trace_id == int(TRACE_ID, 16)
    ctx.served_by("openai/gpt-4o-mini")
    ctx.output_started()
    ctx.input_tokens, ctx.output_tokens = 9, 4
    await hook.finish(ctx)
    assert not trace.get_current_span().get_span_context().is_valid  # detached again
    (span,) = finished(tracing, exporter)
    assert span.name == "pluggably.v1.StreamService/StreamGenerate"
    assert span.kind is SpanKind.SERVER
    assert span.context.span_id == current.get_span_context().span_id
    assert hex_trace(span) == TRACE_ID
    assert span.parent is not None and hex_span(span.parent.span_id) == PARENT_ID
    assert span.parent.is_remote
    assert span.context.trace_state.to_header() == "vendor=x"
    attrs = dict(span.attributes or {})
    assert attrs["rpc.system"] == "grpc"
    assert attrs["rpc.service"] == "pluggably.v1.StreamService"
    assert attrs["rpc.method"] == "StreamGenerate"
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["pluggably.request_id"] == "req-1"
    assert attrs["pluggably.key_id"] == "0123456789ab"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == attrs["gen_ai.response.model"] == "openai/gpt-4o-mini"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (9, 4)
    assert [e.name for e in span.events] == ["gen_ai.first_output"]
    assert span.status.status_code is StatusCode.UNSET


async def test_a_failed_call_is_an_error_span_named_by_its_reason(traced) -> None:
    tracing, exporter = traced
    hook = TracingHook(tracing)
    ctx = RequestContext(request_id="r", method="/pluggably.v1.GenerateService/Generate")
    await hook.start(ctx, {})
    ctx.code, ctx.reason = "INVALID_ARGUMENT", "INVALID_ARGUMENT"
    await hook.finish(ctx)
    (span,) = finished(tracing, exporter)
    assert span.parent is None  # no traceparent: a new trace
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "INVALID_ARGUMENT"
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == 3
    assert span.attributes["error.type"] == "INVALID_ARGUMENT"
    assert "gen_ai.request.model" not in span.attributes  # no model served


async def test_a_callers_decision_not_to_sample_is_kept(traced) -> None:
    tracing, exporter = traced
    hook = TracingHook(tracing)
    ctx = RequestContext(request_id="r", method="/pluggably.v1.GenerateService/Generate")
    await hook.start(ctx, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    assert trace.get_current_span().get_span_context().trace_id == int(TRACE_ID, 16)
    await hook.finish(ctx)
    assert finished(tracing, exporter) == []


async def test_finish_in_another_context_neither_raises_nor_logs(traced, caplog) -> None:
    """grpc may finalize a stream cancelled under back-pressure in another context."""
    tracing, exporter = traced
    hook = TracingHook(tracing)
    ctx = RequestContext(request_id="r", method=STREAM, streaming=True)

    async def start() -> None:
        await hook.start(ctx, {})

    await asyncio.create_task(start())  # attached in the task's copy of the context
    await hook.finish(ctx)
    assert len(finished(tracing, exporter)) == 1
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


# --- The provider transport -----------------------------------------------------------------


def _failure(status: int, headers: Any, raw: bytes) -> UpstreamFailure:
    from pluggably.core.errors import Unavailable

    return UpstreamFailure(Unavailable("upstream failed", reason="UPSTREAM_ERROR"))


@contextlib.asynccontextmanager
async def transport() -> AsyncIterator[tuple[OpenAIStandIn, _transport.HttpTransport]]:
    async with OpenAIStandIn(api_key=KEYS["openai"]) as standin:
        http = _transport.HttpTransport(
            "openai",
            standin.base_url + "/v1",
            headers={"Authorization": f"Bearer {KEYS['openai']}"},
            timeouts=Timeouts(connect_s=2, first_byte_s=2, idle_s=2, total_s=5),
            max_connections=2,
        )
        try:
            yield standin, http
        finally:
            await http.aclose()


async def test_provider_calls_get_a_client_span_and_carry_traceparent(traced) -> None:
    tracing, exporter = traced
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    ).encode()
    async with transport() as (standin, http):
        with tracing.tracer.start_as_current_span("server") as parent:
            async with http.open(
                "POST",
                "/chat/completions",
                model_id="openai/gpt-4o-mini",
                parse_error=_failure,
                body=body,
                headers={"Content-Type": "application/json"},
                params={"key": "query-secret"},
            ) as upstream:
                await upstream.read()
            standin.inject(_fault_500())
            with pytest.raises(UpstreamFailure):
                async with http.open(
                    "POST", "/chat/completions", model_id="openai/gpt-4o-mini",
                    parse_error=_failure, body=body,
                ):  # fmt: skip
                    pass
        sent = [r.headers.get("traceparent") for r in standin.requests]
    ok, failed = (s for s in finished(tracing, exporter) if s.kind is SpanKind.CLIENT)
    for span, header in zip((ok, failed), sent, strict=True):
        assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
        assert header == traceparent_of(span)
    assert ok.name == "chat gpt-4o-mini"
    attrs = dict(ok.attributes or {})
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.response.status_code"] == 200
    assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] > 0
    assert attrs["url.full"].endswith("/v1/chat/completions")  # no query: it may hold a key
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert ok.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "UPSTREAM_ERROR"
    assert failed.attributes["http.response.status_code"] == 500


def _fault_500() -> Any:
    from pluggably.devtools.standins import Fault

    return Fault("status", status=500, path="/chat/completions")


async def test_no_traceparent_upstream_when_tracing_is_off() -> None:
    assert _transport.client_spans is None
    async with transport() as (standin, http):
        async with http.open(
            "GET", "/models", model_id="openai/*", parse_error=_failure
        ) as upstream:
            await upstream.read()
        assert "traceparent" not in standin.requests[-1].headers


# --- Through a real gateway, native gRPC and REST through Envoy -----------------------------


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory):
    """A traced gateway in front of the provider stand-ins, with Envoy in front of it; spans go
    to an in-memory exporter (the configured one would be OTLP to a collector)."""
    exporter = InMemorySpanExporter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            tracing_module,
            "setup_tracing",
            functools.partial(tracing_module.setup_tracing, exporter=exporter),
        )
        async with provider_stack(
            auth={"enabled": False},
            metrics={"enabled": False},
            tracing={"enabled": True, "exporter": "otlp"},
        ) as stack:
            assert stack.server.operations is not None
            (hook,) = [h for h in stack.server.operations.hooks if isinstance(h, TracingHook)]
            envoy = Envoy(stack.server.port, tmp_path_factory.mktemp("envoy-tracing"))
            await asyncio.to_thread(envoy.start)
            try:
                yield stack, hook.tracing, exporter, envoy
            finally:
                envoy.stop()
    assert _transport.client_spans is None  # the gateway's stop uninstalled it


def spans_of_trace(tracing: Tracing, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in finished(tracing, exporter) if hex_trace(s) == TRACE_ID]


def chat(model: str) -> P.GenerateRequest:
    return P.GenerateRequest(model=model, messages=[P.ChatMessage(role="user", content="Hi")])


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_trace_context_flows_from_the_caller_to_the_provider(gateway, provider) -> None:
    stack, tracing, exporter, _envoy = gateway
    stack.reset()
    exporter.clear()
    model = f"{provider}/{MODELS[provider]}"
    async for _ in stack.stream(chat(model), metadata=(("traceparent", TRACEPARENT),)):
        pass
    spans = spans_of_trace(tracing, exporter)
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    assert server.name == "pluggably.v1.StreamService/StreamGenerate"
    assert server.parent is not None and hex_span(server.parent.span_id) == PARENT_ID
    assert server.attributes is not None
    assert server.attributes["gen_ai.response.model"] == model
    assert server.attributes["gen_ai.usage.output_tokens"] > 0
    # The generation call (model lists may be fetched on the way, as GET spans of their own).
    (client,) = [s for s in spans if s.kind is SpanKind.CLIENT and s.name.startswith("chat ")]
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    (request,) = [r for r in stack.standin(provider).requests if r.method == "POST"]
    assert request.headers["traceparent"] == traceparent_of(client)
    assert traceparent_of(client).startswith(f"00-{TRACE_ID}-")


async def test_rest_through_envoy_keeps_the_callers_trace(gateway) -> None:
    stack, tracing, exporter, envoy = gateway
    stack.reset()
    exporter.clear()
    body = {
        "model": f"openai/{MODELS['openai']}",
        "messages": [{"role": "user", "content": "Hi"}],
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for path in ("/v1/generate", "/v1/generate:stream"):
            async with http.post(
                envoy.url + path, json=body, headers={"traceparent": TRACEPARENT}
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()
    servers = [s for s in spans_of_trace(tracing, exporter) if s.kind is SpanKind.SERVER]
    assert sorted(s.name for s in servers) == [
        "pluggably.v1.GenerateService/Generate",
        "pluggably.v1.StreamService/StreamGenerate",
    ]
    for span in servers:
        assert span.parent is not None and hex_span(span.parent.span_id) == PARENT_ID


async def test_a_call_without_traceparent_starts_its_own_trace(gateway) -> None:
    stack, tracing, exporter, _envoy = gateway
    stack.reset()
    exporter.clear()
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.generate(chat("openai/no-such-model"))
    (span,) = [s for s in finished(tracing, exporter) if s.kind is SpanKind.SERVER]
    assert span.parent is None and span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 5
