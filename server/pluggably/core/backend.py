"""The one interface every provider adapter and local runner implements.

Modelled on vLLM's `EngineClient`: the API layer only ever sees `Backend`, and the router picks
one by the provider part of the model id, so adding a backend never touches the router or the
servicers. One instance serves one configured provider name (`openai`, `groq`, `local`, ...).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator

from pluggably.core.params import NO_PROVIDER_OPTIONS, ParameterSpec, ProviderOptionsPolicy
from pluggably.core.types import Chunk, GenerationRequest, ModelInfo


class Backend(abc.ABC):
    """A source of generations for the models of one provider.

    Cancellation contract: `generate` returns an async iterator. When the consumer stops early
    (client cancel, shutdown, a fallback timeout), the iterator is closed or the task awaiting
    it is cancelled, and the backend must stop the underlying work promptly (close the upstream
    HTTP request, stop the local generation thread) in its `finally`.

    Validation contract: the dataplane checks every request against `parameters(model)`,
    `provider_options(model)` and the model's capabilities before `generate` is called, so a
    backend only checks what needs its own state (token counts, context windows).
    """

    #: The `provider` part of the ids of this backend's models: the configured provider name.
    provider: str

    @abc.abstractmethod
    async def list_models(self) -> list[ModelInfo]:
        """The models this backend can serve now. Must not wait on the network."""

    async def get_model(self, name: str) -> ModelInfo | None:
        """One model by backend-local name; None when unknown. Override when listing is costly."""
        return next((m for m in await self.list_models() if m.name == name), None)

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Generates for `request.model`, yielding output chunks and finally one `DoneChunk`.

        Raises `InvalidArgument` for requests the model cannot take (checked before the first
        chunk), `ModelNotFound`, `ResourceExhausted` when its queue is full, `Unavailable` when it
        cannot serve now.
        """

    def parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        """The request parameters `model` takes, with `supported` and ranges set per model."""
        from pluggably.core.params import parameters_for

        return parameters_for(model.modality, supported=None)

    def provider_options(self, model: ModelInfo) -> ProviderOptionsPolicy:
        """Which `provider_options` keys `model` takes (default: none)."""
        return NO_PROVIDER_OPTIONS

    async def health(self) -> bool:
        """Whether the backend can serve requests now."""
        return True

    async def start(self) -> None:
        """Called once before the server starts serving; must stay cheap (no heavy imports,
        no waiting on the network: start background work instead)."""

    async def aclose(self) -> None:
        """Releases models, threads and connections. Called once at shutdown."""
