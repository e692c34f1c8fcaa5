"""Transport-free request and output types shared by the API layer, the router and backends."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Modality(enum.Enum):
    TEXT = "text"
    IMAGE = "image"
    MESH = "mesh"


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"


class ModelState(enum.Enum):
    AVAILABLE = "available"
    DOWNLOADING = "downloading"
    NOT_DOWNLOADED = "not_downloaded"
    ERROR = "error"  # failed to load, files damaged or gone, a download that failed
    UNAVAILABLE = "unavailable"
    DELETING = "deleting"
    UNSERVABLE = "unservable"  # files on disk that no runner here serves (format, architecture)


class ModelFormat(enum.Enum):
    TRANSFORMERS = "transformers"
    DIFFUSERS = "diffusers"
    GGUF = "gguf"
    SAFETENSORS = "safetensors"


class ModelSource(enum.Enum):
    """How a local model came to be known."""

    CONFIG = "config"
    DOWNLOAD = "download"
    DISCOVERY = "discovery"


@dataclass(frozen=True)
class LocalDetails:
    """What only a local model has: where its files are and came from, and how it is kept."""

    format: ModelFormat | None
    source: ModelSource
    path: str
    source_repo: str = ""
    source_revision: str = ""
    resolved_revision: str = ""
    pinned: bool = False
    created_at: float | None = None  # epoch seconds
    last_used_at: float | None = None


class CircuitState(enum.Enum):
    """A provider model's circuit breaker: CLOSED serves, OPEN refuses at once, HALF_OPEN lets
    one probe request through."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An input image: a URL (https or data:) or inline bytes with their MIME type."""

    url: str = ""
    data: bytes = b""
    mime_type: str = ""
    detail: str = ""  # "", "auto", "low", "high": how closely the model should look (OpenAI)


ContentPart = TextPart | ImagePart


@dataclass(frozen=True)
class ToolCall:
    """A call of a function tool by the model; `arguments` is JSON text as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One message. `content` is plain text; `parts` carry further content (text and images)
    after it. Assistant messages may carry `tool_calls`; `tool` messages answer one call,
    named by `tool_call_id`."""

    role: str
    content: str = ""
    name: str = ""
    parts: tuple[ContentPart, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""

    def content_parts(self) -> tuple[ContentPart, ...]:
        """`content` (when set) as a leading text part, then `parts`."""
        if self.content:
            return (TextPart(self.content), *self.parts)
        return self.parts

    def text(self) -> str:
        """All text of the message (images left out)."""
        return "".join(p.text for p in self.content_parts() if isinstance(p, TextPart))

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImagePart))


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call. `parameters` is a JSON Schema object (None: no arguments);
    `strict` asks providers that support it to enforce the schema exactly."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool = False


class ToolChoiceMode(enum.Enum):
    AUTO = "auto"  # the model decides
    NONE = "none"  # no tool calls
    REQUIRED = "required"  # at least one tool call
    FUNCTION = "function"  # a call of the named function


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    function: str = ""  # with FUNCTION


class ResponseFormatType(enum.Enum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True)
class ResponseFormat:
    type: ResponseFormatType = ResponseFormatType.TEXT
    schema: dict[str, Any] | None = None  # with JSON_SCHEMA
    name: str = ""
    description: str = ""
    strict: bool = False


@dataclass(frozen=True)
class TextParams:
    """Text sampling parameters; None always means "the backend's default", never zero."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None


class ImageFormat(enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def mime_type(self) -> str:
        return f"image/{self.value}"


@dataclass(frozen=True)
class ImageParams:
    """What an image request asks for; None: the model's default."""

    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str = ""
    seed: int | None = None
    count: int | None = None
    format: ImageFormat | None = None  # None: PNG
    inline_data: bool = False  # also return the bytes (a transport matter, not the model's)


class MeshFormat(enum.Enum):
    GLB = "glb"
    OBJ = "obj"
    PLY = "ply"

    @property
    def mime_type(self) -> str:
        return _MESH_MIME[self]


_MESH_MIME = {
    MeshFormat.GLB: "model/gltf-binary",
    MeshFormat.OBJ: "model/obj",
    MeshFormat.PLY: "model/x-ply",
}


@dataclass(frozen=True)
class MeshParams:
    """What a 3D request asks for; None: the model's default."""

    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    grid_size: int | None = None
    format: MeshFormat | None = None  # None: GLB
    inline_data: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One validated generation request, as a backend receives it.

    `model` is the backend-local model name (without the `provider/` prefix). `stream` says the
    caller consumes output as it is produced (backends may then stream from upstream);
    `deadline` is the caller's deadline on the event loop's clock (`loop.time()`), or None.
    """

    request_id: str
    model: str
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    text: TextParams = field(default_factory=TextParams)
    image: ImageParams = field(default_factory=ImageParams)
    mesh: MeshParams = field(default_factory=MeshParams)
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice | None = None
    provider_options: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    deadline: float | None = None

    @property
    def is_chat(self) -> bool:
        return self.prompt is None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextChunk:
    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ToolCallChunk:
    """A piece of a tool call. The first piece of call `index` carries its `id` and `name`;
    `arguments` pieces concatenate to the call's JSON arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class ProgressChunk:
    stage: str
    step: int = 0
    total_steps: int = 0


@dataclass(frozen=True)
class ArtifactChunk:
    """A file a generation produced (an image, a mesh): the backend yields its bytes, the
    generation layer stores it in the artifact store and hands callers a reference."""

    data: bytes
    mime_type: str
    kind: str  # "image", "mesh"


@dataclass(frozen=True)
class DoneChunk:
    """Always the last chunk a backend yields for a generation that ended normally.

    `model_version` is the exact model the provider reports having used (for example a dated
    snapshot), when it says.
    """

    finish_reason: FinishReason
    usage: Usage
    stop_sequence: str = ""
    model_version: str = ""


Chunk = TextChunk | ToolCallChunk | ProgressChunk | ArtifactChunk | DoneChunk


@dataclass(frozen=True)
class Capabilities:
    """What a model takes. A request needing a capability its model lacks is rejected."""

    streaming: bool = True
    tools: bool = False
    vision: bool = False
    json_object: bool = False
    json_schema: bool = False
    max_output_tokens: int = 0  # 0: unknown


@dataclass(frozen=True)
class ModelInfo:
    """A model as a backend describes it; `name` is backend-local, `id` is `provider/name`.

    `state_reason` says why a model that is not AVAILABLE cannot serve (for example a provider
    without an API key).
    """

    provider: str
    name: str
    modality: Modality
    state: ModelState = ModelState.AVAILABLE
    description: str = ""
    context_length: int = 0
    size_bytes: int = 0
    loaded: bool = False
    aliases: tuple[str, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)
    state_reason: str = ""
    circuit: CircuitState | None = None  # None: no circuit breaker (local models)
    local: LocalDetails | None = None  # None: a remote model

    @property
    def id(self) -> str:
        return f"{self.provider}/{self.name}"
