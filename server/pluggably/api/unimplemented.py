"""Handlers for RPCs of the contract that this build does not serve yet."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

from pluggably.core.errors import Unimplemented


def not_yet(what: str, *, streaming: bool = False) -> Callable[..., Any]:
    """UNIMPLEMENTED with a message that says so (the generated base class answers without
    details)."""

    def fail() -> NoReturn:
        raise Unimplemented(
            f"{what} is part of the v1 contract but not implemented by this server yet"
        )

    async def unary(self: Any, request: Any, context: Any) -> NoReturn:
        fail()

    async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        fail()
        yield  # pragma: no cover - makes this a server-streaming handler

    return stream if streaming else unary
