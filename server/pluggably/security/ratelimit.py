"""Per-key rate limits: requests per minute, tokens per minute, concurrent streams.

The interceptor's limits hook calls `admit()` before the handler (with the key's limits already
resolved against `limits.per_key`) and `settle()` when the call has ended, with the tokens it
used. Two backends keep the counters: `MemoryRateLimiter` (this process only, the default) and
`RedisRateLimiter` (one budget shared by every gateway process that points at the same Redis).

Both behave alike:
- requests per minute and tokens per minute are token buckets: capacity = the per-minute limit,
  refilled continuously at limit/60 per second, starting full. A request costs one request
  token.
- tokens per minute are check-then-charge: `admit()` only requires a positive balance and
  `settle()` debits what the call really used, because a generation's usage is known only when
  it ends (a guess up front would be wrong both ways: `max_tokens` is an upper bound that most
  calls never reach, and prompts are tokenized by the backend). The balance may go negative, so
  a large call is paid for by the key waiting longer afterwards; a burst of calls admitted
  together may overshoot the budget by what they use, once.
- a stream holds one of the key's stream slots from `admit(stream=True)` to `settle()`. A slot
  also expires after `lease_ttl_s` (the longest a stream may run plus a margin), so slots held
  by a gateway that crashed come back on their own.
- a call refused on one dimension is charged on none (all checks, then all charges).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pluggably.core.context import KeyLimits
from pluggably.core.errors import ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from pluggably.config import LimitsConfig

log = logging.getLogger(__name__)

REASON_REQUESTS = "RATE_LIMIT_REQUESTS"
REASON_TOKENS = "RATE_LIMIT_TOKENS"
REASON_STREAMS = "RATE_LIMIT_STREAMS"
REASON_UNAVAILABLE = "RATE_LIMITER_UNAVAILABLE"
# A refused stream cannot know when another of the key's streams ends: a short, fixed hint.
STREAM_RETRY_AFTER_S = 1.0


@dataclass(slots=True)
class Admission:
    """What `admit()` took for one call; `settle()` gives it back and charges the tokens."""

    key_id: str
    # Id of the concurrent-stream slot held, if any.
    stream_lease: str | None = None
    # The tokens-per-minute limit the call was admitted under; None: tokens are not counted.
    tokens_per_minute: int | None = None
    settled: bool = False


class RateLimiter(ABC):
    """Counters of every API key's use. Safe to call from many tasks on one event loop."""

    async def admit(self, key_id: str, limits: KeyLimits, *, stream: bool) -> Admission:
        """Admits one call of `key_id` or raises `ResourceExhausted` (nothing is charged then).

        `limits` are resolved (None: unlimited in that dimension; otherwise at least 1).
        Raises `Unavailable` when the counters cannot be reached (Redis).
        """
        admission = self.admit_nowait(key_id, limits, stream=stream)
        if admission is not None:
            return admission
        return await self._admit(key_id, limits, stream=stream)

    def admit_nowait(self, key_id: str, limits: KeyLimits, *, stream: bool) -> Admission | None:
        """`admit()` without awaiting, where no backend needs to be asked (nothing to count, or
        counters in this process): the admission, or raises like `admit()`. None: call
        `admit()`. Awaiting costs a coroutine on every RPC; most calls need none."""
        _check_limits(limits)
        if (
            limits.requests_per_minute is None
            and limits.tokens_per_minute is None
            and (not stream or limits.concurrent_streams is None)
        ):
            return Admission(key_id)  # nothing to count: costs nothing
        return None

    async def settle(self, admission: Admission, tokens: int) -> None:
        """Charges the tokens the call used (input + output) and frees its stream slot.

        Does nothing the second time for one admission, so a slot is never released twice.
        Never raises for a backend failure (the call has already ended; an unreleased slot
        expires after `lease_ttl_s`).
        """
        if self.settle_nowait(admission, tokens):
            return
        admission.settled = True
        await self._settle(admission, _charge(admission, tokens))

    def settle_nowait(self, admission: Admission, tokens: int) -> bool:
        """`settle()` without awaiting where no backend needs to be told: True when settled,
        False when `settle()` must be awaited."""
        if admission.settled:
            return True
        if _charge(admission, tokens) == 0 and admission.stream_lease is None:
            admission.settled = True
            return True
        return False

    async def aclose(self) -> None:
        """Releases connections; the limiter is not used afterwards."""

    @abstractmethod
    async def _admit(self, key_id: str, limits: KeyLimits, *, stream: bool) -> Admission: ...

    @abstractmethod
    async def _settle(self, admission: Admission, tokens: int) -> None: ...


def build_rate_limiter(config: LimitsConfig, *, lease_ttl_s: float) -> RateLimiter:
    """The limiter `config.backend` names. `lease_ttl_s`: how long a stream slot is held at
    most when `settle()` never comes (the longest a stream may run, plus a margin)."""
    if config.backend == "redis":
        return RedisRateLimiter(config.redis_url, lease_ttl_s=lease_ttl_s)
    return MemoryRateLimiter(lease_ttl_s=lease_ttl_s)


def _refused(
    key_id: str, reason: str, retry_after_s: float, limits: KeyLimits
) -> ResourceExhausted:
    # Rounded up, so waiting as long as the message says is always enough.
    shown = f"{math.ceil(retry_after_s * 10) / 10:.1f}"
    if reason == REASON_REQUESTS:
        what = f"exceeded {limits.requests_per_minute} requests per minute; retry in {shown} s"
    elif reason == REASON_TOKENS:
        what = f"exceeded {limits.tokens_per_minute} tokens per minute; retry in {shown} s"
    else:
        what = (
            f"has {limits.concurrent_streams} concurrent streams open, its limit; "
            "retry when one ends"
        )
    return ResourceExhausted(
        f"API key {key_id} {what}",
        subject=f"api-key:{key_id}",
        retry_after_s=retry_after_s,
        reason=reason,
    )


# --- memory ---------------------------------------------------------------------------------


def _level(level: float, at: float | None, capacity: int, now: float) -> float:
    """A bucket's balance at `now`; a bucket never charged (`at` None) is full."""
    if at is None:
        return float(capacity)
    return min(float(capacity), level + max(0.0, now - at) * capacity / 60.0)


def _full_again_at(level: float, capacity: int, now: float) -> float:
    return now + (capacity - level) * 60.0 / capacity


@dataclass(slots=True)
class _KeyState:
    requests: float = 0.0
    requests_at: float | None = None
    tokens: float = 0.0
    tokens_at: float | None = None
    # Stream slot id -> when it expires.
    leases: dict[str, float] = field(default_factory=dict)
    # From then on (with no slot held) both buckets are full: the state equals a fresh one.
    idle_at: float = 0.0


class MemoryRateLimiter(RateLimiter):
    """Counters in this process. Every call is O(1) (plus the key's stream slots) and needs no
    lock: nothing awaits between reading and writing a key's state on one event loop."""

    # Keys looked at per call for an idle state to drop: memory stays bounded by the keys in
    # use, without a sweeper task.
    _SWEEP_PER_CALL = 2

    def __init__(self, *, lease_ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._lease_ids = itertools.count(1)

    def __len__(self) -> int:
        """Keys with state held (for tests and debugging)."""
        return len(self._keys)

    def admit_nowait(self, key_id: str, limits: KeyLimits, *, stream: bool) -> Admission:
        admission = super().admit_nowait(key_id, limits, stream=stream)
        return self._admit_now(key_id, limits, stream=stream) if admission is None else admission

    def settle_nowait(self, admission: Admission, tokens: int) -> bool:
        if not super().settle_nowait(admission, tokens):
            admission.settled = True
            self._settle_now(admission, _charge(admission, tokens))
        return True

    async def _admit(self, key_id: str, limits: KeyLimits, *, stream: bool) -> Admission:
        return self._admit_now(key_id, limits, stream=stream)

    async def _settle(self, admission: Admission, tokens: int) -> None:
        self._settle_now(admission, tokens)

    def _admit_now(self, key_id: str, limits: KeyLimits, *, stream: bool) -> Admission:
        now = self._clock()
        self._sweep(now)
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()

        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        slots = limits.concurrent_streams if stream else None
        requests = 0.0
        if rpm is not None:
            requests = _level(state.requests, state.requests_at, rpm, now)
            if requests < 1:
                raise _refused(key_id, REASON_REQUESTS, (1 - requests) * 60 / rpm, limits)
        if tpm is not None:
            tokens = _level(state.tokens, state.tokens_at, tpm, now)
            if tokens <= 0:
                # Until one whole token is back: the balance is then positive for sure.
                raise _refused(key_id, REASON_TOKENS, (1 - tokens) * 60 / tpm, limits)
        if slots is not None:
            if state.leases:
                state.leases = {k: exp for k, exp in state.leases.items() if exp > now}
            if len(state.leases) >= slots:
                raise _refused(key_id, REASON_STREAMS, STREAM_RETRY_AFTER_S, limits)

        lease = None
        if rpm is not None:
            state.requests, state.requests_at = requests - 1, now
            state.idle_at = max(state.idle_at, _full_again_at(requests - 1, rpm, now))
        if slots is not None:
            lease = str(next(self._lease_ids))
            state.leases[lease] = now + self._lease_ttl_s
        return Admission(key_id, stream_lease=lease, tokens_per_minute=tpm)

    def _settle_now(self, admission: Admission, tokens: int) -> None:
        now = self._clock()
        state = self._keys.get(admission.key_id)
        if state is None:  # dropped while idle (no slot held): a fresh state is equivalent
            state = self._keys[admission.key_id] = _KeyState()
        if admission.stream_lease is not None:
            state.leases.pop(admission.stream_lease, None)
        tpm = admission.tokens_per_minute
        if tpm is not None and tokens > 0:
            balance = _level(state.tokens, state.tokens_at, tpm, now) - tokens
            state.tokens, state.tokens_at = balance, now
            state.idle_at = max(state.idle_at, _full_again_at(balance, tpm, now))

    def _sweep(self, now: float) -> None:
        """Looks at the oldest few keys: drops the idle ones, moves the others to the back, so
        every key is looked at again after about len/_SWEEP_PER_CALL calls."""
        for _ in range(min(self._SWEEP_PER_CALL, len(self._keys))):
            key_id = next(iter(self._keys))
            state = self._keys.pop(key_id)
            if now < state.idle_at or (
                state.leases and any(exp > now for exp in state.leases.values())
            ):
                self._keys[key_id] = state


def _check_limits(limits: KeyLimits) -> None:
    for value in (limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_streams):
        if value is not None and value < 1:
            raise ValueError(f"rate limits must be None or at least 1, not {value}")


def _charge(admission: Admission, tokens: int) -> int:
    """The tokens to debit when `admission` is settled: none unless tokens are counted."""
    return max(0, tokens) if admission.tokens_per_minute is not None else 0


# --- redis ----------------------------------------------------------------------------------

# Shared by both scripts. Time comes from Redis, so every gateway host agrees on it; a Lua
# number passed to redis.call is formatted with full precision explicitly (`%.17g`), and
# fractional values are returned as strings (Redis truncates a returned Lua number).
_LUA_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function num(x) return string.format('%.17g', x) end
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  local elapsed = now - tonumber(v[2])
  if elapsed < 0 then elapsed = 0 end
  return math.min(cap, tonumber(v[1]) + elapsed * cap / 60)
end
local function store(key, cap, l)
  redis.call('HSET', key, 'l', num(l), 't', num(now))
  -- Once full again the bucket equals a missing one: let it vanish then.
  redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + 1000)
end
"""

# KEYS: requests bucket, tokens bucket, stream slots. ARGV: rpm, tpm, max streams (0: not
# limited or not a stream), slot id, slot ttl in seconds. Returns {} or {reason, retry after}.
_ADMIT_LUA = (
    _LUA_PRELUDE
    + """
local rpm, tpm, slots = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local req = 0
if rpm > 0 then
  req = level(KEYS[1], rpm)
  if req < 1 then return {'RATE_LIMIT_REQUESTS', num((1 - req) * 60 / rpm)} end
end
if tpm > 0 then
  local tok = level(KEYS[2], tpm)
  if tok <= 0 then return {'RATE_LIMIT_TOKENS', num((1 - tok) * 60 / tpm)} end
end
if slots > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', num(now))
  if redis.call('ZCARD', KEYS[3]) >= slots then return {'RATE_LIMIT_STREAMS', '1'} end
end
if rpm > 0 then store(KEYS[1], rpm, req - 1) end
if slots > 0 then
  local ttl = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[3], num(now + ttl), ARGV[4])
  redis.call('PEXPIRE', KEYS[3], math.ceil(ttl * 1000) + 1000)
end
return {}
"""
)

# KEYS: tokens bucket, stream slots. ARGV: tpm (0: not counted), tokens used, slot id ('').
_SETTLE_LUA = (
    _LUA_PRELUDE
    + """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
local tpm, used = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and used > 0 then store(KEYS[1], tpm, level(KEYS[1], tpm) - used) end
return 1
"""
)


def describe_redis_url(url: str) -> str:
    """`redis at host:port` for messages and logs: the URL itself may carry a password."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"redis at {parts.path}"
        return f"redis at {parts.hostname or 'localhost'}:{parts.port or 6379}"
    except ValueError:  # a malformed port: say nothing more of the URL
        return "redis (malformed URL)"


class RedisRateLimiter(RateLimiter):
    """Counters in Redis, shared by every gateway process that uses the same server.

    Each admit and each settle is one Lua script run (EVALSHA; loaded again when Redis has
    lost it), so concurrent calls from any number of processes never double-count. A key's
    counters live under `pluggably:rl:{<key id>}:…`: the braces are a Redis Cluster hash tag
    that keeps them in one slot, as a multi-key script needs. Idle counters expire.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_ttl_s: float,
        timeout_s: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError
        except ImportError:
            raise RuntimeError(
                "limits.backend is 'redis' but the redis package is not installed: "
                "pip install 'pluggably[redis]'"
            ) from None
        self._where = describe_redis_url(url)
        password = urlsplit(url).password or ""
        # Both spellings: redis-py percent-decodes the URL's password before it uses it.
        self._secrets = [p for p in {password, unquote(password)} if p]
        self._lease_ttl_s = lease_ttl_s
        # Bounded pool: a burst of calls waits for a connection instead of opening thousands.
        # One immediate retry on a broken connection (a restarted Redis); none on a timeout,
        # where the script may have run already. redis-py's default (10 retries with backoff)
        # would hold every call for seconds while Redis is down.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
        )
        self._redis: Any = aioredis.Redis.from_pool(pool)
        self._admit_script = self._redis.register_script(_ADMIT_LUA)
        self._settle_script = self._redis.register_script(_SETTLE_LUA)
        self._failing = False

    @staticmethod
    def _keys(key_id: str) -> list[str]:
        base = f"pluggably:rl:{{{key_id}}}"
        return [f"{base}:req", f"{base}:tok", f"{base}:streams"]

    async def _admit(self, key_id: str, limits: KeyLimits, *, stream: bool) -> Admission:
        slots = limits.concurrent_streams if stream else None
        lease = uuid.uuid4().hex if slots is not None else None
        result = await self._run(
            self._admit_script,
            self._keys(key_id),
            [
                limits.requests_per_minute or 0,
                limits.tokens_per_minute or 0,
                slots or 0,
                lease or "",
                self._lease_ttl_s,
            ],
        )
        if result:
            reason, retry_after = result[0].decode(), float(result[1])
            raise _refused(key_id, reason, retry_after, limits)
        return Admission(key_id, stream_lease=lease, tokens_per_minute=limits.tokens_per_minute)

    async def _settle(self, admission: Admission, tokens: int) -> None:
        _, tok, streams = self._keys(admission.key_id)
        try:
            await self._run(
                self._settle_script,
                [tok, streams],
                [admission.tokens_per_minute or 0, tokens, admission.stream_lease or ""],
            )
        except Unavailable:
            pass  # logged by _run; the slot expires by itself, the tokens go uncharged

    async def _run(self, script: Any, keys: list[str], args: list[object]) -> Any:
        from redis.exceptions import RedisError

        try:
            result = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            if not self._failing:
                self._failing = True
                log.error(
                    "rate limiter: %s failed (%s: %s); refusing rate-limited calls until it "
                    "answers again",
                    self._where,
                    type(exc).__name__,
                    self._redact(str(exc)),
                )
            # Fail closed: limits are what stands between a leaked or runaway key and the
            # operator's provider bill and GPUs; serving unlimited while Redis is down would
            # turn a Redis outage into exactly that. Callers get a retryable UNAVAILABLE.
            raise Unavailable(
                "rate limits cannot be checked right now (the rate limiter's store is "
                "unreachable); retry later",
                reason=REASON_UNAVAILABLE,
                retry_after_s=1.0,
            ) from None
        if self._failing:
            self._failing = False
            log.warning("rate limiter: %s answers again", self._where)
        return result

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def aclose(self) -> None:
        await self._redis.aclose()
