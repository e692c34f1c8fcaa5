"""What every provider stand-in shares: an aiohttp server on loopback, request recording,
scripted replies, fault injection and SSE framing.

A stand-in answers like the real API it imitates (headers, bodies, SSE framing, error bodies),
so the adapters are tested against the wire format rather than against our own idea of it. The
official SDK of each provider parses everything a stand-in serves (tests/test_standins_*.py).

Tests drive a stand-in in-process::

    async with OpenAIStandIn(api_key="sk-test") as standin:
        standin.script(Reply(text="Hi!"))                       # next request answers this
        standin.inject(Fault("status", status=429, retry_after=1))
        ... call standin.base_url ...
        assert standin.requests[-1].body["model"] == "gpt-4o-mini"

The bench runs one in a subprocess (`python -m pluggably.devtools.standins openai --port 0`) and
drives it through the control endpoints under `/_standin/` (see `StandIn._control_routes`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

FaultKind = Literal[
    "status",  # answer with `status` and the provider's error body (+ Retry-After / RetryInfo)
    "reset",  # close the connection without any response
    "hang_before_headers",  # wait `seconds` before answering at all
    "hang_mid_stream",  # after `after_chunks` stream events, wait `seconds`, then go on
    "drop_mid_stream",  # after `after_chunks` stream events, abort the connection
    "malformed_chunk",  # after `after_chunks` stream events, send a data line that is not JSON
    "no_terminator",  # stream everything but the provider's end marker, then close normally
    "stream_error",  # after `after_chunks` stream events, send the provider's in-stream error
]


@dataclass
class Fault:
    """One injected failure, applied to the next `times` requests whose path contains `path`."""

    kind: FaultKind
    times: int = 1
    status: int = 500
    retry_after: float | None = None
    message: str | None = None  # None: the provider's usual message for `status`
    error_type: str | None = None  # provider-native error type/code; None: derived from status
    after_chunks: int = 0
    seconds: float = 30.0
    path: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        return cls(**data)


@dataclass
class ToolCallSpec:
    """A tool call the stand-in's model makes: function `name` with JSON `arguments`."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None  # None: the stand-in makes one up in the provider's id style


@dataclass
class Reply:
    """What the next request answers. Unset fields take defaults derived from the request.

    `finish_reason` is the provider's own value (`"length"`, `"max_tokens"`, `"SAFETY"`, ...);
    `chunks` is how many text deltas a stream splits `text` into (None: one per word).
    """

    text: str | None = None
    tool_calls: Sequence[ToolCallSpec] = ()
    finish_reason: str | None = None
    chunks: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None  # the model version the response reports

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        data = dict(data)
        data["tool_calls"] = [ToolCallSpec(**t) for t in data.get("tool_calls", ())]
        return cls(**data)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None when the body was empty or not JSON
    raw: bytes
    at: float  # time.monotonic() when it arrived


# Per-request state the middleware hands to handlers and stream writers.
JSON_BODY = web.RequestKey("json_body", object)
FAULT = web.RequestKey("fault", object)
RESPONSE = web.RequestKey("response", web.StreamResponse)


class EndStream(Exception):
    """Raised inside a stream handler to end the response now (after a drop or an error event)."""


_WORD = re.compile(r"\S+\s*|\s+")


def words(text: str) -> list[str]:
    """Splits text into word tokens, each keeping its trailing whitespace (joined: the text)."""
    return _WORD.findall(text)


def split_text(text: str, chunks: int | None) -> list[str]:
    """`text` as `chunks` consecutive pieces (None: one per word); joined, they give `text`."""
    pieces = words(text)
    if chunks is None or not text:
        return pieces or ([text] if text else [])
    chunks = max(1, chunks)
    if len(pieces) < chunks:
        pieces = list(text)  # characters, when there are fewer words than chunks
    if len(pieces) <= chunks:
        return pieces
    size, extra = divmod(len(pieces), chunks)
    out, start = [], 0
    for i in range(chunks):
        end = start + size + (1 if i < extra else 0)
        out.append("".join(pieces[start:end]))
        start = end
    return out


def sample_from_schema(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A value that fits a JSON Schema (or Gemini's OpenAPI-subset schema, whose type names are
    upper-case): strings "stand-in", numbers 1, booleans true, arrays [], enums their first
    value, objects with every listed and every required property, `$ref`s followed, and for
    `anyOf`/`oneOf` the first branch that is not null (so `Optional[X]` still gives an X)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 16:
        return "stand-in"
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return sample_from_schema(_resolve_ref(root, ref), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for combinator in ("anyOf", "any_of", "oneOf", "allOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            usable = [
                o
                for o in options
                if not (isinstance(o, dict) and str(o.get("type", "")).lower() == "null")
            ]
            return sample_from_schema((usable or options)[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if str(k).lower() != "null"), "null")
    kind = (
        str(kind).lower()
        if kind is not None
        else ("object" if "properties" in schema else "array" if "items" in schema else "string")
    )
    if kind == "object":
        listed = schema.get("properties")
        properties: dict[str, Any] = listed if isinstance(listed, dict) else {}
        names = list(properties)
        names += [n for n in schema.get("required", ()) if isinstance(n, str) and n not in names]
        return {n: sample_from_schema(properties.get(n, {}), root, depth + 1) for n in names}
    return {"array": [], "integer": 1, "number": 1, "boolean": True, "null": None}.get(
        kind, "stand-in"
    )


def _resolve_ref(root: Any, ref: str) -> Any:
    """The node a local JSON pointer (`#/$defs/x`, with ~0/~1 escapes) names, or {}."""
    if not ref.startswith("#"):
        return {}
    node = root
    for part in ref[1:].strip("/").split("/"):
        if part:
            node = (
                node.get(part.replace("~1", "/").replace("~0", "~"))
                if isinstance(node, dict)
                else None
            )
    return node if isinstance(node, dict) else {}


def sniff_image(data: bytes) -> str | None:
    """The media type image bytes really have (the real APIs check it against the declared one)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def count_tokens(text: str) -> int:
    """The stand-ins' token count: one token per word (deterministic, good enough for usage)."""
    return len(text.split())


class SSEWriter:
    """Writes Server-Sent Events the way a provider frames them, applying the stream faults.

    `crlf` frames lines with CRLF (Gemini does); `split_json` spreads a JSON payload over several
    `data:` lines (legal SSE that naive parsers break on).
    """

    def __init__(
        self,
        standin: StandIn,
        request: web.Request,
        response: web.StreamResponse,
        *,
        crlf: bool = False,
        error_event: Callable[[Fault], bytes] | None = None,
    ) -> None:
        self.standin = standin
        self.request = request
        self.response = response
        self.newline = b"\r\n" if crlf else b"\n"
        self.fault: Fault | None = request.get(FAULT)  # type: ignore[assignment]
        self.events = 0
        self._error_event = error_event

    async def _write(self, data: bytes) -> None:
        await self.response.write(data)

    def frame(
        self, data: bytes | str, event: str | None = None, *, split_json: bool = False
    ) -> bytes:
        if isinstance(data, str):
            data = data.encode()
        nl = self.newline
        lines = [data]
        if split_json and len(data) > 2 and b"\n" not in data:
            # Break after the first comma: the parser must join the lines with "\n" (legal JSON).
            cut = data.find(b",") + 1 or len(data) // 2
            lines = [data[:cut], data[cut:]]
        out = b"".join(b"data: " + line + nl for line in lines)
        if event is not None:
            out = b"event: " + event.encode() + nl + out
        return out + nl

    async def send(self, data: Any, event: str | None = None, *, split_json: bool = False) -> None:
        """Sends one event (`data` is JSON-encoded unless it is bytes/str)."""
        await self._before_event()
        payload = data if isinstance(data, bytes | str) else orjson.dumps(data)
        await self._write(self.frame(payload, event, split_json=split_json))
        self.events += 1
        if self.standin.chunk_delay_s:
            await asyncio.sleep(self.standin.chunk_delay_s)

    async def comment(self, text: str = "") -> None:
        await self._write(b": " + text.encode() + self.newline + self.newline)

    async def terminate(self, raw: bytes | None) -> None:
        """Sends the provider's end marker (already framed), unless a fault says otherwise."""
        await self._before_event()
        if raw is not None and not (self.fault and self.fault.kind == "no_terminator"):
            await self._write(raw)
        with contextlib.suppress(ConnectionError):
            await self.response.write_eof()

    async def _before_event(self) -> None:
        fault = self.fault
        if fault is None or self.events != fault.after_chunks:
            return
        if fault.kind == "hang_mid_stream":
            self.fault = None  # once
            await asyncio.sleep(fault.seconds)
        elif fault.kind == "drop_mid_stream":
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            raise EndStream
        elif fault.kind == "malformed_chunk":
            self.fault = None
            await self._write(b'data: {"truncated": tr' + self.newline + self.newline)
        elif fault.kind == "stream_error":
            if self._error_event is None:
                raise RuntimeError("this stand-in has no in-stream error event")
            await self._write(self._error_event(fault))
            with contextlib.suppress(ConnectionError):
                await self.response.write_eof()
            raise EndStream


class StandIn(abc.ABC):
    """Base class: one aiohttp application on 127.0.0.1 imitating one provider's HTTP API.

    Subclasses add their routes in `routes()` and answer errors in the provider's format in
    `error_response()`. Everything a test can script is public state:

    - `replies`: scripted `Reply`s, consumed one per generation request (FIFO); when empty,
      `default_reply` applies (None: the provider module's deterministic echo).
    - `faults`: `Fault`s, consumed by matching requests before the handler runs.
    - `requests`: every request received (control requests excluded), in order.
    - `disconnects`: responses the client abandoned before they were complete.
    - `chunk_delay_s`: pause after each stream event (the bench paces streams with it).
    """

    provider = "base"

    def __init__(self, *, api_key: str | None = "test-key", chunk_delay_s: float = 0.0) -> None:
        self.api_key = api_key
        self.chunk_delay_s = chunk_delay_s
        self.replies: list[Reply] = []
        self.default_reply: Reply | None = None
        self.faults: list[Fault] = []
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self.active = 0  # responses being produced now
        self.connections: set[int] = set()  # ids of the TCP connections seen (keep-alive checks)
        self.record = True  # the bench turns recording off
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # ---- what subclasses provide ---------------------------------------------------------

    @abc.abstractmethod
    def routes(self) -> Iterable[web.RouteDef]:
        """The provider's endpoints."""

    @abc.abstractmethod
    def error_response(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        retry_after: float | None = None,
    ) -> web.Response:
        """An error in the provider's own body format (and retry hint)."""

    # ---- scripting -----------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def inject(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def reset(self) -> None:
        self.replies.clear()
        self.faults.clear()
        self.requests.clear()
        self.default_reply = None
        self.disconnects = 0
        self.connections.clear()

    def next_reply(self) -> Reply | None:
        if self.replies:
            return self.replies.pop(0)
        return self.default_reply

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    # ---- server --------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the stand-in is not started")
        return f"http://127.0.0.1:{self.port}"

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.add_routes(self._control_routes())
        app.add_routes(list(self.routes()))
        return app

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        # handler_cancellation: a client that goes away cancels the handler, which is how
        # `disconnects` sees an abandoned stream or hang.
        self._runner = web.AppRunner(self.build_app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> StandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- request pipeline ----------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_standin/"):
            return await handler(request)
        raw = await request.read()
        body: Any = None
        if raw:
            with contextlib.suppress(orjson.JSONDecodeError):
                body = orjson.loads(raw)
        if self.record:
            self.requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.path,
                    query=dict(request.query),
                    headers={k.lower(): v for k, v in request.headers.items()},
                    body=body,
                    raw=raw,
                    at=time.monotonic(),
                )
            )
        request[JSON_BODY] = body
        if request.transport is not None:
            self.connections.add(id(request.transport))
        fault = self._take_fault(request.path)
        request[FAULT] = fault
        self.active += 1
        try:
            if fault is not None:
                if fault.kind == "status":
                    return self.error_response(
                        fault.status,
                        fault.message or _DEFAULT_MESSAGES.get(fault.status, "error"),
                        error_type=fault.error_type,
                        retry_after=fault.retry_after,
                    )
                if fault.kind == "reset":
                    if request.transport is not None:
                        request.transport.abort()
                    raise asyncio.CancelledError
                if fault.kind == "hang_before_headers":
                    await asyncio.sleep(fault.seconds)
            try:
                return await handler(request)
            except EndStream:
                return request[RESPONSE]
        except (asyncio.CancelledError, ConnectionError):
            self.disconnects += 1
            raise
        finally:
            self.active -= 1

    def _take_fault(self, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.path is None or fault.path in path:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return dataclasses.replace(fault)
        return None

    async def open_stream(
        self,
        request: web.Request,
        *,
        crlf: bool = False,
        error_event: Callable[[Fault], bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> SSEWriter:
        """Starts a `text/event-stream` response and returns its writer."""
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                **(headers or {}),
            },
        )
        request[RESPONSE] = response
        await response.prepare(request)
        return SSEWriter(self, request, response, crlf=crlf, error_event=error_event)

    def json_response(
        self, data: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
        )

    # ---- control endpoints (for a stand-in in another process) ---------------------------

    def _control_routes(self) -> list[web.RouteDef]:
        async def faults(request: web.Request) -> web.Response:
            self.inject(Fault.from_json(await request.json()))
            return web.json_response({"faults": len(self.faults)})

        async def replies(request: web.Request) -> web.Response:
            self.script(Reply.from_json(await request.json()))
            return web.json_response({"replies": len(self.replies)})

        async def default(request: web.Request) -> web.Response:
            data = await request.json()
            self.default_reply = Reply.from_json(data) if data else None
            if "chunk_delay_s" in request.query:
                self.chunk_delay_s = float(request.query["chunk_delay_s"])
            return web.json_response({})

        async def reset(request: web.Request) -> web.Response:
            self.reset()
            return web.json_response({})

        async def stats(request: web.Request) -> web.Response:
            return web.json_response(
                {
                    "requests": len(self.requests),
                    "disconnects": self.disconnects,
                    "active": self.active,
                    "connections": len(self.connections),
                }
            )

        async def recording(request: web.Request) -> web.Response:
            self.record = (await request.json()).get("record", True)
            return web.json_response({})

        return [
            web.post("/_standin/faults", faults),
            web.post("/_standin/replies", replies),
            web.post("/_standin/default", default),
            web.post("/_standin/reset", reset),
            web.post("/_standin/recording", recording),
            web.get("/_standin/stats", stats),
        ]


_DEFAULT_MESSAGES = {
    400: "Bad request.",
    401: "Invalid authentication credentials.",
    403: "Permission denied.",
    404: "Not found.",
    408: "Request timed out.",
    413: "Request too large.",
    429: "Rate limit reached. Please try again later.",
    500: "The server had an error while processing your request.",
    502: "Bad gateway.",
    503: "The service is temporarily unavailable.",
    504: "Gateway timeout.",
    529: "Overloaded.",
}


def last_user_text(texts: Iterable[str]) -> str:
    """The last non-empty text, for the default echo reply."""
    last = ""
    for text in texts:
        if text.strip():
            last = text
    return last.strip()


def echo_text(provider: str, user_text: str) -> str:
    """The default reply of every stand-in: deterministic and derived from the request."""
    said = " ".join(user_text.split()[:24])
    return f"Hello from the {provider} stand-in. You said: {said}"
