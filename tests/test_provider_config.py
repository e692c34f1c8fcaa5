"""Configuration of the hosted providers, and what it means on the wire and in the catalogue.

Config sections are checked through `load_config` (what an operator sees); presets, keys, model
listing, parameters and capabilities through a real GatewayServer in front of the stand-ins, so
each preset's differences are checked in the request the endpoint actually receives.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from helpers import rich_error
from pluggably.app import build_backends
from pluggably.config import Config, ConfigError, load_config
from pluggably.devtools.standins import Fault
from pluggably.devtools.standins.anthropic import DEFAULT_MODELS as ANTHROPIC_MODELS
from pluggably.devtools.standins.anthropic import AnthropicStandIn
from pluggably.devtools.standins.gemini import GeminiStandIn, gemini_model
from pluggably.devtools.standins.openai import OpenAIStandIn
from pluggably.providers._errors import UpstreamFailure
from pluggably.providers.presets import PRESETS
from pluggably.server import GatewayServer
from pluggably.v1 import (
    generate_service_pb2_grpc,
    generation_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    stream_service_pb2_grpc,
)
from providers_util import FAST, KEYS, provider_config, provider_stack

pb = generation_pb2
UNAVAILABLE = model_pb2.MODEL_STATE_UNAVAILABLE
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def request(
    model: str,
    *,
    prompt: str = "",
    messages: list[pb.ChatMessage] | None = None,
    tools: Sequence[str] = (),
    tool_choice: int = 0,
    **text: Any,
) -> pb.GenerateRequest:
    kwargs: dict[str, Any] = {"model": model, "text": pb.TextOptions(**text)}
    if messages:
        kwargs["messages"] = messages
    else:
        kwargs["prompt"] = prompt or "Say hi"
    if tools:
        kwargs["tools"] = [
            pb.Tool(function=pb.FunctionDeclaration(name=name, parameters=struct_pb2.Struct()))
            for name in tools
        ]
    if tool_choice:
        kwargs["tool_choice"] = pb.ToolChoice(mode=tool_choice)
    return pb.GenerateRequest(**kwargs)


class Gateway:
    """A started GatewayServer and stubs on one channel."""

    def __init__(self, server: GatewayServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.generate = generate_service_pb2_grpc.GenerateServiceStub(channel).Generate
        self.stream = stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    def backend(self, provider: str) -> Any:
        return self.server.router.backend_of(f"{provider}/x")

    async def list_all(self, provider: str = "") -> list[model_pb2.Model]:
        out, token = [], ""
        while True:
            page = await self.models.ListModels(
                model_service_pb2.ListModelsRequest(
                    provider=provider, page_size=1000, page_token=token
                )
            )
            out += page.models
            token = page.next_page_token
            if not token:
                return out

    async def model(self, model_id: str) -> model_pb2.Model:
        return await self.models.GetModel(model_service_pb2.GetModelRequest(id=model_id))

    async def params(self, model_id: str) -> dict[str, model_pb2.ParameterSpec]:
        response = await self.models.GetModelParameters(
            model_service_pb2.GetModelParametersRequest(id=model_id)
        )
        return {p.name.removeprefix("text."): p for p in response.parameters}


@contextlib.asynccontextmanager
async def gateway(providers: dict[str, Any]) -> AsyncIterator[Gateway]:
    config = Config.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0, "grace_period_s": 1},
            "auth": {"enabled": False},
            "metrics": {"enabled": False},
            "providers": providers,
        }
    )
    server = GatewayServer(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Gateway(server, channel)
    finally:
        await server.stop(0)


async def error_of(call: Any) -> Any:
    """The rich error of a unary call or a stream (drained)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return rich_error(caught.value)


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "pluggably.yaml"
    path.write_text(text)
    return load_config(path, environ=environ or {})


def load_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ)
    return str(caught.value)


def build(config: Config, name: str) -> Any:
    return next(b for b in build_backends(config) if b.provider == name)


# ---- config sections ---------------------------------------------------------------------------


def test_provider_names_imply_kind_and_preset(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "providers:\n  openai: {}\n  groq:\n  anthropic: {}\n  gemini: {}\n"
        "  ollama: {models: [{name: llama3.2}]}\n",
    )
    kinds = {name: (s.kind, getattr(s, "preset", None)) for name, s in config.providers.items()}
    assert kinds == {
        "openai": ("openai", "openai"),
        "groq": ("openai", "groq"),
        "anthropic": ("anthropic", None),
        "gemini": ("gemini", None),
        "ollama": ("openai", "ollama"),
    }
    groq = build(config, "groq")
    assert groq.base_url == "https://api.groq.com/openai/v1" and groq.preset.name == "groq"
    assert build(config, "ollama").base_url == "http://localhost:11434/v1"


def test_own_base_url_gets_the_generic_preset_but_named_presets_keep_theirs(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
providers:
  mine: {kind: openai, base_url: "http://10.0.0.5:9000/v1/"}
  openai: {base_url: "https://proxy.example/v1"}
  groq: {kind: openai, base_url: "https://groq-proxy.example/v1"}
""",
    )
    mine, openai, groq = build(config, "mine"), build(config, "openai"), build(config, "groq")
    assert mine.preset.name == "generic" and mine.base_url == "http://10.0.0.5:9000/v1"
    assert not mine.requires_key and mine.api_key is None
    # A provider called openai (or groq) behind a proxy is still OpenAI (Groq): same parameters,
    # model table, key variable, not a generic endpoint.
    assert openai.preset.name == "openai" and openai.base_url == "https://proxy.example/v1"
    assert groq.preset.name == "groq" and groq.max_tokens_field == "max_completion_tokens"


def test_preset_defaults_apply_and_can_be_overridden(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
providers:
  fireworks: {}
  fw2: {kind: openai, preset: fireworks, list_models: true, max_tokens_field: max_completion_tokens}
  lm: {kind: openai, preset: lmstudio, supported_parameters: [temperature]}
""",
    )
    # Fireworks' listing has none of your chat models: the preset turns listing off.
    assert config.providers["fireworks"].list_models is False
    assert config.providers["fw2"].list_models is True
    assert build(config, "fw2").max_tokens_field == "max_completion_tokens"
    assert build(config, "lm").supported == ("temperature",)


@pytest.mark.parametrize(
    "text, path, words",
    [
        (
            "providers:\n  mine: {kind: cohere}\n",
            "providers.mine.kind",
            ["unknown kind 'cohere'", "anthropic, gemini, openai"],
        ),
        (
            "providers:\n  mine: {base_url: 'http://x'}\n",
            "providers.mine.kind",
            ["'mine' is neither a kind", "groq", "`kind: openai`"],
        ),
        (
            "providers:\n  mine: {kind: openai, preset: nope}\n",
            "providers.mine.preset",
            ["unknown preset 'nope'", "openrouter"],
        ),
        (
            "providers:\n  openai: {base_url: 'api.openai.com/v1'}\n",
            "providers.openai.base_url",
            ["http:// or https://"],
        ),
        (
            "providers:\n  anthropic: {api_kye: x}\n",
            "providers.anthropic.api_kye",
            ["Extra inputs"],
        ),
        ("providers:\n  gemini: {preset: groq}\n", "providers.gemini.preset", ["Extra inputs"]),
        (
            "providers:\n  groq: {timeouts: {idle_s: 0}}\n",
            "providers.groq.timeouts.idle_s",
            ["greater than 0"],
        ),
        (
            "providers:\n  openai: {models: [{name: a, capabilities: {vison: true}}]}\n",
            "providers.openai.models.0.capabilities.vison",
            ["Extra inputs"],
        ),
        (
            "providers:\n  openai: {models: [{name: a}, {name: a}]}\n",
            "providers.openai.models",
            ["duplicate names a"],
        ),
        (
            "providers:\n  openai: {supported_parameters: [temprature]}\n",
            "providers.openai.supported_parameters",
            ["unknown parameters ['temprature']"],
        ),
        (
            "providers:\n  local: {kind: openai}\n",
            "providers.local",
            ["'local' is the provider of the `local:` section"],
        ),
        (
            "providers:\n  My.Provider: {kind: openai}\n",
            "providers.My.Provider",
            ["lower-case letters"],
        ),
        ("providers:\n  groq: 3\n", "providers.groq", ["valid dictionary"]),
    ],
)
def test_bad_provider_sections_name_the_field(
    tmp_path: Path, text: str, path: str, words: list[str]
) -> None:
    message = load_error(tmp_path, text)
    lines = [line for line in message.splitlines() if line.startswith("  ")]
    # Exactly one line, about the bad field: no pydantic union noise for the other kinds.
    assert len(lines) == 1, message
    assert lines[0].startswith(f"  {path}: "), message
    for word in words:
        assert word in lines[0], message
    assert "discriminator" not in message and "tag" not in message.lower()


def test_local_from_the_environment_is_refused_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"PLUGGABLY_PROVIDERS__LOCAL__BASE_URL": "http://x"})
    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith("  providers.local: ")
    assert "PLUGGABLY_PROVIDERS__LOCAL__BASE_URL" in lines[0]


def test_keys_from_the_environment(tmp_path: Path) -> None:
    environ = {
        "PLUGGABLY_PROVIDERS__OPENAI__API_KEY": "sk-from-pluggably-env-123",
        "TEAM_ANTHROPIC": "sk-ant-from-team-var",
        "GROQ_API_KEY": "gsk_default_var_123",
        "OPENAI_API_KEY": "sk-should-not-win",
    }
    config = load(
        tmp_path,
        "providers:\n  openai: {}\n  anthropic: {api_key_env: TEAM_ANTHROPIC}\n  groq: {}\n",
        environ,
    )
    openai = config.providers["openai"]
    assert openai.api_key.get_secret_value() == "sk-from-pluggably-env-123"
    assert "sk-from-pluggably-env-123" not in repr(config) and "sk-from" not in str(openai)
    assert openai.resolve_key("OPENAI_API_KEY", environ) == ("sk-from-pluggably-env-123", "api_key")
    assert config.providers["anthropic"].resolve_key("ANTHROPIC_API_KEY", environ) == (
        "sk-ant-from-team-var",
        "environment variable TEAM_ANTHROPIC",
    )
    assert config.providers["groq"].resolve_key("GROQ_API_KEY", environ) == (
        "gsk_default_var_123",
        "environment variable GROQ_API_KEY",
    )
    # An environment-only provider needs no file at all.
    only_env = load_config(environ={"PLUGGABLY_PROVIDERS__GROQ__API_KEY": "gsk_x"})
    assert only_env.providers["groq"].preset == "groq"


def test_backend_takes_the_key_from_the_default_variable(monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-default-variable-1")
    monkeypatch.setenv("MY_GROQ", "gsk_my_variable_12345")
    config = Config.model_validate(
        {"providers": {"anthropic": {}, "groq": {"api_key_env": "MY_GROQ"}}}
    )
    anthropic, groq = build(config, "anthropic"), build(config, "groq")
    assert anthropic.auth_headers()["x-api-key"] == "sk-ant-default-variable-1"
    assert groq.auth_headers() == {"Authorization": "Bearer gsk_my_variable_12345"}


# ---- every preset on the wire ------------------------------------------------------------------

# name: (output-limit field, stream_options sent, key sent, seed field, repetition field, `name` kept)
WIRE = {
    "openai": ("max_completion_tokens", True, True, "seed", None, True),
    "openrouter": ("max_tokens", True, True, "seed", "repetition_penalty", True),
    "groq": ("max_completion_tokens", True, True, "seed", None, False),
    "together": ("max_tokens", True, True, "seed", "repetition_penalty", True),
    "mistral": ("max_tokens", False, True, "random_seed", None, True),
    "deepseek": ("max_tokens", True, True, None, None, True),
    "fireworks": ("max_tokens", False, True, "seed", "repetition_penalty", True),
    "huggingface": ("max_tokens", True, True, "seed", None, True),
    "ollama": ("max_tokens", True, False, "seed", None, True),
    "vllm": ("max_tokens", True, False, "seed", "repetition_penalty", True),
    "lmstudio": ("max_tokens", True, False, "seed", "repeat_penalty", True),
    "llamacpp": ("max_tokens", True, False, "seed", "repeat_penalty", True),
    "generic": ("max_tokens", True, False, "seed", None, True),
}
SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
UNSUPPORTED = {
    "openai": {"top_k", "repetition_penalty"},
    "groq": {"top_k", "repetition_penalty"},
    "mistral": {"top_k", "repetition_penalty"},
    "deepseek": {"seed", "top_k", "repetition_penalty"},
    "huggingface": {"top_k", "repetition_penalty"},
    "ollama": {"top_k", "repetition_penalty"},
    "generic": {"top_k", "repetition_penalty"},
}
VALUES = {
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "seed": 7,
    "stop": ["END"],
    "presence_penalty": 0.1,
    "frequency_penalty": 0.2,
    "repetition_penalty": 1.1,
}
PRESET_MODEL = "gpt-4o-mini"


def preset_provider(preset: str) -> str:
    return "mine" if preset == "generic" else preset


def test_the_wire_table_covers_every_preset() -> None:
    assert set(WIRE) == set(PRESETS)


@pytest.fixture(scope="module")
async def presets_gw() -> AsyncIterator[tuple[Gateway, OpenAIStandIn]]:
    # Accepts any key (or none) and ignores fields OpenAI would reject (random_seed, top_k, ...),
    # as the compatible servers do; the recorded request shows what each preset sent.
    standin = OpenAIStandIn(api_key=None, reject_unknown_fields=False)
    with pytest.MonkeyPatch.context() as mp:
        for preset in PRESETS.values():
            if preset.api_key_env:
                mp.delenv(preset.api_key_env, raising=False)
        async with standin:
            url = standin.base_url + "/v1"
            providers: dict[str, Any] = {}
            for name, preset in PRESETS.items():
                section: dict[str, Any] = {"base_url": url, "list_models": False, **FAST}
                if name == "generic":
                    section["kind"] = "openai"
                if preset.requires_key:
                    section["api_key"] = f"key-for-{name}-0123456789"
                if name == "ollama":  # Ollama's tools and images are per model
                    section["models"] = [
                        {"name": PRESET_MODEL, "capabilities": {"tools": True, "vision": True}}
                    ]
                providers[preset_provider(name)] = section
            async with gateway(providers) as gw:
                yield gw, standin


@pytest.fixture
def preset_env(presets_gw) -> tuple[Gateway, OpenAIStandIn]:
    presets_gw[1].reset()
    return presets_gw


def chats(standin: OpenAIStandIn) -> list[Any]:
    return [r for r in standin.requests if r.path == "/v1/chat/completions"]


@pytest.mark.parametrize("preset", sorted(WIRE))
async def test_preset_request_on_the_wire(preset_env, preset: str) -> None:
    gw, standin = preset_env
    limit_field, stream_usage, keyed, seed_field, repetition_field, keeps_name = WIRE[preset]
    provider = preset_provider(preset)
    text: dict[str, Any] = {"max_tokens": 5, "temperature": 0.5}
    if seed_field:
        text["seed"] = 7
    if repetition_field:
        text["repetition_penalty"] = 1.1
        text["top_k"] = 5
    messages = [pb.ChatMessage(role="user", content="Hello there", name="alice")]
    response = await gw.generate(request(f"{provider}/{PRESET_MODEL}", messages=messages, **text))
    assert response.text and response.model == f"{provider}/{PRESET_MODEL}"
    chunks = [
        c async for c in gw.stream(request(f"{provider}/{PRESET_MODEL}", messages=messages, **text))
    ]
    assert chunks[-1].WhichOneof("event") == "done"

    unary, streamed = chats(standin)
    for sent in (unary, streamed):
        body = sent.body
        assert sent.method == "POST"
        auth = sent.headers.get("authorization")
        assert auth == (f"Bearer key-for-{preset}-0123456789" if keyed else None)
        assert body[limit_field] == 5
        assert {"max_tokens", "max_completion_tokens"} & set(body) == {limit_field}
        assert body["temperature"] == 0.5
        if seed_field:
            assert body[seed_field] == 7 and ({"seed", "random_seed"} - {seed_field}).isdisjoint(
                body
            )
        if repetition_field:
            assert body[repetition_field] == pytest.approx(1.1) and body["top_k"] == 5
            assert ({"repetition_penalty", "repeat_penalty"} - {repetition_field}).isdisjoint(body)
        assert body["messages"][0].get("name") == ("alice" if keeps_name else None)
    assert "stream" not in unary.body and "stream_options" not in unary.body
    assert streamed.body["stream"] is True
    assert streamed.body.get("stream_options") == (
        {"include_usage": True} if stream_usage else None
    )


PAIRS = [
    (preset, param) for preset in sorted(WIRE) for param in sorted(UNSUPPORTED.get(preset, ()))
]


@pytest.mark.parametrize("preset, param", PAIRS)
async def test_preset_rejects_unsupported_parameters(preset_env, preset: str, param: str) -> None:
    gw, standin = preset_env
    provider = preset_provider(preset)
    err = await error_of(
        gw.generate(request(f"{provider}/{PRESET_MODEL}", **{param: VALUES[param]}))
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == [f"text.{param}"]
    assert f"{provider}/{PRESET_MODEL}" in err.bad_request.field_violations[0].description
    assert chats(standin) == []


async def test_presets_accept_every_parameter_they_list(preset_env) -> None:
    # The complement of the test above: every listed parameter goes through, under its own name.
    gw, standin = preset_env
    for preset in sorted(WIRE):
        for param in SAMPLING:
            if param in UNSUPPORTED.get(preset, ()):
                continue
            await gw.generate(
                request(f"{preset_provider(preset)}/{PRESET_MODEL}", **{param: VALUES[param]})
            )
    assert len(chats(standin)) == sum(len(SAMPLING) - len(UNSUPPORTED.get(p, ())) for p in WIRE)


async def test_ollama_rejects_tool_choice_and_image_urls(preset_env) -> None:
    gw, standin = preset_env
    model = f"ollama/{PRESET_MODEL}"
    for mode in (pb.TOOL_CHOICE_MODE_REQUIRED, pb.TOOL_CHOICE_MODE_NONE):
        err = await error_of(gw.generate(request(model, tools=["lookup"], tool_choice=mode)))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == ["tool_choice"]
        assert "Ollama ignores tool_choice" in err.bad_request.field_violations[0].description
    image_url = pb.ChatMessage(
        role="user",
        content="What is this?",
        parts=[pb.ContentPart(image=pb.ImageInput(url="https://example.com/cat.png"))],
    )
    err = await error_of(gw.generate(request(model, messages=[image_url])))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.fields == ["messages[0].parts[0].image.url"]
    assert chats(standin) == []

    # What Ollama does honour still goes through: automatic tool choice and inline images.
    await gw.generate(request(model, tools=["lookup"], tool_choice=pb.TOOL_CHOICE_MODE_AUTO))
    inline = pb.ChatMessage(
        role="user",
        content="What is this?",
        parts=[pb.ContentPart(image=pb.ImageInput(data=PNG_1X1, mime_type="image/png"))],
    )
    await gw.generate(request(model, messages=[inline]))
    auto, image = chats(standin)
    assert auto.body["tool_choice"] == "auto"
    assert image.body["messages"][0]["content"][1]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    # The same requests go to a preset that supports them (OpenRouter sends tool_choice and URLs).
    await gw.generate(
        request(
            f"openrouter/{PRESET_MODEL}", tools=["lookup"], tool_choice=pb.TOOL_CHOICE_MODE_REQUIRED
        )
    )
    assert chats(standin)[-1].body["tool_choice"] == "required"


# ---- a provider without its key ----------------------------------------------------------------


async def test_provider_without_key_is_listed_unavailable(monkeypatch) -> None:
    for variable in ("ANTHROPIC_API_KEY", "GROQ_API_KEY", "TEAM_GROQ_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    async with AnthropicStandIn(api_key=None) as anthropic, OpenAIStandIn(api_key=None) as openai:
        async with gateway(
            {
                "anthropic": {
                    "base_url": anthropic.base_url + "/v1",
                    "models": [{"name": "claude-sonnet-4-6"}],
                },
                "groq": {
                    "base_url": openai.base_url + "/v1",
                    "api_key_env": "TEAM_GROQ_KEY",
                    "models": [{"name": "llama-3.3-70b-versatile"}],
                },
                "gemini": {"api_key": ""},  # an empty key is no key
            }
        ) as gw:
            models = {m.id: m for m in await gw.list_all()}
            assert set(models) == {"anthropic/claude-sonnet-4-6", "groq/llama-3.3-70b-versatile"}
            claude, llama = (
                models["anthropic/claude-sonnet-4-6"],
                models["groq/llama-3.3-70b-versatile"],
            )
            assert claude.state == UNAVAILABLE and llama.state == UNAVAILABLE
            assert (
                "ANTHROPIC_API_KEY" in claude.state_reason
                and "providers.anthropic.api_key" in claude.state_reason
            )
            assert "TEAM_GROQ_KEY" in llama.state_reason
            assert (await gw.model("gemini/gemini-2.5-flash")).state == UNAVAILABLE
            assert "GEMINI_API_KEY" in (await gw.model("gemini/gemini-2.5-flash")).state_reason

            for model in (
                "anthropic/claude-sonnet-4-6",
                "groq/llama-3.3-70b-versatile",
                "gemini/gemini-2.5-flash",
            ):
                err = await error_of(gw.generate(request(model)))
                assert err.code == grpc.StatusCode.FAILED_PRECONDITION
                assert err.info.reason == "PROVIDER_NOT_CONFIGURED"
                assert err.info.metadata["provider"] == model.split("/")[0]
                err = await error_of(gw.stream(request(model)))
                assert err.info.reason == "PROVIDER_NOT_CONFIGURED"
            assert not await gw.backend("anthropic").health()
        # Neither a listing nor a generation was attempted without credentials.
        assert anthropic.requests == [] and openai.requests == []


async def test_keys_never_reach_logs_or_errors(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    keys = dict(KEYS)
    standins = {
        "openai": OpenAIStandIn(api_key=keys["openai"]),
        "anthropic": AnthropicStandIn(api_key=keys["anthropic"]),
        "gemini": GeminiStandIn(api_key=keys["gemini"]),
    }
    async with contextlib.AsyncExitStack() as exits:
        for provider, standin in standins.items():
            await exits.enter_async_context(standin)
            # The first listing fails echoing the key (openai's stand-in also serves groq).
            standin.inject(
                Fault(
                    "status",
                    status=500,
                    message=f"boom {keys[provider]}",
                    path="/models",
                    times=2 if provider == "openai" else 1,
                )
            )
        gw = await exits.enter_async_context(gateway(provider_config(standins)))
        providers = ("openai", "anthropic", "gemini", "groq")

        async def listings_failed() -> bool:
            return all(gw.backend(p).listing_error for p in providers)

        await wait_until(listings_failed)
        for provider in providers:
            assert "boom [redacted]" in gw.backend(provider).listing_error

        reasons: dict[str, list[str]] = {}
        messages = []
        for provider, model in (
            ("openai", "openai/gpt-4o-mini"),
            ("anthropic", "anthropic/claude-sonnet-4-6"),
            ("gemini", "gemini/gemini-2.5-flash"),
            ("groq", "groq/gpt-4o-mini"),
        ):
            standin = standins["openai" if provider == "groq" else provider]
            key = keys["openai" if provider == "groq" else provider]
            assert (await gw.generate(request(model, max_tokens=8))).text
            assert [c async for c in gw.stream(request(model, max_tokens=8))]
            standin.inject(
                Fault("status", status=401, message=f"Incorrect API key provided: {key}."),
                Fault("status", status=400, message=f"bad request from key {key} (key={key})"),
                Fault("status", status=503, times=3, message=f"overloaded for {key}"),
                Fault("status", status=429, retry_after=0.01, message=f"slow down {key}"),
                # After output, so it is not retried away and reaches the client.
                Fault(
                    "stream_error", status=500, after_chunks=4, message=f"stream broke for {key}"
                ),
            )
            for call in (gw.generate, gw.generate, gw.generate, gw.stream):
                gw.backend(provider)._breakers.clear()  # three 503s in a row opened it
                err = await error_of(call(request(model)))
                messages.append(err.message)
                reasons.setdefault(provider, []).append(err.info.reason)
            assert standin.faults == []
    # Every failure kind happened, so the scrubbing was exercised, not skipped.
    for provider in providers:
        assert reasons[provider] == [
            "PROVIDER_AUTH_FAILED",
            "PROVIDER_REJECTED_REQUEST",
            "PROVIDER_UNAVAILABLE",
            "PROVIDER_UNAVAILABLE",
        ], reasons
    assert sum("[redacted]" in m for m in messages) == len(messages) == 16
    assert any(
        r.levelno == logging.WARNING and "listing models failed" in r.getMessage()
        for r in caplog.records
    )
    assert any("retrying in" in r.getMessage() for r in caplog.records)
    assert len(caplog.records) > 20
    for record in caplog.records:
        text = f"{record.getMessage()} {record.exc_text or ''} {record.args!r}"
        for key in keys.values():
            assert key not in text, (record.name, text)
    for message in messages:
        for key in keys.values():
            assert key not in message


async def _listed(stack: Any, *providers: str) -> bool:
    return all(stack.backend(p)._listed for p in providers)


# ---- model listing -----------------------------------------------------------------------------

BULK = 1003  # more than one page: both APIs serve at most 1000 models a page


@pytest.fixture(scope="module")
async def listing() -> AsyncIterator[tuple[Gateway, dict[str, Any]]]:
    anthropic_models = [
        *ANTHROPIC_MODELS,
        *(
            {
                "id": f"claude-bulk-{i:04d}",
                "display_name": f"Bulk {i}",
                "created_at": f"2020-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
                "context_window": 100_000,
                "max_output_tokens": 1000 + i,
            }
            for i in range(BULK)
        ),
    ]
    from pluggably.devtools.standins.gemini import DEFAULT_MODELS as GEMINI_MODELS

    gemini_models = [
        *GEMINI_MODELS,
        *(
            gemini_model(f"gemini-bulk-{i:04d}", f"Bulk {i}", output_token_limit=2000 + i)
            for i in range(BULK)
        ),
    ]
    standins = {
        "openai": OpenAIStandIn(api_key=KEYS["openai"]),
        "anthropic": AnthropicStandIn(api_key=KEYS["anthropic"], models=anthropic_models),
        "gemini": GeminiStandIn(api_key=KEYS["gemini"], models=gemini_models),
    }
    async with contextlib.AsyncExitStack() as stack:
        for standin in standins.values():
            await stack.enter_async_context(standin)
        providers = {
            "openai": {
                "base_url": standins["openai"].base_url + "/v1",
                "api_key": KEYS["openai"],
                **FAST,
            },
            "anthropic": {
                "base_url": standins["anthropic"].base_url + "/v1",
                "api_key": KEYS["anthropic"],
                "allow_unlisted_models": False,
                **FAST,
            },
            "gemini": {
                "base_url": standins["gemini"].base_url,
                "api_key": KEYS["gemini"],
                "allow_unlisted_models": False,
                **FAST,
            },
        }
        gw = await stack.enter_async_context(gateway(providers))

        async def done() -> bool:
            return all(gw.backend(p)._listed for p in providers)

        await wait_until(done)
        yield gw, standins


async def test_background_listing_fills_the_catalogue(listing) -> None:
    gw, _ = listing
    ids = {m.id for m in await gw.list_all()}
    for present in (
        "openai/gpt-4o",
        "openai/gpt-4.1-nano",
        "anthropic/claude-sonnet-4-6",
        "anthropic/claude-sonnet-4-5-20250929",
        "gemini/gemini-2.5-flash",
        "gemini/gemini-2.0-flash",
    ):
        assert present in ids
    # Non-chat models are left out: embeddings, images, Text Completions-era and retired Claude.
    for absent in (
        "openai/text-embedding-3-small",
        "openai/dall-e-3",
        "gemini/gemini-embedding-001",
        "anthropic/claude-instant-1.2",
        "anthropic/claude-2.1",
    ):
        assert absent not in ids
    flash = await gw.model("gemini/gemini-2.5-flash")
    assert flash.description == "Gemini 2.5 Flash" and flash.context_length == 1_048_576
    sonnet = await gw.model("anthropic/claude-sonnet-4-6")
    assert (
        sonnet.description == "Claude Sonnet 4.6"
        and sonnet.capabilities.max_output_tokens == 64_000
    )


async def test_listing_walks_every_page(listing) -> None:
    gw, _ = listing
    anthropic = {m.name for m in await gw.list_all("anthropic")}
    gemini = {m.name for m in await gw.list_all("gemini")}
    assert {f"claude-bulk-{i:04d}" for i in range(BULK)} <= anthropic and len(anthropic) == BULK + 5
    assert {f"gemini-bulk-{i:04d}" for i in range(BULK)} <= gemini and len(gemini) == BULK + 5
    last = await gw.model(f"anthropic/claude-bulk-{BULK - 1:04d}")
    assert last.capabilities.max_output_tokens == 1000 + BULK - 1
    # A model on no page stays unknown, since this provider serves listed models only.
    err = await error_of(
        gw.models.GetModel(model_service_pb2.GetModelRequest(id="anthropic/claude-bulk-9999"))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND


async def test_failed_refresh_keeps_the_old_list(listing) -> None:
    gw, standins = listing
    backend = gw.backend("anthropic")
    standins["anthropic"].reset()
    standins["anthropic"].inject(Fault("status", status=500, path="/v1/models"))
    with pytest.raises(UpstreamFailure):
        await backend.refresh_models()
    assert "(500)" in backend.listing_error
    assert (await gw.model("anthropic/claude-bulk-0000")).name == "claude-bulk-0000"
    assert len(await gw.list_all("anthropic")) == BULK + 5

    # A successful refresh replaces the list: a model the provider dropped goes away.
    dropped = standins["anthropic"].models.pop()
    try:
        await backend.refresh_models()
        assert backend.listing_error == ""
        err = await error_of(
            gw.models.GetModel(model_service_pb2.GetModelRequest(id=f"anthropic/{dropped['id']}"))
        )
        assert err.code == grpc.StatusCode.NOT_FOUND
    finally:
        standins["anthropic"].models.append(dropped)
        await backend.refresh_models()
    assert (await gw.model(f"anthropic/{dropped['id']}")).name == dropped["id"]


async def test_listing_pages_are_requested_with_cursors(listing) -> None:
    gw, standins = listing
    for standin in standins.values():
        standin.reset()
    for provider in ("anthropic", "gemini"):
        await gw.backend(provider).refresh_models()
    pages = [r.query for r in standins["anthropic"].requests if r.path == "/v1/models"]
    assert len(pages) == 2 and "after_id" not in pages[0] and pages[1]["after_id"]
    pages = [r.query for r in standins["gemini"].requests if r.path == "/v1beta/models"]
    assert len(pages) == 2 and "pageToken" not in pages[0] and pages[1]["pageToken"]


async def test_catalogue_never_waits_for_a_hanging_listing(listing) -> None:
    _, standins = listing
    for standin in standins.values():
        standin.reset()
        standin.inject(Fault("hang_before_headers", seconds=3, path="/models"))
    providers = {
        "openai": {
            "base_url": standins["openai"].base_url + "/v1",
            "api_key": KEYS["openai"],
            "models": [{"name": "gpt-4o"}],
            **FAST,
        },
        "anthropic": {
            "base_url": standins["anthropic"].base_url + "/v1",
            "api_key": KEYS["anthropic"],
            **FAST,
        },
        "gemini": {"base_url": standins["gemini"].base_url, "api_key": KEYS["gemini"], **FAST},
    }
    started = time.monotonic()
    async with gateway(providers) as gw:
        await wait_until(lambda: _asked(standins))
        began = time.monotonic()
        models = await gw.list_all()
        await gw.model("anthropic/claude-sonnet-4-6")
        await gw.params("gemini/gemini-2.5-flash")
        elapsed = time.monotonic() - began
        assert elapsed < 0.5 and time.monotonic() - started < 1.5
        # Only what the configuration says until the listing answers.
        assert [m.id for m in models] == ["openai/gpt-4o"]
    # Closing the gateway abandons the hanging listings instead of waiting them out.
    await wait_until(lambda: _abandoned(standins), timeout=2)


async def _asked(standins: dict[str, Any]) -> bool:
    return all(s.requests for s in standins.values())


async def _abandoned(standins: dict[str, Any]) -> bool:
    return all(s.disconnects >= 1 and s.active == 0 for s in standins.values())


# ---- parameters and capabilities through the provider stack ------------------------------------


@pytest.fixture(scope="module")
async def stack_module():
    async with provider_stack(
        providers={
            # groq: per-model overrides, defaults for unknown models.
            "groq": {
                "models": [
                    {
                        "name": "gpt-4o",
                        "description": "tuned",
                        "context_length": 5000,
                        "default_max_tokens": 50,
                        "capabilities": {"vision": False, "tools": False, "max_output_tokens": 100},
                    }
                ],
                "default_capabilities": {"vision": True, "max_output_tokens": 1234},
            },
            # gemini: listed (and configured) models only.
            "gemini": {"models": [{"name": "gemini-2.5-flash"}], "allow_unlisted_models": False},
        }
    ) as s:
        yield s


@pytest.fixture
def stack(stack_module):
    stack_module.reset()
    return stack_module


def gw_of(stack: Any) -> Gateway:
    return Gateway(stack.server, stack.channel)


def generations(stack: Any) -> list[Any]:
    return [r for s in stack.standins.values() for r in s.requests if r.method == "POST"]


async def test_parameters_anthropic(stack) -> None:
    params = await gw_of(stack).params("anthropic/claude-sonnet-4-6")
    assert params["temperature"].supported and params["temperature"].maximum == 1.0
    assert params["top_k"].supported and params["top_p"].supported and params["stop"].supported
    for name in ("seed", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        assert not params[name].supported, name
    # The API requires max_tokens: the default the gateway sends is documented.
    assert params["max_tokens"].default_value.number_value == 4096


async def test_parameters_openai(stack) -> None:
    gw = gw_of(stack)
    params = await gw.params("openai/gpt-4o-mini")
    assert params["temperature"].maximum == 2.0 and params["seed"].supported
    assert params["presence_penalty"].supported and params["stop"].supported
    assert not params["top_k"].supported and not params["repetition_penalty"].supported
    for reasoning in (
        "openai/o3-mini",
        "openai/o1",
        "openai/o4-mini",
        "openai/gpt-5",
        "openai/gpt-5-mini",
    ):
        params = await gw.params(reasoning)
        assert {n for n, p in params.items() if p.supported} == {"max_tokens", "seed"}, reasoning
    assert (await gw.params("openai/gpt-5-chat-latest"))["temperature"].supported


async def test_parameters_gemini(stack) -> None:
    params = await gw_of(stack).params("gemini/gemini-2.5-flash")
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
    ):
        assert params[name].supported, name
    assert not params["repetition_penalty"].supported and params["temperature"].maximum == 2.0


@pytest.mark.parametrize(
    "model, text, field, words",
    [
        (
            "anthropic/claude-sonnet-4-6",
            {"temperature": 1.5},
            "text.temperature",
            "must be in [0, 1], got 1.5",
        ),
        ("anthropic/claude-sonnet-4-6", {"seed": 3}, "text.seed", "not supported"),
        (
            "anthropic/claude-sonnet-4-6",
            {"frequency_penalty": 0.5},
            "text.frequency_penalty",
            "not supported",
        ),
        ("anthropic/claude-sonnet-4-6", {"max_tokens": 70000}, "text.max_tokens", "at most 64000"),
        ("openai/gpt-4o-mini", {"top_k": 4}, "text.top_k", "not supported"),
        (
            "openai/gpt-4o-mini",
            {"repetition_penalty": 1.2},
            "text.repetition_penalty",
            "not supported",
        ),
        ("openai/o3-mini", {"temperature": 0.2}, "text.temperature", "not supported"),
        ("openai/gpt-5-mini", {"top_p": 0.5}, "text.top_p", "not supported"),
        (
            "gemini/gemini-2.5-flash",
            {"repetition_penalty": 1.2},
            "text.repetition_penalty",
            "not supported",
        ),
        ("gemini/gemini-2.5-flash", {"max_tokens": 70000}, "text.max_tokens", "at most 65536"),
    ],
)
async def test_out_of_model_requests_are_rejected_before_the_provider(
    stack, model: str, text: dict, field: str, words: str
) -> None:
    for call in (stack.generate, stack.stream):
        err = await error_of(call(request(model, **text)))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == [field]
        assert words in err.bad_request.field_violations[0].description
        assert model in err.bad_request.field_violations[0].description
    assert generations(stack) == []
    # The boundary itself is accepted: temperature 1 for Claude.
    if model.startswith("anthropic") and field == "text.temperature":
        assert (await stack.generate(request(model, temperature=1.0, max_tokens=5))).text


async def test_capabilities_of_known_families(stack) -> None:
    gw = gw_of(stack)
    await wait_until(lambda: _listed(stack, "openai"))
    listed = {m.id: m for m in await gw.list_all("openai")}
    gpt4o = listed["openai/gpt-4o"].capabilities
    assert (gpt4o.image_input, gpt4o.tools, gpt4o.json_schema, gpt4o.max_output_tokens) == (
        True,
        True,
        True,
        16384,
    )
    assert listed["openai/gpt-4o"].context_length == 128_000
    assert (await gw.model("openai/gpt-4o")).capabilities == gpt4o

    gpt35 = (await gw.model("openai/gpt-3.5-turbo")).capabilities  # not listed: from the table
    assert (gpt35.json_object, gpt35.json_schema, gpt35.image_input, gpt35.tools) == (
        True,
        False,
        False,
        True,
    )
    claude35 = await gw.model("anthropic/claude-3-5-sonnet-20241022")
    caps = claude35.capabilities
    assert (caps.json_schema, caps.json_object, caps.image_input, caps.tools) == (
        False,
        False,
        True,
        True,
    )
    assert caps.max_output_tokens == 8192 and claude35.context_length == 200_000
    assert (await gw.model("anthropic/claude-sonnet-4-6")).capabilities.json_schema

    schema = pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        json_schema=pb.JsonSchema(name="out", schema=struct_pb2.Struct()),
    )
    for model in ("openai/gpt-3.5-turbo", "anthropic/claude-3-5-sonnet-20241022"):
        err = await error_of(stack.generate(request(model, response_format=schema)))
        assert err.fields == ["text.response_format.json_schema"]
    image = pb.ChatMessage(
        role="user",
        content="What is this?",
        parts=[pb.ContentPart(image=pb.ImageInput(data=PNG_1X1, mime_type="image/png"))],
    )
    err = await error_of(stack.generate(request("openai/gpt-3.5-turbo", messages=[image])))
    assert err.fields == ["messages[0].parts[0].image"]
    assert generations(stack) == []


async def test_capability_overrides_and_defaults(stack) -> None:
    gw = gw_of(stack)
    tuned = await gw.model("groq/gpt-4o")
    assert tuned.description == "tuned" and tuned.context_length == 5000
    caps = tuned.capabilities
    # The model's own overrides beat the provider's defaults (vision) and the preset (tools).
    assert (caps.image_input, caps.tools, caps.max_output_tokens, caps.json_object) == (
        False,
        False,
        100,
        True,
    )
    assert (await gw.params("groq/gpt-4o"))["max_tokens"].default_value.number_value == 50
    unknown = (await gw.model("groq/llama-4-scout")).capabilities
    assert (unknown.image_input, unknown.max_output_tokens, unknown.tools) == (True, 1234, True)

    err = await error_of(stack.generate(request("groq/gpt-4o", max_tokens=101)))
    assert err.fields == ["text.max_tokens"]
    err = await error_of(stack.generate(request("groq/gpt-4o", tools=["lookup"])))
    assert err.fields == ["tools"]
    assert generations(stack) == []
    # Without max_tokens the configured default goes out.
    await stack.generate(request("groq/gpt-4o"))
    assert stack.standin("groq").requests[-1].body["max_completion_tokens"] == 50


async def test_unlisted_models_can_be_refused(stack) -> None:
    gw = gw_of(stack)
    for call in (
        gw.models.GetModel(model_service_pb2.GetModelRequest(id="gemini/gemini-9-ultra")),
        stack.generate(request("gemini/gemini-9-ultra")),
    ):
        err = await error_of(call)
        assert err.code == grpc.StatusCode.NOT_FOUND and err.info.reason == "MODEL_NOT_FOUND"
    assert (await gw.model("gemini/gemini-2.5-flash")).name == "gemini-2.5-flash"  # configured
    # A provider that allows them serves a name nobody listed, saying so.
    unknown = await gw.model("openai/gpt-7-preview")
    assert "not listed" in unknown.description
    assert generations(stack) == []
