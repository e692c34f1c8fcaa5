"""Structured logs: the JSON and text formats, the access event of every RPC (fields and level),
and the redaction safety net, on the formatter and hook directly and through a real gateway."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluggably.api.hooks import CallHook, drain_observers
from pluggably.config import LoggingConfig
from pluggably.core.context import Principal, RequestContext
from pluggably.devtools.standins import Fault
from pluggably.observability.logging import (
    ACCESS_LOGGER,
    AccessLogHook,
    JsonFormatter,
    RedactingFilter,
    TextFormatter,
    access_level,
    redact,
    register_secret,
)
from pluggably.v1 import generation_pb2 as P
from providers_util import KEYS, MODELS, provider_stack

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
GATEWAY_KEY = "pk_0123456789ab_" + "S3cr3tS3cr3t-_S3cr3tS3cr3tS3cr3tS3cr3tAA"
HUB_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"


class Lines:
    """A handler wired like `configure_logging`'s (JSON or text, redaction on the handler) that
    keeps what it writes; `wait()` returns once `count` records with `logger` have arrived."""

    def __init__(self, fmt: str = "json") -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
        self.handler.addFilter(RedactingFilter())
        # Only the gateway's records: asyncio and friends log at DEBUG too.
        self.handler.addFilter(logging.Filter("pluggably"))
        self.records: list[logging.LogRecord] = []
        self._waiters: list[tuple[str, int, asyncio.Future[None]]] = []
        recorder = logging.Handler()
        recorder.emit = self._record  # type: ignore[method-assign]
        recorder.addFilter(logging.Filter("pluggably"))
        self.recorder = recorder

    def _record(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for logger, count, future in list(self._waiters):
            if not future.done() and sum(r.name == logger for r in self.records) >= count:
                future.set_result(None)

    def of(self, logger: str) -> list[logging.LogRecord]:
        drain_observers()  # access events are written in batches; the ones due, now
        return [r for r in self.records if r.name == logger]

    async def wait(self, logger: str, count: int, timeout: float = 5) -> list[logging.LogRecord]:
        if len(self.of(logger)) < count:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((logger, count, future))
            await asyncio.wait_for(future, timeout)
        return self.of(logger)

    def lines(self) -> list[str]:
        drain_observers()
        return self.stream.getvalue().splitlines()

    def json(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]


def observe(hook: CallHook, ctx: RequestContext) -> None:
    """What the interceptor does when a call ends (its batching aside)."""
    ctx.ended = ctx.ended or time.perf_counter()
    hook.observe(ctx)


@pytest.fixture(autouse=True)
def _no_registered_secrets() -> Iterator[None]:
    """Gateways started by earlier tests register their provider keys for exact masking (a
    process-wide list); these tests check the shape rules, so they start from none."""
    from pluggably.observability import logging as plog

    saved = list(plog._known_secrets)
    plog._known_secrets.clear()
    try:
        yield
    finally:
        plog._known_secrets[:] = saved


@pytest.fixture
def lines() -> Iterator[Lines]:
    """Captures every record that reaches the root logger, as the shipped handler writes it."""
    captured = Lines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(captured.handler)
    root.addHandler(captured.recorder)
    root.setLevel(logging.DEBUG)
    try:
        yield captured
    finally:
        root.removeHandler(captured.handler)
        root.removeHandler(captured.recorder)
        root.setLevel(old_level)
        captured.handler.close()


# --- Formats --------------------------------------------------------------------------------


def test_json_line_has_the_envelope_extra_fields_and_the_exception(lines: Lines) -> None:
    log = logging.getLogger("pluggably.test")
    log.info("hello %s", "world", extra={"fields": {"a": 1, "message": "not me"}, "b": "two"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    first, second = lines.json()
    assert RFC3339_MS.match(first["time"]), first["time"]
    assert first["level"] == "INFO"
    assert first["logger"] == "pluggably.test"
    assert first["message"] == "hello world"  # a field cannot replace the envelope
    assert first["a"] == 1 and first["b"] == "two"
    assert list(first)[:4] == ["time", "level", "logger", "message"]
    assert second["level"] == "ERROR"
    assert "Traceback" in second["exception"] and "ValueError: boom" in second["exception"]


def test_text_line_has_fields_as_key_values() -> None:
    record = logging.LogRecord("pluggably.access", logging.INFO, __file__, 1, "m %s", ("x",), None)
    record.fields = {"code": "OK", "reason": "", "latency_ms": 1.5, "ttft_ms": None}
    line = TextFormatter().format(record)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO pluggably\.access: m x ", line)
    assert line.endswith("code=OK latency_ms=1.5")  # empty and absent values left out


def test_configure_logging_sets_format_level_and_redaction() -> None:
    """In a fresh process: configure_logging owns the root logger there."""
    code = textwrap.dedent(
        f"""
        import logging
        from pluggably.config import LoggingConfig
        from pluggably.observability.logging import configure_logging
        configure_logging(LoggingConfig(level="WARNING", format="json"))
        logging.getLogger("x").info("not shown")
        logging.getLogger("x").warning("key %s", {GATEWAY_KEY!r})
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    (line,) = done.stderr.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "x"
    assert entry["message"] == "key pk_0123456789ab_[REDACTED]"


# --- Redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("authorization: Bearer abc.DEF-123", "authorization: Bearer [REDACTED]"),
        (f"key {GATEWAY_KEY} used", "key pk_0123456789ab_[REDACTED] used"),
        ("pk_0123456789ab alone is an id", "pk_0123456789ab alone is an id"),
        (KEYS["openai"], "sk-[REDACTED]"),
        (KEYS["anthropic"], "sk-[REDACTED]"),
        (f"token {HUB_TOKEN}", "token hf_[REDACTED]"),
        (KEYS["gemini"], "AIza[REDACTED]"),
        ("redis://:hunter2pass@127.0.0.1:6379/0", "redis://:[REDACTED]@127.0.0.1:6379/0"),
        ("https://user:hunter2@example.com/x", "https://user:[REDACTED]@example.com/x"),
        ("https://h/v1?key=abc123&alt=sse", "https://h/v1?key=[REDACTED]&alt=sse"),
        # Not credentials: left as they are.
        ("send `authorization: Bearer <key>`", "send `authorization: Bearer <key>`"),
        ("a bearer token is needed", "a bearer token is needed"),
        ("http://127.0.0.1:8080/v1/models", "http://127.0.0.1:8080/v1/models"),
        ("StreamService/StreamGenerate OK 1.2ms", "StreamService/StreamGenerate OK 1.2ms"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_registered_secrets_are_masked_whatever_their_shape() -> None:
    secret = "plain-looking-provider-secret-value"
    assert redact(f"x {secret} y") == f"x {secret} y"
    register_secret(secret)
    register_secret("short")  # too short to mask safely: ignored
    assert redact(f"x {secret} y") == "x [REDACTED] y"
    assert redact("a short word") == "a short word"


def test_filter_masks_message_args_fields_extras_and_tracebacks(lines: Lines) -> None:
    log = logging.getLogger("pluggably.test")
    log.warning(
        "calling with %s",
        f"Bearer {GATEWAY_KEY}",
        extra={
            "fields": {"url": "redis://:pw12345@h:1/0", "n": 3, "nested": {"k": KEYS["openai"]}},
            "token": HUB_TOKEN,
        },
    )
    try:
        raise RuntimeError(f"upstream said no to {KEYS['anthropic']}")
    except RuntimeError:
        log.exception("failed")
    text = lines.stream.getvalue()
    for secret in (GATEWAY_KEY, KEYS["openai"], KEYS["anthropic"], HUB_TOKEN, "pw12345"):
        assert secret not in text
    first, second = lines.json()
    assert first["message"] == "calling with Bearer [REDACTED]"
    assert first["url"] == "redis://:[REDACTED]@h:1/0" and first["n"] == 3
    assert first["nested"] == {"k": "sk-[REDACTED]"}
    assert first["token"] == "hf_[REDACTED]"
    assert "RuntimeError: upstream said no to sk-[REDACTED]" in second["exception"]


# --- The access event -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "code", "level"),
    [
        ("/pluggably.v1.GenerateService/Generate", "OK", logging.INFO),
        ("/grpc.health.v1.Health/Check", "OK", logging.DEBUG),
        ("/grpc.health.v1.Health/Check", "INTERNAL", logging.ERROR),
        ("/pluggably.v1.StreamService/StreamGenerate", "CANCELLED", logging.INFO),
        ("/pluggably.v1.GenerateService/Generate", "INVALID_ARGUMENT", logging.WARNING),
        ("/pluggably.v1.GenerateService/Generate", "UNAUTHENTICATED", logging.WARNING),
        ("/pluggably.v1.GenerateService/Generate", "RESOURCE_EXHAUSTED", logging.WARNING),
        ("/pluggably.v1.GenerateService/Generate", "DEADLINE_EXCEEDED", logging.WARNING),
        ("/pluggably.v1.GenerateService/Generate", "UNAVAILABLE", logging.ERROR),
        ("/pluggably.v1.GenerateService/Generate", "UNKNOWN", logging.ERROR),
    ],
)
def test_access_level(method: str, code: str, level: int) -> None:
    assert access_level(method, code) == level


async def test_access_hook_logs_one_event_with_every_field(lines: Lines) -> None:
    hook = AccessLogHook(LoggingConfig())
    ctx = RequestContext(
        request_id="req-1",
        method="/pluggably.v1.StreamService/StreamGenerate",
        peer="ipv4:127.0.0.1:4242",
        streaming=True,
        principal=Principal("0123456789ab", name="ci"),
    )
    assert hook.start(ctx, {"authorization": f"Bearer {GATEWAY_KEY}"}) is None  # sees no metadata
    ctx.served_by("local/tiny")
    ctx.output_started()
    ctx.input_tokens, ctx.output_tokens, ctx.messages, ctx.queue_wait_s = 7, 16, 17, 0.0125
    ctx.code, ctx.reason = "RESOURCE_EXHAUSTED", "RATE_LIMITED"
    observe(hook, ctx)
    (entry,) = lines.json()
    assert entry["logger"] == ACCESS_LOGGER and entry["level"] == "WARNING"
    assert entry["message"].startswith("StreamService/StreamGenerate RESOURCE_EXHAUSTED ")
    assert entry["method"] == "/pluggably.v1.StreamService/StreamGenerate"
    assert (entry["code"], entry["reason"]) == ("RESOURCE_EXHAUSTED", "RATE_LIMITED")
    assert (entry["model"], entry["provider"]) == ("local/tiny", "local")
    assert (entry["input_tokens"], entry["output_tokens"], entry["messages"]) == (7, 16, 17)
    assert entry["queue_wait_ms"] == 12.5
    assert (entry["request_id"], entry["key_id"], entry["peer"]) == (
        "req-1",
        "0123456789ab",
        "ipv4:127.0.0.1:4242",
    )
    assert 0 <= entry["ttft_ms"] <= entry["latency_ms"]
    assert GATEWAY_KEY not in lines.stream.getvalue()


async def test_access_hook_costs_nothing_below_the_level(lines: Lines) -> None:
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.WARNING)
    try:
        hook = AccessLogHook(LoggingConfig())
        ctx = RequestContext(request_id="r", method="/pluggably.v1.GenerateService/Generate")
        observe(hook, ctx)  # OK -> INFO: below WARNING, no record is even made
        assert lines.records == []
        ctx.code = "NOT_FOUND"
        observe(hook, ctx)
        assert [r.levelno for r in lines.records] == [logging.WARNING]
    finally:
        access.setLevel(logging.NOTSET)


async def test_access_log_switched_off_logs_nothing(lines: Lines) -> None:
    hook = AccessLogHook(LoggingConfig(access_log=False))
    observe(hook, RequestContext(request_id="r", method="/pluggably.v1.X/Y"))
    assert lines.records == []


# --- Through a real gateway -----------------------------------------------------------------


@pytest.fixture(scope="module")
async def gateway():
    async with provider_stack(
        auth={"enabled": False}, metrics={"enabled": False}, logging={"access_log": True}
    ) as stack:
        yield stack


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The access event's fields."""
    return record.__dict__["fields"]  # type: ignore[no-any-return]


def chat(model: str, text: str = "Hello") -> P.GenerateRequest:
    return P.GenerateRequest(model=model, messages=[P.ChatMessage(role="user", content=text)])


async def test_every_rpc_kind_gets_one_access_event(gateway, lines: Lines) -> None:
    gateway.reset()
    model = f"openai/{MODELS['openai']}"
    await gateway.generate(chat(model), metadata=(("x-request-id", "log-unary"),))
    async for _ in gateway.stream(chat(model), metadata=(("x-request-id", "log-stream"),)):
        pass
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.generate(chat("openai/no-such-model"))
    await health_pb2_grpc.HealthStub(gateway.channel).Check(health_pb2.HealthCheckRequest())
    records = await lines.wait(ACCESS_LOGGER, 4)
    by_id = {fields(r)["request_id"]: fields(r) for r in records}
    unary, stream = by_id["log-unary"], by_id["log-stream"]
    assert unary["method"] == "/pluggably.v1.GenerateService/Generate" and unary["code"] == "OK"
    assert (unary["model"], unary["provider"]) == (model, "openai")
    assert unary["input_tokens"] > 0 and unary["output_tokens"] > 0
    assert stream["method"] == "/pluggably.v1.StreamService/StreamGenerate"
    assert stream["messages"] > 1 and stream["ttft_ms"] is not None
    assert 0 < stream["ttft_ms"] <= stream["latency_ms"]
    assert stream["peer"].startswith("ipv")
    failed = [r for r in records if fields(r)["code"] == "NOT_FOUND"]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert fields(failed[0])["reason"]
    health = [r for r in records if fields(r)["method"].startswith("/grpc.health.")]
    assert [r.levelno for r in health] == [logging.DEBUG]


async def test_an_expired_deadline_is_logged_as_deadline_exceeded(gateway, lines: Lines) -> None:
    gateway.reset()
    gateway.standin("openai").inject(
        Fault("hang_before_headers", seconds=5, path="/chat/completions")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.generate(chat(f"openai/{MODELS['openai']}"), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (record,) = await lines.wait(ACCESS_LOGGER, 1)
    assert fields(record)["code"] == "DEADLINE_EXCEEDED"
    assert record.levelno == logging.WARNING


async def test_planted_secrets_reach_no_log_line(gateway, lines: Lines) -> None:
    """A gateway key in the authorization header, provider and hub keys in the request: none
    is written, whether the call succeeds or fails."""
    gateway.reset()
    planted = (GATEWAY_KEY, KEYS["openai"], HUB_TOKEN)
    metadata = (("authorization", f"Bearer {GATEWAY_KEY}"), ("x-api-key", KEYS["openai"]))
    await gateway.generate(
        chat(f"openai/{MODELS['openai']}", f"my keys: {' '.join(planted)}"), metadata=metadata
    )
    for bad_model in (f"openai/{KEYS['openai']}", f"huggingface/{HUB_TOKEN}", GATEWAY_KEY):
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.generate(chat(bad_model), metadata=metadata)
    await lines.wait(ACCESS_LOGGER, 4)
    text = lines.stream.getvalue()
    assert text.count('"logger":"pluggably.access"') == 4
    for secret in planted:
        assert secret not in text
    # The bad model names were logged (a model field is the caller's text), masked.
    # (masked by its shape, or whole when the gateway knows it as a configured provider key)
    assert re.search(r"openai/(sk-)?\[REDACTED\]", text) and "pk_0123456789ab_[REDACTED]" in text
    assert "my keys" not in text  # no prompt text either


def test_access_events_take_the_direct_path_with_the_shipped_handler() -> None:
    """With the shipped set-up (one JSON handler), access events skip the LogRecord and write
    the same line, redacted; with another handler listening they go through logging again.
    In a fresh process: configure_logging owns the root logger there."""
    code = textwrap.dedent(
        f"""
        import asyncio, io, json, logging, sys
        from pluggably.config import LoggingConfig
        from pluggably.core.context import RequestContext
        from pluggably.observability import logging as plog
        plog.configure_logging(LoggingConfig(format="json"))
        hook = plog.AccessLogHook(LoggingConfig())
        taken = []
        original = plog.BufferedStreamHandler.write_line
        def spy(self, line, level):
            taken.append(line)
            original(self, line, level)
        plog.BufferedStreamHandler.write_line = spy
        def ctx(code):
            c = RequestContext(request_id="r1", method="/pluggably.v1.GenerateService/Generate")
            c.requested_model = "openai/{GATEWAY_KEY}"
            c.code = code
            c.ended = c.started
            return c
        hook.observe(ctx("NOT_FOUND"))
        assert len(taken) == 1, taken
        extra = logging.StreamHandler(io.StringIO())
        logging.getLogger().addHandler(extra)
        hook.observe(ctx("NOT_FOUND"))
        assert len(taken) == 1, "another handler listens: the record path"
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    fast, slow = (json.loads(line) for line in done.stderr.splitlines())
    assert GATEWAY_KEY not in done.stderr
    for entry in (fast, slow):
        assert entry["logger"] == "pluggably.access" and entry["level"] == "WARNING"
        assert entry["requested_model"] == "openai/pk_0123456789ab_[REDACTED]"
    assert {k: v for k, v in fast.items() if k not in ("time", "latency_ms", "message")} == {
        k: v for k, v in slow.items() if k not in ("time", "latency_ms", "message")
    }
    assert fast["message"].split()[:2] == slow["message"].split()[:2]
