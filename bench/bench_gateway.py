#!/usr/bin/env python3
"""What the gateway adds to hosted-provider calls: latency, throughput, time to first token,
concurrency, CPU and memory, against the OpenAI stand-in.

Three processes besides this one: the OpenAI stand-in, the gateway (`pluggably-server`,
provider `openai` pointed at the stand-in) and Envoy. The same requests go (a) straight to the
stand-in, (b) through the gateway over native gRPC, (c) through Envoy as REST/SSE; the paths are
interleaved request by request, so drift in machine load hits all of them alike. Prints one
table of the targets of the providers issue and what was measured.

    python bench/bench_gateway.py            # full run (~2 minutes)
    python bench/bench_gateway.py --quick    # fewer samples, for a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc

from pluggably.devtools.envoy import Envoy, free_port
from pluggably.v1 import generate_service_pb2_grpc, generation_pb2, stream_service_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench-0000000000000000"
MODEL = "gpt-4o-mini"
PROMPT = "Tell me a short story about a lighthouse keeper."
OPENAI_BODY = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 256}
REST_BODY = {
    "model": f"openai/{MODEL}",
    "messages": [{"role": "user", "content": PROMPT}],
    "text": {"maxTokens": 256},
}
GRPC_REQUEST = generation_pb2.GenerateRequest(
    model=f"openai/{MODEL}",
    messages=[generation_pb2.ChatMessage(role="user", content=PROMPT)],
    text=generation_pb2.TextOptions(max_tokens=256),
)
STREAM_WORDS = 64
PACE_S = 0.020


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Stack:
    """The stand-in, the gateway and Envoy, each in its own process."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.envoy: Envoy | None = None

    def start(self) -> None:
        standin = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pluggably.devtools.standins",
                "openai",
                "--port",
                "0",
                "--api-key",
                KEY,
                "--words",
                str(STREAM_WORDS),
                "--no-record",
            ],
            stdout=subprocess.PIPE,
        )
        self.processes.append(standin)
        assert standin.stdout is not None
        line = standin.stdout.readline().decode()
        self.standin_url = f"http://127.0.0.1:{int(line.split()[-1])}"
        self.grpc_port = free_port()
        config = self.workdir / "gateway.json"
        config.write_text(
            json.dumps(
                {
                    "server": {"host": "127.0.0.1", "port": self.grpc_port},
                    "logging": {"level": "WARNING"},
                    "providers": {
                        "openai": {
                            "base_url": self.standin_url + "/v1",
                            "api_key": KEY,
                            "list_models": False,
                            "retries": {"max_attempts": 1},
                        }
                    },
                }
            )
        )
        env = {**os.environ, "PLUGGABLY_CONFIG": str(config)}
        self.gateway = subprocess.Popen([sys.executable, "-m", "pluggably"], env=env)
        self.processes.append(self.gateway)
        self._wait_grpc()
        self.idle_rss_mb = proc_rss_mb(self.gateway.pid)
        self.envoy = Envoy(self.grpc_port, self.workdir, log_level="error")
        self.envoy.start()

    def _wait_grpc(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(200):
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                        return
                except grpc.RpcError:
                    time.sleep(0.05)
        raise RuntimeError("the gateway did not start")

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


class Clients:
    def __init__(
        self, stack: Stack, http: aiohttp.ClientSession, channel: grpc.aio.Channel
    ) -> None:
        self.stack = stack
        self.http = http
        self.generate = generate_service_pb2_grpc.GenerateServiceStub(channel).Generate
        self.stream = stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate
        self.direct_url = f"{stack.standin_url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {KEY}"}
        assert stack.envoy is not None
        self.envoy_url = stack.envoy.url

    async def set_pace(self, seconds: float) -> None:
        async with self.http.post(
            f"{self.stack.standin_url}/_standin/default?chunk_delay_s={seconds}",
            json={"text": " ".join(f"w{i}" for i in range(STREAM_WORDS)), "chunks": STREAM_WORDS},
        ) as r:
            r.raise_for_status()

    # ---- unary ----
    async def direct_unary(self) -> float:
        start = time.perf_counter()
        async with self.http.post(self.direct_url, json=OPENAI_BODY, headers=self.headers) as r:
            data = await r.read()
            assert r.status == 200, data
        return time.perf_counter() - start

    async def grpc_unary(self) -> float:
        start = time.perf_counter()
        response = await self.generate(GRPC_REQUEST)
        assert response.text
        return time.perf_counter() - start

    async def rest_unary(self) -> float:
        start = time.perf_counter()
        async with self.http.post(f"{self.envoy_url}/v1/generate", json=REST_BODY) as r:
            data = await r.read()
            assert r.status == 200, data
        return time.perf_counter() - start

    # ---- streams: (time to first token, total, chunks) ----
    async def direct_stream(self) -> tuple[float, float, int]:
        start = time.perf_counter()
        first = None
        events = 0
        async with self.http.post(
            self.direct_url, json={**OPENAI_BODY, "stream": True}, headers=self.headers
        ) as r:
            async for line in r.content:
                if line.startswith(b"data: {") and b'"content":"w' in line:
                    events += 1
                    if first is None:
                        first = time.perf_counter() - start
        assert first is not None
        return first, time.perf_counter() - start, events

    async def grpc_stream(self) -> tuple[float, float, int]:
        start = time.perf_counter()
        first = None
        events = 0
        async for chunk in self.stream(GRPC_REQUEST):
            if chunk.WhichOneof("event") == "text_delta":
                events += 1
                if first is None:
                    first = time.perf_counter() - start
            elif chunk.WhichOneof("event") == "done":
                assert chunk.done.finish_reason == generation_pb2.FINISH_REASON_STOP
        assert first is not None
        return first, time.perf_counter() - start, events

    async def rest_stream(self) -> tuple[float, float, int]:
        start = time.perf_counter()
        first = None
        events = 0
        async with self.http.post(f"{self.envoy_url}/v1/generate:stream", json=REST_BODY) as r:
            async for line in r.content:
                if line.startswith(b"data: ") and b'"textDelta"' in line:
                    events += 1
                    if first is None:
                        first = time.perf_counter() - start
                elif b'"error"' in line:
                    raise RuntimeError(line.decode())
        assert first is not None
        return first, time.perf_counter() - start, events


async def interleaved(
    paths: list[Callable[[], Awaitable[float]]], n: int, warmup: int
) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in paths]
    for i in range(n + warmup):
        for j, path in enumerate(paths):
            value = await path()
            if i >= warmup:
                out[j].append(value)
    return out


async def throughput(
    call: Callable[[], Awaitable[float]], concurrency: int, seconds: float
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            try:
                latencies.append(await call())
            except Exception:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, errors


async def concurrent_streams(
    call: Callable[[], Awaitable[tuple[float, float, int]]], n: int
) -> tuple[list[float], int, int]:
    results = await asyncio.gather(*(call() for _ in range(n)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    incomplete = sum(1 for r in ok if r[2] != STREAM_WORDS)
    errors = len(results) - len(ok)
    return [r[0] for r in ok], errors, incomplete


BARE_GRPC_SERVER = """
import asyncio, sys
import grpc
from pluggably.v1 import generate_service_pb2, generate_service_pb2_grpc

class Canned(generate_service_pb2_grpc.GenerateServiceServicer):
    async def Generate(self, request, context):
        return generate_service_pb2.GenerateResponse(id="x", model="openai/gpt-4o-mini", text="w " * 64)

async def main():
    server = grpc.aio.server()
    generate_service_pb2_grpc.add_GenerateServiceServicer_to_server(Canned(), server)
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""

BARE_AIOHTTP_CLIENT = """
import asyncio, json, resource, sys, time
import aiohttp

async def main(url, key, body, concurrency, seconds):
    async with aiohttp.ClientSession() as http:
        count = 0
        stop_at = time.perf_counter() + seconds
        async def worker():
            nonlocal count
            while time.perf_counter() < stop_at:
                async with http.post(url, json=body, headers={"Authorization": "Bearer " + key}) as r:
                    await r.read()
                count += 1
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        print(cpu / count * 1000)

asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
"""


async def floor_ms(c: Clients, concurrency: int, seconds: float) -> tuple[float, float]:
    """CPU ms per request of the two libraries the gateway is built on, under the same load:
    a grpc.aio server that answers a canned GenerateResponse, and an aiohttp client calling the
    stand-in. Their sum is what the gateway costs before any of its own work."""
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BARE_GRPC_SERVER, stdout=subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        port = int(await server.stdout.readline())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = generate_service_pb2_grpc.GenerateServiceStub(channel).Generate

            async def bare() -> float:
                start = time.perf_counter()
                await call(GRPC_REQUEST)
                return time.perf_counter() - start

            await throughput(bare, concurrency, 1.0)
            before = proc_cpu_s(server.pid)
            _rate, latencies, _errors = await throughput(bare, concurrency, seconds)
            grpc_ms = (proc_cpu_s(server.pid) - before) / max(1, len(latencies)) * 1000
    finally:
        server.terminate()
        await server.wait()
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        BARE_AIOHTTP_CLIENT,
        c.direct_url,
        KEY,
        json.dumps(OPENAI_BODY),
        str(concurrency),
        str(seconds),
        stdout=subprocess.PIPE,
    )
    out, _ = await client.communicate()
    return grpc_ms, float(out)


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


async def run(args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, str, bool | None]] = []

    def row(metric: str, target: str, measured: str, ok: bool | None) -> None:
        rows.append((metric, target, measured, ok))
        print(f"  {metric}: {measured} (target {target})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        stack.start()
        try:
            connector = aiohttp.TCPConnector(limit=1000)
            async with (
                aiohttp.ClientSession(connector=connector) as http,
                grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel,
            ):
                c = Clients(stack, http, channel)
                await c.set_pace(0.0)
                n = 300 if args.quick else 2000

                print(
                    f"unary latency at concurrency 1, {n} interleaved requests per path", flush=True
                )
                direct, via_grpc, via_rest = await interleaved(
                    [c.direct_unary, c.grpc_unary, c.rest_unary], n, 50
                )
                d50, d99 = pct(direct, 0.5), pct(direct, 0.99)
                g_add50, g_add99 = pct(via_grpc, 0.5) - d50, pct(via_grpc, 0.99) - d99
                r_add50, r_add99 = pct(via_rest, 0.5) - d50, pct(via_rest, 0.99) - d99
                print(
                    f"  direct p50 {ms(d50)} ms p99 {ms(d99)} ms; gRPC p50 {ms(pct(via_grpc, 0.5))} p99 {ms(pct(via_grpc, 0.99))}; "
                    f"REST p50 {ms(pct(via_rest, 0.5))} p99 {ms(pct(via_rest, 0.99))}"
                )
                row(
                    "added latency, gRPC, c=1, p50 / p99",
                    "<= 1.0 / 3.0 ms",
                    f"{ms(g_add50)} / {ms(g_add99)} ms",
                    g_add50 <= 0.001 and g_add99 <= 0.003,
                )
                row(
                    "added latency, Envoy REST, c=1, p50 / p99",
                    "<= 1.5 / 4.0 ms",
                    f"{ms(r_add50)} / {ms(r_add99)} ms",
                    r_add50 <= 0.0015 and r_add99 <= 0.004,
                )

                seconds = 3.0 if args.quick else 10.0
                print(
                    f"unary throughput over gRPC, concurrency {args.concurrency}, {seconds:.0f} s",
                    flush=True,
                )
                cpu_before = proc_cpu_s(stack.gateway.pid)
                rate, latencies, errors = await throughput(c.grpc_unary, args.concurrency, seconds)
                cpu = proc_cpu_s(stack.gateway.pid) - cpu_before
                p99 = pct(latencies, 0.99)
                row(
                    "throughput over gRPC (p99)",
                    ">= 1500 req/s, p99 < 20 ms",
                    f"{rate:.0f} req/s ({ms(p99)} ms, {errors} errors)",
                    rate >= 1500 and p99 < 0.020 and not errors,
                )
                per_1000 = cpu / max(1, len(latencies)) * 1000
                row(
                    "gateway CPU per 1,000 unary requests",
                    "<= 1.0 s",
                    f"{per_1000:.2f} s",
                    per_1000 <= 1.0,
                )
                grpc_ms, aiohttp_ms = await floor_ms(c, args.concurrency, seconds / 2)
                row(
                    "of which the libraries' floor: grpc.aio server + aiohttp client",
                    "(report)",
                    f"{grpc_ms:.2f} + {aiohttp_ms:.2f} = {grpc_ms + aiohttp_ms:.2f} s per 1,000",
                    None,
                )

                await c.set_pace(PACE_S)
                m = 20 if args.quick else 60
                print(
                    f"time to first token at concurrency 1, {m} streams per path "
                    f"({STREAM_WORDS} chunks, {PACE_S * 1000:.0f} ms apart)",
                    flush=True,
                )
                direct_s, grpc_s, rest_s = await interleaved(
                    [
                        lambda: _first(c.direct_stream),
                        lambda: _first(c.grpc_stream),
                        lambda: _first(c.rest_stream),
                    ],
                    m,
                    3,
                )
                add_g = pct(grpc_s, 0.5) - pct(direct_s, 0.5)
                add_r = pct(rest_s, 0.5) - pct(direct_s, 0.5)
                row(
                    "added TTFT, c=1, p50 (gRPC / REST)",
                    "<= 1.0 ms",
                    f"{ms(add_g)} / {ms(add_r)} ms",
                    add_g <= 0.001,
                )

                rounds = 3 if args.quick else 6
                print(
                    f"time to first token with 50 paced streams at once, {rounds} rounds per path",
                    flush=True,
                )
                direct50: list[float] = []
                grpc50: list[float] = []
                errors50 = 0
                for _ in range(rounds):
                    t, e, _i = await concurrent_streams(c.direct_stream, 50)
                    direct50 += t
                    t, e2, i2 = await concurrent_streams(c.grpc_stream, 50)
                    grpc50 += t
                    errors50 += e + e2 + i2
                add99 = pct(grpc50, 0.99) - pct(direct50, 0.99)
                row(
                    "added TTFT, 50 paced streams, p99",
                    "<= 5 ms",
                    f"{ms(add99)} ms ({errors50} errors)",
                    add99 <= 0.005 and not errors50,
                )

                print("200 concurrent streams, gRPC and Envoy SSE", flush=True)
                _t, errors_g, incomplete_g = await concurrent_streams(c.grpc_stream, 200)
                _t, errors_r, incomplete_r = await concurrent_streams(c.rest_stream, 200)
                failed = errors_g + incomplete_g + errors_r + incomplete_r
                row(
                    "200 concurrent streams (gRPC + REST)",
                    "0 errors",
                    f"{failed} errors or incomplete of 400",
                    failed == 0,
                )
            row(
                "gateway idle RSS (after start)",
                "<= 80 MB",
                f"{stack.idle_rss_mb:.1f} MB",
                stack.idle_rss_mb <= 80,
            )
            row(
                "gateway RSS after the run",
                "(report)",
                f"{proc_rss_mb(stack.gateway.pid):.1f} MB",
                None,
            )
        finally:
            stack.stop()

    print(
        f"\nGateway overhead against the OpenAI stand-in ({os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}; stand-in, gateway and Envoy in their own processes)\n"
    )
    print("| metric | target | measured | met |")
    print("|---|---|---|:---:|")
    for metric, target, measured, ok in rows:
        print(
            f"| {metric} | {target} | {measured} | {'-' if ok is None else ('yes' if ok else 'no')} |"
        )


async def _first(call: Callable[[], Awaitable[tuple[float, float, int]]]) -> float:
    first, _total, _events = await call()
    return first


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
