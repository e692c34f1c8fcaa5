"""A fake backend implementing the real `Backend` interface, for testing the layers above it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from pluggably.core.backend import Backend
from pluggably.core.errors import ModelNotFound
from pluggably.core.params import (
    NO_PROVIDER_OPTIONS,
    ParameterSpec,
    ProviderOptionsPolicy,
    parameters_for,
)
from pluggably.core.types import (
    Capabilities,
    Chunk,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    Modality,
    ModelInfo,
    TextChunk,
    Usage,
)


class FakeBackend(Backend):
    """Serves `<provider>/<name>` models whose behaviour a test scripts per model name.

    `behaviours[name]` is called with the request and returns an exception to raise before any
    output, or None to stream `words` as text chunks (after `raise_after` chunks it raises
    `error_after`). `first_delay_s[name]` delays a model's first chunk. `capabilities`,
    `supported` (short parameter names), `ranges` and `options` describe what the models take.
    """

    def __init__(
        self,
        provider: str = "fake",
        models: dict[str, Modality] | None = None,
        *,
        capabilities: Capabilities | None = None,
        supported: list[str] | None = None,
        ranges: dict[str, tuple[float | None, float | None]] | None = None,
        options: ProviderOptionsPolicy = NO_PROVIDER_OPTIONS,
    ) -> None:
        self.provider = provider
        self.models = models or {"echo": Modality.TEXT}
        self.capabilities = capabilities or Capabilities()
        self.supported = supported
        self.ranges = ranges
        self.options = options
        self.first_delay_s: dict[str, float] = {}
        self.extra_chunks: list[Chunk] = []  # yielded after the words (e.g. tool call pieces)
        self.finish = FinishReason.STOP
        self.behaviours: dict[str, Callable[[GenerationRequest], BaseException | None]] = {}
        self.words = ["hello", " ", "world"]
        self.error_after: dict[str, tuple[int, BaseException]] = {}
        self.delay_s = 0.0
        self.requests: list[GenerationRequest] = []
        self.cancelled = asyncio.Event()
        self.closed = False

    async def list_models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                provider=self.provider,
                name=n,
                modality=m,
                context_length=128,
                capabilities=self.capabilities,
            )
            for n, m in sorted(self.models.items())
        ]

    def parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        return parameters_for(model.modality, supported=self.supported, ranges=self.ranges)

    def provider_options(self, model: ModelInfo) -> ProviderOptionsPolicy:
        return self.options

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if request.model not in self.models:
            raise ModelNotFound(f"{self.provider}/{request.model}")
        self.requests.append(request)
        behaviour = self.behaviours.get(request.model)
        error = behaviour(request) if behaviour else None
        if error is not None:
            raise error
        limit, late_error = self.error_after.get(request.model, (None, None))
        try:
            if request.model in self.first_delay_s:
                await asyncio.sleep(self.first_delay_s[request.model])
            for i, word in enumerate(self.words):
                if limit is not None and i == limit:
                    assert late_error is not None
                    raise late_error
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.closed:  # like the local runner: shutdown ends the generation as CANCELLED
                    yield DoneChunk(
                        FinishReason.CANCELLED, Usage(prompt_tokens=3, completion_tokens=i)
                    )
                    return
                yield TextChunk(word, (i,))
            for chunk in self.extra_chunks:
                yield chunk
            yield DoneChunk(
                self.finish,
                Usage(prompt_tokens=3, completion_tokens=len(self.words)),
                model_version=f"{request.model}-v1",
            )
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            raise

    async def aclose(self) -> None:
        self.closed = True
