"""The registry of local models: persistence, precedence of sources, several processes, and what
ModelService does with it (listing with filters, pin, delete with its protections)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pluggably.catalog.registry import ModelRecord, ModelRegistry
from pluggably.core.types import Modality, ModelFormat, ModelSource, ModelState
from pluggably.v1 import generation_pb2 as G
from pluggably.v1 import (
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    stream_service_pb2_grpc,
)


def record(name: str, path: Path | str, **fields: object) -> ModelRecord:
    base: dict[str, object] = {
        "source": ModelSource.DOWNLOAD,
        "modality": Modality.TEXT,
        "format": ModelFormat.TRANSFORMERS,
        "owned": True,
    }
    base.update(fields)
    return ModelRecord(name=name, path=str(path), **base)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def test_rows_survive_a_restart_with_every_field(tmp_path: Path) -> None:
    clock = Clock()
    with ModelRegistry(tmp_path / "r.db", clock=clock) as registry:
        registry.put(
            record(
                "org/model",
                tmp_path / "m",
                source_repo="org/model",
                source_revision="main",
                resolved_revision="a" * 40,
                size_bytes=1234,
                settings={"device": "cpu"},
                description="d",
                context_length=64,
            )
        )
        clock.now += 5
        registry.set_pinned("org/model", True)
    with ModelRegistry(tmp_path / "r.db") as registry:
        (row,) = registry.all()
    assert row.name == "org/model" and row.path == str(tmp_path / "m")
    assert (row.source, row.format, row.modality) == (
        ModelSource.DOWNLOAD,
        ModelFormat.TRANSFORMERS,
        Modality.TEXT,
    )
    assert (row.source_repo, row.source_revision, row.resolved_revision) == (
        "org/model",
        "main",
        "a" * 40,
    )
    assert row.size_bytes == 1234 and row.pinned and row.owned
    assert dict(row.settings) == {"device": "cpu"}
    assert row.created_at == 1_000_000.0 and row.updated_at == 1_000_005.0


def test_a_weaker_source_never_overwrites_a_stronger_one(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path / "r.db") as registry:
        assert registry.put(record("m", tmp_path / "download")) is not None
        found = record("m", tmp_path / "found", source=ModelSource.DISCOVERY)
        assert registry.put(found) is None
        assert registry.get("m").path == str(tmp_path / "download")  # type: ignore[union-attr]


def test_sync_adds_updates_and_removes_only_its_source(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path / "r.db") as registry:
        registry.put(record("downloaded", tmp_path / "d"))
        found = ModelSource.DISCOVERY
        added, removed = registry.sync(
            found,
            [record("a", tmp_path / "a", source=found), record("b", tmp_path / "b", source=found)],
        )
        assert [r.name for r in added] == ["a", "b"] and removed == []
        registry.set_pinned("b", True)
        added, removed = registry.sync(found, [record("c", tmp_path / "c", source=found)])
        assert [r.name for r in added] == ["c"] and [r.name for r in removed] == ["a"]
        rows = {r.name: r for r in registry.all()}
        # The pinned one stays, in ERROR with the reason; the download is not discovery's.
        assert set(rows) == {"downloaded", "b", "c"}
        assert rows["b"].state is ModelState.ERROR and "gone" in rows["b"].state_reason
        # Its files come back: available again, still pinned.
        registry.sync(found, [record("b", tmp_path / "b", source=found)])
        assert registry.get("b").state is ModelState.AVAILABLE  # type: ignore[union-attr]
        assert registry.get("b").pinned  # type: ignore[union-attr]


def test_two_processes_see_each_others_writes(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with ModelRegistry(db) as registry:
        registry.put(record("mine", tmp_path / "mine"))
        other = textwrap.dedent(
            f"""
            from pathlib import Path
            from pluggably.catalog.registry import ModelRecord, ModelRegistry
            from pluggably.core.types import Modality, ModelSource
            with ModelRegistry({str(db)!r}) as r:
                assert r.get("mine") is not None
                r.put(ModelRecord(name="theirs", source=ModelSource.DISCOVERY,
                                  modality=Modality.IMAGE, path="/x"))
                r.set_pinned("mine", True)
            """
        )
        subprocess.run([sys.executable, "-c", other], check=True, timeout=60)
        rows = {r.name: r for r in registry.all()}
        assert set(rows) == {"mine", "theirs"} and rows["mine"].pinned
        assert rows["theirs"].modality is Modality.IMAGE


async def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    registries = [ModelRegistry(db) for _ in range(4)]
    try:

        def write(index: int) -> None:
            for i in range(25):
                registries[index].put(record(f"m{index}-{i}", tmp_path / f"{index}-{i}"))

        await asyncio.gather(*(asyncio.to_thread(write, i) for i in range(4)))
        assert len(registries[0].all()) == 100
    finally:
        for registry in registries:
            registry.close()


def test_last_use_is_written_at_most_once_a_minute(tmp_path: Path) -> None:
    clock = Clock()
    with ModelRegistry(tmp_path / "r.db", clock=clock) as registry:
        registry.put(record("m", tmp_path / "m"))
        registry.touch("m")
        first = registry.get("m").last_used_at  # type: ignore[union-attr]
        clock.now += 30
        registry.touch("m")
        assert registry.get("m").last_used_at == first == 1_000_000.0  # type: ignore[union-attr]
        clock.now += 31
        registry.touch("m")
        assert registry.get("m").last_used_at == 1_000_061.0  # type: ignore[union-attr]


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    from pluggably.catalog.registry import RegistryError

    db = tmp_path / "r.db"
    ModelRegistry(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RegistryError, match="newer"):
        ModelRegistry(db)


# --------------------------------------------------------------------------------------------
# Through ModelService
# --------------------------------------------------------------------------------------------


@pytest.fixture
async def gateway(tmp_path: Path, tiny_model_dir: Path, config_for):
    """A gateway with one config model and, in its registry, a downloaded copy of the tiny
    model (owned), a pinned one, an image pipeline no runner serves and a model outside the
    gateway's folders. Its model folder is empty: the scan at start changes nothing."""
    from pluggably.server import GatewayServer

    root = tmp_path / "storage"
    folder = tmp_path / "models"
    folder.mkdir()
    downloaded = tmp_path / "downloads" / "downloaded"
    shutil.copytree(tiny_model_dir, downloaded)
    foreign = tmp_path / "elsewhere" / "foreign"
    shutil.copytree(tiny_model_dir, foreign)
    with ModelRegistry(root / "registry.db") as registry:
        registry.put(
            record(
                "org/downloaded",
                downloaded,
                source_repo="org/tiny",
                source_revision="main",
                resolved_revision="b" * 40,
                size_bytes=sum(f.stat().st_size for f in downloaded.rglob("*") if f.is_file()),
            )
        )
        registry.put(record("keep", downloaded, pinned=True))
        registry.put(
            record(
                "sd-tiny",
                tmp_path / "downloads" / "sd",
                format=ModelFormat.DIFFUSERS,
                modality=Modality.IMAGE,
                state=ModelState.UNSERVABLE,
                state_reason="no image runner in this build yet",
                owned=False,
            )
        )
        registry.put(record("foreign", foreign, owned=False))
    config = config_for(
        [{"name": "tiny", "path": str(tiny_model_dir), "default_max_tokens": 8}],
        storage={
            "root": str(root),
            "model_folders": [str(folder)],
            "scan_hf_cache": False,
            "rescan_interval_s": 0,
        },
    )
    server = GatewayServer(config)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, model_service_pb2_grpc.ModelServiceStub(channel), channel
    finally:
        await channel.close()
        await server.stop(grace=0)


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo")


async def test_config_downloaded_and_discovered_models_list_together(gateway) -> None:
    _, stub, _ = gateway
    listed = await stub.ListModels(model_service_pb2.ListModelsRequest(provider="local"))
    models = {m.id: m for m in listed.models}
    assert set(models) == {
        "local/tiny",
        "local/org/downloaded",
        "local/keep",
        "local/sd-tiny",
        "local/foreign",
    }
    tiny, downloaded, sd = (
        models["local/tiny"],
        models["local/org/downloaded"],
        models["local/sd-tiny"],
    )
    assert tiny.source == model_pb2.MODEL_SOURCE_CONFIG and tiny.pinned
    assert tiny.state == model_pb2.MODEL_STATE_AVAILABLE
    assert downloaded.source == model_pb2.MODEL_SOURCE_DOWNLOAD
    assert downloaded.format == model_pb2.MODEL_FORMAT_TRANSFORMERS
    assert (downloaded.source_repo, downloaded.resolved_revision) == ("org/tiny", "b" * 40)
    assert downloaded.size_bytes > 0 and downloaded.local_path.endswith("downloaded")
    assert downloaded.create_time.seconds > 0 and not downloaded.pinned
    assert downloaded.state == model_pb2.MODEL_STATE_AVAILABLE
    assert sd.state == model_pb2.MODEL_STATE_UNSERVABLE and "image runner" in sd.state_reason
    assert sd.modality == model_pb2.MODALITY_IMAGE and sd.format == model_pb2.MODEL_FORMAT_DIFFUSERS


async def test_filters_by_state_and_text_with_pages(gateway) -> None:
    _, stub, _ = gateway
    request = model_service_pb2.ListModelsRequest
    unservable = await stub.ListModels(request(state=model_pb2.MODEL_STATE_UNSERVABLE))
    assert [m.id for m in unservable.models] == ["local/sd-tiny"]
    found = await stub.ListModels(request(query="ORG/TINY"))  # source repo, any case
    assert [m.id for m in found.models] == ["local/org/downloaded"]
    pages, token = [], ""
    while True:
        page = await stub.ListModels(request(provider="local", page_size=2, page_token=token))
        pages.append([m.id for m in page.models])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    ids = [model_id for page in pages for model_id in page]
    assert ids == sorted(ids) and len(set(ids)) == 5
    # A token is bound to its filters.
    first = await stub.ListModels(request(provider="local", page_size=2))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListModels(
            request(provider="local", page_size=2, query="x", page_token=first.next_page_token)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_registered_download_generates(gateway) -> None:
    _, _, channel = gateway
    stream = stream_service_pb2_grpc.StreamServiceStub(channel)
    request = G.GenerateRequest(
        model="local/org/downloaded",
        messages=[G.ChatMessage(role="user", content="hi")],
        text=G.TextOptions(max_tokens=4, temperature=0),
    )
    chunks = [c async for c in stream.StreamGenerate(request)]
    assert chunks[-1].done.usage.completion_tokens == 4


async def test_an_unservable_model_says_why(gateway) -> None:
    _, _, channel = gateway
    stream = stream_service_pb2_grpc.StreamServiceStub(channel)
    request = G.GenerateRequest(model="local/sd-tiny", prompt="a cat")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream.StreamGenerate(request):
            pass
    assert caught.value.code() in (
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,  # the dataplane may refuse the modality first
    )


async def test_pin_protects_and_unpin_releases(gateway) -> None:
    server, stub, _ = gateway
    pinned = await stub.PinModel(model_service_pb2.PinModelRequest(id="local/org/downloaded"))
    assert pinned.pinned and pinned.id == "local/org/downloaded"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DeleteModel(model_service_pb2.DeleteModelRequest(id="local/org/downloaded"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(caught.value) == "MODEL_PINNED"
    unpinned = await stub.UnpinModel(model_service_pb2.UnpinModelRequest(id="local/org/downloaded"))
    assert not unpinned.pinned
    # Persisted: a fresh look at the registry agrees.
    with ModelRegistry(server.config.storage.root / "registry.db") as registry:
        assert not registry.get("org/downloaded").pinned  # type: ignore[union-attr]
        assert registry.get("keep").pinned  # type: ignore[union-attr]


async def test_delete_removes_the_files_and_forgets_the_model(gateway) -> None:
    _, stub, _ = gateway
    before = await stub.GetModel(model_service_pb2.GetModelRequest(id="local/org/downloaded"))
    path = Path(before.local_path)
    assert await asyncio.to_thread(path.is_dir)
    deleted = await stub.DeleteModel(
        model_service_pb2.DeleteModelRequest(id="local/org/downloaded")
    )
    assert deleted.freed_bytes == before.size_bytes > 0
    assert not await asyncio.to_thread(path.exists)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModel(model_service_pb2.GetModelRequest(id="local/org/downloaded"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("model_id", "code", "reason"),
    [
        ("local/tiny", grpc.StatusCode.FAILED_PRECONDITION, "MODEL_CONFIGURED"),
        ("local/keep", grpc.StatusCode.FAILED_PRECONDITION, "MODEL_PINNED"),
        ("local/foreign", grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_OWNED"),
        ("local/nope", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, None),
        ("local/", grpc.StatusCode.INVALID_ARGUMENT, None),
        ("local/../x", grpc.StatusCode.INVALID_ARGUMENT, None),
        ("local/a/./b", grpc.StatusCode.INVALID_ARGUMENT, None),
        ("openai/gpt-4o", grpc.StatusCode.INVALID_ARGUMENT, None),
    ],
)
async def test_delete_refusals(gateway, model_id: str, code: grpc.StatusCode, reason) -> None:
    _, stub, _ = gateway
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DeleteModel(model_service_pb2.DeleteModelRequest(id=model_id))
    assert caught.value.code() == code
    if reason is not None:
        assert reason_of(caught.value) == reason


async def test_a_model_in_use_is_not_deleted(gateway) -> None:
    _, stub, channel = gateway
    stream = stream_service_pb2_grpc.StreamServiceStub(channel)
    request = G.GenerateRequest(
        model="local/org/downloaded",
        messages=[G.ChatMessage(role="user", content="hi")],
        text=G.TextOptions(max_tokens=200, temperature=0),
    )
    request.provider_options["ignore_eos"].bool_value = True
    call = stream.StreamGenerate(request)
    await call.read()  # generating now
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DeleteModel(model_service_pb2.DeleteModelRequest(id="local/org/downloaded"))
    assert reason_of(caught.value) == "MODEL_IN_USE"
    call.cancel()
    # Once idle, it goes.
    for _ in range(100):
        try:
            await stub.DeleteModel(model_service_pb2.DeleteModelRequest(id="local/org/downloaded"))
            break
        except grpc.aio.AioRpcError as error:
            assert reason_of(error) == "MODEL_IN_USE"
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("the model stayed in use after its only stream was cancelled")


async def test_rescan_finds_new_models_and_forgets_vanished_ones(
    tmp_path: Path, tiny_model_dir: Path, config_for
) -> None:
    """At start (in the background) and on request; a found model generates at once."""
    from pluggably.server import GatewayServer

    folder = tmp_path / "models"
    await asyncio.to_thread(shutil.copytree, tiny_model_dir, folder / "at-start")
    config = config_for(
        [],
        storage={
            "root": str(tmp_path / "storage"),
            "model_folders": [str(folder)],
            "scan_hf_cache": False,
            "rescan_interval_s": 0,
        },
    )
    server = GatewayServer(config)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    try:
        for _ in range(100):
            listed = await stub.ListModels(model_service_pb2.ListModelsRequest(provider="local"))
            if listed.models:
                break
            await asyncio.sleep(0.05)
        (found,) = listed.models
        assert found.id == "local/at-start" and found.source == model_pb2.MODEL_SOURCE_DISCOVERY
        assert found.state == model_pb2.MODEL_STATE_AVAILABLE

        await asyncio.to_thread(shutil.copytree, tiny_model_dir, folder / "later")
        rescan = await stub.RescanModels(model_service_pb2.RescanModelsRequest())
        assert list(rescan.added) == ["local/later"] and list(rescan.removed) == []
        stream = stream_service_pb2_grpc.StreamServiceStub(channel)
        request = G.GenerateRequest(
            model="local/later",
            messages=[G.ChatMessage(role="user", content="hi")],
            text=G.TextOptions(max_tokens=3, temperature=0),
        )
        chunks = [c async for c in stream.StreamGenerate(request)]
        assert chunks[-1].done.usage.completion_tokens == 3

        await asyncio.to_thread(shutil.rmtree, folder / "at-start")
        rescan = await stub.RescanModels(model_service_pb2.RescanModelsRequest())
        assert list(rescan.added) == [] and list(rescan.removed) == ["local/at-start"]
        listed = await stub.ListModels(model_service_pb2.ListModelsRequest(provider="local"))
        assert [m.id for m in listed.models] == ["local/later"]
    finally:
        await channel.close()
        await server.stop(grace=0)


async def test_delete_removes_a_symlink_but_never_what_it_points_to(gateway, tmp_path) -> None:
    _, stub, _ = gateway
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"keep me")
    model = await stub.GetModel(model_service_pb2.GetModelRequest(id="local/org/downloaded"))
    (Path(model.local_path) / "link-out").symlink_to(outside)
    (Path(model.local_path) / "dir-out").symlink_to(
        tmp_path / "elsewhere", target_is_directory=True
    )
    await stub.DeleteModel(model_service_pb2.DeleteModelRequest(id="local/org/downloaded"))
    assert not await asyncio.to_thread(Path(model.local_path).exists)
    assert await asyncio.to_thread(outside.read_bytes) == b"keep me"
    assert await asyncio.to_thread((tmp_path / "elsewhere" / "foreign").is_dir)


async def test_delete_without_an_id_through_envoy_is_a_bad_request(gateway, tmp_path) -> None:
    import aiohttp

    from pluggably.devtools.envoy import Envoy

    server, _, _ = gateway
    (tmp_path / "envoy").mkdir()
    envoy = Envoy(server.port, tmp_path / "envoy")
    await asyncio.to_thread(envoy.start)
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/v1/models", "/v1/models/", "/v1/models/local/..%2Fx"):
                async with http.delete(f"{envoy.url}{path}") as r:
                    body = await r.json()
                    assert r.status == 400, (path, body)
                    assert body["code"] == 3
            async with http.get(f"{envoy.url}/v1/models") as r:  # listing still works
                assert r.status == 200
    finally:
        envoy.stop()


def test_a_rescan_never_touches_a_model_being_deleted_or_downloaded(tmp_path: Path) -> None:
    found = ModelSource.DISCOVERY
    with ModelRegistry(tmp_path / "r.db") as registry:
        registry.put(record("m", tmp_path / "m", source=found))
        registry.set_state("m", ModelState.DELETING)
        registry.sync(found, [record("m", tmp_path / "m", source=found)])
        assert registry.get("m").state is ModelState.DELETING  # type: ignore[union-attr]


def test_several_processes_opening_a_new_registry_at_once_all_succeed(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    code = (
        f"from pluggably.catalog.registry import ModelRegistry; ModelRegistry({str(db)!r}).close()"
    )
    processes = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(8)]
    assert [p.wait(60) for p in processes] == [0] * 8
