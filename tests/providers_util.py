"""A real gateway in front of the three provider stand-ins, for provider tests.

`ProviderStack` starts the OpenAI, Anthropic and Gemini stand-ins and a GatewayServer whose config
names them as providers `openai`, `anthropic`, `gemini` (and `groq`, the OpenAI-compatible preset,
pointed at the OpenAI stand-in), with short timeouts and back-offs so fault tests run fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import grpc

from pluggably.config import Config
from pluggably.devtools.standins import StandIn
from pluggably.devtools.standins.anthropic import AnthropicStandIn
from pluggably.devtools.standins.gemini import GeminiStandIn
from pluggably.devtools.standins.openai import OpenAIStandIn
from pluggably.server import GatewayServer
from pluggably.v1 import generate_service_pb2_grpc, model_service_pb2_grpc, stream_service_pb2_grpc

KEYS = {
    "openai": "sk-test-openai-0123456789",
    "anthropic": "sk-ant-test-0123456789",
    "gemini": "AIzaTestGemini0123456789abcdef",
}
MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-sonnet-4-6",
    "gemini": "gemini-2.5-flash",
    "groq": "gpt-4o-mini",
}
FAST = {
    "timeouts": {"connect_s": 2, "first_byte_s": 2, "idle_s": 2, "total_s": 10},
    "retries": {
        "max_attempts": 3,
        "initial_backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "max_retry_after_s": 2,
    },
    "breaker": {"failure_threshold": 3, "open_s": 0.5},
}


@dataclasses.dataclass
class ProviderStack:
    standins: dict[str, StandIn]
    server: GatewayServer
    channel: grpc.aio.Channel

    @property
    def generate(self) -> Any:
        return generate_service_pb2_grpc.GenerateServiceStub(self.channel).Generate

    @property
    def stream(self) -> Any:
        return stream_service_pb2_grpc.StreamServiceStub(self.channel).StreamGenerate

    @property
    def models(self) -> Any:
        return model_service_pb2_grpc.ModelServiceStub(self.channel)

    def backend(self, provider: str) -> Any:
        return self.server.router.backend_of(f"{provider}/x")

    def standin(self, provider: str) -> Any:
        return self.standins["openai" if provider == "groq" else provider]

    def reset(self) -> None:
        for standin in self.standins.values():
            standin.reset()
        for backend in self.server.backends:
            if hasattr(backend, "_breakers"):  # provider adapters; not the local backend
                backend._breakers.clear()


def provider_config(standins: dict[str, StandIn], **overrides: Any) -> dict[str, Any]:
    providers = {
        "openai": {
            "base_url": standins["openai"].base_url + "/v1",
            "api_key": KEYS["openai"],
            **FAST,
        },
        "anthropic": {
            "base_url": standins["anthropic"].base_url + "/v1",
            "api_key": KEYS["anthropic"],
            **FAST,
        },
        "gemini": {"base_url": standins["gemini"].base_url, "api_key": KEYS["gemini"], **FAST},
        "groq": {
            "base_url": standins["openai"].base_url + "/v1",
            "api_key": KEYS["openai"],
            **FAST,
        },
    }
    for name, section in overrides.items():
        providers[name] = {**providers.get(name, {}), **section}
    return providers


@contextlib.asynccontextmanager
async def provider_stack(**config: Any) -> AsyncIterator[ProviderStack]:
    standins: dict[str, StandIn] = {
        "openai": OpenAIStandIn(api_key=KEYS["openai"]),
        "anthropic": AnthropicStandIn(api_key=KEYS["anthropic"]),
        "gemini": GeminiStandIn(api_key=KEYS["gemini"]),
    }
    async with contextlib.AsyncExitStack() as stack:
        for standin in standins.values():
            await stack.enter_async_context(standin)
        providers = provider_config(standins, **config.pop("providers", {}))
        data = {
            "server": {"host": "127.0.0.1", "port": 0, "grace_period_s": 1},
            "auth": {"enabled": False},
            "metrics": {"enabled": False},
            "providers": providers,
            "storage": {"root": tempfile.mkdtemp(prefix="pluggably-test-storage-")},
            **config,
        }
        server = GatewayServer(Config.model_validate(data))
        await server.start()
        stack.push_async_callback(server.stop, 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        yield ProviderStack(standins, server, channel)
