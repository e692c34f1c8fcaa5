"""Property-based fuzzing of every RPC, bounded in time and reproducible (derandomized).

1. Native gRPC: for each method of the `pluggably.v1` services (read from the service
   descriptors, so a new RPC is fuzzed without touching this file), hypothesis builds request
   messages from the message descriptors (NaN and infinite floats, extreme integers, control
   characters, nested Struct/Value, unknown enum numbers, oneofs) and raw or truncated bytes.
   Property: no INTERNAL or UNKNOWN status, and every error carries a `google.rpc.ErrorInfo`.
2. REST through the real Envoy: schemathesis generates requests (valid and invalid) from the
   `/openapi.json` that Envoy serves, and the generation endpoints also get the descriptor-derived
   requests as JSON. Property: no 5xx (501 only for RPCs not built yet, with the status body),
   every error response has a `google.rpc.Status` JSON body, and every SSE stream ends with a
   terminal event.

Afterwards the server still answers a normal Generate quickly and reports SERVING.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
import requests
import schemathesis
from google.protobuf import descriptor, json_format, message_factory, struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from fakes import FakeBackend
from pluggably.core.params import ProviderOptionsPolicy
from pluggably.core.types import Capabilities, Modality
from pluggably.devtools.envoy import REPO_ROOT, Envoy
from pluggably.server import GatewayServer
from pluggably.v1 import (
    generate_service_pb2,
    generate_service_pb2_grpc,
    generation_pb2,
    model_service_pb2,
    storage_service_pb2,
    stream_service_pb2,
)

FD = descriptor.FieldDescriptor
SERVICE_MODULES = (generate_service_pb2, stream_service_pb2, model_service_pb2, storage_service_pb2)
CALL_TIMEOUT_S = 10.0
MAX_STREAM_MESSAGES = 50
# Examples per RPC: the generation RPCs take the richest requests and get the most.
RICH_EXAMPLES = 600
PLAIN_EXAMPLES = 40
RAW_EXAMPLES = 25
REST_EXAMPLES = 20
REST_GENERATION_EXAMPLES = 150


@dataclass(frozen=True)
class Rpc:
    path: str  # /pluggably.v1.Service/Method
    request: descriptor.Descriptor
    streaming: bool

    def __str__(self) -> str:
        return self.path.rsplit(".", 1)[-1]


def _rpcs() -> list[Rpc]:
    rpcs = []
    for module in SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert not method.client_streaming, "client streams need a fuzz driver of their own"
                rpcs.append(
                    Rpc(
                        f"/{service.full_name}/{method.name}",
                        method.input_type,
                        method.server_streaming,
                    )
                )
    return rpcs


RPCS = _rpcs()

# ---- strategies derived from message descriptors --------------------------------------------

# Values that steer generated requests past the first checks: known models and aliases, roles,
# image types, tool and call names, JSON arguments.
KNOWN_STRINGS = (
    "fake/echo",
    "fake/other",
    "art/paint",
    "echo-alias",
    "fake",
    "user",
    "assistant",
    "system",
    "tool",
    "image/png",
    "https://example.com/cat.png",
    "data:image/png;base64,iVBORw0KGgo=",
    "data:image/png;base64,!!",
    "{}",
    '{"city": "Paris"}',
    "[1, 2",
    "f",
    "call_1",
    "ignore_eos",
)
_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
MAX_DEPTH = 5


def _strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(KNOWN_STRINGS),
        st.text(max_size=20),
        # Control and format characters, and lone combining marks.
        st.text(st.characters(categories=["Cc", "Cf", "Mn", "Zl", "Zp"]), max_size=6),
        # Long enough to overflow any error status that quoted it.
        # Surrogates excluded: protobuf cannot encode them, so no client can send them.
        st.builds(
            lambda char, n: char * n,
            st.characters(exclude_categories=["Cs"]),
            st.sampled_from([257, 20_000]),
        ),
    )


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(2**53), 2**53),
        _strings(),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(_strings(), inner, max_size=3)
        ),
        max_leaves=8,
    )


def _to_value(data: Any, out: struct_pb2.Value) -> struct_pb2.Value:
    # By hand: Value has no update(), and NaN and infinities must stay where they were drawn.
    if data is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        out.bool_value = data
    elif isinstance(data, int | float):
        out.number_value = float(data)
    elif isinstance(data, str):
        out.string_value = data
    elif isinstance(data, list):
        out.list_value.SetInParent()
        for item in data:
            _to_value(item, out.list_value.values.add())
    else:
        out.struct_value.SetInParent()
        for key, item in data.items():
            _to_value(item, out.struct_value.fields[key])
    return out


def _well_known(full_name: str) -> st.SearchStrategy[Message] | None:
    if full_name == "google.protobuf.Value":
        return _json_values().map(lambda d: _to_value(d, struct_pb2.Value()))
    if full_name == "google.protobuf.Struct":
        return st.dictionaries(_strings(), _json_values(), max_size=4).map(
            lambda d: _to_value(d, struct_pb2.Value()).struct_value
        )
    if full_name == "google.protobuf.ListValue":
        return st.lists(_json_values(), max_size=4).map(
            lambda d: _to_value(d, struct_pb2.Value()).list_value
        )
    return None


def _scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        edges = [n for n in (low, high, 0, 1, -1, 2**31, 2**32) if low <= n <= high]
        return st.one_of(st.integers(low, high), st.sampled_from(edges))
    if kind == FD.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if kind == FD.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        return _strings()
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FD.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        # Open enums: numbers the contract does not define still arrive.
        return st.one_of(st.sampled_from(known), st.integers(-3, 1_000))
    raise AssertionError(f"no strategy for {field.full_name} (type {kind})")


def _value(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    return _scalar(field)


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    return field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _set(message: Message, field: descriptor.FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name) if field.type == FD.TYPE_MESSAGE else None
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.type == FD.TYPE_MESSAGE:
                target[key].CopyFrom(item)  # type: ignore[index]
            else:
                target[key] = item  # type: ignore[index]
    elif field.is_repeated:
        getattr(message, field.name).extend(value)
    elif target is not None:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _field_values(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(field):
        entry = field.message_type
        return st.dictionaries(
            _scalar(entry.fields_by_name["key"]),
            _value(entry.fields_by_name["value"], depth),
            max_size=3,
        )
    if field.is_repeated:
        return st.lists(_value(field, depth), max_size=3)
    return _value(field, depth)


_MESSAGE_STRATEGIES: dict[tuple[str, int], st.SearchStrategy[Message]] = {}


def message_strategy(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of type `desc`: each field set or not, at most one member of each oneof."""
    well_known = _well_known(desc.full_name)
    if well_known is not None:
        return well_known
    cls = message_factory.GetMessageClass(desc)
    if depth > MAX_DEPTH:
        return st.just(cls())
    cache_key = (desc.full_name, depth)
    if cache_key in _MESSAGE_STRATEGIES:
        return _MESSAGE_STRATEGIES[cache_key]
    # proto3 `optional` fields sit in a synthetic oneof of their own: they are plain fields here.
    oneofs = [o for o in desc.oneofs if not (o.name.startswith("_") and len(o.fields) == 1)]
    in_oneof = {f.name for o in oneofs for f in o.fields}
    plain = [f for f in desc.fields if f.name not in in_oneof]
    plain_values = {f.name: st.none() | _field_values(f, depth) for f in plain}
    choices = [
        st.none() | st.one_of([st.tuples(st.just(f), _value(f, depth)) for f in o.fields])
        for o in oneofs
    ]

    def build(values: dict[str, Any], chosen: tuple[Any, ...]) -> Message:
        message = cls()
        for field in plain:
            if values[field.name] is not None:
                _set(message, field, values[field.name])
        for choice in chosen:
            if choice is not None:
                _set(message, *choice)
        return message

    strategy = st.builds(build, st.fixed_dictionaries(plain_values), st.tuples(*choices))
    _MESSAGE_STRATEGIES[cache_key] = strategy
    return strategy


def _steer_generate(
    request: generation_pb2.GenerateRequest, model: str, use_prompt: bool, keep: frozenset[str]
) -> generation_pb2.GenerateRequest:
    """A generated request moved closer to valid: a served model, one kind of input, and only
    some of the other fields, so that part of the examples reach the backend."""
    steered = generation_pb2.GenerateRequest()
    steered.CopyFrom(request)
    steered.model = model
    if use_prompt:
        steered.ClearField("messages")
        steered.prompt = steered.prompt or "hi"
    else:
        steered.ClearField("prompt")
        if not steered.messages:
            steered.messages.add(role="user", content="hi")
    for name in ("fallback_models", "tools", "tool_choice", "provider_options", "options"):
        if name not in keep:
            if name == "options":
                steered.ClearField(steered.WhichOneof("options") or "text")
            else:
                steered.ClearField(name)
    return steered


def request_strategy(desc: descriptor.Descriptor) -> st.SearchStrategy[Message]:
    """Requests of type `desc`; for generation, half of them steered towards valid."""
    anything = message_strategy(desc)
    if desc.full_name != generation_pb2.GenerateRequest.DESCRIPTOR.full_name:
        return anything
    steered = st.builds(
        _steer_generate,
        anything,
        st.sampled_from(["fake/echo", "fake/other", "echo-alias", "art/paint"]),
        st.booleans(),
        st.frozensets(
            st.sampled_from(
                ["fallback_models", "tools", "tool_choice", "provider_options", "options"]
            )
        ),
    )
    return st.one_of(anything, steered)


def _raw_bodies(rpc: Rpc) -> st.SearchStrategy[bytes]:
    """Random bytes, and valid encodings cut short or with a byte flipped."""
    encoded = message_strategy(rpc.request).map(lambda m: m.SerializeToString())

    def damage(data: bytes, cut: int, flip: int) -> bytes:
        if not data:
            return b"\xff"
        data = data[: max(1, cut % (len(data) + 1))]
        position = flip % len(data)
        return data[:position] + bytes([data[position] ^ 0xA5]) + data[position + 1 :]

    return st.one_of(
        st.binary(min_size=1, max_size=128),
        st.builds(damage, encoded, st.integers(0, 10_000), st.integers(0, 10_000)),
        st.just(b"\x0a\xff\xff\xff\xff\x0f"),  # a length far beyond the message
        st.just(b"\x2a" * 64),  # nested groups of the same field, no end
    )


# ---- the native server --------------------------------------------------------------------


@dataclass
class Served:
    server: GatewayServer
    text: FakeBackend
    channel: grpc.aio.Channel


@pytest.fixture(scope="module")
async def served(config_for):
    text = FakeBackend(
        "fake",
        {"echo": Modality.TEXT, "other": Modality.TEXT},
        capabilities=Capabilities(
            tools=True, vision=True, json_object=True, json_schema=True, max_output_tokens=64
        ),
        options=ProviderOptionsPolicy(allowed=None, reserved=frozenset({"model"})),
    )
    art = FakeBackend("art", {"paint": Modality.IMAGE})
    config = config_for(
        [],
        auth={"enabled": False},
        aliases={"echo-alias": "fake/echo"},
        routing={"fallbacks": {"fake/other": ["fake/echo"]}},
    )
    server = GatewayServer(config, backends=[text, art])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Served(server, text, channel)
    await server.stop(grace=0)


def _check_error(rpc: Rpc, error: grpc.aio.AioRpcError, sent: object) -> None:
    code = error.code()
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
        f"{rpc}: {code.name} {error.details()!r} for {sent!r:.2000}"
    )
    status = rpc_status.from_call(error)
    assert status is not None, (
        f"{rpc}: {code.name} {error.details()!r:.300} without a google.rpc.Status "
        f"for {sent!r:.2000}"
    )
    assert any(d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in status.details), (
        f"{rpc}: {code.name} without ErrorInfo for {sent!r:.2000}"
    )


async def _call(channel: grpc.aio.Channel, rpc: Rpc, body: bytes, sent: object) -> bool:
    """Sends `body` as the request of `rpc`; checks the outcome; True when it succeeded."""
    try:
        if rpc.streaming:
            call = channel.unary_stream(rpc.path)(body, timeout=CALL_TIMEOUT_S)
            received = 0
            async for _ in call:
                received += 1
                if received >= MAX_STREAM_MESSAGES:
                    call.cancel()
                    return True
        else:
            await channel.unary_unary(rpc.path)(body, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        _check_error(rpc, error, sent)
        return False
    return True


_FUZZ_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "print_blob": False,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


async def _run_examples(test: Callable[[], None]) -> None:
    """Runs a hypothesis test in a worker thread: its examples block on calls that the event
    loop, left free here, serves."""
    await asyncio.to_thread(test)


def _on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, bool]) -> bool:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(CALL_TIMEOUT_S * 2)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_every_rpc_survives_generated_requests(served, rpc: Rpc) -> None:
    rich = rpc.request.full_name == generation_pb2.GenerateRequest.DESCRIPTOR.full_name
    loop = asyncio.get_running_loop()
    reached_before = len(served.text.requests)

    @settings(max_examples=RICH_EXAMPLES if rich else PLAIN_EXAMPLES, **_FUZZ_SETTINGS)
    @given(request_strategy(rpc.request))
    def fuzz(request: Message) -> None:
        _on_loop(loop, _call(served.channel, rpc, request.SerializeToString(), request))

    await _run_examples(fuzz)
    if rich:
        # A fuzzer whose every request failed validation would prove little about the layers
        # behind it.
        assert len(served.text.requests) - reached_before >= 3


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_every_rpc_survives_undecodable_bytes(served, rpc: Rpc) -> None:
    loop = asyncio.get_running_loop()

    @settings(max_examples=RAW_EXAMPLES, **_FUZZ_SETTINGS)
    @given(_raw_bodies(rpc))
    def fuzz(body: bytes) -> None:
        _on_loop(loop, _call(served.channel, rpc, body, body))

    await _run_examples(fuzz)


async def test_server_is_healthy_and_fast_after_the_fuzzing(served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    stub = generate_service_pb2_grpc.GenerateServiceStub(served.channel)
    request = generation_pb2.GenerateRequest(model="fake/echo", prompt="hi")
    await stub.Generate(request, timeout=5)  # warm
    started = time.perf_counter()
    for _ in range(20):
        response = await stub.Generate(request, timeout=5)
    elapsed = time.perf_counter() - started
    assert response.text == "hello world"
    # ~1 ms each on loopback; 50 ms each would mean leaked work or a stuck loop.
    assert elapsed / 20 < 0.05, f"{elapsed / 20 * 1000:.1f} ms per Generate"


# ---- REST through the real Envoy ----------------------------------------------------------


def _operations() -> list[tuple[str, str]]:
    document = json.loads((REPO_ROOT / "envoy" / "openapi.json").read_text())
    return [
        (path, method.upper())
        for path, operations in document["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    ]


@pytest.fixture(scope="module")
async def rest(served, tmp_path_factory) -> Any:
    envoy = Envoy(served.server.port, tmp_path_factory.mktemp("envoy-fuzz"))
    await asyncio.to_thread(envoy.start)
    try:
        # The document Envoy serves is what the requests are generated from.
        schema = await asyncio.to_thread(schemathesis.openapi.from_url, f"{envoy.url}/openapi.json")
        with requests.Session() as session:
            yield envoy, schema, session
    finally:
        envoy.stop()


# Schemathesis' strategies trip health checks that say nothing about the server. Shrinking a
# failing HTTP case takes thousands of calls through Envoy; the first failing case is printed
# as it is instead, so that a failure costs seconds, not minutes.
_REST_SETTINGS: dict[str, Any] = {
    **_FUZZ_SETTINGS,
    "suppress_health_check": list(HealthCheck),
    "phases": [Phase.explicit, Phase.reuse, Phase.generate],
}


def _is_status(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("code"), int)
        and body["code"] != 0
        and isinstance(body.get("message", ""), str)
    )


def _check_rest(label: str, status: int, kind: str, text: str, sent: str) -> None:
    """No 5xx, a `google.rpc.Status` JSON body on every error, and SSE streams whose events are
    JSON and whose last event says how the stream ended."""
    where = f"{label}: {status} {kind!r} for {sent:.1500}\n{text[:500]!r}"
    body: Any = None
    if status >= 400 or kind.startswith("application/json"):
        try:
            body = json.loads(text)
        except ValueError:
            pytest.fail(f"not JSON: {where}")
    if status >= 500:
        # RPCs of the contract that this build does not serve yet answer 501 with the status.
        assert status == 501 and _is_status(body) and body["code"] == 12, f"server error: {where}"
    if status >= 400:
        assert _is_status(body), f"error without a google.rpc.Status body: {where}"
        return
    if kind.startswith("text/event-stream"):
        events = [
            json.loads(line[len("data:") :])
            for line in text.splitlines()
            if line.startswith("data:")
        ]
        assert events, f"empty event stream: {where}"
        for event in events:
            if "error" in event:
                assert _is_status(event["error"]), where
                assert event["error"]["code"] not in (2, 13), f"UNKNOWN/INTERNAL event: {where}"
        assert {"done", "error"} & set(events[-1]), f"stream without a terminal event: {where}"


def _check_case(label: str, response: schemathesis.Response, sent: str) -> None:
    kind = (response.headers.get("content-type") or [""])[0]  # lower-case names, list values
    _check_rest(label, response.status_code, kind, response.text, sent)


@pytest.mark.parametrize(("path", "method"), _operations(), ids=lambda v: str(v))
async def test_rest_operations_survive_generated_requests(rest, path: str, method: str) -> None:
    envoy, schema, session = rest
    operation = schema[path][method]
    strategy = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    label = f"{method} {path}"

    @settings(max_examples=REST_EXAMPLES, **_REST_SETTINGS)
    @given(strategy)
    def fuzz(case: Any) -> None:
        response = case.call(base_url=envoy.url, session=session, timeout=CALL_TIMEOUT_S)
        _check_case(label, response, repr(case))

    await _run_examples(fuzz)


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate:stream"])
async def test_rest_generation_survives_steered_requests(served, rest, path: str) -> None:
    """Schemathesis' valid bodies mostly carry fields the contract does not have (the document
    does not forbid them), which the transcoder rejects before the server sees them. The
    descriptor-derived requests, as JSON, reach the server and the backend through Envoy."""
    envoy, _schema, session = rest
    reached_before = len(served.text.requests)

    @settings(max_examples=REST_GENERATION_EXAMPLES, **_REST_SETTINGS)
    @given(request_strategy(generation_pb2.GenerateRequest.DESCRIPTOR))
    def fuzz(request: Message) -> None:
        try:
            body = json_format.MessageToJson(request)
        except (ValueError, json_format.Error):  # NaN or Infinity in a Value: not JSON
            reject()
        response = session.post(
            f"{envoy.url}{path}",
            data=body.encode(),
            headers={"content-type": "application/json"},
            timeout=CALL_TIMEOUT_S,
        )
        kind = response.headers.get("content-type", "")
        _check_rest(f"POST {path}", response.status_code, kind, response.text, body)

    await _run_examples(fuzz)
    assert len(served.text.requests) - reached_before >= 3


async def test_gateway_is_healthy_after_the_rest_fuzzing(rest) -> None:
    envoy, _schema, _session = rest
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{envoy.url}/v1/generate", json={"model": "fake/echo", "prompt": "hi"}
        ) as response:
            assert response.status == 200
            assert (await response.json())["text"] == "hello world"
