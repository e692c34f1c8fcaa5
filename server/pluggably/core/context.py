"""Per-request context that every layer may read without a transport object.

The API layer creates a `RequestContext` when an RPC starts (`pluggably.api.interceptors`) and
makes it current; the generation layer records what served the call (model, provider, tokens,
time to first token) on it, and the interceptor's hooks (auth, limits, access log, metrics,
tracing) read it when the call ends. A context variable follows the request through awaits and
into tasks it spawns.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Per-key rate limits; None means the configured default applies (`limits.per_key`)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key, identified by its public id (never by key material)."""

    key_id: str
    name: str = ""
    scopes: frozenset[str] = frozenset()
    # Model ids (or `provider/*` patterns) this key may use; None: every model.
    models: frozenset[str] | None = None
    limits: KeyLimits = KeyLimits()

    def may_use(self, model_id: str) -> bool:
        if self.models is None:
            return True
        return model_id in self.models or f"{model_id.split('/', 1)[0]}/*" in self.models


@dataclass(slots=True)
class RequestContext:
    """One RPC as the hooks see it. Filled as the call proceeds; read when it ends."""

    request_id: str
    method: str = ""  # full gRPC method, e.g. /pluggably.v1.StreamService/StreamGenerate
    peer: str = ""
    streaming: bool = False
    principal: Principal | None = None
    started: float = field(default_factory=time.perf_counter)
    # Set by the generation layer.
    operation: str = ""  # gen_ai.operation.name: chat (messages) or text_completion (prompt)
    requested_model: str = ""  # as the caller named it (maybe an alias)
    model: str = ""  # the model that served (after aliases and fallbacks)
    provider: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    first_output_at: float | None = None  # perf_counter() of the first output chunk
    queue_wait_s: float | None = None
    # Set by the interceptor when the call ends.
    code: str = "OK"  # google.rpc.Code name
    reason: str = ""  # ErrorInfo.reason when the call failed
    messages: int = 0
    ended: float = 0.0  # perf_counter() when the call ended, for observers that run later
    # Hook-private state (a limiter's admission, a tracing span), keyed by hook.
    scratch: dict[str, object] = field(default_factory=dict)

    @property
    def method_name(self) -> str:
        """`Service/Method` without the package, e.g. `StreamService/StreamGenerate`."""
        return self.method.rsplit(".", 1)[-1]

    def served_by(self, model_id: str) -> None:
        self.model = model_id
        self.provider = model_id.split("/", 1)[0]

    def output_started(self) -> None:
        if self.first_output_at is None:
            self.first_output_at = time.perf_counter()


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "pluggably_request", default=None
)


def current() -> RequestContext | None:
    """The request being served, or None outside a request."""
    return _current.get()


def current_request_id() -> str:
    """The id of the request being served, or "" outside a request."""
    ctx = _current.get()
    return "" if ctx is None else ctx.request_id


def current_principal() -> Principal | None:
    ctx = _current.get()
    return None if ctx is None else ctx.principal


def activate(ctx: RequestContext) -> contextvars.Token[RequestContext | None]:
    return _current.set(ctx)


def deactivate(token: contextvars.Token[RequestContext | None]) -> None:
    _current.reset(token)
