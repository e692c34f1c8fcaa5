"""Hooks that record calls (access log, metrics) run off the call's path, in batches: every
ended call is observed exactly once, in order, soon after it ended, also when a scrape drains
from another thread meanwhile, and one broken observer costs the others nothing."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import pytest

from pluggably.api.hooks import CallHook, CallObservers, drain_observers
from pluggably.api.interceptors import GatewayInterceptor
from pluggably.core.context import RequestContext

METHOD = "/pluggably.v1.ModelService/GetModel"


class Recorder(CallHook):
    def __init__(self) -> None:
        self.seen: list[RequestContext] = []
        self.threads: set[str] = set()

    def observe(self, ctx: RequestContext) -> None:
        self.seen.append(ctx)
        self.threads.add(threading.current_thread().name)


class Broken(CallHook):
    def observe(self, ctx: RequestContext) -> None:
        raise RuntimeError("observer bug")


def ended(n: int) -> list[RequestContext]:
    calls = [RequestContext(request_id=str(i), method=METHOD) for i in range(n)]
    for ctx in calls:
        ctx.ended = time.perf_counter()
    return calls


async def test_calls_are_observed_in_one_batch_after_the_interval() -> None:
    recorder = Recorder()
    observers = CallObservers([recorder], interval_s=0.05)
    calls = ended(5)
    for ctx in calls:
        observers.submit(ctx)
    assert recorder.seen == []  # nothing on the calls' path
    await asyncio.sleep(0.2)
    assert recorder.seen == calls


async def test_a_full_batch_is_observed_without_waiting_for_the_interval() -> None:
    recorder = Recorder()
    observers = CallObservers([recorder], interval_s=3600, max_pending=10)
    calls = ended(10)
    for ctx in calls:
        observers.submit(ctx)
    await asyncio.sleep(0)
    assert recorder.seen == calls


async def test_a_broken_observer_loses_nothing_of_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, last = Recorder(), Recorder()
    observers = CallObservers([first, Broken(), last], interval_s=3600)
    calls = ended(3)
    for ctx in calls:
        observers.submit(ctx)
    with caplog.at_level(logging.ERROR, logger="pluggably.api.hooks"):
        observers.drain()
    assert first.seen == calls and last.seen == calls
    assert sum("Broken failed to observe" in r.getMessage() for r in caplog.records) == 3


def test_only_hooks_that_observe_are_kept() -> None:
    class StartsOnly(CallHook):
        async def start(self, ctx, metadata) -> None:  # type: ignore[no-untyped-def]
            return None

    recorder = Recorder()
    observers = CallObservers([StartsOnly(), recorder])
    assert observers.hooks == (recorder,)
    assert not CallObservers([StartsOnly()])


async def test_draining_from_another_thread_observes_each_call_exactly_once() -> None:
    """A metrics scrape drains from its own thread while the loop keeps submitting."""
    recorder = Recorder()
    observers = CallObservers([recorder], interval_s=3600, max_pending=10**9)
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            observers.drain()

    thread = threading.Thread(target=scraper, name="scraper")
    thread.start()
    calls = ended(20000)
    try:
        for i, ctx in enumerate(calls):
            observers.submit(ctx)
            if i % 500 == 0:
                await asyncio.sleep(0.001)  # lets the other thread run
    finally:
        stop.set()
        thread.join()
    observers.drain()
    assert len(recorder.seen) == len(calls)
    assert [ctx.request_id for ctx in recorder.seen] == [ctx.request_id for ctx in calls]
    assert "scraper" in recorder.threads  # the other thread did take batches


async def test_the_interceptor_records_the_end_of_the_call_not_of_the_batch() -> None:
    recorder = Recorder()
    interceptor = GatewayInterceptor([recorder])

    async def handler(request: bytes, context: object) -> bytes:
        return request

    async def continuation(_details: object) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(handler)

    class Details:
        method = METHOD
        invocation_metadata = ()

    class Context:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

        async def send_initial_metadata(self, metadata: object) -> None:
            return None

    wrapped = await interceptor.intercept_service(continuation, Details())  # type: ignore[arg-type]
    assert wrapped is not None and wrapped.unary_unary is not None
    before = time.perf_counter()
    assert await wrapped.unary_unary(b"x", Context()) == b"x"
    after = time.perf_counter()
    assert recorder.seen == []
    drain_observers()
    (ctx,) = recorder.seen
    assert before <= ctx.started <= ctx.ended <= after
    assert ctx.code == "OK" and ctx.method == METHOD
