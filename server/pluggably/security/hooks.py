"""The interceptor hooks that decide whether a call may run: API key and scope, per-key rate
limits, and the per-process stream cap. Each refuses with a domain error; `finish` gives back
what `start` took."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING

from pluggably.api.hooks import CallHook
from pluggably.core.context import KeyLimits, Principal, RequestContext
from pluggably.core.errors import PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from pluggably.security.ratelimit import Admission
from pluggably.security.scopes import needs_key_only, required_scope

if TYPE_CHECKING:
    from pluggably.config import KeyLimitsConfig
    from pluggably.security.keys import KeyStore
    from pluggably.security.ratelimit import RateLimiter

log = logging.getLogger(__name__)

_BEARER = "bearer "
# Calls made with auth switched off share one set of per-key limits.
ANONYMOUS = Principal(key_id="anonymous", name="anonymous")


class AuthHook(CallHook):
    """`authorization: Bearer <key>` -> the caller's `Principal`, and the scope the method needs.

    UNAUTHENTICATED when there is no valid key (missing, malformed, unknown, revoked, expired:
    one answer for the last four, so a caller learns nothing about which keys exist);
    PERMISSION_DENIED when the key lacks the method's scope.
    """

    public_exempt = True

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        # Per method: the scope it needs, and whether any valid key will do instead.
        self._scopes: dict[str, tuple[str | None, bool]] = {}

    def start(self, ctx: RequestContext, metadata: Mapping[str, str]) -> None:
        header = metadata.get("authorization")
        if not header:
            raise Unauthenticated(
                "this gateway needs an API key: send the header `authorization: Bearer <key>`",
                reason="API_KEY_MISSING",
            )
        if header[: len(_BEARER)].lower() != _BEARER:
            raise Unauthenticated(
                "the authorization header must be `Bearer <key>`", reason="API_KEY_MALFORMED"
            )
        try:
            principal = self._store.authenticate(header[len(_BEARER) :].strip())
        except sqlite3.Error:
            log.exception("the key store %s cannot be read", self._store.path)
            raise Unavailable(
                "API keys cannot be checked right now; retry shortly",
                retry_after_s=1.0,
                reason="KEY_STORE_UNAVAILABLE",
            ) from None
        if principal is None:
            raise Unauthenticated(
                "the API key is not valid (unknown, revoked or expired)",
                reason="API_KEY_INVALID",
            )
        ctx.principal = principal
        method = ctx.method
        needs = self._scopes.get(method)
        if needs is None:
            scope = required_scope(method)
            needs = self._scopes[method] = (scope, scope is None and needs_key_only(method))
        scope, any_key = needs
        if any_key:
            return  # health or reflection with a key required: any valid key will do
        if scope is None or scope not in principal.scopes:
            raise PermissionDenied(
                f"API key {principal.key_id} lacks the scope {scope or 'admin'!r} that "
                f"{ctx.method_name} needs",
                reason="SCOPE_MISSING",
                metadata={"scope": scope or "admin", "key_id": principal.key_id},
            )


class AnonymousHook(CallHook):
    """With auth off, every call runs as one anonymous principal (for limits and logs)."""

    public_exempt = True

    def start(self, ctx: RequestContext, metadata: Mapping[str, str]) -> None:
        ctx.principal = ANONYMOUS


class StreamCapHook(CallHook):
    """At most `limit` server-streaming calls at once in this process. Health watches and
    reflection (public) are not counted: probes must not be refused because generation is busy.
    """

    public_exempt = True
    starts_streams_only = True

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def start(self, ctx: RequestContext, metadata: Mapping[str, str]) -> None:
        if not ctx.streaming:
            return
        if self.active >= self.limit:
            raise ResourceExhausted(
                f"this server is serving its maximum of {self.limit} streams "
                "(server.max_concurrent_streams); retry shortly",
                subject="server",
                retry_after_s=1.0,
                reason="SERVER_STREAMS_EXHAUSTED",
            )
        self.active += 1
        ctx.scratch["stream_cap"] = True

    def finish(self, ctx: RequestContext) -> None:
        if ctx.scratch.pop("stream_cap", None):
            self.active -= 1


class RateLimitHook(CallHook):
    """Per-key requests per minute, tokens per minute and concurrent streams."""

    public_exempt = True

    def __init__(self, limiter: RateLimiter, defaults: KeyLimitsConfig) -> None:
        self._limiter = limiter
        self._defaults = defaults
        # A key's own limits merged with the defaults, by key limits: few distinct values, and
        # the merged one is read on every call.
        self._merged: dict[KeyLimits, KeyLimits | None] = {}

    def _limits(self, principal: Principal) -> KeyLimits | None:
        """The limits that apply to `principal`; None when none does."""
        own = principal.limits
        try:
            return self._merged[own]
        except KeyError:
            pass
        default = self._defaults
        limits = KeyLimits(
            requests_per_minute=own.requests_per_minute or default.requests_per_minute,
            tokens_per_minute=own.tokens_per_minute or default.tokens_per_minute,
            concurrent_streams=own.concurrent_streams or default.concurrent_streams,
        )
        unlimited = (
            limits.requests_per_minute is None
            and limits.tokens_per_minute is None
            and limits.concurrent_streams is None
        )
        if len(self._merged) >= 4096:  # keys' limits are few; never let the cache grow unbounded
            self._merged.clear()
        merged = self._merged[own] = None if unlimited else limits
        return merged

    def start(self, ctx: RequestContext, metadata: Mapping[str, str]) -> Awaitable[None] | None:
        principal = ctx.principal or ANONYMOUS
        limits = self._limits(principal)
        if limits is None:
            return None
        # Counters in this process need no await; Redis does.
        admission = self._limiter.admit_nowait(principal.key_id, limits, stream=ctx.streaming)
        if admission is None:
            return self._admit(ctx, principal.key_id, limits)
        ctx.scratch["admission"] = admission
        return None

    async def _admit(self, ctx: RequestContext, key_id: str, limits: KeyLimits) -> None:
        ctx.scratch["admission"] = await self._limiter.admit(key_id, limits, stream=ctx.streaming)

    def finish(self, ctx: RequestContext) -> Awaitable[None] | None:
        admission = ctx.scratch.pop("admission", None)
        if not isinstance(admission, Admission):
            return None
        tokens = ctx.input_tokens + ctx.output_tokens
        if self._limiter.settle_nowait(admission, tokens):
            return None
        return self._limiter.settle(admission, tokens)
