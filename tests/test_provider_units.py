"""Unit tests of the pieces every hosted adapter shares: the SSE parser, credential scrubbing,
retry hints and back-off, the circuit breaker and the upstream-error table.

The SSE tests feed streams captured from the three stand-ins (the framing real providers use:
OpenAI's split JSON and keep-alive comments, Anthropic's named events and pings, Gemini's CRLF)
at every split position, because a parser that works on whole bodies can still lose an event
when a read ends between a CR and its LF.
"""

from __future__ import annotations

import email.utils
import random
import time

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from pluggably.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from pluggably.core.types import CircuitState
from pluggably.devtools.standins import Reply, ToolCallSpec
from pluggably.devtools.standins.anthropic import AnthropicStandIn
from pluggably.devtools.standins.gemini import GeminiStandIn
from pluggably.devtools.standins.openai import OpenAIStandIn
from pluggably.providers._errors import (
    MAX_MESSAGE_CHARS,
    UpstreamError,
    bad_response,
    connection_failure,
    scrub,
    timeout_failure,
    upstream_failure,
)
from pluggably.providers._resilience import CircuitBreaker, backoff_s
from pluggably.providers._sse import SSEEvent, SSEParser
from pluggably.providers._transport import retry_after_s

# ---- SSE: streams as the providers frame them ---------------------------------------------------

PROMPT = "Tell me about naïve café owners in Zürich 🚀, please"


@pytest.fixture(scope="module")
async def captured() -> dict[str, bytes]:
    """One raw streaming body per provider, as the stand-ins serve it."""
    bodies: dict[str, bytes] = {}
    async with (
        OpenAIStandIn(api_key="k") as openai,
        AnthropicStandIn(api_key="k") as anthropic,
        GeminiStandIn(api_key="k") as gemini,
        aiohttp.ClientSession() as http,
    ):

        async def post(url: str, body: dict, headers: dict[str, str]) -> bytes:
            async with http.post(url, json=body, headers=headers) as response:
                assert response.status == 200, await response.text()
                return await response.read()

        openai.script(Reply(tool_calls=[ToolCallSpec("lookup", {"city": "Zürich", "n": 3})]))
        bodies["openai_tools"] = await post(
            openai.base_url + "/v1/chat/completions",
            {
                "model": "gpt-4o-mini",
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": PROMPT}],
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "lookup", "parameters": {"type": "object"}},
                    }
                ],
            },
            {"Authorization": "Bearer k"},
        )
        bodies["openai"] = await post(
            openai.base_url + "/v1/chat/completions",
            {
                "model": "gpt-4o-mini",
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": PROMPT}],
            },
            {"Authorization": "Bearer k"},
        )
        bodies["anthropic"] = await post(
            anthropic.base_url + "/v1/messages",
            {
                "model": "claude-sonnet-4-6",
                "max_tokens": 200,
                "stream": True,
                "messages": [{"role": "user", "content": PROMPT}],
            },
            {"x-api-key": "k", "anthropic-version": "2023-06-01"},
        )
        bodies["gemini"] = await post(
            gemini.base_url + "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]},
            {"x-goog-api-key": "k"},
        )
    return bodies


def parse_whole(body: bytes) -> tuple[list[SSEEvent], int]:
    parser = SSEParser()
    events = parser.feed(body) + parser.close()
    return events, parser.comments


def parse_in_reads(body: bytes, sizes: list[int]) -> tuple[list[SSEEvent], int]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    at = 0
    for size in sizes:
        events += parser.feed(body[at : at + size])
        at += size
    assert at >= len(body)
    return events + parser.close(), parser.comments


def test_captured_streams_parse_to_valid_events(captured) -> None:
    # The reference parse must itself be right, or the split tests below compare garbage.
    openai, comments = parse_whole(captured["openai"])
    assert comments >= 1  # the stand-in sends a keep-alive comment
    assert openai[-1].data == b"[DONE]"
    payloads = [orjson.loads(e.data) for e in openai[:-1]]  # split JSON rejoined with "\n"
    assert b"\n" in openai[0].data  # the first chunk's JSON came over two data lines
    text = "".join(c["delta"].get("content") or "" for p in payloads for c in p["choices"])
    assert "naïve café" in text and "🚀" in text
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] > 0

    anthropic, _ = parse_whole(captured["anthropic"])
    names = [e.event for e in anthropic]
    assert names[0] == "message_start" and names[-1] == "message_stop" and "ping" in names
    assert all(orjson.loads(e.data)["type"] == e.event for e in anthropic)

    gemini, _ = parse_whole(captured["gemini"])
    assert b"\r\n\r\n" in captured["gemini"] and len(gemini) >= 3
    assert all(e.event == "" and b"\r" not in e.data for e in gemini)
    assert orjson.loads(gemini[-1].data)["candidates"][0]["finishReason"] == "STOP"


@pytest.mark.parametrize("name", ["openai", "openai_tools", "anthropic", "gemini"])
def test_every_split_position_gives_the_same_events(captured, name: str) -> None:
    body = captured[name]
    expected = parse_whole(body)
    assert parse_in_reads(body, [1] * len(body)) == expected
    # Two reads, split at every position (a CR|LF split included, for Gemini's CRLF).
    for cut in range(1, len(body)):
        assert parse_in_reads(body, [cut, len(body) - cut]) == expected, cut


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
def test_random_read_sizes_give_the_same_events(captured, name: str) -> None:
    body = captured[name]
    expected = parse_whole(body)
    rng = random.Random(f"sse-{name}")
    for _ in range(200):
        sizes = []
        while sum(sizes) < len(body):
            sizes.append(rng.choice((1, 2, 3, rng.randint(1, 64), rng.randint(1, 4096))))
        assert parse_in_reads(body, sizes) == expected


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_ends(newline: bytes) -> None:
    body = (
        b"event: one"
        + newline
        + b"data: a"
        + newline
        + b"data: b"
        + newline
        + newline
        + b": comment"
        + newline
        + newline
        + b"data: c"
        + newline
        + newline
    )
    expected = [SSEEvent(b"a\nb", "one"), SSEEvent(b"c")]
    assert parse_whole(body) == (expected, 1)
    assert parse_in_reads(body, [1] * len(body)) == (expected, 1)


def test_cr_at_end_of_a_read_then_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    # The LF completes the line end held back: it must not count as a second, empty line.
    assert parser.feed(b"\ndata: y\r") == []
    assert parser.feed(b"\n\r") == []
    assert parser.feed(b"\n") == [SSEEvent(b"x\ny")]


def test_bare_cr_framing_keeps_the_last_event_at_end_of_stream() -> None:
    # A trailing CR could be half a CRLF until the stream ends; at the end it is a line end.
    parser = SSEParser()
    assert parser.feed(b"data: 1\r\rdata: 2\r\r") == [SSEEvent(b"1")]
    assert parser.close() == [SSEEvent(b"2")]


def test_fields() -> None:
    parser = SSEParser()
    events = parser.feed(
        b"id: 7\nevent: delta\ndata:no-space\ndata:  two spaces\nretry: 100\nunknown: x\n\n"
        b"data\n\n"  # a field without a colon: the whole line is the name, the value is empty
        b"event\ndata: x\n\n"  # a bare `event` resets the name to the default
        b"id: bad\0id\ndata: y\n\n"
    )  # an id with NUL is ignored; the last id persists
    assert events == [
        SSEEvent(b"no-space\n two spaces", "delta", "7"),
        SSEEvent(b"", "", "7"),
        SSEEvent(b"x", "", "7"),
        SSEEvent(b"y", "", "7"),
    ]


def test_event_name_without_data_is_not_dispatched_and_does_not_leak() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: ping\n\ndata: d\n\n") == [SSEEvent(b"d")]


def test_comments_are_counted_and_ignored() -> None:
    parser = SSEParser()
    assert parser.feed(b": keep-alive\n\n:\n: x\ndata: 1\n\n") == [SSEEvent(b"1")]
    assert parser.comments == 3


def test_unterminated_last_event_is_dropped() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: 2\n") == [SSEEvent(b"1")]
    assert parser.close() == []
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: 2") == [SSEEvent(b"1")]
    assert parser.close() == []


@pytest.mark.parametrize("sizes", [[100], [1, 1, 1, 100], [2, 100], [3, 100]])
def test_leading_bom_is_dropped_once(sizes: list[int]) -> None:
    # WHATWG: "One leading U+FEFF BYTE ORDER MARK character must be ignored if any are present."
    # Only at the start of the stream, and only one: a second BOM is part of the field name.
    body = b"\xef\xbb\xbfdata: 1\n\n\xef\xbb\xbfdata: 2\n\ndata: 3\n\n"
    assert parse_in_reads(body, sizes)[0] == [SSEEvent(b"1"), SSEEvent(b"3")]


def test_bytes_that_only_look_like_a_bom_start_are_kept() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"data: 1\n\n") == []  # "\xefdata" is an unknown field, ignored
    assert parser.feed(b"data: 2\n\n") == [SSEEvent(b"2")]


# ---- scrub --------------------------------------------------------------------------------------

CREDENTIALS = {
    "openai": "sk-0123456789abcdefABCDEF0123456789",
    "openai project": "sk-proj-AbCdEf0123456789_-xyzXYZ0123456789",
    "anthropic": "sk-ant-api03-AbCdEf0123456789-xyz_XYZ0123456789AA",
    "groq": "gsk_AbCdEf0123456789xyzXYZ0123456789",
    "huggingface": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345",
    "google": "AIzaSyA-1234567890abcdefghijklmnopqrs",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
}


@pytest.mark.parametrize("name", list(CREDENTIALS))
def test_scrub_removes_credential_shapes(name: str) -> None:
    key = CREDENTIALS[name]
    out = scrub(f"Incorrect API key provided: {key}. Check your settings.")
    assert key not in out and key[:12] not in out and key[-8:] not in out
    assert out.startswith("Incorrect API key provided: [redacted]") and out.endswith(
        "Check your settings."
    )


@pytest.mark.parametrize(
    "text, secret_part",
    [
        ("sent Authorization: Bearer abc.DEF-123_xyz/+= to the API", "abc.DEF-123_xyz"),
        ("header was Basic dXNlcjpwYXNzd29yZA== and it failed", "dXNlcjpwYXNzd29yZA"),
        ("GET https://x.test/v1/models?key=AbC123xyz&alt=sse failed", "AbC123xyz"),
        ("GET https://x.test/v1?token=t0k3n-value&x=1 failed", "t0k3n-value"),
        ("url ?api_key=plain-secret-value was refused", "plain-secret-value"),
        ("url ?access_token=ya29.a0AfB_byC failed", "ya29.a0AfB_byC"),
    ],
)
def test_scrub_removes_header_and_query_credentials(text: str, secret_part: str) -> None:
    out = scrub(text)
    assert secret_part not in out and "[redacted]" in out
    assert out.split()[0] == text.split()[0]  # the rest of the text stays


def test_scrub_removes_configured_secrets_of_any_shape() -> None:
    secrets = ["plainword", "X-Title-value-42"]
    out = scrub("the upstream said plainword and X-Title-value-42 twice: plainword", secrets)
    assert "plainword" not in out and "X-Title-value-42" not in out
    assert out == "the upstream said [redacted] and [redacted] twice: [redacted]"
    # Empty or very short configured values must not blank out ordinary text.
    assert scrub("a b c", ["", "a"]) == "a b c"


@pytest.mark.parametrize(
    "text",
    [
        "invalid_request_error",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again later.",
        "model gpt-4o-mini-2024-07-18 does not support desk-lamp mode",
        "claude-sonnet-4-5-20250929 is deprecated; use claude-sonnet-4-6",
        "The model `gemini-2.5-flash-lite` does not exist or you do not have access to it.",
        "max_tokens: 70000 > 64000, which is the maximum allowed number of output tokens",
        "overloaded_error: Overloaded",
        "api_error",
        "Invalid value at 'generation_config.temperature' (TYPE_FLOAT), \"hot\"",
        "context_length_exceeded: This model's maximum context length is 128000 tokens.",
        "invalid_api_key",
        "task-runner-queue is full",
    ],
)
def test_scrub_keeps_ordinary_error_text(text: str) -> None:
    assert scrub(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "Basic authentication is not supported; send the key as a bearer credential",
        "monkey=banana is not a valid option",
    ],
)
def test_scrub_keeps_words_that_resemble_credential_prefixes(text: str) -> None:
    assert scrub(text) == text


def test_scrub_truncates_and_collapses_whitespace() -> None:
    assert scrub("a\n\n  b\tc ") == "a b c"
    long = scrub("word " * 500)
    assert len(long) == MAX_MESSAGE_CHARS and long.endswith("…")
    exact = "x" * MAX_MESSAGE_CHARS
    assert scrub(exact) == exact


# ---- retry hints and back-off -------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "-3"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "1500", "Retry-After": "9"}, 1.5),  # the precise header wins
        ({"retry-after-ms": "soon", "Retry-After": "4"}, 4.0),  # a bad ms header falls back
        ({"Retry-After": "tomorrow"}, None),
        ({"Retry-After": ""}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(CIMultiDict(headers)) == expected


def test_retry_after_http_date() -> None:
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_s(CIMultiDict({"Retry-After": future})) <= 31
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    assert retry_after_s(CIMultiDict({"Retry-After": past})) == 0.0


@pytest.mark.parametrize(
    "attempt, ceiling", [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (9, 5.0)]
)
def test_backoff_bounds_and_jitter(attempt: int, ceiling: float) -> None:
    random.seed(attempt)
    delays = [backoff_s(attempt, 0.5, 5.0) for _ in range(400)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    # Full jitter over [ceiling/2, ceiling]: both ends of the range are reached, not one value.
    assert min(delays) < ceiling * 0.55 and max(delays) > ceiling * 0.95
    assert len({round(d, 6) for d in delays}) > 300


def test_backoff_never_below_the_providers_hint() -> None:
    random.seed(1)
    assert all(backoff_s(1, 0.5, 8.0, retry_after_s=3.0) == 3.0 for _ in range(50))
    assert backoff_s(1, 0.5, 8.0, retry_after_s=30.0) == 30.0  # above max_s: the hint still wins
    small = [backoff_s(3, 0.5, 8.0, retry_after_s=0.1) for _ in range(100)]
    assert all(1.0 <= d <= 2.0 for d in small)  # a smaller hint does not shorten the back-off
    assert backoff_s(1, 0.0, 8.0) == 0.0


# ---- circuit breaker ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(breaker: CircuitBreaker) -> Unavailable:
    with pytest.raises(Unavailable) as caught:
        breaker.acquire()
    return caught.value


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    breaker = CircuitBreaker("openai/gpt-4o", threshold=3, open_s=10, clock=clock)
    for _ in range(2):
        breaker.acquire()
        breaker.failure()
    breaker.acquire()
    breaker.success()  # a success in between resets the count
    for _ in range(2):
        breaker.acquire()
        breaker.failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.acquire()
    breaker.failure()
    assert breaker.state is CircuitState.OPEN
    error = refused(breaker)
    assert error.reason == "PROVIDER_CIRCUIT_OPEN" and error.retry_after_s == 10.0
    assert error.metadata == {"model": "openai/gpt-4o"} and "circuit breaker open" in error.message
    clock.now += 6.5
    assert breaker.state is CircuitState.OPEN and refused(breaker).retry_after_s == 3.5
    clock.now += 3.4
    assert refused(breaker).retry_after_s == 1.0  # never hints less than a second


def test_breaker_half_open_lets_one_probe_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", threshold=2, open_s=5, clock=clock)
    for _ in range(2):
        breaker.failure()
    clock.now += 5
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.acquire()  # the probe
    assert refused(breaker).reason == "PROVIDER_CIRCUIT_OPEN"  # everyone else waits for it
    breaker.success()
    assert breaker.state is CircuitState.CLOSED
    breaker.acquire()
    breaker.failure()
    assert breaker.state is CircuitState.CLOSED  # the count started over


def test_breaker_failed_probe_reopens_at_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", threshold=3, open_s=5, clock=clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 5
    breaker.acquire()
    breaker.failure()  # one failure is enough while half-open
    assert breaker.state is CircuitState.OPEN
    assert refused(breaker).retry_after_s == 5.0
    clock.now += 5
    breaker.acquire()
    breaker.success()
    assert breaker.state is CircuitState.CLOSED


def test_breaker_release_lets_the_next_probe_go() -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", threshold=1, open_s=5, clock=clock)
    breaker.failure()
    clock.now += 5
    probe = breaker.acquire()
    assert probe is True
    breaker.release(probe)  # the probe was cancelled or refused by the provider: no verdict
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.acquire() is True
    refused(breaker)


def test_breaker_stale_request_does_not_free_the_probe_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker("m", threshold=1, open_s=5, clock=clock)
    stale = breaker.acquire()  # a long stream admitted while the circuit is closed
    assert stale is False
    breaker.failure()  # another request fails: the circuit opens
    clock.now += 5
    assert breaker.acquire() is True  # the probe
    breaker.release(stale)  # the old stream ends with no verdict (its client went away)
    refused(breaker)  # the probe is still out: nobody else may go
    breaker.failure(stale)  # nor when the old stream fails
    clock.now += 5
    refused(breaker)


def test_breaker_threshold_zero_never_opens() -> None:
    breaker = CircuitBreaker("m", threshold=0, open_s=5, clock=Clock())
    for _ in range(50):
        breaker.acquire()
        breaker.failure()
    breaker.acquire()
    assert breaker.state is CircuitState.CLOSED


# ---- the upstream-error table -------------------------------------------------------------------

P, M = "openai", "openai/gpt-4o"


def fail(**kwargs):  # type: ignore[no-untyped-def]
    return upstream_failure(UpstreamError(**kwargs), provider=P, model_id=M)


@pytest.mark.parametrize(
    "err, cls, reason, retryable, breaker",
    [
        (
            dict(status=401, message="bad key"),
            FailedPrecondition,
            "PROVIDER_AUTH_FAILED",
            False,
            False,
        ),
        (
            dict(status=403, message="forbidden"),
            FailedPrecondition,
            "PROVIDER_AUTH_FAILED",
            False,
            False,
        ),
        (dict(status=200, kind="auth"), FailedPrecondition, "PROVIDER_AUTH_FAILED", False, False),
        (
            dict(status=429, message="slow down"),
            ResourceExhausted,
            "PROVIDER_RATE_LIMITED",
            True,
            False,
        ),
        (
            dict(status=429, kind="quota"),
            ResourceExhausted,
            "PROVIDER_QUOTA_EXCEEDED",
            False,
            False,
        ),
        (
            dict(status=402, kind="quota"),
            ResourceExhausted,
            "PROVIDER_QUOTA_EXCEEDED",
            False,
            False,
        ),
        (
            dict(status=200, kind="rate_limit"),
            ResourceExhausted,
            "PROVIDER_RATE_LIMITED",
            True,
            False,
        ),
        (dict(status=500), Unavailable, "PROVIDER_UNAVAILABLE", True, True),
        (dict(status=502), Unavailable, "PROVIDER_UNAVAILABLE", True, True),
        (dict(status=503), Unavailable, "PROVIDER_UNAVAILABLE", True, True),
        (dict(status=504), Unavailable, "PROVIDER_UNAVAILABLE", True, True),
        (dict(status=529), Unavailable, "PROVIDER_UNAVAILABLE", True, True),
        (dict(status=408), Unavailable, "PROVIDER_UNAVAILABLE", True, True),
        (dict(status=409), Unavailable, "PROVIDER_UNAVAILABLE", True, True),
        (dict(status=200, kind="overloaded"), Unavailable, "PROVIDER_UNAVAILABLE", True, True),
        (
            dict(status=404, message="no such model"),
            NotFound,
            "PROVIDER_MODEL_NOT_FOUND",
            False,
            False,
        ),
        (
            dict(status=400, message="bad"),
            InvalidArgument,
            "PROVIDER_REJECTED_REQUEST",
            False,
            False,
        ),
        (
            dict(status=422, message="bad"),
            InvalidArgument,
            "PROVIDER_REJECTED_REQUEST",
            False,
            False,
        ),
        (
            dict(status=400, kind="content_filter"),
            InvalidArgument,
            "CONTENT_FILTERED",
            False,
            False,
        ),
        (
            dict(status=400, kind="context_length"),
            InvalidArgument,
            "CONTEXT_LENGTH_EXCEEDED",
            False,
            False,
        ),
        (
            dict(status=400, message="This model's maximum context length is 8192 tokens"),
            InvalidArgument,
            "CONTEXT_LENGTH_EXCEEDED",
            False,
            False,
        ),
        (
            dict(status=413, message="prompt is too long: 210000 tokens > 200000 maximum"),
            InvalidArgument,
            "CONTEXT_LENGTH_EXCEEDED",
            False,
            False,
        ),
        (
            dict(
                status=400,
                message="The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
            ),
            InvalidArgument,
            "CONTEXT_LENGTH_EXCEEDED",
            False,
            False,
        ),
    ],
)
def test_upstream_failure_table(
    err: dict, cls: type, reason: str, retryable: bool, breaker: bool
) -> None:
    failure = fail(**err)
    assert type(failure.error) is cls
    assert (failure.error.reason, failure.retryable, failure.breaker) == (
        reason,
        retryable,
        breaker,
    )


def test_rate_limit_retry_info() -> None:
    hinted = fail(status=429, retry_after_s=7.0)
    assert hinted.error.retry_after_s == 7.0 and hinted.retry_after_s == 7.0
    assert hinted.error.subject == "provider:openai"
    # Without a hint the client still gets RetryInfo (1 s), but the gateway's own retry loop
    # is not told to wait: it uses its back-off.
    bare = fail(status=429)
    assert bare.error.retry_after_s == 1.0 and bare.retry_after_s is None
    assert fail(status=429, kind="quota", retry_after_s=5).error.retry_after_s is None


def test_unavailable_carries_the_hint_and_metadata() -> None:
    failure = fail(
        status=503, retry_after_s=2.5, type="server_error", request_id="req_" + "x" * 200
    )
    error = failure.error
    assert error.retry_after_s == 2.5 and failure.retry_after_s == 2.5
    assert error.metadata["provider"] == "openai" and error.metadata["model"] == M
    assert (
        error.metadata["upstream_status"] == "503"
        and error.metadata["upstream_error"] == "server_error"
    )
    assert error.metadata["upstream_request_id"] == "req_" + "x" * 124  # bounded
    assert fail(status=500).error.retry_after_s is None
    assert "(in-stream error)" in fail(status=0, kind="overloaded").error.message


def test_not_found_names_the_model() -> None:
    error = fail(status=404, message="The model `gpt-9` does not exist").error
    assert error.resource_type == "model" and error.resource_name == M
    assert error.metadata["provider"] == "openai" and "gpt-9" in error.message


@pytest.mark.parametrize(
    "param, field",
    [
        ("temperature", "text.temperature"),
        ("max_tokens", "text.max_tokens"),
        ("max_completion_tokens", "text.max_tokens"),
        ("maxOutputTokens", "text.max_tokens"),
        ("stop_sequences", "text.stop"),
        ("top_k", "text.top_k"),
        ("seed", "text.seed"),
        ("response_format.json_schema.schema", "text.response_format"),
        ("messages[2].content", "messages[2].content"),
        ("messages.1.content.0.source", "messages.1.content.0.source"),
        ("tools[0].function.name", "tools[0].function.name"),
        ("tool_choice", "tool_choice"),
        ("contents[1].parts[0]", "messages[1].parts[0]"),
        ("system", "messages"),
        ("logit_bias", "provider_options.logit_bias"),
        ("  reasoning_effort ", "provider_options.reasoning_effort"),
    ],
)
def test_rejected_request_names_the_field(param: str, field: str) -> None:
    error = fail(status=400, message="Invalid value", param=param).error
    assert isinstance(error, InvalidArgument) and error.reason == "PROVIDER_REJECTED_REQUEST"
    assert [v.field for v in error.violations] == [field]
    assert error.violations[0].description == "openai: Invalid value"
    assert fail(status=400, message="x").error.violations == []


def test_context_length_field() -> None:
    assert [
        v.field
        for v in fail(status=400, kind="context_length", param="max_tokens").error.violations
    ] == ["text.max_tokens"]
    assert [v.field for v in fail(status=400, kind="context_length").error.violations] == [
        "messages"
    ]


def test_upstream_messages_are_scrubbed() -> None:
    key = CREDENTIALS["openai project"]
    failure = upstream_failure(
        UpstreamError(status=401, message=f"Incorrect API key provided: {key}", type=f"bad {key}"),
        provider=P,
        model_id=M,
        secrets=["my-configured-header-secret"],
    )
    assert key not in failure.error.message and key not in str(failure.error.metadata)
    assert key not in str(failure)
    other = fail(status=500, message="echo my-configured-header-secret")
    assert "my-configured-header-secret" in other.error.message  # only the given secrets go
    scrubbed = upstream_failure(
        UpstreamError(status=500, message="echo my-configured-header-secret"),
        provider=P,
        model_id=M,
        secrets=["my-configured-header-secret"],
    )
    assert "my-configured-header-secret" not in scrubbed.error.message
    assert fail(status=503).error.message.endswith("HTTP 503")  # an empty message says something


def test_transport_failures() -> None:
    for failure, reason in (
        (connection_failure(P, M, "refused"), "PROVIDER_UNAVAILABLE"),
        (timeout_failure(P, M, "waiting", 2.0), "PROVIDER_TIMEOUT"),
        (bad_response(P, M, "malformed JSON"), "PROVIDER_BAD_RESPONSE"),
    ):
        assert isinstance(failure.error, Unavailable) and failure.error.reason == reason
        assert failure.retryable and failure.breaker
    assert "2s" in timeout_failure(P, M, "waiting", 2.0).error.message
