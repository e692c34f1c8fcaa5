"""Admission to a local model: a bounded queue that is fair across API keys.

A local model runs `max_concurrency` requests at once and lets at most `max_queue` more wait.
Admission is the first thing a request does, before the model loads or the prompt is tokenized,
so refusing a request under overload costs microseconds rather than the work it would have done.

Fairness is per tenant (the caller's API key id; calls without a principal share one anonymous
tenant), in two places:

- Serving: waiters are kept per tenant and a freed slot goes to the next tenant in round-robin
  order, so a tenant with fifty queued requests gets one turn in each round like a tenant with one.
  A slot is handed straight from the request that releases it to the chosen waiter, and a request
  that arrives while others wait always queues behind them: the client whose request just finished
  gains nothing by coming back at once.
- Queueing: when the queue is full, a newcomer whose tenant holds less than its fair share of the
  waiting places (`max_queue` / tenants waiting, its own counted) takes the place of the newest
  waiter of the tenant holding the most; that waiter is refused instead. A flood from one key
  thus cannot lock the others out of the queue.

  One refinement of that rule: when the swap would only leave the two tenants trading places
  (the victim's tenant holds just one waiter more than the newcomer's), it happens only if the
  victim's tenant was granted a slot more recently than the newcomer's. Without it, many tenants
  holding one waiter each would churn: every newcomer would evict the previous newcomer, and the
  place would go to whoever happened to arrive last before a slot freed. With it, a tenant is
  displaced only by tenants that have gone longer without service, so a tenant that keeps
  retrying is refused at most once per tenant served before it, never indefinitely.

Everything here runs on the event loop thread; a permit is released there too (a worker thread
hands the release over with `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType

from pluggably.core import context
from pluggably.core.errors import ResourceExhausted
from pluggably.observability import metrics

#: Service time assumed until the first permit has been released (seconds per request).
DEFAULT_SERVICE_S = 1.0
#: Weight of the newest sample in the moving average of service times.
_SERVICE_EWMA_WEIGHT = 0.2
#: Bounds of the retry hint given with a refusal (seconds).
MIN_RETRY_AFTER_S = 0.1
MAX_RETRY_AFTER_S = 60.0
#: How many tenants' last grant the queue remembers. Forgetting the oldest entries is harmless:
#: a forgotten tenant ranks as "never served", which is where it ranked among the remembered
#: ones anyway (it was served longest ago).
_GRANT_MEMORY = 4096

# What a waiter's future resolves to.
_GRANTED = "granted"
_EVICTED = "evicted"
_TIMED_OUT = "timed out"

Tenant = str | None


class _Waiter:
    __slots__ = ("enqueued_at", "future", "tenant", "timer")

    def __init__(self, tenant: Tenant, future: asyncio.Future[str], now: float) -> None:
        self.tenant = tenant
        self.future = future
        self.enqueued_at = now
        self.timer: asyncio.TimerHandle | None = None


class Permit:
    """The right to run one request on the model. Release it exactly once, on the loop thread;
    further calls are no-ops, so an error path can release defensively."""

    __slots__ = ("_granted_at", "_queue", "_released")

    def __init__(self, queue: AdmissionQueue, granted_at: float) -> None:
        self._queue = queue
        self._granted_at = granted_at
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._queue._permit_released(self._granted_at)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class AdmissionQueue:
    """Concurrency limit plus a bounded, per-key fair waiting queue for one local model.

    `acquire()` returns a `Permit` at once when a slot is free and nobody waits; otherwise the
    caller waits (at most `queue_timeout_s`) or is refused with `ResourceExhausted`
    (`MODEL_QUEUE_FULL`, `MODEL_QUEUE_TIMEOUT`) carrying a retry hint. Cancelling a waiting caller
    removes it from the queue; a slot granted to a caller cancelled at the same moment is passed
    on. Costs: O(1) to admit, grant and release; O(waiting tenants) to pick an eviction victim
    when the queue is full, and O(waiters of one tenant) to drop a cancelled waiter.
    """

    def __init__(
        self,
        model_id: str,
        *,
        max_concurrency: int,
        max_queue: int,
        queue_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if not (queue_timeout_s > 0 and math.isfinite(queue_timeout_s)):
            raise ValueError("queue_timeout_s must be a positive number of seconds")
        self.model_id = model_id
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._clock = clock
        self._running = 0
        self._waiting = 0
        # Tenants with waiters, in round-robin order: the first is served next.
        self._rotation: collections.OrderedDict[Tenant, collections.deque[_Waiter]] = (
            collections.OrderedDict()
        )
        # Tenant -> number of the grant it last received; ordered oldest grant first.
        self._last_grant: collections.OrderedDict[Tenant, int] = collections.OrderedDict()
        self._grants = itertools.count(1)
        self._service_s = DEFAULT_SERVICE_S
        self._served = 0
        metrics.set_queue_depth(model_id, 0)

    # ---- what tests and metrics read ---------------------------------------------------------

    @property
    def running(self) -> int:
        """Permits held (requests running)."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._waiting

    def waiting_by_tenant(self) -> dict[Tenant, int]:
        return {tenant: len(q) for tenant, q in self._rotation.items()}

    @property
    def service_time_s(self) -> float:
        """Moving average of how long a permit is held (`DEFAULT_SERVICE_S` before any)."""
        return self._service_s

    # ---- admission ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[Permit]:
        """`async with queue.admit() as permit:` holds a slot for the block."""
        permit = await self.acquire()
        try:
            yield permit
        finally:
            permit.release()

    async def acquire(self) -> Permit:
        """Takes a slot for the current request, waiting for one if the queue has room."""
        principal = context.current_principal()
        tenant: Tenant = None if principal is None else principal.key_id
        now = self._clock()
        if not self._rotation and self._running < self.max_concurrency:
            self._running += 1
            self._note_grant(tenant)
            self._record_wait(0.0)
            return Permit(self, now)

        if self._waiting >= self.max_queue and not self._evict_for(tenant):
            raise self._refusal("MODEL_QUEUE_FULL")

        loop = asyncio.get_running_loop()
        waiter = _Waiter(tenant, loop.create_future(), now)
        queue = self._rotation.get(tenant)
        if queue is None:
            queue = self._rotation[tenant] = collections.deque()
        queue.append(waiter)
        self._waiting += 1
        waiter.timer = loop.call_later(self.queue_timeout_s, self._expire, waiter)
        metrics.set_queue_depth(self.model_id, self._waiting)

        try:
            outcome = await waiter.future
        except asyncio.CancelledError:
            # The caller went away. The future may still hold an outcome set just before the
            # cancellation landed: a granted slot must then go to the next waiter.
            if waiter.future.done() and not waiter.future.cancelled():
                if waiter.future.result() == _GRANTED:
                    self._slot_freed()
            else:
                self._remove(waiter)
            raise

        waited = self._clock() - waiter.enqueued_at
        self._record_wait(waited)
        if outcome == _GRANTED:
            return Permit(self, self._clock())
        if outcome == _EVICTED:
            raise self._refusal("MODEL_QUEUE_FULL")
        raise self._refusal("MODEL_QUEUE_TIMEOUT", waited)

    # ---- internals ---------------------------------------------------------------------------

    def _evict_for(self, tenant: Tenant) -> bool:
        """Makes room for a newcomer from `tenant` in a full queue if fairness says so."""
        if not self._rotation:
            return False  # max_queue == 0: nothing waits, nothing to take
        own = self._rotation.get(tenant)
        held = 0 if own is None else len(own)
        tenants = len(self._rotation) + (own is None)
        if held * tenants >= self.max_queue:  # held >= max_queue / tenants: at its share
            return False
        # The tenant holding the most; among equals, the one served most recently.
        victim_tenant, victim_queue = max(
            self._rotation.items(),
            key=lambda item: (len(item[1]), self._last_grant.get(item[0], 0)),
        )
        if len(victim_queue) == held + 1 and self._last_grant.get(
            victim_tenant, 0
        ) < self._last_grant.get(tenant, 0):
            # A swap would only trade places with a tenant served less recently than the
            # newcomer's: refuse the newcomer instead (see the module docstring). Grant numbers
            # are unique, so equality means neither was ever served (here): the rule as stated.
            return False
        victim = victim_queue.pop()  # its newest waiter
        if not victim_queue:
            del self._rotation[victim_tenant]
        self._waiting -= 1
        self._resolve(victim, _EVICTED)
        return True

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._remove(waiter)
            self._resolve(waiter, _TIMED_OUT)

    def _remove(self, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        queue = self._rotation.get(waiter.tenant)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return  # already taken out (granted, evicted or expired)
        if not queue:
            del self._rotation[waiter.tenant]
        self._waiting -= 1
        metrics.set_queue_depth(self.model_id, self._waiting)

    def _resolve(self, waiter: _Waiter, outcome: str) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        waiter.future.set_result(outcome)
        metrics.set_queue_depth(self.model_id, self._waiting)

    def _permit_released(self, granted_at: float) -> None:
        held = max(0.0, self._clock() - granted_at)
        if self._served == 0:
            self._service_s = held
        else:
            self._service_s += _SERVICE_EWMA_WEIGHT * (held - self._service_s)
        self._served += 1
        self._slot_freed()

    def _slot_freed(self) -> None:
        """A running slot ended: hand it to the next waiter in round-robin order, or free it."""
        while self._rotation:
            tenant, queue = next(iter(self._rotation.items()))
            waiter = queue.popleft()
            if queue:
                self._rotation.move_to_end(tenant)
            else:
                del self._rotation[tenant]
            self._waiting -= 1
            if waiter.future.done():  # cannot happen (done waiters leave the queue); be safe
                continue
            self._note_grant(tenant)
            self._resolve(waiter, _GRANTED)
            return
        self._running -= 1

    def _note_grant(self, tenant: Tenant) -> None:
        self._last_grant[tenant] = next(self._grants)
        self._last_grant.move_to_end(tenant)
        if len(self._last_grant) > _GRANT_MEMORY:
            self._last_grant.popitem(last=False)

    def _record_wait(self, seconds: float) -> None:
        metrics.observe_queue_wait(self.model_id, seconds)
        ctx = context.current()
        if ctx is not None:
            ctx.queue_wait_s = seconds

    def retry_after_s(self) -> float:
        """When a refused request is worth retrying: the time the model needs to work through
        what waits now (one more request per `max_concurrency` service times), from the moving
        average of recent service times; rounded up to 0.1 s and kept within sane bounds."""
        estimate = self._service_s * (self._waiting + 1) / self.max_concurrency
        estimate = math.ceil(estimate * 10) / 10
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, estimate))

    def _refusal(self, reason: str, waited_s: float | None = None) -> ResourceExhausted:
        if reason == "MODEL_QUEUE_TIMEOUT":
            message = (
                f"model {self.model_id!r} is busy: the request waited {waited_s:.1f} s in its "
                "queue without being served; retry later"
            )
        else:
            message = f"model {self.model_id!r} has too many queued requests; retry later"
        return ResourceExhausted(
            message,
            subject=self.model_id,
            reason=reason,
            retry_after_s=self.retry_after_s(),
            metadata={"model": self.model_id},
        )
