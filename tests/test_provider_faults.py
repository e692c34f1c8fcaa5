"""Resilience of the hosted providers, end to end: a real gateway over gRPC in front of the
OpenAI, Anthropic and Gemini stand-ins, with faults injected on the wire.

Every test counts what the stand-in actually received (`requests`, `disconnects`, `active`,
`connections`), so a retry, a fail-fast or an abandoned upstream is observed, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import grpc
import orjson
import pytest
from aiohttp import web
from google.rpc import error_details_pb2

from helpers import RichError, rich_error
from pluggably.devtools.standins import Fault, Reply
from pluggably.v1 import generation_pb2, model_pb2, model_service_pb2
from providers_util import FAST, KEYS, MODELS, ProviderStack, provider_stack

PROVIDERS = ("openai", "anthropic", "gemini")
# Faster than provider_stack's defaults: hang tests wait these out on every attempt.
TIMEOUTS = {"connect_s": 1, "first_byte_s": 0.3, "idle_s": 0.3, "total_s": 3}
OPEN_S = 0.3  # how long an open circuit refuses requests
FIRST_CHUNK_S = 0.3  # routing.first_chunk_timeout_s
TINY = {
    "openai": "standin-tiny-context",
    "anthropic": "claude-standin-tiny",
    "gemini": "gemini-standin-tiny",
}
# Stream events each stand-in sends before its first text delta (OpenAI: the role chunk;
# Anthropic: message_start, content_block_start, ping), so `after_chunks=LEAD[p] + n` lets
# exactly n text deltas through.
LEAD = {"openai": 1, "anthropic": 3, "gemini": 0}
WORDS = "alpha beta gamma delta epsilon zeta eta theta"
CODE = grpc.StatusCode


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gen_path(provider: str) -> str:
    """What the generation requests' paths contain (never the listing's), for faults and counts."""
    # Gemini: both `:generateContent` and `:streamGenerateContent`.
    return {
        "openai": "/chat/completions",
        "anthropic": "/v1/messages",
        "gemini": "enerateContent",
    }.get(provider, "/chat/completions")


def attempts(stack: ProviderStack, provider: str) -> list[Any]:
    path = _gen_path(provider)
    return [r for r in stack.standin(provider).requests if path in r.path]


def inject(stack: ProviderStack, provider: str, *faults: Fault) -> None:
    path = _gen_path(provider)
    for fault in faults:
        fault.path = path
    stack.standin(provider).inject(*faults)


def request(
    provider: str,
    text: str = "Say hello",
    *,
    model: str | None = None,
    max_tokens: int | None = None,
    fallbacks: tuple[str, ...] = (),
) -> Any:
    req = generation_pb2.GenerateRequest(
        model=model or f"{provider}/{MODELS[provider]}",
        messages=[generation_pb2.ChatMessage(role="user", content=text)],
        fallback_models=list(fallbacks),
    )
    if max_tokens is not None:
        req.text.max_tokens = max_tokens
    return req


async def unary_error(stack: ProviderStack, req: Any, **kwargs: Any) -> RichError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.generate(req, **kwargs)
    return rich_error(caught.value)


async def consume(call: Any) -> tuple[list[Any], grpc.aio.AioRpcError | None]:
    messages: list[Any] = []
    try:
        async for message in call:
            messages.append(message)
    except grpc.aio.AioRpcError as exc:
        return messages, exc
    return messages, None


def text_of(messages: list[Any]) -> str:
    return "".join(m.text_delta.text for m in messages if m.HasField("text_delta"))


def retry_delay_s(error: RichError) -> float | None:
    info = error.details.get("google.rpc.RetryInfo")
    if info is None:
        return None
    assert isinstance(info, error_details_pb2.RetryInfo)
    return info.retry_delay.ToNanoseconds() / 1e9


def assert_error(error: RichError, code: grpc.StatusCode, reason: str) -> None:
    assert (error.code, error.info.reason if error.info else None) == (code, reason), error.message


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def pluggably_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("pluggably-")}


# ---- the stack -------------------------------------------------------------------------------

DEAD_PORT = _closed_port()


class SplitErrors:
    """An OpenAI-compatible endpoint whose error bodies arrive in two pieces, as through a proxy
    that flushes early: a reader that stops at the first piece loses the error's code."""

    def __init__(self) -> None:
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = orjson.dumps(
            {
                "error": {
                    "message": "You exceeded your current quota, please check your plan and billing details.",
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            }
        )
        response = web.StreamResponse(status=429, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(body[:24])
        await asyncio.sleep(0.05)
        await response.write(body[24:])
        await response.write_eof()
        return response

    async def __aenter__(self) -> SplitErrors:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def _config(split_url: str) -> dict[str, Any]:
    fast = {
        **FAST,
        "timeouts": TIMEOUTS,
        "breaker": {"failure_threshold": 3, "open_s": OPEN_S},
        "list_models": False,
    }
    providers: dict[str, Any] = {p: {**fast, "models": [{"name": MODELS[p]}]} for p in PROVIDERS}
    # groq keeps provider_stack's slower timeouts: the first-chunk timeout must act first.
    providers["groq"] = {"list_models": False}
    providers["nowhere"] = {
        "kind": "openai",
        "base_url": f"http://127.0.0.1:{DEAD_PORT}/v1",
        "api_key": KEYS["openai"],
        **fast,
    }
    providers["split"] = {
        "kind": "openai",
        "base_url": split_url,
        "api_key": KEYS["openai"],
        **fast,
    }
    return {
        "providers": providers,
        "routing": {
            "fallbacks": {"groq/gpt-4o-mini": ["anthropic/claude-sonnet-4-6"]},
            "first_chunk_timeout_s": FIRST_CHUNK_S,
        },
    }


@pytest.fixture(scope="module")
async def split_errors():
    async with SplitErrors() as server:
        yield server


@pytest.fixture(scope="module")
async def module_stack(split_errors):
    before = pluggably_tasks()
    async with provider_stack(**_config(split_errors.base_url)) as stack:
        yield stack
    assert pluggably_tasks() - before == set()


@pytest.fixture
async def stack(module_stack: ProviderStack):
    module_stack.reset()
    for name, standin in module_stack.standins.items():
        standin.chunk_delay_s = 0.0
        standin.api_key = KEYS[name]
    yield module_stack
    # A test that left an upstream response running would skew the next one's counts.
    await eventually(lambda: all(s.active == 0 for s in module_stack.standins.values()), 3.0)


providers = pytest.mark.parametrize("provider", PROVIDERS)


# ---- retries on rate limits ------------------------------------------------------------------


@providers
async def test_rate_limit_with_retry_hint_is_waited_out_then_served(stack, provider):
    # OpenAI/Anthropic send Retry-After (OpenAI also retry-after-ms), Gemini a RetryInfo detail.
    inject(stack, provider, Fault("status", status=429, retry_after=0.4))
    response = await stack.generate(request(provider))
    sent = attempts(stack, provider)
    assert len(sent) == 2
    assert response.text.startswith(f"Hello from the {provider} stand-in")
    assert response.model == f"{provider}/{MODELS[provider]}"
    assert 0.38 <= sent[1].at - sent[0].at < 1.4  # the hint, not the 10-50 ms back-off


@providers
async def test_persistent_rate_limit_is_resource_exhausted_with_retry_info(stack, provider):
    inject(stack, provider, Fault("status", status=429, retry_after=0.1, times=5))
    error = await unary_error(stack, request(provider))
    assert_error(error, CODE.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
    assert retry_delay_s(error) == pytest.approx(0.1, abs=0.01)
    assert len(attempts(stack, provider)) == FAST["retries"]["max_attempts"]
    assert error.info.metadata["provider"] == provider
    assert error.info.metadata["upstream_status"] == "429"


@providers
async def test_retry_hint_beyond_the_limit_fails_at_once(stack, provider):
    inject(stack, provider, Fault("status", status=429, retry_after=30, times=5))
    start = time.monotonic()
    error = await unary_error(stack, request(provider))
    assert time.monotonic() - start < 1.0
    assert_error(error, CODE.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
    assert retry_delay_s(error) == pytest.approx(30, abs=0.01)
    assert len(attempts(stack, provider)) == 1


async def test_openai_insufficient_quota_is_not_retried(stack):
    inject(stack, "openai", Fault("status", status=429, error_type="insufficient_quota", times=5))
    error = await unary_error(stack, request("openai"))
    assert_error(error, CODE.RESOURCE_EXHAUSTED, "PROVIDER_QUOTA_EXCEEDED")
    assert len(attempts(stack, "openai")) == 1
    assert "quota" in error.message


async def test_an_error_body_sent_in_pieces_is_read_whole(stack, split_errors):
    # Only the body's code tells a spent quota (final) from a rate limit (retried).
    split_errors.requests = 0
    error = await unary_error(stack, request("split", model="split/any-model"))
    assert_error(error, CODE.RESOURCE_EXHAUSTED, "PROVIDER_QUOTA_EXCEEDED")
    assert split_errors.requests == 1
    assert "exceeded your current quota" in error.message


# ---- server errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "status"), [*((p, s) for p in PROVIDERS for s in (500, 503)), ("anthropic", 529)]
)
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_server_errors_are_retried_then_served(stack, provider, status, streaming):
    inject(stack, provider, Fault("status", status=status, times=2))
    if streaming:
        messages, error = await consume(stack.stream(request(provider)))
        assert error is None
        assert messages[-1].HasField("done")
        text = text_of(messages)
    else:
        text = (await stack.generate(request(provider))).text
    assert text.startswith(f"Hello from the {provider} stand-in")
    assert len(attempts(stack, provider)) == 3


@providers
async def test_persistent_server_error_is_unavailable(stack, provider):
    inject(stack, provider, Fault("status", status=503, times=5))
    error = await unary_error(stack, request(provider))
    assert_error(error, CODE.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert error.info.metadata["upstream_status"] == "503"
    assert retry_delay_s(error) is None  # the provider gave no hint
    assert len(attempts(stack, provider)) == 3


@providers
async def test_server_error_retry_hint_is_honoured_and_passed_on(stack, provider):
    inject(stack, provider, Fault("status", status=503, retry_after=0.2, times=5))
    error = await unary_error(stack, request(provider))
    assert_error(error, CODE.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert retry_delay_s(error) == pytest.approx(0.2, abs=0.01)
    sent = attempts(stack, provider)
    assert len(sent) == 3
    assert all(later.at - earlier.at >= 0.18 for earlier, later in itertools.pairwise(sent))


# ---- errors that no retry fixes ----------------------------------------------------------------


@providers
async def test_bad_request_is_not_retried(stack, provider):
    inject(
        stack,
        provider,
        Fault("status", status=400, message="Something in the request is wrong.", times=5),
    )
    error = await unary_error(stack, request(provider))
    assert_error(error, CODE.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST")
    assert "Something in the request is wrong." in error.message
    assert len(attempts(stack, provider)) == 1


def _assert_no_key(error: RichError, provider: str) -> None:
    key = KEYS[provider]
    shown = key[:3] + "*" * (len(key) - 7) + key[-4:]  # how the OpenAI stand-in echoes a key
    everything = f"{error.message}\n{error.status}"
    for secret in (key, shown, key[-8:]):
        assert secret not in everything


@providers
async def test_rejected_credentials_are_not_retried_and_never_echoed(stack, provider):
    # The stand-in now expects another key, so the gateway's configured key is the wrong one;
    # OpenAI echoes a masked form of it, Gemini answers 400 API_KEY_INVALID.
    stack.standin(provider).api_key = "sk-rotated-key-999999999"
    error = await unary_error(stack, request(provider))
    assert_error(error, CODE.FAILED_PRECONDITION, "PROVIDER_AUTH_FAILED")
    assert len(attempts(stack, provider)) == 1
    _assert_no_key(error, provider)


@providers
async def test_a_provider_echoing_the_whole_key_is_scrubbed(stack, provider):
    key = KEYS[provider]
    inject(
        stack,
        provider,
        Fault(
            "status",
            status=401,
            times=5,
            message=f"Incorrect API key provided: {key} (header x-key={key})",
        ),
    )
    error = await unary_error(stack, request(provider))
    assert_error(error, CODE.FAILED_PRECONDITION, "PROVIDER_AUTH_FAILED")
    assert "Incorrect API key provided" in error.message
    assert len(attempts(stack, provider)) == 1
    _assert_no_key(error, provider)


@providers
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_context_overflow_is_context_length_exceeded(stack, provider, streaming):
    long_prompt = " ".join(["word"] * 120)
    req = request(provider, long_prompt, model=f"{provider}/{TINY[provider]}", max_tokens=8)
    if streaming:
        messages, exc = await consume(stack.stream(req))
        assert messages == [] and exc is not None
        error = rich_error(exc)
    else:
        error = await unary_error(stack, req)
    assert_error(error, CODE.INVALID_ARGUMENT, "CONTEXT_LENGTH_EXCEEDED")
    assert error.fields == ["messages"]
    assert len(attempts(stack, provider)) == 1


# ---- transport faults --------------------------------------------------------------------------


async def test_connection_refused_is_unavailable_after_retries(stack, caplog):
    caplog.set_level(logging.INFO, logger="pluggably.providers")
    error = await unary_error(stack, request("nowhere", model="nowhere/some-model"))
    assert_error(error, CODE.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert "refused" in error.message
    assert str(DEAD_PORT) not in error.message  # no host details reach clients
    retried = [
        r.getMessage()
        for r in caplog.records
        if "retrying" in r.getMessage() and "nowhere/some-model" in r.getMessage()
    ]
    assert len(retried) == FAST["retries"]["max_attempts"] - 1


@providers
async def test_connection_reset_is_retried(stack, provider):
    inject(stack, provider, Fault("reset"))
    messages, error = await consume(stack.stream(request(provider)))
    assert error is None
    assert text_of(messages).startswith(f"Hello from the {provider} stand-in")
    assert len(attempts(stack, provider)) == 2


@providers
async def test_persistent_connection_reset_is_unavailable(stack, provider):
    inject(stack, provider, Fault("reset", times=5))
    error = await unary_error(stack, request(provider))
    assert_error(error, CODE.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert len(attempts(stack, provider)) == 3


@providers
async def test_hang_before_first_byte_times_out_and_is_retried(stack, provider):
    inject(stack, provider, Fault("hang_before_headers", seconds=2))
    start = time.monotonic()
    messages, error = await consume(stack.stream(request(provider)))
    assert error is None
    assert text_of(messages).startswith(f"Hello from the {provider} stand-in")
    sent = attempts(stack, provider)
    assert len(sent) == 2
    assert TIMEOUTS["first_byte_s"] - 0.02 <= sent[1].at - sent[0].at < 1.0
    assert time.monotonic() - start < 1.5
    await eventually(lambda: stack.standin(provider).disconnects == 1)  # the hung one was dropped


@providers
async def test_persistent_hang_before_first_byte_is_provider_timeout(stack, provider):
    inject(stack, provider, Fault("hang_before_headers", seconds=2, times=5))
    messages, exc = await consume(stack.stream(request(provider)))
    assert messages == [] and exc is not None
    assert_error(rich_error(exc), CODE.UNAVAILABLE, "PROVIDER_TIMEOUT")
    assert len(attempts(stack, provider)) == 3


@providers
async def test_hang_mid_stream_ends_with_timeout_after_the_chunks_sent(stack, provider):
    standin = stack.standin(provider)
    standin.default_reply = Reply(text=WORDS, chunks=8)
    inject(stack, provider, Fault("hang_mid_stream", after_chunks=LEAD[provider] + 2, seconds=2))
    start = time.monotonic()
    messages, exc = await consume(stack.stream(request(provider)))
    elapsed = time.monotonic() - start
    assert text_of(messages) == "alpha beta "
    assert not any(m.HasField("done") for m in messages)
    assert exc is not None
    assert_error(rich_error(exc), CODE.UNAVAILABLE, "PROVIDER_TIMEOUT")
    assert TIMEOUTS["idle_s"] - 0.02 <= elapsed < 1.5
    assert len(attempts(stack, provider)) == 1  # output reached the client: no retry
    await eventually(lambda: standin.disconnects == 1)


@providers
async def test_drop_mid_stream_is_an_error_after_the_chunks_sent(stack, provider):
    stack.standin(provider).default_reply = Reply(text=WORDS, chunks=8)
    inject(stack, provider, Fault("drop_mid_stream", after_chunks=LEAD[provider] + 3))
    messages, exc = await consume(stack.stream(request(provider)))
    assert text_of(messages) == "alpha beta gamma "
    assert exc is not None
    assert_error(rich_error(exc), CODE.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert len(attempts(stack, provider)) == 1


@providers
async def test_drop_before_any_output_is_retried(stack, provider):
    stack.standin(provider).default_reply = Reply(text=WORDS, chunks=8)
    inject(stack, provider, Fault("drop_mid_stream", after_chunks=0))
    messages, exc = await consume(stack.stream(request(provider)))
    assert exc is None
    assert text_of(messages) == WORDS
    assert messages[-1].HasField("done")
    assert len(attempts(stack, provider)) == 2


@providers
async def test_malformed_chunk_is_bad_response(stack, provider):
    stack.standin(provider).default_reply = Reply(text=WORDS, chunks=8)
    inject(stack, provider, Fault("malformed_chunk", after_chunks=LEAD[provider] + 1))
    messages, exc = await consume(stack.stream(request(provider)))
    assert text_of(messages) == "alpha "
    assert exc is not None
    assert_error(rich_error(exc), CODE.UNAVAILABLE, "PROVIDER_BAD_RESPONSE")
    assert len(attempts(stack, provider)) == 1


@providers
async def test_malformed_first_chunk_is_retried_then_bad_response(stack, provider):
    inject(stack, provider, Fault("malformed_chunk", after_chunks=0, times=5))
    messages, exc = await consume(stack.stream(request(provider)))
    assert messages == [] and exc is not None
    assert_error(rich_error(exc), CODE.UNAVAILABLE, "PROVIDER_BAD_RESPONSE")
    assert len(attempts(stack, provider)) == 3


@providers
async def test_missing_terminator_is_never_a_success(stack, provider):
    stack.standin(provider).default_reply = Reply(text=WORDS, chunks=8)
    inject(stack, provider, Fault("no_terminator"))
    messages, exc = await consume(stack.stream(request(provider)))
    assert text_of(messages) == WORDS
    assert not any(m.HasField("done") for m in messages)
    assert exc is not None
    assert_error(rich_error(exc), CODE.UNAVAILABLE, "PROVIDER_BAD_RESPONSE")
    assert len(attempts(stack, provider)) == 1


@providers
async def test_in_stream_error_before_output_is_retried(stack, provider):
    stack.standin(provider).default_reply = Reply(text=WORDS, chunks=8)
    inject(stack, provider, Fault("stream_error", after_chunks=LEAD[provider]))
    messages, exc = await consume(stack.stream(request(provider)))
    assert exc is None
    assert text_of(messages) == WORDS
    assert len(attempts(stack, provider)) == 2


@providers
async def test_in_stream_error_mid_stream_ends_the_stream_with_an_error(stack, provider):
    stack.standin(provider).default_reply = Reply(text=WORDS, chunks=8)
    inject(stack, provider, Fault("stream_error", after_chunks=LEAD[provider] + 2))
    messages, exc = await consume(stack.stream(request(provider)))
    assert text_of(messages) == "alpha beta "
    assert exc is not None
    assert_error(rich_error(exc), CODE.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert len(attempts(stack, provider)) == 1


# ---- deadlines ---------------------------------------------------------------------------------


@providers
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_client_deadline_cuts_a_hang_and_the_upstream_sees_it(stack, provider, streaming):
    standin = stack.standin(provider)
    inject(stack, provider, Fault("hang_before_headers", seconds=3, times=5))
    start = time.monotonic()
    if streaming:
        messages, exc = await consume(stack.stream(request(provider), timeout=0.5))
        assert messages == [] and exc is not None
        code = exc.code()
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.generate(request(provider), timeout=0.5)
        code = caught.value.code()
    assert code == CODE.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 1.2
    # Streams time out on first_byte_s (0.3 s) once and retry within the deadline.
    await eventually(lambda: standin.disconnects == len(attempts(stack, provider)) >= 1, 1.0)
    assert len(attempts(stack, provider)) == (2 if streaming else 1)
    assert standin.active == 0


@providers
async def test_back_off_never_sleeps_past_the_deadline(stack, provider):
    # 1.5 s is within max_retry_after_s (2 s), so only the deadline stops the wait.
    inject(stack, provider, Fault("status", status=429, retry_after=1.5, times=5))
    start = time.monotonic()
    error = await unary_error(stack, request(provider), timeout=0.8)
    assert time.monotonic() - start < 0.5
    assert_error(error, CODE.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
    assert retry_delay_s(error) == pytest.approx(1.5, abs=0.01)
    assert len(attempts(stack, provider)) == 1


# ---- cancellation ------------------------------------------------------------------------------


async def _slow_stream(stack: ProviderStack, provider: str) -> Any:
    standin = stack.standin(provider)
    standin.chunk_delay_s = 0.05
    standin.default_reply = Reply(text=" ".join(["word"] * 60), chunks=60)  # ~3 s in all
    return stack.stream(request(provider))


@providers
async def test_cancelled_stream_disconnects_the_upstream(stack, provider):
    standin = stack.standin(provider)
    call = await _slow_stream(stack, provider)
    received = 0
    async for message in call:
        received += message.HasField("text_delta")
        if received == 3:
            break
    cancelled_at = time.monotonic()
    call.cancel()
    await eventually(lambda: standin.disconnects == 1 and standin.active == 0, 1.0)
    assert time.monotonic() - cancelled_at < 1.0  # the stream would have run ~3 s more
    assert len(attempts(stack, provider)) == 1


@providers
async def test_consumer_task_cancelled_disconnects_the_upstream(stack, provider):
    standin = stack.standin(provider)
    call = await _slow_stream(stack, provider)
    got_some = asyncio.Event()

    async def reader() -> None:
        async for message in call:
            if message.HasField("text_delta"):
                got_some.set()

    task = asyncio.create_task(reader())
    await asyncio.wait_for(got_some.wait(), 2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await eventually(lambda: standin.disconnects == 1 and standin.active == 0, 1.0)


# ---- circuit breaker ---------------------------------------------------------------------------


async def _circuit(stack: ProviderStack, provider: str) -> tuple[int, str]:
    model_id = f"{provider}/{MODELS[provider]}"
    model = await stack.models.GetModel(model_service_pb2.GetModelRequest(id=model_id))
    listed = await stack.models.ListModels(model_service_pb2.ListModelsRequest(provider=provider))
    in_list = [m for m in listed.models if m.id == model_id]
    assert len(in_list) == 1 and in_list[0].circuit_state == model.circuit_state
    return model.circuit_state, model.state_reason


@providers
async def test_circuit_opens_fails_fast_and_a_failed_probe_reopens_it(stack, provider):
    assert (await _circuit(stack, provider))[0] == model_pb2.CIRCUIT_STATE_CLOSED
    inject(stack, provider, Fault("status", status=500, times=3))
    error = await unary_error(stack, request(provider))  # 3 attempts: the threshold
    assert_error(error, CODE.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert len(attempts(stack, provider)) == 3

    state, reason = await _circuit(stack, provider)
    assert state == model_pb2.CIRCUIT_STATE_OPEN and "circuit" in reason
    start = time.monotonic()
    error = await unary_error(stack, request(provider))
    assert time.monotonic() - start < 0.2
    assert_error(error, CODE.UNAVAILABLE, "PROVIDER_CIRCUIT_OPEN")
    assert 0 < retry_delay_s(error) <= OPEN_S + 1
    messages, exc = await consume(stack.stream(request(provider)))
    assert messages == [] and exc is not None
    assert_error(rich_error(exc), CODE.UNAVAILABLE, "PROVIDER_CIRCUIT_OPEN")
    assert len(attempts(stack, provider)) == 3  # refused without reaching the provider

    await asyncio.sleep(OPEN_S + 0.05)
    assert (await _circuit(stack, provider))[0] == model_pb2.CIRCUIT_STATE_HALF_OPEN
    inject(stack, provider, Fault("status", status=500, times=5))
    start = time.monotonic()
    error = await unary_error(stack, request(provider))
    # The probe's own failure, not a refusal: this request did reach the provider.
    assert_error(error, CODE.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert "(500)" in error.message
    assert len(attempts(stack, provider)) == 4  # one probe, and no retry into an open circuit
    assert time.monotonic() - start < 0.2
    assert (await _circuit(stack, provider))[0] == model_pb2.CIRCUIT_STATE_OPEN


@providers
async def test_half_open_probe_success_closes_the_circuit(stack, provider):
    inject(stack, provider, Fault("status", status=503, times=3))
    await unary_error(stack, request(provider))
    assert (await _circuit(stack, provider))[0] == model_pb2.CIRCUIT_STATE_OPEN
    await asyncio.sleep(OPEN_S + 0.05)
    assert (await _circuit(stack, provider))[0] == model_pb2.CIRCUIT_STATE_HALF_OPEN

    # One probe at a time: while it is in flight, others are still refused.
    inject(stack, provider, Fault("hang_before_headers", seconds=0.2))
    probe = asyncio.ensure_future(stack.generate(request(provider)))
    await eventually(lambda: len(attempts(stack, provider)) == 4)
    error = await unary_error(stack, request(provider))
    assert_error(error, CODE.UNAVAILABLE, "PROVIDER_CIRCUIT_OPEN")
    assert (await probe).text.startswith(f"Hello from the {provider} stand-in")

    state, reason = await _circuit(stack, provider)
    assert (state, reason) == (model_pb2.CIRCUIT_STATE_CLOSED, "")
    await stack.generate(request(provider))
    assert len(attempts(stack, provider)) == 5


async def test_a_request_from_before_the_circuit_opened_does_not_free_the_probe_slot(stack):
    provider = "openai"
    old = await _slow_stream(stack, provider)  # admitted while the circuit is closed
    assert (await old.read()).model == f"openai/{MODELS['openai']}"
    inject(stack, provider, Fault("status", status=500, times=3))
    await unary_error(stack, request(provider))
    await asyncio.sleep(OPEN_S + 0.05)
    inject(stack, provider, Fault("hang_before_headers", seconds=0.4))
    probe = asyncio.ensure_future(stack.generate(request(provider)))
    await eventually(lambda: len(attempts(stack, provider)) == 5)  # old, 3 failures, the probe
    old.cancel()  # the old stream ends with no verdict while the probe is still out
    await eventually(lambda: stack.standin(provider).disconnects >= 1)
    error = await unary_error(stack, request(provider))
    assert_error(error, CODE.UNAVAILABLE, "PROVIDER_CIRCUIT_OPEN")
    assert len(attempts(stack, provider)) == 5
    assert (await probe).text
    assert (await _circuit(stack, provider))[0] == model_pb2.CIRCUIT_STATE_CLOSED


@providers
async def test_rejected_requests_and_rate_limits_do_not_open_the_circuit(stack, provider):
    inject(
        stack,
        provider,
        Fault("status", status=400, times=4),
        Fault("status", status=429, retry_after=0, times=3),
    )
    for _ in range(4):
        assert (await unary_error(stack, request(provider))).code == CODE.INVALID_ARGUMENT
    assert (await unary_error(stack, request(provider))).code == CODE.RESOURCE_EXHAUSTED
    assert (await _circuit(stack, provider))[0] == model_pb2.CIRCUIT_STATE_CLOSED
    assert (await stack.generate(request(provider))).text
    assert len(attempts(stack, provider)) == 4 + 3 + 1


# ---- fallbacks ---------------------------------------------------------------------------------

PAIRS = [("openai", "anthropic"), ("anthropic", "gemini"), ("gemini", "openai")]


@pytest.mark.parametrize(("primary", "fallback"), PAIRS)
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_request_fallback_serves_when_the_primary_fails(stack, primary, fallback, streaming):
    inject(stack, primary, Fault("status", status=503, times=5))
    fallback_id = f"{fallback}/{MODELS[fallback]}"
    req = request(primary, fallbacks=(fallback_id,))
    if streaming:
        messages, exc = await consume(stack.stream(req))
        assert exc is None
        assert {m.model for m in messages} == {fallback_id}
        text = text_of(messages)
    else:
        response = await stack.generate(req)
        assert response.model == fallback_id
        text = response.text
    assert text.startswith(f"Hello from the {fallback} stand-in")
    assert len(attempts(stack, primary)) == 3
    assert len(attempts(stack, fallback)) == 1


async def test_an_open_circuit_moves_to_the_fallback_without_reaching_the_provider(stack):
    inject(stack, "gemini", Fault("status", status=500, times=3))
    await unary_error(stack, request("gemini"))
    assert (await _circuit(stack, "gemini"))[0] == model_pb2.CIRCUIT_STATE_OPEN
    response = await stack.generate(request("gemini", fallbacks=(f"openai/{MODELS['openai']}",)))
    assert response.model == f"openai/{MODELS['openai']}"
    assert len(attempts(stack, "gemini")) == 3


async def test_request_fallback_is_not_used_for_the_requests_own_errors(stack):
    inject(stack, "openai", Fault("status", status=400))
    req = request("openai", fallbacks=(f"anthropic/{MODELS['anthropic']}",))
    error = await unary_error(stack, req)
    assert_error(error, CODE.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST")
    assert len(attempts(stack, "anthropic")) == 0


async def test_no_fallback_once_output_reached_the_client(stack):
    stack.standin("openai").default_reply = Reply(text=WORDS, chunks=8)
    inject(stack, "openai", Fault("drop_mid_stream", after_chunks=LEAD["openai"] + 2))
    req = request("openai", fallbacks=(f"gemini/{MODELS['gemini']}",))
    messages, exc = await consume(stack.stream(req))
    assert text_of(messages) == "alpha beta "
    assert exc is not None and exc.code() == CODE.UNAVAILABLE
    assert len(attempts(stack, "gemini")) == 0


async def test_configured_fallback_serves(stack):
    inject(stack, "groq", Fault("status", status=500, times=5))
    response = await stack.generate(request("groq"))
    assert response.model == f"anthropic/{MODELS['anthropic']}"
    assert response.text.startswith("Hello from the anthropic stand-in")
    assert len(attempts(stack, "groq")) == 3  # groq is served by the OpenAI stand-in


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_first_chunk_timeout_moves_on_and_abandons_the_upstream(stack, streaming):
    openai = stack.standin("openai")
    inject(stack, "groq", Fault("hang_before_headers", seconds=3))
    start = time.monotonic()
    if streaming:
        messages, exc = await consume(stack.stream(request("groq")))
        assert exc is None
        models = {m.model for m in messages}
    else:
        models = {(await stack.generate(request("groq"))).model}
    elapsed = time.monotonic() - start
    assert models == {f"anthropic/{MODELS['anthropic']}"}
    assert FIRST_CHUNK_S - 0.02 <= elapsed < FIRST_CHUNK_S + 1.0
    assert len(attempts(stack, "groq")) == 1
    await eventually(lambda: openai.disconnects == 1 and openai.active == 0, 1.0)


# ---- connections -------------------------------------------------------------------------------


@providers
async def test_sequential_requests_reuse_one_connection(stack, provider):
    for _ in range(2):
        await stack.generate(request(provider))
        await consume(stack.stream(request(provider)))
    assert len(attempts(stack, provider)) == 4
    assert len(stack.standin(provider).connections) == 1


async def test_a_stopped_gateway_leaves_no_tasks_or_connections():
    before = pluggably_tasks()
    async with provider_stack() as stack:  # listing on: background tasks exist
        backends = [stack.backend(p) for p in (*PROVIDERS, "groq")]
        assert {t.get_name() for t in pluggably_tasks() - before} == {
            f"pluggably-list-models:{p}" for p in (*PROVIDERS, "groq")
        }
        for provider in PROVIDERS:
            standin = stack.standin(provider)
            await stack.generate(request(provider))
            messages, exc = await consume(stack.stream(request(provider)))
            assert exc is None and messages[-1].HasField("done")
            transport = stack.backend(provider).transport
            idle = transport.open_connections()
            call = await _slow_stream(stack, provider)
            async for _ in call:
                break
            during = transport.open_connections()
            call.cancel()
            await eventually(lambda s=standin: s.disconnects >= 1 and s.active == 0, 1.0)
            # One keep-alive connection served everything, and the cancelled response closed
            # it instead of handing a half-read connection back to the pool.
            assert (idle, during) == (1, 1)
            await eventually(lambda t=transport: t.open_connections() == 0, 1.0)
            standin.chunk_delay_s = 0.0
    assert pluggably_tasks() - before == set()
    for backend in backends:
        assert backend.transport.open_connections() == 0
        assert backend.transport._session is None
