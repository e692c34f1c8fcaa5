"""`pluggably models|storage|artifacts ...`: the operator's commands that talk to a running gateway
over gRPC (the `keys` group in cli.py works on the key store file instead).

Every command is a function `(args, gateway) -> exit code`, wrapped by `_remote`, which opens the
channel, sends the API key and turns every failure into one line on stderr and an exit code:
0 done; 1 not found or another server error; 2 usage, INVALID_ARGUMENT or FAILED_PRECONDITION;
3 UNAUTHENTICATED or PERMISSION_DENIED; 4 the gateway is unreachable or UNAVAILABLE; 130
interrupted (Ctrl-C).

Key decisions:
- Sync gRPC: a command makes one call at a time, and a blocking sync call wakes up often enough
  for Ctrl-C to land as KeyboardInterrupt, which is all `models pull` needs to cancel its job.
- Nothing here imports cli.py (which imports this module for its `GROUPS`): the error handling
  lives in `_remote`, so there is no import cycle and `main()` needs no new cases.
- The API key travels only in the `authorization` metadata. Errors quote the server's status or
  name the file or variable the key came from, never the key.
- `--json` prints the proto JSON mapping (`MessageToDict`) with every field present, so scripts
  need not know proto3 leaves defaults out; lists are JSON arrays. int64 fields are strings there
  (exact bytes, as the mapping says); tables show sizes in binary units instead.
- Downloads show the server's rate and ETA rather than a client estimate: the server sees the
  transfer itself, the client sees only updates. A bar (rich) only on a terminal; elsewhere a
  line per state change or per second, so logs stay readable.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import mimetypes
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

# By default grpc's C core writes some connection failures (a TLS handshake that fails, say) to
# stderr as log lines, beside the one line a command prints. It reads this setting once, when
# grpc is first imported; GRPC_VERBOSITY=INFO (or DEBUG) in the environment shows them again.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pluggably.v1 import (
    artifact_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    storage_service_pb2,
    storage_service_pb2_grpc,
)

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130

DEFAULT_SERVER = "localhost:50051"
DEFAULT_TIMEOUT_S = 60.0
# What `pluggably keys ensure-dev` (and `make run`) writes; the README's examples use it.
DEV_KEY_FILE = Path("var/dev-key")

_EXIT_BY_CODE: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_USAGE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNREACHABLE,
}

_TERMINAL_DOWNLOAD_STATES = frozenset(
    {
        model_pb2.DOWNLOAD_STATE_SUCCEEDED,
        model_pb2.DOWNLOAD_STATE_FAILED,
        model_pb2.DOWNLOAD_STATE_CANCELLED,
    }
)

# The media types generators produce, before asking `mimetypes` (whose answer depends on the
# system's mime.types file).
_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "model/gltf-binary": ".glb",
    "model/gltf+json": ".gltf",
    "model/obj": ".obj",
    "model/stl": ".stl",
    "model/ply": ".ply",
}

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([wdhms]?)")
_DURATION_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}

_T = TypeVar("_T")


class RemoteError(Exception):
    """Ends a command with `code` and one line on stderr."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# -- connection ------------------------------------------------------------------------------


@dataclass
class Gateway:
    """A channel to one gateway, with the call options every RPC gets."""

    target: str
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float

    @functools.cached_property
    def models(self) -> model_service_pb2_grpc.ModelServiceStub:
        return model_service_pb2_grpc.ModelServiceStub(self.channel)

    @functools.cached_property
    def storage(self) -> storage_service_pb2_grpc.StorageServiceStub:
        return storage_service_pb2_grpc.StorageServiceStub(self.channel)

    def call(self, method: Callable[..., _T], request: Message) -> _T:
        """A unary call with the key and the `--timeout` deadline."""
        return method(request, metadata=self.metadata, timeout=self.timeout_s)

    def stream(self, method: Callable[..., Any], request: Message) -> Any:
        """A server-streaming call with the key and no deadline (it lasts as long as it must)."""
        return method(request, metadata=self.metadata)


def _api_key(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The key and where it came from (for messages), or None to call without a key."""
    if args.key:
        return args.key.strip(), "--key"
    if args.key_file:
        return _read_key_file(Path(args.key_file), "--key-file"), f"--key-file {args.key_file}"
    if environ.get("PLUGGABLY_API_KEY"):
        return environ["PLUGGABLY_API_KEY"].strip(), "$PLUGGABLY_API_KEY"
    if DEV_KEY_FILE.is_file():
        return _read_key_file(DEV_KEY_FILE, str(DEV_KEY_FILE)), str(DEV_KEY_FILE)
    return None


def _read_key_file(path: Path, option: str) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise RemoteError(f"{option}: cannot read {path}: {reason}") from None


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if (args.client_cert is None) != (args.client_key is None):
        raise RemoteError("--client-cert and --client-key go together: give both or neither")
    if not (args.tls or args.ca_file or args.client_cert):
        return None
    if args.ca_file:
        # Imported here: it pulls in the config models, which the other commands do not need.
        from pluggably.config import ConfigError
        from pluggably.security.tls import channel_credentials

        try:
            return channel_credentials(args.ca_file, args.client_cert, args.client_key)
        except ConfigError as exc:
            raise RemoteError(f"TLS: {exc}") from None
    # The system's trusted CAs.
    if args.client_cert is None:
        return grpc.ssl_channel_credentials()
    try:
        cert, key = Path(args.client_cert).read_bytes(), Path(args.client_key).read_bytes()
    except OSError as exc:
        raise RemoteError(f"TLS: cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_channel_credentials(private_key=key, certificate_chain=cert)


def _connect(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Gateway:
    environ = os.environ if environ is None else environ
    target = args.server or environ.get("PLUGGABLY_SERVER") or DEFAULT_SERVER
    metadata: tuple[tuple[str, str], ...] = ()
    found = _api_key(args, environ)
    if found is not None:
        key, origin = found
        # gRPC refuses such metadata with an error that could quote it: check first, and say
        # where the key came from rather than what it is.
        if not key or not key.isascii() or not key.isprintable() or " " in key:
            raise RemoteError(f"the API key from {origin} is empty or has characters keys never do")
        metadata = (("authorization", f"Bearer {key}"),)
    credentials = _credentials(args)
    options = [("grpc.primary_user_agent", "pluggably-cli")]
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    return Gateway(target, channel, metadata, args.timeout)


# -- errors ----------------------------------------------------------------------------------


def _rpc_failure(error: grpc.RpcError, gateway: Gateway) -> RemoteError:
    """One line for a failed call: the server's message and reason, or why the call never got
    an answer."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details: str = error.details() or ""  # type: ignore[attr-defined]
    exit_code = _EXIT_BY_CODE.get(code, EXIT_NOT_FOUND)
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # trailers that contradict the status line: trust the status line
        status = None
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    has_info = has_retry = False
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            has_info = detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            has_retry = detail.Unpack(retry)
    if not has_info:
        # No google.rpc.Status from the gateway: the call failed before reaching it.
        if code is grpc.StatusCode.UNAVAILABLE:
            return RemoteError(
                f"cannot reach the gateway at {gateway.target} ({details or 'unavailable'})",
                EXIT_UNREACHABLE,
            )
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return RemoteError(
                f"no answer from the gateway at {gateway.target} within {gateway.timeout_s:g} s "
                "(--timeout)",
                exit_code,
            )
    message = status.message if status is not None and status.message else details
    line = f"{message or code.name.lower()} ({info.reason if has_info else code.name})"
    if has_retry:
        line += f"; retry in {retry.retry_delay.ToTimedelta().total_seconds():g} s"
    return RemoteError(line, exit_code)


Remote = Callable[[argparse.Namespace, Gateway], int]


def _remote(command: Remote) -> Callable[[argparse.Namespace], int]:
    """A command that runs against the gateway: the channel is open while it runs, and every
    failure becomes one line on stderr and an exit code."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        gateway: Gateway | None = None
        try:
            gateway = _connect(args)
            return command(args, gateway)
        except RemoteError as exc:
            return _fail(str(exc), exc.code)
        except grpc.RpcError as error:
            assert gateway is not None  # only calls raise it, and they need a gateway
            failure = _rpc_failure(error, gateway)
            return _fail(str(failure), failure.code)
        except KeyboardInterrupt:
            return _fail("interrupted", EXIT_INTERRUPTED)
        finally:
            if gateway is not None:
                gateway.channel.close()

    return run


def _fail(message: str, code: int) -> int:
    print(f"pluggably: error: {message}", file=sys.stderr)
    return code


# -- formatting ------------------------------------------------------------------------------


def _human_bytes(nbytes: int) -> str:
    # Imported here: the budget module is heavier than a table needs to be at start.
    from pluggably.storage.budget import format_bytes

    return format_bytes(nbytes)


def _limit(nbytes: int) -> str:
    return "unlimited" if nbytes == 0 else _human_bytes(nbytes)


def _time(stamp: timestamp_pb2.Timestamp, *, present: bool = True) -> str:
    if not present or (stamp.seconds == 0 and stamp.nanos == 0):
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M")


def _seconds(duration: duration_pb2.Duration) -> str:
    total = max(0, round(duration.ToTimedelta().total_seconds()))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _enum_label(enum: Any, value: int, prefix: str) -> str:
    """`MODEL_STATE_NOT_DOWNLOADED` -> `not-downloaded`; unset -> `-`."""
    if value == 0:
        return "-"
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)  # a value from a newer contract
    return name.removeprefix(prefix).lower().replace("_", "-")


def _enum_parser(enum: Any, prefix: str) -> Callable[[str], int]:
    """An argparse type: a label as `_enum_label` prints it (`-` or `_` alike) to its value."""
    values = {
        name.removeprefix(prefix).lower().replace("_", "-"): number
        for name, number in enum.items()
        if number != 0
    }

    def parse(text: str) -> int:
        value = values.get(text.strip().lower().replace("_", "-"))
        if value is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(values)}")
        return value

    parse.__name__ = prefix.strip("_").lower().replace("_", " ")  # argparse names it in errors
    return parse


def _choices(enum: Any, prefix: str) -> str:
    return "|".join(
        name.removeprefix(prefix).lower().replace("_", "-")
        for name, number in enum.items()
        if number != 0
    )


def _print_table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> None:
    """Columns padded to their widest cell; the columns in `right` (sizes) aligned right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


def _as_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# -- argument types --------------------------------------------------------------------------


def _size(text: str) -> int:
    from pluggably.storage.budget import parse_size

    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert isinstance(value, int)  # parse_size returns an int for every string it accepts
    return value


_size.__name__ = "size"


def _duration(text: str) -> duration_pb2.Duration:
    """`7d`, `12h`, `30m`, `45s`, `1d12h`, `1.5h`, `90` (seconds)."""
    spec = text.strip().lower()
    parts = list(_DURATION.finditer(spec))
    if not spec or "".join(p.group(0) for p in parts) != spec:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: write it like 7d, 12h, 30m, 45s or 1d12h"
        )
    seconds = sum(float(p.group(1)) * _DURATION_UNITS[p.group(2)] for p in parts)
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


_duration.__name__ = "duration"


def _page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text} is not in [1, 1000]")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


# -- paging ----------------------------------------------------------------------------------


def _collect(
    fetch: Callable[[str], tuple[Sequence[_T], str]], args: argparse.Namespace
) -> list[_T]:
    """One page (or every page with --all-pages); says on stderr how to get the rest."""
    items: list[_T] = []
    token = args.page_token or ""
    while True:
        page, token = fetch(token)
        items.extend(page)
        if not token or not args.all_pages:
            break
    if token:
        print(
            f"More on the next page: --all-pages, or --page-token {token}",
            file=sys.stderr,
        )
    return items


# -- models ----------------------------------------------------------------------------------

_MODALITY = "MODALITY_"
_MODEL_STATE = "MODEL_STATE_"
_FORMAT = "MODEL_FORMAT_"
_SOURCE = "MODEL_SOURCE_"
_DOWNLOAD_STATE = "DOWNLOAD_STATE_"


def _models_list(args: argparse.Namespace, gateway: Gateway) -> int:
    def fetch(token: str) -> tuple[Sequence[model_pb2.Model], str]:
        request = model_service_pb2.ListModelsRequest(
            page_size=args.page_size or 0,
            page_token=token,
            provider=args.provider or "",
            modality=args.modality,
            state=args.state,
            query=args.query or "",
        )
        response = gateway.call(gateway.models.ListModels, request)
        return response.models, response.next_page_token

    models = _collect(fetch, args)
    if args.json:
        _print_json([_as_json(m) for m in models])
        return EXIT_OK
    if not models:
        print("No models match.")
        return EXIT_OK
    rows = [("ID", "STATE", "FORMAT", "SIZE", "SOURCE", "PINNED", "LAST USED")]
    for m in models:
        rows.append(
            (
                m.id,
                _enum_label(model_pb2.ModelState, m.state, _MODEL_STATE),
                _enum_label(model_pb2.ModelFormat, m.format, _FORMAT),
                _human_bytes(m.size_bytes) if m.size_bytes else "-",
                _enum_label(model_pb2.ModelSource, m.source, _SOURCE),
                "yes" if m.pinned else "-",
                _time(m.last_use_time, present=m.HasField("last_use_time")),
            )
        )
    _print_table(rows, right=(3,))
    print("Times are UTC.")
    return EXIT_OK


def _range(spec: model_pb2.ParameterSpec) -> str:
    low = spec.minimum if spec.HasField("minimum") else None
    high = spec.maximum if spec.HasField("maximum") else None
    if low is not None and high is not None:
        return f"{'(' if spec.exclusive_minimum else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if spec.exclusive_minimum else '>='} {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return "-"


def _models_show(args: argparse.Namespace, gateway: Gateway) -> int:
    model = gateway.call(gateway.models.GetModel, model_service_pb2.GetModelRequest(id=args.id))
    parameters = gateway.call(
        gateway.models.GetModelParameters, model_service_pb2.GetModelParametersRequest(id=model.id)
    )
    if args.json:
        _print_json({"model": _as_json(model), "parameters": _as_json(parameters)["parameters"]})
        return EXIT_OK
    state = _enum_label(model_pb2.ModelState, model.state, _MODEL_STATE)
    caps = model.capabilities
    capabilities = [
        name
        for name, present in (
            ("streaming", caps.streaming),
            ("tools", caps.tools),
            ("image input", caps.image_input),
            ("json object", caps.json_object),
            ("json schema", caps.json_schema),
        )
        if present
    ]
    fields: list[tuple[str, str]] = [
        ("id", model.id),
        ("provider", model.provider),
        ("name", model.name),
        ("description", model.description),
        ("aliases", ", ".join(model.aliases)),
        ("modality", _enum_label(model_pb2.Modality, model.modality, _MODALITY)),
        ("state", f"{state} ({model.state_reason})" if model.state_reason else state),
        ("context length", str(model.context_length) if model.context_length else ""),
        ("max output tokens", str(caps.max_output_tokens) if caps.max_output_tokens else ""),
        ("capabilities", ", ".join(capabilities)),
        (
            "circuit",
            _enum_label(model_pb2.CircuitState, model.circuit_state, "CIRCUIT_STATE_")
            if model.circuit_state
            else "",
        ),
    ]
    if model.provider == "local" or model.local_path:
        revision = model.source_revision
        if model.resolved_revision and model.resolved_revision != revision:
            revision = (
                f"{revision} ({model.resolved_revision})" if revision else model.resolved_revision
            )
        fields += [
            ("format", _enum_label(model_pb2.ModelFormat, model.format, _FORMAT)),
            ("source", _enum_label(model_pb2.ModelSource, model.source, _SOURCE)),
            ("repository", model.source_repo),
            ("revision", revision),
            ("path", model.local_path),
            ("size", f"{_human_bytes(model.size_bytes)} ({model.size_bytes} bytes)"),
            ("pinned", "yes" if model.pinned else "no"),
            ("loaded", "yes" if model.loaded else "no"),
            ("created", _time(model.create_time, present=model.HasField("create_time"))),
            ("last used", _time(model.last_use_time, present=model.HasField("last_use_time"))),
        ]
    shown = [(label, value) for label, value in fields if value]
    width = max(len(label) for label, _ in shown) + 1
    for label, value in shown:
        print(f"{label + ':':<{width}} {value}")
    if parameters.parameters:
        print("\nParameters:")
        rows = [("NAME", "TYPE", "SUPPORTED", "DEFAULT", "RANGE")]
        for spec in parameters.parameters:
            default = (
                json.dumps(json_format.MessageToDict(spec.default_value))
                if spec.HasField("default_value")
                else "-"
            )
            rows.append(
                (
                    spec.name,
                    _enum_label(model_pb2.ParameterType, spec.type, "PARAMETER_TYPE_"),
                    "yes" if spec.supported else "no",
                    default,
                    _range(spec),
                )
            )
        _print_table(rows)
    print("Times are UTC.")
    return EXIT_OK


def _models_rm(args: argparse.Namespace, gateway: Gateway) -> int:
    response = gateway.call(
        gateway.models.DeleteModel, model_service_pb2.DeleteModelRequest(id=args.id)
    )
    if args.json:
        _print_json(_as_json(response))
    else:
        freed = response.freed_bytes
        print(f"Deleted {args.id}; freed {_human_bytes(freed)} ({freed} bytes).")
    return EXIT_OK


def _models_pin(args: argparse.Namespace, gateway: Gateway) -> int:
    if args.pin:
        model = gateway.call(gateway.models.PinModel, model_service_pb2.PinModelRequest(id=args.id))
    else:
        model = gateway.call(
            gateway.models.UnpinModel, model_service_pb2.UnpinModelRequest(id=args.id)
        )
    if args.json:
        _print_json(_as_json(model))
    elif model.pinned:
        print(f"Pinned {model.id}: automatic eviction leaves it alone.")
    else:
        print(f"Unpinned {model.id}: automatic eviction may remove it when space is needed.")
    return EXIT_OK


def _models_rescan(args: argparse.Namespace, gateway: Gateway) -> int:
    response = gateway.call(gateway.models.RescanModels, model_service_pb2.RescanModelsRequest())
    if args.json:
        _print_json(_as_json(response))
        return EXIT_OK
    if not response.added and not response.removed:
        print("No changes.")
    for label, ids in (("Added", response.added), ("Removed", response.removed)):
        if ids:
            print(f"{label}: {', '.join(ids)}")
    return EXIT_OK


# -- downloads -------------------------------------------------------------------------------


def _download_state(download: model_pb2.Download) -> str:
    return _enum_label(model_pb2.DownloadState, download.state, _DOWNLOAD_STATE)


def _download_progress(download: model_pb2.Download) -> str:
    done = _human_bytes(download.downloaded_bytes)
    total = _human_bytes(download.total_bytes) if download.total_bytes else "?"
    files = f"{download.downloaded_files}/{download.total_files or '?'} files"
    text = f"{done} / {total}, {files}"
    if download.state == model_pb2.DOWNLOAD_STATE_RUNNING and download.bytes_per_second > 0:
        text += f", {_human_bytes(int(download.bytes_per_second))}/s"
        if download.HasField("eta"):
            text += f", ETA {_seconds(download.eta)}"
    return text


class _PlainProgress:
    """Lines for logs and pipes: on every state change, and at most once a second otherwise."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._last_state = -1
        self._last_line_at = 0.0

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, download: model_pb2.Download) -> None:
        now = time.monotonic()
        if download.state == self._last_state and now - self._last_line_at < 1.0:
            return
        self._last_state, self._last_line_at = download.state, now
        print(
            f"{download.model}: {_download_state(download)}, {_download_progress(download)}",
            file=self._out,
            flush=True,
        )


class _TerminalProgress:
    """A rich progress bar: bytes done/total, files done/total, the server's rate and ETA."""

    def __init__(self, out: IO[str]) -> None:
        # Imported here: only a pull on a terminal draws a bar.
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TextColumn("{task.fields[files]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[state]}"),
            console=Console(file=out),
        )
        self._task: Any = None

    def __enter__(self) -> _TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, download: model_pb2.Download) -> None:
        running = download.state == model_pb2.DOWNLOAD_STATE_RUNNING
        fields: dict[str, Any] = {
            "files": f"{download.downloaded_files}/{download.total_files or '?'} files",
            "rate": (
                f"{_human_bytes(int(download.bytes_per_second))}/s"
                if running and download.bytes_per_second > 0
                else ""
            ),
            "eta": f"ETA {_seconds(download.eta)}" if running and download.HasField("eta") else "",
            "state": _download_state(download),
        }
        # None: an indeterminate bar until the total is known. (To `update`, None means "no
        # change", so the total is set there only once there is one.)
        total = download.total_bytes or None
        if self._task is None:
            self._task = self._progress.add_task(
                download.model or download.repo_id, total=total, **fields
            )
        self._progress.update(
            self._task, completed=download.downloaded_bytes, total=total, **fields
        )


def _watch(
    gateway: Gateway, download: model_pb2.Download, args: argparse.Namespace
) -> model_pb2.Download:
    """Follows a download to its end, drawing progress; returns its last state."""
    progress: _PlainProgress | _TerminalProgress | None = None
    if not args.json:
        progress = (
            _TerminalProgress(sys.stdout) if sys.stdout.isatty() else _PlainProgress(sys.stdout)
        )
    call = gateway.stream(
        gateway.models.WatchDownload, model_service_pb2.WatchDownloadRequest(id=download.id)
    )
    last = download
    try:
        with progress or contextlib.nullcontext():
            if progress is not None:
                progress.update(download)
            for update in call:
                last = update
                if progress is not None:
                    progress.update(update)
    finally:
        call.cancel()
    if last.state not in _TERMINAL_DOWNLOAD_STATES:
        # The stream ended without the end it promises: ask once what became of the job.
        last = gateway.call(
            gateway.models.GetDownload, model_service_pb2.GetDownloadRequest(id=download.id)
        )
    return last


def _cancel_interrupted(gateway: Gateway, download_id: str, args: argparse.Namespace) -> int:
    try:
        cancelled = gateway.call(
            gateway.models.CancelDownload, model_service_pb2.CancelDownloadRequest(id=download_id)
        )
    except grpc.RpcError as error:
        failure = _rpc_failure(error, gateway)
        return _fail(
            f"interrupted; cancelling download {download_id} failed: {failure}", EXIT_INTERRUPTED
        )
    except KeyboardInterrupt:
        return _fail(
            f"interrupted again; download {download_id} may still be running", EXIT_INTERRUPTED
        )
    if args.json:
        _print_json(_as_json(cancelled))
    print(
        f"Cancelled download {download_id} ({_download_state(cancelled)}).",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _models_pull(args: argparse.Namespace, gateway: Gateway) -> int:
    request = model_service_pb2.DownloadModelRequest(
        repo_id=args.repo_id,
        revision=args.revision or "",
        name=args.name or "",
        allow_patterns=args.include or [],
        ignore_patterns=args.exclude or [],
        pinned=args.pin,
    )
    download = gateway.call(gateway.models.DownloadModel, request)
    if args.detach:
        if args.json:
            _print_json(_as_json(download))
        else:
            # The id alone on stdout, so that `ID=$(pluggably models pull --detach ...)` works.
            print(download.id)
            print(
                f"Download {download.id} of {download.repo_id} as {download.model} started; "
                f"follow it with `pluggably models downloads`.",
                file=sys.stderr,
            )
        return EXIT_OK
    if not args.json:
        print(
            f"Download {download.id}: {download.repo_id} as {download.model}",
            file=sys.stderr,
            flush=True,
        )
    try:
        final = _watch(gateway, download, args)
    except KeyboardInterrupt:
        return _cancel_interrupted(gateway, download.id, args)
    except grpc.RpcError:
        print(
            f"pluggably: lost track of download {download.id}; it may still be running "
            "(`pluggably models downloads`)",
            file=sys.stderr,
        )
        raise
    if args.json:
        _print_json(_as_json(final))
    if final.state == model_pb2.DOWNLOAD_STATE_SUCCEEDED:
        if not args.json:
            print(
                f"Downloaded {final.repo_id} as {final.model}: "
                f"{_human_bytes(final.downloaded_bytes)} in {final.downloaded_files} files "
                f"({_download_state(final)})."
            )
        return EXIT_OK
    if final.state == model_pb2.DOWNLOAD_STATE_FAILED:
        reason = ""
        for detail in final.error.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                reason = info.reason
        message = final.error.message or "the download failed"
        raise RemoteError(
            f"download {final.id} failed: {message}" + (f" ({reason})" if reason else ""),
            EXIT_NOT_FOUND,
        )
    raise RemoteError(f"download {final.id} ended {_download_state(final)}", EXIT_NOT_FOUND)


def _models_downloads(args: argparse.Namespace, gateway: Gateway) -> int:
    def fetch(token: str) -> tuple[Sequence[model_pb2.Download], str]:
        request = model_service_pb2.ListDownloadsRequest(
            page_size=args.page_size or 0, page_token=token, state=args.state
        )
        response = gateway.call(gateway.models.ListDownloads, request)
        return response.downloads, response.next_page_token

    downloads = _collect(fetch, args)
    if args.json:
        _print_json([_as_json(d) for d in downloads])
        return EXIT_OK
    if not downloads:
        print("No downloads.")
        return EXIT_OK
    rows = [("ID", "MODEL", "STATE", "PROGRESS", "CREATED")]
    for d in downloads:
        rows.append(
            (
                d.id,
                d.model,
                _download_state(d),
                _download_progress(d),
                _time(d.create_time, present=d.HasField("create_time")),
            )
        )
    _print_table(rows)
    print("Times are UTC.")
    return EXIT_OK


def _models_cancel(args: argparse.Namespace, gateway: Gateway) -> int:
    download = gateway.call(
        gateway.models.CancelDownload, model_service_pb2.CancelDownloadRequest(id=args.id)
    )
    if args.json:
        _print_json(_as_json(download))
    else:
        print(f"Download {download.id} of {download.model}: {_download_state(download)}.")
    return EXIT_OK


# -- storage ---------------------------------------------------------------------------------

_CATEGORY = "STORAGE_CATEGORY_"


def _storage_usage(args: argparse.Namespace, gateway: Gateway) -> int:
    usage = gateway.call(
        gateway.storage.GetStorageUsage, storage_service_pb2.GetStorageUsageRequest()
    )
    if args.json:
        _print_json(_as_json(usage))
        return EXIT_OK
    rows = [("CATEGORY", "USED", "LIMIT", "ITEMS")]
    for c in usage.categories:
        rows.append(
            (
                _enum_label(storage_service_pb2.StorageCategory, c.category, _CATEGORY),
                _human_bytes(c.used_bytes),
                _limit(c.limit_bytes),
                str(c.item_count),
            )
        )
    rows.append(("total", _human_bytes(usage.used_bytes), _limit(usage.limit_bytes), ""))
    _print_table(rows, right=(1, 2, 3))
    print(f"\nDisk free: {_human_bytes(usage.disk_free_bytes)}")
    if not usage.recent_evictions:
        print("No recent evictions.")
        return EXIT_OK
    print("\nRecent evictions (times are UTC):")
    evictions = [("TIME", "ID", "CATEGORY", "FREED", "REASON")]
    for e in usage.recent_evictions:
        evictions.append(
            (
                _time(e.time, present=e.HasField("time")),
                e.id,
                _enum_label(storage_service_pb2.StorageCategory, e.category, _CATEGORY),
                _human_bytes(e.freed_bytes),
                e.reason,
            )
        )
    _print_table(evictions, right=(3,))
    return EXIT_OK


def _storage_prune(args: argparse.Namespace, gateway: Gateway) -> int:
    request = storage_service_pb2.PruneStorageRequest(
        categories=args.category or [],
        target_free_bytes=args.target_free or 0,
        dry_run=args.dry_run,
    )
    if args.older_than is not None:
        request.older_than.CopyFrom(args.older_than)
    response = gateway.call(gateway.storage.PruneStorage, request)
    if args.json:
        _print_json(_as_json(response))
        return EXIT_OK
    if not response.removed:
        print("Nothing to prune.")
        return EXIT_OK
    freed = f"{_human_bytes(response.freed_bytes)} ({response.freed_bytes} bytes)"
    count = len(response.removed)
    items = f"{count} item{'s' if count != 1 else ''}"
    if args.dry_run:
        print(f"Would free {freed} by removing {items} (dry run: nothing removed):")
    else:
        print(f"Freed {freed} by removing {items}:")
    for item in response.removed:
        print(f"  {item}")
    return EXIT_OK


# -- artifacts -------------------------------------------------------------------------------


def _artifacts_list(args: argparse.Namespace, gateway: Gateway) -> int:
    def fetch(token: str) -> tuple[Sequence[artifact_pb2.Artifact], str]:
        request = storage_service_pb2.ListArtifactsRequest(
            page_size=args.page_size or 0,
            page_token=token,
            model=args.model or "",
            kind=args.kind or "",
        )
        response = gateway.call(gateway.storage.ListArtifacts, request)
        return response.artifacts, response.next_page_token

    artifacts = _collect(fetch, args)
    if args.json:
        _print_json([_as_json(a) for a in artifacts])
        return EXIT_OK
    if not artifacts:
        print("No artifacts.")
        return EXIT_OK
    rows = [("ID", "KIND", "TYPE", "SIZE", "MODEL", "CREATED", "EXPIRES")]
    for a in artifacts:
        rows.append(
            (
                a.id,
                a.kind,
                a.mime_type,
                _human_bytes(a.size_bytes),
                a.model,
                _time(a.create_time, present=a.HasField("create_time")),
                _time(a.expire_time, present=a.HasField("expire_time")),
            )
        )
    _print_table(rows, right=(3,))
    print("Times are UTC.")
    return EXIT_OK


def _extension(mime_type: str) -> str:
    base = mime_type.split(";", 1)[0].strip().lower()
    return _EXTENSIONS.get(base) or mimetypes.guess_extension(base) or ".bin"


def _chunks(gateway: Gateway, artifact_id: str) -> Iterator[bytes]:
    call = gateway.stream(
        gateway.storage.ReadArtifact, storage_service_pb2.ReadArtifactRequest(id=artifact_id)
    )
    try:
        for body in call:
            yield body.data
    finally:
        call.cancel()


def _artifacts_get(args: argparse.Namespace, gateway: Gateway) -> int:
    artifact = gateway.call(
        gateway.storage.GetArtifact, storage_service_pb2.GetArtifactRequest(id=args.id)
    )
    digest = hashlib.sha256()
    size = 0
    if args.output == "-":
        out = sys.stdout.buffer
        for data in _chunks(gateway, artifact.id):
            digest.update(data)
            size += len(data)
            out.write(data)
        out.flush()
        _check_content(artifact, digest.hexdigest(), size)
        return EXIT_OK

    path = Path(args.output or f"{artifact.id}{_extension(artifact.mime_type)}")
    if path.exists() and not args.force:
        raise RemoteError(f"{path} exists; use --force to replace it, or -o another file")
    # Written beside the target and renamed into place: the target is never half written.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "xb") as out_file:
            for data in _chunks(gateway, artifact.id):
                digest.update(data)
                size += len(data)
                out_file.write(data)
        _check_content(artifact, digest.hexdigest(), size)
        if args.force:
            os.replace(tmp, path)
        else:
            # A link fails if the name was taken meanwhile, where a rename would replace it.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise RemoteError(
                    f"{path} exists; use --force to replace it, or -o another file"
                ) from None
            tmp.unlink()
    except OSError as exc:
        raise RemoteError(f"cannot write {exc.filename or path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"Wrote {path} ({_human_bytes(size)}, {artifact.mime_type}).")
    return EXIT_OK


def _check_content(artifact: artifact_pb2.Artifact, sha256: str, size: int) -> None:
    # Artifacts are content-addressed: the id is the SHA-256 of the bytes, so a damaged or cut
    # transfer is caught here rather than left on disk looking complete.
    if size != artifact.size_bytes or sha256 != artifact.id:
        raise RemoteError(
            f"artifact {artifact.id}: received {size} bytes with SHA-256 {sha256}, "
            f"expected {artifact.size_bytes} bytes; nothing was kept",
            EXIT_NOT_FOUND,
        )


def _artifacts_rm(args: argparse.Namespace, gateway: Gateway) -> int:
    response = gateway.call(
        gateway.storage.DeleteArtifact, storage_service_pb2.DeleteArtifactRequest(id=args.id)
    )
    if args.json:
        _print_json(_as_json(response))
    else:
        print(f"Deleted artifact {args.id}; freed {_human_bytes(response.freed_bytes)}.")
    return EXIT_OK


# -- the argparse tree -----------------------------------------------------------------------

if TYPE_CHECKING:
    Groups = argparse._SubParsersAction[argparse.ArgumentParser]


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gateway connection")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"the gateway's gRPC address (default: $PLUGGABLY_SERVER, else {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--key",
        metavar="KEY",
        help="API key (visible to other users in the process list: prefer --key-file or "
        "$PLUGGABLY_API_KEY)",
    )
    group.add_argument(
        "--key-file",
        metavar="PATH",
        help=f"file holding the API key (default: $PLUGGABLY_API_KEY, else {DEV_KEY_FILE} "
        "when it exists)",
    )
    group.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    group.add_argument("--ca-file", metavar="PATH", help="TLS, trusting this CA (PEM)")
    group.add_argument(
        "--client-cert", metavar="PATH", help="client certificate for mutual TLS (PEM)"
    )
    group.add_argument("--client-key", metavar="PATH", help="its private key (PEM)")
    group.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each call that is not a stream (default: {DEFAULT_TIMEOUT_S:g})",
    )


def _command(
    commands: Groups,
    name: str,
    run: Remote,
    help_text: str,
    *,
    json_output: bool = True,
    description: str | None = None,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=description or help_text)
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON")
    _connection_options(parser)
    parser.set_defaults(func=_remote(run))
    return parser


def _paging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all-pages", action="store_true", help="fetch every page")
    parser.add_argument("--page-size", type=_page_size, metavar="N", help="items per page")
    parser.add_argument("--page-token", metavar="TOKEN", help="continue from this page")


def add_models(groups: Groups) -> None:
    """`pluggably models ...`: the catalog, local model files and downloads."""
    models = groups.add_parser("models", help="list, inspect, download and delete models")
    commands = models.add_subparsers(dest="command", metavar="COMMAND", required=True)

    listing = _command(commands, "list", _models_list, "list models, local and remote")
    listing.add_argument("--provider", metavar="P", help="only this provider (e.g. local)")
    listing.add_argument(
        "--modality",
        type=_enum_parser(model_pb2.Modality, _MODALITY),
        metavar=_choices(model_pb2.Modality, _MODALITY),
        help="only models that produce this",
    )
    listing.add_argument(
        "--state",
        type=_enum_parser(model_pb2.ModelState, _MODEL_STATE),
        metavar="STATE",
        help=f"only models in this state: {_choices(model_pb2.ModelState, _MODEL_STATE)}",
    )
    listing.add_argument(
        "--query", metavar="TEXT", help="text in the id, description or source repository"
    )
    _paging_options(listing)

    show = _command(commands, "show", _models_show, "a model's details and parameters")
    show.add_argument("id", metavar="ID", help="model id or alias")

    rm = _command(commands, "rm", _models_rm, "delete a local model's files")
    rm.add_argument("id", metavar="ID", help="local/<name>")

    for name, pin, text in (
        ("pin", True, "keep a local model out of automatic eviction"),
        ("unpin", False, "let automatic eviction remove a local model again"),
    ):
        command = _command(commands, name, _models_pin, text)
        command.add_argument("id", metavar="ID", help="local/<name>")
        command.set_defaults(pin=pin)

    _command(commands, "rescan", _models_rescan, "scan model folders and the HF cache again")

    pull = _command(
        commands,
        "pull",
        _models_pull,
        "download a model from the Hugging Face Hub",
        description="Downloads a model into the gateway's storage and follows its progress. "
        "Ctrl-C cancels the download (exit 130); --detach leaves it running.",
    )
    pull.add_argument("repo_id", metavar="REPO_ID", help="e.g. HuggingFaceTB/SmolLM2-135M")
    pull.add_argument("--revision", metavar="R", help="branch, tag or commit (default: main)")
    pull.add_argument("--name", metavar="NAME", help="register as local/NAME (default: REPO_ID)")
    pull.add_argument(
        "--include", action="append", metavar="GLOB", help="fetch only matching files (repeatable)"
    )
    pull.add_argument(
        "--exclude", action="append", metavar="GLOB", help="leave matching files out (repeatable)"
    )
    pull.add_argument("--pin", action="store_true", help="keep it out of automatic eviction")
    pull.add_argument(
        "--detach", action="store_true", help="print the download id and return at once"
    )

    downloads = _command(commands, "downloads", _models_downloads, "list downloads, newest first")
    downloads.add_argument(
        "--state",
        type=_enum_parser(model_pb2.DownloadState, _DOWNLOAD_STATE),
        metavar="STATE",
        help=f"only downloads in this state: {_choices(model_pb2.DownloadState, _DOWNLOAD_STATE)}",
    )
    _paging_options(downloads)

    cancel = _command(commands, "cancel", _models_cancel, "cancel a queued or running download")
    cancel.add_argument("id", metavar="DOWNLOAD_ID")


def add_storage(groups: Groups) -> None:
    """`pluggably storage ...`: disk use against the limits, and pruning."""
    storage = groups.add_parser("storage", help="disk use and pruning")
    commands = storage.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _command(commands, "usage", _storage_usage, "disk use per category against the limits")

    prune = _command(
        commands,
        "prune",
        _storage_prune,
        "free disk space now",
        description="Removes expired artifacts and unpinned idle models, least recently used "
        "first, until the categories are under their limits (or --target-free more is free).",
    )
    prune.add_argument(
        "--category",
        action="append",
        type=_enum_parser(storage_service_pb2.StorageCategory, _CATEGORY),
        metavar=_choices(storage_service_pb2.StorageCategory, _CATEGORY),
        help="only this category (repeatable; default: every category)",
    )
    prune.add_argument(
        "--target-free", type=_size, metavar="SIZE", help="free this much more (e.g. 20GiB)"
    )
    prune.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="only items unused for longer (e.g. 7d, 12h, 30m)",
    )
    prune.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")


def add_artifacts(groups: Groups) -> None:
    """`pluggably artifacts ...`: generated files in the artifact store."""
    artifacts = groups.add_parser("artifacts", help="list, fetch and delete generated files")
    commands = artifacts.add_subparsers(dest="command", metavar="COMMAND", required=True)

    listing = _command(commands, "list", _artifacts_list, "list artifacts, newest first")
    listing.add_argument("--model", metavar="M", help="only those this model produced")
    listing.add_argument("--kind", choices=("image", "mesh", "other"), help="only this kind")
    _paging_options(listing)

    get = _command(
        commands, "get", _artifacts_get, "download an artifact's file", json_output=False
    )
    get.add_argument("id", metavar="ID")
    get.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="where to write it; - for stdout (default: ./<id>.<extension of its media type>)",
    )
    get.add_argument("--force", action="store_true", help="replace FILE if it exists")

    rm = _command(commands, "rm", _artifacts_rm, "delete an artifact")
    rm.add_argument("id", metavar="ID")


__all__ = [
    "EXIT_AUTH",
    "EXIT_INTERRUPTED",
    "EXIT_UNREACHABLE",
    "Gateway",
    "RemoteError",
    "add_artifacts",
    "add_models",
    "add_storage",
]
