"""Replies Envoy makes itself, through the real Envoy: google.rpc.Status JSON with the right status.

Also the limits Envoy enforces for the server (body and header size, rendered from the server's
config) and the rendered configuration itself (validated by `envoy --mode validate`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import pytest
import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from fakes import FakeBackend
from pluggably.config import ServerConfig
from pluggably.core.types import Modality
from pluggably.devtools import envoy as envoy_config
from pluggably.devtools.envoy import (
    SHIPPED_CONFIG,
    Envoy,
    envoy_binary,
    free_port,
    render_config,
    write_config,
)
from pluggably.server import GatewayServer
from pluggably.v1 import (
    generation_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    storage_service_pb2,
)
from tls_util import TlsFiles, make_tls_files

# Small limits keep the bodies small; the server and Envoy get the same ones, as in production.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_METADATA_BYTES = 8 * 1024
ECHO = {"model": "fake/echo", "prompt": "x"}


@pytest.fixture(scope="module")
async def stack(config_for, tmp_path_factory):
    backend = FakeBackend(models={"echo": Modality.TEXT, "slow": Modality.TEXT})
    backend.first_delay_s["slow"] = 10.0
    server = GatewayServer(
        config_for(
            [],
            server={
                "host": "127.0.0.1",
                "port": 0,
                "grace_period_s": 0,
                "max_message_bytes": MAX_MESSAGE_BYTES,
                "max_metadata_bytes": MAX_METADATA_BYTES,
            },
        ),
        backends=[backend],
    )
    await server.start()
    envoy = Envoy(
        server.port,
        tmp_path_factory.mktemp("envoy-errors"),
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_metadata_bytes=MAX_METADATA_BYTES,
    )
    await asyncio.to_thread(envoy.start)
    yield server, envoy
    envoy.stop()
    await server.stop(grace=0)


@pytest.fixture(scope="module")
async def envoy_without_upstream(tmp_path_factory):
    """Envoy in front of a port where nothing listens."""
    envoy = Envoy(free_port(), tmp_path_factory.mktemp("envoy-closed"))
    await asyncio.to_thread(envoy.start)
    yield envoy
    envoy.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def status_of(response: aiohttp.ClientResponse) -> status_pb2.Status:
    """The body as a google.rpc.Status; fails unless it is exactly that, as JSON."""
    assert response.headers["content-type"] == "application/json", await response.text()
    return json_format.Parse(await response.text(), status_pb2.Status())


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == "pluggably.dev"
    return info


def http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return cast(list[dict[str, Any]], hcm["typed_config"]["http_filters"])


def lua_source(config: dict[str, Any]) -> dict[str, str]:
    (lua,) = [f for f in http_filters(config) if f["name"] == "envoy.filters.http.lua"]
    return cast(dict[str, str], lua["typed_config"]["default_source_code"])


def validate(path: Path) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the rendered configuration ------------------------------------------------------------


def test_renderer_defaults_are_the_shipped_file_and_the_server_defaults() -> None:
    """The shipped file holds ServerConfig's defaults, so rendering it with them changes nothing."""
    defaults = ServerConfig()
    assert envoy_config.DEFAULT_MAX_MESSAGE_BYTES == defaults.max_message_bytes
    assert envoy_config.DEFAULT_MAX_METADATA_BYTES == defaults.max_metadata_bytes
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    rendered = render_config(50051, 8080, 9901, repo_root=Path())
    # Only the Lua check's tables differ: empty in the file, generated from the descriptor set.
    shipped_lua, rendered_lua = lua_source(shipped), lua_source(rendered)
    stub, _, logic = shipped_lua["inline_string"].partition("\n")
    assert stub.startswith("local RULES, TYPES = {}, {}")
    assert rendered_lua["inline_string"].endswith("\n" + logic)
    assert '"pluggably.v1.GenerateRequest"' in rendered_lua["inline_string"]
    rendered_lua["inline_string"] = shipped_lua["inline_string"]
    assert rendered == shipped


@pytest.mark.parametrize("with_tls", [False, True], ids=["plaintext", "tls"])
def test_rendered_config_validates(tmp_path: Path, with_tls: bool) -> None:
    tls: dict[str, Any] = {}
    if with_tls:
        files = make_tls_files(tmp_path)
        tls = {
            "tls_cert": files.server_cert,
            "tls_key": files.server_key,
            "client_ca": files.ca,
            "require_client_cert": True,
            "upstream_ca": files.ca,
            "upstream_client_cert": files.client_cert,
            "upstream_client_key": files.client_key,
        }
    config = write_config(
        tmp_path / "envoy.yaml",
        free_port(),
        free_port(),
        free_port(),
        max_message_bytes=1024 * 1024,
        max_metadata_bytes=16 * 1024,
        **tls,
    )
    validate(config)
    rendered = yaml.safe_load(config.read_text())
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["typed_config"]["max_request_headers_kb"] == 16
    chain = rendered["static_resources"]["listeners"][0]["filter_chains"][0]
    cluster = rendered["static_resources"]["clusters"][0]
    assert ("transport_socket" in chain) == with_tls
    assert ("transport_socket" in cluster) == with_tls


def test_dns_upstream_validates_with_sni(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    config = write_config(
        tmp_path / "envoy.yaml",
        free_port(),
        free_port(),
        free_port(),
        grpc_host="localhost",
        upstream_ca=files.ca,
    )
    validate(config)
    cluster = yaml.safe_load(config.read_text())["static_resources"]["clusters"][0]
    assert cluster["type"] == "STRICT_DNS"
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "localhost"
    san = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert san == [{"san_type": "DNS", "matcher": {"exact": "localhost"}}]


def test_renderer_refuses_half_a_tls_setup(tmp_path: Path) -> None:
    files: TlsFiles = make_tls_files(tmp_path)
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        render_config(1, 2, 3, tls_cert=files.server_cert)
    with pytest.raises(ValueError, match="require_client_cert needs client_ca"):
        render_config(
            1, 2, 3, tls_cert=files.server_cert, tls_key=files.server_key, require_client_cert=True
        )
    with pytest.raises(ValueError, match="upstream_client_cert"):
        render_config(1, 2, 3, upstream_client_cert=files.client_cert)


def test_main_renders_the_limits_and_tls(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    out = tmp_path / "rendered.yaml"
    envoy_config.main(
        [
            "render",
            "--max-message-bytes",
            "2048",
            "--max-metadata-bytes",
            "4096",
            "--tls-cert",
            str(files.server_cert),
            "--tls-key",
            str(files.server_key),
            "--upstream-ca",
            str(files.ca),
            "-o",
            str(out),
        ]
    )
    text = out.read_text()
    rendered = yaml.safe_load(text)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["typed_config"]["max_request_headers_kb"] == 4
    assert "request body larger than 2048 bytes (server.max_message_bytes)" in text
    assert "transport_socket" in rendered["static_resources"]["clusters"][0]


# --- local replies through the real Envoy ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "http_status", "code", "reason", "says"),
    [
        (
            "POST",
            "/v1/generate",
            b'{"model": "fake/echo", "prompt": ',
            400,
            code_pb2.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "Unexpected end of string",
        ),
        (
            "GET",
            "/v1/nothing-here",
            None,
            404,
            code_pb2.NOT_FOUND,
            "METHOD_NOT_FOUND",
            "/v1/nothing-here",
        ),
        (
            "DELETE",
            "/v1/generate",
            None,
            404,
            code_pb2.NOT_FOUND,
            "METHOD_NOT_FOUND",
            "Could not resolve",
        ),
        (
            "GET",
            "/v1/models?bogus=1",
            None,
            400,
            code_pb2.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            '"bogus"',
        ),
    ],
    ids=["malformed-json", "unknown-path", "unknown-verb", "unknown-query-parameter"],
)
async def test_rejections_are_status_json(
    stack, http, method, path, body, http_status, code, reason, says
) -> None:
    _server, envoy = stack
    async with http.request(
        method,
        f"{envoy.url}{path}",
        data=body,
        headers={"content-type": "application/json", "x-request-id": "rejected-1"},
    ) as r:
        assert r.status == http_status
        assert r.headers["x-request-id"] == "rejected-1"
        status = await status_of(r)
    assert status.code == code and says in status.message
    info = error_info(status)
    assert info.reason == reason
    assert info.metadata["request_id"] == "rejected-1"


async def test_server_errors_keep_their_details(stack, http) -> None:
    """The gateway's own errors are not local replies: every detail survives."""
    _server, envoy = stack
    async with http.post(
        f"{envoy.url}/v1/generate", json={"model": "fake/nope", "prompt": "x"}
    ) as r:
        assert r.status == 404
        status = await status_of(r)
    assert status.code == code_pb2.NOT_FOUND
    assert error_info(status).reason == "MODEL_NOT_FOUND"
    resource = error_details_pb2.ResourceInfo()
    assert any(d.Unpack(resource) for d in status.details)
    assert resource.resource_name == "fake/nope"


async def test_openapi_document_is_not_rewritten(stack, http) -> None:
    """Envoy serves /openapi.json as a local reply too: below 400, the mappers leave it alone."""
    _server, envoy = stack
    async with http.get(f"{envoy.url}/openapi.json") as r:
        assert r.status == 200
        assert "paths" in json.loads(await r.read())


async def test_body_over_the_message_limit_is_413(stack, http) -> None:
    _server, envoy = stack
    filler = MAX_MESSAGE_BYTES - len(json.dumps({**ECHO, "prompt": ""}).encode())
    at_limit = json.dumps({**ECHO, "prompt": "x" * filler}).encode()
    assert len(at_limit) == MAX_MESSAGE_BYTES
    headers = {"content-type": "application/json"}
    async with http.post(f"{envoy.url}/v1/generate", data=at_limit, headers=headers) as r:
        assert r.status == 200, await r.text()
    async with http.post(f"{envoy.url}/v1/generate", data=at_limit + b" ", headers=headers) as r:
        assert r.status == 413
        status = await status_of(r)
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert (
        status.message
        == f"request body larger than {MAX_MESSAGE_BYTES} bytes (server.max_message_bytes)"
    )
    assert error_info(status).reason == "REQUEST_TOO_LARGE"


async def test_streamed_request_body_over_the_limit_is_413(stack, http) -> None:
    """Chunked (no content-length): the limit still holds."""
    _server, envoy = stack

    async def chunks():
        yield b'{"model": "fake/echo", "prompt": "'
        for _ in range(MAX_MESSAGE_BYTES // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'

    async with http.post(
        f"{envoy.url}/v1/generate:stream",
        data=chunks(),
        headers={"content-type": "application/json"},
    ) as r:
        assert r.status == 413
        assert error_info(await status_of(r)).reason == "REQUEST_TOO_LARGE"


async def test_large_header_is_431_every_time(stack, http) -> None:
    _server, envoy = stack
    for _ in range(20):
        async with http.post(
            f"{envoy.url}/v1/generate", json=ECHO, headers={"x-big": "a" * 12 * 1024}
        ) as r:
            assert r.status == 431
            status = await status_of(r)
        assert status.code == code_pb2.INVALID_ARGUMENT
        assert status.message == (
            f"request headers larger than {MAX_METADATA_BYTES} bytes (server.max_metadata_bytes)"
        )
        assert error_info(status).reason == "HEADERS_TOO_LARGE"


async def test_native_grpc_header_over_the_limit_is_refused(stack) -> None:
    """Over HTTP/2, Envoy resets the stream (no 431 there): refused, never served at random."""
    _server, envoy = stack
    async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.http_port}") as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListModels(
                    model_service_pb2.ListModelsRequest(), metadata=[("x-big", "a" * 12 * 1024)]
                )
            assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert (await stub.ListModels(model_service_pb2.ListModelsRequest())).models


async def test_upstream_down_is_503_json(envoy_without_upstream, http) -> None:
    async with http.get(f"{envoy_without_upstream.url}/v1/models") as r:
        assert r.status == 503
        status = await status_of(r)
    assert status.code == code_pb2.UNAVAILABLE
    assert "connection failure" in status.message
    assert error_info(status).reason == "UPSTREAM_UNAVAILABLE"
    async with http.post(f"{envoy_without_upstream.url}/v1/generate:stream", json=ECHO) as r:
        assert r.status == 503
        assert error_info(await status_of(r)).reason == "UPSTREAM_UNAVAILABLE"


async def test_upstream_down_over_native_grpc_is_a_plain_status(envoy_without_upstream) -> None:
    """gRPC callers get UNAVAILABLE with Envoy's text, not JSON inside grpc-message."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy_without_upstream.http_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await model_service_pb2_grpc.ModelServiceStub(ch).ListModels(
                model_service_pb2.ListModelsRequest()
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details().startswith("upstream connect error")


async def test_route_timeout_is_504_json(stack, http, tmp_path: Path) -> None:
    """The shipped routes have no timeout (streams run long); one added here shows the mapping."""
    server, _envoy = stack
    envoy = Envoy(server.port, tmp_path)
    config = yaml.safe_load(envoy.config.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for route in hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]:
        if "route" in route:
            route["route"]["timeout"] = "0.3s"
    envoy.config.write_text(yaml.safe_dump(config))
    await asyncio.to_thread(envoy.start)
    try:
        async with http.post(f"{envoy.url}/v1/generate", json={**ECHO, "model": "fake/slow"}) as r:
            assert r.status == 504
            status = await status_of(r)
    finally:
        envoy.stop()
    assert status.code == code_pb2.DEADLINE_EXCEEDED
    assert status.message == "upstream request timeout"
    assert error_info(status).reason == "UPSTREAM_TIMEOUT"


# --- unknown fields in REST bodies (the Lua check generated from the descriptor set) ----------


def unknown_field_violation(
    status: status_pb2.Status,
) -> error_details_pb2.BadRequest.FieldViolation:
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details), status
    (violation,) = bad.field_violations
    return violation


@pytest.mark.parametrize(
    ("path", "body", "field", "type_name"),
    [
        ("/v1/generate", {**ECHO, "bogus": 1}, "bogus", "GenerateRequest"),
        ("/v1/generate:stream", {**ECHO, "bogus": 1}, "bogus", "GenerateRequest"),
        (
            "/v1/generate",
            {**ECHO, "text": {"maxTokens": 3, "max_tokenz": 2}},
            "text.max_tokenz",
            "TextOptions",
        ),
        (
            "/v1/generate",
            {
                "model": "fake/echo",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "user", "parts": [{"text": "a", "imag": {}}]},
                ],
            },
            "messages[1].parts[0].imag",
            "ContentPart",
        ),
        (
            "/v1/generate",
            {**ECHO, "tools": [{"function": {"name": "f", "parameter": {}}}]},
            "tools[0].function.parameter",
            "FunctionDeclaration",
        ),
        ("/v1/downloads/abc:cancel", {"force": True}, "force", "CancelDownloadRequest"),
        (
            "/v1/models:download",
            {"repoId": "a/b", "revison": "main"},
            "revison",
            "DownloadModelRequest",
        ),
        ("/v1/generate", {**ECHO, 'we"ird\u00e9': 1}, "we?ird?", "GenerateRequest"),
    ],
    ids=[
        "top-level",
        "stream",
        "nested",
        "in-a-list",
        "deeper",
        "path-variable",
        "download",
        "odd-name",
    ],
)
async def test_unknown_body_field_is_400_naming_it(
    stack, http, path, body, field, type_name
) -> None:
    _server, envoy = stack
    async with http.post(f"{envoy.url}{path}", json=body, headers={"x-request-id": "uf-1"}) as r:
        assert r.status == 400
        status = await status_of(r)
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message.startswith(f"invalid request: {field}: unknown field")
    violation = unknown_field_violation(status)
    assert violation.field == field
    assert violation.description == (
        f"unknown field (pluggably.v1.{type_name} has no field by this name)"
    )
    info = error_info(status)
    assert info.reason == "INVALID_ARGUMENT" and info.metadata["request_id"] == "uf-1"


@pytest.mark.parametrize(
    "body",
    [
        # Both spellings the transcoder accepts: JSON (lowerCamel) and proto names.
        {
            **ECHO,
            "text": {"maxTokens": 2, "top_p": 0.5},
            "fallback_models": [],
            "fallbackModels": [],
        },
        # Escapes in keys mean what they say.
        {"m\u006fdel": "fake/echo", "prompt": "x"},
        # Free-form JSON (Struct, Value) is not looked into.
        {**ECHO, "providerOptions": {"anything": {"goes": [1, {"here": None}]}}},
        {
            **ECHO,
            "tools": [
                {"function": {"name": "f", "parameters": {"type": "object", "x-any": {"k": []}}}}
            ],
        },
        # Strings that look like JSON structure are skipped as strings.
        {**ECHO, "prompt": 'x", "bogus": {"[": 1} \\"', "fallbackModels": ['"]}', "\\"]},
        # Nulls where messages go.
        {**ECHO, "text": None, "messages": None},
    ],
    ids=[
        "both-spellings",
        "escaped-key",
        "struct-and-value",
        "struct-in-tools",
        "tricky-strings",
        "nulls",
    ],
)
async def test_known_fields_are_not_refused(stack, http, body) -> None:
    _server, envoy = stack
    async with http.post(f"{envoy.url}/v1/generate", json=body) as r:
        text = await r.text()
    assert "unknown field (" not in text, text


def _populate(message: Message, variant: int, choices: list[int]) -> None:
    """Sets every field, recursively: the widest request. Of the k-th oneof with a choice met,
    member (variant // 3**k) % n is set, so variants 0..3**k-1 cover every combination."""
    descriptor = message.DESCRIPTOR
    chosen = {}
    for oneof in descriptor.oneofs:
        index = 0
        if len(oneof.fields) > 1:
            index = (variant // 3 ** len(choices)) % len(oneof.fields)
            choices.append(index)
        chosen[oneof.name] = oneof.fields[index].name
    for field in descriptor.fields:
        if field.containing_oneof and chosen[field.containing_oneof.name] != field.name:
            continue
        value = getattr(message, field.name)
        target = field.message_type
        if target is not None and target.GetOptions().map_entry:
            entry = target.fields_by_name["value"]
            if entry.message_type is not None:
                _fill_message(value["key"], variant, choices)
            else:
                value["key"] = _scalar(entry)
        elif field.is_repeated:
            if target is not None:
                _fill_message(value.add(), variant, choices)
            else:
                value.append(_scalar(field))
        elif target is not None:
            _fill_message(value, variant, choices)
        else:
            setattr(message, field.name, _scalar(field))


def _fill_message(message: Message, variant: int, choices: list[int]) -> None:
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        message.update({"free": {"form": [1, "x"]}})
    elif name == "google.protobuf.Value":
        message.string_value = "v"
    elif name == "google.protobuf.Duration":
        message.FromSeconds(60)
    elif not name.startswith("google.protobuf."):
        _populate(message, variant, choices)
        if not message.ListFields():  # an empty message still says it is there
            message.SetInParent()


def _scalar(field: FieldDescriptor) -> object:
    if field.enum_type is not None:
        return field.enum_type.values[-1].number
    return {
        FieldDescriptor.CPPTYPE_STRING: "s" if field.type != FieldDescriptor.TYPE_BYTES else b"b",
        FieldDescriptor.CPPTYPE_BOOL: True,
        FieldDescriptor.CPPTYPE_FLOAT: 0.5,
        FieldDescriptor.CPPTYPE_DOUBLE: 0.5,
    }.get(field.cpp_type, 1)


@pytest.mark.parametrize("proto_names", [False, True], ids=["json-names", "proto-names"])
async def test_every_field_of_every_body_passes_the_check(stack, http, proto_names) -> None:
    """Each REST body message with all its fields set (every oneof member in turn) is let through."""
    _server, envoy = stack
    bodies = {
        "/v1/generate": generation_pb2.GenerateRequest,
        "/v1/generate:stream": generation_pb2.GenerateRequest,
        "/v1/models:download": model_service_pb2.DownloadModelRequest,
        "/v1/models:rescan": model_service_pb2.RescanModelsRequest,
        "/v1/downloads/abc:cancel": model_service_pb2.CancelDownloadRequest,
        "/v1/storage:prune": storage_service_pb2.PruneStorageRequest,
    }
    for path, message_type in bodies.items():
        seen: set[str] = set()
        for variant in range(27):
            message, choices = message_type(), []
            _populate(message, variant, choices)
            assert len(choices) <= 3, "more oneofs than variants: raise the range"
            if path.startswith("/v1/downloads/"):
                message.ClearField("id")  # bound by the path
            body = json_format.MessageToJson(message, preserving_proto_field_name=proto_names)
            if body in seen:
                continue
            seen.add(body)
            async with http.post(
                f"{envoy.url}{path}", data=body, headers={"content-type": "application/json"}
            ) as r:
                text = await r.text()
            assert "unknown field (" not in text, f"{path}: {text}\n{body}"


async def test_malformed_json_is_still_the_transcoders_to_answer(stack, http) -> None:
    _server, envoy = stack
    for body in (b'{"model": ', b'{"model": "fake/echo", "prompt": "x"} trailing', b"[1, 2]"):
        async with http.post(
            f"{envoy.url}/v1/generate", data=body, headers={"content-type": "application/json"}
        ) as r:
            assert r.status == 400
            assert "unknown field (" not in (await status_of(r)).message


async def test_deep_nesting_is_refused_and_envoy_keeps_serving(stack, http) -> None:
    _server, envoy = stack
    for key in ("fallbackModels", "messages", "providerOptions"):
        nested = f'{{"model": "fake/echo", "prompt": "x", "{key}": {"[" * 5000}{"]" * 5000}}}'
        async with http.post(
            f"{envoy.url}/v1/generate",
            data=nested.encode(),
            headers={"content-type": "application/json"},
        ) as r:
            assert r.status == 400
            await status_of(r)
    async with http.post(f"{envoy.url}/v1/generate", json=ECHO) as r:
        assert r.status == 200


def test_the_check_can_be_left_out(tmp_path: Path) -> None:
    assert '"^/v1/generate$"' in lua_source(render_config(1, 2, 3))["inline_string"]
    config = write_config(tmp_path / "envoy.yaml", 1, 2, 3, reject_unknown_fields=False)
    assert "envoy.filters.http.lua" not in config.read_text()
    validate(config)
