"""OpenTelemetry traces: a SERVER span per RPC, a CLIENT span per call to a hosted provider, and
W3C trace context (`traceparent`, `tracestate`) taken from the caller and passed on upstream.

Optional (`pip install 'pluggably[tracing]'`) and off by default: nothing here imports
opentelemetry until `setup_tracing` runs with `tracing.enabled: true`, and with tracing off the
only trace of this module on the hot path is the provider transport's check of one module
attribute (`pluggably.providers._transport.client_spans`).

Spans carry the RPC (`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`) and,
for generation, the GenAI attributes of the OpenTelemetry semantic conventions (operation,
model, provider, token usage). A failed call's span has status ERROR described by the
ErrorInfo reason (or the code): never by the error message, which may quote the request.
The tracer provider is not installed globally: the gateway's spans go to the configured
exporter whatever else in the process uses OpenTelemetry.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pluggably.api.hooks import CallHook
from pluggably.core.context import RequestContext

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from pluggably.config import TracingConfig

_OTLP_TRACES_PATH = "/v1/traces"

# google.rpc.Code names -> numbers (rpc.grpc.status_code), without importing grpc here.
_CODES = {
    name: number
    for number, name in enumerate(
        (
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        )
    )
}


class Tracing:
    """A tracer provider with its exporter, the W3C propagator, and the provider-call hook.
    Made by `setup_tracing`; `shutdown()` flushes what is pending and stops exporting."""

    def __init__(self, provider: TracerProvider, service_name: str) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("pluggably")
        self.propagator = TraceContextTextMapPropagator()
        self.service_name = service_name
        # Bound once: looked up on every call otherwise.
        self._attach = otel_context.attach
        self._detach = otel_context.detach
        self._in_context = trace.set_span_in_context
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self.client_spans = _ClientSpans(self)

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        return bool(self.provider.force_flush(timeout_ms))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stops tracing provider calls, exports what is pending and stops the exporter.

        Waits at most `timeout_s`: with the collector down, the exporter would retry for its
        whole timeout (about 10 s) and hold up the gateway's exit; the spans it still holds
        are then lost, as they would be at exit anyway.
        """
        from pluggably.providers import _transport

        if _transport.client_spans is self.client_spans:
            _transport.client_spans = None
        closing = threading.Thread(
            target=self.provider.shutdown, name="tracing-shutdown", daemon=True
        )
        closing.start()
        closing.join(timeout_s)


def setup_tracing(config: TracingConfig, *, exporter: SpanExporter | None = None) -> Tracing | None:
    """The tracing of the gateway per `config`, or None when tracing is off (then nothing from
    opentelemetry is imported). `exporter` replaces the configured one (tests, embedding).

    Installs the CLIENT-span hook of the provider transport, so calls to hosted providers get
    their own span and carry `traceparent` upstream.
    """
    if not config.enabled:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise RuntimeError(
            "tracing.enabled is true but OpenTelemetry is not installed: "
            "pip install 'pluggably[tracing]'"
        ) from exc

    if exporter is None:
        exporter = _configured_exporter(config)
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        # A caller's sampling decision (the traceparent's flag) wins; new traces are sampled at
        # the configured ratio.
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        # Shut down by the gateway (Tracing.shutdown, bounded), not by an exit handler that
        # could wait half a minute for a collector that is down.
        shutdown_on_exit=False,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracing = Tracing(provider, config.service_name)

    from pluggably.providers import _transport

    _transport.client_spans = tracing.client_spans
    return tracing


def _configured_exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=config.service_name)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = config.endpoint
    if endpoint is not None and not endpoint.rstrip("/").endswith(_OTLP_TRACES_PATH):
        # The config names the collector (like OTEL_EXPORTER_OTLP_ENDPOINT); the exporter wants
        # the URL of its traces path.
        endpoint = endpoint.rstrip("/") + _OTLP_TRACES_PATH
    # None: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT or localhost:4318.
    return OTLPSpanExporter(endpoint=endpoint)


def _detach(tracing: Tracing, token: object) -> None:
    if isinstance(token, contextvars.Token):
        # A stream cancelled under back-pressure is finalized in another context, where the
        # token cannot be reset; the attached context dies with the context it was set in, so
        # there is nothing to undo (and OpenTelemetry's detach would log an error for it).
        try:
            token.var.reset(token)
        except ValueError:
            pass
    else:
        tracing._detach(token)  # type: ignore[arg-type]


_SCRATCH = "tracing"


class TracingHook(CallHook):
    """A SERVER span per RPC, child of the caller's `traceparent` when it sent one, current
    while the handler runs (so provider calls become its children)."""

    def __init__(self, tracing: Tracing) -> None:
        self._tracing = tracing
        self._names: dict[str, tuple[str, dict[str, str]]] = {}

    @property
    def tracing(self) -> Tracing:
        return self._tracing

    async def start(self, ctx: RequestContext, metadata: Mapping[str, str]) -> None:
        tracing = self._tracing
        named = self._names.get(ctx.method)
        if named is None:
            named = self._names[ctx.method] = _span_name(ctx.method)
        name, attributes = named
        parent = tracing.propagator.extract(metadata) if "traceparent" in metadata else None
        span = tracing.tracer.start_span(
            name,
            context=parent,
            kind=tracing._server,
            attributes={**attributes, "pluggably.request_id": ctx.request_id},
        )
        token = tracing._attach(tracing._in_context(span, parent))
        ctx.scratch[_SCRATCH] = (span, token)

    async def finish(self, ctx: RequestContext) -> None:
        held = ctx.scratch.pop(_SCRATCH, None)
        if not isinstance(held, tuple):
            return
        span: Span = held[0]
        token: object = held[1]
        tracing = self._tracing
        try:
            if span.is_recording():
                _finish_span(tracing, span, ctx)
            span.end()
        finally:
            _detach(tracing, token)


def _span_name(method: str) -> tuple[str, dict[str, str]]:
    """`pluggably.v1.StreamService/StreamGenerate` and the rpc.* attributes of a method."""
    name = method.lstrip("/")
    service, _, rpc_method = name.partition("/")
    return name, {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc_method}


def _finish_span(tracing: Tracing, span: Span, ctx: RequestContext) -> None:
    code = ctx.code
    attributes: dict[str, Any] = {"rpc.grpc.status_code": _CODES.get(code, 2)}
    if ctx.principal is not None:
        attributes["pluggably.key_id"] = ctx.principal.key_id
    if ctx.provider and ctx.model:
        model = ctx.model
        attributes["gen_ai.operation.name"] = getattr(ctx, "operation", "") or "chat"
        attributes["gen_ai.request.model"] = getattr(ctx, "requested_model", "") or model
        attributes["gen_ai.response.model"] = model
        attributes["gen_ai.provider.name"] = ctx.provider
        attributes["gen_ai.usage.input_tokens"] = ctx.input_tokens
        attributes["gen_ai.usage.output_tokens"] = ctx.output_tokens
        first = ctx.first_output_at
        if first is not None:
            ttft = first - ctx.started
            attributes["gen_ai.response.time_to_first_chunk"] = ttft
            # The first output as an event on the span's timeline (perf_counter -> epoch).
            at_ns = time.time_ns() - int((time.perf_counter() - first) * 1e9)
            span.add_event("gen_ai.first_output", timestamp=at_ns)
    if code != "OK":
        reason = ctx.reason or code
        attributes["error.type"] = reason
        span.set_status(tracing._status(tracing._error, reason))
    span.set_attributes(attributes)


class _ClientSpans:
    """The provider transport's hook: a CLIENT span per upstream HTTP call, whose context goes
    upstream in `traceparent`. Spans name the model (`chat gpt-4o-mini`), or the HTTP method for
    metadata calls (model lists)."""

    def __init__(self, tracing: Tracing) -> None:
        self._tracing = tracing

    def start(
        self,
        provider: str,
        model_id: str,
        method: str,
        url: str,
        headers: MutableMapping[str, str],
    ) -> Any:
        tracing = self._tracing
        parts = urlsplit(url)
        attributes: dict[str, Any] = {
            "http.request.method": method,
            # Without query and user info: either may carry a credential (Gemini's `?key=`).
            "url.full": f"{parts.scheme}://{parts.hostname}"
            + (f":{parts.port}" if parts.port else "")
            + parts.path,
            "server.address": parts.hostname or "",
            "gen_ai.provider.name": provider,
        }
        if parts.port:
            attributes["server.port"] = parts.port
        _, _, upstream_model = model_id.partition("/")
        if upstream_model and upstream_model != "*":
            name = f"chat {upstream_model}"
            attributes["gen_ai.operation.name"] = "chat"
            attributes["gen_ai.request.model"] = upstream_model
        else:
            name = method
        span = tracing.tracer.start_span(name, kind=tracing._client, attributes=attributes)
        tracing.propagator.inject(headers, context=tracing._in_context(span))
        return span

    def end(self, span: Any, status: int | None, error: BaseException | None) -> None:
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None or (status is not None and status >= 400):
            # The error's class names what went wrong; its message may quote the request.
            kind = _error_kind(error) if error is not None else str(status)
            span.set_attribute("error.type", kind)
            span.set_status(self._tracing._status(self._tracing._error, kind))
        span.end()


def _error_kind(error: BaseException) -> str:
    inner = getattr(error, "error", None)  # UpstreamFailure wraps the domain error
    reason = getattr(inner, "reason", None) or getattr(error, "reason", None)
    return str(reason) if reason else type(error).__name__
