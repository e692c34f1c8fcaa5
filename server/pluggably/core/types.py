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


class ModelState(enum.Enum):
    AVAILABLE = "available"
    DOWNLOADING = "downloading"
    NOT_DOWNLOADED = "not_downloaded"
    ERROR = "error"


CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str = ""


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


@dataclass(frozen=True)
class GenerationRequest:
    """One validated generation request, as a backend receives it.

    `model` is the backend-local model name (without the `provider/` prefix).
    """

    request_id: str
    model: str
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    text: TextParams = field(default_factory=TextParams)
    provider_options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return self.prompt is None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextChunk:
    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ProgressChunk:
    stage: str
    step: int = 0
    total_steps: int = 0


@dataclass(frozen=True)
class DoneChunk:
    """Always the last chunk a backend yields for a generation that ended normally."""

    finish_reason: FinishReason
    usage: Usage
    stop_sequence: str = ""


Chunk = TextChunk | ProgressChunk | DoneChunk


@dataclass(frozen=True)
class ModelInfo:
    """A model as a backend describes it; `name` is backend-local, `id` is `provider/name`."""

    provider: str
    name: str
    modality: Modality
    state: ModelState = ModelState.AVAILABLE
    description: str = ""
    context_length: int = 0
    size_bytes: int = 0
    loaded: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.provider}/{self.name}"
