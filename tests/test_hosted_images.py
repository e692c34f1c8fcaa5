"""Hosted image generation: the OpenAI adapter's Images API path through a real gateway over the
OpenAI stand-in (sizes, counts and formats per model, files stored as artifacts, errors mapped as
for chat, retries, breaker and fallbacks), and the stand-in's images endpoint checked with the
official SDK."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from google.protobuf import json_format, struct_pb2
from openai import AsyncOpenAI
from pydantic import ValidationError

from helpers import rich_error
from pluggably.config import Config
from pluggably.devtools.standins import Fault
from pluggably.devtools.standins.openai import OpenAIStandIn, image_file
from pluggably.providers.config import OpenAIConfig
from pluggably.server import GatewayServer
from pluggably.v1 import generation_pb2 as G
from pluggably.v1 import model_pb2 as M
from pluggably.v1 import model_service_pb2 as MS
from pluggably.v1 import storage_service_pb2 as S
from pluggably.v1 import storage_service_pb2_grpc
from providers_util import FAST, KEYS, ProviderStack

IMAGES_PATH = "/v1/images/generations"
PROMPT = "a lighthouse at dusk"
CODE = grpc.StatusCode
MISSING = "missing_required_parameter"


# ---- image headers (no imaging library here): (format, width, height) -----------------------


def image_size(data: bytes) -> tuple[str, int, int]:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data.startswith(b"\xff\xd8"):
        at = 2
        while at < len(data):
            marker, length = data[at + 1], struct.unpack(">H", data[at + 2 : at + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2):
                height, width = struct.unpack(">HH", data[at + 5 : at + 9])
                return "jpeg", width, height
            at += 2 + length
        raise AssertionError("JPEG without a frame header")
    if data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise AssertionError(f"not a PNG, JPEG or lossless WebP: {data[:16]!r}")


def test_header_parser_reads_what_the_standin_makes() -> None:
    # The parser above is what the gateway tests rely on: check it on each format and size.
    for fmt in ("png", "jpeg", "webp"):
        for width, height in ((1024, 1536), (256, 256), (72, 64)):
            assert image_size(image_file(fmt, width, height, 3)) == (fmt, width, height)
    assert image_file("png", 64, 64, 1) != image_file("png", 64, 64, 2)
    assert image_file("jpeg", 64, 64, 1) != image_file("jpeg", 64, 64, 2)


# ---- the stand-in, through the official SDK -----------------------------------------------------

SDK_KEY = "sk-standin-images-0123456789"


@pytest.fixture(scope="module")
async def bare_standin():
    async with OpenAIStandIn(api_key=SDK_KEY) as s:
        yield s


@pytest.fixture
def standin(bare_standin: OpenAIStandIn) -> OpenAIStandIn:
    bare_standin.reset()
    return bare_standin


@pytest.fixture
async def client(standin: OpenAIStandIn):
    async with AsyncOpenAI(
        api_key=SDK_KEY, base_url=f"{standin.base_url}/v1", max_retries=0, timeout=10
    ) as c:
        yield c


async def post(standin: OpenAIStandIn, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            standin.base_url + IMAGES_PATH,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {SDK_KEY}", "Content-Type": "application/json"},
        ) as response,
    ):
        return response.status, await response.json()


async def test_sdk_parses_gpt_image_images_and_usage(standin, client) -> None:
    response = await client.images.generate(
        model="gpt-image-1",
        prompt=PROMPT,
        n=2,
        size="1536x1024",
        output_format="webp",
        quality="high",
    )
    assert response.data is not None and len(response.data) == 2
    images = [base64.b64decode(item.b64_json or "") for item in response.data]
    assert images == standin.images and images[0] != images[1]
    assert all(image_size(image) == ("webp", 1536, 1024) for image in images)
    assert (response.output_format, response.size, response.quality) == (
        "webp",
        "1536x1024",
        "high",
    )
    assert response.created > 0 and all(item.url is None for item in response.data)
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.input_tokens_details.text_tokens) == (4, 4)
    assert usage.output_tokens == 2 * 6240  # high quality, landscape
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_sdk_gets_dall_e_links_that_serve_the_image(standin, client) -> None:
    response = await client.images.generate(
        model="dall-e-3", prompt=PROMPT, response_format="url", style="natural"
    )
    assert response.data is not None and len(response.data) == 1
    item = response.data[0]
    assert item.b64_json is None and item.url and item.revised_prompt == PROMPT
    assert response.usage is None
    async with aiohttp.ClientSession() as session:
        async with session.get(item.url) as fetched:
            assert fetched.status == 200 and fetched.content_type == "image/png"
            data = await fetched.read()
        assert data == standin.images[-1] and image_size(data) == ("png", 1024, 1024)
        # The link is signed: another signature is refused, as a storage host would.
        async with session.get(item.url.replace("sig=", "sig=x")) as refused:
            assert refused.status == 403


async def test_sdk_raises_the_real_error_for_a_second_dall_e_3_image(standin, client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="dall-e-3", prompt=PROMPT, n=2)
    body = caught.value.body
    assert isinstance(body, dict) and body["message"] == "You must provide n=1 for this model."
    assert (body["param"], body["code"]) == (None, None)
    assert not standin.images


async def test_sdk_raises_content_policy_violations(standin, client) -> None:
    standin.inject(Fault("status", status=400, error_type="content_policy_violation"))
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="dall-e-2", prompt=PROMPT)
    assert caught.value.code == "content_policy_violation"
    assert "rejected as a result of our safety system" in caught.value.message


@pytest.mark.parametrize(
    ("body", "message", "param", "code"),
    [
        ({"model": "gpt-image-1"}, "Missing required parameter: 'prompt'.", "prompt", MISSING),
        ({"prompt": PROMPT}, "Missing required parameter: 'model'.", "model", MISSING),
        (
            {"model": "gpt-image-1", "prompt": PROMPT, "response_format": "b64_json"},
            "Unknown parameter: 'response_format'.",
            "response_format",
            "unknown_parameter",
        ),
        (
            {"model": "dall-e-2", "prompt": PROMPT, "output_format": "png"},
            "Unknown parameter: 'output_format'.",
            "output_format",
            "unknown_parameter",
        ),
        (
            {"model": "gpt-image-1", "prompt": PROMPT, "size": "512x512"},
            "Invalid value: '512x512'. Supported values are: '1024x1024', '1024x1536', "
            "'1536x1024', and 'auto'.",
            "size",
            "invalid_value",
        ),
        (
            {"model": "dall-e-3", "prompt": PROMPT, "size": "512x512"},
            "The size is not supported by this model.",
            None,
            "invalid_size",
        ),
        (
            {"model": "dall-e-2", "prompt": PROMPT, "size": "1000x1000"},
            "'1000x1000' is not one of ['256x256', '512x512', '1024x1024', '1024x1792', "
            "'1792x1024'] - 'size'",
            "size",
            None,
        ),
        (
            {"model": "dall-e-2", "prompt": "x" * 1001},
            "Invalid 'prompt': string too long. Expected a string with maximum length 1000, "
            "but got a string with length 1001 instead.",
            "prompt",
            "string_above_max_length",
        ),
        (
            {"model": "gpt-image-1", "prompt": PROMPT, "n": 11},
            "Invalid 'n': integer above maximum value. Expected a value <= 10, but got 11 instead.",
            "n",
            "integer_above_max_value",
        ),
        (
            {"model": "gpt-image-1", "prompt": PROMPT, "output_format": "gif"},
            "Invalid value: 'gif'. Supported values are: 'png', 'jpeg', and 'webp'.",
            "output_format",
            "invalid_value",
        ),
        (
            {"model": "dall-e-3", "prompt": PROMPT, "quality": "high"},
            "Invalid value: 'high'. Supported values are: 'standard' and 'hd'.",
            "quality",
            "invalid_value",
        ),
        (
            {"model": "gpt-4o-mini", "prompt": PROMPT},
            "Invalid value: 'gpt-4o-mini'.",
            "model",
            "invalid_value",
        ),
    ],
)
async def test_standin_refuses_what_the_images_api_refuses(
    standin, body, message, param, code
) -> None:
    status, answer = await post(standin, body)
    assert status == 400
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith(message)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert not standin.images


# ---- through the gateway ----------------------------------------------------------------------

IMAGE_MODELS = [
    {"name": "gpt-image-1", "modality": "image"},
    {"name": "dall-e-3", "modality": "image"},
    {"name": "dall-e-2", "modality": "image"},
]


@contextlib.asynccontextmanager
async def image_stack() -> AsyncIterator[ProviderStack]:
    """A gateway whose `openai` provider (the OpenAI preset) and `imagehub` provider (a
    compatible endpoint) both point at one OpenAI stand-in."""
    async with contextlib.AsyncExitStack() as stack:
        standin = await stack.enter_async_context(OpenAIStandIn(api_key=KEYS["openai"]))
        common = {"base_url": standin.base_url + "/v1", "api_key": KEYS["openai"], **FAST}
        providers = {
            "openai": {**common, "models": IMAGE_MODELS},
            # A compatible endpoint's image model: nothing known by name, all from the config.
            "imagehub": {
                **common,
                "kind": "openai",
                "list_models": False,
                "models": [
                    {
                        "name": "dall-e-2",
                        "modality": "image",
                        "image": {
                            "sizes": ["256x256", "512x512"],
                            "response_format": "url",
                            "max_count": 2,
                        },
                    }
                ],
            },
        }
        config = Config.model_validate(
            {
                "server": {"host": "127.0.0.1", "port": 0, "grace_period_s": 1},
                "auth": {"enabled": False},
                "metrics": {"enabled": False},
                "providers": providers,
                "storage": {"root": tempfile.mkdtemp(prefix="pluggably-test-images-")},
            }
        )
        server = GatewayServer(config)
        await server.start()
        stack.push_async_callback(server.stop, 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        yield ProviderStack({"openai": standin}, server, channel)


@pytest.fixture(scope="module")
async def module_stack():
    async with image_stack() as s:
        yield s


@pytest.fixture
def gw(module_stack: ProviderStack) -> ProviderStack:
    module_stack.reset()
    module_stack.standin("openai").image_url_base = None
    return module_stack


def image_request(
    model: str = "openai/gpt-image-1",
    provider_options: dict[str, struct_pb2.Value] | None = None,
    **image: Any,
) -> G.GenerateRequest:
    return G.GenerateRequest(
        model=model,
        prompt=PROMPT,
        image=G.ImageOptions(**image),
        provider_options=provider_options,
    )


def options(**values: Any) -> dict[str, struct_pb2.Value]:
    return {k: json_format.ParseDict(v, struct_pb2.Value()) for k, v in values.items()}


def posts(gw: ProviderStack) -> list[Any]:
    """The image requests the stand-in received."""
    return [r for r in gw.standin("openai").requests if r.path == IMAGES_PATH]


async def read_artifact(gw: ProviderStack, artifact_id: str) -> bytes:
    storage = storage_service_pb2_grpc.StorageServiceStub(gw.channel)
    chunks = [c async for c in storage.ReadArtifact(S.ReadArtifactRequest(id=artifact_id))]
    return b"".join(c.data for c in chunks)


async def error_of(call: Any) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return rich_error(caught.value)


async def test_generate_stores_each_image_and_reports_usage(gw) -> None:
    response = await gw.generate(image_request(width=1024, height=1536, count=2))
    sent = gw.standin("openai").images
    assert len(response.artifacts) == 2 and len(sent) == 2
    for artifact, image in zip(response.artifacts, sent, strict=True):
        assert (artifact.kind, artifact.mime_type) == ("image", "image/png")
        assert artifact.model == "openai/gpt-image-1" and not artifact.inline_data
        assert await read_artifact(gw, artifact.id) == image
        assert image_size(image) == ("png", 1024, 1536)
    assert response.finish_reason == G.FINISH_REASON_STOP
    # GPT Image usage: prompt words in, 1584 tokens per medium-quality portrait image out.
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, 2 * 1584)
    [request] = posts(gw)
    assert request.body == {"model": "gpt-image-1", "prompt": PROMPT, "n": 2, "size": "1024x1536"}
    assert request.headers["authorization"] == f"Bearer {KEYS['openai']}"


@pytest.mark.parametrize(
    ("image_format", "mime_type"),
    [(G.IMAGE_FORMAT_JPEG, "image/jpeg"), (G.IMAGE_FORMAT_WEBP, "image/webp")],
)
async def test_stream_sends_the_image_inline_in_the_format_asked(gw, image_format, mime_type):
    events = [
        e
        async for e in gw.stream(
            image_request(format=image_format, inline_data=True, width=1024, height=1024)
        )
    ]
    assert [e.WhichOneof("event") for e in events] == ["artifact", "done"]
    artifact = events[0].artifact
    [image] = gw.standin("openai").images
    assert artifact.mime_type == mime_type and artifact.inline_data == image
    assert image_size(image) == (mime_type.removeprefix("image/"), 1024, 1024)
    assert await read_artifact(gw, artifact.id) == image
    assert events[-1].done.finish_reason == G.FINISH_REASON_STOP
    assert posts(gw)[0].body["output_format"] == mime_type.removeprefix("image/")


async def test_dall_e_asks_for_base64_and_a_chat_gives_its_last_user_text(gw) -> None:
    response = await gw.generate(
        G.GenerateRequest(
            model="openai/dall-e-3",
            messages=[
                G.ChatMessage(role="user", content="a fox"),
                G.ChatMessage(role="assistant", content="which fox?"),
                G.ChatMessage(role="user", content="a red fox in snow"),
            ],
            image=G.ImageOptions(width=1792, height=1024),
            provider_options=options(quality="hd", style="vivid"),
        )
    )
    [artifact] = response.artifacts
    assert image_size(await read_artifact(gw, artifact.id)) == ("png", 1792, 1024)
    [request] = posts(gw)
    assert request.body == {
        "model": "dall-e-3",
        "prompt": "a red fox in snow",
        "size": "1792x1024",
        "response_format": "b64_json",
        "quality": "hd",
        "style": "vivid",
    }
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (0, 0)


@pytest.mark.parametrize(
    ("model", "options", "fields", "says"),
    [
        ("openai/gpt-image-1", {"steps": 20}, ["image.steps"], "not supported"),
        ("openai/gpt-image-1", {"guidance_scale": 7.5}, ["image.guidance_scale"], "not supported"),
        ("openai/gpt-image-1", {"negative_prompt": "fog"}, ["image.negative_prompt"], "not sup"),
        ("openai/dall-e-3", {"seed": 7}, ["image.seed"], "not supported"),
        # Sizes the model does not render: refused with the sizes it does.
        (
            "openai/gpt-image-1",
            {"width": 512, "height": 512},
            ["image.width", "image.height"],
            "1024x1024, 1536x1024, 1024x1536",
        ),
        (
            "openai/dall-e-2",
            {"width": 1024, "height": 1792},
            ["image.width", "image.height"],
            "256x256, 512x512, 1024x1024",
        ),
        ("openai/dall-e-3", {"width": 1024}, ["image.height"], "together"),
        ("openai/dall-e-3", {"count": 2}, ["image.count"], "must be in [1, 1], got 2"),
        ("openai/dall-e-3", {"format": G.IMAGE_FORMAT_JPEG}, ["image.format"], "png only"),
        ("imagehub/dall-e-2", {"count": 3}, ["image.count"], "must be in [1, 2], got 3"),
        (
            "imagehub/dall-e-2",
            {"width": 1024, "height": 1024},
            ["image.width", "image.height"],
            "256x256, 512x512",
        ),
    ],
)
async def test_what_a_model_cannot_take_is_refused_before_any_upstream_request(
    gw, model, options, fields, says
) -> None:
    error = await error_of(gw.generate(image_request(model, **options)))
    assert error.code == CODE.INVALID_ARGUMENT
    assert error.fields == fields
    assert says in error.message
    assert posts(gw) == []


async def test_reserved_options_tools_and_input_images_are_refused(gw) -> None:
    error = await error_of(
        gw.generate(image_request(provider_options=options(size="256x256", response_format="url")))
    )
    assert error.code == CODE.INVALID_ARGUMENT
    assert error.fields == ["provider_options.response_format", "provider_options.size"]
    error = await error_of(
        gw.generate(
            G.GenerateRequest(
                model="openai/gpt-image-1",
                messages=[
                    G.ChatMessage(
                        role="user",
                        content="like this",
                        parts=[
                            G.ContentPart(
                                image=G.ImageInput(
                                    data=image_file("png", 64, 64), mime_type="image/png"
                                )
                            )
                        ],
                    )
                ],
                image=G.ImageOptions(),
            )
        )
    )
    assert error.code == CODE.INVALID_ARGUMENT and error.fields == ["messages[0].parts[0].image"]
    assert posts(gw) == []


async def test_content_policy_refusals_are_content_filtered_and_not_retried(gw) -> None:
    standin = gw.standin("openai")
    for model, error_type in (
        ("openai/dall-e-3", "content_policy_violation"),
        ("openai/gpt-image-1", "moderation_blocked"),
    ):
        standin.inject(Fault("status", status=400, error_type=error_type, path=IMAGES_PATH))
        error = await error_of(gw.generate(image_request(model)))
        assert error.code == CODE.INVALID_ARGUMENT
        assert error.info.reason == "CONTENT_FILTERED"
        assert "safety system" in error.message and KEYS["openai"] not in error.message
    assert len(posts(gw)) == 2


async def test_rate_limits_are_retried_or_refused_as_for_chat(gw) -> None:
    standin = gw.standin("openai")
    standin.inject(Fault("status", status=429, retry_after=0.2, path=IMAGES_PATH))
    response = await gw.generate(image_request())
    assert len(response.artifacts) == 1 and len(posts(gw)) == 2
    # A wait longer than providers.*.retries.max_retry_after_s: refused at once, with RetryInfo.
    standin.inject(Fault("status", status=429, retry_after=30, times=3, path=IMAGES_PATH))
    error = await error_of(gw.generate(image_request()))
    assert (error.code, error.info.reason) == (CODE.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
    retry = error.details["google.rpc.RetryInfo"]
    assert retry.retry_delay.seconds == 30
    assert error.info.metadata["upstream_status"] == "429"
    assert len(posts(gw)) == 3


async def test_a_failing_image_model_falls_back_and_opens_its_circuit(gw) -> None:
    standin = gw.standin("openai")
    standin.inject(Fault("status", status=503, times=3, path=IMAGES_PATH))
    request = image_request(count=1)
    request.fallback_models.append("openai/dall-e-2")
    response = await gw.generate(request)
    assert response.model == "openai/dall-e-2" and len(response.artifacts) == 1
    assert [r.body["model"] for r in posts(gw)] == ["gpt-image-1"] * 3 + ["dall-e-2"]
    model = await gw.models.GetModel(MS.GetModelRequest(id="openai/gpt-image-1"))
    assert model.circuit_state == M.CIRCUIT_STATE_OPEN
    # While open, the model is skipped without a request; alone, it is refused at once.
    response = await gw.generate(request)
    assert response.model == "openai/dall-e-2"
    assert [r.body["model"] for r in posts(gw)][4:] == ["dall-e-2"]
    error = await error_of(gw.generate(image_request()))
    assert (error.code, error.info.reason) == (CODE.UNAVAILABLE, "PROVIDER_CIRCUIT_OPEN")
    assert len(posts(gw)) == 5


async def test_model_parameters_say_what_each_image_model_takes(gw) -> None:
    async def specs(model_id: str) -> dict[str, Any]:
        response = await gw.models.GetModelParameters(MS.GetModelParametersRequest(id=model_id))
        return {p.name: p for p in response.parameters}

    gpt = await specs("openai/gpt-image-1")
    assert set(gpt) == {
        "image.width",
        "image.height",
        "image.steps",
        "image.guidance_scale",
        "image.negative_prompt",
        "image.seed",
        "image.count",
        "image.format",
    }
    supported = {name for name, spec in gpt.items() if spec.supported}
    assert supported == {"image.width", "image.height", "image.count", "image.format"}
    assert "1024x1024, 1536x1024, 1024x1536" in gpt["image.width"].description
    assert "`size`" in gpt["image.height"].description
    assert gpt["image.count"].maximum == 8 and "`n`" in gpt["image.count"].description
    assert "png, jpeg, webp" in gpt["image.format"].description
    # Both unset: the model picks (`auto`), so there is no default size to report.
    assert gpt["image.width"].default_value.WhichOneof("kind") in (None, "null_value")

    dalle3 = await specs("openai/dall-e-3")
    assert dalle3["image.count"].maximum == 1
    assert dalle3["image.width"].default_value.number_value == 1024
    assert "1792x1024" in dalle3["image.width"].description
    assert "png only" in dalle3["image.format"].description

    # Not configured, but of a known family: an image model all the same.
    mini = await specs("openai/gpt-image-1-mini")
    assert mini["image.format"].supported and not mini["image.seed"].supported
    model = await gw.models.GetModel(MS.GetModelRequest(id="openai/gpt-image-1-mini"))
    assert model.modality == M.MODALITY_IMAGE
    # Configured image models are listed with their modality.
    listed = await gw.models.GetModel(MS.GetModelRequest(id="imagehub/dall-e-2"))
    assert listed.modality == M.MODALITY_IMAGE and not listed.capabilities.streaming


async def test_linked_images_are_fetched_without_credentials_for_another_origin(gw) -> None:
    standin = gw.standin("openai")
    # Same server, another host name: another origin, as a storage bucket would be.
    standin.image_url_base = f"http://localhost:{standin.port}"
    response = await gw.generate(image_request("imagehub/dall-e-2", width=256, height=256))
    [artifact] = response.artifacts
    [image] = standin.images
    assert await read_artifact(gw, artifact.id) == image
    assert image_size(image) == ("png", 256, 256)
    [post_request] = posts(gw)
    assert post_request.body["response_format"] == "url"
    [fetched] = [r for r in standin.requests if r.path.startswith("/files/")]
    assert fetched.method == "GET" and "authorization" not in fetched.headers
    # A link to the provider's own origin gets the provider's credentials.
    standin.image_url_base = None
    await gw.generate(image_request("imagehub/dall-e-2"))
    fetched = [r for r in standin.requests if r.path.startswith("/files/")][-1]
    assert fetched.headers["authorization"] == f"Bearer {KEYS['openai']}"


async def test_a_link_that_fails_is_not_a_reason_to_make_the_images_again(gw) -> None:
    standin = gw.standin("openai")
    standin.inject(Fault("status", status=500, path="/files/"))
    error = await error_of(gw.generate(image_request("imagehub/dall-e-2")))
    assert (error.code, error.info.reason) == (CODE.UNAVAILABLE, "PROVIDER_BAD_RESPONSE")
    assert "HTTP 500" in error.message and "sig=" not in error.message
    assert len(posts(gw)) == 1


# ---- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ({"name": "x", "image": {"sizes": ["1024x1024"]}}, "modality: image"),
        ({"name": "x", "modality": "image", "image": {"sizes": ["100x100"]}}, "multiples of 8"),
        ({"name": "x", "modality": "image", "image": {"sizes": ["big"]}}, "WIDTHxHEIGHT"),
        ({"name": "x", "modality": "image", "default_max_tokens": 10}, "for text models"),
        ({"name": "x", "modality": "video"}, "modality"),
    ],
)
def test_image_model_config_is_checked(model, says) -> None:
    with pytest.raises(ValidationError) as caught:
        OpenAIConfig.model_validate({"models": [model]})
    assert says in str(caught.value)
    assert OpenAIConfig.model_validate({"models": [{"name": "x"}]}).models[0].modality == "text"
