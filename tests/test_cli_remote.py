"""`pluggably models|storage|artifacts ...` against real in-process gateways: the real CLI
(`main(argv)` in a thread) over real gRPC, and `models pull` as a subprocess in a pseudo-terminal
against the Hub stand-in. Outputs are checked against what the gateway itself answers."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format
from google.rpc import error_details_pb2

from pluggably.catalog.registry import ModelRecord, ModelRegistry
from pluggably.cli import main
from pluggably.core.types import Modality, ModelFormat, ModelSource, ModelState
from pluggably.devtools.standins.hub import HubStandIn
from pluggably.security.keys import KeyStore
from pluggably.server import GatewayServer
from pluggably.storage.artifacts import ArtifactStore
from pluggably.v1 import (
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    storage_service_pb2,
    storage_service_pb2_grpc,
)
from tls_util import make_tls_files

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 1024  # several ReadArtifact messages
PNG_SIZE = f"{len(PNG) / 1024:.2f} KiB"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("PLUGGABLY_SERVER", "PLUGGABLY_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """Runs the real CLI in a thread, so the in-process gateway keeps serving meanwhile."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return Result(code, out, err)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# A gateway with a catalog and an artifact store
# --------------------------------------------------------------------------------------------


@dataclass
class Catalog:
    server: GatewayServer
    models: model_service_pb2_grpc.ModelServiceStub
    storage: storage_service_pb2_grpc.StorageServiceStub
    folder: Path  # the gateway's model folder
    downloaded: Path  # files of local/org/downloaded
    size: int  # bytes of one copy of the tiny model

    @property
    def artifacts(self) -> ArtifactStore:
        assert self.server.storage is not None
        return self.server.storage.artifacts


@pytest.fixture
async def catalog(
    tmp_path: Path, tiny_model_dir: Path, config_for, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Catalog]:
    """A gateway (found through $PLUGGABLY_SERVER) with the config model `local/tiny` and, in
    its registry: `local/old` (unpinned, long unused) and `local/keep` (pinned) in its model
    folder, `local/org/downloaded` (a download it owns) and `local/sd-tiny` (an image pipeline
    no runner serves). The models limit holds one model: prune has work to do."""
    root = tmp_path / "storage"
    folder = tmp_path / "models"
    downloaded = tmp_path / "downloads" / "downloaded"
    for target in (folder / "old", folder / "keep", downloaded):
        await asyncio.to_thread(shutil.copytree, tiny_model_dir, target)
    size = await asyncio.to_thread(folder_size, downloaded)

    def register() -> None:
        with ModelRegistry(root / "registry.db") as registry:
            for name, pinned, last_used in (("old", False, 100.0), ("keep", True, 50.0)):
                registry.put(
                    ModelRecord(
                        name=name,
                        source=ModelSource.DISCOVERY,
                        modality=Modality.TEXT,
                        format=ModelFormat.TRANSFORMERS,
                        path=str(folder / name),
                        size_bytes=size,
                        pinned=pinned,
                        owned=True,
                        last_used_at=last_used,
                    )
                )
            registry.put(
                ModelRecord(
                    name="org/downloaded",
                    source=ModelSource.DOWNLOAD,
                    modality=Modality.TEXT,
                    format=ModelFormat.TRANSFORMERS,
                    path=str(downloaded),
                    source_repo="org/tiny",
                    source_revision="main",
                    resolved_revision="b" * 40,
                    size_bytes=size,
                    owned=True,
                )
            )
            registry.put(
                ModelRecord(
                    name="sd-tiny",
                    source=ModelSource.DOWNLOAD,
                    modality=Modality.IMAGE,
                    format=ModelFormat.DIFFUSERS,
                    path=str(tmp_path / "elsewhere" / "sd"),
                    state=ModelState.UNSERVABLE,
                    state_reason="no image runner in this build yet",
                )
            )

    await asyncio.to_thread(register)
    config = config_for(
        [{"name": "tiny", "path": str(tiny_model_dir), "default_max_tokens": 8}],
        storage={
            "root": str(root),
            "model_folders": [str(folder)],
            "scan_hf_cache": False,
            "rescan_interval_s": 0,
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
    monkeypatch.setenv("PLUGGABLY_SERVER", f"127.0.0.1:{server.port}")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Catalog(
            server,
            model_service_pb2_grpc.ModelServiceStub(channel),
            storage_service_pb2_grpc.StorageServiceStub(channel),
            folder,
            downloaded,
            size,
        )
    finally:
        await channel.close()
        await server.stop(grace=0)


LOCAL_IDS = {"local/tiny", "local/old", "local/keep", "local/org/downloaded", "local/sd-tiny"}


def table_rows(out: str) -> dict[str, list[str]]:
    """A table's rows by their first cell (cells are separated by two or more spaces)."""
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 1:
            rows[cells[0]] = cells
    return rows


async def test_models_list_as_a_table_and_as_json(catalog: Catalog, capsys) -> None:
    result = await cli(capsys, "models", "list")
    assert result.code == 0, result.err
    rows = table_rows(result.out)
    assert rows["ID"] == ["ID", "STATE", "FORMAT", "SIZE", "SOURCE", "PINNED", "LAST USED"]
    assert LOCAL_IDS <= set(rows)
    old = dict(zip(rows["ID"], rows["local/old"], strict=True))
    assert old["STATE"] == "available" and old["FORMAT"] == "transformers"
    assert old["SOURCE"] == "discovery" and old["PINNED"] == "-"
    assert old["LAST USED"] == "1970-01-01 00:01"
    # A human size of the exact byte count.
    assert re.fullmatch(r"\d+\.\d\d KiB", old["SIZE"]), old["SIZE"]
    assert abs(float(old["SIZE"].split()[0]) * 1024 - catalog.size) < 10
    assert rows["local/keep"][5] == "yes"
    assert rows["local/sd-tiny"][1] == "unservable"
    assert rows["local/org/downloaded"][4] == "download"

    result = await cli(capsys, "models", "list", "--json")
    assert result.code == 0, result.err
    listed = result.json()
    assert isinstance(listed, list)
    by_id = {m["id"]: m for m in listed}
    assert set(by_id) == LOCAL_IDS
    # The proto JSON form of what the gateway itself answers, every field present.
    direct = await catalog.models.ListModels(model_service_pb2.ListModelsRequest())
    for model in direct.models:
        parsed = json_format.ParseDict(by_id[model.id], model_pb2.Model())
        assert parsed == model
    assert by_id["local/old"]["sizeBytes"] == str(catalog.size)
    assert by_id["local/old"]["pinned"] is False and by_id["local/keep"]["pinned"] is True
    assert by_id["local/sd-tiny"]["state"] == "MODEL_STATE_UNSERVABLE"


async def test_models_list_filters_and_pages(catalog: Catalog, capsys) -> None:
    async def ids(*options: str) -> list[str]:
        result = await cli(capsys, "models", "list", "--json", *options)
        assert result.code == 0, result.err
        return [m["id"] for m in result.json()]

    assert await ids("--state", "unservable") == ["local/sd-tiny"]
    assert await ids("--modality", "image") == ["local/sd-tiny"]
    assert await ids("--query", "ORG/TINY") == ["local/org/downloaded"]  # the source repo
    assert await ids("--provider", "nobody") == []
    assert set(await ids("--provider", "local", "--state", "available")) == LOCAL_IDS - {
        "local/sd-tiny"
    }

    # One page, and on stderr how to get the next.
    first = await cli(capsys, "models", "list", "--json", "--page-size", "2")
    assert first.code == 0 and len(first.json()) == 2
    token = re.search(r"--page-token (\S+)", first.err)
    assert token is not None and "--all-pages" in first.err
    rest = await ids("--page-size", "2", "--page-token", token.group(1), "--all-pages")
    every = await ids("--page-size", "2", "--all-pages")
    assert [m["id"] for m in first.json()] + rest == every
    assert sorted(every) == every and set(every) == LOCAL_IDS

    # A bad filter is the server's INVALID_ARGUMENT: exit 2 with the reason.
    result = await cli(capsys, "models", "list", "--query", "x" * 300)
    assert result.code == 2 and result.out == ""
    assert "query" in result.err and "(INVALID_ARGUMENT)" in result.err
    # A bad value never leaves the machine: argparse refuses it.
    with pytest.raises(SystemExit) as exited:
        main(["models", "list", "--state", "sleeping"])
    assert exited.value.code == 2
    assert "not-downloaded" in capsys.readouterr().err


async def test_models_show(catalog: Catalog, capsys) -> None:
    result = await cli(capsys, "models", "show", "local/org/downloaded")
    assert result.code == 0, result.err
    fields = dict(line.split(":", 1) for line in result.out.split("\nParameters:")[0].splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["id"] == "local/org/downloaded"
    assert fields["repository"] == "org/tiny"
    assert fields["revision"] == f"main ({'b' * 40})"
    assert fields["path"] == str(catalog.downloaded)
    assert fields["size"].endswith(f"({catalog.size} bytes)")
    assert fields["pinned"] == "no" and fields["state"] == "available"
    parameters = await catalog.models.GetModelParameters(
        model_service_pb2.GetModelParametersRequest(id="local/org/downloaded")
    )
    rows = table_rows(result.out.split("\nParameters:")[1])
    assert rows["NAME"] == ["NAME", "TYPE", "SUPPORTED", "DEFAULT", "RANGE"]
    assert set(rows) - {"NAME"} == {p.name for p in parameters.parameters}
    temperature = next(p for p in parameters.parameters if p.name == "text.temperature")
    assert rows["text.temperature"][2] == ("yes" if temperature.supported else "no")

    result = await cli(capsys, "models", "show", "local/sd-tiny", "--json")
    assert result.code == 0, result.err
    shown = result.json()
    assert isinstance(shown, dict)
    assert shown["model"]["stateReason"] == "no image runner in this build yet"
    assert shown["model"]["format"] == "MODEL_FORMAT_DIFFUSERS"
    assert isinstance(shown["parameters"], list)

    result = await cli(capsys, "models", "show", "local/nope")
    assert result.code == 1 and "(MODEL_NOT_FOUND)" in result.err and result.out == ""


async def test_pin_unpin_and_rm(catalog: Catalog, capsys) -> None:
    result = await cli(capsys, "models", "pin", "local/org/downloaded")
    assert result.code == 0 and "Pinned local/org/downloaded" in result.out

    # A pinned model is refused, with the reason, and its files stay.
    result = await cli(capsys, "models", "rm", "local/org/downloaded")
    assert result.code == 2 and result.out == ""
    assert result.err.startswith("pluggably: error: ") and "(MODEL_PINNED)" in result.err
    assert len(result.err.splitlines()) == 1
    assert await asyncio.to_thread(catalog.downloaded.is_dir)

    result = await cli(capsys, "models", "unpin", "local/org/downloaded", "--json")
    assert result.code == 0 and result.json()["pinned"] is False
    model = await catalog.models.GetModel(model_service_pb2.GetModelRequest(id="local/keep"))
    assert model.pinned  # only the model named changed

    result = await cli(capsys, "models", "rm", "local/org/downloaded")
    assert result.code == 0, result.err
    assert f"freed {catalog.size / 1024:.2f} KiB ({catalog.size} bytes)" in result.out
    assert not await asyncio.to_thread(catalog.downloaded.exists)
    result = await cli(capsys, "models", "show", "local/org/downloaded")
    assert result.code == 1 and "(MODEL_NOT_FOUND)" in result.err

    result = await cli(capsys, "models", "rm", "local/tiny")  # from the config file
    assert result.code == 2 and "(MODEL_CONFIGURED)" in result.err


async def test_rescan(catalog: Catalog, capsys, tiny_model_dir: Path) -> None:
    result = await cli(capsys, "models", "rescan")
    assert result.code == 0 and result.out.strip() == "No changes."
    await asyncio.to_thread(shutil.copytree, tiny_model_dir, catalog.folder / "later")
    result = await cli(capsys, "models", "rescan")
    assert result.code == 0 and result.out.strip() == "Added: local/later"
    await asyncio.to_thread(shutil.rmtree, catalog.folder / "later")
    result = await cli(capsys, "models", "rescan", "--json")
    assert result.code == 0
    assert result.json() == {"added": [], "removed": ["local/later"]}


async def test_storage_usage(catalog: Catalog, capsys) -> None:
    await catalog.artifacts.put(
        PNG, kind="image", mime_type="image/png", model="local/tiny", request_id="r1"
    )
    result = await cli(capsys, "storage", "usage")
    assert result.code == 0, result.err
    rows = table_rows(result.out)
    assert rows["CATEGORY"] == ["CATEGORY", "USED", "LIMIT", "ITEMS"]
    assert rows["artifacts"] == ["artifacts", PNG_SIZE, "10.00 MiB", "1"]
    assert rows["models"][2] == f"{catalog.size / 1024:.2f} KiB"
    assert rows["temporary"][2] == "unlimited" and rows["total"][2] == "unlimited"
    assert {"models", "artifacts", "cache", "temporary", "total"} <= set(rows)
    assert re.search(r"^Disk free: \d+\.\d\d [KMGTP]iB$", result.out, re.MULTILINE)
    assert "No recent evictions." in result.out

    result = await cli(capsys, "storage", "usage", "--json")
    usage = result.json()
    assert isinstance(usage, dict)
    direct = await catalog.storage.GetStorageUsage(storage_service_pb2.GetStorageUsageRequest())
    assert usage["usedBytes"] == str(direct.used_bytes)
    assert [c["category"] for c in usage["categories"]] == [
        storage_service_pb2.StorageCategory.Name(c.category) for c in direct.categories
    ]
    assert usage["recentEvictions"] == []


async def test_storage_prune(catalog: Catalog, capsys) -> None:
    result = await cli(capsys, "storage", "prune", "--category", "models", "--dry-run")
    assert result.code == 0, result.err
    assert result.out.startswith("Would free ") and "nothing removed" in result.out
    listed = [line.strip() for line in result.out.splitlines()[1:]]
    assert "local/old" in listed
    assert not {"local/keep", "local/tiny"} & set(listed)  # pinned, configured
    assert await asyncio.to_thread((catalog.folder / "old").is_dir)

    # What the options send is what the gateway answers to the same request.
    for options, request in (
        (
            ["--category", "models", "--older-than", "1d12h"],
            storage_service_pb2.PruneStorageRequest(
                categories=[storage_service_pb2.STORAGE_CATEGORY_MODELS],
                older_than=duration_pb2.Duration(seconds=36 * 3600),
                dry_run=True,
            ),
        ),
        (
            ["--category", "artifacts", "--category", "temporary", "--target-free", "1.5KiB"],
            storage_service_pb2.PruneStorageRequest(
                categories=[
                    storage_service_pb2.STORAGE_CATEGORY_ARTIFACTS,
                    storage_service_pb2.STORAGE_CATEGORY_TEMPORARY,
                ],
                target_free_bytes=1536,
                dry_run=True,
            ),
        ),
    ):
        result = await cli(capsys, "storage", "prune", "--dry-run", "--json", *options)
        assert result.code == 0, result.err
        direct = await catalog.storage.PruneStorage(request)
        assert result.json() == json_format.MessageToDict(
            direct, always_print_fields_with_no_presence=True
        )

    result = await cli(capsys, "storage", "prune", "--category", "models")
    assert result.code == 0 and result.out.startswith("Freed ")
    assert not await asyncio.to_thread((catalog.folder / "old").exists)

    for bad in (["--older-than", "soon"], ["--target-free", "lots"], ["--category", "x"]):
        with pytest.raises(SystemExit) as exited:
            main(["storage", "prune", *bad])
        assert exited.value.code == 2
    capsys.readouterr()


async def test_artifacts_list_get_and_rm(catalog: Catalog, capsys, tmp_path: Path) -> None:
    store = catalog.artifacts
    image = await store.put(
        PNG, kind="image", mime_type="image/png", model="local/tiny", request_id="r1"
    )
    mesh = await store.put(
        b"glTF-mesh", kind="mesh", mime_type="model/gltf-binary", model="local/x", request_id="r2"
    )
    result = await cli(capsys, "artifacts", "list")
    assert result.code == 0, result.err
    rows = table_rows(result.out)
    assert rows[image.id][1:5] == ["image", "image/png", PNG_SIZE, "local/tiny"]
    assert rows[mesh.id][1:4] == ["mesh", "model/gltf-binary", "9 B"]
    result = await cli(capsys, "artifacts", "list", "--kind", "mesh", "--json")
    assert [a["id"] for a in result.json()] == [mesh.id]
    result = await cli(capsys, "artifacts", "list", "--model", "local/tiny", "--json")
    assert [a["id"] for a in result.json()] == [image.id]

    # Into ./<id>.<extension of its media type>.
    result = await cli(capsys, "artifacts", "get", image.id)
    assert result.code == 0, result.err
    target = tmp_path / f"{image.id}.png"
    assert await asyncio.to_thread(target.read_bytes) == PNG

    # An existing file is kept unless --force.
    await asyncio.to_thread(target.write_bytes, b"mine")
    result = await cli(capsys, "artifacts", "get", image.id)
    assert result.code == 2 and "exists" in result.err and "--force" in result.err
    assert await asyncio.to_thread(target.read_bytes) == b"mine"
    result = await cli(capsys, "artifacts", "get", image.id, "--force")
    assert result.code == 0 and await asyncio.to_thread(target.read_bytes) == PNG

    result = await cli(capsys, "artifacts", "get", mesh.id, "-o", "out/mesh.glb")
    assert result.code == 2 and "cannot write" in result.err  # no such folder
    result = await cli(capsys, "artifacts", "get", mesh.id, "-o", "mesh.glb")
    assert result.code == 0 and (tmp_path / "mesh.glb").read_bytes() == b"glTF-mesh"
    # Only the files asked for: no temporary file left behind.
    files = await asyncio.to_thread(
        lambda: sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    )
    assert files == sorted([target.name, "mesh.glb"])

    missing = hashlib.sha256(b"never stored").hexdigest()
    result = await cli(capsys, "artifacts", "get", missing)
    assert result.code == 1 and "NOT_FOUND" in result.err
    assert not (tmp_path / f"{missing}.bin").exists()

    result = await cli(capsys, "artifacts", "rm", mesh.id)
    assert result.code == 0 and "freed 9 B" in result.out
    result = await cli(capsys, "artifacts", "list", "--json")
    assert [a["id"] for a in result.json()] == [image.id]


async def test_artifact_to_stdout(catalog: Catalog, capsysbinary) -> None:
    artifact = await catalog.artifacts.put(
        PNG, kind="image", mime_type="image/png", model="local/tiny", request_id="r1"
    )
    code = await asyncio.to_thread(main, ["artifacts", "get", artifact.id, "-o", "-"])
    out, _ = capsysbinary.readouterr()
    assert code == 0 and out == PNG


# --------------------------------------------------------------------------------------------
# Keys, reachability, TLS
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def secured(config_for, tmp_path_factory) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A gateway with auth on; keys with every scope and with `models:read` only."""
    store_path = tmp_path_factory.mktemp("keys") / "keys.db"
    with KeyStore(store_path) as store:
        keys = {
            "admin": store.create("admin", ["admin"])[0],
            "reader": store.create("reader", ["models:read"])[0],
        }
    server = GatewayServer(config_for([], auth={"enabled": True, "store": str(store_path)}))
    await server.start()
    yield f"127.0.0.1:{server.port}", keys
    await server.stop(grace=0)


async def test_keys_from_every_source(secured, capsys, tmp_path: Path, monkeypatch) -> None:
    target, keys = secured
    listing = ("models", "list", "--server", target)

    result = await cli(capsys, *listing)
    assert result.code == 3 and "(API_KEY_MISSING)" in result.err

    key_file = tmp_path / "admin-key"
    key_file.write_text(keys["admin"] + "\n")
    result = await cli(capsys, *listing, "--key-file", str(key_file))
    assert result.code == 0 and result.out.strip() == "No models match."

    result = await cli(capsys, *listing, "--key", keys["reader"])
    assert result.code == 0

    # What `make run` leaves in ./var/dev-key is used when nothing else is given.
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "dev-key").write_text(keys["admin"] + "\n")
    result = await cli(capsys, "models", "rescan", "--server", target)
    assert result.code == 0, result.err

    # The environment comes before the dev key; a missing scope is exit 3 too.
    monkeypatch.setenv("PLUGGABLY_API_KEY", keys["reader"])
    result = await cli(capsys, "models", "rescan", "--server", target)
    assert result.code == 3 and "(SCOPE_MISSING)" in result.err

    result = await cli(capsys, *listing, "--key", "pk_000000000000_" + "x" * 40)
    assert result.code == 3 and "(API_KEY_INVALID)" in result.err
    assert "x" * 40 not in result.err

    result = await cli(capsys, *listing, "--key-file", str(tmp_path / "nope"))
    assert result.code == 2 and "nope" in result.err

    (tmp_path / "bad-key").write_text("pk_two words\n")
    result = await cli(capsys, *listing, "--key-file", str(tmp_path / "bad-key"))
    assert result.code == 2 and "bad-key" in result.err and "two words" not in result.err


async def test_keys_never_reach_the_output(secured, capsys, tmp_path: Path) -> None:
    target, keys = secured
    outputs = []
    for argv in (
        ("models", "list", "--key", keys["reader"]),
        ("models", "rescan", "--key", keys["reader"]),
        ("models", "show", "local/nope", "--key", keys["admin"]),
        ("storage", "usage", "--key", keys["reader"]),
    ):
        result = await cli(capsys, *argv, "--server", target)
        assert result.code in (0, 1, 3)
        outputs.append(result.out + result.err)
    secrets = [key.rsplit("_", 1)[1] for key in keys.values()]
    assert not [s for s in secrets for text in outputs if s in text]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_gateway_is_exit_4(capsys, monkeypatch) -> None:
    port = closed_port()
    monkeypatch.setenv("PLUGGABLY_SERVER", f"127.0.0.1:{port}")
    started = time.monotonic()
    result = await cli(capsys, "models", "list")
    assert result.code == 4 and result.out == ""
    assert result.err.startswith(f"pluggably: error: cannot reach the gateway at 127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    # --server wins over the environment.
    other = closed_port()
    result = await cli(capsys, "storage", "usage", "--server", f"127.0.0.1:{other}")
    assert result.code == 4 and f"127.0.0.1:{other}" in result.err


async def test_tls(config_for, capsys, tmp_path: Path) -> None:
    pki = make_tls_files(tmp_path)
    server = GatewayServer(
        config_for(
            [],
            server={
                "host": "127.0.0.1",
                "port": 0,
                "grace_period_s": 0,
                "tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
            },
        )
    )
    await server.start()
    try:
        argv = ("models", "list", "--server", f"localhost:{server.port}", "--timeout", "5")
        result = await cli(capsys, *argv, "--ca-file", str(pki.ca))
        assert result.code == 0, result.err
        result = await cli(capsys, *argv)  # plaintext to a TLS port
        assert result.code == 4 and "cannot reach" in result.err
        result = await cli(capsys, *argv, "--ca-file", str(pki.other_ca))  # untrusted
        assert result.code == 4
        result = await cli(capsys, *argv, "--ca-file", str(tmp_path / "none.pem"))
        assert result.code == 2 and "none.pem" in result.err
        # As a process of its own: grpc's own log of the failed handshake stays off stderr, so
        # the error is one line there.
        env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pluggably.cli",
            *argv,
            "--ca-file",
            str(pki.other_ca),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 4 and out == b""
        assert len(err.decode().splitlines()) == 1 and b"CERTIFICATE_VERIFY_FAILED" in err
    finally:
        await server.stop(grace=0)


# --------------------------------------------------------------------------------------------
# models pull: the Hub stand-in, a gateway downloading from it, the CLI in a pseudo-terminal
# --------------------------------------------------------------------------------------------

ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][A-Z0-9]|[=>])")


class Terminal:
    """The CLI as a subprocess whose stdin, stdout and stderr are a pseudo-terminal (120x40):
    what a person at a terminal sees, escape sequences and all."""

    def __init__(self, process: asyncio.subprocess.Process, master: int) -> None:
        self.process = process
        self._master = master
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    async def start(cls, *argv: str, server: str, cwd: Path) -> Terminal:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PLUGGABLY_API_KEY", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")
        }
        env.update(PLUGGABLY_SERVER=server, TERM="xterm-256color", COLUMNS="120", LINES="40")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pluggably.cli",
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(slave)
        return cls(process, master)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the child and every copy of the slave side are gone
                break
            if not data:
                break
            with self._lock:
                self._output += data
        os.close(self._master)

    @property
    def raw(self) -> str:
        with self._lock:
            return self._output.decode(errors="replace")

    @property
    def text(self) -> str:
        """The output without escape sequences and carriage returns."""
        return ANSI.sub("", self.raw).replace("\r", "\n")

    async def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found is not None:
                return found
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the terminal output:\n{self.text[-3000:]}")

    async def wait(self, timeout: float = 60.0) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.to_thread(self._reader.join, 10)
        return code

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await asyncio.to_thread(self._reader.join, 10)


@contextlib.contextmanager
def _hub_client_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The gateway downloads in this process: no token or offline mode from the environment.
    from huggingface_hub import close_session, constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        yield
    finally:
        close_session()  # its pooled connections point at this test's (stopped) stand-in


@dataclass
class Downloads:
    hub: HubStandIn
    server: GatewayServer
    target: str
    models: model_service_pb2_grpc.ModelServiceStub


EXTRA_BYTES = 2 * 1024 * 1024


@pytest.fixture
async def downloads(
    tmp_path: Path, tiny_model_dir: Path, config_for, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Downloads]:
    """The Hub stand-in serving `org/tiny` (the tiny model) and `org/big` (the tiny model and
    2 MiB more), and a gateway that downloads from it into its own cache."""
    with _hub_client_environment(monkeypatch):
        async with HubStandIn() as hub:
            hub.add_folder("org/tiny", tiny_model_dir)
            files: dict[str, bytes | Path] = dict(
                await asyncio.to_thread(
                    lambda: [
                        (str(p.relative_to(tiny_model_dir)), p)
                        for p in tiny_model_dir.rglob("*")
                        if p.is_file()
                    ]
                )
            )
            files["extra.bin"] = os.urandom(EXTRA_BYTES)
            hub.add_repo("org/big", files)
            config = config_for(
                [],
                storage={
                    "root": str(tmp_path / "storage"),
                    "hf_cache": str(tmp_path / "hf-cache"),
                    "rescan_interval_s": 0,
                    "limits": {"min_free_bytes": 0, "min_idle_s": 0},
                    "hub": {"endpoint": hub.endpoint},
                },
            )
            server = GatewayServer(config)
            await server.start()
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            try:
                yield Downloads(
                    hub,
                    server,
                    f"127.0.0.1:{server.port}",
                    model_service_pb2_grpc.ModelServiceStub(channel),
                )
            finally:
                await channel.close()
                await server.stop(grace=0)


async def test_pull_draws_progress_in_a_terminal(downloads: Downloads, tmp_path: Path) -> None:
    terminal = await Terminal.start(
        "models", "pull", "org/tiny", server=downloads.target, cwd=tmp_path
    )
    try:
        code = await terminal.wait()
    finally:
        await terminal.close()
    text = terminal.text
    assert code == 0, text
    started = re.search(r"Download (\S+): org/tiny as local/org/tiny", text)
    assert started is not None, text
    download = await downloads.models.GetDownload(
        model_service_pb2.GetDownloadRequest(id=started.group(1))
    )
    assert download.state == model_pb2.DOWNLOAD_STATE_SUCCEEDED
    # The bar: bytes done/total in binary units against the real total (never a placeholder),
    # files done/total, and the final state.
    total = f"{download.total_bytes / 1024:.1f} KiB"
    shown = re.findall(r"([\d.]+)/([\d.]+ (?:bytes|KiB|MiB))", text)
    assert shown and {t for _, t in shown} == {total}, text
    assert f"{total.split()[0]}/{total}" in text
    assert re.search(r"(\d+)/\1 files\s+succeeded", text), text
    assert "\x1b[" in terminal.raw  # drawn as a live display, not as plain lines
    assert "Downloaded org/tiny as local/org/tiny" in text
    model = await downloads.models.GetModel(model_service_pb2.GetModelRequest(id="local/org/tiny"))
    assert model.state == model_pb2.MODEL_STATE_AVAILABLE
    assert model.source == model_pb2.MODEL_SOURCE_DOWNLOAD


async def test_ctrl_c_cancels_the_download(downloads: Downloads, tmp_path: Path) -> None:
    downloads.hub.throttle(128 * 1024)  # org/big takes about 20 s
    terminal = await Terminal.start(
        "models", "pull", "org/big", server=downloads.target, cwd=tmp_path
    )
    try:
        download_id = (await terminal.expect(r"Download (\S+): org/big")).group(1)
        await terminal.expect(r"files")  # the bar is up: the CLI is watching
        await asyncio.sleep(0.3)
        terminal.process.send_signal(signal.SIGINT)
        code = await terminal.wait(timeout=30)
    finally:
        await terminal.close()
    assert code == 130, terminal.text
    assert f"Cancelled download {download_id}" in terminal.text
    assert "Traceback" not in terminal.text
    deadline = time.monotonic() + 10
    while True:
        download = await downloads.models.GetDownload(
            model_service_pb2.GetDownloadRequest(id=download_id)
        )
        if download.state != model_pb2.DOWNLOAD_STATE_RUNNING or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert download.state == model_pb2.DOWNLOAD_STATE_CANCELLED
    assert download.downloaded_bytes < download.total_bytes or download.total_bytes == 0


async def test_pull_detach_downloads_and_cancel(
    downloads: Downloads, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLUGGABLY_SERVER", downloads.target)
    downloads.hub.throttle(128 * 1024)
    argv = ["models", "pull", "org/big", "--name", "big", "--pin", "--exclude", "*.md"]
    result = await cli(capsys, *argv, "--detach")
    assert result.code == 0, result.err
    download_id = result.out.strip()
    assert download_id and "\n" not in download_id and download_id in result.err

    result = await cli(capsys, "models", "downloads", "--json")
    assert result.code == 0, result.err
    (listed,) = [d for d in result.json() if d["id"] == download_id]
    assert listed["model"] == "local/big" and listed["repoId"] == "org/big"
    assert listed["ignorePatterns"] == ["*.md"]
    result = await cli(capsys, "models", "downloads")
    assert download_id in table_rows(result.out)

    result = await cli(capsys, "models", "cancel", download_id)
    assert result.code == 0 and download_id in result.out
    download = await downloads.models.GetDownload(
        model_service_pb2.GetDownloadRequest(id=download_id)
    )
    assert download.state == model_pb2.DOWNLOAD_STATE_CANCELLED
    result = await cli(capsys, "models", "downloads", "--state", "cancelled", "--json")
    assert download_id in [d["id"] for d in result.json()]


async def test_a_failed_pull_is_exit_1_with_the_reason(
    downloads: Downloads, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLUGGABLY_SERVER", downloads.target)
    # Refused up front (NOT_FOUND) or failed while running (FAILED): exit 1 either way, with the
    # server's reason in parentheses.
    result = await cli(capsys, "models", "pull", "org/missing", "--json")
    assert result.code == 1, result.err
    assert re.search(r"pluggably: error: .+ \([A-Z_]+\)$", result.err.strip()), result.err
    if result.out:
        assert result.json()["state"] == "DOWNLOAD_STATE_FAILED"

    # A transfer that breaks off: the job ends FAILED, and the CLI says what `Download.error`
    # says.
    downloads.hub.drop_after("extra.bin", 2**20, reset=True)
    result = await cli(capsys, "models", "pull", "org/big")
    assert result.code == 1, result.err
    failed = await downloads.models.ListDownloads(
        model_service_pb2.ListDownloadsRequest(state=model_pb2.DOWNLOAD_STATE_FAILED)
    )
    (download,) = failed.downloads
    info = error_details_pb2.ErrorInfo()
    assert download.error.details[0].Unpack(info)
    assert result.err.splitlines()[-1] == (
        f"pluggably: error: download {download.id} failed: {download.error.message} ({info.reason})"
    )
    assert "local/org/big: failed" in result.out


async def test_pull_without_a_terminal_prints_lines_or_json(
    downloads: Downloads, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLUGGABLY_SERVER", downloads.target)
    result = await cli(capsys, "models", "pull", "org/tiny", "--name", "plain")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert "\x1b" not in result.out  # no bar, no escape sequences in a log
    assert lines[0].startswith("local/plain: ")
    assert re.fullmatch(
        r"local/plain: succeeded, [\d.]+ KiB / [\d.]+ KiB, (\d+)/\1 files", lines[-2]
    )
    assert lines[-1].startswith("Downloaded org/tiny as local/plain: ")

    result = await cli(capsys, "models", "pull", "org/tiny", "--name", "quiet", "--json")
    assert result.code == 0, result.err
    final = result.json()
    assert final["state"] == "DOWNLOAD_STATE_SUCCEEDED" and final["model"] == "local/quiet"
    assert int(final["downloadedBytes"]) == int(final["totalBytes"]) > 0
    result = await cli(capsys, "models", "show", "local/quiet", "--json")
    assert result.json()["model"]["source"] == "MODEL_SOURCE_DOWNLOAD"


async def test_a_gateway_that_never_answers_hits_the_timeout(capsys) -> None:
    # A listener that accepts connections and says nothing: the call waits for its deadline.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        result = await cli(capsys, "storage", "usage", "--server", target, "--timeout", "0.5")
    assert result.code == 1
    assert result.err.strip() == (
        f"pluggably: error: no answer from the gateway at {target} within 0.5 s (--timeout)"
    )
