"""Model downloads through a real gateway from the stand-in Hub, with the real huggingface_hub:
progress, joining, the Hub's errors, the budget, cancel, a dropped connection, REST/SSE through
Envoy, and a server killed mid-download."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pluggably.devtools.envoy import Envoy, free_port
from pluggably.devtools.standins.hub import HubStandIn
from pluggably.v1 import generation_pb2 as G
from pluggably.v1 import (
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    stream_service_pb2_grpc,
)

M = model_service_pb2
BIG = 12 * 2**20  # over huggingface_hub's 10 MiB chunk: a dropped body resumes


def details(error: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    out: dict[str, object] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.QuotaFailure):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                out[kind.__name__] = message
    return out


@pytest.fixture
async def hub(tiny_model_dir: Path):
    async with HubStandIn(token="hf_granted_0123456789") as hub:
        hub.add_folder("org/tiny", tiny_model_dir, tags=("v1",))
        yield hub


def gateway_config(tmp_path: Path, hub: HubStandIn, **storage: object) -> dict:
    return {
        "root": str(tmp_path / "storage"),
        "hf_cache": str(tmp_path / "hf-cache"),
        "scan_hf_cache": False,
        "rescan_interval_s": 0,
        "hub": {"endpoint": hub.endpoint, "timeout_s": 10},
        "limits": {"min_free_bytes": 0},
        **storage,
    }


@pytest.fixture
async def gateway(tmp_path: Path, hub: HubStandIn, config_for):
    from pluggably.server import GatewayServer

    server = GatewayServer(config_for([], storage=gateway_config(tmp_path, hub)))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, model_service_pb2_grpc.ModelServiceStub(channel), channel
    finally:
        await channel.close()
        await server.stop(grace=0)


async def finished(stub, job_id: str) -> list[model_pb2.Download]:
    return [d async for d in stub.WatchDownload(M.WatchDownloadRequest(id=job_id))]


def incomplete_files(cache: Path) -> list[Path]:
    return list(cache.rglob("*.incomplete"))


async def test_a_pull_streams_progress_and_registers_a_model_that_generates(
    gateway, hub, tiny_model_dir: Path
) -> None:
    server, stub, channel = gateway
    job = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/tiny"))
    files = await asyncio.to_thread(
        lambda: sorted(p for p in tiny_model_dir.rglob("*") if p.is_file())
    )
    assert job.model == "local/org/tiny" and job.repo_id == "org/tiny"
    assert job.requested_revision == "main" and len(job.revision) == 40
    assert job.total_files == len(files)
    assert job.total_bytes == sum(p.stat().st_size for p in files)
    assert job.state in (model_pb2.DOWNLOAD_STATE_QUEUED, model_pb2.DOWNLOAD_STATE_RUNNING)
    updates = await finished(stub, job.id)
    assert updates[-1].state == model_pb2.DOWNLOAD_STATE_SUCCEEDED
    assert updates[-1].downloaded_bytes == job.total_bytes
    assert updates[-1].downloaded_files == job.total_files
    done = [u.downloaded_bytes for u in updates]
    assert done == sorted(done)  # progress never goes back
    model = await stub.GetModel(M.GetModelRequest(id="local/org/tiny"))
    assert model.state == model_pb2.MODEL_STATE_AVAILABLE
    assert model.source == model_pb2.MODEL_SOURCE_DOWNLOAD
    assert model.format == model_pb2.MODEL_FORMAT_TRANSFORMERS
    assert (model.source_repo, model.resolved_revision) == ("org/tiny", job.revision)
    # The standard cache layout, shared with other tools: snapshot, blobs, refs/main.
    repo = Path(server.config.storage.hf_cache) / "models--org--tiny"
    assert (repo / "refs" / "main").read_text() == job.revision
    assert model.local_path == str(repo / "snapshots" / job.revision)
    assert incomplete_files(repo) == []
    stream = stream_service_pb2_grpc.StreamServiceStub(channel)
    request = G.GenerateRequest(
        model="local/org/tiny",
        messages=[G.ChatMessage(role="user", content="hi")],
        text=G.TextOptions(max_tokens=3, temperature=0),
    )
    chunks = [c async for c in stream.StreamGenerate(request)]
    assert chunks[-1].done.usage.completion_tokens == 3
    # Listed, and still there for Get after it ended.
    listed = await stub.ListDownloads(M.ListDownloadsRequest())
    assert [d.id for d in listed.downloads] == [job.id]
    assert (await stub.GetDownload(M.GetDownloadRequest(id=job.id))).state == (
        model_pb2.DOWNLOAD_STATE_SUCCEEDED
    )


async def test_the_same_pull_twice_joins_one_job(gateway, hub) -> None:
    _, stub, _ = gateway
    hub.throttle(2_000_000)
    first, second = await asyncio.gather(
        stub.DownloadModel(M.DownloadModelRequest(repo_id="org/tiny", revision="v1")),
        stub.DownloadModel(M.DownloadModelRequest(repo_id="org/tiny", revision="v1")),
    )
    assert first.id == second.id
    hub.throttle(None)
    await finished(stub, first.id)
    gets = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert len(gets) == len({r.path for r in gets}) == first.total_files


async def test_patterns_select_files(gateway) -> None:
    _, stub, _ = gateway
    job = await stub.DownloadModel(
        M.DownloadModelRequest(
            repo_id="org/tiny",
            name="tiny-config",
            allow_patterns=["*.json"],
            ignore_patterns=["tokenizer*"],
        )
    )
    updates = await finished(stub, job.id)
    assert updates[-1].state == model_pb2.DOWNLOAD_STATE_SUCCEEDED
    assert list(job.allow_patterns) == ["*.json"] and list(job.ignore_patterns) == ["tokenizer*"]
    model = await stub.GetModel(M.GetModelRequest(id="local/tiny-config"))
    names = await asyncio.to_thread(
        lambda: sorted(p.name for p in Path(model.local_path).iterdir())
    )
    assert names and all(n.endswith(".json") and not n.startswith("tokenizer") for n in names)
    # Weights were left out: found, but not servable, with the reason.
    assert model.state == model_pb2.MODEL_STATE_UNSERVABLE and model.state_reason


@pytest.mark.parametrize(
    ("request_fields", "code", "reason"),
    [
        ({"repo_id": "org/nope"}, grpc.StatusCode.NOT_FOUND, "REPO_NOT_FOUND"),
        (
            {"repo_id": "org/tiny", "revision": "v9"},
            grpc.StatusCode.NOT_FOUND,
            "REVISION_NOT_FOUND",
        ),
        ({"repo_id": "org/gated"}, grpc.StatusCode.PERMISSION_DENIED, "REPO_GATED"),
        ({"repo_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, None),
        ({"repo_id": "../etc"}, grpc.StatusCode.INVALID_ARGUMENT, None),
        ({"repo_id": "a/b/c"}, grpc.StatusCode.INVALID_ARGUMENT, None),
        ({"repo_id": "org/tiny", "name": "../x"}, grpc.StatusCode.INVALID_ARGUMENT, None),
        ({"repo_id": "org/tiny", "revision": "a b"}, grpc.StatusCode.INVALID_ARGUMENT, None),
        (
            {"repo_id": "org/tiny", "allow_patterns": ["../*"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            None,
        ),
        (
            {"repo_id": "org/tiny", "allow_patterns": ["nothing-*"]},
            grpc.StatusCode.FAILED_PRECONDITION,
            "NO_FILES_MATCH",
        ),
    ],
)
async def test_refusals_are_clear_and_leave_nothing(
    gateway, hub, request_fields: dict, code: grpc.StatusCode, reason: str | None
) -> None:
    _, stub, _ = gateway
    hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DownloadModel(M.DownloadModelRequest(**request_fields))
    assert caught.value.code() == code
    if reason is not None:
        assert details(caught.value)["ErrorInfo"].reason == reason  # type: ignore[attr-defined]
    listed = await stub.ListModels(M.ListModelsRequest(provider="local"))
    assert list(listed.models) == []
    assert "hf_granted" not in (caught.value.details() or "")


async def test_a_download_that_cannot_fit_is_refused_before_any_byte(
    tmp_path: Path, hub, config_for
) -> None:
    from pluggably.server import GatewayServer

    storage = gateway_config(tmp_path, hub, limits={"models_bytes": 1000, "min_free_bytes": 0})
    server = GatewayServer(config_for([], storage=storage))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/tiny"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        quota = details(caught.value)["QuotaFailure"]
        assert quota.violations[0].subject == "storage.limits.models_bytes"  # type: ignore[attr-defined]
        assert not [r for r in hub.requests if "/resolve/" in r.path and r.method == "GET"]
    finally:
        await server.stop(grace=0)


async def test_cancel_stops_at_once_and_removes_the_partial_files(gateway, hub) -> None:
    server, stub, _ = gateway
    hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": os.urandom(BIG)})
    hub.throttle(1_000_000)
    job = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/big"))
    for _ in range(200):
        current = await stub.GetDownload(M.GetDownloadRequest(id=job.id))
        if current.bytes_per_second > 0:
            break
        await asyncio.sleep(0.05)
    # Rate and ETA once there is half a second of progress to measure.
    assert current.downloaded_bytes > 0 and current.HasField("eta")
    assert 200_000 < current.bytes_per_second < 2_000_000  # the throttle is 1 MB/s
    cancelled = await stub.CancelDownload(M.CancelDownloadRequest(id=job.id))
    assert cancelled.state == model_pb2.DOWNLOAD_STATE_CANCELLED
    assert cancelled.downloaded_bytes < BIG
    served = hub.bytes_served
    await asyncio.sleep(0.5)
    assert hub.bytes_served - served < 200_000  # the transfer stopped, not just the job
    repo = Path(server.config.storage.hf_cache) / "models--org--big"
    assert incomplete_files(repo) == []
    assert not (repo / "snapshots" / job.revision).exists()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModel(M.GetModelRequest(id="local/org/big"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Cancelling again changes nothing.
    again = await stub.CancelDownload(M.CancelDownloadRequest(id=job.id))
    assert again.state == model_pb2.DOWNLOAD_STATE_CANCELLED


async def test_a_dropped_connection_resumes(gateway, hub) -> None:
    _, stub, _ = gateway
    weights = os.urandom(BIG)
    hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": weights})
    hub.drop_after("model.safetensors", 11 * 2**20)
    job = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/big"))
    updates = await finished(stub, job.id)
    assert updates[-1].state == model_pb2.DOWNLOAD_STATE_SUCCEEDED
    assert [r.range for r in hub.requests if r.range] == ["bytes=10485760-"]
    model = await stub.GetModel(M.GetModelRequest(id="local/org/big"))
    assert (Path(model.local_path) / "model.safetensors").read_bytes() == weights


async def test_a_broken_transfer_fails_cleanly(gateway, hub) -> None:
    server, stub, _ = gateway
    hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": os.urandom(BIG)})
    hub.drop_after("model.safetensors", 2**20, reset=True)
    job = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/big"))
    last = (await finished(stub, job.id))[-1]
    assert last.state == model_pb2.DOWNLOAD_STATE_FAILED
    assert last.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "retry" in last.error.message
    repo = Path(server.config.storage.hf_cache) / "models--org--big"
    assert incomplete_files(repo) == []
    listed = await stub.ListModels(M.ListModelsRequest(provider="local"))
    assert list(listed.models) == []


async def test_rest_watch_ends_with_an_in_band_terminal_event(gateway, hub, tmp_path) -> None:
    server, _, _ = gateway
    hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": os.urandom(BIG)})
    hub.drop_after("model.safetensors", 2**20, reset=True)
    (tmp_path / "envoy").mkdir()
    envoy = Envoy(server.port, tmp_path / "envoy")
    await asyncio.to_thread(envoy.start)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{envoy.url}/v1/models:download", json={"repoId": "org/big"}
            ) as r:
                assert r.status == 200
                job = await r.json()
            async with http.get(f"{envoy.url}/v1/downloads/{job['id']}:watch") as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                body = await r.text()
        events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
        assert events[-1]["state"] == "DOWNLOAD_STATE_FAILED"
        assert events[-1]["error"]["details"][0]["reason"] == "HUB_TRANSFER_FAILED"
    finally:
        envoy.stop()


async def test_a_server_killed_mid_download_marks_it_failed_and_cleans_up(
    tmp_path: Path, hub
) -> None:
    hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": os.urandom(BIG)})
    hub.throttle(2_000_000)
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"port": port},
                "auth": {"enabled": False},
                "metrics": {"enabled": False},
                "storage": gateway_config(tmp_path, hub),
            }
        )
    )

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "pluggably", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def stub_when_up(channel: grpc.aio.Channel) -> model_service_pb2_grpc.ModelServiceStub:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        for _ in range(300):
            try:
                await stub.ListDownloads(M.ListDownloadsRequest(), timeout=1)
                return stub
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        raise AssertionError("the gateway did not come up")

    gateway = start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = await stub_when_up(channel)
            job = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/big"))
            for _ in range(200):
                if (await stub.GetDownload(M.GetDownloadRequest(id=job.id))).downloaded_bytes:
                    break
                await asyncio.sleep(0.05)
        gateway.send_signal(signal.SIGKILL)
        await asyncio.to_thread(gateway.wait, 10)
        cache = tmp_path / "hf-cache"
        assert incomplete_files(cache)  # what a killed process leaves behind
        hub.throttle(None)
        gateway = start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = await stub_when_up(channel)
            after = await stub.GetDownload(M.GetDownloadRequest(id=job.id))
            assert after.state == model_pb2.DOWNLOAD_STATE_FAILED
            assert "interrupted" in after.error.message
            listed = await stub.ListModels(M.ListModelsRequest(provider="local"))
            assert list(listed.models) == []
        assert incomplete_files(cache) == []
    finally:
        gateway.kill()
        await asyncio.to_thread(gateway.wait, 10)


async def test_a_token_from_the_environment_opens_a_gated_repo_and_is_never_logged(
    tmp_path: Path, hub, config_for, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    from pluggably.server import GatewayServer

    hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True)
    monkeypatch.setenv("MY_HUB_TOKEN", "hf_granted_0123456789")
    storage = gateway_config(tmp_path, hub)
    storage["hub"] = {"endpoint": hub.endpoint, "token_env": "MY_HUB_TOKEN"}
    server = GatewayServer(config_for([], storage=storage))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            job = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/gated"))
            updates = await finished(stub, job.id)
        assert updates[-1].state == model_pb2.DOWNLOAD_STATE_SUCCEEDED
        assert all(r.authenticated for r in hub.requests if "/resolve/" in r.path)
        assert "hf_granted_0123456789" not in caplog.text
    finally:
        await server.stop(grace=0)


async def test_downloads_can_go_to_a_folder_of_their_own(tmp_path: Path, hub, config_for) -> None:
    from pluggably.server import GatewayServer

    storage = gateway_config(tmp_path, hub, downloads_dir=str(tmp_path / "downloads"))
    server = GatewayServer(config_for([], storage=storage))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            job = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/tiny"))
            assert (await finished(stub, job.id))[-1].state == (model_pb2.DOWNLOAD_STATE_SUCCEEDED)
            model = await stub.GetModel(M.GetModelRequest(id="local/org/tiny"))
            # One folder per commit, so two revisions never share files.
            assert model.local_path == str(
                tmp_path / "downloads" / "org" / "tiny" / model.resolved_revision
            )
            assert model.state == model_pb2.MODEL_STATE_AVAILABLE
            assert not await asyncio.to_thread((tmp_path / "hf-cache").exists)
            # Owned: deleting it removes the folder.
            await stub.DeleteModel(M.DeleteModelRequest(id="local/org/tiny"))
            assert not await asyncio.to_thread(Path(model.local_path).exists)
    finally:
        await server.stop(grace=0)


async def test_concurrent_downloads_never_overbook_the_budget(
    tmp_path: Path, hub, config_for
) -> None:
    """Each fits alone; not both: exactly one is admitted, the other refused up front."""
    from pluggably.server import GatewayServer

    hub.add_repo("org/a", {"config.json": b"{}", "w.bin": os.urandom(600_000)})
    hub.add_repo("org/b", {"config.json": b"{}", "w.bin": os.urandom(600_000)})
    hub.throttle(1_000_000)
    storage = gateway_config(tmp_path, hub, limits={"models_bytes": 1_000_000, "min_free_bytes": 0})
    server = GatewayServer(config_for([], storage=storage))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            results = await asyncio.gather(
                stub.DownloadModel(M.DownloadModelRequest(repo_id="org/a")),
                stub.DownloadModel(M.DownloadModelRequest(repo_id="org/b")),
                return_exceptions=True,
            )
            admitted = [r for r in results if isinstance(r, model_pb2.Download)]
            refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(admitted) == 1 and len(refused) == 1
            assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            hub.throttle(None)
            assert (await finished(stub, admitted[0].id))[-1].state == (
                model_pb2.DOWNLOAD_STATE_SUCCEEDED
            )
    finally:
        await server.stop(grace=0)


async def test_a_download_evicts_an_idle_unpinned_model_to_make_room(
    tmp_path: Path, hub, config_for, tiny_model_dir: Path
) -> None:
    from pluggably.server import GatewayServer
    from pluggably.v1 import storage_service_pb2, storage_service_pb2_grpc

    folder = tmp_path / "models"
    await asyncio.to_thread(shutil.copytree, tiny_model_dir, folder / "old")
    await asyncio.to_thread(shutil.copytree, tiny_model_dir, folder / "kept")
    size = sum(p.stat().st_size for p in (folder / "old").rglob("*") if p.is_file())
    hub.add_repo("org/new", {"config.json": b"{}", "w.bin": os.urandom(size // 2)})
    storage = gateway_config(
        tmp_path,
        hub,
        model_folders=[str(folder)],
        # Room for the two models there and not a byte more; anything idle may go.
        limits={"models_bytes": 2 * size, "min_free_bytes": 0, "min_idle_s": 0},
    )
    server = GatewayServer(config_for([], storage=storage))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            for _ in range(100):  # the scan at start registers both
                listed = await stub.ListModels(M.ListModelsRequest(provider="local"))
                if len(listed.models) == 2:
                    break
                await asyncio.sleep(0.05)
            await stub.PinModel(M.PinModelRequest(id="local/kept"))
            job = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/new"))
            assert (await finished(stub, job.id))[-1].state == (model_pb2.DOWNLOAD_STATE_SUCCEEDED)
            ids = {m.id for m in (await stub.ListModels(M.ListModelsRequest())).models}
            assert ids == {"local/kept", "local/org/new"}  # old went, the pinned one stayed
            assert not await asyncio.to_thread((folder / "old").exists)
            usage = await storage_service_pb2_grpc.StorageServiceStub(channel).GetStorageUsage(
                storage_service_pb2.GetStorageUsageRequest()
            )
            (eviction,) = usage.recent_evictions
            assert eviction.id == "local/old" and eviction.freed_bytes == size
            assert eviction.reason
    finally:
        await server.stop(grace=0)


# --- What a review found, kept fixed -----------------------------------------------------------


async def test_a_running_download_is_counted_once_in_the_budget(
    tmp_path: Path, hub, config_for
) -> None:
    """Its reservation covers it; its registry row must not count a second time."""
    from pluggably.server import GatewayServer

    hub.add_repo("org/a", {"config.json": b"{}", "w.bin": os.urandom(600_000)})
    hub.add_repo("org/b", {"config.json": b"{}", "w.bin": os.urandom(600_000)})
    hub.throttle(500_000)
    storage = gateway_config(
        tmp_path, hub, limits={"models_bytes": 1_500_000, "min_free_bytes": 0, "min_idle_s": 0}
    )
    server = GatewayServer(config_for([], storage=storage))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            a = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/a"))
            await asyncio.sleep(0.3)  # A is transferring, its row in the registry
            b = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/b"))
            hub.throttle(None)
            for job in (a, b):
                assert (await finished(stub, job.id))[-1].state == (
                    model_pb2.DOWNLOAD_STATE_SUCCEEDED
                )
    finally:
        await server.stop(grace=0)


async def test_a_failed_job_leaves_another_jobs_files_alone(gateway, hub) -> None:
    _, stub, _ = gateway
    weights = os.urandom(BIG)
    hub.add_repo(
        "org/big",
        {"config.json": b"{}", "model.safetensors": weights, "extra.bin": os.urandom(BIG)},
    )
    hub.throttle(8_000_000)
    hub.drop_after("extra.bin", 2**20, reset=True)
    a = await stub.DownloadModel(
        M.DownloadModelRequest(repo_id="org/big", allow_patterns=["*.safetensors", "*.json"])
    )
    b = await stub.DownloadModel(
        M.DownloadModelRequest(repo_id="org/big", name="other", allow_patterns=["extra.bin"])
    )
    assert (await finished(stub, b.id))[-1].state == model_pb2.DOWNLOAD_STATE_FAILED
    hub.throttle(None)
    assert (await finished(stub, a.id))[-1].state == model_pb2.DOWNLOAD_STATE_SUCCEEDED
    model = await stub.GetModel(M.GetModelRequest(id="local/org/big"))
    data = await asyncio.to_thread((Path(model.local_path) / "model.safetensors").read_bytes)
    assert data == weights


async def test_cancelling_a_queued_download_is_immediate(tmp_path: Path, hub, config_for) -> None:
    from pluggably.server import GatewayServer

    hub.add_repo("org/a", {"config.json": b"{}", "w.bin": os.urandom(2_000_000)})
    hub.add_repo("org/b", {"config.json": b"{}", "w.bin": os.urandom(1000)})
    hub.throttle(200_000)
    storage = gateway_config(tmp_path, hub)
    storage["hub"]["max_concurrent"] = 1
    server = GatewayServer(config_for([], storage=storage))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            a = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/a"))
            b = await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/b"))
            assert b.state == model_pb2.DOWNLOAD_STATE_QUEUED
            started = asyncio.get_running_loop().time()
            cancelled = await stub.CancelDownload(M.CancelDownloadRequest(id=b.id))
            assert cancelled.state == model_pb2.DOWNLOAD_STATE_CANCELLED
            assert asyncio.get_running_loop().time() - started < 2
            await stub.CancelDownload(M.CancelDownloadRequest(id=a.id))
    finally:
        await server.stop(grace=0)


async def test_a_hub_failure_while_probing_a_gated_repo_is_unavailable(gateway, hub) -> None:
    _, stub, _ = gateway
    hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True)
    hub.fail_status("/org/gated/resolve/", 503, times=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DownloadModel(M.DownloadModelRequest(repo_id="org/gated"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_replicas_sharing_storage_join_watch_and_cancel_one_job(
    tmp_path: Path, hub, config_for
) -> None:
    from pluggably.server import GatewayServer

    hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": os.urandom(BIG)})
    hub.throttle(1_000_000)
    storage = gateway_config(tmp_path, hub)
    first, second = (GatewayServer(config_for([], storage=storage)) for _ in range(2))
    await first.start()
    await second.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as c1,
            grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as c2,
        ):
            one = model_service_pb2_grpc.ModelServiceStub(c1)
            two = model_service_pb2_grpc.ModelServiceStub(c2)
            job = await one.DownloadModel(M.DownloadModelRequest(repo_id="org/big"))
            joined = await two.DownloadModel(M.DownloadModelRequest(repo_id="org/big"))
            assert joined.id == job.id
            watch = asyncio.ensure_future(finished(two, job.id))
            cancelled = await two.CancelDownload(M.CancelDownloadRequest(id=job.id))
            assert cancelled.state == model_pb2.DOWNLOAD_STATE_CANCELLED
            updates = await asyncio.wait_for(watch, 15)
            assert updates[-1].state == model_pb2.DOWNLOAD_STATE_CANCELLED
    finally:
        await first.stop(grace=0)
        await second.stop(grace=0)
