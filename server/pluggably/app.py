"""Builds the gateway's backends and router from config, by the registered backend kinds."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pluggably.api.hooks import CallHook
from pluggably.config import Config
from pluggably.core import plugins
from pluggably.core.backend import Backend
from pluggably.generation.router import Router
from pluggably.security.hooks import AnonymousHook, AuthHook, RateLimitHook, StreamCapHook

if TYPE_CHECKING:
    from pluggably.catalog.manager import ModelManager
    from pluggably.security.keys import KeyStore
    from pluggably.security.ratelimit import RateLimiter

log = logging.getLogger(__name__)


def build_backends(config: Config) -> list[Backend]:
    """One backend per configured provider, and the `local` one over the config's local models
    and the model registry (downloads, models found on disk)."""
    from pluggably.catalog.registry import ModelRegistry
    from pluggably.runners import build_local_backend

    kinds = plugins.kinds()
    registry = ModelRegistry(config.storage.root / "registry.db")
    backends: list[Backend] = [build_local_backend(config.local, registry)]
    for name, section in config.providers.items():
        backends.append(kinds[section.kind].factory(name, section))
    return backends


def build_model_manager(config: Config, backends: Sequence[Backend]) -> ModelManager | None:
    """Pin, delete and rescan over the `local` backend's registry; None when there is none (a
    server built with backends of a test's own)."""
    from pluggably.catalog.manager import ModelManager
    from pluggably.runners.local import LocalBackend

    local = next((b for b in backends if isinstance(b, LocalBackend)), None)
    if local is None or local.registry is None:
        return None
    return ModelManager(local.registry, local, config.storage)


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


class StartupError(Exception):
    """The gateway must not start as configured; the message says what to change."""


@dataclass
class Operations:
    """What surrounds the data plane: keys, limits, metrics, tracing, and the hook chain over
    them. Built before the gRPC server starts; closed after it stopped."""

    hooks: list[CallHook] = field(default_factory=list)
    key_store: KeyStore | None = None
    limiter: RateLimiter | None = None
    metrics_port: int | None = None
    _closers: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)

    async def aclose(self) -> None:
        from pluggably.api.hooks import drain_observers

        drain_observers()  # the last calls' access log lines and metrics, before they close
        while self._closers:
            close = self._closers.pop()
            try:
                result = close()
                if result is not None:
                    await result
            except Exception:
                log.exception("closing %r failed", close)


async def start_operations(config: Config) -> Operations:
    """Keys, limits, metrics and tracing from config, and the hooks in the order they run.

    Observability hooks come first: their `start` never refuses, so they see every call,
    refused ones included, and what they record (`observe`, after the call) sees its final status.
    """
    ops = Operations()
    _register_secrets(config)
    try:
        if config.logging.access_log:
            from pluggably.observability.logging import AccessLogHook

            ops.hooks.append(AccessLogHook(config.logging))
        if config.metrics.enabled:
            from pluggably.observability.metrics import MetricsHook, start_metrics_server

            ops.metrics_port, stop_metrics = start_metrics_server(config.metrics)
            ops._closers.append(stop_metrics)
            ops.hooks.append(MetricsHook())
        if config.tracing.enabled:
            from pluggably.observability.tracing import TracingHook, setup_tracing

            tracing = setup_tracing(config.tracing)
            if tracing is not None:
                # Off the loop: flushing to a collector that is down takes its timeout.
                ops._closers.append(lambda: asyncio.to_thread(tracing.shutdown))
                ops.hooks.append(TracingHook(tracing))

        if config.auth.enabled:
            from pluggably.security.keys import KeyStore

            ops.key_store = KeyStore(config.auth.store)
            ops._closers.append(ops.key_store.close)
            if ops.key_store.active_count() == 0:
                raise StartupError(
                    f"auth is on and the key store {config.auth.store} holds no active API key. "
                    "Create one (`pluggably keys create --name NAME --store "
                    f"{config.auth.store}`), or turn auth off explicitly (auth.enabled: false)"
                )
            ops.hooks.append(AuthHook(ops.key_store))
        else:
            log.warning("auth is off (auth.enabled: false): every caller may use every RPC")
            ops.hooks.append(AnonymousHook())
        ops.hooks.append(StreamCapHook(config.server.max_concurrent_streams))

        from pluggably.security.ratelimit import build_rate_limiter

        # A stream slot outlives any stream (which the server ends at max_stream_duration_s),
        # so a gateway that died holding slots gives them back after this.
        ops.limiter = build_rate_limiter(
            config.limits, lease_ttl_s=config.server.max_stream_duration_s + 60
        )
        ops._closers.append(ops.limiter.aclose)
        ops.hooks.append(RateLimitHook(ops.limiter, config.limits.per_key))
    except BaseException:
        await ops.aclose()
        raise
    return ops


def _register_secrets(config: Config) -> None:
    """Tells the log redaction the exact secrets this process holds (provider keys, the hub
    token), so they are masked even where they have no recognisable shape."""
    from pluggably.observability.logging import register_secret

    for section in config.providers.values():
        key = getattr(section, "api_key", None)
        if key is not None:
            register_secret(key.get_secret_value())
        variable = getattr(section, "api_key_env", None)
        if variable:
            register_secret(os.environ.get(variable))
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        register_secret(os.environ.get(variable))
