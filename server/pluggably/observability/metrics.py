"""Prometheus instruments of the gateway, the hook that feeds them, and their HTTP endpoint.

Generation metrics follow the OpenTelemetry GenAI semantic conventions, with Prometheus names
(`gen_ai.server.time_to_first_token` -> `gen_ai_server_time_to_first_token_seconds`, attribute
`gen_ai.request.model` -> label `gen_ai_request_model`); RPC metrics follow go-grpc-prometheus
(`grpc_server_handled_total`), which existing dashboards understand.
Label values are model ids, provider names, method names, codes and reasons: never key material
or request text. Model labels are set only for models that served a call (ids the router knows),
so a client cannot grow the number of series by naming models that do not exist.

Several server processes (`PROMETHEUS_MULTIPROC_DIR` set before the first import of
prometheus_client): every process writes its values to files in that directory and any
process's endpoint serves the sum over all of them. Give each process its own
`metrics.port`; clear the directory before the processes start (stale files of a previous run
would be counted). Gauges say how they add up (`multiprocess_mode`), and a process that stops
removes its live gauges (`MetricsServer.stop`).

Envoy keeps its own statistics (requests, HTTP codes, upstream timing) and serves them on its
admin port at `/stats/prometheus`.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from pluggably.api.hooks import CallHook, drain_observers
from pluggably.core.context import RequestContext

if TYPE_CHECKING:
    from pluggably.config import MetricsConfig

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Local runners: queue and models. Called by the runners (transport-free, cheap).
QUEUE_DEPTH = Gauge(
    "pluggably_queue_depth",
    "Requests waiting in a local model's queue.",
    ["model"],
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "pluggably_queue_wait_seconds",
    "Time a request waited in a local model's queue before it ran (or was refused).",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MODEL_LOAD = Histogram(
    "pluggably_model_load_seconds",
    "Time to load a local model into memory.",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LOADED_MODELS = Gauge(
    "pluggably_loaded_models",
    "Local models loaded in memory.",
    ["provider"],
    multiprocess_mode="livesum",
)


def set_queue_depth(model: str, depth: int) -> None:
    QUEUE_DEPTH.labels(model).set(depth)


def observe_queue_wait(model: str, seconds: float) -> None:
    QUEUE_WAIT.labels(model).observe(seconds)


def observe_model_load(model: str, seconds: float) -> None:
    MODEL_LOAD.labels(model).observe(seconds)


def set_loaded_models(provider: str, count: int) -> None:
    LOADED_MODELS.labels(provider).set(count)


# Bucket boundaries (seconds; tokens for the usage histogram). The GenAI ones are the semantic
# conventions', with finer ones below where a local model is faster than any hosted one.
_RPC_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
    300, 600,
)  # fmt: skip
_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
_TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
_TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip

# RPCs, as go-grpc-prometheus names them.
_RPC_LABELS = ("grpc_service", "grpc_method", "grpc_type")
RPC_STARTED = Counter(
    "grpc_server_started", "RPCs started on the server.", _RPC_LABELS
)  # exported as grpc_server_started_total
RPC_HANDLED = Counter(
    "grpc_server_handled",
    "RPCs completed on the server, whatever their status.",
    (*_RPC_LABELS, "grpc_code"),
)
RPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its end (a stream's last message).",
    _RPC_LABELS,
    buckets=_RPC_BUCKETS,
)
ACTIVE_STREAMS = Gauge(
    "pluggably_active_streams",
    "Server-streaming RPCs in progress.",
    ["grpc_method"],
    multiprocess_mode="livesum",
)
ERRORS = Counter(
    "pluggably_errors",
    "RPCs that failed (any status but OK and CANCELLED), by ErrorInfo reason (the status code "
    "when there is none).",
    ["grpc_method", "reason"],
)

# Generation (OpenTelemetry GenAI semantic conventions).
_GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
GENAI_REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "Generation requests: time to the last output token (or the error).",
    (*_GENAI_LABELS, "error_type"),
    buckets=_DURATION_BUCKETS,
)
GENAI_TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Successful generation requests: time to the first output.",
    _GENAI_LABELS,
    buckets=_TTFT_BUCKETS,
)
GENAI_TIME_PER_OUTPUT_TOKEN = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "Successful generation requests: time per output token after the first.",
    _GENAI_LABELS,
    buckets=_TPOT_BUCKETS,
)
GENAI_TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per generation request, input and output (gen_ai_token_type).",
    (*_GENAI_LABELS, "gen_ai_token_type"),
    buckets=_TOKEN_BUCKETS,
)
TOKENS = Counter(
    "pluggably_tokens",
    "Tokens processed, by serving model, provider and type (input or output).",
    ["model", "provider", "type"],
)


def _rpc_type(method: str, streaming: bool) -> str:
    if not streaming:
        return "unary"
    # Reflection is the only bidirectional stream the server has.
    return "bidi_stream" if method.startswith("/grpc.reflection.") else "server_stream"


def operation_name(ctx: RequestContext) -> str:
    """`gen_ai.operation.name` of a generation call: what the generation layer recorded
    (`ctx.operation`: chat for messages, text_completion for a raw prompt), else chat."""
    return getattr(ctx, "operation", "") or "chat"


class _Method:
    """The label children of one method, made once: `.labels()` costs a lock and a dict
    lookup on every call, a cached child neither."""

    __slots__ = ("_errors", "_handled", "_labels", "active", "handling", "name", "started")

    def __init__(self, method: str, streaming: bool) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self.name = name or service
        self._labels = (service, self.name, _rpc_type(method, streaming))
        self.started = RPC_STARTED.labels(*self._labels)
        self.handling = RPC_HANDLING.labels(*self._labels)
        self.active = ACTIVE_STREAMS.labels(self.name) if streaming else None
        self._handled: dict[str, Any] = {}
        self._errors: dict[str, Any] = {}

    def handled(self, code: str) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = RPC_HANDLED.labels(*self._labels, code)
        return child

    def error(self, reason: str) -> Any:
        child = self._errors.get(reason)
        if child is None:
            child = self._errors[reason] = ERRORS.labels(self.name, reason)
        return child


class _Model:
    """The label children of one (operation, provider, model)."""

    __slots__ = (
        "_durations",
        "_labels",
        "input_tokens",
        "input_usage",
        "output_tokens",
        "output_usage",
        "time_per_output_token",
        "time_to_first_token",
    )

    def __init__(self, operation: str, provider: str, model: str) -> None:
        self._labels = (operation, provider, model)
        self.time_to_first_token = GENAI_TIME_TO_FIRST_TOKEN.labels(*self._labels)
        self.time_per_output_token = GENAI_TIME_PER_OUTPUT_TOKEN.labels(*self._labels)
        self.input_usage = GENAI_TOKEN_USAGE.labels(*self._labels, "input")
        self.output_usage = GENAI_TOKEN_USAGE.labels(*self._labels, "output")
        self.input_tokens = TOKENS.labels(model, provider, "input")
        self.output_tokens = TOKENS.labels(model, provider, "output")
        self._durations: dict[str, Any] = {}

    def duration(self, error_type: str) -> Any:
        child = self._durations.get(error_type)
        if child is None:
            child = self._durations[error_type] = GENAI_REQUEST_DURATION.labels(
                *self._labels, error_type
            )
        return child


_SCRATCH = "metrics"


class MetricsHook(CallHook):
    """Counts every RPC (started, handled by code, latency, active streams, errors by reason)
    and, for calls that a model served (`ctx.provider` set by the generation layer), the GenAI
    metrics: request duration, time to first token, time per output token, token usage."""

    # A stream is counted as started (and active) when it starts, so a scrape sees the streams
    # in flight; a unary call, which lasts no longer than a batch of observations, when it is
    # observed, with everything else.
    starts_streams_only = True

    def __init__(self) -> None:
        self._methods: dict[tuple[str, bool], _Method] = {}
        self._models: dict[tuple[str, str, str], _Model] = {}

    def _method(self, ctx: RequestContext) -> _Method:
        key = (ctx.method, ctx.streaming)
        method = self._methods.get(key)
        if method is None:
            method = self._methods[key] = _Method(ctx.method, ctx.streaming)
        return method

    async def start(self, ctx: RequestContext, metadata: Mapping[str, str]) -> None:
        if not ctx.streaming:
            return  # counted by observe()
        method = self._method(ctx)
        method.started.inc()
        if method.active is not None:
            method.active.inc()
        # observe() decrements only what start() counted, so the gauge balances.
        ctx.scratch[_SCRATCH] = method

    def observe(self, ctx: RequestContext) -> None:
        if ctx.streaming:
            method = ctx.scratch.get(_SCRATCH)
            if not isinstance(method, _Method):
                return
            if method.active is not None:
                method.active.dec()
        else:
            method = self._method(ctx)
            method.started.inc()
        now = ctx.ended
        elapsed = now - ctx.started
        code = ctx.code
        method.handled(code).inc()
        method.handling.observe(elapsed)
        if code != "OK" and code != "CANCELLED":  # a caller that went away is no failure
            method.error(ctx.reason or code).inc()
        if ctx.provider and ctx.model:
            self._generation(ctx, now, elapsed)

    def _generation(self, ctx: RequestContext, now: float, elapsed: float) -> None:
        key = (operation_name(ctx), ctx.provider, ctx.model)
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = _Model(*key)
        ok = ctx.code == "OK"
        model.duration("" if ok else (ctx.reason or ctx.code)).observe(elapsed)
        first = ctx.first_output_at
        if ok and first is not None:
            model.time_to_first_token.observe(first - ctx.started)
            if ctx.output_tokens > 1:
                model.time_per_output_token.observe((now - first) / (ctx.output_tokens - 1))
        if ok or ctx.input_tokens or ctx.output_tokens:
            model.input_usage.observe(ctx.input_tokens)
            model.output_usage.observe(ctx.output_tokens)
            if ctx.input_tokens:
                model.input_tokens.inc(ctx.input_tokens)
            if ctx.output_tokens:
                model.output_tokens.inc(ctx.output_tokens)


# --- Exposition ---------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def exposition_registry() -> CollectorRegistry:
    """What the endpoint serves: this process's registry, or with `PROMETHEUS_MULTIPROC_DIR`
    the values of every process that writes to that directory."""
    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    from prometheus_client import multiprocess

    if not os.path.isdir(path):
        raise OSError(f"{MULTIPROC_ENV}={path} is not a directory: create it before starting")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


class MetricsServer(NamedTuple):
    """A running metrics endpoint: the port it listens on and the function that stops it."""

    port: int
    stop: Callable[[], None]


def start_metrics_server(config: MetricsConfig) -> MetricsServer:
    """Serves `/metrics` on `config.host:config.port` (0: a free port) from a daemon thread.

    Raises OSError naming the address and the config fields when it cannot listen. `stop()`
    closes the endpoint and, with several processes, removes this process's live gauges.
    """
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not worth a line each on stderr."""

    class Server(ThreadingWSGIServer):
        pass

    address = f"{config.host}:{config.port}"
    registry = exposition_registry()
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        drain_observers()  # every call ended so far is counted in this scrape
        return exposition(environ, start_response)

    try:
        Server.address_family = socket.getaddrinfo(config.host, config.port)[0][0]
        httpd = make_server(config.host, config.port, app, Server, handler_class=Quiet)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot serve metrics on {address} (metrics.host/metrics.port): {exc.strerror or exc}",
        ) from None
    # The poll interval bounds how long stop() waits for the serving loop to notice.
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="metrics", daemon=True
    )
    thread.start()
    port = int(httpd.server_address[1])
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        path = multiprocess_dir()
        if path is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]

    return MetricsServer(port, stop)


def exported_metric_names(registry: CollectorRegistry | None = None) -> set[str]:
    """Every sample name the registry can export (`x_total`, `x_bucket`, ...), including metrics
    that have no series yet: what a dashboard may query."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in (registry or REGISTRY).collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)
    return names
