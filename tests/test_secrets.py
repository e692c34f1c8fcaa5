"""Secrets never leak: an API key, a provider key and a hub token are planted in every RPC of the
contract (in the metadata and in every string field of the request), the RPCs run with good,
bad and malformed requests and good and bad keys, and no log line, error message or metric
label may contain any of them."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message
from test_logging import Lines

from pluggably.security.keys import KeyStore
from pluggably.v1 import (
    generate_service_pb2,
    model_service_pb2,
    storage_service_pb2,
    stream_service_pb2,
)
from providers_util import KEYS, provider_stack

HUB_TOKEN = "hf_plantedHubToken0123456789abcdefXYZ"
PROVIDER_KEY = KEYS["openai"]
SERVICES = [
    module.DESCRIPTOR.services_by_name[name]
    for module, name in (
        (generate_service_pb2, "GenerateService"),
        (stream_service_pb2, "StreamService"),
        (model_service_pb2, "ModelService"),
        (storage_service_pb2, "StorageService"),
    )
]


def _planted(message: Message, secrets: tuple[str, ...], depth: int = 0) -> Message:
    """Every string field (and the first element of repeated strings and messages) carries the
    secrets, two levels deep."""
    for field in message.DESCRIPTOR.fields:
        if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            value = f"openai/x {' '.join(secrets)}"
            if field.is_repeated:
                getattr(message, field.name).append(value)
            else:
                setattr(message, field.name, value)
        elif (
            field.type == descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
            and depth < 2
            and not field.message_type.GetOptions().map_entry
            and field.message_type.full_name.startswith("pluggably.")
        ):
            if field.is_repeated:
                _planted(getattr(message, field.name).add(), secrets, depth + 1)
            elif field.containing_oneof is None or field.containing_oneof.fields[0] is field:
                _planted(getattr(message, field.name), secrets, depth + 1)
    return message


async def test_no_secret_reaches_logs_errors_or_metric_labels(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    store = KeyStore(tmp_path / "keys.db")
    api_key = store.create("planted", ["admin"])[0]
    store.close()
    secrets = (api_key, PROVIDER_KEY, HUB_TOKEN)
    captured = Lines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(captured.handler)
    root.setLevel(logging.DEBUG)
    errors: list[str] = []
    try:
        async with provider_stack(
            auth={"enabled": True, "store": str(tmp_path / "keys.db")},
            metrics={"enabled": True, "port": 0},
            logging={"level": "DEBUG"},
        ) as stack:
            channel = stack.channel
            for service in SERVICES:
                for method in service.methods:
                    path = f"/{service.full_name}/{method.name}"
                    request_cls = _message_class(method.input_type.full_name)
                    good = request_cls()
                    planted = _planted(request_cls(), secrets)
                    for payload in (
                        good.SerializeToString(),
                        planted.SerializeToString(),
                        b"\xff\x00garbage " + api_key.encode(),
                    ):
                        for key in (api_key, f"pk_0123456789ab_{HUB_TOKEN}", PROVIDER_KEY):
                            errors.extend(
                                await _call(channel, path, method.server_streaming, payload, key)
                            )
            metrics_port = stack.server.operations.metrics_port
            metrics = await asyncio.to_thread(_scrape, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        root.removeHandler(captured.handler)
        root.setLevel(old_level)

    logs = captured.stream.getvalue()
    assert logs.count('"logger":"pluggably.access"') >= 3 * 3 * 17, "every call was logged"
    assert len(errors) > 50, "the failing calls' messages were collected"
    for secret in secrets:
        assert secret not in logs
        assert not [e for e in errors if secret in e]
        assert secret not in metrics
        # Nor the secret part of a key alone.
        assert secret[-16:] not in logs and secret[-16:] not in metrics


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url) as reply:
        return reply.read().decode()


def _message_class(full_name: str) -> type[Message]:
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(full_name)


async def _call(
    channel: grpc.aio.Channel, path: str, streaming: bool, payload: bytes, key: str
) -> list[str]:
    """Runs one call; returns the texts a client sees when it fails (message and details)."""
    metadata = (("authorization", f"Bearer {key}"), ("x-hub-token", HUB_TOKEN))
    identity = lambda b: b  # noqa: E731
    try:
        if streaming:
            call = channel.unary_stream(
                path, request_serializer=identity, response_deserializer=identity
            )(payload, metadata=metadata, timeout=10)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(
                path, request_serializer=identity, response_deserializer=identity
            )(payload, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            path,
            exc.details(),
        )
        trailers = exc.trailing_metadata() or ()
        return [
            exc.details() or "",
            *(v.decode("latin-1") if isinstance(v, bytes) else v for _, v in trailers),
        ]
    return []
