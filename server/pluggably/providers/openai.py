"""OpenAI Chat Completions, and every endpoint that copies it (presets: OpenRouter, Groq, Together,
Mistral, DeepSeek, Fireworks, the Hugging Face router, Ollama, vLLM, LM Studio, llama.cpp).

Wire notes the adapter relies on (checked against the official SDK through the stand-in):
usage on streams only with `stream_options.include_usage`, in a last chunk whose `choices` is
empty (every other chunk then carries `usage: null`); tool-call arguments arrive in fragments,
the first fragment of a call carrying its id and name; a stream ends with `data: [DONE]`, and a
stream without it is a failure, not a success; errors inside a stream arrive as an `error` chunk
under HTTP 200; a forced named tool call ends with finish_reason `stop`.

Image models (`modality: image` in `models:`, and OpenAI's GPT Image and DALL·E families by name)
use the Images API, `POST /images/generations`: `size` is "WIDTHxHEIGHT" from one of the sizes
the model renders (checked here, so a refusal lists them), `n` the count, `output_format` the
format for models that return more than PNG (GPT Image, which returns base64 always and refuses
`response_format`), `response_format: b64_json` for DALL·E and unknown models. Images come back
as `data[].b64_json`, or as `data[].url`, fetched at once with the provider's connection pool.
GPT Image `usage` (input/output tokens) becomes the generation's usage. Partial images
(`stream: true`, SSE) are not used: a streaming request gets the same chunks once the images
are made.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from pluggably.core.errors import FieldViolation, InvalidArgument
from pluggably.core.params import (
    IMAGE_PARAMETERS,
    ParameterSpec,
    ProviderOptionsPolicy,
    parameters_for,
)
from pluggably.core.types import (
    ArtifactChunk,
    Capabilities,
    ChatMessage,
    Chunk,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    ImageFormat,
    ImagePart,
    Modality,
    ModelInfo,
    ResponseFormatType,
    TextChunk,
    TextPart,
    ToolCallChunk,
    ToolChoiceMode,
    Usage,
)
from pluggably.providers._base import HostedBackend, ModelTraits
from pluggably.providers._errors import UpstreamError, UpstreamFailure, bad_response
from pluggably.providers._sse import SSEEvent
from pluggably.providers.config import ImageModelOverrides, OpenAIConfig
from pluggably.providers.presets import PRESETS, Preset

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}

# Listed ids that are not chat models (OpenAI lists embeddings, audio and image models too).
_NOT_CHAT = (
    "embedding",
    "embed",
    "tts",
    "whisper",
    "dall-e",
    "moderation",
    "davinci",
    "babbage",
    "transcribe",
    "realtime",
    "audio",
    "image",
    "sora",
    "search",
    "rerank",
)

# What OpenAI's own model families take; first matching prefix wins.
_REASONING = ("max_tokens", "seed")
_OPENAI_MODELS: tuple[tuple[str, Capabilities, int, tuple[str, ...] | None], ...] = (
    (
        "gpt-5-chat",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=16384
        ),
        128000,
        None,
    ),
    (
        "gpt-5",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=128000
        ),
        400000,
        _REASONING,
    ),
    (
        "gpt-4.1",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=32768
        ),
        1047576,
        None,
    ),
    (
        "gpt-4o",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=16384
        ),
        128000,
        None,
    ),
    (
        "gpt-4-turbo",
        Capabilities(tools=True, vision=True, json_object=True, max_output_tokens=4096),
        128000,
        None,
    ),
    ("gpt-4", Capabilities(tools=True, max_output_tokens=8192), 8192, None),
    (
        "gpt-3.5-turbo",
        Capabilities(tools=True, json_object=True, max_output_tokens=4096),
        16385,
        None,
    ),
    ("o1-mini", Capabilities(max_output_tokens=65536), 128000, _REASONING),
    (
        "o1",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=100000
        ),
        200000,
        _REASONING,
    ),
    (
        "o3",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=100000
        ),
        200000,
        _REASONING,
    ),
    (
        "o4",
        Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=100000
        ),
        200000,
        _REASONING,
    ),
)

# The typed request fields' keys: provider_options may not set them.
_RESERVED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "random_seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "repeat_penalty",
        "tools",
        "tool_choice",
        "response_format",
        "n",
    }
)


# ---- image models --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageTraits:
    """What an image model takes, and how the Images API asks for it."""

    # The sizes the model renders (width, height); None: any size within the shared range.
    sizes: tuple[tuple[int, int], ...] | None
    # The size the model renders when the request names none; None: the model decides (auto).
    default_size: tuple[int, int] | None
    max_count: int
    formats: tuple[ImageFormat, ...]
    # `response_format` to send ("b64_json", "url"); None: send none (GPT Image refuses it).
    response_format: str | None
    max_prompt_chars: int | None
    description: str = ""

    @property
    def format_field(self) -> bool:
        """Whether requests say the format (`output_format`): only models with a choice."""
        return self.formats != (ImageFormat.PNG,)

    def size_list(self) -> str:
        return ", ".join(f"{w}x{h}" for w, h in self.sizes or ())


_GPT_IMAGE = ImageTraits(
    sizes=((1024, 1024), (1536, 1024), (1024, 1536)),
    default_size=None,
    max_count=10,
    formats=(ImageFormat.PNG, ImageFormat.JPEG, ImageFormat.WEBP),
    response_format=None,
    max_prompt_chars=32000,
    description="OpenAI GPT Image model (Images API)",
)
# First matching prefix wins. Newer GPT Image models render more sizes than the three standard
# ones; configure them with `image: {sizes: [...]}` (or "any") rather than guess here.
_IMAGE_FAMILIES: tuple[tuple[str, ImageTraits], ...] = (
    ("gpt-image", _GPT_IMAGE),
    ("chatgpt-image", _GPT_IMAGE),
    (
        "dall-e-3",
        ImageTraits(
            sizes=((1024, 1024), (1792, 1024), (1024, 1792)),
            default_size=(1024, 1024),
            max_count=1,
            formats=(ImageFormat.PNG,),
            response_format="b64_json",
            max_prompt_chars=4000,
            description="DALL·E 3 (Images API)",
        ),
    ),
    (
        "dall-e-2",
        ImageTraits(
            sizes=((256, 256), (512, 512), (1024, 1024)),
            default_size=(1024, 1024),
            max_count=10,
            formats=(ImageFormat.PNG,),
            response_format="b64_json",
            max_prompt_chars=1000,
            description="DALL·E 2 (Images API)",
        ),
    ),
)
# An image model of a compatible endpoint the gateway knows nothing about.
_GENERIC_IMAGE = ImageTraits(
    sizes=None,
    default_size=None,
    max_count=10,
    formats=(ImageFormat.PNG,),
    response_format="b64_json",
    max_prompt_chars=None,
    description="image model (Images API)",
)
_SHARED_MAX_COUNT = int(next(s.maximum for s in IMAGE_PARAMETERS if s.name == "image.count") or 1)
# A linked image larger than this is refused (a provider's images are a few MB at most).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
# The body keys an image request sets from typed fields; `stream`/`partial_images` would ask
# for an SSE answer the adapter does not read.
_IMAGE_RESERVED = frozenset(
    {"model", "prompt", "n", "size", "output_format", "response_format", "stream", "partial_images"}
)
_IMAGE_CAPABILITIES = Capabilities(streaming=False)


def _with_overrides(base: ImageTraits, overrides: ImageModelOverrides | None) -> ImageTraits:
    if overrides is None:
        return base
    traits = base
    if overrides.sizes == "any":
        traits = dataclasses.replace(traits, sizes=None)
    elif overrides.sizes is not None:
        sizes = tuple(_parse_size(size) for size in overrides.sizes)
        default = traits.default_size if traits.default_size in sizes else None
        traits = dataclasses.replace(traits, sizes=sizes, default_size=default)
    if overrides.max_count is not None:
        traits = dataclasses.replace(traits, max_count=overrides.max_count)
    if overrides.formats is not None:
        formats = tuple(ImageFormat(f) for f in dict.fromkeys(overrides.formats))
        traits = dataclasses.replace(traits, formats=formats)
    if overrides.response_format is not None:
        response_format = None if overrides.response_format == "none" else overrides.response_format
        traits = dataclasses.replace(traits, response_format=response_format)
    if overrides.max_prompt_chars is not None:
        traits = dataclasses.replace(traits, max_prompt_chars=overrides.max_prompt_chars)
    return traits


def _parse_size(size: str) -> tuple[int, int]:
    width, _, height = size.partition("x")
    return int(width), int(height)


class OpenAIBackend(HostedBackend):
    RESERVED_OPTIONS = _RESERVED

    def __init__(self, provider: str, config: OpenAIConfig) -> None:
        # A provider named after a preset gets it (also `openai:` with its own base_url, e.g. a
        # proxy in front of OpenAI), unless its section names another.
        name = config.preset or (provider if provider in PRESETS else config.preset_name())
        self.preset: Preset = PRESETS[name]
        preset = self.preset
        self.max_tokens_field = config.max_tokens_field or preset.max_tokens_field
        self.stream_usage = (
            preset.stream_usage if config.stream_usage is None else config.stream_usage
        )
        self.supported = tuple(
            config.supported_parameters
            if config.supported_parameters is not None
            else preset.supported_parameters
        )
        self.default_caps = config.default_capabilities.apply(preset.default_capabilities)
        self.is_openai = preset.name == "openai"
        requires_key = preset.requires_key if config.requires_key is None else config.requires_key
        if config.api_key is not None or config.api_key_env is not None:
            requires_key = True if config.requires_key is None else config.requires_key
        # Before the base class builds the configured models' infos (their modality).
        self._image_models = {
            m.name: _with_overrides(self._image_family(m.name) or _GENERIC_IMAGE, m.image)
            for m in config.models
            if m.modality == "image"
        }
        self._text_models = {m.name for m in config.models if m.modality == "text"}
        super().__init__(
            provider,
            config,
            base_url=preset.base_url,
            key_env=preset.api_key_env,
            requires_key=requires_key,
        )

    # ---- models --------------------------------------------------------------------------

    def _family(self, name: str) -> tuple[Capabilities, int, tuple[str, ...] | None] | None:
        if not self.is_openai:
            return None
        base = name.removeprefix("ft:")
        for prefix, caps, context, params in _OPENAI_MODELS:
            if base.startswith(prefix):
                return caps, context, params
        return None

    def _image_family(self, name: str) -> ImageTraits | None:
        if not self.is_openai:
            return None
        for prefix, traits in _IMAGE_FAMILIES:
            if name.startswith(prefix):
                return traits
        return None

    def image_traits(self, name: str) -> ImageTraits | None:
        """What image model `name` takes; None for a text model. A configured model is what its
        entry says; an unconfigured one of OpenAI's image families is an image model too."""
        traits = self._image_models.get(name)
        if traits is None and name not in self._text_models:
            traits = self._image_family(name)
        return traits

    def traits(self, name: str) -> ModelTraits:
        image = self.image_traits(name)
        if image is not None:
            return ModelTraits(
                _IMAGE_CAPABILITIES, description=image.description, modality=Modality.IMAGE
            )
        family = self._family(name)
        if family is None:
            return ModelTraits(self.default_caps)
        caps, context, _ = family
        return ModelTraits(caps, context)

    def build_parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        image = self.image_traits(model.name) if model.modality is Modality.IMAGE else None
        if image is None:
            return super().build_parameters(model)
        max_count = min(image.max_count, _SHARED_MAX_COUNT)
        defaults: dict[str, Any] = {"count": 1, "format": ImageFormat.PNG.value}
        if image.default_size is not None:
            defaults["width"], defaults["height"] = image.default_size
        # Width and height keep the shared ranges: a size outside the model's list is refused
        # by build_request, with the list, which a range could not say.
        specs = parameters_for(
            Modality.IMAGE,
            ("width", "height", "count", "format"),
            {"count": (1, max_count)},
            **defaults,
        )
        if image.sizes is None:
            sizes = "any size (sides multiples of 8), sent with the other side as `size`"
        else:
            sizes = f"with the other side one of the sizes {image.size_list()} (sent as `size`)"
        unset = (
            "the model picks the size when both are unset"
            if image.default_size is None
            else f"both unset: {image.default_size[0]}x{image.default_size[1]}"
        )
        formats = ", ".join(f.value for f in image.formats)
        described = {
            "image.width": f"Image width in pixels, {sizes}; {unset}.",
            "image.height": f"Image height in pixels, {sizes}; {unset}.",
            "image.count": f"Number of images (sent as `n`), at most {max_count} per request.",
            "image.format": (
                f"File format: {formats} (sent as `output_format`)."
                if image.format_field
                else f"File format: {formats} only (what this model returns)."
            ),
        }
        return [
            dataclasses.replace(spec, description=described[spec.name])
            if spec.name in described
            else spec
            for spec in specs
        ]

    def provider_options(self, model: ModelInfo) -> ProviderOptionsPolicy:
        if model.modality is Modality.IMAGE:
            # quality, style, background, moderation, output_compression, user: passed through.
            return ProviderOptionsPolicy(allowed=None, reserved=_IMAGE_RESERVED)
        return super().provider_options(model)

    def supported_parameters(self, model: ModelInfo) -> Iterable[str]:
        family = self._family(model.name)
        if family is not None and family[2] is not None:
            return family[2]
        return ("max_tokens", *self.supported)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def fetch_models(self) -> list[ModelInfo]:
        body = await self.get_json("/models")
        entries = body if isinstance(body, list) else body.get("data")  # Together: a bare array
        models = []
        for entry in entries or ():
            name = entry.get("id") if isinstance(entry, dict) else None
            if (
                not isinstance(name, str)
                or not name
                or any(word in name.lower() for word in _NOT_CHAT)
            ):
                continue
            context = (
                entry.get("context_length") or entry.get("max_model_len") or 0
            )  # OpenRouter, vLLM
            models.append(
                self.model_info(
                    name,
                    context_length=context if isinstance(context, int) else 0,
                    description=str(entry.get("name") or entry.get("description") or "")[:200],
                )
            )
        return models

    # ---- requests ------------------------------------------------------------------------

    def build_request(
        self, request: GenerationRequest, model: ModelInfo, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        image = self.image_traits(model.name) if model.modality is Modality.IMAGE else None
        if image is not None:
            return self._image_request(request, model, image)
        self._check_preset_limits(request, model)
        body: dict[str, Any] = {"model": model.name, "messages": self._messages(request)}
        if stream:
            body["stream"] = True
            if self.stream_usage:
                body["stream_options"] = {"include_usage": True}
        text = request.text
        max_tokens = text.max_tokens or self.default_max_tokens(model)
        if max_tokens is not None:
            body[self.max_tokens_field] = max_tokens
        names = self.preset.parameter_names
        for short in (
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(text, short)
            if value is not None:
                body[names.get(short, short)] = value
        if text.stop:
            body["stop"] = list(text.stop)
        if request.tools:
            body["tools"] = [_tool(t) for t in request.tools]
            choice = request.tool_choice
            if choice is not None:
                body["tool_choice"] = (
                    {"type": "function", "function": {"name": choice.function}}
                    if choice.mode is ToolChoiceMode.FUNCTION
                    else choice.mode.value
                )
        fmt = text.response_format
        if fmt is not None:
            if fmt.type is ResponseFormatType.JSON_OBJECT:
                body["response_format"] = {"type": "json_object"}
            elif fmt.type is ResponseFormatType.JSON_SCHEMA:
                schema: dict[str, Any] = {
                    "name": fmt.name,
                    "schema": fmt.schema or {},
                    "strict": fmt.strict,
                }
                if fmt.description:
                    schema["description"] = fmt.description
                body["response_format"] = {"type": "json_schema", "json_schema": schema}
        return "/chat/completions", body

    def _image_request(
        self, request: GenerationRequest, model: ModelInfo, image: ImageTraits
    ) -> tuple[str, dict[str, Any]]:
        """The Images API body, after refusing what the model cannot take (before any upstream
        request, so a refusal costs nothing and says what the model does take)."""
        violations: list[FieldViolation] = []
        prompt_field = "prompt" if request.prompt is not None else "messages"
        prompt = request.prompt if request.prompt is not None else _last_user_text(request)
        if not prompt.strip():
            violations.append(
                FieldViolation(prompt_field, f"{model.id!r} makes images from a text prompt")
            )
        elif image.max_prompt_chars is not None and len(prompt) > image.max_prompt_chars:
            violations.append(
                FieldViolation(
                    prompt_field,
                    f"{model.id!r} takes prompts of at most {image.max_prompt_chars} "
                    f"characters, got {len(prompt)}",
                )
            )
        for i, message in enumerate(request.messages):
            for j, part in enumerate(message.parts):
                if isinstance(part, ImagePart):
                    violations.append(
                        FieldViolation(
                            f"messages[{i}].parts[{j}].image",
                            f"{model.id!r} makes images from text; it takes no input images",
                        )
                    )
        if request.tools or request.tool_choice is not None:
            violations.append(FieldViolation("tools", f"{model.id!r} does not call tools"))
        params = request.image
        size: tuple[int, int] | None = None
        if (params.width is None) != (params.height is None):
            missing = "image.height" if params.height is None else "image.width"
            violations.append(
                FieldViolation(
                    missing,
                    "set image.width and image.height together"
                    + (f"; {model.id!r} renders {image.size_list()}" if image.sizes else ""),
                )
            )
        elif params.width is not None and params.height is not None:
            size = (params.width, params.height)
            if image.sizes is not None and size not in image.sizes:
                text = (
                    f"{params.width}x{params.height} is not a size {model.id!r} renders; "
                    f"it renders {image.size_list()}"
                )
                violations += [
                    FieldViolation("image.width", text),
                    FieldViolation("image.height", text),
                ]
        if params.format is not None and params.format not in image.formats:
            violations.append(
                FieldViolation(
                    "image.format",
                    f"{model.id!r} returns {', '.join(f.value for f in image.formats)} only",
                )
            )
        if violations:
            raise InvalidArgument(violations)
        body: dict[str, Any] = {"model": model.name, "prompt": prompt}
        if params.count is not None:
            body["n"] = params.count
        if size is not None:
            body["size"] = f"{size[0]}x{size[1]}"
        if params.format is not None and image.format_field:
            body["output_format"] = params.format.value
        if image.response_format is not None:
            body["response_format"] = image.response_format
        return "/images/generations", body

    def _messages(self, request: GenerationRequest) -> list[dict[str, Any]]:
        if not request.is_chat:
            return [{"role": "user", "content": request.prompt or ""}]
        messages = [_message(m) for m in request.messages]
        if not self.preset.message_names:
            for message in messages:
                message.pop("name", None)
        return messages

    def _check_preset_limits(self, request: GenerationRequest, model: ModelInfo) -> None:
        """Rejects what this endpoint would silently ignore (see Preset)."""
        violations = []
        choice = request.tool_choice
        if (
            choice is not None
            and choice.mode is not ToolChoiceMode.AUTO
            and not self.preset.tool_choice
        ):
            violations.append(
                FieldViolation(
                    "tool_choice",
                    f"{self.preset.title} ignores tool_choice, so {model.id!r} cannot honour it",
                )
            )
        if not self.preset.image_urls:
            for i, message in enumerate(request.messages):
                for j, part in enumerate(message.parts):
                    if isinstance(part, ImagePart) and part.url:
                        violations.append(
                            FieldViolation(
                                f"messages[{i}].parts[{j}].image.url",
                                f"{self.preset.title} takes inline images only: send the bytes (data)",
                            )
                        )
        if violations:
            raise InvalidArgument(violations)

    # ---- responses -----------------------------------------------------------------------

    def decode_response(self, body: Any, request: GenerationRequest) -> list[Chunk]:
        if isinstance(body, dict) and body.get("error"):
            raise self.failure(
                self._error_from(200, body["error"], ""), f"{self.provider}/{request.model}"
            )
        choice = body["choices"][0]
        message = choice.get("message") or {}
        chunks: list[Chunk] = []
        text = message.get("content") or ""
        refusal = message.get("refusal") or ""
        if text or refusal:
            chunks.append(TextChunk(text or refusal))
        calls = message.get("tool_calls") or ()
        for index, call in enumerate(calls):
            fn = call.get("function") or {}
            chunks.append(
                ToolCallChunk(
                    index,
                    id=call.get("id") or f"call_{index}",
                    name=fn.get("name") or "",
                    arguments=fn.get("arguments") or "",
                )
            )
        finish = _finish(choice.get("finish_reason"), bool(calls), bool(refusal))
        if finish is None:
            raise bad_response(
                self.provider, f"{self.provider}/{request.model}", "no finish_reason"
            )
        chunks.append(
            DoneChunk(finish, _usage(body.get("usage")), model_version=body.get("model") or "")
        )
        return chunks

    async def decode_unary(
        self, raw: bytes, request: GenerationRequest, info: ModelInfo
    ) -> list[Chunk]:
        if info.modality is not Modality.IMAGE:
            return await super().decode_unary(raw, request, info)
        items, usage = self._decoded(
            lambda body: self._image_items(orjson.loads(body), info), raw, info
        )
        chunks: list[Chunk] = []
        for item in items:
            if isinstance(item, str):
                try:
                    item = await self.fetch_file(
                        item,
                        model_id=info.id,
                        deadline=request.deadline,
                        max_bytes=MAX_IMAGE_BYTES,
                        what="a generated image",
                    )
                except UpstreamFailure as failure:
                    # The images are made (and billed): a retry would make them again. The
                    # failure still counts against the breaker, and a fallback may serve.
                    failure.retryable = False
                    raise
            mime_type = _image_type(item)
            if mime_type is None:
                raise bad_response(
                    self.provider, info.id, "an image that is not PNG, JPEG, WebP or GIF"
                )
            chunks.append(ArtifactChunk(item, mime_type, "image"))
        chunks.append(DoneChunk(FinishReason.STOP, usage))
        return chunks

    def _image_items(self, body: Any, info: ModelInfo) -> tuple[list[bytes | str], Usage]:
        """(each image's bytes, or its URL to fetch; usage) of an Images API response."""
        if isinstance(body, dict) and body.get("error"):
            raise self.failure(self._error_from(200, body["error"], ""), info.id)
        items: list[bytes | str] = []
        for entry in body["data"] or ():
            if entry.get("b64_json"):
                items.append(base64.b64decode(entry["b64_json"], validate=True))
            elif isinstance(entry.get("url"), str) and entry["url"]:
                items.append(entry["url"])
            else:
                raise bad_response(self.provider, info.id, "an image without b64_json or url")
        if not items:
            raise bad_response(self.provider, info.id, "no images in the response")
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return items, Usage()
        return items, Usage(
            prompt_tokens=int(usage.get("input_tokens") or 0),
            completion_tokens=int(usage.get("output_tokens") or 0),
        )

    def stream_decoder(self, request: GenerationRequest) -> _StreamDecoder:
        return _StreamDecoder(self, f"{self.provider}/{request.model}")

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            data = {}
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, str):  # some compatible servers: {"error": "message"}
            error = {"message": error}
        if not isinstance(error, dict):
            message = data.get("message") or data.get("detail") if isinstance(data, dict) else ""
            error = {
                "message": message
                if isinstance(message, str)
                else body[:200].decode("utf-8", "replace")
            }
        return self._error_from(status, error, headers.get("x-request-id", ""))

    def _error_from(self, status: int, error: dict[str, Any], request_id: str) -> UpstreamError:
        code = str(error.get("code") or "").lower()
        kind_ = str(error.get("type") or "").lower()
        kind = ""
        if code == "context_length_exceeded" or "context_length" in code:
            kind = "context_length"
        elif (
            # DALL·E says content_policy_violation, GPT Image moderation_blocked.
            code in ("content_filter", "content_policy_violation", "moderation_blocked")
            or kind_ == "content_filter"
        ):
            kind = "content_filter"
        elif code == "insufficient_quota" or kind_ == "insufficient_quota":
            kind = "quota"
        elif status == 200:  # an error chunk inside a stream: classify by its type
            kind = {
                "rate_limit_exceeded": "rate_limit",
                "requests": "rate_limit",
                "tokens": "rate_limit",
                "invalid_request_error": "",
                "server_error": "overloaded",
            }.get(code or kind_, "overloaded")
        return UpstreamError(
            status=status,
            message=str(error.get("message") or ""),
            type=code or kind_,
            param=str(error.get("param") or ""),
            request_id=request_id,
            kind=kind,
        )


class _StreamDecoder:
    def __init__(self, backend: OpenAIBackend, model_id: str) -> None:
        self._backend = backend
        self._model_id = model_id
        self._finish: str | None = None
        self._usage: Any = None
        self._model = ""
        self._calls: set[int] = set()
        self._refusal = False
        self._done = False

    def feed(self, event: SSEEvent) -> list[Chunk]:
        data = event.data
        if data == b"[DONE]":
            return self._end()
        if self._done:
            return []
        obj = orjson.loads(data)
        if obj.get("error"):
            raise self._backend.failure(
                self._backend._error_from(200, obj["error"], ""), self._model_id
            )
        if obj.get("model"):
            self._model = obj["model"]
        if obj.get("usage"):
            self._usage = obj["usage"]
        out: list[Chunk] = []
        for choice in obj.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                out.append(TextChunk(content))
            refusal = delta.get("refusal")
            if refusal:
                self._refusal = True
                out.append(TextChunk(refusal))
            for call in delta.get("tool_calls") or ():
                index = call.get("index", 0)
                fn = call.get("function") or {}
                first = index not in self._calls
                self._calls.add(index)
                out.append(
                    ToolCallChunk(
                        index,
                        id=call.get("id") or (f"call_{index}" if first else ""),
                        name=fn.get("name") or "",
                        arguments=fn.get("arguments") or "",
                    )
                )
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def _end(self) -> list[Chunk]:
        if self._done:
            return []
        self._done = True
        finish = _finish(self._finish, bool(self._calls), self._refusal)
        if finish is None:
            raise bad_response(
                self._backend.provider, self._model_id, "the stream ended without a finish_reason"
            )
        return [DoneChunk(finish, _usage(self._usage), model_version=self._model)]

    def finish(self) -> list[Chunk]:
        if not self._done:
            raise bad_response(
                self._backend.provider,
                self._model_id,
                "the stream ended without its end marker ([DONE])",
            )
        return []


def _last_user_text(request: GenerationRequest) -> str:
    """An image prompt from a chat: the text of the last user message."""
    for message in reversed(request.messages):
        if message.role == "user":
            return message.text()
    return ""


def _image_type(data: bytes) -> str | None:
    """The MIME type image bytes really have (a provider may return another format than asked)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return None


def _finish(reason: str | None, has_calls: bool, refused: bool) -> FinishReason | None:
    if reason is None:
        return None
    finish = _FINISH.get(reason, FinishReason.STOP)
    if has_calls and finish is FinishReason.STOP:
        finish = FinishReason.TOOL_CALLS  # a forced named tool call ends with "stop"
    if refused and finish is FinishReason.STOP:
        finish = FinishReason.CONTENT_FILTER
    return finish


def _usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_prompt_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def _tool(tool: Any) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = (
        tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
    )
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        out["content"] = message.text()
        return out
    parts = message.content_parts()
    if any(isinstance(p, ImagePart) for p in parts):
        out["content"] = [_part(p) for p in parts]
    else:
        out["content"] = "".join(p.text for p in parts if isinstance(p, TextPart))
    if message.role == "assistant" and message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
        if not out["content"]:
            out["content"] = None
    if message.name and message.role in ("system", "user", "assistant"):
        out["name"] = message.name
    return out


def _part(part: TextPart | ImagePart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    url = part.url or f"data:{part.mime_type};base64,{base64.b64encode(part.data).decode()}"
    image: dict[str, Any] = {"url": url}
    if part.detail:
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


def build(provider: str, section: OpenAIConfig) -> OpenAIBackend:
    return OpenAIBackend(provider, section)
