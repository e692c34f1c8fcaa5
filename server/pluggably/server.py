"""The gateway process: gRPC server, health, reflection, graceful shutdown.

Start-up stays light: no torch/transformers import happens until a local model is first used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pluggably.api.interceptors import GatewayInterceptor
from pluggably.app import (
    Operations,
    StartupError,
    build_backends,
    build_model_manager,
    build_router,
    close_backends,
    start_backends,
    start_operations,
)
from pluggably.catalog.servicer import ModelServicer
from pluggably.config import Config, ConfigError, load_config
from pluggably.core.backend import Backend
from pluggably.generation.dataplane import Dataplane
from pluggably.generation.servicer import GenerateServicer, StreamServicer
from pluggably.observability.logging import configure_logging
from pluggably.storage.servicer import StorageServicer
from pluggably.v1 import (
    generate_service_pb2,
    generate_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
    storage_service_pb2,
    storage_service_pb2_grpc,
    stream_service_pb2,
    stream_service_pb2_grpc,
)

if TYPE_CHECKING:
    from pluggably.catalog.downloads import DownloadManager
    from pluggably.storage.manager import StorageManager

log = logging.getLogger("pluggably.server")

# After the grace period, streams whose generation was cut short get this long to send their
# final chunk before grpc cancels them.
_FLUSH_S = 2.0
_METADATA_HEADROOM = 4096

SERVICE_NAMES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (generate_service_pb2, "GenerateService"),
        (stream_service_pb2, "StreamService"),
        (model_service_pb2, "ModelService"),
        (storage_service_pb2, "StorageService"),
    )
)


class GatewayServer:
    """One gRPC server over a router of backends. `start()` binds; `stop()` drains and closes."""

    def __init__(self, config: Config, backends: Sequence[Backend] | None = None) -> None:
        self.config = config
        self.backends = list(build_backends(config) if backends is None else backends)
        self.router = build_router(config, self.backends)
        self.dataplane = Dataplane(self.router, config.limits)
        self.models = build_model_manager(config, self.backends)
        # Disk budget and artifact store: opened by start(), closed by stop().
        self.storage: StorageManager | None = None
        self._rescans: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self.downloads: DownloadManager | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        # Keys, limits, metrics and tracing: set up by start(), closed by stop().
        self.operations: Operations | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        from pluggably.storage.manager import StorageManager

        config = self.config
        self.operations = ops = await start_operations(config)
        try:
            self.storage = await StorageManager.open(config.storage, self.models)
            if self.models is not None:
                from pluggably.catalog.downloads import DownloadManager

                self.models.recover()
                self.downloads = DownloadManager(config.storage, self.models, self.storage)
                await self.downloads.start()
            port = await self._start_grpc(ops)
            self._retention = asyncio.create_task(self.storage.run_retention())
            if self.models is not None:
                # In the background: a large Hugging Face cache must not delay serving.
                self._rescans = asyncio.create_task(self.models.run_rescans())
            return port
        except BaseException:
            await ops.aclose()
            self.operations = None
            if self.storage is not None:
                await self.storage.aclose()
                self.storage = None
            raise

    async def _start_grpc(self, ops: Operations) -> int:
        config = self.config
        limit = config.server.max_message_bytes
        auth = config.auth

        def public(method: str) -> bool:
            return (auth.public_health and method.startswith("/grpc.health.")) or (
                auth.public_reflection and method.startswith("/grpc.reflection.")
            )

        server = grpc.aio.server(
            interceptors=[
                GatewayInterceptor(
                    ops.hooks,
                    public_methods=public,
                    max_stream_duration_s=config.server.max_stream_duration_s,
                )
            ],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # One limit, not grpc's soft/hard pair (8/16 KiB by default), between which a
                # request passes or fails at random. Envoy answers 431 at max_metadata_bytes;
                # the headroom covers what it adds (x-forwarded-proto, x-request-id,
                # x-envoy-original-path) and grpc's 32 bytes per entry, so a REST caller meets
                # one limit, Envoy's, never a random 429 from here.
                ("grpc.max_metadata_size", config.server.max_metadata_bytes + _METADATA_HEADROOM),
                (
                    "grpc.absolute_max_metadata_size",
                    config.server.max_metadata_bytes + _METADATA_HEADROOM,
                ),
                # Without this a second gateway on the same port would start and silently share
                # the traffic instead of failing.
                ("grpc.so_reuseport", 0),
            ],
        )
        generate_service_pb2_grpc.add_GenerateServiceServicer_to_server(
            GenerateServicer(
                self.dataplane,
                log_prompts=config.logging.log_prompts,
                artifacts=self.storage.artifacts if self.storage is not None else None,
            ),
            server,
        )
        stream_service_pb2_grpc.add_StreamServiceServicer_to_server(
            StreamServicer(
                self.dataplane,
                log_prompts=config.logging.log_prompts,
                artifacts=self.storage.artifacts if self.storage is not None else None,
            ),
            server,
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.router, self.models, self.downloads), server
        )
        storage_service_pb2_grpc.add_StorageServiceServicer_to_server(
            StorageServicer(self.storage), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

        address = f"{config.server.host}:{config.server.port}"
        if config.server.unix_socket is not None:
            address = f"unix:{config.server.unix_socket}"
        try:
            if config.server.tls.enabled:
                from pluggably.security.tls import server_credentials

                self.port = server.add_secure_port(address, server_credentials(config.server.tls))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpc's way of saying the address is taken or invalid
            self.port = 0
        if not self.port:
            raise OSError(
                f"cannot listen on {address} (server.host/server.port): in use or not a local address"
            )
        await start_backends(self.backends)
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drains, then closes.

        NOT_SERVING and new RPCs refused at once; in-flight RPCs get `grace` seconds to finish.
        Then the backends are closed, which ends the generations still running as CANCELLED:
        their streams still end with a `done` chunk (REST clients see a terminal event), given
        `_FLUSH_S` to get it out before grpc cancels whatever remains.
        """
        if self._server is None or self._stopped.is_set():
            return
        grace = self.config.server.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.info("shutting down: NOT_SERVING, %.1fs grace for in-flight RPCs", grace)
        stopping = asyncio.ensure_future(self._server.stop(grace + _FLUSH_S))
        await asyncio.wait([stopping], timeout=grace)
        for task in (self._rescans, self._retention):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.downloads is not None:
            await self.downloads.aclose()
        await close_backends(self.backends)
        await stopping
        if self.storage is not None:
            await self.storage.aclose()
        if self.operations is not None:
            await self.operations.aclose()
        self._stopped.set()


def process_age_s(fallback_start: float) -> float:
    """Seconds since this process started (interpreter start-up and imports included) on Linux;
    elsewhere, since `fallback_start`."""
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - fallback_start


async def serve(config: Config, started_at: float) -> None:
    server = GatewayServer(config)
    port = await server.start()
    log.info(
        "pluggably serving on %s:%d (SERVING %.2f s after process start; models: %s)",
        config.server.host,
        port,
        process_age_s(started_at),
        ", ".join(m.id for m in await server.router.list_models()) or "none",
    )
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    started_at = time.perf_counter()
    parser = argparse.ArgumentParser(prog="pluggably-server", description=__doc__)
    parser.add_argument(
        "--config", help="YAML config file (default: $PLUGGABLY_CONFIG, else built-in defaults)"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pluggably: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging)
    try:
        asyncio.run(serve(config, started_at))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
