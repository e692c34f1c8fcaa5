"""The small, transport-free steps of the interceptor stack.

`GatewayInterceptor` runs every RPC through an ordered list of hooks: `start` in order before the
handler (auth, limits; a hook refuses the call by raising a domain error, which is mapped to a
status like any other), `finish` in reverse order after the call ended, successful or not, with
`ctx.code` and `ctx.reason` set (access log, metrics, tracing, releasing what `start` took).
Hooks see a `RequestContext` and the request metadata, never a grpc object, so each is tested
on its own and the same hooks can serve another transport.
"""

from __future__ import annotations

from collections.abc import Mapping

from pluggably.core.context import RequestContext


class CallHook:
    """One concern of every RPC. Subclasses override what they need."""

    async def start(self, ctx: RequestContext, metadata: Mapping[str, str]) -> None:
        """Before the handler. Raise a `PluggablyError` to refuse the call."""

    async def finish(self, ctx: RequestContext) -> None:
        """After the call, whatever its outcome; must not raise."""
