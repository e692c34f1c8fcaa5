"""Per-request context that every layer may read without a transport object: the request id.

The API layer sets it when an RPC starts (`pluggably.api.interceptors`); backends and logs read
it. A context variable follows the request through awaits and into tasks it spawns.
"""

from __future__ import annotations

import contextvars

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current_request_id() -> str:
    """The id of the request being served, or "" outside a request."""
    return _request_id.get()


def set_request_id(request_id: str) -> contextvars.Token[str]:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str]) -> None:
    _request_id.reset(token)
