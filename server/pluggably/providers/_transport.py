"""The one HTTP layer under every hosted adapter: a pooled aiohttp session per provider, timeouts
bounded by the caller's deadline, SSE reading, and transport failures as `UpstreamFailure`s.

One `ClientSession` per configured provider keeps connections alive across requests (a TLS
handshake per request would cost more than everything else the gateway does). Closing a
response that is not fully read closes its connection, so a cancelled call ends the upstream
request instead of returning a half-read connection to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from pluggably.core.errors import DeadlineExceeded
from pluggably.providers._errors import (
    UpstreamFailure,
    bad_response,
    connection_failure,
    timeout_failure,
)
from pluggably.providers._sse import SSEEvent, SSEParser

if TYPE_CHECKING:
    import aiohttp
    from multidict import CIMultiDictProxy

    from pluggably.providers.config import Timeouts

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024
ErrorParser = Callable[[int, "CIMultiDictProxy[str]", bytes], UpstreamFailure]


class ClientSpans(Protocol):
    """A span around each upstream call (`pluggably.observability.tracing` provides one)."""

    def start(
        self,
        provider: str,
        model_id: str,
        method: str,
        url: str,
        headers: MutableMapping[str, str],
    ) -> Any:
        """Opens the span and adds its trace context (`traceparent`) to `headers`."""

    def end(self, span: Any, status: int | None, error: BaseException | None) -> None:
        """Closes the span: the HTTP status when one came, the error when the call failed."""


# Installed by `setup_tracing` when tracing is on. None (the default) costs every request one
# attribute check and nothing else.
client_spans: ClientSpans | None = None


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The server's retry hint: `retry-after-ms`, or `Retry-After` in seconds or as a date."""
    value = headers.get("retry-after-ms")
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value) / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


class Upstream:
    """One response being read, with its time limits (event-loop clock)."""

    def __init__(
        self,
        transport: HttpTransport,
        response: aiohttp.ClientResponse,
        model_id: str,
        first_byte_at: float,
        limit_at: float,
        deadline: float | None,
        total_s: float,
    ) -> None:
        self._transport = transport
        self.response = response
        self._model_id = model_id
        self._first_byte_at = first_byte_at
        self._limit_at = limit_at
        self._deadline = deadline
        self._total_s = total_s  # the attempt's limit (metadata GETs have their own)

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.response.headers

    async def read(self) -> bytes:
        """The whole body (unary responses)."""
        import aiohttp

        try:
            async with asyncio.timeout_at(self._limit_at):
                return await self.response.read()
        except TimeoutError:
            raise self._transport.timed_out(
                self._model_id,
                "reading the response",
                self._total_s,
                self._limit_at,
                self._deadline,
            ) from None
        except aiohttp.ClientError as exc:
            raise connection_failure(
                self._transport.provider,
                self._model_id,
                f"the connection failed while reading the response ({type(exc).__name__})",
            ) from None

    async def events(self) -> AsyncIterator[SSEEvent]:
        """The body as Server-Sent Events, each read bounded by the first-byte or idle timeout."""
        import aiohttp

        loop = asyncio.get_running_loop()
        parser = SSEParser()
        content = self.response.content
        idle_s = self._transport.timeouts.idle_s
        read_at = min(self._first_byte_at, self._limit_at)
        what, seconds = "waiting for the first event", self._transport.timeouts.first_byte_s
        while True:
            try:
                async with asyncio.timeout_at(read_at):
                    data = await content.readany()
            except TimeoutError:
                if read_at >= self._limit_at:
                    # The attempt's overall limit ended the wait, not the first-byte or idle
                    # timeout: say so (timed_out names the client's deadline when that bound).
                    what, seconds = "streaming the response", self._total_s
                raise self._transport.timed_out(
                    self._model_id, what, seconds, read_at, self._deadline
                ) from None
            except aiohttp.ClientError as exc:
                raise connection_failure(
                    self._transport.provider,
                    self._model_id,
                    f"the stream broke off ({type(exc).__name__})",
                ) from None
            if not data:
                for event in parser.close():  # a bare CR that ended the body ends a line too
                    yield event
                return
            for event in parser.feed(data):
                yield event
            read_at = min(loop.time() + idle_s, self._limit_at)
            what, seconds = "idle between stream events", idle_s


class HttpTransport:
    def __init__(
        self,
        provider: str,
        base_url: str,
        *,
        headers: Mapping[str, str],
        timeouts: Timeouts,
        max_connections: int,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts
        self._headers = dict(headers)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            import aiohttp

            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=self._max_connections,
                ttl_dns_cache=300,
                keepalive_timeout=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                # Timeouts are per request and per read (below); aiohttp only bounds connecting.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s),
                auto_decompress=True,
                raise_for_status=False,
                skip_auto_headers=("User-Agent",),
                # Provider APIs set no cookies worth keeping; a real jar costs every request.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def open_connections(self) -> int:
        """Connections held by the pool now (in use or idle), for leak checks."""
        if self._session is None or self._session.closed:
            return 0
        connector: Any = self._session.connector
        idle = sum(len(conns) for conns in getattr(connector, "_conns", {}).values())
        return idle + len(getattr(connector, "_acquired", ()))

    def timed_out(
        self, model_id: str, what: str, seconds: float, limit_at: float, deadline: float | None
    ) -> Exception:
        """The error for a wait that ended at `limit_at`: the client's deadline, when that was
        the binding limit, else the provider's timeout of `seconds`."""
        if deadline is not None and limit_at >= deadline:
            return DeadlineExceeded(
                f"the client's deadline passed while {what} from {self.provider}"
            )
        return timeout_failure(self.provider, model_id, what, seconds)

    @contextlib.asynccontextmanager
    async def open(
        self,
        method: str,
        path: str,
        *,
        model_id: str,
        parse_error: ErrorParser,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
        deadline: float | None = None,
        total_s: float | None = None,
    ) -> AsyncIterator[Upstream]:
        """Sends a request; yields the response once its status is a success. HTTP errors are
        parsed by `parse_error` and raised; transport failures become `UpstreamFailure`s."""
        import aiohttp

        loop = asyncio.get_running_loop()
        now = loop.time()
        total_s = total_s if total_s is not None else self.timeouts.total_s
        limit_at = now + total_s
        if deadline is not None:
            limit_at = min(limit_at, deadline)
        first_byte_at = min(now + self.timeouts.first_byte_s, limit_at) if stream else limit_at
        url = self.base_url + path
        spans = client_spans
        span: Any = None
        status: int | None = None
        if spans is not None:
            headers = dict(headers) if headers else {}
            span = spans.start(self.provider, model_id, method, url, headers)
        try:
            try:
                async with asyncio.timeout_at(first_byte_at):
                    response = await self._client().request(
                        method,
                        url,
                        data=body,
                        headers=headers,
                        params=params,
                        allow_redirects=False,
                    )
            except aiohttp.ClientError as exc:
                raise connection_failure(self.provider, model_id, _describe(exc)) from None
            except TimeoutError:
                seconds = (
                    self.timeouts.first_byte_s if stream and first_byte_at < limit_at else total_s
                )
                raise self.timed_out(
                    model_id, "waiting for the response", seconds, first_byte_at, deadline
                ) from None
            status = response.status
            try:
                if response.status >= 400:
                    raw = await _read_error_body(response, min(limit_at, loop.time() + 10))
                    raise parse_error(response.status, response.headers, raw)
                if 300 <= response.status < 400 or response.status == 204:
                    raise bad_response(
                        self.provider, model_id, f"unexpected HTTP {response.status}"
                    )
                yield Upstream(self, response, model_id, first_byte_at, limit_at, deadline, total_s)
            finally:
                # A response not read to the end (cancelled, failed, abandoned) closes its
                # connection: the upstream sees the disconnect and stops generating.
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()
        except BaseException as exc:
            if span is not None:
                spans.end(span, status, exc)  # type: ignore[union-attr]
                span = None
            raise
        finally:
            if span is not None:
                spans.end(span, status, None)  # type: ignore[union-attr]


async def _read_error_body(response: aiohttp.ClientResponse, until: float) -> bytes:
    """The error body, up to MAX_ERROR_BODY bytes. `read(n)` returns only what has arrived so
    far, so one call would cut a body sent in several pieces (chunked encoding, a slow proxy)
    and lose the error type that decides retries (`insufficient_quota`, context length)."""
    import aiohttp

    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(until):
            while size < MAX_ERROR_BODY:
                part = await response.content.read(MAX_ERROR_BODY - size)
                if not part:
                    break
                parts.append(part)
                size += len(part)
    except (TimeoutError, aiohttp.ClientError):
        pass  # what arrived is still the best description of the error
    return b"".join(parts)


def _describe(exc: BaseException) -> str:
    """A client-safe description of a connection failure (no hosts, paths or OS messages that
    could carry credentials from the URL)."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "the host name does not resolve"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "TLS failed (certificate or handshake)"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connecting timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "the connection was refused or could not be made"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return f"the connection failed ({type(exc).__name__})"
