"""A real, throwaway redis-server for tests (Debian's `redis-server` package; CI installs it)."""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import time
from types import TracebackType

import pytest

REDIS_SERVER = "/usr/bin/redis-server"
_READY = b"Ready to accept connections"


def redis_server_binary() -> str:
    """The redis-server to run; fails the test (never skips) when there is none."""
    found = shutil.which("redis-server") or (REDIS_SERVER if os.path.exists(REDIS_SERVER) else None)
    if found is None:
        pytest.fail(
            "redis-server is not installed: `apt-get install redis-server` (the rate-limit "
            "tests need a real Redis)",
            pytrace=False,
        )
    return found


def _command(*parts: bytes) -> bytes:
    """One command in RESP, the Redis protocol."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """`with RedisServer() as redis: redis.url` runs redis-server on a free loopback port,
    without persistence, and stops it on exit."""

    def __init__(self, *, start_timeout_s: float = 10.0) -> None:
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisServer:
        binary = redis_server_binary()
        # The port is chosen before redis binds it: another process may take it in between,
        # so a start that fails is tried again on another port.
        last_output = b""
        for _ in range(3):
            self.port = free_port()
            proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "yes",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            ready, last_output = self._wait_ready(proc)
            if ready:
                self._proc = proc
                return self
            self._stop(proc)
        raise RuntimeError(
            f"redis-server did not start: {last_output.decode(errors='replace')[-2000:]}"
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> tuple[bool, bytes]:
        """Reads redis' log until it says it accepts connections (or exits, or times out)."""
        assert proc.stdout is not None
        output = b""
        deadline = time.monotonic() + self._start_timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while _READY not in output:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return False, output
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:  # exited (e.g. the port was taken)
                    return False, output
                output += chunk
        # From here on nobody reads the pipe: keep redis from logging into it.
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(_command(b"CONFIG", b"SET", b"loglevel", b"warning"))
            reply = conn.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"redis-server refused CONFIG SET loglevel: {reply!r}")
        return True, output

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            self._stop(self._proc)
            self._proc = None
