"""The small, transport-free steps of the interceptor stack.

`GatewayInterceptor` runs every RPC through an ordered list of hooks: `start` in order before the
handler (auth, limits; a hook refuses the call by raising a domain error, which is mapped to a
status like any other), `finish` in reverse order after the call ended, successful or not, with
`ctx.code` and `ctx.reason` set (releasing what `start` took, ending a trace span). Hooks that
only record what happened (access log, metrics) implement `observe` instead: it runs off the
call's path, in batches (`CallObservers`). Hooks see a `RequestContext` and the request metadata,
never a grpc object, so each is tested on its own and the same hooks can serve another transport.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Awaitable, Mapping, Sequence

from pluggably.core.context import RequestContext

log = logging.getLogger(__name__)


class CallHook:
    """One concern of every RPC. Subclasses override what they need."""

    # True for a hook whose `start` has nothing to do for unary calls: it is not run for them.
    starts_streams_only = False

    # `start` and `finish` may be plain functions or coroutine functions (or return an
    # awaitable only when they have something to await): a coroutine per hook and call is a
    # cost every RPC pays, and most hooks have nothing to await.

    def start(self, ctx: RequestContext, metadata: Mapping[str, str]) -> Awaitable[None] | None:
        """Before the handler. Raise a `PluggablyError` to refuse the call."""
        return None

    def finish(self, ctx: RequestContext) -> Awaitable[None] | None:
        """After the call, whatever its outcome, on the call's path; must not raise."""
        return None

    def observe(self, ctx: RequestContext) -> None:
        """After the call, off its path: up to `CallObservers.interval_s` later, in a batch with
        other calls, possibly from another thread. `ctx` is final (`ctx.ended` is set) and must
        only be read. For work that records what happened and changes nothing about the call."""


def overrides(hook: CallHook, phase: str) -> bool:
    """Whether `hook` implements `phase` (start, finish, observe) rather than inheriting the
    no-op: calling an inherited no-op still costs a coroutine or a call per RPC."""
    return getattr(type(hook), phase) is not getattr(CallHook, phase)


# Every live set of observers, so a scrape, a test or shutdown can bring them all up to date.
_live: weakref.WeakSet[CallObservers] = weakref.WeakSet()


class CallObservers:
    """Runs the `observe` of `hooks` for ended calls, in batches.

    Why batches: in a serving process each call's own path runs with cold caches (the event loop,
    grpc and the handler run in between), where recording a call cost about three times what the
    same code costs run back to back (bench/bench_overhead.py). A call now pays for appending
    itself to a list; the access log lines and metrics of all calls ended in the last
    `interval_s` are written together, hook by hook.

    `drain()` may be called from any thread (a metrics scrape drains first, so it sees every
    call that has ended); batches are processed one at a time, in order.
    """

    def __init__(
        self, hooks: Sequence[CallHook], *, interval_s: float = 0.2, max_pending: int = 512
    ) -> None:
        self.hooks = tuple(h for h in hooks if overrides(h, "observe"))
        self.interval_s = interval_s
        self.max_pending = max_pending
        self._pending: list[RequestContext] = []
        # Held only to swap or append to the list. `_processing` keeps batches in order; it is
        # reentrant because an observer may itself drain (a log handler reading the access log).
        self._pending_lock = threading.Lock()
        self._processing = threading.RLock()
        _live.add(self)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def submit(self, ctx: RequestContext) -> None:
        """Queues an ended call; on the event loop."""
        with self._pending_lock:
            pending = self._pending
            pending.append(ctx)
        if len(pending) == 1:
            asyncio.get_running_loop().call_later(self.interval_s, self.drain)
        elif len(pending) == self.max_pending:  # once per batch, however long the loop is busy
            asyncio.get_running_loop().call_soon(self.drain)

    def drain(self) -> None:
        """Observes every queued call now."""
        with self._processing:
            with self._pending_lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            for hook in self.hooks:
                observe = hook.observe
                for ctx in batch:
                    try:
                        observe(ctx)
                    except Exception:  # a broken observer must not lose the others' records
                        log.exception("hook %s failed to observe a call", type(hook).__name__)


def drain_observers() -> None:
    """Brings every access log and metric up to date with the calls ended so far."""
    for observers in list(_live):
        observers.drain()
