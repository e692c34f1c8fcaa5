"""TLS with verification on everywhere: the gRPC listener (optionally mutual) and Envoy's listener,
with Envoy speaking TLS to the server. Certificates come from a throwaway CA (tls_util)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.rpc import code_pb2
from pydantic import ValidationError

from fakes import FakeBackend
from pluggably.config import ConfigError, TlsConfig
from pluggably.core.types import Modality
from pluggably.devtools.envoy import Envoy
from pluggably.security.tls import channel_credentials, server_credentials
from pluggably.server import GatewayServer
from pluggably.v1 import model_service_pb2, model_service_pb2_grpc
from tls_util import TlsFiles, make_tls_files

LIST = model_service_pb2.ListModelsRequest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


async def _gateway(config_for, tls: dict[str, object]) -> GatewayServer:
    server = GatewayServer(
        config_for([], server={"host": "127.0.0.1", "port": 0, "grace_period_s": 0, "tls": tls}),
        backends=[FakeBackend(models={"echo": Modality.TEXT})],
    )
    await server.start()
    return server


@pytest.fixture(scope="module")
async def tls_gateway(config_for, pki):
    """TLS, no client certificates."""
    server = await _gateway(
        config_for, {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    )
    yield server
    await server.stop(grace=0)


@pytest.fixture(scope="module")
async def mtls_gateway(config_for, pki):
    """Mutual TLS: no certificate from the CA, no connection."""
    server = await _gateway(
        config_for,
        {
            "cert_file": str(pki.server_cert),
            "key_file": str(pki.server_key),
            "client_ca_file": str(pki.ca),
            "require_client_cert": True,
        },
    )
    yield server
    await server.stop(grace=0)


@pytest.fixture(scope="module")
async def tls_envoy(mtls_gateway, pki, tmp_path_factory):
    """Envoy with mutual TLS on its listener, and TLS (with its own client certificate) upstream."""
    envoy = Envoy(
        mtls_gateway.port,
        tmp_path_factory.mktemp("envoy-tls"),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        client_ca=pki.ca,
        require_client_cert=True,
        upstream_ca=pki.ca,
        upstream_client_cert=pki.client_cert,
        upstream_client_key=pki.client_key,
    )
    await asyncio.to_thread(envoy.start)
    yield envoy
    envoy.stop()


async def list_models(target: str, credentials: grpc.ChannelCredentials | None) -> list[str]:
    channel = (
        grpc.aio.secure_channel(target, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        response = await stub.ListModels(LIST, timeout=5)
    return [m.id for m in response.models]


async def refused(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_models(target, credentials)
    return caught.value.code()


def https_context(pki: TlsFiles, *, client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if client_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


# --- the gRPC listener -----------------------------------------------------------------------


async def test_grpc_over_tls_with_the_right_ca(tls_gateway, pki) -> None:
    target = f"127.0.0.1:{tls_gateway.port}"
    assert await list_models(target, channel_credentials(pki.ca)) == ["fake/echo"]


async def test_grpc_client_with_another_ca_does_not_trust_the_server(tls_gateway, pki) -> None:
    target = f"127.0.0.1:{tls_gateway.port}"
    assert await refused(target, channel_credentials(pki.other_ca)) == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_client_cannot_use_the_tls_port(tls_gateway) -> None:
    assert await refused(f"127.0.0.1:{tls_gateway.port}", None) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate(mtls_gateway, pki) -> None:
    target = f"127.0.0.1:{mtls_gateway.port}"
    assert await refused(target, channel_credentials(pki.ca)) == grpc.StatusCode.UNAVAILABLE
    stranger = channel_credentials(pki.ca, pki.stranger_cert, pki.stranger_key)
    assert await refused(target, stranger) == grpc.StatusCode.UNAVAILABLE
    good = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
    assert await list_models(target, good) == ["fake/echo"]
    # By host name too: the certificate names localhost as well as 127.0.0.1.
    assert await list_models(f"localhost:{mtls_gateway.port}", good) == ["fake/echo"]


# --- through Envoy: TLS on its listener and towards the server --------------------------------


async def test_rest_through_envoy_over_tls(tls_envoy, pki) -> None:
    connector = aiohttp.TCPConnector(ssl=https_context(pki, client_cert=True))
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{tls_envoy.url}/v1/models") as r:
            assert r.status == 200, await r.text()
            assert [m["id"] for m in (await r.json())["models"]] == ["fake/echo"]
        async with http.post(
            f"{tls_envoy.url}/v1/generate:stream", json={"model": "fake/echo", "prompt": "x"}
        ) as r:
            assert r.status == 200
            assert (await r.read()).count(b"data:") == 4


async def test_envoy_listener_requires_a_client_certificate(tls_envoy, pki) -> None:
    connector = aiohttp.TCPConnector(ssl=https_context(pki, client_cert=False))
    async with aiohttp.ClientSession(connector=connector) as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"{tls_envoy.url}/v1/models") as r:
                await r.read()


async def test_envoy_listener_is_not_trusted_with_another_ca(tls_envoy, pki) -> None:
    context = ssl.create_default_context(cafile=pki.other_ca)
    context.load_cert_chain(pki.client_cert, pki.client_key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with http.get(f"{tls_envoy.url}/v1/models") as r:
                await r.read()


async def test_plaintext_http_to_envoys_tls_port_fails(tls_envoy) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{tls_envoy.http_port}/v1/models") as r:
                await r.read()


async def test_native_grpc_through_envoy_over_tls(tls_envoy, pki) -> None:
    target = f"127.0.0.1:{tls_envoy.http_port}"
    good = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
    assert await list_models(target, good) == ["fake/echo"]
    assert await refused(target, channel_credentials(pki.ca)) == grpc.StatusCode.UNAVAILABLE


async def test_envoy_verifies_the_server(mtls_gateway, pki, tmp_path: Path) -> None:
    """Envoy that trusts another CA refuses the server's certificate: 503 JSON, nothing served."""
    envoy = Envoy(
        mtls_gateway.port,
        tmp_path,
        upstream_ca=pki.other_ca,
        upstream_client_cert=pki.client_cert,
        upstream_client_key=pki.client_key,
    )
    await asyncio.to_thread(envoy.start)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{envoy.url}/v1/models") as r:
                assert r.status == 503
                body = await r.json()
            stats_url = f"http://127.0.0.1:{envoy.admin_port}/stats"
            async with http.get(stats_url, params={"filter": "ssl.fail_verify_error"}) as r:
                stats = await r.text()
    finally:
        envoy.stop()
    assert body["code"] == code_pb2.UNAVAILABLE
    # Envoy refused the server's certificate (not the other way round).
    assert "cluster.pluggably_grpc.ssl.fail_verify_error: 1" in stats


async def test_envoy_reaches_the_server_by_host_name(mtls_gateway, pki, tmp_path: Path) -> None:
    """grpc_host as a name: SNI and a DNS SAN check instead of the IP SAN."""
    envoy = Envoy(
        mtls_gateway.port,
        tmp_path,
        grpc_host="localhost",
        upstream_ca=pki.ca,
        upstream_client_cert=pki.client_cert,
        upstream_client_key=pki.client_key,
    )
    await asyncio.to_thread(envoy.start)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{envoy.url}/v1/models") as r:
            assert r.status == 200, await r.text()
    finally:
        envoy.stop()


# --- configuration errors --------------------------------------------------------------------


def test_missing_file_names_the_field(pki, tmp_path: Path) -> None:
    tls = TlsConfig(cert_file=tmp_path / "nope.crt", key_file=pki.server_key)
    with pytest.raises(ConfigError, match=r"server\.tls\.cert_file: cannot read .*nope\.crt"):
        server_credentials(tls)


def test_not_pem_names_the_field(pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key at all")
    tls = TlsConfig(cert_file=pki.server_cert, key_file=garbage)
    with pytest.raises(ConfigError, match=r"server\.tls\.key_file: .* is not a PEM file"):
        server_credentials(tls)


def test_mismatched_key_is_refused_without_showing_it(pki) -> None:
    tls = TlsConfig(cert_file=pki.server_cert, key_file=pki.client_key)
    with pytest.raises(ConfigError) as caught:
        server_credentials(tls)
    message = str(caught.value)
    assert "server.tls.cert_file / server.tls.key_file" in message
    assert "KEY_VALUES_MISMATCH" in message
    key_text = pki.client_key.read_text()
    body = "".join(key_text.splitlines()[1:-1])
    assert "PRIVATE KEY" not in message and body[:16] not in message


def test_bad_client_ca_names_the_field(pki) -> None:
    tls = TlsConfig(
        cert_file=pki.server_cert,
        key_file=pki.server_key,
        client_ca_file=pki.client_key,
        require_client_cert=True,
    )
    with pytest.raises(ConfigError, match=r"server\.tls\.client_ca_file: .* no usable CA"):
        server_credentials(tls)


def test_encrypted_key_is_refused_without_a_prompt(pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    tls = TlsConfig(cert_file=pki.server_cert, key_file=encrypted)
    with pytest.raises(ConfigError, match=r"server\.tls\.key_file: .*encrypted"):
        server_credentials(tls)


async def test_gateway_does_not_start_with_a_bad_key(config_for, pki) -> None:
    server = GatewayServer(
        config_for(
            [],
            server={
                "host": "127.0.0.1",
                "port": 0,
                "tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.client_key)},
            },
        ),
        backends=[FakeBackend()],
    )
    with pytest.raises(ConfigError, match=r"server\.tls\.key_file"):
        await server.start()


def test_client_ca_without_requiring_certificates_is_refused(pki) -> None:
    """grpc would request a client certificate and accept it unverified: not mutual TLS. The
    config refuses it when loaded; credentials refuse it too, whatever built the config."""
    with pytest.raises(ValidationError, match="require_client_cert: true"):
        TlsConfig(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca)
    tls = TlsConfig.model_construct(
        cert_file=pki.server_cert,
        key_file=pki.server_key,
        client_ca_file=pki.ca,
        require_client_cert=False,
    )
    with pytest.raises(ConfigError, match=r"server\.tls\.client_ca_file: .*require_client_cert"):
        server_credentials(tls)


def test_channel_credentials_wants_cert_and_key_together(pki) -> None:
    with pytest.raises(ConfigError, match="go together"):
        channel_credentials(pki.ca, cert_file=pki.client_cert)
