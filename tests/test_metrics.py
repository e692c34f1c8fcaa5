"""Prometheus metrics: the hook's instruments, the HTTP endpoint (one process and several),
Envoy's own stats, the values moving under real RPCs, and the Grafana dashboard's queries."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from pluggably.api.hooks import CallHook, drain_observers
from pluggably.config import MetricsConfig
from pluggably.core.context import RequestContext
from pluggably.devtools.envoy import Envoy, free_port
from pluggably.devtools.standins import Fault
from pluggably.observability.metrics import (
    MetricsHook,
    exported_metric_names,
    start_metrics_server,
)
from pluggably.v1 import generation_pb2 as P
from providers_util import MODELS, provider_stack

REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = REPO_ROOT / "examples" / "grafana-dashboard.json"
GENERATE = "/pluggably.v1.GenerateService/Generate"
STREAM = "/pluggably.v1.StreamService/StreamGenerate"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def value(name: str, **labels: str) -> float:
    """A sample of this process's registry; 0 when the series does not exist (yet)."""
    drain_observers()  # calls that ended are counted within a batch interval; now, here
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rpc(method: str, **more: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    kind = "server_stream" if "Stream" in name else "unary"
    return {"grpc_service": service, "grpc_method": name, "grpc_type": kind, **more}


def genai(model: str, provider: str, operation: str = "chat") -> dict[str, str]:
    return {
        "gen_ai_operation_name": operation,
        "gen_ai_provider_name": provider,
        "gen_ai_request_model": model,
    }


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def observe(hook: CallHook, ctx: RequestContext) -> None:
    """What the interceptor does when a call ends (its batching aside)."""
    ctx.ended = ctx.ended or time.perf_counter()
    hook.observe(ctx)


async def call(
    hook: MetricsHook, method: str, *, code: str = "OK", reason: str = "", **fields: object
) -> RequestContext:
    ctx = RequestContext(request_id="r", method=method, streaming="Stream" in method)
    await hook.start(ctx, {})
    for name, field_value in fields.items():
        setattr(ctx, name, field_value)
    ctx.code, ctx.reason = code, reason
    observe(hook, ctx)
    return ctx


# --- The hook -------------------------------------------------------------------------------


async def test_rpcs_are_counted_by_method_and_code_with_their_latency() -> None:
    hook = MetricsHook()
    before_started = value("grpc_server_started_total", **rpc(GENERATE))
    before_ok = value("grpc_server_handled_total", **rpc(GENERATE, grpc_code="OK"))
    before_bad = value("grpc_server_handled_total", **rpc(GENERATE, grpc_code="NOT_FOUND"))
    before_count = value("grpc_server_handling_seconds_count", **rpc(GENERATE))
    before_reason = value("pluggably_errors_total", grpc_method="Generate", reason="MODEL_X")
    before_code = value("pluggably_errors_total", grpc_method="Generate", reason="INTERNAL")
    await call(hook, GENERATE)
    await call(hook, GENERATE)
    await call(hook, GENERATE, code="NOT_FOUND", reason="MODEL_X")
    await call(hook, GENERATE, code="INTERNAL")
    assert value("grpc_server_started_total", **rpc(GENERATE)) == before_started + 4
    assert value("grpc_server_handled_total", **rpc(GENERATE, grpc_code="OK")) == before_ok + 2
    assert (
        value("grpc_server_handled_total", **rpc(GENERATE, grpc_code="NOT_FOUND")) == before_bad + 1
    )
    assert value("grpc_server_handling_seconds_count", **rpc(GENERATE)) == before_count + 4
    # Errors by reason; by the code when the error had no reason.
    reason = value("pluggably_errors_total", grpc_method="Generate", reason="MODEL_X")
    assert reason == before_reason + 1
    code = value("pluggably_errors_total", grpc_method="Generate", reason="INTERNAL")
    assert code == before_code + 1


async def test_active_streams_rise_while_a_stream_runs_and_fall_when_it_ends() -> None:
    hook = MetricsHook()
    before = value("pluggably_active_streams", grpc_method="StreamGenerate")
    ctx = RequestContext(request_id="s", method=STREAM, streaming=True)
    await hook.start(ctx, {})
    assert value("pluggably_active_streams", grpc_method="StreamGenerate") == before + 1
    ctx.code = "CANCELLED"
    observe(hook, ctx)
    assert value("pluggably_active_streams", grpc_method="StreamGenerate") == before
    # A call whose start the hook never saw (an earlier hook refused it) changes nothing.
    observe(hook, RequestContext(request_id="t", method=STREAM, streaming=True))
    assert value("pluggably_active_streams", grpc_method="StreamGenerate") == before


async def test_generation_metrics_follow_the_genai_conventions() -> None:
    hook = MetricsHook()
    labels = genai("hook/model-a", "hook")
    ctx = RequestContext(request_id="g", method=STREAM, streaming=True)
    await hook.start(ctx, {})
    ctx.served_by("hook/model-a")
    ctx.first_output_at = ctx.started + 0.05
    ctx.input_tokens, ctx.output_tokens = 12, 11
    observe(hook, ctx)
    ttft_sum = value("gen_ai_server_time_to_first_token_seconds_sum", **labels)
    assert value("gen_ai_server_time_to_first_token_seconds_count", **labels) == 1
    assert ttft_sum == pytest.approx(0.05)
    assert value("gen_ai_server_time_per_output_token_seconds_count", **labels) == 1
    duration = value("gen_ai_server_request_duration_seconds_sum", **labels, error_type="")
    per_token = value("gen_ai_server_time_per_output_token_seconds_sum", **labels)
    # (duration - ttft) spread over the 10 tokens after the first.
    assert per_token == pytest.approx((duration - ttft_sum) / 10, rel=0.05)
    usage = "gen_ai_client_token_usage_sum"
    assert value(usage, **labels, gen_ai_token_type="input") == 12
    assert value(usage, **labels, gen_ai_token_type="output") == 11
    tokens = "pluggably_tokens_total"
    assert value(tokens, model="hook/model-a", provider="hook", type="input") == 12
    assert value(tokens, model="hook/model-a", provider="hook", type="output") == 11
    # A failed generation: its duration, labelled with the error; no TTFT, no usage.
    await call(
        hook,
        STREAM,
        code="UNAVAILABLE",
        reason="UPSTREAM_UNAVAILABLE",
        model="hook/model-a",
        provider="hook",
    )
    failed = value(
        "gen_ai_server_request_duration_seconds_count",
        **labels,
        error_type="UPSTREAM_UNAVAILABLE",
    )
    assert failed == 1
    assert value("gen_ai_server_time_to_first_token_seconds_count", **labels) == 1
    assert value(usage.replace("_sum", "_count"), **labels, gen_ai_token_type="input") == 1


async def test_a_model_that_did_not_serve_gets_no_series() -> None:
    """The servicer records the requested model before routing; only a model the router
    resolved (provider set) may become a label, or any client could mint series."""
    hook = MetricsHook()
    await call(hook, GENERATE, code="NOT_FOUND", model="nobody/sk-planted-secret-123456")
    exported = {s.labels.get("gen_ai_request_model") for f in REGISTRY.collect() for s in f.samples}
    exported |= {s.labels.get("model") for f in REGISTRY.collect() for s in f.samples}
    assert "nobody/sk-planted-secret-123456" not in exported


# --- The endpoint ---------------------------------------------------------------------------


def test_endpoint_serves_the_registry_and_stops() -> None:
    server = start_metrics_server(MetricsConfig(port=0))
    try:
        assert server.port > 0
        before = sample(scrape(server.port), "grpc_server_started_total", **rpc(GENERATE))
        asyncio.run(call(MetricsHook(), GENERATE))
        after = sample(scrape(server.port), "grpc_server_started_total", **rpc(GENERATE))
        assert after == before + 1
    finally:
        server.stop()
    server.stop()  # twice is harmless
    with pytest.raises(urllib.error.URLError):
        scrape(server.port)


def test_a_taken_port_is_a_clear_error() -> None:
    server = start_metrics_server(MetricsConfig(port=0))
    try:
        with pytest.raises(OSError, match=r"cannot serve metrics on 127\.0\.0\.1:\d+ \(metrics"):
            start_metrics_server(MetricsConfig(port=server.port))
    finally:
        server.stop()


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from pluggably.config import MetricsConfig
    from pluggably.core.context import RequestContext
    from pluggably.observability.metrics import MetricsHook, start_metrics_server

    calls = int(sys.argv[1])
    server = start_metrics_server(MetricsConfig(port=0))
    hook = MetricsHook()

    async def work():
        for i in range(calls):
            ctx = RequestContext(request_id=str(i), method="/pluggably.v1.GenerateService/Generate")
            await hook.start(ctx, {})
            ctx.ended = ctx.started
            hook.observe(ctx)
        # One stream left running.
        await hook.start(RequestContext("s", "/pluggably.v1.StreamService/StreamGenerate",
                                        streaming=True), {})

    asyncio.run(work())
    print(server.port, flush=True)
    sys.stdin.readline()  # until the test has scraped
    server.stop()
    """
)


def test_several_processes_are_one_scrape(tmp_path: Path) -> None:
    """Two gateway processes write to one PROMETHEUS_MULTIPROC_DIR: either endpoint serves the
    sum; a process that stopped keeps its counts but takes its live gauges with it."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(calls)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for calls in (3, 5)
    ]
    try:
        ports = [int(w.stdout.readline()) for w in workers]  # type: ignore[union-attr]
        for port in ports:
            samples = scrape(port)
            assert sample(samples, "grpc_server_started_total", **rpc(GENERATE)) == 8
            assert sample(samples, "grpc_server_started_total", **rpc(STREAM)) == 2
            assert sample(samples, "pluggably_active_streams", grpc_method="StreamGenerate") == 2
        first, second = workers
        first.communicate("\n", timeout=30)
        samples = scrape(ports[1])
        assert sample(samples, "grpc_server_started_total", **rpc(GENERATE)) == 8
        assert sample(samples, "pluggably_active_streams", grpc_method="StreamGenerate") == 1
        second.communicate("\n", timeout=30)
        assert [w.returncode for w in workers] == [0, 0]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()


def test_envoy_serves_its_own_stats_on_the_admin_port(tmp_path: Path) -> None:
    envoy = Envoy(free_port(), tmp_path)
    envoy.start()
    try:
        url = f"http://127.0.0.1:{envoy.admin_port}/stats/prometheus"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        envoy.stop()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "envoy_server_live" in names
    assert any(n.startswith("envoy_cluster_upstream_rq") for n in names)
    assert any(n.startswith("envoy_http_downstream_rq") for n in names)


# --- Through a real gateway -----------------------------------------------------------------


class Finished(logging.Handler):
    """Signals each RPC's end: the access event is the last hook to run, after the metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5):
            while self.count < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def finished() -> Iterator[Finished]:
    handler = Finished()
    access = logging.getLogger("pluggably.access")
    access.addHandler(handler)
    access.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        access.removeHandler(handler)
        access.setLevel(logging.NOTSET)


@pytest.fixture(scope="module")
async def gateway():
    async with provider_stack(
        auth={"enabled": False}, metrics={"enabled": True, "port": 0}
    ) as stack:
        assert stack.server.operations is not None
        yield stack


def chat(model: str) -> P.GenerateRequest:
    return P.GenerateRequest(model=model, messages=[P.ChatMessage(role="user", content="Hi")])


async def test_real_rpcs_move_the_values(gateway, finished: Finished) -> None:
    gateway.reset()
    port = gateway.server.operations.metrics_port
    model = f"openai/{MODELS['openai']}"
    labels = genai(model, "openai")
    before = await asyncio.to_thread(scrape, port)
    await gateway.generate(chat(model))
    async for _ in gateway.stream(chat(model)):
        pass
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.generate(chat("openai/no-such-model"))
    await health_pb2_grpc.HealthStub(gateway.channel).Check(health_pb2.HealthCheckRequest())
    await finished.wait_for(4)
    after = await asyncio.to_thread(scrape, port)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("grpc_server_handled_total", **rpc(GENERATE, grpc_code="OK")) == 1
    assert moved("grpc_server_handled_total", **rpc(GENERATE, grpc_code="NOT_FOUND")) == 1
    assert moved("grpc_server_handled_total", **rpc(STREAM, grpc_code="OK")) == 1
    health = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
    assert moved("grpc_server_handled_total", **health, grpc_type="unary", grpc_code="OK") == 1
    assert moved("gen_ai_server_time_to_first_token_seconds_count", **labels) == 2
    assert moved("gen_ai_server_time_per_output_token_seconds_count", **labels) == 2
    assert moved("gen_ai_server_request_duration_seconds_count", **labels, error_type="") == 2
    assert moved("pluggably_tokens_total", model=model, provider="openai", type="output") > 0
    assert moved("pluggably_tokens_total", model=model, provider="openai", type="input") > 0
    assert (
        sum(
            moved("pluggably_errors_total", grpc_method="Generate", reason=reason)
            for (name, labelset) in after
            if name == "pluggably_errors_total"
            for key, reason in labelset
            if key == "reason"
        )
        >= 1
    )


async def test_a_scrape_counts_every_call_ended_before_it(gateway) -> None:
    """Calls are recorded in batches, off their path; a scrape drains the batch first, so it
    never misses a call that has already returned."""
    from pluggably.api import hooks

    port = gateway.server.operations.metrics_port
    model = f"openai/{MODELS['openai']}"
    drain_observers()
    saved = {observers: observers.interval_s for observers in hooks._live}
    for observers in saved:
        observers.interval_s = 3600.0  # no batch would be written during this test
    try:
        await asyncio.sleep(0.3)  # timers scheduled at the old interval have fired
        before = await asyncio.to_thread(scrape, port)
        await gateway.generate(chat(model))
        after = await asyncio.to_thread(scrape, port)
    finally:
        for observers, interval in saved.items():
            observers.interval_s = interval
        drain_observers()
    handled = "grpc_server_handled_total"
    ok = rpc(GENERATE, grpc_code="OK")
    assert sample(after, handled, **ok) - sample(before, handled, **ok) == 1


async def test_an_active_stream_shows_until_it_ends(gateway, finished: Finished) -> None:
    gateway.reset()
    gateway.standin("openai").inject(
        Fault("hang_mid_stream", after_chunks=2, seconds=30, path="/chat/completions")
    )
    port = gateway.server.operations.metrics_port
    before = sample(await asyncio.to_thread(scrape, port), "pluggably_active_streams",
                    grpc_method="StreamGenerate")  # fmt: skip
    call = gateway.stream(chat(f"openai/{MODELS['openai']}"))
    await call.read()  # the stream has started and now hangs upstream
    during = await asyncio.to_thread(scrape, port)
    assert sample(during, "pluggably_active_streams", grpc_method="StreamGenerate") == before + 1
    call.cancel()
    await finished.wait_for(1)
    after = await asyncio.to_thread(scrape, port)
    assert sample(after, "pluggably_active_streams", grpc_method="StreamGenerate") == before
    cancelled = rpc(STREAM, grpc_code="CANCELLED")
    assert sample(after, "grpc_server_handled_total", **cancelled) >= 1
    # A caller that went away is no failure of the gateway.
    assert ("pluggably_errors_total", frozenset({("grpc_method", "StreamGenerate"),
            ("reason", "CANCELLED")})) not in after  # fmt: skip


async def test_an_expired_deadline_counts_as_deadline_exceeded(gateway, finished) -> None:
    gateway.reset()
    gateway.standin("openai").inject(
        Fault("hang_before_headers", seconds=5, path="/chat/completions")
    )
    port = gateway.server.operations.metrics_port
    labels = rpc(GENERATE, grpc_code="DEADLINE_EXCEEDED")
    before = await asyncio.to_thread(scrape, port)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.generate(chat(f"openai/{MODELS['openai']}"), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await finished.wait_for(1)
    after = await asyncio.to_thread(scrape, port)
    moved = sample(after, "grpc_server_handled_total", **labels) - sample(
        before, "grpc_server_handled_total", **labels
    )
    assert moved == 1
    assert sample(after, "grpc_server_handled_total", **rpc(GENERATE, grpc_code="CANCELLED")) == (
        sample(before, "grpc_server_handled_total", **rpc(GENERATE, grpc_code="CANCELLED"))
    )


# --- The Grafana dashboard ------------------------------------------------------------------

_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "topk", "bottomk", "label_values", "clamp_min", "clamp_max", "abs",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions, keywords,
    label names (in `{}` and `by (...)`), strings, ranges or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\blabel_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r"\1", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group() in _PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def test_promql_metric_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(x_bucket{job=~"$job", a="b(c)"}'
        "[$__rate_interval]))) / sum(y_total offset 5m) + on(job) group_left(z) w"
    )
    assert promql_metric_names(expr) == {"x_bucket", "y_total", "w"}
    assert promql_metric_names("label_values(grpc_server_started_total, job)") == {
        "grpc_server_started_total"
    }


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_queries_only_metrics_the_gateway_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
    exported = exported_metric_names()
    used: set[str] = set()
    for query in dashboard_queries(dashboard):
        names = promql_metric_names(query)
        assert names, query
        assert names <= exported, f"{sorted(names - exported)} in {query}"
        used |= names
    # And every gateway metric is on the dashboard somewhere.
    ours = {
        f.name
        for f in REGISTRY.collect()
        if f.name.startswith(("grpc_server_", "gen_ai_", "pluggably_"))
    }
    shown = {f for f in ours if any(u == f or u.startswith(f + "_") for u in used)}
    assert shown == ours, f"not on the dashboard: {sorted(ours - shown)}"
