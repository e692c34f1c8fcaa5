"""Builds the gateway's backends and router from config, by the registered backend kinds."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pluggably.config import Config
from pluggably.core import plugins
from pluggably.core.backend import Backend
from pluggably.generation.router import Router
from pluggably.runners import LOCAL_PROVIDER

log = logging.getLogger(__name__)


def build_backends(config: Config) -> list[Backend]:
    """One backend per configured provider (and one for `local:` when it lists models)."""
    kinds = plugins.kinds()
    backends: list[Backend] = []
    if config.local.models:
        backends.append(kinds[LOCAL_PROVIDER].factory(LOCAL_PROVIDER, config.local))
    for name, section in config.providers.items():
        backends.append(kinds[section.kind].factory(name, section))
    return backends


def build_router(config: Config, backends: Sequence[Backend]) -> Router:
    return Router(
        backends,
        aliases=config.aliases,
        fallbacks=config.routing.fallbacks,
        first_chunk_timeout_s=config.routing.first_chunk_timeout_s,
    )


async def start_backends(backends: Sequence[Backend]) -> None:
    for backend in backends:
        await backend.start()


async def close_backends(backends: Sequence[Backend]) -> None:
    """Closes every backend, also when one of them fails to close."""
    for backend in backends:
        try:
            await backend.aclose()
        except Exception:
            log.exception("closing backend %s failed", backend.provider)
