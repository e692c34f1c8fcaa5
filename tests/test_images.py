"""Image generation through the gateway, whatever produces the image: options checked against
the model, the files stored in the artifact store and returned by reference (inline on request),
unary and streaming."""

from __future__ import annotations

import hashlib
import struct
import zlib

import grpc
import pytest

from fakes import FakeBackend
from pluggably.core.types import ArtifactChunk, Modality
from pluggably.v1 import (
    generate_service_pb2_grpc,
    storage_service_pb2_grpc,
    stream_service_pb2_grpc,
)
from pluggably.v1 import generation_pb2 as G
from pluggably.v1 import storage_service_pb2 as S


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A valid PNG (8-bit grey), built without an imaging library."""
    rows = b"".join(
        b"\x00" + bytes((seed + x + y) % 256 for x in range(width)) for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
async def gateway(config_for):
    from pluggably.server import GatewayServer

    backend = FakeBackend(
        models={"paint": Modality.IMAGE, "echo": Modality.TEXT},
        supported=["width", "height", "count", "seed", "format"],
    )
    backend.words = []
    backend.extra_chunks = [
        ArtifactChunk(png(64, 64, 1), "image/png", "image"),
        ArtifactChunk(png(64, 64, 2), "image/png", "image"),
    ]
    server = GatewayServer(config_for([]), backends=[backend])
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield backend, channel
    finally:
        await channel.close()
        await server.stop(grace=0)


def request(**image: object) -> G.GenerateRequest:
    return G.GenerateRequest(
        model="fake/paint", prompt="a lighthouse", image=G.ImageOptions(**image)
    )


async def test_images_are_stored_and_returned_by_reference(gateway) -> None:
    backend, channel = gateway
    response = await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
        request(width=64, height=64, count=2, seed=7)
    )
    assert len(response.artifacts) == 2
    first, second = response.artifacts
    assert first.id == hashlib.sha256(backend.extra_chunks[0].data).hexdigest()
    assert (first.kind, first.mime_type, first.model) == ("image", "image/png", "fake/paint")
    assert first.request_id == response.id and not first.inline_data
    assert first.content_path == f"/v1/artifacts/{first.id}:content"
    assert second.id != first.id
    # What the backend was asked for.
    image = backend.requests[-1].image
    assert (image.width, image.height, image.count, image.seed) == (64, 64, 2, 7)
    # And the file is in the store, byte for byte.
    storage = storage_service_pb2_grpc.StorageServiceStub(channel)
    chunks = [c async for c in storage.ReadArtifact(S.ReadArtifactRequest(id=first.id))]
    assert b"".join(c.data for c in chunks) == backend.extra_chunks[0].data


async def test_a_stream_sends_each_image_as_it_is_stored_then_done(gateway) -> None:
    backend, channel = gateway
    events = [
        e
        async for e in stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(
            request(inline_data=True)
        )
    ]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["artifact", "artifact", "done"]
    assert events[0].artifact.inline_data == backend.extra_chunks[0].data


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"steps": 20}, "image.steps"),  # this model does not take steps
        ({"guidance_scale": 7.5}, "image.guidance_scale"),
        ({"negative_prompt": "fog"}, "image.negative_prompt"),
        ({"width": 100}, "image.width"),  # not a multiple of 8
        ({"height": 8}, "image.height"),  # below 64
        ({"count": 9}, "image.count"),
        ({"format": 99}, "image.format"),
    ],
)
async def test_options_the_model_cannot_take_are_refused(gateway, options, field) -> None:
    backend, channel = gateway
    before = len(backend.requests)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(request(**options))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    assert len(backend.requests) == before


async def test_image_options_for_a_text_model_are_refused(gateway) -> None:
    _, channel = gateway
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
            G.GenerateRequest(model="fake/echo", prompt="x", image=G.ImageOptions())
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "produces text" in caught.value.details()


async def test_mesh_options_are_parsed_and_checked(config_for) -> None:
    from pluggably.server import GatewayServer

    backend = FakeBackend(
        models={"sculpt": Modality.MESH}, supported=["steps", "grid_size", "format"]
    )
    backend.words = []
    backend.extra_chunks = [ArtifactChunk(b"glTF-bytes", "model/gltf-binary", "mesh")]
    server = GatewayServer(config_for([]), backends=[backend])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
            ok = G.GenerateRequest(
                model="fake/sculpt",
                prompt="a chair",
                mesh=G.MeshOptions(
                    steps=8, grid_size=32, format=G.MESH_FORMAT_OBJ, inline_data=True
                ),
            )
            response = await stub.Generate(ok)
            (artifact,) = response.artifacts
            assert (artifact.kind, artifact.inline_data) == ("mesh", b"glTF-bytes")
            mesh = backend.requests[-1].mesh
            assert (mesh.steps, mesh.grid_size, mesh.format.value) == (8, 32, "obj")
            for options, field in (
                ({"grid_size": 8}, "mesh.grid_size"),  # below 16
                ({"seed": 3}, "mesh.seed"),  # not taken by this model
                ({"guidance_scale": 60.0}, "mesh.guidance_scale"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Generate(
                        G.GenerateRequest(
                            model="fake/sculpt", prompt="x", mesh=G.MeshOptions(**options)
                        )
                    )
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert field in caught.value.details()
    finally:
        await server.stop(grace=0)
