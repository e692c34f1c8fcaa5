"""TLS credentials for the gRPC listener (`server.tls`) and for clients that call it.

Files are checked when the server starts, not at the first handshake: a missing file, a file that
is not PEM, or a key that does not belong to its certificate fails start-up with the name of the
config field. Messages name paths and fields only, never file contents.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from pluggably.config import ConfigError, TlsConfig


def _read(path: Path, field: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {str(path)!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{field}: {str(path)!r} is not a PEM file")
    return data


def _refuse_encrypted_key() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ConfigError("the private key is encrypted: give an unencrypted PEM key")


def _check_pair(cert_file: Path, key_file: Path, cert_field: str, key_field: str) -> None:
    # grpc reports a bad or mismatched pair only at the first handshake, as a failed connection;
    # the stdlib loads the same PEM files now and names the problem.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_encrypted_key)
    except ConfigError as exc:
        raise ConfigError(f"{key_field}: {exc}") from None
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert_field} / {key_field}: {str(cert_file)!r} and {str(key_file)!r} are not a "
            f"usable certificate and matching private key ({exc.reason or 'unreadable'})"
        ) from None


def _check_ca(ca_file: Path, field: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{field}: {str(ca_file)!r} holds no usable CA certificate ({exc.reason or 'unreadable'})"
        ) from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Credentials for `server.add_secure_port`: TLS, or mutual TLS with `client_ca_file`.

    Mutual TLS needs `require_client_cert` as well: grpc for Python can require and verify a
    client certificate, or request one without verifying it, but not verify an optional one.
    Accepting unverified certificates would look like mutual TLS without being it, so a CA
    without `require_client_cert` is refused rather than half applied.
    """
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError("server.tls: cert_file and key_file are needed for TLS")
    if tls.client_ca_file is not None and not tls.require_client_cert:
        raise ConfigError(
            "server.tls.client_ca_file: the gRPC listener can verify client certificates only "
            "when it requires them: set server.tls.require_client_cert: true, or drop "
            "client_ca_file"
        )
    cert = _read(tls.cert_file, "server.tls.cert_file")
    key = _read(tls.key_file, "server.tls.key_file")
    _check_pair(tls.cert_file, tls.key_file, "server.tls.cert_file", "server.tls.key_file")
    client_ca: bytes | None = None
    if tls.client_ca_file is not None:
        client_ca = _read(tls.client_ca_file, "server.tls.client_ca_file")
        _check_ca(tls.client_ca_file, "server.tls.client_ca_file")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca_file: Path | str,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
) -> grpc.ChannelCredentials:
    """Credentials for a client: trust `ca_file`; present `cert_file`/`key_file` for mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError("cert_file and key_file go together: give both or neither")
    root = _read(Path(ca_file), "ca_file")
    _check_ca(Path(ca_file), "ca_file")
    if cert_file is None or key_file is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    cert = _read(Path(cert_file), "cert_file")
    key = _read(Path(key_file), "key_file")
    _check_pair(Path(cert_file), Path(key_file), "cert_file", "key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )
