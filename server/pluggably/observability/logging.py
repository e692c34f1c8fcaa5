"""Structured logs: JSON lines (or text), one access event per RPC, and a redaction safety net.

Every record that reaches the gateway's handler is one line. In JSON::

    {"time": "2026-05-01T12:00:00.123Z", "level": "INFO", "logger": "pluggably.access",
     "message": "StreamService/StreamGenerate OK 812.4ms", "method": "...", "code": "OK", ...}

Extra fields of a record (`logger.info(..., extra={"fields": {...}})` or plain `extra={...}`)
become top-level keys; an exception becomes the `exception` field.

Access events (`pluggably.access`, one per RPC, from `AccessLogHook`) are logged at a level that
says whether someone should look:

- DEBUG: successful health checks (probes every few seconds would drown everything else);
- INFO: OK, and CANCELLED (the client went away: nothing failed here);
- WARNING: the caller's request was refused or could not be served as asked (INVALID_ARGUMENT,
  NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...);
- ERROR: the gateway or what it depends on failed (INTERNAL, UNKNOWN, UNAVAILABLE, DATA_LOSS).

So `logging.level: WARNING` keeps exactly the calls that did not succeed.

No key material and no prompt or output text is ever put into a log event by this module;
`RedactingFilter` masks anything credential-shaped that another module might let slip.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from pluggably.api.hooks import CallHook
from pluggably.core.context import RequestContext

if TYPE_CHECKING:
    from pluggably.config import LoggingConfig

ACCESS_LOGGER = "pluggably.access"
access_log = logging.getLogger(ACCESS_LOGGER)

# Attributes every LogRecord has; anything else on a record was passed as `extra`.
_STANDARD_ATTRS = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", (), None).__dict__,
        "message",
        "asctime",
        "taskName",
        "fields",
    }
)


# The last whole second formatted, and its text: one tuple, so a thread reads both at once.
_last_second: tuple[int, str] = (-1, "")


def _utc_time(record: logging.LogRecord) -> str:
    """RFC 3339, UTC, milliseconds: `2026-05-01T12:00:00.123Z`."""
    global _last_second
    second = int(record.created)
    cached = _last_second
    if cached[0] != second:
        # Formatting the date costs more than the rest of the line: once per second is enough.
        cached = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int(record.msecs):03d}Z"


def _utc_time_of(created: float) -> str:
    global _last_second
    second = int(created)
    cached = _last_second
    if cached[0] != second:
        cached = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((created - second) * 1000):03d}Z"


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's extra fields: `fields` (a mapping, the access log's way) and any attribute
    passed as `extra`."""
    attrs = record.__dict__
    packed = attrs.get("fields")
    fields: dict[str, Any] = dict(packed) if isinstance(packed, Mapping) else {}
    for key in attrs.keys() - _STANDARD_ATTRS:
        fields.setdefault(key, attrs[key])
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's extra fields, and
    `exception` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = _extra_fields(record)
        if extra:
            # The envelope's keys come first and win: a field named "message" must not replace
            # the message.
            entry = {**entry, **extra, **entry}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...` for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extra_fields(record)
        if not extra:
            return line
        pairs = " ".join(f"{k}={v}" for k, v in extra.items() if v is not None and v != "")
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {pairs}{sep}{tail}" if pairs else line


# --- Redaction --------------------------------------------------------------------------------

_MASK = "[REDACTED]"
# (literal that must occur, whether to look for it case-insensitively, pattern, replacement).
# The literal test is a C-speed substring search; the pattern runs only where it passes, so a
# clean string (nearly every one) costs a few substring tests, not a regex scan per rule.
_RULES: tuple[tuple[str, bool, re.Pattern[str], str], ...] = (
    # User info in any URL: redis://:secret@host, https://user:secret@host.
    ("://", False, re.compile(r"(://[^\s/:@]*):[^\s@/]*@"), rf"\1:{_MASK}@"),
    # A lower-case word after the scheme is prose ("a bearer token"), not a credential.
    (
        "bearer",
        True,
        re.compile(r"\b((?i:bearer))(\s+)(?![a-z]+(?![\w.~+/=\-]))[\w.~+/=\-]+"),
        rf"\1\2{_MASK}",
    ),
    (
        "basic",
        True,
        re.compile(r"\b((?i:basic))(\s+)(?![a-z]+(?![\w+/=]))[\w+/=]{8,}"),
        rf"\1\2{_MASK}",
    ),
    # Gateway API keys `pk_<id>_<secret>`: the id stays visible, it is what identifies the key.
    ("pk_", False, re.compile(r"\b(pk_[A-Za-z0-9]{4,32})_[A-Za-z0-9_\-]{8,}"), rf"\1_{_MASK}"),
    ("sk-", False, re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), f"sk-{_MASK}"),
    ("hf_", False, re.compile(r"\bhf_[A-Za-z0-9]{6,}"), f"hf_{_MASK}"),
    ("AIza", False, re.compile(r"\bAIza[0-9A-Za-z_\-]{20,}"), f"AIza{_MASK}"),
    # Credentials in query strings and key=value text: ?key=..., password=...
    (
        "=",
        False,
        re.compile(
            r"(?<![A-Za-z0-9])"
            r"((?i:api[_-]?key|access[_-]?token|token|secret|password|passwd|key)=)"
            r"[^&\s\"',;]+"
        ),
        rf"\1{_MASK}",
    ),
)

_known_secrets: list[str] = []


def register_secret(value: str | None) -> None:
    """Masks this exact value wherever it appears in a log line (provider keys, hub tokens: any
    secret without a recognisable shape). Values shorter than 8 characters are ignored, since
    masking them would garble ordinary words."""
    if not value or len(value) < 8 or value in _known_secrets:
        return
    _known_secrets.append(value)
    # Longest first, so a secret that contains another is masked whole.
    _known_secrets.sort(key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every credential-shaped substring (and every registered secret) masked."""
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    lowered: str | None = None
    for literal, fold, pattern, replacement in _RULES:
        if fold:
            if lowered is None:
                lowered = text.lower()
            if literal not in lowered:
                continue
        elif literal not in text:
            continue
        text = pattern.sub(replacement, text)
        lowered = None
    return text


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact(value)
    if depth > 4:
        return value
    if isinstance(value, Mapping):
        # Flat fields (the access log's): one pass over all their text, which is nearly always
        # clean, and then the mapping is kept as it is.
        texts = []
        for item in value.values():
            kind = type(item)
            if kind is str:
                texts.append(item)
            elif kind not in _SCALARS:
                break
        else:
            joined = "\x1f".join(texts)
            if redact(joined) == joined:
                return value
        return {k: _redact_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Objects are rendered by the formatter with str(): render and redact them here instead.
    return redact(str(value))


class RedactingFilter(logging.Filter):
    """Masks credential-shaped text in a record's message, extra fields and traceback before any
    formatter sees it. A safety net under the rule that secrets are never logged, not the rule."""

    _traceback_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            cleaned = redact(message)
            if cleaned is not message or record.args:
                record.msg, record.args = cleaned, None
            attrs = record.__dict__
            for key in attrs.keys() - _STANDARD_ATTRS:
                attrs[key] = _redact_value(attrs[key])
            if "fields" in attrs:
                attrs["fields"] = _redact_value(attrs["fields"])
            if record.exc_info and not record.exc_text:
                record.exc_text = self._traceback_formatter.formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
            if record.stack_info:
                record.stack_info = redact(record.stack_info)
        except Exception:  # a malformed record is the formatter's to report, not ours
            pass
        return True


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that does not make one write system call per record.

    An INFO line (an access event per RPC) is buffered and written within `flush_interval_s`,
    by a daemon thread, or sooner when 64 KiB have gathered; WARNING and above are written at
    once, and everything is written at exit (`logging.shutdown`). A write per line cost about a
    third of the access log's time in a busy gateway: the system call, and the GIL handed to
    whichever thread was waiting for it.
    """

    def __init__(self, fd: int, flush_interval_s: float = 0.2) -> None:
        # A duplicate of the descriptor, block-buffered; closing it leaves `fd` open.
        stream = open(
            os.dup(fd), "w", buffering=1 << 16, encoding="utf-8", errors="backslashreplace"
        )
        super().__init__(stream)
        self._interval = flush_interval_s
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_periodically, name="log-flush", daemon=True
        )
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_line(self, line: str, level: int) -> None:
        """Writes one finished line (the access log's fast path, which skips the record)."""
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(line + self.terminator)
            if level >= logging.WARNING:
                self.stream.flush()

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        try:
            self.flush()
            stream = self.stream
            if stream is not None and not stream.closed:
                stream.close()
        finally:
            super().close()


def configure_logging(config: LoggingConfig) -> None:
    """One stderr handler on the root logger: JSON lines or text, the configured level, and the
    redaction filter on the handler (so it covers every logger, third-party ones included)."""
    # Records carry no thread, process or multiprocessing names (no formatter prints them), so
    # building one skips those lookups.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BufferedStreamHandler(sys.stderr.fileno())
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(config.level)


# --- Access log ---------------------------------------------------------------------------------

_CLIENT_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "DEADLINE_EXCEEDED",
    }
)
_HEALTH_PREFIX = "/grpc.health."


def access_level(method: str, code: str) -> int:
    """The level of an access event (see the module docstring)."""
    if code == "OK":
        return logging.DEBUG if method.startswith(_HEALTH_PREFIX) else logging.INFO
    if code == "CANCELLED":
        return logging.INFO
    if code in _CLIENT_CODES:
        return logging.WARNING
    return logging.ERROR


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class AccessLogHook(CallHook):
    """One `pluggably.access` event per RPC, when it ends.

    Fields: method, code, reason, latency_ms, ttft_ms (first output, generation calls), model,
    provider, input_tokens, output_tokens, messages, queue_wait_ms, request_id, key_id (the
    public id of the caller's key) and peer. Never metadata, key material or request text. The
    event costs a level check when its level is disabled.
    """

    def __init__(self, config: LoggingConfig, logger: logging.Logger | None = None) -> None:
        self._enabled = config.access_log
        self._log = logger or access_log

    def observe(self, ctx: RequestContext) -> None:
        if not self._enabled:
            return
        level = access_level(ctx.method, ctx.code)
        if not self._log.isEnabledFor(level):
            return
        latency_ms = round((ctx.ended - ctx.started) * 1000, 3)
        first = ctx.first_output_at
        principal = ctx.principal
        fields = {
            "method": ctx.method,
            "code": ctx.code,
            "reason": ctx.reason,
            "latency_ms": latency_ms,
            "ttft_ms": None if first is None else round((first - ctx.started) * 1000, 3),
            # The model that served; before one did (a refused call), the name the caller sent.
            "model": ctx.model or ctx.requested_model,
            "requested_model": ctx.requested_model,
            "provider": ctx.provider,
            "input_tokens": ctx.input_tokens,
            "output_tokens": ctx.output_tokens,
            "messages": ctx.messages,
            "queue_wait_ms": _ms(ctx.queue_wait_s),
            "request_id": ctx.request_id,
            "key_id": principal.key_id if principal is not None else None,
            "peer": ctx.peer,
        }
        handler = self._fast_handler()
        if handler is not None:
            # The shipped set-up (one JSON handler on the root logger, nothing else listening):
            # the line the handler would write, without a LogRecord, filters and formatter,
            # which cost most of the event. Only the model fields hold caller text to redact.
            fields["model"] = redact(str(fields["model"]))
            fields["requested_model"] = redact(str(fields["requested_model"]))
            # When the call ended, not when its batch is written.
            ended_s = time.time() - (time.perf_counter() - ctx.ended)
            line = orjson.dumps(
                {
                    "time": _utc_time_of(ended_s),
                    "level": logging.getLevelName(level),
                    "logger": self._log.name,
                    "message": f"{ctx.method_name} {ctx.code} {latency_ms:.1f}ms",
                    **fields,
                },
                default=str,
            ).decode()
            handler.write_line(line, level)
            return
        # A record made here rather than by `Logger.log`, which would walk the stack to find
        # the caller: a third of the cost of the event, for a source line nobody reads.
        record = self._log.makeRecord(
            self._log.name,
            level,
            __file__,
            0,
            "%s %s %.1fms",
            (ctx.method_name, ctx.code, latency_ms),
            None,
        )
        record.created -= time.perf_counter() - ctx.ended
        record.msecs = (record.created - int(record.created)) * 1000
        record.fields = fields
        self._log.handle(record)

    def _fast_handler(self) -> BufferedStreamHandler | None:
        """The root's one JSON handler when it alone would see the event, else None."""
        log = self._log
        if log.handlers or not log.propagate or log.filters:
            return None
        handlers = logging.getLogger().handlers
        if len(handlers) != 1:
            return None
        handler = handlers[0]
        if (
            type(handler) is not BufferedStreamHandler
            or type(handler.formatter) is not JsonFormatter
            or len(handler.filters) != 1
            or type(handler.filters[0]) is not RedactingFilter
        ):
            return None
        return handler
