#!/usr/bin/env python3
"""What auth, rate limits, metrics and the access log add to one unary call (target < 100 µs).

Three measurements, each interleaved round by round so machine drift hits every variant alike:

1. **Hook chain, in process**: the gateway's interceptor wrapping a trivial unary handler, called
   directly (no network), with (a) no hooks, (b) each hook alone, (c) the whole default chain
   (access log to a JSON handler writing to /dev/null, metrics, API key check against a real
   SQLite store, stream cap, rate limits with a requests-per-minute budget). The difference
   (c) - (a) is what the operational surface costs per call; the access log and metrics of a
   round's calls (written in batches, off the calls' path) are written before its clock stops.
2. **A real gateway process, one call at a time**: gateways on loopback serving `GetModel` from
   config, bare (auth, metrics and access log off) and with the defaults, three processes each;
   the server's CPU time per call from /proc. Idle between calls, every call starts with cold
   caches: the worst case per call.
3. **The same processes loaded**: 8 calls in flight, the server never idle.

    python bench/bench_overhead.py           # ~2 minutes
    python bench/bench_overhead.py --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluggably.api.hooks import CallHook, drain_observers
from pluggably.api.interceptors import GatewayInterceptor
from pluggably.config import KeyLimitsConfig, LoggingConfig
from pluggably.core.context import KeyLimits
from pluggably.devtools.envoy import free_port
from pluggably.observability.logging import AccessLogHook, configure_logging
from pluggably.observability.metrics import MetricsHook
from pluggably.security.hooks import AuthHook, RateLimitHook, StreamCapHook
from pluggably.security.keys import KeyStore
from pluggably.security.ratelimit import MemoryRateLimiter
from pluggably.v1 import model_service_pb2, model_service_pb2_grpc

METHOD = "/pluggably.v1.ModelService/GetModel"
MODEL = "openai/gpt-4o-mini"
BARE = "bare (no auth, metrics, log)"
ALL = "defaults (auth, limits, metrics, log)"
TARGET_US = 100.0
# Calls in flight at once for the loaded measurement.
LOADED_CLIENTS = 8


class _Context:
    """The parts of grpc.aio.ServicerContext the interceptor uses, as cheap as they can be."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    async def send_initial_metadata(self, metadata: Any) -> None:
        return None

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, *args: Any) -> None:
        raise RuntimeError("the bench call was refused")


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


async def _handler(request: Any, context: Any) -> Any:
    return request


def _chain(variant: str, store: KeyStore) -> list[CallHook]:
    limits = KeyLimitsConfig(requests_per_minute=10**9)
    hooks: dict[str, Callable[[], list[CallHook]]] = {
        "none": lambda: [],
        "access log": lambda: [AccessLogHook(LoggingConfig())],
        "metrics": lambda: [MetricsHook()],
        "auth": lambda: [AuthHook(store)],
        "rate limit": lambda: [RateLimitHook(MemoryRateLimiter(lease_ttl_s=660), limits)],
        "all (default chain)": lambda: [
            AccessLogHook(LoggingConfig()),
            MetricsHook(),
            AuthHook(store),
            StreamCapHook(256),
            RateLimitHook(MemoryRateLimiter(lease_ttl_s=660), limits),
        ],
    }
    return hooks[variant]()


async def hook_chain(rounds: int, calls: int) -> dict[str, list[float]]:
    """µs per call for each variant, one sample per round."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    store = KeyStore(workdir / "keys.db")
    key, _ = store.create("bench", ["admin"], limits=KeyLimits(requests_per_minute=10**9))
    context = _Context((("authorization", f"Bearer {key}"), ("user-agent", "bench")))
    variants = ["none", "access log", "metrics", "auth", "rate limit", "all (default chain)"]
    wrapped = {}
    for variant in variants:
        interceptor = GatewayInterceptor(_chain(variant, store))
        handler = grpc.unary_unary_rpc_method_handler(_handler)

        async def continuation(_details: Any, handler: Any = handler) -> Any:
            return handler

        details = _Details(METHOD, ())
        rewrapped = await interceptor.intercept_service(continuation, details)
        wrapped[variant] = rewrapped.unary_unary
    samples: dict[str, list[float]] = {v: [] for v in variants}
    request = model_service_pb2.GetModelRequest(id="bench/m")
    for _ in range(rounds):
        for variant in variants:
            call = wrapped[variant]
            start = time.perf_counter()
            for _ in range(calls):
                await call(request, context)
            drain_observers()  # the access log and metrics of these calls, written in batches
            samples[variant].append((time.perf_counter() - start) / calls * 1e6)
    store.close()
    return samples


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _serving(port: int, process: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            if process.poll() is not None:
                raise RuntimeError("a gateway exited during start-up")
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
    raise RuntimeError("a gateway never answered its health check")


async def end_to_end(
    rounds: int, calls: int, *, per_hook: bool, replicas: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Real gateway processes, bare and with the default hooks (and, `per_hook`, one hook at a
    time): latency and server CPU per call, µs, with one call at a time; and server CPU per call
    with `LOADED_CLIENTS` calls in flight."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-e2e-"))
    store = KeyStore(workdir / "keys.db")
    key, _ = store.create("bench", ["admin"])
    store.close()
    # A hosted model answered from config: GetModel touches no network and no model.
    provider = {
        "openai": {
            "base_url": "http://127.0.0.1:9/v1",
            "api_key": "sk-bench-not-used-0000",
            "models": [{"name": MODEL.split("/", 1)[1]}],
            "list_models": False,
        }
    }
    bare = {"auth": {"enabled": False}, "metrics": {"enabled": False}}
    quiet = {"logging": {"access_log": False}}
    auth = {"auth": {"store": str(workdir / "keys.db")}}
    limits = {"limits": {"per_key": {"requests_per_minute": 10**9}}}
    metrics = {"metrics": {"port": 0}}
    variants = {
        BARE: {**bare, **quiet},
        "+ access log": bare,
        "+ metrics": {**bare, **quiet, **metrics},
        "+ auth": {**bare, **quiet, **auth},
        "+ rate limit": {**bare, **quiet, **limits},
        ALL: {**auth, **metrics, **limits},
    }
    if not per_hook:
        variants = {name: variants[name] for name in (BARE, ALL)}
    # Each variant runs in `replicas` processes: speed differs from process to process (memory
    # layout), by as much as the hooks cost, so one process per variant would mislead.
    processes: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
    stubs = {}
    channels = []
    try:
        for name, sections, replica in (
            (n, v, r) for r in range(replicas) for n, v in variants.items()
        ):
            port = free_port()
            config = workdir / f"{len(processes)}.yaml"
            config.write_text(
                yaml.safe_dump({"server": {"port": port}, "providers": provider, **sections})
            )
            # The access log is written for real, to a file, as a deployment writes it.
            log = (workdir / f"{len(processes)}.log").open("wb")
            processes[name, replica] = subprocess.Popen(  # noqa: ASYNC220 - start-up, not measured
                [sys.executable, "-m", "pluggably", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                # One hash seed for all: dict layouts, and with them speed, differ by seed.
                env={
                    **{k: v for k, v in os.environ.items() if not k.startswith("PLUGGABLY_")},
                    "PYTHONHASHSEED": "0",
                },
            )
            log.close()
            await _serving(port, processes[name, replica])
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            channels.append(channel)
            stubs[name, replica] = model_service_pb2_grpc.ModelServiceStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)
        request = model_service_pb2.GetModelRequest(id=MODEL)
        latency: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        loaded_cpu: dict[str, list[float]] = {name: [] for name in variants}
        for stub in stubs.values():  # warm up both
            for _ in range(100):
                await stub.GetModel(request, metadata=metadata)

        async def client(stub: Any, n: int) -> None:
            for _ in range(n):
                await stub.GetModel(request, metadata=metadata)

        for _ in range(rounds):
            for (name, replica), stub in stubs.items():
                pid = processes[name, replica].pid
                cpu_before, start = _proc_cpu_s(pid), time.perf_counter()
                await client(stub, calls)
                latency[name].append((time.perf_counter() - start) / calls * 1e6)
                cpu[name].append((_proc_cpu_s(pid) - cpu_before) / calls * 1e6)
                # Loaded: calls overlap, the server is never idle, its caches stay warm.
                cpu_before = _proc_cpu_s(pid)
                per_client = calls // LOADED_CLIENTS
                async with asyncio.TaskGroup() as group:
                    for _ in range(LOADED_CLIENTS):
                        group.create_task(client(stub, per_client))
                done = per_client * LOADED_CLIENTS
                loaded_cpu[name].append((_proc_cpu_s(pid) - cpu_before) / done * 1e6)
        return latency, cpu, loaded_cpu
    finally:
        for channel in channels:
            await channel.close()
        for process in processes.values():
            process.terminate()
            process.wait(10)


def _print(title: str, samples: dict[str, list[float]], baseline: str) -> float:
    base = statistics.median(samples[baseline])
    print(f"\n{title}")
    print(f"  {'variant':40s} {'µs/call (median)':>17s} {'added µs':>9s} {'min':>8s} {'max':>8s}")
    added_total = 0.0
    for name, values in samples.items():
        median = statistics.median(values)
        added = median - base
        added_total = added
        print(f"  {name:40s} {median:17.1f} {added:9.1f} {min(values):8.1f} {max(values):8.1f}")
    return added_total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    parser.add_argument(
        "--per-hook",
        action="store_true",
        help="also a gateway per hook alone (twelve processes instead of six: colder caches)",
    )
    args = parser.parse_args(argv)
    # The access log is emitted for real, as JSON, to a handler that discards it: formatting
    # and redaction are the cost being measured, not the terminal.
    configure_logging(LoggingConfig())
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open("/dev/null", "w"))  # lives as long as the run
    rounds, calls = (5, 200) if args.quick else (15, 2000)
    chain = asyncio.run(hook_chain(rounds, calls))
    added = _print(
        f"Hook chain in process ({rounds} rounds x {calls} calls, interleaved)", chain, "none"
    )
    e2e_rounds, e2e_calls = (3, 200) if args.quick else (10, 1000)
    replicas = 1 if args.quick else 3
    e2e_latency, e2e_cpu, e2e_loaded = asyncio.run(
        end_to_end(e2e_rounds, e2e_calls, per_hook=args.per_hook, replicas=replicas)
    )
    title = (
        f"({e2e_rounds} rounds x {e2e_calls} calls, {replicas} processes per variant, interleaved)"
    )
    _print(
        f"GetModel over gRPC to a gateway process: latency, one call at a time {title}",
        e2e_latency,
        BARE,
    )
    sequential = _print(
        f"GetModel over gRPC: server CPU per call, one call at a time {title}", e2e_cpu, BARE
    )
    loaded = _print(
        f"GetModel over gRPC: server CPU per call, {LOADED_CLIENTS} calls in flight {title}",
        e2e_loaded,
        BARE,
    )

    def verdict(value: float) -> str:
        return f"{value:.1f} µs ({'met' if value < TARGET_US else 'NOT met'})"

    print(
        f"\nTarget: auth + limits + metrics + access log add < {TARGET_US:.0f} µs per unary call."
        f"\n  hook chain in process: {verdict(added)}"
        f"\n  server CPU per call in a gateway process, loaded: {verdict(loaded)}"
        f"\n  server CPU per call in a gateway process, one call at a time (idle between "
        f"calls, so every call starts with cold caches): {verdict(sequential)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
