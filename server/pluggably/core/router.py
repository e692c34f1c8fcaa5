"""Routes requests to backends by the provider part of the model id, with aliases and fallbacks."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping, Sequence

from pluggably.core.backend import Backend
from pluggably.core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ModelNotFound,
    PluggablyError,
    ResourceExhausted,
    Unavailable,
)
from pluggably.core.params import ParameterSpec
from pluggably.core.types import Chunk, GenerationRequest, Modality, ModelInfo

log = logging.getLogger(__name__)

# Errors after which the next fallback model is tried, provided the failing model produced no
# output yet. Errors caused by the request itself are never retried elsewhere.
_FALLBACK_ON = (Unavailable, ResourceExhausted, FailedPrecondition)


@dataclasses.dataclass(frozen=True)
class Route:
    backend: Backend
    model_id: str  # canonical `provider/name`
    name: str  # backend-local name


class Router:
    def __init__(self, backends: Sequence[Backend], aliases: Mapping[str, str] | None = None) -> None:
        self._backends: dict[str, Backend] = {}
        for backend in backends:
            if backend.provider in self._backends:
                raise ValueError(f"two backends for provider {backend.provider!r}")
            self._backends[backend.provider] = backend
        self._aliases = dict(aliases or {})

    @property
    def backends(self) -> list[Backend]:
        return list(self._backends.values())

    def resolve(self, model: str) -> Route:
        """Maps an id or alias to its backend; ModelNotFound when no backend serves the provider."""
        model_id = self._aliases.get(model, model)
        provider, sep, name = model_id.partition("/")
        backend = self._backends.get(provider)
        if not sep or not name or backend is None:
            raise ModelNotFound(model)
        return Route(backend, model_id, name)

    async def list_models(self) -> list[ModelInfo]:
        aliases_of: dict[str, list[str]] = {}
        for alias, target in self._aliases.items():
            aliases_of.setdefault(target, []).append(alias)
        models = []
        for backend in self._backends.values():
            for info in await backend.list_models():
                models.append(dataclasses.replace(info, aliases=tuple(sorted(aliases_of.get(info.id, ())))))
        return sorted(models, key=lambda m: m.id)

    async def get_model(self, model: str) -> ModelInfo:
        route = self.resolve(model)
        info = await route.backend.get_model(route.name)
        if info is None:
            raise ModelNotFound(model)
        aliases = tuple(sorted(a for a, target in self._aliases.items() if target == info.id))
        return dataclasses.replace(info, aliases=aliases)

    async def parameters(self, model: str) -> tuple[str, list[ParameterSpec]]:
        info = await self.get_model(model)
        return info.id, self.resolve(info.id).backend.parameters(info)

    async def generate(
        self,
        request: GenerationRequest,
        model: str,
        fallbacks: Sequence[str] = (),
        modality: Modality | None = None,
    ) -> AsyncIterator[tuple[str, Chunk]]:
        """Yields (serving model id, chunk). Tries `fallbacks` in order when a model fails before
        producing output with an error that another model might not have."""
        candidates = [model, *fallbacks]
        routes = []
        for i, candidate in enumerate(candidates):
            route = self.resolve(candidate)
            if modality is not None:
                info = await self.get_model(route.model_id)
                if info.modality is not modality:
                    field = "model" if i == 0 else f"fallback_models[{i - 1}]"
                    raise InvalidArgument([FieldViolation(
                        field, f"model {route.model_id!r} produces {info.modality.value}, "
                        f"but {modality.value} options were given")])
            routes.append(route)

        last_error: PluggablyError | None = None
        for route in routes:
            stream = route.backend.generate(dataclasses.replace(request, model=route.name))
            async with contextlib.aclosing(stream):
                try:
                    first = await anext(stream)
                except _FALLBACK_ON as exc:
                    log.warning("model %s failed before output (%s); trying the next fallback",
                                route.model_id, exc.reason)
                    last_error = exc
                    continue
                except StopAsyncIteration:
                    raise Unavailable(f"model {route.model_id!r} ended without output") from None
                yield route.model_id, first
                async for chunk in stream:
                    yield route.model_id, chunk
                return
        assert last_error is not None
        raise last_error
