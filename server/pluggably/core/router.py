"""Routes requests to backends by the provider part of the model id, with aliases and fallbacks."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping, Sequence

from pluggably.core.backend import Backend
from pluggably.core.errors import FieldViolation, InvalidArgument, ModelNotFound, Unavailable
from pluggably.core.params import ParameterSpec
from pluggably.core.types import Chunk, GenerationRequest, Modality, ModelInfo

log = logging.getLogger(__name__)

# Any failure before the first output moves on to the next fallback model, except errors caused
# by the request itself: those would fail the same way anywhere.
_NO_FALLBACK = (InvalidArgument,)


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
            field = "model" if i == 0 else f"fallback_models[{i - 1}]"
            try:
                info = await self.get_model(candidate)
            except ModelNotFound:
                if i == 0:
                    raise
                raise InvalidArgument([FieldViolation(field, f"unknown model {candidate!r}")]) from None
            if modality is not None and info.modality is not modality:
                raise InvalidArgument([FieldViolation(
                    field, f"model {info.id!r} produces {info.modality.value}, "
                    f"but {modality.value} options were given")])
            routes.append(self.resolve(info.id))

        for i, route in enumerate(routes):
            stream = route.backend.generate(dataclasses.replace(request, model=route.name))
            async with contextlib.aclosing(stream):
                try:
                    first = await anext(stream)
                except StopAsyncIteration:
                    raise Unavailable(f"model {route.model_id!r} ended without output") from None
                except _NO_FALLBACK:
                    raise
                except Exception as exc:
                    if i == len(routes) - 1:
                        raise
                    log.warning("model %s failed before output (%s); trying %s", route.model_id,
                                getattr(exc, "reason", type(exc).__name__), routes[i + 1].model_id)
                    continue
                yield route.model_id, first
                async for chunk in stream:
                    yield route.model_id, chunk
                return
