"""StorageService on a real gateway: usage by category against the budget, pruning (dry run and
real, with pinned and configured models protected), and the artifact store over gRPC and as a
raw file download through the real Envoy."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2

from pluggably.catalog.registry import ModelRecord, ModelRegistry
from pluggably.core.types import Modality, ModelFormat, ModelSource
from pluggably.devtools.envoy import Envoy
from pluggably.v1 import storage_service_pb2 as S
from pluggably.v1 import storage_service_pb2_grpc

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2048  # 512 KiB: more than one read chunk


@pytest.fixture
async def stack(tmp_path: Path, tiny_model_dir: Path, config_for):
    from pluggably.server import GatewayServer

    root = tmp_path / "storage"
    folder = tmp_path / "models"
    for name in ("old", "pinned"):
        shutil.copytree(tiny_model_dir, folder / name)
    size = sum(f.stat().st_size for f in (folder / "old").rglob("*") if f.is_file())
    with ModelRegistry(root / "registry.db") as registry:
        for name, pinned, last_used in (("old", False, 100.0), ("pinned", True, 50.0)):
            registry.put(
                ModelRecord(
                    name=name,
                    source=ModelSource.DISCOVERY,
                    modality=Modality.TEXT,
                    format=ModelFormat.TRANSFORMERS,
                    path=str(folder / name),
                    size_bytes=size,
                    pinned=pinned,
                    last_used_at=last_used,
                )
            )
    config = config_for(
        [{"name": "tiny", "path": str(tiny_model_dir)}],
        storage={
            "root": str(root),
            "model_folders": [str(folder)],
            "scan_hf_cache": False,
            "rescan_interval_s": 0,
            # No idle time: the artifacts of a test are seconds old.
            "limits": {
                "models_bytes": size,
                "artifacts_bytes": "10MiB",
                "min_free_bytes": 0,
                "min_idle_s": 0,
            },
        },
    )
    server = GatewayServer(config)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, storage_service_pb2_grpc.StorageServiceStub(channel), size
    finally:
        await channel.close()
        await server.stop(grace=0)


async def put(server, data: bytes, *, kind: str = "image", mime: str = "image/png"):
    return await server.storage.artifacts.put(
        data, kind=kind, mime_type=mime, model="local/tiny", request_id="req-1"
    )


async def test_usage_by_category(stack) -> None:
    server, stub, size = stack
    await put(server, PNG)
    usage = await stub.GetStorageUsage(S.GetStorageUsageRequest())
    by = {c.category: c for c in usage.categories}
    models = by[S.STORAGE_CATEGORY_MODELS]
    # Both models in the managed folder count (the configured one is the operator's own).
    assert (models.used_bytes, models.item_count, models.limit_bytes) == (2 * size, 2, size)
    artifacts = by[S.STORAGE_CATEGORY_ARTIFACTS]
    assert (artifacts.used_bytes, artifacts.item_count) == (len(PNG), 1)
    assert artifacts.limit_bytes == 10 * 2**20
    assert set(by) == {
        S.STORAGE_CATEGORY_MODELS,
        S.STORAGE_CATEGORY_ARTIFACTS,
        S.STORAGE_CATEGORY_CACHE,
        S.STORAGE_CATEGORY_TEMPORARY,
    }
    assert usage.used_bytes == sum(c.used_bytes for c in usage.categories)
    assert usage.disk_free_bytes > 0


async def test_prune_dry_run_lists_and_removes_nothing_then_prunes(stack) -> None:
    server, stub, size = stack
    request = S.PruneStorageRequest(categories=[S.STORAGE_CATEGORY_MODELS], dry_run=True)
    dry = await stub.PruneStorage(request)
    # Over the models limit by one model: the unpinned one goes, never the pinned or configured.
    assert list(dry.removed) == ["local/old"] and dry.freed_bytes == size
    assert await asyncio.to_thread((Path(server.config.storage.model_folders[0]) / "old").is_dir)
    real = await stub.PruneStorage(S.PruneStorageRequest(categories=[S.STORAGE_CATEGORY_MODELS]))
    assert list(real.removed) == ["local/old"] and real.freed_bytes == size
    assert not await asyncio.to_thread(
        (Path(server.config.storage.model_folders[0]) / "old").exists
    )
    again = await stub.PruneStorage(S.PruneStorageRequest(categories=[S.STORAGE_CATEGORY_MODELS]))
    assert list(again.removed) == [] and again.freed_bytes == 0


async def test_prune_by_age_and_target(stack) -> None:
    server, stub, _ = stack
    first = await put(server, b"first")
    await put(server, b"second", kind="mesh", mime="model/gltf-binary")
    # Only unused for longer than a day: nothing (both were just made).
    request = S.PruneStorageRequest(
        categories=[S.STORAGE_CATEGORY_ARTIFACTS],
        older_than=duration_pb2.Duration(seconds=86400),
        target_free_bytes=10**15,
    )
    assert list((await stub.PruneStorage(request)).removed) == []
    # Free 1 byte beyond the limits: the oldest artifact goes first.
    request = S.PruneStorageRequest(
        categories=[S.STORAGE_CATEGORY_ARTIFACTS],
        target_free_bytes=await asyncio.to_thread(lambda: shutil.disk_usage("/").free + 1),
    )
    removed = list((await stub.PruneStorage(request)).removed)
    assert removed[0] == first.id


async def test_prune_refuses_bad_input(stack) -> None:
    _, stub, _ = stack
    for request in (
        S.PruneStorageRequest(categories=[99]),
        S.PruneStorageRequest(target_free_bytes=-1),
        S.PruneStorageRequest(older_than=duration_pb2.Duration(seconds=-5)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PruneStorage(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_artifacts_over_grpc(stack) -> None:
    server, stub, _ = stack
    image = await put(server, PNG)
    mesh = await put(server, b"glTF-mesh", kind="mesh", mime="model/gltf-binary")
    listed = await stub.ListArtifacts(S.ListArtifactsRequest())
    assert [a.id for a in listed.artifacts] == [mesh.id, image.id]  # newest first
    meshes = await stub.ListArtifacts(S.ListArtifactsRequest(kind="mesh"))
    assert [a.id for a in meshes.artifacts] == [mesh.id]
    page = await stub.ListArtifacts(S.ListArtifactsRequest(page_size=1))
    rest = await stub.ListArtifacts(
        S.ListArtifactsRequest(page_size=1, page_token=page.next_page_token)
    )
    assert [a.id for a in [*page.artifacts, *rest.artifacts]] == [mesh.id, image.id]
    got = await stub.GetArtifact(S.GetArtifactRequest(id=image.id))
    assert got.id == hashlib.sha256(PNG).hexdigest() == image.id
    assert (got.mime_type, got.kind, got.size_bytes) == ("image/png", "image", len(PNG))
    assert got.content_path == f"/v1/artifacts/{image.id}:content"
    assert got.expire_time.seconds > got.create_time.seconds > 0  # the default retention
    chunks = [c async for c in stub.ReadArtifact(S.ReadArtifactRequest(id=image.id))]
    assert len(chunks) > 1 and chunks[0].content_type == "image/png"
    assert b"".join(c.data for c in chunks) == PNG
    deleted = await stub.DeleteArtifact(S.DeleteArtifactRequest(id=image.id))
    assert deleted.freed_bytes == len(PNG)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetArtifact(S.GetArtifactRequest(id=image.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "A" * 64, "abc"])
async def test_bad_artifact_ids_are_refused(stack, bad: str) -> None:
    _, stub, _ = stack
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetArtifact(S.GetArtifactRequest(id=bad))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.ReadArtifact(S.ReadArtifactRequest(id=bad)):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_artifact_downloads_through_envoy_as_the_raw_file(stack, tmp_path: Path) -> None:
    server, _, _ = stack
    image = await put(server, PNG)
    (tmp_path / "envoy").mkdir()
    envoy = Envoy(server.port, tmp_path / "envoy")
    await asyncio.to_thread(envoy.start)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{envoy.url}/v1/artifacts/{image.id}:content") as r:
                body = await r.read()
                assert r.status == 200, body[:200]
                assert r.headers["Content-Type"] == "image/png"
            assert body == PNG
            ranged = f"{envoy.url}/v1/artifacts/{image.id}:content?offset=1000&length=70000"
            async with http.get(ranged) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "image/png"
                assert await r.read() == PNG[1000:71000]
            async with http.get(
                f"{envoy.url}/v1/artifacts/{image.id}:content?offset={len(PNG) + 1}"
            ) as r:
                assert r.status == 400
            async with http.get(f"{envoy.url}/v1/artifacts/{'0' * 64}:content") as r:
                assert r.status == 404
                assert (await r.json())["details"][0]["reason"] == "ARTIFACT_NOT_FOUND"
    finally:
        envoy.stop()


async def test_retention_keeps_artifacts_under_their_limit_oldest_first(stack) -> None:
    server, stub, _ = stack
    chunk = b"x" * (4 * 2**20)
    old = await put(server, chunk + b"1")
    middle = await put(server, chunk + b"2")
    new = await put(server, chunk + b"3")  # 12 MiB in all; the limit is 10 MiB
    removed = await server.storage.enforce_retention()
    assert removed == [old.id]
    listed = await stub.ListArtifacts(S.ListArtifactsRequest())
    assert [a.id for a in listed.artifacts] == [new.id, middle.id]
