"""Shared fixtures. Expensive things (the tiny model, servers, Envoy) are built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Gateways scan the Hugging Face cache for models by default: in tests (and the gateways they
# start as subprocesses) it is an empty folder of their own, never the user's cache.
_HF_CACHE = tempfile.mkdtemp(prefix="pluggably-test-hf-cache-")
os.environ["HF_HUB_CACHE"] = _HF_CACHE
os.environ["HF_HUB_DISABLE_XET"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama chat model with its tokenizer, built offline."""
    from pluggably.devtools.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-random-llama"
    build_tiny_model(out)
    return out


@pytest.fixture(scope="session")
def config_for():
    """Builds a validated Config for tests: port 0, the given local models."""
    from pluggably.config import Config

    def build(models: list[dict] | None = None, **sections) -> Config:
        # Auth and the metrics port are off unless a test turns them on: tests of auth and
        # metrics do, the rest test other things and must not collide on the metrics port.
        # Each gateway gets a registry of its own.
        data = {
            "server": {"host": "127.0.0.1", "port": 0, "grace_period_s": 2},
            "auth": {"enabled": False},
            "metrics": {"enabled": False},
            "storage": {"root": tempfile.mkdtemp(prefix="pluggably-test-storage-")},
            **sections,
        }
        data["local"] = {**sections.get("local", {}), "models": models or []}
        return Config.model_validate(data)

    return build


@pytest.fixture(scope="session")
async def tiny_gateway(tiny_model_dir, config_for):
    """An in-process gateway serving the tiny model as `local/tiny` (alias `tiny-alias`)."""
    from pluggably.server import GatewayServer

    config = config_for(
        [
            {
                "name": "tiny",
                "path": str(tiny_model_dir),
                "max_concurrency": 2,
                "default_max_tokens": 16,
            }
        ],
        aliases={"tiny-alias": "local/tiny"},
    )
    server = GatewayServer(config)
    await server.start()
    yield server
    await server.stop(grace=0)


@pytest.fixture(scope="session")
async def tiny_channel(tiny_gateway):
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{tiny_gateway.port}") as channel:
        yield channel
