"""Local models in worker processes: started on first use, restarted after a crash, the least
recently used stopped when the pool is full.

Each model runs in its own process (`runners/worker.py`), reached over a Unix socket through a
`RemoteBackend`, so its generation threads never share the gateway's interpreter. The pool keeps
at most `max_workers` processes: a model that needs one when the pool is full stops the least
recently used idle worker; when every worker is busy, the call is refused (RESOURCE_EXHAUSTED
with a retry hint) rather than waiting behind an unknown number of generations. A worker that
exits (crash, OOM kill) fails its in-flight calls with UNAVAILABLE (the remote call breaks) and
is started again by the next call. A worker that cannot start says why: the tail of its stderr
goes into the UNAVAILABLE message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluggably.core.errors import ResourceExhausted, Unavailable
from pluggably.core.types import Chunk, GenerationRequest
from pluggably.runners.remote import RemoteBackend

log = logging.getLogger(__name__)

# How long a worker may take to import its libraries and answer its first health check (loading
# the model happens later, on its first request, and counts against that request).
START_TIMEOUT_S = 120.0
_STDERR_TAIL = 2000


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclasses.dataclass
class _Worker:
    name: str
    settings: dict[str, Any]
    socket: Path
    process: asyncio.subprocess.Process
    backend: RemoteBackend
    stderr: bytearray = dataclasses.field(default_factory=bytearray)
    in_flight: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    watcher: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.process.returncode is None


class WorkerPool:
    def __init__(
        self,
        *,
        max_workers: int = 2,
        threads_per_worker: int = 0,
        max_memory_bytes: int | None = None,
    ) -> None:
        self.max_workers = max_workers
        self.max_memory_bytes = max_memory_bytes
        self.threads_per_worker = threads_per_worker or max(
            1, (os.cpu_count() or 1) // max(1, max_workers)
        )
        self._dir = Path(tempfile.mkdtemp(prefix="pluggably-workers-"))
        os.chmod(self._dir, 0o700)
        self._workers: dict[str, _Worker] = {}
        self._starting: dict[str, asyncio.Task[_Worker]] = {}
        self._lock = asyncio.Lock()
        self._closed = False
        self._serial = 0

    # ---- what the local backend uses ---------------------------------------------------------

    async def generate(
        self, name: str, settings: dict[str, Any], request: GenerationRequest
    ) -> AsyncGenerator[Chunk, None]:
        """Generates with model `name` in its worker (started if needed)."""
        worker = await self._worker(name, settings)
        worker.in_flight += 1
        worker.last_used = time.monotonic()
        try:
            remote = dataclasses.replace(request, model=f"local/{name}")
            async for chunk in worker.backend.generate(remote):
                yield chunk
        except Unavailable as exc:
            # A broken call may be seen before the process's exit is: give it a moment.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.process.wait()), 0.5)
            if not worker.alive:
                raise Unavailable(
                    f"the runner process of local/{name} exited "
                    f"(code {worker.process.returncode}) during the request; the next request "
                    "starts it again",
                    reason="RUNNER_CRASHED",
                ) from exc
            raise
        finally:
            worker.in_flight -= 1
            worker.last_used = time.monotonic()
            if self.max_memory_bytes is not None and not worker.in_flight:
                await self._within_memory(keep=worker)

    def in_use(self, name: str) -> bool:
        worker = self._workers.get(name)
        return worker is not None and worker.in_flight > 0

    def pid(self, name: str) -> int | None:
        worker = self._workers.get(name)
        return worker.process.pid if worker is not None and worker.alive else None

    async def stop(self, name: str) -> bool:
        """Stops `name`'s worker if it is idle; False while it serves."""
        worker = self._workers.get(name)
        if worker is None:
            return True
        if worker.in_flight:
            return False
        await self._stop(worker)
        return True

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._starting.values()):
            task.cancel()
        for worker in list(self._workers.values()):
            await self._stop(worker)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def _worker(self, name: str, settings: dict[str, Any]) -> _Worker:
        if self._closed:
            raise Unavailable("the local runners are shutting down", reason="RUNNER_SHUTDOWN")
        worker = self._workers.get(name)
        if worker is not None and worker.alive and worker.settings == settings:
            return worker
        async with self._lock:
            worker = self._workers.get(name)
            if worker is not None and worker.alive and worker.settings == settings:
                return worker
            if worker is not None:  # exited, or its settings changed
                if worker.in_flight and worker.alive:
                    return worker  # the new settings apply once it is idle
                await self._stop(worker)
            await self._make_room()
            worker = await self._start(name, settings)
            self._workers[name] = worker
            return worker

    def memory_bytes(self) -> int:
        """Resident memory of the live workers (from /proc; 0 where it cannot be read)."""
        return sum(_rss(w.process.pid) for w in self._workers.values() if w.alive)

    async def _within_memory(self, keep: _Worker | None = None) -> None:
        """Stops least recently used idle workers while the workers use more memory than
        `max_memory_bytes` (never `keep`, never a busy one)."""
        limit = self.max_memory_bytes
        if limit is None:
            return
        while self.memory_bytes() > limit:
            idle = [
                w for w in self._workers.values() if w.alive and not w.in_flight and w is not keep
            ]
            if not idle:
                return
            victim = min(idle, key=lambda w: w.last_used)
            log.info(
                "stopping the runner of local/%s: workers use %d bytes, over %d "
                "(local.workers.max_memory_bytes)",
                victim.name,
                self.memory_bytes(),
                limit,
            )
            await self._stop(victim)

    async def _make_room(self) -> None:
        await self._within_memory()
        alive = [w for w in self._workers.values() if w.alive]
        while len(alive) >= self.max_workers:
            idle = [w for w in alive if w.in_flight == 0]
            if not idle:
                raise ResourceExhausted(
                    f"all {self.max_workers} local runner processes are busy "
                    "(local.workers.max_workers); retry shortly",
                    subject="local.workers.max_workers",
                    retry_after_s=1.0,
                    reason="RUNNERS_BUSY",
                )
            victim = min(idle, key=lambda w: w.last_used)
            log.info("stopping the runner of local/%s to make room", victim.name)
            await self._stop(victim)
            alive = [w for w in self._workers.values() if w.alive]

    async def _start(self, name: str, settings: dict[str, Any]) -> _Worker:
        self._serial += 1
        socket = self._dir / f"w{self._serial}.sock"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pluggably.runners.worker",
            "--socket",
            str(socket),
            "--model",
            json.dumps({**settings, "name": name}, default=str),
            "--threads",
            str(self.threads_per_worker),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        backend = RemoteBackend("local", f"unix:{socket}")
        worker = _Worker(name, settings, socket, process, backend)
        worker.watcher = asyncio.create_task(self._watch(worker))
        try:
            await self._wait_serving(worker)
        except BaseException:
            await self._stop(worker)
            raise
        log.info("started the runner of local/%s (pid %d)", name, process.pid)
        return worker

    async def _watch(self, worker: _Worker) -> None:
        """Keeps the tail of the worker's stderr (for errors) and notices its exit."""
        assert worker.process.stderr is not None
        while True:
            line = await worker.process.stderr.readline()
            if not line:
                break
            worker.stderr += line
            del worker.stderr[: max(0, len(worker.stderr) - _STDERR_TAIL)]
        code = await worker.process.wait()
        if code and not self._closed:
            log.warning("the runner of local/%s exited with code %d", worker.name, code)

    async def _wait_serving(self, worker: _Worker) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with grpc.aio.insecure_channel(f"unix:{worker.socket}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not worker.alive:
                    break
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)
        if worker.watcher is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.watcher), 2)
        tail = worker.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise Unavailable(
            f"the runner process of local/{worker.name} did not start"
            + (f": {' / '.join(tail)}" if tail else ""),
            reason="RUNNER_START_FAILED",
        )

    async def _stop(self, worker: _Worker) -> None:
        if self._workers.get(worker.name) is worker:
            del self._workers[worker.name]
        if worker.alive:
            worker.process.terminate()
            try:
                await asyncio.wait_for(worker.process.wait(), 10)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
        if worker.watcher is not None:
            worker.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker.watcher
        await worker.backend.aclose()
        with contextlib.suppress(FileNotFoundError):
            worker.socket.unlink()
