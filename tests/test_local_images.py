"""Local text-to-image with diffusers on a tiny pipeline built offline: images stored as
artifacts, seeds reproducible, step progress streamed, cancel between steps, formats, the
parameters a pipeline documents, and a pipeline found on disk serving without a restart."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

import grpc
import pytest

pytest.importorskip(
    "diffusers", reason="diffusers is not installed (pip install 'pluggably[local]')"
)

from pluggably.v1 import (
    generate_service_pb2_grpc,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    storage_service_pb2_grpc,
    stream_service_pb2_grpc,
)
from pluggably.v1 import generation_pb2 as G
from pluggably.v1 import storage_service_pb2 as S


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pluggably.devtools.tiny_image import build_tiny_image_pipeline

    return build_tiny_image_pipeline(tmp_path_factory.mktemp("images") / "tiny-sd")


@pytest.fixture(scope="module")
async def gateway(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory):
    from pluggably.config import Config
    from pluggably.server import GatewayServer

    folder = tmp_path_factory.mktemp("model-folder")
    config = Config.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0, "grace_period_s": 1},
            "auth": {"enabled": False},
            "metrics": {"enabled": False},
            "storage": {
                "root": str(tmp_path_factory.mktemp("storage")),
                "model_folders": [str(folder)],
                "scan_hf_cache": False,
                "rescan_interval_s": 0,
            },
            "local": {
                "models": [
                    {"name": "sd", "path": str(tiny_sd), "modality": "image", "default_steps": 4}
                ]
            },
        }
    )
    server = GatewayServer(config)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, channel, folder
    finally:
        await channel.close()
        await server.stop(grace=0)


def paint(model: str = "local/sd", **image: object) -> G.GenerateRequest:
    return G.GenerateRequest(model=model, prompt="a red lighthouse", image=G.ImageOptions(**image))


async def read(channel, artifact_id: str) -> bytes:
    stub = storage_service_pb2_grpc.StorageServiceStub(channel)
    return b"".join(
        [c.data async for c in stub.ReadArtifact(S.ReadArtifactRequest(id=artifact_id))]
    )


def size_of(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


async def test_images_are_generated_stored_and_reproducible(gateway) -> None:
    _, channel, _ = gateway
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    first = await stub.Generate(paint(steps=2, seed=1, count=2, width=64, height=64))
    assert len(first.artifacts) == 2 and first.usage.steps == 2
    assert first.finish_reason == G.FINISH_REASON_STOP
    data = [await read(channel, a.id) for a in first.artifacts]
    assert all(size_of(d) == (64, 64) for d in data)
    assert all(a.mime_type == "image/png" and a.kind == "image" for a in first.artifacts)
    assert data[0] != data[1]  # two images of one request differ
    again = await stub.Generate(paint(steps=2, seed=1, count=2, width=64, height=64))
    assert [a.id for a in again.artifacts] == [a.id for a in first.artifacts]  # same seed
    other = await stub.Generate(paint(steps=2, seed=2, width=64, height=64))
    assert other.artifacts[0].id not in {a.id for a in first.artifacts}


async def test_a_stream_reports_each_step_then_the_images(gateway) -> None:
    _, channel, _ = gateway
    stub = stream_service_pb2_grpc.StreamServiceStub(channel)
    events = [e async for e in stub.StreamGenerate(paint(steps=3, seed=4, inline_data=True))]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress", "progress", "progress", "artifact", "done"]
    assert [e.progress.step for e in events[:3]] == [1, 2, 3]
    assert all(e.progress.total_steps == 3 for e in events[:3])
    assert size_of(events[3].artifact.inline_data) == (64, 64)  # the pipeline's default size


@pytest.mark.parametrize(
    ("fmt", "mime"), [("IMAGE_FORMAT_JPEG", "image/jpeg"), ("IMAGE_FORMAT_WEBP", "image/webp")]
)
async def test_formats(gateway, fmt: str, mime: str) -> None:
    _, channel, _ = gateway
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    response = await stub.Generate(paint(steps=1, format=getattr(G, fmt)))
    (artifact,) = response.artifacts
    assert artifact.mime_type == mime
    assert size_of(await read(channel, artifact.id)) == (64, 64)


async def test_cancel_stops_between_steps(gateway) -> None:
    server, channel, _ = gateway
    stub = stream_service_pb2_grpc.StreamServiceStub(channel)
    call = stub.StreamGenerate(paint(steps=400, seed=1))
    first = await call.read()
    assert first.progress.step == 1
    call.cancel()
    image = server.backends[0].image
    for _ in range(100):  # the pipeline stops at its next step and frees the model
        if not image.in_use("sd"):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the pipeline kept running after the cancel")
    done = await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(paint(steps=1))
    assert len(done.artifacts) == 1


async def test_the_parameters_a_pipeline_documents(gateway) -> None:
    _, channel, _ = gateway
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    model = await stub.GetModel(model_service_pb2.GetModelRequest(id="local/sd"))
    assert model.modality == model_pb2.MODALITY_IMAGE
    assert model.format == model_pb2.MODEL_FORMAT_DIFFUSERS
    params = await stub.GetModelParameters(
        model_service_pb2.GetModelParametersRequest(id="local/sd")
    )
    specs = {p.name: p for p in params.parameters}
    assert specs["image.width"].default_value.number_value == 64
    assert specs["image.steps"].default_value.number_value == 4
    assert all(p.supported for p in specs.values())


async def test_text_options_or_a_missing_prompt_are_refused(gateway) -> None:
    _, channel, _ = gateway
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    for request in (
        G.GenerateRequest(model="local/sd", prompt="x", text=G.TextOptions(max_tokens=3)),
        G.GenerateRequest(model="local/sd", messages=[G.ChatMessage(role="system", content="x")]),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_pipeline_found_on_disk_serves_without_a_restart(gateway, tiny_sd: Path) -> None:
    _, channel, folder = gateway
    await asyncio.to_thread(shutil.copytree, tiny_sd, folder / "found-sd")
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    rescan = await models.RescanModels(model_service_pb2.RescanModelsRequest())
    assert list(rescan.added) == ["local/found-sd"]
    found = await models.GetModel(model_service_pb2.GetModelRequest(id="local/found-sd"))
    assert found.state == model_pb2.MODEL_STATE_AVAILABLE
    response = await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(
        paint("local/found-sd", steps=1)
    )
    assert len(response.artifacts) == 1
