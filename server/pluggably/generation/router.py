"""Routes requests to backends by the provider part of the model id, with aliases, fallbacks and a
first-chunk timeout."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence

from pluggably.core.backend import Backend
from pluggably.core.errors import (
    Cancelled,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    ModelNotFound,
    PluggablyError,
    Unavailable,
)
from pluggably.core.params import ParameterSpec
from pluggably.core.types import Chunk, GenerationRequest, ModelInfo

log = logging.getLogger(__name__)

# Any failure before the first output moves on to the next fallback model, except errors caused
# by the request itself or by the caller giving up: those would end the same way anywhere.
_NO_FALLBACK = (InvalidArgument, DeadlineExceeded, Cancelled)


@dataclasses.dataclass(frozen=True)
class Route:
    backend: Backend
    model: ModelInfo  # with its aliases
    field: str  # the request field that named the model: `model` or `fallback_models[i]`

    @property
    def model_id(self) -> str:
        return self.model.id


class Router:
    def __init__(
        self,
        backends: Sequence[Backend],
        aliases: Mapping[str, str] | None = None,
        fallbacks: Mapping[str, Sequence[str]] | None = None,
        first_chunk_timeout_s: float | None = None,
    ) -> None:
        self._backends: dict[str, Backend] = {}
        for backend in backends:
            if backend.provider in self._backends:
                raise ValueError(f"two backends for provider {backend.provider!r}")
            self._backends[backend.provider] = backend
        self._aliases = dict(aliases or {})
        self._aliases_by_target: dict[str, tuple[str, ...]] = {}
        for alias, target in sorted(self._aliases.items()):
            self._aliases_by_target[target] = (*self._aliases_by_target.get(target, ()), alias)
        self._fallbacks = {model: list(models) for model, models in (fallbacks or {}).items()}
        self.first_chunk_timeout_s = first_chunk_timeout_s

    @property
    def backends(self) -> list[Backend]:
        return list(self._backends.values())

    def _locate(self, model: str) -> tuple[Backend, str]:
        """(backend, backend-local name) of an id or alias; ModelNotFound for unknown providers."""
        model_id = self._aliases.get(model, model)
        provider, sep, name = model_id.partition("/")
        backend = self._backends.get(provider)
        if not sep or not name or backend is None:
            raise ModelNotFound(model)
        return backend, name

    def _with_aliases(self, info: ModelInfo) -> ModelInfo:
        aliases = self._aliases_by_target.get(info.id, ())
        # Most models have no alias: no copy on the request path for them.
        return dataclasses.replace(info, aliases=aliases) if aliases != info.aliases else info

    async def list_models(self) -> list[ModelInfo]:
        models = []
        for backend in self._backends.values():
            for info in await backend.list_models():
                models.append(self._with_aliases(info))
        return sorted(models, key=lambda m: m.id)

    async def get_model(self, model: str) -> ModelInfo:
        backend, name = self._locate(model)
        info = await backend.get_model(name)
        if info is None:
            raise ModelNotFound(model)
        return self._with_aliases(info)

    async def parameters(self, model: str) -> tuple[str, list[ParameterSpec]]:
        info = await self.get_model(model)
        return info.id, self._locate(info.id)[0].parameters(info)

    def backend_of(self, route_or_id: str) -> Backend:
        return self._locate(route_or_id)[0]

    async def routes(self, model: str, fallbacks: Sequence[str] = ()) -> list[Route]:
        """The model and the fallbacks to try after it: the request's, else the configured ones
        (looked up by the name the request used, then by the resolved id)."""
        first = await self.get_model(model)
        if not fallbacks:
            fallbacks = self._fallbacks.get(model) or self._fallbacks.get(first.id) or ()
        routes = [Route(self._locate(first.id)[0], first, "model")]
        for i, candidate in enumerate(fallbacks):
            field = f"fallback_models[{i}]"
            try:
                info = await self.get_model(candidate)
            except ModelNotFound:
                raise InvalidArgument(
                    [FieldViolation(field, f"unknown model {candidate!r}")]
                ) from None
            routes.append(Route(self._locate(info.id)[0], info, field))
        return routes

    async def stream(
        self, routes: Sequence[Route], request: GenerationRequest
    ) -> AsyncGenerator[tuple[str, Chunk], None]:
        """Yields (serving model id, chunk). A model that fails before producing output, or
        produces none within the first-chunk timeout while a fallback is left, is abandoned for
        the next route. When every route failed, the error of the last one is raised, with a
        message that names what each model answered (the client asked for the first)."""
        failures: list[str] = []
        for i, route in enumerate(routes):
            is_last = i == len(routes) - 1
            timeout = None if is_last else self.first_chunk_timeout_s
            # Waiting for the first chunk only means something when the backend streams.
            attempt = dataclasses.replace(
                request, model=route.model.name, stream=request.stream or timeout is not None
            )
            stream = route.backend.generate(attempt)
            async with contextlib.aclosing(stream):
                try:
                    async with asyncio.timeout(timeout) as deadline:
                        first = await anext(stream)
                except StopAsyncIteration:
                    raise Unavailable(f"model {route.model_id!r} ended without output") from None
                except _NO_FALLBACK:
                    raise
                except Exception as exc:
                    if is_last:
                        if failures and isinstance(exc, PluggablyError):
                            # A copy: a backend may raise one error instance more than once.
                            error = copy.copy(exc)
                            error.message = (
                                f"{route.model_id}: {exc.message} (tried first: "
                                f"{'; '.join(failures)})"
                            )
                            error.metadata = {
                                **exc.metadata,
                                "models_tried": ",".join(r.model_id for r in routes),
                            }
                            raise error from exc
                        raise
                    failures.append(
                        f"{route.model_id}: "
                        + (
                            "no output in time"
                            if isinstance(exc, TimeoutError) and deadline.expired()
                            else getattr(exc, "reason", "failed")
                        )
                    )
                    if isinstance(exc, TimeoutError) and deadline.expired():
                        log.warning(
                            "model %s produced nothing in %.1fs; trying %s",
                            route.model_id,
                            timeout,
                            routes[i + 1].model_id,
                        )
                    else:
                        # A domain error is the model's answer; anything else is a bug in the
                        # backend, which the fallback must not hide: keep its traceback.
                        log.warning(
                            "model %s failed before output (%s); trying %s",
                            route.model_id,
                            getattr(exc, "reason", type(exc).__name__),
                            routes[i + 1].model_id,
                            exc_info=not isinstance(exc, PluggablyError),
                        )
                    continue
                yield route.model_id, first
                async for chunk in stream:
                    yield route.model_id, chunk
                return
