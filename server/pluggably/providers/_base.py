"""What every hosted adapter shares: models (configured, listed in the background, unlisted), the
API key, the request loop with retries and the circuit breaker, and the exchange over the shared
HTTP transport. An adapter supplies the wire format: request bodies, response and stream
decoding, error bodies, model listing.

A model's modality (text or image) comes from its traits; an image model's request goes through
the same loop (retries, breaker, fallbacks) as a text one. Files a provider links to instead of
sending (generated images as URLs) are fetched on the provider's connection pool by
`fetch_file`, which sends the provider's credentials to the provider's own origin only.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar

import orjson

from pluggably.core.backend import Backend
from pluggably.core.errors import FailedPrecondition, ModelNotFound, PluggablyError
from pluggably.core.params import ParameterSpec, ProviderOptionsPolicy, parameters_for
from pluggably.core.types import (
    Capabilities,
    Chunk,
    CircuitState,
    GenerationRequest,
    Modality,
    ModelInfo,
    ModelState,
)
from pluggably.providers._errors import (
    UpstreamError,
    UpstreamFailure,
    bad_response,
    connection_failure,
    scrub,
    upstream_failure,
)
from pluggably.providers._resilience import CircuitBreaker, backoff_s
from pluggably.providers._sse import SSEEvent
from pluggably.providers._transport import HttpTransport, retry_after_s
from pluggably.providers.config import HostedProviderConfig

log = logging.getLogger("pluggably.providers")

_LIST_RETRY_S = 60.0
_T = TypeVar("_T")


class StreamDecoder(Protocol):
    """Turns one provider stream into chunks. `feed` may raise `UpstreamFailure` for an error
    event; `finish` (at the end of the body) raises one when the stream lacked its end marker."""

    def feed(self, event: SSEEvent) -> list[Chunk]: ...

    def finish(self) -> list[Chunk]: ...


@dataclasses.dataclass(frozen=True)
class ModelTraits:
    """What the gateway knows of a provider model without asking: capabilities and limits."""

    capabilities: Capabilities
    context_length: int = 0
    description: str = ""
    modality: Modality = Modality.TEXT


class HostedBackend(Backend, abc.ABC):
    """A hosted provider's models behind its HTTP API."""

    #: Parameters every model of the kind honours (short names), and narrower ranges.
    SUPPORTED_PARAMETERS: ClassVar[tuple[str, ...]] = ()
    PARAMETER_RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {}
    #: Request-body keys that typed request fields set: `provider_options` may not override them.
    RESERVED_OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        provider: str,
        config: HostedProviderConfig,
        *,
        base_url: str,
        key_env: str | None,
        requires_key: bool,
    ) -> None:
        self.provider = provider
        self.config = config
        self.requires_key = requires_key
        self.api_key, key_source = config.resolve_key(key_env)
        self._missing_key = ""
        if self.api_key is None and requires_key:
            where = (
                f"set {key_source[len('environment variable ') :]}"
                if key_source.startswith("environment variable")
                else "configure an API key"
            )
            self._missing_key = (
                f"provider {provider!r} has no API key: {where} "
                f"(or providers.{provider}.api_key / api_key_env)"
            )
        self.secrets = tuple(s for s in (self.api_key, *config.headers.values()) if s)
        self.base_url = (config.base_url or base_url).rstrip("/")
        self.transport = HttpTransport(
            provider,
            self.base_url,
            headers={**self.auth_headers(), **config.headers},
            timeouts=config.timeouts,
            max_connections=config.max_connections,
        )
        self._configured = {m.name: self._configured_info(m) for m in config.models}
        self._listed: dict[str, ModelInfo] = {}
        self._unlisted: dict[str, ModelInfo] = {}  # served although neither configured nor listed
        self._breakers: dict[str, CircuitBreaker] = {}
        self._parameters: dict[tuple[str, int], list[ParameterSpec]] = {}
        self._refresh: asyncio.Task[None] | None = None
        self.listing_error = ""  # the last listing failure, scrubbed ("" after a success)

    # ---- what adapters provide -----------------------------------------------------------

    @abc.abstractmethod
    def auth_headers(self) -> dict[str, str]:
        """Headers that authenticate every request (none when there is no key)."""

    @abc.abstractmethod
    def build_request(
        self, request: GenerationRequest, model: ModelInfo, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) for a generation; may raise InvalidArgument for what the provider's
        format cannot express."""

    @abc.abstractmethod
    def decode_response(self, body: Any, request: GenerationRequest) -> list[Chunk]:
        """Chunks of a unary response body (parsed JSON), ending with a DoneChunk."""

    @abc.abstractmethod
    def stream_decoder(self, request: GenerationRequest) -> StreamDecoder: ...

    @abc.abstractmethod
    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        """What an error response (or an in-stream error with status 200) says."""

    @abc.abstractmethod
    async def fetch_models(self) -> list[ModelInfo]:
        """The provider's model list (all pages), as ModelInfo of this provider."""

    @abc.abstractmethod
    def traits(self, name: str) -> ModelTraits:
        """Capabilities and limits of a model the configuration says nothing about."""

    def stream_path(self, path: str) -> tuple[str, dict[str, str] | None]:
        """(path, query) for streaming when the provider uses a different endpoint."""
        return path, None

    # ---- models --------------------------------------------------------------------------

    def _configured_info(self, model: Any) -> ModelInfo:
        traits = self.traits(model.name)
        caps = model.capabilities.apply(traits.capabilities)
        return ModelInfo(
            provider=self.provider,
            name=model.name,
            modality=traits.modality,
            description=model.description or traits.description,
            context_length=model.context_length or traits.context_length,
            capabilities=caps,
            circuit=CircuitState.CLOSED,
        )

    def model_info(
        self,
        name: str,
        *,
        context_length: int = 0,
        description: str = "",
        max_output_tokens: int = 0,
    ) -> ModelInfo:
        """A listed model's info: its traits, overridden by what the listing says."""
        traits = self.traits(name)
        caps = traits.capabilities
        if max_output_tokens:
            caps = dataclasses.replace(caps, max_output_tokens=max_output_tokens)
        return ModelInfo(
            provider=self.provider,
            name=name,
            modality=traits.modality,
            description=description or traits.description,
            context_length=context_length or traits.context_length,
            capabilities=caps,
            circuit=CircuitState.CLOSED,
        )

    def _with_state(self, info: ModelInfo) -> ModelInfo:
        """`info` with the provider's and the circuit's state (infos are stored CLOSED)."""
        breaker = self._breakers.get(info.name)
        circuit = breaker.state if breaker is not None else CircuitState.CLOSED
        if self._missing_key:
            return dataclasses.replace(
                info, state=ModelState.UNAVAILABLE, state_reason=self._missing_key, circuit=circuit
            )
        if circuit is CircuitState.OPEN:
            return dataclasses.replace(
                info,
                circuit=circuit,
                state_reason="circuit breaker open after repeated upstream failures; requests are refused for now",
            )
        if circuit is CircuitState.HALF_OPEN:
            return dataclasses.replace(info, circuit=circuit)
        return info

    async def list_models(self) -> list[ModelInfo]:
        merged = {**self._listed, **self._configured}
        return [self._with_state(info) for _, info in sorted(merged.items())]

    async def get_model(self, name: str) -> ModelInfo | None:
        info = self._configured.get(name) or self._listed.get(name) or self._unlisted.get(name)
        if info is None:
            if not self.config.allow_unlisted_models:
                return None
            info = self.model_info(name)
            info = dataclasses.replace(
                info,
                description=info.description
                or "not listed by the provider; the provider's default capabilities",
            )
            if len(self._unlisted) >= 1024:  # names come from clients: keep the memo bounded
                self._unlisted.clear()
            self._unlisted[name] = info
        return self._with_state(info)

    def parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        # Asked on every request by the dataplane; the answer depends only on the model.
        key = (model.name, model.capabilities.max_output_tokens)
        specs = self._parameters.get(key)
        if specs is None:
            specs = self.build_parameters(model)
            if len(self._parameters) > 4096:  # unlisted names are unbounded
                self._parameters.clear()
            self._parameters[key] = specs
        return specs

    def build_parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        """The parameter specs of `model` (cached by `parameters`)."""
        defaults = {}
        default_max = self.default_max_tokens(model)
        if default_max:
            defaults["max_tokens"] = default_max
        return parameters_for(
            model.modality, self.supported_parameters(model), self.PARAMETER_RANGES, **defaults
        )

    def supported_parameters(self, model: ModelInfo) -> Iterable[str]:
        return ("max_tokens", *self.SUPPORTED_PARAMETERS)

    def default_max_tokens(self, model: ModelInfo) -> int | None:
        entry = next((m for m in self.config.models if m.name == model.name), None)
        return entry.default_max_tokens if entry is not None else None

    def provider_options(self, model: ModelInfo) -> ProviderOptionsPolicy:
        return ProviderOptionsPolicy(allowed=None, reserved=self.RESERVED_OPTIONS)

    def breaker(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            policy = self.config.breaker
            breaker = self._breakers[name] = CircuitBreaker(
                f"{self.provider}/{name}", policy.failure_threshold, policy.open_s
            )
        return breaker

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._missing_key:
            log.warning(
                "%s; its models are listed as unavailable until it has one", self._missing_key
            )
        if self.config.list_models and not self._missing_key:
            self._refresh = asyncio.get_running_loop().create_task(
                self._refresh_models(), name=f"pluggably-list-models:{self.provider}"
            )

    async def refresh_models(self) -> None:
        """Lists the provider's models once now (the background task does this periodically)."""
        try:
            models = await self.fetch_models()
        except UpstreamFailure as failure:
            self.listing_error = failure.error.message
            raise
        self._listed = {m.name: m for m in models}
        self._unlisted.clear()
        self.listing_error = ""

    async def _refresh_models(self) -> None:
        while True:
            delay = self.config.list_refresh_s
            try:
                await self.refresh_models()
                log.info("%s: listed %d models", self.provider, len(self._listed))
            except UpstreamFailure as failure:
                delay = min(delay, _LIST_RETRY_S)
                log.warning(
                    "%s: listing models failed (%s); retrying in %.0fs",
                    self.provider,
                    failure.error.message,
                    delay,
                )
            except Exception:
                delay = min(delay, _LIST_RETRY_S)
                log.exception("%s: listing models failed; retrying in %.0fs", self.provider, delay)
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
            self._refresh = None
        await self.transport.aclose()

    async def health(self) -> bool:
        return not self._missing_key

    # ---- generation ----------------------------------------------------------------------

    def failure_from_http(self, model_id: str) -> Any:
        def parse(status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
            err = self.parse_error(status, headers, body)
            if err.retry_after_s is None:
                err = dataclasses.replace(err, retry_after_s=retry_after_s(headers))
            return upstream_failure(
                err, provider=self.provider, model_id=model_id, secrets=self.secrets
            )

        return parse

    def failure(self, err: UpstreamError, model_id: str) -> UpstreamFailure:
        return upstream_failure(
            err, provider=self.provider, model_id=model_id, secrets=self.secrets
        )

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        info = await self.get_model(request.model)
        if info is None:
            raise ModelNotFound(f"{self.provider}/{request.model}")
        if self._missing_key:
            raise FailedPrecondition(
                self._missing_key,
                reason="PROVIDER_NOT_CONFIGURED",
                metadata={"provider": self.provider},
            )
        stream = request.stream and info.capabilities.streaming
        path, body = self.build_request(request, info, stream)
        if request.provider_options:
            body.update(request.provider_options)  # reserved keys were rejected by the dataplane
        payload = orjson.dumps(body)
        breaker = self.breaker(info.name)
        policy = self.config.retries
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            probe = breaker.acquire()
            sent = False
            try:
                async for chunk in self._exchange(path, payload, request, info, stream):
                    sent = True
                    yield chunk
            except UpstreamFailure as failure:
                if failure.breaker:
                    breaker.failure(probe)
                else:
                    breaker.release(probe)
                hint = failure.retry_after_s
                # A failure that opened the circuit ends the request with what went wrong: a
                # retry would only sleep and then be refused as PROVIDER_CIRCUIT_OPEN, hiding
                # the cause from a client whose request did reach the provider.
                if (
                    sent
                    or not failure.retryable
                    or attempt >= policy.max_attempts
                    or (hint is not None and hint > policy.max_retry_after_s)
                    or breaker.state is CircuitState.OPEN
                ):
                    raise failure.error from None
                delay = backoff_s(attempt, policy.initial_backoff_s, policy.max_backoff_s, hint)
                if request.deadline is not None and loop.time() + delay >= request.deadline:
                    raise failure.error from None
                log.info(
                    "%s: attempt %d for %s failed (%s); retrying in %.2fs",
                    self.provider,
                    attempt,
                    info.id,
                    failure.error.reason,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            except BaseException:
                breaker.release(probe)
                raise
            breaker.success()
            return

    async def _exchange(
        self, path: str, payload: bytes, request: GenerationRequest, info: ModelInfo, stream: bool
    ) -> AsyncGenerator[Chunk, None]:
        query = None
        if stream:
            path, query = self.stream_path(path)
        async with self.transport.open(
            "POST",
            path,
            body=payload,
            params=query,
            stream=stream,
            deadline=request.deadline,
            model_id=info.id,
            parse_error=self.failure_from_http(info.id),
            headers=_JSON_HEADERS,
        ) as upstream:
            if stream:
                decoder = self.stream_decoder(request)
                async for event in upstream.events():
                    for chunk in self._decoded(decoder.feed, event, info):
                        yield chunk
                for chunk in decoder.finish():
                    yield chunk
                return
            raw = await upstream.read()
        # Decoded once the response is released: decoding may fetch files the body links to.
        for chunk in await self.decode_unary(raw, request, info):
            yield chunk

    async def decode_unary(
        self, raw: bytes, request: GenerationRequest, info: ModelInfo
    ) -> list[Chunk]:
        """Chunks of a unary response body; adapters whose bodies link to files (image URLs)
        override this to fetch them (`fetch_file`)."""
        return self._decoded(
            lambda body: self.decode_response(orjson.loads(body), request), raw, info
        )

    def _decoded(self, decode: Callable[[Any], _T], data: Any, info: ModelInfo) -> _T:
        """`decode(data)`, with anything but a deliberate error turned into a bad response: a
        provider body of an unexpected shape must not surface as INTERNAL."""
        try:
            return decode(data)
        except (UpstreamFailure, PluggablyError):
            raise
        except Exception as exc:
            raise bad_response(self.provider, info.id, _what_broke(exc)) from None

    async def fetch_file(
        self,
        url: str,
        *,
        model_id: str,
        deadline: float | None,
        max_bytes: int,
        what: str = "a generated file",
    ) -> bytes:
        """GETs a file the provider's response links to, on the provider's connection pool,
        bounded in size and time (the attempt's `total_s` and the caller's deadline).

        The provider's credentials (API key, configured headers) go only to the provider's own
        origin: a link elsewhere (a storage bucket's signed URL) gets none, and aiohttp drops
        them on a redirect to another origin. The URL itself never reaches an error message,
        since a signed URL is a credential too."""
        import aiohttp
        from yarl import URL

        try:
            target = URL(url)
        except ValueError:
            target = URL()
        if target.scheme not in ("http", "https") or not target.host:
            raise bad_response(self.provider, model_id, f"a link to {what} that is not http(s)")
        same_origin = target.origin() == URL(self.base_url).origin()
        headers = {**self.auth_headers(), **self.config.headers} if same_origin else {}
        loop = asyncio.get_running_loop()
        total_s = self.config.timeouts.total_s
        limit_at = loop.time() + total_s
        if deadline is not None:
            limit_at = min(limit_at, deadline)
        pool = self.transport._client()
        try:
            async with (
                asyncio.timeout_at(limit_at),
                # A session of its own for its default headers; the connections are the pool's.
                aiohttp.ClientSession(
                    connector=pool.connector,
                    connector_owner=False,
                    headers=headers,
                    cookie_jar=aiohttp.DummyCookieJar(),
                    skip_auto_headers=("User-Agent",),
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=self.config.timeouts.connect_s
                    ),
                ) as session,
                session.get(target, allow_redirects=True, max_redirects=3) as response,
            ):
                if response.status != 200:
                    raise bad_response(
                        self.provider,
                        model_id,
                        f"fetching {what} answered HTTP {response.status}",
                    )
                if (response.content_length or 0) > max_bytes:
                    raise bad_response(
                        self.provider, model_id, f"{what} is larger than {max_bytes} bytes"
                    )
                data = bytearray()
                async for part in response.content.iter_chunked(64 * 1024):
                    data += part
                    if len(data) > max_bytes:
                        raise bad_response(
                            self.provider, model_id, f"{what} is larger than {max_bytes} bytes"
                        )
                return bytes(data)
        except TimeoutError:
            raise self.transport.timed_out(
                model_id, f"fetching {what}", total_s, limit_at, deadline
            ) from None
        except aiohttp.ClientError as exc:
            raise connection_failure(
                self.provider, model_id, f"fetching {what} failed ({type(exc).__name__})"
            ) from None

    async def get_json(
        self, path: str, params: Mapping[str, str] | None = None, *, what: str = "models"
    ) -> Any:
        """A GET for metadata (model lists): short timeouts, parsed JSON."""
        async with self.transport.open(
            "GET",
            path,
            params=params,
            model_id=f"{self.provider}/*",
            total_s=30.0,
            parse_error=self.failure_from_http(f"{self.provider}/*"),
        ) as upstream:
            raw = await upstream.read()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise bad_response(
                self.provider, f"{self.provider}/*", f"the {what} list is not JSON"
            ) from None

    def scrubbed(self, text: str) -> str:
        return scrub(text, self.secrets)


_JSON_HEADERS = {"Content-Type": "application/json"}


def _what_broke(exc: BaseException) -> str:
    if isinstance(exc, orjson.JSONDecodeError):
        return "malformed JSON"
    return f"unexpected shape ({type(exc).__name__})"
