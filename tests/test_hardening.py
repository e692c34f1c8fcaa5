"""Hostile and odd input: each request that once answered INTERNAL (or an unreadable error) has a
regression test here, first against the converters, then over the real server and stubs."""

from __future__ import annotations

import base64
import math
import re
import struct
import time
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from fakes import FakeBackend
from helpers import rich_error
from pluggably.api import pagination
from pluggably.api.pagination import decode_page_token, encode_page_token
from pluggably.catalog import convert as catalog_convert
from pluggably.core.errors import FieldViolation, InvalidArgument
from pluggably.core.params import TEXT_PARAMETERS, ParameterSpec, ProviderOptionsPolicy
from pluggably.core.types import Capabilities, Modality, ModelInfo
from pluggably.devtools.envoy import REPO_ROOT
from pluggably.generation import convert
from pluggably.server import GatewayServer
from pluggably.v1 import (
    generate_service_pb2_grpc,
    generation_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
)

P = generation_pb2
NON_FINITE = [math.nan, math.inf, -math.inf]
FULL = Capabilities(tools=True, vision=True, json_object=True, json_schema=True)


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(data)
    return out


def _request(**kw: Any) -> generation_pb2.GenerateRequest:
    kw.setdefault("model", "fake/echo")
    if "messages" not in kw:
        kw.setdefault("prompt", "hi")
    return P.GenerateRequest(**kw)


def _violations(pb: generation_pb2.GenerateRequest) -> list[FieldViolation]:
    with pytest.raises(InvalidArgument) as caught:
        convert.generation_request_from_pb(pb, "req-1")
    return caught.value.violations


def _fields(pb: generation_pb2.GenerateRequest) -> list[str]:
    return [v.field for v in _violations(pb)]


# ---- provider_options, tool parameters and JSON schemas: no NaN or Infinity ------------------


@pytest.mark.parametrize("number", NON_FINITE, ids=repr)
def test_non_finite_provider_option_names_its_key(number: float) -> None:
    pb = _request()
    pb.provider_options["logit_scale"].number_value = number
    [violation] = _violations(pb)
    assert violation.field == "provider_options.logit_scale"
    assert "finite" in violation.description


def test_non_finite_numbers_nested_in_lists_and_structs_name_their_path() -> None:
    pb = _request()
    pb.provider_options["outer"].struct_value.update({"list": [1, {"deep": 2}], "ok": "x"})
    pb.provider_options["outer"].struct_value["list"][1]["deep"] = math.nan
    pb.provider_options["plain"].list_value.extend([1.5, 2.5])
    pb.provider_options["plain"].list_value.values[1].number_value = -math.inf
    pb.provider_options["odd key"].number_value = math.inf
    assert sorted(_fields(pb)) == sorted(
        [
            "provider_options.outer.list[1].deep",
            "provider_options.plain[1]",
            "provider_options['odd key']",
        ]
    )


def test_non_finite_numbers_in_tool_parameters_and_json_schema() -> None:
    schema = _struct({"type": "object", "properties": {"n": {"type": "number", "maximum": 1}}})
    schema["properties"]["n"]["maximum"] = math.inf
    tool = P.Tool(function=P.FunctionDeclaration(name="f", parameters=schema))
    text = P.TextOptions(
        response_format=P.ResponseFormat(
            type=P.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=P.JsonSchema(schema=schema)
        )
    )
    assert sorted(_fields(_request(tools=[tool], text=text))) == [
        "text.response_format.json_schema.schema.properties.n.maximum",
        "tools[0].function.parameters.properties.n.maximum",
    ]


def test_finite_json_values_pass_through_unchanged() -> None:
    data = {"a": [1, 2.5, "s", True, None, {"b": {"c": []}}], "empty": {}}
    pb = _request()
    for key, value in data.items():
        pb.provider_options[key].CopyFrom(_struct({"v": value}).fields["v"])
    request, _ = convert.generation_request_from_pb(pb, "req-1")
    assert request.provider_options == data


def test_provider_option_keys_are_bounded() -> None:
    pb = _request()
    pb.provider_options["k" * (convert.MAX_OPTION_KEY_CHARS + 1)].bool_value = True
    pb.provider_options["bad\x00key"].bool_value = True
    pb.provider_options[""].bool_value = True
    violations = _violations(pb)
    assert len(violations) == 3
    # A long key is quoted clipped, and a control character escaped, never raw.
    assert all(len(v.field) < 80 and "\x00" not in v.field for v in violations)
    many = _request()
    for i in range(convert.MAX_PROVIDER_OPTIONS + 1):
        many.provider_options[f"k{i}"].bool_value = True
    assert _fields(many) == ["provider_options"]


# ---- page tokens --------------------------------------------------------------------------


def test_page_token_round_trip_and_filters() -> None:
    token = encode_page_token("openai/gpt-4o-mini", "openai|0")
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    violations: list[FieldViolation] = []
    assert decode_page_token(token, "openai|0", violations, "ListModels") == "openai/gpt-4o-mini"
    assert violations == []
    decode_page_token(token, "anthropic|0", violations, "ListModels")
    assert [v.description for v in violations] == [
        "was issued for other filters; use the same filters"
    ]
    # Long filters do not make long tokens: only a digest of them travels.
    assert len(encode_page_token("local/m", "p" * 10_000 + "|0")) < 40


@pytest.mark.parametrize(
    "token",
    [
        # What the first decoder choked on: deeply nested JSON (RecursionError -> INTERNAL).
        base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode(),
        base64.urlsafe_b64encode(b'{"after": ' * 5_000).decode(),
        # A token of the old JSON format, well-formed.
        base64.urlsafe_b64encode(b'{"after": "a/b", "filter": "|0"}').decode().rstrip("="),
        "garbage!",
        "a",
        "AQ",  # a version byte and nothing else
        "é" * 10,
        "A" * (pagination.MAX_PAGE_TOKEN_CHARS + 1),
        base64.urlsafe_b64encode(b"\x01" + b"\x00" * 8 + b"\xff\xfe").decode(),  # not UTF-8
        " " + encode_page_token("a/b", "|0"),
    ],
    ids=lambda t: f"{t[:12]!r}..{len(t)}",
)
def test_foreign_page_tokens_are_invalid_arguments(token: str) -> None:
    violations: list[FieldViolation] = []
    assert decode_page_token(token, "|0", violations, "ListModels") == ""
    assert [v.field for v in violations] == ["page_token"]


def test_oversized_page_tokens_are_rejected_before_decoding() -> None:
    # 50 MB of base64 would take seconds to decode and hold 37 MB more; the length check does not
    # look at it. Generous bound for a slow shared machine: 200 rejections of the whole token.
    token = "A" * 50_000_000
    started = time.perf_counter()
    for _ in range(200):
        violations: list[FieldViolation] = []
        decode_page_token(token, "|0", violations, "ListModels")
    assert time.perf_counter() - started < 0.5
    assert [v.field for v in violations] == ["page_token"]


# ---- documented ranges and float32 fields --------------------------------------------------

_RANGE = re.compile(r"Range: (?P<open>[\[(])(?P<low>-?[\d.]+), (?P<high>-?[\d.]+)\]")
_FIELD = re.compile(r"^\s*optional (?:float|int32|int64) (?P<name>\w+) = \d+;")


def _documented_ranges() -> dict[str, tuple[float, float, bool]]:
    """`name -> (low, high, exclusive low)` from the `Range: [a, b]` comments of TextOptions."""
    text = (REPO_ROOT / "proto/pluggably/v1/generation.proto").read_text()
    block = text[text.index("message TextOptions {") :]
    block = block[: block.index("\n}\n")]
    ranges, comment = {}, ""
    for line in block.splitlines():
        if line.strip().startswith("//"):
            comment += " " + line.strip()[2:].strip()
            continue
        field = _FIELD.match(line)
        found = _RANGE.search(comment)
        if field and found:
            ranges[field["name"]] = (
                float(found["low"]),
                float(found["high"]),
                found["open"] == "(",
            )
        comment = ""
    return ranges


def _as_float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def test_documented_ranges_are_the_checked_ranges() -> None:
    documented = _documented_ranges()
    assert {"temperature", "top_p", "repetition_penalty"} <= set(documented)
    by_short = {spec.name.split(".", 1)[1]: spec for spec in TEXT_PARAMETERS}
    for name, (low, high, exclusive) in documented.items():
        spec = by_short[name]
        assert (spec.minimum, spec.maximum, spec.exclusive_minimum) == (low, high, exclusive), name


@pytest.mark.parametrize(
    "spec",
    [s for s in TEXT_PARAMETERS if s.name.split(".")[1] in _documented_ranges()],
    ids=lambda s: s.name,
)
def test_documented_bounds_hold_over_the_wire(spec: ParameterSpec) -> None:
    """Float fields travel as float32: a bound such as 0.01 arrives as 0.0099999998; it must
    still be accepted when the range includes it, and a value just outside still rejected."""
    name = spec.name.split(".", 1)[1]
    assert spec.minimum is not None and spec.maximum is not None
    low, high = float(spec.minimum), float(spec.maximum)
    accepted = [high] if spec.exclusive_minimum else [low, high]
    for value in accepted:
        request, _ = convert.generation_request_from_pb(
            _request(text=P.TextOptions(**{name: value})), "req-1"
        )
        assert getattr(request.text, name) == value  # what the client wrote, not the float32
    step = max(abs(low), abs(high), 1) * 1e-3
    rejected = [low - step, high + step] + ([low] if spec.exclusive_minimum else [])
    for value in rejected:
        assert _fields(_request(text=P.TextOptions(**{name: value}))) == [spec.name], value


def test_repetition_penalty_lower_bound_is_accepted() -> None:
    """The regression of issue 6: 0.01, the documented lower bound, was rejected."""
    assert _as_float32(0.01) < 0.01
    request, _ = convert.generation_request_from_pb(
        _request(text=P.TextOptions(repetition_penalty=0.01)), "req-1"
    )
    assert request.text.repetition_penalty == 0.01
    assert _fields(_request(text=P.TextOptions(repetition_penalty=0.0099))) == [
        "text.repetition_penalty"
    ]


def test_float_fields_reach_backends_as_written() -> None:
    request, _ = convert.generation_request_from_pb(
        _request(text=P.TextOptions(temperature=0.7, top_p=0.9, presence_penalty=-1.3)), "r"
    )
    assert (request.text.temperature, request.text.top_p, request.text.presence_penalty) == (
        0.7,
        0.9,
        -1.3,
    )
    largest = _as_float32(3.4028234663852886e38)
    assert _as_float32(convert._float32(largest)) == largest
    assert math.isnan(convert._float32(math.nan))


# ---- model ids and the size of errors ------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("", "required"),
        ("   ", "required"),
        ("fake/" + "x" * 300, "at most 256 characters"),
        ("fake/\x00echo", "control"),
        ("fake/echo\n", "control"),
        ("fake/\u202eohce", "control"),  # right-to-left override: reads as another id
    ],
    ids=["empty", "blank", "long", "nul", "newline", "bidi"],
)
def test_model_ids_are_checked_without_quoting_them(model: str, problem: str) -> None:
    for pb, field in (
        (_request(model=model), "model"),
        (_request(fallback_models=["fake/echo", model]), "fallback_models[1]"),
    ):
        [violation] = _violations(pb)
        assert violation.field == field and problem in violation.description
        if model.strip():
            assert model not in violation.description


def test_unicode_model_ids_are_fine() -> None:
    request, _ = convert.generation_request_from_pb(_request(model="local/modèle-日本"), "r")
    assert request.model == "local/modèle-日本"


def test_errors_stay_small_whatever_the_request_holds() -> None:
    pb = P.GenerateRequest(model="fake/echo")
    for _ in range(5_000):
        pb.messages.add(role="r" * 1_000)
    violations = _violations(pb)
    assert len(violations) == convert.MAX_REPORTED_VIOLATIONS
    assert "more problems" in violations[-1].description
    error = convert.invalid_argument(violations)
    assert len(error.message) < 2_000 and error.message.isascii()


def test_echo_escapes_and_clips() -> None:
    assert convert.echo("user") == "'user'"
    assert convert.echo("a\x00b") == "'a\\x00b'"
    clipped = convert.echo("é" * 1_000)
    assert len(clipped) <= 48 and clipped.isascii() and clipped.endswith("...")


# ---- catalog: what backends report is clamped into its wire fields --------------------------


def test_model_counts_are_clamped_into_their_fields() -> None:
    info = ModelInfo(
        provider="p",
        name="m",
        modality=Modality.TEXT,
        context_length=10**12,
        size_bytes=-5,
        capabilities=Capabilities(max_output_tokens=2**40),
    )
    pb = catalog_convert.model_to_pb(info)
    assert (pb.context_length, pb.size_bytes, pb.capabilities.max_output_tokens) == (
        2**31 - 1,
        0,
        2**31 - 1,
    )


def test_non_finite_parameter_defaults_are_null() -> None:
    spec = ParameterSpec("text.temperature", TEXT_PARAMETERS[1].type, "t", default=math.inf)
    out = catalog_convert.parameter_to_pb(spec)
    assert out.default_value.WhichOneof("kind") == "null_value"
    listed = ParameterSpec("text.stop", TEXT_PARAMETERS[5].type, "s", default=[math.nan, "x"])
    values = catalog_convert.parameter_to_pb(listed).default_value.list_value.values
    assert [v.WhichOneof("kind") for v in values] == ["null_value", "string_value"]


# ---- over the real server -------------------------------------------------------------------


@pytest.fixture(scope="module")
async def served(config_for):
    backend = FakeBackend(
        "fake",
        {"echo": Modality.TEXT, "other": Modality.TEXT},
        capabilities=FULL,
        options=ProviderOptionsPolicy(allowed=None),
    )
    server = GatewayServer(config_for([], auth={"enabled": False}), backends=[backend])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield backend, channel
    await server.stop(grace=0)


async def _invalid(call: Any) -> list[str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err.message
    assert err.info is not None and err.info.metadata["request_id"]
    return err.fields


async def test_nan_provider_option_over_grpc(served) -> None:
    backend, channel = served
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    pb = _request()
    pb.provider_options["penalty"].list_value.extend([1.0])
    pb.provider_options["penalty"].list_value.values[0].number_value = math.nan
    assert await _invalid(stub.Generate(pb)) == ["provider_options.penalty[0]"]
    # The same option, finite, reaches the backend.
    pb.provider_options["penalty"].list_value.values[0].number_value = 0.5
    await stub.Generate(pb)
    assert backend.requests[-1].provider_options == {"penalty": [0.5]}


async def test_repetition_penalty_bound_over_grpc(served) -> None:
    backend, channel = served
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    await stub.Generate(_request(text=P.TextOptions(repetition_penalty=0.01)))
    assert backend.requests[-1].text.repetition_penalty == 0.01


async def test_nested_page_token_over_grpc(served) -> None:
    _backend, channel = served
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    nested = base64.urlsafe_b64encode(b"[" * 50_000 + b"]" * 50_000).decode()
    fields = await _invalid(stub.ListModels(model_service_pb2.ListModelsRequest(page_token=nested)))
    assert fields == ["page_token"]
    page = await stub.ListModels(model_service_pb2.ListModelsRequest(page_size=1))
    rest = await stub.ListModels(
        model_service_pb2.ListModelsRequest(page_size=1, page_token=page.next_page_token)
    )
    assert [m.id for m in [*page.models, *rest.models]] == ["fake/echo", "fake/other"]


async def test_huge_requests_get_small_errors_with_details(served) -> None:
    """A status larger than the client's metadata limit (8-16 KiB) reaches it as
    RESOURCE_EXHAUSTED without details; every rejection here must keep its details."""
    _backend, channel = served
    stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
    assert await _invalid(stub.Generate(_request(model="fake/" + "é" * 1_000_000))) == ["model"]
    many = P.GenerateRequest(model="fake/echo")
    for _ in range(2_000):
        many.messages.add(role="x" * 1_000, content="hi")
    fields = await _invalid(stub.Generate(many))
    assert len(fields) == convert.MAX_REPORTED_VIOLATIONS
    options = _request()
    options.provider_options["k" * 100_000].number_value = 1
    assert len((await _invalid(stub.Generate(options)))[0]) < 80


async def test_get_model_with_a_huge_id_keeps_its_details(served) -> None:
    """ModelNotFound quotes the id three times (message, ErrorInfo, ResourceInfo): the id must be
    bounded before the lookup (`catalog.convert.check_model_id` in the servicer)."""
    _backend, channel = served
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    huge = "fake/" + "x" * 20_000
    assert await _invalid(stub.GetModel(model_service_pb2.GetModelRequest(id=huge))) == ["id"]
    assert await _invalid(
        stub.GetModelParameters(model_service_pb2.GetModelParametersRequest(id=huge))
    ) == ["id"]


async def test_many_model_dependent_violations_keep_their_details(config_for) -> None:
    """The dataplane reports one violation per image for a model without image input; 2,000 of
    them must not make a status too large for the client's metadata limit."""
    plain = FakeBackend("plain", {"text": Modality.TEXT})
    server = GatewayServer(config_for([], auth={"enabled": False}), backends=[plain])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = P.GenerateRequest(model="plain/text")
            for _ in range(2_000):
                request.messages.add(role="user").parts.add().image.url = "https://e.x/a.png"
            stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
            fields = await _invalid(stub.Generate(request))
            assert 0 < len(fields) <= 20
    finally:
        await server.stop(grace=0)
