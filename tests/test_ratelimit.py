"""Per-key rate limits, in memory and in a real Redis (redis-server started by these tests)."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from google.rpc import code_pb2

from helpers import unpack_status
from pluggably.api.status import to_status
from pluggably.config import LimitsConfig
from pluggably.core.context import KeyLimits
from pluggably.core.errors import ResourceExhausted, Unavailable
from pluggably.security.ratelimit import (
    REASON_REQUESTS,
    REASON_STREAMS,
    REASON_TOKENS,
    REASON_UNAVAILABLE,
    Admission,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    build_rate_limiter,
)
from redis_util import RedisServer

LONG_LEASE_S = 60.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client, to look at what the limiter wrote."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """One backend under test: makes limiters and lets time pass (faked in memory, real for
    Redis, whose clock is its own `TIME`)."""

    name: str
    make: Callable[[float], RateLimiter]
    advance: Callable[[float], Awaitable[None]]
    made: list[RateLimiter] = field(default_factory=list)

    def limiter(self, lease_ttl_s: float = LONG_LEASE_S) -> RateLimiter:
        limiter = self.make(lease_ttl_s)
        self.made.append(limiter)
        return limiter


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance_clock(seconds: float) -> None:
            clock.now += seconds

        made = Backend(
            "memory",
            lambda ttl: MemoryRateLimiter(lease_ttl_s=ttl, clock=clock),
            advance_clock,
        )
    else:
        url = request.getfixturevalue("redis_server").url
        made = Backend("redis", lambda ttl: RedisRateLimiter(url, lease_ttl_s=ttl), asyncio.sleep)
    yield made
    for limiter in made.made:
        await limiter.aclose()


def new_key() -> str:
    return f"pk_{uuid.uuid4().hex[:10]}"


async def refused(
    limiter: RateLimiter, key: str, limits: KeyLimits, *, stream: bool = False
) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as caught:
        await limiter.admit(key, limits, stream=stream)
    return caught.value


async def test_requests_over_the_limit_are_refused_with_quota_failure(backend: Backend) -> None:
    limiter, key = backend.limiter(), new_key()
    limits = KeyLimits(requests_per_minute=3)
    for _ in range(3):
        await limiter.admit(key, limits, stream=False)

    exc = await refused(limiter, key, limits)

    assert exc.reason == REASON_REQUESTS
    assert exc.subject == f"api-key:{key}"
    # One token comes back every 20 s at 3 per minute.
    assert exc.retry_after_s is not None and 19.0 < exc.retry_after_s <= 20.0
    assert exc.message == f"API key {key} exceeded 3 requests per minute; retry in 20.0 s"
    status = to_status(exc, "req-1")
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    details = unpack_status(status)
    quota = details["google.rpc.QuotaFailure"]
    assert [v.subject for v in quota.violations] == [f"api-key:{key}"]  # type: ignore[attr-defined]
    retry = details["google.rpc.RetryInfo"].retry_delay  # type: ignore[attr-defined]
    assert 19.0 < retry.ToNanoseconds() / 1e9 <= 20.0
    assert details["google.rpc.ErrorInfo"].reason == REASON_REQUESTS  # type: ignore[attr-defined]


async def test_requests_come_back_as_the_bucket_refills(backend: Backend) -> None:
    limiter, key = backend.limiter(), new_key()
    limits = KeyLimits(requests_per_minute=120)  # two per second
    for _ in range(120):
        await limiter.admit(key, limits, stream=False)
    exc = await refused(limiter, key, limits)
    assert exc.retry_after_s is not None and 0.0 < exc.retry_after_s <= 0.5

    await backend.advance(exc.retry_after_s + 0.02)

    await limiter.admit(key, limits, stream=False)
    assert (await refused(limiter, key, limits)).reason == REASON_REQUESTS


async def test_tokens_are_checked_at_admit_and_charged_at_settle(backend: Backend) -> None:
    limiter, key = backend.limiter(), new_key()
    limits = KeyLimits(tokens_per_minute=600)  # ten per second
    first = await limiter.admit(key, limits, stream=False)
    # Admitting charges nothing: usage is not known yet.
    second = await limiter.admit(key, limits, stream=False)

    # More than the whole budget: the balance goes below zero and the key waits it off.
    await limiter.settle(first, 605)
    exc = await refused(limiter, key, limits)
    assert exc.reason == REASON_TOKENS
    assert exc.subject == f"api-key:{key}"
    assert "exceeded 600 tokens per minute" in exc.message
    # Until -5 has become +1 at ten per second.
    assert exc.retry_after_s is not None and 0.5 < exc.retry_after_s <= 0.6

    await limiter.settle(second, 0)
    await backend.advance(exc.retry_after_s + 0.02)
    await limiter.admit(key, limits, stream=False)


async def test_settling_twice_charges_and_releases_once(backend: Backend) -> None:
    limiter, key = backend.limiter(), new_key()
    limits = KeyLimits(tokens_per_minute=600, concurrent_streams=1)
    admission = await limiter.admit(key, limits, stream=True)
    await limiter.settle(admission, 605)
    await limiter.settle(admission, 605)
    exc = await refused(limiter, key, limits)
    # Charged twice, the balance would be -610 and the wait a minute.
    assert exc.retry_after_s is not None and exc.retry_after_s <= 0.6


async def test_stream_slots_are_taken_and_released(backend: Backend) -> None:
    limiter, key = backend.limiter(), new_key()
    limits = KeyLimits(concurrent_streams=2)
    first = await limiter.admit(key, limits, stream=True)
    second = await limiter.admit(key, limits, stream=True)
    assert first.stream_lease and second.stream_lease
    assert first.stream_lease != second.stream_lease

    exc = await refused(limiter, key, limits, stream=True)
    assert exc.reason == REASON_STREAMS
    assert exc.retry_after_s == 1.0
    assert exc.subject == f"api-key:{key}"
    assert "2 concurrent streams" in exc.message
    # Unary calls hold no slot.
    assert (await limiter.admit(key, limits, stream=False)).stream_lease is None

    await limiter.settle(first, 0)
    third = await limiter.admit(key, limits, stream=True)
    # Released again (by mistake): must not free the slot `third` holds.
    await limiter.settle(first, 0)
    await limiter.settle(second, 0)
    await limiter.settle(second, 0)
    await limiter.admit(key, limits, stream=True)
    assert (await refused(limiter, key, limits, stream=True)).reason == REASON_STREAMS
    await limiter.settle(third, 0)


async def test_a_refusal_charges_no_other_dimension(backend: Backend) -> None:
    limiter = backend.limiter()

    # Refused for its stream slot: no request is taken.
    key = new_key()
    limits = KeyLimits(requests_per_minute=2, concurrent_streams=1)
    await limiter.admit(key, limits, stream=True)
    assert (await refused(limiter, key, limits, stream=True)).reason == REASON_STREAMS
    await limiter.admit(key, limits, stream=False)
    assert (await refused(limiter, key, limits)).reason == REASON_REQUESTS

    # Refused for requests: no stream slot is taken.
    key = new_key()
    limits = KeyLimits(requests_per_minute=1, concurrent_streams=1)
    await limiter.admit(key, limits, stream=False)
    assert (await refused(limiter, key, limits, stream=True)).reason == REASON_REQUESTS
    await limiter.admit(key, KeyLimits(concurrent_streams=1), stream=True)

    # Refused for tokens: neither a request nor a slot is taken.
    key = new_key()
    limits = KeyLimits(requests_per_minute=3, tokens_per_minute=600, concurrent_streams=1)
    await limiter.settle(await limiter.admit(key, limits, stream=False), 700)
    assert (await refused(limiter, key, limits, stream=True)).reason == REASON_TOKENS
    await limiter.admit(key, KeyLimits(requests_per_minute=3, concurrent_streams=1), stream=True)
    await limiter.admit(key, KeyLimits(requests_per_minute=3), stream=False)
    assert (await refused(limiter, key, KeyLimits(requests_per_minute=3))).reason == (
        REASON_REQUESTS
    )


async def test_a_lost_stream_slot_comes_back_after_its_lease(backend: Backend) -> None:
    crashed, survivor, key = backend.limiter(0.2), backend.limiter(0.2), new_key()
    limits = KeyLimits(concurrent_streams=1)
    await crashed.admit(key, limits, stream=True)  # never settled: its gateway died
    if backend.name == "memory":
        survivor = crashed  # one process: there is no other gateway to share the slot with
    assert (await refused(survivor, key, limits, stream=True)).reason == REASON_STREAMS

    await backend.advance(0.25)

    await survivor.admit(key, limits, stream=True)


async def test_no_limits_cost_nothing(backend: Backend) -> None:
    limiter, key = backend.limiter(), new_key()
    admission = await limiter.admit(key, KeyLimits(), stream=True)
    assert admission == Admission(key)
    await limiter.settle(admission, 10_000)
    if isinstance(limiter, MemoryRateLimiter):
        assert len(limiter) == 0


async def test_limits_below_one_are_a_programming_error() -> None:
    limiter = MemoryRateLimiter(lease_ttl_s=1)
    with pytest.raises(ValueError, match="at least 1"):
        await limiter.admit("pk_x", KeyLimits(requests_per_minute=0), stream=False)


# --- memory only ----------------------------------------------------------------------------


async def test_memory_drops_idle_keys_but_keeps_held_slots() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(lease_ttl_s=3600, clock=clock)
    limits = KeyLimits(requests_per_minute=60, tokens_per_minute=1000, concurrent_streams=1)
    streaming = await limiter.admit("pk_streaming", limits, stream=True)
    for n in range(1000):
        await limiter.settle(await limiter.admit(f"pk_{n}", limits, stream=False), 10)
    assert len(limiter) == 1001

    clock.now += 61  # every bucket is full again
    busy = KeyLimits(concurrent_streams=5)
    for _ in range(600):
        await limiter.settle(await limiter.admit("pk_busy", busy, stream=True), 0)

    assert len(limiter) == 2  # the busy key and the one holding a stream slot
    assert (await refused(limiter, "pk_streaming", limits, stream=True)).reason == REASON_STREAMS
    await limiter.settle(streaming, 0)
    await limiter.admit("pk_streaming", limits, stream=True)


async def test_build_picks_the_configured_backend(redis_server: RedisServer) -> None:
    memory = build_rate_limiter(LimitsConfig(), lease_ttl_s=10)
    assert isinstance(memory, MemoryRateLimiter)
    limiter = build_rate_limiter(
        LimitsConfig(backend="redis", redis_url=redis_server.url), lease_ttl_s=10
    )
    assert isinstance(limiter, RedisRateLimiter)
    await limiter.aclose()


# --- redis only -----------------------------------------------------------------------------


async def test_two_gateways_admit_exactly_the_budget(redis_server: RedisServer) -> None:
    gateways = [RedisRateLimiter(redis_server.url, lease_ttl_s=60) for _ in range(2)]
    try:
        key, limits = new_key(), KeyLimits(requests_per_minute=50)

        async def one(n: int) -> str:
            try:
                await gateways[n % 2].admit(key, limits, stream=False)
            except ResourceExhausted as exc:
                return exc.reason
            return "OK"

        outcomes = await asyncio.gather(*(one(n) for n in range(200)))
        assert outcomes.count("OK") == 50
        assert outcomes.count(REASON_REQUESTS) == 150

        key, limits = new_key(), KeyLimits(concurrent_streams=7)

        async def stream(n: int) -> Admission | None:
            try:
                return await gateways[n % 2].admit(key, limits, stream=True)
            except ResourceExhausted:
                return None

        admitted = [a for a in await asyncio.gather(*(stream(n) for n in range(100))) if a]
        assert len(admitted) == 7
        await asyncio.gather(*(gateways[n % 2].settle(a, 0) for n, a in enumerate(admitted)))
        again = [a for a in await asyncio.gather(*(stream(n) for n in range(20))) if a]
        assert len(again) == 7
    finally:
        for gateway in gateways:
            await gateway.aclose()


async def test_redis_keys_are_namespaced_and_expire(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    limiter = RedisRateLimiter(redis_server.url, lease_ttl_s=30)
    try:
        key = new_key()
        limits = KeyLimits(requests_per_minute=60, tokens_per_minute=600, concurrent_streams=2)
        admission = await limiter.admit(key, limits, stream=True)
        base = f"pluggably:rl:{{{key}}}"
        assert await redis_client.zcard(f"{base}:streams") == 1
        # One request of 60 comes back in a second; the slot set outlives its longest lease.
        assert 0 < await redis_client.pttl(f"{base}:req") <= 2_000
        assert 30_000 < await redis_client.pttl(f"{base}:streams") <= 31_000
        assert not await redis_client.exists(f"{base}:tok")  # checked, not charged

        await limiter.settle(admission, 300)
        assert await redis_client.zcard(f"{base}:streams") == 0
        # 300 of 600 tokens come back in 30 s.
        assert 29_000 < await redis_client.pttl(f"{base}:tok") <= 31_000
    finally:
        await limiter.aclose()


async def test_redis_reloads_scripts_it_has_lost(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    limiter = RedisRateLimiter(redis_server.url, lease_ttl_s=30)
    try:
        key, limits = new_key(), KeyLimits(requests_per_minute=2)
        await limiter.admit(key, limits, stream=False)
        await redis_client.script_flush()  # as after a Redis restart
        await limiter.admit(key, limits, stream=False)
        assert (await refused(limiter, key, limits)).reason == REASON_REQUESTS
    finally:
        await limiter.aclose()


def _assert_secret_kept(exc: BaseException, caplog: pytest.LogCaptureFixture, secret: str) -> None:
    assert secret not in str(exc) and secret not in repr(exc)
    assert exc.__cause__ is None and exc.__suppress_context__
    logged = [r.getMessage() for r in caplog.records]
    assert logged, "the failure was not logged"
    assert all(secret not in line for line in logged)


async def test_redis_down_fails_closed_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Bound but not listening: connections are refused, and no one else can take the port.
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        secret = "hunter2-" + uuid.uuid4().hex
        limiter = RedisRateLimiter(f"redis://:{secret}@127.0.0.1:{port}/0", lease_ttl_s=30)
        try:
            with caplog.at_level(logging.WARNING, logger="pluggably.security.ratelimit"):
                with pytest.raises(Unavailable) as caught:
                    await limiter.admit("pk_down", KeyLimits(requests_per_minute=5), stream=False)
                # The call has ended already: settling must not raise.
                await limiter.settle(Admission("pk_down", "lease", tokens_per_minute=5), 10)
                # Nothing to count: admitted without asking Redis.
                await limiter.admit("pk_down", KeyLimits(), stream=True)
        finally:
            await limiter.aclose()

    exc = caught.value
    assert exc.reason == REASON_UNAVAILABLE
    assert exc.retry_after_s == 1.0
    assert "rate limits cannot be checked" in exc.message
    _assert_secret_kept(exc, caplog, secret)
    assert f"redis at 127.0.0.1:{port}" in caplog.text
    assert len(caplog.records) == 1  # one line per outage, not one per call


async def test_redis_refusing_the_password_fails_closed_without_it(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hunter2-" + uuid.uuid4().hex
    # The server's default user takes any password: a user it does not know gets WRONGPASS.
    url = redis_server.url.replace("redis://", f"redis://ghost:{secret}@")
    limiter = RedisRateLimiter(url, lease_ttl_s=30)
    try:
        with caplog.at_level(logging.WARNING, logger="pluggably.security.ratelimit"):
            with pytest.raises(Unavailable) as caught:
                await limiter.admit("pk_auth", KeyLimits(requests_per_minute=5), stream=False)
    finally:
        await limiter.aclose()
    assert caught.value.reason == REASON_UNAVAILABLE
    _assert_secret_kept(caught.value, caplog, secret)
